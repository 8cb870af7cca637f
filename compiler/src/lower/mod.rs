//! Lowering a graph (after `qsm`, or an unquantized float graph) to a GPU launch plan: generated
//! MLIR kernels (compiled to PTX in-process, `crate::mlir`), launches of the runtime's CUDA
//! micro-kernels (`runtime/kernels/*.cu`, see [`micro`]), and a liveness-planned device arena.
//!
//! Partition, in topological order of the graph:
//! - **host prologue**: nodes that depend only on constants and on the *shapes* of the graph inputs
//!   (position ids, the rotary cos/sin gather, the causal mask) run on the host with the CPU
//!   executor; those read by device kernels get an arena buffer and are listed in the manifest's
//!   `host_prologue` (the runtime computes and uploads them before the launches). They are tiny and
//!   change only with the sequence length, which is why they are not worth kernels.
//! - **views**: `reshape`, `flatten`, `squeeze`, `unsqueeze`, `identity` of a contiguous value and
//!   every `transpose` are free: they alias their input's buffer with other dims and strides.
//!   Generated kernels read strided inputs; a micro-kernel input (or a reshape) that is not
//!   contiguous is materialised by a generated copy kernel. A generated kernel whose only reader
//!   is a transpose stores its result in the transposed order, so that view is contiguous (the
//!   attention epilogue writes [B, S, H, D] for o_proj directly).
//! - **generated kernels** ([`kernels`]): `gather` (embedding rows), `rms_norm` (+ output
//!   quantization), `softmax` (last axis), `add`/`sub`/`mul`/`div` (broadcasting), `swiglu`
//!   (+ quantization), `rotary`, `concat`, `neg`/`exp`/`sqrt`/`reciprocal`/`relu`/`sigmoid`, `cast`
//!   between float types, `quantize`, copies, and the quantization epilogue of micro-kernels.
//! - **micro-kernels** ([`micro`]): `int_linear`, `linear`, `attention`, `hadamard`. They write
//!   f32; an output quantization on them becomes a generated epilogue kernel, except that f32
//!   `hadamard` and `attention` quantize in their own epilogue (steps per channel, per head and
//!   channel), and a `hadamard` whose input is a `swiglu` read by nothing else computes that swiglu
//!   as it loads (no swiglu kernel).
//!
//! Generated-kernel ABI (what `Launch.args` lists, in the `gpu.func` parameter order): buffer
//! pointers first (bare-pointer memref convention: one device pointer per buffer, the buffer's
//! first element), then i64 sizes, then f32 scalars. Element-wise kernels run one thread per element
//! over a 4-D iteration space (dims padded with leading 1s), 256 threads per block; row kernels one
//! warp per row, 4 rows per block. Buffers hold one element per slot in the dtype's natural width;
//! int4 *activations* take one byte each (sign-extended i8), packed int4 exists only in weights.
//!
//! A launch whose grid evaluates to zero in some dimension (an empty KV cache) does nothing.
//!
//! Sizes are [`DimExpr`]s over the graph's symbols; the arena is planned with every symbol at its
//! maximum ([`LowerOptions`]: `batch` at `max_batch`, every other symbol at `max_tokens`).

pub mod artifact;
pub mod kernels;
pub mod memory;
pub mod micro;
pub mod shapes;

use kernels::{Kernel, PointwiseOp, Quant, Step, Strided};
use qcc_ir::{DType, Graph, NodeId, OpKind, Value};
use qcc_runtime::artifact::{Arg, Buffer, DimExpr, Io, Launch, Place, Symbol, SymbolValues};
use shapes::Dims;
use std::collections::{BTreeSet, HashMap, HashSet};

/// Name of the generated module (`kernels/qcc_generated.ptx`).
pub const GENERATED_MODULE: &str = "qcc_generated";

#[derive(Debug, thiserror::Error)]
pub enum LowerError {
    #[error("cannot lower node '{node}' ({op}): {what}")]
    Node { node: String, op: &'static str, what: String },
    #[error("cannot lower the graph: {0}")]
    Graph(String),
}

/// The symbols' maxima the memory plan is made for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LowerOptions {
    pub max_batch: u64,
    pub max_tokens: u64,
}

impl Default for LowerOptions {
    fn default() -> Self {
        LowerOptions { max_batch: 1, max_tokens: 2048 }
    }
}

/// The launch plan of a graph and the MLIR of its generated kernels.
#[derive(Clone, Debug)]
pub struct Lowered {
    pub symbols: Vec<Symbol>,
    pub inputs: Vec<Io>,
    pub outputs: Vec<Io>,
    pub buffers: Vec<Buffer>,
    pub arena_bytes: u64,
    pub launches: Vec<Launch>,
    /// Host-prologue values uploaded into buffers of the same name.
    pub host_prologue: Vec<String>,
    /// The module holding every generated kernel (`gpu.module @qcc_generated`).
    pub mlir: String,
    /// Names of the micro-kernel modules the launches use (`runtime/kernels/<name>.cu`).
    pub micro_modules: BTreeSet<String>,
}

/// A tensor as a kernel sees it: a buffer, its dims, and element strides.
#[derive(Clone, Debug)]
struct View {
    buffer: u32,
    dtype: DType,
    dims: Dims,
    strides: Dims,
}

impl View {
    fn is_contiguous(&self) -> bool {
        shapes::is_contiguous(&self.dims, &self.strides)
    }
}

struct Buf {
    name: String,
    dtype: DType,
    dims: Dims,
    place: BufPlace,
    /// Storage order when not row-major (`Buffer::order`).
    order: Option<Vec<usize>>,
}

#[derive(Clone, PartialEq, Eq)]
enum BufPlace {
    Weight(String),
    Arena,
}

/// Lowers `graph` into a launch plan. Errors name the node and op that cannot be lowered.
pub fn lower(graph: &Graph, options: &LowerOptions) -> Result<Lowered, LowerError> {
    let mut l = Lowerer::new(graph, options)?;
    for id in launch_order(graph)? {
        l.node(id)?;
    }
    l.finish()
}

/// The graph's topological order, with each `int_linear` that reads the same activations as an
/// earlier one moved up right after it (with its constant inputs) when its other inputs are ready
/// there: q, k and v (gate and up) become adjacent launches, which the runtime runs as one GEMV
/// launch at batch 1 (runtime/src/cuda/fast_linear.rs `group_w4`), and the memory plan follows
/// that order.
fn launch_order(graph: &Graph) -> Result<Vec<NodeId>, LowerError> {
    let order = graph.topo_order().map_err(|e| LowerError::Graph(e.to_string()))?;
    let mut placed: HashSet<NodeId> = HashSet::with_capacity(order.len());
    let mut out = Vec::with_capacity(order.len());
    for (i, &id) in order.iter().enumerate() {
        if !placed.insert(id) {
            continue;
        }
        out.push(id);
        if graph.node(id).op.kind != OpKind::IntLinear {
            continue;
        }
        let Some(x) = graph.input(id, 0) else { continue };
        for &later in &order[i + 1..] {
            if placed.contains(&later) || graph.node(later).op.kind != OpKind::IntLinear {
                continue;
            }
            let ins: Vec<Value> = graph.inputs(later).into_iter().flatten().collect();
            let ready = |v: &Value| placed.contains(&v.node) || graph.node(v.node).op.kind == OpKind::Constant;
            if ins.first() != Some(&x) || !ins.iter().all(ready) {
                continue;
            }
            for v in &ins {
                if placed.insert(v.node) {
                    out.push(v.node);
                }
            }
            placed.insert(later);
            out.push(later);
        }
    }
    Ok(out)
}

struct Lowerer<'g> {
    graph: &'g Graph,
    max: SymbolValues,
    symbols: Vec<Symbol>,
    bufs: Vec<Buf>,
    views: HashMap<Value, View>,
    host: HashSet<NodeId>,
    host_values: Vec<String>,
    constants: HashMap<String, u32>,
    inputs: Vec<Io>,
    launches: Vec<Launch>,
    /// (entry name, function text, location) of each distinct generated kernel.
    functions: Vec<(String, String, String)>,
    by_text: HashMap<String, String>,
    micro_modules: BTreeSet<String>,
    /// `swiglu` results left to the `hadamard` that is their only reader (its launch computes
    /// swiglu(g, u) as it loads them): the value, and the views of g and u.
    deferred_swiglu: HashMap<Value, (View, View)>,
    /// Graph inputs held as resident KV caches ([`resident_caches`]): input node -> its concat.
    resident: HashMap<NodeId, NodeId>,
    /// `add` nodes an int_linear launch computes in its epilogue (`micro::fused_residual`): their
    /// result.
    fused_adds: HashMap<NodeId, View>,
}

pub(crate) fn label(graph: &Graph, id: NodeId) -> String {
    let node = graph.node(id);
    if !node.name.is_empty() {
        return node.name.clone();
    }
    node.outputs.first().map(|o| o.name.clone()).unwrap_or_default()
}

impl<'g> Lowerer<'g> {
    fn new(graph: &'g Graph, options: &LowerOptions) -> Result<Lowerer<'g>, LowerError> {
        let mut names = BTreeSet::new();
        for &id in graph.graph_inputs() {
            for out in &graph.node(id).outputs {
                for d in out.ty.shape.iter().flat_map(|s| s.dims()) {
                    if let qcc_ir::Dim::Sym(s) = d {
                        names.insert(s.to_string());
                    }
                }
            }
        }
        let symbols: Vec<Symbol> = names
            .into_iter()
            .map(|name| {
                let max = if name == "batch" { options.max_batch } else { options.max_tokens };
                Symbol { name, max }
            })
            .collect();
        let max = symbols.iter().map(|s| (s.name.clone(), s.max as i64)).collect();
        Ok(Lowerer {
            graph,
            max,
            symbols,
            bufs: Vec::new(),
            views: HashMap::new(),
            host: host_nodes(graph),
            host_values: Vec::new(),
            constants: HashMap::new(),
            inputs: Vec::new(),
            launches: Vec::new(),
            functions: Vec::new(),
            by_text: HashMap::new(),
            micro_modules: BTreeSet::new(),
            deferred_swiglu: HashMap::new(),
            resident: resident_caches(graph),
            fused_adds: HashMap::new(),
        })
    }

    fn err(&self, id: NodeId, what: impl Into<String>) -> LowerError {
        LowerError::Node { node: label(self.graph, id), op: self.graph.node(id).op.kind.name(), what: what.into() }
    }

    fn new_buffer(&mut self, name: String, dtype: DType, dims: Dims, place: BufPlace) -> u32 {
        self.bufs.push(Buf { name, dtype, dims, place, order: None });
        (self.bufs.len() - 1) as u32
    }

    /// A fresh contiguous arena tensor.
    fn arena(&mut self, name: String, dtype: DType, dims: Dims) -> View {
        let strides = shapes::contiguous_strides(&dims);
        let buffer = self.new_buffer(name, dtype, dims.clone(), BufPlace::Arena);
        View { buffer, dtype, dims, strides }
    }

    /// The IR's dims of `v`; a symbol the graph inputs do not define (e.g. an output's own name for
    /// a size, `total_seq`) counts as unknown.
    fn declared_dims(&self, v: Value) -> Option<Dims> {
        let ty = self.graph.value_type(v);
        let dims = ty.shape.as_ref()?.dims().iter().map(|d| match d {
            qcc_ir::Dim::Sym(s) if !self.max.contains_key(&**s) => DimExpr::sym(shapes::UNKNOWN),
            d => shapes::from_ir(d),
        });
        Some(dims.collect())
    }

    /// The view of an input value of node `id`. Constants become weight buffers; host values become
    /// prologue buffers whose unknown dims are resolved against `target` (the shape they broadcast
    /// to in this consumer).
    fn input(&mut self, id: NodeId, port: usize, target: Option<&Dims>) -> Result<View, LowerError> {
        let v = self.graph.input(id, port).ok_or_else(|| self.err(id, format!("input {port} is absent")))?;
        if let Some(view) = self.views.get(&v) {
            return Ok(view.clone());
        }
        let name = self.graph.value_name(v).to_string();
        let producer = self.graph.node(v.node);
        let dtype = self.graph.value_type(v).dtype;
        if producer.op.kind == OpKind::Constant {
            let t = self.graph.constant(v).ok_or_else(|| self.err(id, format!("constant '{name}' has no value")))?;
            let dims: Dims = t.dims.iter().map(|&d| DimExpr::Const(d as i64)).collect();
            let view = self.weight(&name, t.dtype, dims);
            self.views.insert(v, view.clone());
            return Ok(view);
        }
        if self.host.contains(&v.node) {
            let declared = self.declared_dims(v).ok_or_else(|| self.err(id, format!("'{name}' has unknown rank")))?;
            let dims = match target {
                Some(t) => shapes::resolve_unknown(&declared, t),
                None => declared,
            };
            if dims.iter().any(shapes::has_unknown) {
                return Err(self.err(id, format!("host value '{name}' has dims the plan cannot size")));
            }
            let view = self.arena(name.clone(), dtype, dims);
            self.host_values.push(name);
            self.views.insert(v, view.clone());
            return Ok(view);
        }
        Err(self.err(id, format!("input '{name}' was not lowered")))
    }

    fn weight(&mut self, tensor: &str, dtype: DType, dims: Dims) -> View {
        let strides = shapes::contiguous_strides(&dims);
        let buffer = match self.constants.get(tensor) {
            Some(&b) => b,
            None => {
                let b = self.new_buffer(tensor.to_string(), dtype, dims.clone(), BufPlace::Weight(tensor.to_string()));
                self.constants.insert(tensor.to_string(), b);
                b
            }
        };
        View { buffer, dtype, dims, strides }
    }

    fn output(&self, id: NodeId) -> Value {
        Value::new(id, 0)
    }

    fn output_name(&self, id: NodeId) -> String {
        self.graph.value_name(self.output(id)).to_string()
    }

    fn output_dtype(&self, id: NodeId) -> DType {
        self.graph.value_type(self.output(id)).dtype
    }

    fn node(&mut self, id: NodeId) -> Result<(), LowerError> {
        let node = self.graph.node(id);
        let kind = node.op.kind;
        if self.host.contains(&id) || kind == OpKind::Constant {
            return Ok(());
        }
        if let Some(view) = self.fused_adds.remove(&id) {
            self.views.insert(self.output(id), view);
            return Ok(());
        }
        use OpKind::*;
        let out = match kind {
            Input => {
                let v = self.output(id);
                let dims = self.declared_dims(v).ok_or_else(|| self.err(id, "graph input of unknown rank"))?;
                let name = self.output_name(id);
                let view = match self.resident.get(&id) {
                    Some(&concat) => self.resident_cache(concat, name.clone(), self.output_dtype(id), dims.clone()),
                    None => self.arena(name.clone(), self.output_dtype(id), dims.clone()),
                };
                self.inputs.push(Io { name, dtype: view.dtype.name().to_string(), dims, buffer: view.buffer });
                view
            }
            Reshape | Flatten | Squeeze | Unsqueeze | Identity => self.reshape(id)?,
            Transpose => self.transpose(id)?,
            Gather => self.gather(id)?,
            RmsNorm => self.rms_norm(id)?,
            Swiglu if self.defer_swiglu(id)? => return Ok(()),
            Add | Sub | Mul | Div | Swiglu => {
                let op = match kind {
                    Add => PointwiseOp::Add,
                    Sub => PointwiseOp::Sub,
                    Mul => PointwiseOp::Mul,
                    Div => PointwiseOp::Div,
                    _ => PointwiseOp::Swiglu,
                };
                self.elementwise(id, op)?
            }
            Rotary => self.rotary(id)?,
            Concat => self.concat(id)?,
            Softmax => {
                let x = self.input(id, 0, None)?;
                let x = self.contiguous(id, x)?;
                let rank = x.dims.len() as i64;
                let axis = self.graph.node(id).op.int("axis").unwrap_or(-1);
                if rank == 0 || (axis != -1 && axis != rank - 1) {
                    return Err(self.err(id, "softmax is lowered over the last axis only"));
                }
                let dtype = self.output_dtype(id);
                let out = self.arena(self.output_name(id), dtype, x.dims.clone());
                let rows = shapes::product(&x.dims[..x.dims.len() - 1]);
                let k = x.dims[x.dims.len() - 1].clone();
                let kernel = kernels::softmax_rows((out.buffer, dtype), (x.buffer, x.dtype), rows, k)
                    .ok_or_else(|| self.err(id, "unsupported element types"))?;
                self.launch_generated(id, kernel);
                out
            }
            Neg | Exp | Sqrt | Reciprocal | Relu | Sigmoid => {
                let op = match kind {
                    Neg => PointwiseOp::Neg,
                    Exp => PointwiseOp::Exp,
                    Sqrt => PointwiseOp::Sqrt,
                    Reciprocal => PointwiseOp::Reciprocal,
                    Relu => PointwiseOp::Relu,
                    _ => PointwiseOp::Sigmoid,
                };
                let x = self.input(id, 0, None)?;
                let dtype = self.output_dtype(id);
                if !x.dtype.is_float() || !dtype.is_float() {
                    return Err(self.err(id, format!("{kind} on {} is not lowered (float only)", x.dtype)));
                }
                let dims = x.dims.clone();
                self.emit_pointwise(id, op, vec![x], dims, dtype, None, self.output_name(id))?
            }
            Cast => {
                let x = self.input(id, 0, None)?;
                let to = self.output_dtype(id);
                if !x.dtype.is_float() || !to.is_float() || to == DType::F8E4M3 {
                    return Err(self.err(id, format!("only float-to-float casts are lowered, not {} to {to}", x.dtype)));
                }
                let dims = x.dims.clone();
                self.emit_pointwise(id, PointwiseOp::Identity, vec![x], dims, to, None, self.output_name(id))?
            }
            Quantize => self.quantize(id)?,
            IntLinear | Linear => micro::linear(self, id)?,
            Attention => micro::attention(self, id)?,
            Hadamard => micro::hadamard(self, id)?,
            other => return Err(self.err(id, format!("no GPU lowering for '{other}' yet"))),
        };
        self.views.insert(self.output(id), out);
        Ok(())
    }

    /// Reshape-like ops alias a contiguous input with the output's dims; identity keeps the view.
    fn reshape(&mut self, id: NodeId) -> Result<View, LowerError> {
        let x = self.input(id, 0, None)?;
        if self.graph.node(id).op.kind == OpKind::Identity {
            return Ok(x);
        }
        let x = self.contiguous(id, x)?;
        let declared = self.declared_dims(self.output(id)).ok_or_else(|| self.err(id, "output of unknown rank"))?;
        // Unknown output dims: the non-unit dims of input and output correspond one to one when the op
        // only inserts or removes unit dims (squeeze, unsqueeze).
        let mut dims = declared.clone();
        if dims.iter().any(shapes::has_unknown) {
            let known_in: Vec<&DimExpr> = x.dims.iter().filter(|d| !shapes::is_one(d)).collect();
            let out_pos: Vec<usize> = (0..dims.len()).filter(|&i| !shapes::is_one(&dims[i])).collect();
            if known_in.len() == out_pos.len() {
                for (p, d) in out_pos.into_iter().zip(known_in) {
                    if shapes::is_unknown(&dims[p]) {
                        dims[p] = d.clone();
                    }
                }
            }
        }
        if dims.iter().any(shapes::has_unknown) {
            return Err(self.err(id, format!("output dims [{}] cannot be sized", join(&declared))));
        }
        let strides = shapes::contiguous_strides(&dims);
        Ok(View { buffer: x.buffer, dtype: x.dtype, dims, strides })
    }

    fn transpose(&mut self, id: NodeId) -> Result<View, LowerError> {
        let x = self.input(id, 0, None)?;
        let rank = x.dims.len();
        let perm: Vec<usize> = match self.graph.node(id).op.ints("perm") {
            Some(p) => p.iter().map(|&a| usize::try_from(a).unwrap_or(usize::MAX)).collect(),
            None => (0..rank).rev().collect(),
        };
        let mut seen = vec![false; rank];
        if perm.len() != rank || perm.iter().any(|&a| a >= rank || std::mem::replace(&mut seen[a], true)) {
            return Err(self.err(id, format!("perm {perm:?} is not a permutation of rank {rank}")));
        }
        Ok(View {
            buffer: x.buffer,
            dtype: x.dtype,
            dims: perm.iter().map(|&a| x.dims[a].clone()).collect(),
            strides: perm.iter().map(|&a| x.strides[a].clone()).collect(),
        })
    }

    /// `view` itself when contiguous, else a contiguous copy made by a generated kernel.
    pub(crate) fn contiguous(&mut self, id: NodeId, view: View) -> Result<View, LowerError> {
        if view.is_contiguous() {
            return Ok(view);
        }
        let name = format!("{}.in{}", self.output_name(id), view.buffer);
        let dims = view.dims.clone();
        let dtype = view.dtype;
        self.emit_pointwise(id, PointwiseOp::Identity, vec![view], dims, dtype, None, name)
    }

    fn gather(&mut self, id: NodeId) -> Result<View, LowerError> {
        let axis = self.graph.node(id).op.int("axis").unwrap_or(0);
        let table = self.input(id, 0, None)?;
        let ids = self.input(id, 1, None)?;
        let ids = self.contiguous(id, ids)?;
        let (Some(v), Some(d)) = (table.dims.first().and_then(const_of), table.dims.get(1).and_then(const_of)) else {
            return Err(self.err(id, "only gathers of rows of a constant [V, D] table are lowered"));
        };
        if axis != 0 || table.dims.len() != 2 || ids.dtype != DType::I64 {
            return Err(self.err(id, "only axis-0 gathers of a [V, D] table with i64 indices are lowered"));
        }
        let mut dims = ids.dims.clone();
        dims.push(DimExpr::Const(d as i64));
        let out = self.arena(self.output_name(id), table.dtype, dims);
        let rows = shapes::product(&ids.dims);
        let k = kernels::gather_rows(out.buffer, (table.buffer, table.dtype), (ids.buffer, ids.dtype), rows, d, v)
            .ok_or_else(|| self.err(id, format!("no storage type for {}", table.dtype)))?;
        self.launch_generated(id, k);
        Ok(out)
    }

    /// The output quantization of node `id` as a generated-kernel epilogue, if it has one.
    pub(crate) fn quant(&mut self, id: NodeId, channels: Option<&DimExpr>) -> Result<Option<Quant>, LowerError> {
        let Some(q) = self.graph.node(id).op.output_quant() else { return Ok(None) };
        self.quant_of(id, q.to, q.prefix_tokens, q.prefix_to, q.step.as_ref(), channels).map(Some)
    }

    /// The past length that makes prefix positions absolute (`prefix_offset`, a dimension symbol).
    fn prefix_offset(&self, id: NodeId) -> Option<DimExpr> {
        self.graph.node(id).op.str("prefix_offset").map(DimExpr::sym)
    }

    fn quant_of(
        &mut self,
        id: NodeId,
        to: DType,
        prefix_tokens: usize,
        prefix_to: DType,
        step: Option<&qcc_ir::Tensor>,
        channels: Option<&DimExpr>,
    ) -> Result<Quant, LowerError> {
        if to.int_range().is_none() || (prefix_tokens > 0 && prefix_to.int_range().is_none()) {
            return Err(self.err(id, format!("output quantization to {to} is not lowered (integer types only)")));
        }
        let step = match step {
            None => Step::None,
            Some(t) if t.numel() == 1 => {
                let v = t.to_f32_vec().map_err(|e| self.err(id, format!("step: {e}")))?;
                Step::Scalar(v[0])
            }
            Some(t) => {
                let n = t.numel() as u64;
                let per_channel = channels.and_then(const_of) == Some(n);
                // An attention output [B, H, S, D] may carry H * D steps (per head and channel).
                let heads = match self.graph.node(id).op.kind {
                    OpKind::Attention => {
                        let ty = self.graph.value_type(self.output(id));
                        ty.shape.as_ref().and_then(|s| s.dims().get(1).and_then(|d| d.known()))
                    }
                    _ => None,
                };
                let per_head = !per_channel && heads.zip(channels.and_then(const_of)).is_some_and(|(h, c)| h * c == n);
                if !(per_channel || per_head) || t.dtype != DType::F32 {
                    return Err(self.err(
                        id,
                        "a step must be a scalar or f32 per channel of the last axis (attention: per head and channel)",
                    ));
                }
                let name = format!("{}.step", self.output_name(id));
                let view = self.weight(&name, DType::F32, vec![DimExpr::Const(t.numel() as i64)]);
                if per_head {
                    Step::PerHeadChannel(view.buffer)
                } else {
                    Step::PerChannel(view.buffer)
                }
            }
        };
        Ok(Quant { to, prefix_tokens, prefix_to, prefix_offset: self.prefix_offset(id), step })
    }

    fn rms_norm(&mut self, id: NodeId) -> Result<View, LowerError> {
        let x = self.input(id, 0, None)?;
        let x = self.contiguous(id, x)?;
        let Some(k) = x.dims.last().and_then(const_of) else {
            return Err(self.err(id, "the normalized (last) axis must have a known extent"));
        };
        let gamma = self.input(id, 1, None)?;
        let beta = match self.graph.input(id, 2) {
            Some(_) => Some(self.input(id, 2, None)?),
            None => None,
        };
        for p in std::iter::once(&gamma).chain(beta.as_ref()) {
            if shapes::at_max(&shapes::product(&p.dims), &self.max) != Some(k) || !p.is_contiguous() {
                return Err(self.err(id, "gamma and beta must be contiguous vectors of the last axis"));
            }
        }
        let quant = self.quant(id, x.dims.last())?;
        let out = self.arena(self.output_name(id), self.output_dtype(id), x.dims.clone());
        let rank = x.dims.len();
        let rows = shapes::product(&x.dims[..rank - 1]);
        let seq = if rank >= 2 { x.dims[rank - 2].clone() } else { DimExpr::Const(1) };
        let epsilon = self.graph.node(id).op.float("epsilon").unwrap_or(1e-5);
        let k = kernels::rms_norm(
            (out.buffer, out.dtype),
            (x.buffer, x.dtype),
            (gamma.buffer, gamma.dtype),
            beta.as_ref().map(|b| (b.buffer, b.dtype)),
            k,
            epsilon,
            rows,
            seq,
            quant.as_ref(),
        )
        .ok_or_else(|| self.err(id, "unsupported element types"))?;
        self.launch_generated(id, k);
        Ok(out)
    }

    fn elementwise(&mut self, id: NodeId, op: PointwiseOp) -> Result<View, LowerError> {
        let a = self.input(id, 0, None)?;
        let b = self.input(id, 1, Some(&a.dims.clone()))?;
        let dims = shapes::broadcast(&[&a.dims, &b.dims])
            .ok_or_else(|| self.err(id, format!("[{}] and [{}] do not broadcast", join(&a.dims), join(&b.dims))))?;
        let quant = self.quant(id, dims.last())?;
        let dtype = self.output_dtype(id);
        if !dtype.is_float() && quant.is_none() {
            return Err(self.err(id, format!("element-wise {} on {dtype} is not lowered (float only)", op_name(op))));
        }
        self.emit_pointwise(id, op, vec![a, b], dims, dtype, quant, self.output_name(id))
    }

    /// Leaves `swiglu` node `id` to its reader when that is one `hadamard` of f32 with both operands
    /// of the output's own dims (no broadcast) and no output quantization: the Hadamard launch
    /// computes swiglu(g, u) as it loads its row ([`micro::hadamard`]), one launch and one f32 round
    /// trip less per MLP.
    fn defer_swiglu(&mut self, id: NodeId) -> Result<bool, LowerError> {
        let v = self.output(id);
        let users = self.graph.users(v);
        let [(reader, 0)] = users.as_slice() else { return Ok(false) };
        let reader = *reader;
        let f32_value = |x: Option<Value>| x.is_some_and(|x| self.graph.value_type(x).dtype == DType::F32);
        if self.graph.node(reader).op.kind != OpKind::Hadamard
            || self.host.contains(&reader)
            || self.graph.graph_outputs().iter().any(|o| o.value == v)
            || self.graph.node(id).op.output_quant().is_some()
            || !f32_value(Some(v))
            || !f32_value(self.graph.input(id, 0))
            || !f32_value(self.graph.input(id, 1))
        {
            return Ok(false);
        }
        let g = self.input(id, 0, None)?;
        let u = self.input(id, 1, None)?;
        let same = |a: &Dims, b: &Dims| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| shapes::same(x, y));
        let declared_ok = match self.declared_dims(v) {
            Some(d) if !d.iter().any(shapes::has_unknown) => same(&d, &g.dims),
            _ => true,
        };
        if !same(&g.dims, &u.dims) || !declared_ok {
            return Ok(false);
        }
        let g = self.contiguous(id, g)?;
        let u = self.contiguous(id, u)?;
        self.deferred_swiglu.insert(v, (g, u));
        Ok(true)
    }

    fn rotary(&mut self, id: NodeId) -> Result<View, LowerError> {
        let x = self.input(id, 0, None)?;
        let target = x.dims.clone();
        let cos = self.input(id, 1, Some(&target))?;
        let sin = self.input(id, 2, Some(&target))?;
        let dims = shapes::broadcast(&[&x.dims, &cos.dims, &sin.dims])
            .filter(|d| d.len() == x.dims.len() && d.iter().zip(&x.dims).all(|(a, b)| shapes::same(a, b)))
            .ok_or_else(|| self.err(id, "cos and sin must broadcast to x"))?;
        if x.dims.last().and_then(const_of).is_none_or(|d| d % 2 != 0) {
            return Err(self.err(id, "the rotated (last) axis must have a known even extent"));
        }
        let dtype = self.output_dtype(id);
        self.emit_pointwise(id, PointwiseOp::Rotary, vec![x, cos, sin], dims, dtype, None, self.output_name(id))
    }

    fn quantize(&mut self, id: NodeId) -> Result<View, LowerError> {
        let op = &self.graph.node(id).op;
        let (to, prefix_tokens, prefix_to) = match op.output_quant() {
            Some(q) => (q.to, q.prefix_tokens, q.prefix_to),
            None => return Err(self.err(id, "attribute 'to' is missing")),
        };
        let x = self.input(id, 0, None)?;
        let rank = x.dims.len() as i64;
        let axis = op.int("axis").unwrap_or(-1);
        let step_value = self.graph.input(id, 1).ok_or_else(|| self.err(id, "step is absent"))?;
        let step =
            self.graph.constant(step_value).cloned().ok_or_else(|| self.err(id, "only constant steps are lowered"))?;
        if step.numel() != 1 && axis != -1 && axis != rank - 1 {
            return Err(self.err(id, "per-channel steps are lowered on the last axis only"));
        }
        let step_dtype = step.dtype;
        let step_f32 = if step.dtype == DType::F32 {
            step
        } else {
            let v = step.to_f32_vec().map_err(|e| self.err(id, format!("step: {e}")))?;
            qcc_ir::Tensor::from_slice(step.dims.clone(), &v)
        };
        // The step tensor is a graph constant here, so it is uploaded under its own value name.
        let quant = if step_f32.numel() == 1 {
            self.quant_of(id, to, prefix_tokens, prefix_to, Some(&step_f32), x.dims.last())?
        } else {
            if x.dims.last().and_then(const_of) != Some(step_f32.numel() as u64) || step_dtype != DType::F32 {
                return Err(self.err(id, "a per-channel step must be an f32 vector of the last axis"));
            }
            let name = self.graph.value_name(step_value).to_string();
            let view = self.weight(&name, DType::F32, vec![DimExpr::Const(step_f32.numel() as i64)]);
            Quant {
                to,
                prefix_tokens,
                prefix_to,
                prefix_offset: self.prefix_offset(id),
                step: Step::PerChannel(view.buffer),
            }
        };
        let dims = x.dims.clone();
        self.emit_pointwise(
            id,
            PointwiseOp::Identity,
            vec![x],
            dims,
            self.output_dtype(id),
            Some(quant),
            self.output_name(id),
        )
    }

    /// Emits an element-wise kernel writing a fresh contiguous arena tensor `name` of `dims`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn emit_pointwise(
        &mut self,
        id: NodeId,
        op: PointwiseOp,
        inputs: Vec<View>,
        dims: Dims,
        dtype: DType,
        quant: Option<Quant>,
        name: String,
    ) -> Result<View, LowerError> {
        if dims.len() > 4 {
            return Err(self.err(id, format!("rank {} > 4 is not lowered", dims.len())));
        }
        let out = match self.layout_for_transpose(id, &name, &dims) {
            Some(perm) => {
                // Stored in the order its only reader, a transpose, produces: that view is then
                // contiguous (free to reshape, fit for micro-kernels) and this one is strided.
                let physical: Dims = perm.iter().map(|&a| dims[a].clone()).collect();
                let stored = self.arena(name, dtype, physical);
                let mut strides = vec![DimExpr::Const(0); dims.len()];
                for (i, &a) in perm.iter().enumerate() {
                    strides[a] = stored.strides[i].clone();
                }
                View { buffer: stored.buffer, dtype, dims: dims.clone(), strides }
            }
            None => self.arena(name, dtype, dims.clone()),
        };
        let mut strides = vec![DimExpr::Const(0); 4 - dims.len()];
        strides.extend(out.strides.iter().cloned());
        let pad = |v: Vec<DimExpr>| -> [DimExpr; 4] { [v[0].clone(), v[1].clone(), v[2].clone(), v[3].clone()] };
        let out_strided = Strided { buffer: out.buffer, dtype, strides: pad(strides), offset: DimExpr::Const(0) };
        self.emit_pointwise_into(id, op, &inputs, &dims, out_strided, quant)?;
        Ok(out)
    }

    /// The permutation of the single `transpose` that reads node `id`'s output (named `name`, of
    /// `dims`), when that is its only use and not a graph output.
    pub(crate) fn layout_for_transpose(&self, id: NodeId, name: &str, dims: &Dims) -> Option<Vec<usize>> {
        let v = self.output(id);
        if self.graph.value_name(v) != name || self.graph.graph_outputs().iter().any(|o| o.value == v) {
            return None;
        }
        let users = self.graph.users(v);
        let [(user, 0)] = users.as_slice() else { return None };
        let op = &self.graph.node(*user).op;
        if op.kind != OpKind::Transpose {
            return None;
        }
        let rank = dims.len();
        let perm: Vec<usize> = match op.ints("perm") {
            Some(p) => p.iter().map(|&a| usize::try_from(a).ok()).collect::<Option<_>>()?,
            None => (0..rank).rev().collect(),
        };
        let mut sorted = perm.clone();
        sorted.sort_unstable();
        (sorted == (0..rank).collect::<Vec<_>>()).then_some(perm)
    }

    /// Emits an element-wise kernel over `dims` writing through `out` (a strided view).
    fn emit_pointwise_into(
        &mut self,
        id: NodeId,
        op: PointwiseOp,
        inputs: &[View],
        dims: &Dims,
        out: Strided,
        quant: Option<Quant>,
    ) -> Result<(), LowerError> {
        if dims.len() > 4 {
            return Err(self.err(id, format!("rank {} > 4 is not lowered", dims.len())));
        }
        let pad = |d: Dims, fill: DimExpr| -> [DimExpr; 4] {
            let mut v = vec![fill; 4 - d.len()];
            v.extend(d);
            [v[0].clone(), v[1].clone(), v[2].clone(), v[3].clone()]
        };
        let ins: Vec<Strided> = inputs
            .iter()
            .map(|v| Strided {
                buffer: v.buffer,
                dtype: v.dtype,
                strides: pad(shapes::broadcast_strides(&v.dims, &v.strides, dims), DimExpr::Const(0)),
                offset: DimExpr::Const(0),
            })
            .collect();
        let k = kernels::pointwise(op, &out, &ins, &pad(dims.clone(), DimExpr::Const(1)), quant.as_ref())
            .ok_or_else(|| self.err(id, "unsupported element types"))?;
        self.launch_generated(id, k);
        Ok(())
    }

    /// The buffer of a resident KV cache for graph input `name` (dims `past`) appended to by
    /// `concat`: stored with the concat axis outermost, so the input is a prefix of the concat's
    /// output whatever its length, and the strides of a view do not depend on that length. The
    /// concat gives the buffer its output's dims and name.
    fn resident_cache(&mut self, concat: NodeId, name: String, dtype: DType, past: Dims) -> View {
        let axis = concat_axis(self.graph, concat, past.len()).unwrap_or(0);
        let mut order = vec![axis];
        order.extend((0..past.len()).filter(|&a| a != axis));
        let storage: Dims = order.iter().map(|&a| past[a].clone()).collect();
        let storage_strides = shapes::contiguous_strides(&storage);
        let mut strides = vec![DimExpr::Const(0); past.len()];
        for (i, &a) in order.iter().enumerate() {
            strides[a] = storage_strides[i].clone();
        }
        let buffer = self.new_buffer(name, dtype, past.clone(), BufPlace::Arena);
        self.bufs[buffer as usize].order = Some(order);
        View { buffer, dtype, dims: past, strides }
    }

    /// `concat`: each input copied into its slice of a fresh contiguous tensor, or of a resident
    /// cache after its past (already in place).
    fn concat(&mut self, id: NodeId) -> Result<View, LowerError> {
        let mut inputs = Vec::new();
        for port in 0..self.graph.node(id).num_inputs {
            if self.graph.input(id, port).is_some() {
                inputs.push(self.input(id, port, None)?);
            }
        }
        let Some(first) = inputs.first() else { return Err(self.err(id, "no inputs")) };
        let rank = first.dims.len();
        let Some(axis) = concat_axis(self.graph, id, rank) else {
            let axis = self.graph.node(id).op.int("axis").unwrap_or(0);
            return Err(self.err(id, format!("axis {axis} out of range for rank {rank}")));
        };
        let mut dims = first.dims.clone();
        for v in &inputs[1..] {
            let same_rest = v.dims.len() == dims.len()
                && v.dims.iter().zip(&dims).enumerate().all(|(i, (a, b))| i == axis || shapes::same(a, b));
            if !same_rest || v.dtype != first.dtype {
                return Err(
                    self.err(id, format!("inputs [{}] and [{}] do not concatenate", join(&first.dims), join(&v.dims)))
                );
            }
            dims[axis] = shapes::add(&dims[axis], &v.dims[axis]);
        }
        // A resident cache's concat (only resident caches have an order, and their one device reader
        // is this concat): the output is the whole buffer.
        let resident = self.bufs[first.buffer as usize].order.is_some();
        let out = if resident {
            let name = self.output_name(id);
            let cache = &mut self.bufs[first.buffer as usize];
            cache.dims = dims.clone();
            cache.name = name;
            View { dims, ..first.clone() }
        } else {
            self.arena(self.output_name(id), first.dtype, dims)
        };
        let mut start = DimExpr::Const(0);
        for (i, v) in inputs.into_iter().enumerate() {
            if resident && i == 0 {
                start = v.dims[axis].clone();
                continue;
            }
            let mut strides = vec![DimExpr::Const(0); 4 - v.dims.len()];
            strides.extend(out.strides.iter().cloned());
            let target = Strided {
                buffer: out.buffer,
                dtype: out.dtype,
                strides: [strides[0].clone(), strides[1].clone(), strides[2].clone(), strides[3].clone()],
                offset: shapes::mul(&start, &out.strides[axis]),
            };
            start = shapes::add(&start, &v.dims[axis]);
            let part_dims = v.dims.clone();
            self.emit_pointwise_into(id, PointwiseOp::Identity, &[v], &part_dims, target, None)?;
        }
        Ok(out)
    }

    /// Records a launch of a generated kernel, deduplicating identical functions.
    pub(crate) fn launch_generated(&mut self, id: NodeId, k: Kernel) {
        let entry = match self.by_text.get(&k.text) {
            Some(name) => name.clone(),
            None => {
                let taken: HashSet<&str> = self.functions.iter().map(|f| f.0.as_str()).collect();
                let mut name = k.base.clone();
                let mut n = 1;
                while taken.contains(name.as_str()) {
                    n += 1;
                    name = format!("{}_{n}", k.base);
                }
                let location = format!("{} ({})", label(self.graph, id), self.graph.node(id).op.kind);
                self.functions.push((name.clone(), k.text.clone(), location));
                self.by_text.insert(k.text, name.clone());
                name
            }
        };
        self.launches.push(Launch {
            node: label(self.graph, id),
            module: GENERATED_MODULE.to_string(),
            entry,
            grid: k.grid,
            block: k.block,
            shared_bytes: 0,
            args: k.args,
        });
    }

    pub(crate) fn launch_micro(&mut self, launch: Launch) {
        self.micro_modules.insert(launch.module.clone());
        self.launches.push(launch);
    }

    fn finish(mut self) -> Result<Lowered, LowerError> {
        let mut outputs = Vec::new();
        for out in self.graph.graph_outputs().to_vec() {
            let id = out.value.node;
            let view = self.views.get(&out.value).cloned().ok_or_else(|| {
                LowerError::Graph(format!("graph output '{}' is not computed on the device", out.name))
            })?;
            // A resident cache is output in its own storage order.
            let view = if self.bufs[view.buffer as usize].order.is_some() { view } else { self.contiguous(id, view)? };
            if let BufPlace::Weight(_) = self.bufs[view.buffer as usize].place {
                return Err(LowerError::Graph(format!("graph output '{}' is a constant", out.name)));
            }
            outputs.push(Io {
                name: out.name.clone(),
                dtype: view.dtype.name().to_string(),
                dims: view.dims,
                buffer: view.buffer,
            });
        }
        // Lifetimes in launch steps: inputs and host-prologue buffers are written before step 1,
        // launch i runs at step i + 1, outputs are read after the last launch.
        let end = self.launches.len() + 1;
        let mut first = vec![usize::MAX; self.bufs.len()];
        let mut last = vec![0usize; self.bufs.len()];
        for (i, launch) in self.launches.iter().enumerate() {
            for arg in &launch.args {
                if let Arg::Buffer(b) = arg {
                    first[*b as usize] = first[*b as usize].min(i + 1);
                    last[*b as usize] = last[*b as usize].max(i + 1);
                }
            }
        }
        let host: HashSet<&str> = self.host_values.iter().map(|s| s.as_str()).collect();
        for (b, buf) in self.bufs.iter().enumerate() {
            if host.contains(buf.name.as_str()) || self.inputs.iter().any(|io| io.buffer as usize == b) {
                first[b] = 0;
            }
        }
        for io in &outputs {
            last[io.buffer as usize] = end;
            first[io.buffer as usize] = first[io.buffer as usize].min(end);
        }
        let arena: Vec<usize> = (0..self.bufs.len()).filter(|&b| self.bufs[b].place == BufPlace::Arena).collect();
        let mut lifetimes = Vec::with_capacity(arena.len());
        for &b in &arena {
            let buf = &self.bufs[b];
            let numel = shapes::at_max(&shapes::product(&buf.dims), &self.max).ok_or_else(|| {
                LowerError::Graph(format!(
                    "buffer '{}' [{}] cannot be sized at the symbols' maxima",
                    buf.name,
                    join(&buf.dims)
                ))
            })?;
            let bytes = numel.saturating_mul(kernels::storage_bytes(buf.dtype));
            let first_step = if first[b] == usize::MAX { 0 } else { first[b] };
            lifetimes.push(memory::Lifetime { bytes, first: first_step, last: last[b].max(first_step) });
        }
        let placement = memory::plan(&lifetimes);
        let mut places: Vec<Place> = self
            .bufs
            .iter()
            .map(|b| match &b.place {
                BufPlace::Weight(t) => Place::Weight { tensor: t.clone() },
                BufPlace::Arena => Place::Host,
            })
            .collect();
        for (k, &b) in arena.iter().enumerate() {
            places[b] = Place::Arena { offset: placement.offsets[k], bytes: lifetimes[k].bytes };
        }
        let buffers = self
            .bufs
            .iter()
            .zip(places)
            .enumerate()
            .map(|(id, (b, place))| Buffer {
                id: id as u32,
                name: b.name.clone(),
                dtype: b.dtype.name().to_string(),
                dims: b.dims.clone(),
                place,
                order: b.order.clone(),
            })
            .collect();
        Ok(Lowered {
            symbols: self.symbols,
            inputs: self.inputs,
            outputs,
            buffers,
            arena_bytes: placement.arena_bytes,
            launches: self.launches,
            host_prologue: self.host_values,
            mlir: kernels::module_text(GENERATED_MODULE, &self.functions),
            micro_modules: self.micro_modules,
        })
    }
}

/// Nodes computed on the host: they read only constants, other host nodes, and the shapes (never the
/// data) of graph inputs.
fn host_nodes(graph: &Graph) -> HashSet<NodeId> {
    let mut host = HashSet::new();
    let Ok(order) = graph.topo_order() else { return host };
    for id in order {
        let kind = graph.node(id).op.kind;
        let on_host = match kind {
            OpKind::Input | OpKind::Constant => false,
            OpKind::Shape | OpKind::Size => true,
            _ => graph
                .inputs(id)
                .iter()
                .flatten()
                .all(|v| host.contains(&v.node) || graph.node(v.node).op.kind == OpKind::Constant),
        };
        if on_host {
            host.insert(id);
        }
    }
    host
}

/// The normalized axis of concat `id` over inputs of rank `rank`.
fn concat_axis(graph: &Graph, id: NodeId, rank: usize) -> Option<usize> {
    let axis = graph.node(id).op.int("axis").unwrap_or(0);
    let axis = if axis < 0 { axis + rank as i64 } else { axis };
    usize::try_from(axis).ok().filter(|&a| a < rank)
}

/// KV caches the plan keeps resident: a graph input read on the device only by a two-input concat
/// (as its first input, the past) whose result is a graph output (directly or through identities),
/// e.g. `present.0.key = concat(past_key_values.0.key, k)`. The input and the output share one buffer
/// stored with the concat axis outermost, so a decode step appends its rows in place and the next
/// step's past is already there (runtime/src/cuda/lm.rs `CudaKvDecoder`). Input node -> concat node.
fn resident_caches(graph: &Graph) -> HashMap<NodeId, NodeId> {
    let host = host_nodes(graph);
    let mut outputs: HashSet<Value> = graph.graph_outputs().iter().map(|o| o.value).collect();
    // Values whose identity is an output count as outputs.
    let mut grew = true;
    while grew {
        grew = false;
        for id in graph.node_ids() {
            if graph.node(id).op.kind == OpKind::Identity && outputs.contains(&Value::new(id, 0)) {
                if let Some(x) = graph.input(id, 0) {
                    grew |= outputs.insert(x);
                }
            }
        }
    }
    let mut resident = HashMap::new();
    for id in graph.node_ids() {
        let node = graph.node(id);
        let inputs = graph.inputs(id);
        if node.op.kind != OpKind::Concat || inputs.len() != 2 || !outputs.contains(&Value::new(id, 0)) {
            continue;
        }
        let (Some(past), Some(new)) = (inputs[0], inputs[1]) else { continue };
        let rank = graph.value_type(past).shape.as_ref().map(|s| s.dims().len());
        if graph.node(past.node).op.kind != OpKind::Input
            || graph.value_type(past).dtype != graph.value_type(new).dtype
            || rank.and_then(|r| concat_axis(graph, id, r)).is_none()
        {
            continue;
        }
        let device_readers = graph.users(past).into_iter().filter(|(user, _)| !host.contains(user)).count();
        if device_readers == 1 {
            resident.insert(past.node, id);
        }
    }
    resident
}

pub(crate) fn const_of(d: &DimExpr) -> Option<u64> {
    match d {
        DimExpr::Const(c) => u64::try_from(*c).ok(),
        _ => None,
    }
}

pub(crate) fn join(dims: &[DimExpr]) -> String {
    dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",")
}

fn op_name(op: PointwiseOp) -> &'static str {
    match op {
        PointwiseOp::Add => "add",
        PointwiseOp::Sub => "sub",
        PointwiseOp::Mul => "mul",
        PointwiseOp::Div => "div",
        PointwiseOp::Swiglu => "swiglu",
        PointwiseOp::Rotary => "rotary",
        PointwiseOp::Identity => "copy",
        _ => "unary",
    }
}

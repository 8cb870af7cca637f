//! The CUDA executor of compiled artifacts (`model.qcc/`): follows the manifest's plan.
//!
//! Loading: [`Manifest::load`] (format version, checksums, references), the graph (`model.qir`,
//! for weight tensors and the host prologue), one device arena of `arena_bytes` (filled with 0xFF
//! bytes, so a value no kernel wrote reads as NaN or -1), one device buffer per weight, the
//! generated PTX modules as they are and the micro-kernel sources through NVRTC (with
//! `kernels/common.cuh` prepended; PTX cached per process and on disk under `QCC_CACHE_DIR` or
//! `~/.cache/qcc/nvrtc`, keyed by the source's sha256). Every launch's function is resolved at load
//! so a missing entry fails before anything runs.
//!
//! Running: symbols are bound from the input shapes, inputs are copied into their buffers, the host
//! prologue (if any) runs on the CPU executor over the part of the graph it needs and its values
//! are copied into their buffers, the launches run in order on one stream with grids and i64
//! arguments evaluated from the symbols, and the outputs are copied back. `QCC_CUDA_SYNC=1` (or
//! [`CudaExecutor::set_sync_each`]) synchronizes after every launch so a fault names its launch.
//!
//! Linear launches run on the runtime's tuned kernels where a route applies (W4A4 GEMV/GEMM for
//! `int_linear`, cuBLAS for float `linear`; same outputs, see [`super::fast_linear`];
//! `QCC_FAST_LINEAR=0` keeps the micro-kernels). `QCC_SYNTHETIC_WEIGHTS=<seed>` loads an artifact
//! without its weights file and fills the weight buffers with seeded random data (timing only).
//!
//! Runtime-supplied arguments: a `hadamard` micro-kernel launch gets two arguments appended to the
//! manifest's (the device matrix of `qcc_ir::hadamard::Hadamard::new(n)` as i8 and the f64 scale
//! 1/sqrt(block)), see `runtime/kernels/hadamard.cu`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig};
use cudarc::nvrtc::Ptx;
use ndarray::{ArrayD, IxDyn};
use qcc_ir::{DType, Graph, GraphOutput, NodeId};

use super::fast_linear::{self, Need, Route, Scratch};
use super::{nvrtc, CudaError, Gpu};
use crate::artifact::{artifact_path, Arg, Buffer, Manifest, ManifestError, ModuleKind, Place, SymbolValues};
use crate::cpu::{CpuExecutor, ExecError};
use crate::RtTensor;
use cudarc::cublas::CudaBlas;

/// Why an artifact could not be loaded or run on the GPU.
#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Cuda(#[from] CudaError),
    #[error("loading the graph {path}: {what}")]
    Graph { path: PathBuf, what: String },
    #[error("host prologue: {0}")]
    Prologue(#[from] ExecError),
    #[error("weight buffer {buffer} (`{tensor}`): {what}")]
    Weight { buffer: u32, tensor: String, what: String },
    #[error("input `{name}`: {what}")]
    Input { name: String, what: String },
    #[error("launch {index} (node `{node}`, {module}::{entry}): {what}")]
    Launch { index: usize, node: String, module: String, entry: String, what: String },
    #[error("buffer {id} (`{name}`): {what}")]
    Buffer { id: u32, name: String, what: String },
}

/// One kernel argument value, ready to push.
#[derive(Debug, Clone, Copy)]
enum ArgVal {
    Ptr(u64),
    I64(i64),
    F32(f32),
    F64(f64),
}

/// A graph input already on the device: (name, data or `None` where it lives in its own buffer, shape).
pub type DeviceInput<'a> = (&'a str, Option<&'a CudaSlice<u8>>, Vec<usize>);

/// Bytes one element takes in a device buffer of the arena: int4 and bool values take a byte.
pub fn element_bytes(dtype: DType) -> usize {
    dtype.bits().div_ceil(8).max(1)
}

/// The bytes of `t` converted to `dtype` as a device buffer holds them.
pub fn device_bytes(t: &RtTensor, dtype: DType) -> Vec<u8> {
    match t.cast(dtype) {
        RtTensor::I4(a) => a.iter().map(|&v| v as u8).collect(),
        RtTensor::U4(a) => a.iter().copied().collect(),
        other => match other.to_ir_tensor().bytes() {
            Ok(b) => b.to_vec(),
            Err(_) => Vec::new(),
        },
    }
}

/// A tensor read back from a device buffer.
pub fn tensor_from_device(dtype: DType, dims: &[usize], bytes: Vec<u8>) -> Result<RtTensor, String> {
    let shape = IxDyn(dims);
    let bad = |e: ndarray::ShapeError| e.to_string();
    Ok(match dtype {
        DType::I4 => {
            RtTensor::I4(ArrayD::from_shape_vec(shape, bytes.into_iter().map(|b| b as i8).collect()).map_err(bad)?)
        }
        DType::U4 => RtTensor::U4(ArrayD::from_shape_vec(shape, bytes).map_err(bad)?),
        DType::Bool => {
            RtTensor::Bool(ArrayD::from_shape_vec(shape, bytes.into_iter().map(|b| b != 0).collect()).map_err(bad)?)
        }
        _ => {
            let t = qcc_ir::Tensor::from_bytes(dtype, dims.to_vec(), bytes::Bytes::from(bytes))
                .map_err(|e| e.to_string())?;
            RtTensor::from_ir_tensor(&t).map_err(|e| e.to_string())?
        }
    })
}

/// The transform size of a `hadamard` micro-kernel launch: its arguments are (x | g, u), out, rows,
/// n, ..., so n is the second size after the buffers, a constant.
fn hadamard_size(launch: &crate::artifact::Launch) -> Result<i64, String> {
    let mut sizes = launch.args.iter().skip_while(|a| matches!(a, Arg::Buffer(_)));
    match sizes.nth(1) {
        Some(Arg::I64(e)) => e.eval(&SymbolValues::new()).map_err(|e| format!("size n: {e}")),
        _ => Err("expected args x (or g, u), out, rows, n".into()),
    }
}

/// Compiles a micro-kernel source (common header prepended) to PTX, cached in the process and on disk.
fn micro_ptx(name: &str, src: &str) -> Result<String, CudaError> {
    let full = format!("{}\n#line 1 \"{name}.cu\"\n{src}", nvrtc::COMMON_HEADER);
    nvrtc::compile_cached(name, &full, nvrtc::TARGET_ARCH)
}

/// The part of `graph` that computes `values` (plus every graph input), with those as its outputs.
fn prologue_graph(graph: &Graph, values: &[String]) -> Result<Graph, ExecutorError> {
    let mut g = graph.clone();
    let mut targets = Vec::new();
    for name in values {
        let v = g.value_by_name(name).ok_or_else(|| ExecutorError::Graph {
            path: PathBuf::from("model.qir"),
            what: format!("host prologue value `{name}` is not in the graph"),
        })?;
        targets.push(v);
    }
    let mut keep: HashSet<NodeId> = g.graph_inputs().iter().copied().collect();
    let mut stack: Vec<NodeId> = targets.iter().map(|v| v.node).collect();
    while let Some(id) = stack.pop() {
        if keep.insert(id) || g.graph_inputs().contains(&id) {
            stack.extend(g.inputs(id).into_iter().flatten().map(|v| v.node).filter(|n| !keep.contains(n)));
        }
    }
    let all: Vec<NodeId> = g.node_ids().collect();
    for id in all {
        if !keep.contains(&id) {
            g.remove_node(id);
        }
    }
    *g.graph_outputs_mut() =
        targets.into_iter().zip(values).map(|(value, name)| GraphOutput { name: name.clone(), value }).collect();
    Ok(g)
}

/// Suffix of the prologue input that stands for a graph input's dims ([`HostPrologue`]).
const SHAPE_SUFFIX: &str = "#shape";

/// The host prologue: a CPU executor of the part of the graph it computes, where every graph input
/// that this part reads only through plain `shape` ops is replaced by an input `{name}#shape`
/// (i64[rank]) holding its dims. A KV-cache graph's prologue derives positions and the causal mask
/// from the caches' lengths, so a decode step feeds it four numbers per cache instead of a
/// zero-filled host copy of every cache (16.8 MB per 7B-shaped layer and step, which took most of a
/// generated token's time).
struct HostPrologue {
    exec: CpuExecutor,
    shape_only: HashSet<String>,
}

impl HostPrologue {
    fn new(graph: &Graph, values: &[String]) -> Result<HostPrologue, ExecutorError> {
        let mut g = prologue_graph(graph, values)?;
        let plain_shape = |g: &Graph, n: NodeId| {
            let op = &g.node(n).op;
            op.kind == qcc_ir::OpKind::Shape && op.int("start").is_none() && op.int("end").is_none()
        };
        // shape(cast(x)) is shape(x) (an fp16 plan casts each cache where it enters); casts left
        // without users go.
        let shapes: Vec<NodeId> = g.node_ids().filter(|&n| plain_shape(&g, n)).collect();
        for n in shapes {
            while let Some(src) = g.input(n, 0).filter(|v| g.node(v.node).op.kind == qcc_ir::OpKind::Cast) {
                let through = g.input(src.node, 0);
                g.set_input(n, 0, through);
                let outputs: HashSet<qcc_ir::Value> = g.graph_outputs().iter().map(|o| o.value).collect();
                if !g.is_used(src) && !outputs.contains(&src) {
                    g.remove_node(src.node);
                }
            }
        }
        let mut shape_only = HashSet::new();
        for id in g.graph_inputs().to_vec() {
            let input = qcc_ir::Value::new(id, 0);
            let users = g.users(input);
            // Inputs without users here (the other layers' caches) also take only their dims.
            if !users.iter().all(|&(n, _)| plain_shape(&g, n)) {
                continue;
            }
            let name = g.value_name(input).to_string();
            let Some(rank) = g.value_type(input).shape.as_ref().map(|s| s.rank()) else { continue };
            let dims = g
                .add_input(&format!("{name}{SHAPE_SUFFIX}"), qcc_ir::TensorType::known(DType::I64, &[rank]))
                .map_err(|e| ExecutorError::Graph { path: PathBuf::from("model.qir"), what: e.to_string() })?;
            for (n, _) in users {
                g.replace_all_uses(qcc_ir::Value::new(n, 0), dims);
                g.remove_node(n);
            }
            g.remove_node(id);
            shape_only.insert(name);
        }
        Ok(HostPrologue { exec: CpuExecutor::new(&g)?, shape_only })
    }

    /// Runs on the graph inputs given by name and shape; `data` gives an input's values, asked only
    /// for inputs whose values the prologue reads.
    fn run(
        &self,
        inputs: &[(&str, &[usize])],
        data: &dyn Fn(&str) -> RtTensor,
    ) -> Result<Vec<(String, RtTensor)>, ExecutorError> {
        let (names, tensors): (Vec<String>, Vec<RtTensor>) = inputs
            .iter()
            .map(|&(name, shape)| {
                if self.shape_only.contains(name) {
                    let dims = shape.iter().map(|&d| d as i64).collect();
                    (format!("{name}{SHAPE_SUFFIX}"), RtTensor::from_vec(&[shape.len()], dims).expect("rank-1 dims"))
                } else {
                    (name.to_string(), data(name))
                }
            })
            .unzip();
        let fed: Vec<(&str, RtTensor)> = names.iter().map(String::as_str).zip(tensors).collect();
        Ok(self.exec.run(&fed)?)
    }
}

/// Zeros in the dtype of graph input `name` and its shape in `shapes`.
fn input_zeros(manifest: &Manifest, name: &str, shapes: &[(&str, &[usize])]) -> RtTensor {
    let shape = shapes.iter().find(|(n, _)| *n == name).map_or(&[][..], |(_, s)| *s);
    let dtype = manifest.inputs.iter().find(|i| i.name == name).and_then(|i| DType::from_name(&i.dtype));
    RtTensor::from_vec(shape, vec![0f32; shape.iter().product()])
        .map_or_else(|| RtTensor::scalar(0f32), |t| t.cast(dtype.unwrap_or(DType::F32)))
}

/// Device data of a weight buffer: the graph constant of that name (converted to the buffer's
/// dtype if they differ; int4 stays packed as in the weights file), or for `X.step` the `step`
/// tensor attribute of the node producing `X`.
fn weight_bytes(graph: &Graph, buffer: &Buffer, tensor: &str) -> Result<Vec<u8>, ExecutorError> {
    let err = |what: String| ExecutorError::Weight { buffer: buffer.id, tensor: tensor.to_string(), what };
    let dtype = DType::from_name(&buffer.dtype).ok_or_else(|| err(format!("unknown dtype {}", buffer.dtype)))?;
    let found = match graph.value_by_name(tensor).and_then(|v| graph.constant(v)) {
        Some(t) => t.clone(),
        None => {
            let attr = tensor.strip_suffix(".step").and_then(|producer| {
                let v = graph.value_by_name(producer)?;
                graph.node(v.node).op.tensor("step").cloned()
            });
            attr.ok_or_else(|| err("no graph constant (or step attribute) of that name".into()))?
        }
    };
    if found.dtype == dtype {
        return found.bytes().map(|b| b.to_vec()).map_err(|e| err(e.to_string()));
    }
    let rt = RtTensor::from_ir_tensor(&found).map_err(|e| err(e.to_string()))?;
    Ok(device_bytes(&rt, dtype))
}

/// `QCC_SYNTHETIC_WEIGHTS=<seed>`: fill every weight buffer with seeded random data on the device
/// instead of reading the weights file (timing runs of artifacts whose weights cannot travel, such
/// as a Llama-2-7B-shaped model; the outputs mean nothing).
fn synthetic_seed() -> Option<u64> {
    std::env::var("QCC_SYNTHETIC_WEIGHTS").ok().and_then(|v| v.parse().ok())
}

/// The graph of `path` with every `dense_resource` constant zero-filled (its weights file need not
/// exist): the sizes come from the constants' printed types.
fn load_without_weights(path: &Path) -> Result<Graph, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut sizes: HashMap<String, usize> = HashMap::new();
    for piece in text.split("dense_resource<").skip(1) {
        // `dtype[d0, d1, ...], "key">`: the dims may hold commas, so split at the bracket first.
        let Some((dtype, rest)) = piece.split_once('[') else { continue };
        let Some((dims, rest)) = rest.split_once(']') else { continue };
        let Some(rest) = rest.trim_start().strip_prefix(',') else { continue };
        let numel: usize = dims.split(',').filter_map(|d| d.trim().parse::<usize>().ok()).product();
        let Some(dtype) = DType::from_name(dtype.trim()) else { continue };
        let Some(key) = rest.trim_start().strip_prefix('"').and_then(|k| k.split_once("\">")).map(|(k, _)| k) else {
            continue;
        };
        sizes.insert(key.replace("\\\"", "\"").replace("\\\\", "\\"), dtype.storage_bytes(numel));
    }
    qcc_ir::text::parse_with_resources(&text, &mut |key| sizes.get(key).map(|&n| bytes::Bytes::from(vec![0u8; n])))
        .map_err(|e| e.to_string())
}

/// A weight buffer of `buffer`'s dtype and constant dims filled with seeded random values on the
/// device (floats uniform in [-0.05, 0.05), other types random bits).
fn synthetic_weight(gpu: &Gpu, buffer: &Buffer, seed: u64) -> Result<CudaSlice<u8>, ExecutorError> {
    let err = |what: String| ExecutorError::Weight { buffer: buffer.id, tensor: buffer.name.clone(), what };
    let dtype = DType::from_name(&buffer.dtype).ok_or_else(|| err(format!("unknown dtype {}", buffer.dtype)))?;
    let mut numel = 1usize;
    for d in &buffer.dims {
        let v = d.eval(&SymbolValues::new()).map_err(|e| err(e.to_string()))?;
        numel *= usize::try_from(v).map_err(|_| err(format!("dim {d} = {v}")))?;
    }
    let bytes = dtype.storage_bytes(numel).max(1).div_ceil(4) * 4;
    let slice = gpu.stream.alloc_zeros::<u8>(bytes).map_err(CudaError::from)?;
    let p = slice.device_ptr(&gpu.stream).0;
    let seed = seed ^ (buffer.id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let k = super::bench::e2e::DecoderKernels::new(gpu);
    match dtype {
        // Quantization steps large against the random activations: every quantized value then lies
        // in the int4 range, as nearly every row of a calibrated model does, so timings do not
        // include the exact fix-up of 16-bit prefix rows that random steps would trigger on every row.
        DType::F32 if buffer.name.ends_with(".step") => k.fill_f32(p, bytes / 4, seed, 1e3, 2e3)?,
        DType::F32 => k.fill_f32(p, bytes / 4, seed, -0.05, 0.05)?,
        DType::F16 => k.fill_f16(p, bytes / 2, seed, -0.05, 0.05)?,
        DType::BF16 | DType::F64 => {}
        _ => k.fill_u32(p, bytes / 4, seed)?,
    }
    Ok(slice)
}

/// A loaded artifact on one GPU.
pub struct CudaExecutor {
    pub manifest: Manifest,
    pub dir: PathBuf,
    gpu: Gpu,
    arena: CudaSlice<u8>,
    weights: HashMap<u32, CudaSlice<u8>>,
    functions: Vec<CudaFunction>,
    /// Whether each launch's kernel was patched for programmatic dependent launch (super::pdl).
    pdl: Vec<bool>,
    /// Runtime-supplied arguments appended to each launch's.
    extra_args: Vec<Vec<ArgVal>>,
    _tables: Vec<CudaSlice<i8>>,
    prologue: Option<HostPrologue>,
    sync_each: bool,
    /// Per launch, the tuned-kernel route that replaces its micro-kernel, if any (fast_linear.rs).
    routes: Vec<Option<Route>>,
    scratch: Mutex<Option<Scratch>>,
    blas: Option<CudaBlas>,
}

impl CudaExecutor {
    /// Loads artifact `dir` onto device `ordinal`.
    pub fn load(dir: &Path, ordinal: usize) -> Result<CudaExecutor, ExecutorError> {
        let synthetic = synthetic_seed();
        let manifest = match synthetic {
            None => Manifest::load(dir)?,
            Some(_) => Manifest::load_without_weights(dir)?,
        };
        let gpu = Gpu::new(ordinal)?;
        let graph_path = manifest.graph_path(dir)?;
        let graph = match synthetic {
            None => qcc_ir::text::load(&graph_path).map_err(|e| e.to_string()),
            Some(_) => load_without_weights(&graph_path),
        }
        .map_err(|what| ExecutorError::Graph { path: graph_path.clone(), what })?;
        let stream = gpu.stream.clone();

        let mut arena = stream.alloc_zeros::<u8>(manifest.arena_bytes.max(1) as usize).map_err(CudaError::from)?;
        {
            let (ptr, _sync) = arena.device_ptr_mut(&stream);
            // SAFETY: the range is exactly the allocation just made on this stream.
            unsafe {
                cudarc::driver::result::memset_d8_async(ptr, 0xFF, manifest.arena_bytes as usize, stream.cu_stream())
            }
            .map_err(CudaError::from)?;
        }

        let mut weights = HashMap::new();
        for buffer in &manifest.buffers {
            if let (Place::Weight { .. }, Some(seed)) = (&buffer.place, synthetic) {
                weights.insert(buffer.id, synthetic_weight(&gpu, buffer, seed)?);
                continue;
            }
            if let Place::Weight { tensor } = &buffer.place {
                let bytes = weight_bytes(&graph, buffer, tensor)?;
                let slice = if bytes.is_empty() {
                    stream.alloc_zeros::<u8>(1).map_err(CudaError::from)?
                } else {
                    stream.clone_htod(&bytes).map_err(CudaError::from)?
                };
                weights.insert(buffer.id, slice);
            }
        }

        let mut modules = HashMap::new();
        for module in &manifest.modules {
            let path = artifact_path(dir, &module.path)?;
            let text =
                std::fs::read_to_string(&path).map_err(|source| ManifestError::Io { path: path.clone(), source })?;
            let ptx = match module.kind {
                ModuleKind::Generated => text,
                ModuleKind::Micro => micro_ptx(&module.name, &text)?,
            };
            let (ptx, pdl) = super::pdl::prepare(ptx);
            let loaded = gpu.ctx.load_module(Ptx::from_src(ptx)).map_err(CudaError::from)?;
            modules.insert(module.name.clone(), (module.kind, loaded, pdl));
        }

        let mut functions = Vec::new();
        let mut pdl = Vec::new();
        let mut extra_args = Vec::new();
        let mut tables = Vec::new();
        let mut hadamard_tables: HashMap<i64, (u64, f64)> = HashMap::new();
        for (index, launch) in manifest.launches.iter().enumerate() {
            let fail = |what: String| ExecutorError::Launch {
                index,
                node: launch.node.clone(),
                module: launch.module.clone(),
                entry: launch.entry.clone(),
                what,
            };
            let (kind, module, patched) =
                modules.get(&launch.module).ok_or_else(|| fail("module not loaded".into()))?;
            let f = module.load_function(&launch.entry).map_err(|e| fail(format!("no such entry: {e}")))?;
            if launch.shared_bytes > 48 * 1024 {
                f.set_attribute(
                    CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    launch.shared_bytes as i32,
                )
                .map_err(|e| fail(format!("shared memory {} bytes: {e}", launch.shared_bytes)))?;
            }
            let mut extra = Vec::new();
            if *kind == ModuleKind::Micro && launch.module == "hadamard" {
                let n = hadamard_size(launch).map_err(fail)?;
                let (ptr, scale) = match hadamard_tables.get(&n) {
                    Some(t) => *t,
                    None => {
                        let size = usize::try_from(n).ok().filter(|&n| n > 0 && n <= 1 << 15);
                        let size = size.ok_or_else(|| fail(format!("hadamard size {n}")))?;
                        let h = qcc_ir::hadamard::Hadamard::new(size);
                        let mut table = Vec::with_capacity(size * size);
                        for i in 0..size {
                            for j in 0..size {
                                table.push(h.entry(i, j));
                            }
                        }
                        let slice = stream.clone_htod(&table).map_err(CudaError::from)?;
                        let ptr = slice.device_ptr(&stream).0;
                        tables.push(slice);
                        let t = (ptr, 1.0 / (h.block_size() as f64).sqrt());
                        hadamard_tables.insert(n, t);
                        t
                    }
                };
                extra = vec![ArgVal::Ptr(ptr), ArgVal::F64(scale)];
            }
            functions.push(f);
            pdl.push(*patched);
            extra_args.push(extra);
        }

        let mut routes = Vec::with_capacity(manifest.launches.len());
        for (index, launch) in manifest.launches.iter().enumerate() {
            let mut route = if fast_linear::enabled() { Route::plan(&manifest, launch) } else { None };
            if let Some(r) = route.as_mut() {
                let fail = |what: String| ExecutorError::Launch {
                    index,
                    node: launch.node.clone(),
                    module: launch.module.clone(),
                    entry: launch.entry.clone(),
                    what: format!("fast route: {what}"),
                };
                if let Route::Had(h) = r {
                    h.attach(&gpu).map_err(fail)?;
                }
                if let Some(id) = r.weight() {
                    let bytes = match (manifest.buffer(id).map(|b| (b, &b.place)), synthetic) {
                        (_, Some(_)) => None,
                        (Some((b, Place::Weight { tensor })), None) => Some(weight_bytes(&graph, b, tensor)?),
                        _ => return Err(fail(format!("weight buffer {id} is not a weight"))),
                    };
                    let seed = synthetic.unwrap_or(0) ^ (index as u64).wrapping_mul(0x9E37_79B9);
                    r.attach_weights(&gpu, bytes.as_deref(), seed).map_err(fail)?;
                }
            }
            routes.push(route);
        }
        if std::env::var_os("QCC_GROUP_GEMV").is_none_or(|v| v != "0") {
            fast_linear::group_w4(&manifest, &mut routes);
        }
        let blas = if routes.iter().any(|r| matches!(r, Some(Route::Blas(_) | Route::W8(_) | Route::Wf(_)))) {
            Some(CudaBlas::new(stream.clone()).map_err(CudaError::from)?)
        } else {
            None
        };

        let prologue = match &manifest.host_prologue {
            Some(p) if !p.values.is_empty() => Some(HostPrologue::new(&graph, &p.values)?),
            _ => None,
        };
        stream.synchronize().map_err(CudaError::from)?;
        let sync_each = std::env::var_os("QCC_CUDA_SYNC").is_some_and(|v| v == "1");
        Ok(CudaExecutor {
            manifest,
            dir: dir.to_path_buf(),
            gpu,
            arena,
            weights,
            functions,
            pdl,
            extra_args,
            _tables: tables,
            prologue,
            sync_each,
            routes,
            scratch: Mutex::new(None),
            blas,
        })
    }

    /// Whether launch `index` runs with an earlier launch's W4 GEMV (fast_linear::group_w4).
    pub fn is_grouped(&self, index: usize) -> bool {
        matches!(self.routes.get(index), Some(Some(Route::Grouped)))
    }

    /// Whether launch `index` runs on a tuned-kernel route instead of its micro-kernel.
    pub fn is_routed(&self, index: usize) -> bool {
        self.routes.get(index).is_some_and(Option::is_some)
    }

    /// How many launches run on tuned kernels instead of their micro-kernels: `int_linear` (W4
    /// GEMV/GEMM, the 8-bit LM heads) and float `linear` (cuBLAS).
    pub fn routed_launches(&self) -> (usize, usize) {
        let w4 = self
            .routes
            .iter()
            .filter(|r| matches!(r, Some(Route::W4(_) | Route::W8(_) | Route::Wf(_) | Route::Grouped)))
            .count();
        let blas = self.routes.iter().filter(|r| matches!(r, Some(Route::Blas(_)))).count();
        (w4, blas)
    }

    /// How many `hadamard` launches run on the fast transform.
    pub fn routed_hadamards(&self) -> usize {
        self.routes.iter().filter(|r| matches!(r, Some(Route::Had(_)))).count()
    }

    /// Grows the W4 routes' scratch for these symbol values (before launches or a capture: never
    /// allocates inside one).
    fn ensure_scratch(&self, values: &SymbolValues) -> Result<(), ExecutorError> {
        let mut need = Need::default();
        for r in self.routes.iter().flatten() {
            let n = r.scratch_need(values).map_err(|what| ExecutorError::Input { name: "(symbols)".into(), what })?;
            need = Need { rows: need.rows.max(n.rows), words: need.words.max(n.words), bytes: need.bytes.max(n.bytes) };
        }
        if self.routes.iter().all(Option::is_none) {
            return Ok(());
        }
        let mut guard = self.scratch.lock().map_err(|_| CudaError::Mismatch("scratch lock poisoned".into()))?;
        let grown = Scratch::ensure(guard.take(), &self.gpu, need)?;
        *guard = Some(grown);
        Ok(())
    }

    /// Synchronize after every launch (slower; a fault then names its launch).
    pub fn set_sync_each(&mut self, on: bool) {
        self.sync_each = on;
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Symbol values implied by the input shapes.
    pub fn bind_symbols(&self, inputs: &[(&str, RtTensor)]) -> Result<SymbolValues, ExecutorError> {
        let shapes: Vec<(&str, Vec<usize>)> = inputs.iter().map(|(n, t)| (*n, t.shape().to_vec())).collect();
        self.bind_shapes(&shapes)
    }

    /// Symbol values implied by the shapes of the inputs (every graph input must be named).
    pub fn bind_shapes(&self, shapes: &[(&str, Vec<usize>)]) -> Result<SymbolValues, ExecutorError> {
        let shape_of = |name: &str| -> Result<&Vec<usize>, ExecutorError> {
            shapes
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, s)| s)
                .ok_or_else(|| ExecutorError::Input { name: name.to_string(), what: "missing".into() })
        };
        let mut given: Vec<(String, i64)> = Vec::new();
        for io in &self.manifest.inputs {
            let shape = shape_of(&io.name)?;
            if shape.len() != io.dims.len() {
                return Err(ExecutorError::Input {
                    name: io.name.clone(),
                    what: format!("rank {} but the plan has {} dims", shape.len(), io.dims.len()),
                });
            }
            for (d, &actual) in io.dims.iter().zip(shape) {
                if let crate::artifact::DimExpr::Sym(s) = d {
                    match given.iter().find(|(n, _)| n == s) {
                        Some((_, v)) if *v != actual as i64 => {
                            return Err(ExecutorError::Input {
                                name: io.name.clone(),
                                what: format!("symbol {s} is {v} elsewhere but {actual} here"),
                            })
                        }
                        Some(_) => {}
                        None => given.push((s.clone(), actual as i64)),
                    }
                }
            }
        }
        let refs: Vec<(&str, i64)> = given.iter().map(|(n, v)| (n.as_str(), *v)).collect();
        let values = self.manifest.symbol_values(&refs)?;
        for io in &self.manifest.inputs {
            let shape = shape_of(&io.name)?;
            for (d, &actual) in io.dims.iter().zip(shape) {
                if d.eval(&values)? != actual as i64 {
                    return Err(ExecutorError::Input {
                        name: io.name.clone(),
                        what: format!("shape {shape:?} does not match the plan's {d}"),
                    });
                }
            }
        }
        Ok(values)
    }

    fn buffer_ptr(&self, id: u32) -> Result<u64, String> {
        let buffer = self.manifest.buffer(id).ok_or_else(|| format!("unknown buffer {id}"))?;
        match &buffer.place {
            Place::Arena { offset, .. } => Ok(self.arena.device_ptr(&self.gpu.stream).0 + offset),
            Place::Weight { .. } => Ok(self
                .weights
                .get(&id)
                .ok_or_else(|| format!("weight buffer {id} not loaded"))?
                .device_ptr(&self.gpu.stream)
                .0),
            Place::Host => Err(format!("buffer {id} (`{}`) lives on the host", buffer.name)),
        }
    }

    /// Element count and byte range of an arena buffer for these symbol values.
    fn arena_range(&self, buffer: &Buffer, values: &SymbolValues) -> Result<(Vec<usize>, u64, usize), ExecutorError> {
        let bad = |what: String| ExecutorError::Buffer { id: buffer.id, name: buffer.name.clone(), what };
        let Place::Arena { offset, bytes } = buffer.place else {
            return Err(bad("not an arena buffer".into()));
        };
        let dtype = DType::from_name(&buffer.dtype).ok_or_else(|| bad(format!("dtype {}", buffer.dtype)))?;
        let mut dims = Vec::new();
        for d in &buffer.dims {
            let v = d.eval(values)?;
            dims.push(usize::try_from(v).map_err(|_| bad(format!("negative size {d} = {v}")))?);
        }
        let len = dims.iter().product::<usize>() * element_bytes(dtype);
        if len as u64 > bytes {
            return Err(bad(format!("{len} bytes needed, {bytes} planned")));
        }
        Ok((dims, offset, len))
    }

    fn upload(&mut self, buffer: &Buffer, t: &RtTensor, values: &SymbolValues) -> Result<(), ExecutorError> {
        let (dims, offset, len) = self.arena_range(buffer, values)?;
        let dtype = DType::from_name(&buffer.dtype).unwrap_or(DType::F32);
        // Unit dims may differ between the graph's value and the plan's buffer: sizes must agree.
        if t.len() != dims.iter().product::<usize>() {
            return Err(ExecutorError::Buffer {
                id: buffer.id,
                name: buffer.name.clone(),
                what: format!("value has shape {:?}, buffer {:?}", t.shape(), dims),
            });
        }
        let bytes = match &buffer.order {
            Some(order) => device_bytes(&t.permuted(order), dtype),
            None => device_bytes(t, dtype),
        };
        if bytes.len() != len {
            return Err(ExecutorError::Buffer {
                id: buffer.id,
                name: buffer.name.clone(),
                what: format!("{} bytes for a {len}-byte range", bytes.len()),
            });
        }
        if len > 0 {
            let start = offset as usize;
            let mut view = self.arena.slice_mut(start..start + len);
            self.gpu.stream.memcpy_htod(&bytes, &mut view).map_err(CudaError::from)?;
        }
        Ok(())
    }

    fn download(&self, buffer: &Buffer, values: &SymbolValues) -> Result<RtTensor, ExecutorError> {
        let (dims, offset, len) = self.arena_range(buffer, values)?;
        let dtype = DType::from_name(&buffer.dtype).unwrap_or(DType::F32);
        let start = offset as usize;
        let bytes = if len == 0 {
            Vec::new()
        } else {
            self.gpu.stream.clone_dtoh(&self.arena.slice(start..start + len)).map_err(CudaError::from)?
        };
        let bad = |what| ExecutorError::Buffer { id: buffer.id, name: buffer.name.clone(), what };
        let stored = tensor_from_device(dtype, &buffer.storage_dims(&dims), bytes).map_err(bad)?;
        Ok(match &buffer.order {
            Some(order) => {
                let mut logical = vec![0; order.len()];
                for (i, &a) in order.iter().enumerate() {
                    logical[a] = i;
                }
                stored.permuted(&logical)
            }
            None => stored,
        })
    }

    /// The arena buffer of graph input or output `name`, with the dims of that input or output (a
    /// resident KV cache's buffer holds the `past_*` input as a prefix of the `present.*` output).
    fn io_buffer(&self, name: &str) -> Result<Buffer, ExecutorError> {
        let io = self.manifest.inputs.iter().chain(&self.manifest.outputs).find(|io| io.name == name);
        let io =
            io.ok_or_else(|| ExecutorError::Input { name: name.into(), what: "no such graph input or output".into() })?;
        let buffer = self
            .manifest
            .buffer(io.buffer)
            .ok_or_else(|| ExecutorError::Input { name: name.into(), what: format!("unknown buffer {}", io.buffer) })?;
        Ok(Buffer { dims: io.dims.clone(), ..buffer.clone() })
    }

    /// A device copy of output `name` as the last run left it (e.g. a KV cache's `present.*`,
    /// fed back as the next step's `past_*` with [`CudaExecutor::prepare_with_device`]), written into
    /// `reuse` when that buffer is large enough; a new buffer gets a quarter of headroom, so a
    /// growing cache is reallocated once every few steps rather than every step.
    pub fn keep_output(
        &self,
        name: &str,
        values: &SymbolValues,
        reuse: Option<CudaSlice<u8>>,
    ) -> Result<(CudaSlice<u8>, Vec<usize>), ExecutorError> {
        let buffer = self.io_buffer(name)?;
        let (dims, offset, len) = self.arena_range(&buffer, values)?;
        let stream = &self.gpu.stream;
        let mut kept = match reuse {
            Some(b) if b.len() >= len.max(1) => b,
            _ => stream.alloc_zeros::<u8>((len + len / 4).max(1)).map_err(CudaError::from)?,
        };
        if len > 0 {
            let start = offset as usize;
            stream
                .memcpy_dtod(&self.arena.slice(start..start + len), &mut kept.slice_mut(0..len))
                .map_err(CudaError::from)?;
        }
        Ok((kept, dims))
    }

    /// [`CudaExecutor::prepare`] where some inputs already live on the device (`(name, data, shape)`,
    /// data in the input's dtype, as [`CudaExecutor::keep_output`] returns it): those are copied device
    /// to device, or taken as they are in their own buffer for `None` (a resident KV cache); the host
    /// prologue sees zeros of their shape (it reads only shapes).
    pub fn prepare_with_device(
        &mut self,
        host: &[(&str, RtTensor)],
        device: &[DeviceInput],
    ) -> Result<SymbolValues, ExecutorError> {
        let mut shapes: Vec<(&str, Vec<usize>)> = host.iter().map(|(n, t)| (*n, t.shape().to_vec())).collect();
        shapes.extend(device.iter().map(|(n, _, s)| (*n, s.clone())));
        let values = self.bind_shapes(&shapes)?;
        for (name, t) in host {
            let buffer = self.io_buffer(name)?;
            if matches!(buffer.place, Place::Arena { .. }) {
                self.upload(&buffer, t, &values)?;
            }
        }
        for (name, data, _) in device {
            let Some(data) = data else { continue };
            let buffer = self.io_buffer(name)?;
            let (_, offset, len) = self.arena_range(&buffer, &values)?;
            if len > 0 {
                let start = offset as usize;
                if data.len() < len {
                    return Err(ExecutorError::Input {
                        name: name.to_string(),
                        what: format!("{} bytes for {len}", data.len()),
                    });
                }
                let stream = self.gpu.stream.clone();
                stream
                    .memcpy_dtod(&data.slice(0..len), &mut self.arena.slice_mut(start..start + len))
                    .map_err(CudaError::from)?;
            }
        }
        if let Some(prologue) = &self.prologue {
            let mut all: Vec<(&str, &[usize])> = host.iter().map(|(n, t)| (*n, t.shape())).collect();
            all.extend(device.iter().map(|(n, _, shape)| (*n, shape.as_slice())));
            // Values of device inputs, should the prologue read them: zeros of their shape.
            let data = |name: &str| match host.iter().find(|(n, _)| *n == name) {
                Some((_, t)) => t.clone(),
                None => input_zeros(&self.manifest, name, &all),
            };
            let results = prologue.run(&all, &data)?;
            self.upload_prologue_results(results, &values)?;
        }
        Ok(values)
    }

    /// Uploads the host prologue's values into every arena buffer of their names.
    fn upload_prologue_results(
        &mut self,
        results: Vec<(String, RtTensor)>,
        values: &SymbolValues,
    ) -> Result<(), ExecutorError> {
        for (name, t) in results {
            let targets: Vec<Buffer> = self
                .manifest
                .buffers
                .iter()
                .filter(|b| b.name == name && matches!(b.place, Place::Arena { .. }))
                .cloned()
                .collect();
            for buffer in targets {
                self.upload(&buffer, &t, values)?;
            }
        }
        Ok(())
    }

    /// Reads graph output `name` (after a run with these symbol values).
    pub fn read_output(&self, name: &str, values: &SymbolValues) -> Result<RtTensor, ExecutorError> {
        let buffer = self.io_buffer(name)?;
        self.download(&buffer, values)
    }

    /// Copies the inputs in and runs the host prologue; returns the symbol values.
    pub fn prepare(&mut self, inputs: &[(&str, RtTensor)]) -> Result<SymbolValues, ExecutorError> {
        let values = self.bind_symbols(inputs)?;
        for io in self.manifest.inputs.clone() {
            let buffer = self.io_buffer(&io.name)?;
            if matches!(buffer.place, Place::Arena { .. }) {
                let (_, t) = inputs.iter().find(|(n, _)| *n == io.name).expect("bound above");
                self.upload(&buffer, t, &values)?;
            }
        }
        if let Some(prologue) = &self.prologue {
            let shapes: Vec<(&str, &[usize])> = inputs.iter().map(|(n, t)| (*n, t.shape())).collect();
            let data =
                |name: &str| inputs.iter().find(|(n, _)| *n == name).map(|(_, t)| t.clone()).expect("bound above");
            let results = prologue.run(&shapes, &data)?;
            self.upload_prologue_results(results, &values)?;
        }
        Ok(values)
    }

    /// Enqueues every launch of the plan (no synchronization unless `sync_each`).
    pub fn launch_all(&self, values: &SymbolValues) -> Result<(), ExecutorError> {
        self.ensure_scratch(values)?;
        (0..self.manifest.launches.len()).try_for_each(|i| self.launch_inner(i, values, self.sync_each))
    }

    /// Enqueues launch `index` of the plan.
    pub fn launch_one(&self, index: usize, values: &SymbolValues) -> Result<(), ExecutorError> {
        self.ensure_scratch(values)?;
        self.launch_inner(index, values, self.sync_each)
    }

    /// Enqueues launch `index` on its tuned-kernel route, then a residual its kernels do not add.
    fn launch_routed(&self, route: &Route, values: &SymbolValues) -> Result<(), String> {
        self.launch_route(route, values)?;
        route.add_residual(&self.gpu, values, &|id| self.buffer_ptr(id))
    }

    fn launch_route(&self, route: &Route, values: &SymbolValues) -> Result<(), String> {
        let ptr = |id: u32| self.buffer_ptr(id);
        let guard = self.scratch.lock().map_err(|_| "scratch lock poisoned".to_string())?;
        let scratch = guard.as_ref().ok_or("no scratch (ensure_scratch was not called)");
        let blas = || self.blas.as_ref().ok_or("no cuBLAS handle");
        match route {
            Route::W4(r) => r.launch(&self.gpu, scratch?, values, &ptr),
            Route::W8(r) => r.launch(&self.gpu, blas()?, scratch?, values, &ptr),
            Route::Wf(r) => r.launch(&self.gpu, blas()?, scratch?, values, &ptr),
            Route::Had(r) => r.launch(&self.gpu, scratch?, values, &ptr),
            Route::Attn(r) => r.launch(&self.gpu, scratch?.bytes(), values, &ptr),
            Route::Blas(r) => r.launch(blas()?, values, &ptr),
            // Launched with the W4 route of an earlier launch (fast_linear::group_w4).
            Route::Grouped => Ok(()),
        }
    }

    fn launch_inner(&self, index: usize, values: &SymbolValues, sync: bool) -> Result<(), ExecutorError> {
        let launch = &self.manifest.launches[index];
        let fail = |what: String| ExecutorError::Launch {
            index,
            node: launch.node.clone(),
            module: launch.module.clone(),
            entry: launch.entry.clone(),
            what,
        };
        let mut grid = [0u32; 3];
        for (g, e) in grid.iter_mut().zip(&launch.grid) {
            let v = e.eval(values)?;
            *g = u32::try_from(v).map_err(|_| fail(format!("grid size {e} = {v}")))?;
        }
        if grid.contains(&0) {
            return Ok(());
        }
        let pdl = super::pdl::wanted(values);
        self.gpu.set_pdl(pdl);
        if let Some(route) = &self.routes[index] {
            self.launch_routed(route, values).map_err(fail)?;
            if sync {
                self.gpu.stream.synchronize().map_err(|e| fail(format!("after the launch: {e}")))?;
            }
            return Ok(());
        }
        let mut args = Vec::with_capacity(launch.args.len() + 2);
        for arg in &launch.args {
            args.push(match arg {
                Arg::Buffer(id) => ArgVal::Ptr(self.buffer_ptr(*id).map_err(fail)?),
                Arg::I64(e) => ArgVal::I64(e.eval(values)?),
                Arg::F32(x) => ArgVal::F32(*x),
            });
        }
        args.extend(self.extra_args[index].iter().copied());
        let cfg = LaunchConfig {
            grid_dim: (grid[0], grid[1], grid[2]),
            block_dim: (launch.block[0], launch.block[1], launch.block[2]),
            shared_mem_bytes: launch.shared_bytes,
        };
        let mut launcher = super::pdl::Launcher::new(&self.gpu.stream, &self.functions[index], self.pdl[index] && pdl);
        for a in &args {
            match a {
                ArgVal::Ptr(p) => launcher.arg(p),
                ArgVal::I64(v) => launcher.arg(v),
                ArgVal::F32(v) => launcher.arg(v),
                ArgVal::F64(v) => launcher.arg(v),
            };
        }
        // SAFETY: the argument list follows the manifest (checked against the kernels by the
        // GPU check); pointers are into buffers sized by the plan for these symbol values. PDL only
        // for kernels whose module was patched for it (self.pdl).
        unsafe { launcher.launch(cfg) }.map_err(|e| fail(e.to_string()))?;
        if sync {
            self.gpu.stream.synchronize().map_err(|e| fail(format!("after the launch: {e}")))?;
        }
        Ok(())
    }

    /// Captures every launch of the plan for these symbol values into one CUDA graph (what a decode
    /// step replays: the sizes are baked in, so one graph serves one set of symbol values).
    pub fn capture(&self, values: &SymbolValues) -> Result<cudarc::driver::CudaGraph, ExecutorError> {
        use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
        let stream = &self.gpu.stream;
        self.ensure_scratch(values)?;
        stream.synchronize().map_err(CudaError::from)?;
        stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).map_err(CudaError::from)?;
        // No synchronization inside a capture.
        let launched = (0..self.manifest.launches.len()).try_for_each(|i| self.launch_inner(i, values, false));
        let graph = stream.end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
        launched?;
        let graph = graph.map_err(CudaError::from)?;
        let graph = graph.ok_or_else(|| CudaError::Mismatch("stream capture produced no graph".into()))?;
        graph.upload().map_err(CudaError::from)?;
        Ok(graph)
    }

    /// Runs the plan on `inputs`; outputs in manifest order with their names.
    pub fn run(&mut self, inputs: &[(&str, RtTensor)]) -> Result<Vec<(String, RtTensor)>, ExecutorError> {
        let values = self.prepare(inputs)?;
        self.launch_all(&values)?;
        self.gpu.stream.synchronize().map_err(CudaError::from)?;
        self.outputs(&values)
    }

    /// Copies the graph outputs back.
    pub fn outputs(&self, values: &SymbolValues) -> Result<Vec<(String, RtTensor)>, ExecutorError> {
        let mut out = Vec::new();
        for io in &self.manifest.outputs {
            let buffer = self.manifest.buffer(io.buffer).ok_or_else(|| ExecutorError::Input {
                name: io.name.clone(),
                what: format!("unknown buffer {}", io.buffer),
            })?;
            out.push((io.name.clone(), self.download(buffer, values)?));
        }
        Ok(out)
    }

    /// Reads arena buffer `id` as it is now (debugging: compare an intermediate with the CPU).
    pub fn read_buffer(&self, id: u32, values: &SymbolValues) -> Result<Option<RtTensor>, ExecutorError> {
        match self.manifest.buffer(id).filter(|b| matches!(b.place, Place::Arena { .. })) {
            Some(b) => Ok(Some(self.download(b, values)?)),
            None => Ok(None),
        }
    }
}

/// Parameter widths in bytes of every `.entry` of a PTX module.
pub fn ptx_entry_params(ptx: &str) -> HashMap<String, Vec<usize>> {
    let mut entries = HashMap::new();
    let mut lines = ptx.lines();
    while let Some(line) = lines.next() {
        let Some(rest) = line.trim().strip_prefix(".visible .entry ").or_else(|| line.trim().strip_prefix(".entry "))
        else {
            continue;
        };
        let name = rest.split('(').next().unwrap_or("").trim().to_string();
        let mut params = Vec::new();
        if !rest.contains(')') {
            for p in lines.by_ref() {
                let p = p.trim();
                if p.starts_with(')') {
                    break;
                }
                let width = [
                    (".u64", 8),
                    (".b64", 8),
                    (".s64", 8),
                    (".f64", 8),
                    (".u32", 4),
                    (".b32", 4),
                    (".s32", 4),
                    (".f32", 4),
                ]
                .iter()
                .find(|(t, _)| p.contains(t))
                .map_or(0, |(_, w)| *w);
                params.push(width);
                if p.ends_with(')') {
                    break;
                }
            }
        }
        entries.insert(name, params);
    }
    entries
}

/// Checks a loaded manifest against its kernels without a GPU: every launch's entry exists in its
/// module's PTX (micro-kernels compiled with NVRTC), and the entry's parameter widths match the
/// launch's arguments (plus the runtime-supplied ones). Returns one line per problem.
pub fn check_plan(dir: &Path) -> Result<Vec<String>, ExecutorError> {
    let manifest = Manifest::load(dir)?;
    let mut entries = HashMap::new();
    for module in &manifest.modules {
        let path = artifact_path(dir, &module.path)?;
        let text = std::fs::read_to_string(&path).map_err(|source| ManifestError::Io { path: path.clone(), source })?;
        let ptx = match module.kind {
            ModuleKind::Generated => text,
            ModuleKind::Micro => micro_ptx(&module.name, &text)?,
        };
        entries.insert(module.name.clone(), ptx_entry_params(&ptx));
    }
    let mut problems = Vec::new();
    for (index, launch) in manifest.launches.iter().enumerate() {
        let at = format!("launch {index} (node `{}`, {}::{})", launch.node, launch.module, launch.entry);
        let Some(params) = entries.get(&launch.module).and_then(|m| m.get(&launch.entry)) else {
            problems.push(format!("{at}: no such entry"));
            continue;
        };
        let mut widths: Vec<usize> = launch.args.iter().map(|a| if matches!(a, Arg::F32(_)) { 4 } else { 8 }).collect();
        if launch.module == "hadamard" {
            widths.extend([8, 8]);
            // n is the transformed (last) axis of the input.
            let last = match launch.args.first() {
                Some(Arg::Buffer(x)) => manifest.buffer(*x).and_then(|b| b.dims.last().cloned()),
                _ => None,
            };
            match (hadamard_size(launch), last) {
                (Ok(n), Some(crate::artifact::DimExpr::Const(d))) if n == d => {}
                (Ok(n), last) => problems.push(format!("{at}: size n = {n}, the input's last dim is {last:?}")),
                (Err(what), _) => problems.push(format!("{at}: {what}")),
            }
        }
        if &widths != params {
            problems.push(format!("{at}: arguments of widths {widths:?}, the kernel takes {params:?}"));
        }
        let threads: u32 = launch.block.iter().product();
        if threads > 1024 {
            problems.push(format!("{at}: {threads} threads per block"));
        }
    }
    // Weights: each buffer's data exists and has the planned size.
    let graph_path = manifest.graph_path(dir)?;
    let graph = qcc_ir::text::load(&graph_path)
        .map_err(|e| ExecutorError::Graph { path: graph_path.clone(), what: e.to_string() })?;
    let no_symbols = SymbolValues::new();
    for buffer in &manifest.buffers {
        let Place::Weight { tensor } = &buffer.place else { continue };
        let bytes = weight_bytes(&graph, buffer, tensor)?;
        let dtype = DType::from_name(&buffer.dtype).unwrap_or(DType::F32);
        let numel: i64 = buffer.dims.iter().map(|d| d.eval(&no_symbols)).product::<Result<i64, _>>()?;
        let expected = dtype.storage_bytes(numel as usize);
        if bytes.len() != expected {
            problems.push(format!(
                "weight buffer {} (`{tensor}`): {} bytes, {expected} planned",
                buffer.id,
                bytes.len()
            ));
        }
    }
    // Host prologue: runs on the CPU for a short sequence and yields its planned shapes.
    if let Some(p) = manifest.host_prologue.as_ref().filter(|p| !p.values.is_empty()) {
        let prologue = HostPrologue::new(&graph, &p.values)?;
        let given: Vec<(&str, i64)> =
            manifest.symbols.iter().map(|s| (s.name.as_str(), (s.max as i64).min(8))).collect();
        let values = manifest.symbol_values(&given)?;
        let mut shapes = Vec::new();
        for io in &manifest.inputs {
            let dims: Vec<usize> =
                io.dims.iter().map(|d| d.eval(&values).map(|v| v as usize)).collect::<Result<_, _>>()?;
            shapes.push((io.name.as_str(), dims));
        }
        let all: Vec<(&str, &[usize])> = shapes.iter().map(|(n, d)| (*n, d.as_slice())).collect();
        for (name, t) in prologue.run(&all, &|name| input_zeros(&manifest, name, &all))? {
            for b in manifest.buffers.iter().filter(|b| b.name == name) {
                let dims: Vec<usize> =
                    b.dims.iter().map(|d| d.eval(&values).map(|v| v as usize)).collect::<Result<_, _>>()?;
                if dims.iter().product::<usize>() != t.len() {
                    problems.push(format!(
                        "host prologue value `{name}`: shape {:?}, buffer {} planned {dims:?}",
                        t.shape(),
                        b.id
                    ));
                }
            }
        }
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_graph_loads_without_its_weights_file_with_zeroed_constants_of_the_same_types() {
        let mut g = Graph::new("t");
        let x = g.add_input("x", qcc_ir::TensorType::known(DType::F32, &[2, 64])).unwrap();
        let values: Vec<f32> = (0..64 * 48).map(|i| i as f32).collect();
        let w = g.add_constant("w.\"q\"", qcc_ir::Tensor::from_slice(vec![48, 64], &values)).unwrap();
        let w4 =
            qcc_ir::Tensor::from_bytes(DType::I4, vec![33, 64], bytes::Bytes::from(vec![0x7Fu8; 33 * 32])).unwrap();
        let w4 = g.add_constant("w4", w4).unwrap();
        let y =
            g.add_op(qcc_ir::Op::new(qcc_ir::OpKind::Linear), &[x, w], qcc_ir::TensorType::known(DType::F32, &[2, 48]));
        g.add_output("y", y);
        g.add_output("w4", w4);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.qir");
        qcc_ir::text::save(&path, &g).unwrap();
        let weights: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().filter(|e| e.path() != path).collect();
        assert_eq!(weights.len(), 1, "save wrote the graph and one weights file");
        std::fs::remove_file(weights[0].path()).unwrap();
        assert!(qcc_ir::text::load(&path).is_err(), "the graph needs its weights file");
        let back = load_without_weights(&path).unwrap();
        for (name, dtype, dims) in [("w.\"q\"", DType::F32, vec![48, 64]), ("w4", DType::I4, vec![33, 64])] {
            let t = back.constant(back.value_by_name(name).unwrap()).unwrap();
            assert_eq!((t.dtype, &t.dims), (dtype, &dims), "{name}");
            assert!(t.bytes().unwrap().iter().all(|&b| b == 0), "{name} is zero-filled");
        }
    }

    #[test]
    fn device_bytes_round_trip_with_one_byte_per_int4_value() {
        let i4 = RtTensor::I4(ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![-8i8, 7, 0, -1, 3, -5]).unwrap());
        let bytes = device_bytes(&i4, DType::I4);
        assert_eq!(bytes, vec![0xF8, 7, 0, 0xFF, 3, 0xFB]); // sign-extended bytes, not packed nibbles
        assert_eq!(tensor_from_device(DType::I4, &[2, 3], bytes).unwrap(), i4);
        let x = RtTensor::from_vec(&[3], vec![1.5f32, -2.0, 65504.0]).unwrap();
        let h = device_bytes(&x, DType::F16);
        assert_eq!(h, vec![0x00, 0x3E, 0x00, 0xC0, 0xFF, 0x7B]); // IEEE half bit patterns
        assert_eq!(tensor_from_device(DType::F16, &[3], h).unwrap().cast(DType::F32), x);
        let ids = RtTensor::from_vec(&[2], vec![504i64, -1]).unwrap();
        assert_eq!(tensor_from_device(DType::I64, &[2], device_bytes(&ids, DType::I64)).unwrap(), ids);
        assert_eq!(element_bytes(DType::I4), 1);
        assert_eq!(element_bytes(DType::Bool), 1);
        assert_eq!(element_bytes(DType::F16), 2);
    }

    #[test]
    fn prologue_graph_keeps_only_what_the_values_need() {
        let mut g = Graph::new("t");
        let x = g.add_input("x", qcc_ir::TensorType::known(DType::F32, &[2, 3])).unwrap();
        let shape = g.add_op(qcc_ir::Op::new(qcc_ir::OpKind::Shape), &[x], qcc_ir::TensorType::known(DType::I64, &[2]));
        let neg = g.add_op(qcc_ir::Op::new(qcc_ir::OpKind::Neg), &[x], qcc_ir::TensorType::known(DType::F32, &[2, 3]));
        g.add_output("y", neg);
        let shape_name = g.value_name(shape).to_string();
        let pruned = prologue_graph(&g, std::slice::from_ref(&shape_name)).unwrap();
        assert_eq!(pruned.node_count(), 2, "input and shape only");
        let exec = CpuExecutor::new(&pruned).unwrap();
        let out = exec.run(&[("x", RtTensor::from_vec(&[2, 3], vec![0f32; 6]).unwrap())]).unwrap();
        assert_eq!(out[0].0, shape_name);
        assert_eq!(out[0].1.to_i64_vec().unwrap(), vec![2, 3]);
        assert!(prologue_graph(&g, &["missing".to_string()]).is_err());
    }

    #[test]
    fn a_prologue_that_reads_only_a_shape_takes_the_dims_instead_of_the_data() {
        // cache -> shape -> (with the ids' shape) a position table; the cache's values are never read.
        let mut g = Graph::new("t");
        let ids = g.add_input("ids", qcc_ir::TensorType::known(DType::I64, &[1, 3])).unwrap();
        let cache = g.add_input("cache", qcc_ir::TensorType::known(DType::F32, &[1, 2, 5, 4])).unwrap();
        let other = g.add_input("other_cache", qcc_ir::TensorType::known(DType::F32, &[1, 2, 5, 4])).unwrap();
        let i64s = |n| qcc_ir::TensorType::known(DType::I64, &[n]);
        // As an fp16 plan has it: the shape of the cache cast to f16.
        let half = qcc_ir::Op::new(qcc_ir::OpKind::Cast).with("to", qcc_ir::Attr::Str("f16".into()));
        let cache16 = g.add_op(half, &[cache], qcc_ir::TensorType::known(DType::F16, &[1, 2, 5, 4]));
        let cache_dims = g.add_op(qcc_ir::Op::new(qcc_ir::OpKind::Shape), &[cache16], i64s(4));
        let other_neg = g.add_op(
            qcc_ir::Op::new(qcc_ir::OpKind::Neg),
            &[other],
            qcc_ir::TensorType::known(DType::F32, &[1, 2, 5, 4]),
        );
        g.add_output("other", other_neg);
        let ids_dims = g.add_op(qcc_ir::Op::new(qcc_ir::OpKind::Shape), &[ids], i64s(2));
        let both = g.add_op(
            qcc_ir::Op::new(qcc_ir::OpKind::Concat).with("axis", qcc_ir::Attr::Int(0)),
            &[cache_dims, ids_dims],
            i64s(6),
        );
        let neg =
            g.add_op(qcc_ir::Op::new(qcc_ir::OpKind::Neg), &[ids], qcc_ir::TensorType::known(DType::I64, &[1, 3]));
        g.add_output("y", neg);
        let names = [g.value_name(both).to_string(), g.value_name(neg).to_string()];
        let p = HostPrologue::new(&g, &names).unwrap();
        // ids are read (neg), the cache only through shape (after its cast), the other cache not at all.
        assert_eq!(p.shape_only, HashSet::from(["cache".to_string(), "other_cache".to_string()]));
        let ids_t = RtTensor::from_vec(&[1, 3], vec![4i64, 5, 6]).unwrap();
        let asked = std::cell::RefCell::new(Vec::new());
        let data = |name: &str| {
            asked.borrow_mut().push(name.to_string());
            ids_t.clone()
        };
        let out =
            p.run(&[("ids", &[1, 3]), ("cache", &[1, 2, 515, 4]), ("other_cache", &[1, 2, 515, 4])], &data).unwrap();
        assert_eq!(*asked.borrow(), ["ids"], "the cache's data is never asked for");
        assert_eq!(out[0].1.to_i64_vec().unwrap(), vec![1, 2, 515, 4, 1, 3]);
        assert_eq!(out[1].1.to_i64_vec().unwrap(), vec![-4, -5, -6]);
    }
}

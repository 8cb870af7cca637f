//! Helpers shared by the equivalence passes (fold-norm-weights, rotate, smooth, reconstruct-dims,
//! symmetrize): constant weights as f64 matrices, writing rewritten weights back as new constants (a
//! constant may be shared, e.g. a tied embedding, so it is never modified in place), and the "every
//! reader of this value is a linear" query.

use crate::PassError;
use qcc_ir::{DType, Graph, NodeId, OpKind, Tensor, Value};

/// A dense row-major matrix in f64 (weights are rewritten in f64 and rounded once when stored).
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f64>,
}

impl Matrix {
    pub fn row(&self, r: usize) -> &[f64] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }

    pub fn row_mut(&mut self, r: usize) -> &mut [f64] {
        &mut self.data[r * self.cols..(r + 1) * self.cols]
    }

    /// Applies `f` to every row.
    pub fn map_rows(&mut self, f: impl Fn(&mut [f64])) {
        let cols = self.cols.max(1);
        self.data.chunks_mut(cols).for_each(f);
    }

    pub fn transposed(&self) -> Matrix {
        let mut data = vec![0f64; self.data.len()];
        crate::pattern::transpose_tiled(&self.data, &mut data, self.rows, self.cols);
        Matrix { rows: self.cols, cols: self.rows, data }
    }
}

/// The float constant behind `v` as f64 values with its dims.
pub fn constant_f64(graph: &Graph, v: Value) -> Option<(Vec<usize>, Vec<f64>)> {
    let t = graph.constant(v)?;
    if !t.dtype.is_float() {
        return None;
    }
    Some((t.dims.clone(), t.to_f64_vec().ok()?))
}

/// A constant float vector of length `n`.
pub fn constant_vector(graph: &Graph, v: Value, n: usize) -> Option<Vec<f64>> {
    let (dims, vals) = constant_f64(graph, v)?;
    (dims == [n]).then_some(vals)
}

/// A constant float matrix.
pub fn constant_matrix(graph: &Graph, v: Value) -> Option<Matrix> {
    let (dims, data) = constant_f64(graph, v)?;
    let [rows, cols] = dims[..] else { return None };
    Some(Matrix { rows, cols, data })
}

/// Rounds f64 values to a tensor of `dtype` (a float type).
pub fn tensor_from_f64(dtype: DType, dims: Vec<usize>, values: &[f64]) -> Option<Tensor> {
    Some(match dtype {
        DType::F64 => Tensor::from_slice(dims, values),
        DType::F32 => Tensor::from_vec(dims, values.iter().map(|&v| v as f32).collect()),
        DType::F16 => Tensor::from_vec(dims, values.iter().map(|&v| half::f16::from_f64(v)).collect()),
        DType::BF16 => Tensor::from_vec(dims, values.iter().map(|&v| half::bf16::from_f64(v)).collect()),
        _ => return None,
    })
}

/// Makes input `port` of `node` read a new constant holding `values` (dims `dims`, the dtype of the
/// constant it replaces), named after the old constant plus `suffix`. The old constant is removed when
/// nothing reads it any more.
pub fn replace_constant_input(
    graph: &mut Graph,
    pass: &str,
    node: NodeId,
    port: usize,
    dims: Vec<usize>,
    values: &[f64],
    suffix: &str,
) -> Result<Value, PassError> {
    let old = input_of(graph, pass, node, port)?;
    let dtype = graph.value_type(old).dtype;
    let tensor = tensor_from_f64(dtype, dims, values).ok_or_else(|| {
        PassError::node(
            &label(graph, node),
            graph.node(node).op.kind,
            format!("{pass}: cannot store a {dtype} constant"),
        )
    })?;
    replace_constant_input_with(graph, pass, node, port, tensor, suffix)
}

fn input_of(graph: &Graph, pass: &str, node: NodeId, port: usize) -> Result<Value, PassError> {
    graph.input(node, port).ok_or_else(|| {
        PassError::node(&label(graph, node), graph.node(node).op.kind, format!("{pass}: input {port} is absent"))
    })
}

/// [`replace_constant_input`] with the new constant's tensor already built.
pub fn replace_constant_input_with(
    graph: &mut Graph,
    pass: &str,
    node: NodeId,
    port: usize,
    tensor: Tensor,
    suffix: &str,
) -> Result<Value, PassError> {
    let old = input_of(graph, pass, node, port)?;
    let base = format!("{}{suffix}", graph.value_name(old));
    let name = if graph.value_by_name(&base).is_none() { base } else { graph.fresh_name(&format!("{base}.")) };
    let new = graph.add_constant(&name, tensor)?;
    graph.set_input(node, port, Some(new));
    remove_if_dead(graph, old);
    Ok(new)
}

/// Adds a new float constant of `dtype` (for inputs that did not exist before, e.g. a bias).
pub fn add_constant(graph: &mut Graph, name: &str, dtype: DType, dims: Vec<usize>, values: &[f64]) -> Option<Value> {
    let tensor = tensor_from_f64(dtype, dims, values)?;
    let name =
        if graph.value_by_name(name).is_none() { name.to_string() } else { graph.fresh_name(&format!("{name}.")) };
    graph.add_constant(&name, tensor).ok()
}

/// Removes a constant node nobody reads.
pub fn remove_if_dead(graph: &mut Graph, v: Value) {
    if graph.node(v.node).op.kind == OpKind::Constant && !graph.is_used(v) {
        graph.remove_node(v.node);
    }
}

/// The node's name, or its first output's name when unnamed (for messages).
pub fn label(graph: &Graph, node: NodeId) -> String {
    let n = graph.node(node);
    if n.name.is_empty() {
        n.outputs.first().map(|o| o.name.clone()).unwrap_or_default()
    } else {
        n.name.clone()
    }
}

/// Whether `v` is a graph output.
pub fn is_graph_output(graph: &Graph, v: Value) -> bool {
    graph.graph_outputs().iter().any(|o| o.value == v)
}

/// A `linear` node with a constant float weight [N, K] (and a constant bias, if any).
pub fn is_constant_linear(graph: &Graph, id: NodeId) -> bool {
    let node = graph.node(id);
    node.op.kind == OpKind::Linear
        && graph.input(id, 1).and_then(|w| graph.constant(w)).is_some_and(|t| t.dtype.is_float() && t.dims.len() == 2)
        && graph.input(id, 2).is_none_or(|b| graph.constant(b).is_some_and(|t| t.dtype.is_float()))
}

/// The linears reading `v` as their input x, when every reader of `v` is such a linear with constant
/// weights and `v` is not a graph output; `None` otherwise (or when nothing reads `v`).
pub fn linear_readers(graph: &Graph, v: Value) -> Option<Vec<NodeId>> {
    if is_graph_output(graph, v) {
        return None;
    }
    let users = graph.users(v);
    if users.is_empty() {
        return None;
    }
    let mut out = Vec::new();
    for (user, port) in users {
        if port != 0 || !is_constant_linear(graph, user) {
            return None;
        }
        if !out.contains(&user) {
            out.push(user);
        }
    }
    Some(out)
}

/// The weight of a constant linear as a matrix [N, K].
pub fn linear_weight(graph: &Graph, id: NodeId) -> Option<Matrix> {
    constant_matrix(graph, graph.input(id, 1)?)
}

/// [N, K] of a constant linear's float weight, without reading its values.
pub fn linear_weight_dims(graph: &Graph, id: NodeId) -> Option<[usize; 2]> {
    let t = graph.constant(graph.input(id, 1)?)?;
    let [n, k] = t.dims[..] else { return None };
    t.dtype.is_float().then_some([n, k])
}

/// The bias of a constant linear (None when absent).
pub fn linear_bias(graph: &Graph, id: NodeId, n: usize) -> Option<Vec<f64>> {
    constant_vector(graph, graph.input(id, 2)?, n)
}

/// Stores a rewritten weight (and bias, when given) of linear `id`.
pub fn store_linear(
    graph: &mut Graph,
    pass: &str,
    id: NodeId,
    weight: &Matrix,
    bias: Option<&[f64]>,
    suffix: &str,
) -> Result<(), PassError> {
    replace_constant_input(graph, pass, id, 1, vec![weight.rows, weight.cols], &weight.data, suffix)?;
    if let Some(b) = bias {
        match graph.input(id, 2) {
            Some(_) => {
                replace_constant_input(graph, pass, id, 2, vec![b.len()], b, suffix)?;
            }
            None => {
                let w = graph.input(id, 1).expect("stored above");
                let dtype = graph.value_type(w).dtype;
                let name = format!("{}.bias", graph.value_name(w));
                let bias = add_constant(graph, &name, dtype, vec![b.len()], b).ok_or_else(|| {
                    PassError::node(&label(graph, id), OpKind::Linear, format!("{pass}: cannot store the bias"))
                })?;
                graph.set_input(id, 2, Some(bias));
            }
        }
    }
    Ok(())
}

/// The error of a pass that needs calibration statistics and has none.
pub fn require_calibration(ctx: &crate::PassContext, pass: &str) -> Result<(), PassError> {
    if ctx.calibration().is_none() {
        return Err(PassError::Other(format!(
            "pass '{pass}' needs activation statistics but no calibration set is attached (give one, e.g. --calib FILE)"
        )));
    }
    Ok(())
}

/// Per-channel activation statistics of `values` (absmax), copied out of the context's cache.
pub struct ActivationRanges {
    pub absmax: Vec<f64>,
    pub min: Vec<f64>,
    pub max: Vec<f64>,
}

/// Collects ranges of every value in one pass over the calibration set; with `exclude_first` the
/// first position of each sample (the attention sink) is left out.
pub fn activation_ranges(
    graph: &Graph,
    ctx: &mut crate::PassContext,
    pass: &str,
    values: &[Value],
    exclude_first: bool,
) -> Result<Vec<ActivationRanges>, PassError> {
    require_calibration(ctx, pass)?;
    if values.is_empty() {
        return Ok(Vec::new());
    }
    let request = crate::StatsRequest { values: values.to_vec(), gram: false, sample_rows: 0 };
    let stats = ctx
        .activation_stats(graph, &request)
        .map_err(|e| PassError::Other(format!("pass '{pass}': collecting activation statistics: {e}")))?;
    let widen = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>();
    Ok(stats
        .iter()
        .map(|s| {
            if exclude_first && s.tokens > 1 {
                ActivationRanges {
                    absmax: widen(&s.absmax_excluding_first),
                    min: widen(&s.min_excluding_first),
                    max: widen(&s.max_excluding_first),
                }
            } else {
                ActivationRanges { absmax: widen(&s.absmax), min: widen(&s.min), max: widen(&s.max) }
            }
        })
        .collect())
}

//! Small matching helpers shared by the block-recognition passes: "is this value produced by op K",
//! constant reads, commutative operand splits, and replacing a matched root by a fused node.

use qcc_ir::{Attr, Graph, NodeId, Op, OpKind, Tensor, TensorType, Value, ValueInfo};

/// The node producing `v` when it is output 0 of a `kind` node.
pub fn producer(graph: &Graph, v: Value, kind: OpKind) -> Option<NodeId> {
    (v.port == 0 && graph.node(v.node).op.kind == kind).then_some(v.node)
}

/// Both inputs of a binary node.
pub fn args2(graph: &Graph, node: NodeId) -> Option<(Value, Value)> {
    Some((graph.input(node, 0)?, graph.input(node, 1)?))
}

/// The constant tensor behind `v`, if `v` is produced by a `constant` node.
pub fn constant(graph: &Graph, v: Value) -> Option<&Tensor> {
    graph.constant(v)
}

/// The single value of a one-element float or integer constant.
pub fn const_scalar(graph: &Graph, v: Value) -> Option<f64> {
    let t = graph.constant(v)?;
    if t.numel() != 1 {
        return None;
    }
    t.to_f32_vec().ok().map(|x| f64::from(x[0]))
}

pub fn const_ints(graph: &Graph, v: Value) -> Option<Vec<i64>> {
    graph.constant(v)?.to_i64_vec().ok()
}

/// The rank of `v`'s type, when known.
pub fn rank(graph: &Graph, v: Value) -> Option<usize> {
    graph.value_type(v).shape.as_ref().map(|s| s.rank())
}

/// The known extent of dimension `axis` (negative counts from the end) of `v`.
pub fn dim(graph: &Graph, v: Value, axis: i64) -> Option<u64> {
    let shape = graph.value_type(v).shape.as_ref()?;
    let r = shape.rank() as i64;
    let a = if axis < 0 { axis + r } else { axis };
    shape.0.get(usize::try_from(a).ok()?)?.known()
}

/// Whether `axes` names exactly the last axis of a rank-`rank` tensor.
pub fn is_last_axis(axes: &[i64], rank: usize) -> bool {
    matches!(axes, [a] if *a == -1 || *a == rank as i64 - 1)
}

/// The reduction axes of a reduce node (input 1 from opset 18, attribute `axes` before).
pub fn reduce_axes(graph: &Graph, node: NodeId) -> Option<Vec<i64>> {
    match graph.input(node, 1) {
        Some(v) => const_ints(graph, v),
        None => match graph.node(node).op.attr("axes") {
            Some(Attr::Ints(a)) => Some(a.clone()),
            _ => None,
        },
    }
}

/// Tries `f(a, b)` and then `f(b, a)` (for commutative ops).
pub fn either<T>(a: Value, b: Value, mut f: impl FnMut(Value, Value) -> Option<T>) -> Option<T> {
    f(a, b).or_else(|| f(b, a))
}

/// Replaces the matched `root` by a new `op` node over `inputs` with the root's type. The new node takes
/// the root's value name and node name (the old root is renamed and left for dead-code elimination).
pub fn replace_root(
    graph: &mut Graph,
    root: Value,
    op: Op,
    inputs: &[Option<Value>],
) -> Result<Value, qcc_ir::GraphError> {
    let name = graph.value_name(root).to_string();
    let node_name = graph.node(root.node).name.clone();
    let ty: TensorType = graph.value_type(root).clone();
    let old = graph.fresh_name(&format!("{name}.unfused"));
    graph.rename_value(root, &old)?;
    let id = graph.add_node(node_name, op, inputs, vec![ValueInfo::new(name, ty)])?;
    let new = Value::new(id, 0);
    graph.replace_all_uses(root, new);
    Ok(new)
}

/// Transposes a rank-2 constant ([K, N] -> [N, K]) byte-wise (any byte-sized element type).
pub fn transpose_2d(t: &Tensor) -> Option<Tensor> {
    let [rows, cols] = t.dims[..] else { return None };
    if !t.dtype.bits().is_multiple_of(8) {
        return None;
    }
    let src = t.bytes().ok()?;
    let mut out = vec![0u8; src.len()];
    match t.dtype.bits() / 8 {
        1 => transpose_elements::<1>(src, &mut out, rows, cols),
        2 => transpose_elements::<2>(src, &mut out, rows, cols),
        4 => transpose_elements::<4>(src, &mut out, rows, cols),
        8 => transpose_elements::<8>(src, &mut out, rows, cols),
        _ => return None,
    }
    Tensor::from_bytes(t.dtype, vec![cols, rows], out.into()).ok()
}

/// Transposes `[rows x cols]` elements of `S` bytes.
fn transpose_elements<const S: usize>(src: &[u8], out: &mut [u8], rows: usize, cols: usize) {
    transpose_tiled(src.as_chunks::<S>().0, out.as_chunks_mut::<S>().0, rows, cols);
}

/// `out[c * rows + r] = src[r * cols + c]`, in 32 x 32 tiles so both sides stay in cache (the weights of a
/// whole model go through here).
pub fn transpose_tiled<T: Copy>(src: &[T], out: &mut [T], rows: usize, cols: usize) {
    const TILE: usize = 32;
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    out[c * rows + r] = src[r * cols + c];
                }
            }
        }
    }
}

/// Visits every node in topological order; where `matcher` matches and the rewrite budget allows,
/// applies the rewrite. Returns the outcome with the number of rewrites applied.
pub fn rewrite_each<M>(
    graph: &mut Graph,
    ctx: &mut crate::PassContext,
    mut matcher: impl FnMut(&Graph, NodeId) -> Option<M>,
    mut apply: impl FnMut(&mut Graph, NodeId, M) -> Result<(), crate::PassError>,
) -> Result<crate::PassOutcome, crate::PassError> {
    let mut applied = 0;
    for id in graph.topo_order()? {
        if !graph.contains(id) {
            continue;
        }
        let Some(m) = matcher(graph, id) else { continue };
        if !ctx.try_rewrite() {
            break;
        }
        apply(graph, id, m)?;
        erase_if_dead(graph, id);
        applied += 1;
    }
    Ok(crate::PassOutcome::rewrites(applied))
}

/// Erases `root` if nothing reads it any more, then every producer that this leaves unread, so a rewrite
/// removes the nodes it replaced (as MLIR's rewriters do) and the IR printed after the pass shows only
/// what the pass produced. Graph inputs are kept.
pub fn erase_if_dead(graph: &mut Graph, root: NodeId) {
    let mut work = vec![root];
    while let Some(id) = work.pop() {
        if !graph.contains(id) || graph.node(id).op.kind == OpKind::Input {
            continue;
        }
        let outputs = graph.node(id).outputs.len();
        if (0..outputs).any(|port| graph.is_used(Value::new(id, port as u32))) {
            continue;
        }
        work.extend(graph.inputs(id).into_iter().flatten().map(|v| v.node));
        graph.remove_node(id);
    }
}

/// Implements `Pass` for a unit struct from its `ENTRY` and a `fn run(graph, ctx)`.
macro_rules! simple_pass {
    ($ty:ident) => {
        impl $crate::Pass for $ty {
            fn name(&self) -> &'static str {
                ENTRY.name
            }
            fn description(&self) -> &'static str {
                ENTRY.description
            }
            fn run(
                &self,
                graph: &mut qcc_ir::Graph,
                ctx: &mut $crate::PassContext,
            ) -> Result<$crate::PassOutcome, $crate::PassError> {
                run(graph, ctx)
            }
        }
    };
}
pub(crate) use simple_pass;

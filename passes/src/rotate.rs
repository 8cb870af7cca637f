//! `rotate`: QuaRot-style Hadamard rotation of a decoder's residual stream, per-head rotation of the
//! attention values, and an online Hadamard transform on the MLP's down-projection input. All three are
//! exact in floating point: for an orthogonal R, (x R)(W R)^T = x W^T.
//!
//! Matches: the residual stream, followed from each embedding `gather(E[V, D], ids) {axis = 0}`
//! through residual adds: every stream value is read only by `rms_norm`s (as x) and at most one `add`
//! whose other operand is a writer `linear` (o_proj, down_proj) read by nothing else; every norm is read
//! only by linears (the readers: q, k, v, gate, up, lm_head).
//! Requires: fold-norm-weights first: every stream norm must have gamma = 1 (its beta, if any, is
//! rotated). A stream norm with another gamma is an error naming the norm.
//! Rewrite, with R = H_D^T / sqrt(D) (H from `qcc_ir::hadamard`, the matrix the `hadamard` op uses):
//!   embeddings E' = E R; readers W' = W R; writers W' = R^T W, b' = b R (the stream becomes x R, and
//!   rms_norm(x R) = rms_norm(x) R since ||x R|| = ||x||).
//!   Per head (head size d, R_d = H_d^T / sqrt(d)): where an attention's v is
//!   `transpose(reshape(linear_v(..), [.., Hkv, d]), [0, 2, 1, 3])` and its output reaches a linear
//!   through `reshape(transpose(., [0, 2, 1, 3]), [.., Hq * d])`, v_proj's output rows of each head are
//!   rotated (R_d^T W_v, b_v R_d) and o_proj's input columns of each head (W_o R_d). softmax(.) V R_d =
//!   (softmax(.) V) R_d, whatever the head grouping.
//!   Online: each `swiglu` read only by linears gets `hadamard(.) {size = I}` (y = x R_I) inserted after
//!   it and the readers' weights become W R_I.
//! Weights are rotated in f64 and stored once: the transforms are planned first, then each weight is
//! widened, transformed and stored in turn, so the pass never holds the whole model in f64.
//! Near misses left alone: a stream read by anything else (a graph output, another op), a stream norm
//! read by a non-linear, KV heads whose v is a graph output.
//! A stream width with no Hadamard construction uses the block-diagonal fallback and says so in the
//! pass notes.
//! Postcondition: the graph computes the same outputs up to rounding.

use crate::pattern::simple_pass;
use crate::registry::PassEntry;
use crate::weights::{
    constant_vector, is_graph_output, label, linear_bias, linear_readers, linear_weight, linear_weight_dims,
    replace_constant_input, replace_constant_input_with, store_linear, Matrix,
};
use crate::{PassContext, PassError, PassOptions, PassOutcome};
use qcc_ir::hadamard::Hadamard;
use qcc_ir::{Attr, DType, Graph, NodeId, Op, OpKind, Tensor, TensorType, Value, ValueInfo};
use std::collections::BTreeMap;
use std::sync::Arc;

pub const ENTRY: PassEntry = PassEntry {
    name: "rotate",
    description: "Hadamard-rotate the residual stream, the attention value heads and the down_proj input",
    options: &[],
    build: |_: &PassOptions| Ok(Box::new(Rotate)),
};

pub struct Rotate;
simple_pass!(Rotate);

/// One residual stream, found from its embedding.
struct Stream {
    width: usize,
    norms: Vec<NodeId>,
    readers: Vec<NodeId>,
    writers: Vec<NodeId>,
}

fn err(graph: &Graph, id: NodeId, message: String) -> PassError {
    PassError::node(&label(graph, id), graph.node(id).op.kind, format!("rotate: {message}"))
}

/// Follows the stream from an embedding gather; `Ok(None)` when the structure does not match.
fn find_stream(graph: &Graph, gather: NodeId) -> Result<Option<Stream>, PassError> {
    let node = graph.node(gather);
    if node.op.kind != OpKind::Gather || node.op.int("axis").unwrap_or(0) != 0 {
        return Ok(None);
    }
    let Some(table) = graph.input(gather, 0).and_then(|t| graph.constant(t)) else { return Ok(None) };
    let [_, width] = table.dims[..] else { return Ok(None) };
    if !table.dtype.is_float() {
        return Ok(None);
    }
    let mut stream = Stream { width, norms: Vec::new(), readers: Vec::new(), writers: Vec::new() };
    let mut s = Value::new(gather, 0);
    loop {
        if is_graph_output(graph, s) {
            return Ok(None);
        }
        let mut next = None;
        for (user, port) in graph.users(s) {
            match graph.node(user).op.kind {
                OpKind::RmsNorm if port == 0 => {
                    let norm = Value::new(user, 0);
                    let Some(readers) = linear_readers(graph, norm) else { return Ok(None) };
                    let gamma = graph.input(user, 1).and_then(|g| constant_vector(graph, g, width));
                    if gamma.is_none_or(|g| g.iter().any(|&v| v != 1.0)) {
                        return Err(err(graph, user, "gamma is not 1: run fold-norm-weights before rotate".into()));
                    }
                    if readers.iter().any(|&r| linear_weight_dims(graph, r).is_none_or(|[_, k]| k != width)) {
                        return Ok(None);
                    }
                    stream.norms.push(user);
                    stream.readers.extend(readers);
                }
                OpKind::Add if next.is_none() => {
                    let other = graph.input(user, 1 - port.min(1));
                    let Some(w) = other.filter(|w| w.port == 0 && w.node != s.node) else { return Ok(None) };
                    let writer = w.node;
                    let single_use = graph.users(w).len() == 1 && !is_graph_output(graph, w);
                    let fits = linear_weight_dims(graph, writer).is_some_and(|[n, _]| n == width);
                    if !single_use || !fits || !crate::weights::is_constant_linear(graph, writer) {
                        return Ok(None);
                    }
                    stream.writers.push(writer);
                    next = Some(Value::new(user, 0));
                }
                _ => return Ok(None),
            }
        }
        match next {
            Some(n) => s = n,
            None => break,
        }
    }
    Ok((!stream.readers.is_empty()).then_some(stream))
}

/// The value path of one attention whose heads can be rotated: (v_proj, o_proj, head size).
pub(crate) fn head_path(graph: &Graph, attention: NodeId) -> Option<(NodeId, NodeId, usize)> {
    let single = |v: Value| graph.users(v).len() == 1 && !is_graph_output(graph, v);
    let dims = |v: Value| -> Option<Vec<Option<u64>>> {
        Some(graph.value_type(v).shape.as_ref()?.0.iter().map(|d| d.known()).collect())
    };
    let perm_0213 = |id: NodeId| graph.node(id).op.ints("perm") == Some(&[0, 2, 1, 3][..]);
    // v side: linear -> reshape [.., H, d] -> transpose [0, 2, 1, 3] -> attention input 2.
    let v_in = graph.input(attention, 2)?;
    let t = crate::pattern::producer(graph, v_in, OpKind::Transpose)?;
    let r = crate::pattern::producer(graph, graph.input(t, 0)?, OpKind::Reshape)?;
    let v_lin = graph.input(r, 0)?;
    let v_proj = crate::pattern::producer(graph, v_lin, OpKind::Linear)?;
    if !perm_0213(t) || !single(v_in) || !single(Value::new(r, 0)) || !single(v_lin) {
        return None;
    }
    let split = dims(Value::new(r, 0))?;
    let d = split.last().copied()?? as usize;
    let heads = split.get(split.len().checked_sub(2)?).copied()?? as usize;
    if split.len() != 4 || crate::pattern::dim(graph, v_lin, -1)? as usize != heads * d {
        return None;
    }
    // Output side: attention -> transpose [0, 2, 1, 3] -> reshape [.., Hq * d] -> linear.
    let out = Value::new(attention, 0);
    let (ut, _) = *graph.users(out).first()?;
    if !single(out) || graph.node(ut).op.kind != OpKind::Transpose || !perm_0213(ut) {
        return None;
    }
    let (ur, _) = *graph.users(Value::new(ut, 0)).first()?;
    if !single(Value::new(ut, 0)) || graph.node(ur).op.kind != OpKind::Reshape {
        return None;
    }
    let merged = Value::new(ur, 0);
    let attn_dims = dims(Value::new(ut, 0))?;
    let hq = attn_dims.get(2).copied()?? as usize;
    if attn_dims.len() != 4 || attn_dims[3]? as usize != d || crate::pattern::dim(graph, merged, -1)? as usize != hq * d
    {
        return None;
    }
    let o_proj = match linear_readers(graph, merged)?[..] {
        [o] => o,
        _ => return None,
    };
    crate::weights::is_constant_linear(graph, v_proj).then_some((v_proj, o_proj, d))
}

/// One transform of a linear's weight `W [N, K]`, applied in plan order.
enum Step {
    /// W R: the input side (every row of W).
    Inputs(Arc<Hadamard>),
    /// R^T W: the output side (every column of W); the bias becomes b R, over its whole length or per
    /// head of R's size.
    Outputs(Arc<Hadamard>, BiasSpan),
}

#[derive(Clone, Copy)]
enum BiasSpan {
    Whole,
    Heads,
}

/// Linears rewritten per plan step at once: each weight is widened to f64 only while its own steps run.
const APPLY_WINDOW: usize = 8;

/// H applied to every row of `m` (rows of length n), or to every n-entry block of each row (the per-head
/// rotation, n = head dim): both are the batched transform over the row-major data.
fn rotate_rows(h: &Hadamard, m: &mut Matrix) {
    h.transform_rows(&mut m.data).expect("lengths checked by the matcher");
}

/// [`rotate_rows`] on the columns (through a transpose, so each column is contiguous).
fn rotate_columns(h: &Hadamard, m: &mut Matrix) {
    let mut t = m.transposed();
    rotate_rows(h, &mut t);
    *m = t.transposed();
}

/// Rewrites every planned linear (weights in f64, rounded once when stored), a window of linears in
/// parallel, stored in node order.
fn apply_plan(graph: &mut Graph, plan: BTreeMap<NodeId, Vec<Step>>) -> Result<(), PassError> {
    use rayon::prelude::*;
    let plan: Vec<(NodeId, Vec<Step>)> = plan.into_iter().collect();
    for window in plan.chunks(APPLY_WINDOW) {
        let g: &Graph = graph;
        let rotated: Vec<(NodeId, Matrix, Option<Vec<f64>>)> = window
            .par_iter()
            .map(|(id, steps)| {
                let mut weight = linear_weight(g, *id).expect("constant linear checked by the matcher");
                let mut bias = linear_bias(g, *id, weight.rows);
                for step in steps {
                    match step {
                        Step::Inputs(h) => rotate_rows(h, &mut weight),
                        Step::Outputs(h, span) => {
                            rotate_columns(h, &mut weight);
                            if let Some(b) = &mut bias {
                                match span {
                                    BiasSpan::Whole => h.transform(b),
                                    BiasSpan::Heads => h.transform_rows(b),
                                }
                                .expect("bias length checked by the matcher");
                            }
                        }
                    }
                }
                (*id, weight, bias)
            })
            .collect();
        for (id, weight, bias) in rotated {
            store_linear(graph, ENTRY.name, id, &weight, bias.as_deref(), ".rot")?;
        }
    }
    Ok(())
}

fn run(graph: &mut Graph, ctx: &mut PassContext) -> Result<PassOutcome, PassError> {
    let mut plan: BTreeMap<NodeId, Vec<Step>> = BTreeMap::new();
    let mut rewrites = 0;
    let order = graph.topo_order()?;
    let of_kind =
        |kind: OpKind| -> Vec<NodeId> { order.iter().copied().filter(|&id| graph.node(id).op.kind == kind).collect() };
    // Listed before rewriting: the rewrites remove dead constants from the order.
    let (gathers, attentions, swiglus) = (of_kind(OpKind::Gather), of_kind(OpKind::Attention), of_kind(OpKind::Swiglu));

    // 1. Residual streams.
    for gather in gathers {
        let Some(stream) = find_stream(graph, gather)? else { continue };
        if !ctx.try_rewrite() {
            break;
        }
        let h = Arc::new(Hadamard::new(stream.width));
        if !h.is_exact() {
            ctx.note(format!("rotate: residual width {}: {h}", stream.width));
        }
        let table = graph.input(gather, 0).expect("checked");
        let rotated = match graph.constant(table).expect("checked") {
            // The embedding table is the largest tensor: rotated row by row in f64, without an f64 copy.
            t if t.dtype == DType::F32 => {
                let src = t.values::<f32>().map_err(|e| err(graph, gather, e.to_string()))?;
                let mut dst = vec![0f32; src.len()];
                h.transform_rows_f32(&src, &mut dst).expect("rows of the stream width");
                Tensor::from_vec(t.dims.clone(), dst)
            }
            t => {
                let mut e = crate::weights::constant_matrix(graph, table).expect("checked");
                rotate_rows(&h, &mut e);
                crate::weights::tensor_from_f64(t.dtype, t.dims.clone(), &e.data)
                    .ok_or_else(|| err(graph, gather, format!("cannot store a {} table", t.dtype)))?
            }
        };
        replace_constant_input_with(graph, ENTRY.name, gather, 0, rotated, ".rot")?;
        for &r in &stream.readers {
            plan.entry(r).or_default().push(Step::Inputs(h.clone()));
        }
        for &w in &stream.writers {
            plan.entry(w).or_default().push(Step::Outputs(h.clone(), BiasSpan::Whole));
        }
        for &n in &stream.norms {
            if let Some(beta) = graph.input(n, 2).and_then(|b| constant_vector(graph, b, stream.width)) {
                let mut beta = beta;
                h.transform(&mut beta).expect("beta length is the stream width");
                replace_constant_input(graph, ENTRY.name, n, 2, vec![stream.width], &beta, ".rot")?;
            }
        }
        ctx.note(format!(
            "rotate: residual stream of width {} ({h}): {} readers, {} writers, {} norms",
            stream.width,
            stream.readers.len(),
            stream.writers.len(),
            stream.norms.len()
        ));
        rewrites += 1;
    }

    // 2. Attention value heads.
    for attention in attentions {
        let Some((v_proj, o_proj, d)) = head_path(graph, attention) else { continue };
        if !ctx.try_rewrite() {
            break;
        }
        let h = Arc::new(Hadamard::new(d));
        plan.entry(v_proj).or_default().push(Step::Outputs(h.clone(), BiasSpan::Heads));
        plan.entry(o_proj).or_default().push(Step::Inputs(h));
        rewrites += 1;
    }

    // 3. Online Hadamard on the MLP down-projection input.
    for swiglu in swiglus {
        let out = Value::new(swiglu, 0);
        let Some(readers) = linear_readers(graph, out) else { continue };
        let Some(size) = crate::pattern::dim(graph, out, -1).map(|n| n as usize) else { continue };
        if !ctx.try_rewrite() {
            break;
        }
        let h = Arc::new(Hadamard::new(size));
        if !h.is_exact() {
            ctx.note(format!("rotate: down_proj input of size {size}: {h}"));
        }
        let ty: TensorType = graph.value_type(out).clone();
        let base = format!("{}.hadamard", graph.value_name(out));
        let name = if graph.value_by_name(&base).is_none() { base } else { graph.fresh_name(&format!("{base}.")) };
        let op = Op::new(OpKind::Hadamard).with("size", Attr::Int(size as i64));
        let node = graph.add_node(name.clone(), op, &[Some(out)], vec![ValueInfo::new(name, ty)])?;
        let rotated = Value::new(node, 0);
        for &r in &readers {
            graph.set_input(r, 0, Some(rotated));
            plan.entry(r).or_default().push(Step::Inputs(h.clone()));
        }
        rewrites += 1;
    }

    apply_plan(graph, plan)?;
    Ok(PassOutcome::rewrites(rewrites))
}

//! `fuse-layer-norm`: recognises layer normalisation over the last axis and replaces it by ONNX's
//! `layer_normalization(x, gamma, beta?) {axis = -1, epsilon}`.
//!
//! Matches (means are `reduce_mean` over the last axis with keepdims=1, either order of commutative ops):
//!   d = x - mean(x);  d / sqrt(mean(d^2) + eps) * gamma (+ beta)
//! Near misses left alone: a centred value from a different x, a variance of something other than d,
//! gamma/beta that are not constant [D].
//! Postcondition: the matched root is one `layer_normalization` node.

use crate::pattern::{
    args2, const_scalar, dim, either, is_last_axis, producer, rank, reduce_axes, replace_root, rewrite_each,
    simple_pass,
};
use crate::registry::PassEntry;
use crate::{PassContext, PassError, PassOptions, PassOutcome};
use qcc_ir::{Attr, Graph, NodeId, Op, OpKind, Value};

pub const ENTRY: PassEntry = PassEntry {
    name: "fuse-layer-norm",
    description: "recognise decomposed layer normalisation as layer_normalization",
    options: &[],
    build: |_: &PassOptions| Ok(Box::new(FuseLayerNorm)),
};

pub struct FuseLayerNorm;
simple_pass!(FuseLayerNorm);

struct Match {
    x: Value,
    gamma: Value,
    beta: Option<Value>,
    epsilon: f32,
}

fn is_vec(graph: &Graph, v: Value, x: Value) -> bool {
    graph.constant(v).is_some_and(|t| t.dims.len() == 1 && dim(graph, x, -1) == Some(t.dims[0] as u64))
}

/// `reduce_mean(v, [-1], keepdims=1)` -> v.
fn mean_of(graph: &Graph, m: Value) -> Option<Value> {
    let r = producer(graph, m, OpKind::ReduceMean)?;
    let v = graph.input(r, 0)?;
    (graph.node(r).op.int("keepdims").unwrap_or(1) == 1 && is_last_axis(&reduce_axes(graph, r)?, rank(graph, v)?))
        .then_some(v)
}

/// `x - mean(x)` -> x.
fn centred(graph: &Graph, d: Value) -> Option<Value> {
    let s = producer(graph, d, OpKind::Sub)?;
    let (x, m) = args2(graph, s)?;
    (mean_of(graph, m)? == x).then_some(x)
}

/// `d / sqrt(mean(d^2) + eps)` -> (x, eps).
fn normalized(graph: &Graph, v: Value) -> Option<(Value, f32)> {
    let div = producer(graph, v, OpKind::Div)?;
    let (d, s) = args2(graph, div)?;
    let x = centred(graph, d)?;
    let sqrt = producer(graph, s, OpKind::Sqrt)?;
    let add = producer(graph, graph.input(sqrt, 0)?, OpKind::Add)?;
    let (a, b) = args2(graph, add)?;
    either(a, b, |var, eps| {
        let eps = const_scalar(graph, eps)? as f32;
        let sq = mean_of(graph, var)?;
        let d2 = match producer(graph, sq, OpKind::Pow) {
            Some(p) => {
                let (base, e) = args2(graph, p)?;
                (const_scalar(graph, e)? == 2.0).then_some(base)?
            }
            None => {
                let (m1, m2) = args2(graph, producer(graph, sq, OpKind::Mul)?)?;
                (m1 == m2).then_some(m1)?
            }
        };
        (d2 == d).then_some((x, eps))
    })
}

fn scaled(graph: &Graph, v: Value) -> Option<(Value, Value, f32)> {
    let m = producer(graph, v, OpKind::Mul)?;
    let (a, b) = args2(graph, m)?;
    either(a, b, |n, gamma| {
        let (x, eps) = normalized(graph, n)?;
        is_vec(graph, gamma, x).then_some((x, gamma, eps))
    })
}

fn matcher(graph: &Graph, id: NodeId) -> Option<Match> {
    let root = Value::new(id, 0);
    match graph.node(id).op.kind {
        OpKind::Add => {
            let (a, b) = args2(graph, id)?;
            either(a, b, |s, beta| {
                let (x, gamma, epsilon) = scaled(graph, s)?;
                // The scaled value must feed only this add, or the add is not part of the norm.
                (graph.users(s).len() == 1 && is_vec(graph, beta, x)).then_some(Match {
                    x,
                    gamma,
                    beta: Some(beta),
                    epsilon,
                })
            })
        }
        OpKind::Mul => {
            let (x, gamma, epsilon) = scaled(graph, root)?;
            // Leave it to the bias add when there is one.
            if let [(user, _)] = graph.users(root)[..] {
                if graph.node(user).op.kind == OpKind::Add {
                    let (a, b) = args2(graph, user)?;
                    let other = if a == root { b } else { a };
                    if is_vec(graph, other, x) {
                        return None;
                    }
                }
            }
            Some(Match { x, gamma, beta: None, epsilon })
        }
        _ => None,
    }
}

fn run(graph: &mut Graph, ctx: &mut PassContext) -> Result<PassOutcome, PassError> {
    rewrite_each(graph, ctx, matcher, |g, id, m| {
        let op =
            Op::new(OpKind::LayerNormalization).with("axis", Attr::Int(-1)).with("epsilon", Attr::Float(m.epsilon));
        let mut inputs = vec![Some(m.x), Some(m.gamma)];
        if m.beta.is_some() {
            inputs.push(m.beta);
        }
        replace_root(g, Value::new(id, 0), op, &inputs)?;
        Ok(())
    })
}

//! `fuse-rms-norm`: recognises RMS normalisation over the last axis and replaces it by `rms_norm`.
//!
//! Matches (gamma a constant [D], eps a constant scalar, `mean` a `reduce_mean` over the last axis with
//! keepdims=1, either operand order of the commutative ops):
//!   x / sqrt(mean(x^2) + eps) * gamma          (Llama exports; x^2 as pow(x, 2) or x * x)
//!   x * reciprocal(sqrt(mean(x^2) + eps)) * gamma   (torch.rsqrt exports)
//!   ONNX RMSNormalization / SimplifiedLayerNormalization with axis -1 and a [D] scale.
//! Near misses left alone: a mean over another axis, a pow other than 2, a gamma that is not [D], x in
//! the numerator differing from x in the mean.
//! Postcondition: the matched root is `rms_norm(x, gamma) {epsilon}`; the old nodes are dead.

use crate::pattern::{
    args2, const_scalar, either, is_last_axis, producer, rank, reduce_axes, replace_root, rewrite_each, simple_pass,
};
use crate::registry::PassEntry;
use crate::{PassContext, PassError, PassOptions, PassOutcome};
use qcc_ir::{Attr, Graph, NodeId, Op, OpKind, Value};

pub const ENTRY: PassEntry = PassEntry {
    name: "fuse-rms-norm",
    description: "recognise RMS normalisation (decomposed or ONNX RMSNormalization) as rms_norm",
    options: &[],
    build: |_: &PassOptions| Ok(Box::new(FuseRmsNorm)),
};

pub struct FuseRmsNorm;
simple_pass!(FuseRmsNorm);

struct Match {
    x: Value,
    gamma: Value,
    epsilon: f32,
}

fn run(graph: &mut Graph, ctx: &mut PassContext) -> Result<PassOutcome, PassError> {
    rewrite_each(graph, ctx, matcher, |g, id, m| {
        let op = Op::new(OpKind::RmsNorm).with("epsilon", Attr::Float(m.epsilon));
        replace_root(g, Value::new(id, 0), op, &[Some(m.x), Some(m.gamma)])?;
        Ok(())
    })
}

fn is_gamma(graph: &Graph, gamma: Value, x: Value) -> bool {
    let Some(t) = graph.constant(gamma) else { return false };
    t.dims.len() == 1 && crate::pattern::dim(graph, x, -1) == Some(t.dims[0] as u64)
}

/// `mean(x^2) + eps` -> (x, eps).
fn mean_square_plus_eps(graph: &Graph, v: Value) -> Option<(Value, f32)> {
    let add = producer(graph, v, OpKind::Add)?;
    let (a, b) = args2(graph, add)?;
    either(a, b, |mean, eps| {
        let eps = const_scalar(graph, eps)? as f32;
        let reduce = producer(graph, mean, OpKind::ReduceMean)?;
        if graph.node(reduce).op.int("keepdims").unwrap_or(1) != 1 {
            return None;
        }
        let sq = graph.input(reduce, 0)?;
        if !is_last_axis(&reduce_axes(graph, reduce)?, rank(graph, sq)?) {
            return None;
        }
        let x = square_of(graph, sq)?;
        Some((x, eps))
    })
}

fn square_of(graph: &Graph, v: Value) -> Option<Value> {
    if let Some(pow) = producer(graph, v, OpKind::Pow) {
        let (x, e) = args2(graph, pow)?;
        return (const_scalar(graph, e)? == 2.0).then_some(x);
    }
    let mul = producer(graph, v, OpKind::Mul)?;
    let (a, b) = args2(graph, mul)?;
    (a == b).then_some(a)
}

/// `x / sqrt(ms + eps)` or `x * reciprocal(sqrt(ms + eps))` -> (x, eps).
fn normalized(graph: &Graph, v: Value) -> Option<(Value, f32)> {
    let sqrt_of = |s: Value| -> Option<(Value, f32)> {
        let sqrt = producer(graph, s, OpKind::Sqrt)?;
        mean_square_plus_eps(graph, graph.input(sqrt, 0)?)
    };
    if let Some(div) = producer(graph, v, OpKind::Div) {
        let (x, s) = args2(graph, div)?;
        let (x2, eps) = sqrt_of(s)?;
        return (x2 == x).then_some((x, eps));
    }
    let mul = producer(graph, v, OpKind::Mul)?;
    let (a, b) = args2(graph, mul)?;
    either(a, b, |x, r| {
        let rec = producer(graph, r, OpKind::Reciprocal)?;
        let (x2, eps) = sqrt_of(graph.input(rec, 0)?)?;
        (x2 == x).then_some((x, eps))
    })
}

fn matcher(graph: &Graph, id: NodeId) -> Option<Match> {
    let node = graph.node(id);
    match node.op.kind {
        OpKind::RmsNormalization | OpKind::SimplifiedLayerNormalization => {
            let (x, gamma) = args2(graph, id)?;
            let axis = node.op.int("axis").unwrap_or(-1);
            if !is_last_axis(&[axis], rank(graph, x)?) || !is_gamma(graph, gamma, x) {
                return None;
            }
            Some(Match { x, gamma, epsilon: node.op.float("epsilon").unwrap_or(1e-5) })
        }
        OpKind::Mul => {
            let (a, b) = args2(graph, id)?;
            either(a, b, |n, gamma| {
                let (x, epsilon) = normalized(graph, n)?;
                is_gamma(graph, gamma, x).then_some(Match { x, gamma, epsilon })
            })
        }
        _ => None,
    }
}

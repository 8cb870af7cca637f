//! `fuse-linear`: recognises matrix products with a constant weight (plus an optional constant bias)
//! and replaces them by `linear(x, w[N, K], bias?)`.
//!
//! Matches:
//!   matmul(x, W[K, N])                    -> linear(x, W^T)  (W^T is a new constant, shared per W)
//!   matmul(x, transpose(W[N, K], [1, 0])) -> linear(x, W)    (tied lm_head: no copy)
//!   gemm(x, W, C?) with alpha = beta = 1, transA = 0         -> linear(x, transB ? W : W^T, C)
//!   add(<one of the above>, b[N]) with a constant b, when the product has no other reader -> bias
//! Near misses left alone: non-constant weights, rank != 2 weights, a bias that is not [N], a gemm with
//! alpha or beta != 1 or transA, integer operands.
//! Postcondition: each matched product (with its bias add) is one `linear` node.

use crate::pattern::{args2, constant, either, producer, replace_root, simple_pass, transpose_2d};
use crate::registry::PassEntry;
use crate::{PassContext, PassError, PassOptions, PassOutcome};
use qcc_ir::{Graph, NodeId, Op, OpKind, Tensor, Value};
use std::collections::HashMap;

pub const ENTRY: PassEntry = PassEntry {
    name: "fuse-linear",
    description: "recognise matmul/gemm with a constant weight (and bias add) as linear(x, w[N,K], bias)",
    options: &[],
    build: |_: &PassOptions| Ok(Box::new(FuseLinear)),
};

pub struct FuseLinear;
simple_pass!(FuseLinear);

/// How the weight operand is found.
#[derive(Clone, Copy)]
enum Weight {
    /// A constant [K, N] that must be transposed.
    KN(Value),
    /// A value already laid out [N, K].
    NK(Value),
}

struct Match {
    x: Value,
    weight: Weight,
    bias: Option<Value>,
}

fn is_float_matrix(graph: &Graph, v: Value) -> bool {
    constant(graph, v).is_some_and(|t| t.dims.len() == 2 && t.dtype.is_float())
}

/// A product node (matmul or plain gemm) with a constant weight: (x, weight, gemm's C).
fn product(graph: &Graph, id: NodeId) -> Option<(Value, Weight, Option<Value>)> {
    let node = graph.node(id);
    match node.op.kind {
        OpKind::MatMul => {
            let (x, w) = args2(graph, id)?;
            if !graph.value_type(x).dtype.is_float() {
                return None;
            }
            if is_float_matrix(graph, w) {
                return Some((x, Weight::KN(w), None));
            }
            let t = producer(graph, w, OpKind::Transpose)?;
            let inner = graph.input(t, 0)?;
            let perm = graph.node(t).op.ints("perm").map(<[i64]>::to_vec).unwrap_or(vec![1, 0]);
            (perm == [1, 0] && is_float_matrix(graph, inner)).then_some((x, Weight::NK(inner), None))
        }
        OpKind::Gemm => {
            let op = &node.op;
            let one = |k: &str| op.float(k).unwrap_or(1.0) == 1.0;
            if !one("alpha") || !one("beta") || op.int("transA").unwrap_or(0) != 0 {
                return None;
            }
            let (x, w) = args2(graph, id)?;
            if !is_float_matrix(graph, w) {
                return None;
            }
            let weight = if op.int("transB").unwrap_or(0) != 0 { Weight::NK(w) } else { Weight::KN(w) };
            Some((x, weight, graph.input(id, 2)))
        }
        _ => None,
    }
}

fn out_features(graph: &Graph, w: Weight) -> Option<usize> {
    match w {
        Weight::KN(v) => constant(graph, v).map(|t| t.dims[1]),
        Weight::NK(v) => constant(graph, v).map(|t| t.dims[0]),
    }
}

fn is_bias(graph: &Graph, b: Value, n: usize) -> bool {
    constant(graph, b).is_some_and(|t| t.dims == [n] && t.dtype.is_float())
}

fn matcher(graph: &Graph, id: NodeId) -> Option<Match> {
    if graph.node(id).op.kind == OpKind::Add {
        let (a, b) = args2(graph, id)?;
        return either(a, b, |p, bias| {
            let (x, weight, c) = product(graph, p.node)?;
            // The product must feed only this add and carry no bias of its own.
            if p.port != 0
                || c.is_some()
                || graph.users(p).len() != 1
                || graph.graph_outputs().iter().any(|o| o.value == p)
            {
                return None;
            }
            is_bias(graph, bias, out_features(graph, weight)?).then_some(Match { x, weight, bias: Some(bias) })
        });
    }
    let (x, weight, c) = product(graph, id)?;
    // A product whose only reader is a fusable bias add is left for that add (visited later).
    let out = Value::new(id, 0);
    let n = out_features(graph, weight)?;
    if c.is_none() {
        if let [(user, _)] = graph.users(out)[..] {
            if graph.node(user).op.kind == OpKind::Add && !graph.graph_outputs().iter().any(|o| o.value == out) {
                if let Some((a, b)) = args2(graph, user) {
                    let other = if a == out { b } else { a };
                    if is_bias(graph, other, n) {
                        return None;
                    }
                }
            }
        }
    }
    if let Some(c) = c {
        if !is_bias(graph, c, n) {
            return None;
        }
    }
    Some(Match { x, weight, bias: c })
}

fn run(graph: &mut Graph, ctx: &mut PassContext) -> Result<PassOutcome, PassError> {
    // The [K, N] weights the products read, transposed on every core up front (a 7B model has 6.5 G
    // weights to move; one by one they took minutes).
    let mut ready: HashMap<Value, Tensor> = {
        use rayon::prelude::*;
        let mut kn: Vec<Value> = (graph.topo_order()?.into_iter())
            .filter_map(|id| match matcher(graph, id)?.weight {
                Weight::KN(v) => Some(v),
                Weight::NK(_) => None,
            })
            .collect();
        kn.sort_unstable();
        kn.dedup();
        let tensors: Vec<Option<Tensor>> = kn.par_iter().map(|&v| constant(graph, v).and_then(transpose_2d)).collect();
        kn.into_iter().zip(tensors).filter_map(|(v, t)| Some((v, t?))).collect()
    };
    // One transposed copy per [K, N] constant, however many products read it.
    let mut transposed: HashMap<Value, Value> = HashMap::new();
    crate::pattern::rewrite_each(graph, ctx, matcher, |g, id, m| {
        let w = match m.weight {
            Weight::NK(v) => v,
            Weight::KN(v) => match transposed.get(&v) {
                Some(&t) => t,
                None => {
                    let tensor =
                        ready.remove(&v).or_else(|| constant(g, v).and_then(transpose_2d)).ok_or_else(|| {
                            PassError::node(&g.node(v.node).name, OpKind::Constant, "cannot transpose the weight")
                        })?;
                    let preferred = format!("{}.nk", g.value_name(v));
                    let name = if g.value_by_name(&preferred).is_none() { preferred } else { g.fresh_name(&preferred) };
                    let t = g.add_constant(&name, tensor)?;
                    transposed.insert(v, t);
                    t
                }
            },
        };
        let mut inputs = vec![Some(m.x), Some(w)];
        if m.bias.is_some() {
            inputs.push(m.bias);
        }
        replace_root(g, Value::new(id, 0), Op::new(OpKind::Linear), &inputs)?;
        Ok(())
    })
}

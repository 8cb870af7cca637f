//! `fuse-attention`: recognises scaled dot-product attention with an additive mask and grouped KV heads
//! and replaces it by `attention(q, k, v, mask?) {scale, causal}`.
//!
//! Matches:
//!   matmul(softmax(matmul(q, transpose(K, [0,1,3,2])) * c + mask, axis=-1), V)
//! with the scale as `* c`, `c *`, `/ c` (c a constant scalar) or absent, the mask add optional, and K
//! and V either [B, Hkv, T, D] values or their grouped-query repetition
//! `reshape(expand(unsqueeze(X, [2]), [B, Hkv, r, T, D]), [B, Hkv*r, T, D])`, which is absorbed (the
//! fused op maps query head h to KV head h / r). The mask stays an input (`causal` = 0), except the
//! causal mask as exported decoders build it, which becomes the `causal` flag (the mask input dropped):
//!   unsqueeze(where(greater(unsqueeze(range(0, total, 1), [0]), unsqueeze(range(past, total, 1), [1])),
//!                   m, 0), [0, 1])   with m a constant scalar <= -1e30 (HF's finfo.min, or -inf)
//! Query row s sits at position past + s and sees keys t <= past + s = T - S + s, exactly the causal
//! flag's rows; the masked keys' exp underflows to 0 either way, so the outputs are the same values.
//! Near misses left alone: softmax over another axis, a transpose that is not of the last two axes, a
//! non-constant scale, K and V repeated by different factors, rank != 4 operands.
//! Postcondition: each attention core is one `attention` node reading the un-repeated K and V.

use crate::pattern::{
    args2, const_ints, const_scalar, either, is_last_axis, producer, rank, replace_root, rewrite_each, simple_pass,
};
use crate::registry::PassEntry;
use crate::{PassContext, PassError, PassOptions, PassOutcome};
use qcc_ir::{Attr, Graph, NodeId, Op, OpKind, Value};

pub const ENTRY: PassEntry = PassEntry {
    name: "fuse-attention",
    description: "recognise softmax(q k^T * scale + mask) v with grouped KV heads as attention",
    options: &[],
    build: |_: &PassOptions| Ok(Box::new(FuseAttention)),
};

pub struct FuseAttention;
simple_pass!(FuseAttention);

struct Match {
    q: Value,
    k: Value,
    v: Value,
    mask: Option<Value>,
    scale: f32,
}

fn known_dims(graph: &Graph, v: Value) -> Option<Vec<Option<u64>>> {
    Some(graph.value_type(v).shape.as_ref()?.0.iter().map(|d| d.known()).collect())
}

/// Undoes the grouped-query repetition: returns (X, r), or (v, 1) when `v` is not a repetition.
fn unrepeat(graph: &Graph, v: Value) -> Option<(Value, u64)> {
    if rank(graph, v)? != 4 {
        return None;
    }
    let Some(reshape) = producer(graph, v, OpKind::Reshape) else { return Some((v, 1)) };
    let inner = || -> Option<(Value, u64)> {
        let expand = producer(graph, graph.input(reshape, 0)?, OpKind::Expand)?;
        let unsq = producer(graph, graph.input(expand, 0)?, OpKind::Unsqueeze)?;
        let x = graph.input(unsq, 0)?;
        let axes = match graph.input(unsq, 1) {
            Some(a) => const_ints(graph, a)?,
            None => graph.node(unsq).op.ints("axes")?.to_vec(),
        };
        if axes != [2] || rank(graph, x)? != 4 {
            return None;
        }
        let e = known_dims(graph, Value::new(expand, 0))?;
        let (xd, out) = (known_dims(graph, x)?, known_dims(graph, v)?);
        let r = e.get(2).copied().flatten()?;
        let hkv = xd[1]?;
        // [B, Hkv, r, T, D] -> [B, Hkv*r, T, D]: head h of the result is head h / r of x.
        (e.len() == 5 && e[1] == Some(hkv) && out[1] == Some(hkv * r) && out[3] == xd[3]).then_some((x, r))
    };
    Some(inner().unwrap_or((v, 1)))
}

/// `scores * c`, `c * scores`, `scores / c` or `scores` -> (scores, scale).
fn unscale(graph: &Graph, v: Value) -> (Value, f32) {
    if let Some(m) = producer(graph, v, OpKind::Mul) {
        if let Some((a, b)) = args2(graph, m) {
            if let Some(r) = either(a, b, |s, c| const_scalar(graph, c).map(|c| (s, c as f32))) {
                return r;
            }
        }
    }
    if let Some(d) = producer(graph, v, OpKind::Div) {
        if let Some((s, c)) = args2(graph, d) {
            if let Some(c) = const_scalar(graph, c).filter(|c| *c != 0.0) {
                return (s, (1.0 / c) as f32);
            }
        }
    }
    (v, 1.0)
}

fn matcher(graph: &Graph, id: NodeId) -> Option<Match> {
    if graph.node(id).op.kind != OpKind::MatMul {
        return None;
    }
    let (probs, v_rep) = args2(graph, id)?;
    let softmax = producer(graph, probs, OpKind::Softmax)?;
    let logits = graph.input(softmax, 0)?;
    if !is_last_axis(&[graph.node(softmax).op.int("axis").unwrap_or(-1)], rank(graph, logits)?) {
        return None;
    }
    // Optional additive mask: the scores side is the one produced by a (scaled) matmul.
    let split = |v: Value| -> Option<(Value, f32, NodeId)> {
        let (s, scale) = unscale(graph, v);
        Some((s, scale, producer(graph, s, OpKind::MatMul)?))
    };
    let (scale, qk, mask) = match split(logits) {
        Some((_, scale, qk)) => (scale, qk, None),
        None => {
            let add = producer(graph, logits, OpKind::Add)?;
            let (a, b) = args2(graph, add)?;
            either(a, b, |s, m| split(s).map(|(_, scale, qk)| (scale, qk, Some(m))))?
        }
    };
    let (q, kt) = args2(graph, qk)?;
    let t = producer(graph, kt, OpKind::Transpose)?;
    if graph.node(t).op.ints("perm")? != [0, 1, 3, 2] {
        return None;
    }
    let (k, rk) = unrepeat(graph, graph.input(t, 0)?)?;
    let (v, rv) = unrepeat(graph, v_rep)?;
    if rk != rv || rank(graph, q)? != 4 || rank(graph, Value::new(id, 0))? != 4 {
        return None;
    }
    Some(Match { q, k, v, mask, scale })
}

/// `unsqueeze(x, axes)` with these axes (as an attribute or a constant input): x.
fn unsqueezed(graph: &Graph, v: Value, axes: &[i64]) -> Option<Value> {
    let n = producer(graph, v, OpKind::Unsqueeze)?;
    let got = match graph.input(n, 1) {
        Some(a) => const_ints(graph, a)?,
        None => graph.node(n).op.ints("axes")?.to_vec(),
    };
    if got != axes {
        return None;
    }
    graph.input(n, 0)
}

/// `range(start, limit, 1)`: (start, limit).
fn unit_range(graph: &Graph, v: Value) -> Option<(Value, Value)> {
    let n = producer(graph, v, OpKind::Range)?;
    (const_ints(graph, graph.input(n, 2)?)? == [1]).then_some((graph.input(n, 0)?, graph.input(n, 1)?))
}

/// Whether `mask` is the causal mask of the module docs (keys from 0, queries from `past`, both up to
/// the same total).
fn is_causal_mask(graph: &Graph, mask: Value) -> bool {
    let check = || -> Option<bool> {
        let m2 = unsqueezed(graph, mask, &[0, 1])?;
        let w = producer(graph, m2, OpKind::Where)?;
        let (cond, masked, open) = (graph.input(w, 0)?, graph.input(w, 1)?, graph.input(w, 2)?);
        if const_scalar(graph, masked)? > -1e30 || const_scalar(graph, open)? != 0.0 {
            return None;
        }
        let (keys, queries) = args2(graph, producer(graph, cond, OpKind::Greater)?)?;
        let (k0, k_total) = unit_range(graph, unsqueezed(graph, keys, &[0])?)?;
        let (_past, q_total) = unit_range(graph, unsqueezed(graph, queries, &[1])?)?;
        Some(const_ints(graph, k0)? == [0] && k_total == q_total)
    };
    check().unwrap_or(false)
}

fn run(graph: &mut Graph, ctx: &mut PassContext) -> Result<PassOutcome, PassError> {
    rewrite_each(graph, ctx, matcher, |g, id, m| {
        let causal = m.mask.is_some_and(|mask| is_causal_mask(g, mask));
        let op =
            Op::new(OpKind::Attention).with("scale", Attr::Float(m.scale)).with("causal", Attr::Int(causal as i64));
        let mut inputs = vec![Some(m.q), Some(m.k), Some(m.v)];
        if m.mask.is_some() && !causal {
            inputs.push(m.mask);
        }
        replace_root(g, Value::new(id, 0), op, &inputs)?;
        Ok(())
    })
}

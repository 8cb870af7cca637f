//! `fuse-rotary`: recognises rotary position embedding in the half-rotation (GPT-NeoX / Llama) form and
//! replaces it by `rotary(x, cos, sin)`.
//!
//! Matches (either operand order of add and mul):
//!   x * cos + concat(-x[.., D/2:], x[.., :D/2], axis=-1) * sin
//! where the halves are `slice`s of the same x along its last axis (step 1) and D is x's known last dim.
//! Near misses left alone: halves of a different x, a split that is not at D/2, the interleaved form
//! (even/odd lanes), a concat in the other order (that is the inverse rotation).
//! Postcondition: the matched add is one `rotary` node.

use crate::pattern::{
    args2, const_ints, dim, either, is_last_axis, producer, rank, replace_root, rewrite_each, simple_pass,
};
use crate::registry::PassEntry;
use crate::{PassContext, PassError, PassOptions, PassOutcome};
use qcc_ir::{Graph, NodeId, Op, OpKind, Value};

pub const ENTRY: PassEntry = PassEntry {
    name: "fuse-rotary",
    description: "recognise x*cos + rotate_half(x)*sin as rotary(x, cos, sin)",
    options: &[],
    build: |_: &PassOptions| Ok(Box::new(FuseRotary)),
};

pub struct FuseRotary;
simple_pass!(FuseRotary);

/// `slice(x, [start], [end], [last axis], [1]?)` -> (x, start, end) with negative bounds resolved.
fn last_axis_slice(graph: &Graph, v: Value) -> Option<(Value, i64, i64)> {
    let s = producer(graph, v, OpKind::Slice)?;
    let x = graph.input(s, 0)?;
    let (starts, ends) = (const_ints(graph, graph.input(s, 1)?)?, const_ints(graph, graph.input(s, 2)?)?);
    let r = rank(graph, x)?;
    let axes = match graph.input(s, 3) {
        Some(a) => const_ints(graph, a)?,
        None => vec![r as i64 - 1],
    };
    if let Some(steps) = graph.input(s, 4) {
        if const_ints(graph, steps)? != [1] {
            return None;
        }
    }
    if !is_last_axis(&axes, r) {
        return None;
    }
    let d = dim(graph, x, -1)? as i64;
    let (&[start], &[end]) = (&starts[..], &ends[..]) else { return None };
    let norm = |v: i64| (if v < 0 { v + d } else { v }).clamp(0, d);
    Some((x, norm(start), norm(end)))
}

/// `concat(-x[.., h:], x[.., :h], axis=-1)` -> x.
fn rotate_half_of(graph: &Graph, v: Value) -> Option<Value> {
    let c = producer(graph, v, OpKind::Concat)?;
    let (first, second) = args2(graph, c)?;
    if graph.node(c).num_inputs != 2 {
        return None;
    }
    let neg = producer(graph, first, OpKind::Neg)?;
    let (x1, s1, e1) = last_axis_slice(graph, graph.input(neg, 0)?)?;
    let (x2, s2, e2) = last_axis_slice(graph, second)?;
    let d = dim(graph, x1, -1)? as i64;
    let axis = graph.node(c).op.int("axis")?;
    let half = d / 2;
    let ok = x1 == x2
        && d % 2 == 0
        && is_last_axis(&[axis], rank(graph, x1)?)
        && (s1, e1) == (half, d)
        && (s2, e2) == (0, half);
    ok.then_some(x1)
}

fn matcher(graph: &Graph, id: NodeId) -> Option<(Value, Value, Value)> {
    if graph.node(id).op.kind != OpKind::Add {
        return None;
    }
    let (a, b) = args2(graph, id)?;
    let root_ty = graph.value_type(Value::new(id, 0));
    either(a, b, |cos_term, sin_term| {
        let (m1, m2) = (producer(graph, cos_term, OpKind::Mul)?, producer(graph, sin_term, OpKind::Mul)?);
        let (c1, c2) = args2(graph, m1)?;
        let (s1, s2) = args2(graph, m2)?;
        either(s1, s2, |rot, sin| {
            let x = rotate_half_of(graph, rot)?;
            let cos = if c1 == x {
                c2
            } else if c2 == x {
                c1
            } else {
                return None;
            };
            // cos/sin broadcast against x; the result keeps x's rank.
            (rank(graph, Value::new(id, 0)) == rank(graph, x) && graph.value_type(x).dtype == root_ty.dtype)
                .then_some((x, cos, sin))
        })
    })
}

fn run(graph: &mut Graph, ctx: &mut PassContext) -> Result<PassOutcome, PassError> {
    rewrite_each(graph, ctx, matcher, |g, id, (x, cos, sin)| {
        replace_root(g, Value::new(id, 0), Op::new(OpKind::Rotary), &[Some(x), Some(cos), Some(sin)])?;
        Ok(())
    })
}

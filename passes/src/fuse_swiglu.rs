//! `fuse-swiglu`: recognises the SiLU-gated product of a Llama MLP and replaces it by `swiglu`.
//!
//! Matches (either operand order): (gate * sigmoid(gate)) * up -> swiglu(gate, up).
//! Near misses left alone: sigmoid of a different value than the one it multiplies (x * sigmoid(y)), a
//! plain sigmoid gate without the multiplication by gate (GLU), a result type differing from gate's.
//! Postcondition: the product is one `swiglu` node; the MLP reads linear -> swiglu -> linear.

use crate::pattern::{args2, either, producer, replace_root, rewrite_each, simple_pass};
use crate::registry::PassEntry;
use crate::{PassContext, PassError, PassOptions, PassOutcome};
use qcc_ir::{Graph, NodeId, Op, OpKind, Value};

pub const ENTRY: PassEntry = PassEntry {
    name: "fuse-swiglu",
    description: "recognise silu(gate) * up as swiglu(gate, up)",
    options: &[],
    build: |_: &PassOptions| Ok(Box::new(FuseSwiglu)),
};

pub struct FuseSwiglu;
simple_pass!(FuseSwiglu);

/// `g * sigmoid(g)` -> g.
fn silu_of(graph: &Graph, v: Value) -> Option<Value> {
    let mul = producer(graph, v, OpKind::Mul)?;
    let (a, b) = args2(graph, mul)?;
    either(a, b, |g, s| {
        let sig = producer(graph, s, OpKind::Sigmoid)?;
        (graph.input(sig, 0)? == g).then_some(g)
    })
}

fn matcher(graph: &Graph, id: NodeId) -> Option<(Value, Value)> {
    if graph.node(id).op.kind != OpKind::Mul {
        return None;
    }
    let (a, b) = args2(graph, id)?;
    let root_ty = graph.value_type(Value::new(id, 0));
    either(a, b, |s, up| {
        let gate = silu_of(graph, s)?;
        (graph.value_type(gate) == root_ty).then_some((gate, up))
    })
}

fn run(graph: &mut Graph, ctx: &mut PassContext) -> Result<PassOutcome, PassError> {
    rewrite_each(graph, ctx, matcher, |g, id, (gate, up)| {
        replace_root(g, Value::new(id, 0), Op::new(OpKind::Swiglu), &[Some(gate), Some(up)])?;
        Ok(())
    })
}

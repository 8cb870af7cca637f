//! `eliminate-dead-code`: removes nodes none of whose outputs reach a graph output.
//!
//! Matches: every node that is not an ancestor of a graph output. Graph inputs are kept even when unused
//! (they are the model's interface). Nodes are removed consumers-first, one rewrite per node, so a rewrite
//! budget (bisection) leaves a valid graph at any cut.
//! Postcondition: every remaining non-input node is live.

use crate::pass::{Pass, PassContext, PassError, PassOptions, PassOutcome};
use crate::registry::PassEntry;
use qcc_ir::{Graph, OpKind};
use std::collections::HashSet;

pub const ENTRY: PassEntry = PassEntry {
    name: "eliminate-dead-code",
    description: "remove nodes whose outputs reach no graph output (graph inputs are kept)",
    options: &[],
    build: |_: &PassOptions| Ok(Box::new(EliminateDeadCode)),
};

pub struct EliminateDeadCode;

impl Pass for EliminateDeadCode {
    fn name(&self) -> &'static str {
        ENTRY.name
    }

    fn description(&self) -> &'static str {
        ENTRY.description
    }

    fn run(&self, graph: &mut Graph, ctx: &mut PassContext) -> Result<PassOutcome, PassError> {
        let live = live_nodes(graph);
        let order = graph.topo_order()?;
        let mut removed = 0;
        for id in order.into_iter().rev() {
            if live.contains(&id) || graph.node(id).op.kind == OpKind::Input {
                continue;
            }
            if !ctx.try_rewrite() {
                break;
            }
            graph.remove_node(id);
            removed += 1;
        }
        Ok(PassOutcome::rewrites(removed))
    }
}

/// Ancestors of the graph outputs (including the producers of the outputs themselves).
fn live_nodes(graph: &Graph) -> HashSet<qcc_ir::NodeId> {
    let mut live = HashSet::new();
    let mut stack: Vec<_> = graph.graph_outputs().iter().map(|o| o.value.node).collect();
    while let Some(id) = stack.pop() {
        if live.insert(id) {
            stack.extend(graph.inputs(id).into_iter().flatten().map(|v| v.node));
        }
    }
    live
}

#[cfg(test)]
mod tests {
    use super::*;
    use qcc_ir::{DType, Op, TensorType};

    fn ty() -> TensorType {
        TensorType::known(DType::F32, &[2])
    }

    #[test]
    fn removes_dead_chains_and_keeps_unused_inputs() {
        let mut g = Graph::new("t");
        let x = g.add_input("x", ty()).unwrap();
        let unused = g.add_input("unused", ty()).unwrap();
        let live = g.add_op(Op::new(OpKind::Neg), &[x], ty());
        let dead1 = g.add_op(Op::new(OpKind::Exp), &[x], ty());
        let _dead2 = g.add_op(Op::new(OpKind::Add), &[dead1, live], ty());
        g.add_output("y", live);
        let out = EliminateDeadCode.run(&mut g, &mut PassContext::new()).unwrap();
        assert_eq!(out, PassOutcome::rewrites(2));
        assert_eq!(g.node_count(), 3);
        assert!(g.contains(unused.node) && g.contains(live.node));
        // A second run finds nothing.
        assert_eq!(EliminateDeadCode.run(&mut g, &mut PassContext::new()).unwrap(), PassOutcome::unchanged());
    }

    #[test]
    fn budget_cuts_consumers_first() {
        let mut g = Graph::new("t");
        let x = g.add_input("x", ty()).unwrap();
        let d1 = g.add_op(Op::new(OpKind::Exp), &[x], ty());
        let d2 = g.add_op(Op::new(OpKind::Neg), &[d1], ty());
        g.add_output("y", x);
        let mut ctx = PassContext::new();
        ctx.set_rewrite_budget(Some(1));
        assert_eq!(EliminateDeadCode.run(&mut g, &mut ctx).unwrap().rewrites, 1);
        assert!(!g.contains(d2.node) && g.contains(d1.node));
        crate::verify::verify(&g).unwrap();
    }
}

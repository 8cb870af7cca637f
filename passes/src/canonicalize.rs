//! `canonicalize`: round-trips the graph through an e-graph to apply the algebraic, quantization and
//! constant-folding rules (`egraph::rules`) and extract the cheapest equivalent graph.
//!
//! Matches: anything the rules match (x*1, x+0, x-0, x/1, -(-x), transpose chains, reshape chains,
//! matmul of a transposed 2-D operand, quantize of dequantize with the same step) plus constant
//! subexpressions (results up to `fold-limit` elements) and common subexpressions (identical ops on the
//! same inputs merge). Runner limits come from the options; the stop reason is recorded as a pass note.
//! Postconditions: graph inputs and output names are kept; values keep their names where their class
//! survives; nodes not reaching an output are dropped. The graph is replaced only when something changed.
//! The whole pass is one rewrite for bisection (egg applies rules in bulk).

use crate::egraph::{rules::rules, GraphEGraph, RunLimits};
use crate::pass::{OptionKind, OptionSpec, Pass, PassContext, PassError, PassOptions, PassOutcome};
use crate::registry::PassEntry;
use qcc_ir::Graph;
use std::time::Duration;

pub const ENTRY: PassEntry = PassEntry {
    name: "canonicalize",
    description: "egg equality saturation: algebraic identities, q/dq folding, constant folding, CSE",
    options: &[
        OptionSpec { key: "iterations", kind: OptionKind::Int, default: "30", help: "runner iteration limit" },
        OptionSpec { key: "nodes", kind: OptionKind::Int, default: "500000", help: "runner e-node limit" },
        OptionSpec { key: "time-ms", kind: OptionKind::Int, default: "10000", help: "runner time limit" },
        OptionSpec { key: "fold-limit", kind: OptionKind::Int, default: "4096", help: "largest folded constant" },
    ],
    build: |o: &PassOptions| {
        Ok(Box::new(Canonicalize {
            limits: RunLimits {
                iterations: o.usize("iterations")?,
                nodes: o.usize("nodes")?,
                time: Duration::from_millis(o.usize("time-ms")? as u64),
            },
            fold_limit: o.usize("fold-limit")?,
        }))
    },
};

pub struct Canonicalize {
    pub limits: RunLimits,
    pub fold_limit: usize,
}

impl Default for Canonicalize {
    fn default() -> Canonicalize {
        Canonicalize { limits: RunLimits::default(), fold_limit: 4096 }
    }
}

impl Pass for Canonicalize {
    fn name(&self) -> &'static str {
        ENTRY.name
    }

    fn description(&self) -> &'static str {
        ENTRY.description
    }

    fn run(&self, graph: &mut Graph, ctx: &mut PassContext) -> Result<PassOutcome, PassError> {
        if !ctx.try_rewrite() {
            ctx.note("skipped: rewrite budget spent");
            return Ok(PassOutcome::unchanged());
        }
        let bridge = GraphEGraph::from_graph(graph, self.fold_limit).map_err(|e| PassError::Other(e.to_string()))?;
        let folds_while_building = bridge.folds();
        let (bridge, report) = bridge.saturate(&rules(), self.limits);
        ctx.note(report.summary());
        let rebuilt = bridge.to_graph().map_err(|e| PassError::Other(e.to_string()))?;
        let rewrites = report.total_applied() + folds_while_building + report.folds;
        if rewrites == 0 && rebuilt.node_count() == graph.node_count() {
            return Ok(PassOutcome::unchanged());
        }
        // Merged duplicates and dropped dead nodes count as changes even without rule applications.
        let rewrites = rewrites.max(1);
        *graph = rebuilt;
        Ok(PassOutcome { changed: true, rewrites })
    }
}

//! The bridge between the IR graph and an egg e-graph.
//!
//! `GraphEGraph::from_graph` adds every node (in topological order, so shared subgraphs are added once
//! and many outputs are just many root classes), records each class's type from the graph and the
//! original value and node names; `saturate` runs the rules with iteration, node and time limits and
//! reports why it stopped; `to_graph` (in `extract`) extracts the cheapest term per output and rebuilds
//! a graph, keeping graph inputs (even unused ones), output names and, where possible, value names.

pub mod analysis;
pub mod extract;
pub mod language;
pub mod rules;

use analysis::{QccAnalysis, QccEGraph};
use egg::{Id, Runner, StopReason};
use language::QccLang;
use qcc_ir::{Graph, GraphError, OpKind, Value};
use rules::QccRewrite;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error("node '{node}' ({op}): {message}")]
    Node { node: String, op: &'static str, message: String },
    #[error("cannot rebuild the graph: {0}")]
    Rebuild(String),
}

/// Limits every saturation run sets (egg's defaults are not relied upon).
#[derive(Clone, Copy, Debug)]
pub struct RunLimits {
    pub iterations: usize,
    pub nodes: usize,
    pub time: Duration,
}

impl Default for RunLimits {
    fn default() -> RunLimits {
        RunLimits { iterations: 30, nodes: 500_000, time: Duration::from_secs(10) }
    }
}

/// What a saturation run did.
#[derive(Clone, Debug)]
pub struct RunReport {
    pub stop_reason: StopReason,
    pub iterations: usize,
    /// Successful applications per rule name.
    pub applied: BTreeMap<String, usize>,
    pub egraph_nodes: usize,
    pub egraph_classes: usize,
    /// Classes that received a folded constant.
    pub folds: usize,
}

impl RunReport {
    pub fn total_applied(&self) -> usize {
        self.applied.values().sum()
    }

    /// A one-line summary for pass notes: stop reason, iterations, sizes and rule counts.
    pub fn summary(&self) -> String {
        let reason = match &self.stop_reason {
            StopReason::Saturated => "saturated".to_string(),
            StopReason::IterationLimit(n) => format!("iteration limit ({n})"),
            StopReason::NodeLimit(n) => format!("node limit ({n})"),
            StopReason::TimeLimit(s) => format!("time limit ({s:.1}s)"),
            StopReason::Other(s) => s.clone(),
        };
        let rules: Vec<String> = self.applied.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!(
            "egg: {reason} after {} iterations, {} e-nodes in {} classes, {} folds; rules: {}",
            self.iterations,
            self.egraph_nodes,
            self.egraph_classes,
            self.folds,
            if rules.is_empty() { "none".to_string() } else { rules.join(" ") }
        )
    }
}

/// An e-graph built from a graph, with what is needed to rebuild one.
pub struct GraphEGraph {
    pub egraph: QccEGraph,
    graph_name: String,
    /// Graph outputs: name and class.
    outputs: Vec<(String, Id)>,
    /// Original (value name, node name) per class, in graph order (classes as added, canonicalise first).
    names: Vec<(Id, String, String)>,
}

impl GraphEGraph {
    /// Adds every node of `graph`. Constants up to `fold_limit` elements take part in constant folding.
    pub fn from_graph(graph: &Graph, fold_limit: usize) -> Result<GraphEGraph, BridgeError> {
        let mut egraph = QccEGraph::new(QccAnalysis::new(fold_limit));
        let absent = egraph.add(QccLang::Absent);
        let input_index: HashMap<_, usize> = graph.graph_inputs().iter().enumerate().map(|(i, &n)| (n, i)).collect();
        let mut class_of: HashMap<Value, Id> = HashMap::new();
        let mut names = Vec::new();
        for id in graph.topo_order()? {
            let node = graph.node(id);
            let kind = node.op.kind;
            let err =
                |message: &str| BridgeError::Node { node: node.name.clone(), op: kind.name(), message: message.into() };
            let mut port_classes = Vec::with_capacity(node.outputs.len());
            match kind {
                OpKind::Input => {
                    let index = *input_index.get(&id).ok_or_else(|| err("input node is not a graph input"))?;
                    let out = &node.outputs[0];
                    let leaf = egraph.analysis.add_input(index, &out.name, out.ty.clone());
                    port_classes.push(egraph.add(QccLang::Leaf(leaf)));
                }
                OpKind::Constant if node.op.tensor("value").is_some() => {
                    let tensor = node.op.tensor("value").cloned().ok_or_else(|| err("constant without value"))?;
                    let leaf = egraph.analysis.add_constant(tensor, Some(node.outputs[0].name.clone()));
                    port_classes.push(egraph.add(QccLang::Leaf(leaf)));
                }
                _ => {
                    let mut children = Vec::with_capacity(node.num_inputs + 1);
                    for slot in graph.inputs(id) {
                        children.push(match slot {
                            Some(v) => *class_of.get(&v).ok_or_else(|| err("input not added before its reader"))?,
                            None => absent,
                        });
                    }
                    let structural =
                        QccLang::structural_slots(kind).filter(|&s| node.outputs.len() == 1 && children.len() <= s);
                    if let Some(slots) = structural {
                        children.resize(slots, absent);
                        let attrs = egraph.analysis.intern_attrs(&node.op.attrs);
                        children.push(egraph.add(QccLang::Attrs(attrs)));
                        let enode =
                            QccLang::structural(kind, &children).ok_or_else(|| err("structural arity mismatch"))?;
                        port_classes.push(egraph.add(enode));
                    } else {
                        let types: Vec<_> = node.outputs.iter().map(|o| o.ty.clone()).collect();
                        for r in egraph.analysis.add_opaque_node(&node.op, &types, &node.name) {
                            port_classes.push(egraph.add(QccLang::Opaque(r, children.clone())));
                        }
                    }
                }
            }
            for (port, (class, out)) in port_classes.into_iter().zip(&node.outputs).enumerate() {
                let class = egraph.find(class);
                // The graph's type is authoritative for values that exist in it.
                let data = &mut egraph[class].data;
                if out.ty.shape.is_some() || data.ty.is_none() {
                    data.ty = Some(out.ty.clone());
                }
                class_of.insert(Value::new(id, port as u32), class);
                names.push((class, out.name.clone(), node.name.clone()));
            }
        }
        egraph.rebuild();
        let outputs = graph
            .graph_outputs()
            .iter()
            .map(|o| class_of.get(&o.value).map(|&c| (o.name.clone(), c)))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| BridgeError::Rebuild("a graph output refers to a missing value".into()))?;
        Ok(GraphEGraph { egraph, graph_name: graph.name.clone(), outputs, names })
    }

    /// Runs `rules` to saturation or to a limit.
    pub fn saturate(self, rules: &[QccRewrite], limits: RunLimits) -> (GraphEGraph, RunReport) {
        let GraphEGraph { egraph, graph_name, outputs, names } = self;
        let folds_before = egraph.analysis.folds;
        let runner: Runner<QccLang, QccAnalysis, ()> = Runner::new(QccAnalysis::new(0))
            .with_egraph(egraph)
            .with_iter_limit(limits.iterations)
            .with_node_limit(limits.nodes)
            .with_time_limit(limits.time)
            .run(rules);
        let mut applied = BTreeMap::new();
        for it in &runner.iterations {
            for (rule, n) in &it.applied {
                *applied.entry(rule.to_string()).or_insert(0) += n;
            }
        }
        let egraph = runner.egraph;
        let report = RunReport {
            stop_reason: runner.stop_reason.unwrap_or(StopReason::Other("runner did not run".into())),
            iterations: runner.iterations.len(),
            applied,
            egraph_nodes: egraph.total_number_of_nodes(),
            egraph_classes: egraph.number_of_classes(),
            folds: egraph.analysis.folds - folds_before,
        };
        (GraphEGraph { egraph, graph_name, outputs, names }, report)
    }

    /// Total number of constant folds done by the analysis so far (including while building).
    pub fn folds(&self) -> usize {
        self.egraph.analysis.folds
    }

    /// The class of a graph output, by name.
    pub fn output_class(&self, name: &str) -> Option<Id> {
        self.outputs.iter().find(|(n, _)| n == name).map(|&(_, c)| self.egraph.find(c))
    }
}

#[cfg(test)]
mod tests;

//! The verifier: structural and type invariants every pass must preserve. It reports every problem it
//! finds (not just the first), each naming the node and op.
//!
//! Checked: the graph is acyclic; every edge's ports are in range and no input slot is fed twice; input
//! and output counts match [`OpKind::arity`] and required inputs are present; graph inputs are input nodes
//! and graph outputs name existing values; value names are unique and non-empty; each node's declared
//! output types agree with what [`crate::infer`] derives from its inputs (which enforces the dtype rules:
//! elementwise operands share a dtype, comparisons give bool, `int_linear` takes i4/i8/u4/u8 operands and
//! an f32 scale, `quantize` targets an integer or fp8 type, ...); constants hold data of the right length.

use crate::infer::{infer_node_types, infer_types, merge_types, InferError};
use crate::{Attr, Graph, NodeId, OpKind, TensorData};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use std::collections::{HashMap, HashSet};
use std::fmt;

/// One problem found by the verifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyIssue {
    /// The node's name (or its first output's name when the node is unnamed); empty for graph-level issues.
    pub node: String,
    pub op: &'static str,
    pub message: String,
}

impl fmt::Display for VerifyIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.op.is_empty() {
            write!(f, "graph: {}", self.message)
        } else {
            write!(f, "node '{}' ({}): {}", self.node, self.op, self.message)
        }
    }
}

/// Every problem the verifier found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct VerifyError {
    pub issues: Vec<VerifyIssue>,
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "verification failed with {} problem(s):", self.issues.len())?;
        for issue in &self.issues {
            write!(f, "\n  {issue}")?;
        }
        Ok(())
    }
}

struct Report<'g> {
    graph: &'g Graph,
    issues: Vec<VerifyIssue>,
}

impl Report<'_> {
    fn node(&mut self, id: NodeId, message: impl Into<String>) {
        let node = self.graph.node(id);
        let name = if node.name.is_empty() {
            node.outputs.first().map(|o| o.name.clone()).unwrap_or_default()
        } else {
            node.name.clone()
        };
        self.issues.push(VerifyIssue { node: name, op: node.op.kind.name(), message: message.into() });
    }

    fn graph(&mut self, message: impl Into<String>) {
        self.issues.push(VerifyIssue { node: String::new(), op: "", message: message.into() });
    }

    fn infer(&mut self, err: InferError) {
        let issue = match err {
            InferError::Node { node, op, message } => VerifyIssue { node, op, message },
            InferError::Graph(e) => VerifyIssue { node: String::new(), op: "", message: e.to_string() },
        };
        if !self.issues.contains(&issue) {
            self.issues.push(issue);
        }
    }
}

/// Checks the graph's invariants (see the module docs), returning every problem found.
pub fn verify(graph: &Graph) -> Result<(), VerifyError> {
    let mut report = Report { graph, issues: Vec::new() };
    let wired = check_structure(&mut report);
    let acyclic = match graph.topo_order() {
        Ok(_) => true,
        Err(e) => {
            report.graph(e.to_string());
            false
        }
    };
    check_constants(&mut report);
    if acyclic {
        check_types(&mut report, &wired);
    }
    if report.issues.is_empty() {
        Ok(())
    } else {
        Err(VerifyError { issues: report.issues })
    }
}

/// Ports, arity, names, graph inputs and outputs. Returns the nodes whose wiring is sound enough to infer.
fn check_structure(report: &mut Report<'_>) -> HashSet<NodeId> {
    let graph = report.graph;
    let mut wired = HashSet::new();
    let mut names: HashMap<&str, (NodeId, usize)> = HashMap::new();
    for id in graph.node_ids() {
        let node = graph.node(id);
        let mut sound = true;
        let mut fed = vec![false; node.num_inputs];
        for e in graph.petgraph().edges_directed(id, Direction::Incoming) {
            let (dst, src) = (e.weight().dst_port as usize, e.weight().src_port as usize);
            let source_outputs = graph.node(e.source()).outputs.len();
            if dst >= node.num_inputs {
                report.node(id, format!("an edge feeds input {dst} but the node has {} input slots", node.num_inputs));
                sound = false;
            } else if std::mem::replace(&mut fed[dst], true) {
                report.node(id, format!("input {dst} is fed by more than one edge"));
                sound = false;
            }
            if src >= source_outputs {
                report.node(id, format!("input {dst} reads output {src} of a node with {source_outputs} outputs"));
                sound = false;
            }
        }
        let arity = node.op.kind.arity();
        if node.num_inputs < arity.min_inputs || node.num_inputs > arity.max_inputs {
            let max = if arity.max_inputs == usize::MAX { "any".to_string() } else { arity.max_inputs.to_string() };
            report.node(id, format!("has {} inputs, expected {} to {max}", node.num_inputs, arity.min_inputs));
            sound = false;
        }
        for (port, fed) in fed.iter().enumerate().take(arity.min_inputs) {
            if !fed {
                report.node(id, format!("required input {port} is absent"));
                sound = false;
            }
        }
        match arity.outputs {
            Some(n) if node.outputs.len() != n => {
                report.node(id, format!("has {} outputs, expected {n}", node.outputs.len()));
                sound = false;
            }
            None if node.outputs.is_empty() => {
                report.node(id, "has no outputs");
                sound = false;
            }
            _ => {}
        }
        for (port, out) in node.outputs.iter().enumerate() {
            if out.name.is_empty() {
                report.node(id, format!("output {port} has an empty name"));
            } else if let Some(&(other, _)) = names.get(out.name.as_str()) {
                let other = graph.node(other).name.clone();
                report.node(id, format!("value name '{}' is also defined by node '{other}'", out.name));
            } else {
                names.insert(&out.name, (id, port));
            }
            if graph.value_by_name(&out.name) != Some(crate::Value::new(id, port as u32)) {
                report.node(id, format!("value '{}' is missing from the graph's name table", out.name));
            }
        }
        if node.op.kind == OpKind::Input && !graph.graph_inputs().contains(&id) {
            report.node(id, "input node is not one of the graph's inputs");
        }
        if sound {
            wired.insert(id);
        }
    }
    for &id in graph.graph_inputs() {
        if !graph.contains(id) {
            report.graph(format!("graph input {id:?} does not exist"));
        } else if graph.node(id).op.kind != OpKind::Input {
            report.node(id, "is listed as a graph input but is not an input node");
        }
    }
    let mut output_names = HashSet::new();
    for out in graph.graph_outputs() {
        let exists =
            graph.contains(out.value.node) && (out.value.port as usize) < graph.node(out.value.node).outputs.len();
        if !exists {
            report.graph(format!("graph output '{}' refers to a value that does not exist", out.name));
        }
        if !output_names.insert(out.name.as_str()) {
            report.graph(format!("graph output name '{}' is used twice", out.name));
        }
    }
    wired
}

fn check_constants(report: &mut Report<'_>) {
    let graph = report.graph;
    for id in graph.node_ids() {
        let node = graph.node(id);
        if node.op.kind == OpKind::Constant && node.op.tensor("value").is_none() {
            report.node(id, "has no tensor attribute 'value'");
        }
        for (name, attr) in &node.op.attrs {
            if let Attr::Tensor(t) = attr {
                if let TensorData::Bytes(b) = &t.data {
                    let expected = t
                        .dims
                        .iter()
                        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                        .and_then(|n| n.checked_mul(t.dtype.bits()))
                        .map(|bits| bits.div_ceil(8));
                    if expected != Some(b.len()) {
                        report.node(
                            id,
                            format!(
                                "tensor attribute '{name}' of type {}{:?} holds {} bytes",
                                t.dtype,
                                t.dims,
                                b.len()
                            ),
                        );
                    }
                }
            }
        }
    }
}

/// Declared types against types re-inferred from each node's inputs, then a whole-graph inference on a
/// clone (which also sees through shape arithmetic).
fn check_types(report: &mut Report<'_>, wired: &HashSet<NodeId>) {
    let graph = report.graph;
    let Ok(order) = graph.topo_order() else { return };
    let mut all_wired = true;
    for id in order {
        if !wired.contains(&id) {
            all_wired = false;
            continue;
        }
        let node = graph.node(id);
        match infer_node_types(graph, id) {
            Ok(types) => {
                for (out, inferred) in node.outputs.iter().zip(types) {
                    if out.ty.dtype != inferred.dtype {
                        report.node(id, format!("output '{}' is declared {} but is {}", out.name, out.ty, inferred));
                    } else if let Err(m) = merge_types(&out.ty, inferred) {
                        report.node(id, format!("output '{}' is declared {} but {m}", out.name, out.ty));
                    }
                }
            }
            Err(e) => report.infer(e),
        }
    }
    if all_wired {
        let mut clone = graph.clone();
        if let Err(e) = infer_types(&mut clone) {
            report.infer(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DType, Op, Shape, Tensor, TensorType, Value, ValueInfo};
    use bytes::Bytes;

    fn f32_ty(dims: &[usize]) -> TensorType {
        TensorType::known(DType::F32, dims)
    }

    fn good_graph() -> Graph {
        let mut g = Graph::new("g");
        let x = g.add_input("x", TensorType::new(DType::F32, Shape(vec![crate::Dim::sym("t"), 4u64.into()]))).unwrap();
        let w = g.add_constant("w", Tensor::from_slice(vec![4], &[1f32, 2.0, 3.0, 4.0])).unwrap();
        let y = g.add_op(
            Op::new(OpKind::Mul),
            &[x, w],
            TensorType::new(DType::F32, Shape(vec![crate::Dim::sym("t"), 4u64.into()])),
        );
        g.add_output("y", y);
        g
    }

    #[test]
    fn accepts_a_well_formed_graph() {
        verify(&good_graph()).unwrap();
    }

    #[test]
    fn reports_every_problem_with_node_names() {
        let mut g = good_graph();
        let x = g.value_by_name("x").unwrap();
        // Wrong dtype combination: f32 + i64.
        let idx = g.add_constant("idx", Tensor::from_slice(vec![4], &[0i64, 1, 2, 3])).unwrap();
        g.add_node("bad_add", Op::new(OpKind::Add), &[Some(x), Some(idx)], vec![ValueInfo::new("s", f32_ty(&[4]))])
            .unwrap();
        // Comparison declared as f32 instead of bool.
        g.add_node("cmp", Op::new(OpKind::Less), &[Some(x), Some(x)], vec![ValueInfo::new("c", f32_ty(&[4]))]).unwrap();
        // Missing required input and wrong output count.
        g.add_node("lonely", Op::new(OpKind::MatMul), &[Some(x), None], vec![]).unwrap();
        // Constant whose bytes do not fit its type.
        let bad = Tensor { dtype: DType::F32, dims: vec![3], data: TensorData::Bytes(Bytes::from(vec![0u8; 8])) };
        let op = Op::new(OpKind::Constant).with("value", Attr::Tensor(bad));
        g.add_node("short", op, &[], vec![ValueInfo::new("short", f32_ty(&[3]))]).unwrap();
        // int_linear fed i64 activations.
        let ids = g.add_input("ids", TensorType::known(DType::I64, &[1, 4])).unwrap();
        let w = g.add_constant("qw", Tensor::from_slice(vec![2, 4], &[1i8; 8])).unwrap();
        let s = g.add_constant("qs", Tensor::from_slice(vec![2], &[1f32; 2])).unwrap();
        g.add_node(
            "lin",
            Op::new(OpKind::IntLinear),
            &[Some(ids), Some(w), Some(s)],
            vec![ValueInfo::new("lin_out", f32_ty(&[1, 2]))],
        )
        .unwrap();
        // A graph output pointing at a port that does not exist.
        g.add_output("ghost", Value::new(x.node, 3));
        let err = verify(&g).unwrap_err();
        let text = err.to_string();
        for needle in [
            "node 'bad_add' (add): input 1 is i64 but input 0 is f32",
            "node 'cmp' (less): output 'c' is declared f32[4] but is bool",
            "node 'lonely' (matmul): required input 1 is absent",
            "node 'lonely' (matmul): has 0 outputs, expected 1",
            "node 'short' (constant): tensor attribute 'value' of type f32[3] holds 8 bytes",
            "node 'lin' (int_linear): activation must be i4/i8/i16/u4/u8/f8e4m3 or float, not i64",
            "graph output 'ghost'",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
    }

    #[test]
    fn shape_mismatch_and_cycles() {
        let mut g = good_graph();
        let y = g.value_by_name("mul0").or_else(|| g.graph_outputs().first().map(|o| o.value)).unwrap();
        g.set_value_type(y, f32_ty(&[2, 5]));
        let text = verify(&g).unwrap_err().to_string();
        assert!(text.contains("declared f32[2,5]"), "{text}");

        let mut g = good_graph();
        let y = g.graph_outputs()[0].value;
        let n = g.add_op(Op::new(OpKind::Neg), &[y], f32_ty(&[2, 4]));
        g.set_input(y.node, 0, Some(n));
        let text = verify(&g).unwrap_err().to_string();
        assert!(text.contains("cycle"), "{text}");
    }
}

//! `fold-constants`: replaces nodes whose inputs are all constants by constants.
//!
//! Matches: any node (not `input`/`constant`) whose present inputs are all `constant` nodes, plus `shape`
//! and `size` of any value whose static shape is fully known. Values are computed by `const_eval` with
//! ONNX semantics; ops it does not cover stay. Only results of at most `max-elements` elements are
//! folded (weights are not duplicated). A folded result whose dtype differs from the node's declared
//! output type is left alone (noted), so folding never changes types.
//! Postcondition: folded nodes are gone; their former inputs may be dead (run `eliminate-dead-code`).

use crate::const_eval::evaluate;
use crate::pass::{OptionKind, OptionSpec, Pass, PassContext, PassError, PassOptions, PassOutcome};
use crate::registry::PassEntry;
use qcc_ir::{Graph, NodeId, OpKind, Tensor, Value};

pub const ENTRY: PassEntry = PassEntry {
    name: "fold-constants",
    description: "evaluate nodes whose inputs are all constants (results up to max-elements)",
    options: &[OptionSpec {
        key: "max-elements",
        kind: OptionKind::Int,
        default: "65536",
        help: "largest result (in elements) that is folded",
    }],
    build: |o: &PassOptions| Ok(Box::new(FoldConstants { max_elements: o.usize("max-elements")? })),
};

pub struct FoldConstants {
    pub max_elements: usize,
}

impl Pass for FoldConstants {
    fn name(&self) -> &'static str {
        ENTRY.name
    }

    fn description(&self) -> &'static str {
        ENTRY.description
    }

    fn run(&self, graph: &mut Graph, ctx: &mut PassContext) -> Result<PassOutcome, PassError> {
        let mut folded = 0;
        // Topological order lets a folded result feed the next fold in the same run.
        for id in graph.topo_order()? {
            let Some(results) = self.try_fold(graph, id)? else { continue };
            let node = graph.node(id);
            if let Some((port, _)) = results.iter().enumerate().find(|(p, t)| node.outputs[*p].ty.dtype != t.dtype) {
                ctx.note(format!(
                    "not folding '{}' ({}): result is {} but output {port} is declared {}",
                    node.name, node.op.kind, results[port].dtype, node.outputs[port].ty.dtype
                ));
                continue;
            }
            if !ctx.try_rewrite() {
                break;
            }
            replace_with_constants(graph, id, results)?;
            folded += 1;
        }
        Ok(PassOutcome::rewrites(folded))
    }
}

impl FoldConstants {
    fn try_fold(&self, graph: &Graph, id: NodeId) -> Result<Option<Vec<Tensor>>, PassError> {
        let node = graph.node(id);
        let kind = node.op.kind;
        if matches!(kind, OpKind::Input | OpKind::Constant) {
            return Ok(None);
        }
        let slots = graph.inputs(id);
        let needs_values = !matches!(kind, OpKind::Shape | OpKind::Size);
        let mut values = Vec::with_capacity(slots.len());
        let mut shapes = Vec::with_capacity(slots.len());
        for slot in &slots {
            let Some(v) = slot else {
                values.push(None);
                shapes.push(None);
                continue;
            };
            let constant = graph.constant(*v);
            if needs_values && constant.is_none() {
                return Ok(None);
            }
            if constant.is_some_and(|t| t.bytes().is_err()) {
                return Ok(None); // elided data: nothing to compute with
            }
            values.push(constant.cloned());
            shapes.push(graph.value_type(*v).shape.as_ref().and_then(|s| s.as_known()));
        }
        // Cheap size check from the declared output types before computing anything.
        for out in &node.outputs {
            if let Some(dims) = out.ty.shape.as_ref().and_then(|s| s.as_known()) {
                if dims.iter().product::<usize>() > self.max_elements {
                    return Ok(None);
                }
            }
        }
        let results = match evaluate(&node.op, &values, &shapes) {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(None),
            Err(e) => return Err(PassError::node(&node.name, kind, format!("cannot evaluate on constants: {e}"))),
        };
        if results.len() != node.outputs.len() || results.iter().any(|t| t.numel() > self.max_elements) {
            return Ok(None);
        }
        Ok(Some(results))
    }
}

/// Replaces node `id` by one constant per output, keeping the output names (so printed IR and graph
/// outputs keep their names).
pub(crate) fn replace_with_constants(graph: &mut Graph, id: NodeId, results: Vec<Tensor>) -> Result<(), PassError> {
    let names: Vec<String> = graph.node(id).outputs.iter().map(|o| o.name.clone()).collect();
    let node_name = graph.node(id).name.clone();
    let readers: Vec<Vec<(NodeId, usize)>> = (0..names.len()).map(|p| graph.users(Value::new(id, p as u32))).collect();
    let output_slots: Vec<(usize, u32)> = graph
        .graph_outputs()
        .iter()
        .enumerate()
        .filter(|(_, o)| o.value.node == id)
        .map(|(i, o)| (i, o.value.port))
        .collect();
    graph.remove_node(id);
    let mut new_values = Vec::with_capacity(names.len());
    for (name, tensor) in names.iter().zip(results) {
        let v = graph.add_constant(name, tensor)?;
        if !node_name.is_empty() && node_name != *name {
            // Keep the producer's node name for error messages; value names are what printing uses.
            graph.node_mut(v.node).name = node_name.clone();
        }
        new_values.push(v);
    }
    for (port, users) in readers.into_iter().enumerate() {
        for (user, slot) in users {
            graph.set_input(user, slot, Some(new_values[port]));
        }
    }
    for (i, port) in output_slots {
        graph.graph_outputs_mut()[i].value = new_values[port as usize];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use qcc_ir::{Attr, DType, Dim, Op, Shape, TensorType};

    #[test]
    fn folds_shape_arithmetic_chains_and_keeps_names() {
        let mut g = Graph::new("t");
        let x = g.add_input("x", TensorType::new(DType::F32, Shape(vec![Dim::sym("b"), Dim::Known(8)]))).unwrap();
        let w = g.add_constant("w", Tensor::from_slice(vec![8], &[1f32; 8])).unwrap();
        // shape(w) is static; shape(x) is not (symbolic batch).
        let sw = g.add_op(Op::new(OpKind::Shape), &[w], TensorType::known(DType::I64, &[1]));
        let sx = g.add_op(Op::new(OpKind::Shape), &[x], TensorType::known(DType::I64, &[2]));
        let two = g.add_constant("two", Tensor::scalar(2i64)).unwrap();
        let m = g.add_op(Op::new(OpKind::Mul), &[sw, two], TensorType::known(DType::I64, &[1]));
        g.add_output("m", m);
        g.add_output("sx", sx);
        let m_name = g.value_name(m).to_string();
        let out = FoldConstants { max_elements: 16 }.run(&mut g, &mut PassContext::new()).unwrap();
        assert_eq!(out.rewrites, 2); // shape(w), then mul
        let m2 = g.graph_outputs()[0].value;
        assert_eq!(g.value_name(m2), m_name);
        assert_eq!(g.constant(m2).unwrap().to_vec::<i64>().unwrap(), vec![16]);
        assert_eq!(g.node(g.graph_outputs()[1].value.node).op.kind, OpKind::Shape);
        crate::verify::verify(&g).unwrap();
    }

    #[test]
    fn respects_size_limit_and_declared_dtype() {
        let mut g = Graph::new("t");
        let a = g.add_constant("a", Tensor::from_slice(vec![4], &[1f32, 2., 3., 4.])).unwrap();
        let big = g.add_op(Op::new(OpKind::Neg), &[a], TensorType::known(DType::F32, &[4]));
        // Declared f16 but the computation yields f32: must not be folded silently.
        let wrong = g.add_op(Op::new(OpKind::Exp), &[a], TensorType::known(DType::F16, &[4]));
        g.add_output("big", big);
        g.add_output("wrong", wrong);
        let mut ctx = PassContext::new();
        let out = FoldConstants { max_elements: 3 }.run(&mut g, &mut ctx).unwrap();
        assert_eq!(out, PassOutcome::unchanged());
        let out = FoldConstants { max_elements: 4 }.run(&mut g, &mut ctx).unwrap();
        assert_eq!(out.rewrites, 1);
        assert!(ctx.take_notes().iter().any(|n| n.contains("declared f16")));
        let cast = g.add_op(
            Op::new(OpKind::Cast).with("to", Attr::DType(DType::F16)),
            &[a],
            TensorType::known(DType::F16, &[4]),
        );
        g.add_output("cast", cast);
        assert_eq!(FoldConstants { max_elements: 4 }.run(&mut g, &mut ctx).unwrap().rewrites, 1);
    }
}

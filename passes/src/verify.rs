//! The verifier the pass manager runs after every pass.
//!
//! This is a local stand-in until `qcc_ir::verify::verify` lands in ir-dialect: it checks what passes
//! most often break (cycles, arity, absent required inputs, dangling graph outputs). The pass manager
//! only calls [`verify`], so swapping in the real verifier is a one-line change here.

use qcc_ir::{Graph, GraphError, Value};

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error("node '{node}' ({op}) has {actual} input slots; {op} takes {min}..={max}")]
    Arity { node: String, op: &'static str, actual: usize, min: usize, max: String },
    #[error("node '{node}' ({op}) is missing required input {port}")]
    MissingInput { node: String, op: &'static str, port: usize },
    #[error("node '{node}' ({op}) reads output {port} of '{producer}', which has only {count} outputs")]
    BadPort { node: String, op: &'static str, producer: String, port: u32, count: usize },
    #[error("graph output '{output}' refers to a value that does not exist")]
    DanglingOutput { output: String },
}

/// Checks the structural invariants of `graph`.
pub fn verify(graph: &Graph) -> Result<(), VerifyError> {
    graph.topo_order()?;
    for id in graph.node_ids() {
        let node = graph.node(id);
        let kind = node.op.kind;
        let arity = kind.arity();
        if node.num_inputs < arity.min_inputs || node.num_inputs > arity.max_inputs {
            let max = if arity.max_inputs == usize::MAX { "*".to_string() } else { arity.max_inputs.to_string() };
            return Err(VerifyError::Arity {
                node: node.name.clone(),
                op: kind.name(),
                actual: node.num_inputs,
                min: arity.min_inputs,
                max,
            });
        }
        for (port, input) in graph.inputs(id).into_iter().enumerate() {
            match input {
                None if port < arity.min_inputs => {
                    return Err(VerifyError::MissingInput { node: node.name.clone(), op: kind.name(), port })
                }
                None => {}
                Some(v) => check_value(graph, v, &node.name, kind.name())?,
            }
        }
    }
    for out in graph.graph_outputs() {
        if !graph.contains(out.value.node) || out.value.port as usize >= graph.node(out.value.node).outputs.len() {
            return Err(VerifyError::DanglingOutput { output: out.name.clone() });
        }
    }
    Ok(())
}

fn check_value(graph: &Graph, v: Value, node: &str, op: &'static str) -> Result<(), VerifyError> {
    let producer = graph.node(v.node);
    if v.port as usize >= producer.outputs.len() {
        return Err(VerifyError::BadPort {
            node: node.to_string(),
            op,
            producer: producer.name.clone(),
            port: v.port,
            count: producer.outputs.len(),
        });
    }
    Ok(())
}

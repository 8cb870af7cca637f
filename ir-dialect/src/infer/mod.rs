//! Type inference: walks the graph in topological order and sets every node output's [`TensorType`]
//! (dtype and shape with symbolic dimensions) from its inputs' types, its attributes and, for shape
//! arithmetic, the tracked contents of small integer tensors ([`SymInt`] elements).
//!
//! Semantics are ONNX's for the ONNX-derived ops and those documented on [`OpKind`] for qcc's own.
//! A dimension that cannot be known becomes [`Dim::Unknown`] (never an error); inputs that contradict each
//! other (broadcasting 3 against 4, a MatMul with mismatched inner dimensions, mixed dtypes) are errors that
//! name the node and op.
//!
//! Declared types: graph inputs keep theirs. Any other node's declared output type (from ONNX value_info or
//! a pass) is merged with the inferred one, keeping the more specific dimension and failing on a
//! contradiction. A declared type of unknown rank carries no information, its dtype included (importers use
//! it as the placeholder for "not declared").

mod dims;
mod fused;
mod ops;
mod shape_ops;
mod values;

#[cfg(test)]
mod tests;

pub use dims::{broadcast_dim, broadcast_shapes, dim_product, dim_quotient, dim_sum, unify_dim};
pub use values::SymInt;

use crate::{DType, Dim, Graph, GraphError, Node, NodeId, OpKind, Shape, TensorType, Value};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use std::collections::HashMap;
use values::Contents;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InferError {
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error("node '{node}' ({op}): {message}")]
    Node { node: String, op: &'static str, message: String },
}

/// Infers and sets the type of every node output (see the module docs).
pub fn infer_types(graph: &mut Graph) -> Result<(), InferError> {
    let order = graph.topo_order()?;
    let mut contents: HashMap<Value, Contents> = HashMap::new();
    for id in order {
        let node = graph.node(id);
        if node.op.kind == OpKind::Input {
            continue;
        }
        let ctx = Ctx::new(graph, id, &contents)?;
        let inferred = infer_node(&ctx)?;
        if inferred.len() != node.outputs.len() {
            return Err(ctx.err(format!("has {} outputs but {} are expected", node.outputs.len(), inferred.len())));
        }
        let mut merged = Vec::with_capacity(inferred.len());
        for (port, ty) in inferred.into_iter().enumerate() {
            let declared = &node.outputs[port].ty;
            let ty = merge_types(declared, ty)
                .map_err(|m| ctx.err(format!("output '{}' is declared {declared} but {m}", node.outputs[port].name)))?;
            merged.push(ty);
        }
        if merged.len() == 1 {
            if let Some(c) = values::propagate(&ctx, &merged[0]) {
                contents.insert(Value::new(id, 0), c);
            }
        }
        for (port, ty) in merged.into_iter().enumerate() {
            graph.set_value_type(Value::new(id, port as u32), ty);
        }
    }
    Ok(())
}

/// The inferred output types of one node, from its inputs' current types (no contents tracking beyond
/// constants). Used by the verifier and by passes that build nodes.
pub fn infer_node_types(graph: &Graph, id: NodeId) -> Result<Vec<TensorType>, InferError> {
    let contents = HashMap::new();
    let ctx = Ctx::new(graph, id, &contents)?;
    if ctx.node.op.kind == OpKind::Input {
        return Ok(ctx.node.outputs.iter().map(|o| o.ty.clone()).collect());
    }
    infer_node(&ctx)
}

/// Merges a declared type with an inferred one: the more specific dimension wins; `Err` describes a
/// contradiction.
pub fn merge_types(declared: &TensorType, inferred: TensorType) -> Result<TensorType, String> {
    let Some(declared_shape) = &declared.shape else {
        return Ok(inferred);
    };
    if declared.dtype != inferred.dtype {
        return Err(format!("inferred {inferred}"));
    }
    let Some(inferred_shape) = &inferred.shape else {
        return Ok(declared.clone());
    };
    if declared_shape.rank() != inferred_shape.rank() {
        return Err(format!("inferred {inferred} (rank differs)"));
    }
    let dims: Option<Vec<Dim>> = declared_shape.0.iter().zip(&inferred_shape.0).map(|(d, i)| unify_dim(i, d)).collect();
    match dims {
        Some(dims) => Ok(TensorType::new(inferred.dtype, Shape(dims))),
        None => Err(format!("inferred {inferred}")),
    }
}

fn infer_node(ctx: &Ctx<'_>) -> Result<Vec<TensorType>, InferError> {
    match shape_ops::infer(ctx)? {
        Some(types) => Ok(types),
        None => ops::infer(ctx),
    }
}

/// What an op rule sees of its node: input types, tracked contents and attributes.
pub(crate) struct Ctx<'a> {
    pub graph: &'a Graph,
    pub node: &'a Node,
    inputs: Vec<Option<Value>>,
    contents: &'a HashMap<Value, Contents>,
}

impl<'a> Ctx<'a> {
    fn new(graph: &'a Graph, id: NodeId, contents: &'a HashMap<Value, Contents>) -> Result<Ctx<'a>, InferError> {
        let node = graph.node(id);
        let mut ctx = Ctx { graph, node, inputs: vec![None; node.num_inputs], contents };
        // Read edges directly so that malformed ports are errors rather than panics.
        for e in graph.petgraph().edges_directed(id, Direction::Incoming) {
            let (dst, src) = (e.weight().dst_port as usize, e.weight().src_port as usize);
            if dst >= node.num_inputs {
                return Err(ctx.err(format!("an edge targets input {dst} but the node has {} inputs", node.num_inputs)));
            }
            if src >= graph.node(e.source()).outputs.len() {
                return Err(ctx.err(format!("input {dst} reads output {src} of a node that has fewer outputs")));
            }
            ctx.inputs[dst] = Some(Value::new(e.source(), src as u32));
        }
        Ok(ctx)
    }

    pub fn err(&self, message: impl Into<String>) -> InferError {
        let name = if self.node.name.is_empty() {
            self.node.outputs.first().map(|o| o.name.clone()).unwrap_or_default()
        } else {
            self.node.name.clone()
        };
        InferError::Node { node: name, op: self.node.op.kind.name(), message: message.into() }
    }

    pub fn num_inputs(&self) -> usize {
        self.inputs.len()
    }

    pub fn input(&self, port: usize) -> Option<Value> {
        self.inputs.get(port).copied().flatten()
    }

    pub fn ty(&self, port: usize) -> Option<&'a TensorType> {
        self.input(port).map(|v| self.graph.value_type(v))
    }

    /// The type of a required input.
    pub fn req(&self, port: usize) -> Result<&'a TensorType, InferError> {
        self.ty(port).ok_or_else(|| self.err(format!("required input {port} is absent")))
    }

    pub fn shape(&self, port: usize) -> Result<Option<&'a Shape>, InferError> {
        Ok(self.req(port)?.shape.as_ref())
    }

    /// Tracked contents of an input: from propagation, or read from a constant.
    pub fn contents(&self, port: usize) -> Option<&Contents> {
        self.contents.get(&self.input(port)?)
    }

    pub fn known_ints(&self, port: usize) -> Option<Vec<i64>> {
        if let Some(c) = self.contents(port) {
            return c.iter().map(SymInt::known).collect();
        }
        self.constant_ints(port)
    }

    /// Values of a constant integer input of any size.
    pub fn constant_ints(&self, port: usize) -> Option<Vec<i64>> {
        self.graph.constant(self.input(port)?)?.to_i64_vec().ok()
    }

    pub fn constant_floats(&self, port: usize) -> Option<Vec<f32>> {
        self.graph.constant(self.input(port)?)?.to_f32_vec().ok()
    }

    pub fn scalar(&self, port: usize) -> Option<i64> {
        match self.known_ints(port)?.as_slice() {
            [v] => Some(*v),
            _ => None,
        }
    }

    pub fn dtype_attr(&self, name: &str) -> Option<DType> {
        match self.node.op.attr(name)? {
            crate::Attr::DType(d) => Some(*d),
            crate::Attr::Int(code) => onnx_dtype(*code),
            _ => None,
        }
    }

    pub fn int_attr(&self, name: &str, default: i64) -> i64 {
        self.node.op.int(name).unwrap_or(default)
    }

    /// Normalises a possibly negative axis against `rank`.
    pub fn axis(&self, axis: i64, rank: usize) -> Result<usize, InferError> {
        let r = rank as i64;
        let a = if axis < 0 { axis + r } else { axis };
        if (0..r).contains(&a) {
            Ok(a as usize)
        } else {
            Err(self.err(format!("axis {axis} is out of range for rank {rank}")))
        }
    }
}

/// DType of an ONNX `TensorProto.DataType` code, for attributes that importers pass through as integers.
pub fn onnx_dtype(code: i64) -> Option<DType> {
    Some(match code {
        1 => DType::F32,
        2 => DType::U8,
        3 => DType::I8,
        4 => DType::U16,
        5 => DType::I16,
        6 => DType::I32,
        7 => DType::I64,
        9 => DType::Bool,
        10 => DType::F16,
        11 => DType::F64,
        12 => DType::U32,
        13 => DType::U64,
        16 => DType::BF16,
        17 => DType::F8E4M3,
        21 => DType::U4,
        22 => DType::I4,
        _ => return None,
    })
}

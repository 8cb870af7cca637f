//! The dataflow graph. Nodes live in a petgraph `StableDiGraph` whose edges are the source of truth for
//! data flow: an edge `a -> b` with ports `(src_port, dst_port)` says that output `src_port` of `a` is
//! input `dst_port` of `b`. Node indices stay valid across removals, so passes can hold `NodeId`s.

use crate::{DType, Dim, Op, OpKind, Shape, Tensor};
use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::sync::Arc;

pub type NodeId = NodeIndex<u32>;

/// One output of one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Value {
    pub node: NodeId,
    pub port: u32,
}

impl Value {
    pub fn new(node: NodeId, port: u32) -> Value {
        Value { node, port }
    }
}

/// Element type and (possibly unknown-rank) shape of a value.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Option<Shape>,
}

impl TensorType {
    pub fn new(dtype: DType, shape: Shape) -> TensorType {
        TensorType { dtype, shape: Some(shape) }
    }

    pub fn unranked(dtype: DType) -> TensorType {
        TensorType { dtype, shape: None }
    }

    pub fn known(dtype: DType, dims: &[usize]) -> TensorType {
        TensorType::new(dtype, Shape::known(dims))
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.shape {
            Some(s) => write!(f, "{}[{}]", self.dtype, s),
            None => write!(f, "{}[*]", self.dtype),
        }
    }
}

/// Name and type of one node output.
#[derive(Clone, Debug, PartialEq)]
pub struct ValueInfo {
    pub name: String,
    pub ty: TensorType,
}

impl ValueInfo {
    pub fn new(name: impl Into<String>, ty: TensorType) -> ValueInfo {
        ValueInfo { name: name.into(), ty }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// The node's own name (ONNX node name; used in error messages).
    pub name: String,
    pub op: Op,
    /// Input slots, including absent optional ones (an absent slot has no edge).
    pub num_inputs: usize,
    pub outputs: Vec<ValueInfo>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Edge {
    pub src_port: u32,
    pub dst_port: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct GraphOutput {
    pub name: String,
    pub value: Value,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GraphError {
    #[error("graph has a cycle through node '{node}' ({op})")]
    Cycle { node: String, op: &'static str },
    #[error("value name '{0}' is defined twice")]
    DuplicateName(String),
}

#[derive(Clone, Default)]
pub struct Graph {
    pub name: String,
    g: StableDiGraph<Node, Edge, u32>,
    inputs: Vec<NodeId>,
    outputs: Vec<GraphOutput>,
    names: HashMap<String, Value>,
    next_fresh: usize,
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Graph {
        Graph { name: name.into(), ..Graph::default() }
    }

    /// Adds a node whose input slots are `inputs` (`None` for an absent optional input).
    /// Output names must be unique in the graph; an empty name gets a fresh one.
    pub fn add_node(
        &mut self,
        name: impl Into<String>,
        op: Op,
        inputs: &[Option<Value>],
        mut outputs: Vec<ValueInfo>,
    ) -> Result<NodeId, GraphError> {
        for out in &mut outputs {
            if out.name.is_empty() {
                out.name = self.fresh_name("v");
            } else if self.names.contains_key(&out.name) {
                return Err(GraphError::DuplicateName(out.name.clone()));
            }
        }
        let names: Vec<String> = outputs.iter().map(|o| o.name.clone()).collect();
        let id = self.g.add_node(Node { name: name.into(), op, num_inputs: inputs.len(), outputs });
        for (port, name) in names.into_iter().enumerate() {
            self.names.insert(name, Value::new(id, port as u32));
        }
        for (dst_port, input) in inputs.iter().enumerate() {
            if let Some(v) = input {
                self.g.add_edge(v.node, id, Edge { src_port: v.port, dst_port: dst_port as u32 });
            }
        }
        Ok(id)
    }

    /// Adds a single-output node with a fresh output name (the common case for passes).
    pub fn add_op(&mut self, op: Op, inputs: &[Value], ty: TensorType) -> Value {
        let inputs: Vec<Option<Value>> = inputs.iter().copied().map(Some).collect();
        let name = self.fresh_name(op.kind.name());
        let id =
            self.add_node(String::new(), op, &inputs, vec![ValueInfo::new(name, ty)]).expect("fresh names are unique");
        Value::new(id, 0)
    }

    pub fn add_input(&mut self, name: &str, ty: TensorType) -> Result<Value, GraphError> {
        let id = self.add_node(name, Op::new(OpKind::Input), &[], vec![ValueInfo::new(name, ty)])?;
        self.inputs.push(id);
        Ok(Value::new(id, 0))
    }

    pub fn add_constant(&mut self, name: &str, tensor: Tensor) -> Result<Value, GraphError> {
        let ty = TensorType::known(tensor.dtype, &tensor.dims);
        let op = Op::new(OpKind::Constant).with("value", crate::Attr::Tensor(tensor));
        let id = self.add_node(name, op, &[], vec![ValueInfo::new(name, ty)])?;
        Ok(Value::new(id, 0))
    }

    pub fn add_output(&mut self, name: impl Into<String>, value: Value) {
        self.outputs.push(GraphOutput { name: name.into(), value });
    }

    /// A value name not used in the graph, `prefix` followed by a number.
    pub fn fresh_name(&mut self, prefix: &str) -> String {
        loop {
            let name = format!("{prefix}{}", self.next_fresh);
            self.next_fresh += 1;
            if !self.names.contains_key(&name) {
                return name;
            }
        }
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.g[id]
    }

    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.g[id]
    }

    pub fn contains(&self, id: NodeId) -> bool {
        self.g.contains_node(id)
    }

    pub fn node_count(&self) -> usize {
        self.g.node_count()
    }

    /// Node ids in index order (not topological).
    pub fn node_ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.g.node_indices()
    }

    pub fn graph_inputs(&self) -> &[NodeId] {
        &self.inputs
    }

    /// The dimension symbol that counts the cached positions of a KV-cache graph: axis 2 of its
    /// `past_key_values.*` inputs ([batch, heads, past, head_dim]), when they all name the same one.
    pub fn past_length_symbol(&self) -> Option<Arc<str>> {
        let mut found: Option<Arc<str>> = None;
        for &id in &self.inputs {
            let info = &self.node(id).outputs[0];
            if !info.name.starts_with("past_key_values.") {
                continue;
            }
            let Some(Dim::Sym(sym)) = info.ty.shape.as_ref().and_then(|s| s.dims().get(2)) else { return None };
            match &found {
                Some(f) if f != sym => return None,
                _ => found = Some(sym.clone()),
            }
        }
        found
    }

    pub fn graph_outputs(&self) -> &[GraphOutput] {
        &self.outputs
    }

    pub fn graph_outputs_mut(&mut self) -> &mut Vec<GraphOutput> {
        &mut self.outputs
    }

    /// The underlying petgraph, for algorithms (dominators, SCCs, visits).
    pub fn petgraph(&self) -> &StableDiGraph<Node, Edge, u32> {
        &self.g
    }

    pub fn value_info(&self, v: Value) -> &ValueInfo {
        &self.g[v.node].outputs[v.port as usize]
    }

    pub fn value_type(&self, v: Value) -> &TensorType {
        &self.value_info(v).ty
    }

    pub fn set_value_type(&mut self, v: Value, ty: TensorType) {
        self.g[v.node].outputs[v.port as usize].ty = ty;
    }

    pub fn value_name(&self, v: Value) -> &str {
        &self.value_info(v).name
    }

    pub fn value_by_name(&self, name: &str) -> Option<Value> {
        self.names.get(name).copied()
    }

    /// The tensor behind a value produced by a `constant` node.
    pub fn constant(&self, v: Value) -> Option<&Tensor> {
        let node = &self.g[v.node];
        (node.op.kind == OpKind::Constant).then(|| node.op.tensor("value")).flatten()
    }

    /// Input slots of a node in order, `None` where an optional input is absent.
    pub fn inputs(&self, id: NodeId) -> Vec<Option<Value>> {
        let mut slots = vec![None; self.g[id].num_inputs];
        for e in self.g.edges_directed(id, Direction::Incoming) {
            let w = e.weight();
            slots[w.dst_port as usize] = Some(Value::new(e.source(), w.src_port));
        }
        slots
    }

    pub fn input(&self, id: NodeId, port: usize) -> Option<Value> {
        self.g
            .edges_directed(id, Direction::Incoming)
            .find(|e| e.weight().dst_port as usize == port)
            .map(|e| Value::new(e.source(), e.weight().src_port))
    }

    /// Rewires one input slot (growing the slot list if needed).
    pub fn set_input(&mut self, id: NodeId, port: usize, value: Option<Value>) {
        if let Some(e) = self.g.edges_directed(id, Direction::Incoming).find(|e| e.weight().dst_port as usize == port) {
            let e = e.id();
            self.g.remove_edge(e);
        }
        let node = &mut self.g[id];
        node.num_inputs = node.num_inputs.max(port + 1);
        if let Some(v) = value {
            self.g.add_edge(v.node, id, Edge { src_port: v.port, dst_port: port as u32 });
        }
    }

    /// Every (node, input port) reading `v`, sorted; graph outputs are not included.
    pub fn users(&self, v: Value) -> Vec<(NodeId, usize)> {
        let mut users: Vec<(NodeId, usize)> = self
            .g
            .edges_directed(v.node, Direction::Outgoing)
            .filter(|e| e.weight().src_port == v.port)
            .map(|e| (e.target(), e.weight().dst_port as usize))
            .collect();
        users.sort();
        users
    }

    /// Whether `v` is read by any node or is a graph output.
    pub fn is_used(&self, v: Value) -> bool {
        self.outputs.iter().any(|o| o.value == v)
            || self.g.edges_directed(v.node, Direction::Outgoing).any(|e| e.weight().src_port == v.port)
    }

    /// Makes every reader of `old` (nodes and graph outputs) read `new` instead.
    pub fn replace_all_uses(&mut self, old: Value, new: Value) {
        for (user, port) in self.users(old) {
            self.set_input(user, port, Some(new));
        }
        for out in &mut self.outputs {
            if out.value == old {
                out.value = new;
            }
        }
    }

    /// Removes a node and its edges. Readers of its outputs lose those inputs, so callers remove only
    /// nodes whose outputs are unused (or rewire readers first).
    pub fn remove_node(&mut self, id: NodeId) -> Option<Node> {
        let node = self.g.remove_node(id)?;
        for o in &node.outputs {
            self.names.remove(&o.name);
        }
        self.inputs.retain(|&i| i != id);
        Some(node)
    }

    /// Renames a value, keeping names unique.
    pub fn rename_value(&mut self, v: Value, name: &str) -> Result<(), GraphError> {
        if let Some(&other) = self.names.get(name) {
            if other != v {
                return Err(GraphError::DuplicateName(name.to_string()));
            }
            return Ok(());
        }
        let old = std::mem::replace(&mut self.g[v.node].outputs[v.port as usize].name, name.to_string());
        self.names.remove(&old);
        self.names.insert(name.to_string(), v);
        Ok(())
    }

    /// Nodes in a deterministic topological order: among ready nodes the lowest index goes first, so
    /// a graph built in textual order prints back in that order.
    pub fn topo_order(&self) -> Result<Vec<NodeId>, GraphError> {
        let mut indegree: HashMap<NodeId, usize> = HashMap::with_capacity(self.g.node_count());
        let mut ready = BinaryHeap::new();
        for id in self.g.node_indices() {
            let d = self.g.edges_directed(id, Direction::Incoming).count();
            indegree.insert(id, d);
            if d == 0 {
                ready.push(Reverse(id));
            }
        }
        let mut order = Vec::with_capacity(self.g.node_count());
        while let Some(Reverse(id)) = ready.pop() {
            order.push(id);
            for e in self.g.edges_directed(id, Direction::Outgoing) {
                let d = indegree.get_mut(&e.target()).expect("every node counted");
                *d -= 1;
                if *d == 0 {
                    ready.push(Reverse(e.target()));
                }
            }
        }
        if order.len() != self.g.node_count() {
            let stuck = self.g.node_indices().find(|id| indegree[id] > 0).expect("some node is left");
            let node = &self.g[stuck];
            return Err(GraphError::Cycle { node: node.name.clone(), op: node.op.kind.name() });
        }
        Ok(order)
    }
}

impl fmt::Debug for Graph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Graph({}, {} nodes)", self.name, self.g.node_count())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Shape;

    fn f32_vec(n: usize) -> TensorType {
        TensorType::new(DType::F32, Shape::known(&[n]))
    }

    #[test]
    fn build_rewire_and_order() {
        let mut g = Graph::new("t");
        let x = g.add_input("x", f32_vec(4)).unwrap();
        let c = g.add_constant("c", Tensor::from_slice(vec![4], &[1f32; 4])).unwrap();
        let add = g.add_op(Op::new(OpKind::Add), &[x, c], f32_vec(4));
        let neg = g.add_op(Op::new(OpKind::Neg), &[add], f32_vec(4));
        g.add_output("y", neg);
        assert_eq!(g.inputs(add.node), vec![Some(x), Some(c)]);
        assert_eq!(g.users(add), vec![(neg.node, 0)]);
        g.replace_all_uses(add, x);
        assert_eq!(g.inputs(neg.node), vec![Some(x)]);
        assert!(!g.is_used(add));
        g.remove_node(add.node);
        let order = g.topo_order().unwrap();
        assert_eq!(order, vec![x.node, c.node, neg.node]);
        assert!(g.add_input("x", f32_vec(1)).is_err());
    }

    #[test]
    fn cycle_is_reported_with_node_name() {
        let mut g = Graph::new("t");
        let x = g.add_input("x", f32_vec(1)).unwrap();
        let a = g.add_node("a", Op::new(OpKind::Neg), &[Some(x)], vec![ValueInfo::new("a", f32_vec(1))]).unwrap();
        let b = g
            .add_node("b", Op::new(OpKind::Neg), &[Some(Value::new(a, 0))], vec![ValueInfo::new("b", f32_vec(1))])
            .unwrap();
        g.set_input(a, 0, Some(Value::new(b, 0)));
        let err = g.topo_order().unwrap_err();
        assert!(matches!(err, GraphError::Cycle { .. }), "{err}");
    }
}

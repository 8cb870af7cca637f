//! Extraction: the cost model and the rebuild of an IR graph from the cheapest e-nodes.
//!
//! Cost: every op costs 1 except matrix products, where an integer product (int operands, or the
//! integer ops `matmul_integer`, `int_linear`, `qlinear_matmul`) costs 2 and a floating-point one 8, so
//! extraction prefers fewer ops and integer matmuls. Leaves and attributes are free. Costs are tree sums
//! in u128 (saturating): a transformer's residual stream is read by every layer, and tree costs grow
//! geometrically with depth (about 12x per Llama layer, well within u128 for 30 layers).

use super::analysis::{LeafInfo, QccEGraph};
use super::language::QccLang;
use super::{BridgeError, GraphEGraph};
use egg::{CostFunction, Extractor, Id, Language};
use qcc_ir::{Graph, Op, OpKind, TensorType, Value, ValueInfo};
use std::collections::{HashMap, HashSet};

pub struct QccCost<'a> {
    pub egraph: &'a QccEGraph,
}

const FLOAT_MATMUL: u128 = 8;
const INT_MATMUL: u128 = 2;

impl QccCost<'_> {
    fn is_int(&self, id: Id) -> bool {
        self.egraph[id].data.ty.as_ref().is_some_and(|t| t.dtype.is_int())
    }

    /// The cost of the e-node itself, without its children.
    pub fn op_cost(&self, enode: &QccLang) -> u128 {
        match enode {
            QccLang::Leaf(_) | QccLang::Absent | QccLang::Attrs(_) => 0,
            QccLang::MatMul([a, b, _]) | QccLang::Gemm([a, b, _, _]) => {
                if self.is_int(*a) && self.is_int(*b) {
                    INT_MATMUL
                } else {
                    FLOAT_MATMUL
                }
            }
            QccLang::Opaque(r, children) => match self.egraph.analysis.opaque[r.0 as usize].op.kind {
                OpKind::MatMulInteger | OpKind::IntLinear | OpKind::QLinearMatMul => INT_MATMUL,
                OpKind::MatMul | OpKind::Gemm | OpKind::Conv => {
                    if children.iter().take(2).all(|&c| self.is_int(c)) {
                        INT_MATMUL
                    } else {
                        FLOAT_MATMUL
                    }
                }
                _ => 1,
            },
            _ => 1,
        }
    }
}

impl CostFunction<QccLang> for QccCost<'_> {
    type Cost = u128;

    fn cost<C>(&mut self, enode: &QccLang, mut costs: C) -> u128
    where
        C: FnMut(Id) -> u128,
    {
        enode.fold(self.op_cost(enode), |sum, id| sum.saturating_add(costs(id)))
    }
}

/// Builds graph values from extracted e-nodes.
struct Rebuilder<'a> {
    bridge: &'a GraphEGraph,
    extractor: Extractor<'a, QccCost<'a>, QccLang, super::analysis::QccAnalysis>,
    graph: Graph,
    built: HashMap<Id, Value>,
    /// Opaque nodes already created, by (group, canonical children).
    groups: HashMap<(u32, Vec<Id>), qcc_ir::NodeId>,
    /// Original value and node names per canonical class, in graph order.
    class_names: HashMap<Id, Vec<(String, String)>>,
    reserved: HashSet<String>,
    used: HashSet<String>,
    next_fresh: usize,
}

impl GraphEGraph {
    /// Extracts the cheapest term for every graph output and rebuilds a graph from them.
    pub fn to_graph(&self) -> Result<Graph, BridgeError> {
        let egraph = &self.egraph;
        let extractor = Extractor::new(egraph, QccCost { egraph });
        let mut class_names: HashMap<Id, Vec<(String, String)>> = HashMap::new();
        for (class, value_name, node_name) in &self.names {
            class_names.entry(egraph.find(*class)).or_default().push((value_name.clone(), node_name.clone()));
        }
        let reserved = self.names.iter().map(|(_, v, _)| v.clone()).collect();
        let mut rb = Rebuilder {
            bridge: self,
            extractor,
            graph: Graph::new(self.graph_name.clone()),
            built: HashMap::new(),
            groups: HashMap::new(),
            class_names,
            reserved,
            used: HashSet::new(),
            next_fresh: 0,
        };
        // Graph inputs first and in their original order, used or not.
        for leaf in &egraph.analysis.leaves {
            if let LeafInfo::Input { name, ty, .. } = leaf {
                let v = rb.graph.add_input(name, ty.clone())?;
                rb.used.insert(name.clone());
                if let Some(class) = rb.input_class(name) {
                    rb.built.insert(class, v);
                }
            }
        }
        for (name, class) in &self.outputs {
            let v = rb.build(egraph.find(*class))?;
            rb.graph.add_output(name.clone(), v);
        }
        Ok(rb.graph)
    }
}

impl Rebuilder<'_> {
    fn egraph(&self) -> &QccEGraph {
        &self.bridge.egraph
    }

    fn input_class(&self, name: &str) -> Option<Id> {
        let eg = self.egraph();
        eg.classes().find_map(|c| {
            c.nodes
                .iter()
                .any(|n| {
                    matches!(n, QccLang::Leaf(r) if matches!(&eg.analysis.leaves[r.0 as usize],
                LeafInfo::Input { name: n, .. } if n == name))
                })
                .then_some(c.id)
        })
    }

    /// A value name for a new node of `class`: an original name of the class if still free, else fresh.
    fn value_name(&mut self, class: Id, prefix: &str) -> String {
        let free = self
            .class_names
            .get(&class)
            .and_then(|names| names.iter().map(|(v, _)| v).find(|v| !self.used.contains(*v)).cloned());
        let name = free.unwrap_or_else(|| loop {
            let candidate = format!("{prefix}{}", self.next_fresh);
            self.next_fresh += 1;
            if !self.reserved.contains(&candidate) && !self.used.contains(&candidate) {
                break candidate;
            }
        });
        self.used.insert(name.clone());
        name
    }

    fn node_name(&self, class: Id) -> String {
        self.class_names.get(&class).and_then(|n| n.first()).map(|(_, n)| n.clone()).unwrap_or_default()
    }

    fn class_type(&self, class: Id, what: &str) -> Result<TensorType, BridgeError> {
        self.egraph()[class]
            .data
            .ty
            .clone()
            .ok_or_else(|| BridgeError::Rebuild(format!("the type of a {what} value is unknown")))
    }

    /// Builds the value of `root` and everything it needs, children before parents (no recursion, so
    /// deep graphs cannot overflow the stack).
    fn build(&mut self, root: Id) -> Result<Value, BridgeError> {
        let mut stack = vec![(root, false)];
        while let Some((class, children_done)) = stack.pop() {
            let class = self.egraph().find(class);
            if self.built.contains_key(&class) {
                continue;
            }
            let enode = self.extractor.find_best_node(class).clone();
            let inputs = value_children(&enode);
            if !children_done {
                stack.push((class, true));
                for &c in inputs.iter().rev() {
                    let c = self.egraph().find(c);
                    if !self.built.contains_key(&c) && !self.is_absent(c) {
                        stack.push((c, false));
                    }
                }
                continue;
            }
            let value = self.emit(class, &enode)?;
            self.built.insert(class, value);
        }
        self.built.get(&root).copied().ok_or_else(|| BridgeError::Rebuild("output class was not built".into()))
    }

    fn is_absent(&self, class: Id) -> bool {
        matches!(self.extractor.find_best_node(class), QccLang::Absent)
    }

    fn input_values(&self, children: &[Id]) -> Result<Vec<Option<Value>>, BridgeError> {
        let mut values = Vec::with_capacity(children.len());
        for &c in children {
            let c = self.egraph().find(c);
            values.push(if self.is_absent(c) {
                None
            } else {
                Some(*self.built.get(&c).ok_or_else(|| BridgeError::Rebuild("child built out of order".into()))?)
            });
        }
        // Trailing absent optional inputs are dropped, as the importer does.
        while values.last() == Some(&None) {
            values.pop();
        }
        Ok(values)
    }

    fn emit(&mut self, class: Id, enode: &QccLang) -> Result<Value, BridgeError> {
        match enode {
            QccLang::Leaf(r) => match self.egraph().analysis.leaves[r.0 as usize].clone() {
                LeafInfo::Input { name, .. } => {
                    Err(BridgeError::Rebuild(format!("graph input '{name}' was not added")))
                }
                LeafInfo::Constant { tensor, name } => {
                    let preferred = name.filter(|n| !self.used.contains(n));
                    let name = match preferred {
                        Some(n) => {
                            self.used.insert(n.clone());
                            n
                        }
                        None => self.value_name(class, "const"),
                    };
                    Ok(self.graph.add_constant(&name, tensor)?)
                }
            },
            QccLang::Absent | QccLang::Attrs(_) => {
                Err(BridgeError::Rebuild("an attribute or absent slot used as a value".into()))
            }
            QccLang::Opaque(r, children) => {
                let info = self.egraph().analysis.opaque[r.0 as usize].clone();
                let canon: Vec<Id> = children.iter().map(|&c| self.egraph().find(c)).collect();
                if let Some(&node) = self.groups.get(&(info.group, canon.clone())) {
                    return Ok(Value::new(node, info.port));
                }
                let inputs = self.input_values(children)?;
                let refs = self.egraph().analysis.group_refs(info.group).to_vec();
                let mut outputs = Vec::with_capacity(refs.len());
                for (port, r) in refs.iter().enumerate() {
                    let port_class = self.egraph().lookup(QccLang::Opaque(*r, canon.clone())).unwrap_or(class);
                    let port_class = if port == info.port as usize { class } else { port_class };
                    let name = self.value_name(port_class, info.op.kind.name());
                    outputs.push(ValueInfo::new(name, info.output_types[port].clone()));
                }
                let node = self.graph.add_node(info.node_name.clone(), info.op.clone(), &inputs, outputs)?;
                self.groups.insert((info.group, canon), node);
                Ok(Value::new(node, info.port))
            }
            structural => {
                let kind = structural.kind().ok_or_else(|| BridgeError::Rebuild("unknown e-node".into()))?;
                let op =
                    self.egraph().analysis.op_of(self.egraph(), structural).ok_or_else(|| {
                        BridgeError::Rebuild(format!("attributes of a {} node are missing", kind.name()))
                    })?;
                let inputs = self.input_values(value_children(structural))?;
                let ty = self.class_type(class, kind.name())?;
                let name = self.value_name(class, kind.name());
                let node_name = self.node_name(class);
                let id = self.graph.add_node(
                    node_name,
                    Op { kind, attrs: op.attrs },
                    &inputs,
                    vec![ValueInfo::new(name, ty)],
                )?;
                Ok(Value::new(id, 0))
            }
        }
    }
}

/// The children of an e-node that are values (all but a structural node's trailing attrs leaf).
fn value_children(enode: &QccLang) -> &[Id] {
    let children = enode.children();
    match enode {
        QccLang::Opaque(..) => children,
        _ if enode.kind().is_some() => &children[..children.len() - 1],
        _ => &[],
    }
}

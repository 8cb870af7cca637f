//! `ModelProto` -> [`qcc_ir::Graph`]: initializers become constants, graph inputs (those no initializer
//! shadows) become inputs, and nodes are converted in topological order through the op registry.
//!
//! Order of checks: structure first (duplicate names, dangling inputs, cycles: each an error naming the
//! node), then every node is converted; nodes the registry cannot handle are collected, their outputs
//! marked unavailable so their readers are skipped, and all of them are reported in one error.

use super::ops::{Lowered, NodeCx, NodeError, Registry};
use super::proto::tensor_shape_proto::dimension;
use super::proto::{attribute_type as at, data_type, AttributeProto, GraphProto, ModelProto, NodeProto, TypeProto};
use super::tensor::{dtype_from_onnx, load_tensor, ExternalData, TensorProblem};
use super::{ImportError, ImportedModel, UnsupportedNode};
use qcc_ir::{Attr, Attrs, DType, Dim, Graph, GraphError, Op, OpKind, Shape, TensorType, Value, ValueInfo};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::path::PathBuf;

/// Opset versions per domain ("ai.onnx" folded into "").
pub(crate) struct Opsets {
    pub onnx: i64,
    others: HashMap<String, i64>,
}

impl Opsets {
    pub fn new(imports: &[(String, i64)]) -> Opsets {
        let mut onnx = None;
        let mut others = HashMap::new();
        for (domain, version) in imports {
            match domain.as_str() {
                "" | "ai.onnx" => onnx = Some(onnx.map_or(*version, |v: i64| v.max(*version))),
                d => {
                    others.insert(d.to_string(), *version);
                }
            }
        }
        // Models older than IR version 3 have no opset imports and mean opset 1.
        Opsets { onnx: onnx.unwrap_or(1), others }
    }

    fn for_domain(&self, domain: &str) -> i64 {
        match domain {
            "" | "ai.onnx" => self.onnx,
            d => self.others.get(d).copied().unwrap_or(1),
        }
    }
}

/// A node's name for messages: its own name, or its first output's when it has none.
fn node_label(node: &NodeProto) -> String {
    if !node.name.is_empty() {
        node.name.clone()
    } else {
        match node.output.iter().find(|o| !o.is_empty()) {
            Some(out) => format!("<unnamed {} -> {out}>", node.op_type),
            None => format!("<unnamed {}>", node.op_type),
        }
    }
}

pub(crate) fn convert_model(
    model: ModelProto,
    path: &str,
    base_dir: Option<PathBuf>,
    source: Option<PathBuf>,
) -> Result<ImportedModel, ImportError> {
    let invalid = |message: String| ImportError::InvalidModel { path: path.to_string(), message };
    let graph_proto = model.graph.as_ref().ok_or_else(|| invalid("the model has no graph".into()))?;
    let opset_imports: Vec<(String, i64)> = model.opset_import.iter().map(|o| (o.domain.clone(), o.version)).collect();
    let mut importer = Importer {
        path: path.to_string(),
        registry: Registry::global(),
        opsets: Opsets::new(&opset_imports),
        external: ExternalData::new(base_dir),
        graph: Graph::new(graph_proto.name.clone()),
        declared_types: HashMap::new(),
        unavailable: HashSet::new(),
        unsupported: Vec::new(),
    };
    importer.convert_graph(graph_proto)?;
    Ok(ImportedModel {
        graph: importer.graph,
        ir_version: model.ir_version,
        opset_imports,
        producer_name: model.producer_name,
        producer_version: model.producer_version,
        model_version: model.model_version,
        metadata_props: model.metadata_props.into_iter().map(|e| (e.key, e.value)).collect(),
        source,
    })
}

struct Importer {
    path: String,
    registry: &'static Registry,
    opsets: Opsets,
    external: ExternalData,
    graph: Graph,
    /// Types the model declares (value_info and graph outputs) by value name.
    declared_types: HashMap<String, TensorType>,
    /// Outputs of unsupported nodes (and of nodes downstream of them).
    unavailable: HashSet<String>,
    unsupported: Vec<UnsupportedNode>,
}

impl Importer {
    fn invalid(&self, message: String) -> ImportError {
        ImportError::InvalidModel { path: self.path.clone(), message }
    }

    fn duplicate(&self, e: GraphError) -> ImportError {
        self.invalid(e.to_string())
    }

    fn tensor_error(&self, tensor: String, problem: TensorProblem) -> ImportError {
        problem.at(self.path.clone(), tensor)
    }

    fn convert_graph(&mut self, g: &GraphProto) -> Result<(), ImportError> {
        if let Some(sparse) = g.sparse_initializer.first() {
            let name = sparse.values.as_ref().map_or("", |v| v.name.as_str());
            return Err(ImportError::InvalidTensor {
                path: self.path.clone(),
                tensor: format!("sparse initializer '{name}'"),
                message: "is a sparse tensor, which qcc does not support".into(),
            });
        }
        for info in g.value_info.iter().chain(&g.output) {
            if let Some(Ok(ty)) = info.r#type.as_ref().map(tensor_type) {
                self.declared_types.insert(info.name.clone(), ty);
            }
        }
        let initializer_names: HashSet<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
        for t in &g.initializer {
            let label = format!("initializer '{}'", t.name);
            if t.name.is_empty() {
                return Err(self.invalid("an initializer has no name".into()));
            }
            let tensor = load_tensor(t, &mut self.external).map_err(|p| self.tensor_error(label, p))?;
            self.graph.add_constant(&t.name, tensor).map_err(|e| self.duplicate(e))?;
        }
        for input in &g.input {
            if initializer_names.contains(input.name.as_str()) {
                continue; // IR < 4 lists initializers among the inputs too.
            }
            let ty = match input.r#type.as_ref().map(tensor_type) {
                Some(Ok(ty)) => ty,
                Some(Err(TypeProblem::UnsupportedDType(dtype))) => {
                    return Err(self
                        .tensor_error(format!("graph input '{}'", input.name), TensorProblem::UnsupportedDType(dtype)))
                }
                Some(Err(TypeProblem::NotTensor)) => {
                    return Err(ImportError::UnsupportedValueType {
                        path: self.path.clone(),
                        value: input.name.clone(),
                    })
                }
                None => return Err(self.invalid(format!("graph input '{}' has no type", input.name))),
            };
            self.graph.add_input(&input.name, ty).map_err(|e| self.duplicate(e))?;
        }

        let order = self.topological_order(g)?;
        let used: HashSet<&str> = g
            .node
            .iter()
            .flat_map(|n| n.input.iter())
            .chain(g.output.iter().map(|o| &o.name))
            .map(String::as_str)
            .collect();
        for index in order {
            self.convert_node(&g.node[index], &used)?;
        }

        for out in &g.output {
            if self.unavailable.contains(&out.name) {
                continue;
            }
            let value = self
                .graph
                .value_by_name(&out.name)
                .ok_or_else(|| self.invalid(format!("graph output '{}' is not produced by any node", out.name)))?;
            self.graph.add_output(out.name.clone(), value);
        }
        if !self.unsupported.is_empty() {
            return Err(ImportError::UnsupportedOps {
                path: self.path.clone(),
                nodes: std::mem::take(&mut self.unsupported),
            });
        }
        // Replaces the placeholder types of `guess_output_types`; declared value_info types are merged in.
        qcc_ir::infer::infer_types(&mut self.graph)
            .map_err(|source| ImportError::TypeInference { path: self.path.clone(), source })
    }

    /// Node indices in dependency order (ONNX order where it is already valid). Checks that every input
    /// name is defined and that there is no cycle.
    fn topological_order(&self, g: &GraphProto) -> Result<Vec<usize>, ImportError> {
        let mut producer: HashMap<&str, usize> = HashMap::new();
        for (i, node) in g.node.iter().enumerate() {
            for out in node.output.iter().filter(|o| !o.is_empty()) {
                let defined_outside = self.graph.value_by_name(out).is_some();
                if defined_outside || producer.insert(out, i).is_some() {
                    return Err(ImportError::InvalidNode {
                        path: self.path.clone(),
                        node: node_label(node),
                        op_type: node.op_type.clone(),
                        message: format!("output '{out}' is already defined elsewhere in the graph"),
                    });
                }
            }
        }
        let mut indegree = vec![0usize; g.node.len()];
        let mut readers: Vec<Vec<usize>> = vec![Vec::new(); g.node.len()];
        for (i, node) in g.node.iter().enumerate() {
            for input in node.input.iter().filter(|n| !n.is_empty()) {
                if let Some(&p) = producer.get(input.as_str()) {
                    indegree[i] += 1;
                    readers[p].push(i);
                } else if self.graph.value_by_name(input).is_none() {
                    return Err(ImportError::DanglingInput {
                        path: self.path.clone(),
                        node: node_label(node),
                        op_type: node.op_type.clone(),
                        input: input.clone(),
                    });
                }
            }
        }
        let mut ready: BinaryHeap<Reverse<usize>> =
            (0..g.node.len()).filter(|&i| indegree[i] == 0).map(Reverse).collect();
        let mut order = Vec::with_capacity(g.node.len());
        while let Some(Reverse(i)) = ready.pop() {
            order.push(i);
            for &r in &readers[i] {
                indegree[r] -= 1;
                if indegree[r] == 0 {
                    ready.push(Reverse(r));
                }
            }
        }
        if order.len() < g.node.len() {
            // Walk back through unfinished producers from a stuck node: the walk must repeat a node, and the
            // repeated node lies on a cycle (a stuck node may merely sit downstream of one).
            let mut at = (0..g.node.len()).find(|&i| indegree[i] > 0).unwrap_or(0);
            let mut seen = HashSet::new();
            while seen.insert(at) {
                let stuck_producer = g.node[at]
                    .input
                    .iter()
                    .filter_map(|n| producer.get(n.as_str()).copied())
                    .find(|&p| indegree[p] > 0);
                match stuck_producer {
                    Some(p) => at = p,
                    None => break,
                }
            }
            let node = &g.node[at];
            return Err(ImportError::Cycle {
                path: self.path.clone(),
                node: node_label(node),
                op_type: node.op_type.clone(),
            });
        }
        Ok(order)
    }

    fn mark_unsupported(&mut self, node: &NodeProto, opset: i64, reason: String) {
        self.unsupported.push(UnsupportedNode {
            node: node_label(node),
            op_type: node.op_type.clone(),
            domain: node.domain.clone(),
            opset,
            reason,
        });
        self.mark_unavailable(node);
    }

    fn mark_unavailable(&mut self, node: &NodeProto) {
        self.unavailable.extend(node.output.iter().filter(|o| !o.is_empty()).cloned());
    }

    fn convert_node(&mut self, node: &NodeProto, used: &HashSet<&str>) -> Result<(), ImportError> {
        let label = node_label(node);
        let opset = self.opsets.for_domain(&node.domain);
        let def = match self.registry.lookup(&node.domain, &node.op_type, opset) {
            Ok(def) => *def,
            Err(reason) => {
                self.mark_unsupported(node, opset, reason);
                return Ok(());
            }
        };
        let path = self.path.clone();
        let invalid_node = |message: String| ImportError::InvalidNode {
            path: path.clone(),
            node: label.clone(),
            op_type: node.op_type.clone(),
            message,
        };

        // Outputs past the IR kind's count are optional extras (LayerNormalization's Mean, MaxPool's
        // Indices, Dropout's mask): dropped when nothing reads them.
        let mut outputs: Vec<String> = node.output.clone();
        if let Some(count) = def.kind.arity().outputs {
            if let Some(extra) = outputs.iter().skip(count).find(|o| !o.is_empty() && used.contains(o.as_str())) {
                let reason = format!("optional output '{extra}' is used, which qcc's {} does not produce", def.kind);
                self.mark_unsupported(node, opset, reason);
                return Ok(());
            }
            outputs.resize(count, String::new());
        }
        while outputs.last().is_some_and(String::is_empty) && outputs.len() > 1 && def.kind.arity().outputs.is_none() {
            outputs.pop();
        }

        if node.input.iter().any(|i| self.unavailable.contains(i)) {
            self.mark_unavailable(node);
            return Ok(());
        }
        let mut inputs = Vec::with_capacity(node.input.len());
        for name in &node.input {
            inputs.push(if name.is_empty() {
                None
            } else {
                // topological_order checked every name.
                Some(
                    self.graph
                        .value_by_name(name)
                        .ok_or_else(|| invalid_node(format!("input '{name}' is undefined")))?,
                )
            });
        }

        let mut attrs = Attrs::new();
        for a in &node.attribute {
            if a.name == "consumed_inputs" {
                continue; // opset-1 memory hint with no semantics
            }
            match self.convert_attribute(a) {
                Ok(value) => {
                    attrs.insert(a.name.clone(), value);
                }
                Err(NodeError::Unsupported(reason)) => {
                    self.mark_unsupported(node, opset, reason);
                    return Ok(());
                }
                Err(e) => return Err(self.node_error(node, e)),
            }
        }

        let mut cx = NodeCx {
            name: &label,
            op_type: &node.op_type,
            opset,
            attrs,
            inputs,
            num_outputs: outputs.len(),
            graph: &mut self.graph,
        };
        let lowered = match (def.convert)(&mut cx, def.kind) {
            Ok(lowered) => lowered,
            Err(NodeError::Unsupported(reason)) => {
                self.mark_unsupported(node, opset, reason);
                return Ok(());
            }
            Err(e) => return Err(self.node_error(node, e)),
        };
        let Lowered { op, mut inputs } = lowered;
        while inputs.last().is_some_and(Option::is_none) {
            inputs.pop();
        }
        let arity = op.kind.arity();
        if inputs.len() < arity.min_inputs || inputs.len() > arity.max_inputs {
            let max = if arity.max_inputs == usize::MAX { "any".to_string() } else { arity.max_inputs.to_string() };
            return Err(invalid_node(format!(
                "has {} inputs, {} takes {} to {max}",
                inputs.len(),
                op.kind,
                arity.min_inputs
            )));
        }
        if let Some(missing) = (0..arity.min_inputs).find(|&i| inputs[i].is_none()) {
            return Err(invalid_node(format!("required input {missing} is missing")));
        }

        let guessed = guess_output_types(&self.graph, &op, &inputs, outputs.len());
        let infos = outputs
            .iter()
            .zip(guessed)
            .map(|(name, guess)| {
                let ty = match (op.kind, self.declared_types.get(name)) {
                    (OpKind::Constant, _) | (_, None) => guess,
                    (_, Some(declared)) => declared.clone(),
                };
                ValueInfo::new(name.clone(), ty)
            })
            .collect();
        self.graph.add_node(label.clone(), op, &inputs, infos).map_err(|e| invalid_node(e.to_string()))?;
        Ok(())
    }

    fn node_error(&self, node: &NodeProto, e: NodeError) -> ImportError {
        let label = node_label(node);
        match e {
            NodeError::UnsupportedDType { what, dtype } => ImportError::UnsupportedDType {
                path: self.path.clone(),
                tensor: format!("{what} of node '{label}' ({})", node.op_type),
                dtype,
                dtype_name: data_type::name(dtype),
            },
            NodeError::Unsupported(message) | NodeError::Invalid(message) => ImportError::InvalidNode {
                path: self.path.clone(),
                node: label,
                op_type: node.op_type.clone(),
                message,
            },
        }
    }

    fn convert_attribute(&mut self, a: &AttributeProto) -> Result<Attr, NodeError> {
        if !a.ref_attr_name.is_empty() {
            return Err(NodeError::Invalid(format!("attribute '{}' refers to a function attribute", a.name)));
        }
        let utf8 = |b: &[u8]| {
            String::from_utf8(b.to_vec())
                .map_err(|_| NodeError::Invalid(format!("attribute '{}' is not valid UTF-8", a.name)))
        };
        Ok(match attribute_kind(a) {
            at::FLOAT => Attr::Float(a.f),
            at::INT => Attr::Int(a.i),
            at::STRING => Attr::Str(utf8(&a.s)?),
            at::FLOATS => Attr::Floats(a.floats.clone()),
            at::INTS => Attr::Ints(a.ints.clone()),
            at::STRINGS => Attr::Strs(a.strings.iter().map(|s| utf8(s)).collect::<Result<_, _>>()?),
            at::TENSOR => {
                let t =
                    a.t.as_ref().ok_or_else(|| NodeError::Invalid(format!("attribute '{}' has no tensor", a.name)))?;
                Attr::Tensor(load_tensor(t, &mut self.external).map_err(|p| match p {
                    TensorProblem::UnsupportedDType(dtype) => {
                        NodeError::UnsupportedDType { what: format!("attribute '{}'", a.name), dtype }
                    }
                    TensorProblem::Invalid(m) => NodeError::Invalid(format!("attribute '{}' tensor {m}", a.name)),
                })?)
            }
            other => {
                let kind = match other {
                    at::GRAPH | at::GRAPHS => "a subgraph",
                    at::SPARSE_TENSOR | at::SPARSE_TENSORS => "a sparse tensor",
                    at::TENSORS => "a tensor list",
                    at::TYPE_PROTO | at::TYPE_PROTOS => "a type",
                    _ => "an unknown type",
                };
                return Err(NodeError::Unsupported(format!("attribute '{}' is {kind}", a.name)));
            }
        })
    }
}

/// The attribute's type; IR version 1 models have no `type` field, so it is read off the field in use.
fn attribute_kind(a: &AttributeProto) -> i32 {
    if a.r#type != at::UNDEFINED {
        return a.r#type;
    }
    if a.t.is_some() {
        at::TENSOR
    } else if a.g.is_some() {
        at::GRAPH
    } else if !a.floats.is_empty() {
        at::FLOATS
    } else if !a.ints.is_empty() {
        at::INTS
    } else if !a.strings.is_empty() {
        at::STRINGS
    } else if !a.s.is_empty() {
        at::STRING
    } else if a.f != 0.0 {
        at::FLOAT
    } else {
        at::INT
    }
}

enum TypeProblem {
    NotTensor,
    UnsupportedDType(i32),
}

/// A declared tensor type: symbolic dims keep their names, missing or negative dims are unknown.
fn tensor_type(tp: &TypeProto) -> Result<TensorType, TypeProblem> {
    let t = tp.tensor_type.as_ref().ok_or(TypeProblem::NotTensor)?;
    let dtype = dtype_from_onnx(t.elem_type).ok_or(TypeProblem::UnsupportedDType(t.elem_type))?;
    let shape = t.shape.as_ref().map(|s| {
        Shape(
            s.dim
                .iter()
                .map(|d| match &d.value {
                    Some(dimension::Value::DimValue(v)) if *v >= 0 => Dim::Known(*v as u64),
                    Some(dimension::Value::DimParam(p)) if !p.is_empty() => Dim::sym(p),
                    _ => Dim::Unknown,
                })
                .collect(),
        )
    });
    Ok(TensorType { dtype, shape })
}

/// Placeholder output types until type inference runs: exact for constants, otherwise an unranked type of
/// the most likely dtype.
fn guess_output_types(graph: &Graph, op: &Op, inputs: &[Option<Value>], count: usize) -> Vec<TensorType> {
    let input_dtype = |i: usize| inputs.get(i).copied().flatten().map(|v| graph.value_type(v).dtype);
    let first = inputs.iter().flatten().next().map(|&v| graph.value_type(v).dtype).unwrap_or(DType::F32);
    use OpKind::*;
    let dtype = match op.kind {
        Constant => {
            if let Some(t) = op.tensor("value") {
                return vec![TensorType::known(t.dtype, &t.dims)];
            }
            DType::F32
        }
        Equal | Less | LessOrEqual | Greater | GreaterOrEqual | And | Or | Xor | Not => DType::Bool,
        Shape | Size | ArgMax | ArgMin => DType::I64,
        Cast => op.dtype("to").unwrap_or(first),
        CastLike => input_dtype(1).unwrap_or(first),
        QuantizeLinear => input_dtype(2).or(op.dtype("output_dtype")).unwrap_or(DType::U8),
        DequantizeLinear => input_dtype(1).unwrap_or(DType::F32),
        DynamicQuantizeLinear => {
            return [DType::U8, DType::F32, DType::U8].into_iter().map(TensorType::unranked).take(count).collect()
        }
        MatMulInteger => DType::I32,
        QLinearMatMul => input_dtype(7).unwrap_or(DType::U8),
        ConstantOfShape => op.tensor("value").map_or(DType::F32, |t| t.dtype),
        Where => input_dtype(1).unwrap_or(first),
        _ => first,
    };
    vec![TensorType::unranked(dtype); count]
}

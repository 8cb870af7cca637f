//! The registry of ONNX op converters, one module per op family (as in tract).
//!
//! Each family registers the op types it handles with the first opset whose semantics it accepts and a
//! converter. A converter normalises every accepted opset to one IR form (e.g. `axes` attributes become
//! constant inputs, the opset-18 form) and may emit helper nodes; it returns the main node, which takes the
//! ONNX node's output names. Converters report an opset/attribute combination they cannot represent as
//! [`NodeError::Unsupported`], so all such nodes of a model are listed in one error.

mod elementwise;
mod linalg;
mod nn;
mod quant;
mod reduce;
mod shape;
mod vision;

use qcc_ir::{Attr, Attrs, DType, Graph, Op, OpKind, Tensor, TensorType, Value};
use std::collections::HashMap;
use std::sync::OnceLock;

/// Newest ONNX opset accepted. Opsets 24 and 25 changed the ops registered here only by admitting new
/// element types (float8e8m0, int2, float4), which the dtype checks reject where they occur.
pub const MAX_ONNX_OPSET: i64 = 25;

/// Operator-set domains the importer knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Domain {
    /// "" or "ai.onnx".
    Onnx,
    /// "com.microsoft" (onnxruntime contrib ops).
    Microsoft,
}

impl Domain {
    pub fn parse(domain: &str) -> Option<Domain> {
        match domain {
            "" | "ai.onnx" => Some(Domain::Onnx),
            "com.microsoft" => Some(Domain::Microsoft),
            _ => None,
        }
    }
}

/// Why one node could not be converted.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeError {
    /// The op, opset or attribute combination is valid ONNX that qcc does not handle.
    Unsupported(String),
    /// The node is malformed (wrong attribute type, missing required input, ...).
    Invalid(String),
    /// A tensor (attribute) has an element type qcc has no dtype for; `what` names it.
    UnsupportedDType { what: String, dtype: i32 },
}

/// The converted main node: its op and input slots (`None` for absent optional inputs).
#[derive(Debug)]
pub struct Lowered {
    pub op: Op,
    pub inputs: Vec<Option<Value>>,
}

pub type ConvertFn = fn(&mut NodeCx<'_>, OpKind) -> Result<Lowered, NodeError>;

/// One registered ONNX op type.
#[derive(Clone, Copy)]
pub struct OpDef {
    pub domain: Domain,
    pub op_type: &'static str,
    /// Oldest opset whose semantics the converter handles.
    pub since: i64,
    /// The IR kind of the main node.
    pub kind: OpKind,
    pub convert: ConvertFn,
}

#[derive(Default)]
pub struct Registry {
    /// Definitions by op type (one per domain).
    defs: HashMap<&'static str, Vec<OpDef>>,
}

impl Registry {
    /// The registry of all families, built once.
    pub fn global() -> &'static Registry {
        static REGISTRY: OnceLock<Registry> = OnceLock::new();
        REGISTRY.get_or_init(|| {
            let mut r = Registry::default();
            elementwise::register(&mut r);
            linalg::register(&mut r);
            nn::register(&mut r);
            reduce::register(&mut r);
            shape::register(&mut r);
            quant::register(&mut r);
            vision::register(&mut r);
            r
        })
    }

    fn add(&mut self, domain: Domain, op_type: &'static str, since: i64, kind: OpKind, convert: ConvertFn) {
        let defs = self.defs.entry(op_type).or_default();
        debug_assert!(defs.iter().all(|d| d.domain != domain), "{op_type} registered twice");
        defs.push(OpDef { domain, op_type, since, kind, convert });
    }

    /// An ONNX-domain op whose IR kind has the same name and whose converter is [`direct`].
    fn direct(&mut self, kind: OpKind, since: i64) {
        self.add(Domain::Onnx, kind.onnx_name(), since, kind, direct);
    }

    /// The converter for `op_type` in `domain` at `opset`, or why there is none.
    pub fn lookup(&self, domain: &str, op_type: &str, opset: i64) -> Result<&OpDef, String> {
        let parsed = Domain::parse(domain).ok_or_else(|| format!("operator domain '{domain}' is not supported"))?;
        let def = self
            .defs
            .get(op_type)
            .and_then(|defs| defs.iter().find(|d| d.domain == parsed))
            .ok_or_else(|| "no converter for this op type".to_string())?;
        if opset < def.since {
            return Err(format!("opset {opset} is older than the oldest supported version ({})", def.since));
        }
        if parsed == Domain::Onnx && opset > MAX_ONNX_OPSET {
            return Err(format!("opset {opset} is newer than the newest supported version ({MAX_ONNX_OPSET})"));
        }
        Ok(def)
    }

    /// Every registered (domain, op type).
    pub fn op_types(&self) -> impl Iterator<Item = (Domain, &'static str)> + '_ {
        self.defs.values().flatten().map(|d| (d.domain, d.op_type))
    }
}

/// What a converter sees of one node.
pub struct NodeCx<'a> {
    /// Node name for messages and helper-node names.
    pub name: &'a str,
    pub op_type: &'a str,
    pub opset: i64,
    /// Attributes converted generically (ints, floats, strings, tensors).
    pub attrs: Attrs,
    /// Input slots by ONNX position, `None` where the name is empty.
    pub inputs: Vec<Option<Value>>,
    pub num_outputs: usize,
    pub graph: &'a mut Graph,
}

impl NodeCx<'_> {
    pub fn input(&self, i: usize) -> Option<Value> {
        self.inputs.get(i).copied().flatten()
    }

    pub fn input_type(&self, i: usize) -> Option<&TensorType> {
        self.input(i).map(|v| self.graph.value_type(v))
    }

    pub fn input_dtype(&self, i: usize) -> Option<DType> {
        self.input_type(i).map(|t| t.dtype)
    }

    pub fn input_rank(&self, i: usize) -> Option<usize> {
        self.input_type(i).and_then(|t| t.shape.as_ref()).map(|s| s.rank())
    }

    /// The constant behind input `i`, when it is one.
    pub fn input_constant(&self, i: usize) -> Option<&Tensor> {
        self.input(i).and_then(|v| self.graph.constant(v))
    }

    pub fn take(&mut self, name: &str) -> Option<Attr> {
        self.attrs.remove(name)
    }

    pub fn has(&self, name: &str) -> bool {
        self.attrs.contains_key(name)
    }

    pub fn int(&self, name: &str) -> Result<Option<i64>, NodeError> {
        match self.attrs.get(name) {
            None => Ok(None),
            Some(Attr::Int(v)) => Ok(Some(*v)),
            Some(other) => Err(wrong_type(name, "an int", other)),
        }
    }

    pub fn take_ints(&mut self, name: &str) -> Result<Option<Vec<i64>>, NodeError> {
        match self.attrs.remove(name) {
            None => Ok(None),
            Some(Attr::Ints(v)) => Ok(Some(v)),
            // A single int where a list is expected is a common exporter slip that means the same.
            Some(Attr::Int(v)) => Ok(Some(vec![v])),
            Some(other) => Err(wrong_type(name, "a list of ints", &other)),
        }
    }

    pub fn take_float(&mut self, name: &str) -> Result<Option<f32>, NodeError> {
        match self.attrs.remove(name) {
            None => Ok(None),
            Some(Attr::Float(v)) => Ok(Some(v)),
            Some(Attr::Int(v)) => Ok(Some(v as f32)),
            Some(other) => Err(wrong_type(name, "a float", &other)),
        }
    }

    /// Adds an owned constant helper node (a normalised attribute) and returns its value.
    pub fn constant(&mut self, what: &str, tensor: Tensor) -> Value {
        let base = format!("{}_{what}_", self.name);
        let value_name = self.graph.fresh_name(&base);
        let ty = TensorType::known(tensor.dtype, &tensor.dims);
        let op = Op::new(OpKind::Constant).with("value", Attr::Tensor(tensor));
        let id = self
            .graph
            .add_node(value_name.clone(), op, &[], vec![qcc_ir::ValueInfo::new(value_name, ty)])
            .expect("fresh names are unique");
        Value::new(id, 0)
    }

    pub fn constant_i64s(&mut self, what: &str, values: &[i64]) -> Value {
        self.constant(what, Tensor::from_slice(vec![values.len()], values))
    }

    /// A scalar constant of `dtype` (the input's element type) holding `value`.
    pub fn constant_scalar(&mut self, what: &str, dtype: DType, value: f64) -> Result<Value, NodeError> {
        let tensor = scalar_of(dtype, value)
            .ok_or_else(|| NodeError::Unsupported(format!("cannot make a {dtype} scalar for attribute '{what}'")))?;
        Ok(self.constant(what, tensor))
    }

    /// Adds a helper node with one output of an unranked type of `dtype` (type inference refines it).
    pub fn emit(&mut self, op: Op, inputs: &[Value], dtype: DType) -> Value {
        self.graph.add_op(op, inputs, TensorType::unranked(dtype))
    }

    /// The main node: `kind` with the remaining attributes and the current input slots.
    pub fn finish(&mut self, kind: OpKind) -> Lowered {
        Lowered { op: Op { kind, attrs: std::mem::take(&mut self.attrs) }, inputs: std::mem::take(&mut self.inputs) }
    }

    /// Sets input slot `i`, growing the slot list with absent slots.
    pub fn set_input(&mut self, i: usize, value: Option<Value>) {
        if self.inputs.len() <= i {
            self.inputs.resize(i + 1, None);
        }
        self.inputs[i] = value;
    }

    /// Moves an `ints` attribute into input slot `slot` as an i64 constant (the newer opsets' form). An
    /// attribute given together with the input is invalid.
    pub fn ints_attr_to_input(&mut self, attr: &str, slot: usize) -> Result<(), NodeError> {
        if let Some(values) = self.take_ints(attr)? {
            if self.input(slot).is_some() {
                return Err(NodeError::Invalid(format!("'{attr}' is given both as attribute and as input")));
            }
            let v = self.constant_i64s(attr, &values);
            self.set_input(slot, Some(v));
        }
        Ok(())
    }

    /// Rejects a legacy (opset < 7) `broadcast=1` attribute, whose axis-aligned broadcasting differs from
    /// numpy's; `broadcast=0` (same shapes) means the same as today and is dropped.
    pub fn reject_legacy_broadcast(&mut self) -> Result<(), NodeError> {
        match self.take("broadcast") {
            None | Some(Attr::Int(0)) => {
                self.take("axis");
                Ok(())
            }
            Some(_) => Err(NodeError::Unsupported("legacy broadcast=1 semantics (opset < 7)".into())),
        }
    }
}

fn wrong_type(name: &str, want: &str, got: &Attr) -> NodeError {
    NodeError::Invalid(format!("attribute '{name}' should be {want}, got {got:?}"))
}

/// A scalar tensor of `dtype` with value `value` (rounded for integers).
pub fn scalar_of(dtype: DType, value: f64) -> Option<Tensor> {
    Some(match dtype {
        DType::F32 => Tensor::scalar(value as f32),
        DType::F64 => Tensor::scalar(value),
        DType::F16 => Tensor::scalar(half::f16::from_f64(value)),
        DType::BF16 => Tensor::scalar(half::bf16::from_f64(value)),
        DType::I64 => Tensor::scalar(value as i64),
        DType::I32 => Tensor::scalar(value as i32),
        DType::I16 => Tensor::scalar(value as i16),
        DType::I8 => Tensor::scalar(value as i8),
        DType::U64 => Tensor::scalar(value as u64),
        DType::U32 => Tensor::scalar(value as u32),
        DType::U16 => Tensor::scalar(value as u16),
        DType::U8 => Tensor::scalar(value as u8),
        _ => return None,
    })
}

/// The same op with the same inputs and attributes.
pub fn direct(cx: &mut NodeCx<'_>, kind: OpKind) -> Result<Lowered, NodeError> {
    Ok(cx.finish(kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_onnx_op_kind_is_registered() {
        let registry = Registry::global();
        for &kind in OpKind::ALL {
            if kind.onnx_name().is_empty() {
                continue;
            }
            let def = registry.lookup("", kind.onnx_name(), 23);
            assert!(def.is_ok(), "{} is not importable at opset 23: {:?}", kind.onnx_name(), def.err());
        }
        assert!(registry.lookup("com.microsoft", "SimplifiedLayerNormalization", 1).is_ok());
    }

    #[test]
    fn lookup_explains_failures() {
        let registry = Registry::global();
        assert_eq!(registry.lookup("", "NoSuchOp", 17).err().unwrap(), "no converter for this op type");
        assert!(registry.lookup("", "Gelu", 17).err().unwrap().contains("older than"));
        assert!(registry.lookup("", "Add", 99).err().unwrap().contains("newer than"));
        assert!(registry.lookup("ai.onnx.ml", "Add", 3).err().unwrap().contains("domain 'ai.onnx.ml'"));
    }
}

//! Small builders for ONNX models made in code: tests, fuzz seeds and tools that emit ONNX use them
//! rather than spelling out protobuf structs.

use super::proto::{
    data_location, data_type, tensor_shape_proto, type_proto, AttributeProto, GraphProto, ModelProto, NodeProto,
    OperatorSetIdProto, StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};

/// An f32 initializer with its values in `raw_data`.
pub fn raw_f32_tensor(name: &str, dims: &[i64], values: &[f32]) -> TensorProto {
    let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: data_type::FLOAT,
        raw_data: raw.into(),
        ..Default::default()
    }
}

/// An f32 initializer whose data lies in `location` (relative to the model's folder) at `offset`.
pub fn external_f32_tensor(name: &str, dims: &[i64], location: &str, offset: u64, length: Option<u64>) -> TensorProto {
    let mut entries = vec![entry("location", location), entry("offset", &offset.to_string())];
    if let Some(l) = length {
        entries.push(entry("length", &l.to_string()));
    }
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: data_type::FLOAT,
        data_location: data_location::EXTERNAL,
        external_data: entries,
        ..Default::default()
    }
}

pub fn entry(key: &str, value: &str) -> StringStringEntryProto {
    StringStringEntryProto { key: key.into(), value: value.into() }
}

/// One dimension of a declared shape.
pub enum DimSpec {
    Value(i64),
    Param(&'static str),
    Missing,
}

/// A tensor-typed `ValueInfoProto` (graph input or output declaration).
pub fn tensor_value_info(name: &str, elem_type: i32, dims: &[DimSpec]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: match d {
                DimSpec::Value(n) => Some(tensor_shape_proto::dimension::Value::DimValue(*n)),
                DimSpec::Param(s) => Some(tensor_shape_proto::dimension::Value::DimParam(s.to_string())),
                DimSpec::Missing => None,
            },
            denotation: String::new(),
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(type_proto::Tensor { elem_type, shape: Some(TensorShapeProto { dim }) }),
            denotation: String::new(),
        }),
        doc_string: String::new(),
    }
}

pub fn node(name: &str, op_type: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        name: name.into(),
        op_type: op_type.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute: attrs,
        ..Default::default()
    }
}

/// An INTS attribute (AttributeProto type 7).
pub fn attr_ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: 7, ints: values.to_vec(), ..Default::default() }
}

/// An INT attribute (AttributeProto type 2).
pub fn attr_int(name: &str, value: i64) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: 2, i: value, ..Default::default() }
}

/// A model of the default ONNX domain at `opset`.
pub fn model(graph: GraphProto, opset: i64) -> ModelProto {
    ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: opset }],
        producer_name: "qcc".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph),
        ..Default::default()
    }
}

/// A graph whose outputs are declared by name only (their types are inferred on import).
pub fn graph(
    nodes: Vec<NodeProto>,
    init: Vec<TensorProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: &[&str],
) -> GraphProto {
    GraphProto {
        name: "g".into(),
        node: nodes,
        initializer: init,
        input: inputs,
        output: outputs.iter().map(|o| ValueInfoProto { name: o.to_string(), ..Default::default() }).collect(),
        ..Default::default()
    }
}

//! Shape and data-movement ops. Attributes that later opsets turned into inputs (Squeeze/Unsqueeze `axes`,
//! Split `split`, Slice `starts/ends/axes`, Pad `pads/value`) become constant inputs.

use super::{Domain, Lowered, NodeCx, NodeError, Registry};
use crate::onnx::proto::data_type;
use qcc_ir::{Attr, DType, OpKind, Tensor};

pub(super) fn register(r: &mut Registry) {
    use OpKind::*;
    for kind in [Shape, Size, Transpose, Flatten, Gather] {
        r.direct(kind, 1);
    }
    r.direct(Reshape, 5);
    r.direct(Expand, 8);
    r.direct(Tile, 6);
    r.direct(ConstantOfShape, 9);
    r.direct(GatherElements, 11);
    r.direct(Range, 11);
    r.direct(Trilu, 14);
    r.add(Domain::Onnx, "Squeeze", 1, Squeeze, axes_to_input);
    r.add(Domain::Onnx, "Unsqueeze", 1, Unsqueeze, axes_to_input);
    r.add(Domain::Onnx, "Concat", 1, Concat, concat);
    r.add(Domain::Onnx, "Split", 2, Split, split);
    r.add(Domain::Onnx, "Slice", 1, Slice, slice);
    r.add(Domain::Onnx, "Pad", 2, Pad, pad);
    r.add(Domain::Onnx, "Constant", 1, Constant, constant);
}

/// Every form of Constant's payload becomes one `value` tensor.
fn constant(cx: &mut NodeCx<'_>, kind: OpKind) -> Result<Lowered, NodeError> {
    let mut payloads: Vec<(String, Attr)> = std::mem::take(&mut cx.attrs).into_iter().collect();
    if payloads.len() != 1 {
        let names: Vec<&str> = payloads.iter().map(|(n, _)| n.as_str()).collect();
        return Err(NodeError::Invalid(format!("Constant needs exactly one value attribute, has {names:?}")));
    }
    let (name, value) = payloads.remove(0);
    let tensor = match (name.as_str(), value) {
        ("value", Attr::Tensor(t)) => t,
        ("value_float", Attr::Float(v)) => Tensor::scalar(v),
        ("value_floats", Attr::Floats(v)) => Tensor::from_slice(vec![v.len()], &v),
        ("value_int", Attr::Int(v)) => Tensor::scalar(v),
        ("value_ints", Attr::Ints(v)) => Tensor::from_slice(vec![v.len()], &v),
        ("value_string" | "value_strings", _) => {
            return Err(NodeError::UnsupportedDType { what: format!("attribute '{name}'"), dtype: data_type::STRING })
        }
        (_, other) => {
            return Err(NodeError::Invalid(format!("Constant attribute '{name}' = {other:?} is not a value")))
        }
    };
    cx.attrs.insert("value".into(), Attr::Tensor(tensor));
    cx.inputs.clear();
    Ok(cx.finish(kind))
}

fn axes_to_input(cx: &mut NodeCx<'_>, kind: OpKind) -> Result<Lowered, NodeError> {
    cx.ints_attr_to_input("axes", 1)?;
    Ok(cx.finish(kind))
}

/// Concat before opset 4 defaulted `axis` to 1; later opsets require it.
fn concat(cx: &mut NodeCx<'_>, kind: OpKind) -> Result<Lowered, NodeError> {
    if cx.opset < 4 && !cx.has("axis") {
        cx.attrs.insert("axis".into(), Attr::Int(1));
    }
    Ok(cx.finish(kind))
}

fn split(cx: &mut NodeCx<'_>, kind: OpKind) -> Result<Lowered, NodeError> {
    cx.ints_attr_to_input("split", 1)?;
    Ok(cx.finish(kind))
}

/// Slice before opset 10: `starts`, `ends`, `axes` attributes (no steps) -> inputs 1, 2, 3.
fn slice(cx: &mut NodeCx<'_>, kind: OpKind) -> Result<Lowered, NodeError> {
    if cx.opset < 10 {
        if !cx.has("starts") || !cx.has("ends") {
            return Err(NodeError::Invalid("Slice before opset 10 needs 'starts' and 'ends' attributes".into()));
        }
        cx.ints_attr_to_input("starts", 1)?;
        cx.ints_attr_to_input("ends", 2)?;
        cx.ints_attr_to_input("axes", 3)?;
    }
    Ok(cx.finish(kind))
}

/// Pad before opset 11: `pads` attribute -> input 1, `value` attribute -> a scalar input 2 of the data type.
fn pad(cx: &mut NodeCx<'_>, kind: OpKind) -> Result<Lowered, NodeError> {
    if cx.opset < 11 {
        if !cx.has("pads") {
            return Err(NodeError::Invalid("Pad before opset 11 needs a 'pads' attribute".into()));
        }
        cx.ints_attr_to_input("pads", 1)?;
        if let Some(value) = cx.take_float("value")? {
            let dtype = cx.input_dtype(0).unwrap_or(DType::F32);
            let v = cx.constant_scalar("value", dtype, f64::from(value))?;
            cx.set_input(2, Some(v));
        }
    }
    Ok(cx.finish(kind))
}

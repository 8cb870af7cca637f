//! Elementwise ops: arithmetic, unary math, activations, comparisons, logic, casts, and Dropout (an identity
//! at inference).

use super::{direct, Domain, Lowered, NodeCx, NodeError, Registry};
use crate::onnx::proto::data_type;
use crate::onnx::tensor::dtype_from_onnx;
use qcc_ir::{Attr, DType, OpKind};

pub(super) fn register(r: &mut Registry) {
    use OpKind::*;
    // Binary ops that had axis-aligned `broadcast` attributes before opset 7.
    for kind in [Add, Sub, Mul, Div, Pow, Equal, Less, Greater, And, Or, Xor] {
        r.add(Domain::Onnx, kind.onnx_name(), 1, kind, legacy_binary);
    }
    r.direct(Mod, 10);
    r.direct(LessOrEqual, 12);
    r.direct(GreaterOrEqual, 12);
    // Variadic ops: opsets before 8 required equal shapes, a special case of numpy broadcasting.
    for kind in [Max, Min, Sum, Mean] {
        r.direct(kind, 1);
    }
    r.add(Domain::Onnx, "Clip", 1, Clip, clip);
    r.direct(Where, 9);
    // Unary ops (opset 1's `consumed_inputs` is dropped for every op by the driver).
    for kind in [Neg, Abs, Sqrt, Reciprocal, Exp, Log, Tanh, Sigmoid, HardSigmoid, Relu, LeakyRelu, Softplus] {
        r.direct(kind, 1);
    }
    r.direct(Floor, 1);
    r.direct(Ceil, 1);
    r.direct(Not, 1);
    r.direct(Identity, 1);
    r.direct(Sin, 7);
    r.direct(Cos, 7);
    r.direct(Erf, 9);
    r.direct(Sign, 9);
    r.direct(Round, 11);
    r.direct(Gelu, 20);
    // onnxruntime's contrib Gelu is the exact (erf) form, opset-20 Gelu's default.
    r.add(Domain::Microsoft, "Gelu", 1, Gelu, direct);
    r.add(Domain::Onnx, "Cast", 1, Cast, cast);
    r.direct(CastLike, 15);
    r.add(Domain::Onnx, "Dropout", 1, Identity, dropout);
}

fn legacy_binary(cx: &mut NodeCx<'_>, kind: OpKind) -> Result<Lowered, NodeError> {
    cx.reject_legacy_broadcast()?;
    Ok(cx.finish(kind))
}

/// Clip before opset 11 took `min`/`max` as float attributes; they become scalar inputs of the input's type.
fn clip(cx: &mut NodeCx<'_>, kind: OpKind) -> Result<Lowered, NodeError> {
    if cx.opset < 11 {
        let dtype = cx.input_dtype(0).unwrap_or(DType::F32);
        for (slot, attr) in [(1, "min"), (2, "max")] {
            if let Some(bound) = cx.take_float(attr)? {
                let v = cx.constant_scalar(attr, dtype, f64::from(bound))?;
                cx.set_input(slot, Some(v));
            }
        }
    }
    Ok(cx.finish(kind))
}

/// `to` becomes a dtype attribute (opset 1 spelled it as a type name string).
fn cast(cx: &mut NodeCx<'_>, kind: OpKind) -> Result<Lowered, NodeError> {
    let id = match cx.take("to") {
        Some(Attr::Int(id)) => id as i32,
        Some(Attr::Str(name)) => onnx_type_id_by_name(&name)
            .ok_or_else(|| NodeError::Invalid(format!("Cast 'to' names unknown type '{name}'")))?,
        Some(other) => return Err(NodeError::Invalid(format!("Cast 'to' should be a data type, got {other:?}"))),
        None => return Err(NodeError::Invalid("Cast has no 'to' attribute".into())),
    };
    let dtype =
        dtype_from_onnx(id).ok_or_else(|| NodeError::UnsupportedDType { what: "Cast target".into(), dtype: id })?;
    cx.attrs.insert("to".into(), Attr::DType(dtype));
    Ok(cx.finish(kind))
}

fn onnx_type_id_by_name(name: &str) -> Option<i32> {
    (0..=data_type::INT2).find(|&id| data_type::name(id).eq_ignore_ascii_case(name))
}

/// Inference-mode Dropout is the identity. Training mode (a true `training_mode` input, or opset < 7's
/// `is_test=0`) is not representable.
fn dropout(cx: &mut NodeCx<'_>, kind: OpKind) -> Result<Lowered, NodeError> {
    if cx.take("is_test").is_some_and(|a| a == Attr::Int(0)) {
        return Err(NodeError::Unsupported("training-mode Dropout (is_test=0)".into()));
    }
    if cx.input(2).is_some() {
        let training = cx.input_constant(2).map(|t| t.to_i64_vec().map(|v| v.iter().any(|&x| x != 0)));
        match training {
            Some(Ok(false)) => {}
            _ => {
                return Err(NodeError::Unsupported(
                    "Dropout with a training_mode input that is not constant false".into(),
                ))
            }
        }
    }
    cx.attrs.clear();
    cx.inputs.truncate(1);
    Ok(cx.finish(kind))
}

//! Normalisation and activation blocks: Softmax, LogSoftmax, LayerNormalization, RMSNormalization,
//! SimplifiedLayerNormalization (onnxruntime contrib) and inference-mode BatchNormalization.

use super::{direct, Domain, Lowered, NodeCx, NodeError, Registry};
use qcc_ir::{Attr, DType, Op, OpKind};

pub(super) fn register(r: &mut Registry) {
    r.add(Domain::Onnx, "Softmax", 1, OpKind::Softmax, softmax);
    r.add(Domain::Onnx, "LogSoftmax", 1, OpKind::LogSoftmax, softmax);
    r.direct(OpKind::LayerNormalization, 17);
    r.direct(OpKind::RmsNormalization, 23);
    // Exporters emit it in the contrib domain, and some in the default one.
    r.add(Domain::Microsoft, "SimplifiedLayerNormalization", 1, OpKind::SimplifiedLayerNormalization, direct);
    r.add(Domain::Onnx, "SimplifiedLayerNormalization", 1, OpKind::SimplifiedLayerNormalization, direct);
    r.add(Domain::Onnx, "BatchNormalization", 6, OpKind::BatchNormalization, batch_norm);
}

/// Before opset 13, Softmax/LogSoftmax flattened the input to 2-D at `axis` (default 1) and normalised
/// each row. That equals the opset-13 form when `axis` is the last axis; otherwise it is rewritten exactly
/// as `reshape(softmax(flatten(x, axis), axis=1), shape(x))`.
fn softmax(cx: &mut NodeCx<'_>, kind: OpKind) -> Result<Lowered, NodeError> {
    if cx.opset >= 13 {
        return Ok(cx.finish(kind));
    }
    let axis = cx.int("axis")?.unwrap_or(1);
    let is_last = axis == -1 || cx.input_rank(0).is_some_and(|rank| axis == rank as i64 - 1);
    if is_last {
        cx.attrs.insert("axis".into(), Attr::Int(-1));
        return Ok(cx.finish(kind));
    }
    let x = cx.input(0).ok_or_else(|| NodeError::Invalid("missing input".into()))?;
    let dtype = cx.input_dtype(0).unwrap_or(DType::F32);
    let shape = cx.emit(Op::new(OpKind::Shape), &[x], DType::I64);
    let flat = cx.emit(Op::new(OpKind::Flatten).with("axis", Attr::Int(axis)), &[x], dtype);
    let normalised = cx.emit(Op::new(kind).with("axis", Attr::Int(1)), &[flat], dtype);
    cx.attrs.clear();
    cx.inputs = vec![Some(normalised), Some(shape)];
    Ok(cx.finish(OpKind::Reshape))
}

/// Only the inference form: `spatial` (opsets 7-8) must be 1, `is_test` (opset 6) and `training_mode`
/// (14+) must not ask for training.
fn batch_norm(cx: &mut NodeCx<'_>, kind: OpKind) -> Result<Lowered, NodeError> {
    if cx.take("spatial").is_some_and(|s| s != Attr::Int(1)) {
        return Err(NodeError::Unsupported("BatchNormalization with spatial=0".into()));
    }
    if cx.take("is_test").is_some_and(|s| s == Attr::Int(0)) {
        return Err(NodeError::Unsupported("training-mode BatchNormalization (is_test=0)".into()));
    }
    if cx.take("training_mode").is_some_and(|s| s != Attr::Int(0)) {
        return Err(NodeError::Unsupported("training-mode BatchNormalization (training_mode=1)".into()));
    }
    Ok(cx.finish(kind))
}

//! Vision ops: convolution, pooling, resize.

use super::{Domain, Lowered, NodeCx, NodeError, Registry};
use qcc_ir::OpKind;

pub(super) fn register(r: &mut Registry) {
    r.direct(OpKind::Conv, 1);
    // MaxPool 8's optional Indices output is handled by the driver (dropped when unused).
    r.direct(OpKind::MaxPool, 1);
    r.direct(OpKind::AveragePool, 1);
    r.direct(OpKind::GlobalAveragePool, 1);
    r.add(Domain::Onnx, "Resize", 10, OpKind::Resize, resize);
}

/// Resize 10 took (X, scales) with Upsample's implementation-defined nearest rounding, which no opset-11
/// attribute combination reproduces exactly; only 11+ is accepted.
fn resize(cx: &mut NodeCx<'_>, kind: OpKind) -> Result<Lowered, NodeError> {
    if cx.opset < 11 {
        return Err(NodeError::Unsupported("Resize before opset 11 (Upsample-style coordinate rounding)".into()));
    }
    Ok(cx.finish(kind))
}

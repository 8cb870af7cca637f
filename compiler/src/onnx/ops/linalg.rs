//! Linear algebra: MatMul, Gemm and the integer / quantized matmuls.

use super::{direct, Domain, Lowered, NodeCx, NodeError, Registry};
use qcc_ir::OpKind;

pub(super) fn register(r: &mut Registry) {
    r.direct(OpKind::MatMul, 1);
    // Gemm 6 only differs by a `broadcast` flag; C broadcasting unidirectionally is today's rule either way.
    r.add(Domain::Onnx, "Gemm", 6, OpKind::Gemm, gemm);
    r.direct(OpKind::MatMulInteger, 10);
    r.add(Domain::Onnx, "QLinearMatMul", 10, OpKind::QLinearMatMul, direct);
}

fn gemm(cx: &mut NodeCx<'_>, kind: OpKind) -> Result<Lowered, NodeError> {
    cx.take("broadcast");
    Ok(cx.finish(kind))
}

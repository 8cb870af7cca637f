//! Quantization ops in ONNX form: QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear.

use super::{Domain, Lowered, NodeCx, NodeError, Registry};
use crate::onnx::tensor::dtype_from_onnx;
use qcc_ir::{Attr, OpKind};

pub(super) fn register(r: &mut Registry) {
    // Opset 10 is per-tensor only; 13 adds `axis`, 19 float8 and `saturate`, 21 `block_size` and
    // `output_dtype`. Absent attributes keep their defaults, so one converter covers them all.
    r.add(Domain::Onnx, "QuantizeLinear", 10, OpKind::QuantizeLinear, output_dtype);
    r.add(Domain::Onnx, "DequantizeLinear", 10, OpKind::DequantizeLinear, output_dtype);
    r.direct(OpKind::DynamicQuantizeLinear, 11);
}

/// `output_dtype` (a data type id; QuantizeLinear 21+, DequantizeLinear 23+) becomes a dtype attribute; 0
/// means "from the zero point / scale" and is dropped.
fn output_dtype(cx: &mut NodeCx<'_>, kind: OpKind) -> Result<Lowered, NodeError> {
    match cx.take("output_dtype") {
        None | Some(Attr::Int(0)) => {}
        Some(Attr::Int(id)) => {
            let id = id as i32;
            let dtype =
                dtype_from_onnx(id).ok_or(NodeError::UnsupportedDType { what: "output_dtype".into(), dtype: id })?;
            cx.attrs.insert("output_dtype".into(), Attr::DType(dtype));
        }
        Some(other) => return Err(NodeError::Invalid(format!("output_dtype should be an int, got {other:?}"))),
    }
    Ok(cx.finish(kind))
}

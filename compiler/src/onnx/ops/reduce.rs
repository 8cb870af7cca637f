//! Reductions: ReduceMean/Sum/Max/Min/Prod (normalised to the axes-as-input form), ArgMax/ArgMin, CumSum.

use super::{Domain, Lowered, NodeCx, NodeError, Registry};
use qcc_ir::OpKind;

pub(super) fn register(r: &mut Registry) {
    for kind in [OpKind::ReduceMean, OpKind::ReduceSum, OpKind::ReduceMax, OpKind::ReduceMin, OpKind::ReduceProd] {
        r.add(Domain::Onnx, kind.onnx_name(), 1, kind, reduce);
    }
    r.direct(OpKind::ArgMax, 1);
    r.direct(OpKind::ArgMin, 1);
    r.direct(OpKind::CumSum, 11);
}

/// `axes` moved from attribute to input in opset 13 (ReduceSum) and 18 (the others). The attribute becomes
/// an i64 constant input; without it the input stays absent (reduce all axes), which old opsets meant too
/// since `noop_with_empty_axes` did not exist and defaults to 0.
fn reduce(cx: &mut NodeCx<'_>, kind: OpKind) -> Result<Lowered, NodeError> {
    cx.ints_attr_to_input("axes", 1)?;
    Ok(cx.finish(kind))
}

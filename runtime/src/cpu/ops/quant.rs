//! TODO
use crate::cpu::ops::{bail, OpCtx, OpResult};
use crate::cpu::value::RtTensor;
pub fn quantize_linear(_ctx: &OpCtx) -> OpResult<RtTensor> {
    bail!("todo")
}
pub fn dequantize_linear(_ctx: &OpCtx) -> OpResult<RtTensor> {
    bail!("todo")
}
pub fn dynamic_quantize_linear(_ctx: &OpCtx) -> OpResult<Vec<RtTensor>> {
    bail!("todo")
}
pub fn quantize(_ctx: &OpCtx) -> OpResult<RtTensor> {
    bail!("todo")
}
pub fn dequantize(_ctx: &OpCtx) -> OpResult<RtTensor> {
    bail!("todo")
}

//! TODO
use crate::cpu::ops::{bail, OpCtx, OpResult};
use crate::cpu::value::RtTensor;
pub fn conv(_ctx: &OpCtx) -> OpResult<RtTensor> {
    bail!("todo")
}
pub fn pool(_ctx: &OpCtx, _m: bool) -> OpResult<RtTensor> {
    bail!("todo")
}
pub fn global_average_pool(_ctx: &OpCtx) -> OpResult<RtTensor> {
    bail!("todo")
}
pub fn resize(_ctx: &OpCtx) -> OpResult<RtTensor> {
    bail!("todo")
}

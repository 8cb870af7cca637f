//! Quantization: ONNX QuantizeLinear / DequantizeLinear (per tensor, per axis, blocked; integer, 4-bit
//! and FP8 outputs) and DynamicQuantizeLinear, plus qcc's symmetric `quantize` / `dequantize`.
//!
//! Rounding is half to even and results saturate to the target range, as ONNX specifies. Math is f32.

use crate::cpu::ops::elementwise::zip_broadcast;
use crate::cpu::ops::{bail, norm_axis, op_err, OpCtx, OpResult};
use crate::cpu::value::{f32_to_f8, RtTensor};
use ndarray::{ArrayD, IxDyn};
use qcc_ir::DType;

/// A scale or zero point shaped to broadcast against `x_shape`: scalars as they are, 1-D per-axis
/// vectors placed on `axis`, and blocked parameters (`block > 0`) repeated `block` times along `axis`.
fn shape_param(p: ArrayD<f32>, x_shape: &[usize], axis: i64, block: i64, what: &str) -> OpResult<ArrayD<f32>> {
    let rank = x_shape.len();
    if block > 0 {
        let axis = norm_axis(axis, rank)?;
        let b = block as usize;
        if p.ndim() != rank
            || p.shape().iter().enumerate().any(|(i, &d)| if i == axis { d * b < x_shape[i] } else { d != x_shape[i] })
        {
            bail!("blocked {what} {:?} does not match x {x_shape:?} with block_size {block} on axis {axis}", p.shape());
        }
        return Ok(ArrayD::from_shape_fn(IxDyn(x_shape), |idx| {
            let mut c = idx;
            c[axis] /= b;
            p[c]
        }));
    }
    if p.len() == 1 && p.ndim() <= 1 {
        return p.into_shape_with_order(IxDyn(&[])).map_err(|e| op_err!("{e}"));
    }
    if p.ndim() == 1 {
        let axis = norm_axis(axis, rank)?;
        if p.len() != x_shape[axis] {
            bail!("per-axis {what} has {} elements but axis {axis} of {x_shape:?} has {}", p.len(), x_shape[axis]);
        }
        let mut shape = vec![1; rank];
        shape[axis] = p.len();
        return p.into_shape_with_order(IxDyn(&shape)).map_err(|e| op_err!("{e}"));
    }
    Ok(p)
}

/// Rounds (half to even), adds the zero point and saturates to `dtype` (integers) or converts (FP8).
fn to_quantized(scaled: ArrayD<f32>, zp: Option<&ArrayD<f32>>, dtype: DType, saturate: bool) -> OpResult<RtTensor> {
    if dtype == DType::F8E4M3 {
        let v = match zp {
            Some(z) => zip_broadcast(&scaled, z, |v, z| v + z)?,
            None => scaled,
        };
        return Ok(RtTensor::F8E4M3(v.mapv(|x| f32_to_f8(x, saturate))));
    }
    let (lo, hi) = dtype.int_range().ok_or_else(|| op_err!("cannot quantize to {dtype}"))?;
    let (lo, hi) = (lo as f64, hi as f64);
    let q = match zp {
        Some(z) => zip_broadcast(&scaled, z, |v, z| ((v.round_ties_even() + z) as f64).clamp(lo, hi))?,
        None => scaled.mapv(|v| (v.round_ties_even() as f64).clamp(lo, hi)),
    };
    Ok(RtTensor::F64(q).cast(dtype))
}

pub fn quantize_linear(ctx: &OpCtx) -> OpResult<RtTensor> {
    let (x, scale, zp) = (ctx.input(0)?, ctx.input(1)?, ctx.opt_input(2));
    let (axis, block) = (ctx.int("axis", 1), ctx.int("block_size", 0));
    let dtype = match zp {
        Some(z) => z.dtype(),
        None => ctx.dtype_attr("output_dtype").unwrap_or(DType::U8),
    };
    let xf = x.cast_array::<f32>();
    let s = shape_param(scale.cast_array::<f32>(), x.shape(), axis, block, "scale")?;
    let z = zp.map(|z| shape_param(z.cast_array::<f32>(), x.shape(), axis, block, "zero point")).transpose()?;
    let scaled = zip_broadcast(&xf, &s, |v, s| v / s)?;
    to_quantized(scaled, z.as_ref(), dtype, ctx.int("saturate", 1) != 0)
}

pub fn dequantize_linear(ctx: &OpCtx) -> OpResult<RtTensor> {
    let (x, scale, zp) = (ctx.input(0)?, ctx.input(1)?, ctx.opt_input(2));
    let (axis, block) = (ctx.int("axis", 1), ctx.int("block_size", 0));
    let s = shape_param(scale.cast_array::<f32>(), x.shape(), axis, block, "scale")?;
    let xd = x.cast_array::<f64>();
    let centered = match zp {
        Some(z) => {
            let z = shape_param(z.cast_array::<f32>(), x.shape(), axis, block, "zero point")?;
            zip_broadcast(&xd, &z, |v, z| (v - z as f64) as f32)?
        }
        None => xd.mapv(|v| v as f32),
    };
    let y = zip_broadcast(&centered, &s, |v, s| v * s)?;
    let dtype = ctx.dtype_attr("output_dtype").unwrap_or(scale.dtype());
    Ok(RtTensor::F32(y).cast(dtype))
}

pub fn dynamic_quantize_linear(ctx: &OpCtx) -> OpResult<Vec<RtTensor>> {
    let x = ctx.input(0)?.cast_array::<f32>();
    let (qmin, qmax) = (0f32, 255f32);
    let min = x.iter().fold(0f32, |m, &v| m.min(v));
    let max = x.iter().fold(0f32, |m, &v| m.max(v));
    let range = if max == min { 1.0 } else { max - min };
    let scale = range / (qmax - qmin);
    let zp = (qmin - min / scale).clamp(qmin, qmax).round_ties_even();
    let y = x.mapv(|v| ((v / scale).round_ties_even() + zp).clamp(qmin, qmax) as u8);
    Ok(vec![RtTensor::U8(y), RtTensor::scalar(scale), RtTensor::scalar(zp as u8)])
}

/// qcc `quantize(x, step)`: clamp(round_half_even(x / step)) into the range of attribute `to`; a vector
/// step applies along attribute `axis` (default: the last axis).
pub fn quantize(ctx: &OpCtx) -> OpResult<RtTensor> {
    let (x, step) = (ctx.input(0)?, ctx.input(1)?);
    let dtype = ctx
        .dtype_attr("to")
        .or_else(|| ctx.outputs.first().map(|o| o.ty.dtype).filter(|d| d.is_int()))
        .ok_or_else(|| op_err!("attribute 'to' is missing"))?;
    let s = shape_param(step.cast_array::<f32>(), x.shape(), ctx.int("axis", -1), 0, "step")?;
    let scaled = zip_broadcast(&x.cast_array::<f32>(), &s, |v, s| v / s)?;
    to_quantized(scaled, None, dtype, true)
}

/// qcc `dequantize(q, step)`: q * step, per tensor or along attribute `axis` (default: the last axis).
pub fn dequantize(ctx: &OpCtx) -> OpResult<RtTensor> {
    let (q, step) = (ctx.input(0)?, ctx.input(1)?);
    let s = shape_param(step.cast_array::<f32>(), q.shape(), ctx.int("axis", -1), 0, "step")?;
    let y = zip_broadcast(&q.cast_array::<f32>(), &s, |v, s| v * s)?;
    let dtype = ctx.outputs.first().map(|o| o.ty.dtype).filter(|d| d.is_float()).unwrap_or(step.dtype());
    Ok(RtTensor::F32(y).cast(dtype))
}

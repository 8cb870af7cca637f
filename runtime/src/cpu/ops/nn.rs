//! Softmax, LogSoftmax and the normalisations (LayerNormalization, RMSNormalization /
//! SimplifiedLayerNormalization, BatchNormalization in inference mode). Rows are processed in parallel;
//! sums accumulate in f64.

use crate::cpu::ops::elementwise::{FloatMath, PAR_MIN};
use crate::cpu::ops::{bail, float_dispatch, norm_axis, op_err, OpCtx, OpResult};
use crate::cpu::value::{RtTensor, Scalar};
use ndarray::{ArrayD, Axis, IxDyn, Zip};
use rayon::prelude::*;

fn softmax_array<T: FloatMath>(x: &ArrayD<T>, axis: usize, log: bool) -> ArrayD<T> {
    let mut out = x.as_standard_layout().into_owned();
    let lane = |mut lane: ndarray::ArrayViewMut1<T>| {
        let max = lane.iter().fold(T::neg_infinity(), |m, &v| if v > m { v } else { m });
        let max = if max.is_finite() { max } else { T::zero() };
        if log {
            let sum: f64 = lane.iter().map(|&v| Scalar::to_f64((v - max).exp())).sum();
            let lse = T::from_f64(sum.ln());
            lane.mapv_inplace(|v| v - max - lse);
        } else {
            let mut sum = 0f64;
            lane.mapv_inplace(|v| {
                let e = (v - max).exp();
                sum += Scalar::to_f64(e);
                e
            });
            let inv = T::from_f64(1.0 / sum);
            lane.mapv_inplace(|v| v * inv);
        }
    };
    let lanes = out.lanes_mut(Axis(axis));
    if x.len() >= PAR_MIN {
        Zip::from(lanes).par_for_each(lane);
    } else {
        Zip::from(lanes).for_each(lane);
    }
    out
}

pub fn softmax(ctx: &OpCtx, log: bool) -> OpResult<RtTensor> {
    let x = ctx.input(0)?;
    if x.shape().is_empty() {
        bail!("softmax needs rank >= 1");
    }
    let axis = norm_axis(ctx.int("axis", -1), x.shape().len())?;
    Ok(float_dispatch!(x, a => softmax_array(a, axis, log)))
}

/// Values of `p` broadcast to `shape` (the normalised trailing shape), flattened.
fn broadcast_param<T: FloatMath>(p: Option<&RtTensor>, shape: &[usize], what: &str) -> OpResult<Option<Vec<T>>> {
    let Some(p) = p else { return Ok(None) };
    let arr = p.cast_array::<T>();
    let b =
        arr.broadcast(IxDyn(shape)).ok_or_else(|| op_err!("{what} {:?} does not broadcast to {shape:?}", p.shape()))?;
    Ok(Some(b.iter().copied().collect()))
}

/// Applies `f(row, out_row)` to each row of `x` viewed as [rows, inner].
fn per_row<T: FloatMath>(x: &ArrayD<T>, inner: usize, f: impl Fn(&[T], &mut [T]) + Sync) -> OpResult<ArrayD<T>> {
    let xs = x.as_standard_layout();
    let src = xs.as_slice().ok_or_else(|| op_err!("internal: non-contiguous input"))?;
    let mut out = vec![T::zero(); src.len()];
    if inner > 0 {
        if src.len() >= PAR_MIN {
            out.par_chunks_mut(inner).zip(src.par_chunks(inner)).for_each(|(o, r)| f(r, o));
        } else {
            out.chunks_mut(inner).zip(src.chunks(inner)).for_each(|(o, r)| f(r, o));
        }
    }
    ArrayD::from_shape_vec(IxDyn(x.shape()), out).map_err(|e| op_err!("{e}"))
}

/// Layer normalisation over axes `axis..` (RMS normalisation when `rms`: no mean subtraction).
pub fn normalize<T: FloatMath>(
    x: &ArrayD<T>,
    axis: usize,
    eps: f64,
    scale: Option<&RtTensor>,
    bias: Option<&RtTensor>,
    rms: bool,
) -> OpResult<ArrayD<T>> {
    let norm_shape = &x.shape()[axis..];
    let inner: usize = norm_shape.iter().product();
    let scale = broadcast_param::<T>(scale, norm_shape, "scale")?;
    let bias = broadcast_param::<T>(bias, norm_shape, "bias")?;
    per_row(x, inner, |row, out| {
        let n = row.len() as f64;
        // Sums in the order the generated GPU kernels share (`qcc_ir::lane_sum`), for the same bits.
        let mean = if rms { 0.0 } else { qcc_ir::lane_sum(row.iter().map(|&v| Scalar::to_f64(v))) / n };
        let var = qcc_ir::lane_sum(row.iter().map(|&v| (Scalar::to_f64(v) - mean).powi(2))) / n;
        let inv = 1.0 / (var + eps).sqrt();
        for (i, (o, &v)) in out.iter_mut().zip(row).enumerate() {
            let mut y = T::from_f64((Scalar::to_f64(v) - mean) * inv);
            if let Some(s) = &scale {
                y = y * s[i];
            }
            if let Some(b) = &bias {
                y = y + b[i];
            }
            *o = y;
        }
    })
}

pub fn layer_norm(ctx: &OpCtx) -> OpResult<RtTensor> {
    let x = ctx.input(0)?;
    let axis = norm_axis(ctx.int("axis", -1), x.shape().len())?;
    let eps = ctx.float("epsilon", 1e-5) as f64;
    let (scale, bias) = (ctx.opt_input(1), ctx.opt_input(2));
    Ok(float_dispatch!(x, a => normalize(a, axis, eps, scale, bias, false)?))
}

pub fn rms_norm(ctx: &OpCtx) -> OpResult<RtTensor> {
    let x = ctx.input(0)?;
    let axis = norm_axis(ctx.int("axis", -1), x.shape().len())?;
    let eps = ctx.float("epsilon", 1e-5) as f64;
    let scale = ctx.opt_input(1);
    Ok(float_dispatch!(x, a => normalize(a, axis, eps, scale, None, true)?))
}

fn batch_norm_array<T: FloatMath>(x: &ArrayD<T>, params: [Vec<f64>; 4], eps: f64) -> OpResult<ArrayD<T>> {
    let [scale, bias, mean, var] = params;
    let channels = x.shape().get(1).copied().unwrap_or(1);
    for p in [&scale, &bias, &mean, &var] {
        if p.len() != channels {
            bail!("per-channel parameters must have {channels} elements, got {}", p.len());
        }
    }
    let mut out = x.to_owned();
    if x.ndim() < 2 {
        bail!("BatchNormalization needs rank >= 2, got {:?}", x.shape());
    }
    for (c, mut chan) in out.axis_iter_mut(Axis(1)).enumerate() {
        let k = scale[c] / (var[c] + eps).sqrt();
        chan.mapv_inplace(|v| T::from_f64((Scalar::to_f64(v) - mean[c]) * k + bias[c]));
    }
    Ok(out)
}

pub fn batch_norm(ctx: &OpCtx) -> OpResult<RtTensor> {
    let x = ctx.input(0)?;
    let eps = ctx.float("epsilon", 1e-5) as f64;
    let params = [
        ctx.input(1)?.to_f64_vec(),
        ctx.input(2)?.to_f64_vec(),
        ctx.input(3)?.to_f64_vec(),
        ctx.input(4)?.to_f64_vec(),
    ];
    Ok(float_dispatch!(x, a => batch_norm_array(a, params.clone(), eps)?))
}

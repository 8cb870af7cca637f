//! qcc's fused blocks (produced by the block-recognition passes): `linear`, `rms_norm`, `swiglu`,
//! `rotary` and grouped-query `attention`. Semantics are documented on the `OpKind` variants; these are
//! straightforward compositions of the primitive kernels. Attention computes in f32 whatever the input
//! float type (f64 inputs lose precision there).

use crate::cpu::ops::elementwise::{zip_broadcast, PAR_MIN};
use crate::cpu::ops::matmul::{as_rows, dgemm, sgemm};
use crate::cpu::ops::{bail, broadcast_shapes, float_dispatch, op_err, OpCtx, OpResult};
use crate::cpu::value::RtTensor;
use ndarray::{s, Array2, ArrayD, Axis, Ix2, IxDyn};
use qcc_ir::DType;
use rayon::prelude::*;

/// `linear(x[.., K], w[N, K], bias?[N])` = x w^T + bias.
pub fn linear(ctx: &OpCtx) -> OpResult<RtTensor> {
    let (x, w, bias) = (ctx.input(0)?, ctx.input(1)?, ctx.opt_input(2));
    if w.shape().len() != 2 || x.shape().last() != Some(&w.shape()[1]) {
        bail!("linear needs x [.., K] and w [N, K], got {:?} and {:?}", x.shape(), w.shape());
    }
    let n = w.shape()[0];
    let mut out_shape = x.shape().to_vec();
    if let Some(last) = out_shape.last_mut() {
        *last = n;
    }
    let bias_f64: Option<Vec<f64>> = bias.map(|b| b.to_f64_vec());
    if bias_f64.as_ref().is_some_and(|b| b.len() != n) {
        bail!("bias must have N = {n} elements");
    }
    if x.dtype() == DType::F64 {
        let (x2, _) = as_rows_f64(x.cast_array::<f64>())?;
        let w2 = w.cast_array::<f64>().into_dimensionality::<Ix2>().map_err(|e| op_err!("{e}"))?;
        let mut out = Array2::<f64>::zeros((x2.dim().0, n));
        dgemm(x2.view(), w2.t(), &mut out.view_mut(), 1.0, 0.0);
        if let Some(b) = &bias_f64 {
            out.rows_mut().into_iter().for_each(|mut r| r.iter_mut().zip(b).for_each(|(o, b)| *o += b));
        }
        return Ok(RtTensor::F64(out.into_shape_with_order(IxDyn(&out_shape)).map_err(|e| op_err!("{e}"))?));
    }
    if !x.dtype().is_float() {
        bail!("linear needs a float input, got {}", x.dtype());
    }
    let (x2, _) = as_rows(x.to_f32().as_standard_layout().into_owned())?;
    let wf = w.to_f32();
    let w2 = wf.view().into_dimensionality::<Ix2>().map_err(|e| op_err!("{e}"))?;
    let mut out = Array2::<f32>::zeros((x2.dim().0, n));
    sgemm(x2.view(), w2.t(), &mut out.view_mut(), 1.0, 0.0);
    if let Some(b) = &bias_f64 {
        let b: Vec<f32> = b.iter().map(|&v| v as f32).collect();
        out.rows_mut().into_iter().for_each(|mut r| r.iter_mut().zip(&b).for_each(|(o, b)| *o += b));
    }
    let out = out.into_shape_with_order(IxDyn(&out_shape)).map_err(|e| op_err!("{e}"))?;
    Ok(RtTensor::F32(out).cast(x.dtype()))
}

fn as_rows_f64(x: ArrayD<f64>) -> OpResult<(Array2<f64>, Vec<usize>)> {
    let shape = x.shape().to_vec();
    let k = *shape.last().ok_or_else(|| op_err!("operand must have rank >= 1"))?;
    let rows: usize = shape[..shape.len() - 1].iter().product();
    let x = x.as_standard_layout().into_owned();
    Ok((x.into_shape_with_order((rows, k)).map_err(|e| op_err!("{e}"))?, shape))
}

/// `swiglu(gate, up)` = gate * sigmoid(gate) * up.
pub fn swiglu(ctx: &OpCtx) -> OpResult<RtTensor> {
    let (gate, up) = (ctx.input(0)?, ctx.input(1)?);
    if gate.dtype() != up.dtype() {
        bail!("gate and up types differ: {} vs {}", gate.dtype(), up.dtype());
    }
    Ok(match (gate, up) {
        (RtTensor::F64(g), RtTensor::F64(u)) => RtTensor::F64(zip_broadcast(g, u, |g, u| g / (1.0 + (-g).exp()) * u)?),
        _ => {
            let (g, u) = (gate.to_f32(), up.to_f32());
            let out = zip_broadcast(&g.into_owned(), &u.into_owned(), |g, u| g / (1.0 + (-g).exp()) * u)?;
            RtTensor::F32(out).cast(gate.dtype())
        }
    })
}

/// `rotary(x[.., S, D], cos, sin)` = x * cos + rotate_half(x) * sin.
pub fn rotary(ctx: &OpCtx) -> OpResult<RtTensor> {
    let (x, cos, sin) = (ctx.input(0)?, ctx.input(1)?, ctx.input(2)?);
    let d = *x.shape().last().ok_or_else(|| op_err!("x must have rank >= 1"))?;
    if d % 2 != 0 {
        bail!("rotary needs an even last dimension, got {:?}", x.shape());
    }
    let shape = broadcast_shapes(&broadcast_shapes(x.shape(), cos.shape())?, sin.shape())?;
    if shape != x.shape() {
        bail!("cos {:?} and sin {:?} must broadcast to x {:?}", cos.shape(), sin.shape(), x.shape());
    }
    let (c, s_) = (cos.cast_array::<f32>(), sin.cast_array::<f32>());
    let cb = c.broadcast(IxDyn(&shape)).ok_or_else(|| op_err!("cos does not broadcast"))?;
    let sb = s_.broadcast(IxDyn(&shape)).ok_or_else(|| op_err!("sin does not broadcast"))?;
    let xf = x.cast_array::<f32>();
    let half = d / 2;
    let mut out = xf.clone();
    let last = Axis(xf.ndim() - 1);
    for (((mut o, xl), cl), sl) in
        out.lanes_mut(last).into_iter().zip(xf.lanes(last)).zip(cb.lanes(last)).zip(sb.lanes(last))
    {
        for i in 0..d {
            let rot = if i < half { -xl[i + half] } else { xl[i - half] };
            o[i] = xl[i] * cl[i] + rot * sl[i];
        }
    }
    Ok(RtTensor::F32(out).cast(x.dtype()))
}

/// Grouped-query attention: softmax(q k^T * scale + mask) v per head.
pub fn attention(ctx: &OpCtx) -> OpResult<RtTensor> {
    let (q, k, v, mask) = (ctx.input(0)?, ctx.input(1)?, ctx.input(2)?, ctx.opt_input(3));
    let (qs, ks, vs) = (q.shape(), k.shape(), v.shape());
    if qs.len() != 4 || ks.len() != 4 || vs.len() != 4 {
        bail!("attention needs rank-4 q, k, v, got {qs:?}, {ks:?}, {vs:?}");
    }
    let (b, hq, s_len, d) = (qs[0], qs[1], qs[2], qs[3]);
    let (hkv, t_len, dv) = (ks[1], ks[2], vs[3]);
    if ks[0] != b || vs[0] != b || ks[3] != d || vs[1] != hkv || vs[2] != t_len || hkv == 0 || hq % hkv != 0 {
        bail!("inconsistent attention shapes q {qs:?}, k {ks:?}, v {vs:?}");
    }
    let scale = ctx.op.float("scale").unwrap_or(1.0 / (d as f32).sqrt());
    let causal = ctx.int("causal", 0) != 0;
    let (qf, kf, vf) = (q.to_f32(), k.to_f32(), v.to_f32());
    let mask_f = match mask {
        Some(m) => {
            let mf = m.cast_array::<f32>();
            let target = [b, hq, s_len, t_len];
            Some(
                mf.broadcast(IxDyn(&target))
                    .ok_or_else(|| op_err!("mask {:?} does not broadcast to {target:?}", m.shape()))?
                    .to_owned(),
            )
        }
        None => None,
    };
    let mut out = ArrayD::<f32>::zeros(IxDyn(&[b, hq, s_len, dv]));
    let group = hq / hkv;
    for bi in 0..b {
        for h in 0..hq {
            let qh = qf.slice(s![bi, h, .., ..]);
            let kh = kf.slice(s![bi, h / group, .., ..]);
            let vh = vf.slice(s![bi, h / group, .., ..]);
            let mut scores = Array2::<f32>::zeros((s_len, t_len));
            sgemm(qh, kh.t(), &mut scores.view_mut(), scale, 0.0);
            if let Some(m) = &mask_f {
                scores += &m.slice(s![bi, h, .., ..]);
            }
            let row_op = |(i, mut row): (usize, ndarray::ArrayViewMut1<f32>)| {
                if causal {
                    let last_visible = (t_len + i).saturating_sub(s_len);
                    row.iter_mut().skip(last_visible + 1).for_each(|x| *x = f32::NEG_INFINITY);
                }
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                let max = if max.is_finite() { max } else { 0.0 };
                // exp and the sum in f64, rounded once to f32: the GPU kernel does the same, so the
                // result does not depend on either side's expf or on the summation order.
                let mut sum64 = 0f64;
                row.mapv_inplace(|x| {
                    let d = (x - max) as f64;
                    // Below -110, exp(d) rounds to 0 in f32 anyway: skip the libm call (masked entries
                    // are -inf or a huge negative, and exp's underflow path is slow).
                    let e = if d < -110.0 { 0.0 } else { d.exp() as f32 };
                    sum64 += e as f64;
                    e
                });
                let sum = sum64 as f32;
                if sum > 0.0 {
                    row.mapv_inplace(|x| x / sum);
                }
            };
            if s_len * t_len >= PAR_MIN {
                scores.axis_iter_mut(Axis(0)).into_par_iter().enumerate().for_each(row_op);
            } else {
                scores.axis_iter_mut(Axis(0)).enumerate().for_each(row_op);
            }
            let mut oh = out.slice_mut(s![bi, h, .., ..]);
            sgemm(scores.view(), vh, &mut oh, 1.0, 0.0);
        }
    }
    Ok(RtTensor::F32(out).cast(q.dtype()))
}

/// `rms_norm(x, gamma)` over the last axis.
pub fn rms_norm(ctx: &OpCtx) -> OpResult<RtTensor> {
    let x = ctx.input(0)?;
    let rank = x.shape().len();
    if rank == 0 {
        bail!("rms_norm needs rank >= 1");
    }
    let eps = ctx.float("epsilon", 1e-5) as f64;
    let (gamma, beta) = (ctx.opt_input(1), ctx.opt_input(2));
    Ok(float_dispatch!(x, a => crate::cpu::ops::nn::normalize(a, rank - 1, eps, gamma, beta, true)?))
}

/// `hadamard(x) {size}`: the orthonormal Hadamard transform of the last axis, computed in f64.
pub fn hadamard(ctx: &OpCtx) -> OpResult<RtTensor> {
    let x = ctx.input(0)?;
    let n = *x.shape().last().ok_or_else(|| op_err!("hadamard needs rank >= 1"))?;
    let size = ctx.int("size", 0);
    if size != n as i64 {
        bail!("attribute size = {size} differs from the last dimension {n}");
    }
    if !x.dtype().is_float() {
        bail!("hadamard needs a float input, got {}", x.dtype());
    }
    let h = qcc_ir::hadamard::Hadamard::new(n);
    let mut data = x.cast_array::<f64>().as_standard_layout().into_owned();
    let flat = data.as_slice_mut().ok_or_else(|| op_err!("non-contiguous data"))?;
    let rows = |row: &mut [f64]| h.transform(row).map_err(|e| op_err!("{e}"));
    if flat.len() >= PAR_MIN {
        flat.par_chunks_mut(n).try_for_each(rows)?;
    } else {
        flat.chunks_mut(n).try_for_each(rows)?;
    }
    Ok(RtTensor::F64(data).cast(x.dtype()))
}

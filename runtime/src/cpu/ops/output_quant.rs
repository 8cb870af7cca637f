//! Output quantization (the QSM epilogues, `qcc_ir::OutputQuant`) and the integer linear layer.
//!
//! An op carrying attribute `to` emits q = clamp(round_half_even(y / step), range) of its float result y;
//! rows at positions < `prefix_tokens` use the wider `prefix_to` range. `int_linear` multiplies exactly:
//! integer operands are exact in f32 while every partial sum stays below 2^24, and rows that could exceed
//! it are recomputed in f64 (exact for int32-range sums), so the result equals int32 accumulation.

use super::matmul::{as_rows, dgemm, sgemm};
use super::{bail, op_err, OpCtx, OpResult};
use crate::cpu::value::{f32_to_f8, RtTensor};
use ndarray::{Array2, ArrayD, IxDyn};
use qcc_ir::{f8e4m3_to_f32, DType, OutputQuant};

/// The number of positions before this chunk (`prefix_offset`'s symbol; 0 without one).
pub fn prefix_offset(ctx: &OpCtx, q: &OutputQuant) -> OpResult<usize> {
    match &q.prefix_offset {
        None => Ok(0),
        Some(sym) => ctx
            .symbols
            .get(sym)
            .copied()
            .ok_or_else(|| op_err!("prefix_offset '{sym}' is not a dimension symbol of the graph inputs")),
    }
}

/// Quantizes a float result according to `q` (see `qcc_ir::OutputQuant`); row positions start at
/// `offset` (the cached positions before this chunk).
pub fn apply(q: &OutputQuant, y: &RtTensor, offset: usize) -> OpResult<RtTensor> {
    let shape = y.shape().to_vec();
    let k = shape.last().copied().unwrap_or(1).max(1);
    let seq = if shape.len() >= 2 { shape[shape.len() - 2] } else { 1 };
    let step: Option<Vec<f32>> = match &q.step {
        Some(t) => Some(t.to_f32_vec().map_err(|e| op_err!("attribute 'step': {e}"))?),
        None => None,
    };
    // Steps per (head, channel) of an attention output [B, H, S, D]: H * D of them.
    let heads = if shape.len() >= 3 { shape[shape.len() - 3] } else { 1 };
    let per_head =
        step.as_ref().is_some_and(|s| s.len() != 1 && s.len() != k && shape.len() >= 3 && s.len() == heads * k);
    if let Some(s) = &step {
        if s.len() != 1 && s.len() != k && !per_head {
            bail!("attribute 'step' has {} elements, the last axis {k} (or heads x last axis {})", s.len(), heads * k);
        }
    }
    let yf = y.to_f32();
    let yf = yf.as_standard_layout();
    let data = yf.as_slice().ok_or_else(|| op_err!("non-contiguous output"))?;
    let scaled = |i: usize, v: f32| match &step {
        Some(s) if s.len() == 1 => v / s[0],
        Some(s) if per_head => v / s[((i / (seq.max(1) * k)) % heads) * k + i % k],
        Some(s) => v / s[i % k],
        None => v,
    };
    let prefix = |i: usize| q.prefix_tokens > 0 && (i / k) % seq.max(1) + offset < q.prefix_tokens;
    let out_dtype = q.output_dtype();
    if q.to == DType::F8E4M3 {
        if q.prefix_tokens > 0 {
            bail!("prefix_tokens is not supported with f8e4m3 outputs");
        }
        let v: Vec<u8> = data.iter().enumerate().map(|(i, &v)| f32_to_f8(scaled(i, v), true)).collect();
        return Ok(RtTensor::F8E4M3(ArrayD::from_shape_vec(IxDyn(&shape), v).map_err(|e| op_err!("{e}"))?));
    }
    let (lo, hi) = q.to.int_range().ok_or_else(|| op_err!("cannot quantize to {}", q.to))?;
    let (plo, phi) =
        q.prefix_to.int_range().ok_or_else(|| op_err!("cannot quantize prefix rows to {}", q.prefix_to))?;
    let v: Vec<i32> = data
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let (lo, hi) = if prefix(i) { (plo, phi) } else { (lo, hi) };
            (scaled(i, v).round_ties_even() as f64).clamp(lo as f64, hi as f64) as i32
        })
        .collect();
    let a = ArrayD::from_shape_vec(IxDyn(&shape), v).map_err(|e| op_err!("{e}"))?;
    Ok(RtTensor::I32(a).cast(out_dtype))
}

/// `quantize(x, step)` with optional prefix rows.
pub fn quantize(ctx: &OpCtx) -> OpResult<RtTensor> {
    let (x, step) = (ctx.input(0)?, ctx.input(1)?);
    let mut q = ctx.op.output_quant().ok_or_else(|| op_err!("attribute 'to' is missing"))?;
    if ctx.int("axis", -1) != -1 && ctx.int("axis", -1) != x.shape().len() as i64 - 1 {
        bail!("quantize with prefix_tokens supports only the last axis");
    }
    q.step = Some(step.to_ir_tensor());
    apply(&q, x, prefix_offset(ctx, &q)?)
}

/// Values of an integer or f8 tensor as f32.
fn decoded(t: &RtTensor) -> ArrayD<f32> {
    match t {
        RtTensor::F8E4M3(a) => a.mapv(f8e4m3_to_f32),
        other => other.cast_array::<f32>(),
    }
}

/// `int_linear(qx, qw, scale, bias?)` (see `OpKind::IntLinear`).
pub fn int_linear(ctx: &OpCtx) -> OpResult<RtTensor> {
    let (qx, qw, scale, bias) = (ctx.input(0)?, ctx.input(1)?, ctx.input(2)?, ctx.opt_input(3));
    if qw.shape().len() != 2 {
        bail!("weight must be [N, K], got {:?}", qw.shape());
    }
    if !(qw.dtype().is_int() || qw.dtype() == DType::F8E4M3) {
        bail!("weight must be an integer or f8e4m3 tensor, got {}", qw.dtype());
    }
    let (n, k) = (qw.shape()[0], qw.shape()[1]);
    if qx.shape().last() != Some(&k) {
        bail!("qx {:?} does not end in K = {k} of the weight {:?}", qx.shape(), qw.shape());
    }
    let float_x = qx.dtype().is_float() && qx.dtype() != DType::F8E4M3;
    let act_bits = ctx.op.int("act_bits");
    let exact = !float_x && qx.dtype() != DType::F8E4M3 && qw.dtype() != DType::F8E4M3;
    let xa = if float_x { qx.to_f32().into_owned() } else { decoded(qx) };
    let (mut x2, x_shape) = as_rows(xa.as_standard_layout().into_owned())?;
    let rows = x2.dim().0;
    // Dynamic per-token quantization of a float input.
    let mut row_step = vec![1f32; rows];
    if let (true, Some(bits)) = (float_x, act_bits) {
        if !(2..=16).contains(&bits) {
            bail!("act_bits must be in 2..=16, got {bits}");
        }
        let qmax = ((1i64 << (bits - 1)) - 1) as f32;
        for (r, mut row) in x2.rows_mut().into_iter().enumerate() {
            let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            let s = if amax > 0.0 { amax / qmax } else { 1.0 };
            row_step[r] = s;
            row.mapv_inplace(|v| (v / s).round_ties_even().clamp(-qmax - 1.0, qmax));
        }
    }
    let w = decoded(qw).into_dimensionality::<ndarray::Ix2>().map_err(|e| op_err!("{e}"))?;
    let mut out = Array2::<f32>::zeros((rows, n));
    sgemm(x2.view(), w.t(), &mut out.view_mut(), 1.0, 0.0);
    if exact || (float_x && act_bits.is_some()) {
        // Rows whose integer sums may exceed f32's exact range are recomputed in f64.
        let bmax = w.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        let big: Vec<usize> = (0..rows)
            .filter(|&r| {
                let amax = x2.row(r).iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
                amax * bmax * k as f64 >= (1u64 << 24) as f64
            })
            .collect();
        if !big.is_empty() {
            let wd = w.mapv(|v| v as f64);
            let xd = Array2::from_shape_fn((big.len(), k), |(i, j)| x2[[big[i], j]] as f64);
            let mut od = Array2::<f64>::zeros((big.len(), n));
            dgemm(xd.view(), wd.t(), &mut od.view_mut(), 1.0, 0.0);
            for (i, &r) in big.iter().enumerate() {
                for j in 0..n {
                    out[[r, j]] = od[[i, j]] as f32;
                }
            }
        }
    }
    let scale: Vec<f32> = scale.cast_array::<f32>().iter().copied().collect();
    if scale.len() != n && scale.len() != 1 {
        bail!("scale has {} elements, expected N = {n}", scale.len());
    }
    let bias: Option<Vec<f32>> = bias.map(|b| b.cast_array::<f32>().iter().copied().collect());
    if bias.as_ref().is_some_and(|b| b.len() != n) {
        bail!("bias must have N = {n} elements");
    }
    for (r, mut row) in out.rows_mut().into_iter().enumerate() {
        let rs = row_step[r];
        for (j, v) in row.iter_mut().enumerate() {
            let sc = if scale.len() == 1 { scale[0] } else { scale[j] };
            // The epilogue: one f32 multiply per output channel (times the token's step when dynamic).
            let acc = if rs != 1.0 { *v * rs } else { *v };
            *v = acc * sc + bias.as_ref().map_or(0.0, |b| b[j]);
        }
    }
    let mut out_shape = x_shape;
    if let Some(last) = out_shape.last_mut() {
        *last = n;
    }
    let out = RtTensor::F32(out.into_shape_with_order(IxDyn(&out_shape)).map_err(|e| op_err!("{e}"))?);
    // A half-precision result is the f32 epilogue rounded once (as the GPU kernels store it); with
    // an output quantization the f32 result goes to the epilogue instead.
    Ok(match ctx.outputs.first().map(|o| o.ty.dtype) {
        Some(d @ (DType::F16 | DType::BF16)) if ctx.op.attr("to").is_none() => out.cast(d),
        _ => out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use qcc_ir::Tensor;

    #[test]
    fn attention_outputs_take_steps_per_head_and_channel() {
        // y [B 1, H 2, S 3, D 4] = 10 h + s + d / 4; steps per (h, d): 1 + h + d.
        let (h, s, d) = (2usize, 3usize, 4usize);
        let y: Vec<f32> = (0..h)
            .flat_map(|hh| {
                (0..s).flat_map(move |ss| (0..d).map(move |dd| 10.0 * hh as f32 + ss as f32 + dd as f32 / 4.0))
            })
            .collect();
        let steps: Vec<f32> = (0..h).flat_map(|hh| (0..d).map(move |dd| (1 + hh + dd) as f32)).collect();
        let q = OutputQuant {
            to: DType::I4,
            prefix_tokens: 1,
            prefix_to: DType::I16,
            prefix_offset: None,
            step: Some(Tensor::from_slice(vec![h * d], &steps)),
        };
        let out = apply(&q, &RtTensor::from_vec(&[1, h, s, d], y.clone()).unwrap(), 0).unwrap();
        let got = out.cast_array::<i64>();
        for (i, &g) in got.iter().enumerate() {
            let (hh, ss, dd) = (i / (s * d), (i / d) % s, i % d);
            let v = (y[i] / steps[hh * d + dd]).round_ties_even();
            // Position 0 keeps 16 bits; the others clamp to int4.
            let want = if ss == 0 { v } else { v.clamp(-8.0, 7.0) } as i64;
            assert_eq!(g, want, "h {hh} s {ss} d {dd}");
        }
        // A step count that is neither 1, D nor H * D is an error.
        let bad = OutputQuant { step: Some(Tensor::from_slice(vec![3], &[1.0f32; 3])), ..q.clone() };
        assert!(apply(&bad, &RtTensor::from_vec(&[1, h, s, d], y.clone()).unwrap(), 0).is_err());
        // After one cached position (a decode step), position 0 of the chunk is not a prefix row.
        let later = apply(&q, &RtTensor::from_vec(&[1, h, s, d], y.clone()).unwrap(), 1).unwrap().cast_array::<i64>();
        for (i, &g) in later.iter().enumerate() {
            let (hh, dd) = (i / (s * d), i % d);
            assert_eq!(g, ((y[i] / steps[hh * d + dd]).round_ties_even().clamp(-8.0, 7.0)) as i64);
        }
    }
}

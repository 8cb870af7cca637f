//! qcc's fused blocks (produced by the block-recognition passes): `linear`, `rms_norm`, `swiglu`,
//! `rotary` and grouped-query `attention`. Semantics are documented on the `OpKind` variants; these are
//! straightforward compositions of the primitive kernels. Attention computes in f32 whatever the input
//! float type (f64 inputs lose precision there).

use crate::cpu::ops::elementwise::{zip_broadcast, PAR_MIN};
use crate::cpu::ops::matmul::{dgemm, sgemm, SKINNY_MAX_ROWS};
use crate::cpu::ops::{bail, broadcast_shapes, float_dispatch, op_err, OpCtx, OpResult};
use crate::cpu::value::RtTensor;
use ndarray::{s, Array2, ArrayD, Axis, Ix2, IxDyn, Zip};
use qcc_ir::DType;
use rayon::prelude::*;

/// `linear(x[.., K], w[N, K], bias?[N])` = x w^T + bias (products in bf16 when `ctx.bf16_products`, the
/// CPU has AVX512-BF16 and the product is not decode-sized: those stream the weight once in f32, and
/// converting it would cost more than the product).
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
    // A view of x's rows (no copy when x is already contiguous f32).
    let xf = x.to_f32();
    let xs = xf.as_standard_layout();
    let rows = xs.len() / w.shape()[1].max(1);
    let x2 = xs.view().into_shape_with_order((rows, w.shape()[1])).map_err(|e| op_err!("{e}"))?;
    let wf = w.to_f32();
    let w2 = wf.view().into_dimensionality::<Ix2>().map_err(|e| op_err!("{e}"))?;
    let mut out = Array2::<f32>::zeros((x2.dim().0, n));
    let k = w.shape()[1];
    let bf16_done = ctx.bf16_products
        && rows > SKINNY_MAX_ROWS
        && match (x2.as_slice(), wf.as_slice(), out.as_slice_mut()) {
            (Some(xs), Some(ws), Some(os)) => {
                use crate::cpu::bf16_gemm::{gemm_nt, Strided};
                gemm_nt(&Strided::rows(xs, rows, k), &Strided::rows(ws, n, k), os, n, false, false)
            }
            _ => false,
        };
    if !bf16_done {
        sgemm(x2.view(), w2.t(), &mut out.view_mut(), 1.0, 0.0);
    }
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
        (RtTensor::F32(g), RtTensor::F32(u)) => match (g.as_slice(), u.as_slice()) {
            (Some(gs), Some(us)) if g.shape() == u.shape() => {
                let mut out = vec![0f32; gs.len()];
                const CHUNK: usize = 1 << 14;
                out.par_chunks_mut(CHUNK)
                    .zip(gs.par_chunks(CHUNK).zip(us.par_chunks(CHUNK)))
                    .for_each(|(o, (g, u))| swiglu_f32(g, u, o));
                RtTensor::F32(ArrayD::from_shape_vec(g.raw_dim(), out).map_err(|e| op_err!("{e}"))?)
            }
            _ => RtTensor::F32(zip_broadcast(g, u, swiglu_one)?),
        },
        _ => {
            let (g, u) = (gate.to_f32(), up.to_f32());
            let out = zip_broadcast(&g.into_owned(), &u.into_owned(), swiglu_one)?;
            RtTensor::F32(out).cast(gate.dtype())
        }
    })
}

/// [`swiglu_one`] over equal-length slices.
fn swiglu_f32(g: &[f32], u: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        unsafe { swiglu_f32_avx2(g, u, out) };
        return;
    }
    swiglu_f32_loop(g, u, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn swiglu_f32_avx2(g: &[f32], u: &[f32], out: &mut [f32]) {
    swiglu_f32_loop(g, u, out);
}

#[inline(always)]
fn swiglu_f32_loop(g: &[f32], u: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
        *o = swiglu_one(g, u);
    }
}

/// silu(g) * u = g / (1 + e^-g) * u in f32, with e^-g from [`exp_f64`] (which vectorises, unlike libm's
/// expf, and rounds to the same f32 but within ~2 f64 ulps of a rounding boundary). -g is clamped to
/// [-110, 89]: e^-110 rounds to 0 and e^89 to +inf in f32, as expf gives. Every f32 layout takes it, so
/// the result does not depend on whether the operands were contiguous.
#[inline(always)]
fn swiglu_one(g: f32, u: f32) -> f32 {
    let e = exp_f64((-(g as f64)).clamp(-110.0, 89.0)) as f32;
    g / (1.0 + e) * u
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
    let mut out = ArrayD::<f32>::zeros(xf.raw_dim());
    let last = Axis(xf.ndim() - 1);
    Zip::from(out.lanes_mut(last)).and(xf.lanes(last)).and(cb.lanes(last)).and(sb.lanes(last)).par_for_each(
        |mut o, xl, cl, sl| {
            for i in 0..d {
                let rot = if i < half { -xl[i + half] } else { xl[i - half] };
                o[i] = xl[i] * cl[i] + rot * sl[i];
            }
        },
    );
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
    let mut causal = ctx.int("causal", 0) != 0;
    let (qf, kf, vf) = (q.to_f32(), k.to_f32(), v.to_f32());
    // An explicit mask that is exactly causal (0 where visible, <= -1e30 after the diagonal: exported
    // models build it with `where`) takes the causal path: adding 0 leaves a score as it is and a masked
    // probability is exactly 0 either way, so the results are the same bits without the mask's copy.
    let mask = match mask {
        Some(m) if causal_mask(m, s_len, t_len) => {
            causal = true;
            None
        }
        other => other,
    };
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
    // Causal rows are taken in blocks that only compute the keys they can see: a masked probability is
    // exactly 0, so the skipped columns would add nothing to the products (same sums, half the work). The
    // query heads sharing one key/value head are stacked into one product (fewer, larger GEMMs; each
    // element's sum is the same).
    let block = if causal { ATTENTION_ROW_BLOCK } else { s_len.max(1) };
    // The (batch, key/value head) units are independent: they run in parallel, each writing its query
    // heads' rows into its own buffer (copied into `out` afterwards).
    let units: Vec<(usize, usize)> = (0..b).flat_map(|bi| (0..hkv).map(move |kv| (bi, kv))).collect();
    let parallel_units = units.len() > 1;
    let unit = |&(bi, kv): &(usize, usize)| -> Array2<f32> {
        let mut unit_out = Array2::<f32>::zeros((group * s_len, dv));
        let kh = kf.slice(s![bi, kv, .., ..]);
        let vh = vf.slice(s![bi, kv, .., ..]);
        for r0 in (0..s_len).step_by(block) {
            let r1 = (r0 + block).min(s_len);
            let rows = r1 - r0;
            // Keys visible to the block's last row (all of them without a causal mask).
            let cols = if causal { (t_len + r1).saturating_sub(s_len).min(t_len) } else { t_len };
            let heads = kv * group..(kv + 1) * group;
            let mut qs = Array2::<f32>::zeros((group * rows, d));
            for (g, h) in heads.clone().enumerate() {
                qs.slice_mut(s![g * rows..(g + 1) * rows, ..]).assign(&qf.slice(s![bi, h, r0..r1, ..]));
            }
            let mut scores = Array2::<f32>::zeros((group * rows, cols));
            if cols > 0 {
                sgemm(qs.view(), kh.slice(s![..cols, ..]).t(), &mut scores.view_mut(), scale, 0.0);
            }
            if let Some(m) = &mask_f {
                for (g, h) in heads.clone().enumerate() {
                    let mut part = scores.slice_mut(s![g * rows..(g + 1) * rows, ..]);
                    part += &m.slice(s![bi, h, r0..r1, ..cols]);
                }
            }
            let row_op = |(i, mut row): (usize, ndarray::ArrayViewMut1<f32>)| {
                if causal {
                    // Masked probabilities are exactly 0 and add nothing to the sum: the softmax runs
                    // over the visible prefix only.
                    let visible = ((t_len + r0 + i % rows).saturating_sub(s_len) + 1).min(cols);
                    row.slice_mut(s![visible..]).fill(0.0);
                    softmax_row(row.slice_mut(s![..visible]));
                } else {
                    softmax_row(row);
                }
            };
            if !parallel_units && group * rows * cols >= PAR_MIN {
                scores.axis_iter_mut(Axis(0)).into_par_iter().enumerate().for_each(row_op);
            } else {
                scores.axis_iter_mut(Axis(0)).enumerate().for_each(row_op);
            }
            let mut os = Array2::<f32>::zeros((group * rows, dv));
            if cols > 0 {
                sgemm(scores.view(), vh.slice(s![..cols, ..]), &mut os.view_mut(), 1.0, 0.0);
            }
            for g in 0..group {
                unit_out
                    .slice_mut(s![g * s_len + r0..g * s_len + r1, ..])
                    .assign(&os.slice(s![g * rows..(g + 1) * rows, ..]));
            }
        }
        unit_out
    };
    let results: Vec<Array2<f32>> =
        if parallel_units { units.par_iter().map(unit).collect() } else { units.iter().map(unit).collect() };
    for (&(bi, kv), r) in units.iter().zip(&results) {
        for g in 0..group {
            out.slice_mut(s![bi, kv * group + g, .., ..]).assign(&r.slice(s![g * s_len..(g + 1) * s_len, ..]));
        }
    }
    Ok(RtTensor::F32(out).cast(q.dtype()))
}

/// Whether `mask` (broadcast to [.., s, t]) is a causal mask: 0 for key j <= i + t - s, at most -1e30
/// (or -inf) after it, in every broadcast plane.
pub(crate) fn causal_mask(mask: &RtTensor, s_len: usize, t_len: usize) -> bool {
    let shape = mask.shape();
    let r = shape.len();
    if r < 2 || shape[r - 2] != s_len || shape[r - 1] != t_len || t_len < s_len || !mask.dtype().is_float() {
        return false;
    }
    let m = mask.to_f32();
    let Some(flat) = m.as_slice() else { return false };
    flat.chunks_exact(s_len * t_len).all(|plane| {
        plane.chunks_exact(t_len).enumerate().all(|(i, row)| {
            let last = i + t_len - s_len;
            row[..=last].iter().all(|&x| x == 0.0) && row[last + 1..].iter().all(|&x| x <= -1e30)
        })
    })
}

/// Query rows per block of a causal attention.
const ATTENTION_ROW_BLOCK: usize = 128;

/// Softmax of one row in place (an all-masked row stays finite: its maximum counts as 0).
fn softmax_row(mut row: ndarray::ArrayViewMut1<f32>) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let max = if max.is_finite() { max } else { 0.0 };
    // exp and the sum in f64, rounded once to f32: the GPU kernel does the same, so the result does not
    // depend on either side's expf or on the summation order.
    match row.as_slice_mut() {
        Some(r) => exp_shifted(r, max),
        None => row.mapv_inplace(|x| exp_shifted_one(x, max)),
    }
    let sum = row.iter().fold(0f64, |s, &e| s + e as f64) as f32;
    if sum > 0.0 {
        row.mapv_inplace(|x| x / sum);
    }
}

/// x <- e^(x - max) for every element (x <= max), in f64 and rounded once to f32.
fn exp_shifted(row: &mut [f32], max: f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        unsafe { exp_shifted_avx2(row, max) };
        return;
    }
    row.iter_mut().for_each(|x| *x = exp_shifted_one(*x, max));
}

/// The same loop compiled for 4-wide f64 vectors (no FMA contraction: results equal the scalar path's).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn exp_shifted_avx2(row: &mut [f32], max: f32) {
    row.iter_mut().for_each(|x| *x = exp_shifted_one(*x, max));
}

#[inline(always)]
fn exp_shifted_one(x: f32, max: f32) -> f32 {
    let d = (x - max) as f64;
    // Below -110, e^d rounds to 0 in f32 anyway (masked entries are -inf or a huge negative).
    if d < -110.0 {
        0.0
    } else {
        exp_f64(d) as f32
    }
}

/// e^d for d in [-110, 0] (NaN propagates), to about one f64 ulp: d = k ln2 + r with |r| <= ln2/2 (k by
/// the 1.5 * 2^52 rounding trick, ln2 split in two so k * LN2_HI is exact), e^r by its Taylor series to
/// r^13 (truncation below 1e-17 relative), times 2^k built from the exponent bits. Vectorises, unlike
/// libm's exp, and agrees with it after rounding to f32 except where e^d lies within ~2 f64 ulps of an
/// f32 rounding boundary.
#[inline(always)]
fn exp_f64(d: f64) -> f64 {
    const SHIFTER: f64 = 6_755_399_441_055_744.0;
    const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000); // ln 2, upper 32 bits
    const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76); // ln 2 - LN2_HI
    const INV_FACT: [f64; 14] = [
        1.0,
        1.0,
        1.0 / 2.0,
        1.0 / 6.0,
        1.0 / 24.0,
        1.0 / 120.0,
        1.0 / 720.0,
        1.0 / 5_040.0,
        1.0 / 40_320.0,
        1.0 / 362_880.0,
        1.0 / 3_628_800.0,
        1.0 / 39_916_800.0,
        1.0 / 479_001_600.0,
        1.0 / 6_227_020_800.0,
    ];
    let t = d * std::f64::consts::LOG2_E + SHIFTER;
    let k = t - SHIFTER;
    let r = (d - k * LN2_HI) - k * LN2_LO;
    let mut p = INV_FACT[13];
    for c in INV_FACT[..13].iter().rev() {
        p = p * r + c;
    }
    let ki = (t.to_bits() as i64).wrapping_sub(SHIFTER.to_bits() as i64);
    f64::from_bits((ki.wrapping_add(1023) as u64) << 52) * p
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
    let RtTensor::F32(src) = x else {
        // Other float types round once from f64 to their own type (f16 through f32 would round twice).
        let mut data = x.cast_array::<f64>().as_standard_layout().into_owned();
        let flat = data.as_slice_mut().ok_or_else(|| op_err!("non-contiguous data"))?;
        let rows = |row: &mut [f64]| h.transform(row).map_err(|e| op_err!("{e}"));
        flat.par_chunks_mut(n).try_for_each(rows)?;
        return Ok(RtTensor::F64(data).cast(x.dtype()));
    };
    let src = src.as_standard_layout();
    let flat = src.as_slice().ok_or_else(|| op_err!("non-contiguous data"))?;
    let mut out = vec![0f32; flat.len()];
    // Rows in parallel chunks, each transformed in f64 and rounded once (what the GPU kernel does).
    let chunk = n * 32;
    let rows = |(s, d): (&[f32], &mut [f32])| h.transform_rows_f32(s, d).map_err(|e| op_err!("{e}"));
    if flat.len() >= PAR_MIN {
        flat.par_chunks(chunk).zip(out.par_chunks_mut(chunk)).try_for_each(rows)?;
    } else {
        flat.chunks(chunk).zip(out.chunks_mut(chunk)).try_for_each(rows)?;
    }
    let out = ArrayD::from_shape_vec(IxDyn(x.shape()), out).map_err(|e| op_err!("{e}"))?;
    Ok(RtTensor::F32(out).cast(x.dtype()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_matches_libm_to_an_ulp_and_after_rounding_to_f32() {
        let mut worst = 0f64;
        let mut f32_differences = 0;
        let n = 200_000;
        for i in 0..=n {
            // Uniform over [-110, 0] plus the endpoints.
            let d = -110.0 * i as f64 / n as f64;
            let (fast, libm) = (exp_f64(d), d.exp());
            worst = worst.max(((fast - libm) / libm).abs());
            f32_differences += usize::from(fast as f32 != libm as f32);
        }
        assert!(worst < 4.0 * f64::EPSILON, "worst relative error {worst:e}");
        assert!(f32_differences <= 2, "{f32_differences} of {n} values round to a different f32");
        assert!(exp_f64(f64::NAN).is_nan());
        assert_eq!(exp_shifted_one(f32::NEG_INFINITY, 0.0), 0.0);
    }

    #[test]
    fn swiglu_matches_a_float64_reference_over_the_f32_range() {
        // Positive d as well: e^-g for g down to -100 (where e^89 and beyond round to +inf).
        let n = 100_000;
        let g: Vec<f32> =
            (0..=n).map(|i| -100.0 + 200.0 * i as f32 / n as f32).chain([0.0, -0.0, 1e-30, -1e-30]).collect();
        let u: Vec<f32> = g.iter().enumerate().map(|(i, _)| 0.5 + (i % 7) as f32 * 0.25).collect();
        let mut out = vec![f32::NAN; g.len()];
        swiglu_f32(&g, &u, &mut out);
        for ((&o, &g), &u) in out.iter().zip(&g).zip(&u) {
            // The generic path's f32 formula with libm's expf (which also overflows to +inf for g < -88.7),
            // and inside the range without overflow an f64 reference.
            let generic = g / (1.0 + (-g).exp()) * u;
            let tol = 4.0 * f32::EPSILON * generic.abs().max(f32::MIN_POSITIVE);
            assert!((o - generic).abs() <= tol, "g {g}: {o} vs {generic}");
            if g > -80.0 {
                let exact = g as f64 / (1.0 + (-(g as f64)).exp()) * u as f64;
                assert!((o as f64 - exact).abs() <= 4e-7 * exact.abs() + 1e-38, "g {g}: {o} vs {exact}");
            }
        }
        let mut nan = [0f32];
        swiglu_f32(&[f32::NAN], &[1.0], &mut nan);
        assert!(nan[0].is_nan());
    }

    #[test]
    fn softmax_row_sums_to_one_and_matches_a_float64_reference() {
        let xs: Vec<f32> = (0..300).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.173).collect();
        let mut row = ndarray::Array1::from(xs.clone());
        softmax_row(row.view_mut());
        let max = xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z: f64 = xs.iter().map(|&x| (x as f64 - max).exp()).sum();
        for (&p, &x) in row.iter().zip(&xs) {
            let want = (x as f64 - max).exp() / z;
            assert!((p as f64 - want).abs() <= 1e-6 * want.max(1e-30) + 1e-12, "{p} vs {want}");
        }
    }
}

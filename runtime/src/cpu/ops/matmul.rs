//! MatMul, Gemm, MatMulInteger, QLinearMatMul and qcc's `int_linear`.
//!
//! Float products use `matrixmultiply` (threaded through its `threading` feature), which reads arbitrary
//! strides, so transposed operands (Gemm transA/transB, `int_linear`'s W^T) are never copied.
//! Measured on this 2-core machine (release, f32, M=512; ms per product; machine shared with builds):
//!
//! | K x N        | gemm 0.19 (rayon) | gemm 0.19 (1 thread) | matrixmultiply 0.3 (threading) |
//! |--------------|-------------------|----------------------|--------------------------------|
//! | 576 x 576    | 3.07              | 3.68                 | 2.41                           |
//! | 576 x 192    | 1.24              | 1.35                 | 0.90                           |
//! | 576 x 1536   | 9.39              | 7.90                 | 5.69                           |
//! | 1536 x 576   | 7.76              | 7.84                 | 5.00                           |
//! | 576 x 49152  | 271.8             | 300.1                | 215.1                          |
//! | 64 x 512     | 0.30              | 0.28                 | 0.19 (one attention head)      |
//! | 512 x 64     | 0.30              | 0.28                 | 0.26                           |
//!
//! Through the executor (criterion bench `cpu_matmul`, later and quieter run, so not comparable with the
//! table): 576x576 1.11 ms, 576x192 0.43 ms, 576x1536 2.91 ms, 1536x576 6.26 ms, 576x49152 228 ms,
//! attention [9,512,64]x[9,64,512] 1.89 ms and [9,512,512]x[9,512,64] 2.2-4.9 ms (noisy).
//! faer was not measured (it builds on the same kernels as gemm).
//!
//! Integer products are exact: when max|a| * max|b| * K < 2^24 (every int4 product, int8 up to small K)
//! they run through the f32 kernel, which is then exact; below 2^53 through the f64 kernel; otherwise a
//! plain wrapping i64 loop.

use crate::cpu::ops::elementwise::zip_broadcast as ew;
use crate::cpu::ops::{bail, broadcast_shapes, op_err, OpCtx, OpResult};
use crate::cpu::value::RtTensor;
use ndarray::{Array2, ArrayD, ArrayView2, ArrayViewD, ArrayViewMut2, Axis, Dimension, IxDyn};
use qcc_ir::DType;

/// c = alpha * a b + beta * c in f32.
pub fn sgemm(a: ArrayView2<f32>, b: ArrayView2<f32>, c: &mut ArrayViewMut2<f32>, alpha: f32, beta: f32) {
    let (m, k) = a.dim();
    let n = b.dim().1;
    debug_assert!(b.dim().0 == k && c.dim() == (m, n));
    if skinny_sgemm(a, b, c, alpha, beta) {
        return;
    }
    strided_gemm(matrixmultiply::sgemm, a, b, c, alpha, beta);
}

/// Rows of `a` at most this many take the streaming path (decode: one token per sequence).
pub(crate) const SKINNY_MAX_ROWS: usize = 8;
/// Output columns per parallel task on the streaming path.
const SKINNY_COLUMNS: usize = 256;

/// Few rows times a large weight (decode): packing the weight, as a GEMM library does on every call, costs
/// more than the product, so stream it once instead, in parallel column blocks. Handles `b` stored
/// row-major ([K, N], ONNX MatMul) or as the transpose of a row-major [N, K] weight (`linear`); returns
/// false (caller falls back to the GEMM) for any other case.
fn skinny_sgemm(a: ArrayView2<f32>, b: ArrayView2<f32>, c: &mut ArrayViewMut2<f32>, alpha: f32, beta: f32) -> bool {
    use rayon::prelude::*;
    let (m, k) = a.dim();
    let n = b.dim().1;
    if m == 0 || m > SKINNY_MAX_ROWS || k == 0 || n * k < (1 << 15) {
        return false;
    }
    let [sb0, sb1] = [b.strides()[0], b.strides()[1]];
    let rows: Vec<Vec<f32>> = a.outer_iter().map(|r| r.to_vec()).collect();
    // Block-major result: block j holds rows 0..m of columns j*SKINNY_COLUMNS.. (contiguous per row).
    let mut blocks = vec![0f32; m * n];
    // SAFETY (both arms): `b` is a valid view with the strides read above; every offset computed below is
    // row * stride + column with row < k and column < n (or the transposed equivalent), so it is in bounds.
    let base = b.as_ptr() as usize;
    if sb1 == 1 && sb0 >= n as isize {
        let ld = sb0 as usize;
        blocks.par_chunks_mut(m * SKINNY_COLUMNS).enumerate().for_each(|(blk, out)| {
            let j0 = blk * SKINNY_COLUMNS;
            let len = out.len() / m;
            for kk in 0..k {
                let brow = unsafe { std::slice::from_raw_parts((base as *const f32).add(kk * ld + j0), len) };
                for (i, row) in rows.iter().enumerate() {
                    let av = row[kk];
                    for (o, &bv) in out[i * len..(i + 1) * len].iter_mut().zip(brow) {
                        *o += av * bv;
                    }
                }
            }
        });
    } else if sb0 == 1 && sb1 >= k as isize {
        let ld = sb1 as usize;
        blocks.par_chunks_mut(m * SKINNY_COLUMNS).enumerate().for_each(|(blk, out)| {
            let j0 = blk * SKINNY_COLUMNS;
            let len = out.len() / m;
            for jj in 0..len {
                let w = unsafe { std::slice::from_raw_parts((base as *const f32).add((j0 + jj) * ld), k) };
                for (i, row) in rows.iter().enumerate() {
                    out[i * len + jj] = dot(row, w);
                }
            }
        });
    } else {
        return false;
    }
    for (blk, out) in blocks.chunks(m * SKINNY_COLUMNS).enumerate() {
        let len = out.len() / m;
        for i in 0..m {
            for jj in 0..len {
                let cell = &mut c[[i, blk * SKINNY_COLUMNS + jj]];
                let r = alpha * out[i * len + jj];
                *cell = if beta == 0.0 { r } else { r + beta * *cell };
            }
        }
    }
    true
}

/// Dot product with 16 independent accumulators, so the compiler can vectorise the reduction.
fn dot(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (xc, yc) = (x.chunks_exact(16), y.chunks_exact(16));
    let tail: f32 = xc.remainder().iter().zip(yc.remainder()).map(|(a, b)| a * b).sum();
    for (a, b) in xc.zip(yc) {
        for l in 0..16 {
            acc[l] += a[l] * b[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// c = alpha * a b + beta * c in f64.
pub fn dgemm(a: ArrayView2<f64>, b: ArrayView2<f64>, c: &mut ArrayViewMut2<f64>, alpha: f64, beta: f64) {
    strided_gemm(matrixmultiply::dgemm, a, b, c, alpha, beta);
}

/// matrixmultiply's `sgemm`/`dgemm` signature: (m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc).
type StridedKernel<T> =
    unsafe fn(usize, usize, usize, T, *const T, isize, isize, *const T, isize, isize, T, *mut T, isize, isize);

/// c = alpha * a b + beta * c through a matrixmultiply kernel, passing the views' own strides.
fn strided_gemm<T>(
    kernel: StridedKernel<T>,
    a: ArrayView2<T>,
    b: ArrayView2<T>,
    c: &mut ArrayViewMut2<T>,
    alpha: T,
    beta: T,
) {
    let (m, k) = a.dim();
    let n = b.dim().1;
    let (sa, sb, sc) = (a.strides(), b.strides(), c.strides().to_vec());
    // SAFETY: the views guarantee that every (row, col) addressed through these strides is in bounds, and
    // `c` is a mutable view, so it does not alias `a` or `b`.
    unsafe {
        kernel(m, k, n, alpha, a.as_ptr(), sa[0], sa[1], b.as_ptr(), sb[0], sb[1], beta, c.as_mut_ptr(), sc[0], sc[1])
    }
}

/// Exact integer product (wrapping only past the i64 range).
fn int_gemm(a: ArrayView2<i64>, b: ArrayView2<i64>, c: &mut ArrayViewMut2<i64>) {
    let k = a.dim().1;
    let amax = a.iter().map(|v| v.unsigned_abs()).max().unwrap_or(0) as f64;
    let bmax = b.iter().map(|v| v.unsigned_abs()).max().unwrap_or(0) as f64;
    let bound = amax * bmax * k as f64;
    if bound < (1u64 << 24) as f64 {
        let (af, bf) = (a.mapv(|v| v as f32), b.mapv(|v| v as f32));
        let mut cf = Array2::<f32>::zeros(c.dim());
        sgemm(af.view(), bf.view(), &mut cf.view_mut(), 1.0, 0.0);
        c.zip_mut_with(&cf, |o, &v| *o = v as i64);
    } else if bound < (1u64 << 53) as f64 {
        let (af, bf) = (a.mapv(|v| v as f64), b.mapv(|v| v as f64));
        let mut cf = Array2::<f64>::zeros(c.dim());
        dgemm(af.view(), bf.view(), &mut cf.view_mut(), 1.0, 0.0);
        c.zip_mut_with(&cf, |o, &v| *o = v as i64);
    } else {
        for ((i, j), o) in c.indexed_iter_mut() {
            *o = a.row(i).iter().zip(b.column(j)).fold(0i64, |s, (&x, &y)| s.wrapping_add(x.wrapping_mul(y)));
        }
    }
}

/// Numpy `matmul` (1-D promotion, broadcast batch dimensions) over a 2-D kernel.
fn batched<T: Clone + num_traits::Zero>(
    a: &ArrayD<T>,
    b: &ArrayD<T>,
    kernel: impl Fn(ArrayView2<T>, ArrayView2<T>, &mut ArrayViewMut2<T>),
) -> OpResult<ArrayD<T>> {
    if a.ndim() == 0 || b.ndim() == 0 {
        bail!("MatMul operands must have rank >= 1, got {:?} and {:?}", a.shape(), b.shape());
    }
    let av: ArrayViewD<T> = if a.ndim() == 1 { a.view().insert_axis(Axis(0)) } else { a.view() };
    let bv: ArrayViewD<T> = if b.ndim() == 1 { b.view().insert_axis(Axis(1)) } else { b.view() };
    let (ra, rb) = (av.ndim(), bv.ndim());
    let (m, k) = (av.shape()[ra - 2], av.shape()[ra - 1]);
    let (k2, n) = (bv.shape()[rb - 2], bv.shape()[rb - 1]);
    if k != k2 {
        bail!("inner dimensions differ: {:?} x {:?}", a.shape(), b.shape());
    }
    let batch = broadcast_shapes(&av.shape()[..ra - 2], &bv.shape()[..rb - 2])?;
    let batch_count: usize = batch.iter().product();
    let mut out_shape = batch.clone();
    out_shape.extend([m, n]);
    let mut out = ArrayD::<T>::zeros(IxDyn(&out_shape));
    let b_batch: usize = bv.shape()[..rb - 2].iter().product();
    if b_batch == 1 && av.is_standard_layout() && out.is_standard_layout() {
        // One tall product: fold every batch dimension of `a` into M (the common x[B,T,K] @ W[K,N] case).
        let rows = batch_count * m;
        let a2 = av.into_shape_with_order((rows, k)).map_err(|e| op_err!("{e}"))?;
        let mut bsq = bv.view();
        while bsq.ndim() > 2 {
            bsq = bsq.index_axis_move(Axis(0), 0);
        }
        let bsq = bsq.into_dimensionality::<ndarray::Ix2>().map_err(|e| op_err!("{e}"))?;
        let mut o2 = out.view_mut().into_shape_with_order((rows, n)).map_err(|e| op_err!("{e}"))?;
        kernel(a2, bsq, &mut o2);
    } else {
        let mut a_shape = batch.clone();
        a_shape.extend([m, k]);
        let mut b_shape = batch.clone();
        b_shape.extend([k, n]);
        let ab = av.broadcast(IxDyn(&a_shape)).ok_or_else(|| op_err!("cannot broadcast {:?}", a.shape()))?;
        let bb = bv.broadcast(IxDyn(&b_shape)).ok_or_else(|| op_err!("cannot broadcast {:?}", b.shape()))?;
        for idx in ndarray::indices(IxDyn(&batch)) {
            let (mut x, mut y, mut o) = (ab.view(), bb.view(), out.view_mut());
            for &i in idx.slice() {
                x = x.index_axis_move(Axis(0), i);
                y = y.index_axis_move(Axis(0), i);
                o = o.index_axis_move(Axis(0), i);
            }
            let x = x.into_dimensionality().map_err(|e| op_err!("{e}"))?;
            let y = y.into_dimensionality().map_err(|e| op_err!("{e}"))?;
            let mut o = o.into_dimensionality().map_err(|e| op_err!("{e}"))?;
            kernel(x, y, &mut o);
        }
    }
    let mut out = out;
    if b.ndim() == 1 {
        let last = out.ndim() - 1;
        out = out.index_axis_move(Axis(last), 0);
    }
    if a.ndim() == 1 {
        let row_axis = out.ndim() - if b.ndim() == 1 { 1 } else { 2 };
        out = out.index_axis_move(Axis(row_axis), 0);
    }
    Ok(out)
}

fn matmul_i64(a: &ArrayD<i64>, b: &ArrayD<i64>) -> OpResult<ArrayD<i64>> {
    batched(a, b, int_gemm)
}

pub fn matmul(a: &RtTensor, b: &RtTensor) -> OpResult<RtTensor> {
    match (a, b) {
        (RtTensor::F32(x), RtTensor::F32(y)) => Ok(RtTensor::F32(batched(x, y, |p, q, o| sgemm(p, q, o, 1.0, 0.0))?)),
        (RtTensor::F64(x), RtTensor::F64(y)) => Ok(RtTensor::F64(batched(x, y, |p, q, o| dgemm(p, q, o, 1.0, 0.0))?)),
        _ if a.dtype() != b.dtype() => bail!("operand types differ: {} vs {}", a.dtype(), b.dtype()),
        _ if a.dtype().is_float() => Ok(matmul(&a.cast(DType::F32), &b.cast(DType::F32))?.cast(a.dtype())),
        _ if a.dtype().is_int() => Ok(RtTensor::I64(matmul_i64(&a.cast_array(), &b.cast_array())?).cast(a.dtype())),
        _ => bail!("MatMul does not support {}", a.dtype()),
    }
}

/// Gemm: alpha * op(A) op(B) + beta * C, C broadcast to [M, N].
pub fn gemm(ctx: &OpCtx) -> OpResult<RtTensor> {
    let (a, b, c) = (ctx.input(0)?, ctx.input(1)?, ctx.opt_input(2));
    if a.shape().len() != 2 || b.shape().len() != 2 {
        bail!("Gemm needs 2-D A and B, got {:?} and {:?}", a.shape(), b.shape());
    }
    let (alpha, beta) = (ctx.float("alpha", 1.0), ctx.float("beta", 1.0));
    let (ta, tb) = (ctx.int("transA", 0) != 0, ctx.int("transB", 0) != 0);
    let dtype = a.dtype();
    if dtype == DType::F32 {
        let (x, y) = (a.to_f32(), b.to_f32());
        let x2 = x.view().into_dimensionality::<ndarray::Ix2>().map_err(|e| op_err!("{e}"))?;
        let y2 = y.view().into_dimensionality::<ndarray::Ix2>().map_err(|e| op_err!("{e}"))?;
        let x2 = if ta { x2.reversed_axes() } else { x2 };
        let y2 = if tb { y2.reversed_axes() } else { y2 };
        let (m, k) = x2.dim();
        let (k2, n) = y2.dim();
        if k != k2 {
            bail!("inner dimensions differ after transA={ta}, transB={tb}: {:?} x {:?}", a.shape(), b.shape());
        }
        let mut out = Array2::<f32>::zeros((m, n));
        if let Some(c) = c {
            let cf = c.to_f32();
            let cb =
                cf.broadcast((m, n)).ok_or_else(|| op_err!("C {:?} does not broadcast to [{m}, {n}]", c.shape()))?;
            out.zip_mut_with(&cb, |o, &v| *o = beta * v);
        }
        sgemm(x2, y2, &mut out.view_mut(), alpha, 1.0);
        return Ok(RtTensor::F32(out.into_dyn()));
    }
    let (x, y) = (a.cast_array::<f64>(), b.cast_array::<f64>());
    let x2 = x.view().into_dimensionality::<ndarray::Ix2>().map_err(|e| op_err!("{e}"))?;
    let y2 = y.view().into_dimensionality::<ndarray::Ix2>().map_err(|e| op_err!("{e}"))?;
    let x2 = if ta { x2.reversed_axes() } else { x2 };
    let y2 = if tb { y2.reversed_axes() } else { y2 };
    let (m, k) = x2.dim();
    let (k2, n) = y2.dim();
    if k != k2 {
        bail!("inner dimensions differ after transA={ta}, transB={tb}: {:?} x {:?}", a.shape(), b.shape());
    }
    let mut out = Array2::<f64>::zeros((m, n));
    if let Some(c) = c {
        let cf = c.cast_array::<f64>();
        let cb = cf.broadcast((m, n)).ok_or_else(|| op_err!("C {:?} does not broadcast to [{m}, {n}]", c.shape()))?;
        out.zip_mut_with(&cb, |o, &v| *o = beta as f64 * v);
    }
    dgemm(x2, y2, &mut out.view_mut(), alpha as f64, 1.0);
    Ok(RtTensor::F64(out.into_dyn()).cast(dtype))
}

/// `x - zero_point` in i64, where a 1-D zero point of a rank >= 2 operand applies along `per_axis_from_end`
/// (1: per row of A, 0: per column of B).
fn minus_zero_point(x: &RtTensor, zp: Option<&RtTensor>, per_row: bool) -> OpResult<ArrayD<i64>> {
    let xi = x.cast_array::<i64>();
    let Some(zp) = zp else { return Ok(xi) };
    let mut z = zp.cast_array::<i64>();
    if per_row && z.ndim() == 1 && xi.ndim() >= 2 && z.len() > 1 {
        z = z.insert_axis(Axis(1));
    }
    ew(&xi, &z, |p, q| p - q)
}

pub fn matmul_integer(ctx: &OpCtx) -> OpResult<RtTensor> {
    let a = minus_zero_point(ctx.input(0)?, ctx.opt_input(2), true)?;
    let b = minus_zero_point(ctx.input(1)?, ctx.opt_input(3), false)?;
    Ok(RtTensor::I64(matmul_i64(&a, &b)?).cast(DType::I32))
}

pub fn qlinear_matmul(ctx: &OpCtx) -> OpResult<RtTensor> {
    let a = minus_zero_point(ctx.input(0)?, ctx.opt_input(2), true)?;
    let b = minus_zero_point(ctx.input(3)?, ctx.opt_input(5), false)?;
    let product = matmul_i64(&a, &b)?;
    let mut a_scale = ctx.input(1)?.cast_array::<f32>();
    if a_scale.ndim() == 1 && a_scale.len() > 1 {
        a_scale = a_scale.insert_axis(Axis(1));
    }
    let b_scale = ctx.input(4)?.cast_array::<f32>();
    let y_scale = ctx.input(6)?.cast_array::<f32>();
    let y_zp = ctx.input(7)?;
    let multiplier = ew(&ew(&a_scale, &b_scale, |p, q| p * q)?, &y_scale, |p, q| p / q)?;
    let zp = y_zp.cast_array::<f32>();
    let scaled = ew(&product.mapv(|v| v as f32), &multiplier, |p, q| p * q)?;
    let (lo, hi) = y_zp.dtype().int_range().ok_or_else(|| op_err!("y_zero_point must be an integer type"))?;
    let q = ew(&scaled, &zp, |v, z| (v.round_ties_even() + z).clamp(lo as f32, hi as f32))?;
    Ok(RtTensor::F32(q).cast(y_zp.dtype()))
}

/// Rows of `x` as a [rows, K] f32 matrix (K = last dimension).
pub fn as_rows(x: ArrayD<f32>) -> OpResult<(Array2<f32>, Vec<usize>)> {
    let shape = x.shape().to_vec();
    let k = *shape.last().ok_or_else(|| op_err!("operand must have rank >= 1"))?;
    let rows: usize = shape[..shape.len() - 1].iter().product();
    let x2 = x.into_shape_with_order((rows, k)).map_err(|e| op_err!("{e}"))?;
    Ok((x2, shape))
}

/// `int_linear(qx[.., K], qw[N, K], scale[N], bias?[N])` = scale (.) (qx qw^T) + bias.
pub fn int_linear(ctx: &OpCtx) -> OpResult<RtTensor> {
    let (qx, qw, scale, bias) = (ctx.input(0)?, ctx.input(1)?, ctx.input(2)?, ctx.opt_input(3));
    if !qx.dtype().is_int() || !qw.dtype().is_int() {
        bail!("int_linear needs integer operands, got {} and {}", qx.dtype(), qw.dtype());
    }
    if qw.shape().len() != 2 {
        bail!("weight must be [N, K], got {:?}", qw.shape());
    }
    let (n, k) = (qw.shape()[0], qw.shape()[1]);
    if qx.shape().last() != Some(&k) {
        bail!("qx {:?} does not end in K = {k} of the weight {:?}", qx.shape(), qw.shape());
    }
    let (x2, x_shape) = as_rows(qx.cast_array::<f32>().as_standard_layout().into_owned())?;
    let w = qw.cast_array::<f32>().into_dimensionality::<ndarray::Ix2>().map_err(|e| op_err!("{e}"))?;
    let amax = x2.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
    let bmax = w.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
    let mut out = Array2::<f32>::zeros((x2.dim().0, n));
    if amax * bmax * (k as f64) < (1u64 << 24) as f64 {
        sgemm(x2.view(), w.t(), &mut out.view_mut(), 1.0, 0.0);
    } else {
        let (xd, wd) = (x2.mapv(|v| v as f64), w.mapv(|v| v as f64));
        let mut od = Array2::<f64>::zeros((x2.dim().0, n));
        dgemm(xd.view(), wd.t(), &mut od.view_mut(), 1.0, 0.0);
        out.zip_mut_with(&od, |o, &v| *o = v as f32);
    }
    let scale = scale.cast_array::<f32>();
    if scale.len() != n && scale.len() != 1 {
        bail!("scale {:?} must have N = {n} elements", scale.shape());
    }
    let scale: Vec<f32> = if scale.len() == 1 {
        vec![scale.iter().copied().next().unwrap_or(1.0); n]
    } else {
        scale.iter().copied().collect()
    };
    let bias: Option<Vec<f32>> = bias.map(|b| b.cast_array::<f32>().iter().copied().collect());
    if let Some(b) = &bias {
        if b.len() != n {
            bail!("bias must have N = {n} elements, got {}", b.len());
        }
    }
    for mut row in out.rows_mut() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = *v * scale[j] + bias.as_ref().map_or(0.0, |b| b[j]);
        }
    }
    let mut out_shape = x_shape;
    if let Some(last) = out_shape.last_mut() {
        *last = n;
    }
    let out = out.into_shape_with_order(IxDyn(&out_shape)).map_err(|e| op_err!("{e}"))?;
    let dtype = ctx.outputs.first().map(|o| o.ty.dtype).filter(|d| d.is_float()).unwrap_or(DType::F32);
    Ok(RtTensor::F32(out).cast(dtype))
}

#[cfg(test)]
mod skinny_tests {
    use super::*;
    use ndarray::{Array2, ShapeBuilder};

    /// The streaming decode path agrees with a float64 product for both weight layouts and with beta.
    #[test]
    fn skinny_path_matches_f64_reference() {
        let (k, n) = (300, 700);
        let mut seed = 12345u64;
        let mut rnd = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        for m in [1usize, 3, 8] {
            let a = Array2::from_shape_fn((m, k), |_| rnd());
            let b_rows = Array2::from_shape_fn((k, n), |_| rnd());
            let w = Array2::from_shape_fn((n, k), |_| rnd());
            let b_cols = w.t();
            let c0 = Array2::from_shape_fn((m, n).f(), |_| rnd());
            for (b, name) in [(b_rows.view(), "row-major"), (b_cols, "transposed")] {
                let mut c = c0.clone();
                assert!(skinny_sgemm(a.view(), b, &mut c.view_mut(), 2.0, 0.5), "{name} took the fallback");
                for i in 0..m {
                    for j in 0..n {
                        let exact: f64 = (0..k).map(|t| a[[i, t]] as f64 * b[[t, j]] as f64).sum::<f64>() * 2.0
                            + 0.5 * c0[[i, j]] as f64;
                        assert!((c[[i, j]] as f64 - exact).abs() < 1e-4, "{name} m={m} ({i},{j})");
                    }
                }
            }
        }
    }
}

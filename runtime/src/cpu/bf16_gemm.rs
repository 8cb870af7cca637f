//! f32 matrix products through bf16 operands: `c = a b^T` with a and b rounded to bf16 (round to nearest
//! even) and every product summed in f32 by AVX512-BF16's `vdpbf16ps`, twice the f32 FMA rate on the
//! CPUs that have it (Zen 4: about 210 against 106 GFLOPS per core).
//!
//! For work that tolerates bf16 inputs: the calibration forward (`--calib-precision bf16`), the GPTQ
//! Gram matrices (a relative error of 2^-9 per input is far below GPTQ's 1% damping), and products of
//! small integers, which bf16 holds exactly (|v| <= 256), so there the result equals the f32 one.
//! [`available`] says whether the CPU runs it; callers fall back to the f32 GEMM otherwise.
//!
//! Layout: the operands are converted once per call to bf16 pairs along the reduction, stored as u32
//! (low half first): a row-major a becomes `[rows][pairs]`, b (and any operand given as columns, such as
//! X^T for a Gram matrix) `[pairs][columns]` padded to [`NR`] columns, so the kernel broadcasts one pair
//! of a and loads 32 lanes of b per step. The 12 x 32 tile stays in 24 zmm accumulators over the whole
//! reduction; column panels run in parallel (rayon).

use rayon::prelude::*;

/// Rows of `a` per register tile.
pub const MR: usize = 12;
/// Rows of `b` (columns of c) per register tile: two 16-lane vectors.
pub const NR: usize = 32;

/// Whether this CPU runs the bf16 kernel (AVX-512F and AVX512-BF16).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// A strided f32 matrix of `rows` x `depth` (depth = the reduction axis): element (i, p) is
/// `data[i * row_stride + p * depth_stride]`.
#[derive(Clone, Copy, Debug)]
pub struct Strided<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub depth: usize,
    pub row_stride: usize,
    pub depth_stride: usize,
}

impl<'a> Strided<'a> {
    /// A row-major `[rows x depth]` matrix (the reduction runs along each row).
    pub fn rows(data: &'a [f32], rows: usize, depth: usize) -> Strided<'a> {
        Strided { data, rows, depth, row_stride: depth, depth_stride: 1 }
    }

    /// The transpose of a row-major `[depth x rows]` matrix (the reduction runs down the columns), e.g.
    /// X^T for a Gram matrix X^T X of `[tokens x channels]` activations.
    pub fn columns(data: &'a [f32], depth: usize, rows: usize) -> Strided<'a> {
        Strided { data, rows, depth, row_stride: 1, depth_stride: rows }
    }

    fn last_index(&self) -> usize {
        if self.rows == 0 || self.depth == 0 {
            0
        } else {
            (self.rows - 1) * self.row_stride + (self.depth - 1) * self.depth_stride
        }
    }
}

/// Round to nearest even (NaN stays NaN), as `vcvtneps2bf16`.
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// The f32 value of a bf16.
#[inline(always)]
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// An operand converted to bf16 pairs: pair p of row i is `data[offset(i) + p * pair_stride]`.
struct Pairs {
    data: Vec<u32>,
    /// Row-major `[rows][pairs]` (stride `pairs`), or panels of [`NR`] rows (see [`column_pairs`]).
    layout: Layout,
    pair_stride: usize,
}

#[derive(Clone, Copy)]
enum Layout {
    Rows { row_stride: usize },
    Panels { pairs: usize },
}

impl Pairs {
    #[inline(always)]
    fn offset(&self, i: usize) -> usize {
        match self.layout {
            Layout::Rows { row_stride } => i * row_stride,
            Layout::Panels { pairs } => (i / NR) * pairs * NR + i % NR,
        }
    }
}

#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    u32::from(to_bf16(lo)) | (u32::from(to_bf16(hi)) << 16)
}

/// `[rows][pairs]`: for a (broadcast per row and pair).
fn row_pairs(m: &Strided) -> Pairs {
    let pairs = m.depth.div_ceil(2);
    let mut data = vec![0u32; m.rows * pairs];
    data.par_chunks_mut(pairs.max(1)).enumerate().for_each(|(i, dst)| row_to_pairs(m, i, dst));
    Pairs { data, layout: Layout::Rows { row_stride: pairs }, pair_stride: 1 }
}

/// Row `i` of `m` as bf16 pairs into `dst` (`depth.div_ceil(2)` entries).
fn row_to_pairs(m: &Strided, i: usize, dst: &mut [u32]) {
    let pairs = dst.len();
    let base = i * m.row_stride;
    if m.depth_stride == 1 {
        let src = &m.data[base..base + m.depth];
        // SAFETY: `available()` was checked by the caller before any conversion.
        #[cfg(target_arch = "x86_64")]
        let done = unsafe { convert_row(src, dst) };
        #[cfg(not(target_arch = "x86_64"))]
        let done = 0;
        for p in done..pairs {
            dst[p] = pair(src[2 * p], src.get(2 * p + 1).copied().unwrap_or(0.0));
        }
    } else {
        let at = |p: usize| m.data[base + p * m.depth_stride];
        for (p, d) in dst.iter_mut().enumerate() {
            *d = pair(at(2 * p), if 2 * p + 1 < m.depth { at(2 * p + 1) } else { 0.0 });
        }
    }
}

/// Panels of [`NR`] rows, each `[pairs][NR]` (rows padded to a multiple of NR with zeros), so that the
/// kernel reads a panel's 32 lanes of consecutive pairs from consecutive memory: for b (32 lanes per
/// load), and for a given as columns (X^T: rows 2p and 2p + 1 of X make pair p).
fn column_pairs(m: &Strided) -> Pairs {
    let pairs = m.depth.div_ceil(2);
    let panel = pairs * NR;
    let mut data = vec![0u32; m.rows.div_ceil(NR) * panel];
    if m.row_stride == 1 {
        data.par_chunks_mut(panel.max(1)).enumerate().for_each(|(jp, dst)| {
            let (j0, lanes) = (jp * NR, NR.min(m.rows - jp * NR));
            for (p, d) in dst.chunks_exact_mut(NR).enumerate() {
                let lo = &m.data[2 * p * m.depth_stride + j0..][..lanes];
                let hi = (2 * p + 1 < m.depth).then(|| &m.data[(2 * p + 1) * m.depth_stride + j0..][..lanes]);
                for (i, d) in d[..lanes].iter_mut().enumerate() {
                    *d = pair(lo[i], hi.map_or(0.0, |h| h[i]));
                }
            }
        });
    } else {
        // Row-major rows (a weight [n x k]): each row converted into a scratch row, then spread over its
        // panel lane (no converted copy of the whole operand).
        data.par_chunks_mut(panel.max(1)).enumerate().for_each(|(jp, dst)| {
            let (j0, lanes) = (jp * NR, NR.min(m.rows - jp * NR));
            let mut row = vec![0u32; pairs];
            for lane in 0..lanes {
                row_to_pairs(m, j0 + lane, &mut row);
                for (p, &v) in row.iter().enumerate() {
                    dst[p * NR + lane] = v;
                }
            }
        });
    }
    Pairs { data, layout: Layout::Panels { pairs }, pair_stride: NR }
}

/// Converts the whole 32-value chunks of a contiguous row to pairs; returns how many pairs it wrote.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn convert_row(src: &[f32], dst: &mut [u32]) -> usize {
    use std::arch::x86_64::*;
    let chunks = src.len() / 32;
    for c in 0..chunks {
        let lo = _mm512_loadu_ps(src.as_ptr().add(32 * c));
        let hi = _mm512_loadu_ps(src.as_ptr().add(32 * c + 16));
        // dst lanes 0..16 come from the second argument: the 32 values stay in order.
        let packed: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_storeu_si512(dst.as_mut_ptr().add(16 * c) as *mut _, packed);
    }
    16 * chunks
}

/// `c[i * ldc + j] = sum_p a(i, p) b(j, p)` (or `+=` when `accumulate`) over bf16-rounded operands with
/// f32 sums. With `upper`, only the register tiles holding some j >= i are computed (a Gram matrix's
/// upper triangle; other entries of c are left as they were). Returns false, touching nothing, when the
/// CPU lacks AVX512-BF16. Panics if the shapes disagree or c is too small.
pub fn gemm_nt(a: &Strided, b: &Strided, c: &mut [f32], ldc: usize, accumulate: bool, upper: bool) -> bool {
    assert_eq!(a.depth, b.depth, "bf16 gemm: reduction lengths differ");
    assert!(a.rows == 0 || b.rows == 0 || a.last_index() < a.data.len() && b.last_index() < b.data.len());
    assert!(ldc >= b.rows && (a.rows == 0 || c.len() >= (a.rows - 1) * ldc + b.rows), "bf16 gemm: c too small");
    if !available() {
        return false;
    }
    let (m, n) = (a.rows, b.rows);
    if m == 0 || n == 0 {
        return true;
    }
    let pairs = a.depth.div_ceil(2);
    let same = std::ptr::eq(a.data, b.data)
        && (a.rows, a.row_stride, a.depth_stride) == (b.rows, b.row_stride, b.depth_stride);
    let pb = column_pairs(b);
    let pa_own;
    let pa = if same {
        &pb
    } else {
        pa_own = if a.depth_stride == 1 || a.row_stride != 1 { row_pairs(a) } else { column_pairs(a) };
        &pa_own
    };
    let c_addr = c.as_mut_ptr() as usize;
    (0..n.div_ceil(NR)).into_par_iter().for_each(|jp| {
        let j0 = jp * NR;
        let cols = NR.min(n - j0);
        // With `upper`, only the row tiles holding some i <= j of this panel.
        let tiles = if upper { m.div_ceil(MR).min((j0 + NR).div_ceil(MR)) } else { m.div_ceil(MR) };
        // The panel's tiles, summed over the reduction in blocks of KC pairs: a block of b's panel stays in
        // L1 while every row tile runs over it. Each tile's sums still run over p in order (the partial
        // sums go through memory exactly), so the result does not depend on KC. The sums start from +0.
        let mut panel = vec![0f32; tiles * MR * NR];
        for kb in (0..pairs).step_by(KC) {
            let kn = KC.min(pairs - kb);
            for (ip, tile) in panel.chunks_exact_mut(MR * NR).enumerate() {
                let i0 = ip * MR;
                let rows = MR.min(m - i0);
                // Rows past the end repeat the last row (their results are dropped).
                let a_rows: [usize; MR] =
                    std::array::from_fn(|r| pa.offset(i0 + r.min(rows - 1)) + kb * pa.pair_stride);
                let tile: &mut [f32; MR * NR] = tile.try_into().expect("chunks of MR * NR");
                // SAFETY: `available()` checked the CPU features; every a offset plus (kn - 1) *
                // pair_stride and every b offset plus 32 lanes stay inside the converted buffers.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    kernel_12x32(
                        kn,
                        pa.data.as_ptr(),
                        &a_rows,
                        pa.pair_stride,
                        pb.data.as_ptr().add(pb.offset(j0) + kb * pb.pair_stride),
                        pb.pair_stride,
                        tile,
                    )
                };
            }
        }
        for (ip, tile) in panel.chunks_exact(MR * NR).enumerate() {
            let i0 = ip * MR;
            for r in 0..MR.min(m - i0) {
                // SAFETY: row i0 + r < m and columns j0..j0 + cols < n lie inside c (asserted above); the
                // column panels are disjoint, so no two tasks write the same element.
                let dst =
                    unsafe { std::slice::from_raw_parts_mut((c_addr as *mut f32).add((i0 + r) * ldc + j0), cols) };
                let src = &tile[r * NR..r * NR + cols];
                if accumulate {
                    dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
                } else {
                    dst.copy_from_slice(src);
                }
            }
        }
    });
    true
}

/// Reduction pairs per block (a 32-lane panel block of b is KC x 128 bytes: 16 KB, half of L1).
const KC: usize = 128;

/// One 12 x 32 tile over `pairs` reduction pairs: pair p of tile row r is `a[a_rows[r] + p * a_pair]`,
/// the 32 columns' pair p `b[p * b_pair..][..32]`; the sums start from `c`'s contents (the tile,
/// row-major `[12][32]`) and are stored back there.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel_12x32(
    pairs: usize,
    a: *const u32,
    a_rows: &[usize; MR],
    a_pair: usize,
    b: *const u32,
    b_pair: usize,
    c: &mut [f32; MR * NR],
) {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); 2 * MR];
    for (i, v) in acc.iter_mut().enumerate() {
        // The running sums of this tile (zero before the first reduction block).
        *v = _mm512_loadu_ps(c.as_ptr().add(i * 16));
    }
    let rows: [*const u32; MR] = std::array::from_fn(|r| a.add(a_rows[r]));
    for p in 0..pairs {
        let bp = b.add(p * b_pair);
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(16) as *const _));
        let off = p * a_pair;
        for i in 0..MR {
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*rows[i].add(off) as i32));
            acc[2 * i] = _mm512_dpbf16_ps(acc[2 * i], av, b0);
            acc[2 * i + 1] = _mm512_dpbf16_ps(acc[2 * i + 1], av, b1);
        }
    }
    for (i, v) in acc.iter().enumerate() {
        _mm512_storeu_ps(c.as_mut_ptr().add(i * 16), *v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// True (with a note) where the CPU has no AVX512-BF16: the kernel tests have nothing to run there.
    fn skip_without_bf16() -> bool {
        if !available() {
            eprintln!("skipped: no AVX512-BF16 on this CPU");
        }
        !available()
    }

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 - 1001.0) * 0.00137).collect()
    }

    /// f64 sums of the bf16-rounded operands: what the kernel computes, up to f32 summation error.
    fn reference(a: &Strided, b: &Strided) -> Vec<f64> {
        let get = |m: &Strided, i: usize, p: usize| from_bf16(to_bf16(m.data[i * m.row_stride + p * m.depth_stride]));
        let mut c = vec![0f64; a.rows * b.rows];
        for i in 0..a.rows {
            for j in 0..b.rows {
                c[i * b.rows + j] = (0..a.depth).map(|p| get(a, i, p) as f64 * get(b, j, p) as f64).sum();
            }
        }
        c
    }

    #[test]
    fn bf16_rounding_is_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties to even (1.0).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
    }

    #[test]
    fn products_match_a_float64_reference_on_odd_shapes() {
        if skip_without_bf16() {
            return;
        }
        // Tails in every dimension: m = 29 (not a multiple of 12), n = 45 (of 32), odd depth 77; depth 601
        // spans three reduction blocks of KC pairs (the last one partial).
        for (m, n, k) in [(29, 45, 77), (29, 45, 601)] {
            let (av, bv) = (values(m * k, 1), values(n * k, 2));
            let (a, b) = (Strided::rows(&av, m, k), Strided::rows(&bv, n, k));
            let want = reference(&a, &b);
            let mut c = vec![f32::NAN; m * n];
            assert!(gemm_nt(&a, &b, &mut c, n, false, false));
            for (got, want) in c.iter().zip(&want) {
                assert!((*got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()), "k {k}: {got} vs {want}");
            }
            // Accumulating adds the same product again.
            assert!(gemm_nt(&a, &b, &mut c, n, true, false));
            for (got, want) in c.iter().zip(&want) {
                let want = 2.0 * want;
                assert!((*got as f64 - want).abs() <= 2e-5 * (1.0 + want.abs()), "k {k}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn gram_upper_tiles_from_columns() {
        if skip_without_bf16() {
            return;
        }
        // X [tokens x channels], Gram = X^T X through the column view, upper triangle only.
        let (tokens, ch) = (101, 70);
        let x = values(tokens * ch, 3);
        let xt = Strided::columns(&x, tokens, ch);
        let want = reference(&xt, &xt);
        let mut g = vec![-7.0f32; ch * ch];
        assert!(gemm_nt(&xt, &xt, &mut g, ch, false, true));
        for i in 0..ch {
            for j in i..ch {
                let w = want[i * ch + j];
                assert!((g[i * ch + j] as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()), "({i}, {j})");
            }
            // Tiles wholly below the diagonal are untouched.
            for j in 0..i {
                if (i / MR) * MR >= (j / NR) * NR + NR {
                    assert_eq!(g[i * ch + j], -7.0);
                }
            }
        }
    }

    #[test]
    fn small_integer_products_are_exact() {
        if skip_without_bf16() {
            return;
        }
        // int4 codes times int4 codes over k = 576: exact in bf16 and in the f32 sums.
        let (m, n, k) = (13, 33, 576);
        let av: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 16) as f32 - 8.0).collect();
        let bv: Vec<f32> = (0..n * k).map(|i| ((i * 11) % 15) as f32 - 7.0).collect();
        let mut c = vec![0f32; m * n];
        assert!(gemm_nt(&Strided::rows(&av, m, k), &Strided::rows(&bv, n, k), &mut c, n, false, false));
        for i in 0..m {
            for j in 0..n {
                let want: i64 = (0..k).map(|p| av[i * k + p] as i64 * bv[j * k + p] as i64).sum();
                assert_eq!(c[i * n + j], want as f32);
            }
        }
    }
}

//! Hadamard matrices of any order, the definition behind the `hadamard(x) {size}` op and the rotations
//! the `rotate` pass folds into weights (both must use the very same matrix, hence it lives in the IR).
//!
//! An order n = odd * 2^k is built as the Kronecker product H_m (x) H_{2^k/2^j} with m = odd * 2^j the
//! smallest order that has a construction here:
//!   * Sylvester, for powers of two (applied with the fast Walsh-Hadamard transform);
//!   * Paley I, m = q + 1 for a prime power q = 3 (mod 4) (12, 20, 24, 28, 44, 60, 108, 140, 344, ...);
//!   * Paley II, m = 2 (q + 1) for a prime power q = 1 (mod 4) (12, 20, 28, 36, 52, 60, 76, 100, 148, ...);
//!   * Williamson, m = 4 w from four symmetric circulant matrices of order w held in `WILLIAMSON`:
//!     156 (w = 39) and 172 (w = 43), which no Paley construction reaches, so that 11008 = H_172 (x)
//!     H_64 (Llama-2-7B's FFN) rather than H_344 (x) H_32: half the dense work per element.
//!
//! An order with no construction falls back to a block-diagonal matrix of the largest constructible
//! blocks ([`Hadamard::is_exact`] is then false): still orthogonal, but it mixes channels only inside
//! blocks.
//!
//! Convention: `transform` computes y = H x / sqrt(n) (y_i = sum_j H[i][j] x_j / sqrt(n)), so it is
//! orthonormal; H is not symmetric in general (Paley I is not), so the inverse is [`Hadamard::inverse`].

use std::fmt;

/// How the dense (non power-of-two) factor is built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Construction {
    /// No dense factor: H_n is Sylvester's.
    Sylvester,
    PaleyI {
        q: usize,
    },
    PaleyII {
        q: usize,
    },
    /// The Williamson array of four circulant matrices of odd order `w` (order 4 w).
    Williamson {
        w: usize,
    },
}

/// The Hadamard matrix qcc uses for one order, in factored form.
#[derive(Clone)]
pub struct Hadamard {
    n: usize,
    /// Size of each diagonal block (n when exact).
    block: usize,
    /// Order of the dense factor (1 for Sylvester) and its entries (+1/-1, row-major m x m).
    m: usize,
    dense: Vec<i8>,
    /// Power-of-two factor inside one block: block = m * pow2.
    pow2: usize,
    construction: Construction,
}

impl Hadamard {
    /// The matrix qcc uses for order `n` (n >= 1).
    pub fn new(n: usize) -> Hadamard {
        let n = n.max(1);
        if let Some(h) = Hadamard::exact(n) {
            return h;
        }
        // Largest constructible divisor as block size (1 at worst: the identity).
        let block = (1..n).rev().find(|b| n.is_multiple_of(*b) && Hadamard::exact(*b).is_some()).unwrap_or(1);
        let mut h = Hadamard::exact(block).unwrap_or_else(|| Hadamard::sylvester(1));
        h.n = n;
        h
    }

    fn sylvester(p: usize) -> Hadamard {
        Hadamard { n: p, block: p, m: 1, dense: vec![1], pow2: p, construction: Construction::Sylvester }
    }

    /// A true Hadamard matrix of order `n`, when one of the constructions reaches it.
    pub fn exact(n: usize) -> Option<Hadamard> {
        if n == 0 {
            return None;
        }
        let twos = n.trailing_zeros();
        let odd = n >> twos;
        if odd == 1 {
            return Some(Hadamard::sylvester(n));
        }
        for j in 0..=twos {
            let m = odd << j;
            if let Some((dense, construction)) = paley(m).or_else(|| williamson(m)) {
                return Some(Hadamard { n, block: n, m, dense, pow2: n / m, construction });
            }
        }
        None
    }

    pub fn size(&self) -> usize {
        self.n
    }

    /// False when the order had no construction and the matrix is block-diagonal.
    pub fn is_exact(&self) -> bool {
        self.block == self.n
    }

    pub fn block_size(&self) -> usize {
        self.block
    }

    /// The factors of one block, block = m * pow2: (m, pow2, the dense m x m factor's +-1 entries,
    /// row-major). [`Hadamard::transform`] runs a fast Walsh-Hadamard transform over each of the m
    /// rows of pow2 values, then the dense factor across them (GPU kernels replicate that order).
    pub fn factors(&self) -> (usize, usize, &[i8]) {
        (self.m, self.pow2, &self.dense)
    }

    pub fn construction(&self) -> Construction {
        self.construction
    }

    /// Entry (i, j) of the unnormalised matrix: +1 or -1 (0 off the diagonal blocks of a fallback).
    pub fn entry(&self, i: usize, j: usize) -> i8 {
        if i / self.block != j / self.block {
            return 0;
        }
        let (i, j) = (i % self.block, j % self.block);
        let (a, r) = (i / self.pow2, i % self.pow2);
        let (b, s) = (j / self.pow2, j % self.pow2);
        let sylvester = if (r & s).count_ones() % 2 == 0 { 1 } else { -1 };
        self.dense[a * self.m + b] * sylvester
    }

    /// y = H x / sqrt(n) in place (`x.len()` must be n; other lengths are left unchanged and reported).
    pub fn transform(&self, x: &mut [f64]) -> Result<(), HadamardError> {
        self.apply(x, false)
    }

    /// y = H^T x / sqrt(n), the inverse of [`Hadamard::transform`].
    pub fn inverse(&self, x: &mut [f64]) -> Result<(), HadamardError> {
        self.apply(x, true)
    }

    /// [`Hadamard::transform`] of each `n`-element row of `src` (f32), with the sums in f64 and each
    /// result rounded once to f32 into `dst`: bit-identical to widening a row, transforming it and
    /// narrowing it, without an f64 copy of the whole tensor. `src` and `dst` hold whole rows.
    pub fn transform_rows_f32(&self, src: &[f32], dst: &mut [f32]) -> Result<(), HadamardError> {
        if src.len() != dst.len() || !src.len().is_multiple_of(self.n.max(1)) {
            return Err(HadamardError { expected: self.n, actual: src.len() % self.n.max(1) });
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above).
            unsafe { self.rows_f32_avx512(src, dst) };
            return Ok(());
        } else if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            unsafe { self.rows_f32_avx2(src, dst) };
            return Ok(());
        }
        let mut row = vec![0f64; self.n];
        let mut scratch = self.scratch();
        for (s, d) in src.chunks_exact(self.n).zip(dst.chunks_exact_mut(self.n)) {
            row.iter_mut().zip(s).for_each(|(r, &v)| *r = f64::from(v));
            self.apply_with(&mut row, false, &mut scratch);
            d.iter_mut().zip(&row).for_each(|(o, &v)| *o = v as f32);
        }
        Ok(())
    }

    /// [`Hadamard::transform`] of each `n`-element row of `data` in place (`data` holds whole rows),
    /// bit-identical to transforming the rows one at a time.
    pub fn transform_rows(&self, data: &mut [f64]) -> Result<(), HadamardError> {
        if !data.len().is_multiple_of(self.n.max(1)) {
            return Err(HadamardError { expected: self.n, actual: data.len() % self.n.max(1) });
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above).
            unsafe { self.rows_f64_avx512(data) };
            return Ok(());
        } else if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            unsafe { self.rows_f64_avx2(data) };
            return Ok(());
        }
        let mut scratch = self.scratch();
        data.chunks_exact_mut(self.n).for_each(|row| self.apply_with(row, false, &mut scratch));
        Ok(())
    }

    /// The lane buffers of the batched transforms: the rows of one group (row l in lane l) and the
    /// dense factor's output.
    fn lane_buffers(&self) -> (Vec<Lanes>, Vec<Lanes>) {
        (vec![[0f64; LANES]; self.n], vec![[0f64; LANES]; if self.m > 1 { self.block } else { 0 }])
    }

    /// Groups of [`LANES`] rows of `src` through [`Hadamard::apply_lanes`] into `dst`. Lanes past a short
    /// last group keep stale values that no row reads.
    ///
    /// # Safety
    /// The CPU must support `V`'s instructions.
    #[inline(always)]
    unsafe fn rows_f32<V: Vector8>(&self, src: &[f32], dst: &mut [f32]) {
        let n = self.n.max(1);
        let (mut x, mut out) = self.lane_buffers();
        for (s, d) in src.chunks(n * LANES).zip(dst.chunks_mut(n * LANES)) {
            for (l, row) in s.chunks_exact(n).enumerate() {
                x.iter_mut().zip(row).for_each(|(xi, &v)| xi[l & (LANES - 1)] = f64::from(v));
            }
            self.apply_lanes::<V>(&mut x, &mut out);
            for (l, row) in d.chunks_exact_mut(n).enumerate() {
                row.iter_mut().zip(&x).for_each(|(o, xi)| *o = xi[l & (LANES - 1)] as f32);
            }
        }
    }

    /// As [`Hadamard::rows_f32`], in place on f64 rows.
    ///
    /// # Safety
    /// The CPU must support `V`'s instructions.
    #[inline(always)]
    unsafe fn rows_f64<V: Vector8>(&self, data: &mut [f64]) {
        let n = self.n.max(1);
        let (mut x, mut out) = self.lane_buffers();
        for group in data.chunks_mut(n * LANES) {
            for (l, row) in group.chunks_exact(n).enumerate() {
                x.iter_mut().zip(row).for_each(|(xi, &v)| xi[l & (LANES - 1)] = v);
            }
            self.apply_lanes::<V>(&mut x, &mut out);
            for (l, row) in group.chunks_exact_mut(n).enumerate() {
                row.iter_mut().zip(&x).for_each(|(o, xi)| *o = xi[l & (LANES - 1)]);
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn rows_f32_avx512(&self, src: &[f32], dst: &mut [f32]) {
        self.rows_f32::<simd::Avx512>(src, dst)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn rows_f32_avx2(&self, src: &[f32], dst: &mut [f32]) {
        self.rows_f32::<simd::Avx2>(src, dst)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn rows_f64_avx512(&self, data: &mut [f64]) {
        self.rows_f64::<simd::Avx512>(data)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn rows_f64_avx2(&self, data: &mut [f64]) {
        self.rows_f64::<simd::Avx2>(data)
    }

    /// [`Hadamard::apply_with`] (forward) on [`LANES`] rows at once, row l in lane l: every lane sees
    /// exactly the scalar operations in the same order (separate multiply and add, never fused), so the
    /// results are the same bits as one row at a time.
    #[inline(always)]
    unsafe fn apply_lanes<V: Vector8>(&self, x: &mut [Lanes], out: &mut [Lanes]) {
        let scale = V::splat(1.0 / (self.block as f64).sqrt());
        let (m, p) = (self.m, self.pow2);
        let dense: Vec<f64> = self.dense.iter().map(|&h| f64::from(h)).collect();
        for block in x.chunks_exact_mut(self.block) {
            for row in block.chunks_exact_mut(p) {
                let n = row.len();
                let mut h = 1;
                while h < n {
                    for pair in row.chunks_exact_mut(2 * h) {
                        let (lo, hi) = pair.split_at_mut(h);
                        for (a, b) in lo.iter_mut().zip(hi) {
                            let (u, v) = (V::load(a), V::load(b));
                            V::store(a, V::add(u, v));
                            V::store(b, V::sub(u, v));
                        }
                    }
                    h *= 2;
                }
            }
            if m > 1 && m <= DENSE_IN_REGISTERS {
                // Output a at position r = sum over b (in order, from 0) of H[a][b] * input b at r: the m
                // inputs of one position are loaded once and every output of it summed in registers.
                let mut xs = [V::splat(0.0); DENSE_IN_REGISTERS];
                for r in 0..p {
                    for (b, xv) in xs[..m].iter_mut().enumerate() {
                        *xv = V::load(&block[b * p + r]);
                    }
                    // Four outputs at a time: independent sums, so the adds overlap.
                    let mut a = 0;
                    while a + 4 <= m {
                        let hr = |i: usize| &dense[(a + i) * m..(a + i + 1) * m];
                        let (h0, h1, h2, h3) = (hr(0), hr(1), hr(2), hr(3));
                        let mut acc = [V::splat(0.0); 4];
                        for (b, &xv) in xs[..m].iter().enumerate() {
                            acc[0] = V::add(acc[0], V::mul(V::splat(h0[b]), xv));
                            acc[1] = V::add(acc[1], V::mul(V::splat(h1[b]), xv));
                            acc[2] = V::add(acc[2], V::mul(V::splat(h2[b]), xv));
                            acc[3] = V::add(acc[3], V::mul(V::splat(h3[b]), xv));
                        }
                        for (i, &v) in acc.iter().enumerate() {
                            V::store(&mut out[(a + i) * p + r], v);
                        }
                        a += 4;
                    }
                    for a in a..m {
                        let mut acc = V::splat(0.0);
                        for (&h, &xv) in dense[a * m..(a + 1) * m].iter().zip(&xs[..m]) {
                            acc = V::add(acc, V::mul(V::splat(h), xv));
                        }
                        V::store(&mut out[a * p + r], acc);
                    }
                }
                block.copy_from_slice(out);
            } else if m > 1 {
                for (a, o) in out.chunks_exact_mut(p).enumerate() {
                    // Starting from 0 + h x, as the scalar path accumulates into a zeroed buffer.
                    let mut first = true;
                    for (b, xb) in block.chunks_exact(p).enumerate() {
                        let h = V::splat(f64::from(self.dense[a * m + b]));
                        for (ov, xv) in o.iter_mut().zip(xb) {
                            let acc = if first { V::splat(0.0) } else { V::load(ov) };
                            V::store(ov, V::add(acc, V::mul(h, V::load(xv))));
                        }
                        first = false;
                    }
                }
                block.copy_from_slice(out);
            }
            for v in block.iter_mut() {
                V::store(v, V::mul(V::load(v), scale));
            }
        }
    }

    fn scratch(&self) -> Vec<f64> {
        vec![0f64; if self.m > 1 { self.block } else { 0 }]
    }

    fn apply(&self, x: &mut [f64], transpose: bool) -> Result<(), HadamardError> {
        if x.len() != self.n {
            return Err(HadamardError { expected: self.n, actual: x.len() });
        }
        self.apply_with(x, transpose, &mut self.scratch());
        Ok(())
    }

    /// The transform of one row of length n; `out` is [`Hadamard::scratch`].
    fn apply_with(&self, x: &mut [f64], transpose: bool, out: &mut [f64]) {
        let scale = 1.0 / (self.block as f64).sqrt();
        let (m, p) = (self.m, self.pow2);
        for block in x.chunks_exact_mut(self.block) {
            for row in block.chunks_exact_mut(p) {
                fwht(row);
            }
            if m > 1 {
                // Dense factor: output row a (p values) = sum_b H[a][b] * input row b, accumulated in b
                // order over whole rows (vectorisable; each element sees the same sums as one at a time).
                out.fill(0.0);
                for (a, o) in out.chunks_exact_mut(p).enumerate() {
                    for (b, xb) in block.chunks_exact(p).enumerate() {
                        let h = f64::from(if transpose { self.dense[b * m + a] } else { self.dense[a * m + b] });
                        for (ov, &xv) in o.iter_mut().zip(xb) {
                            *ov += h * xv;
                        }
                    }
                }
                block.copy_from_slice(out);
            }
            block.iter_mut().for_each(|v| *v *= scale);
        }
    }
}

impl fmt::Display for Hadamard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let core = match self.construction {
            Construction::Sylvester => format!("H_{} (Sylvester)", self.pow2),
            Construction::PaleyI { q } => format!("H_{} (Paley I, q = {q}) x H_{}", self.m, self.pow2),
            Construction::PaleyII { q } => format!("H_{} (Paley II, q = {q}) x H_{}", self.m, self.pow2),
            Construction::Williamson { w } => format!("H_{} (Williamson, w = {w}) x H_{}", self.m, self.pow2),
        };
        if self.is_exact() {
            f.write_str(&core)
        } else {
            write!(
                f,
                "block-diagonal: {} blocks of {core} (no Hadamard construction for {})",
                self.n / self.block,
                self.n
            )
        }
    }
}

impl fmt::Debug for Hadamard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hadamard({}: {self})", self.n)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("hadamard transform of size {expected} applied to {actual} values")]
pub struct HadamardError {
    pub expected: usize,
    pub actual: usize,
}

/// Rows transformed together by the batched transforms (one f64 SIMD lane each).
const LANES: usize = 8;
/// Dense factors up to this order are summed with their inputs held in registers (or L1).
const DENSE_IN_REGISTERS: usize = 64;
type Lanes = [f64; LANES];

/// Eight f64 lanes as one vector type: the batched transforms are written once against this and
/// instantiated per instruction set (the compiler's own vectoriser picked gathers across rows instead).
trait Vector8: Copy {
    type V: Copy;
    unsafe fn load(p: &Lanes) -> Self::V;
    unsafe fn store(p: &mut Lanes, v: Self::V);
    unsafe fn splat(x: f64) -> Self::V;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{Lanes, Vector8};
    use std::arch::x86_64::*;

    #[derive(Clone, Copy)]
    pub struct Avx512;

    // SAFETY (all methods): callers run inside an `avx512f` target-feature function (checked at run time).
    impl Vector8 for Avx512 {
        type V = __m512d;
        #[inline(always)]
        unsafe fn load(p: &Lanes) -> __m512d {
            _mm512_loadu_pd(p.as_ptr())
        }
        #[inline(always)]
        unsafe fn store(p: &mut Lanes, v: __m512d) {
            _mm512_storeu_pd(p.as_mut_ptr(), v)
        }
        #[inline(always)]
        unsafe fn splat(x: f64) -> __m512d {
            _mm512_set1_pd(x)
        }
        #[inline(always)]
        unsafe fn add(a: __m512d, b: __m512d) -> __m512d {
            _mm512_add_pd(a, b)
        }
        #[inline(always)]
        unsafe fn sub(a: __m512d, b: __m512d) -> __m512d {
            _mm512_sub_pd(a, b)
        }
        #[inline(always)]
        unsafe fn mul(a: __m512d, b: __m512d) -> __m512d {
            _mm512_mul_pd(a, b)
        }
    }

    #[derive(Clone, Copy)]
    pub struct Avx2;

    // SAFETY (all methods): callers run inside an `avx2` target-feature function (checked at run time).
    impl Vector8 for Avx2 {
        type V = (__m256d, __m256d);
        #[inline(always)]
        unsafe fn load(p: &Lanes) -> Self::V {
            (_mm256_loadu_pd(p.as_ptr()), _mm256_loadu_pd(p.as_ptr().add(4)))
        }
        #[inline(always)]
        unsafe fn store(p: &mut Lanes, v: Self::V) {
            _mm256_storeu_pd(p.as_mut_ptr(), v.0);
            _mm256_storeu_pd(p.as_mut_ptr().add(4), v.1)
        }
        #[inline(always)]
        unsafe fn splat(x: f64) -> Self::V {
            (_mm256_set1_pd(x), _mm256_set1_pd(x))
        }
        #[inline(always)]
        unsafe fn add(a: Self::V, b: Self::V) -> Self::V {
            (_mm256_add_pd(a.0, b.0), _mm256_add_pd(a.1, b.1))
        }
        #[inline(always)]
        unsafe fn sub(a: Self::V, b: Self::V) -> Self::V {
            (_mm256_sub_pd(a.0, b.0), _mm256_sub_pd(a.1, b.1))
        }
        #[inline(always)]
        unsafe fn mul(a: Self::V, b: Self::V) -> Self::V {
            (_mm256_mul_pd(a.0, b.0), _mm256_mul_pd(a.1, b.1))
        }
    }
}

/// Unnormalised fast Walsh-Hadamard transform (Sylvester order) of a power-of-two length.
pub fn fwht(x: &mut [f64]) {
    let n = x.len();
    let mut h = 1;
    while h < n {
        for start in (0..n).step_by(2 * h) {
            for i in start..start + h {
                let (a, b) = (x[i], x[i + h]);
                x[i] = a + b;
                x[i + h] = a - b;
            }
        }
        h *= 2;
    }
}

/// A Paley matrix of order `m` (I or II), when m - 1 or m / 2 - 1 is a suitable prime power.
fn paley(m: usize) -> Option<(Vec<i8>, Construction)> {
    if m < 4 || !m.is_multiple_of(4) {
        return None;
    }
    let q = m - 1;
    if q % 4 == 3 {
        if let Some(field) = Field::new(q) {
            return Some((paley_one(&field), Construction::PaleyI { q }));
        }
    }
    let q = m / 2 - 1;
    if q % 4 == 1 {
        if let Some(field) = Field::new(q) {
            return Some((paley_two(&field), Construction::PaleyII { q }));
        }
    }
    None
}

/// First rows of Williamson matrices A, B, C, D: symmetric circulant +-1 matrices of odd order w
/// ('+' = 1, '-' = -1; row i of X is the first row shifted right by i) with A^2 + B^2 + C^2 + D^2 =
/// 4 w I. Both came from qcc's own search: symmetric sequences with a_0 = 1 and the row sums of one
/// decomposition of 4 w into four odd squares (39: -9, -5, -5, -5; 43: -5, 7, 7, 7), matched in the
/// middle on their power spectra under Williamson's relation a_i b_i c_i d_i = -1 for i > 0.
/// `williamson_orders_are_hadamard` checks H H^T = 4 w I.
const WILLIAMSON: &[[&str; 4]] = &[
    [
        "++------+--+-+--++-++-++--+-+--+------+",
        "+-+-----+-+++--+++----+++--+++-+-----+-",
        "++---+--++----+-+-++++-+-+----++--+---+",
        "++-++-++---+-----+-++-+-----+---++-++-+",
    ],
    [
        "+--++----+-+---+--++++++++--+---+-+----++--",
        "+-+-+----++++-++++-++--++-++++-++++----+-+-",
        "++-+--++-+++----+++-++++-+++----+++-++--+-+",
        "+--+++--+-+--+-+++++-++-+++++-+--+-+--+++--",
    ],
];

/// The Williamson array [[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]] of order m,
/// when [`WILLIAMSON`] holds sequences of length m / 4.
fn williamson(m: usize) -> Option<(Vec<i8>, Construction)> {
    let rows = WILLIAMSON.iter().find(|rows| rows[0].len() * 4 == m)?;
    let w = m / 4;
    let seq: Vec<Vec<i8>> = rows.iter().map(|r| r.bytes().map(|c| if c == b'+' { 1 } else { -1 }).collect()).collect();
    // (block row, block column) -> (sequence, sign).
    const ARRAY: [[(usize, i8); 4]; 4] = [
        [(0, 1), (1, 1), (2, 1), (3, 1)],
        [(1, -1), (0, 1), (3, -1), (2, 1)],
        [(2, -1), (3, 1), (0, 1), (1, -1)],
        [(3, -1), (2, -1), (1, 1), (0, 1)],
    ];
    let mut h = vec![0i8; m * m];
    for i in 0..m {
        for j in 0..m {
            let (x, sign) = ARRAY[i / w][j / w];
            h[i * m + j] = sign * seq[x][(j % w + w - i % w) % w];
        }
    }
    Some((h, Construction::Williamson { w }))
}

/// Jacobsthal matrix Q[i][j] = chi(a_i - a_j) (chi the quadratic character, chi(0) = 0).
fn jacobsthal(field: &Field) -> Vec<i8> {
    let q = field.order();
    let mut square = vec![false; q];
    for x in 1..q {
        square[field.mul(x, x)] = true;
    }
    let mut out = vec![0i8; q * q];
    for i in 0..q {
        for j in 0..q {
            let d = field.sub(i, j);
            out[i * q + j] = if d == 0 {
                0
            } else if square[d] {
                1
            } else {
                -1
            };
        }
    }
    out
}

/// H = I + [[0, 1^T], [-1, Q]], order q + 1 (q = 3 mod 4).
fn paley_one(field: &Field) -> Vec<i8> {
    let q = field.order();
    let jac = jacobsthal(field);
    let m = q + 1;
    let mut h = vec![0i8; m * m];
    for i in 0..m {
        for j in 0..m {
            let s = match (i, j) {
                (0, 0) => 0,
                (0, _) => 1,
                (_, 0) => -1,
                _ => jac[(i - 1) * q + (j - 1)],
            };
            h[i * m + j] = s + i8::from(i == j);
        }
    }
    h
}

/// C = [[0, 1^T], [1, Q]] (symmetric conference matrix); H = C (x) [[1,1],[1,-1]] + I (x) [[1,-1],[-1,-1]],
/// order 2 (q + 1) (q = 1 mod 4).
fn paley_two(field: &Field) -> Vec<i8> {
    let q = field.order();
    let jac = jacobsthal(field);
    let c = q + 1;
    let m = 2 * c;
    let mut h = vec![0i8; m * m];
    for i in 0..c {
        for j in 0..c {
            let block: [[i8; 2]; 2] = if i == j {
                [[1, -1], [-1, -1]]
            } else {
                let cij = if i == 0 || j == 0 { 1 } else { jac[(i - 1) * q + (j - 1)] };
                [[cij, cij], [cij, -cij]]
            };
            for (a, row) in block.iter().enumerate() {
                for (b, &v) in row.iter().enumerate() {
                    h[(2 * i + a) * m + 2 * j + b] = v;
                }
            }
        }
    }
    h
}

/// The finite field GF(p^k): element x is the polynomial whose base-p digits are its coefficients,
/// multiplication is modulo a monic irreducible polynomial of degree k.
struct Field {
    p: usize,
    k: usize,
    /// Coefficients of x^k reduced: x^k = -sum modulus[i] x^i.
    modulus: Vec<usize>,
}

impl Field {
    /// GF(q) when q is a prime power (q >= 2).
    fn new(q: usize) -> Option<Field> {
        if q < 2 {
            return None;
        }
        let p = (2..=q).find(|d| q.is_multiple_of(*d))?;
        let (mut rest, mut k) = (q, 0);
        while rest.is_multiple_of(p) {
            rest /= p;
            k += 1;
        }
        if rest != 1 {
            return None;
        }
        let modulus = if k == 1 { vec![0] } else { irreducible(p, k)? };
        Some(Field { p, k, modulus })
    }

    fn order(&self) -> usize {
        self.p.pow(self.k as u32)
    }

    fn digits(&self, mut x: usize) -> Vec<usize> {
        (0..self.k)
            .map(|_| {
                let d = x % self.p;
                x /= self.p;
                d
            })
            .collect()
    }

    fn to_element(&self, d: &[usize]) -> usize {
        d.iter().rev().fold(0, |acc, &c| acc * self.p + c)
    }

    fn sub(&self, a: usize, b: usize) -> usize {
        let (a, b) = (self.digits(a), self.digits(b));
        let d: Vec<usize> = a.iter().zip(&b).map(|(x, y)| (x + self.p - y) % self.p).collect();
        self.to_element(&d)
    }

    fn mul(&self, a: usize, b: usize) -> usize {
        if self.k == 1 {
            return a * b % self.p;
        }
        let (a, b) = (self.digits(a), self.digits(b));
        let mut prod = vec![0usize; 2 * self.k - 1];
        for (i, x) in a.iter().enumerate() {
            for (j, y) in b.iter().enumerate() {
                prod[i + j] = (prod[i + j] + x * y) % self.p;
            }
        }
        // Reduce from the top: x^(k+e) = -sum modulus[i] x^(i+e).
        for top in (self.k..prod.len()).rev() {
            let c = prod[top];
            if c == 0 {
                continue;
            }
            prod[top] = 0;
            for (i, &m) in self.modulus.iter().enumerate() {
                let idx = top - self.k + i;
                prod[idx] = (prod[idx] + self.p * self.p - c * m % self.p) % self.p;
            }
        }
        self.to_element(&prod[..self.k])
    }
}

/// The first monic irreducible polynomial of degree k over GF(p) (low coefficients, the leading 1 implied).
fn irreducible(p: usize, k: usize) -> Option<Vec<usize>> {
    let count = p.checked_pow(k as u32)?;
    (0..count).map(|c| (0..k).map(|i| c / p.pow(i as u32) % p).collect::<Vec<_>>()).find(|low| {
        let mut f = low.clone();
        f.push(1);
        (1..=k / 2).all(|d| !has_monic_factor(&f, d, p))
    })
}

/// Whether f (coefficients low to high, monic) has a monic factor of degree d over GF(p).
fn has_monic_factor(f: &[usize], d: usize, p: usize) -> bool {
    let count = p.pow(d as u32);
    (0..count).any(|c| {
        let mut g: Vec<usize> = (0..d).map(|i| c / p.pow(i as u32) % p).collect();
        g.push(1);
        let mut r = f.to_vec();
        for top in (d..r.len()).rev() {
            let coef = r[top];
            if coef == 0 {
                continue;
            }
            for (i, &gi) in g.iter().enumerate() {
                let idx = top - d + i;
                r[idx] = (r[idx] + p * p - coef * gi % p) % p;
            }
        }
        r[..d].iter().all(|&x| x == 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dense(h: &Hadamard) -> Vec<i8> {
        let n = h.size();
        (0..n * n).map(|k| h.entry(k / n, k % n)).collect()
    }

    /// H H^T = n I exactly (integer arithmetic).
    fn assert_hadamard(h: &Hadamard) {
        let n = h.size();
        let d = dense(h);
        assert!(d.iter().all(|&v| v == 1 || v == -1), "order {n}: entries must be +-1");
        for i in 0..n {
            for j in 0..n {
                let dot: i64 = (0..n).map(|k| i64::from(d[i * n + k]) * i64::from(d[j * n + k])).sum();
                assert_eq!(dot, if i == j { n as i64 } else { 0 }, "order {n} ({h}): rows {i}, {j}");
            }
        }
    }

    #[test]
    fn listed_orders_are_hadamard() {
        for m in [4, 8, 12, 20, 24, 28, 36, 40, 44, 52, 60, 64, 76, 100, 108, 140, 148, 156, 172, 312, 344, 576] {
            let h = Hadamard::exact(m).unwrap_or_else(|| panic!("no construction for {m}"));
            assert_hadamard(&h);
        }
        assert!(matches!(Hadamard::exact(36).unwrap().construction(), Construction::PaleyII { q: 17 }));
        // The smallest dense factor wins: 344 = H_172 (x) H_2, though Paley I reaches 344 itself.
        assert!(matches!(Hadamard::exact(344).unwrap().construction(), Construction::Williamson { w: 43 }));
        assert_eq!(Hadamard::exact(344).unwrap().factors().0, 172);
        assert!(matches!(paley(344), Some((_, Construction::PaleyI { q: 343 }))));
        assert!(matches!(Hadamard::exact(52).unwrap().construction(), Construction::PaleyII { q: 25 }));
    }

    #[test]
    fn williamson_orders_are_hadamard() {
        for rows in WILLIAMSON {
            let w = rows[0].len();
            assert!(w % 2 == 1 && rows.iter().all(|r| r.len() == w), "{rows:?}");
            for r in rows {
                let b = r.as_bytes();
                assert!((1..w).all(|i| b[i] == b[w - i]), "{r}: not symmetric");
            }
            let h = Hadamard::exact(4 * w).unwrap();
            assert_eq!(h.construction(), Construction::Williamson { w });
            assert_hadamard(&h);
        }
        assert_eq!(WILLIAMSON.len(), 2);
        assert!(matches!(Hadamard::exact(172 * 64).unwrap().construction(), Construction::Williamson { w: 43 }));
        // 312 = 311 + 1 is Paley, but the smaller 156 now comes first.
        assert!(matches!(Hadamard::exact(156 * 32).unwrap().construction(), Construction::Williamson { w: 39 }));
    }

    /// Inner products of random vectors survive the normalised transform (an orthogonality check
    /// for orders too large for a dense H H^T), and the inverse undoes it.
    fn assert_orthonormal(n: usize) {
        let h = Hadamard::new(n);
        assert!(h.is_exact(), "{n}: {h}");
        let vecs: Vec<Vec<f64>> = (0..4)
            .map(|s| (0..n).map(|i| ((i * 31 + s * 17) as f64 * 0.377).sin() + 0.1 * s as f64).collect())
            .collect();
        let mut tv = vecs.clone();
        tv.iter_mut().for_each(|v| h.transform(v).unwrap());
        for a in 0..4 {
            for b in 0..4 {
                let before: f64 = vecs[a].iter().zip(&vecs[b]).map(|(x, y)| x * y).sum();
                let after: f64 = tv[a].iter().zip(&tv[b]).map(|(x, y)| x * y).sum();
                assert!((before - after).abs() < 1e-9 * n as f64, "{n}: <{a},{b}> {before} vs {after}");
            }
        }
        let mut back = tv[0].clone();
        h.inverse(&mut back).unwrap();
        assert!(back.iter().zip(&vecs[0]).all(|(x, y)| (x - y).abs() < 1e-12), "{n}: inverse");
    }

    #[test]
    fn model_sizes_are_orthonormal() {
        for n in [64, 576, 1536, 4096, 11008, 10944, 25600] {
            assert_orthonormal(n);
        }
        assert_eq!(Hadamard::new(576).to_string(), "H_36 (Paley II, q = 17) x H_16");
        assert_eq!(Hadamard::new(1536).to_string(), "H_12 (Paley I, q = 11) x H_128");
        assert_eq!(Hadamard::new(11008).to_string(), "H_172 (Williamson, w = 43) x H_64");
        assert_hadamard(&Hadamard::new(64));
        assert_hadamard(&Hadamard::new(576));
    }

    #[test]
    fn fast_transform_equals_matrix_product() {
        // 156 and 344 = 172 x 2: the Williamson dense factors, alone and with a Sylvester factor.
        for n in [8, 12, 48, 156, 344, 576, 1536] {
            let h = Hadamard::new(n);
            let x: Vec<f64> = (0..n).map(|i| (i as f64 * 0.61).cos() * (1.0 + i as f64 / 7.0)).collect();
            let mut fast = x.clone();
            h.transform(&mut fast).unwrap();
            let mut fast_t = x.clone();
            h.inverse(&mut fast_t).unwrap();
            let s = 1.0 / (n as f64).sqrt();
            for i in 0..n {
                let y: f64 = (0..n).map(|j| f64::from(h.entry(i, j)) * x[j]).sum::<f64>() * s;
                let yt: f64 = (0..n).map(|j| f64::from(h.entry(j, i)) * x[j]).sum::<f64>() * s;
                assert!((y - fast[i]).abs() < 1e-9 && (yt - fast_t[i]).abs() < 1e-9, "{n}: row {i}");
            }
        }
    }

    #[test]
    fn fallback_is_block_diagonal_and_orthogonal() {
        // 188 = 4 x 47: neither 187 nor 93 is a prime power, no Williamson table.
        let h = Hadamard::new(188);
        assert!(!h.is_exact());
        assert_eq!(h.block_size(), 4);
        assert!(h.to_string().contains("block-diagonal"), "{h}");
        let d = dense(&h);
        for i in 0..188 {
            for j in 0..188 {
                let dot: i64 = (0..188).map(|k| i64::from(d[i * 188 + k]) * i64::from(d[j * 188 + k])).sum();
                assert_eq!(dot, if i == j { 4 } else { 0 });
            }
        }
        let h = Hadamard::new(43);
        assert_eq!(h.block_size(), 1, "{h}");
        let mut x = vec![1.0; 43];
        h.transform(&mut x).unwrap();
        assert!(x.iter().all(|&v| v == 1.0));
        assert!(h.transform(&mut [0.0; 3]).is_err());
    }

    #[test]
    fn f32_rows_equal_widened_rows_rounded_once() {
        for n in [64, 576, 1536, 40] {
            let h = Hadamard::new(n);
            let src: Vec<f32> = (0..3 * n).map(|i| ((i * 7919 % 1009) as f32 - 504.0) * 0.0137).collect();
            let mut dst = vec![0f32; src.len()];
            h.transform_rows_f32(&src, &mut dst).unwrap();
            for (s, d) in src.chunks(n).zip(dst.chunks(n)) {
                let mut wide: Vec<f64> = s.iter().map(|&v| f64::from(v)).collect();
                h.transform(&mut wide).unwrap();
                let narrow: Vec<f32> = wide.iter().map(|&v| v as f32).collect();
                assert_eq!(d, &narrow[..], "n = {n}");
            }
        }
        assert!(Hadamard::new(64).transform_rows_f32(&[0.0; 65], &mut [0.0; 65]).is_err());
    }

    #[test]
    fn batched_rows_equal_rows_one_at_a_time() {
        // Row counts around the lane group (8) and orders with and without a dense factor, a
        // block-diagonal fallback (n = 44 * 3) and a dense factor too large for registers (11008).
        for (n, rows) in [(576, 19), (1536, 8), (64, 1), (12, 17), (132, 9), (11008, 2)] {
            let h = Hadamard::new(n);
            let src: Vec<f64> = (0..rows * n).map(|i| ((i * 7919 % 1013) as f64 - 506.0) * 0.0173).collect();
            let mut batched = src.clone();
            h.transform_rows(&mut batched).unwrap();
            for (s, b) in src.chunks(n).zip(batched.chunks(n)) {
                let mut one = s.to_vec();
                h.transform(&mut one).unwrap();
                assert_eq!(b, &one[..], "n = {n}");
            }
            let narrow: Vec<f32> = src.iter().map(|&v| v as f32).collect();
            let mut dst = vec![0f32; narrow.len()];
            h.transform_rows_f32(&narrow, &mut dst).unwrap();
            for (s, d) in narrow.chunks(n).zip(dst.chunks(n)) {
                let mut wide: Vec<f64> = s.iter().map(|&v| f64::from(v)).collect();
                h.transform(&mut wide).unwrap();
                assert!(d.iter().zip(&wide).all(|(a, b)| *a == *b as f32), "n = {n}");
            }
        }
        assert!(Hadamard::new(64).transform_rows(&mut [0.0; 65]).is_err());
    }
}

//! Host-side data layout of the W4 kernels and their exact CPU reference (no CUDA needed).
//!
//! Split-nibble layout (runtime/kernels/common.cuh): a row of K int4 values (K % 8 == 0) is K/8
//! little-endian u32 words; word g's byte j holds `q[8g + j]` in its low nibble and `q[8g + 4 + j]`
//! in its high nibble. The GPU unpacks a word into two int8x4 registers with one shift and two ANDs.
//! The same layout serves weights [N, K] and int4 activations [M, K]; int8 activations are plain.
//!
//! [`reference_w4_linear`] computes what every W4 kernel must return bit for bit: the exact int32
//! dot product, then `f16(((acc * sx[m]) * sw[n] + bias[n]) + residual[m, n])` rounded in f32 step
//! by step, in that order.

use half::f16;
use rayon::prelude::*;

/// Packs a row-major [rows, k] matrix of int4 values (each in -8..=7) into the split-nibble layout.
/// Returns `None` when `k % 8 != 0`, the length is not `rows * k`, or a value is out of range.
pub fn pack_int4_split(values: &[i8], rows: usize, k: usize) -> Option<Vec<u32>> {
    if !k.is_multiple_of(8) || values.len() != rows.checked_mul(k)? {
        return None;
    }
    let mut out = Vec::with_capacity(values.len() / 8);
    for group in values.chunks_exact(8) {
        let mut word = 0u32;
        for j in 0..4 {
            let (lo, hi) = (group[j], group[4 + j]);
            if !(-8..=7).contains(&lo) || !(-8..=7).contains(&hi) {
                return None;
            }
            let byte = ((lo as u8) & 0x0F) | (((hi as u8) & 0x0F) << 4);
            word |= (byte as u32) << (8 * j);
        }
        out.push(word);
    }
    Some(out)
}

/// Inverse of [`pack_int4_split`]: the int4 values of `words` in k order.
pub fn unpack_int4_split(words: &[u32]) -> Vec<i8> {
    let mut out = vec![0i8; words.len() * 8];
    for (word, group) in words.iter().zip(out.chunks_exact_mut(8)) {
        for j in 0..4 {
            let byte = (word >> (8 * j)) as u8;
            // Sign-extend each nibble by moving it to the top of an i8 and shifting back.
            group[j] = ((byte << 4) as i8) >> 4;
            group[4 + j] = (byte as i8) >> 4;
        }
    }
    out
}

/// Number of u32 words of the tiled GEMV weight layout of an [n, k] int4 matrix (`n % 8 == 0`,
/// `k % 8 == 0`): n/8 tiles of ceil(k/128) chunks of 512 bytes.
pub fn tiled_words(n: usize, k: usize) -> usize {
    n / 8 * k.div_ceil(128) * 128
}

/// Reorders split-nibble words [n, k/8] (from [`pack_int4_split`]) into the tiled layout of the
/// `gemvt` kernels (runtime/kernels/w4_gemv.cu): `[n/8][ceil(k/128)][32 lanes][4 words]`, where lane
/// `l` holds words `4*(l%4)..4*(l%4)+4` of chunk c of row `8*tile + l/4`, zero past k (zero int4
/// values, which add nothing). Returns `None` unless `n % 8 == 0`, `k % 8 == 0` and the length fits.
pub fn pack_int4_tiled(words: &[u32], n: usize, k: usize) -> Option<Vec<u32>> {
    if !n.is_multiple_of(8) || !k.is_multiple_of(8) || words.len() != n.checked_mul(k / 8)? {
        return None;
    }
    let (wpr, chunks) = (k / 8, k.div_ceil(128));
    let mut out = vec![0u32; tiled_words(n, k)];
    for (i, slot) in out.iter_mut().enumerate() {
        let (word, lane, chunk, tile) = (i % 4, (i / 4) % 32, (i / 128) % chunks, i / (128 * chunks));
        let row = 8 * tile + lane / 4;
        let col = chunk * 16 + 4 * (lane % 4) + word;
        if col < wpr {
            *slot = words[row * wpr + col];
        }
    }
    Some(out)
}

/// Bytes of the tiled layout of the weight-only int8 GEMV of an [n, k] matrix (see [`pack_wf8_tiled`]).
pub fn wf8_tiled_bytes(n: usize, k: usize) -> usize {
    n.div_ceil(8) * k.div_ceil(64) * 512
}

/// Reorders int8 weights [n, k] (row-major) into the layout of `wf8_gemv_*`
/// (runtime/kernels/fast_linear.cu): `[ceil(n/8)][ceil(k/64)][8 rows][64 bytes]`, so one warp load
/// reads the 64-byte piece p of 8 consecutive rows as 512 contiguous bytes; zeros past k and n.
/// `None` unless `bytes` holds n * k values.
pub fn pack_wf8_tiled(bytes: &[u8], n: usize, k: usize) -> Option<Vec<u8>> {
    if bytes.len() != n.checked_mul(k)? {
        return None;
    }
    let pieces = k.div_ceil(64);
    let mut out = vec![0u8; wf8_tiled_bytes(n, k)];
    for (row, src) in bytes.chunks_exact(k.max(1)).enumerate().take(n) {
        for (p, piece) in src.chunks(64).enumerate() {
            let at = ((row / 8 * pieces + p) * 8 + row % 8) * 64;
            out[at..at + piece.len()].copy_from_slice(piece);
        }
    }
    Some(out)
}

/// Inverse of [`pack_int4_tiled`]: split-nibble words [n, k/8].
pub fn unpack_int4_tiled(tiled: &[u32], n: usize, k: usize) -> Vec<u32> {
    let (wpr, chunks) = (k / 8, k.div_ceil(128));
    let mut out = vec![0u32; n * wpr];
    for (row, out_row) in out.chunks_exact_mut(wpr).enumerate() {
        for (col, w) in out_row.iter_mut().enumerate() {
            let (tile, g, chunk, within) = (row / 8, row % 8, col / 16, col % 16);
            let lane = 4 * g + within / 4;
            *w = tiled[((tile * chunks + chunk) * 32 + lane) * 4 + within % 4];
        }
    }
    out
}

/// Bytes per row of the pre-unpacked int8 prefill weight layout ([`pack_int8_wgmma`]): K rounded
/// up to a multiple of 128.
pub fn int8_wgmma_row_bytes(k: usize) -> usize {
    k.div_ceil(128) * 128
}

/// The pre-unpacked int8 prefill weight layout of the `w4a4p8_ws` kernels (runtime/kernels/
/// w4a4_wgmma.cu): from split-nibble words [n, k/8], rows of [`int8_wgmma_row_bytes`] bytes holding
/// `16 * q` as int8 (values still on the int4 grid, twice the bytes of the int4 storage), each
/// 128-k block in the order the kernels feed wgmma: byte `p = 32 s + 16 h + 4 t + j` of block `b`
/// holds `k = 128 b + 8 (4 t + s) + 4 h + j` (the nibble order the in-kernel unpack produces), zero
/// past k. Returns `None` unless `k % 8 == 0` and the length is `n * k / 8`.
pub fn pack_int8_wgmma(words: &[u32], n: usize, k: usize) -> Option<Vec<u8>> {
    if !k.is_multiple_of(8) || words.len() != n.checked_mul(k / 8)? {
        return None;
    }
    let (wpr, rb) = (k / 8, int8_wgmma_row_bytes(k));
    let mut out = vec![0u8; n * rb];
    for (row, out_row) in out.chunks_exact_mut(rb).enumerate() {
        for (i, byte) in out_row.iter_mut().enumerate() {
            let (b, p) = (i / 128, i % 128);
            let (s, h, t, j) = (p / 32, (p / 16) % 2, (p / 4) % 4, p % 4);
            let w = 16 * b + 4 * t + s;
            if w < wpr {
                let v = (words[row * wpr + w] >> (8 * j)) as u8;
                *byte = if h == 0 { v << 4 } else { v & 0xF0 };
            }
        }
    }
    Some(out)
}

/// Epilogue inputs shared by the reference and the kernels.
#[derive(Debug, Clone, Copy)]
pub struct Epilogue<'a> {
    /// Per-token activation scale, [M].
    pub sx: &'a [f32],
    /// Per-output-channel weight scale, [N].
    pub sw: &'a [f32],
    /// Optional bias, [N].
    pub bias: Option<&'a [f32]>,
    /// Optional residual, row-major [M, N].
    pub residual: Option<&'a [f16]>,
}

/// Exact reference of `Y[M, N] = X[M, K] . W[N, K]^T` with the kernels' epilogue; `x` and `w` are
/// unpacked integer values (int4 or int8 range), row-major. Exact int64 sums, checked to fit int32
/// (the kernels accumulate in int32 times 16 or 256; callers keep K within that range).
pub fn reference_w4_linear(x: &[i8], w: &[i8], m: usize, n: usize, k: usize, ep: &Epilogue<'_>) -> Vec<f16> {
    assert_eq!(x.len(), m * k, "x must be [M, K]");
    assert_eq!(w.len(), n * k, "w must be [N, K]");
    let mut y = vec![f16::ZERO; m * n];
    y.par_chunks_mut(n).zip(x.par_chunks(k)).enumerate().for_each(|(mi, (yrow, xrow))| {
        for (ni, wrow) in w.chunks_exact(k).enumerate() {
            let acc: i64 = xrow.iter().zip(wrow).map(|(&a, &b)| a as i64 * b as i64).sum();
            let acc = i32::try_from(acc).expect("reference dot product exceeds int32");
            let mut v = (acc as f32 * ep.sx[mi]) * ep.sw[ni];
            if let Some(bias) = ep.bias {
                v += bias[ni];
            }
            if let Some(res) = ep.residual {
                v += res[mi * n + ni].to_f32();
            }
            yrow[ni] = f16::from_f32(v);
        }
    });
    y
}

/// Small deterministic generator (SplitMix64) for test and benchmark data.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform integer in `lo..=hi`.
    pub fn int_in(&mut self, lo: i32, hi: i32) -> i32 {
        let span = (hi - lo + 1) as u64;
        lo + (self.next_u64() % span) as i32
    }
    /// Uniform float in `[lo, hi)`.
    pub fn float_in(&mut self, lo: f32, hi: f32) -> f32 {
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * unit
    }
    /// `len` values uniform in `lo..=hi` as i8.
    pub fn i8_vec(&mut self, len: usize, lo: i8, hi: i8) -> Vec<i8> {
        (0..len).map(|_| self.int_in(lo as i32, hi as i32) as i8).collect()
    }
    /// `len` floats uniform in `[lo, hi)`.
    pub fn f32_vec(&mut self, len: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..len).map(|_| self.float_in(lo, hi)).collect()
    }
}

/// Row `q` of the `QCC_WS2` `_r` weight layout holds row `col_perm32(q)` of the plain layout:
/// bits 1-2 and 3-4 of the row index swapped (an involution within each group of 32 rows).
pub fn col_perm32(q: usize) -> usize {
    (q & !0x1E) | ((q & 0x6) << 2) | ((q >> 2) & 0x6)
}

/// The `QCC_WS2` `_r` weight layout: the split-nibble int4 rows ([`pack_int4_split`], `k / 8` words
/// each) reordered within each group of 32 rows by [`col_perm32`], padded with zero rows to a multiple
/// of 32 rows (same int4 bytes per row; the kernels then write each unpacked row to its own B row).
/// Returns `None` when the length is not `rows * k / 8` or `k % 8 != 0`.
pub fn permute_rows32(packed: &[u32], rows: usize, k: usize) -> Option<Vec<u32>> {
    if !k.is_multiple_of(8) || packed.len() != rows * k / 8 {
        return None;
    }
    let (words, padded) = (k / 8, rows.div_ceil(32) * 32);
    let mut out = vec![0u32; padded * words];
    for (q, row) in out.chunks_exact_mut(words).enumerate() {
        let src = col_perm32(q);
        if src < rows {
            row.copy_from_slice(&packed[src * words..(src + 1) * words]);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn int8_wgmma_layout_holds_every_value_times_16_in_kernel_order() {
        let (n, k) = (3, 160); // a K tail: the second 128-k block holds 32 values
        let mut rng = super::SplitMix64(7);
        let q = rng.i8_vec(n * k, -8, 7);
        let words = super::pack_int4_split(&q, n, k).unwrap();
        let p = super::pack_int8_wgmma(&words, n, k).unwrap();
        assert_eq!(p.len(), n * 256);
        let mut seen = vec![false; n * k];
        for row in 0..n {
            for i in 0..256 {
                let (b, pp) = (i / 128, i % 128);
                let (s, h, t, j) = (pp / 32, (pp / 16) % 2, (pp / 4) % 4, pp % 4);
                let kk = 128 * b + 8 * (4 * t + s) + 4 * h + j;
                let v = p[row * 256 + i] as i8;
                if kk < k {
                    assert_eq!(v as i32, 16 * q[row * k + kk] as i32, "row {row} byte {i} (k {kk})");
                    seen[row * k + kk] = true;
                } else {
                    assert_eq!(v, 0, "row {row} byte {i} past k");
                }
            }
        }
        assert!(seen.iter().all(|&s| s), "every value placed once");
        assert!(super::pack_int8_wgmma(&words, n, k + 8).is_none());
    }

    use super::*;

    #[test]
    fn split_layout_round_trips_and_places_nibbles() {
        let mut rng = SplitMix64(7);
        let v = rng.i8_vec(3 * 32, -8, 7);
        let packed = pack_int4_split(&v, 3, 32).unwrap();
        assert_eq!(packed.len(), 12);
        assert_eq!(unpack_int4_split(&packed), v);
        // Hand-checked word: k0..k3 = 1, -1, 7, -8 in the low nibbles; k4..k7 = 0, 2, -3, 5 high.
        let w = pack_int4_split(&[1, -1, 7, -8, 0, 2, -3, 5], 1, 8).unwrap();
        assert_eq!(w, vec![u32::from_le_bytes([0x01, 0x2F, 0xD7, 0x58])]);
    }

    #[test]
    fn wf8_tiled_layout_puts_each_rows_piece_at_its_group_slot() {
        // 11 rows (a partial group of 3) x 150 bytes (a partial third piece of 22).
        let (n, k) = (11, 150);
        let mut rng = SplitMix64(3);
        let w: Vec<u8> = rng.i8_vec(n * k, -128, 127).into_iter().map(|v| v as u8).collect();
        let t = pack_wf8_tiled(&w, n, k).unwrap();
        assert_eq!(t.len(), 2 * 3 * 512);
        for row in 0..16 {
            for kk in 0..192 {
                let at = ((row / 8 * 3 + kk / 64) * 8 + row % 8) * 64 + kk % 64;
                let want = if row < n && kk < k { w[row * k + kk] } else { 0 };
                assert_eq!(t[at], want, "row {row} k {kk}");
            }
        }
        assert!(pack_wf8_tiled(&w[1..], n, k).is_none());
    }

    #[test]
    fn gpu_unpack_trick_matches_layout() {
        // (w << 4) & 0xF0F0F0F0 and w & 0xF0F0F0F0 are 16 * q for k 0..3 and 4..7 of the group.
        let mut rng = SplitMix64(11);
        let v = rng.i8_vec(8 * 64, -8, 7);
        for (word, q) in pack_int4_split(&v, 64, 8).unwrap().iter().zip(v.chunks_exact(8)) {
            let lo = ((word << 4) & 0xF0F0_F0F0).to_le_bytes();
            let hi = (word & 0xF0F0_F0F0).to_le_bytes();
            for j in 0..4 {
                assert_eq!(lo[j] as i8 as i32, 16 * q[j] as i32);
                assert_eq!(hi[j] as i8 as i32, 16 * q[4 + j] as i32);
            }
        }
    }

    #[test]
    fn tiled_layout_round_trips_and_pads_with_zeros() {
        let mut rng = SplitMix64(5);
        for &(n, k) in &[(16usize, 576usize), (8, 128), (24, 4096), (8, 32)] {
            let v = rng.i8_vec(n * k, -8, 7);
            let words = pack_int4_split(&v, n, k).unwrap();
            let tiled = pack_int4_tiled(&words, n, k).unwrap();
            assert_eq!(tiled.len(), tiled_words(n, k));
            assert_eq!(unpack_int4_tiled(&tiled, n, k), words);
            // Lane 5 of chunk 0 of tile 0 is row 1, words 4..8 (zero padding when k < 64).
            if k >= 64 {
                assert_eq!(&tiled[20..24], &words[k / 8 + 4..k / 8 + 8]);
            } else {
                assert_eq!(&tiled[20..24], &[0; 4]);
            }
            // Everything beyond the real words is zero padding.
            let nonzero_words = tiled.iter().filter(|&&w| w != 0).count();
            assert!(nonzero_words <= words.len());
        }
        assert!(pack_int4_tiled(&[0; 4], 4, 8).is_none());
    }

    #[test]
    fn pack_rejects_bad_input() {
        assert!(pack_int4_split(&[0; 12], 1, 12).is_none());
        assert!(pack_int4_split(&[8, 0, 0, 0, 0, 0, 0, 0], 1, 8).is_none());
        assert!(pack_int4_split(&[0; 8], 2, 8).is_none());
    }

    #[test]
    fn reference_matches_float64_dot() {
        let (m, n, k) = (3, 5, 64);
        let mut rng = SplitMix64(3);
        let x = rng.i8_vec(m * k, -8, 7);
        let w = rng.i8_vec(n * k, -8, 7);
        let sx = rng.f32_vec(m, 0.01, 0.1);
        let sw = rng.f32_vec(n, 0.01, 0.1);
        let ep = Epilogue { sx: &sx, sw: &sw, bias: None, residual: None };
        let y = reference_w4_linear(&x, &w, m, n, k, &ep);
        for mi in 0..m {
            for ni in 0..n {
                let dot: f64 = (0..k).map(|i| x[mi * k + i] as f64 * w[ni * k + i] as f64).sum();
                let want = dot * sx[mi] as f64 * sw[ni] as f64;
                let got = y[mi * n + ni].to_f32() as f64;
                assert!((got - want).abs() <= want.abs() * 1e-3 + 1e-4, "{got} vs {want}");
            }
        }
    }

    #[test]
    fn permute_rows32_is_a_padded_involution_of_whole_rows() {
        assert!((0..64).all(|q| super::col_perm32(super::col_perm32(q)) == q && super::col_perm32(q) / 32 == q / 32));
        // Output column 32jj + 8tig + 2r + e comes from B row 32jj + 8r + 2tig + e (jj 1, r 1, tig 2, e 1).
        assert_eq!(super::col_perm32(32 + 8 + 2 * 2 + 1), 32 + 8 * 2 + 2 + 1);
        let (rows, k) = (40, 16);
        let packed: Vec<u32> = (0..(rows * k / 8) as u32).collect();
        let out = super::permute_rows32(&packed, rows, k).expect("packs");
        assert_eq!(out.len(), 64 * 2);
        for q in 0..64 {
            let src = super::col_perm32(q);
            let want: Vec<u32> = if src < rows { packed[src * 2..src * 2 + 2].to_vec() } else { vec![0, 0] };
            assert_eq!(&out[q * 2..q * 2 + 2], &want[..], "row {q}");
        }
        assert!(super::permute_rows32(&packed, rows, 12).is_none());
    }
}

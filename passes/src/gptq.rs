//! GPTQ-style error-compensating weight rounding (Frantar et al.), used by `quantize{weight-rounding=gptq}`.
//!
//! Columns are rounded left to right; each column's rounding error is spread over the columns not yet
//! rounded in proportion to the inverse Hessian H^-1 (H = X^T X of the layer's calibration inputs), which
//! minimises the layer-output error ||X W^T - X Q^T|| greedily. We need U, the upper Cholesky factor of
//! H^-1 (H^-1 = U^T U); with P the reversal permutation and L the lower Cholesky factor of P H P,
//! U = P L^-1 P, so one factorisation and one triangular inverse suffice.

use crate::quantize::{round_to_grid, Scheme};
use rayon::prelude::*;

/// Relative dampening added to H's diagonal (GPTQ's default 1%).
const DAMP: f64 = 0.01;

/// The column order and inverse-Hessian factor of one layer input, shared by every linear reading it.
pub struct Factor {
    perm: Vec<usize>,
    u: Vec<f32>,
}

impl Factor {
    /// `h` is `[k x k]`; `None` if it is not positive definite after dampening.
    pub fn new(h: &[f64], k: usize) -> Option<Factor> {
        // Act-order: round the columns with the largest input energy first, while the most columns
        // remain to absorb their error (GPTQ's `act_order`; it matters most on small models).
        let mut perm: Vec<usize> = (0..k).collect();
        perm.sort_by(|&a, &b| h[b * k + b].total_cmp(&h[a * k + a]));
        let hp: Vec<f64> = (0..k * k).map(|i| h[perm[i / k] * k + perm[i % k]]).collect();
        Some(Factor { u: inverse_hessian_factor(&hp, k)?, perm })
    }
}

/// Quantizes `w` (`[n x k]` row-major) with per-row steps from the row absmax times `clip`; returns grid
/// values and steps. `h` is `[k x k]`.
pub fn quantize(w: &[f32], n: usize, k: usize, h: &[f64], clip: &[f32], scheme: &Scheme) -> (Vec<f32>, Vec<f32>) {
    match Factor::new(h, k) {
        Some(f) => quantize_with(w, n, k, &f, clip, scheme),
        None => crate::quantize::quantize_weight_rtn(w, n, k, clip, scheme),
    }
}

/// As [`quantize`], with the factor of H computed once per layer input.
pub fn quantize_with(w: &[f32], n: usize, k: usize, f: &Factor, clip: &[f32], scheme: &Scheme) -> (Vec<f32>, Vec<f32>) {
    let qmax = scheme.weight_qmax();
    let steps: Vec<f32> = (0..n)
        .map(|r| {
            let amax = w[r * k..(r + 1) * k].iter().fold(0f32, |m, v| m.max(v.abs()));
            (amax * clip[r] / qmax).max(1e-12)
        })
        .collect();
    let (perm, u) = (&f.perm, &f.u);
    // Lazy batch updates (GPTQ's blocking): inside a block of columns each rounding error is spread at
    // once over the block's remaining columns; the columns after the block receive the whole block's
    // errors in one product W[:, after] -= E U[block, after]. The same arithmetic as spreading every
    // error over every later column right away, up to the order of the f32 sums.
    let mut wp: Vec<f32> = w.chunks_exact(k).flat_map(|row| perm.iter().map(move |&c| row[c])).collect();
    let mut qp = vec![0f32; n * k];
    let mut errs = vec![0f32; n * GPTQ_BLOCK];
    for b0 in (0..k).step_by(GPTQ_BLOCK) {
        let b1 = (b0 + GPTQ_BLOCK).min(k);
        wp.par_chunks_mut(k)
            .zip(qp.par_chunks_mut(k))
            .zip(errs.par_chunks_mut(GPTQ_BLOCK))
            .zip(steps.par_iter())
            .for_each(|(((row, qrow), erow), &d)| {
                for i in b0..b1 {
                    let g = round_to_grid(row[i] / d, scheme);
                    qrow[i] = g;
                    let err = (row[i] - g * d) / u[i * k + i];
                    erow[i - b0] = err;
                    let urow = &u[i * k + i + 1..i * k + b1];
                    for (x, &uij) in row[i + 1..b1].iter_mut().zip(urow) {
                        *x -= err * uij;
                    }
                }
            });
        if b1 < k {
            // SAFETY: E is [n x (b1 - b0)] with row stride GPTQ_BLOCK inside `errs`; U[b0..b1, b1..k] and
            // W[:, b1..k] are sub-blocks of the [k x k] `u` and [n x k] `wp` with row stride k.
            unsafe {
                matrixmultiply::sgemm(
                    n,
                    b1 - b0,
                    k - b1,
                    -1.0,
                    errs.as_ptr(),
                    GPTQ_BLOCK as isize,
                    1,
                    u.as_ptr().add(b0 * k + b1),
                    k as isize,
                    1,
                    1.0,
                    wp.as_mut_ptr().add(b1),
                    k as isize,
                    1,
                );
            }
        }
    }
    let mut q = vec![0f32; n * k];
    for (qrow, qprow) in q.chunks_exact_mut(k).zip(qp.chunks_exact(k)) {
        for (j, &c) in perm.iter().enumerate() {
            qrow[c] = qprow[j];
        }
    }
    (q, steps)
}

/// Columns per lazy-batch block of [`quantize_with`].
const GPTQ_BLOCK: usize = 128;

/// Inner product with four independent partial sums, so the compiler can vectorise it.
fn dot(x: &[f64], y: &[f64]) -> f64 {
    let mut acc = [0f64; 4];
    let (xc, yc) = (x.chunks_exact(4), y.chunks_exact(4));
    let tail: f64 = xc.remainder().iter().zip(yc.remainder()).map(|(a, b)| a * b).sum();
    for (a, b) in xc.zip(yc) {
        for l in 0..4 {
            acc[l] += a[l] * b[l];
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// U (row-major, f32) with H^-1 = U^T U after dampening; `None` if H is not positive definite.
fn inverse_hessian_factor(h: &[f64], k: usize) -> Option<Vec<f32>> {
    let mean_diag = (0..k).map(|i| h[i * k + i]).sum::<f64>() / k as f64;
    let damp = DAMP * mean_diag.max(1e-12);
    // P H P, dampened; dead channels (zero diagonal) get a unit diagonal.
    let mut a = vec![0f64; k * k];
    for i in 0..k {
        for j in 0..k {
            a[i * k + j] = h[(k - 1 - i) * k + (k - 1 - j)];
        }
        if a[i * k + i] <= 0.0 {
            a[i * k + i] = 1.0;
        }
        a[i * k + i] += damp;
    }
    if !cholesky_lower(&mut a, k) {
        return None;
    }
    let inv_t = inverse_lower_columns(&a, k);
    // U = P L^-1 P: U[i][j] = L^-1[k-1-j][k-1-i], and column c of L^-1 is inv_t[c] (stored as blocks).
    let mut u = vec![0f32; k * k];
    for i in 0..k {
        for j in 0..k {
            u[i * k + j] = inv_t.get(k - 1 - i, k - 1 - j) as f32;
        }
    }
    Some(u)
}

/// Columns per block of the blocked factorisation and inverse.
const CHOL_BLOCK: usize = 64;

/// In place, the lower Cholesky factor of the `[k x k]` row-major `a` (only the lower triangle is read;
/// the upper one is left with partial sums); false if `a` is not positive definite. Right-looking and
/// blocked: factor a diagonal block, solve the panel below it, then subtract the panel's outer product
/// from the trailing lower triangle with f64 GEMMs (block rows at a time).
fn cholesky_lower(a: &mut [f64], k: usize) -> bool {
    let mut j0 = 0;
    while j0 < k {
        let j1 = (j0 + CHOL_BLOCK).min(k);
        // Diagonal block (earlier blocks' contributions were subtracted already).
        for i in j0..j1 {
            for j in j0..=i {
                let s = dot(&a[i * k + j0..i * k + j], &a[j * k + j0..j * k + j]);
                let v = a[i * k + j] - s;
                if i == j {
                    if v <= 0.0 {
                        return false;
                    }
                    a[i * k + i] = v.sqrt();
                } else {
                    a[i * k + j] = v / a[j * k + j];
                }
            }
        }
        if j1 == k {
            break;
        }
        // Panel: L[i, j0..j1] = A[i, j0..j1] L_JJ^-T for every row below the block.
        let (top, bottom) = a.split_at_mut(j1 * k);
        let diag = &top[j0 * k..];
        bottom.par_chunks_mut(k).for_each(|row| {
            for j in j0..j1 {
                let d = &diag[(j - j0) * k..];
                let s = dot(&row[j0..j], &d[j0..j]);
                row[j] = (row[j] - s) / d[j];
            }
        });
        // Trailing update A[i, c] -= sum_p L[i, p] L[c, p] (p in j0..j1) for j1 <= c <= i, by block rows
        // (the diagonal blocks get their upper part updated too, which nothing reads).
        let ap = a.as_mut_ptr();
        let mut r0 = j1;
        while r0 < k {
            let r1 = (r0 + CHOL_BLOCK).min(k);
            // SAFETY: reads L[r0..r1, j0..j1] and L[j1..r1, j0..j1] (columns < j1) and writes
            // A[r0..r1, j1..r1] (columns >= j1): disjoint parts of the [k x k] buffer, all in bounds.
            unsafe {
                matrixmultiply::dgemm(
                    r1 - r0,
                    j1 - j0,
                    r1 - j1,
                    -1.0,
                    ap.add(r0 * k + j0),
                    k as isize,
                    1,
                    ap.add(j1 * k + j0),
                    1,
                    k as isize,
                    1.0,
                    ap.add(r0 * k + j1),
                    k as isize,
                    1,
                );
            }
            r0 = r1;
        }
        j0 = j1;
    }
    true
}

/// L^-1 of a lower-triangular `[k x k]` row-major `l`, as block columns.
struct InverseColumns {
    /// Block `b` holds columns `b * CHOL_BLOCK..`, as a `[k x CHOL_BLOCK]` row-major matrix.
    blocks: Vec<Vec<f64>>,
}

impl InverseColumns {
    fn get(&self, i: usize, j: usize) -> f64 {
        self.blocks[j / CHOL_BLOCK][i * CHOL_BLOCK + j % CHOL_BLOCK]
    }
}

/// The inverse of the lower-triangular `l` (only its lower triangle is read), one block column per task:
/// X_JJ = L_JJ^-1 by substitution; below it, X_IJ solves L_II X_IJ = -L[I, J..I] X[J..I, J] (one GEMM
/// and a substitution per block row).
fn inverse_lower_columns(l: &[f64], k: usize) -> InverseColumns {
    let bw = CHOL_BLOCK;
    let nb = k.div_ceil(bw);
    let blocks = (0..nb)
        .into_par_iter()
        .map(|b| {
            let (c0, c1) = (b * bw, ((b + 1) * bw).min(k));
            let mut x = vec![0f64; k * bw];
            // Diagonal block, column by column.
            for c in c0..c1 {
                let cc = c - c0;
                x[c * bw + cc] = 1.0 / l[c * k + c];
                for i in c + 1..c1 {
                    let mut s = 0.0;
                    for p in c..i {
                        s += l[i * k + p] * x[p * bw + cc];
                    }
                    x[i * bw + cc] = -s / l[i * k + i];
                }
            }
            let mut i0 = c1;
            while i0 < k {
                let i1 = (i0 + bw).min(k);
                let (done, rest) = x.split_at_mut(i0 * bw);
                // T = L[i0..i1, c0..i0] X[c0..i0, :], into rows i0..i1 of x.
                // SAFETY: A is rows i0..i1, columns c0..i0 of l (row stride k); B is rows c0..i0 of x
                // (`done`, row stride bw); C is the first (i1 - i0) rows of `rest`; all in bounds.
                unsafe {
                    matrixmultiply::dgemm(
                        i1 - i0,
                        i0 - c0,
                        bw,
                        1.0,
                        l.as_ptr().add(i0 * k + c0),
                        k as isize,
                        1,
                        done.as_ptr().add(c0 * bw),
                        bw as isize,
                        1,
                        0.0,
                        rest.as_mut_ptr(),
                        bw as isize,
                        1,
                    );
                }
                // X_IJ = L_II^-1 (-T), forward substitution in place.
                for i in i0..i1 {
                    for cc in 0..c1 - c0 {
                        let mut s = rest[(i - i0) * bw + cc];
                        for p in i0..i {
                            s += l[i * k + p] * rest[(p - i0) * bw + cc];
                        }
                        rest[(i - i0) * bw + cc] = -s / l[i * k + i];
                    }
                }
                i0 = i1;
            }
            x
        })
        .collect();
    InverseColumns { blocks }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scheme() -> Scheme {
        Scheme { w_bits: 4, a_bits: 16, fp8: false, dynamic: false, prefix: 0, gptq: true, fp4: false }
    }

    #[test]
    fn factor_satisfies_u_transpose_u_equals_inverse() {
        let k = 5;
        // H = A^T A + I for a fixed A.
        let a: Vec<f64> = (0..k * k).map(|i| ((i * 7 + 3) % 11) as f64 - 5.0).collect();
        let mut h = vec![0f64; k * k];
        for i in 0..k {
            for j in 0..k {
                h[i * k + j] =
                    (0..k).map(|p| a[p * k + i] * a[p * k + j]).sum::<f64>() + if i == j { 1.0 } else { 0.0 };
            }
        }
        let u = inverse_hessian_factor(&h, k).unwrap();
        let mean_diag = (0..k).map(|i| h[i * k + i]).sum::<f64>() / k as f64;
        // (U^T U) (H + damp I) = I.
        for i in 0..k {
            for j in 0..k {
                let mut s = 0.0;
                for m in 0..k {
                    let utu: f64 = (0..k).map(|p| u[p * k + i] as f64 * u[p * k + m] as f64).sum();
                    s += utu * (h[m * k + j] + if m == j { DAMP * mean_diag } else { 0.0 });
                }
                assert!((s - if i == j { 1.0 } else { 0.0 }).abs() < 1e-4, "{i} {j} {s}");
                if j < i {
                    assert_eq!(u[i * k + j], 0.0);
                }
            }
        }
    }

    /// A pseudo-random symmetric positive definite [k x k] matrix: A^T A + 0.1 I, A [2k x k].
    fn spd(k: usize, seed: u64) -> Vec<f64> {
        let mut seed = seed;
        let a: Vec<f64> = (0..2 * k * k)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((seed >> 33) as f64 / (1u64 << 31) as f64) - 0.5
            })
            .collect();
        let mut h = vec![0f64; k * k];
        for r in 0..2 * k {
            for i in 0..k {
                for j in 0..k {
                    h[i * k + j] += a[r * k + i] * a[r * k + j];
                }
            }
            h[(r % k) * k + r % k] += 0.05;
        }
        h
    }

    #[test]
    fn blocked_factor_inverts_a_matrix_spanning_several_blocks() {
        // k not a multiple of the block, so partial blocks are exercised.
        let k = 3 * CHOL_BLOCK + 17;
        let h = spd(k, 11);
        let u = inverse_hessian_factor(&h, k).unwrap();
        let mean_diag = (0..k).map(|i| h[i * k + i]).sum::<f64>() / k as f64;
        // M = U^T U, then M (H + damp I) must be I.
        let mut m = vec![0f64; k * k];
        for p in 0..k {
            for i in 0..k {
                let upi = u[p * k + i] as f64;
                if upi != 0.0 {
                    for j in 0..k {
                        m[i * k + j] += upi * u[p * k + j] as f64;
                    }
                }
            }
        }
        let mut worst = 0f64;
        for i in 0..k {
            for j in 0..k {
                let s: f64 =
                    (0..k).map(|p| m[i * k + p] * (h[p * k + j] + if p == j { DAMP * mean_diag } else { 0.0 })).sum();
                worst = worst.max((s - if i == j { 1.0 } else { 0.0 }).abs());
                if j < i {
                    assert_eq!(u[i * k + j], 0.0, "{i} {j}");
                }
            }
        }
        assert!(worst < 1e-3, "max |U^T U H - I| = {worst}");
    }

    /// GPTQ one column at a time, every error spread over all later columns at once (the definition).
    fn gptq_reference(w: &[f32], n: usize, k: usize, f: &Factor, scheme: &Scheme) -> Vec<f32> {
        let qmax = scheme.weight_qmax();
        let mut q = vec![0f32; n * k];
        for r in 0..n {
            let wrow = &w[r * k..(r + 1) * k];
            let d = (wrow.iter().fold(0f32, |m, v| m.max(v.abs())) / qmax).max(1e-12);
            let mut row: Vec<f32> = f.perm.iter().map(|&c| wrow[c]).collect();
            for i in 0..k {
                let g = round_to_grid(row[i] / d, scheme);
                q[r * k + f.perm[i]] = g;
                let err = (row[i] - g * d) / f.u[i * k + i];
                for (x, &uij) in row[i + 1..].iter_mut().zip(&f.u[i * k + i + 1..(i + 1) * k]) {
                    *x -= err * uij;
                }
            }
        }
        q
    }

    #[test]
    fn lazy_batch_updates_match_the_column_by_column_definition() {
        let (n, k) = (24, 2 * GPTQ_BLOCK + 37);
        let h = spd(k, 5);
        let mut seed = 3u64;
        let w: Vec<f32> = (0..n * k)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (((seed >> 33) as f64 / (1u64 << 31) as f64) - 0.5) as f32
            })
            .collect();
        let f = Factor::new(&h, k).unwrap();
        let (q, _) = quantize_with(&w, n, k, &f, &vec![1.0; n], &scheme());
        let want = gptq_reference(&w, n, k, &f, &scheme());
        // Only the order of f32 sums differs: a value lying on a rounding boundary may flip, by one step.
        let differ = q.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert!(q.iter().zip(&want).all(|(a, b)| (a - b).abs() <= 1.0));
        assert!(differ * 200 <= n * k, "{differ} of {} grid values differ", n * k);
    }

    #[test]
    fn gptq_output_error_is_no_worse_than_rounding() {
        // Correlated inputs: X rows with a shared component.
        let (n, k, rows) = (8, 16, 64);
        let mut seed = 7u64;
        let mut rnd = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) as f64 / (1u64 << 31) as f64) - 0.5
        };
        let x: Vec<f64> = (0..rows * k).map(|i| rnd() + if i % k < 8 { 0.0 } else { 0.8 * rnd() }).collect();
        let w: Vec<f32> = (0..n * k).map(|_| rnd() as f32).collect();
        let mut h = vec![0f64; k * k];
        for r in 0..rows {
            for i in 0..k {
                for j in 0..k {
                    h[i * k + j] += x[r * k + i] * x[r * k + j];
                }
            }
        }
        let err = |q: &[f32], d: &[f32]| -> f64 {
            let mut e = 0.0;
            for r in 0..rows {
                for o in 0..n {
                    let y: f64 = (0..k).map(|c| x[r * k + c] * (w[o * k + c] - q[o * k + c] * d[o]) as f64).sum();
                    e += y * y;
                }
            }
            e
        };
        let clip = vec![1.0; n];
        let (qr, dr) = crate::quantize::quantize_weight_rtn(&w, n, k, &clip, &scheme());
        let (qg, dg) = quantize(&w, n, k, &h, &clip, &scheme());
        assert!(qg.iter().all(|v| (-8.0..=7.0).contains(v) && v.fract() == 0.0));
        assert!(err(&qg, &dg) < err(&qr, &dr), "gptq {} vs rtn {}", err(&qg, &dg), err(&qr, &dr));
    }
}

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
    let mut q = vec![0f32; n * k];
    q.par_chunks_mut(k).zip(w.par_chunks(k)).zip(steps.par_iter()).for_each(|((qrow, wrow), &d)| {
        let mut row: Vec<f32> = perm.iter().map(|&c| wrow[c]).collect();
        let mut qperm = vec![0f32; k];
        for i in 0..k {
            let g = round_to_grid(row[i] / d, scheme);
            qperm[i] = g;
            let err = (row[i] - g * d) / u[i * k + i];
            let urow = &u[i * k + i + 1..(i + 1) * k];
            for (x, &uij) in row[i + 1..].iter_mut().zip(urow) {
                *x -= err * uij;
            }
        }
        for (j, &c) in perm.iter().enumerate() {
            qrow[c] = qperm[j];
        }
    });
    (q, steps)
}

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
    // In-place lower Cholesky (row-oriented).
    for i in 0..k {
        for j in 0..=i {
            let s = dot(&a[i * k..i * k + j], &a[j * k..j * k + j]);
            let v = a[i * k + j] - s;
            if i == j {
                if v <= 0.0 {
                    return None;
                }
                a[i * k + i] = v.sqrt();
            } else {
                a[i * k + j] = v / a[j * k + j];
            }
        }
    }
    // Inverse of the lower factor by forward substitution, one column per task; column c of L^-1 is
    // stored contiguously (inv_t[c]) so the inner products run over contiguous memory.
    let inv_t: Vec<Vec<f64>> = (0..k)
        .into_par_iter()
        .map(|c| {
            let mut col = vec![0f64; k];
            col[c] = 1.0 / a[c * k + c];
            for i in c + 1..k {
                let s = dot(&a[i * k + c..i * k + i], &col[c..i]);
                col[i] = -s / a[i * k + i];
            }
            col
        })
        .collect();
    // U = P L^-1 P.
    let mut u = vec![0f32; k * k];
    for i in 0..k {
        for j in 0..k {
            u[i * k + j] = inv_t[k - 1 - j][k - 1 - i] as f32;
        }
    }
    Some(u)
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

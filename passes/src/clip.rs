//! `clip`: adaptive clipping of activation steps (per input channel) and weight steps (per output
//! channel), chosen by the layer-output error on calibration rows.
//!
//! Matches: every activation read by constant-weight `linear`s (one group per activation, as `quantize`
//! groups them). For each group, on a reservoir sample of calibration rows X (position 0 left out when
//! `prefix > 0`, since those rows are kept in 16 bits):
//! - activation ranges: channel k's range is beta * min(absmax_k, tau)^gamma * tau^(1 - gamma), with tau
//!   a quantile of the channels' absmax values, beta in [0.3, 1] and gamma in [0, 1] (1: per-channel
//!   ranges; 0: one shared range, which leaves the QSM-folded weight columns evenly scaled). A
//!   coordinate search (beta, gamma, tau, then beta refined) keeps the candidate whose fully quantized
//!   layer (folded weights, round to nearest) gives the smallest ||X W^T - Q(X) Q(W)^T||^2.
//! - weight ratios: per output channel, the ratio in {1, 0.95, ..., 0.6} minimising the output error of
//!   that row, sum_k E[x_k^2] e_k^2 (the diagonal of X^T X; cross terms ignored to keep it linear in K).
//!
//! Postcondition: each matched linear carries `act_clip` (f32 per input channel) and `weight_clip` (f32
//! per output channel), read by `quantize`. Exact no-op on the float graph's values.

use crate::calibration::StatsRequest;
use crate::pass::{OptionKind, OptionSpec, Pass, PassContext, PassError, PassOptions, PassOutcome};
use crate::quantize::{
    activation_steps, linear_groups, quantize_weight_rtn, round_clamped, round_to_grid, shared_step_groups, Scheme,
};
use crate::registry::PassEntry;
use qcc_ir::{Attr, DType, Graph, Tensor};
use std::borrow::Cow;

pub const ENTRY: PassEntry = PassEntry {
    name: "clip",
    description: "choose per-channel activation and per-output-channel weight clip ratios by layer-output error",
    options: &[
        OptionSpec { key: "w", kind: OptionKind::Int, default: "4", help: "weight bits" },
        OptionSpec { key: "a", kind: OptionKind::Int, default: "4", help: "activation bits" },
        OptionSpec { key: "prefix", kind: OptionKind::Int, default: "0", help: "leading tokens kept in 16 bits" },
        OptionSpec { key: "rows", kind: OptionKind::Int, default: "128", help: "calibration rows per layer" },
        OptionSpec { key: "skip", kind: OptionKind::Str, default: "", help: "substring of linears to leave alone" },
        OptionSpec {
            key: "gram",
            kind: OptionKind::Bool,
            default: "false",
            help: "also collect X^T X, so a following GPTQ quantize needs no second calibration pass",
        },
    ],
    build: |o: &PassOptions| {
        let scheme = Scheme {
            w_bits: o.usize("w")? as u32,
            a_bits: o.usize("a")? as u32,
            fp8: false,
            dynamic: false,
            prefix: o.usize("prefix")?,
            gptq: false,
            fp4: false,
        };
        if !matches!(scheme.w_bits, 4 | 8) || !matches!(scheme.a_bits, 4 | 8 | 16) {
            return Err(PassError::Other("clip: w must be 4 or 8, a 4, 8 or 16".into()));
        }
        Ok(Box::new(Clip {
            scheme,
            rows: o.usize("rows")?.max(8),
            skip: o.str("skip")?.to_string(),
            gram: o.bool("gram")?,
        }))
    },
};

pub struct Clip {
    scheme: Scheme,
    rows: usize,
    skip: String,
    gram: bool,
}

const TAU_QUANTILES: [f64; 6] = [1.0, 0.99, 0.97, 0.93, 0.85, 0.7];
const BETAS: [f32; 8] = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3];
/// Exponents blending per-channel ranges (1) with one shared range (0): the activation steps are folded
/// into the weight columns (QSM), so uneven steps cost weight precision that per-channel ranges win back.
const GAMMAS: [f32; 5] = [1.0, 0.75, 0.5, 0.25, 0.0];
const WEIGHT_RATIOS: [f32; 9] = [1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6];

/// Squared error of the fully quantized layer against the float layer `y` (`x W^T`, one `[r x n]` block
/// per weight) on rows `x` (`[r x k]`).
fn layer_error(
    x: &[f32],
    r: usize,
    k: usize,
    weights: &[(Cow<[f32]>, usize)],
    y: &[Vec<f32>],
    steps: &[f32],
    s: &Scheme,
) -> f64 {
    let qmax = s.act_qmax();
    let mut xq = vec![0f32; r * k];
    for (qrow, row) in xq.chunks_exact_mut(k).zip(x.chunks_exact(k)) {
        for ((q, &v), &d) in qrow.iter_mut().zip(row).zip(steps) {
            *q = round_clamped(v / d, -qmax - 1.0, qmax);
        }
    }
    let mut total = 0.0;
    for ((w, n), y) in weights.iter().zip(y) {
        let folded: Vec<f32> = w.chunks_exact(k).flat_map(|row| row.iter().zip(steps).map(|(&a, &b)| a * b)).collect();
        let (q, d) = quantize_weight_rtn(&folded, *n, k, &vec![1.0; *n], s);
        let mut yq = vec![0f32; r * n];
        grid_gemm_nt(&xq, &q, &mut yq, r, k, *n);
        for (yrow, yqrow) in y.chunks_exact(*n).zip(yq.chunks_exact(*n)) {
            for ((a, b), dd) in yrow.iter().zip(yqrow).zip(&d) {
                let e = (a - b * dd) as f64;
                total += e * e;
            }
        }
    }
    total
}

/// c[r x n] = a[r x k] b[n x k]^T.
pub(crate) fn gemm_nt(a: &[f32], b: &[f32], c: &mut [f32], r: usize, k: usize, n: usize) {
    // SAFETY: the slices hold r*k, n*k and r*n elements, matching the dimensions and strides given.
    unsafe {
        matrixmultiply::sgemm(
            r,
            k,
            n,
            1.0,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            1,
            k as isize,
            0.0,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// [`gemm_nt`] of two matrices of grid values (integers up to 8 bits, e2m1 or e4m3 values): bf16 holds
/// them exactly, so the bf16 kernel (twice the f32 rate where the CPU has it) gives the f32 result.
fn grid_gemm_nt(a: &[f32], b: &[f32], c: &mut [f32], r: usize, k: usize, n: usize) {
    use qcc_runtime::cpu::bf16_gemm::{gemm_nt as bf16_gemm_nt, Strided};
    if !bf16_gemm_nt(&Strided::rows(a, r, k), &Strided::rows(b, n, k), c, n, false, false) {
        gemm_nt(a, b, c, r, k, n);
    }
}

fn quantile(values: &[f32], q: f64) -> f32 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len().saturating_sub(1)) as f64 * q).round() as usize;
    v.get(i).copied().unwrap_or(0.0)
}

impl Pass for Clip {
    fn name(&self) -> &'static str {
        ENTRY.name
    }

    fn description(&self) -> &'static str {
        ENTRY.description
    }

    fn run(&self, graph: &mut Graph, ctx: &mut PassContext) -> Result<PassOutcome, PassError> {
        use rayon::prelude::*;
        let s = &self.scheme;
        let groups = linear_groups(graph, &self.skip)?;
        if groups.is_empty() {
            return Ok(PassOutcome::unchanged());
        }
        // The groups the rewrite budget (bisection) allows: a prefix, as when they were visited in order.
        let mut allowed = 0;
        while allowed < groups.len() && ctx.try_rewrite() {
            allowed += 1;
        }
        let request =
            StatsRequest { values: groups.iter().map(|(x, _)| *x).collect(), gram: self.gram, sample_rows: self.rows };
        let collect_start = std::time::Instant::now();
        // Only what the search reads is copied (the Gram matrices stay in the context for `quantize`).
        let inputs: Vec<Option<GroupInput>> = ctx
            .activation_stats(graph, &request)?
            .into_iter()
            .zip(&groups)
            .take(allowed)
            .map(|(st, (x, sites))| {
                let k = st.channels;
                if sites.iter().any(|site| site.k != k) {
                    return Ok(None);
                }
                // Sample rows, without position 0 when those rows stay in 16 bits.
                let (Some(rows), Some(pos)) = (&st.sample_rows, &st.sample_positions) else { return Ok(None) };
                let keep: Vec<usize> =
                    (0..pos.len()).filter(|&i| s.prefix == 0 || pos[i] as usize >= s.prefix).collect();
                if keep.is_empty() {
                    return Ok(None);
                }
                let xs: Vec<f32> = keep.iter().flat_map(|&i| rows[i * k..(i + 1) * k].iter().copied()).collect();
                // The weights are read where they are (f32 after the float passes), one group at a
                // time in the search: a copy of every weight up front was a whole model's worth of
                // memory (27 GB for a 7B model).
                let weights: Vec<(Tensor, usize)> = sites.iter().map(|site| (site.weight.clone(), site.n)).collect();
                let absmax = if s.prefix > 0 { &st.absmax_excluding_first } else { &st.absmax };
                Ok(Some(GroupInput {
                    k,
                    r: keep.len(),
                    xs,
                    weights,
                    absmax: absmax.clone(),
                    share: shared_step_groups(graph, *x, k),
                }))
            })
            .collect::<Result<_, PassError>>()?;
        let collect_s = collect_start.elapsed().as_secs_f64();
        let timing = ctx.take_collection_timing();
        // The searches of different activations are independent.
        let search_start = std::time::Instant::now();
        let results: Vec<Option<ClipRatios>> = inputs
            .par_iter()
            .map(|g| g.as_ref().map(|g| self.search(g)).transpose())
            .collect::<Result<_, PassError>>()?;
        let search_s = search_start.elapsed().as_secs_f64();
        let mut rewrites = 0;
        let mut clipped_channels = 0usize;
        for ((_, sites), result) in groups.iter().zip(results) {
            let Some((act_ratios, weight_ratios)) = result else { continue };
            clipped_channels += act_ratios.iter().filter(|&&v| v < 1.0).count();
            for (site, ratios) in sites.iter().zip(weight_ratios) {
                let node = &mut graph.node_mut(site.node).op;
                node.attrs.insert("act_clip".into(), Attr::Floats(act_ratios.clone()));
                node.attrs.insert("weight_clip".into(), Attr::Floats(ratios));
                rewrites += 1;
            }
        }
        ctx.note(format!("{rewrites} linears given clip ratios; {clipped_channels} activation channels clipped"));
        match timing {
            Some(t) => ctx.note(format!("time: statistics {collect_s:.1} s ({t}), search {search_s:.1} s")),
            None => ctx.note(format!("time: statistics {collect_s:.1} s (cached), search {search_s:.1} s")),
        }
        // Only attributes changed: the activations (and their statistics) are the same.
        ctx.preserve_stats_once();
        Ok(PassOutcome::rewrites(rewrites))
    }
}

/// Activation ratios (per input channel) and, per linear, weight ratios (per output channel).
type ClipRatios = (Vec<f32>, Vec<Vec<f32>>);

/// What the search of one activation reads.
struct GroupInput {
    k: usize,
    /// Sampled rows `xs` (`[r x k]`).
    r: usize,
    xs: Vec<f32>,
    /// The weights of the linears reading the activation (`[n x k]`, with n).
    weights: Vec<(Tensor, usize)>,
    absmax: Vec<f32>,
    share: Vec<usize>,
}

impl Clip {
    /// The activation ratios (per input channel) and, per linear, the weight ratios (per output channel).
    fn search(&self, g: &GroupInput) -> Result<ClipRatios, PassError> {
        use rayon::prelude::*;
        let s = &self.scheme;
        let (k, r, xs, absmax) = (g.k, g.r, &g.xs, &g.absmax);
        let weights: Vec<(Cow<[f32]>, usize)> = g
            .weights
            .iter()
            .map(|(t, n)| {
                let w = if t.dtype == DType::F32 { t.values::<f32>() } else { t.to_f32_vec().map(Cow::Owned) };
                w.map(|w| (w, *n)).map_err(|e| PassError::Other(format!("clip: {e}")))
            })
            .collect::<Result<_, _>>()?;
        let mut best = (f64::INFINITY, vec![1f32; k]);
        if s.a_bits < 16 {
            // The float layer's outputs, the same for every candidate.
            let y: Vec<Vec<f32>> = weights
                .iter()
                .map(|(w, n)| {
                    let mut y = vec![0f32; r * n];
                    gemm_nt(xs, w, &mut y, r, k, *n);
                    y
                })
                .collect();
            let try_candidate = |q: f64, beta: f32, gamma: f32, best: &mut (f64, Vec<f32>)| {
                let tau = quantile(absmax, q);
                let ratios: Vec<f32> = absmax
                    .iter()
                    .map(|&a| if a > 0.0 { a.min(tau).powf(gamma) * tau.powf(1.0 - gamma) / a * beta } else { 1.0 })
                    .collect();
                let steps = activation_steps(absmax, &ratios, &g.share, s.act_qmax());
                let err = layer_error(xs, r, k, &weights, &y, &steps, s);
                if err < best.0 {
                    *best = (err, ratios);
                    true
                } else {
                    false
                }
            };
            // Coordinate search: the overall range scale first (after a rotation every channel looks
            // alike and the best 4-bit range is well inside the max), then the outlier cap tau, then
            // a finer scale around the winner.
            let mut beta_best = 1.0;
            for &beta in &BETAS {
                if try_candidate(1.0, beta, 1.0, &mut best) {
                    beta_best = beta;
                }
            }
            let mut gamma_best = 1.0;
            for &gamma in &GAMMAS[1..] {
                if try_candidate(1.0, beta_best, gamma, &mut best) {
                    gamma_best = gamma;
                }
            }
            let mut q_best = 1.0;
            for &q in &TAU_QUANTILES[1..] {
                if try_candidate(q, beta_best, gamma_best, &mut best) {
                    q_best = q;
                }
            }
            for delta in [-0.05f32, 0.05] {
                let beta = beta_best + delta;
                if beta > 0.2 && beta <= 1.0 {
                    try_candidate(q_best, beta, gamma_best, &mut best);
                }
            }
        }
        let act_ratios = best.1;
        let steps =
            if s.a_bits < 16 { activation_steps(absmax, &act_ratios, &g.share, s.act_qmax()) } else { vec![1.0; k] };
        // E[x_k^2] in the quantized domain weights each column's rounding error.
        let mut energy = vec![0f64; k];
        for row in xs.chunks_exact(k) {
            for ((e, &v), &d) in energy.iter_mut().zip(row).zip(&steps) {
                let v = (v / d) as f64;
                *e += v * v;
            }
        }
        let weight_ratios = weights
            .iter()
            .map(|(w, n)| {
                (0..*n)
                    .into_par_iter()
                    .map(|row_i| {
                        let row: Vec<f32> =
                            w[row_i * k..(row_i + 1) * k].iter().zip(&steps).map(|(&a, &b)| a * b).collect();
                        let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                        let mut best_w = (f64::INFINITY, 1f32);
                        for &cand in &WEIGHT_RATIOS {
                            let d = (amax * cand / s.weight_qmax()).max(1e-12);
                            let err: f64 = row
                                .iter()
                                .zip(&energy)
                                .map(|(&v, &e)| {
                                    let q = round_to_grid(v / d, s) * d;
                                    e * ((v - q) as f64).powi(2)
                                })
                                .sum();
                            if err < best_w.0 {
                                best_w = (err, cand);
                            }
                        }
                        best_w.1
                    })
                    .collect()
            })
            .collect();
        Ok((act_ratios, weight_ratios))
    }
}

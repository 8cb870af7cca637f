//! `smooth{alpha=0.5}`: SmoothQuant. Migrates activation outliers into the weights with per-channel
//! scales s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), where max|W_j| spans column j of every linear
//! reading X: the producer emits X / s and the readers use W diag(s). Exact in floating point.
//!
//! Matches the sites of `sites.rs`: a norm (gamma' = gamma / s, beta' = beta / s); swiglu of constant
//! gate/up projections (up_proj's output rows and bias / s: swiglu is linear in up); attention values
//! feeding o_proj (v_proj's output rows / s; query heads that share a KV head share its scales, so s of
//! a KV channel uses the largest activation and weight of the query channels reading it).
//! Requires: a calibration set (activation absmax per channel); without one the pass fails, naming it.
//! Near misses left alone: an activation also read by a non-linear, a producer that cannot absorb a
//! scale (a `hadamard` inserted by `rotate`, a non-constant gamma), channels with zero range (s = 1).
//! Postcondition: same outputs up to rounding; the activation ranges of the matched sites are flattened.

use crate::registry::PassEntry;
use crate::sites::{find_sites, Producer, Site};
use crate::weights::{
    activation_ranges, constant_vector, label, linear_bias, linear_weight, replace_constant_input, store_linear,
};
use crate::{OptionKind, OptionSpec, Pass, PassContext, PassError, PassOptions, PassOutcome};
use qcc_ir::Graph;

const OPTIONS: &[OptionSpec] = &[
    OptionSpec { key: "alpha", kind: OptionKind::Float, default: "0.5", help: "migration strength in [0, 1]" },
    OptionSpec {
        key: "exclude-first",
        kind: OptionKind::Bool,
        default: "false",
        help: "leave each sample's first token (the attention sink) out of max|X|",
    },
];

pub const ENTRY: PassEntry = PassEntry {
    name: "smooth",
    description: "SmoothQuant: migrate per-channel activation scales into the weights of the readers",
    options: OPTIONS,
    build: |o: &PassOptions| {
        let alpha = o.f64("alpha")?;
        if !(0.0..=1.0).contains(&alpha) {
            return Err(PassError::BadOptionValue {
                pass: "smooth".into(),
                key: "alpha".into(),
                value: alpha.to_string(),
                expected: "a number in [0, 1]",
            });
        }
        Ok(Box::new(Smooth { alpha, exclude_first: o.bool("exclude-first")? }))
    },
};

pub struct Smooth {
    alpha: f64,
    exclude_first: bool,
}

impl Pass for Smooth {
    fn name(&self) -> &'static str {
        ENTRY.name
    }

    fn description(&self) -> &'static str {
        ENTRY.description
    }

    fn run(&self, graph: &mut Graph, ctx: &mut PassContext) -> Result<PassOutcome, PassError> {
        let sites: Vec<Site> =
            find_sites(graph)?.into_iter().filter(|s| !matches!(s.producer, Producer::Opaque)).collect();
        let values: Vec<_> = sites.iter().map(|s| s.activation).collect();
        let ranges = activation_ranges(graph, ctx, ENTRY.name, &values, self.exclude_first)?;
        let mut rewrites = 0;
        for (site, range) in sites.iter().zip(ranges) {
            if range.absmax.len() != site.channels {
                return Err(PassError::Other(format!(
                    "pass 'smooth': statistics of '{}' have {} channels, expected {}",
                    graph.value_name(site.activation),
                    range.absmax.len(),
                    site.channels
                )));
            }
            if !ctx.try_rewrite() {
                break;
            }
            self.apply(graph, site, &range.absmax)?;
            rewrites += 1;
        }
        Ok(PassOutcome::rewrites(rewrites))
    }
}

/// max |W[:, j]| over every reader.
fn weight_absmax(graph: &Graph, site: &Site) -> Vec<f64> {
    let mut out = vec![0f64; site.channels];
    for &r in &site.readers {
        if let Some(w) = linear_weight(graph, r) {
            for n in 0..w.rows {
                for (o, x) in out.iter_mut().zip(w.row(n)) {
                    *o = o.max(x.abs());
                }
            }
        }
    }
    out
}

fn scale(act: f64, weight: f64, alpha: f64) -> f64 {
    let s = act.powf(alpha) / weight.powf(1.0 - alpha);
    if s.is_finite() && s > 0.0 && act > 0.0 && weight > 0.0 {
        s
    } else {
        1.0
    }
}

impl Smooth {
    fn apply(&self, graph: &mut Graph, site: &Site, act: &[f64]) -> Result<(), PassError> {
        let wmax = weight_absmax(graph, site);
        // Per-channel scale of the activation (what the readers' columns are multiplied by).
        let s: Vec<f64> = match &site.producer {
            Producer::Values { head, group, .. } => {
                // One scale per KV channel, shared by the query heads of its group.
                let (d, g) = (*head, *group);
                let kv_channels = site.channels / g;
                let mut kv = vec![1f64; kv_channels];
                for (k, slot) in kv.iter_mut().enumerate() {
                    let (kv_head, c) = (k / d, k % d);
                    let chans = (0..g).map(|i| ((kv_head * g + i) * d) + c);
                    let (a, w) = chans.fold((0f64, 0f64), |(a, w), j| (a.max(act[j]), w.max(wmax[j])));
                    *slot = scale(a, w, self.alpha);
                }
                (0..site.channels).map(|j| kv[(j / d / g) * d + j % d]).collect()
            }
            _ => act.iter().zip(&wmax).map(|(&a, &w)| scale(a, w, self.alpha)).collect(),
        };
        match &site.producer {
            Producer::Norm(norm) => {
                for port in [1, 2] {
                    if let Some(v) = graph.input(*norm, port).and_then(|p| constant_vector(graph, p, site.channels)) {
                        let scaled: Vec<f64> = v.iter().zip(&s).map(|(x, s)| x / s).collect();
                        replace_constant_input(
                            graph,
                            ENTRY.name,
                            *norm,
                            port,
                            vec![site.channels],
                            &scaled,
                            ".smooth",
                        )?;
                    }
                }
            }
            Producer::UpProj { up, .. } => divide_rows(graph, *up, &s)?,
            Producer::Values { v_proj, head, group } => {
                let kv: Vec<f64> =
                    (0..site.channels / group).map(|k| s[(k / head * group) * head + k % head]).collect();
                divide_rows(graph, *v_proj, &kv)?;
            }
            Producer::Opaque => return Ok(()),
        }
        for &r in &site.readers {
            let mut w = linear_weight(graph, r).ok_or_else(|| {
                PassError::node(&label(graph, r), qcc_ir::OpKind::Linear, "smooth: weight is not a constant matrix")
            })?;
            w.map_rows(|row| row.iter_mut().zip(&s).for_each(|(x, s)| *x *= s));
            store_linear(graph, ENTRY.name, r, &w, None, ".smooth")?;
        }
        Ok(())
    }
}

/// Output rows (and bias) of a linear divided by `s`.
fn divide_rows(graph: &mut Graph, id: qcc_ir::NodeId, s: &[f64]) -> Result<(), PassError> {
    let mut w = linear_weight(graph, id).ok_or_else(|| {
        PassError::node(&label(graph, id), qcc_ir::OpKind::Linear, "smooth: weight is not a constant matrix")
    })?;
    if w.rows != s.len() {
        return Err(PassError::node(
            &label(graph, id),
            qcc_ir::OpKind::Linear,
            format!("smooth: {} output rows but {} scales", w.rows, s.len()),
        ));
    }
    for (r, &sr) in s.iter().enumerate() {
        w.row_mut(r).iter_mut().for_each(|x| *x /= sr);
    }
    let bias = linear_bias(graph, id, w.rows).map(|b| b.iter().zip(s).map(|(x, s)| x / s).collect::<Vec<_>>());
    store_linear(graph, ENTRY.name, id, &w, bias.as_deref(), ".smooth")
}

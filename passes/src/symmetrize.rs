//! `symmetrize`: OutlierTune channel centring. Each activation channel k is shifted by its centre
//! z_k = (max_k + min_k) / 2 over the calibration set, so a symmetric quantizer sees a range centred on
//! zero; every reader restores the output with b' = b + W z: (x - z) W^T + (b + W z) = x W^T + b.
//!
//! Matches the sites of `sites.rs`. Where the producer can absorb "- z" it does: a norm gets beta' =
//! beta - z (an `rms_norm` without beta gets one); attention values get v_proj's bias - z (softmax rows
//! sum to 1, so shifting V shifts the output by the same vector; query heads sharing a KV head share z,
//! taken from the union of their ranges). Elsewhere (swiglu, a `hadamard` after `rotate`) an explicit
//! `sub(x, z)` is inserted before the readers, for the quantizer to fuse.
//! Requires: a calibration set (per-channel min/max); without one the pass fails, naming it.
//! Near misses left alone: an activation read by a non-linear; sites whose centres are all zero.
//! Postcondition: same outputs up to rounding (the readers gain a bias).

use crate::registry::PassEntry;
use crate::sites::{find_sites, Producer, Site};
use crate::weights::{
    activation_ranges, add_constant, constant_vector, label, linear_bias, linear_weight, replace_constant_input,
    store_linear,
};
use crate::{OptionKind, OptionSpec, Pass, PassContext, PassError, PassOptions, PassOutcome};
use qcc_ir::{Graph, Op, OpKind, Value, ValueInfo};

const OPTIONS: &[OptionSpec] = &[OptionSpec {
    key: "exclude-first",
    kind: OptionKind::Bool,
    default: "false",
    help: "leave each sample's first token (the attention sink) out of the ranges",
}];

pub const ENTRY: PassEntry = PassEntry {
    name: "symmetrize",
    description: "OutlierTune: centre activation channels (x - z) and fold W z into the readers' bias",
    options: OPTIONS,
    build: |o: &PassOptions| Ok(Box::new(Symmetrize { exclude_first: o.bool("exclude-first")? })),
};

pub struct Symmetrize {
    exclude_first: bool,
}

impl Pass for Symmetrize {
    fn name(&self) -> &'static str {
        ENTRY.name
    }

    fn description(&self) -> &'static str {
        ENTRY.description
    }

    fn run(&self, graph: &mut Graph, ctx: &mut PassContext) -> Result<PassOutcome, PassError> {
        let sites = find_sites(graph)?;
        let values: Vec<Value> = sites.iter().map(|s| s.activation).collect();
        let ranges = activation_ranges(graph, ctx, ENTRY.name, &values, self.exclude_first)?;
        let mut rewrites = 0;
        for (site, range) in sites.iter().zip(ranges) {
            if range.min.len() != site.channels {
                return Err(PassError::Other(format!(
                    "pass 'symmetrize': statistics of '{}' have {} channels, expected {}",
                    graph.value_name(site.activation),
                    range.min.len(),
                    site.channels
                )));
            }
            let z = centres(site, &range.min, &range.max);
            if z.iter().all(|&v| v == 0.0) || !ctx.try_rewrite() {
                continue;
            }
            apply(graph, site, &z)?;
            rewrites += 1;
        }
        Ok(PassOutcome::rewrites(rewrites))
    }
}

fn centre(lo: f64, hi: f64) -> f64 {
    let z = (lo + hi) / 2.0;
    if z.is_finite() {
        z
    } else {
        0.0
    }
}

fn centres(site: &Site, min: &[f64], max: &[f64]) -> Vec<f64> {
    match site.producer {
        Producer::Values { head: d, group: g, .. } => {
            // The union range of the query channels that read one KV channel.
            let kv: Vec<f64> = (0..site.channels / g)
                .map(|k| {
                    let chans = (0..g).map(|i| (k / d * g + i) * d + k % d);
                    let (lo, hi) =
                        chans.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), j| (lo.min(min[j]), hi.max(max[j])));
                    centre(lo, hi)
                })
                .collect();
            (0..site.channels).map(|j| kv[(j / d / g) * d + j % d]).collect()
        }
        _ => min.iter().zip(max).map(|(&lo, &hi)| centre(lo, hi)).collect(),
    }
}

fn apply(graph: &mut Graph, site: &Site, z: &[f64]) -> Result<(), PassError> {
    let n = site.channels;
    match &site.producer {
        Producer::Norm(norm) => {
            let beta = graph.input(*norm, 2).and_then(|b| constant_vector(graph, b, n));
            let shifted: Vec<f64> = match &beta {
                Some(b) => b.iter().zip(z).map(|(b, z)| b - z).collect(),
                None => z.iter().map(|z| -z).collect(),
            };
            if beta.is_some() {
                replace_constant_input(graph, ENTRY.name, *norm, 2, vec![n], &shifted, ".centred")?;
            } else {
                let gamma = graph.input(*norm, 1).ok_or_else(|| {
                    PassError::node(&label(graph, *norm), graph.node(*norm).op.kind, "symmetrize: gamma is absent")
                })?;
                let dtype = graph.value_type(gamma).dtype;
                let name = format!("{}.beta", label(graph, *norm));
                let b = add_constant(graph, &name, dtype, vec![n], &shifted).ok_or_else(|| {
                    PassError::node(&label(graph, *norm), graph.node(*norm).op.kind, "symmetrize: cannot store beta")
                })?;
                graph.set_input(*norm, 2, Some(b));
            }
        }
        Producer::Values { v_proj, head: d, group: g } => {
            let w = linear_weight(graph, *v_proj).ok_or_else(|| {
                PassError::node(&label(graph, *v_proj), OpKind::Linear, "symmetrize: weight is not constant")
            })?;
            let mut bias = linear_bias(graph, *v_proj, w.rows).unwrap_or_else(|| vec![0.0; w.rows]);
            for (k, b) in bias.iter_mut().enumerate() {
                *b -= z[(k / d * g) * d + k % d];
            }
            store_linear(graph, ENTRY.name, *v_proj, &w, Some(&bias), ".centred")?;
        }
        Producer::UpProj { .. } | Producer::Opaque => {
            let x = site.activation;
            let dtype = graph.value_type(x).dtype;
            let zc = add_constant(graph, &format!("{}.centre", graph.value_name(x)), dtype, vec![n], z).ok_or_else(
                || PassError::Other(format!("pass 'symmetrize': cannot store the centre of '{}'", graph.value_name(x))),
            )?;
            let name = graph.fresh_name(&format!("{}.centred", graph.value_name(x)));
            let ty = graph.value_type(x).clone();
            let sub = graph.add_node(
                name.clone(),
                Op::new(OpKind::Sub),
                &[Some(x), Some(zc)],
                vec![ValueInfo::new(name, ty)],
            )?;
            for &r in &site.readers {
                graph.set_input(r, 0, Some(Value::new(sub, 0)));
            }
        }
    }
    for &r in &site.readers {
        let w = linear_weight(graph, r)
            .ok_or_else(|| PassError::node(&label(graph, r), OpKind::Linear, "symmetrize: weight is not constant"))?;
        let mut bias = linear_bias(graph, r, w.rows).unwrap_or_else(|| vec![0.0; w.rows]);
        for (o, b) in bias.iter_mut().enumerate() {
            *b += w.row(o).iter().zip(z).map(|(w, z)| w * z).sum::<f64>();
        }
        // The weight is unchanged; only the bias is stored anew.
        match graph.input(r, 2) {
            Some(_) => {
                replace_constant_input(graph, ENTRY.name, r, 2, vec![w.rows], &bias, ".centred")?;
            }
            None => {
                let wv = graph.input(r, 1).expect("constant linear");
                let dtype = graph.value_type(wv).dtype;
                let b = add_constant(graph, &format!("{}.bias", graph.value_name(wv)), dtype, vec![w.rows], &bias)
                    .ok_or_else(|| {
                        PassError::node(&label(graph, r), OpKind::Linear, "symmetrize: cannot store bias")
                    })?;
                graph.set_input(r, 2, Some(b));
            }
        }
    }
    Ok(())
}

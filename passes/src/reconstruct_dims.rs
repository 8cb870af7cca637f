//! `reconstruct-dims{budget=0.03, exclude-first=true}`: dimensional reconstruction (MergeQuant). A channel
//! k whose quantization step (calibration absmax) dwarfs the rest is split into m copies, each carrying
//! x_k / m: the producer emits the copies as new channels and every reader's weight column k is
//! duplicated for them, so sum over copies of (x_k / m) W[:, k] = x_k W[:, k]. Exact in floating point up
//! to rounding; each copy's step is s_k / m.
//!
//! Matches the swiglu sites of `sites.rs`: swiglu(gate_proj(x), up_proj(x)) read only by linears (the
//! down_proj input). Up_proj's output row k (and bias) becomes row k / m for the original and each copy;
//! gate_proj's row k is copied unscaled, since swiglu(g, u / m) = swiglu(g, u) / m. The readers' columns
//! for the copies equal column k. Then K is padded with zero channels (zero rows in gate/up, zero columns
//! in the readers; swiglu(0, 0) = 0) to a multiple of 32, the kernel tile.
//!
//! Choice of channels: steps s_k = absmax_k (without each sample's first token when `exclude-first`).
//! With B = floor(budget * K) channels to spend, the target level t is the median of the largest
//! max(B, 4) steps; a channel dominates when s_k >= 2 t. Water-filling, largest first: the channel whose
//! current copy step s_k / m_k is largest gets one more copy, while that step exceeds t and budget is left.
//! So with enough budget m_k = ceil(s_k / t); with too little, the largest copy step is as small as the
//! budget allows.
//!
//! Left alone (not rewritten):
//!   * norm outputs (q/k/v and gate/up inputs): a norm cannot emit more channels than its input carries
//!     without a new op (a gather or a widened norm), which no later pass or kernel understands yet;
//!   * attention values (o_proj input): duplicating a v channel changes the head size and breaks the
//!     head layout that attention and the KV cache depend on;
//!   * opaque sites (e.g. the `hadamard` that `rotate` puts before down_proj), and swiglu sites where no
//!     channel dominates, or the budget is below one channel (then nothing is padded either).
//!
//! Requires: a calibration set; without one the pass fails, naming it.
//! Postcondition: same outputs up to rounding; at each rewritten site K' = K + added, rounded up to a
//! multiple of 32, with gate/up/swiglu output types widened to K'.

use crate::registry::PassEntry;
use crate::sites::{find_sites, Producer, Site};
use crate::weights::{activation_ranges, label, linear_bias, linear_weight, require_calibration, store_linear, Matrix};
use crate::{OptionKind, OptionSpec, Pass, PassContext, PassError, PassOptions, PassOutcome};
use qcc_ir::{Graph, NodeId, OpKind, Value};
use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// The padded channel count is a multiple of this (the GEMM K tile).
pub const K_TILE: usize = 32;
/// A channel is split only when its step is at least this many times the target level.
const DOMINANCE: f64 = 2.0;
/// The target level is the median of at least this many of the largest steps.
const MIN_TOP: usize = 4;

const OPTIONS: &[OptionSpec] = &[
    OptionSpec {
        key: "budget",
        kind: OptionKind::Float,
        default: "0.03",
        help: "at most this fraction of K added as split channels per activation (before padding)",
    },
    OptionSpec {
        key: "exclude-first",
        kind: OptionKind::Bool,
        default: "true",
        help: "leave each sample's first token (the attention sink) out of the steps",
    },
];

pub const ENTRY: PassEntry = PassEntry {
    name: "reconstruct-dims",
    description: "MergeQuant dimensional reconstruction: split dominant down_proj input channels into copies",
    options: OPTIONS,
    build: |o: &PassOptions| {
        let budget = o.f64("budget")?;
        if !(0.0..=1.0).contains(&budget) {
            return Err(PassError::BadOptionValue {
                pass: "reconstruct-dims".into(),
                key: "budget".into(),
                value: budget.to_string(),
                expected: "a fraction in [0, 1]",
            });
        }
        Ok(Box::new(ReconstructDims { budget, exclude_first: o.bool("exclude-first")? }))
    },
};

pub struct ReconstructDims {
    budget: f64,
    exclude_first: bool,
}

/// How many copies each channel ends with (1 = untouched), in channel order.
#[derive(Clone, Debug, PartialEq)]
pub struct SplitPlan {
    pub copies: Vec<usize>,
}

impl SplitPlan {
    /// Channels added by splitting (before padding).
    pub fn added(&self) -> usize {
        self.copies.iter().map(|m| m - 1).sum()
    }

    /// Channel count after splitting and padding to a multiple of `K_TILE`.
    pub fn padded_width(&self) -> usize {
        (self.copies.len() + self.added()).div_ceil(K_TILE) * K_TILE
    }
}

#[derive(PartialEq)]
struct Candidate {
    step: f64,
    channel: usize,
}

impl Eq for Candidate {}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Candidate {
    // Largest step first; ties go to the lower channel index (deterministic plans).
    fn cmp(&self, other: &Self) -> Ordering {
        self.step.total_cmp(&other.step).then_with(|| other.channel.cmp(&self.channel))
    }
}

/// The split plan for steps `steps` with `budget` (a fraction of K); `None` when nothing dominates.
pub fn plan_splits(steps: &[f64], budget: f64) -> Option<SplitPlan> {
    let k = steps.len();
    let spend = (budget * k as f64).floor() as usize;
    if spend == 0 || k == 0 {
        return None;
    }
    let mut sorted: Vec<f64> = steps.iter().map(|s| if s.is_finite() { s.abs() } else { 0.0 }).collect();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let top = &sorted[..spend.max(MIN_TOP).min(k)];
    let target = top[top.len() / 2];
    if target <= 0.0 {
        return None;
    }
    let mut copies = vec![1usize; k];
    let mut heap: BinaryHeap<Candidate> = steps
        .iter()
        .enumerate()
        .filter(|(_, &s)| s.is_finite() && s >= DOMINANCE * target)
        .map(|(channel, &step)| Candidate { step, channel })
        .collect();
    if heap.is_empty() {
        return None;
    }
    let mut left = spend;
    while left > 0 {
        let Some(top) = heap.pop() else { break };
        if top.step <= target {
            break;
        }
        let m = &mut copies[top.channel];
        *m += 1;
        left -= 1;
        heap.push(Candidate { step: steps[top.channel] / *m as f64, channel: top.channel });
    }
    Some(SplitPlan { copies })
}

impl Pass for ReconstructDims {
    fn name(&self) -> &'static str {
        ENTRY.name
    }

    fn description(&self) -> &'static str {
        ENTRY.description
    }

    fn run(&self, graph: &mut Graph, ctx: &mut PassContext) -> Result<PassOutcome, PassError> {
        require_calibration(ctx, ENTRY.name)?;
        let sites: Vec<Site> =
            find_sites(graph)?.into_iter().filter(|s| matches!(s.producer, Producer::UpProj { .. })).collect();
        let values: Vec<Value> = sites.iter().map(|s| s.activation).collect();
        let ranges = activation_ranges(graph, ctx, ENTRY.name, &values, self.exclude_first)?;
        let mut rewrites = 0;
        for (site, range) in sites.iter().zip(ranges) {
            if range.absmax.len() != site.channels {
                return Err(PassError::Other(format!(
                    "pass '{}': statistics of '{}' have {} channels, expected {}",
                    ENTRY.name,
                    graph.value_name(site.activation),
                    range.absmax.len(),
                    site.channels
                )));
            }
            let Some(plan) = plan_splits(&range.absmax, self.budget) else { continue };
            if !ctx.try_rewrite() {
                break;
            }
            apply(graph, site, &plan)?;
            rewrites += 1;
        }
        Ok(PassOutcome::rewrites(rewrites))
    }
}

fn constant_weight(graph: &Graph, id: NodeId) -> Result<Matrix, PassError> {
    linear_weight(graph, id).ok_or_else(|| {
        PassError::node(&label(graph, id), OpKind::Linear, format!("{}: weight is not a constant matrix", ENTRY.name))
    })
}

/// For each output channel of the widened activation: the original channel it copies (None = padding).
fn channel_sources(plan: &SplitPlan) -> Vec<Option<usize>> {
    let mut sources: Vec<Option<usize>> = (0..plan.copies.len()).map(Some).collect();
    for (k, &m) in plan.copies.iter().enumerate() {
        sources.extend(std::iter::repeat_n(Some(k), m - 1));
    }
    sources.resize(plan.padded_width(), None);
    sources
}

/// Output rows of a projection laid out by `sources`, each multiplied by `scale(k)`; the bias likewise.
fn widen_rows(
    graph: &mut Graph,
    id: NodeId,
    sources: &[Option<usize>],
    scale: impl Fn(usize) -> f64,
) -> Result<(), PassError> {
    let w = constant_weight(graph, id)?;
    let k = sources.iter().flatten().max().map_or(0, |&m| m + 1);
    if w.rows < k {
        return Err(PassError::node(
            &label(graph, id),
            OpKind::Linear,
            format!("{}: {} output rows, but the activation has {k} channels", ENTRY.name, w.rows),
        ));
    }
    let mut out = Matrix { rows: sources.len(), cols: w.cols, data: vec![0.0; sources.len() * w.cols] };
    for (r, src) in sources.iter().enumerate() {
        if let Some(s) = *src {
            let f = scale(s);
            out.row_mut(r).iter_mut().zip(w.row(s)).for_each(|(o, x)| *o = x * f);
        }
    }
    let bias = linear_bias(graph, id, w.rows)
        .map(|b| sources.iter().map(|s| s.map_or(0.0, |s| b[s] * scale(s))).collect::<Vec<f64>>());
    // A bias that is not a [rows] vector could not be widened with the weight: refuse before storing.
    if bias.is_none() && graph.input(id, 2).is_some() {
        return Err(PassError::node(
            &label(graph, id),
            OpKind::Linear,
            format!("{}: bias is not a constant vector of {} values", ENTRY.name, w.rows),
        ));
    }
    store_linear(graph, ENTRY.name, id, &out, bias.as_deref(), ".split")?;
    retype(graph, id)
}

/// Recomputes a node's output types from its (widened) inputs.
fn retype(graph: &mut Graph, id: NodeId) -> Result<(), PassError> {
    let types = qcc_ir::infer::infer_node_types(graph, id)
        .map_err(|e| PassError::node(&label(graph, id), graph.node(id).op.kind, format!("{}: {e}", ENTRY.name)))?;
    for (port, ty) in types.into_iter().enumerate() {
        graph.set_value_type(Value::new(id, port as u32), ty);
    }
    Ok(())
}

fn apply(graph: &mut Graph, site: &Site, plan: &SplitPlan) -> Result<(), PassError> {
    let Producer::UpProj { up } = site.producer else { return Ok(()) };
    let swiglu = site.activation.node;
    let gate =
        graph.input(swiglu, 0).and_then(|v| crate::pattern::producer(graph, v, OpKind::Linear)).ok_or_else(|| {
            PassError::node(&label(graph, swiglu), OpKind::Swiglu, format!("{}: gate is not a linear", ENTRY.name))
        })?;
    let sources = channel_sources(plan);
    widen_rows(graph, up, &sources, |k| 1.0 / plan.copies[k] as f64)?;
    widen_rows(graph, gate, &sources, |_| 1.0)?;
    retype(graph, swiglu)?;
    for &r in &site.readers {
        let w = constant_weight(graph, r)?;
        if w.cols != site.channels {
            return Err(PassError::node(
                &label(graph, r),
                OpKind::Linear,
                format!("{}: {} input columns, but the activation has {} channels", ENTRY.name, w.cols, site.channels),
            ));
        }
        let mut out = Matrix { rows: w.rows, cols: sources.len(), data: vec![0.0; w.rows * sources.len()] };
        for n in 0..w.rows {
            let (src, dst) = (w.row(n), out.row_mut(n));
            for (d, s) in dst.iter_mut().zip(&sources) {
                *d = s.map_or(0.0, |s| src[s]);
            }
        }
        store_linear(graph, ENTRY.name, r, &out, None, ".split")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_the_dominant_channel_to_the_target() {
        // K = 64, budget 0.1 -> 6 channels; top-6 steps 40, 1.9 x5 -> target (median of top 6) 1.9.
        let mut steps = vec![1.0; 64];
        steps[3] = 40.0;
        for s in &mut steps[10..15] {
            *s = 1.9;
        }
        let plan = plan_splits(&steps, 0.1).unwrap();
        // ceil(40 / 1.9) = 22 copies would be needed; the budget allows 6 more: m = 7.
        assert_eq!(plan.copies[3], 7);
        assert_eq!(plan.added(), 6);
        assert_eq!(plan.padded_width(), 96);
    }

    #[test]
    fn water_filling_evens_out_two_outliers() {
        // target = median of top max(3, 4) = 4 steps [30, 20, 1, 1] -> 1 (index 2 of the sorted top 4).
        let mut steps = vec![1.0; 100];
        steps[0] = 20.0;
        steps[7] = 30.0;
        let plan = plan_splits(&steps, 0.03).unwrap();
        // Budget 3: the heap pops 30 (m = 2, step 15), then 20 (m = 2, step 10), then 15 (m = 3, step 10).
        assert_eq!((plan.copies[7], plan.copies[0]), (3, 2));
    }

    #[test]
    fn nothing_dominates_or_no_budget() {
        let steps: Vec<f64> = (0..64).map(|i| 1.0 + 0.01 * i as f64).collect();
        assert_eq!(plan_splits(&steps, 0.1), None);
        let mut spiky = steps.clone();
        spiky[0] = 100.0;
        assert_eq!(plan_splits(&spiky, 0.0), None);
        assert!(plan_splits(&spiky, 0.1).is_some());
    }

    #[test]
    fn sources_copy_then_pad() {
        let plan = SplitPlan { copies: vec![1, 3, 1] };
        let s = channel_sources(&plan);
        assert_eq!(s.len(), 32);
        assert_eq!(&s[..5], &[Some(0), Some(1), Some(2), Some(1), Some(1)]);
        assert!(s[5..].iter().all(Option::is_none));
    }
}

//! `quantize{w=4,a=4}`: static symmetric per-channel quantization of every `linear` with a constant weight.
//!
//! Matches: `linear(x, W[N, K] constant, bias?)`. Linears reading the same activation share one
//! `quantize(x, s)` (QSM later migrates it into x's producer, so one step vector per activation).
//! - Activation steps s_k (per input channel) from calibration: absmax_k * act_clip_k / qmax_a (absmax
//!   leaving out position 0 when `prefix > 0`; those positions are then kept in 16 bits, see
//!   `qcc_ir::OutputQuant`; in a KV-cache graph, attribute `prefix_offset` makes positions absolute). Where x comes from a grouped-query attention, channels that share a KV head
//!   share a step (QSM folds them into v_proj's output channels).
//! - Weights: the step is folded into the columns, W' = W diag(s); per-output-channel step
//!   d_n = max_k |W'_nk| * weight_clip_n / qmax_w; round to nearest (or GPTQ, `weight-rounding=gptq`).
//! - Result: `int_linear(quantize(x, s), Q(W'), d, bias)`; y = d (.) (q_x q_w^T) + b.
//!   `a=16`: weight-only (`int_linear(x, Q(W), d)`); `act=dynamic`: per-token steps at run time
//!   (`int_linear(x, Q(W), d) {act_bits}`); `format=fp8`: e4m3 activations and weights.
//!
//! Clip ratios come from the `act_clip` / `weight_clip` attributes the `clip` pass puts on each linear
//! (default 1). Preconditions: block recognition ran (linears exist); a calibration set for static
//! activations. Postcondition: no `linear` with a constant weight remains.

use crate::calibration::StatsRequest;
use crate::gptq;
use crate::pass::{OptionKind, OptionSpec, Pass, PassContext, PassError, PassOptions, PassOutcome};
use crate::registry::PassEntry;
use crate::report;
use qcc_ir::{Attr, DType, Graph, NodeId, Op, OpKind, Tensor, TensorType, Value};
use std::collections::BTreeMap;

pub const ENTRY: PassEntry = PassEntry {
    name: "quantize",
    description: "static symmetric per-channel quantization of linears (int_linear + quantize)",
    options: OPTIONS,
    build: |o: &PassOptions| Ok(Box::new(Quantize::from_options(o)?)),
};

const OPTIONS: &[OptionSpec] = &[
    OptionSpec { key: "w", kind: OptionKind::Int, default: "4", help: "weight bits (4 or 8)" },
    OptionSpec { key: "a", kind: OptionKind::Int, default: "4", help: "activation bits (4, 8; 16 = float)" },
    OptionSpec {
        key: "format",
        kind: OptionKind::Str,
        default: "int",
        help: "int, fp8 (e4m3), or auto (w=4: int4 or fp4 e2m1 weights per layer, by layer-output error)",
    },
    OptionSpec { key: "act", kind: OptionKind::Str, default: "static", help: "static or dynamic (per token)" },
    OptionSpec { key: "prefix", kind: OptionKind::Int, default: "0", help: "leading tokens kept in 16 bits" },
    OptionSpec { key: "weight-rounding", kind: OptionKind::Str, default: "rtn", help: "rtn or gptq" },
    OptionSpec {
        key: "skip",
        kind: OptionKind::Str,
        default: "",
        help: "linears to leave in float: a name substring, or lm-head (graph outputs)",
    },
];

#[derive(Clone, Debug, PartialEq)]
pub struct Scheme {
    pub w_bits: u32,
    pub a_bits: u32,
    pub fp8: bool,
    pub dynamic: bool,
    pub prefix: usize,
    pub gptq: bool,
    /// Weights on the fp4 (e2m1) grid {0, 0.5, 1, 1.5, 2, 3, 4, 6} instead of int4 (`format=auto` picks
    /// this per layer). Twice an e2m1 value is an integer in [-12, 12], stored as int8 with half the step,
    /// so fp4 layers run on the same int8 tensor cores.
    pub fp4: bool,
}

impl Scheme {
    pub fn weight_qmax(&self) -> f32 {
        if self.fp8 {
            448.0
        } else if self.fp4 {
            6.0
        } else {
            ((1u32 << (self.w_bits - 1)) - 1) as f32
        }
    }
    pub fn act_qmax(&self) -> f32 {
        if self.fp8 {
            448.0
        } else {
            ((1u32 << (self.a_bits - 1)) - 1) as f32
        }
    }
    pub fn weight_dtype(&self) -> DType {
        match (self.fp8, self.w_bits) {
            (true, _) => DType::F8E4M3,
            _ if self.fp4 => DType::I8,
            (false, 4) => DType::I4,
            _ => DType::I8,
        }
    }
    pub fn act_dtype(&self) -> DType {
        match (self.fp8, self.a_bits) {
            (true, _) => DType::F8E4M3,
            (false, 4) => DType::I4,
            _ => DType::I8,
        }
    }
    /// Whether activations get static steps (a quantize op per activation).
    pub fn static_acts(&self) -> bool {
        self.a_bits < 16 && !self.dynamic
    }
}

pub struct Quantize {
    scheme: Scheme,
    skip: String,
    /// `format=auto`: per layer, the int4 or fp4 weight grid, whichever gives the smaller layer-output
    /// error on calibration rows (the MoFQ idea).
    auto_format: bool,
}

impl Quantize {
    fn from_options(o: &PassOptions) -> Result<Quantize, PassError> {
        let bad = |key: &str, value: String, expected: &'static str| PassError::BadOptionValue {
            pass: "quantize".into(),
            key: key.into(),
            value,
            expected,
        };
        let w = o.usize("w")? as u32;
        let a = o.usize("a")? as u32;
        if !matches!(w, 4 | 8) {
            return Err(bad("w", w.to_string(), "4 or 8"));
        }
        if !matches!(a, 4 | 8 | 16) {
            return Err(bad("a", a.to_string(), "4, 8 or 16"));
        }
        let (fp8, auto) = match o.str("format")? {
            "int" => (false, false),
            "fp8" => (true, false),
            "auto" if w == 4 => (false, true),
            other => return Err(bad("format", other.into(), "int, fp8, or auto (w=4: int4 or fp4 per layer)")),
        };
        let dynamic = match o.str("act")? {
            "static" => false,
            "dynamic" => true,
            other => return Err(bad("act", other.into(), "static or dynamic")),
        };
        let gptq = match o.str("weight-rounding")? {
            "rtn" => false,
            "gptq" => true,
            other => return Err(bad("weight-rounding", other.into(), "rtn or gptq")),
        };
        let scheme = Scheme { w_bits: w, a_bits: a, fp8, dynamic, prefix: o.usize("prefix")?, gptq, fp4: false };
        Ok(Quantize { scheme, skip: o.str("skip")?.to_string(), auto_format: auto })
    }
}

/// A `linear` with a constant weight.
pub struct LinearSite {
    pub node: NodeId,
    pub x: Value,
    pub weight: Tensor,
    pub n: usize,
    pub k: usize,
}

/// Calibration rows sampled per activation for `--report`'s SQNR and output-error figures.
const REPORT_ROWS: usize = 256;

/// Diagnostics of one quantized linear (see `report.rs`): `folded` is W diag(s), `q`/`d` its grid
/// values and steps, `steps` the activation steps.
#[allow(clippy::too_many_arguments)]
fn layer_report(
    name: &str,
    folded: &[f32],
    q: &[f32],
    d: &[f32],
    (n, k): (usize, usize),
    steps: &[f32],
    act_clip: &[f32],
    weight_clip: &[f32],
    stats: Option<&crate::calibration::ChannelStats>,
    scheme: &Scheme,
) -> report::LayerReport {
    let deq_w: Vec<f32> = q.iter().enumerate().map(|(i, &v)| v * d[i / k]).collect();
    let weight_sqnr_db = report::sqnr_db(folded.iter().zip(&deq_w).map(|(&a, &b)| (a as f64, b as f64)));
    let (act_clip_mean, act_clip_min) = report::mean_min(act_clip);
    let (weight_clip_mean, weight_clip_min) = report::mean_min(weight_clip);
    let mut layer = report::LayerReport {
        name: name.to_string(),
        out_channels: n,
        in_channels: k,
        weight_bits: if scheme.fp8 { 8 } else { scheme.w_bits },
        act_bits: scheme.a_bits,
        weight_rounding: if scheme.gptq { "gptq" } else { "rtn" }.to_string(),
        weight_format: match (scheme.fp8, scheme.fp4) {
            (true, _) => "fp8".to_string(),
            (_, true) => "fp4".to_string(),
            _ => format!("int{}", scheme.w_bits),
        },
        weight_sqnr_db,
        act_clip_mean,
        act_clip_min,
        weight_clip_mean,
        weight_clip_min,
        ..Default::default()
    };
    let Some(st) = stats else { return layer };
    let absmax = if scheme.prefix > 0 { &st.absmax_excluding_first } else { &st.absmax };
    layer.outliers_after = report::Outliers::from_absmax(absmax);
    let (Some(rows), Some(pos)) = (&st.sample_rows, &st.sample_positions) else { return layer };
    // Rows of the prefix positions stay in 16 bits: they are not part of the quantized signal.
    let keep: Vec<usize> = (0..pos.len()).filter(|&i| pos[i] as usize >= scheme.prefix).collect();
    if keep.is_empty() || st.channels != k {
        return layer;
    }
    let x: Vec<f32> = keep.iter().flat_map(|&i| rows[i * k..(i + 1) * k].iter().copied()).collect();
    let static_acts = scheme.static_acts();
    let qmax = scheme.act_qmax();
    let xq: Vec<f32> = if static_acts {
        x.iter()
            .enumerate()
            .map(|(i, &v)| (v / steps[i % k]).round_ties_even().clamp(-qmax - 1.0, qmax) * steps[i % k])
            .collect()
    } else {
        x.clone()
    };
    if static_acts {
        layer.act_sqnr_db = Some(report::sqnr_db(x.iter().zip(&xq).map(|(&a, &b)| (a as f64, b as f64))));
    }
    // Float: x W^T with W = W' diag(s)^-1. Quantized: round(x/s) deq(Q(W'))^T = deq(Q(x)) (deq(Q(W')) diag(s)^-1)^T.
    let unfold = |w: &[f32]| -> Vec<f32> { w.iter().enumerate().map(|(i, &v)| v / steps[i % k]).collect() };
    let r = keep.len();
    let (mut y, mut yq) = (vec![0f32; r * n], vec![0f32; r * n]);
    crate::clip::gemm_nt(&x, &unfold(folded), &mut y, r, k, n);
    crate::clip::gemm_nt(&xq, &unfold(&deq_w), &mut yq, r, k, n);
    let num: f64 = y.iter().zip(&yq).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum();
    let den: f64 = y.iter().map(|&a| (a as f64).powi(2)).sum();
    layer.calibration_rows = r;
    layer.output_rel_error = Some(if den > 0.0 { (num / den).sqrt() } else { 0.0 });
    layer
}

/// ||X (W' - deq(Q))^T||^2 over calibration rows `x` (`[r x k]`, folded domain): the output error the
/// weight rounding alone adds.
fn weight_output_error(x: &[f32], folded: &[f32], q: &[f32], d: &[f32], n: usize, k: usize) -> f64 {
    let diff: Vec<f32> = folded.iter().zip(q).enumerate().map(|(i, (&w, &g))| w - g * d[i / k]).collect();
    let r = x.len() / k;
    let mut e = vec![0f32; r * n];
    crate::clip::gemm_nt(x, &diff, &mut e, r, k, n);
    e.iter().map(|&v| (v as f64) * (v as f64)).sum()
}

/// Every quantizable linear, grouped by the activation it reads (in topological order).
pub fn linear_groups(graph: &Graph, skip: &str) -> Result<Vec<(Value, Vec<LinearSite>)>, PassError> {
    let mut groups: BTreeMap<Value, Vec<LinearSite>> = BTreeMap::new();
    let mut order = Vec::new();
    for id in graph.topo_order()? {
        let node = graph.node(id);
        if node.op.kind != OpKind::Linear || node.op.output_quant().is_some() {
            continue;
        }
        // `skip=lm-head`: the linears whose result is a graph output (the LM head, kept at 8 bits by -O w4a4).
        let is_output = graph.graph_outputs().iter().any(|o| o.value == Value::new(id, 0));
        if (skip == "lm-head" && is_output) || (!skip.is_empty() && node.outputs[0].name.contains(skip)) {
            continue;
        }
        let (Some(x), Some(w)) = (graph.input(id, 0), graph.input(id, 1)) else { continue };
        let Some(weight) = graph.constant(w) else { continue };
        if weight.dims.len() != 2 || !graph.value_type(x).dtype.is_float() {
            continue;
        }
        let (n, k) = (weight.dims[0], weight.dims[1]);
        if !groups.contains_key(&x) {
            order.push(x);
        }
        groups.entry(x).or_default().push(LinearSite { node: id, x, weight: weight.clone(), n, k });
    }
    Ok(order.into_iter().filter_map(|x| groups.remove(&x).map(|g| (x, g))).collect())
}

/// Channel groups that must share one activation step: `x` reached from a grouped-query attention
/// through transpose/reshape (channel = head * D + d; heads sharing a KV head share steps).
/// Returns, per channel, its group's representative channel.
pub fn shared_step_groups(graph: &Graph, x: Value, k: usize) -> Vec<usize> {
    let identity: Vec<usize> = (0..k).collect();
    let Some(attn) = attention_behind(graph, x) else { return identity };
    let (Some(q), Some(kv)) = (graph.input(attn, 0), graph.input(attn, 1)) else { return identity };
    // Batch and sequence may be symbolic; heads and head size are what matter.
    let dim = |v: Value, axis: usize| {
        let shape = graph.value_type(v).shape.as_ref()?;
        if shape.rank() != 4 {
            return None;
        }
        shape.dims()[axis].known().map(|d| d as usize)
    };
    let (Some(hq), Some(hkv), Some(d)) = (dim(q, 1), dim(kv, 1), dim(q, 3)) else { return identity };
    if hkv == 0 || !hq.is_multiple_of(hkv) || hq * d != k {
        return identity;
    }
    let group = hq / hkv;
    (0..k)
        .map(|c| {
            let (h, dd) = (c / d, c % d);
            (h / group) * group * d + dd
        })
        .collect()
}

/// The attention whose output reaches `x` through transpose / reshape only.
pub fn attention_behind(graph: &Graph, x: Value) -> Option<NodeId> {
    let mut v = x;
    for _ in 0..4 {
        let node = graph.node(v.node);
        match node.op.kind {
            OpKind::Attention => return Some(v.node),
            OpKind::Transpose | OpKind::Reshape => v = graph.input(v.node, 0)?,
            _ => return None,
        }
    }
    None
}

/// Clip-ratio attribute of a linear: a per-channel list, a single value, or 1.
pub fn clip_ratios(graph: &Graph, id: NodeId, attr: &str, len: usize) -> Vec<f32> {
    match graph.node(id).op.attr(attr) {
        Some(Attr::Floats(v)) if v.len() == len => v.clone(),
        Some(Attr::Floats(v)) if v.len() == 1 => vec![v[0]; len],
        Some(Attr::Float(r)) => vec![*r; len],
        _ => vec![1.0; len],
    }
}

/// Static activation steps for one activation: absmax (without position 0 when `prefix > 0`) times the
/// clip ratio, divided by qmax, with GQA-shared channels taking the group maximum.
pub fn activation_steps(absmax: &[f32], clip: &[f32], groups: &[usize], qmax: f32) -> Vec<f32> {
    let k = absmax.len();
    let mut range: Vec<f32> = (0..k).map(|c| absmax[c] * clip[c]).collect();
    let mut group_max = vec![0f32; k];
    for c in 0..k {
        group_max[groups[c]] = group_max[groups[c]].max(range[c]);
    }
    for c in 0..k {
        range[c] = group_max[groups[c]];
    }
    range.iter().map(|r| (r / qmax).max(1e-8)).collect()
}

/// Round-to-nearest per-output-channel quantization of `w` (`[n x k]` row-major): returns the integer
/// (or f8-grid) values as f32 and the steps d_n.
pub fn quantize_weight_rtn(w: &[f32], n: usize, k: usize, clip: &[f32], scheme: &Scheme) -> (Vec<f32>, Vec<f32>) {
    let qmax = scheme.weight_qmax();
    let mut q = vec![0f32; n * k];
    let mut steps = vec![0f32; n];
    for r in 0..n {
        let row = &w[r * k..(r + 1) * k];
        let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = (amax * clip[r] / qmax).max(1e-12);
        steps[r] = d;
        for (o, &v) in q[r * k..(r + 1) * k].iter_mut().zip(row) {
            *o = round_to_grid(v / d, scheme);
        }
    }
    (q, steps)
}

/// One value rounded to the weight grid (int: round half to even and clamp; fp8: e4m3 rounding).
#[inline]
pub fn round_to_grid(v: f32, scheme: &Scheme) -> f32 {
    if scheme.fp4 || scheme.fp8 {
        return round_to_float_grid(v, scheme);
    }
    let qmax = scheme.weight_qmax();
    round_clamped(v, -qmax - 1.0, qmax)
}

/// The fp4 / fp8 cases of [`round_to_grid`], kept out of line so the integer case inlines.
#[inline(never)]
fn round_to_float_grid(v: f32, scheme: &Scheme) -> f32 {
    if scheme.fp4 {
        round_to_e2m1(v)
    } else {
        qcc_ir::f8e4m3_to_f32(qcc_ir::f32_to_f8e4m3(v.clamp(-448.0, 448.0)))
    }
}

/// `v.round_ties_even().clamp(lo, hi)` for integer bounds of magnitude below 2^22, without a libm call
/// (the default x86-64 target has no rounding instruction, and `rintf` dominated the clip search):
/// adding and subtracting 1.5 * 2^23 rounds to the nearest integer, ties to even, in the default
/// floating-point rounding mode. Equal in value (a -0.0 may come out as 0.0); NaN stays NaN.
#[inline]
pub fn round_clamped(v: f32, lo: f32, hi: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v.clamp(lo, hi) + MAGIC) - MAGIC
}

/// The e2m1 values, non-negative half; ties go to the even code (the one with a zero mantissa bit).
const E2M1: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// Nearest fp4 (e2m1) value, clamped to +-6.
pub fn round_to_e2m1(v: f32) -> f32 {
    let a = v.abs().min(6.0);
    let mut best = 0usize;
    for (i, &g) in E2M1.iter().enumerate().skip(1) {
        let (d, db) = ((a - g).abs(), (a - E2M1[best]).abs());
        if d < db || (d == db && i % 2 == 0) {
            best = i;
        }
    }
    E2M1[best].copysign(v)
}

/// Grid values as a tensor of the scheme's weight dtype.
pub fn grid_tensor(values: &[f32], dims: Vec<usize>, dtype: DType) -> Tensor {
    match dtype {
        DType::F8E4M3 => {
            let bytes: Vec<u8> = values.iter().map(|&v| qcc_ir::f32_to_f8e4m3(v)).collect();
            Tensor::from_bytes(DType::F8E4M3, dims, bytes.into()).expect("length matches dims")
        }
        DType::I4 => {
            let bytes = qcc_ir::pack_nibbles(values.iter().map(|&v| v as i64));
            Tensor::from_bytes(DType::I4, dims, bytes.into()).expect("length matches dims")
        }
        _ => {
            let v: Vec<i8> = values.iter().map(|&v| v as i8).collect();
            Tensor::from_slice(dims, &v)
        }
    }
}

/// Groups whose steps and GPTQ factors are prepared together (in parallel).
const PREPARE_WINDOW: usize = 8;

/// A group's activation steps (ones without static activations) and, for GPTQ, the factor of its
/// folded Hessian.
fn prepare(
    graph: &Graph,
    x: Value,
    sites: &[LinearSite],
    stats: Option<&crate::calibration::ChannelStats>,
    scheme: &Scheme,
) -> Result<(Vec<f32>, Option<gptq::Factor>), PassError> {
    let k = sites[0].k;
    let steps: Vec<f32> = match (stats, scheme.static_acts()) {
        (Some(s), true) => {
            if s.channels != k {
                return Err(PassError::Other(format!(
                    "activation '{}' has {} channels, its linears read {k}",
                    graph.value_name(x),
                    s.channels
                )));
            }
            let absmax = if scheme.prefix > 0 { &s.absmax_excluding_first } else { &s.absmax };
            let clip = clip_ratios(graph, sites[0].node, "act_clip", k);
            activation_steps(absmax, &clip, &shared_step_groups(graph, x, k), scheme.act_qmax())
        }
        _ => vec![1.0; k],
    };
    let hessian = stats.and_then(|s| if scheme.prefix > 0 { s.gram_excluding_first() } else { s.gram_f64() });
    // The Hessian of the folded problem: x/s reads W diag(s), so H' = S^-1 H S^-1; one factor serves
    // every linear reading x.
    let factor = match (&hessian, scheme.gptq) {
        (Some(h), true) => {
            let hs: Vec<f64> = (0..k * k).map(|i| h[i] / (steps[i / k] as f64 * steps[i % k] as f64)).collect();
            gptq::Factor::new(&hs, k)
        }
        _ => None,
    };
    Ok((steps, factor))
}

impl Pass for Quantize {
    fn name(&self) -> &'static str {
        ENTRY.name
    }

    fn description(&self) -> &'static str {
        ENTRY.description
    }

    fn run(&self, graph: &mut Graph, ctx: &mut PassContext) -> Result<PassOutcome, PassError> {
        let scheme = &self.scheme;
        let groups = linear_groups(graph, &self.skip)?;
        if groups.is_empty() {
            return Ok(PassOutcome::unchanged());
        }
        let reporting = ctx.report_mut().is_some();
        let need_stats = scheme.static_acts() || scheme.gptq || reporting || self.auto_format;
        let stats = if need_stats {
            let request = StatsRequest {
                values: groups.iter().map(|(x, _)| *x).collect(),
                gram: scheme.gptq,
                sample_rows: if reporting || self.auto_format { REPORT_ROWS } else { 0 },
            };
            // Moved out of the cache (this pass changes the activations, so nothing reads them after).
            ctx.take_activation_stats(graph, &request)?.into_iter().map(Some).collect::<Vec<_>>()
        } else {
            vec![None; groups.len()]
        };
        let mut rewrites = 0;
        let mut fp4_layers = 0;
        // In a KV-cache graph prefix positions count from the start of the sequence, not of the chunk.
        let past_length = graph.past_length_symbol();
        let mut items = groups.into_iter().zip(stats);
        'windows: loop {
            let window: Vec<_> = items.by_ref().take(PREPARE_WINDOW).collect();
            if window.is_empty() {
                break;
            }
            // Steps and GPTQ factors (a Cholesky factorisation and a triangular inverse each) of the
            // window's groups in parallel: they only read the graph and the statistics.
            let prepared: Vec<_> = {
                use rayon::prelude::*;
                let graph = &*graph;
                window.par_iter().map(|((x, sites), stats)| prepare(graph, *x, sites, stats.as_ref(), scheme)).collect()
            };
            for (((x, sites), stats), prepared) in window.into_iter().zip(prepared) {
                if !ctx.try_rewrite() {
                    break 'windows;
                }
                let k = sites[0].k;
                let name = graph.value_name(x).to_string();
                let (steps, factor) = prepared?;
                let qx = if scheme.static_acts() {
                    let step = graph.add_constant(&format!("{name}.act_step"), Tensor::from_slice(vec![k], &steps))?;
                    let mut op = Op::new(OpKind::Quantize).with("to", Attr::DType(scheme.act_dtype()));
                    let mut dtype = scheme.act_dtype();
                    if scheme.prefix > 0 {
                        op = op
                            .with("prefix_tokens", Attr::Int(scheme.prefix as i64))
                            .with("prefix_to", Attr::DType(DType::I16));
                        if let Some(past) = &past_length {
                            op = op.with("prefix_offset", Attr::Str(past.to_string()));
                        }
                        dtype = DType::I16;
                    }
                    let ty = TensorType { dtype, shape: graph.value_type(x).shape.clone() };
                    let q = graph.add_op(op, &[x, step], ty);
                    let qname = graph.fresh_name(&format!("{name}.q"));
                    graph.rename_value(q, &qname)?;
                    q
                } else {
                    x
                };
                // Calibration rows in the folded domain (x / s), for choosing a layer's weight format.
                let steps_ref = &steps;
                let sample_x: Option<Vec<f32>> = stats.as_ref().and_then(|st| {
                    let (rows, pos) = (st.sample_rows.as_ref()?, st.sample_positions.as_ref()?);
                    let keep: Vec<usize> = (0..pos.len()).filter(|&i| pos[i] as usize >= scheme.prefix).collect();
                    (st.channels == k && !keep.is_empty()).then(|| {
                        keep.iter().flat_map(|&i| (0..k).map(move |c| rows[i * k + c] / steps_ref[c])).collect()
                    })
                });
                for site in sites {
                    let w = site.weight.to_f32_vec().map_err(|e| {
                        PassError::node(graph.value_name(Value::new(site.node, 0)), OpKind::Linear, e.to_string())
                    })?;
                    let (n, k) = (site.n, site.k);
                    let folded: Vec<f32> = (0..n * k).map(|i| w[i] * steps[i % k]).collect();
                    let clip = clip_ratios(graph, site.node, "weight_clip", n);
                    let round = |scheme: &Scheme| match &factor {
                        Some(f) => gptq::quantize_with(&folded, n, k, f, &clip, scheme),
                        None => quantize_weight_rtn(&folded, n, k, &clip, scheme),
                    };
                    let (q, d) = round(scheme);
                    let fp4_scheme = Scheme { fp4: true, ..scheme.clone() };
                    let (mut q, mut d, layer_scheme) = match (&sample_x, self.auto_format) {
                        (Some(xs), true) => {
                            let (qf, df) = round(&fp4_scheme);
                            if weight_output_error(xs, &folded, &qf, &df, n, k)
                                < weight_output_error(xs, &folded, &q, &d, n, k)
                            {
                                fp4_layers += 1;
                                (qf, df, &fp4_scheme)
                            } else {
                                (q, d, scheme)
                            }
                        }
                        _ => (q, d, scheme),
                    };
                    let out = Value::new(site.node, 0);
                    let lname = graph.value_name(out).to_string();
                    if reporting {
                        let act_clip = clip_ratios(graph, site.node, "act_clip", k);
                        let layer = layer_report(
                            &lname,
                            &folded,
                            &q,
                            &d,
                            (n, k),
                            &steps,
                            &act_clip,
                            &clip,
                            stats.as_ref(),
                            layer_scheme,
                        );
                        if let Some(r) = ctx.report_mut() {
                            r.layers.push(layer);
                        }
                    }
                    if layer_scheme.fp4 {
                        // Twice an e2m1 value is an integer in [-12, 12]: store that, with half the step.
                        q.iter_mut().for_each(|v| *v *= 2.0);
                        d.iter_mut().for_each(|v| *v *= 0.5);
                    }
                    let qw = graph.add_constant(
                        &format!("{lname}.qweight"),
                        grid_tensor(&q, vec![n, k], layer_scheme.weight_dtype()),
                    )?;
                    let scale = graph.add_constant(&format!("{lname}.scale"), Tensor::from_slice(vec![n], &d))?;
                    let bias = graph.input(site.node, 2);
                    let mut inputs = vec![qx, qw, scale];
                    inputs.extend(bias);
                    let mut op = Op::new(OpKind::IntLinear);
                    if scheme.dynamic && scheme.a_bits < 16 {
                        op = op.with("act_bits", Attr::Int(scheme.a_bits as i64));
                    }
                    let ty = TensorType { dtype: DType::F32, shape: graph.value_type(out).shape.clone() };
                    let new = graph.add_op(op, &inputs, ty);
                    graph.replace_all_uses(out, new);
                    graph.remove_node(site.node);
                    graph.rename_value(new, &lname)?;
                    rewrites += 1;
                }
            }
        }
        if self.auto_format {
            ctx.note(format!("{rewrites} linears quantized, {fp4_layers} on the fp4 (e2m1) grid"));
        } else {
            ctx.note(format!("{rewrites} linears quantized"));
        }
        Ok(PassOutcome::rewrites(rewrites))
    }
}

#[cfg(test)]
mod format_tests {
    use super::*;

    #[test]
    fn e2m1_rounding_hits_the_grid_with_ties_to_even_codes() {
        for (v, want) in
            [(0.2, 0.0), (0.3, 0.5), (1.2, 1.0), (1.3, 1.5), (2.6, 3.0), (4.9, 4.0), (5.1, 6.0), (9.0, 6.0)]
        {
            assert_eq!(round_to_e2m1(v), want, "{v}");
            assert_eq!(round_to_e2m1(-v), -want, "{}", -v);
        }
        // Ties: 0.25 between codes 0 (0.0) and 1 (0.5) -> 0.0; 2.5 between 2.0 (code 4) and 3.0 (code 5) -> 2.0;
        // 5.0 between 4.0 (code 6) and 6.0 (code 7) -> 4.0.
        assert_eq!(round_to_e2m1(0.25), 0.0);
        assert_eq!(round_to_e2m1(2.5), 2.0);
        assert_eq!(round_to_e2m1(5.0), 4.0);
        // Twice every grid value is an integer in [-12, 12].
        assert!(E2M1.iter().all(|g| (2.0 * g).fract() == 0.0 && 2.0 * g <= 12.0));
    }
}

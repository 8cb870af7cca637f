//! Calibration: per-channel statistics of activations, collected by running the CPU executor over a
//! calibration set with an observer.
//!
//! The contract (see notes/calibration_api.md): a [`CalibrationSet`] is attached to the [`PassContext`];
//! a pass asks [`PassContext::activation_stats`] for the [`ChannelStats`] of some values of the *current*
//! graph. Collection is streaming (memory independent of the number of samples): min / max / absmax /
//! mean per channel, the same leaving out position 0 of each sequence (the attention-sink token), a
//! log-scale |x| histogram per channel (percentiles), and on request the Gram matrix X^T X (GPTQ) and a
//! fixed reservoir sample of rows (layer-output-error searches).
//!
//! Samples run through the executor [`CALIBRATION_BATCH`] at a time, stacked along the batch axis,
//! when the graph takes that (otherwise one at a time); the per-channel updates run over channel ranges
//! in parallel, and X^T X is accumulated block-triangle only (it is symmetric).
//!
//! Channel = the last axis; every other axis indexes tokens; the token's *position* is its index along
//! the second-to-last axis (so position 0 of `[B, S, K]` is the first token of each sequence).
//!
//! Results are cached per graph state (the pass manager calls [`PassContext::graph_changed`] after a
//! pass that changed the graph) and, when a [`StatsStore`] is attached, on disk keyed by the calibration
//! set, a fingerprint of the graph and the request, so repeated compiles skip the forward passes.

use crate::pass::{PassContext, PassError};
use qcc_ir::{Attr, Graph, OpKind, Tensor, Value};
use qcc_runtime::cpu::{bf16_gemm, MatmulPrecision};
use qcc_runtime::{CpuExecutor, RtTensor};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

/// Sample inputs for calibration: each sample maps graph-input names to tensors (e.g. `input_ids [1, L]`).
#[derive(Clone, Debug, Default)]
pub struct CalibrationSet {
    pub samples: Vec<Vec<(String, Tensor)>>,
    /// Identifies model + text + N + L (hash), for the on-disk cache.
    pub key: String,
}

/// Log-scale histogram bins: 8 per octave (3 mantissa bits) over |x| in [2^-16, 2^16).
const HIST_MANTISSA_BITS: u32 = 3;
const HIST_MIN_EXP_BIASED: u32 = 127 - 16;
/// Number of bins (32 octaves x 8). Values below the range land in bin 0, above it in the last bin.
pub const HIST_BINS: usize = 32 << HIST_MANTISSA_BITS;

/// Per-channel histogram of |x| on a logarithmic grid (relative bin width 2^(1/8) ~ 9%).
#[derive(Clone, Debug, PartialEq)]
pub struct ChannelHistogram {
    pub channels: usize,
    /// `[channels x HIST_BINS]` counts.
    pub counts: Vec<u32>,
}

impl ChannelHistogram {
    fn new(channels: usize) -> ChannelHistogram {
        ChannelHistogram { channels, counts: vec![0; channels * HIST_BINS] }
    }

    /// The bin of |x|: the float's exponent and top mantissa bits, offset to the grid's first octave.
    #[inline]
    fn bin(x: f32) -> usize {
        let key = (x.to_bits() & 0x7fff_ffff) >> (23 - HIST_MANTISSA_BITS);
        let first = HIST_MIN_EXP_BIASED << HIST_MANTISSA_BITS;
        (key.saturating_sub(first) as usize).min(HIST_BINS - 1)
    }

    /// Lower edge of bin `b` (bin 0 extends down to 0).
    pub fn bin_lower(b: usize) -> f32 {
        if b == 0 {
            return 0.0;
        }
        f32::from_bits(((HIST_MIN_EXP_BIASED << HIST_MANTISSA_BITS) + b as u32) << (23 - HIST_MANTISSA_BITS))
    }

    /// Upper edge of bin `b`.
    pub fn bin_upper(b: usize) -> f32 {
        f32::from_bits(((HIST_MIN_EXP_BIASED << HIST_MANTISSA_BITS) + b as u32 + 1) << (23 - HIST_MANTISSA_BITS))
    }

    /// The value below which a fraction `q` (0..=1) of channel `c`'s |x| lies, interpolated linearly
    /// inside the bin (accurate to the bin width). 0 for an empty channel.
    pub fn percentile(&self, c: usize, q: f64) -> f32 {
        let row = &self.counts[c * HIST_BINS..(c + 1) * HIST_BINS];
        let total: u64 = row.iter().map(|&n| n as u64).sum();
        if total == 0 {
            return 0.0;
        }
        let target = q.clamp(0.0, 1.0) * total as f64;
        let mut below = 0u64;
        for (b, &n) in row.iter().enumerate() {
            if n == 0 {
                continue;
            }
            if (below + n as u64) as f64 >= target {
                let frac = ((target - below as f64) / n as f64).clamp(0.0, 1.0) as f32;
                let (lo, hi) = (Self::bin_lower(b), Self::bin_upper(b));
                return lo + (hi - lo) * frac;
            }
            below += n as u64;
        }
        Self::bin_upper(HIST_BINS - 1)
    }

    /// `percentile(c, q)` for every channel.
    pub fn percentiles(&self, q: f64) -> Vec<f32> {
        (0..self.channels).map(|c| self.percentile(c, q)).collect()
    }
}

/// Per-channel statistics of one activation (channel = last axis; all other axes are tokens).
#[derive(Clone, Debug, PartialEq)]
pub struct ChannelStats {
    pub channels: usize,
    /// Rows (tokens) observed.
    pub tokens: u64,
    pub min: Vec<f32>,
    pub max: Vec<f32>,
    pub absmax: Vec<f32>,
    /// Mean over all rows.
    pub mean: Vec<f32>,
    /// Same as `absmax` / `min` / `max`, leaving out position 0 of each sequence (the attention sink).
    /// Equal to -inf/+inf/0 sentinels' neutral values (0) when every row was a position-0 row.
    pub absmax_excluding_first: Vec<f32>,
    pub min_excluding_first: Vec<f32>,
    pub max_excluding_first: Vec<f32>,
    /// Per-channel |x| histogram (all rows), for percentiles.
    pub histogram: ChannelHistogram,
    /// X^T X `[channels x channels]` row-major over all rows (only when requested), summed in f32 (the
    /// products' inputs are bf16-rounded where the CPU has AVX512-BF16): a quarter of the memory of f64
    /// matrices, and far more precise than the 1% damping GPTQ adds to the diagonal.
    pub gram: Option<Vec<f32>>,
    /// The position-0 rows `[n x channels]` as they entered `gram` (bf16-rounded when the Gram products
    /// were), so that `gram - first^T first` excludes the attention sink (with `gram`).
    pub first_rows: Option<Vec<f64>>,
    /// A fixed pseudo-random subsample of rows `[rows x channels]` (only when requested).
    pub sample_rows: Option<Vec<f32>>,
    /// The position (index along the second-to-last axis) of each sampled row.
    pub sample_positions: Option<Vec<u32>>,
}

impl ChannelStats {
    /// Number of rows in `sample_rows`.
    pub fn sample_row_count(&self) -> usize {
        match &self.sample_rows {
            Some(r) if self.channels > 0 => r.len() / self.channels,
            _ => 0,
        }
    }

    /// The position-0 rows' share of `gram`: first^T first `[channels x channels]`, if collected.
    pub fn gram_first(&self) -> Option<Vec<f64>> {
        let first = self.first_rows.as_ref()?;
        let k = self.channels;
        let mut g = vec![0.0; k * k];
        let n = first.len() / k.max(1);
        if n > 0 {
            // SAFETY: `first` is [n x k] row-major and `g` is [k x k]; the strides describe exactly that.
            unsafe {
                matrixmultiply::dgemm(
                    k,
                    n,
                    k,
                    1.0,
                    first.as_ptr(),
                    1,
                    k as isize,
                    first.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    g.as_mut_ptr(),
                    k as isize,
                    1,
                );
            }
        }
        Some(g)
    }

    /// The Gram matrix widened to f64, if collected.
    pub fn gram_f64(&self) -> Option<Vec<f64>> {
        Some(self.gram.as_ref()?.iter().map(|&v| f64::from(v)).collect())
    }

    /// The Gram matrix without the position-0 rows (`gram - first^T first`, in f64), if collected.
    pub fn gram_excluding_first(&self) -> Option<Vec<f64>> {
        let g = self.gram.as_ref()?;
        let mut f = self.gram_first()?;
        f.iter_mut().zip(g).for_each(|(f, &a)| *f = f64::from(a) - *f);
        Some(f)
    }
}

/// What to collect: statistics of `values`; optionally the Gram matrix and up to `sample_rows` rows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatsRequest {
    pub values: Vec<Value>,
    pub gram: bool,
    pub sample_rows: usize,
}

/// An on-disk (or other) store for collected statistics, keyed by an opaque string.
pub trait StatsStore: fmt::Debug + Send + Sync {
    fn load(&self, key: &str) -> Option<Vec<u8>>;
    /// Stores the statistics under `key`; `encode` streams their encoding into a writer (hundreds of MB
    /// with Gram matrices: no buffer of the whole encoding is needed).
    fn save(&self, key: &str, encode: &dyn Fn(&mut dyn std::io::Write) -> std::io::Result<()>);
}

/// The calibration state a [`PassContext`] carries.
#[derive(Debug, Default)]
pub struct CalibrationState {
    set: Option<Arc<CalibrationSet>>,
    cache: HashMap<Value, ChannelStats>,
    store: Option<Arc<dyn StatsStore>>,
    fingerprint: Option<String>,
    progress: bool,
    precision: MatmulPrecision,
    preserve_once: bool,
    /// Forward passes over the calibration set run so far (for tests and reports).
    pub collections: usize,
    /// Where the time of the collections since the last [`PassContext::take_collection_timing`] went.
    timing: Option<CollectionTiming>,
}

/// Wall time of statistics collection, split into the executor's forward passes and the statistics
/// updates (observer), for `--pass-stats` notes.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CollectionTiming {
    pub forward_s: f64,
    pub observe_s: f64,
    pub tokens: u64,
    /// Samples per executor run (1 when the graph did not take batched inputs).
    pub batch: usize,
}

impl fmt::Display for CollectionTiming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "calibration over {} tokens in batches of {}: {:.1} s forward, {:.1} s statistics",
            self.tokens, self.batch, self.forward_s, self.observe_s
        )
    }
}

impl PassContext {
    pub fn set_calibration(&mut self, set: CalibrationSet) {
        self.calibration_state_mut().set = Some(Arc::new(set));
        self.graph_changed();
    }

    pub fn calibration(&self) -> Option<&CalibrationSet> {
        self.calibration_state().set.as_deref()
    }

    /// Attaches a persistent store for statistics (the compiler's disk cache).
    pub fn set_stats_store(&mut self, store: Arc<dyn StatsStore>) {
        self.calibration_state_mut().store = Some(store);
    }

    /// Shows a progress bar on stderr while collecting (off by default; the CLI turns it on).
    pub fn set_calibration_progress(&mut self, show: bool) {
        self.calibration_state_mut().progress = show;
    }

    /// The precision of the calibration forward's `linear` products (f32 unless set; bf16 doubles the
    /// rate on CPUs with AVX512-BF16 at a relative error of about 2^-9 per operand).
    pub fn set_calibration_precision(&mut self, precision: MatmulPrecision) {
        let state = self.calibration_state_mut();
        if state.precision != precision {
            state.precision = precision;
            state.cache.clear();
        }
    }

    /// A fresh context with the same calibration set, store and progress setting (and nothing else),
    /// for measuring another graph state without disturbing this context's cache.
    pub fn fork_calibration(&self) -> PassContext {
        let mut ctx = PassContext::new();
        let state = self.calibration_state();
        let fork = ctx.calibration_state_mut();
        fork.set = state.set.clone();
        fork.store = state.store.clone();
        fork.progress = state.progress;
        fork.precision = state.precision;
        ctx
    }

    /// The time spent collecting statistics since the last call (`None` if nothing was collected).
    pub fn take_collection_timing(&mut self) -> Option<CollectionTiming> {
        self.calibration_state_mut().timing.take()
    }

    /// How many collections (full passes over the calibration set) have run.
    pub fn calibration_collections(&self) -> usize {
        self.calibration_state().collections
    }

    /// Tells the next `graph_changed` call that the change left every activation as it was (e.g. only
    /// attributes read by a later pass were added), so cached statistics stay valid.
    pub fn preserve_stats_once(&mut self) {
        self.calibration_state_mut().preserve_once = true;
    }

    /// Forgets statistics of the previous graph state.
    pub fn graph_changed(&mut self) {
        let state = self.calibration_state_mut();
        if std::mem::take(&mut state.preserve_once) {
            return;
        }
        state.cache.clear();
        state.fingerprint = None;
    }

    /// As [`PassContext::activation_stats`], but moves the statistics out of the cache instead of
    /// lending them (no copy of the Gram matrices): for the last reader of this graph state, e.g. a pass
    /// that is about to change the activations. A value requested twice gets a copy the second time.
    pub fn take_activation_stats(
        &mut self,
        graph: &Graph,
        request: &StatsRequest,
    ) -> Result<Vec<ChannelStats>, PassError> {
        self.activation_stats(graph, request)?;
        let state = self.calibration_state_mut();
        let values = &request.values;
        (0..values.len())
            .map(|i| {
                let v = &values[i];
                // Moved out at the value's last occurrence in the request, copied before it.
                let s = if values[i + 1..].contains(v) { state.cache.get(v).cloned() } else { state.cache.remove(v) };
                s.ok_or_else(|| PassError::Other(format!("statistics of {v:?} missing")))
            })
            .collect()
    }

    /// Statistics of `request.values` on the current graph, in request order. Runs the CPU executor over
    /// every calibration sample (only the part of the graph the values depend on) unless cached.
    pub fn activation_stats(&mut self, graph: &Graph, request: &StatsRequest) -> Result<Vec<&ChannelStats>, PassError> {
        let state = self.calibration_state_mut();
        let set = state.set.clone().ok_or_else(|| {
            PassError::Other("activation statistics requested but no calibration set is attached".into())
        })?;
        let satisfied = |s: &ChannelStats| {
            (!request.gram || s.gram.is_some()) && s.sample_row_count() >= request.sample_rows.min(s.tokens as usize)
        };
        let mut missing: Vec<Value> = Vec::new();
        let mut seen = HashSet::new();
        for &v in &request.values {
            if !graph.contains(v.node) || v.port as usize >= graph.node(v.node).outputs.len() {
                return Err(PassError::Other(format!("activation statistics requested for a missing value {v:?}")));
            }
            if seen.insert(v) && !state.cache.get(&v).is_some_and(satisfied) {
                missing.push(v);
            }
        }
        if !missing.is_empty() {
            let sub = StatsRequest { values: missing.clone(), gram: request.gram, sample_rows: request.sample_rows };
            let store_key = match &state.store {
                Some(_) => {
                    let fp = state.fingerprint.get_or_insert_with(|| graph_fingerprint(graph)).clone();
                    Some(store_key(&set.key, &fp, graph, &sub, state.precision))
                }
                None => None,
            };
            let loaded = match (&state.store, &store_key) {
                (Some(store), Some(key)) => store.load(key).and_then(|b| decode_stats(&b, missing.len()).ok()),
                _ => None,
            };
            let stats = match loaded {
                Some(stats) => stats,
                None => {
                    let (collected, t) = collect_stats_timed(graph, &set, &sub, state.progress, state.precision)?;
                    state.collections += 1;
                    let total = state.timing.get_or_insert_with(Default::default);
                    total.forward_s += t.forward_s;
                    total.observe_s += t.observe_s;
                    total.tokens += t.tokens;
                    total.batch = t.batch;
                    if let (Some(store), Some(key)) = (&state.store, &store_key) {
                        store.save(key, &|w| encode_stats_to(w, &collected));
                    }
                    collected
                }
            };
            for (v, s) in missing.into_iter().zip(stats) {
                state.cache.insert(v, s);
            }
        }
        let state = self.calibration_state();
        request
            .values
            .iter()
            .map(|v| state.cache.get(v).ok_or_else(|| PassError::Other(format!("statistics of {v:?} missing"))))
            .collect()
    }
}

/// Streaming accumulator for one value.
struct Accumulator {
    stats: ChannelStats,
    sum: Vec<f64>,
    sample_capacity: usize,
    rows_offered: u64,
    rng: u64,
}

/// Channels per parallel task when updating the per-channel statistics.
const CHANNEL_CHUNK: usize = 64;

/// One task's share of the per-channel statistics (a contiguous channel range).
struct ChannelSlices<'a> {
    c0: usize,
    min: &'a mut [f32],
    max: &'a mut [f32],
    absmax: &'a mut [f32],
    sum: &'a mut [f64],
    absmax_ex: &'a mut [f32],
    min_ex: &'a mut [f32],
    max_ex: &'a mut [f32],
    hist: &'a mut [u32],
}

impl ChannelSlices<'_> {
    /// Adds rows of `data` (row-major, `k` columns) to this channel range.
    fn observe(&mut self, data: &[f32], k: usize, seq: usize) {
        let len = self.min.len();
        for (r, full) in data.chunks_exact(k).enumerate() {
            let row = &full[self.c0..self.c0 + len];
            for (i, &x) in row.iter().enumerate() {
                self.min[i] = self.min[i].min(x);
                self.max[i] = self.max[i].max(x);
                self.absmax[i] = self.absmax[i].max(x.abs());
                self.sum[i] += x as f64;
            }
            if r % seq != 0 {
                for (i, &x) in row.iter().enumerate() {
                    self.absmax_ex[i] = self.absmax_ex[i].max(x.abs());
                    self.min_ex[i] = self.min_ex[i].min(x);
                    self.max_ex[i] = self.max_ex[i].max(x);
                }
            }
            for (i, &x) in row.iter().enumerate() {
                self.hist[i * HIST_BINS + ChannelHistogram::bin(x)] += 1;
            }
        }
    }
}

impl Accumulator {
    fn new(channels: usize, request: &StatsRequest, seed: u64) -> Accumulator {
        let k = channels;
        Accumulator {
            stats: ChannelStats {
                channels: k,
                tokens: 0,
                min: vec![f32::INFINITY; k],
                max: vec![f32::NEG_INFINITY; k],
                absmax: vec![0.0; k],
                mean: vec![0.0; k],
                absmax_excluding_first: vec![0.0; k],
                min_excluding_first: vec![f32::INFINITY; k],
                max_excluding_first: vec![f32::NEG_INFINITY; k],
                histogram: ChannelHistogram::new(k),
                gram: request.gram.then(|| vec![0.0; k * k]),
                first_rows: request.gram.then(Vec::new),
                sample_rows: (request.sample_rows > 0).then(Vec::new),
                sample_positions: (request.sample_rows > 0).then(Vec::new),
            },
            sum: vec![0.0; k],
            sample_capacity: request.sample_rows,
            rows_offered: 0,
            rng: seed | 1,
        }
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*: deterministic, so the same calibration set gives the same subsample.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Adds a tensor's rows. `data` is row-major with `channels` columns; `seq` is the length of the
    /// second-to-last axis (1 for vectors).
    fn observe(&mut self, data: &[f32], seq: usize) {
        use rayon::prelude::*;
        let k = self.stats.channels;
        if k == 0 {
            return;
        }
        let seq = seq.max(1);
        let rows = data.len() / k;
        let data = &data[..rows * k];
        let s = &mut self.stats;
        // Per-channel statistics, channel ranges in parallel (each range reads every row).
        let mut slices: Vec<ChannelSlices> = s
            .min
            .chunks_mut(CHANNEL_CHUNK)
            .zip(s.max.chunks_mut(CHANNEL_CHUNK))
            .zip(s.absmax.chunks_mut(CHANNEL_CHUNK))
            .zip(self.sum.chunks_mut(CHANNEL_CHUNK))
            .zip(s.absmax_excluding_first.chunks_mut(CHANNEL_CHUNK))
            .zip(s.min_excluding_first.chunks_mut(CHANNEL_CHUNK))
            .zip(s.max_excluding_first.chunks_mut(CHANNEL_CHUNK))
            .zip(s.histogram.counts.chunks_mut(CHANNEL_CHUNK * HIST_BINS))
            .enumerate()
            .map(|(i, (((((((min, max), absmax), sum), absmax_ex), min_ex), max_ex), hist))| ChannelSlices {
                c0: i * CHANNEL_CHUNK,
                min,
                max,
                absmax,
                sum,
                absmax_ex,
                min_ex,
                max_ex,
                hist,
            })
            .collect();
        let gram = s.gram.as_mut();
        let mut gram_bf16 = false;
        rayon::join(
            || slices.par_iter_mut().for_each(|sl| sl.observe(data, k, seq)),
            || {
                if let Some(g) = gram {
                    gram_bf16 = add_gram(g, data, rows, k);
                }
            },
        );
        drop(slices);
        if let Some(first) = s.first_rows.as_mut() {
            // Rounded as `add_gram` rounded them, so that `gram - first^T first` cancels the position-0
            // rows (often 100x larger than the rest) up to f32 summation error instead of leaving their
            // bf16 rounding error behind.
            let round = |v: f32| if gram_bf16 { bf16_gemm::from_bf16(bf16_gemm::to_bf16(v)) } else { v };
            for r in (0..rows).step_by(seq) {
                first.extend(data[r * k..(r + 1) * k].iter().map(|&v| f64::from(round(v))));
            }
        }
        s.tokens += rows as u64;
        if self.sample_capacity > 0 {
            for r in 0..rows {
                let t = self.rows_offered;
                self.rows_offered += 1;
                let slot = if (t as usize) < self.sample_capacity {
                    Some(t as usize)
                } else {
                    let j = (self.next_random() % (t + 1)) as usize;
                    (j < self.sample_capacity).then_some(j)
                };
                let Some(slot) = slot else { continue };
                let row = &data[r * k..(r + 1) * k];
                let pos = (r % seq) as u32;
                let (Some(rows_buf), Some(positions)) =
                    (self.stats.sample_rows.as_mut(), self.stats.sample_positions.as_mut())
                else {
                    continue;
                };
                if slot * k == rows_buf.len() {
                    rows_buf.extend_from_slice(row);
                    positions.push(pos);
                } else {
                    rows_buf[slot * k..(slot + 1) * k].copy_from_slice(row);
                    positions[slot] = pos;
                }
            }
        }
    }

    fn finish(mut self) -> ChannelStats {
        let s = &mut self.stats;
        let k = s.channels;
        if s.tokens > 0 {
            for (m, sum) in s.mean.iter_mut().zip(&self.sum) {
                *m = (sum / s.tokens as f64) as f32;
            }
        }
        for v in s.min_excluding_first.iter_mut().chain(s.max_excluding_first.iter_mut()) {
            if !v.is_finite() {
                *v = 0.0;
            }
        }
        for v in s.min.iter_mut().chain(s.max.iter_mut()) {
            if !v.is_finite() {
                *v = 0.0;
            }
        }
        // `add_gram` fills the upper triangle only.
        if let Some(g) = s.gram.as_mut() {
            mirror_upper(g, k);
        }
        self.stats
    }
}

/// Copies the upper triangle of the `[k x k]` matrix onto the lower one.
fn mirror_upper(g: &mut [f32], k: usize) {
    for i in 0..k {
        for j in 0..i {
            g[i * k + j] = g[j * k + i];
        }
    }
}

/// Channels per block of the Gram matrix: only blocks on or above the diagonal are computed.
const GRAM_BLOCK: usize = 384;
/// Rows per product (bounds the bf16 copies of the operands).
const GRAM_CHUNK_ROWS: usize = 2048;

/// Upper triangle (blocks on and above the diagonal) of g += X^T X for `rows x k` row-major X, summed
/// in f32 straight into `g`. X^T X is symmetric, so the blocks below the diagonal are skipped
/// ([`mirror_upper`] fills them once). With AVX512-BF16 the products take bf16-rounded inputs (twice the
/// f32 rate): a relative error of 2^-9 per input, averaged over thousands of rows, is far below the 1%
/// damping GPTQ adds to the diagonal. Otherwise f32 GEMMs per block row of about [`GRAM_BLOCK`]
/// channels (wide blocks: each GEMM packs its B operand again, so narrow ones would spend a quarter of
/// the time packing). Returns whether the inputs were rounded to bf16.
fn add_gram(g: &mut [f32], data: &[f32], rows: usize, k: usize) -> bool {
    if bf16_gemm::available() {
        for start in (0..rows).step_by(GRAM_CHUNK_ROWS) {
            let n = GRAM_CHUNK_ROWS.min(rows - start);
            let xt = bf16_gemm::Strided::columns(&data[start * k..(start + n) * k], n, k);
            bf16_gemm::gemm_nt(&xt, &xt, g, k, true, true);
        }
        return true;
    }
    let nb = k.div_ceil(GRAM_BLOCK).max(1);
    let bound = |b: usize| b * k / nb;
    for b in 0..nb {
        let (i0, i1) = (bound(b), bound(b + 1));
        let (m, w) = (i1 - i0, k - i0);
        let mut start = 0;
        while start < rows {
            let n = GRAM_CHUNK_ROWS.min(rows - start);
            let x = &data[start * k..(start + n) * k];
            // SAFETY: the A operand starts at column i0 of X and reads m columns of n rows (row stride k),
            // the B operand columns i0..k; both stay inside `x` ([n x k]). C is the [m x w] block of g at
            // (i0, i0), row stride k, inside g ([k x k]).
            unsafe {
                matrixmultiply::sgemm(
                    m,
                    n,
                    w,
                    1.0,
                    x.as_ptr().add(i0),
                    1,
                    k as isize,
                    x.as_ptr().add(i0),
                    k as isize,
                    1,
                    1.0,
                    g.as_mut_ptr().add(i0 * k + i0),
                    k as isize,
                    1,
                );
            }
            start += n;
        }
    }
    false
}

/// Runs the executor over every sample of `set` and collects statistics of `request.values` (in order).
/// Only the values' ancestors are executed.
pub fn collect_stats(
    graph: &Graph,
    set: &CalibrationSet,
    request: &StatsRequest,
    progress: bool,
) -> Result<Vec<ChannelStats>, PassError> {
    collect_stats_timed(graph, set, request, progress, MatmulPrecision::F32).map(|(stats, _)| stats)
}

/// [`collect_stats`], also returning where the time went.
fn collect_stats_timed(
    graph: &Graph,
    set: &CalibrationSet,
    request: &StatsRequest,
    progress: bool,
    precision: MatmulPrecision,
) -> Result<(Vec<ChannelStats>, CollectionTiming), PassError> {
    let started = std::time::Instant::now();
    let mut observe_time = std::time::Duration::ZERO;
    let mut tokens = 0u64;
    if set.samples.is_empty() {
        return Err(PassError::Other("the calibration set has no samples".into()));
    }
    let pruned = prune_to(graph, &request.values);
    let exec = CpuExecutor::new(&pruned)
        .map_err(|e| PassError::Other(format!("calibration: {e}")))?
        .with_matmul_precision(precision);
    let bar = if progress {
        let bar = indicatif::ProgressBar::new(set.samples.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("calibrating {bar:30} {pos}/{len} samples [{elapsed}<{eta}]")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    // Samples run in batches (fewer, larger products); a graph that does not take a batched input
    // (an error, or a statistic value whose leading axis is not the batch) is run again one sample at
    // a time from scratch.
    let mut batch = CALIBRATION_BATCH;
    let accs = match run_collection(graph, &exec, set, request, batch, &bar, &mut observe_time) {
        Ok(accs) => accs,
        Err(Collection::NotBatchable) => {
            bar.reset();
            observe_time = std::time::Duration::ZERO;
            batch = 1;
            run_collection(graph, &exec, set, request, 1, &bar, &mut observe_time).map_err(Collection::into_error)?
        }
        Err(e) => return Err(e.into_error()),
    };
    bar.finish_and_clear();
    if let Some(Some(a)) = accs.first() {
        tokens = a.stats.tokens;
    }
    let finish_start = std::time::Instant::now();
    let stats = accs
        .into_iter()
        .zip(&request.values)
        .map(|(a, v)| {
            a.map(Accumulator::finish).ok_or_else(|| {
                PassError::Other(format!("calibration: value '{}' was never computed", graph.value_name(*v)))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    observe_time += finish_start.elapsed();
    let total = started.elapsed();
    let timing = CollectionTiming {
        forward_s: total.saturating_sub(observe_time).as_secs_f64(),
        observe_s: observe_time.as_secs_f64(),
        tokens,
        batch,
    };
    Ok((stats, timing))
}

/// Calibration samples per executor run.
const CALIBRATION_BATCH: usize = 8;

/// Why a collection stopped.
enum Collection {
    /// The batched run does not fit the graph: run one sample at a time.
    NotBatchable,
    Failed(PassError),
}

impl Collection {
    fn into_error(self) -> PassError {
        match self {
            Collection::NotBatchable => PassError::Other("calibration: samples could not be batched".into()),
            Collection::Failed(e) => e,
        }
    }
}

/// The samples' inputs stacked along axis 0, when every sample has the same input names and each
/// input is an integer tensor with a leading axis of 1 and the same shape in every sample.
fn stack_samples(samples: &[Vec<(String, Tensor)>]) -> Option<Vec<(String, RtTensor)>> {
    let first = samples.first()?;
    first
        .iter()
        .enumerate()
        .map(|(j, (name, t0))| {
            if t0.dtype != qcc_ir::DType::I64 || t0.dims.first() != Some(&1) {
                return None;
            }
            let mut values: Vec<i64> = Vec::new();
            for s in samples {
                let (n, t) = s.get(j)?;
                if n != name || t.dtype != t0.dtype || t.dims != t0.dims {
                    return None;
                }
                values.extend(t.to_vec::<i64>().ok()?);
            }
            let mut dims = t0.dims.clone();
            dims[0] = samples.len();
            let stacked = RtTensor::from_ir_tensor(&Tensor::from_slice(dims, &values)).ok()?;
            Some((name.clone(), stacked))
        })
        .collect()
}

/// One pass over the calibration set, `batch` samples per executor run; the accumulators in request order.
fn run_collection(
    graph: &Graph,
    exec: &CpuExecutor,
    set: &CalibrationSet,
    request: &StatsRequest,
    batch: usize,
    bar: &indicatif::ProgressBar,
    observe_time: &mut std::time::Duration,
) -> Result<Vec<Option<Accumulator>>, Collection> {
    let index: HashMap<Value, usize> = request.values.iter().enumerate().map(|(i, v)| (*v, i)).collect();
    let mut accs: Vec<Option<Accumulator>> = (0..request.values.len()).map(|_| None).collect();
    for chunk in set.samples.chunks(batch) {
        let inputs: Vec<(String, RtTensor)> = if batch == 1 {
            chunk[0]
                .iter()
                .map(|(name, t)| {
                    RtTensor::from_ir_tensor(t)
                        .map(|rt| (name.clone(), rt))
                        .map_err(|e| Collection::Failed(PassError::Other(format!("calibration input '{name}': {e}"))))
                })
                .collect::<Result<_, _>>()?
        } else {
            stack_samples(chunk).ok_or(Collection::NotBatchable)?
        };
        let (names, tensors): (Vec<String>, Vec<RtTensor>) = inputs.into_iter().unzip();
        let inputs: Vec<(&str, RtTensor)> = names.iter().map(String::as_str).zip(tensors).collect();
        let b = chunk.len();
        let mut failure: Option<String> = None;
        let mut not_batchable = false;
        let mut observer = |v: Value, t: &RtTensor| {
            let Some(&i) = index.get(&v) else { return };
            if !t.dtype().is_float() {
                failure = Some(format!("value '{}' is {}, not a float activation", graph.value_name(v), t.dtype()));
                return;
            }
            let shape = t.shape();
            let rank = shape.len();
            let k = shape.last().copied().unwrap_or(1);
            // The sequence length one sample would show (position = row index modulo it).
            let seq = if batch == 1 {
                if rank >= 2 {
                    shape[rank - 2]
                } else {
                    1
                }
            } else if rank >= 3 && shape[0] == b {
                shape[rank - 2]
            } else if rank == 2 && shape[0].is_multiple_of(b) {
                shape[0] / b
            } else {
                not_batchable = true;
                return;
            };
            let acc = accs[i].get_or_insert_with(|| Accumulator::new(k, request, 0x9e37_79b9_7f4a_7c15 ^ i as u64));
            if acc.stats.channels != k {
                failure = Some(format!(
                    "value '{}' changed its channel count between samples ({} then {k})",
                    graph.value_name(v),
                    acc.stats.channels
                ));
                return;
            }
            let t0 = std::time::Instant::now();
            let a = t.to_f32();
            match a.as_slice() {
                Some(s) => acc.observe(s, seq),
                None => acc.observe(&a.iter().copied().collect::<Vec<_>>(), seq),
            }
            *observe_time += t0.elapsed();
        };
        // Graph inputs are not produced by a step, so the executor's observer never sees them.
        for (name, t) in &inputs {
            if let Some(v) = graph.value_by_name(name) {
                observer(v, t);
            }
        }
        let run = exec.run_observed(&inputs, &mut observer);
        if batch > 1 && (run.is_err() || not_batchable) {
            return Err(Collection::NotBatchable);
        }
        run.map_err(|e| Collection::Failed(PassError::Other(format!("calibration: {e}"))))?;
        if let Some(f) = failure {
            return Err(Collection::Failed(PassError::Other(format!("calibration: {f}"))));
        }
        bar.inc(b as u64);
    }
    Ok(accs)
}

/// A copy of `graph` whose outputs are `values` and which keeps only their ancestors (node ids are
/// preserved, so the values stay valid). Constants are shared, not copied.
pub fn prune_to(graph: &Graph, values: &[Value]) -> Graph {
    let mut g = graph.clone();
    let mut live = HashSet::new();
    let mut stack: Vec<_> = values.iter().map(|v| v.node).collect();
    while let Some(id) = stack.pop() {
        if live.insert(id) {
            stack.extend(g.inputs(id).into_iter().flatten().map(|v| v.node));
        }
    }
    let outputs = g.graph_outputs_mut();
    outputs.clear();
    for v in values {
        let name = graph.value_name(*v).to_string();
        g.add_output(name, *v);
    }
    let dead: Vec<_> = g.node_ids().filter(|id| !live.contains(id) && g.node(*id).op.kind != OpKind::Input).collect();
    for id in dead {
        g.remove_node(id);
    }
    g
}

/// A content fingerprint of the graph: ops, attributes, connectivity (by topological position) and
/// constant digests. Two graphs with the same fingerprint compute the same function.
pub fn graph_fingerprint(graph: &Graph) -> String {
    let mut h = blake3::Hasher::new();
    let order = graph.topo_order().unwrap_or_else(|_| graph.node_ids().collect());
    let position: HashMap<_, _> = order.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    for id in &order {
        let node = graph.node(*id);
        h.update(node.op.kind.name().as_bytes());
        for (k, a) in &node.op.attrs {
            h.update(k.as_bytes());
            match a {
                Attr::Tensor(t) => h.update(format!("{}{:?}{}", t.dtype, t.dims, t.digest()).as_bytes()),
                other => h.update(format!("{other:?}").as_bytes()),
            };
        }
        for o in &node.outputs {
            h.update(format!("{}:{}", o.name, o.ty).as_bytes());
        }
        for v in graph.inputs(*id) {
            let text = match v {
                Some(v) => format!("<{}.{}>", position.get(&v.node).copied().unwrap_or(usize::MAX), v.port),
                None => "<->".to_string(),
            };
            h.update(text.as_bytes());
        }
        h.update(b";");
    }
    for o in graph.graph_outputs() {
        h.update(format!("out {} {}", o.name, graph.value_name(o.value)).as_bytes());
    }
    h.finalize().to_hex()[..32].to_string()
}

fn store_key(
    set_key: &str,
    fingerprint: &str,
    graph: &Graph,
    request: &StatsRequest,
    precision: MatmulPrecision,
) -> String {
    let mut h = blake3::Hasher::new();
    // v2: Gram matrices from bf16 products where the CPU has AVX512-BF16. v3: position-0 rows stored
    // instead of their Gram matrix.
    h.update(b"qcc-stats-v3;");
    if precision != MatmulPrecision::F32 {
        h.update(format!("{precision:?};").as_bytes());
    }
    h.update(set_key.as_bytes());
    h.update(fingerprint.as_bytes());
    for v in &request.values {
        h.update(graph.value_name(*v).as_bytes());
        h.update(b";");
    }
    h.update(format!("gram={};rows={}", request.gram, request.sample_rows).as_bytes());
    h.finalize().to_hex()[..32].to_string()
}

// ---- binary encoding of statistics (for the store): little-endian, length-prefixed ----

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_f32s(out: &mut Vec<u8>, v: &[f32]) {
    put_u64(out, v.len() as u64);
    put_le(out, v);
}

/// Little-endian bytes of `v` (one copy on little-endian targets; each element's bytes reversed on
/// big-endian ones).
fn put_le<T: bytemuck::Pod>(out: &mut Vec<u8>, v: &[T]) {
    let bytes: &[u8] = bytemuck::cast_slice(v);
    if cfg!(target_endian = "little") {
        out.extend_from_slice(bytes);
    } else {
        bytes.chunks_exact(std::mem::size_of::<T>()).for_each(|c| out.extend(c.iter().rev()));
    }
}

fn put_opt<T>(out: &mut Vec<u8>, v: &Option<Vec<T>>, put: impl Fn(&mut Vec<u8>, &[T])) {
    match v {
        Some(v) => {
            out.push(1);
            put(out, v);
        }
        None => out.push(0),
    }
}

/// Encodes statistics for a [`StatsStore`].
pub fn encode_stats(stats: &[ChannelStats]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_stats_to(&mut out, stats).expect("writing to a Vec does not fail");
    out
}

/// [`encode_stats`] into a writer, one value's statistics at a time.
pub fn encode_stats_to(w: &mut dyn std::io::Write, stats: &[ChannelStats]) -> std::io::Result<()> {
    let mut out = b"QCCSTAT1".to_vec();
    put_u64(&mut out, stats.len() as u64);
    w.write_all(&out)?;
    fn len<T>(v: &Option<Vec<T>>) -> usize {
        v.as_ref().map_or(0, Vec::len)
    }
    for s in stats {
        out.clear();
        // An upper bound of this value's encoding (the buffer is reused for the next one).
        out.reserve(
            128 + 7 * 4 * s.channels
                + 4 * s.histogram.counts.len()
                + 4 * len(&s.gram)
                + 8 * len(&s.first_rows)
                + 4 * len(&s.sample_rows)
                + 4 * len(&s.sample_positions),
        );
        put_u64(&mut out, s.channels as u64);
        put_u64(&mut out, s.tokens);
        for v in [
            &s.min,
            &s.max,
            &s.absmax,
            &s.mean,
            &s.absmax_excluding_first,
            &s.min_excluding_first,
            &s.max_excluding_first,
        ] {
            put_f32s(&mut out, v);
        }
        put_u64(&mut out, s.histogram.counts.len() as u64);
        put_le(&mut out, &s.histogram.counts);
        let put_f64s = |out: &mut Vec<u8>, v: &[f64]| {
            put_u64(out, v.len() as u64);
            put_le(out, v);
        };
        put_opt(&mut out, &s.gram, put_f32s);
        put_opt(&mut out, &s.first_rows, put_f64s);
        put_opt(&mut out, &s.sample_rows, put_f32s);
        put_opt(&mut out, &s.sample_positions, |out, v| {
            put_u64(out, v.len() as u64);
            put_le(out, v);
        });
        w.write_all(&out)?;
    }
    Ok(())
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or("truncated statistics")?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().map_err(|_| "bad u64")?))
    }
    fn len(&mut self, elem: usize) -> Result<usize, String> {
        let n = self.u64()? as usize;
        if n.saturating_mul(elem) > self.bytes.len() - self.at {
            return Err("statistics length out of range".into());
        }
        Ok(n)
    }
    fn vec<T>(&mut self, elem: usize, f: impl Fn(&[u8]) -> T) -> Result<Vec<T>, String> {
        let n = self.len(elem)?;
        let b = self.take(n * elem)?;
        Ok(b.chunks_exact(elem).map(f).collect())
    }
    fn f32s(&mut self) -> Result<Vec<f32>, String> {
        self.vec(4, |c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
    }
    fn f64s(&mut self) -> Result<Vec<f64>, String> {
        self.vec(8, |c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
    }
    fn flag(&mut self) -> Result<bool, String> {
        Ok(self.take(1)?[0] == 1)
    }
}

/// Decodes what [`encode_stats`] wrote; `expected` is the number of values.
pub fn decode_stats(bytes: &[u8], expected: usize) -> Result<Vec<ChannelStats>, String> {
    let mut r = Reader { bytes, at: 0 };
    if r.take(8)? != b"QCCSTAT1" {
        return Err("not a qcc statistics file".into());
    }
    let n = r.u64()? as usize;
    if n != expected {
        return Err(format!("statistics hold {n} values, expected {expected}"));
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let channels = r.u64()? as usize;
        let tokens = r.u64()?;
        let min = r.f32s()?;
        let max = r.f32s()?;
        let absmax = r.f32s()?;
        let mean = r.f32s()?;
        let absmax_excluding_first = r.f32s()?;
        let min_excluding_first = r.f32s()?;
        let max_excluding_first = r.f32s()?;
        let counts = r.vec(4, |c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))?;
        if counts.len() != channels * HIST_BINS || min.len() != channels {
            return Err("statistics sizes disagree".into());
        }
        let gram = if r.flag()? { Some(r.f32s()?) } else { None };
        let first_rows = if r.flag()? { Some(r.f64s()?) } else { None };
        let sample_rows = if r.flag()? { Some(r.f32s()?) } else { None };
        let sample_positions =
            if r.flag()? { Some(r.vec(4, |c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))?) } else { None };
        out.push(ChannelStats {
            channels,
            tokens,
            min,
            max,
            absmax,
            mean,
            absmax_excluding_first,
            min_excluding_first,
            max_excluding_first,
            histogram: ChannelHistogram { channels, counts },
            gram,
            first_rows,
            sample_rows,
            sample_positions,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use qcc_ir::{DType, Op, TensorType};

    /// x -> mul(x, 2) -> y; statistics of y against values computed by hand.
    fn doubling_graph() -> (Graph, Value) {
        let mut g = Graph::new("t");
        let x = g.add_input("x", TensorType::known(DType::F32, &[1, 3, 2])).unwrap();
        let two = g.add_constant("two", Tensor::scalar(2.0f32)).unwrap();
        let y = g.add_op(Op::new(OpKind::Mul), &[x, two], TensorType::known(DType::F32, &[1, 3, 2]));
        g.add_output("y", y);
        (g, y)
    }

    fn set(samples: &[[f32; 6]]) -> CalibrationSet {
        CalibrationSet {
            samples: samples.iter().map(|s| vec![("x".to_string(), Tensor::from_slice(vec![1, 3, 2], s))]).collect(),
            key: "test".into(),
        }
    }

    #[test]
    fn stats_match_hand_computed_values() {
        let (g, y) = doubling_graph();
        let mut ctx = PassContext::new();
        ctx.set_calibration(set(&[[100.0, -1.0, 1.0, 2.0, -3.0, 0.5], [-50.0, 4.0, 2.0, -0.25, 1.0, 1.0]]));
        let req = StatsRequest { values: vec![y], gram: true, sample_rows: 100 };
        let s = ctx.activation_stats(&g, &req).unwrap()[0].clone();
        // y rows (x2): [200,-2] [2,4] [-6,1] | [-100,8] [4,-0.5] [2,2]; rows 0 and 3 are position 0.
        assert_eq!(s.tokens, 6);
        assert_eq!(s.min, vec![-100.0, -2.0]);
        assert_eq!(s.max, vec![200.0, 8.0]);
        assert_eq!(s.absmax, vec![200.0, 8.0]);
        assert_eq!(s.absmax_excluding_first, vec![6.0, 4.0]);
        assert_eq!(s.min_excluding_first, vec![-6.0, -0.5]);
        assert_eq!(s.max_excluding_first, vec![4.0, 4.0]);
        assert!((s.mean[0] - 102.0 / 6.0).abs() < 1e-5 && (s.mean[1] - 12.5 / 6.0).abs() < 1e-5);
        let rows = [[200.0, -2.0], [2.0, 4.0], [-6.0, 1.0], [-100.0, 8.0], [4.0, -0.5], [2.0, 2.0]];
        let gram = s.gram.as_ref().unwrap();
        for i in 0..2 {
            for j in 0..2 {
                let want: f64 = rows.iter().map(|r| r[i] * r[j]).sum();
                assert!((f64::from(gram[i * 2 + j]) - want).abs() < 1e-3 * want.abs().max(1.0), "{i}{j}");
                let first: f64 = [rows[0], rows[3]].iter().map(|r| r[i] * r[j]).sum();
                assert!((s.gram_first().unwrap()[i * 2 + j] - first).abs() < 1e-6);
            }
        }
        assert_eq!(s.sample_row_count(), 6);
        assert_eq!(s.sample_positions.as_deref(), Some(&[0, 1, 2, 0, 1, 2][..]));
        // Median of |y| in channel 0 (2, 2, 4, 6, 100, 200): between 4 and 6, within a bin width.
        let p50 = s.histogram.percentile(0, 0.5);
        assert!((3.6..=6.6).contains(&p50), "{p50}");
        assert!(s.histogram.percentile(0, 1.0) >= 200.0 && s.histogram.percentile(0, 1.0) <= 200.0 * 1.1);
        // Cached: a second request runs nothing; a graph change forces a new collection.
        ctx.activation_stats(&g, &req).unwrap();
        assert_eq!(ctx.calibration_collections(), 1);
        ctx.graph_changed();
        ctx.activation_stats(&g, &req).unwrap();
        assert_eq!(ctx.calibration_collections(), 2);
    }

    #[test]
    fn batched_collection_matches_one_sample_at_a_time() {
        // ids [1, 5] -> gather(E[7, 3]) -> [1, 5, 3]: token-id samples, which the collection batches.
        let mut g = Graph::new("t");
        let dims = qcc_ir::Shape(vec![qcc_ir::Dim::sym("batch"), qcc_ir::Dim::sym("seq")]);
        let ids = g.add_input("ids", TensorType::new(DType::I64, dims)).unwrap();
        let table: Vec<f32> = (0..21).map(|i| ((i * 37) % 11) as f32 - 5.0 + 0.25 * i as f32).collect();
        let e = g.add_constant("e", Tensor::from_slice(vec![7, 3], &table)).unwrap();
        let y = g.add_op(Op::new(OpKind::Gather), &[e, ids], TensorType::known(DType::F32, &[1, 5, 3]));
        g.add_output("y", y);
        let samples: Vec<Vec<(String, Tensor)>> = (0..CALIBRATION_BATCH + 3)
            .map(|s| {
                let window: Vec<i64> = (0..5).map(|t| ((s * 3 + t * 5) % 7) as i64).collect();
                vec![("ids".to_string(), Tensor::from_slice(vec![1, 5], &window))]
            })
            .collect();
        let set = CalibrationSet { samples, key: "t".into() };
        let req = StatsRequest { values: vec![y], gram: true, sample_rows: 20 };
        let pruned = prune_to(&g, &req.values);
        let exec = CpuExecutor::new(&pruned).unwrap();
        let bar = indicatif::ProgressBar::hidden();
        let mut t = std::time::Duration::ZERO;
        let finish = |accs: Vec<Option<Accumulator>>| accs.into_iter().map(|a| a.unwrap().finish()).collect::<Vec<_>>();
        let one = finish(run_collection(&g, &exec, &set, &req, 1, &bar, &mut t).ok().unwrap());
        let batched = finish(run_collection(&g, &exec, &set, &req, CALIBRATION_BATCH, &bar, &mut t).ok().unwrap());
        // Small integers and quarters: every sum is exact, so the two agree exactly.
        assert_eq!(one, batched);
        assert_eq!(one[0].tokens, 5 * (CALIBRATION_BATCH as u64 + 3));
        // And the Gram matrices against a direct sum (position-0 rows too).
        let rows: Vec<[f32; 3]> = set
            .samples
            .iter()
            .flat_map(|s| s[0].1.to_vec::<i64>().unwrap())
            .map(|id| [table[id as usize * 3], table[id as usize * 3 + 1], table[id as usize * 3 + 2]])
            .collect();
        for i in 0..3 {
            for j in 0..3 {
                let want: f64 = rows.iter().map(|r| r[i] as f64 * r[j] as f64).sum();
                let first: f64 = rows.iter().step_by(5).map(|r| r[i] as f64 * r[j] as f64).sum();
                assert_eq!(f64::from(one[0].gram.as_ref().unwrap()[i * 3 + j]), want, "{i}{j}");
                assert_eq!(one[0].gram_first().unwrap()[i * 3 + j], first, "{i}{j}");
            }
        }
    }

    #[test]
    fn reservoir_keeps_the_requested_number_of_rows() {
        let (g, y) = doubling_graph();
        let samples: Vec<[f32; 6]> = (0..50).map(|i| [i as f32; 6]).collect();
        let mut ctx = PassContext::new();
        ctx.set_calibration(set(&samples));
        let s = ctx.activation_stats(&g, &StatsRequest { values: vec![y], gram: false, sample_rows: 16 }).unwrap()[0];
        assert_eq!(s.sample_row_count(), 16);
        assert_eq!(s.tokens, 150);
        // Rows come from across the set, not just the first samples.
        assert!(s.sample_rows.as_ref().unwrap().iter().any(|&v| v > 40.0));
    }

    #[test]
    fn encoding_round_trips_and_rejects_garbage() {
        let (g, y) = doubling_graph();
        let s = collect_stats(
            &g,
            &set(&[[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]),
            &StatsRequest { values: vec![y], gram: true, sample_rows: 2 },
            false,
        )
        .unwrap();
        let bytes = encode_stats(&s);
        assert_eq!(decode_stats(&bytes, 1).unwrap(), s);
        assert!(decode_stats(&bytes[..bytes.len() - 3], 1).is_err());
        assert!(decode_stats(b"garbage", 1).is_err());
        assert!(decode_stats(&bytes, 2).is_err());
    }

    #[test]
    fn missing_calibration_set_is_an_error() {
        let (g, y) = doubling_graph();
        let mut ctx = PassContext::new();
        let err = ctx.activation_stats(&g, &StatsRequest { values: vec![y], ..Default::default() }).unwrap_err();
        assert!(err.to_string().contains("no calibration set"), "{err}");
    }

    #[test]
    fn histogram_bins_are_monotonic_and_cover_the_value() {
        for &x in &[1e-6f32, 0.01, 0.5, 1.0, 3.7, 1000.0, 60000.0] {
            let b = ChannelHistogram::bin(x);
            assert!(ChannelHistogram::bin_lower(b) <= x && (x < ChannelHistogram::bin_upper(b) || b == HIST_BINS - 1));
        }
    }
}

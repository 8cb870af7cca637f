//! The quantization report (`qcc compile --report report.json`): per linear layer, how much signal its
//! weights and activations kept, the layer-output error, the clip ratios chosen, and the outlier
//! channels before and after the equivalence transforms. `quantize` fills it when the pass context has
//! a report enabled; the compiler adds the "before" outliers measured on the untransformed graph.

use serde::{Deserialize, Serialize};

/// Version of the JSON layout, checked by `qcc report`.
pub const REPORT_VERSION: u32 = 1;

/// How many outlier channels each layer lists.
pub const TOP_CHANNELS: usize = 5;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct QuantReport {
    pub version: u32,
    pub model: String,
    pub pipeline: String,
    pub layers: Vec<LayerReport>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct LayerReport {
    /// The linear's output value name (stable from import to the compiled graph).
    pub name: String,
    pub out_channels: usize,
    pub in_channels: usize,
    pub weight_bits: u32,
    /// 16 for float activations; otherwise the static (or dynamic) activation bits.
    pub act_bits: u32,
    pub weight_rounding: String,
    /// int4, int8, fp4 (e2m1, `format=auto`) or fp8.
    #[serde(default)]
    pub weight_format: String,
    /// 10 log10(||W'||^2 / ||W' - deq(Q(W'))||^2) of the step-folded weight W' = W diag(s).
    pub weight_sqnr_db: f64,
    /// Same for the activations on calibration rows (None when activations stay float).
    pub act_sqnr_db: Option<f64>,
    /// ||X W^T - deq(Q(X)) deq(Q(W'))^T|| / ||X W^T|| on calibration rows: the error this layer adds.
    pub output_rel_error: Option<f64>,
    pub calibration_rows: usize,
    pub act_clip_mean: f32,
    pub act_clip_min: f32,
    pub weight_clip_mean: f32,
    pub weight_clip_min: f32,
    /// Largest-range input channels of the graph as imported (before smoothing/rotation/...).
    pub outliers_before: Option<Outliers>,
    /// The same, on the activation `quantize` actually rounds (after the transforms).
    pub outliers_after: Outliers,
}

/// The largest per-channel ranges of one activation.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Outliers {
    /// (channel, absmax), largest first.
    pub top: Vec<(usize, f32)>,
    /// Largest channel range over the median channel range: how much one step has to cover.
    pub max_over_median: f32,
}

impl Outliers {
    pub fn from_absmax(absmax: &[f32]) -> Outliers {
        let mut order: Vec<usize> = (0..absmax.len()).collect();
        order.sort_by(|&a, &b| absmax[b].total_cmp(&absmax[a]));
        let top = order.iter().take(TOP_CHANNELS).map(|&c| (c, absmax[c])).collect();
        let mut sorted = absmax.to_vec();
        sorted.sort_by(|a, b| a.total_cmp(b));
        let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
        let max = sorted.last().copied().unwrap_or(0.0);
        Outliers { top, max_over_median: if median > 0.0 { max / median } else { 0.0 } }
    }
}

/// Signal-to-quantization-noise ratio in dB; infinite when the error is zero.
pub fn sqnr_db(signal: impl Iterator<Item = (f64, f64)>) -> f64 {
    let (mut s, mut e) = (0.0f64, 0.0f64);
    for (x, xq) in signal {
        s += x * x;
        e += (x - xq) * (x - xq);
    }
    if e == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (s / e).log10()
    }
}

pub fn mean_min(v: &[f32]) -> (f32, f32) {
    if v.is_empty() {
        return (1.0, 1.0);
    }
    let mean = v.iter().sum::<f32>() / v.len() as f32;
    (mean, v.iter().copied().fold(f32::INFINITY, f32::min))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outliers_rank_channels_and_measure_spread() {
        let o = Outliers::from_absmax(&[1.0, 50.0, 2.0, 1.0, 3.0, 1.0, 10.0]);
        assert_eq!(o.top[0], (1, 50.0));
        assert_eq!(o.top[1], (6, 10.0));
        assert_eq!(o.top.len(), TOP_CHANNELS);
        // median of [1,1,1,2,3,10,50] is 2.
        assert!((o.max_over_median - 25.0).abs() < 1e-6);
    }

    #[test]
    fn sqnr_matches_the_definition() {
        // signal power 1 + 4 = 5, noise 0.01 + 0.04 = 0.05 -> 20 dB.
        let v = sqnr_db([(1.0, 1.1), (2.0, 1.8)].into_iter());
        assert!((v - 20.0).abs() < 1e-9, "{v}");
        assert!(sqnr_db([(1.0, 1.0)].into_iter()).is_infinite());
    }
}

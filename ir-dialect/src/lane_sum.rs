//! One summation order for row reductions that the CPU executor and the generated GPU kernels
//! share, so that both give the same bits while the GPU sums a row with a whole warp.

/// Lanes of the order: a CUDA warp.
pub const LANES: usize = 32;

/// The f64 sum of `values` in lane order: lane l adds values l, l + 32, l + 64, ... in order
/// starting from 0.0, then the lanes are combined as a butterfly, `lane[l] + lane[l + w]` for
/// w = 16, 8, 4, 2, 1 (a warp's `shfl.xor` tree).
pub fn lane_sum(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut lanes = [0f64; LANES];
    let mut l = 0;
    for v in values {
        lanes[l] += v;
        l = (l + 1) % LANES;
    }
    let mut w = LANES / 2;
    while w > 0 {
        for l in 0..w {
            lanes[l] += lanes[l + w];
        }
        w /= 2;
    }
    lanes[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_sum_is_exact_on_integers_and_follows_the_butterfly_order() {
        assert_eq!(lane_sum((1..=1000).map(f64::from)), 500_500.0);
        assert_eq!(lane_sum(std::iter::empty()), 0.0);
        // A reference butterfly written out as the GPU runs it: lane l takes lane l ^ w each step.
        let values: Vec<f64> = (0..777).map(|i| ((i * 7919) % 1000) as f64 * 1e-3 + 1.0 / (i + 1) as f64).collect();
        let mut lanes = [0f64; LANES];
        for (i, v) in values.iter().enumerate() {
            lanes[i % LANES] += v;
        }
        for w in [16, 8, 4, 2, 1] {
            let before = lanes;
            for (l, lane) in lanes.iter_mut().enumerate() {
                *lane = before[l] + before[l ^ w];
            }
        }
        assert!(lanes.iter().all(|&x| x.to_bits() == lanes[0].to_bits()));
        assert_eq!(lane_sum(values.iter().copied()).to_bits(), lanes[0].to_bits());
    }
}

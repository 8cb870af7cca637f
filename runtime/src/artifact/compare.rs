//! Agreement of two tensors (GPU against the CPU executor's reference): the figures the GPU check
//! reports. Integer tensors must agree exactly; float tensors are judged by relative error.

use std::fmt;

use crate::RtTensor;

/// How far `actual` is from `reference`.
#[derive(Debug, Clone, PartialEq)]
pub struct Agreement {
    pub elements: usize,
    /// Elements that differ at all (bitwise-equal values count as equal; NaN never equals).
    pub differing: usize,
    /// Non-finite values in `actual` where `reference` is finite.
    pub non_finite: usize,
    pub max_abs: f64,
    /// max |a - r| / max |r|.
    pub max_rel: f64,
    /// ||a - r||_2 / ||r||_2.
    pub norm_rel: f64,
    pub integer: bool,
}

impl Agreement {
    /// Exact for integer tensors; for floats max_rel <= `tolerance`, and no NaN/inf appeared.
    pub fn passes(&self, tolerance: f64) -> bool {
        self.non_finite == 0 && if self.integer { self.differing == 0 } else { self.max_rel <= tolerance }
    }
}

impl fmt::Display for Agreement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} elements, {} differ, {} non-finite, max abs {:.3e}, max rel {:.3e}, norm rel {:.3e}",
            self.elements, self.differing, self.non_finite, self.max_abs, self.max_rel, self.norm_rel
        )
    }
}

/// Compares two tensors of one shape; `None` when the shapes differ.
pub fn agreement(actual: &RtTensor, reference: &RtTensor) -> Option<Agreement> {
    if actual.shape() != reference.shape() {
        return None;
    }
    Some(agreement_of_values(&actual.to_f64_vec(), &reference.to_f64_vec(), !reference.dtype().is_float()))
}

/// [`agreement`] over flat values (same length; extra values of either side are ignored).
pub fn agreement_of_values(a: &[f64], r: &[f64], integer: bool) -> Agreement {
    let mut out = Agreement {
        elements: r.len(),
        differing: 0,
        non_finite: 0,
        max_abs: 0.0,
        max_rel: 0.0,
        norm_rel: 0.0,
        integer,
    };
    let (mut diff2, mut ref2, mut ref_max) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(r) {
        if x.to_bits() != y.to_bits() && x != y {
            out.differing += 1;
        }
        if !x.is_finite() && y.is_finite() {
            out.non_finite += 1;
            continue;
        }
        if x.is_finite() && y.is_finite() {
            let d = (x - y).abs();
            out.max_abs = out.max_abs.max(d);
            diff2 += d * d;
            ref2 += y * y;
            ref_max = ref_max.max(y.abs());
        }
    }
    out.max_rel = if ref_max > 0.0 { out.max_abs / ref_max } else { out.max_abs };
    out.norm_rel = if ref2 > 0.0 { (diff2 / ref2).sqrt() } else { diff2.sqrt() };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_match_hand_computation() {
        let r = RtTensor::from_vec(&[4], vec![1.0f32, -2.0, 4.0, 0.0]).unwrap();
        let a = RtTensor::from_vec(&[4], vec![1.0f32, -2.5, 4.0, 0.1]).unwrap();
        let g = agreement(&a, &r).unwrap();
        assert_eq!(g.differing, 2);
        assert!((g.max_abs - 0.5).abs() < 1e-7);
        assert!((g.max_rel - 0.125).abs() < 1e-7); // 0.5 / 4
        let expect = ((0.25f64 + 0.01) / 21.0).sqrt(); // sqrt(0.5^2 + 0.1^2) / sqrt(1 + 4 + 16)
        assert!((g.norm_rel - expect).abs() < 1e-6, "{}", g.norm_rel);
        assert!(!g.passes(0.1) && g.passes(0.2));

        let ri = RtTensor::from_vec(&[3], vec![1i8, -8, 7]).unwrap();
        let ai = RtTensor::from_vec(&[3], vec![1i8, -8, 6]).unwrap();
        let gi = agreement(&ai, &ri).unwrap();
        assert!(gi.integer && gi.differing == 1 && !gi.passes(1.0));
        assert!(agreement(&ri, &ri).unwrap().passes(0.0));

        let nan = RtTensor::from_vec(&[4], vec![1.0f32, f32::NAN, 4.0, 0.0]).unwrap();
        assert!(!agreement(&nan, &r).unwrap().passes(1.0));
        assert!(agreement(&ri, &r).is_none());
    }
}

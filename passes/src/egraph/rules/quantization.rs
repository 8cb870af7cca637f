//! Quantization identities. Only exact folds: quantize(dequantize(q, s), s) = q, because for an integer q
//! of at most 16 bits and a finite, normal step s, round((q * s) / s) = q in f32 (the relative error of
//! the two roundings is below 2^-22, far less than 0.5 / 2^15). The other order,
//! dequantize(quantize(x, s), s), rounds x and is never folded.

use super::{ranked_type, var, QccRewrite};
use crate::egraph::analysis::{attrs_in, QccAnalysis, QccEGraph};
use crate::egraph::language::QccLang;
use egg::{rewrite as rw, Applier, Id, PatternAst, Subst, Symbol, Var};
use qcc_ir::{Attr, Attrs, DType};

pub fn rules() -> Vec<QccRewrite> {
    vec![
        // quantize(dequantize(q, s), s) = q for the same step, axis and integer type (qcc form).
        rw!("quantize-of-dequantize"; "(quantize ?d ?s ?a)" => { FoldRequantize { onnx: false } }),
        // QuantizeLinear(DequantizeLinear(q, s, z), s, z) = q for the same scale, zero point and axis.
        rw!("quantize-linear-of-dequantize-linear"; "(quantize_linear ?d ?s ?z ?a)" => { FoldRequantize { onnx: true } }),
    ]
}

/// Whether every step is finite and of a magnitude where q * s stays a normal f32 for |q| <= 2^16.
fn steps_are_safe(egraph: &QccEGraph, s: Id) -> bool {
    let Some(t) = &egraph[s].data.constant else { return false };
    let Ok(vals) = t.to_f32_vec() else { return false };
    !vals.is_empty() && vals.iter().all(|v| v.is_finite() && (2f32.powi(-100)..=2f32.powi(100)).contains(&v.abs()))
}

fn attr_or(attrs: &Attrs, key: &str, default: i64) -> Option<i64> {
    match attrs.get(key) {
        None => Some(default),
        Some(Attr::Int(v)) => Some(*v),
        Some(_) => None,
    }
}

struct FoldRequantize {
    onnx: bool,
}

impl FoldRequantize {
    /// The integer input `q` of a matching dequantize in class `d`, if the fold is exact.
    fn find(&self, egraph: &QccEGraph, root: Id, d: Id, s: Id, z: Option<Id>, outer_attrs: Id) -> Option<Id> {
        let root_ty = ranked_type(egraph, root)?;
        let d_ty = egraph[d].data.ty.as_ref()?;
        if !matches!(d_ty.dtype, DType::F32 | DType::F64) || !root_ty.dtype.is_int() || root_ty.dtype.bits() > 16 {
            return None;
        }
        if !steps_are_safe(egraph, s) {
            return None;
        }
        let outer = attrs_in(egraph, outer_attrs)?;
        // ONNX's default axis is 1; qcc's per-tensor form has no axis. Block quantization is not folded.
        let default_axis = if self.onnx { 1 } else { -1 };
        if attr_or(outer, "block_size", 0)? != 0 {
            return None;
        }
        let same = |a: Id, b: Id| egraph.find(a) == egraph.find(b);
        egraph[d].nodes.iter().find_map(|node| {
            let (q, s2, z2, inner) = match (node, self.onnx) {
                (QccLang::Dequantize([q, s2, a]), false) => (*q, *s2, None, *a),
                (QccLang::DequantizeLinear([q, s2, z2, a]), true) => (*q, *s2, Some(*z2), *a),
                _ => return None,
            };
            let inner = attrs_in(egraph, inner)?;
            let q_ty = egraph[q].data.ty.as_ref()?;
            let axis_ok = attr_or(inner, "axis", default_axis)? == attr_or(outer, "axis", default_axis)?;
            let zero_ok = match (z, z2) {
                (Some(a), Some(b)) => same(a, b),
                _ => true,
            };
            (same(s, s2) && zero_ok && axis_ok && attr_or(inner, "block_size", 0)? == 0 && q_ty.dtype == root_ty.dtype)
                .then_some(q)
        })
    }
}

impl Applier<QccLang, QccAnalysis> for FoldRequantize {
    fn apply_one(
        &self,
        egraph: &mut QccEGraph,
        eclass: Id,
        subst: &Subst,
        _: Option<&PatternAst<QccLang>>,
        _: Symbol,
    ) -> Vec<Id> {
        let v = |n: &str| subst.get(var(n)).copied();
        let (Some(d), Some(s), Some(a)) = (v("?d"), v("?s"), v("?a")) else { return vec![] };
        let z = if self.onnx { v("?z") } else { None };
        match self.find(egraph, eclass, d, s, z, a) {
            Some(q) => {
                if egraph.union(eclass, q) {
                    vec![eclass]
                } else {
                    vec![]
                }
            }
            None => vec![],
        }
    }

    fn vars(&self) -> Vec<Var> {
        if self.onnx {
            vec![var("?d"), var("?s"), var("?z"), var("?a")]
        } else {
            vec![var("?d"), var("?s"), var("?a")]
        }
    }
}

//! Rewrite rules by theme, each with a one-line comment, and the named condition functions they share.
//!
//! Every rule rewrites to something no worse (fewer ops, or a form the cost model prefers) and is exact:
//! it holds bit-for-bit in floating point (or, where noted, for every value the types allow).

pub mod algebraic;
pub mod constant_folding;
pub mod quantization;

use super::analysis::{QccAnalysis, QccEGraph};
use super::language::QccLang;
use egg::{Id, Rewrite, Subst, Var};
use qcc_ir::TensorType;

pub type QccRewrite = Rewrite<QccLang, QccAnalysis>;

/// All rules the `canonicalize` pass runs.
pub fn rules() -> Vec<QccRewrite> {
    let mut rules = algebraic::rules();
    rules.extend(quantization::rules());
    rules
}

pub(crate) fn var(name: &str) -> Var {
    name.parse().unwrap_or_else(|_| panic!("rule variable '{name}' is malformed"))
}

/// The class bound to `v` (every variable used in a condition is bound by its pattern).
pub(crate) fn bound(subst: &Subst, v: Var) -> Option<Id> {
    subst.get(v).copied()
}

/// The fully ranked type of a class, if known.
pub(crate) fn ranked_type(egraph: &QccEGraph, id: Id) -> Option<&TensorType> {
    egraph[id].data.ty.as_ref().filter(|t| t.shape.is_some())
}

/// Condition: `?c` is a known constant whose every element equals `value`.
pub(crate) fn is_const_all(c: &str, value: f64) -> impl Fn(&mut QccEGraph, Id, &Subst) -> bool {
    let c = var(c);
    move |egraph, _, subst| {
        bound(subst, c)
            .and_then(|id| egraph[id].data.constant.as_ref().map(|t| crate::const_eval::is_all(t, value)))
            .unwrap_or(false)
    }
}

/// Condition: the matched expression has exactly the dtype and shape of `?x` (so replacing it by `?x`
/// cannot change a type through broadcasting or promotion).
pub(crate) fn same_type_as(x: &str) -> impl Fn(&mut QccEGraph, Id, &Subst) -> bool {
    let x = var(x);
    move |egraph, root, subst| match (ranked_type(egraph, root), bound(subst, x).and_then(|id| ranked_type(egraph, id)))
    {
        (Some(a), Some(b)) => a == b && !a.shape.as_ref().is_some_and(|s| s.0.contains(&qcc_ir::Dim::Unknown)),
        _ => false,
    }
}

/// Adds `node` and unions it with `eclass`, returning the changed classes as appliers must.
pub(crate) fn add_and_union(egraph: &mut QccEGraph, eclass: Id, node: QccLang) -> Vec<Id> {
    let id = egraph.add(node);
    if egraph.union(eclass, id) {
        vec![eclass]
    } else {
        vec![]
    }
}

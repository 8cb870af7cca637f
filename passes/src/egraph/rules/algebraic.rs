//! Algebraic identities: neutral elements, involutions, transpose and reshape chains, and transposes
//! folded into matmuls.

use super::{add_and_union, bound, is_const_all, ranked_type, same_type_as, var, QccRewrite};
use crate::egraph::analysis::{attrs_in, transpose_perm, QccAnalysis, QccEGraph};
use crate::egraph::language::QccLang;
use egg::{rewrite as rw, Applier, Id, PatternAst, Subst, Symbol, Var};
use qcc_ir::{Attr, Attrs};

pub fn rules() -> Vec<QccRewrite> {
    vec![
        // x * 1 = x (exact) when broadcasting against the constant leaves x's type unchanged.
        rw!("mul-one-right"; "(mul ?x ?c ?a)" => "?x" if is_const_all("?c", 1.0) if same_type_as("?x")),
        // 1 * x = x.
        rw!("mul-one-left"; "(mul ?c ?x ?a)" => "?x" if is_const_all("?c", 1.0) if same_type_as("?x")),
        // x + 0 = x (as values: only the sign of a zero x can differ).
        rw!("add-zero-right"; "(add ?x ?c ?a)" => "?x" if is_const_all("?c", 0.0) if same_type_as("?x")),
        // 0 + x = x.
        rw!("add-zero-left"; "(add ?c ?x ?a)" => "?x" if is_const_all("?c", 0.0) if same_type_as("?x")),
        // x - 0 = x (exact, signed zeros included).
        rw!("sub-zero"; "(sub ?x ?c ?a)" => "?x" if is_const_all("?c", 0.0) if same_type_as("?x")),
        // x / 1 = x (exact).
        rw!("div-one"; "(div ?x ?c ?a)" => "?x" if is_const_all("?c", 1.0) if same_type_as("?x")),
        // -(-x) = x (exact).
        rw!("neg-neg"; "(neg (neg ?x ?a1) ?a2)" => "?x"),
        // transpose(transpose(x, p1), p2) = transpose(x, p1 o p2), or x when that is the identity.
        rw!("transpose-transpose"; "(transpose (transpose ?x ?p1) ?p2)" => { ComposeTransposes }),
        // transpose(x, identity) = x.
        rw!("transpose-identity"; "(transpose ?x ?p)" => "?x" if is_identity_perm("?x", "?p")),
        // reshape(reshape(x, s1), s2) = reshape(x, s2) when s2 is constant and copies no input dim (no 0).
        rw!("reshape-reshape"; "(reshape (reshape ?x ?s1 ?a1) ?s2 ?a2)" => "(reshape ?x ?s2 ?a2)"
            if target_copies_no_dim("?s2")),
        // reshape(x, s) = x when the result has x's exact static type.
        rw!("reshape-identity"; "(reshape ?x ?s ?a)" => "?x" if same_type_as("?x")),
        // matmul(a, transpose(b, [1,0])) = gemm(a, b, transB=1) for 2-D operands: one op instead of two.
        rw!("matmul-transposed-rhs-to-gemm"; "(matmul ?a (transpose ?b ?p) ?attrs)" => { MatMulTransposeToGemm }),
    ]
}

fn perm_in(egraph: &QccEGraph, attrs: Id, x: Id) -> Option<Vec<usize>> {
    let rank = ranked_type(egraph, x)?.shape.as_ref()?.rank();
    transpose_perm(attrs_in(egraph, attrs)?, rank)
}

/// Condition: the transpose's permutation is the identity for `?x`'s rank.
fn is_identity_perm(x: &str, p: &str) -> impl Fn(&mut QccEGraph, Id, &Subst) -> bool {
    let (x, p) = (var(x), var(p));
    move |egraph, _, subst| {
        let (Some(x), Some(p)) = (bound(subst, x), bound(subst, p)) else { return false };
        perm_in(egraph, p, x).is_some_and(|perm| perm.iter().enumerate().all(|(i, &q)| i == q))
    }
}

/// Condition: `?s` is a constant reshape target without 0 entries, so it does not read the input's dims.
fn target_copies_no_dim(s: &str) -> impl Fn(&mut QccEGraph, Id, &Subst) -> bool {
    let s = var(s);
    move |egraph, _, subst| {
        bound(subst, s)
            .and_then(|id| egraph[id].data.constant.as_ref()?.to_i64_vec().ok())
            .is_some_and(|spec| spec.iter().all(|&d| d != 0))
    }
}

fn perm_attrs(egraph: &mut QccEGraph, perm: &[usize]) -> Id {
    let mut attrs = Attrs::new();
    attrs.insert("perm".into(), Attr::Ints(perm.iter().map(|&p| p as i64).collect()));
    let r = egraph.analysis.intern_attrs(&attrs);
    egraph.add(QccLang::Attrs(r))
}

struct ComposeTransposes;

impl Applier<QccLang, QccAnalysis> for ComposeTransposes {
    fn apply_one(
        &self,
        egraph: &mut QccEGraph,
        eclass: Id,
        subst: &Subst,
        _: Option<&PatternAst<QccLang>>,
        _: Symbol,
    ) -> Vec<Id> {
        let v = |n: &str| subst.get(var(n)).copied();
        let (Some(x), Some(p1), Some(p2)) = (v("?x"), v("?p1"), v("?p2")) else { return vec![] };
        let Some(inner) = perm_in(egraph, p1, x) else { return vec![] };
        let Some(outer) = perm_in(egraph, p2, x) else { return vec![] };
        // y = transpose(x, p1): y.dim[i] = x.dim[p1[i]]; z = transpose(y, p2): z.dim[i] = x.dim[p1[p2[i]]].
        let composed: Vec<usize> = outer.iter().map(|&i| inner[i]).collect();
        if composed.iter().enumerate().all(|(i, &q)| i == q) {
            return if egraph.union(eclass, x) { vec![eclass] } else { vec![] };
        }
        let attrs = perm_attrs(egraph, &composed);
        add_and_union(egraph, eclass, QccLang::Transpose([x, attrs]))
    }

    fn vars(&self) -> Vec<Var> {
        vec![var("?x"), var("?p1"), var("?p2")]
    }
}

struct MatMulTransposeToGemm;

impl Applier<QccLang, QccAnalysis> for MatMulTransposeToGemm {
    fn apply_one(
        &self,
        egraph: &mut QccEGraph,
        eclass: Id,
        subst: &Subst,
        _: Option<&PatternAst<QccLang>>,
        _: Symbol,
    ) -> Vec<Id> {
        let v = |n: &str| subst.get(var(n)).copied();
        let (Some(a), Some(b), Some(p)) = (v("?a"), v("?b"), v("?p")) else { return vec![] };
        let rank = |id: Id| ranked_type(egraph, id).and_then(|t| t.shape.as_ref()).map(|s| s.rank());
        if rank(a) != Some(2) || rank(b) != Some(2) || perm_in(egraph, p, b) != Some(vec![1, 0]) {
            return vec![];
        }
        let mut attrs = Attrs::new();
        attrs.insert("transB".into(), Attr::Int(1));
        let r = egraph.analysis.intern_attrs(&attrs);
        let attrs = egraph.add(QccLang::Attrs(r));
        let absent = egraph.add(QccLang::Absent);
        add_and_union(egraph, eclass, QccLang::Gemm([a, b, absent, attrs]))
    }

    fn vars(&self) -> Vec<Var> {
        vec![var("?a"), var("?b"), var("?p")]
    }
}

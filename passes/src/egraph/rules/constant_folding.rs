//! Constant folding inside the e-graph: the analysis computes the value of any single-output node whose
//! inputs are known constants (small results only), and `QccAnalysis::modify` adds it as a constant leaf.
//! Values come from `const_eval`, the same evaluator `fold-constants` uses, so the two cannot disagree.

use crate::const_eval::evaluate;
use crate::egraph::analysis::QccEGraph;
use crate::egraph::language::QccLang;
use egg::Language;
use qcc_ir::{OpKind, Tensor};

/// The value of `enode` when all its inputs are known constants of at most `fold_limit` elements.
pub fn fold(egraph: &QccEGraph, enode: &QccLang) -> Option<Tensor> {
    let (op, inputs) = match enode {
        QccLang::Opaque(r, children) => {
            let info = &egraph.analysis.opaque[r.0 as usize];
            if info.num_outputs != 1 {
                return None;
            }
            (info.op.clone(), children.as_slice())
        }
        QccLang::Leaf(_) | QccLang::Absent | QccLang::Attrs(_) => return None,
        node => {
            let children = node.children();
            (egraph.analysis.op_of(egraph, node)?, &children[..children.len() - 1])
        }
    };
    if matches!(op.kind, OpKind::Input | OpKind::Constant) {
        return None;
    }
    let limit = egraph.analysis.fold_limit;
    let shape_only = matches!(op.kind, OpKind::Shape | OpKind::Size);
    let mut values = Vec::with_capacity(inputs.len());
    let mut shapes = Vec::with_capacity(inputs.len());
    for &child in inputs {
        if egraph[child].nodes.iter().any(|n| matches!(n, QccLang::Absent)) {
            values.push(None);
            shapes.push(None);
            continue;
        }
        let data = &egraph[child].data;
        shapes.push(data.ty.as_ref().and_then(|t| t.shape.as_ref()).and_then(|s| s.as_known()));
        match &data.constant {
            Some(t) if t.numel() <= limit => values.push(Some(t.clone())),
            _ if shape_only => values.push(None),
            _ => return None,
        }
    }
    let mut results = evaluate(&op, &values, &shapes).ok()??;
    if results.len() != 1 || results[0].numel() > limit {
        return None;
    }
    results.pop()
}

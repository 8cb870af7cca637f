//! `fold-norm-weights`: folds each normalisation's affine parameters into the linears it feeds, so the
//! norm itself computes a plain x / rms(x) (which commutes with a rotation of x: see `rotate`).
//!
//! Matches: `rms_norm(x, gamma, beta?)` and `layer_normalization(x, gamma, beta?)` over the last axis with
//! constant gamma/beta [D], whose output is read only by `linear`s (as their input, constant weights
//! [N, D]) and is not a graph output. q/k/v read the input norm, gate/up the post-attention norm and
//! lm_head the final norm.
//! Rewrite: W' = W diag(gamma) for every reader, b' = b + W beta (with the original W); gamma becomes a
//! constant of ones and beta (if any) zeros. Weights are computed in f64 and stored once in their dtype;
//! a weight constant shared with another reader (a tied embedding) is copied, never modified in place.
//! Near misses left alone: a norm read by anything other than a linear's input (a residual add, a graph
//! output), a non-constant gamma, a gamma that is already all ones with no beta (nothing to fold).
//! Postcondition: every matched norm has gamma = 1 (and beta = 0); the outputs are unchanged up to
//! rounding.

use crate::pattern::{is_last_axis, rank, simple_pass};
use crate::registry::PassEntry;
use crate::weights::{
    constant_vector, linear_bias, linear_readers, linear_weight, linear_weight_dims, replace_constant_input,
    replace_constant_input_with, store_linear,
};
use crate::{PassContext, PassError, PassOptions, PassOutcome};
use qcc_ir::{Graph, NodeId, OpKind, Tensor, Value};

pub const ENTRY: PassEntry = PassEntry {
    name: "fold-norm-weights",
    description: "fold rms_norm/layer_norm gamma (and beta) into the weights of the linears reading the norm",
    options: &[],
    build: |_: &PassOptions| Ok(Box::new(FoldNormWeights)),
};

pub struct FoldNormWeights;
simple_pass!(FoldNormWeights);

struct Match {
    gamma: Vec<f64>,
    beta: Option<Vec<f64>>,
    readers: Vec<NodeId>,
}

fn matcher(graph: &Graph, id: NodeId) -> Option<Match> {
    let node = graph.node(id);
    match node.op.kind {
        OpKind::RmsNorm => {}
        OpKind::LayerNormalization => {
            let x = graph.input(id, 0)?;
            if !is_last_axis(&[node.op.int("axis").unwrap_or(-1)], rank(graph, x)?) {
                return None;
            }
        }
        _ => return None,
    }
    let d = crate::pattern::dim(graph, graph.input(id, 0)?, -1)? as usize;
    let gamma = constant_vector(graph, graph.input(id, 1)?, d)?;
    let beta = match graph.input(id, 2) {
        Some(b) => Some(constant_vector(graph, b, d)?),
        None => None,
    };
    let beta = beta.filter(|b| b.iter().any(|&v| v != 0.0));
    if gamma.iter().all(|&g| g == 1.0) && beta.is_none() {
        return None;
    }
    let readers = linear_readers(graph, Value::new(id, 0))?;
    // Every reader must have K = D (a malformed graph is not ours to fix).
    readers.iter().all(|&r| linear_weight_dims(graph, r).is_some_and(|[_, k]| k == d)).then_some(Match {
        gamma,
        beta,
        readers,
    })
}

/// W diag(gamma) of an f32 weight, each product in f64 rounded once (the same values as the f64 path,
/// without widening the whole matrix: lm_head is the vocabulary-sized table).
fn scale_f32_columns(graph: &Graph, linear: NodeId, gamma: &[f64]) -> Option<Tensor> {
    let t = graph.constant(graph.input(linear, 1)?)?;
    let src = t.values::<f32>().ok()?;
    let mut scaled = Vec::with_capacity(src.len());
    for row in src.chunks_exact(gamma.len()) {
        scaled.extend(row.iter().zip(gamma).map(|(&x, &g)| (f64::from(x) * g) as f32));
    }
    Some(Tensor::from_vec(t.dims.clone(), scaled))
}

fn run(graph: &mut Graph, ctx: &mut PassContext) -> Result<PassOutcome, PassError> {
    crate::pattern::rewrite_each(graph, ctx, matcher, |g, id, m| {
        for &reader in &m.readers {
            if m.beta.is_none() {
                if let Some(scaled) = scale_f32_columns(g, reader, &m.gamma) {
                    replace_constant_input_with(g, ENTRY.name, reader, 1, scaled, ".folded")?;
                    continue;
                }
            }
            let mut w = linear_weight(g, reader).expect("checked by the matcher");
            // Only beta changes the bias (b + W beta); without one the bias constant stays as it is.
            let mut bias = if m.beta.is_some() { linear_bias(g, reader, w.rows) } else { None };
            if let Some(beta) = &m.beta {
                let b = bias.get_or_insert_with(|| vec![0.0; w.rows]);
                for (n, bn) in b.iter_mut().enumerate() {
                    *bn += w.row(n).iter().zip(beta).map(|(x, y)| x * y).sum::<f64>();
                }
            }
            let gamma = &m.gamma;
            w.map_rows(|row| row.iter_mut().zip(gamma).for_each(|(x, g)| *x *= g));
            store_linear(g, ENTRY.name, reader, &w, bias.as_deref(), ".folded")?;
        }
        let d = m.gamma.len();
        replace_constant_input(g, ENTRY.name, id, 1, vec![d], &vec![1.0; d], ".one")?;
        if m.beta.is_some() {
            replace_constant_input(g, ENTRY.name, id, 2, vec![d], &vec![0.0; d], ".zero")?;
        }
        Ok(())
    })
}

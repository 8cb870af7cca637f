//! `qsm`: quantization step migration. Every standalone `quantize(x, s)` is absorbed into the op that
//! produces x, which then emits integers itself (its output quantization, `qcc_ir::OutputQuant`):
//! - `rms_norm(x, gamma, beta?)`: gamma' = gamma / s, beta' = beta / s; the norm rounds its own output.
//! - `swiglu(gate, up)` with `up = int_linear(..)`: silu(g) * u / s = silu(g) * (u / s), so 1/s folds into
//!   up_proj's epilogue scale (and bias); swiglu rounds.
//! - `attention(q, k, v)` reached through transpose/reshape, with `v` = transpose(reshape(int_linear)):
//!   attention is linear in v, so 1/s folds into v_proj's epilogue scale (heads sharing a KV head share s,
//!   which `quantize` guarantees); attention rounds, transpose/reshape carry integers.
//! - any other op that can quantize its output (`hadamard`, `int_linear`, `linear`): the step becomes its
//!   `step` attribute (a fused quantizing epilogue).
//!
//! Dequantization already lives in `int_linear`'s per-output-channel scale (`quantize` put it there).
//! Precondition: `quantize` ran. Postcondition (checked here, an error otherwise): no `quantize` or
//! `dequantize` op remains and no `linear` with a constant weight is left.

use crate::pass::{Pass, PassContext, PassError, PassOptions, PassOutcome};
use crate::registry::PassEntry;
use qcc_ir::{Attr, Graph, NodeId, OpKind, Tensor, Value};

pub const ENTRY: PassEntry = PassEntry {
    name: "qsm",
    description: "migrate each quantize step into its producer's epilogue (no standalone quantize remains)",
    options: &[],
    build: |_: &PassOptions| Ok(Box::new(Qsm)),
};

pub struct Qsm;

/// The QSM postcondition: no quantize/dequantize op, every constant-weight linear is an `int_linear`.
pub fn check_postcondition(graph: &Graph) -> Result<(), String> {
    let mut problems = Vec::new();
    for id in graph.node_ids() {
        let node = graph.node(id);
        match node.op.kind {
            OpKind::Quantize | OpKind::Dequantize | OpKind::QuantizeLinear | OpKind::DequantizeLinear => {
                problems.push(format!("standalone {} '{}' remains", node.op.kind, node.outputs[0].name))
            }
            OpKind::Linear if graph.input(id, 1).and_then(|w| graph.constant(w)).is_some() => {
                problems.push(format!("linear '{}' is not an int_linear", node.outputs[0].name))
            }
            OpKind::IntLinear if graph.input(id, 2).is_none() => {
                problems.push(format!("int_linear '{}' has no epilogue scale", node.outputs[0].name))
            }
            _ => {}
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

fn constant_f32(graph: &Graph, v: Option<Value>) -> Option<Vec<f32>> {
    graph.constant(v?)?.to_f32_vec().ok()
}

/// Replaces input `port` of `id` by a new constant holding `values` (the old constant stays for others).
fn set_constant_input(graph: &mut Graph, id: NodeId, port: usize, values: &[f32]) -> Result<(), PassError> {
    let old = graph.input(id, port).ok_or_else(|| PassError::Other("missing constant input".into()))?;
    let name = graph.fresh_name(&format!("{}.qsm", graph.value_name(old)));
    let dims = graph.constant(old).map(|t| t.dims.clone()).unwrap_or_else(|| vec![values.len()]);
    let c = graph.add_constant(&name, Tensor::from_slice(dims, values))?;
    graph.set_input(id, port, Some(c));
    Ok(())
}

fn single_user(graph: &Graph, v: Value) -> Option<NodeId> {
    match graph.users(v).as_slice() {
        [(user, _)] => Some(*user),
        _ => None,
    }
}

/// Divides `values[c]` by `step[c]` (a scalar step broadcasts).
fn divided(values: &[f32], step: &[f32]) -> Vec<f32> {
    values.iter().enumerate().map(|(c, v)| v / step[if step.len() == 1 { 0 } else { c % step.len() }]).collect()
}

impl Qsm {
    /// Folds 1/step into an `int_linear`'s epilogue scale and bias (per output channel); `map[j]` is the
    /// step index of output channel j.
    fn fold_into_int_linear(graph: &mut Graph, lin: NodeId, step: &[f32], map: &dyn Fn(usize) -> usize) -> Option<()> {
        if graph.node(lin).op.kind != OpKind::IntLinear || graph.node(lin).op.attr("to").is_some() {
            return None;
        }
        let scale = constant_f32(graph, graph.input(lin, 2))?;
        let n = graph.constant(graph.input(lin, 1)?)?.dims.first().copied()?;
        let s_of = |j: usize| step[if step.len() == 1 { 0 } else { map(j) }];
        let scale: Vec<f32> = (0..n).map(|j| scale[if scale.len() == 1 { 0 } else { j }] / s_of(j)).collect();
        let bias = match graph.input(lin, 3) {
            Some(b) => {
                Some(constant_f32(graph, Some(b))?.iter().enumerate().map(|(j, v)| v / s_of(j)).collect::<Vec<_>>())
            }
            None => None,
        };
        set_constant_input(graph, lin, 2, &scale).ok()?;
        if let Some(b) = bias {
            set_constant_input(graph, lin, 3, &b).ok()?;
        }
        Some(())
    }

    /// Tries to absorb quantize node `qid`; returns whether it did.
    fn absorb(graph: &mut Graph, qid: NodeId) -> Result<bool, PassError> {
        let (Some(x), Some(step_v)) = (graph.input(qid, 0), graph.input(qid, 1)) else { return Ok(false) };
        let Some(step) = constant_f32(graph, Some(step_v)) else { return Ok(false) };
        let qop = graph.node(qid).op.clone();
        // Walk back through single-user transpose/reshape to the producer.
        let mut chain = Vec::new();
        let mut v = x;
        while matches!(graph.node(v.node).op.kind, OpKind::Transpose | OpKind::Reshape) && chain.len() < 4 {
            if single_user(graph, v).is_none() {
                return Ok(false);
            }
            chain.push(v.node);
            let Some(prev) = graph.input(v.node, 0) else { return Ok(false) };
            v = prev;
        }
        let producer = v.node;
        if v.port != 0 || single_user(graph, v).is_none() || graph.node(producer).op.attr("to").is_some() {
            return Ok(false);
        }
        let kind = graph.node(producer).op.kind;
        let absorbed = match kind {
            OpKind::RmsNorm if chain.is_empty() => {
                let gamma = constant_f32(graph, graph.input(producer, 1));
                let beta = match graph.input(producer, 2) {
                    Some(b) => constant_f32(graph, Some(b)).map(Some),
                    None => Some(None),
                };
                match (gamma, beta) {
                    (Some(g), Some(b)) => {
                        set_constant_input(graph, producer, 1, &divided(&g, &step))?;
                        if let Some(b) = b {
                            set_constant_input(graph, producer, 2, &divided(&b, &step))?;
                        }
                        true
                    }
                    _ => false,
                }
            }
            OpKind::Swiglu if chain.is_empty() => match graph.input(producer, 1) {
                Some(up) if single_user(graph, up).is_some() => {
                    Self::fold_into_int_linear(graph, up.node, &step, &|j| j).is_some()
                }
                _ => false,
            },
            OpKind::Attention => Self::fold_into_attention(graph, producer, &step).is_some(),
            _ => false,
        };
        let mut op = graph.node(producer).op.clone();
        if !absorbed {
            if !kind.can_quantize_output() {
                return Ok(false);
            }
            // A fused quantizing epilogue with the step as an attribute.
            op = op.with(
                "step",
                Attr::Tensor(
                    graph.constant(step_v).cloned().unwrap_or_else(|| Tensor::from_slice(vec![step.len()], &step)),
                ),
            );
        }
        for key in ["to", "prefix_tokens", "prefix_to", "prefix_offset"] {
            if let Some(a) = qop.attr(key) {
                op = op.with(key, a.clone());
            }
        }
        let out_dtype = graph.value_type(Value::new(qid, 0)).dtype;
        graph.node_mut(producer).op = op;
        for id in std::iter::once(producer).chain(chain.iter().rev().copied()) {
            let ov = Value::new(id, 0);
            let mut ty = graph.value_type(ov).clone();
            ty.dtype = out_dtype;
            graph.set_value_type(ov, ty);
        }
        let q_out = Value::new(qid, 0);
        let q_name = graph.value_name(q_out).to_string();
        graph.replace_all_uses(q_out, x);
        graph.remove_node(qid);
        if !graph.is_used(step_v) {
            graph.remove_node(step_v.node);
        }
        // Keep the quantized value's name visible on the value that now carries the integers.
        let _ = graph.rename_value(x, &q_name);
        Ok(true)
    }

    /// attention(q, k, v) with v = transpose(reshape(int_linear)): folds the output step (channel
    /// h * D + d of the attention output, heads of one KV group sharing steps) into v_proj's scale.
    fn fold_into_attention(graph: &mut Graph, attn: NodeId, step: &[f32]) -> Option<()> {
        let q = graph.input(attn, 0)?;
        let vt = graph.input(attn, 2)?;
        let hq = graph.value_type(q).shape.as_ref()?.dims().get(1)?.known()? as usize;
        let vshape = graph.value_type(vt).shape.clone()?;
        let (hkv, dv) = (vshape.dims().get(1)?.known()? as usize, vshape.dims().get(3)?.known()? as usize);
        if hkv == 0 || !hq.is_multiple_of(hkv) || (step.len() != 1 && step.len() != hq * dv) {
            return None;
        }
        let group = hq / hkv;
        // v = transpose(reshape(lin)) with single users, v channel j = kv * Dv + d.
        let mut v = vt;
        for _ in 0..2 {
            if !matches!(graph.node(v.node).op.kind, OpKind::Transpose | OpKind::Reshape)
                || single_user(graph, v).is_none()
            {
                return None;
            }
            v = graph.input(v.node, 0)?;
        }
        single_user(graph, v)?;
        // The fold is exact only if every head of a KV group has the same steps.
        if step.len() != 1 {
            for c in 0..hq * dv {
                let (h, d) = (c / dv, c % dv);
                if step[c] != step[(h / group) * group * dv + d] {
                    return None;
                }
            }
        }
        let map = move |j: usize| (j / dv) * group * dv + j % dv;
        Self::fold_into_int_linear(graph, v.node, step, &map)
    }
}

impl Pass for Qsm {
    fn name(&self) -> &'static str {
        ENTRY.name
    }

    fn description(&self) -> &'static str {
        ENTRY.description
    }

    fn run(&self, graph: &mut Graph, ctx: &mut PassContext) -> Result<PassOutcome, PassError> {
        let quantizes: Vec<NodeId> =
            graph.topo_order()?.into_iter().filter(|&id| graph.node(id).op.kind == OpKind::Quantize).collect();
        let mut rewrites = 0;
        let mut left = Vec::new();
        for id in quantizes {
            if !ctx.try_rewrite() {
                return Ok(PassOutcome::rewrites(rewrites));
            }
            if Self::absorb(graph, id)? {
                rewrites += 1;
            } else {
                left.push(graph.value_name(Value::new(id, 0)).to_string());
            }
        }
        ctx.note(format!("{rewrites} quantize steps migrated"));
        if !left.is_empty() {
            return Err(PassError::Other(format!("qsm: no producer can absorb quantize {}", left.join(", "))));
        }
        check_postcondition(graph).map_err(|e| PassError::Other(format!("qsm postcondition: {e}")))?;
        Ok(PassOutcome::rewrites(rewrites))
    }
}

//! Activation sites for the calibration-driven equivalence passes (smooth, reconstruct-dims,
//! symmetrize): an activation read only by linears, with the producer that can absorb a per-channel
//! transform of it.
//!
//! Producers recognised (the three of DESIGN.md section 4):
//!   * a norm (`rms_norm`, last-axis `layer_normalization`) with constant gamma (and beta);
//!   * `swiglu(gate_proj(x), up_proj(x))` where both projections are constant linears read only by the
//!     swiglu: channel k of the output is silu(gate_k) * up_k, linear in up_proj's row k;
//!   * attention values: o_proj's input is the attention output, linear in v (see `rotate::head_path`);
//!     channel (h, c) of it comes from KV channel (h / group, c).
//!
//! Anything else reading-only-by-linears (e.g. a `hadamard` after `rotate`) is an opaque site.

use crate::weights::linear_readers;
use qcc_ir::{Graph, NodeId, OpKind, Value};

#[derive(Clone, Debug)]
pub enum Producer {
    Norm(NodeId),
    /// up_proj (gate_proj is checked to be a constant linear read only by the swiglu).
    UpProj {
        up: NodeId,
    },
    /// Attention values: v_proj, head size, query heads per KV head.
    Values {
        v_proj: NodeId,
        head: usize,
        group: usize,
    },
    Opaque,
}

#[derive(Clone, Debug)]
pub struct Site {
    pub activation: Value,
    pub channels: usize,
    pub producer: Producer,
    pub readers: Vec<NodeId>,
}

fn single_user(graph: &Graph, v: Value) -> bool {
    graph.users(v).len() == 1 && !crate::weights::is_graph_output(graph, v)
}

/// Every site of the graph, in topological order of the activations.
pub fn find_sites(graph: &Graph) -> Result<Vec<Site>, qcc_ir::GraphError> {
    let mut sites = Vec::new();
    for id in graph.topo_order()? {
        let node = graph.node(id);
        let out = Value::new(id, 0);
        let producer = match node.op.kind {
            OpKind::RmsNorm | OpKind::LayerNormalization => {
                let last = crate::pattern::rank(graph, out)
                    .is_some_and(|r| crate::pattern::is_last_axis(&[node.op.int("axis").unwrap_or(-1)], r));
                let constant = |port| graph.input(id, port).is_none_or(|v| graph.constant(v).is_some());
                if node.op.kind == OpKind::LayerNormalization && !last || !constant(1) || !constant(2) {
                    Producer::Opaque
                } else {
                    Producer::Norm(id)
                }
            }
            OpKind::Swiglu => {
                let proj = |port| {
                    let v = graph.input(id, port)?;
                    let p = crate::pattern::producer(graph, v, OpKind::Linear)?;
                    (single_user(graph, v) && crate::weights::is_constant_linear(graph, p)).then_some(p)
                };
                match (proj(0), proj(1)) {
                    (Some(gate), Some(up)) if gate != up => Producer::UpProj { up },
                    _ => Producer::Opaque,
                }
            }
            OpKind::Attention => {
                let Some((v_proj, o_proj, head)) = crate::rotate::head_path(graph, id) else { continue };
                let (Some([v_rows, _]), Some([_, o_cols])) = (
                    crate::weights::linear_weight_dims(graph, v_proj),
                    crate::weights::linear_weight_dims(graph, o_proj),
                ) else {
                    continue;
                };
                let (hkv, hq) = (v_rows / head, o_cols / head);
                if hkv == 0 || hq % hkv != 0 {
                    continue;
                }
                let Some(x) = graph.input(o_proj, 0) else { continue };
                sites.push(Site {
                    activation: x,
                    channels: o_cols,
                    producer: Producer::Values { v_proj, head, group: hq / hkv },
                    readers: vec![o_proj],
                });
                continue;
            }
            OpKind::Hadamard => Producer::Opaque,
            _ => continue,
        };
        let Some(readers) = linear_readers(graph, out) else { continue };
        let Some(channels) = crate::pattern::dim(graph, out, -1) else { continue };
        sites.push(Site { activation: out, channels: channels as usize, producer, readers });
    }
    Ok(sites)
}

//! `convert-precision{to=f16}`: runs a float graph in half precision (f16 or bf16): the fp16 baseline
//! that the quantized models are compared against, on the CPU and the GPU alike.
//!
//! Matches: every f32/f64 constant (weights, caches, masks), every `cast` to f32/f64, and every other
//! value typed f32/f64.
//! Rewrite: constants are rounded to the target type (round to nearest even); casts cast to the target;
//! value types follow; type inference re-checks the whole graph afterwards. The interface keeps its
//! types: a float graph input is cast down where it enters, a float graph output cast back up (under
//! its own name), so callers feed and read the same tensors as before. With `kv-cache=half` the KV
//! cache (`past_key_values.*` inputs, `present.*` outputs) is the exception: it is held in the target
//! type at the interface too, as a half-precision runtime keeps it (half the bytes per step, and no
//! casts of the whole cache on entry and exit). Decoding is unchanged by it: the cache's values are
//! half-precision values either way (a present cast up and fed back casts down exactly).
//! Preconditions: a float graph (run it before `quantize`: quantized ops keep f32 steps and epilogues).
//! Postcondition: no f32/f64 value remains; outputs equal the f32 graph's up to half-precision rounding
//! (a lossy pass: its filetest carries a tolerance).

use crate::pass::{OptionKind, OptionSpec, Pass, PassContext, PassError, PassOptions, PassOutcome};
use crate::registry::PassEntry;
use qcc_ir::{Attr, DType, Graph, Op, OpKind, Tensor, TensorType, Value};

pub const ENTRY: PassEntry = PassEntry {
    name: "convert-precision",
    description: "run a float graph in half precision (f16 or bf16): constants, casts and value types",
    options: &[
        OptionSpec { key: "to", kind: OptionKind::Str, default: "f16", help: "f16 or bf16" },
        OptionSpec {
            key: "kv-cache",
            kind: OptionKind::Str,
            default: "keep",
            help: "keep: the KV cache interface keeps its float type; half: past_key_values.* / present.* in the target type",
        },
    ],
    build: |o: &PassOptions| {
        let to = match o.str("to")? {
            "f16" => DType::F16,
            "bf16" => DType::BF16,
            other => return Err(PassError::Other(format!("convert-precision: to must be f16 or bf16, got '{other}'"))),
        };
        let half_cache = match o.str("kv-cache")? {
            "keep" => false,
            "half" => true,
            other => {
                return Err(PassError::Other(format!("convert-precision: kv-cache must be keep or half, got '{other}'")))
            }
        };
        Ok(Box::new(ConvertPrecision { to, half_cache }))
    },
};

pub struct ConvertPrecision {
    to: DType,
    /// KV-cache inputs and outputs in the target type (no boundary casts).
    half_cache: bool,
}

/// A KV-cache input or output, by the names the importer gives them.
fn is_cache(name: &str, input: bool) -> bool {
    name.starts_with(if input { "past_key_values." } else { "present." })
}

fn is_wide_float(d: DType) -> bool {
    matches!(d, DType::F32 | DType::F64)
}

fn convert(t: &Tensor, to: DType) -> Result<Tensor, String> {
    let v = t.to_f32_vec().map_err(|e| e.to_string())?;
    Ok(match to {
        DType::BF16 => {
            Tensor::from_slice(t.dims.clone(), &v.iter().map(|&x| half::bf16::from_f32(x)).collect::<Vec<_>>())
        }
        _ => Tensor::from_slice(t.dims.clone(), &v.iter().map(|&x| half::f16::from_f32(x)).collect::<Vec<_>>()),
    })
}

impl Pass for ConvertPrecision {
    fn name(&self) -> &'static str {
        ENTRY.name
    }

    fn description(&self) -> &'static str {
        ENTRY.description
    }

    fn run(&self, graph: &mut Graph, _ctx: &mut PassContext) -> Result<PassOutcome, PassError> {
        if let Some(id) = graph.node_ids().find(|&id| {
            matches!(graph.node(id).op.kind, OpKind::IntLinear | OpKind::Quantize | OpKind::Dequantize)
                || graph.node(id).op.output_quant().is_some()
        }) {
            let node = graph.node(id);
            return Err(PassError::node(
                &node.outputs[0].name,
                node.op.kind,
                "convert-precision runs on float graphs, before quantization",
            ));
        }
        // The interface keeps its types: float inputs are cast down on entry, float outputs cast back.
        let boundary_inputs: Vec<Value> = graph
            .graph_inputs()
            .iter()
            .map(|&id| Value::new(id, 0))
            .filter(|&v| is_wide_float(graph.value_type(v).dtype))
            .filter(|&v| !(self.half_cache && is_cache(graph.value_name(v), true)))
            .collect();
        let output_types: Vec<TensorType> =
            graph.graph_outputs().iter().map(|o| graph.value_type(o.value).clone()).collect();
        let mut rewrites = 0;
        if self.half_cache {
            for id in graph.graph_inputs().to_vec() {
                let v = Value::new(id, 0);
                if is_cache(graph.value_name(v), true) && is_wide_float(graph.value_type(v).dtype) {
                    let ty = TensorType { dtype: self.to, shape: graph.value_type(v).shape.clone() };
                    graph.set_value_type(v, ty);
                    rewrites += 1;
                }
            }
        }
        let ids: Vec<_> = graph.node_ids().filter(|id| !graph.graph_inputs().contains(id)).collect();
        for id in ids {
            let name = graph.node(id).outputs.first().map(|o| o.name.clone()).unwrap_or_default();
            let kind = graph.node(id).op.kind;
            let node = graph.node_mut(id);
            match kind {
                OpKind::Constant => {
                    if let Some(t) = node.op.tensor("value").filter(|t| is_wide_float(t.dtype)) {
                        let t = convert(t, self.to).map_err(|e| PassError::node(&name, kind, e))?;
                        node.op.attrs.insert("value".into(), Attr::Tensor(t));
                        rewrites += 1;
                    }
                }
                OpKind::Cast => {
                    if matches!(node.op.attr("to"), Some(Attr::DType(d)) if is_wide_float(*d)) {
                        node.op.attrs.insert("to".into(), Attr::DType(self.to));
                        rewrites += 1;
                    }
                }
                _ => {}
            }
            for out in &mut node.outputs {
                if is_wide_float(out.ty.dtype) {
                    out.ty.dtype = self.to;
                }
            }
        }
        for x in boundary_inputs {
            let users = graph.users(x);
            let ty = TensorType { dtype: self.to, shape: graph.value_type(x).shape.clone() };
            let cast = graph.add_op(Op::new(OpKind::Cast).with("to", Attr::DType(self.to)), &[x], ty);
            let name = graph.fresh_name(&format!("{}.{}", graph.value_name(x), self.to));
            graph.rename_value(cast, &name)?;
            for (user, port) in users {
                graph.set_input(user, port, Some(cast));
            }
            rewrites += 1;
        }
        for (i, ty) in output_types.into_iter().enumerate() {
            if !is_wide_float(ty.dtype) || (self.half_cache && is_cache(&graph.graph_outputs()[i].name, false)) {
                continue;
            }
            let v = graph.graph_outputs()[i].value;
            let cast = graph.add_op(Op::new(OpKind::Cast).with("to", Attr::DType(ty.dtype)), &[v], ty);
            // The output keeps its name; the half-precision value underneath gets a new one.
            let name = graph.value_name(v).to_string();
            let inner = graph.fresh_name(&format!("{name}.{}", self.to));
            graph.rename_value(v, &inner)?;
            graph.rename_value(cast, &name)?;
            graph.graph_outputs_mut()[i].value = cast;
            rewrites += 1;
        }
        qcc_ir::infer_types(graph).map_err(|e| PassError::Other(format!("convert-precision: {e}")))?;
        Ok(PassOutcome::rewrites(rewrites))
    }
}

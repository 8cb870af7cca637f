//! The CPU reference executor: a topological plan built once per graph, constants converted once, and
//! liveness so that each intermediate is dropped right after its last reader.

pub mod bf16_gemm;
pub mod ops;
pub mod value;

use ops::{elementwise as ew, fused, matmul, nn, quant, reduce, shape, vision, OpCtx, OpError, OpResult};
use qcc_ir::{Dim, Graph, GraphError, NodeId, Op, OpKind, TensorType, Value, ValueInfo};
use std::borrow::Cow;
use std::collections::HashMap;
use value::RtTensor;

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("graph input '{0}' was not provided")]
    MissingInput(String),
    #[error("'{0}' is not an input of the graph")]
    UnknownInput(String),
    #[error("graph input '{name}' expects {expected}, got {actual}")]
    InputMismatch { name: String, expected: String, actual: String },
    #[error("node '{node}' ({op}): {message}")]
    Node { node: String, op: &'static str, message: String },
    #[error(transparent)]
    Graph(#[from] GraphError),
}

/// One node of the plan. Values live in numbered slots.
struct Step {
    node: NodeId,
    name: String,
    op: Op,
    inputs: Vec<Option<usize>>,
    outputs: Vec<usize>,
    output_infos: Vec<ValueInfo>,
    /// Slots whose last reader is this step (dropped right after it runs).
    free_after: Vec<usize>,
}

/// Opt-in wall time per op kind (`QCC_OP_PROFILE=1`), summed over every run in the process and printed
/// by [`op_profile::report`]: where a calibration forward spends its time.
pub mod op_profile {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    use std::time::Duration;

    static TOTALS: Mutex<Option<HashMap<&'static str, (Duration, u64)>>> = Mutex::new(None);

    pub fn enabled() -> bool {
        static ON: OnceLock<bool> = OnceLock::new();
        *ON.get_or_init(|| std::env::var_os("QCC_OP_PROFILE").is_some_and(|v| v != "0"))
    }

    pub fn record(op: &'static str, took: Duration) {
        let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
        let e = totals.get_or_insert_with(HashMap::new).entry(op).or_default();
        e.0 += took;
        e.1 += 1;
    }

    /// The recorded totals, slowest op kind first (empty unless enabled).
    pub fn report() -> String {
        let totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
        let mut rows: Vec<_> = totals.iter().flatten().map(|(k, v)| (*k, *v)).collect();
        rows.sort_by_key(|r| std::cmp::Reverse(r.1 .0));
        rows.iter().map(|(k, (d, n))| format!("{k:>24} {:>9.2} s {n:>8} calls\n", d.as_secs_f64())).collect()
    }
}

/// Counters from one run (used by tests to check that intermediates are freed).
#[derive(Debug, Default, Clone, Copy)]
pub struct RunStats {
    /// Most computed tensors alive at once (constants and caller inputs are not counted).
    pub peak_live: usize,
}

/// How `linear` computes float products.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MatmulPrecision {
    /// f32 operands and sums: the reference every other path is checked against.
    #[default]
    F32,
    /// Operands rounded to bf16, sums in f32 (AVX512-BF16, twice the f32 rate; f32 where the CPU lacks
    /// it): for calibration forwards, whose statistics need not be exact.
    Bf16,
}

/// Executes one graph on the CPU. Build once, run many times (`run` takes `&self`).
pub struct CpuExecutor {
    precision: MatmulPrecision,
    steps: Vec<Step>,
    slot_values: Vec<Value>,
    constants: Vec<(usize, RtTensor)>,
    inputs: Vec<(String, usize, TensorType)>,
    outputs: Vec<(String, usize)>,
}

fn node_label(graph: &Graph, id: NodeId) -> String {
    let node = graph.node(id);
    if !node.name.is_empty() {
        node.name.clone()
    } else {
        node.outputs.first().map(|o| o.name.clone()).unwrap_or_default()
    }
}

impl CpuExecutor {
    /// The same executor with `linear` products at `precision`.
    pub fn with_matmul_precision(mut self, precision: MatmulPrecision) -> CpuExecutor {
        self.precision = precision;
        self
    }

    pub fn new(graph: &Graph) -> Result<CpuExecutor, ExecError> {
        let order = graph.topo_order()?;
        let mut slot_of: HashMap<Value, usize> = HashMap::new();
        let mut slot_values = Vec::new();
        for &id in &order {
            for port in 0..graph.node(id).outputs.len() {
                let v = Value::new(id, port as u32);
                slot_of.insert(v, slot_values.len());
                slot_values.push(v);
            }
        }
        let mut constants = Vec::new();
        let mut inputs = Vec::new();
        let mut steps = Vec::new();
        for &id in &order {
            let node = graph.node(id);
            let label = node_label(graph, id);
            let node_err = |message: String| ExecError::Node { node: label.clone(), op: node.op.kind.name(), message };
            let outputs: Vec<usize> = (0..node.outputs.len()).map(|p| slot_of[&Value::new(id, p as u32)]).collect();
            match node.op.kind {
                OpKind::Input => {
                    let info = &node.outputs[0];
                    inputs.push((info.name.clone(), outputs[0], info.ty.clone()));
                }
                OpKind::Constant => {
                    let t = node.op.tensor("value").ok_or_else(|| node_err("attribute 'value' is missing".into()))?;
                    let rt = RtTensor::from_ir_tensor(t).map_err(|e| node_err(e.to_string()))?;
                    constants.push((outputs[0], rt));
                }
                _ => {
                    let slots = graph.inputs(id).iter().map(|v| v.map(|v| slot_of[&v])).collect();
                    steps.push(Step {
                        node: id,
                        name: label,
                        op: node.op.clone(),
                        inputs: slots,
                        outputs,
                        output_infos: node.outputs.clone(),
                        free_after: Vec::new(),
                    });
                }
            }
        }
        let outputs: Vec<(String, usize)> = graph
            .graph_outputs()
            .iter()
            .map(|o| {
                slot_of.get(&o.value).map(|&s| (o.name.clone(), s)).ok_or_else(|| ExecError::Node {
                    node: o.name.clone(),
                    op: "output",
                    message: "graph output refers to a value that does not exist".into(),
                })
            })
            .collect::<Result<_, _>>()?;
        let (mut steps, constants) = hoist_constant_steps(steps, constants, &outputs);
        // Liveness: a slot dies after its last reader; unread results die right after being produced.
        let mut last_use: Vec<Option<usize>> = vec![None; slot_values.len()];
        for (i, step) in steps.iter().enumerate() {
            for &s in step.outputs.iter() {
                last_use[s] = Some(i);
            }
            for s in step.inputs.iter().flatten() {
                last_use[*s] = Some(i);
            }
        }
        for &(_, s) in &outputs {
            last_use[s] = None;
        }
        for (slot, last) in last_use.iter().enumerate() {
            if let Some(i) = last {
                steps[*i].free_after.push(slot);
            }
        }
        Ok(CpuExecutor { precision: MatmulPrecision::F32, steps, slot_values, constants, inputs, outputs })
    }

    /// Names and declared types of the graph inputs, in graph order.
    pub fn inputs(&self) -> impl Iterator<Item = (&str, &TensorType)> {
        self.inputs.iter().map(|(n, _, t)| (n.as_str(), t))
    }

    /// Runs the graph; outputs come back in graph-output order with their names.
    pub fn run(&self, inputs: &[(&str, RtTensor)]) -> Result<Vec<(String, RtTensor)>, ExecError> {
        self.run_inner(inputs, &mut |_, _| {}).map(|(o, _)| o)
    }

    /// Runs the graph, calling `observer` on every node output as it is produced (calibration).
    pub fn run_observed(
        &self,
        inputs: &[(&str, RtTensor)],
        observer: &mut dyn FnMut(Value, &RtTensor),
    ) -> Result<Vec<(String, RtTensor)>, ExecError> {
        self.run_inner(inputs, observer).map(|(o, _)| o)
    }

    pub(crate) fn run_inner(
        &self,
        inputs: &[(&str, RtTensor)],
        observer: &mut dyn FnMut(Value, &RtTensor),
    ) -> Result<(Vec<(String, RtTensor)>, RunStats), ExecError> {
        let mut slots: Vec<Option<Cow<'_, RtTensor>>> = vec![None; self.slot_values.len()];
        for (slot, t) in &self.constants {
            slots[*slot] = Some(Cow::Borrowed(t));
        }
        for (name, _) in inputs {
            if !self.inputs.iter().any(|(n, _, _)| n == name) {
                return Err(ExecError::UnknownInput(name.to_string()));
            }
        }
        let mut symbols = HashMap::new();
        for (name, slot, ty) in &self.inputs {
            let (_, t) = inputs.iter().find(|(n, _)| n == name).ok_or_else(|| ExecError::MissingInput(name.clone()))?;
            check_input(name, ty, t)?;
            for (d, &n) in ty.shape.iter().flat_map(|s| s.dims()).zip(t.shape()) {
                if let Dim::Sym(sym) = d {
                    symbols.entry(sym.to_string()).or_insert(n);
                }
            }
            slots[*slot] = Some(Cow::Borrowed(t));
        }
        let mut stats = RunStats::default();
        let mut live = 0usize;
        for step in &self.steps {
            let results = {
                let mut args: Vec<Option<&RtTensor>> = Vec::with_capacity(step.inputs.len());
                for slot in &step.inputs {
                    args.push(match slot {
                        Some(s) => Some(slots[*s].as_deref().ok_or_else(|| {
                            self.step_error(step, &[], "an input was freed before use (executor bug)".into())
                        })?),
                        None => None,
                    });
                }
                let ctx = OpCtx {
                    op: &step.op,
                    inputs: &args,
                    outputs: &step.output_infos,
                    bf16_products: self.precision == MatmulPrecision::Bf16,
                    symbols: &symbols,
                };
                let started = op_profile::enabled().then(std::time::Instant::now);
                let mut results = execute(&ctx).map_err(|OpError(m)| self.step_error(step, &args, m))?;
                if let Some(t0) = started {
                    op_profile::record(step.op.kind.name(), t0.elapsed());
                }
                if results.len() < step.outputs.len() {
                    let m = format!("produced {} outputs, the node declares {}", results.len(), step.outputs.len());
                    return Err(self.step_error(step, &args, m));
                }
                results.truncate(step.outputs.len());
                results
            };
            for (slot, t) in step.outputs.iter().zip(results) {
                observer(self.slot_values[*slot], &t);
                slots[*slot] = Some(Cow::Owned(t));
                live += 1;
            }
            stats.peak_live = stats.peak_live.max(live);
            for &s in &step.free_after {
                if let Some(Cow::Owned(_)) = slots[s].take() {
                    live -= 1;
                }
            }
        }
        let mut outputs = Vec::with_capacity(self.outputs.len());
        for (i, (name, slot)) in self.outputs.iter().enumerate() {
            // Move each result out unless a later output reads the same value (then copy it).
            let shared = self.outputs[i + 1..].iter().any(|(_, s)| s == slot);
            let taken = if shared { slots[*slot].clone() } else { slots[*slot].take() };
            let t = taken.map(Cow::into_owned).ok_or_else(|| ExecError::Node {
                node: name.clone(),
                op: "output",
                message: "graph output was not computed".into(),
            })?;
            outputs.push((name.clone(), t));
        }
        Ok((outputs, stats))
    }

    fn step_error(&self, step: &Step, args: &[Option<&RtTensor>], message: String) -> ExecError {
        let shapes: Vec<String> = args
            .iter()
            .map(|a| match a {
                Some(t) => format!("{}{:?}", t.dtype(), t.shape()),
                None => "-".to_string(),
            })
            .collect();
        let _ = step.node;
        let message = if shapes.is_empty() { message } else { format!("{message} (inputs: {})", shapes.join(", ")) };
        ExecError::Node { node: step.name.clone(), op: step.op.kind.name(), message }
    }
}

/// Evaluates once, at plan time, every step whose inputs are all constants (a Transpose of a weight, shape
/// arithmetic on constant shapes), so `run` does not redo it on every call; then drops constants that no
/// remaining step or graph output reads. A step that fails here stays in the plan, so its error surfaces at
/// run time with full context. Observers never see hoisted values: they are constants, not activations.
fn hoist_constant_steps(
    steps: Vec<Step>,
    constants: Vec<(usize, RtTensor)>,
    outputs: &[(String, usize)],
) -> (Vec<Step>, Vec<(usize, RtTensor)>) {
    let mut known: HashMap<usize, RtTensor> = constants.into_iter().collect();
    let mut kept = Vec::with_capacity(steps.len());
    for step in steps {
        let foldable = !step.inputs.is_empty() && step.inputs.iter().flatten().all(|s| known.contains_key(s));
        if foldable {
            let args: Vec<Option<&RtTensor>> = step.inputs.iter().map(|s| s.map(|s| &known[&s])).collect();
            let none = HashMap::new();
            let ctx = OpCtx {
                op: &step.op,
                inputs: &args,
                outputs: &step.output_infos,
                bf16_products: false,
                symbols: &none,
            };
            if let Ok(results) = execute(&ctx) {
                if results.len() >= step.outputs.len() {
                    for (&slot, t) in step.outputs.iter().zip(results) {
                        known.insert(slot, t);
                    }
                    continue;
                }
            }
        }
        kept.push(step);
    }
    let read: std::collections::HashSet<usize> =
        kept.iter().flat_map(|s| s.inputs.iter().flatten().copied()).chain(outputs.iter().map(|(_, s)| *s)).collect();
    let mut constants: Vec<(usize, RtTensor)> = known.into_iter().filter(|(s, _)| read.contains(s)).collect();
    constants.sort_by_key(|(s, _)| *s);
    (kept, constants)
}

fn check_input(name: &str, ty: &TensorType, t: &RtTensor) -> Result<(), ExecError> {
    let mismatch = || ExecError::InputMismatch {
        name: name.to_string(),
        expected: ty.to_string(),
        actual: format!("{}{:?}", t.dtype(), t.shape()),
    };
    if ty.dtype != t.dtype() {
        return Err(mismatch());
    }
    if let Some(shape) = &ty.shape {
        if shape.rank() != t.shape().len() {
            return Err(mismatch());
        }
        for (d, &n) in shape.dims().iter().zip(t.shape()) {
            if let Dim::Known(k) = d {
                if *k as usize != n {
                    return Err(mismatch());
                }
            }
        }
    }
    Ok(())
}

fn one(t: RtTensor) -> OpResult<Vec<RtTensor>> {
    Ok(vec![t])
}

/// Runs one op, then its output quantization (QSM epilogue) when it carries one.
fn execute(ctx: &OpCtx) -> OpResult<Vec<RtTensor>> {
    let mut results = execute_op(ctx)?;
    if ctx.op.kind.can_quantize_output() {
        if let (Some(q), Some(first)) = (ctx.op.output_quant(), results.first_mut()) {
            *first = ops::output_quant::apply(&q, first, ops::output_quant::prefix_offset(ctx, &q)?)?;
        }
    }
    Ok(results)
}

fn execute_op(ctx: &OpCtx) -> OpResult<Vec<RtTensor>> {
    use OpKind::*;
    let kind = ctx.op.kind;
    match kind {
        Input | Constant => Err(OpError("inputs and constants are not executed".into())),
        Add | Sub | Mul | Div => one(ew::arith(kind, ctx.input(0)?, ctx.input(1)?)?),
        Pow => one(ew::pow(ctx.input(0)?, ctx.input(1)?)?),
        Mod => one(ew::modulo(ctx.input(0)?, ctx.input(1)?, ctx.int("fmod", 0) != 0)?),
        Max | Min | Sum | Mean => one(ew::variadic(kind, &ctx.present_inputs())?),
        Clip => one(ew::clip(ctx)?),
        Where => one(ew::where_op(ctx.input(0)?, ctx.input(1)?, ctx.input(2)?)?),
        Neg | Abs | Sqrt | Reciprocal | Exp | Log | Sin | Cos | Erf | Tanh | Sigmoid | HardSigmoid | Relu
        | LeakyRelu | Gelu | Softplus | Floor | Ceil | Round | Sign => one(ew::unary(ctx, kind, ctx.input(0)?)?),
        Not => one(ew::not(ctx.input(0)?)?),
        Identity => one(ctx.input(0)?.clone()),
        Cast => one(ew::cast(ctx, ctx.input(0)?)?),
        CastLike => one(ctx.input(0)?.cast_with(ctx.input(1)?.dtype(), ctx.int("saturate", 1) != 0)),
        Equal | Less | LessOrEqual | Greater | GreaterOrEqual => one(ew::compare(kind, ctx.input(0)?, ctx.input(1)?)?),
        And | Or | Xor => one(ew::logic(kind, ctx.input(0)?, ctx.input(1)?)?),
        MatMul => one(matmul::matmul(ctx.input(0)?, ctx.input(1)?)?),
        Gemm => one(matmul::gemm(ctx)?),
        MatMulInteger => one(matmul::matmul_integer(ctx)?),
        QLinearMatMul => one(matmul::qlinear_matmul(ctx)?),
        Softmax | LogSoftmax => one(nn::softmax(ctx, kind == LogSoftmax)?),
        LayerNormalization => one(nn::layer_norm(ctx)?),
        RmsNormalization | SimplifiedLayerNormalization => one(nn::rms_norm(ctx)?),
        BatchNormalization => one(nn::batch_norm(ctx)?),
        ReduceMean | ReduceSum | ReduceMax | ReduceMin | ReduceProd => one(reduce::reduce(ctx, kind)?),
        ArgMax | ArgMin => one(reduce::arg_reduce(ctx, kind == ArgMax)?),
        CumSum => one(reduce::cumsum(ctx)?),
        Shape => one(shape::shape_of(ctx)?),
        Size => one(RtTensor::scalar(ctx.input(0)?.len() as i64)),
        Reshape => one(shape::reshape(ctx)?),
        Transpose => one(shape::transpose(ctx)?),
        Squeeze => one(shape::squeeze(ctx)?),
        Unsqueeze => one(shape::unsqueeze(ctx)?),
        Flatten => one(shape::flatten(ctx)?),
        Concat => one(shape::concat(ctx)?),
        Split => shape::split(ctx),
        Slice => one(shape::slice(ctx)?),
        Gather => one(shape::gather(ctx)?),
        GatherElements => one(shape::gather_elements(ctx)?),
        Expand => one(shape::expand(ctx)?),
        Tile => one(shape::tile(ctx)?),
        Pad => one(shape::pad(ctx)?),
        ConstantOfShape => one(shape::constant_of_shape(ctx)?),
        Range => one(shape::range(ctx)?),
        Trilu => one(shape::trilu(ctx)?),
        Conv => one(vision::conv(ctx)?),
        MaxPool | AveragePool => one(vision::pool(ctx, kind == MaxPool)?),
        GlobalAveragePool => one(vision::global_average_pool(ctx)?),
        Resize => one(vision::resize(ctx)?),
        QuantizeLinear => one(quant::quantize_linear(ctx)?),
        DequantizeLinear => one(quant::dequantize_linear(ctx)?),
        DynamicQuantizeLinear => quant::dynamic_quantize_linear(ctx),
        Quantize if ctx.op.int("prefix_tokens").unwrap_or(0) > 0 => one(ops::output_quant::quantize(ctx)?),
        Quantize => one(quant::quantize(ctx)?),
        Dequantize => one(quant::dequantize(ctx)?),
        IntLinear => one(ops::output_quant::int_linear(ctx)?),
        Linear => one(fused::linear(ctx)?),
        RmsNorm => one(fused::rms_norm(ctx)?),
        Swiglu => one(fused::swiglu(ctx)?),
        Rotary => one(fused::rotary(ctx)?),
        Attention => one(fused::attention(ctx)?),
        Hadamard => one(fused::hadamard(ctx)?),
    }
}

#[cfg(test)]
mod ops_tests;
#[cfg(test)]
mod tests;

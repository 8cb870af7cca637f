//! Inference rules for elementwise, linear-algebra, normalisation, reduction and quantization ops.

use super::dims::{broadcast_shapes, unify_dim};
use super::{Ctx, InferError};
use crate::{DType, Dim, OpKind, Shape, TensorType};

type Out = Result<Vec<TensorType>, InferError>;

pub fn infer(ctx: &Ctx<'_>) -> Out {
    use OpKind::*;
    let kind = ctx.node.op.kind;
    match kind {
        Input => Ok(ctx.node.outputs.iter().map(|o| o.ty.clone()).collect()),
        Constant => {
            let t = ctx.node.op.tensor("value").ok_or_else(|| ctx.err("has no tensor attribute 'value'"))?;
            Ok(vec![TensorType::known(t.dtype, &t.dims)])
        }
        Add | Sub | Mul | Div | Mod | Max | Min | Sum | Mean => {
            let ports: Vec<usize> = (0..ctx.num_inputs()).collect();
            let dtype = same_dtype(ctx, &ports)?;
            if dtype == DType::Bool {
                return Err(ctx.err("arithmetic on bool tensors"));
            }
            Ok(vec![TensorType { dtype, shape: broadcast(ctx, &ports)? }])
        }
        Pow => {
            let base = ctx.req(0)?.dtype;
            if base == DType::Bool || ctx.req(1)?.dtype == DType::Bool {
                return Err(ctx.err("pow of bool tensors"));
            }
            Ok(vec![TensorType { dtype: base, shape: broadcast(ctx, &[0, 1])? }])
        }
        Clip => {
            let ports: Vec<usize> = (0..ctx.num_inputs()).filter(|&p| ctx.input(p).is_some()).collect();
            let dtype = same_dtype(ctx, &ports)?;
            Ok(vec![TensorType { dtype, shape: ctx.shape(0)?.cloned() }])
        }
        Where => {
            if ctx.req(0)?.dtype != DType::Bool {
                return Err(ctx.err(format!("condition must be bool, not {}", ctx.req(0)?.dtype)));
            }
            let dtype = same_dtype(ctx, &[1, 2])?;
            Ok(vec![TensorType { dtype, shape: broadcast(ctx, &[0, 1, 2])? }])
        }
        Neg | Abs | Sign => {
            let t = ctx.req(0)?;
            if t.dtype == DType::Bool {
                return Err(ctx.err("arithmetic on bool tensors"));
            }
            Ok(vec![t.clone()])
        }
        Sqrt | Reciprocal | Exp | Log | Sin | Cos | Erf | Tanh | Sigmoid | HardSigmoid | Relu | LeakyRelu | Gelu
        | Softplus | Floor | Ceil | Round | Softmax | LogSoftmax => {
            let t = ctx.req(0)?;
            // Relu is defined on signed integers too; the rest are float-only in ONNX.
            let ok = t.dtype.is_float() || (kind == Relu && t.dtype.is_signed_int());
            if !ok {
                return Err(ctx.err(format!("needs a float input, not {}", t.dtype)));
            }
            Ok(vec![t.clone()])
        }
        Not => {
            let t = ctx.req(0)?;
            if t.dtype != DType::Bool {
                return Err(ctx.err(format!("needs a bool input, not {}", t.dtype)));
            }
            Ok(vec![t.clone()])
        }
        Identity | CumSum | Trilu => Ok(vec![ctx.req(0)?.clone()]),
        Cast => {
            let to = ctx.dtype_attr("to").ok_or_else(|| ctx.err("has no dtype attribute 'to'"))?;
            Ok(vec![TensorType { dtype: to, shape: ctx.shape(0)?.cloned() }])
        }
        CastLike => Ok(vec![TensorType { dtype: ctx.req(1)?.dtype, shape: ctx.shape(0)?.cloned() }]),
        Equal | Less | LessOrEqual | Greater | GreaterOrEqual => {
            same_dtype(ctx, &[0, 1])?;
            Ok(vec![TensorType { dtype: DType::Bool, shape: broadcast(ctx, &[0, 1])? }])
        }
        And | Or | Xor => {
            if same_dtype(ctx, &[0, 1])? != DType::Bool {
                return Err(ctx.err("logical ops need bool inputs"));
            }
            Ok(vec![TensorType { dtype: DType::Bool, shape: broadcast(ctx, &[0, 1])? }])
        }
        MatMul => {
            let dtype = same_dtype(ctx, &[0, 1])?;
            if dtype == DType::Bool {
                return Err(ctx.err("matmul of bool tensors"));
            }
            Ok(vec![TensorType { dtype, shape: matmul(ctx, ctx.shape(0)?, ctx.shape(1)?)? }])
        }
        Gemm => gemm(ctx),
        MatMulInteger => {
            for port in [0, 1] {
                let d = ctx.req(port)?.dtype;
                if !matches!(d, DType::I8 | DType::U8) {
                    return Err(ctx.err(format!("input {port} must be i8 or u8, not {d}")));
                }
            }
            Ok(vec![TensorType { dtype: DType::I32, shape: matmul(ctx, ctx.shape(0)?, ctx.shape(1)?)? }])
        }
        QLinearMatMul => {
            for (q, zp) in [(0, 2), (3, 5)] {
                let (dq, dz) = (ctx.req(q)?.dtype, ctx.req(zp)?.dtype);
                if dq != dz || !dq.is_int() {
                    return Err(
                        ctx.err(format!("input {q} ({dq}) and its zero point ({dz}) must share an integer dtype"))
                    );
                }
            }
            let dtype = ctx.req(7)?.dtype;
            Ok(vec![TensorType { dtype, shape: matmul(ctx, ctx.shape(0)?, ctx.shape(3)?)? }])
        }
        LayerNormalization | RmsNormalization | SimplifiedLayerNormalization | BatchNormalization => {
            let t = ctx.req(0)?;
            if !t.dtype.is_float() {
                return Err(ctx.err(format!("needs a float input, not {}", t.dtype)));
            }
            Ok(vec![t.clone()])
        }
        ReduceMean | ReduceSum | ReduceMax | ReduceMin | ReduceProd => reduce(ctx),
        ArgMax | ArgMin => {
            let t = ctx.req(0)?;
            let shape = match &t.shape {
                Some(s) => {
                    let axis = ctx.axis(ctx.int_attr("axis", 0), s.rank())?;
                    Some(reduce_dims(s, &[axis], ctx.int_attr("keepdims", 1) != 0))
                }
                None => None,
            };
            Ok(vec![TensorType { dtype: DType::I64, shape }])
        }
        QuantizeLinear => {
            let x = ctx.req(0)?;
            float_input(ctx, 0)?;
            let dtype = match ctx.ty(2) {
                Some(zp) => zp.dtype,
                None => ctx.dtype_attr("output_dtype").unwrap_or(DType::U8),
            };
            quantized_dtype(ctx, dtype)?;
            Ok(vec![TensorType { dtype, shape: x.shape.clone() }])
        }
        DequantizeLinear => {
            let q = ctx.req(0)?;
            quantized_dtype(ctx, q.dtype)?;
            if let Some(zp) = ctx.ty(2) {
                if zp.dtype != q.dtype {
                    return Err(ctx.err(format!("zero point is {} but the input is {}", zp.dtype, q.dtype)));
                }
            }
            let dtype = match ctx.dtype_attr("output_dtype") {
                Some(d) => d,
                None => float_input(ctx, 1)?,
            };
            Ok(vec![TensorType { dtype, shape: q.shape.clone() }])
        }
        DynamicQuantizeLinear => {
            let x = ctx.req(0)?;
            float_input(ctx, 0)?;
            Ok(vec![
                TensorType { dtype: DType::U8, shape: x.shape.clone() },
                TensorType::known(DType::F32, &[]),
                TensorType::known(DType::U8, &[]),
            ])
        }
        Quantize => {
            float_input(ctx, 0)?;
            float_input(ctx, 1)?;
            let to = ctx.dtype_attr("to").ok_or_else(|| ctx.err("has no dtype attribute 'to'"))?;
            quantized_dtype(ctx, to)?;
            let dtype = ctx.node.op.output_quant().map_or(to, |q| q.output_dtype());
            Ok(vec![TensorType { dtype, shape: ctx.shape(0)?.cloned() }])
        }
        Dequantize => {
            quantized_dtype(ctx, ctx.req(0)?.dtype)?;
            let dtype = float_input(ctx, 1)?;
            Ok(vec![TensorType { dtype, shape: ctx.shape(0)?.cloned() }])
        }
        IntLinear => with_output_quant(ctx, int_linear(ctx)),
        Linear | RmsNorm | Swiglu | Rotary | Attention | Hadamard => with_output_quant(ctx, super::fused::infer(ctx)),
        // Listed so that a new op kind without a rule fails to compile here.
        Shape | Size | Reshape | Transpose | Squeeze | Unsqueeze | Flatten | Concat | Split | Slice | Gather
        | GatherElements | Expand | Tile | Pad | ConstantOfShape | Range | Conv | MaxPool | AveragePool
        | GlobalAveragePool | Resize => Err(ctx.err("shape rule missing")),
    }
}

/// The shared dtype of the given (present) inputs.
fn same_dtype(ctx: &Ctx<'_>, ports: &[usize]) -> Result<DType, InferError> {
    let mut dtype = None;
    for &p in ports {
        let d = ctx.req(p)?.dtype;
        match dtype {
            None => dtype = Some(d),
            Some(first) if first != d => {
                return Err(ctx.err(format!("input {p} is {d} but input {} is {first}", ports[0])));
            }
            _ => {}
        }
    }
    dtype.ok_or_else(|| ctx.err("has no inputs"))
}

/// Numpy broadcast of the given inputs' shapes (unknown rank if any is unranked).
pub fn broadcast(ctx: &Ctx<'_>, ports: &[usize]) -> Result<Option<Shape>, InferError> {
    let mut out = Shape(vec![]);
    for &p in ports {
        let Some(s) = ctx.shape(p)? else { return Ok(None) };
        out = broadcast_shapes(&out, s).map_err(|(a, b)| {
            ctx.err(format!(
                "cannot broadcast {a} against {b} (input {p} has shape [{s}], others broadcast to [{out}])"
            ))
        })?;
    }
    Ok(Some(out))
}

fn float_input(ctx: &Ctx<'_>, port: usize) -> Result<DType, InferError> {
    let d = ctx.req(port)?.dtype;
    if !d.is_float() {
        return Err(ctx.err(format!("input {port} must be a float tensor, not {d}")));
    }
    Ok(d)
}

fn quantized_dtype(ctx: &Ctx<'_>, d: DType) -> Result<(), InferError> {
    if d.is_int() || d == DType::F8E4M3 {
        Ok(())
    } else {
        Err(ctx.err(format!("quantized type must be an integer or fp8 type, not {d}")))
    }
}

fn inner_dims_match(ctx: &Ctx<'_>, a: &Dim, b: &Dim) -> Result<(), InferError> {
    match unify_dim(a, b) {
        Some(_) => Ok(()),
        None => Err(ctx.err(format!("inner dimensions differ ({a} vs {b})"))),
    }
}

/// numpy.matmul shapes: 1-D operands are promoted and the promoted axis dropped; batch axes broadcast.
pub fn matmul(ctx: &Ctx<'_>, a: Option<&Shape>, b: Option<&Shape>) -> Result<Option<Shape>, InferError> {
    let (Some(a), Some(b)) = (a, b) else { return Ok(None) };
    if a.rank() == 0 || b.rank() == 0 {
        return Err(ctx.err("matmul operands must have rank >= 1"));
    }
    let a2 = if a.rank() == 1 { Shape(vec![Dim::Known(1), a.0[0].clone()]) } else { a.clone() };
    let b2 = if b.rank() == 1 { Shape(vec![b.0[0].clone(), Dim::Known(1)]) } else { b.clone() };
    let (ra, rb) = (a2.rank(), b2.rank());
    inner_dims_match(ctx, &a2.0[ra - 1], &b2.0[rb - 2])?;
    let batch = broadcast_shapes(&Shape(a2.0[..ra - 2].to_vec()), &Shape(b2.0[..rb - 2].to_vec()))
        .map_err(|(x, y)| ctx.err(format!("cannot broadcast batch dimensions {x} against {y} ([{a}] x [{b}])")))?;
    let mut dims = batch.0;
    if a.rank() > 1 {
        dims.push(a2.0[ra - 2].clone());
    }
    if b.rank() > 1 {
        dims.push(b2.0[rb - 1].clone());
    }
    Ok(Some(Shape(dims)))
}

fn gemm(ctx: &Ctx<'_>) -> Out {
    let dtype = same_dtype(ctx, &[0, 1])?;
    let (Some(a), Some(b)) = (ctx.shape(0)?, ctx.shape(1)?) else {
        return Ok(vec![TensorType::new(dtype, Shape(vec![Dim::Unknown, Dim::Unknown]))]);
    };
    if a.rank() != 2 || b.rank() != 2 {
        return Err(ctx.err(format!("operands must be 2-D, got [{a}] and [{b}]")));
    }
    let (m, ka) = if ctx.int_attr("transA", 0) != 0 { (&a.0[1], &a.0[0]) } else { (&a.0[0], &a.0[1]) };
    let (kb, n) = if ctx.int_attr("transB", 0) != 0 { (&b.0[1], &b.0[0]) } else { (&b.0[0], &b.0[1]) };
    inner_dims_match(ctx, ka, kb)?;
    let out = Shape(vec![m.clone(), n.clone()]);
    if let Some(Some(c)) = ctx.ty(2).map(|t| t.shape.as_ref()) {
        // C broadcasts unidirectionally to [M, N].
        match broadcast_shapes(&out, c) {
            Ok(s) if s.rank() == 2 && unify_dim(&s.0[0], m).is_some() && unify_dim(&s.0[1], n).is_some() => {}
            _ => return Err(ctx.err(format!("bias of shape [{c}] does not broadcast to [{out}]"))),
        }
    }
    Ok(vec![TensorType::new(dtype, out)])
}

fn reduce_dims(s: &Shape, axes: &[usize], keepdims: bool) -> Shape {
    let mut dims = Vec::new();
    for (i, d) in s.0.iter().enumerate() {
        if axes.contains(&i) {
            if keepdims {
                dims.push(Dim::Known(1));
            }
        } else {
            dims.push(d.clone());
        }
    }
    Shape(dims)
}

fn reduce(ctx: &Ctx<'_>) -> Out {
    let t = ctx.req(0)?;
    let keepdims = ctx.int_attr("keepdims", 1) != 0;
    let axes: Option<Vec<i64>> = if ctx.input(1).is_some() {
        ctx.known_ints(1)
    } else {
        Some(ctx.node.op.ints("axes").map(<[i64]>::to_vec).unwrap_or_default())
    };
    let Some(shape) = &t.shape else { return Ok(vec![TensorType::unranked(t.dtype)]) };
    let shape = match axes {
        Some(axes) if axes.is_empty() => {
            if ctx.int_attr("noop_with_empty_axes", 0) != 0 {
                shape.clone()
            } else {
                reduce_dims(shape, &(0..shape.rank()).collect::<Vec<_>>(), keepdims)
            }
        }
        Some(axes) => {
            let axes = axes.iter().map(|&a| ctx.axis(a, shape.rank())).collect::<Result<Vec<_>, _>>()?;
            reduce_dims(shape, &axes, keepdims)
        }
        None if keepdims => Shape(vec![Dim::Unknown; shape.rank()]),
        None => match ctx.ty(1).and_then(|t| t.shape.as_ref()).map(|s| s.dims()) {
            Some([Dim::Known(n)]) if (*n as usize) <= shape.rank() => {
                Shape(vec![Dim::Unknown; shape.rank() - *n as usize])
            }
            _ => return Ok(vec![TensorType::unranked(t.dtype)]),
        },
    };
    Ok(vec![TensorType::new(t.dtype, shape)])
}

/// Applies an op's output quantization (attribute `to`, see `OutputQuant`) to the inferred float type.
fn with_output_quant(ctx: &Ctx<'_>, inferred: Out) -> Out {
    let Some(q) = ctx.node.op.output_quant() else {
        return inferred;
    };
    quantized_dtype(ctx, q.to)?;
    let mut types = inferred?;
    if let Some(t) = types.first_mut() {
        t.dtype = q.output_dtype();
    }
    Ok(types)
}

fn int_linear(ctx: &Ctx<'_>) -> Out {
    const WEIGHTS: [DType; 5] = [DType::I4, DType::I8, DType::U4, DType::U8, DType::F8E4M3];
    let x = ctx.req(0)?.dtype;
    if !(WEIGHTS.contains(&x) || x == DType::I16 || x.is_float()) {
        return Err(ctx.err(format!("activation must be i4/i8/i16/u4/u8/f8e4m3 or float, not {x}")));
    }
    let w = ctx.req(1)?.dtype;
    if !WEIGHTS.contains(&w) {
        return Err(ctx.err(format!("weight must be i4/i8/u4/u8/f8e4m3, not {w}")));
    }
    for (port, what) in [(2, "scale"), (3, "bias")] {
        if let Some(t) = ctx.ty(port) {
            if t.dtype != DType::F32 {
                return Err(ctx.err(format!("{what} must be f32, not {}", t.dtype)));
            }
        }
    }
    let (Some(x), Some(w)) = (ctx.shape(0)?, ctx.shape(1)?) else {
        return Ok(vec![TensorType::unranked(DType::F32)]);
    };
    if w.rank() != 2 || x.rank() == 0 {
        return Err(ctx.err(format!("weight must be [N, K] and activation [.., K], got [{w}] and [{x}]")));
    }
    inner_dims_match(ctx, &x.0[x.rank() - 1], &w.0[1])?;
    let n = &w.0[0];
    for port in [2, 3] {
        if let Some(Some(s)) = ctx.ty(port).map(|t| t.shape.as_ref()) {
            let ok = match s.dims() {
                [] => port == 2,
                [d] => unify_dim(d, n).is_some() || *d == Dim::Known(1),
                _ => false,
            };
            if !ok {
                return Err(ctx.err(format!("input {port} has shape [{s}] but the weight has {n} output channels")));
            }
        }
    }
    let mut dims = x.0[..x.rank() - 1].to_vec();
    dims.push(n.clone());
    Ok(vec![TensorType::new(DType::F32, Shape(dims))])
}

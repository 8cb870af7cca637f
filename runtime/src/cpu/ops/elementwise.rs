//! Elementwise ops with numpy broadcasting: arithmetic, comparisons, logic, unary math, Clip, Where, Cast.
//!
//! f32/f64 compute natively; f16/bf16/fp8 compute in f32 and round back. Integer arithmetic wraps (ONNX
//! leaves overflow to the implementation; wrapping matches onnxruntime on two's-complement machines) and
//! integer division by zero yields 0 instead of trapping. Large outputs are computed with rayon.

use crate::cpu::ops::{bail, broadcast_shapes, op_err, OpCtx, OpResult};
use crate::cpu::value::{map_any, RtTensor, Scalar};
use ndarray::{ArrayD, IxDyn, Zip};
use num_traits::{CheckedDiv, PrimInt, WrappingAdd, WrappingMul, WrappingSub};
use qcc_ir::{DType, OpKind};

/// Outputs with at least this many elements are computed in parallel.
pub const PAR_MIN: usize = 1 << 15;

/// `f(a, b)` over the numpy broadcast of `a` and `b`.
pub fn zip_broadcast<A, B, O>(a: &ArrayD<A>, b: &ArrayD<B>, f: impl Fn(A, B) -> O + Sync + Send) -> OpResult<ArrayD<O>>
where
    A: Copy + Send + Sync,
    B: Copy + Send + Sync,
    O: Send,
{
    let shape = if a.shape() == b.shape() { a.shape().to_vec() } else { broadcast_shapes(a.shape(), b.shape())? };
    let av = a.broadcast(IxDyn(&shape)).ok_or_else(|| op_err!("cannot broadcast {:?} to {shape:?}", a.shape()))?;
    let bv = b.broadcast(IxDyn(&shape)).ok_or_else(|| op_err!("cannot broadcast {:?} to {shape:?}", b.shape()))?;
    let zip = Zip::from(&av).and(&bv);
    Ok(if av.len() >= PAR_MIN { zip.par_map_collect(|&x, &y| f(x, y)) } else { zip.map_collect(|&x, &y| f(x, y)) })
}

/// `f(x)` for every element, in parallel for large arrays.
pub fn par_map<A: Copy + Send + Sync, O: Send>(a: &ArrayD<A>, f: impl Fn(A) -> O + Sync + Send) -> ArrayD<O> {
    let zip = Zip::from(a);
    if a.len() >= PAR_MIN {
        zip.par_map_collect(|&x| f(x))
    } else {
        zip.map_collect(|&x| f(x))
    }
}

/// Matches two tensors of the same plain numeric type (f32, f64, integers), binding their arrays.
macro_rules! same_numeric {
    ($a:expr, $b:expr, ($x:ident, $y:ident) => float $fbody:expr, int $ibody:expr) => {
        match ($a, $b) {
            (RtTensor::F32($x), RtTensor::F32($y)) => Some(RtTensor::F32($fbody)),
            (RtTensor::F64($x), RtTensor::F64($y)) => Some(RtTensor::F64($fbody)),
            (RtTensor::I64($x), RtTensor::I64($y)) => Some(RtTensor::I64($ibody)),
            (RtTensor::I32($x), RtTensor::I32($y)) => Some(RtTensor::I32($ibody)),
            (RtTensor::I16($x), RtTensor::I16($y)) => Some(RtTensor::I16($ibody)),
            (RtTensor::I8($x), RtTensor::I8($y)) => Some(RtTensor::I8($ibody)),
            (RtTensor::U64($x), RtTensor::U64($y)) => Some(RtTensor::U64($ibody)),
            (RtTensor::U32($x), RtTensor::U32($y)) => Some(RtTensor::U32($ibody)),
            (RtTensor::U16($x), RtTensor::U16($y)) => Some(RtTensor::U16($ibody)),
            (RtTensor::U8($x), RtTensor::U8($y)) => Some(RtTensor::U8($ibody)),
            _ => None,
        }
    };
}

/// Matches two tensors of the same type (any type), binding their arrays; `$body` yields a tensor.
macro_rules! with_pair {
    ($a:expr, $b:expr, ($x:ident, $y:ident) => $body:expr) => {
        match ($a, $b) {
            (RtTensor::F64($x), RtTensor::F64($y)) => Some($body),
            (RtTensor::F32($x), RtTensor::F32($y)) => Some($body),
            (RtTensor::F16($x), RtTensor::F16($y)) => Some($body),
            (RtTensor::BF16($x), RtTensor::BF16($y)) => Some($body),
            (RtTensor::I64($x), RtTensor::I64($y)) => Some($body),
            (RtTensor::I32($x), RtTensor::I32($y)) => Some($body),
            (RtTensor::I16($x), RtTensor::I16($y)) => Some($body),
            (RtTensor::I8($x), RtTensor::I8($y)) => Some($body),
            (RtTensor::U64($x), RtTensor::U64($y)) => Some($body),
            (RtTensor::U32($x), RtTensor::U32($y)) => Some($body),
            (RtTensor::U16($x), RtTensor::U16($y)) => Some($body),
            (RtTensor::U8($x), RtTensor::U8($y)) => Some($body),
            (RtTensor::I4($x), RtTensor::I4($y)) => Some($body),
            (RtTensor::U4($x), RtTensor::U4($y)) => Some($body),
            (RtTensor::Bool($x), RtTensor::Bool($y)) => Some($body),
            _ => None,
        }
    };
}

fn is_narrow_float(d: DType) -> bool {
    matches!(d, DType::F16 | DType::BF16 | DType::F8E4M3)
}

fn float_arith<T: num_traits::Float + Send + Sync>(kind: OpKind, x: &ArrayD<T>, y: &ArrayD<T>) -> OpResult<ArrayD<T>> {
    let nan_max = |a: T, b: T| {
        if a.is_nan() || b.is_nan() {
            T::nan()
        } else if a >= b {
            a
        } else {
            b
        }
    };
    let nan_min = |a: T, b: T| {
        if a.is_nan() || b.is_nan() {
            T::nan()
        } else if a <= b {
            a
        } else {
            b
        }
    };
    match kind {
        OpKind::Add | OpKind::Sum | OpKind::Mean => zip_broadcast(x, y, |a, b| a + b),
        OpKind::Sub => zip_broadcast(x, y, |a, b| a - b),
        OpKind::Mul => zip_broadcast(x, y, |a, b| a * b),
        OpKind::Div => zip_broadcast(x, y, |a, b| a / b),
        OpKind::Max => zip_broadcast(x, y, nan_max),
        OpKind::Min => zip_broadcast(x, y, nan_min),
        _ => bail!("{kind} is not float arithmetic"),
    }
}

fn int_arith<T>(kind: OpKind, x: &ArrayD<T>, y: &ArrayD<T>) -> OpResult<ArrayD<T>>
where
    T: PrimInt + WrappingAdd + WrappingSub + WrappingMul + CheckedDiv + Send + Sync,
{
    match kind {
        OpKind::Add | OpKind::Sum => zip_broadcast(x, y, |a, b| a.wrapping_add(&b)),
        OpKind::Sub => zip_broadcast(x, y, |a, b| a.wrapping_sub(&b)),
        OpKind::Mul => zip_broadcast(x, y, |a, b| a.wrapping_mul(&b)),
        OpKind::Div => zip_broadcast(x, y, |a, b| a.checked_div(&b).unwrap_or_else(T::zero)),
        OpKind::Max => zip_broadcast(x, y, |a, b| a.max(b)),
        OpKind::Min => zip_broadcast(x, y, |a, b| a.min(b)),
        _ => bail!("{kind} is not integer arithmetic"),
    }
}

/// Add, Sub, Mul, Div, Max, Min (and the pairwise step of Sum) with broadcasting.
pub fn arith(kind: OpKind, a: &RtTensor, b: &RtTensor) -> OpResult<RtTensor> {
    if a.dtype() != b.dtype() {
        bail!("operand types differ: {} {:?} vs {} {:?}", a.dtype(), a.shape(), b.dtype(), b.shape());
    }
    if is_narrow_float(a.dtype()) {
        return Ok(arith(kind, &a.cast(DType::F32), &b.cast(DType::F32))?.cast(a.dtype()));
    }
    let out = same_numeric!(a, b, (x, y) => float float_arith(kind, x, y)?, int int_arith(kind, x, y)?);
    out.ok_or_else(|| op_err!("{kind} does not support {}", a.dtype()))
}

/// Variadic Max, Min, Sum, Mean.
pub fn variadic(kind: OpKind, inputs: &[&RtTensor]) -> OpResult<RtTensor> {
    let (first, rest) = inputs.split_first().ok_or_else(|| op_err!("needs at least one input"))?;
    let mut acc = (*first).clone();
    for t in rest {
        acc = arith(kind, &acc, t)?;
    }
    if kind == OpKind::Mean && inputs.len() > 1 {
        let n = RtTensor::scalar(inputs.len() as f64).cast(acc.dtype());
        acc = arith(OpKind::Div, &acc, &n)?;
    }
    Ok(acc)
}

pub fn pow(base: &RtTensor, exponent: &RtTensor) -> OpResult<RtTensor> {
    if let (RtTensor::F32(x), RtTensor::F32(y)) = (base, exponent) {
        if y.len() == 1 && y.iter().all(|&e| e == 2.0) && y.ndim() <= x.ndim() {
            return Ok(RtTensor::F32(zip_broadcast(x, y, |a, _| a * a)?));
        }
        return Ok(RtTensor::F32(zip_broadcast(x, y, f32::powf)?));
    }
    if base.dtype() == DType::Bool || exponent.dtype() == DType::Bool {
        bail!("pow does not support bool");
    }
    let out = zip_broadcast(&base.cast_array::<f64>(), &exponent.cast_array::<f64>(), f64::powf)?;
    Ok(RtTensor::F64(out).cast(base.dtype()))
}

pub fn modulo(a: &RtTensor, b: &RtTensor, fmod: bool) -> OpResult<RtTensor> {
    if a.dtype() != b.dtype() {
        bail!("operand types differ: {} vs {}", a.dtype(), b.dtype());
    }
    if a.dtype().is_float() {
        let out = zip_broadcast(&a.cast_array::<f64>(), &b.cast_array::<f64>(), |x, y| {
            let r = x % y;
            if !fmod && r != 0.0 && (r < 0.0) != (y < 0.0) {
                r + y
            } else {
                r
            }
        })?;
        return Ok(RtTensor::F64(out).cast(a.dtype()));
    }
    let out = zip_broadcast(&a.cast_array::<i64>(), &b.cast_array::<i64>(), |x, y| {
        let r = x.checked_rem(y).unwrap_or(0);
        if !fmod && r != 0 && (r < 0) != (y < 0) {
            r + y
        } else {
            r
        }
    })?;
    Ok(RtTensor::I64(out).cast(a.dtype()))
}

fn first_as<T: Scalar>(t: Option<&RtTensor>, attr: Option<f32>) -> Option<T> {
    match t {
        Some(t) => t.cast_array::<T>().iter().next().copied(),
        None => attr.map(|v| T::from_f64(v as f64)),
    }
}

fn clip_array<T: Scalar>(x: &ArrayD<T>, lo: Option<T>, hi: Option<T>) -> ArrayD<T> {
    par_map(x, |v| {
        let v = match lo {
            Some(l) if v < l => l,
            _ => v,
        };
        match hi {
            Some(h) if v > h => h,
            _ => v,
        }
    })
}

/// Clip with optional min/max inputs (or the pre-opset-11 `min`/`max` attributes).
pub fn clip(ctx: &OpCtx) -> OpResult<RtTensor> {
    let x = ctx.input(0)?;
    if is_narrow_float(x.dtype()) {
        let lo = ctx.opt_input(1).map(|t| t.cast(DType::F32));
        let hi = ctx.opt_input(2).map(|t| t.cast(DType::F32));
        let xs = x.cast_array::<f32>();
        let out =
            clip_array(&xs, first_as(lo.as_ref(), ctx.op.float("min")), first_as(hi.as_ref(), ctx.op.float("max")));
        return Ok(RtTensor::F32(out).cast(x.dtype()));
    }
    let (lo_t, hi_t) = (ctx.opt_input(1), ctx.opt_input(2));
    let (lo_a, hi_a) = (ctx.op.float("min"), ctx.op.float("max"));
    Ok(map_any!(x, a => clip_array(a, first_as(lo_t, lo_a), first_as(hi_t, hi_a))))
}

pub fn where_op(cond: &RtTensor, x: &RtTensor, y: &RtTensor) -> OpResult<RtTensor> {
    let RtTensor::Bool(c) = cond else { bail!("condition must be bool, got {}", cond.dtype()) };
    let shape = broadcast_shapes(&broadcast_shapes(c.shape(), x.shape())?, y.shape())?;
    let cv = c.broadcast(IxDyn(&shape)).ok_or_else(|| op_err!("cannot broadcast condition"))?;
    let out = with_pair!(x, y, (a, b) => {
        let av = a.broadcast(IxDyn(&shape)).ok_or_else(|| op_err!("cannot broadcast {:?}", a.shape()))?;
        let bv = b.broadcast(IxDyn(&shape)).ok_or_else(|| op_err!("cannot broadcast {:?}", b.shape()))?;
        Scalar::wrap(Zip::from(&cv).and(&av).and(&bv).map_collect(|&c, &p, &q| if c { p } else { q }))
    });
    match (out, x, y) {
        (Some(t), _, _) => Ok(t),
        (None, RtTensor::F8E4M3(a), RtTensor::F8E4M3(b)) => {
            let av = a.broadcast(IxDyn(&shape)).ok_or_else(|| op_err!("cannot broadcast {:?}", a.shape()))?;
            let bv = b.broadcast(IxDyn(&shape)).ok_or_else(|| op_err!("cannot broadcast {:?}", b.shape()))?;
            Ok(RtTensor::F8E4M3(Zip::from(&cv).and(&av).and(&bv).map_collect(|&c, &p, &q| if c { p } else { q })))
        }
        _ => bail!("X and Y types differ: {} vs {}", x.dtype(), y.dtype()),
    }
}

fn compare_fn<T: PartialOrd + Copy + Send + Sync>(
    kind: OpKind,
    a: &ArrayD<T>,
    b: &ArrayD<T>,
) -> OpResult<ArrayD<bool>> {
    match kind {
        OpKind::Equal => zip_broadcast(a, b, |x, y| x == y),
        OpKind::Less => zip_broadcast(a, b, |x, y| x < y),
        OpKind::LessOrEqual => zip_broadcast(a, b, |x, y| x <= y),
        OpKind::Greater => zip_broadcast(a, b, |x, y| x > y),
        OpKind::GreaterOrEqual => zip_broadcast(a, b, |x, y| x >= y),
        _ => bail!("{kind} is not a comparison"),
    }
}

pub fn compare(kind: OpKind, a: &RtTensor, b: &RtTensor) -> OpResult<RtTensor> {
    if a.dtype() == DType::F8E4M3 && b.dtype() == DType::F8E4M3 {
        return compare(kind, &a.cast(DType::F32), &b.cast(DType::F32));
    }
    let out = with_pair!(a, b, (x, y) => RtTensor::Bool(compare_fn(kind, x, y)?));
    out.ok_or_else(|| op_err!("operand types differ: {} vs {}", a.dtype(), b.dtype()))
}

pub fn logic(kind: OpKind, a: &RtTensor, b: &RtTensor) -> OpResult<RtTensor> {
    let (RtTensor::Bool(x), RtTensor::Bool(y)) = (a, b) else {
        bail!("{kind} needs bool operands, got {} and {}", a.dtype(), b.dtype())
    };
    Ok(RtTensor::Bool(match kind {
        OpKind::And => zip_broadcast(x, y, |p, q| p & q)?,
        OpKind::Or => zip_broadcast(x, y, |p, q| p | q)?,
        OpKind::Xor => zip_broadcast(x, y, |p, q| p ^ q)?,
        _ => bail!("{kind} is not a logic op"),
    }))
}

/// Float types the unary math runs on (f32, f64).
pub trait FloatMath: num_traits::Float + Scalar {
    fn erf(self) -> Self;
    fn round_even(self) -> Self;
}

impl FloatMath for f32 {
    fn erf(self) -> Self {
        libm::erff(self)
    }
    fn round_even(self) -> Self {
        self.round_ties_even()
    }
}

impl FloatMath for f64 {
    fn erf(self) -> Self {
        libm::erf(self)
    }
    fn round_even(self) -> Self {
        self.round_ties_even()
    }
}

fn float_unary<T: FloatMath>(ctx: &OpCtx, kind: OpKind, a: &ArrayD<T>) -> OpResult<ArrayD<T>> {
    let c = |v: f64| T::from_f64(v);
    let (zero, one, half) = (T::zero(), T::one(), c(0.5));
    Ok(match kind {
        OpKind::Neg => par_map(a, |x| -x),
        OpKind::Abs => par_map(a, |x| x.abs()),
        OpKind::Sqrt => par_map(a, |x| x.sqrt()),
        OpKind::Reciprocal => par_map(a, |x| x.recip()),
        OpKind::Exp => par_map(a, |x| x.exp()),
        OpKind::Log => par_map(a, |x| x.ln()),
        OpKind::Sin => par_map(a, |x| x.sin()),
        OpKind::Cos => par_map(a, |x| x.cos()),
        OpKind::Erf => par_map(a, |x| x.erf()),
        OpKind::Tanh => par_map(a, |x| x.tanh()),
        OpKind::Sigmoid => par_map(a, |x| {
            if x >= zero {
                one / (one + (-x).exp())
            } else {
                let e = x.exp();
                e / (one + e)
            }
        }),
        OpKind::HardSigmoid => {
            let (alpha, beta) = (c(ctx.float("alpha", 0.2) as f64), c(ctx.float("beta", 0.5) as f64));
            par_map(a, |x| (alpha * x + beta).max(zero).min(one))
        }
        OpKind::Relu => par_map(a, |x| if x > zero || x.is_nan() { x } else { zero }),
        OpKind::LeakyRelu => {
            let alpha = c(ctx.float("alpha", 0.01) as f64);
            par_map(a, |x| if x >= zero { x } else { alpha * x })
        }
        OpKind::Gelu => match ctx.str("approximate", "none") {
            "tanh" => {
                let (k, b) = (c((2.0 / std::f64::consts::PI).sqrt()), c(0.044715));
                par_map(a, |x| half * x * (one + (k * (x + b * x * x * x)).tanh()))
            }
            "none" => {
                let r = c(std::f64::consts::FRAC_1_SQRT_2);
                par_map(a, |x| half * x * (one + (x * r).erf()))
            }
            other => bail!("unknown Gelu approximate '{other}'"),
        },
        OpKind::Softplus => par_map(a, |x| if x > zero { x + (-x).exp().ln_1p() } else { x.exp().ln_1p() }),
        OpKind::Floor => par_map(a, |x| x.floor()),
        OpKind::Ceil => par_map(a, |x| x.ceil()),
        OpKind::Round => par_map(a, |x| x.round_even()),
        OpKind::Sign => par_map(a, |x| {
            if x > zero {
                one
            } else if x < zero {
                -one
            } else {
                x
            }
        }),
        _ => bail!("{kind} is not a unary float op"),
    })
}

/// Unary ops on integers (Neg, Abs, Sign, Relu), computed in i64 and wrapped back.
fn int_unary(kind: OpKind, t: &RtTensor) -> OpResult<RtTensor> {
    let a = t.cast_array::<i64>();
    let out = match kind {
        OpKind::Neg => a.mapv(i64::wrapping_neg),
        OpKind::Abs => a.mapv(i64::wrapping_abs),
        OpKind::Sign => a.mapv(i64::signum),
        OpKind::Relu => a.mapv(|x| x.max(0)),
        _ => bail!("{kind} does not support {}", t.dtype()),
    };
    Ok(RtTensor::I64(out).cast(t.dtype()))
}

pub fn unary(ctx: &OpCtx, kind: OpKind, t: &RtTensor) -> OpResult<RtTensor> {
    match t {
        RtTensor::F32(a) => Ok(RtTensor::F32(float_unary(ctx, kind, a)?)),
        RtTensor::F64(a) => Ok(RtTensor::F64(float_unary(ctx, kind, a)?)),
        RtTensor::F16(_) | RtTensor::BF16(_) | RtTensor::F8E4M3(_) => {
            Ok(RtTensor::F32(float_unary(ctx, kind, &t.cast_array::<f32>())?).cast(t.dtype()))
        }
        RtTensor::Bool(_) => bail!("{kind} does not support bool"),
        _ => int_unary(kind, t),
    }
}

pub fn not(t: &RtTensor) -> OpResult<RtTensor> {
    match t {
        RtTensor::Bool(a) => Ok(RtTensor::Bool(a.mapv(|b| !b))),
        other => bail!("Not needs bool, got {}", other.dtype()),
    }
}

pub fn cast(ctx: &OpCtx, t: &RtTensor) -> OpResult<RtTensor> {
    let to = ctx
        .dtype_attr("to")
        .or_else(|| ctx.outputs.first().map(|o| o.ty.dtype))
        .ok_or_else(|| op_err!("attribute 'to' is missing"))?;
    Ok(t.cast_with(to, ctx.int("saturate", 1) != 0))
}

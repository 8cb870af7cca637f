//! Evaluation of single ops on constant tensors, for `fold-constants` and the e-graph's constant analysis.
//!
//! Covers the shape arithmetic ONNX exporters emit (shape, gather, concat, slice, unsqueeze, reshape,
//! range, comparisons, where, cast, ...) and elementwise math, with ONNX semantics: numpy broadcasting,
//! integer division truncating toward zero, Round half-to-even, negative axes and indices counted from
//! the end. Values are computed in f64 or i64 and converted to the result dtype once, which for + - * /
//! and sqrt gives the correctly rounded f32 result. Ops it does not know return `Ok(None)` (not folded).

use half::{bf16, f16};
use qcc_ir::{f32_to_f8e4m3, pack_nibbles, Attr, DType, Op, OpKind, Tensor, TensorError};

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Tensor(#[from] TensorError),
    #[error("{0}")]
    Invalid(String),
}

fn invalid<T>(msg: impl Into<String>) -> Result<T, EvalError> {
    Err(EvalError::Invalid(msg.into()))
}

/// Element values widened to f64 (float types) or i64 (integers and bool).
#[derive(Clone, Debug, PartialEq)]
enum Vals {
    F(Vec<f64>),
    I(Vec<i64>),
}

#[derive(Clone, Debug)]
struct Arr {
    dtype: DType,
    dims: Vec<usize>,
    vals: Vals,
}

impl Arr {
    fn from_tensor(t: &Tensor) -> Result<Arr, EvalError> {
        let vals = if t.dtype.is_float() {
            Vals::F(t.to_f32_vec().map(|v| v.into_iter().map(f64::from).collect())?)
        } else {
            Vals::I(t.to_i64_vec()?)
        };
        // f64 tensors keep full precision.
        let vals = if t.dtype == DType::F64 { Vals::F(t.to_vec::<f64>()?) } else { vals };
        Ok(Arr { dtype: t.dtype, dims: t.dims.clone(), vals })
    }

    fn ints(&self) -> Result<Vec<i64>, EvalError> {
        match &self.vals {
            Vals::I(v) => Ok(v.clone()),
            Vals::F(_) => invalid(format!("expected an integer tensor, got {}", self.dtype)),
        }
    }

    fn f64s(&self) -> Vec<f64> {
        match &self.vals {
            Vals::F(v) => v.clone(),
            Vals::I(v) => v.iter().map(|&x| x as f64).collect(),
        }
    }

    fn len(&self) -> usize {
        match &self.vals {
            Vals::F(v) => v.len(),
            Vals::I(v) => v.len(),
        }
    }

    /// Element `i` as a one-element `Vals` selector (used by data movement ops).
    fn gather(&self, idx: &[usize], dims: Vec<usize>) -> Arr {
        let vals = match &self.vals {
            Vals::F(v) => Vals::F(idx.iter().map(|&i| v[i]).collect()),
            Vals::I(v) => Vals::I(idx.iter().map(|&i| v[i]).collect()),
        };
        Arr { dtype: self.dtype, dims, vals }
    }

    fn to_tensor(&self) -> Result<Tensor, EvalError> {
        let dims = self.dims.clone();
        let f = || self.f64s();
        let i = || -> Vec<i64> {
            match &self.vals {
                Vals::I(v) => v.clone(),
                Vals::F(v) => v.iter().map(|&x| x as i64).collect(),
            }
        };
        Ok(match self.dtype {
            DType::F64 => Tensor::from_slice(dims, &f()),
            DType::F32 => Tensor::from_slice(dims, &f().into_iter().map(|x| x as f32).collect::<Vec<_>>()),
            DType::F16 => Tensor::from_slice(dims, &f().into_iter().map(f16::from_f64).collect::<Vec<_>>()),
            DType::BF16 => Tensor::from_slice(dims, &f().into_iter().map(bf16::from_f64).collect::<Vec<_>>()),
            DType::F8E4M3 => {
                let bytes: Vec<u8> = f().into_iter().map(|x| f32_to_f8e4m3(x as f32)).collect();
                Tensor::from_bytes(DType::F8E4M3, dims, bytes.into())?
            }
            DType::I64 => Tensor::from_slice(dims, &i()),
            DType::I32 => Tensor::from_slice(dims, &i().into_iter().map(|x| x as i32).collect::<Vec<_>>()),
            DType::I16 => Tensor::from_slice(dims, &i().into_iter().map(|x| x as i16).collect::<Vec<_>>()),
            DType::I8 => Tensor::from_slice(dims, &i().into_iter().map(|x| x as i8).collect::<Vec<_>>()),
            DType::U64 => Tensor::from_slice(dims, &i().into_iter().map(|x| x as u64).collect::<Vec<_>>()),
            DType::U32 => Tensor::from_slice(dims, &i().into_iter().map(|x| x as u32).collect::<Vec<_>>()),
            DType::U16 => Tensor::from_slice(dims, &i().into_iter().map(|x| x as u16).collect::<Vec<_>>()),
            DType::U8 => Tensor::from_slice(dims, &i().into_iter().map(|x| x as u8).collect::<Vec<_>>()),
            DType::Bool => {
                let bytes: Vec<u8> = i().into_iter().map(|x| u8::from(x != 0)).collect();
                Tensor::from_bytes(DType::Bool, dims, bytes.into())?
            }
            DType::I4 | DType::U4 => {
                let (lo, hi) = self.dtype.int_range().unwrap_or((0, 15));
                let vals = i().into_iter().map(|x| x.clamp(lo, hi));
                Tensor::from_bytes(self.dtype, dims, pack_nibbles(vals).into())?
            }
        })
    }
}

/// Converts values to `dtype` with ONNX Cast semantics (float -> int truncates, -> bool is `!= 0`).
fn cast(a: &Arr, dtype: DType) -> Arr {
    let vals = match (&a.vals, dtype.is_float()) {
        (Vals::F(v), true) => Vals::F(v.clone()),
        (Vals::I(v), true) => Vals::F(v.iter().map(|&x| x as f64).collect()),
        (Vals::F(v), false) if dtype == DType::Bool => Vals::I(v.iter().map(|&x| i64::from(x != 0.0)).collect()),
        (Vals::F(v), false) => Vals::I(v.iter().map(|&x| x as i64).collect()),
        (Vals::I(v), false) if dtype == DType::Bool => Vals::I(v.iter().map(|&x| i64::from(x != 0)).collect()),
        (Vals::I(v), false) => Vals::I(v.clone()),
    };
    // Round-trip through the target type so later ops see its precision (e.g. f32 -> f16 -> f32).
    let arr = Arr { dtype, dims: a.dims.clone(), vals };
    match arr.to_tensor().and_then(|t| Arr::from_tensor(&t)) {
        Ok(rounded) => rounded,
        Err(_) => arr,
    }
}

/// Results larger than this are never materialised (folding is for small tensors; this also bounds
/// memory when a malformed shape asks for an absurd size).
const MAX_ELEMENTS: usize = 1 << 26;

fn checked_numel(dims: &[usize]) -> Result<usize, EvalError> {
    dims.iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|&n| n <= MAX_ELEMENTS)
        .ok_or_else(|| EvalError::Invalid(format!("result shape {dims:?} is too large to fold")))
}

fn normalize_axis(axis: i64, rank: usize) -> Result<usize, EvalError> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if (0..r).contains(&a) {
        Ok(a as usize)
    } else {
        invalid(format!("axis {axis} is out of range for rank {rank}"))
    }
}

fn strides(dims: &[usize]) -> Vec<usize> {
    let mut s = vec![1; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * dims[i + 1];
    }
    s
}

fn broadcast_shape(shapes: &[&[usize]]) -> Result<Vec<usize>, EvalError> {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut out = vec![1; rank];
    for s in shapes {
        for (i, &d) in s.iter().enumerate() {
            let o = &mut out[rank - s.len() + i];
            if *o == 1 {
                *o = d;
            } else if d != 1 && d != *o {
                return invalid(format!("shapes {shapes:?} do not broadcast"));
            }
        }
    }
    Ok(out)
}

/// For each element of the broadcast `out` shape, the flat index into an input of shape `dims`.
fn broadcast_indices(dims: &[usize], out: &[usize]) -> Vec<usize> {
    let n: usize = out.iter().product();
    let in_strides = strides(dims);
    let offset = out.len() - dims.len();
    let out_strides = strides(out);
    (0..n)
        .map(|flat| {
            let mut idx = 0;
            for (k, (&d, &s)) in dims.iter().zip(&in_strides).enumerate() {
                let coord = (flat / out_strides[offset + k]) % out[offset + k];
                if d != 1 {
                    idx += coord * s;
                }
            }
            idx
        })
        .collect()
}

fn elementwise(
    inputs: &[Arr],
    out_dtype: DType,
    f: impl Fn(&[f64]) -> f64,
    i: impl Fn(&[i64]) -> Result<i64, EvalError>,
) -> Result<Arr, EvalError> {
    let shapes: Vec<&[usize]> = inputs.iter().map(|a| a.dims.as_slice()).collect();
    let out = broadcast_shape(&shapes)?;
    let idx: Vec<Vec<usize>> = inputs.iter().map(|a| broadcast_indices(&a.dims, &out)).collect();
    let n: usize = out.iter().product();
    let all_int = inputs.iter().all(|a| matches!(a.vals, Vals::I(_)));
    let vals = if all_int {
        let cols: Vec<Vec<i64>> = inputs.iter().map(|a| a.ints()).collect::<Result<_, _>>()?;
        let mut res = Vec::with_capacity(n);
        let mut args = vec![0; inputs.len()];
        for e in 0..n {
            for (k, c) in cols.iter().enumerate() {
                args[k] = c[idx[k][e]];
            }
            res.push(i(&args)?);
        }
        Vals::I(res)
    } else {
        let cols: Vec<Vec<f64>> = inputs.iter().map(Arr::f64s).collect();
        let mut args = vec![0.0; inputs.len()];
        Vals::F(
            (0..n)
                .map(|e| {
                    for (k, c) in cols.iter().enumerate() {
                        args[k] = c[idx[k][e]];
                    }
                    f(&args)
                })
                .collect(),
        )
    };
    let arr = Arr { dtype: out_dtype, dims: out, vals };
    Ok(if out_dtype.is_float() || out_dtype == DType::Bool { arr } else { cast(&arr, out_dtype) })
}

fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 {
        2.0 * (x / 2.0).round()
    } else {
        r
    }
}

fn ints_arg(op: &Op, inputs: &[Option<Arr>], port: usize, attr: &str) -> Result<Option<Vec<i64>>, EvalError> {
    match inputs.get(port).and_then(|a| a.as_ref()) {
        Some(a) => Ok(Some(a.ints()?)),
        None => Ok(op.ints(attr).map(<[i64]>::to_vec)),
    }
}

fn req(inputs: &[Option<Arr>], port: usize) -> Result<&Arr, EvalError> {
    match inputs.get(port) {
        Some(Some(a)) => Ok(a),
        _ => invalid(format!("input {port} is missing")),
    }
}

fn bool_of(b: bool) -> i64 {
    i64::from(b)
}

/// Evaluates `op` on constant inputs (`None` for absent optional inputs). `input_shapes` gives the static
/// shape of each input where known even if its value is not (for `shape`/`size`). Returns `Ok(None)` for
/// ops or dtypes this evaluator does not handle.
pub fn evaluate(
    op: &Op,
    inputs: &[Option<Tensor>],
    input_shapes: &[Option<Vec<usize>>],
) -> Result<Option<Vec<Tensor>>, EvalError> {
    use OpKind::*;
    // Shape and Size need only the static shape of their input.
    if matches!(op.kind, Shape | Size) {
        let Some(Some(dims)) = input_shapes.first() else { return Ok(None) };
        let t = if op.kind == Size {
            Tensor::scalar(dims.iter().product::<usize>() as i64)
        } else {
            let r = dims.len() as i64;
            let clampi = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
            let start = clampi(op.int("start").unwrap_or(0));
            let end = clampi(op.int("end").unwrap_or(r));
            let sel: Vec<i64> = dims[start..end.max(start)].iter().map(|&d| d as i64).collect();
            Tensor::from_slice(vec![sel.len()], &sel)
        };
        return Ok(Some(vec![t]));
    }
    let arrs: Vec<Option<Arr>> =
        inputs.iter().map(|t| t.as_ref().map(Arr::from_tensor).transpose()).collect::<Result<_, _>>()?;
    let present: Vec<Arr> = arrs.iter().flatten().cloned().collect();
    let first_dtype = present.first().map(|a| a.dtype).unwrap_or(DType::F32);
    let int_div = |a: i64, b: i64| if b == 0 { invalid("integer division by zero") } else { Ok(a.wrapping_div(b)) };
    let out = match op.kind {
        Identity => req(&arrs, 0)?.clone(),
        Add => elementwise(&present, first_dtype, |a| a[0] + a[1], |a| Ok(a[0].wrapping_add(a[1])))?,
        Sub => elementwise(&present, first_dtype, |a| a[0] - a[1], |a| Ok(a[0].wrapping_sub(a[1])))?,
        Mul => elementwise(&present, first_dtype, |a| a[0] * a[1], |a| Ok(a[0].wrapping_mul(a[1])))?,
        Div => elementwise(&present, first_dtype, |a| a[0] / a[1], |a| int_div(a[0], a[1]))?,
        Pow => elementwise(
            &present,
            first_dtype,
            |a| a[0].powf(a[1]),
            |a| Ok(a[0].wrapping_pow(a[1].clamp(0, 63) as u32)),
        )?,
        Max => elementwise(
            &present,
            first_dtype,
            |a| a.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            |a| Ok(a.iter().copied().max().unwrap_or(0)),
        )?,
        Min => elementwise(
            &present,
            first_dtype,
            |a| a.iter().copied().fold(f64::INFINITY, f64::min),
            |a| Ok(a.iter().copied().min().unwrap_or(0)),
        )?,
        Sum => elementwise(
            &present,
            first_dtype,
            |a| a.iter().sum(),
            |a| Ok(a.iter().fold(0i64, |s, &x| s.wrapping_add(x))),
        )?,
        Equal => {
            elementwise(&present, DType::Bool, |a| f64::from(u8::from(a[0] == a[1])), |a| Ok(bool_of(a[0] == a[1])))?
        }
        Less => elementwise(&present, DType::Bool, |a| f64::from(u8::from(a[0] < a[1])), |a| Ok(bool_of(a[0] < a[1])))?,
        LessOrEqual => {
            elementwise(&present, DType::Bool, |a| f64::from(u8::from(a[0] <= a[1])), |a| Ok(bool_of(a[0] <= a[1])))?
        }
        Greater => {
            elementwise(&present, DType::Bool, |a| f64::from(u8::from(a[0] > a[1])), |a| Ok(bool_of(a[0] > a[1])))?
        }
        GreaterOrEqual => {
            elementwise(&present, DType::Bool, |a| f64::from(u8::from(a[0] >= a[1])), |a| Ok(bool_of(a[0] >= a[1])))?
        }
        And => elementwise(
            &present,
            DType::Bool,
            |a| f64::from(u8::from(a[0] != 0.0 && a[1] != 0.0)),
            |a| Ok(bool_of(a[0] != 0 && a[1] != 0)),
        )?,
        Or => elementwise(
            &present,
            DType::Bool,
            |a| f64::from(u8::from(a[0] != 0.0 || a[1] != 0.0)),
            |a| Ok(bool_of(a[0] != 0 || a[1] != 0)),
        )?,
        Not => elementwise(&present, DType::Bool, |a| f64::from(u8::from(a[0] == 0.0)), |a| Ok(bool_of(a[0] == 0)))?,
        Where => {
            let (c, x, y) = (req(&arrs, 0)?, req(&arrs, 1)?, req(&arrs, 2)?);
            let c = Arr { vals: Vals::I(c.ints()?), ..c.clone() };
            let (x, y) = if x.dtype.is_float() { (cast(x, x.dtype), cast(y, x.dtype)) } else { (x.clone(), y.clone()) };
            let dtype = x.dtype;
            elementwise(
                &[c, x, y],
                dtype,
                |a| if a[0] != 0.0 { a[1] } else { a[2] },
                |a| Ok(if a[0] != 0 { a[1] } else { a[2] }),
            )?
        }
        Neg | Abs | Sqrt | Reciprocal | Exp | Log | Sin | Cos | Tanh | Sigmoid | Relu | Floor | Ceil | Round | Sign => {
            let a = req(&arrs, 0)?;
            let kind = op.kind;
            let f = move |x: f64| match kind {
                Neg => -x,
                Abs => x.abs(),
                Sqrt => x.sqrt(),
                Reciprocal => 1.0 / x,
                Exp => x.exp(),
                Log => x.ln(),
                Sin => x.sin(),
                Cos => x.cos(),
                Tanh => x.tanh(),
                Sigmoid => 1.0 / (1.0 + (-x).exp()),
                Relu => x.max(0.0),
                Floor => x.floor(),
                Ceil => x.ceil(),
                Round => round_half_even(x),
                _ => {
                    if x > 0.0 {
                        1.0
                    } else if x < 0.0 {
                        -1.0
                    } else {
                        0.0
                    }
                }
            };
            let i = move |x: &[i64]| match kind {
                Neg => Ok(x[0].wrapping_neg()),
                Abs => Ok(x[0].wrapping_abs()),
                Relu => Ok(x[0].max(0)),
                Sign => Ok(x[0].signum()),
                Floor | Ceil | Round => Ok(x[0]),
                _ => invalid(format!("{} of an integer tensor", kind.name())),
            };
            elementwise(std::slice::from_ref(a), a.dtype, move |x| f(x[0]), i)?
        }
        Cast => {
            let Some(to) = op.dtype("to") else { return invalid("cast has no 'to' attribute") };
            cast(req(&arrs, 0)?, to)
        }
        CastLike => cast(req(&arrs, 0)?, req(&arrs, 1)?.dtype),
        Reshape => {
            let a = req(&arrs, 0)?;
            let spec = req(&arrs, 1)?.ints()?;
            let allow_zero = op.int("allowzero").unwrap_or(0) != 0;
            let dims = reshape_dims(&a.dims, &spec, allow_zero)?;
            Arr { dims, ..a.clone() }
        }
        Flatten => {
            let a = req(&arrs, 0)?;
            let axis = op.int("axis").unwrap_or(1);
            let axis = if axis < 0 { axis + a.dims.len() as i64 } else { axis };
            if !(0..=a.dims.len() as i64).contains(&axis) {
                return invalid(format!("flatten axis {axis} out of range"));
            }
            let (l, r) = a.dims.split_at(axis as usize);
            Arr { dims: vec![l.iter().product(), r.iter().product()], ..a.clone() }
        }
        Unsqueeze => {
            let a = req(&arrs, 0)?;
            let Some(axes) = ints_arg(op, &arrs, 1, "axes")? else { return invalid("unsqueeze without axes") };
            let rank = a.dims.len() + axes.len();
            let mut axes: Vec<usize> = axes.iter().map(|&x| normalize_axis(x, rank)).collect::<Result<_, _>>()?;
            axes.sort_unstable();
            let mut dims = a.dims.clone();
            for ax in axes {
                dims.insert(ax, 1);
            }
            Arr { dims, ..a.clone() }
        }
        Squeeze => {
            let a = req(&arrs, 0)?;
            let dims = match ints_arg(op, &arrs, 1, "axes")? {
                None => a.dims.iter().copied().filter(|&d| d != 1).collect(),
                Some(axes) => {
                    let axes: Vec<usize> =
                        axes.iter().map(|&x| normalize_axis(x, a.dims.len())).collect::<Result<_, _>>()?;
                    if axes.iter().any(|&ax| a.dims[ax] != 1) {
                        return invalid("squeeze of a dimension that is not 1");
                    }
                    a.dims.iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, &d)| d).collect()
                }
            };
            Arr { dims, ..a.clone() }
        }
        Concat => {
            let axis = op.int("axis").unwrap_or(0);
            let rank = present.first().map(|a| a.dims.len()).unwrap_or(0);
            let axis = normalize_axis(axis, rank)?;
            concat(&present, axis)?
        }
        Gather => {
            let (data, indices) = (req(&arrs, 0)?, req(&arrs, 1)?);
            let axis = normalize_axis(op.int("axis").unwrap_or(0), data.dims.len())?;
            gather(data, indices, axis)?
        }
        Transpose => {
            let a = req(&arrs, 0)?;
            let rank = a.dims.len();
            let perm: Vec<usize> = match op.ints("perm") {
                Some(p) => p.iter().map(|&x| normalize_axis(x, rank)).collect::<Result<_, _>>()?,
                None => (0..rank).rev().collect(),
            };
            transpose(a, &perm)?
        }
        Slice => slice(&arrs)?,
        Range => {
            let (start, limit, delta) = (req(&arrs, 0)?, req(&arrs, 1)?, req(&arrs, 2)?);
            let scalar = |a: &Arr| {
                a.f64s().first().copied().ok_or_else(|| EvalError::Invalid("range of an empty tensor".into()))
            };
            let (s, l, d) = (scalar(start)?, scalar(limit)?, scalar(delta)?);
            if d == 0.0 {
                return invalid("range with delta 0");
            }
            let n = ((l - s) / d).ceil().max(0.0);
            if n > MAX_ELEMENTS as f64 {
                return invalid(format!("range of {n} elements is too large to fold"));
            }
            let n = n as usize;
            let vals: Vec<f64> = (0..n).map(|k| s + k as f64 * d).collect();
            let arr = Arr { dtype: DType::F64, dims: vec![n], vals: Vals::F(vals) };
            cast(&arr, start.dtype)
        }
        ConstantOfShape => {
            let dims: Vec<usize> = req(&arrs, 0)?.ints()?.iter().map(|&d| d.max(0) as usize).collect();
            let fill = match op.tensor("value") {
                Some(t) => Arr::from_tensor(t)?,
                None => Arr { dtype: DType::F32, dims: vec![1], vals: Vals::F(vec![0.0]) },
            };
            let n = checked_numel(&dims)?;
            fill.gather(&vec![0; n], dims)
        }
        Expand => {
            let a = req(&arrs, 0)?;
            let target: Vec<usize> = req(&arrs, 1)?.ints()?.iter().map(|&d| d.max(0) as usize).collect();
            let out = broadcast_shape(&[&a.dims, &target])?;
            checked_numel(&out)?;
            let idx = broadcast_indices(&a.dims, &out);
            a.gather(&idx, out)
        }
        _ => return Ok(None),
    };
    Ok(Some(vec![out.to_tensor()?]))
}

/// ONNX Reshape's target dims: 0 copies the input dim (unless `allow_zero`), one -1 is inferred.
pub fn reshape_dims(input: &[usize], spec: &[i64], allow_zero: bool) -> Result<Vec<usize>, EvalError> {
    let numel: usize = input.iter().product();
    let mut dims = Vec::with_capacity(spec.len());
    let mut infer = None;
    for (i, &s) in spec.iter().enumerate() {
        match s {
            -1 if infer.is_none() => {
                infer = Some(i);
                dims.push(1);
            }
            0 if !allow_zero => match input.get(i) {
                Some(&d) => dims.push(d),
                None => return invalid(format!("reshape dim {i} copies a missing input dim")),
            },
            s if s >= 0 => dims.push(s as usize),
            _ => return invalid(format!("reshape target {spec:?} is invalid")),
        }
    }
    let known: usize = dims.iter().product();
    if let Some(i) = infer {
        if known == 0 || !numel.is_multiple_of(known) {
            return invalid(format!("cannot reshape {input:?} to {spec:?}"));
        }
        dims[i] = numel / known;
    } else if known != numel {
        return invalid(format!("cannot reshape {input:?} ({numel} elements) to {spec:?}"));
    }
    Ok(dims)
}

fn concat(parts: &[Arr], axis: usize) -> Result<Arr, EvalError> {
    let Some(first) = parts.first() else { return invalid("concat of nothing") };
    let mut dims = first.dims.clone();
    for p in &parts[1..] {
        if p.dims.len() != dims.len() || p.dims.iter().enumerate().any(|(i, &d)| i != axis && d != dims[i]) {
            return invalid(format!("concat of {:?} and {:?} along axis {axis}", first.dims, p.dims));
        }
        dims[axis] += p.dims[axis];
    }
    let outer: usize = dims[..axis].iter().product();
    let all_int = parts.iter().all(|p| matches!(p.vals, Vals::I(_)));
    let mut fv = Vec::new();
    let mut iv = Vec::new();
    for o in 0..outer {
        for p in parts {
            let chunk: usize = p.dims[axis..].iter().product();
            let range = o * chunk..(o + 1) * chunk;
            if all_int {
                iv.extend_from_slice(&p.ints()?[range]);
            } else {
                fv.extend_from_slice(&p.f64s()[range]);
            }
        }
    }
    let vals = if all_int { Vals::I(iv) } else { Vals::F(fv) };
    Ok(Arr { dtype: first.dtype, dims, vals })
}

fn gather(data: &Arr, indices: &Arr, axis: usize) -> Result<Arr, EvalError> {
    let idx = indices.ints()?;
    let extent = data.dims[axis];
    let outer: usize = data.dims[..axis].iter().product();
    let inner: usize = data.dims[axis + 1..].iter().product();
    let mut flat = Vec::with_capacity(outer * idx.len() * inner);
    for o in 0..outer {
        for &i in &idx {
            let i = if i < 0 { i + extent as i64 } else { i };
            if !(0..extent as i64).contains(&i) {
                return invalid(format!("gather index {i} out of range for extent {extent}"));
            }
            for k in 0..inner {
                flat.push((o * extent + i as usize) * inner + k);
            }
        }
    }
    let mut dims = data.dims[..axis].to_vec();
    dims.extend_from_slice(&indices.dims);
    dims.extend_from_slice(&data.dims[axis + 1..]);
    Ok(data.gather(&flat, dims))
}

fn transpose(a: &Arr, perm: &[usize]) -> Result<Arr, EvalError> {
    let rank = a.dims.len();
    let mut seen = vec![false; rank];
    if perm.len() != rank || perm.iter().any(|&p| std::mem::replace(&mut seen[p], true)) {
        return invalid(format!("transpose perm {perm:?} is not a permutation of rank {rank}"));
    }
    let dims: Vec<usize> = perm.iter().map(|&p| a.dims[p]).collect();
    let in_strides = strides(&a.dims);
    let out_strides = strides(&dims);
    let n: usize = dims.iter().product();
    let idx: Vec<usize> =
        (0..n).map(|flat| (0..rank).map(|k| ((flat / out_strides[k]) % dims[k]) * in_strides[perm[k]]).sum()).collect();
    Ok(a.gather(&idx, dims))
}

fn slice(arrs: &[Option<Arr>]) -> Result<Arr, EvalError> {
    let data = req(arrs, 0)?;
    let rank = data.dims.len();
    let starts = req(arrs, 1)?.ints()?;
    let ends = req(arrs, 2)?.ints()?;
    let axes = match arrs.get(3).and_then(|a| a.as_ref()) {
        Some(a) => a.ints()?,
        None => (0..starts.len() as i64).collect(),
    };
    let steps = match arrs.get(4).and_then(|a| a.as_ref()) {
        Some(a) => a.ints()?,
        None => vec![1; starts.len()],
    };
    if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        return invalid("slice starts/ends/axes/steps differ in length");
    }
    // Per axis: the selected source coordinates.
    let mut sel: Vec<Vec<usize>> = data.dims.iter().map(|&d| (0..d).collect()).collect();
    for k in 0..starts.len() {
        let ax = normalize_axis(axes[k], rank)?;
        let d = data.dims[ax] as i64;
        let step = steps[k];
        if step == 0 {
            return invalid("slice step 0");
        }
        let norm = |v: i64| if v < 0 { v + d } else { v };
        let (s, e) = (norm(starts[k]), norm(ends[k]));
        let mut coords = Vec::new();
        if step > 0 {
            let (mut i, e) = (s.clamp(0, d), e.clamp(0, d));
            while i < e {
                coords.push(i as usize);
                i += step;
            }
        } else {
            let (mut i, e) = (s.clamp(-1, d - 1), e.clamp(-1, d - 1));
            while i > e {
                coords.push(i as usize);
                i += step;
            }
        }
        sel[ax] = coords;
    }
    let dims: Vec<usize> = sel.iter().map(Vec::len).collect();
    let in_strides = strides(&data.dims);
    let out_strides = strides(&dims);
    let n: usize = dims.iter().product();
    let idx: Vec<usize> =
        (0..n).map(|flat| (0..rank).map(|k| sel[k][(flat / out_strides[k]) % dims[k]] * in_strides[k]).sum()).collect();
    Ok(data.gather(&idx, dims))
}

/// Whether a tensor holds exactly the value `v` in every element (any numeric dtype).
pub fn is_all(t: &Tensor, v: f64) -> bool {
    match Arr::from_tensor(t) {
        Ok(a) => a.len() > 0 && a.f64s().iter().all(|&x| x == v),
        Err(_) => false,
    }
}

/// The attribute `name` of `op` as a list of ints (for passes that read `perm`, `axes`).
pub fn attr_ints(op: &Op, name: &str) -> Option<Vec<i64>> {
    match op.attr(name) {
        Some(Attr::Ints(v)) => Some(v.clone()),
        Some(Attr::Int(v)) => Some(vec![*v]),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval1(op: Op, inputs: &[Tensor]) -> Tensor {
        let ins: Vec<Option<Tensor>> = inputs.iter().cloned().map(Some).collect();
        let shapes: Vec<Option<Vec<usize>>> = inputs.iter().map(|t| Some(t.dims.clone())).collect();
        evaluate(&op, &ins, &shapes).unwrap().unwrap().remove(0)
    }

    #[test]
    fn broadcasting_arithmetic() {
        let a = Tensor::from_slice(vec![2, 3], &[1f32, 2., 3., 4., 5., 6.]);
        let b = Tensor::from_slice(vec![3], &[10f32, 20., 30.]);
        let r = eval1(Op::new(OpKind::Add), &[a, b]);
        assert_eq!(r.dims, vec![2, 3]);
        assert_eq!(r.to_vec::<f32>().unwrap(), vec![11., 22., 33., 14., 25., 36.]);
    }

    #[test]
    fn integer_division_truncates_and_zero_is_an_error() {
        let a = Tensor::from_slice(vec![2], &[-7i64, 7]);
        let b = Tensor::from_slice(vec![2], &[2i64, 2]);
        assert_eq!(eval1(Op::new(OpKind::Div), &[a.clone(), b]).to_vec::<i64>().unwrap(), vec![-3, 3]);
        let z = Tensor::from_slice(vec![2], &[0i64, 1]);
        assert!(evaluate(&Op::new(OpKind::Div), &[Some(a), Some(z)], &[None, None]).is_err());
    }

    #[test]
    fn shape_gather_concat_reshape_chain() {
        // shape(x[2,3,4]) -> gather idx 2 -> unsqueeze -> concat with [-1] -> reshape x to [-1, 4].
        let op = Op::new(OpKind::Shape);
        let s = evaluate(&op, &[None], &[Some(vec![2, 3, 4])]).unwrap().unwrap().remove(0);
        assert_eq!(s.to_vec::<i64>().unwrap(), vec![2, 3, 4]);
        let g = eval1(Op::new(OpKind::Gather), &[s, Tensor::scalar(-1i64)]);
        assert!(g.dims.is_empty());
        let u = eval1(Op::new(OpKind::Unsqueeze), &[g, Tensor::from_slice(vec![1], &[0i64])]);
        let c = eval1(Op::new(OpKind::Concat).with("axis", Attr::Int(0)), &[Tensor::from_slice(vec![1], &[-1i64]), u]);
        assert_eq!(c.to_vec::<i64>().unwrap(), vec![-1, 4]);
        assert_eq!(reshape_dims(&[2, 3, 4], &[-1, 4], false).unwrap(), vec![6, 4]);
        assert_eq!(reshape_dims(&[2, 3, 4], &[0, -1], false).unwrap(), vec![2, 12]);
        assert!(reshape_dims(&[2, 3, 4], &[5, -1], false).is_err());
    }

    #[test]
    fn transpose_slice_where_cast_round() {
        let a = Tensor::from_slice(vec![2, 3], &[0f32, 1., 2., 3., 4., 5.]);
        let t = eval1(Op::new(OpKind::Transpose).with("perm", Attr::Ints(vec![1, 0])), std::slice::from_ref(&a));
        assert_eq!(t.dims, vec![3, 2]);
        assert_eq!(t.to_vec::<f32>().unwrap(), vec![0., 3., 1., 4., 2., 5.]);
        let s = eval1(
            Op::new(OpKind::Slice),
            &[
                a,
                Tensor::from_slice(vec![1], &[-1i64]),
                Tensor::from_slice(vec![1], &[-4i64]),
                Tensor::from_slice(vec![1], &[1i64]),
                Tensor::from_slice(vec![1], &[-1i64]),
            ],
        );
        assert_eq!(s.dims, vec![2, 3]);
        assert_eq!(s.to_vec::<f32>().unwrap(), vec![2., 1., 0., 5., 4., 3.]);
        let r = eval1(Op::new(OpKind::Round), &[Tensor::from_slice(vec![4], &[0.5f32, 1.5, 2.5, -0.5])]);
        assert_eq!(r.to_vec::<f32>().unwrap(), vec![0., 2., 2., -0.]);
        let c = eval1(
            Op::new(OpKind::Cast).with("to", Attr::DType(DType::I32)),
            &[Tensor::from_slice(vec![2], &[-1.7f32, 2.9])],
        );
        assert_eq!(c.to_vec::<i32>().unwrap(), vec![-1, 2]);
        let cond = Tensor::from_bytes(DType::Bool, vec![2], vec![1u8, 0].into()).unwrap();
        let w = eval1(Op::new(OpKind::Where), &[cond, Tensor::from_slice(vec![2], &[1f32, 2.]), Tensor::scalar(9f32)]);
        assert_eq!(w.to_vec::<f32>().unwrap(), vec![1., 9.]);
    }

    #[test]
    fn range_and_constant_of_shape() {
        let r = eval1(Op::new(OpKind::Range), &[Tensor::scalar(1i64), Tensor::scalar(8i64), Tensor::scalar(3i64)]);
        assert_eq!(r.to_vec::<i64>().unwrap(), vec![1, 4, 7]);
        let c = eval1(
            Op::new(OpKind::ConstantOfShape).with("value", Attr::Tensor(Tensor::from_slice(vec![1], &[2i64]))),
            &[Tensor::from_slice(vec![2], &[2i64, 1])],
        );
        assert_eq!((c.dims.clone(), c.to_vec::<i64>().unwrap()), (vec![2, 1], vec![2, 2]));
    }
}

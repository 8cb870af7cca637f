//! Shape and data-movement ops: Shape, Reshape, Transpose, Squeeze/Unsqueeze, Flatten, Concat, Split,
//! Slice, Gather, GatherElements, Expand, Tile, Pad, ConstantOfShape, Range, Trilu. All are generic over
//! the element type; values are moved, never converted.

use crate::cpu::ops::{bail, broadcast_shapes, norm_axis, op_err, OpCtx, OpResult};
use crate::cpu::value::{map_any, standard_vec, with_any, RtTensor};
use ndarray::{ArrayD, ArrayViewD, Axis, Dimension, IxDyn, Slice};
use std::any::Any;

/// The array inside `t` when it holds elements of type `T` (callers check dtypes match first, which
/// tells apart variants sharing an element type, such as I8 and I4).
fn raw<T: 'static>(t: &RtTensor) -> Option<&ArrayD<T>> {
    with_any!(t, a => (a as &dyn Any).downcast_ref::<ArrayD<T>>())
}

/// Like [`raw`], with `T` taken from `_proto` (for use inside `map_any!`).
fn raw_like<'b, T: 'static>(_proto: &ArrayD<T>, t: &'b RtTensor) -> Option<ArrayViewD<'b, T>> {
    raw::<T>(t).map(|a| a.view())
}

fn ints(ctx: &OpCtx, i: usize, what: &str) -> OpResult<Vec<i64>> {
    ctx.input(i)?.to_i64_vec().ok_or_else(|| op_err!("{what} must be an integer tensor"))
}

fn dims_from(values: &[i64], what: &str) -> OpResult<Vec<usize>> {
    values.iter().map(|&d| usize::try_from(d).map_err(|_| op_err!("{what} has negative dimension {d}"))).collect()
}

/// `t` with a new shape of the same element count.
pub fn reshaped(t: &RtTensor, shape: &[usize]) -> OpResult<RtTensor> {
    if shape.iter().product::<usize>() != t.len() {
        bail!("cannot reshape {:?} ({} elements) to {shape:?}", t.shape(), t.len());
    }
    Ok(map_any!(t, a => ArrayD::from_shape_vec(IxDyn(shape), standard_vec(a)).map_err(|e| op_err!("{e}"))?))
}

pub fn shape_of(ctx: &OpCtx) -> OpResult<RtTensor> {
    let shape = ctx.input(0)?.shape();
    let r = shape.len() as i64;
    let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
    let start = clamp(ctx.int("start", 0));
    let end = clamp(ctx.int("end", r));
    let dims: Vec<i64> = if start < end { shape[start..end].iter().map(|&d| d as i64).collect() } else { vec![] };
    let n = dims.len();
    RtTensor::from_vec(&[n], dims).ok_or_else(|| op_err!("internal: shape"))
}

pub fn reshape(ctx: &OpCtx) -> OpResult<RtTensor> {
    let x = ctx.input(0)?;
    let spec = ints(ctx, 1, "shape")?;
    let allowzero = ctx.int("allowzero", 0) != 0;
    let mut out = Vec::with_capacity(spec.len());
    let mut infer = None;
    for (i, &d) in spec.iter().enumerate() {
        match d {
            0 if !allowzero => {
                out.push(*x.shape().get(i).ok_or_else(|| {
                    op_err!("shape {spec:?} copies dimension {i} of a rank-{} input", x.shape().len())
                })?)
            }
            -1 if infer.is_none() => {
                infer = Some(i);
                out.push(1);
            }
            d if d >= 0 => out.push(d as usize),
            _ => bail!("invalid target shape {spec:?}"),
        }
    }
    if let Some(i) = infer {
        let known: usize = out.iter().product();
        if known == 0 || x.len() % known != 0 {
            bail!("cannot infer -1 in {spec:?} for {:?}", x.shape());
        }
        out[i] = x.len() / known;
    }
    reshaped(x, &out)
}

pub fn transpose(ctx: &OpCtx) -> OpResult<RtTensor> {
    let x = ctx.input(0)?;
    let r = x.shape().len();
    let perm: Vec<usize> = match ctx.ints("perm") {
        Some(p) => p.iter().map(|&a| norm_axis(a, r)).collect::<OpResult<_>>()?,
        None => (0..r).rev().collect(),
    };
    let mut seen = vec![false; r];
    if perm.len() != r || perm.iter().any(|&a| std::mem::replace(&mut seen[a], true)) {
        bail!("perm {perm:?} is not a permutation of rank {r}");
    }
    Ok(x.permuted(&perm))
}

pub fn squeeze(ctx: &OpCtx) -> OpResult<RtTensor> {
    let x = ctx.input(0)?;
    let r = x.shape().len();
    let axes: Vec<usize> = match ctx.ints_input_or_attr(1, "axes")? {
        Some(a) => a.iter().map(|&a| norm_axis(a, r)).collect::<OpResult<_>>()?,
        None => (0..r).filter(|&i| x.shape()[i] == 1).collect(),
    };
    for &a in &axes {
        if x.shape()[a] != 1 {
            bail!("cannot squeeze axis {a} of size {}", x.shape()[a]);
        }
    }
    let shape: Vec<usize> = (0..r).filter(|i| !axes.contains(i)).map(|i| x.shape()[i]).collect();
    reshaped(x, &shape)
}

pub fn unsqueeze(ctx: &OpCtx) -> OpResult<RtTensor> {
    let x = ctx.input(0)?;
    let axes = ctx.ints_input_or_attr(1, "axes")?.ok_or_else(|| op_err!("axes are required"))?;
    let out_rank = x.shape().len() + axes.len();
    let mut axes: Vec<usize> = axes.iter().map(|&a| norm_axis(a, out_rank)).collect::<OpResult<_>>()?;
    axes.sort_unstable();
    if axes.windows(2).any(|w| w[0] == w[1]) {
        bail!("repeated axis in {axes:?}");
    }
    let mut src = x.shape().iter();
    let shape: Vec<usize> =
        (0..out_rank).map(|i| if axes.contains(&i) { 1 } else { src.next().copied().unwrap_or(1) }).collect();
    reshaped(x, &shape)
}

pub fn flatten(ctx: &OpCtx) -> OpResult<RtTensor> {
    let x = ctx.input(0)?;
    let r = x.shape().len() as i64;
    let axis = ctx.int("axis", 1);
    let axis = if axis < 0 { axis + r } else { axis };
    if !(0..=r).contains(&axis) {
        bail!("axis {} is out of range for rank {r}", ctx.int("axis", 1));
    }
    let outer: usize = x.shape()[..axis as usize].iter().product();
    let inner: usize = x.shape()[axis as usize..].iter().product();
    reshaped(x, &[outer, inner])
}

pub fn concat(ctx: &OpCtx) -> OpResult<RtTensor> {
    let inputs = ctx.present_inputs();
    let first = *inputs.first().ok_or_else(|| op_err!("needs at least one input"))?;
    let axis =
        norm_axis(ctx.op.int("axis").ok_or_else(|| op_err!("attribute 'axis' is required"))?, first.shape().len())?;
    if let Some(t) = inputs.iter().find(|t| t.dtype() != first.dtype()) {
        bail!("inputs mix {} and {}", first.dtype(), t.dtype());
    }
    Ok(map_any!(first, a => {
        let views: Vec<ArrayViewD<_>> =
            inputs.iter().map(|t| raw_like(a, t)).collect::<Option<_>>().ok_or_else(|| op_err!("internal: dtype"))?;
        ndarray::concatenate(Axis(axis), &views).map_err(|e| op_err!("shapes do not concatenate on axis {axis}: {e}"))?
    }))
}

fn slice_axis(t: &RtTensor, axis: usize, start: usize, end: usize) -> RtTensor {
    map_any!(t, a => a.slice_axis(Axis(axis), Slice::from(start..end)).to_owned())
}

pub fn split(ctx: &OpCtx) -> OpResult<Vec<RtTensor>> {
    let x = ctx.input(0)?;
    let axis = norm_axis(ctx.int("axis", 0), x.shape().len())?;
    let dim = x.shape()[axis];
    let sizes: Vec<usize> = match ctx.ints_input_or_attr(1, "split")? {
        Some(s) => dims_from(&s, "split")?,
        None => {
            let n = ctx.op.int("num_outputs").map(|n| n as usize).unwrap_or(ctx.outputs.len()).max(1);
            let chunk = dim.div_ceil(n);
            (0..n).map(|i| chunk.min(dim.saturating_sub(i * chunk))).collect()
        }
    };
    if sizes.iter().sum::<usize>() != dim {
        bail!("split sizes {sizes:?} do not add up to dimension {dim} of axis {axis}");
    }
    let mut start = 0;
    Ok(sizes
        .iter()
        .map(|&s| {
            let t = slice_axis(x, axis, start, start + s);
            start += s;
            t
        })
        .collect())
}

pub fn slice(ctx: &OpCtx) -> OpResult<RtTensor> {
    let x = ctx.input(0)?;
    let r = x.shape().len();
    let starts = ctx.ints_input_or_attr(1, "starts")?.ok_or_else(|| op_err!("starts are required"))?;
    let ends = ctx.ints_input_or_attr(2, "ends")?.ok_or_else(|| op_err!("ends are required"))?;
    let axes = match ctx.ints_input_or_attr(3, "axes")? {
        Some(a) => a,
        None => (0..starts.len() as i64).collect(),
    };
    let steps = match ctx.opt_input(4) {
        Some(t) => t.to_i64_vec().ok_or_else(|| op_err!("steps must be integers"))?,
        None => vec![1; starts.len()],
    };
    if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        bail!("starts {starts:?}, ends {ends:?}, axes {axes:?} and steps {steps:?} differ in length");
    }
    let mut slices = vec![Slice::from(..); r];
    for i in 0..starts.len() {
        let axis = norm_axis(axes[i], r)?;
        let dim = x.shape()[axis] as i64;
        let step = steps[i];
        if step == 0 {
            bail!("slice step is 0 on axis {axis}");
        }
        let mut s = if starts[i] < 0 { starts[i].saturating_add(dim) } else { starts[i] };
        let mut e = if ends[i] < 0 { ends[i].saturating_add(dim) } else { ends[i] };
        slices[axis] = if step > 0 {
            s = s.clamp(0, dim);
            e = e.clamp(0, dim);
            Slice::new(s as isize, Some(e.max(s) as isize), step as isize)
        } else if dim == 0 {
            Slice::new(0, Some(0), 1)
        } else {
            s = s.clamp(0, dim - 1);
            e = e.clamp(-1, dim - 1);
            let count = if s > e { (s - e + (-step) - 1) / (-step) } else { 0 };
            if count == 0 {
                Slice::new(0, Some(0), 1)
            } else {
                let last = s + (count - 1) * step;
                Slice::new(last as isize, Some(s as isize + 1), step as isize)
            }
        };
    }
    Ok(map_any!(x, a => {
        let mut v = a.view();
        for (axis, sl) in slices.iter().enumerate() {
            v.slice_axis_inplace(Axis(axis), *sl);
        }
        v.to_owned()
    }))
}

/// Indices as non-negative positions into a dimension of size `dim`.
fn resolve_indices(t: &RtTensor, dim: usize) -> OpResult<Vec<usize>> {
    let raw = t.to_i64_vec().ok_or_else(|| op_err!("indices must be integers, got {}", t.dtype()))?;
    raw.iter()
        .map(|&i| {
            let j = if i < 0 { i + dim as i64 } else { i };
            if j < 0 || j >= dim as i64 {
                Err(op_err!("index {i} is out of range for dimension {dim}"))
            } else {
                Ok(j as usize)
            }
        })
        .collect()
}

fn gather_impl<T: Clone>(a: &ArrayD<T>, axis: usize, idx: &[usize], idx_shape: &[usize]) -> OpResult<ArrayD<T>> {
    let shape = a.shape();
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let dim = shape[axis];
    let std = a.as_standard_layout();
    let src = std.as_slice().ok_or_else(|| op_err!("internal: layout"))?;
    let mut out = Vec::with_capacity(outer * idx.len() * inner);
    for o in 0..outer {
        for &i in idx {
            let at = (o * dim + i) * inner;
            out.extend_from_slice(&src[at..at + inner]);
        }
    }
    let mut out_shape = shape[..axis].to_vec();
    out_shape.extend_from_slice(idx_shape);
    out_shape.extend_from_slice(&shape[axis + 1..]);
    ArrayD::from_shape_vec(IxDyn(&out_shape), out).map_err(|e| op_err!("{e}"))
}

pub fn gather(ctx: &OpCtx) -> OpResult<RtTensor> {
    let (x, indices) = (ctx.input(0)?, ctx.input(1)?);
    let axis = norm_axis(ctx.int("axis", 0), x.shape().len())?;
    let idx = resolve_indices(indices, x.shape()[axis])?;
    Ok(map_any!(x, a => gather_impl(a, axis, &idx, indices.shape())?))
}

pub fn gather_elements(ctx: &OpCtx) -> OpResult<RtTensor> {
    let (x, indices) = (ctx.input(0)?, ctx.input(1)?);
    let r = x.shape().len();
    let axis = norm_axis(ctx.int("axis", 0), r)?;
    if indices.shape().len() != r {
        bail!("indices rank {} differs from data rank {r}", indices.shape().len());
    }
    let idx = resolve_indices(indices, x.shape()[axis])?;
    let idx_shape = indices.shape().to_vec();
    for (d, (&n, &m)) in idx_shape.iter().zip(x.shape()).enumerate() {
        if d != axis && n > m {
            bail!("indices shape {idx_shape:?} exceeds data shape {:?}", x.shape());
        }
    }
    Ok(map_any!(x, a => {
        let mut out = Vec::with_capacity(idx.len());
        for (pos, (coord, _)) in ndarray::indices(IxDyn(&idx_shape)).into_iter().zip(0..idx.len()).enumerate() {
            let mut c = coord.slice().to_vec();
            c[axis] = idx[pos];
            out.push(a[IxDyn(&c)]);
        }
        ArrayD::from_shape_vec(IxDyn(&idx_shape), out).map_err(|e| op_err!("{e}"))?
    }))
}

pub fn expand(ctx: &OpCtx) -> OpResult<RtTensor> {
    let x = ctx.input(0)?;
    let target = dims_from(&ints(ctx, 1, "shape")?, "shape")?;
    let shape = broadcast_shapes(x.shape(), &target)?;
    Ok(map_any!(x, a => a.broadcast(IxDyn(&shape)).ok_or_else(|| op_err!("cannot expand to {shape:?}"))?.to_owned()))
}

pub fn tile(ctx: &OpCtx) -> OpResult<RtTensor> {
    let x = ctx.input(0)?;
    let repeats = dims_from(&ints(ctx, 1, "repeats")?, "repeats")?;
    if repeats.len() != x.shape().len() {
        bail!("repeats {repeats:?} must have one entry per dimension of {:?}", x.shape());
    }
    let shape: Vec<usize> = x.shape().iter().zip(&repeats).map(|(d, r)| d * r).collect();
    let src = x.shape().to_vec();
    Ok(map_any!(x, a => ArrayD::from_shape_fn(IxDyn(&shape), |idx| {
        let c: Vec<usize> = idx.slice().iter().zip(&src).map(|(i, d)| i % d).collect();
        a[IxDyn(&c)]
    })))
}

/// Source coordinate of output coordinate `o` along an axis of size `dim` padded by `begin` (None:
/// outside, use the constant).
fn pad_source(o: i64, begin: i64, dim: i64, mode: &str) -> Option<usize> {
    let c = o - begin;
    if (0..dim).contains(&c) {
        return Some(c as usize);
    }
    if dim == 0 {
        return None;
    }
    match mode {
        "edge" => Some(c.clamp(0, dim - 1) as usize),
        "wrap" => Some(c.rem_euclid(dim) as usize),
        "reflect" => {
            if dim == 1 {
                return Some(0);
            }
            let period = 2 * (dim - 1);
            let m = c.rem_euclid(period);
            Some(if m >= dim { period - m } else { m } as usize)
        }
        _ => None,
    }
}

pub fn pad(ctx: &OpCtx) -> OpResult<RtTensor> {
    let x = ctx.input(0)?;
    let r = x.shape().len();
    let pads = ctx.ints_input_or_attr(1, "pads")?.ok_or_else(|| op_err!("pads are required"))?;
    let axes: Vec<usize> = match ctx.opt_input(3) {
        Some(t) => t
            .to_i64_vec()
            .ok_or_else(|| op_err!("axes must be integers"))?
            .iter()
            .map(|&a| norm_axis(a, r))
            .collect::<OpResult<_>>()?,
        None => (0..r).collect(),
    };
    if pads.len() != 2 * axes.len() {
        bail!("pads {pads:?} must have 2 x {} entries", axes.len());
    }
    let mode = ctx.str("mode", "constant");
    if !matches!(mode, "constant" | "reflect" | "edge" | "wrap") {
        bail!("unknown pad mode '{mode}'");
    }
    let mut begin = vec![0i64; r];
    let mut end = vec![0i64; r];
    for (i, &a) in axes.iter().enumerate() {
        begin[a] = pads[i];
        end[a] = pads[i + axes.len()];
    }
    let dims: Vec<i64> = x.shape().iter().map(|&d| d as i64).collect();
    let shape: Vec<usize> = (0..r)
        .map(|a| usize::try_from(dims[a] + begin[a] + end[a]).map_err(|_| op_err!("pads {pads:?} crop below zero")))
        .collect::<OpResult<_>>()?;
    if mode != "constant" && shape.iter().product::<usize>() > 0 && dims.contains(&0) {
        bail!("{mode} padding of an empty dimension");
    }
    let value = ctx.opt_input(2);
    if let Some(v) = value {
        if v.dtype() != x.dtype() {
            bail!("constant_value type {} differs from data type {}", v.dtype(), x.dtype());
        }
    }
    // The fill value: input 2, else the pre-opset-11 `value` attribute, else zero.
    let fill_t = match value {
        Some(v) if !v.is_empty() => v.clone(),
        _ => RtTensor::scalar(ctx.float("value", 0.0) as f64).cast(x.dtype()),
    };
    Ok(map_any!(x, a => {
        let fill = raw_like(a, &fill_t).and_then(|v| v.iter().next().cloned()).ok_or_else(|| op_err!("internal: fill"))?;
        ArrayD::from_shape_fn(IxDyn(&shape), |idx| {
            let mut src = Vec::with_capacity(r);
            for (ax, &o) in idx.slice().iter().enumerate() {
                match pad_source(o as i64, begin[ax], dims[ax], mode) {
                    Some(c) => src.push(c),
                    None => return fill,
                }
            }
            a[IxDyn(&src)]
        })
    }))
}

pub fn constant_of_shape(ctx: &OpCtx) -> OpResult<RtTensor> {
    let shape = dims_from(&ints(ctx, 0, "shape")?, "shape")?;
    let value = match ctx.op.tensor("value") {
        Some(t) => RtTensor::from_ir_tensor(t).map_err(|e| op_err!("value: {e}"))?,
        None => RtTensor::scalar(0f32),
    };
    Ok(
        map_any!(&value, a => ArrayD::from_elem(IxDyn(&shape), a.iter().next().cloned().ok_or_else(|| op_err!("value is empty"))?)),
    )
}

pub fn range(ctx: &OpCtx) -> OpResult<RtTensor> {
    let (start, limit, delta) = (ctx.input(0)?, ctx.input(1)?, ctx.input(2)?);
    let dtype = start.dtype();
    if dtype.is_float() {
        let (s, l, d) = (start.to_f64_vec(), limit.to_f64_vec(), delta.to_f64_vec());
        let (s, l, d) =
            (s.first().copied().unwrap_or(0.0), l.first().copied().unwrap_or(0.0), d.first().copied().unwrap_or(0.0));
        if d == 0.0 {
            bail!("delta is 0");
        }
        let n = ((l - s) / d).ceil().max(0.0) as usize;
        let values: Vec<f64> = (0..n).map(|i| s + i as f64 * d).collect();
        return Ok(RtTensor::from_vec(&[n], values).ok_or_else(|| op_err!("internal: range"))?.cast(dtype));
    }
    let get = |t: &RtTensor| {
        t.to_i64_vec().and_then(|v| v.first().copied()).ok_or_else(|| op_err!("range bounds must be scalars"))
    };
    let (s, l, d) = (get(start)?, get(limit)?, get(delta)?);
    if d == 0 {
        bail!("delta is 0");
    }
    let span = l as i128 - s as i128;
    let n = if (span > 0) == (d > 0) && span != 0 {
        ((span.abs() + d.abs() as i128 - 1) / d.abs() as i128) as usize
    } else {
        0
    };
    let values: Vec<i64> = (0..n as i64).map(|i| s.wrapping_add(i.wrapping_mul(d))).collect();
    Ok(RtTensor::from_vec(&[n], values).ok_or_else(|| op_err!("internal: range"))?.cast(dtype))
}

pub fn trilu(ctx: &OpCtx) -> OpResult<RtTensor> {
    let x = ctx.input(0)?;
    let r = x.shape().len();
    if r < 2 {
        bail!("Trilu needs rank >= 2, got {:?}", x.shape());
    }
    let k = match ctx.opt_input(1) {
        Some(t) => {
            t.to_i64_vec().and_then(|v| v.first().copied()).ok_or_else(|| op_err!("k must be an integer scalar"))?
        }
        None => 0,
    };
    let upper = ctx.int("upper", 1) != 0;
    let zero = RtTensor::scalar(0u8).cast(x.dtype());
    Ok(map_any!(x, a => {
        let z = raw_like(a, &zero).and_then(|v| v.iter().next().cloned()).ok_or_else(|| op_err!("internal: zero"))?;
        let mut out = a.to_owned();
        for (idx, v) in out.indexed_iter_mut() {
            let (i, j) = (idx[r - 2] as i64, idx[r - 1] as i64);
            let keep = if upper { j - i >= k } else { j - i <= k };
            if !keep {
                *v = z;
            }
        }
        out
    }))
}

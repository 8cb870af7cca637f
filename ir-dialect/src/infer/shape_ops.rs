//! Inference rules for shape and data-movement ops (Shape, Reshape, Slice, Concat, ...) and vision ops
//! (Conv, pooling, Resize).

use super::dims::{broadcast_shapes, dim_product, dim_quotient, dim_sum, unify_dim};
use super::values::{range_len, slice_len, SymInt};
use super::{Ctx, InferError};
use crate::{DType, Dim, Op, OpKind, Shape, TensorType};

type Out = Result<Option<Vec<TensorType>>, InferError>;

/// Rules for the ops this module owns; `Ok(None)` for the others.
pub fn infer(ctx: &Ctx<'_>) -> Out {
    use OpKind::*;
    let one = |dtype: DType, shape: Option<crate::Shape>| Ok(Some(vec![TensorType { dtype, shape }]));
    match ctx.node.op.kind {
        Shape => {
            let len = match ctx.shape(0)? {
                Some(s) => {
                    let (start, end) = shape_range(&ctx.node.op, s.rank());
                    Dim::Known((end - start) as u64)
                }
                None => Dim::Unknown,
            };
            one(DType::I64, Some(crate::Shape(vec![len])))
        }
        Size => one(DType::I64, Some(crate::Shape(vec![]))),
        Reshape => one(ctx.req(0)?.dtype, reshape(ctx)?),
        Transpose => {
            let t = ctx.req(0)?;
            let Some(s) = &t.shape else { return one(t.dtype, None) };
            let perm: Vec<i64> = match ctx.node.op.ints("perm") {
                Some(p) => p.to_vec(),
                None => (0..s.rank() as i64).rev().collect(),
            };
            let mut seen = vec![false; s.rank()];
            let mut dims = Vec::with_capacity(s.rank());
            for &p in &perm {
                let i = usize::try_from(p).ok().filter(|&i| i < s.rank() && !seen[i]);
                let Some(i) = i else {
                    return Err(ctx.err(format!("perm {perm:?} is not a permutation of rank {}", s.rank())));
                };
                seen[i] = true;
                dims.push(s.0[i].clone());
            }
            if perm.len() != s.rank() {
                return Err(ctx.err(format!("perm {perm:?} is not a permutation of rank {}", s.rank())));
            }
            one(t.dtype, Some(crate::Shape(dims)))
        }
        Squeeze => one(ctx.req(0)?.dtype, squeeze(ctx)?),
        Unsqueeze => one(ctx.req(0)?.dtype, unsqueeze(ctx)?),
        Flatten => {
            let t = ctx.req(0)?;
            let Some(s) = &t.shape else {
                return one(t.dtype, Some(crate::Shape(vec![Dim::Unknown, Dim::Unknown])));
            };
            let axis = ctx.int_attr("axis", 1);
            let r = s.rank() as i64;
            let a = if axis < 0 { axis + r } else { axis };
            if !(0..=r).contains(&a) {
                return Err(ctx.err(format!("axis {axis} is out of range for rank {r}")));
            }
            let (outer, inner) = s.0.split_at(a as usize);
            one(t.dtype, Some(crate::Shape(vec![dim_product(outer), dim_product(inner)])))
        }
        Concat => concat(ctx),
        Split => split(ctx),
        Slice => one(ctx.req(0)?.dtype, slice(ctx)?),
        Gather => {
            let (data, indices) = (ctx.req(0)?, ctx.req(1)?);
            if !indices.dtype.is_int() {
                return Err(ctx.err(format!("indices must be integers, not {}", indices.dtype)));
            }
            let (Some(d), Some(i)) = (&data.shape, &indices.shape) else { return one(data.dtype, None) };
            let axis = ctx.axis(ctx.int_attr("axis", 0), d.rank())?;
            let mut dims = d.0[..axis].to_vec();
            dims.extend(i.0.iter().cloned());
            dims.extend(d.0[axis + 1..].iter().cloned());
            one(data.dtype, Some(crate::Shape(dims)))
        }
        GatherElements => {
            let (data, indices) = (ctx.req(0)?, ctx.req(1)?);
            if !indices.dtype.is_int() {
                return Err(ctx.err(format!("indices must be integers, not {}", indices.dtype)));
            }
            one(data.dtype, indices.shape.clone())
        }
        Expand => {
            let t = ctx.req(0)?;
            let target = target_dims(ctx, 1);
            let shape = match (&t.shape, target) {
                (Some(s), Some(target)) => Some(
                    broadcast_shapes(s, &crate::Shape(target.clone()))
                        .map_err(|(a, b)| ctx.err(format!("cannot expand [{s}] to {target:?}: {a} vs {b}")))?,
                ),
                (Some(s), None) => shape_len(ctx, 1).map(|n| crate::Shape(vec![Dim::Unknown; n.max(s.rank())])),
                (None, _) => None,
            };
            one(t.dtype, shape)
        }
        Tile => {
            let t = ctx.req(0)?;
            let Some(s) = &t.shape else { return one(t.dtype, None) };
            let dims = match ctx.contents(1) {
                Some(reps) => {
                    if reps.len() != s.rank() {
                        return Err(ctx.err(format!("{} repeats for rank {}", reps.len(), s.rank())));
                    }
                    s.0.iter()
                        .zip(reps)
                        .map(|(d, r)| match (d, r) {
                            (_, SymInt::Known(1)) => d.clone(),
                            (Dim::Known(n), SymInt::Known(r)) if *r >= 0 => {
                                n.checked_mul(*r as u64).map(Dim::Known).unwrap_or(Dim::Unknown)
                            }
                            _ => Dim::Unknown,
                        })
                        .collect()
                }
                None => vec![Dim::Unknown; s.rank()],
            };
            one(t.dtype, Some(crate::Shape(dims)))
        }
        Pad => one(ctx.req(0)?.dtype, pad(ctx)?),
        ConstantOfShape => {
            let dtype = ctx.node.op.tensor("value").map(|t| t.dtype).unwrap_or(DType::F32);
            let shape = match target_dims(ctx, 0) {
                Some(dims) => Some(crate::Shape(dims)),
                None => shape_len(ctx, 0).map(|n| crate::Shape(vec![Dim::Unknown; n])),
            };
            one(dtype, shape)
        }
        Range => {
            let dtype = ctx.req(0)?.dtype;
            for port in [1, 2] {
                if ctx.req(port)?.dtype != dtype {
                    return Err(ctx.err(format!("input {port} is {} but start is {dtype}", ctx.req(port)?.dtype)));
                }
            }
            let len = if dtype.is_int() {
                match (ctx.scalar(0), ctx.scalar(1), ctx.scalar(2)) {
                    (Some(s), Some(l), Some(d)) => {
                        Dim::Known(range_len(s, l, d).ok_or_else(|| ctx.err("delta is zero"))?)
                    }
                    _ => Dim::Unknown,
                }
            } else {
                let f = |p| ctx.constant_floats(p).and_then(|v| (v.len() == 1).then(|| v[0] as f64));
                match (f(0), f(1), f(2)) {
                    (Some(s), Some(l), Some(d)) if d != 0.0 => Dim::Known(((l - s) / d).ceil().max(0.0) as u64),
                    _ => Dim::Unknown,
                }
            };
            one(dtype, Some(crate::Shape(vec![len])))
        }
        Conv => conv(ctx),
        MaxPool | AveragePool => {
            let t = ctx.req(0)?;
            let Some(s) = &t.shape else { return one(t.dtype, None) };
            if s.rank() < 3 {
                return Err(ctx.err(format!("input must be [N, C, spatial..], got [{s}]")));
            }
            let kernel =
                ctx.node.op.ints("kernel_shape").ok_or_else(|| ctx.err("has no attribute 'kernel_shape'"))?.to_vec();
            let mut dims = s.0[..2].to_vec();
            dims.extend(window_dims(ctx, &s.0[2..], &kernel)?);
            one(t.dtype, Some(crate::Shape(dims)))
        }
        GlobalAveragePool => {
            let t = ctx.req(0)?;
            let shape = t.shape.as_ref().map(|s| {
                crate::Shape(
                    s.0.iter().enumerate().map(|(i, d)| if i < 2 { d.clone() } else { Dim::Known(1) }).collect(),
                )
            });
            one(t.dtype, shape)
        }
        Resize => one(ctx.req(0)?.dtype, resize(ctx)?),
        _ => Ok(None),
    }
}

/// `[start, end)` of Shape's `start`/`end` attributes, clamped to the rank as the spec says.
pub fn shape_range(op: &Op, rank: usize) -> (usize, usize) {
    let r = rank as i64;
    let fix = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
    let start = fix(op.int("start").unwrap_or(0));
    let end = fix(op.int("end").unwrap_or(r));
    (start, end.max(start))
}

/// Element count of a 1-D shape input, when its type says it.
fn shape_len(ctx: &Ctx<'_>, port: usize) -> Option<usize> {
    match ctx.ty(port)?.shape.as_ref()?.dims() {
        [Dim::Known(n)] => usize::try_from(*n).ok(),
        _ => None,
    }
}

/// A shape given as a tensor input (Expand, ConstantOfShape), as dims.
fn target_dims(ctx: &Ctx<'_>, port: usize) -> Option<Vec<Dim>> {
    Some(ctx.contents(port)?.iter().map(SymInt::to_dim).collect())
}

fn reshape(ctx: &Ctx<'_>) -> Result<Option<Shape>, InferError> {
    let input = ctx.shape(0)?;
    let Some(target) = ctx.contents(1) else {
        return Ok(shape_len(ctx, 1).map(|n| Shape(vec![Dim::Unknown; n])));
    };
    let allow_zero = ctx.int_attr("allowzero", 0) != 0;
    let mut dims = Vec::with_capacity(target.len());
    let mut infer_at = None;
    for (i, t) in target.iter().enumerate() {
        dims.push(match t {
            SymInt::Known(0) if !allow_zero => match input {
                Some(s) if i < s.rank() => s.0[i].clone(),
                Some(s) => {
                    return Err(ctx.err(format!("shape entry {i} copies a dimension of a rank-{} input", s.rank())))
                }
                None => Dim::Unknown,
            },
            SymInt::Known(-1) => {
                if infer_at.replace(i).is_some() {
                    return Err(ctx.err("shape has more than one -1"));
                }
                Dim::Unknown
            }
            SymInt::Known(n) if *n < 0 => return Err(ctx.err(format!("shape entry {i} is {n}"))),
            other => other.to_dim(),
        });
    }
    if let (Some(i), Some(s)) = (infer_at, input) {
        let others: Vec<Dim> = dims.iter().enumerate().filter(|&(j, _)| j != i).map(|(_, d)| d.clone()).collect();
        dims[i] = dim_quotient(&s.0, &others);
    }
    if let (Some(s), Dim::Known(a), Dim::Known(b)) =
        (input, dim_product(input.map(|s| s.dims()).unwrap_or(&[])), dim_product(&dims))
    {
        if a != b {
            return Err(ctx.err(format!("cannot reshape [{s}] ({a} elements) to [{}] ({b} elements)", Shape(dims))));
        }
    }
    Ok(Some(Shape(dims)))
}

/// Axes given as input 1 (opset 13+) or attribute `axes`: `Some(None)` when the input exists but its values
/// are not known, `None` when no axes are given at all.
fn axes_arg(ctx: &Ctx<'_>) -> Option<Option<Vec<i64>>> {
    if ctx.input(1).is_some() {
        return Some(ctx.known_ints(1));
    }
    ctx.node.op.ints("axes").map(|a| Some(a.to_vec()))
}

fn normalize_axes(ctx: &Ctx<'_>, axes: &[i64], rank: usize) -> Result<Vec<usize>, InferError> {
    let mut out = Vec::with_capacity(axes.len());
    for &a in axes {
        let a = ctx.axis(a, rank)?;
        if out.contains(&a) {
            return Err(ctx.err(format!("axis {a} is repeated")));
        }
        out.push(a);
    }
    Ok(out)
}

fn squeeze(ctx: &Ctx<'_>) -> Result<Option<Shape>, InferError> {
    let Some(s) = ctx.shape(0)? else { return Ok(None) };
    match axes_arg(ctx) {
        Some(Some(axes)) => {
            let axes = normalize_axes(ctx, &axes, s.rank())?;
            for &a in &axes {
                if matches!(s.0[a], Dim::Known(n) if n != 1) {
                    return Err(ctx.err(format!("cannot squeeze axis {a} of extent {}", s.0[a])));
                }
            }
            Ok(Some(Shape(s.0.iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, d)| d.clone()).collect())))
        }
        Some(None) => Ok(None),
        // Without axes every extent-1 axis goes, which is only knowable when all extents are known.
        None if s.as_known().is_some() => {
            Ok(Some(Shape(s.0.iter().filter(|d| **d != Dim::Known(1)).cloned().collect())))
        }
        None => Ok(None),
    }
}

fn unsqueeze(ctx: &Ctx<'_>) -> Result<Option<Shape>, InferError> {
    let s = ctx.shape(0)?;
    match axes_arg(ctx) {
        Some(Some(axes)) => {
            let Some(s) = s else { return Ok(None) };
            let rank = s.rank() + axes.len();
            let axes = normalize_axes(ctx, &axes, rank)?;
            let mut rest = s.0.iter();
            let dims = (0..rank)
                .map(|i| if axes.contains(&i) { Dim::Known(1) } else { rest.next().cloned().unwrap_or(Dim::Unknown) })
                .collect();
            Ok(Some(Shape(dims)))
        }
        Some(None) => Ok(match (s, shape_len(ctx, 1)) {
            (Some(s), Some(n)) => Some(Shape(vec![Dim::Unknown; s.rank() + n])),
            _ => None,
        }),
        None => Err(ctx.err("has no axes")),
    }
}

fn concat(ctx: &Ctx<'_>) -> Out {
    let dtype = ctx.req(0)?.dtype;
    let axis = ctx.node.op.int("axis").ok_or_else(|| ctx.err("has no attribute 'axis'"))?;
    let mut rank = None;
    for p in 0..ctx.num_inputs() {
        let t = ctx.req(p)?;
        if t.dtype != dtype {
            return Err(ctx.err(format!("input {p} is {} but input 0 is {dtype}", t.dtype)));
        }
        if let Some(s) = &t.shape {
            match rank {
                Some(r) if r != s.rank() => {
                    return Err(ctx.err(format!("input {p} has rank {} but earlier inputs have rank {r}", s.rank())));
                }
                _ => rank = Some(s.rank()),
            }
        }
    }
    let Some(rank) = rank else { return Ok(Some(vec![TensorType::unranked(dtype)])) };
    let axis = ctx.axis(axis, rank)?;
    let mut dims: Vec<Dim> = vec![Dim::Unknown; rank];
    let mut parts = Vec::new();
    let mut all_ranked = true;
    for p in 0..ctx.num_inputs() {
        let Some(s) = &ctx.req(p)?.shape else {
            all_ranked = false;
            continue;
        };
        for (i, d) in s.0.iter().enumerate() {
            if i == axis {
                parts.push(d.clone());
            } else {
                dims[i] = unify_dim(&dims[i], d).ok_or_else(|| {
                    ctx.err(format!("input {p} has extent {d} on axis {i} where others have {}", dims[i]))
                })?;
            }
        }
    }
    dims[axis] = if all_ranked { dim_sum(&parts) } else { Dim::Unknown };
    Ok(Some(vec![TensorType::new(dtype, Shape(dims))]))
}

fn split(ctx: &Ctx<'_>) -> Out {
    let t = ctx.req(0)?;
    let count = ctx.node.outputs.len();
    let Some(s) = &t.shape else { return Ok(Some(vec![TensorType::unranked(t.dtype); count])) };
    let axis = ctx.axis(ctx.int_attr("axis", 0), s.rank())?;
    let extent = &s.0[axis];
    let sizes: Option<Vec<Dim>> = if ctx.input(1).is_some() {
        ctx.known_ints(1).map(|v| v.into_iter().map(|n| SymInt::Known(n).to_dim()).collect())
    } else if let Some(split) = ctx.node.op.ints("split") {
        Some(split.iter().map(|&n| SymInt::Known(n).to_dim()).collect())
    } else {
        let parts = ctx.int_attr("num_outputs", count as i64);
        if parts as usize != count || parts <= 0 {
            return Err(ctx.err(format!("num_outputs is {parts} but the node has {count} outputs")));
        }
        let parts = parts as u64;
        Some(match extent {
            // Opset 18: chunks of ceil(n / parts), the last one smaller.
            Dim::Known(n) => {
                let chunk = n.div_ceil(parts);
                (0..parts).map(|i| Dim::Known(chunk.min(n.saturating_sub(i.saturating_mul(chunk))))).collect()
            }
            _ => vec![dim_quotient(std::slice::from_ref(extent), &[Dim::Known(parts)]); count],
        })
    };
    let sizes = sizes.unwrap_or_else(|| vec![Dim::Unknown; count]);
    if sizes.len() != count {
        return Err(ctx.err(format!("{} split sizes for {count} outputs", sizes.len())));
    }
    if let (Dim::Known(n), Dim::Known(total)) = (extent, dim_sum(&sizes)) {
        if *n != total {
            return Err(ctx.err(format!("split sizes sum to {total} but axis {axis} has extent {n}")));
        }
    }
    let out = sizes
        .into_iter()
        .map(|d| {
            let mut dims = s.0.clone();
            dims[axis] = d;
            TensorType::new(t.dtype, Shape(dims))
        })
        .collect();
    Ok(Some(out))
}

/// Whether `end` is one of the "to the end" sentinels exporters use (INT_MAX, INT64_MAX).
fn is_open_end(end: i64) -> bool {
    end >= i32::MAX as i64
}

fn slice(ctx: &Ctx<'_>) -> Result<Option<Shape>, InferError> {
    let Some(s) = ctx.shape(0)? else { return Ok(None) };
    let starts = ctx.known_ints(1);
    let ends = ctx.known_ints(2);
    let axes: Option<Vec<i64>> = match ctx.input(3) {
        Some(_) => ctx.known_ints(3),
        None => starts.as_ref().map(|st| (0..st.len() as i64).collect()),
    };
    let Some(axes) = axes else { return Ok(Some(Shape(vec![Dim::Unknown; s.rank()]))) };
    let axes = normalize_axes(ctx, &axes, s.rank())?;
    let steps = match ctx.input(4) {
        Some(_) => ctx.known_ints(4),
        None => Some(vec![1; axes.len()]),
    };
    let mut dims = s.0.clone();
    let (Some(starts), Some(ends), Some(steps)) = (starts, ends, steps) else {
        for &a in &axes {
            dims[a] = Dim::Unknown;
        }
        return Ok(Some(Shape(dims)));
    };
    if starts.len() != axes.len() || ends.len() != axes.len() || steps.len() != axes.len() {
        return Err(ctx.err(format!(
            "starts, ends, axes and steps have different lengths ({}, {}, {}, {})",
            starts.len(),
            ends.len(),
            axes.len(),
            steps.len()
        )));
    }
    for (k, &a) in axes.iter().enumerate() {
        let (start, end, step) = (starts[k], ends[k], steps[k]);
        if step == 0 {
            return Err(ctx.err("slice step is 0"));
        }
        dims[a] = match &s.0[a] {
            Dim::Known(n) => match i64::try_from(*n).ok().and_then(|n| slice_len(n, start, end, step)) {
                Some(len) => Dim::Known(len),
                None => Dim::Unknown,
            },
            d @ Dim::Sym(_) if step == 1 && start == 0 && is_open_end(end) => d.clone(),
            d @ Dim::Sym(_) if step == -1 && start == -1 && end <= -(i32::MAX as i64) => d.clone(),
            _ => Dim::Unknown,
        };
    }
    Ok(Some(Shape(dims)))
}

fn pad(ctx: &Ctx<'_>) -> Result<Option<Shape>, InferError> {
    let Some(s) = ctx.shape(0)? else { return Ok(None) };
    let pads = if ctx.input(1).is_some() { ctx.known_ints(1) } else { ctx.node.op.ints("pads").map(<[i64]>::to_vec) };
    let axes: Vec<usize> = match ctx.input(3) {
        Some(_) => match ctx.known_ints(3) {
            Some(a) => normalize_axes(ctx, &a, s.rank())?,
            None => return Ok(Some(Shape(vec![Dim::Unknown; s.rank()]))),
        },
        None => (0..s.rank()).collect(),
    };
    let Some(pads) = pads else {
        let mut dims = s.0.clone();
        for &a in &axes {
            dims[a] = Dim::Unknown;
        }
        return Ok(Some(Shape(dims)));
    };
    if pads.len() != 2 * axes.len() {
        return Err(ctx.err(format!("{} pads for {} axes", pads.len(), axes.len())));
    }
    let mut dims = s.0.clone();
    for (k, &a) in axes.iter().enumerate() {
        let (begin, end) = (pads[k], pads[k + axes.len()]);
        dims[a] = match &s.0[a] {
            Dim::Known(n) => {
                let total = *n as i128 + begin as i128 + end as i128;
                if total < 0 {
                    return Err(ctx.err(format!("pads {begin}, {end} leave axis {a} of extent {n} negative")));
                }
                u64::try_from(total).map(Dim::Known).unwrap_or(Dim::Unknown)
            }
            d if begin == 0 && end == 0 => d.clone(),
            _ => Dim::Unknown,
        };
    }
    Ok(Some(Shape(dims)))
}

fn conv(ctx: &Ctx<'_>) -> Out {
    let (x, w) = (ctx.req(0)?, ctx.req(1)?);
    if x.dtype != w.dtype {
        return Err(ctx.err(format!("input is {} but weight is {}", x.dtype, w.dtype)));
    }
    let (Some(xs), Some(ws)) = (&x.shape, &w.shape) else { return Ok(Some(vec![TensorType::unranked(x.dtype)])) };
    if xs.rank() < 3 || ws.rank() != xs.rank() {
        return Err(ctx.err(format!("input [{xs}] and weight [{ws}] must be [N, C, ..] and [M, C/group, ..]")));
    }
    let group = ctx.int_attr("group", 1);
    if let (Dim::Known(c), Dim::Known(cw)) = (&xs.0[1], &ws.0[1]) {
        if group <= 0 || Some(*c) != cw.checked_mul(group as u64) {
            return Err(ctx.err(format!("input has {c} channels but weight expects {cw} x group {group}")));
        }
    }
    let kernel: Vec<i64> = match ctx.node.op.ints("kernel_shape") {
        Some(k) => k.to_vec(),
        None => ws.0[2..].iter().map(|d| d.known().map(|n| n as i64).unwrap_or(-1)).collect(),
    };
    let mut dims = vec![xs.0[0].clone(), ws.0[0].clone()];
    if kernel.iter().any(|&k| k < 0) {
        dims.extend(std::iter::repeat_n(Dim::Unknown, xs.rank() - 2));
    } else {
        dims.extend(window_dims(ctx, &xs.0[2..], &kernel)?);
    }
    Ok(Some(vec![TensorType::new(x.dtype, Shape(dims))]))
}

/// Output extents of a sliding window (Conv, MaxPool, AveragePool) over `spatial`.
fn window_dims(ctx: &Ctx<'_>, spatial: &[Dim], kernel: &[i64]) -> Result<Vec<Dim>, InferError> {
    let n = spatial.len();
    let op = &ctx.node.op;
    let list = |name: &str, default: i64, len: usize| -> Result<Vec<i64>, InferError> {
        let v = op.ints(name).map(<[i64]>::to_vec).unwrap_or_else(|| vec![default; len]);
        if v.len() != len {
            return Err(ctx.err(format!("attribute '{name}' has {} entries, expected {len}", v.len())));
        }
        Ok(v)
    };
    if kernel.len() != n {
        return Err(ctx.err(format!("kernel_shape has {} entries for {n} spatial axes", kernel.len())));
    }
    let strides = list("strides", 1, n)?;
    let dilations = list("dilations", 1, n)?;
    let pads = list("pads", 0, 2 * n)?;
    let auto_pad = op.str("auto_pad").unwrap_or("NOTSET");
    let ceil_mode = op.int("ceil_mode").unwrap_or(0) != 0;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let (k, stride, dil) = (kernel[i], strides[i], dilations[i]);
        if k <= 0 || stride <= 0 || dil <= 0 {
            return Err(ctx.err("kernel, strides and dilations must be positive"));
        }
        let (k, stride, dil) = (k as i128, stride as i128, dil as i128);
        let span = dil * (k - 1) + 1;
        let (pb, pe) = (pads[i] as i128, pads[i + n] as i128);
        out.push(match (&spatial[i], auto_pad) {
            (Dim::Known(len), "SAME_UPPER" | "SAME_LOWER") => Dim::Known(len.div_ceil(stride as u64)),
            (d @ Dim::Sym(_), "SAME_UPPER" | "SAME_LOWER") if stride == 1 => d.clone(),
            (Dim::Known(len), "VALID") => {
                let eff = *len as i128 - span;
                if eff < 0 {
                    return Err(ctx.err(format!("window of {span} exceeds extent {len}")));
                }
                u64::try_from(eff / stride + 1).map(Dim::Known).unwrap_or(Dim::Unknown)
            }
            (d @ Dim::Sym(_), "VALID") if span == 1 && stride == 1 => d.clone(),
            (Dim::Known(len), "NOTSET") => {
                let eff = *len as i128 + pb + pe - span;
                if eff < 0 {
                    return Err(ctx.err(format!("window of {span} exceeds padded extent {}", *len as i128 + pb + pe)));
                }
                let mut count = if ceil_mode { (eff + stride - 1) / stride + 1 } else { eff / stride + 1 };
                // A last window that would start inside the end padding is dropped (ceil_mode only).
                if ceil_mode && (count - 1) * stride >= *len as i128 + pb {
                    count -= 1;
                }
                u64::try_from(count).map(Dim::Known).unwrap_or(Dim::Unknown)
            }
            (d @ Dim::Sym(_), "NOTSET") if stride == 1 && pb + pe == span - 1 => d.clone(),
            (_, "NOTSET" | "SAME_UPPER" | "SAME_LOWER" | "VALID") => Dim::Unknown,
            (_, other) => return Err(ctx.err(format!("unknown auto_pad '{other}'"))),
        });
    }
    Ok(out)
}

fn resize(ctx: &Ctx<'_>) -> Result<Option<Shape>, InferError> {
    let Some(s) = ctx.shape(0)? else { return Ok(None) };
    let axes: Vec<usize> = match ctx.node.op.ints("axes") {
        Some(a) => normalize_axes(ctx, a, s.rank())?,
        None => (0..s.rank()).collect(),
    };
    let policy = ctx.node.op.str("keep_aspect_ratio_policy").unwrap_or("stretch");
    let mut dims = s.0.clone();
    let nonempty = |port: usize| {
        ctx.ty(port).is_some_and(|t| !matches!(t.shape.as_ref().map(|s| s.dims()), Some([Dim::Known(0)])))
    };
    if nonempty(3) {
        match (ctx.known_ints(3), policy) {
            (Some(sizes), "stretch") if sizes.len() == axes.len() => {
                for (k, &a) in axes.iter().enumerate() {
                    dims[a] = SymInt::Known(sizes[k]).to_dim();
                }
            }
            (Some(sizes), _) if sizes.len() != axes.len() => {
                return Err(ctx.err(format!("{} sizes for {} axes", sizes.len(), axes.len())));
            }
            _ => axes.iter().for_each(|&a| dims[a] = Dim::Unknown),
        }
    } else if nonempty(2) {
        match ctx.constant_floats(2) {
            Some(scales) if scales.len() == axes.len() => {
                for (k, &a) in axes.iter().enumerate() {
                    dims[a] = match (&s.0[a], scales[k]) {
                        (d, 1.0) => d.clone(),
                        (Dim::Known(n), f) if f > 0.0 => Dim::Known((*n as f64 * f as f64).floor() as u64),
                        _ => Dim::Unknown,
                    };
                }
            }
            Some(scales) => return Err(ctx.err(format!("{} scales for {} axes", scales.len(), axes.len()))),
            None => axes.iter().for_each(|&a| dims[a] = Dim::Unknown),
        }
    } else {
        return Err(ctx.err("needs either scales or sizes"));
    }
    Ok(Some(Shape(dims)))
}

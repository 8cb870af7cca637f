//! Reductions (ReduceSum/Mean/Max/Min/Prod with axes as input or attribute, keepdims,
//! noop_with_empty_axes), ArgMax/ArgMin and CumSum. Floats accumulate in f64, integers in wrapping i64.

use crate::cpu::ops::{bail, norm_axis, op_err, OpCtx, OpResult};
use crate::cpu::value::RtTensor;
use ndarray::{ArrayD, Axis, IxDyn, Zip};
use qcc_ir::{DType, OpKind};

/// `x` with the axes in `axes` moved last, as a row-major [outer, inner] buffer.
fn rows_over<T: Clone>(x: &ArrayD<T>, axes: &[usize]) -> (Vec<T>, usize) {
    let keep: Vec<usize> = (0..x.ndim()).filter(|a| !axes.contains(a)).collect();
    let perm: Vec<usize> = keep.iter().chain(axes.iter()).copied().collect();
    let inner: usize = axes.iter().map(|&a| x.shape()[a]).product();
    let permuted = x.view().permuted_axes(IxDyn(&perm));
    let data: Vec<T> = match permuted.as_slice() {
        Some(s) => s.to_vec(),
        None => permuted.iter().cloned().collect(),
    };
    (data, inner)
}

fn out_shape(shape: &[usize], axes: &[usize], keepdims: bool) -> Vec<usize> {
    let mut out = Vec::new();
    for (i, &d) in shape.iter().enumerate() {
        if axes.contains(&i) {
            if keepdims {
                out.push(1);
            }
        } else {
            out.push(d);
        }
    }
    out
}

fn reduce_rows_f64(kind: OpKind, data: &[f64], inner: usize, outer: usize) -> Vec<f64> {
    (0..outer)
        .map(|r| {
            let row = &data[r * inner..(r + 1) * inner];
            match kind {
                OpKind::ReduceSum => row.iter().sum(),
                OpKind::ReduceMean => row.iter().sum::<f64>() / inner as f64,
                OpKind::ReduceProd => row.iter().product(),
                OpKind::ReduceMax => {
                    row.iter()
                        .fold(f64::NEG_INFINITY, |m, &v| if v.is_nan() || m.is_nan() { f64::NAN } else { m.max(v) })
                }
                _ => row.iter().fold(f64::INFINITY, |m, &v| if v.is_nan() || m.is_nan() { f64::NAN } else { m.min(v) }),
            }
        })
        .collect()
}

fn reduce_rows_i64(kind: OpKind, data: &[i64], inner: usize, outer: usize, dtype: DType) -> Vec<i64> {
    let (lo, hi) = dtype.int_range().unwrap_or((0, 1));
    (0..outer)
        .map(|r| {
            let row = &data[r * inner..(r + 1) * inner];
            match kind {
                OpKind::ReduceSum => row.iter().fold(0i64, |s, &v| s.wrapping_add(v)),
                OpKind::ReduceMean => row.iter().fold(0i64, |s, &v| s.wrapping_add(v)) / (inner.max(1) as i64),
                OpKind::ReduceProd => row.iter().fold(1i64, |s, &v| s.wrapping_mul(v)),
                OpKind::ReduceMax => row.iter().copied().max().unwrap_or(lo),
                _ => row.iter().copied().min().unwrap_or(hi),
            }
        })
        .collect()
}

/// The reduction axes (input 1 or attribute `axes`), or `None` when the op is a no-op.
fn reduction_axes(ctx: &OpCtx, rank: usize) -> OpResult<Option<Vec<usize>>> {
    let axes = ctx.ints_input_or_attr(1, "axes")?.unwrap_or_default();
    if axes.is_empty() {
        return Ok(if ctx.int("noop_with_empty_axes", 0) != 0 { None } else { Some((0..rank).collect()) });
    }
    let mut out = Vec::new();
    for a in axes {
        let a = norm_axis(a, rank)?;
        if !out.contains(&a) {
            out.push(a);
        }
    }
    out.sort_unstable();
    Ok(Some(out))
}

pub fn reduce(ctx: &OpCtx, kind: OpKind) -> OpResult<RtTensor> {
    let x = ctx.input(0)?;
    let Some(axes) = reduction_axes(ctx, x.shape().len())? else { return Ok(x.clone()) };
    let keepdims = ctx.int("keepdims", 1) != 0;
    let shape = out_shape(x.shape(), &axes, keepdims);
    let dtype = x.dtype();
    if dtype.is_float() {
        let (data, inner) = rows_over(&x.cast_array::<f64>(), &axes);
        let outer: usize = shape.iter().product();
        let out = reduce_rows_f64(kind, &data, inner, outer);
        let arr = ArrayD::from_shape_vec(IxDyn(&shape), out).map_err(|e| op_err!("{e}"))?;
        Ok(RtTensor::F64(arr).cast(dtype))
    } else {
        let (data, inner) = rows_over(&x.cast_array::<i64>(), &axes);
        let outer: usize = shape.iter().product();
        let out = reduce_rows_i64(kind, &data, inner, outer, dtype);
        let arr = ArrayD::from_shape_vec(IxDyn(&shape), out).map_err(|e| op_err!("{e}"))?;
        Ok(RtTensor::I64(arr).cast(dtype))
    }
}

pub fn arg_reduce(ctx: &OpCtx, is_max: bool) -> OpResult<RtTensor> {
    let x = ctx.input(0)?;
    let axis = norm_axis(ctx.int("axis", 0), x.shape().len())?;
    let keepdims = ctx.int("keepdims", 1) != 0;
    let last = ctx.int("select_last_index", 0) != 0;
    if x.shape()[axis] == 0 {
        bail!("cannot take an arg-reduction over an empty axis");
    }
    let v = x.cast_array::<f64>();
    let out = Zip::from(v.lanes(Axis(axis))).map_collect(|lane| {
        let mut best = 0usize;
        for (i, &val) in lane.iter().enumerate() {
            let cur = lane[best];
            let better = if is_max { val > cur } else { val < cur };
            if better || (last && val == cur) {
                best = i;
            }
        }
        best as i64
    });
    let out = if keepdims { out.insert_axis(Axis(axis)) } else { out };
    Ok(RtTensor::I64(out))
}

pub fn cumsum(ctx: &OpCtx) -> OpResult<RtTensor> {
    let x = ctx.input(0)?;
    let axis_t = ctx.input(1)?;
    let axis = axis_t
        .to_i64_vec()
        .and_then(|v| v.first().copied())
        .ok_or_else(|| op_err!("axis must be an integer scalar"))?;
    let axis = norm_axis(axis, x.shape().len())?;
    let exclusive = ctx.int("exclusive", 0) != 0;
    let reverse = ctx.int("reverse", 0) != 0;
    fn scan<T: Copy>(a: &mut ArrayD<T>, axis: usize, zero: T, add: impl Fn(T, T) -> T, flags: (bool, bool)) {
        let (exclusive, reverse) = flags;
        for mut lane in a.lanes_mut(Axis(axis)) {
            let n = lane.len();
            let mut acc = zero;
            for j in 0..n {
                let i = if reverse { n - 1 - j } else { j };
                let v = lane[i];
                if exclusive {
                    lane[i] = acc;
                    acc = add(acc, v);
                } else {
                    acc = add(acc, v);
                    lane[i] = acc;
                }
            }
        }
    }
    let dtype = x.dtype();
    if dtype.is_float() {
        let mut a = x.cast_array::<f64>();
        scan(&mut a, axis, 0.0, |p, q| p + q, (exclusive, reverse));
        Ok(RtTensor::F64(a).cast(dtype))
    } else {
        let mut a = x.cast_array::<i64>();
        scan(&mut a, axis, 0, i64::wrapping_add, (exclusive, reverse));
        Ok(RtTensor::I64(a).cast(dtype))
    }
}

//! Inference rules for qcc's fused block ops (`linear`, `rms_norm`, `swiglu`, `rotary`, `attention`), the
//! ops the block-recognition passes in qcc-passes create. Semantics are documented on the `OpKind` variants.

use super::dims::unify_dim;
use super::ops::broadcast;
use super::{Ctx, InferError};
use crate::{DType, Dim, OpKind, Shape, TensorType};

type Out = Result<Vec<TensorType>, InferError>;

fn float_dtype(ctx: &Ctx<'_>, port: usize) -> Result<DType, InferError> {
    let d = ctx.req(port)?.dtype;
    if !d.is_float() {
        return Err(ctx.err(format!("input {port} must be a float tensor, not {d}")));
    }
    Ok(d)
}

fn same_float(ctx: &Ctx<'_>, ports: &[usize]) -> Result<DType, InferError> {
    let d = float_dtype(ctx, ports[0])?;
    for &p in &ports[1..] {
        if ctx.input(p).is_some() && ctx.req(p)?.dtype != d {
            return Err(ctx.err(format!("input {p} is {} but input {} is {d}", ctx.req(p)?.dtype, ports[0])));
        }
    }
    Ok(d)
}

fn dims_match(ctx: &Ctx<'_>, what: &str, a: &Dim, b: &Dim) -> Result<Dim, InferError> {
    unify_dim(a, b).ok_or_else(|| ctx.err(format!("{what}: {a} vs {b}")))
}

pub fn infer(ctx: &Ctx<'_>) -> Out {
    match ctx.node.op.kind {
        OpKind::Linear => linear(ctx),
        OpKind::RmsNorm => {
            let dtype = same_float(ctx, &[0, 1, 2])?;
            for (port, what) in [(1, "gamma"), (2, "beta")] {
                if ctx.input(port).is_none() {
                    continue;
                }
                if let (Some(x), Some(g)) = (ctx.shape(0)?, ctx.shape(port)?) {
                    let (Some(last), [d]) = (x.0.last(), g.dims()) else {
                        return Err(ctx.err(format!("{what} must be [D] and x [.., D], got [{g}] and [{x}]")));
                    };
                    dims_match(ctx, &format!("{what} length differs from the normalised axis"), last, d)?;
                }
            }
            Ok(vec![TensorType { dtype, shape: ctx.shape(0)?.cloned() }])
        }
        OpKind::Hadamard => {
            let dtype = float_dtype(ctx, 0)?;
            let size = ctx.node.op.int("size").ok_or_else(|| ctx.err("attribute 'size' (int) is missing"))?;
            if size < 1 {
                return Err(ctx.err(format!("size must be positive, got {size}")));
            }
            if let Some(x) = ctx.shape(0)? {
                let Some(last) = x.0.last() else {
                    return Err(ctx.err("hadamard needs rank >= 1"));
                };
                dims_match(ctx, "size differs from the last dimension", last, &Dim::Known(size as u64))?;
            }
            Ok(vec![TensorType { dtype, shape: ctx.shape(0)?.cloned() }])
        }
        OpKind::Swiglu => {
            let dtype = same_float(ctx, &[0, 1])?;
            Ok(vec![TensorType { dtype, shape: broadcast(ctx, &[0, 1])? }])
        }
        OpKind::Rotary => {
            let dtype = same_float(ctx, &[0, 1, 2])?;
            if let Some(x) = ctx.shape(0)? {
                if let Some(Dim::Known(d)) = x.0.last() {
                    if d % 2 != 0 {
                        return Err(ctx.err(format!("rotary needs an even last dimension, got {d}")));
                    }
                }
            }
            // cos/sin broadcast against x but must not change its shape.
            let shape = broadcast(ctx, &[0, 1, 2])?;
            if let (Some(s), Some(x)) = (&shape, ctx.shape(0)?) {
                if s.rank() != x.rank() {
                    return Err(ctx.err(format!("cos/sin broadcast x [{x}] to [{s}]")));
                }
            }
            Ok(vec![TensorType { dtype, shape: ctx.shape(0)?.cloned() }])
        }
        OpKind::Attention => attention(ctx),
        other => Err(ctx.err(format!("{other} is not a fused block op"))),
    }
}

fn linear(ctx: &Ctx<'_>) -> Out {
    let dtype = same_float(ctx, &[0, 1, 2])?;
    let (Some(x), Some(w)) = (ctx.shape(0)?, ctx.shape(1)?) else {
        return Ok(vec![TensorType::unranked(dtype)]);
    };
    if w.rank() != 2 || x.rank() == 0 {
        return Err(ctx.err(format!("weight must be [N, K] and input [.., K], got [{w}] and [{x}]")));
    }
    dims_match(ctx, "inner dimensions differ", &x.0[x.rank() - 1], &w.0[1])?;
    if let Some(Some(b)) = ctx.ty(2).map(|t| t.shape.as_ref()) {
        match b.dims() {
            [n] => {
                dims_match(ctx, "bias length differs from N", n, &w.0[0])?;
            }
            _ => return Err(ctx.err(format!("bias must be [N], got [{b}]"))),
        }
    }
    let mut dims = x.0.clone();
    *dims.last_mut().expect("rank checked above") = w.0[0].clone();
    Ok(vec![TensorType::new(dtype, Shape(dims))])
}

fn attention(ctx: &Ctx<'_>) -> Out {
    let dtype = same_float(ctx, &[0, 1, 2, 3])?;
    let (Some(q), Some(k), Some(v)) = (ctx.shape(0)?, ctx.shape(1)?, ctx.shape(2)?) else {
        return Ok(vec![TensorType::unranked(dtype)]);
    };
    if q.rank() != 4 || k.rank() != 4 || v.rank() != 4 {
        return Err(ctx.err(format!("q, k, v must be [B, H, S, D], got [{q}], [{k}], [{v}]")));
    }
    let batch = dims_match(ctx, "batch differs between q and k", &q.0[0], &k.0[0])?;
    dims_match(ctx, "k and v head counts differ", &k.0[1], &v.0[1])?;
    dims_match(ctx, "k and v lengths differ", &k.0[2], &v.0[2])?;
    dims_match(ctx, "q and k head sizes differ", &q.0[3], &k.0[3])?;
    if let (Dim::Known(hq), Dim::Known(hkv)) = (&q.0[1], &k.0[1]) {
        if *hkv == 0 || hq % hkv != 0 {
            return Err(ctx.err(format!("{hq} query heads are not a multiple of {hkv} KV heads")));
        }
    }
    Ok(vec![TensorType::new(dtype, Shape(vec![batch, q.0[1].clone(), q.0[2].clone(), v.0[3].clone()]))])
}

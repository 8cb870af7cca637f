//! Launches of the runtime's CUDA micro-kernels (runtime/kernels/<module>.cu, compiled by NVRTC at load).
//! This file is the contract with the runtime: module and entry names, the argument order, and the
//! launch geometry the kernels must be written for (grid-stride loops make them correct for any
//! problem size within the geometry). A micro-kernel writes an f32 (or the float output type) result,
//! and an output quantization on the op becomes a generated epilogue kernel after it, except where the
//! kernel has a quantized entry for it ([`fused_quant`]: `hadamard`, `attention` of f32).
//!
//! | op | module | entry | args | grid | block | shared |
//! |----|--------|-------|------|------|-------|--------|
//! | `int_linear` | `int_linear` | `int_linear_x{X}_w{W}[_a{bits}][_bias][_res]_{Y}` | x, w, scale, [bias], [res], y, M, N, K | [ceil(N/64), ceil(M/16), 1] | [128,1,1] | 0 |
//! | `linear` | `linear` | `linear_{X}_w{W}[_bias]` | x, w, [bias], y, M, N, K | [ceil(N/64), ceil(M/16), 1] | [128,1,1] | 0 |
//! | `attention` | `attention` | `attention_{X}[_mask][_q{O}]` | q, k, v, [mask], out, B, Hq, Hkv, S, T, D, Dv, causal (i64), scale (f32), kb, kh, kt, vb, vh, vt, [quant, osh, oss] | [S, Hq, B] | [128,1,1] | 4 * T_max |
//! | `hadamard` | `hadamard` | `hadamard_[swiglu_]{X}[_q{O}]` | x (swiglu: g, u), out, rows, n, [quant] | [rows, 1, 1] | [128,1,1] | 8 * n |
//!
//! Layouts: x [M, K] row-major (M = product of the leading dims); weights [N, K] row-major as in the
//! weights file (int4 packed two per byte along K, low nibble first; the runtime may repack at
//! load); scale, bias [N] f32; y [M, N]; `_res` (Y = f32): y = (the product's epilogue) + res [M, N],
//! the residual `add` that was the result's only reader ([`fused_residual`]). Activation dtypes X: `i16` (int4/int8 values with 16-bit
//! prefix rows), `i8`, `i4` (one value per byte), or a float type (weight-only quantization; with
//! `_a{bits}` quantized per row dynamically as `qcc_ir::OpKind::IntLinear` says). Attention: q
//! [B, Hq, S, D] and out [B, Hq, S, Dv] contiguous, k [B, Hkv, T, D] and v [B, Hkv, T, Dv] at the
//! batch, head and row strides kb, kh, kt (vb, vh, vt) with contiguous channels; the mask
//! is [S, T] of q's type broadcast over batch and heads; `causal` = 1 masks keys after the query's position
//! counted from the end (key t visible for query s iff t <= T - S + s). Hadamard: rows of n elements,
//! y = x H_n^T / sqrt(n) with H_n of `qcc_ir::hadamard::Hadamard::new(n)` (the CPU computes it in f64);
//! `swiglu_` (f32): x = swiglu(g, u) as the generated kernel computes it, for a swiglu read only by the
//! Hadamard. `[quant]` (`_q{O}` entries, O = i16 or i8, f32 only): step, seq, past, prefix, lo, hi,
//! plo, phi (see [`fused_quant`]): the micro-kernel stores the quantized output itself; attention's
//! `[quant, osh, oss]` adds the output's head and row strides (element (b, h, s, d) at b Hq S Dv +
//! h osh + s oss + d: [B, S, Hq, Dv] order when o_proj's transpose is its only reader).

use super::kernels::Step;
use super::{const_of, join, shapes, LowerError, Lowerer, View};
use qcc_ir::{DType, NodeId, OpKind, Value};
use qcc_runtime::artifact::{Arg, DimExpr, Launch};

/// Rows and columns of one int_linear/linear block tile (the grid above).
pub const LINEAR_TILE_N: i64 = 64;
pub const LINEAR_TILE_M: i64 = 16;

fn buffer(v: &View) -> Arg {
    Arg::Buffer(v.buffer)
}

/// The float result of a micro-kernel and, when the op quantizes its output, the generated epilogue
/// that turns it into the node's value.
fn float_result(l: &mut Lowerer, id: NodeId, dims: Vec<DimExpr>) -> Result<(View, Option<DType>), LowerError> {
    let quant = l.quant(id, dims.last())?;
    let name = l.output_name(id);
    match quant {
        None => {
            let out = l.arena(name, l.output_dtype(id), dims);
            Ok((out, None))
        }
        Some(q) => {
            let tmp = l.arena(format!("{name}.f32"), DType::F32, dims);
            Ok((tmp, Some(q.output_dtype())))
        }
    }
}

/// Emits the quantization epilogue after a micro-kernel when the op has one.
fn finish(l: &mut Lowerer, id: NodeId, result: View, quantized: Option<DType>) -> Result<View, LowerError> {
    let Some(out_dtype) = quantized else { return Ok(result) };
    let quant = l.quant(id, result.dims.last())?;
    let dims = result.dims.clone();
    l.emit_pointwise(id, super::PointwiseOp::Identity, vec![result], dims, out_dtype, quant, l.output_name(id))
}

/// An output quantization the micro-kernel applies itself (`_q{i16,i8}` entries, runtime/kernels/
/// common.cuh `OutQuant`, the generated epilogue's arithmetic): the output's storage type, the entry
/// suffix and the trailing arguments (step, seq, past, prefix, lo, hi, plo, phi). Only for a step
/// per channel of the last axis (`per_head`: per head and channel of an attention output) stored
/// as i16 or i8 (int4 activations take a byte); `None` leaves the op to [`float_result`].
fn fused_quant(
    l: &mut Lowerer,
    id: NodeId,
    dims: &[DimExpr],
    per_head: bool,
) -> Result<Option<(DType, String, Vec<Arg>)>, LowerError> {
    let Some(q) = l.quant(id, dims.last())? else { return Ok(None) };
    let step = match q.step {
        Step::PerChannel(b) if !per_head => b,
        Step::PerHeadChannel(b) if per_head => b,
        _ => return Ok(None),
    };
    let out_dtype = q.output_dtype();
    let suffix = match out_dtype {
        DType::I16 => "_qi16",
        DType::I8 | DType::I4 => "_qi8",
        _ => return Ok(None),
    };
    let (Some((lo, hi)), prefix_range) = (q.to.int_range(), q.prefix_to.int_range()) else { return Ok(None) };
    let (plo, phi) = if q.prefix_tokens > 0 { prefix_range.unwrap_or((lo, hi)) } else { (lo, hi) };
    let seq = if dims.len() >= 2 { dims[dims.len() - 2].clone() } else { DimExpr::Const(1) };
    let past = q.prefix_offset.clone().unwrap_or(DimExpr::Const(0));
    let args = vec![
        Arg::Buffer(step),
        Arg::I64(seq),
        Arg::I64(past),
        Arg::I64(DimExpr::Const(q.prefix_tokens as i64)),
        Arg::F32(lo as f32),
        Arg::F32(hi as f32),
        Arg::F32(plo as f32),
        Arg::F32(phi as f32),
    ];
    Ok(Some((out_dtype, suffix.to_string(), args)))
}

/// `int_linear` and `linear`.
pub(super) fn linear(l: &mut Lowerer, id: NodeId) -> Result<View, LowerError> {
    let kind = l.graph.node(id).op.kind;
    let x = l.input(id, 0, None)?;
    let x = l.contiguous(id, x)?;
    let w = l.input(id, 1, None)?;
    let (Some(n), Some(k)) = (w.dims.first().and_then(const_of), w.dims.get(1).and_then(const_of)) else {
        return Err(l.err(id, format!("the weight must be a constant [N, K], got [{}]", join(&w.dims))));
    };
    if w.dims.len() != 2 || x.dims.last().and_then(const_of) != Some(k) {
        return Err(l.err(id, format!("x [{}] does not end in K = {k} of the weight", join(&x.dims))));
    }
    let is_int = kind == qcc_ir::OpKind::IntLinear;
    let (scale, bias_port) = if is_int { (Some(l.input(id, 2, None)?), 3) } else { (None, 2) };
    let bias = match l.graph.input(id, bias_port) {
        Some(_) => Some(l.input(id, bias_port, None)?),
        None => None,
    };
    let m = shapes::product(&x.dims[..x.dims.len() - 1]);
    let mut dims = x.dims.clone();
    if let Some(last) = dims.last_mut() {
        *last = DimExpr::Const(n as i64);
    }
    let residual = if is_int { fused_residual(l, id, &dims) } else { None };
    let (y, quantized) = float_result(l, id, dims)?;
    let mut entry = if is_int {
        format!("int_linear_x{}_w{}", x.dtype, w.dtype)
    } else {
        format!("linear_{}_w{}", x.dtype, w.dtype)
    };
    if let Some(bits) = l.graph.node(id).op.int("act_bits").filter(|_| is_int && x.dtype.is_float()) {
        entry.push_str(&format!("_a{bits}"));
    }
    if bias.is_some() {
        entry.push_str("_bias");
    }
    if residual.is_some() {
        entry.push_str("_res");
    }
    if is_int {
        entry.push_str(&format!("_{}", y.dtype));
    }
    let mut args = vec![buffer(&x), buffer(&w)];
    args.extend(scale.as_ref().map(buffer));
    args.extend(bias.as_ref().map(buffer));
    args.extend(residual.as_ref().map(|(_, r)| buffer(r)));
    args.push(buffer(&y));
    args.extend([Arg::I64(m.clone()), Arg::I64(DimExpr::Const(n as i64)), Arg::I64(DimExpr::Const(k as i64))]);
    l.launch_micro(Launch {
        node: super::label(l.graph, id),
        module: if is_int { "int_linear" } else { "linear" }.to_string(),
        entry,
        grid: [
            shapes::ceil_div(&DimExpr::Const(n as i64), LINEAR_TILE_N),
            shapes::ceil_div(&m, LINEAR_TILE_M),
            DimExpr::Const(1),
        ],
        block: [128, 1, 1],
        shared_bytes: 0,
        args,
    });
    if let Some((add, _)) = residual {
        // The buffer holds the add's value (what verification compares it with).
        l.bufs[y.buffer as usize].name = l.output_name(add);
        l.fused_adds.insert(add, y.clone());
    }
    finish(l, id, y, quantized)
}

/// The `add` that is the only reader of an int_linear's f32 result (no output quantization on
/// either) when its other operand is already computed, f32 and contiguous with the result's dims:
/// the launch adds it in its epilogue (`_res` entries, the same f32 addition) and its result is the
/// add's, one launch and one round trip of the residual stream less (o_proj and down_proj of a
/// decoder layer).
fn fused_residual(l: &Lowerer, id: NodeId, dims: &[DimExpr]) -> Option<(NodeId, View)> {
    let v = l.output(id);
    let f32_value = |x: Value| l.graph.value_type(x).dtype == DType::F32;
    if !f32_value(v)
        || l.graph.node(id).op.output_quant().is_some()
        || l.graph.graph_outputs().iter().any(|o| o.value == v)
    {
        return None;
    }
    let [(add, port)] = l.graph.users(v)[..] else { return None };
    let node = l.graph.node(add);
    if node.op.kind != OpKind::Add || l.host.contains(&add) || node.op.output_quant().is_some() || port > 1 {
        return None;
    }
    let other = l.graph.input(add, 1 - port)?;
    let view = l.views.get(&other)?;
    let same = view.dims.len() == dims.len() && view.dims.iter().zip(dims).all(|(a, b)| shapes::same(a, b));
    (same && view.dtype == DType::F32 && f32_value(Value::new(add, 0)) && view.is_contiguous())
        .then(|| (add, view.clone()))
}

pub(super) fn attention(l: &mut Lowerer, id: NodeId) -> Result<View, LowerError> {
    let mut qkv = Vec::new();
    for port in 0..3 {
        let v = l.input(id, port, None)?;
        // Keys and values are read at their own strides (a resident KV cache keeps its positions
        // outermost) as long as each row's channels are contiguous.
        let rows_contiguous = port > 0 && v.dims.len() == 4 && shapes::is_one(&v.strides[3]);
        qkv.push(if rows_contiguous { v } else { l.contiguous(id, v)? });
    }
    let (q, k, v) = (&qkv[0], &qkv[1], &qkv[2]);
    if q.dims.len() != 4 || k.dims.len() != 4 || v.dims.len() != 4 {
        return Err(l.err(id, "q, k and v must have rank 4"));
    }
    let (b, hq, s, d) = (q.dims[0].clone(), q.dims[1].clone(), q.dims[2].clone(), q.dims[3].clone());
    let (hkv, t, dv) = (k.dims[1].clone(), k.dims[2].clone(), v.dims[3].clone());
    let scores = vec![b.clone(), hq.clone(), s.clone(), t.clone()];
    let mask = match l.graph.input(id, 3) {
        Some(_) => {
            let m = l.input(id, 3, Some(&scores))?;
            let lead = m.dims.len().saturating_sub(2);
            let ok = m.dims.len() >= 2
                && m.dims[..lead].iter().all(shapes::is_one)
                && m.dims[lead..].iter().zip(&scores[2..]).all(|(a, b)| shapes::same(a, b))
                && m.dtype == q.dtype;
            if !ok {
                return Err(l.err(
                    id,
                    format!(
                        "the mask [{}] must be {} [.., S, T] (q's type) with unit leading dims",
                        join(&m.dims),
                        q.dtype
                    ),
                ));
            }
            Some(l.contiguous(id, m)?)
        }
        None => None,
    };
    let op = &l.graph.node(id).op;
    let scale = op.float("scale").unwrap_or_else(|| {
        let dd = const_of(&d).unwrap_or(1) as f32;
        1.0 / dd.sqrt()
    });
    let causal = op.int("causal").unwrap_or(0);
    let out_dims = vec![b.clone(), hq.clone(), s.clone(), dv.clone()];
    let fused = if q.dtype == DType::F32 { fused_quant(l, id, &out_dims, true)? } else { None };
    let (out, quantized, suffix, qargs) = match fused {
        Some((dtype, suffix, mut args)) => {
            // Stored as [B, S, Hq, Dv] when o_proj's transpose is the only reader (that view is then
            // contiguous), else [B, Hq, S, Dv]; the kernel takes the head and row strides.
            let name = l.output_name(id);
            let (out, strides) = if l.layout_for_transpose(id, &name, &out_dims).as_deref() == Some(&[0, 2, 1, 3]) {
                let stored = l.arena(name, dtype, vec![b.clone(), s.clone(), hq.clone(), dv.clone()]);
                let st = stored.strides.clone();
                let view = View {
                    dims: out_dims.clone(),
                    strides: vec![st[0].clone(), st[2].clone(), st[1].clone(), st[3].clone()],
                    ..stored
                };
                (view, [dv.clone(), shapes::product(&[hq.clone(), dv.clone()])])
            } else {
                (l.arena(name, dtype, out_dims.clone()), [shapes::product(&[s.clone(), dv.clone()]), dv.clone()])
            };
            args.extend(strides.map(Arg::I64));
            (out, None, suffix, args)
        }
        None => {
            let (out, quantized) = float_result(l, id, out_dims)?;
            (out, quantized, String::new(), Vec::new())
        }
    };
    let t_max = shapes::at_max(&t, &l.max).ok_or_else(|| l.err(id, format!("key length {t} cannot be sized")))?;
    let mut entry = format!("attention_{}", q.dtype);
    if mask.is_some() {
        entry.push_str("_mask");
    }
    entry.push_str(&suffix);
    let mut args = vec![buffer(q), buffer(k), buffer(v)];
    args.extend(mask.as_ref().map(buffer));
    args.push(buffer(&out));
    for dim in [&b, &hq, &hkv, &s, &t, &d, &dv] {
        args.push(Arg::I64(dim.clone()));
    }
    args.push(Arg::I64(DimExpr::Const(causal)));
    args.push(Arg::F32(scale));
    for x in [k, v] {
        args.extend(x.strides[..3].iter().cloned().map(Arg::I64));
    }
    args.extend(qargs);
    l.launch_micro(Launch {
        node: super::label(l.graph, id),
        module: "attention".to_string(),
        entry,
        grid: [s, hq, b],
        block: [128, 1, 1],
        shared_bytes: u32::try_from(4 * t_max).map_err(|_| l.err(id, "key length too large for shared memory"))?,
        args,
    });
    finish(l, id, out, quantized)
}

pub(super) fn hadamard(l: &mut Lowerer, id: NodeId) -> Result<View, LowerError> {
    // A swiglu left to this launch (Lowerer::defer_swiglu): its gate and up are the inputs.
    let deferred = l.graph.input(id, 0).and_then(|v| l.deferred_swiglu.remove(&v));
    let ins = match deferred {
        Some((g, u)) => vec![g, u],
        None => {
            let x = l.input(id, 0, None)?;
            vec![l.contiguous(id, x)?]
        }
    };
    let x = ins[0].clone();
    let Some(n) = x.dims.last().and_then(const_of) else {
        return Err(l.err(id, "the transformed (last) axis must have a known extent"));
    };
    if l.graph.node(id).op.int("size") != Some(n as i64) {
        return Err(l.err(id, format!("attribute size differs from the last dimension {n}")));
    }
    let rows = shapes::product(&x.dims[..x.dims.len() - 1]);
    let fused = if x.dtype == DType::F32 { fused_quant(l, id, &x.dims, false)? } else { None };
    let (out, quantized, suffix, qargs) = match fused {
        Some((dtype, suffix, args)) => (l.arena(l.output_name(id), dtype, x.dims.clone()), None, suffix, args),
        None => {
            let (out, quantized) = float_result(l, id, x.dims.clone())?;
            (out, quantized, String::new(), Vec::new())
        }
    };
    let swiglu = if ins.len() == 2 { "swiglu_" } else { "" };
    let mut args: Vec<Arg> = ins.iter().map(buffer).collect();
    args.extend([buffer(&out), Arg::I64(rows.clone()), Arg::I64(DimExpr::Const(n as i64))]);
    args.extend(qargs);
    l.launch_micro(Launch {
        node: super::label(l.graph, id),
        module: "hadamard".to_string(),
        entry: format!("hadamard_{swiglu}{}{suffix}", x.dtype),
        grid: [rows, DimExpr::Const(1), DimExpr::Const(1)],
        block: [128, 1, 1],
        shared_bytes: u32::try_from(8 * n).map_err(|_| l.err(id, "size too large for shared memory"))?,
        args,
    });
    finish(l, id, out, quantized)
}

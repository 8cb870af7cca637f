//! Vision ops: Conv (groups, dilations, pads, auto_pad), MaxPool / AveragePool (ceil_mode,
//! count_include_pad, dilations), GlobalAveragePool and Resize (nearest with every rounding mode,
//! linear, cubic, all coordinate transformations, exclude_outside, antialias, keep_aspect_ratio_policy).
//!
//! These are reference loops in f64 (converted back to the input type), written for exactness over
//! speed: the transformer models qcc targets do not use them on hot paths.

use crate::cpu::ops::{bail, op_err, OpCtx, OpResult};
use crate::cpu::value::RtTensor;
use ndarray::{ArrayD, Axis, IxDyn, Zip};

/// Output extent and leading pad of each spatial axis.
struct Geometry {
    out: Vec<usize>,
    pad_begin: Vec<i64>,
    pad_end: Vec<i64>,
}

fn geometry(
    ctx: &OpCtx,
    input: &[usize],
    kernel: &[usize],
    strides: &[usize],
    dilations: &[usize],
    ceil_mode: bool,
) -> OpResult<Geometry> {
    let k = input.len();
    let auto_pad = ctx.str("auto_pad", "NOTSET");
    let pads = ctx.ints("pads").unwrap_or_else(|| vec![0; 2 * k]);
    if pads.len() != 2 * k {
        bail!("pads {pads:?} must have {} entries", 2 * k);
    }
    let mut g = Geometry { out: vec![], pad_begin: vec![], pad_end: vec![] };
    for i in 0..k {
        let (n, s) = (input[i] as i64, strides[i].max(1) as i64);
        let ek = ((kernel[i] as i64 - 1) * dilations[i] as i64) + 1;
        let (out, pb, pe) = match auto_pad {
            "SAME_UPPER" | "SAME_LOWER" => {
                let out = (n + s - 1) / s;
                let total = ((out - 1) * s + ek - n).max(0);
                let small = total / 2;
                if auto_pad == "SAME_UPPER" {
                    (out, small, total - small)
                } else {
                    (out, total - small, small)
                }
            }
            "VALID" => ((n - ek) / s + 1, 0, 0),
            "NOTSET" | "" => {
                let (pb, pe) = (pads[i], pads[i + k]);
                let span = n + pb + pe - ek;
                let mut out = if ceil_mode { (span + s - 1).div_euclid(s) + 1 } else { span.div_euclid(s) + 1 };
                // The last window must start inside the input or the leading pad.
                if ceil_mode && (out - 1) * s >= n + pb {
                    out -= 1;
                }
                (out, pb, pe)
            }
            other => bail!("unknown auto_pad '{other}'"),
        };
        if out < 0 {
            bail!("kernel {kernel:?} does not fit input {input:?}");
        }
        g.out.push(out as usize);
        g.pad_begin.push(pb);
        g.pad_end.push(pe);
    }
    Ok(g)
}

fn ints_or(ctx: &OpCtx, name: &str, k: usize, default: usize) -> OpResult<Vec<usize>> {
    match ctx.ints(name) {
        Some(v) if v.len() == k => {
            v.iter().map(|&x| usize::try_from(x).map_err(|_| op_err!("negative {name}"))).collect()
        }
        Some(v) => bail!("{name} {v:?} must have {k} entries"),
        None => Ok(vec![default; k]),
    }
}

fn row_major_strides(dims: &[usize]) -> Vec<usize> {
    let mut s = vec![1; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * dims[i + 1];
    }
    s
}

pub fn conv(ctx: &OpCtx) -> OpResult<RtTensor> {
    let (x, w, b) = (ctx.input(0)?, ctx.input(1)?, ctx.opt_input(2));
    let xs = x.shape().to_vec();
    let ws = w.shape().to_vec();
    if xs.len() < 3 || ws.len() != xs.len() {
        bail!("Conv needs X [N, C, ...] and W [M, C/group, ...] of equal rank, got {xs:?} and {ws:?}");
    }
    let k = xs.len() - 2;
    let group = ctx.int("group", 1).max(1) as usize;
    let (n, c, m) = (xs[0], xs[1], ws[0]);
    let cg = ws[1];
    if c != cg * group || m % group != 0 {
        bail!("channels do not match: X {xs:?}, W {ws:?}, group {group}");
    }
    let kernel = match ctx.ints("kernel_shape") {
        Some(v) => v.iter().map(|&d| d as usize).collect(),
        None => ws[2..].to_vec(),
    };
    let strides = ints_or(ctx, "strides", k, 1)?;
    let dilations = ints_or(ctx, "dilations", k, 1)?;
    let g = geometry(ctx, &xs[2..], &kernel, &strides, &dilations, false)?;
    let xd: Vec<f64> = x.to_f64_vec();
    let wd: Vec<f64> = w.to_f64_vec();
    let bias: Vec<f64> = b.map(|b| b.to_f64_vec()).unwrap_or_else(|| vec![0.0; m]);
    if bias.len() != m {
        bail!("bias has {} elements, expected {m}", bias.len());
    }
    let in_spatial: usize = xs[2..].iter().product();
    let out_spatial: usize = g.out.iter().product();
    let k_size: usize = kernel.iter().product();
    let in_strides = row_major_strides(&xs[2..]);
    // taps[o * k_size + t] = flat input offset of kernel tap t at output position o (None in padding).
    let mut taps = Vec::with_capacity(out_spatial * k_size);
    for o in ndarray::indices(IxDyn(&g.out)) {
        for t in ndarray::indices(IxDyn(&kernel)) {
            let mut off = Some(0usize);
            for ax in 0..k {
                let pos = (o[ax] * strides[ax]) as i64 - g.pad_begin[ax] + (t[ax] * dilations[ax]) as i64;
                if pos < 0 || pos >= xs[2 + ax] as i64 {
                    off = None;
                    break;
                }
                off = off.map(|s| s + pos as usize * in_strides[ax]);
            }
            taps.push(off);
        }
    }
    let mg = m / group;
    let mut out = vec![0f64; n * m * out_spatial];
    for b_i in 0..n {
        for oc in 0..m {
            let gi = oc / mg;
            for o in 0..out_spatial {
                let mut acc = bias[oc];
                for ic in 0..cg {
                    let x_base = (b_i * c + gi * cg + ic) * in_spatial;
                    let w_base = (oc * cg + ic) * k_size;
                    for t in 0..k_size {
                        if let Some(off) = taps[o * k_size + t] {
                            acc += xd[x_base + off] * wd[w_base + t];
                        }
                    }
                }
                out[(b_i * m + oc) * out_spatial + o] = acc;
            }
        }
    }
    let mut shape = vec![n, m];
    shape.extend(&g.out);
    let arr = ArrayD::from_shape_vec(IxDyn(&shape), out).map_err(|e| op_err!("{e}"))?;
    Ok(RtTensor::F64(arr).cast(x.dtype()))
}

pub fn pool(ctx: &OpCtx, is_max: bool) -> OpResult<RtTensor> {
    let x = ctx.input(0)?;
    let xs = x.shape().to_vec();
    if xs.len() < 3 {
        bail!("pooling needs X [N, C, ...], got {xs:?}");
    }
    let k = xs.len() - 2;
    let kernel = ints_or(ctx, "kernel_shape", k, 0)?;
    if ctx.ints("kernel_shape").is_none() {
        bail!("attribute 'kernel_shape' is required");
    }
    let strides = ints_or(ctx, "strides", k, 1)?;
    let dilations = ints_or(ctx, "dilations", k, 1)?;
    let ceil_mode = ctx.int("ceil_mode", 0) != 0;
    let include_pad = ctx.int("count_include_pad", 0) != 0;
    let g = geometry(ctx, &xs[2..], &kernel, &strides, &dilations, ceil_mode)?;
    let xd = x.to_f64_vec();
    let in_spatial: usize = xs[2..].iter().product();
    let out_spatial: usize = g.out.iter().product();
    let in_strides = row_major_strides(&xs[2..]);
    let mut out = vec![0f64; xs[0] * xs[1] * out_spatial];
    let positions: Vec<_> = ndarray::indices(IxDyn(&g.out)).into_iter().collect();
    for plane in 0..xs[0] * xs[1] {
        let base = plane * in_spatial;
        for (oi, o) in positions.iter().enumerate() {
            let (mut acc, mut count, mut padded_count) = (if is_max { f64::NEG_INFINITY } else { 0.0 }, 0usize, 0usize);
            for t in ndarray::indices(IxDyn(&kernel)) {
                let mut off = Some(0usize);
                let mut in_padded = true;
                for ax in 0..k {
                    let pos = (o[ax] * strides[ax]) as i64 - g.pad_begin[ax] + (t[ax] * dilations[ax]) as i64;
                    if pos < -g.pad_begin[ax] || pos >= xs[2 + ax] as i64 + g.pad_end[ax] {
                        in_padded = false;
                    }
                    if pos < 0 || pos >= xs[2 + ax] as i64 {
                        off = None;
                    } else {
                        off = off.map(|s| s + pos as usize * in_strides[ax]);
                    }
                }
                padded_count += in_padded as usize;
                if let Some(off) = off {
                    let v = xd[base + off];
                    count += 1;
                    acc = if is_max {
                        if v > acc || v.is_nan() {
                            v
                        } else {
                            acc
                        }
                    } else {
                        acc + v
                    };
                }
            }
            out[plane * out_spatial + oi] = if is_max {
                acc
            } else {
                let d = if include_pad { padded_count } else { count };
                if d == 0 {
                    0.0
                } else {
                    acc / d as f64
                }
            };
        }
    }
    let mut shape = vec![xs[0], xs[1]];
    shape.extend(&g.out);
    let arr = ArrayD::from_shape_vec(IxDyn(&shape), out).map_err(|e| op_err!("{e}"))?;
    Ok(RtTensor::F64(arr).cast(x.dtype()))
}

pub fn global_average_pool(ctx: &OpCtx) -> OpResult<RtTensor> {
    let x = ctx.input(0)?;
    let xs = x.shape().to_vec();
    if xs.len() < 2 {
        bail!("GlobalAveragePool needs X [N, C, ...], got {xs:?}");
    }
    let spatial: usize = xs[2..].iter().product();
    let xd = x.to_f64_vec();
    let out: Vec<f64> = xd.chunks(spatial.max(1)).map(|c| c.iter().sum::<f64>() / spatial.max(1) as f64).collect();
    let mut shape = vec![xs[0], xs[1]];
    shape.extend(std::iter::repeat_n(1, xs.len() - 2));
    let arr = ArrayD::from_shape_vec(IxDyn(&shape), out).map_err(|e| op_err!("{e}"))?;
    Ok(RtTensor::F64(arr).cast(x.dtype()))
}

/// How each output position along one axis reads the input: weighted taps, or the extrapolation value.
enum Taps {
    Weighted(Vec<(usize, f64)>),
    Extrapolate,
}

struct ResizeAxis<'a> {
    mode: &'a str,
    ctm: &'a str,
    nearest_mode: &'a str,
    cubic_a: f64,
    exclude_outside: bool,
    antialias: bool,
}

fn cubic_kernel(x: f64, a: f64) -> f64 {
    let x = x.abs();
    if x <= 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    } else {
        0.0
    }
}

impl ResizeAxis<'_> {
    fn taps(&self, o: usize, in_len: usize, out_len: usize, scale: f64, roi: (f64, f64)) -> OpResult<Taps> {
        // As in the ONNX reference, the resized length in the formulas is the unrounded `scale * in_len`.
        let (of, inf, outf) = (o as f64, in_len as f64, scale * in_len as f64);
        let x = match self.ctm {
            "half_pixel" => (of + 0.5) / scale - 0.5,
            "half_pixel_symmetric" => {
                let adjustment = out_len as f64 / outf;
                let center = inf / 2.0;
                center * (1.0 - adjustment) + (of + 0.5) / scale - 0.5
            }
            "pytorch_half_pixel" => {
                if outf > 1.0 {
                    (of + 0.5) / scale - 0.5
                } else {
                    0.0
                }
            }
            "align_corners" => {
                if outf == 1.0 {
                    0.0
                } else {
                    of * (inf - 1.0) / (outf - 1.0)
                }
            }
            "asymmetric" => of / scale,
            "tf_crop_and_resize" => {
                let (start, end) = roi;
                let x = if outf > 1.0 {
                    start * (inf - 1.0) + of * (end - start) * (inf - 1.0) / (outf - 1.0)
                } else {
                    0.5 * (start + end) * (inf - 1.0)
                };
                if x < 0.0 || x > inf - 1.0 {
                    return Ok(Taps::Extrapolate);
                }
                x
            }
            other => bail!("unknown coordinate_transformation_mode '{other}'"),
        };
        let last = in_len as i64 - 1;
        let clamp = |i: i64| i.clamp(0, last) as usize;
        if self.mode == "nearest" {
            let i = match self.nearest_mode {
                "round_prefer_floor" => {
                    if x - x.floor() == 0.5 {
                        x.floor()
                    } else {
                        x.round()
                    }
                }
                "round_prefer_ceil" => {
                    if x - x.floor() == 0.5 {
                        x.ceil()
                    } else {
                        x.round()
                    }
                }
                "floor" => x.floor(),
                "ceil" => x.ceil(),
                other => bail!("unknown nearest_mode '{other}'"),
            };
            return Ok(Taps::Weighted(vec![(clamp(i as i64), 1.0)]));
        }
        let mut base = x.floor() as i64;
        let mut ratio = x - x.floor();
        // The ONNX reference takes an integral coordinate as ratio 1 from the previous index.
        if ratio == 0.0 {
            ratio = 1.0;
            base -= 1;
        }
        let s = if self.antialias { scale.min(1.0) } else { 1.0 };
        let (support, kernel): (f64, Box<dyn Fn(f64) -> f64>) = match self.mode {
            "linear" => (1.0, Box::new(|d: f64| (1.0 - d.abs()).max(0.0))),
            "cubic" => {
                let a = self.cubic_a;
                (2.0, Box::new(move |d: f64| cubic_kernel(d, a)))
            }
            other => bail!("unknown resize mode '{other}'"),
        };
        let start = (-support / s).floor() as i64 + 1;
        let end = 2 - start;
        let mut taps: Vec<(i64, f64)> = (start..end).map(|j| (base + j, kernel((j as f64 - ratio) * s))).collect();
        if self.antialias || self.exclude_outside {
            if self.exclude_outside {
                for t in taps.iter_mut() {
                    if t.0 < 0 || t.0 > last {
                        t.1 = 0.0;
                    }
                }
            }
            let sum: f64 = taps.iter().map(|t| t.1).sum();
            if sum != 0.0 {
                for t in taps.iter_mut() {
                    t.1 /= sum;
                }
            }
        }
        Ok(Taps::Weighted(taps.into_iter().map(|(i, w)| (clamp(i), w)).collect()))
    }
}

pub fn resize(ctx: &OpCtx) -> OpResult<RtTensor> {
    let x = ctx.input(0)?;
    let xs = x.shape().to_vec();
    let r = xs.len();
    let axes: Vec<usize> = match ctx.ints("axes") {
        Some(a) => a.iter().map(|&v| crate::cpu::ops::norm_axis(v, r)).collect::<OpResult<_>>()?,
        None => (0..r).collect(),
    };
    let nonempty = |i: usize| ctx.opt_input(i).filter(|t| !t.is_empty());
    let mut scales = vec![1f64; r];
    let mut out = xs.clone();
    if let Some(sizes) = nonempty(3) {
        let sizes = sizes.to_i64_vec().ok_or_else(|| op_err!("sizes must be integers"))?;
        if sizes.len() != axes.len() {
            bail!("sizes {sizes:?} must have one entry per axis {axes:?}");
        }
        let ratios: Vec<f64> = axes.iter().zip(&sizes).map(|(&a, &s)| s as f64 / xs[a] as f64).collect();
        let policy = ctx.str("keep_aspect_ratio_policy", "stretch");
        let uniform = match policy {
            "stretch" => None,
            "not_larger" => Some(ratios.iter().copied().fold(f64::INFINITY, f64::min)),
            "not_smaller" => Some(ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max)),
            other => bail!("unknown keep_aspect_ratio_policy '{other}'"),
        };
        for (i, &a) in axes.iter().enumerate() {
            match uniform {
                None => {
                    scales[a] = ratios[i];
                    out[a] = sizes[i].max(0) as usize;
                }
                Some(s) => {
                    scales[a] = s;
                    out[a] = (s * xs[a] as f64).round() as usize;
                }
            }
        }
    } else if let Some(sc) = nonempty(2) {
        let sc = sc.to_f64_vec();
        if sc.len() != axes.len() {
            bail!("scales {sc:?} must have one entry per axis {axes:?}");
        }
        for (i, &a) in axes.iter().enumerate() {
            if sc[i] <= 0.0 {
                bail!("scale {} must be positive", sc[i]);
            }
            scales[a] = sc[i];
            out[a] = (xs[a] as f64 * sc[i]).floor() as usize;
        }
    } else {
        bail!("Resize needs scales or sizes");
    }
    let roi_vals = nonempty(1).map(|t| t.to_f64_vec());
    let roi_of = |a: usize| -> (f64, f64) {
        match &roi_vals {
            Some(v) if v.len() == 2 * r => (v[a], v[a + r]),
            Some(v) if v.len() == 2 * axes.len() => {
                let i = axes.iter().position(|&x| x == a).unwrap_or(0);
                (v[i], v[i + axes.len()])
            }
            _ => (0.0, 1.0),
        }
    };
    let spec = ResizeAxis {
        mode: ctx.str("mode", "nearest"),
        ctm: ctx.str("coordinate_transformation_mode", "half_pixel"),
        nearest_mode: ctx.str("nearest_mode", "round_prefer_floor"),
        cubic_a: ctx.float("cubic_coeff_a", -0.75) as f64,
        exclude_outside: ctx.int("exclude_outside", 0) != 0,
        antialias: ctx.int("antialias", 0) != 0,
    };
    let extrapolation = ctx.float("extrapolation_value", 0.0) as f64;
    let mut data = x.cast_array::<f64>();
    for a in 0..r {
        let identity = out[a] == xs[a] && scales[a] == 1.0 && spec.ctm != "tf_crop_and_resize";
        if identity {
            continue;
        }
        if xs[a] == 0 {
            bail!("cannot resize an empty axis {a}");
        }
        let taps: Vec<Taps> =
            (0..out[a]).map(|o| spec.taps(o, xs[a], out[a], scales[a], roi_of(a))).collect::<OpResult<_>>()?;
        let mut shape = data.shape().to_vec();
        shape[a] = out[a];
        let mut next = ArrayD::<f64>::zeros(IxDyn(&shape));
        Zip::from(next.lanes_mut(Axis(a))).and(data.lanes(Axis(a))).for_each(|mut dst, src| {
            for (o, t) in taps.iter().enumerate() {
                dst[o] = match t {
                    Taps::Extrapolate => extrapolation,
                    Taps::Weighted(w) => w.iter().map(|&(i, wt)| src[i] * wt).sum(),
                };
            }
        });
        data = next;
    }
    Ok(RtTensor::F64(data).cast(x.dtype()))
}

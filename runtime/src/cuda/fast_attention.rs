//! Routes a compiled artifact's `attention` launches (the micro-kernel of
//! runtime/kernels/attention.cu: one block per query row and head) to the tiled kernels of
//! runtime/kernels/fast_attention.cu, with bit-identical outputs: each output element takes the
//! micro-kernel's float operations in the same order (the score and output FMA chains, the f64 exp,
//! the division); only the f64 row sum may be added in another order before its one rounding to f32.
//!
//! - decode (one query row): two launches, `attention_fast_dsc_*` (the scores of 128 keys per block,
//!   grid [ceil(T / 128), Hq, B], into the route's scratch) then `attention_fast_dout_*` (softmax and
//!   p v, one block per (head, 32 output channels), grid [1, Hq, B * Dv / 32]): one block per head
//!   and channel split computing every score kept a Llama-2-7B decode at one block of four warps per
//!   SM, each reading the head's K once per split; `attention_fast_dec_*` (both in one block, one
//!   row per block) serves several rows whose 8-row tiles would not fit in shared memory;
//! - prefill: `attention_fast_pre_*`, one block per (8 rows, head), K and V tiles of 64 keys loaded
//!   once per block into shared memory, grid [ceil(S / 8), Hq, B]; from [`TILED_MIN_ROWS`] rows, where
//!   the scores fit [`TILED_MAX_SCRATCH`], three launches instead ([`AttnRoute::tiled`]): the scores
//!   of 64 x 64 tiles into the route's scratch (`attention_fast_psc_*`), their softmax in place
//!   (`attention_fast_psm`), and p v over tiles of 64 rows x 64 channels (`attention_fast_ppv_*`),
//!   each K and V row read once per 64 query rows instead of once per 8;
//! - a few rows, or too few row tiles and heads for the prefill grid to fill the GPU (fewer than
//!   [`PREFILL_MIN_BLOCKS`] blocks): `attention_fast_mid_*`, the prefill tiling with the decode
//!   kernel's channel split, grid [ceil(S / 8), Hq, B * Dv / 32].
//!
//! Handled: q's type f32, f16 or bf16 (k, v, the mask and the output of the same type, as the
//! lowering plans them), D = Dv = 64 or 128, any GQA grouping, the causal flag, the mask variant, key
//! lengths whose scores fit in shared memory ([`Kernel::smem_bytes`] within [`MAX_SHARED`]; the
//! decode kernel takes T up to about 40 000). Anything else keeps its micro-kernel ([`AttnRoute::plan`]
//! returns `None`); a run whose sizes or pointers the fast kernels cannot take (misaligned operands,
//! Hq not a multiple of Hkv) launches the micro-kernel from here. An output quantization of the op is a
//! separate generated kernel after the float launch (compiler/src/lower/micro.rs `float_result`),
//! except for f32 with a step per head and channel: the `_q{i16,i8}` entries quantize in the
//! epilogue and store in the order o_proj reads (`fused_quant`).
//!
//! Measured on an H200 (Llama-2-7B-shaped layer: Hq = Hkv = 32, D = 128, outputs bit for bit equal
//! to the micro-kernel's; `attention_fast_kernels_at_llama_7b_shapes_...` in tests/cuda_executor.rs),
//! fast against micro-kernel per launch: prefill S = T = 2048 causal f32 2.51 ms against 36.2 with
//! the tiled launches (2.84 with the one-kernel prefill), f16 2.69 against 36.8 (3.92), with an
//! explicit causal mask, which computes every key, 3.70 against 72.0 (6.17; 2026-12-04 20:27 UTC);
//! decode S = 1 at T = 516 0.019 ms against 0.052 (f16 0.029 against 0.051), at T = 4096 0.139
//! against 0.459; S = 7, T = 4096 (mid) 0.295 against 0.693; S = 16, T = 2048 0.157 against 0.638.

use std::sync::atomic::{AtomicU32, Ordering};

use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, LaunchConfig};
use qcc_ir::DType;

use super::device::Gpu;
use super::fast_linear::{eval_all, BoundQuant, OutQuantArgs};
use crate::artifact::{Arg, DimExpr, Launch, Manifest, SymbolValues};

/// Threads per block of both kernels.
pub const THREADS: u32 = 128;
/// Hopper's opt-in dynamic shared memory per block.
pub const MAX_SHARED: usize = 227 * 1024;
/// Blocks from which the prefill grid runs (two per SM of an H200); fewer: the channel-split grid.
pub const PREFILL_MIN_BLOCKS: usize = 264;

/// Query rows from which a prefill (the [`Kernel::Prefill`] pick) runs as three launches
/// ([`AttnRoute::tiled`]): scores, softmax and p v as products over 64-row tiles.
pub const TILED_MIN_ROWS: usize = 64;
/// The most scratch (scores [B, Hq, S, T] f32) a tiled prefill takes; larger runs keep the one-kernel
/// prefill.
pub const TILED_MAX_SCRATCH: usize = 1 << 30;
/// Query rows, keys (scores) and output channels (p v) per block of the tiled prefill
/// (fast_attention.cu PT_ROWS); p v takes keys in tiles of [`TILED_PV_KEYS`].
const TILE: usize = 64;
const TILED_PV_KEYS: usize = 32;

/// `QCC_ATTN_TILED=0` (read once: routes ask at every launch) keeps the one-kernel prefill.
fn tiled_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("QCC_ATTN_TILED").map_or(true, |v| v != "0"))
}

/// The two fast kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Decode,
    Prefill,
    Mid,
}

impl Kernel {
    /// Query rows per block.
    pub fn rows(self) -> usize {
        match self {
            Kernel::Decode => 1,
            Kernel::Prefill | Kernel::Mid => 8,
        }
    }

    /// Keys per shared-memory tile.
    pub fn key_tile(self) -> usize {
        match self {
            Kernel::Decode => 128,
            Kernel::Prefill | Kernel::Mid => 64,
        }
    }

    /// Output channels per block.
    pub fn channels(self, dv: usize) -> usize {
        match self {
            Kernel::Decode | Kernel::Mid => 32,
            Kernel::Prefill => dv,
        }
    }

    /// Dynamic shared memory of one block at head size `d` and key length `t`: the q rows and one
    /// K / V tile (rows padded by 4 floats), and the block's scores (R x round_up(T, TK), f32).
    pub fn smem_bytes(self, d: usize, t: usize) -> usize {
        let (r, tk) = (self.rows(), self.key_tile());
        4 * (r * (d + 4) + tk * (d + 4) + r * t.div_ceil(tk) * tk)
    }

    fn tag(self) -> &'static str {
        match self {
            Kernel::Decode => "dec",
            Kernel::Prefill => "pre",
            Kernel::Mid => "mid",
        }
    }
}

/// The kernel for `s` query rows of `heads` (query heads times batch) at head size `d` and key
/// length `t`, if one fits.
pub fn pick(s: usize, heads: usize, d: usize, t: usize) -> Option<Kernel> {
    let tiled = Kernel::Prefill.smem_bytes(d, t) <= MAX_SHARED;
    if s > 1 && tiled {
        let blocks = s.div_ceil(Kernel::Prefill.rows()).saturating_mul(heads);
        Some(if blocks >= PREFILL_MIN_BLOCKS { Kernel::Prefill } else { Kernel::Mid })
    } else if Kernel::Decode.smem_bytes(d, t) <= MAX_SHARED {
        Some(Kernel::Decode)
    } else {
        None
    }
}

/// An `attention` launch on the fast kernels.
pub struct AttnRoute {
    q: u32,
    k: u32,
    v: u32,
    mask: Option<u32>,
    out: u32,
    /// B, Hq, Hkv, S, T as the plan gives them.
    dims: [DimExpr; 5],
    /// The K and V strides (batch, head, row; in elements).
    kv: [DimExpr; 6],
    /// D = Dv.
    d: usize,
    causal: i64,
    scale: f32,
    /// q's type name (f32, f16, bf16).
    dtype: &'static str,
    /// A quantized output (`_q{i16,i8}` entries, f32): its arguments and the output's head and row
    /// strides.
    quant: Option<(OutQuantArgs, [DimExpr; 2])>,
    /// The micro-kernel's entry (the fallback).
    micro_entry: String,
    /// Largest dynamic shared memory set on the decode / prefill / mid function so far.
    /// (decode, prefill, mid, decode scores, decode output: the two launches of [`Self::two_pass`];
    /// tiled scores, tiled p v: [`Self::tiled`]).
    smem_set: [AtomicU32; 7],
}

impl AttnRoute {
    /// `attention_{X}[_mask][_q{O}](q, k, v, [mask], out, B, Hq, Hkv, S, T, D, Dv, causal, scale, kb,
    /// kh, kt, vb, vh, vt, [quant, osh, oss])` as compiler/src/lower/micro.rs launches it, for the
    /// sizes the fast kernels take.
    pub fn plan(manifest: &Manifest, launch: &Launch) -> Option<AttnRoute> {
        if launch.module != "attention" {
            return None;
        }
        let rest = launch.entry.strip_prefix("attention_")?;
        let (rest, qsuffix) = OutQuantArgs::split_entry(rest);
        let (dtype, masked) = match rest.strip_suffix("_mask") {
            Some(d) => (d, true),
            None => (rest, false),
        };
        let dtype: &'static str = match dtype {
            "f32" => "f32",
            "f16" => "f16",
            "bf16" => "bf16",
            _ => return None,
        };
        let nbuf = if masked { 5 } else { 4 };
        let extra = if qsuffix.is_some() { 10 } else { 0 };
        if launch.args.len() != nbuf + 15 + extra || (qsuffix.is_some() && dtype != "f32") {
            return None;
        }
        let quant = match qsuffix {
            Some(q) => {
                let args = OutQuantArgs::parse(q, &launch.args[nbuf + 15..nbuf + 23])?;
                let [Arg::I64(osh), Arg::I64(oss)] = &launch.args[nbuf + 23..] else { return None };
                Some((args, [osh.clone(), oss.clone()]))
            }
            None => None,
        };
        let mut bufs = Vec::with_capacity(nbuf);
        for (i, a) in launch.args[..nbuf].iter().enumerate() {
            let Arg::Buffer(id) = a else { return None };
            let b = manifest.buffer(*id)?;
            // A quantized output is an integer buffer.
            if DType::from_name(&b.dtype)?.name() != dtype && !(quant.is_some() && i == nbuf - 1) {
                return None;
            }
            bufs.push(*id);
        }
        let mut ints = Vec::with_capacity(8);
        for a in &launch.args[nbuf..nbuf + 8] {
            let Arg::I64(e) = a else { return None };
            ints.push(e.clone());
        }
        let Arg::F32(scale) = launch.args[nbuf + 8] else { return None };
        let mut kv = Vec::with_capacity(6);
        for a in &launch.args[nbuf + 9..nbuf + 15] {
            let Arg::I64(e) = a else { return None };
            kv.push(e.clone());
        }
        let kv: [DimExpr; 6] = kv.try_into().ok()?;
        let konst = |e: &DimExpr| if let DimExpr::Const(v) = e { Some(*v) } else { None };
        let (d, dv, causal) = (konst(&ints[5])?, konst(&ints[6])?, konst(&ints[7])?);
        if d != dv || !(d == 64 || d == 128) {
            return None;
        }
        if let (Some(hq), Some(hkv)) = (konst(&ints[1]), konst(&ints[2])) {
            if hkv <= 0 || hq % hkv != 0 {
                return None;
            }
        }
        // The micro-kernel's shared memory is the score row at the largest key length.
        let t_max = launch.shared_bytes as usize / 4;
        pick(1, 1, d as usize, t_max)?;
        let (q, k, v, out) = (bufs[0], bufs[1], bufs[2], bufs[nbuf - 1]);
        let mask = masked.then(|| bufs[3]);
        let dims = [ints[0].clone(), ints[1].clone(), ints[2].clone(), ints[3].clone(), ints[4].clone()];
        Some(AttnRoute {
            q,
            k,
            v,
            mask,
            out,
            dims,
            kv,
            d: d as usize,
            causal,
            scale,
            dtype,
            quant,
            micro_entry: launch.entry.clone(),
            smem_set: Default::default(),
        })
    }

    /// The entry-name suffixes of the mask (`_mask`) and of a quantized output (`_q{i16,i8}`).
    fn suffixes(&self) -> (&'static str, &str) {
        (if self.mask.is_some() { "_mask" } else { "" }, self.quant.as_ref().map_or("", |(q, _)| q.suffix.as_str()))
    }

    /// The fast kernel's entry name for `kernel`.
    pub fn entry(&self, kernel: Kernel) -> String {
        let (mask, q) = self.suffixes();
        format!("attention_fast_{}_{}{mask}_d{}{q}", kernel.tag(), self.dtype, self.d)
    }

    /// Entries of the two-pass decode (scores, then softmax and p v).
    pub fn two_pass_entries(&self) -> [String; 2] {
        let (mask, q) = self.suffixes();
        [
            format!("attention_fast_dsc_{}{mask}_d{}", self.dtype, self.d),
            format!("attention_fast_dout_{}_d{}{q}", self.dtype, self.d),
        ]
    }

    /// Entries of the tiled prefill (scores, softmax in place, p v).
    pub fn tiled_entries(&self) -> [String; 3] {
        let (mask, q) = self.suffixes();
        [
            format!("attention_fast_psc_{}{mask}_d{}", self.dtype, self.d),
            "attention_fast_psm".to_string(),
            format!("attention_fast_ppv_{}_d{}{q}", self.dtype, self.d),
        ]
    }

    /// Whether a prefill runs as three launches (fast_attention.cu `pt_scores`, `attention_fast_psm`,
    /// `pt_pv`): from [`TILED_MIN_ROWS`] query rows where the prefill kernel would run, its scores in
    /// at most [`TILED_MAX_SCRATCH`] bytes of scratch. `QCC_ATTN_TILED=0` keeps the one-kernel prefill.
    pub fn tiled(s: usize, heads: usize, d: usize, t: usize) -> bool {
        s >= TILED_MIN_ROWS
            && pick(s, heads, d, t) == Some(Kernel::Prefill)
            && 4 * heads * s * t <= TILED_MAX_SCRATCH
            && tiled_enabled()
    }

    /// Whether one query row runs as two launches (fast_attention.cu `fa_dec_scores`): the scores
    /// of 128 keys per block, then the decode kernel from the scores (4 B Hq T bytes of scratch).
    pub fn two_pass(s: usize, heads: usize, d: usize, t: usize) -> bool {
        s == 1 && pick(s, heads, d, t) == Some(Kernel::Decode)
    }

    /// Scratch bytes of these symbol values: the scores of a two-pass decode or a tiled prefill.
    pub fn scratch_bytes(&self, values: &SymbolValues) -> Result<usize, String> {
        let [b, hq, _, s, t] = self.sizes(values)?.map(|x| x as usize);
        Ok(if Self::two_pass(s, b * hq, self.d, t) || Self::tiled(s, b * hq, self.d, t) {
            4 * b * hq * s * t
        } else {
            0
        })
    }

    /// B, Hq, Hkv, S, T at these symbol values (none negative).
    fn sizes(&self, values: &SymbolValues) -> Result<[i64; 5], String> {
        let n = eval_all(&self.dims, values)?;
        if n.iter().any(|&x| x < 0) {
            return Err(format!("negative size in B, Hq, Hkv, S, T = {n:?}"));
        }
        Ok(n)
    }

    /// Enqueues the attention of these symbol values.
    pub fn launch(
        &self,
        gpu: &Gpu,
        scratch: &CudaSlice<u8>,
        values: &SymbolValues,
        ptr: &dyn Fn(u32) -> Result<u64, String>,
    ) -> Result<(), String> {
        let [b, hq, hkv, s, t] = self.sizes(values)?;
        if b == 0 || hq == 0 || s == 0 {
            return Ok(());
        }
        let kv = eval_all(&self.kv, values)?;
        let (q, k, v, out) = (ptr(self.q)?, ptr(self.k)?, ptr(self.v)?, ptr(self.out)?);
        let mask = match self.mask {
            Some(m) => ptr(m)?,
            None => 0,
        };
        let quant = match &self.quant {
            Some((args, strides)) => Some((args.bind(values, ptr)?, eval_all(strides, values)?)),
            None => None,
        };
        let (su, tu, d) = (s as usize, t as usize, self.d);
        let kernel = pick(su, (b * hq) as usize, d, tu);
        let element = if self.dtype == "f32" { 4 } else { 2 };
        let aligned = [q, k, v, out].iter().all(|p| p % 16 == 0) && kv.iter().all(|s| (s * element) % 16 == 0);
        let valid = hkv > 0 && hq % hkv == 0 && hq <= 65_535;
        let Some(kernel) = kernel.filter(|_| aligned && valid) else {
            return self.launch_micro(gpu, [b, hq, hkv, s, t], kv, [q, k, v, mask, out], quant.as_ref());
        };
        let splits = d / kernel.channels(d);
        let (gx, gz) = (su.div_ceil(kernel.rows()), b as usize * splits);
        if Self::two_pass(su, (b * hq) as usize, d, tu) && gz <= 65_535 && scratch.len() >= 4 * (b * hq * t) as usize {
            let scores = scratch.device_ptr(&gpu.stream).0;
            return self.launch_two_pass(gpu, scores, [b, hq, hkv, t], kv, [q, k, v, mask, out], quant.as_ref());
        }
        let heads = (b * hq) as usize;
        if Self::tiled(su, heads, d, tu)
            && heads * (d / TILE) <= 65_535
            && su.div_ceil(TILE) <= 65_535
            && scratch.len() >= 4 * heads * su * tu
        {
            let scores = scratch.device_ptr(&gpu.stream).0;
            return self.launch_tiled(gpu, scores, [b, hq, hkv, s, t], kv, [q, k, v, mask, out], quant.as_ref());
        }
        if gz > 65_535 || gx > i32::MAX as usize {
            return self.launch_micro(gpu, [b, hq, hkv, s, t], kv, [q, k, v, mask, out], quant.as_ref());
        }
        let f = gpu.function("fast_attention", &self.entry(kernel)).map_err(|e| e.to_string())?;
        let smem = kernel.smem_bytes(d, tu) as u32;
        self.ensure_smem(&f, kernel as usize, smem)?;
        let scale = self.scale;
        let mut l = gpu.launcher(&f);
        l.arg(&q).arg(&k).arg(&v).arg(&mask).arg(&out);
        l.arg(&b).arg(&hq).arg(&hkv).arg(&s).arg(&t).arg(&self.causal).arg(&scale);
        for stride in &kv {
            l.arg(stride);
        }
        if let Some((qa, strides)) = &quant {
            qa.push(&mut l);
            l.arg(&strides[0]).arg(&strides[1]);
        }
        let cfg = LaunchConfig {
            grid_dim: (gx as u32, hq as u32, gz as u32),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem,
        };
        // SAFETY: signature (S*, S*, S*, S*, S*, long x 6, float, long x 6, [float*, long x 3, float x
        // 4, long x 2]) as fast_attention.cu's entry of this name; q [B, Hq, S, D], k and v
        // [B, Hkv, T, D] at the plan's strides, out [B, Hq, S, D] and the mask [S, T] as the plan
        // sized them for these symbols (the micro-kernel reads the same elements); rows 16-byte
        // aligned (base pointers and strides checked above, D a multiple of 64); `smem` is what the
        // kernel's tiles take at this T.
        unsafe { l.launch(cfg) }.map(|_| ()).map_err(|e| format!("{}: {e}", self.entry(kernel)))
    }

    /// One query row in two launches ([`Self::two_pass`]): `scores` [B, Hq, T] f32 on the device.
    fn launch_two_pass(
        &self,
        gpu: &Gpu,
        scores: u64,
        [b, hq, hkv, t]: [i64; 4],
        kv: [i64; 6],
        [q, k, v, mask, out]: [u64; 5],
        quant: Option<&(BoundQuant, [i64; 2])>,
    ) -> Result<(), String> {
        let [dsc, dout] = self.two_pass_entries();
        let (d, tu) = (self.d, t as usize);
        let f = gpu.function("fast_attention", &dsc).map_err(|e| e.to_string())?;
        let smem = (4 * (d + 4) * (THREADS as usize + 1)) as u32;
        self.ensure_smem(&f, 3, smem)?;
        let mut l = gpu.launcher(&f);
        l.arg(&q).arg(&k).arg(&mask).arg(&scores).arg(&b).arg(&hq).arg(&hkv).arg(&t).arg(&self.scale);
        l.arg(&kv[0]).arg(&kv[1]).arg(&kv[2]);
        let cfg = LaunchConfig {
            grid_dim: (tu.div_ceil(THREADS as usize) as u32, hq as u32, b as u32),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem,
        };
        // SAFETY: (S*, S*, S*, float*, long x 4, float, long x 3) as fast_attention.cu's
        // attention_fast_dsc_*; q [B, Hq, 1, D], k [B, Hkv, T, D] at its strides (rows 16-byte
        // aligned, checked by the caller), the mask row [T], `scores` 4 B Hq T bytes of scratch.
        unsafe { l.launch(cfg) }.map_err(|e| format!("{dsc}: {e}"))?;
        let f = gpu.function("fast_attention", &dout).map_err(|e| e.to_string())?;
        let smem = Kernel::Decode.smem_bytes(d, tu) as u32;
        self.ensure_smem(&f, 4, smem)?;
        let mut l = gpu.launcher(&f);
        l.arg(&scores).arg(&v).arg(&out).arg(&b).arg(&hq).arg(&hkv).arg(&t);
        l.arg(&kv[3]).arg(&kv[4]).arg(&kv[5]);
        if let Some((qa, strides)) = quant {
            qa.push(&mut l);
            l.arg(&strides[0]).arg(&strides[1]);
        }
        let splits = d / Kernel::Decode.channels(d);
        let cfg = LaunchConfig {
            grid_dim: (1, hq as u32, (b as usize * splits) as u32),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem,
        };
        // SAFETY: (float*, S*, S* or O*, long x 7, [float*, long x 3, float x 4, long x 2]) as
        // attention_fast_dout_*: the scores written by the launch above, v at its strides, out
        // [B, Hq, 1, D] (or at the quantized strides); `smem` is the decode kernel's at this T.
        unsafe { l.launch(cfg) }.map(|_| ()).map_err(|e| format!("{dout}: {e}"))
    }

    /// A prefill in three launches ([`Self::tiled`]): `scores` [B, Hq, S, T] f32 on the device.
    fn launch_tiled(
        &self,
        gpu: &Gpu,
        scores: u64,
        [b, hq, hkv, s, t]: [i64; 5],
        kv: [i64; 6],
        [q, k, v, mask, out]: [u64; 5],
        quant: Option<&(BoundQuant, [i64; 2])>,
    ) -> Result<(), String> {
        let [psc, psm, ppv] = self.tiled_entries();
        let (d, su, tu, heads) = (self.d, s as usize, t as usize, (b * hq) as usize);
        let f = gpu.function("fast_attention", &psc).map_err(|e| e.to_string())?;
        let smem = (4 * 2 * TILE * (d + 4)) as u32;
        self.ensure_smem(&f, 5, smem)?;
        let mut l = gpu.launcher(&f);
        l.arg(&q).arg(&k).arg(&mask).arg(&scores).arg(&b).arg(&hq).arg(&hkv).arg(&s).arg(&t);
        l.arg(&self.causal).arg(&self.scale).arg(&kv[0]).arg(&kv[1]).arg(&kv[2]);
        let cfg = LaunchConfig {
            grid_dim: (tu.div_ceil(TILE) as u32, su.div_ceil(TILE) as u32, heads as u32),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem,
        };
        // SAFETY: (S*, S*, S*, float*, long x 6, float, long x 3) as fast_attention.cu's
        // attention_fast_psc_*; q [B, Hq, S, D], k [B, Hkv, T, D] at its strides (rows 16-byte
        // aligned, checked by the caller), the mask [S, T], `scores` 4 B Hq S T bytes of scratch.
        unsafe { l.launch(cfg) }.map_err(|e| format!("{psc}: {e}"))?;

        let f = gpu.function("fast_attention", &psm).map_err(|e| e.to_string())?;
        let rows = b * hq * s;
        let mut l = gpu.launcher(&f);
        l.arg(&scores).arg(&rows).arg(&s).arg(&t).arg(&self.causal);
        let warps = (THREADS / 32) as usize;
        let cfg = LaunchConfig {
            grid_dim: ((rows as usize).div_ceil(warps) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: (float*, long x 4) as attention_fast_psm: the B Hq S rows of T scores written above.
        unsafe { l.launch(cfg) }.map_err(|e| format!("{psm}: {e}"))?;

        let f = gpu.function("fast_attention", &ppv).map_err(|e| e.to_string())?;
        let smem = (4 * (TILE * (TILED_PV_KEYS + 4) + TILED_PV_KEYS * (TILE + 4))) as u32;
        self.ensure_smem(&f, 6, smem)?;
        let mut l = gpu.launcher(&f);
        l.arg(&scores).arg(&v).arg(&out).arg(&b).arg(&hq).arg(&hkv).arg(&s).arg(&t).arg(&self.causal);
        l.arg(&kv[3]).arg(&kv[4]).arg(&kv[5]);
        if let Some((qa, strides)) = quant {
            qa.push(&mut l);
            l.arg(&strides[0]).arg(&strides[1]);
        }
        let cfg = LaunchConfig {
            grid_dim: (su.div_ceil(TILE) as u32, 1, (heads * (d / TILE)) as u32),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem,
        };
        // SAFETY: (float*, S*, S* or O*, long x 9, [float*, long x 3, float x 4, long x 2]) as
        // attention_fast_ppv_*: the probabilities written above, v at its strides (rows 16-byte
        // aligned), out [B, Hq, S, D] (or at the quantized strides).
        unsafe { l.launch(cfg) }.map(|_| ()).map_err(|e| format!("{ppv}: {e}"))
    }

    /// Raises the function's dynamic shared memory limit to `smem` once (per route and kernel).
    fn ensure_smem(&self, f: &CudaFunction, slot: usize, smem: u32) -> Result<(), String> {
        if smem <= 48 * 1024 || smem <= self.smem_set[slot].load(Ordering::Relaxed) {
            return Ok(());
        }
        f.set_attribute(
            cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .map_err(|e| format!("shared memory {smem} bytes: {e}"))?;
        self.smem_set[slot].fetch_max(smem, Ordering::Relaxed);
        Ok(())
    }

    /// The micro-kernel itself, as the plan would launch it (grid [S, Hq, B], 4 T bytes of scores).
    fn launch_micro(
        &self,
        gpu: &Gpu,
        [b, hq, hkv, s, t]: [i64; 5],
        kv: [i64; 6],
        [q, k, v, mask, out]: [u64; 5],
        quant: Option<&(BoundQuant, [i64; 2])>,
    ) -> Result<(), String> {
        let f = gpu.function("attention", &self.micro_entry).map_err(|e| e.to_string())?;
        let smem = u32::try_from(4 * t).map_err(|_| format!("key length {t}"))?;
        if smem > 48 * 1024 {
            f.set_attribute(
                cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .map_err(|e| format!("shared memory {smem} bytes: {e}"))?;
        }
        let (d, scale) = (self.d as i64, self.scale);
        let mut l = gpu.launcher(&f);
        l.arg(&q).arg(&k).arg(&v);
        if self.mask.is_some() {
            l.arg(&mask);
        }
        l.arg(&out).arg(&b).arg(&hq).arg(&hkv).arg(&s).arg(&t).arg(&d).arg(&d).arg(&self.causal).arg(&scale);
        for stride in &kv {
            l.arg(stride);
        }
        if let Some((qa, strides)) = quant {
            qa.push(&mut l);
            l.arg(&strides[0]).arg(&strides[1]);
        }
        let dim = |x: i64| u32::try_from(x).map_err(|_| format!("grid size {x}"));
        let cfg =
            LaunchConfig { grid_dim: (dim(s)?, dim(hq)?, dim(b)?), block_dim: (128, 1, 1), shared_mem_bytes: smem };
        // SAFETY: the micro-kernel's own signature and geometry (compiler/src/lower/micro.rs).
        unsafe { l.launch(cfg) }.map(|_| ()).map_err(|e| format!("{}: {e}", self.micro_entry))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifact::{Buffer, Place};

    fn manifest(dtypes: &[&str]) -> Manifest {
        Manifest::with_buffers(
            dtypes
                .iter()
                .enumerate()
                .map(|(i, dtype)| Buffer {
                    id: i as u32,
                    name: format!("b{i}"),
                    dtype: dtype.to_string(),
                    dims: vec![DimExpr::Const(1)],
                    place: Place::Arena { offset: 0, bytes: 0 },
                    order: None,
                })
                .collect(),
        )
    }

    /// The micro-kernel launch over buffers 0.. (q, k, v, [mask], out).
    fn launch(entry: &str, masked: bool, [hq, hkv, d, dv]: [i64; 4], t_max: u32) -> Launch {
        let n = if masked { 5 } else { 4 };
        let mut args: Vec<Arg> = (0..n).map(Arg::Buffer).collect();
        let seq = || DimExpr::Sym("seq".into());
        let c = DimExpr::Const;
        args.extend([c(1), c(hq), c(hkv), seq(), seq(), c(d), c(dv), c(1)].map(Arg::I64));
        args.push(Arg::F32(0.125));
        let rows = |w: i64| DimExpr::Mul(Box::new(seq()), Box::new(c(w)));
        args.extend([rows(hkv * d), rows(d), c(d), rows(hkv * dv), rows(dv), c(dv)].map(Arg::I64));
        Launch {
            node: "attn".into(),
            module: "attention".into(),
            entry: entry.into(),
            grid: [seq(), c(hq), c(1)],
            block: [128, 1, 1],
            shared_bytes: 4 * t_max,
            args,
        }
    }

    #[test]
    fn plans_the_sizes_the_fast_kernels_take_and_declines_the_rest() {
        let f32s = manifest(&["f32"; 5]);
        let f16s = manifest(&["f16"; 5]);
        let ok = |m: &Manifest, l: &Launch| AttnRoute::plan(m, l).is_some();
        // f32 and f16, with and without a mask, D = 64 and 128, GQA 32 / 8 and 8 / 2.
        for d in [64, 128] {
            assert!(ok(&f32s, &launch("attention_f32", false, [32, 32, d, d], 4096)), "d={d}");
            assert!(ok(&f32s, &launch("attention_f32_mask", true, [8, 2, d, d], 2048)), "d={d}");
            assert!(ok(&f16s, &launch("attention_f16", false, [32, 8, d, d], 516)), "d={d}");
        }
        let r = AttnRoute::plan(&f16s, &launch("attention_f16_mask", true, [8, 2, 128, 128], 300)).unwrap();
        assert_eq!(r.entry(Kernel::Decode), "attention_fast_dec_f16_mask_d128");
        assert_eq!(r.entry(Kernel::Prefill), "attention_fast_pre_f16_mask_d128");
        assert_eq!(r.entry(Kernel::Mid), "attention_fast_mid_f16_mask_d128");
        assert_eq!((r.q, r.k, r.v, r.mask, r.out), (0, 1, 2, Some(3), 4));
        let r = AttnRoute::plan(&f32s, &launch("attention_f32", false, [8, 2, 64, 64], 300)).unwrap();
        assert_eq!((r.mask, r.out, r.causal, r.scale), (None, 3, 1, 0.125));
        // The K / V strides follow the float arguments: (seq 2 64, seq 64, 64) twice here.
        let values = SymbolValues::from([("seq".to_string(), 5)]);
        let kv: Vec<i64> = r.kv.iter().map(|e| e.eval(&values).unwrap()).collect();
        assert_eq!(kv, [640, 320, 64, 640, 320, 64]);
        let mut short = launch("attention_f32", false, [8, 2, 64, 64], 300);
        short.args.truncate(short.args.len() - 6);
        assert!(AttnRoute::plan(&f32s, &short).is_none(), "a plan without the strides is declined");
        // Declined: other head sizes, D != Dv, Hq not a multiple of Hkv, a buffer of another type,
        // another module, a mask entry without its buffer, scores beyond shared memory.
        assert!(!ok(&f32s, &launch("attention_f32", false, [8, 2, 96, 96], 64)));
        assert!(!ok(&f32s, &launch("attention_f32", false, [8, 2, 128, 64], 64)));
        assert!(!ok(&f32s, &launch("attention_f32", false, [6, 4, 64, 64], 64)));
        assert!(!ok(&f16s, &launch("attention_f32", false, [8, 2, 64, 64], 64)));
        assert!(!ok(&manifest(&["f32", "f32", "f16", "f32"]), &launch("attention_f32", false, [8, 2, 64, 64], 64)));
        assert!(!ok(&f32s, &launch("attention_f32_mask", false, [8, 2, 64, 64], 64)));
        assert!(!ok(&f32s, &launch("attention_i8", false, [8, 2, 64, 64], 64)));
        let mut other = launch("attention_f32", false, [8, 2, 64, 64], 64);
        other.module = "linear".into();
        assert!(!ok(&f32s, &other));
        assert!(ok(&f32s, &launch("attention_f32", false, [8, 2, 128, 128], 40_000)));
        assert!(!ok(&f32s, &launch("attention_f32", false, [8, 2, 128, 128], 60_000)));
    }

    /// `launch` of `attention_f32[_mask]_q{suffix}`: the float arguments, then the quantization's
    /// (step buffer 9, seq, past, prefix, lo, hi, plo, phi) and the output strides.
    fn quantized(masked: bool, suffix: &str, d: i64) -> Launch {
        let mask = if masked { "_mask" } else { "" };
        let mut l = launch(&format!("attention_f32{mask}_{suffix}"), masked, [32, 32, d, d], 516);
        let c = DimExpr::Const;
        l.args.push(Arg::Buffer(9));
        l.args.extend([DimExpr::Sym("seq".into()), DimExpr::Sym("past_seq".into()), c(1)].map(Arg::I64));
        l.args.extend([-8.0, 7.0, -32768.0, 32767.0].map(Arg::F32));
        l.args.extend([c(d), c(32 * d)].map(Arg::I64));
        l
    }

    #[test]
    fn quantized_entries_route_to_the_quantized_fast_kernels() {
        // q, k, v, mask f32, the output i16 (or i8), the step (buffer 9) f32.
        let mut dtypes = vec!["f32"; 10];
        dtypes[4] = "i16";
        let m = manifest(&dtypes);
        let r = AttnRoute::plan(&m, &quantized(true, "qi16", 128)).expect("quantized f32 attention is routed");
        assert_eq!(r.entry(Kernel::Decode), "attention_fast_dec_f32_mask_d128_qi16");
        assert_eq!(r.entry(Kernel::Prefill), "attention_fast_pre_f32_mask_d128_qi16");
        assert_eq!(r.out, 4);
        let (q, strides) = r.quant.as_ref().unwrap();
        assert_eq!(q.suffix, "_qi16");
        assert_eq!(strides, &[DimExpr::Const(128), DimExpr::Const(32 * 128)]);
        let mut dtypes = vec!["f32"; 10];
        dtypes[3] = "i8";
        let r = AttnRoute::plan(&manifest(&dtypes), &quantized(false, "qi8", 64)).unwrap();
        assert_eq!(r.entry(Kernel::Mid), "attention_fast_mid_f32_d64_qi8");
        // Declined: an unknown output type, arguments missing, an f16 quantized entry.
        assert!(AttnRoute::plan(&m, &quantized(true, "qi4", 128)).is_none());
        let mut short = quantized(true, "qi16", 128);
        short.args.pop();
        assert!(AttnRoute::plan(&m, &short).is_none());
        let mut f16 = quantized(true, "qi16", 128);
        f16.entry = "attention_f16_mask_qi16".into();
        assert!(AttnRoute::plan(&manifest(&["f16"; 10]), &f16).is_none());
    }

    #[test]
    fn one_decode_row_runs_in_two_launches_with_its_scores_in_scratch() {
        let f32s = manifest(&["f32"; 5]);
        let r = AttnRoute::plan(&f32s, &launch("attention_f32_mask", true, [32, 8, 128, 128], 4096)).unwrap();
        assert_eq!(r.two_pass_entries(), ["attention_fast_dsc_f32_mask_d128", "attention_fast_dout_f32_d128"]);
        let mut dtypes = vec!["f32"; 10];
        dtypes[4] = "i16";
        let q = AttnRoute::plan(&manifest(&dtypes), &quantized(true, "qi16", 64)).unwrap();
        assert_eq!(q.two_pass_entries(), ["attention_fast_dsc_f32_mask_d64", "attention_fast_dout_f32_d64_qi16"]);
        assert!(AttnRoute::two_pass(1, 32, 128, 516));
        assert!(!AttnRoute::two_pass(2, 32, 128, 516), "a few rows: the mid kernel");
        assert!(!AttnRoute::two_pass(1, 32, 128, 100_000), "beyond shared memory: the micro-kernel");
        // Scratch: the scores of one row per head, f32 (B = 1, Hq = 32 here); a tiled prefill's
        // [Hq, S, T] scores; none for a few rows.
        let values = |seq: i64| SymbolValues::from([("seq".to_string(), seq)]);
        assert_eq!(r.scratch_bytes(&values(1)).unwrap(), 4 * 32, "S = T = 1: a decode row");
        assert_eq!(r.scratch_bytes(&values(7)).unwrap(), 0, "S = T = 7: the mid kernel");
        assert_eq!(r.scratch_bytes(&values(77)).unwrap(), 4 * 32 * 77 * 77, "S = T = 77: the tiled prefill");
        let mut decode = launch("attention_f32_mask", true, [32, 8, 128, 128], 4096);
        decode.args[8] = Arg::I64(DimExpr::Const(1));
        let r = AttnRoute::plan(&f32s, &decode).unwrap();
        assert_eq!(r.scratch_bytes(&values(516)).unwrap(), 4 * 32 * 516);
        assert_eq!(r.scratch_bytes(&values(0)).unwrap(), 0);
    }

    #[test]
    fn long_prefills_run_tiled_in_three_launches_within_their_scratch_cap() {
        let f32s = manifest(&["f32"; 5]);
        let r = AttnRoute::plan(&f32s, &launch("attention_f32_mask", true, [32, 8, 128, 128], 4096)).unwrap();
        assert_eq!(
            r.tiled_entries(),
            ["attention_fast_psc_f32_mask_d128", "attention_fast_psm", "attention_fast_ppv_f32_d128"]
        );
        let mut dtypes = vec!["f32"; 10];
        dtypes[4] = "i16";
        let q = AttnRoute::plan(&manifest(&dtypes), &quantized(true, "qi16", 64)).unwrap();
        assert_eq!(q.tiled_entries()[2], "attention_fast_ppv_f32_d64_qi16");
        assert!(AttnRoute::tiled(2048, 32, 128, 2048), "a Llama-2-7B prefill: 512 MiB of scores");
        assert!(AttnRoute::tiled(300, 8, 64, 300));
        assert!(!AttnRoute::tiled(40, 8, 128, 300), "fewer rows than one tile");
        assert!(!AttnRoute::tiled(7, 32, 128, 4096), "a few rows: the mid kernel");
        assert!(!AttnRoute::tiled(1, 32, 128, 4096), "decode");
        assert!(!AttnRoute::tiled(2048, 16 * 32, 128, 2048), "8 GiB of scores: the one-kernel prefill");
    }

    #[test]
    fn picks_decode_for_one_row_prefill_for_full_grids_and_mid_between() {
        assert_eq!(pick(1, 32, 128, 516), Some(Kernel::Decode));
        assert_eq!(pick(1, 32, 128, 40_000), Some(Kernel::Decode));
        // 7 rows of 32 heads: one row tile per head, split by channels.
        assert_eq!(pick(7, 32, 128, 4096), Some(Kernel::Mid));
        assert_eq!(pick(2048, 32, 128, 2048), Some(Kernel::Prefill));
        assert_eq!(pick(4096, 32, 128, 4096), Some(Kernel::Prefill));
        // 10 row tiles x 8 heads = 80 blocks; 38 x 8 = 304.
        assert_eq!(pick(77, 8, 64, 77), Some(Kernel::Mid));
        assert_eq!(pick(300, 8, 64, 300), Some(Kernel::Prefill));
        // 8 rows of scores at T = 8192 exceed 227 KiB: the decode kernel (one row) takes it.
        assert_eq!(pick(8192, 32, 128, 8192), Some(Kernel::Decode));
        assert_eq!(pick(1, 32, 128, 100_000), None);
        // Shared memory: q row + a 128-key tile + the score row, rows padded by 4 floats.
        assert_eq!(Kernel::Decode.smem_bytes(128, 516), 4 * (132 + 128 * 132 + 640));
        assert_eq!(Kernel::Prefill.smem_bytes(64, 77), 4 * (8 * 68 + 64 * 68 + 8 * 128));
        assert!(Kernel::Prefill.smem_bytes(128, 4096) <= MAX_SHARED);
    }
}

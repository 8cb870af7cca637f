//! `qcc-run bench --e2e`: end-to-end prefill (one sequence of `--prefill T` tokens, default 2048) and
//! decode of a Llama-2-7B-shaped decoder built from the runtime's kernels (NOT an artifact compiled by
//! qcc: a 7B artifact's weights cannot travel to the GPU machine), W4A4 against fp16, in the same
//! process on the same device.
//!
//! Prefill ([`Model::prefill`]): every layer on all T tokens with causal attention
//! ([`prefill_attention`]: cuBLAS strided-batched QK^T and PV around a causal softmax kernel, the same
//! on both paths), the W4A4 linears on the fastest bit-exact W4A4 GEMM per linear
//! ([`Model::tune_gemm`]), the final norm + LM head on the last token; no KV-cache write.
//!
//! Both sides: 32 layers (d 4096, ffn 11008, 32 heads x 128, vocab 32000), seeded random weights
//! generated on the device, a KV cache holding `past` tokens, one decode step (token `past`) for a
//! batch of M sequences captured as one CUDA graph and replayed; the same RMSNorm, rotary, decode
//! attention (fp16 cache, split over 64-key chunks) and LM head (cuBLAS fp16) on both sides.
//! - W4A4: fused RMSNorm + int4 quantization, int4 GEMV (runtime/kernels/w4_gemv.cu, tiled weights)
//!   for qkv / o / gate-up / down with the residual add in the GEMV epilogue, the attention output
//!   quantized by its own kernel, SwiGLU + online Hadamard (256-blocks) + int4 quantization.
//! - fp16: cuBLAS fp16 (fp32 compute) for every linear, residual adds through beta = 1.
//!
//! Left out on both sides: the embedding lookup is a copy of M ready rows; sampling.
//! [`check_decoder_kernels`] checks each kernel of runtime/kernels/decoder.cu against a CPU reference.

use std::collections::HashMap;

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t};
use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::{CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
use half::f16;

use super::time_launches;
use crate::cuda::device::{ActBits, GemmVariant, GemvVariant, Gpu, W4LinearArgs};
use crate::cuda::pack::{unpack_int4_split, SplitMix64};
use crate::cuda::CudaError;

/// Decoder geometry.
#[derive(Debug, Clone, Copy)]
pub struct DecoderShape {
    pub layers: usize,
    pub d: usize,
    pub ffn: usize,
    pub heads: usize,
    pub vocab: usize,
}

/// Llama-2-7B.
pub const LLAMA2_7B: DecoderShape = DecoderShape { layers: 32, d: 4096, ffn: 11008, heads: 32, vocab: 32000 };

const EPS: f32 = 1e-5;
const ROW_THREADS: u32 = 512;
const ATT_CHUNK: usize = 64;

fn dptr<T>(gpu: &Gpu, s: &CudaSlice<T>) -> u64 {
    s.device_ptr(&gpu.stream).0
}

fn launch_err(name: &str) -> impl Fn(cudarc::driver::DriverError) -> CudaError + '_ {
    move |e| CudaError::Launch { kernel: name.to_string(), what: e.to_string() }
}

/// Typed launchers of runtime/kernels/decoder.cu (raw device addresses, as [`W4LinearArgs`]).
pub struct DecoderKernels<'a> {
    gpu: &'a Gpu,
}

impl<'a> DecoderKernels<'a> {
    pub fn new(gpu: &'a Gpu) -> Self {
        DecoderKernels { gpu }
    }

    fn cfg(grid: (u32, u32, u32), block: u32, smem: u32) -> LaunchConfig {
        LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: smem }
    }

    fn fill_grid(n: usize) -> (u32, u32, u32) {
        ((n.div_ceil(256)).clamp(1, 132 * 16) as u32, 1, 1)
    }

    pub fn fill_u32(&self, p: u64, n: usize, seed: u64) -> Result<(), CudaError> {
        let f = self.gpu.function("decoder", "fill_u32")?;
        let nn = n as i64;
        let mut b = self.gpu.stream.launch_builder(&f);
        b.arg(&p).arg(&nn).arg(&seed);
        // SAFETY: signature (u32*, long long, u64); p holds n words.
        unsafe { b.launch(Self::cfg(Self::fill_grid(n), 256, 0)) }.map_err(launch_err("fill_u32"))?;
        Ok(())
    }

    pub fn fill_f16(&self, p: u64, n: usize, seed: u64, lo: f32, hi: f32) -> Result<(), CudaError> {
        let f = self.gpu.function("decoder", "fill_f16")?;
        let nn = n as i64;
        let mut b = self.gpu.stream.launch_builder(&f);
        b.arg(&p).arg(&nn).arg(&seed).arg(&lo).arg(&hi);
        // SAFETY: signature (u16*, long long, u64, float, float); p holds n halves.
        unsafe { b.launch(Self::cfg(Self::fill_grid(n), 256, 0)) }.map_err(launch_err("fill_f16"))?;
        Ok(())
    }

    pub fn fill_f32(&self, p: u64, n: usize, seed: u64, lo: f32, hi: f32) -> Result<(), CudaError> {
        let f = self.gpu.function("decoder", "fill_f32")?;
        let nn = n as i64;
        let mut b = self.gpu.stream.launch_builder(&f);
        b.arg(&p).arg(&nn).arg(&seed).arg(&lo).arg(&hi);
        // SAFETY: signature (float*, long long, u64, float, float); p holds n floats.
        unsafe { b.launch(Self::cfg(Self::fill_grid(n), 256, 0)) }.map_err(launch_err("fill_f32"))?;
        Ok(())
    }

    /// RMSNorm (gamma != 0) or plain copy (gamma == 0), then int4 quantization per row.
    pub fn rmsnorm_quant_a4(&self, x: u64, gamma: u64, q: u64, sx: u64, m: usize, d: usize) -> Result<(), CudaError> {
        let f = self.gpu.function("decoder", "rmsnorm_quant_a4")?;
        let (eps, dd) = (EPS, d as i32);
        let mut b = self.gpu.stream.launch_builder(&f);
        b.arg(&x).arg(&gamma).arg(&eps).arg(&q).arg(&sx).arg(&dd);
        // SAFETY: signature (u16*, u16*, float, u32*, float*, int); buffers sized [m, d].
        unsafe { b.launch(Self::cfg((m as u32, 1, 1), ROW_THREADS, (4 * d) as u32)) }
            .map_err(launch_err("rmsnorm_quant_a4"))?;
        Ok(())
    }

    /// Split form of [`Self::rmsnorm_quant_a4`]: per-256-slice partials, then the pack kernel; `part`
    /// holds m * ceil(d / 256) * 2 floats.
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_quant_split(
        &self,
        x: u64,
        gamma: u64,
        part: u64,
        q: u64,
        sx: u64,
        m: usize,
        d: usize,
    ) -> Result<(), CudaError> {
        let nb = d.div_ceil(256);
        let f = self.gpu.function("decoder", "rmsnorm_part")?;
        let dd = d as i32;
        let mut b = self.gpu.stream.launch_builder(&f);
        b.arg(&x).arg(&gamma).arg(&dd).arg(&part);
        // SAFETY: signature (u16*, u16*, int, float*).
        unsafe { b.launch(Self::cfg((nb as u32, m as u32, 1), 256, 0)) }.map_err(launch_err("rmsnorm_part"))?;
        let f = self.gpu.function("decoder", "rmsnorm_quant_parts")?;
        let (eps, nbi) = (EPS, nb as i32);
        let mut b = self.gpu.stream.launch_builder(&f);
        b.arg(&x).arg(&gamma).arg(&eps).arg(&dd).arg(&part).arg(&nbi).arg(&q).arg(&sx);
        // SAFETY: signature (u16*, u16*, float, int, float*, int, u32*, float*).
        unsafe { b.launch(Self::cfg((d.div_ceil(2048) as u32, m as u32, 1), 256, 0)) }
            .map_err(launch_err("rmsnorm_quant_parts"))?;
        Ok(())
    }

    /// Split form of [`Self::swiglu_quant_a4`] (ffn % 256 == 0): `t` holds m * ffn floats, `bmax`
    /// m * ffn / 256.
    #[allow(clippy::too_many_arguments)]
    pub fn swiglu_quant_split(
        &self,
        gu: u64,
        t: u64,
        bmax: u64,
        q: u64,
        sx: u64,
        m: usize,
        ffn: usize,
        had: bool,
    ) -> Result<(), CudaError> {
        if !ffn.is_multiple_of(256) {
            return Err(CudaError::BadShape { kernel: "swiglu_had_part".into(), what: format!("F={ffn} % 256") });
        }
        let nb = ffn / 256;
        let f = self.gpu.function("decoder", "swiglu_had_part")?;
        let (ff, hh) = (ffn as i32, had as i32);
        let mut b = self.gpu.stream.launch_builder(&f);
        b.arg(&gu).arg(&ff).arg(&hh).arg(&t).arg(&bmax);
        // SAFETY: signature (u16*, int, int, float*, float*).
        unsafe { b.launch(Self::cfg((nb as u32, m as u32, 1), 256, 0)) }.map_err(launch_err("swiglu_had_part"))?;
        let f = self.gpu.function("decoder", "quant_pack_parts")?;
        let nbi = nb as i32;
        let mut b = self.gpu.stream.launch_builder(&f);
        b.arg(&t).arg(&bmax).arg(&nbi).arg(&ff).arg(&q).arg(&sx);
        // SAFETY: signature (float*, float*, int, int, u32*, float*).
        unsafe { b.launch(Self::cfg((ffn.div_ceil(2048) as u32, m as u32, 1), 256, 0)) }
            .map_err(launch_err("quant_pack_parts"))?;
        Ok(())
    }

    pub fn rmsnorm_f16(&self, x: u64, gamma: u64, y: u64, m: usize, d: usize) -> Result<(), CudaError> {
        let f = self.gpu.function("decoder", "rmsnorm_f16")?;
        let (eps, dd) = (EPS, d as i32);
        let mut b = self.gpu.stream.launch_builder(&f);
        b.arg(&x).arg(&gamma).arg(&eps).arg(&y).arg(&dd);
        // SAFETY: signature (u16*, u16*, float, u16*, int).
        unsafe { b.launch(Self::cfg((m as u32, 1, 1), ROW_THREADS, 0)) }.map_err(launch_err("rmsnorm_f16"))?;
        Ok(())
    }

    pub fn swiglu_quant_a4(&self, gu: u64, q: u64, sx: u64, m: usize, ffn: usize, had: bool) -> Result<(), CudaError> {
        let f = self.gpu.function("decoder", "swiglu_quant_a4")?;
        if had && !ffn.is_multiple_of(256) {
            return Err(CudaError::BadShape { kernel: "swiglu_quant_a4".into(), what: format!("F={ffn} % 256") });
        }
        let smem = (4 * ffn) as u32;
        if smem > 48 * 1024 {
            f.set_attribute(
                cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )?;
        }
        let (ff, hh) = (ffn as i32, had as i32);
        let mut b = self.gpu.stream.launch_builder(&f);
        b.arg(&gu).arg(&ff).arg(&hh).arg(&q).arg(&sx);
        // SAFETY: signature (u16*, int, int, u32*, float*).
        unsafe { b.launch(Self::cfg((m as u32, 1, 1), ROW_THREADS, smem)) }.map_err(launch_err("swiglu_quant_a4"))?;
        Ok(())
    }

    pub fn swiglu_f16(&self, gu: u64, y: u64, m: usize, ffn: usize) -> Result<(), CudaError> {
        let f = self.gpu.function("decoder", "swiglu_f16")?;
        let (mm, ff) = (m as i32, ffn as i32);
        let mut b = self.gpu.stream.launch_builder(&f);
        b.arg(&gu).arg(&mm).arg(&ff).arg(&y);
        // SAFETY: signature (u16*, int, int, u16*).
        unsafe { b.launch(Self::cfg(Self::fill_grid(m * ffn), 256, 0)) }.map_err(launch_err("swiglu_f16"))?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub fn rope_kv(
        &self,
        qkv: u64,
        heads: usize,
        pos: usize,
        tmax: usize,
        qout: u64,
        kc: u64,
        vc: u64,
        m: usize,
    ) -> Result<(), CudaError> {
        let f = self.gpu.function("decoder", "rope_kv")?;
        let (hh, pp, tt) = (heads as i32, pos as i32, tmax as i32);
        let mut b = self.gpu.stream.launch_builder(&f);
        b.arg(&qkv).arg(&hh).arg(&pp).arg(&tt).arg(&qout).arg(&kc).arg(&vc);
        // SAFETY: signature (u16*, int, int, int, u16*, u16*, u16*).
        unsafe { b.launch(Self::cfg((heads as u32, m as u32, 1), 64, 0)) }.map_err(launch_err("rope_kv"))?;
        Ok(())
    }

    /// Prefill rotary: q and k of the fused qkv [t, 3 * heads * 128] rotated in place, position =
    /// token index.
    pub fn rope_prefill(&self, qkv: u64, heads: usize, t: usize) -> Result<(), CudaError> {
        let f = self.gpu.function("decoder", "rope_prefill")?;
        let hh = heads as i32;
        let mut b = self.gpu.stream.launch_builder(&f);
        b.arg(&qkv).arg(&hh);
        // SAFETY: signature (u16*, int); qkv holds t * 3 * heads * 128 halves.
        unsafe { b.launch(Self::cfg((heads as u32, t as u32, 1), 64, 0)) }.map_err(launch_err("rope_prefill"))?;
        Ok(())
    }

    /// Causal softmax in place over `rows` rows of t scores (row r is query r % t).
    pub fn softmax_causal(&self, scores: u64, rows: usize, t: usize) -> Result<(), CudaError> {
        let f = self.gpu.function("decoder", "softmax_causal_f16")?;
        let tt = t as i32;
        let mut b = self.gpu.stream.launch_builder(&f);
        b.arg(&scores).arg(&tt);
        // SAFETY: signature (u16*, int); scores holds rows * t halves.
        unsafe { b.launch(Self::cfg((rows as u32, 1, 1), 256, 0)) }.map_err(launch_err("softmax_causal_f16"))?;
        Ok(())
    }

    /// Decode attention over keys 0..t of the cache (both parts); `part` holds
    /// m * heads * ceil(t / 64) * 130 floats.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        q: u64,
        kc: u64,
        vc: u64,
        part: u64,
        out: u64,
        m: usize,
        heads: usize,
        tmax: usize,
        t: usize,
    ) -> Result<(), CudaError> {
        let s = t.div_ceil(ATT_CHUNK);
        let f = self.gpu.function("decoder", "attn_decode_part")?;
        let (hh, tm, tt, ss) = (heads as i32, tmax as i32, t as i32, s as i32);
        let scale = 1.0f32 / (128f32).sqrt();
        let mut b = self.gpu.stream.launch_builder(&f);
        b.arg(&q).arg(&kc).arg(&vc).arg(&part).arg(&hh).arg(&tm).arg(&tt).arg(&scale);
        // SAFETY: signature (u16*, u16*, u16*, float*, int, int, int, float).
        unsafe { b.launch(Self::cfg((heads as u32, m as u32, s as u32), 128, 0)) }
            .map_err(launch_err("attn_decode_part"))?;
        let f = self.gpu.function("decoder", "attn_decode_combine")?;
        let mut b = self.gpu.stream.launch_builder(&f);
        b.arg(&part).arg(&out).arg(&hh).arg(&ss);
        // SAFETY: signature (float*, u16*, int, int).
        unsafe { b.launch(Self::cfg((heads as u32, m as u32, 1), 128, 0)) }
            .map_err(launch_err("attn_decode_combine"))?;
        Ok(())
    }
}

/// cuBLAS fp16 (fp32 compute, default algorithm, as the kernel benchmark): Y[M, N] = X[M, K] . W[N, K]^T
/// + beta * Y, raw device addresses.
#[allow(clippy::too_many_arguments)]
pub fn cublas_linear(
    blas: &CudaBlas,
    w: u64,
    x: u64,
    y: u64,
    m: usize,
    n: usize,
    k: usize,
    beta: f32,
) -> Result<(), CudaError> {
    let types = (cudaDataType_t::CUDA_R_16F, cudaDataType_t::CUDA_R_16F);
    // SAFETY: w [n, k], x [m, k], y [m, n] f16 on the handle's stream.
    unsafe {
        crate::cuda::fast_linear::gemm_tn(
            blas,
            (w, x, y),
            (m, n, k),
            types,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            1.0f32,
            beta,
        )
    }?;
    Ok(())
}

/// Causal prefill attention of one sequence of `t` tokens, the same on both paths: rotary already
/// applied to `qkv` [t, 3d]; per head S = q k^T / sqrt(128) (cuBLAS fp16 strided-batched, fp32
/// compute, all t x t scores: the masked half is computed too), causal softmax in place, O = P v
/// into `out` [t, d] at the head's columns. `scores` holds heads * t * t halves.
#[allow(clippy::too_many_arguments)]
pub fn prefill_attention(
    blas: &CudaBlas,
    k: &DecoderKernels<'_>,
    qkv: u64,
    scores: u64,
    out: u64,
    heads: usize,
    t: usize,
) -> Result<(), CudaError> {
    let d = heads * 128;
    let (ti, ld3) = (t as i32, (3 * d) as i32);
    let (zero, one, scale) = (0.0f32, 1.0f32, 1.0f32 / (128f32).sqrt());
    let h16 = cudaDataType_t::CUDA_R_16F;
    // Column-major views: K_h, Q_h, V_h are 128 x t with ld 3d; S_h^T (keys x queries) t x t.
    // SAFETY: qkv holds t * 3d halves, scores heads * t * t, out t * d; scalars are host f32.
    unsafe {
        cudarc::cublas::result::gemm_strided_batched_ex(
            *blas.handle(),
            cublasOperation_t::CUBLAS_OP_T,
            cublasOperation_t::CUBLAS_OP_N,
            ti,
            ti,
            128,
            (&scale) as *const f32 as *const _,
            (qkv + 2 * d as u64) as *const _,
            h16,
            ld3,
            128,
            qkv as *const _,
            h16,
            ld3,
            128,
            (&zero) as *const f32 as *const _,
            scores as *mut _,
            h16,
            ti,
            (t * t) as i64,
            heads as i32,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }?;
    k.softmax_causal(scores, heads * t, t)?;
    // SAFETY: as above.
    unsafe {
        cudarc::cublas::result::gemm_strided_batched_ex(
            *blas.handle(),
            cublasOperation_t::CUBLAS_OP_N,
            cublasOperation_t::CUBLAS_OP_N,
            128,
            ti,
            ti,
            (&one) as *const f32 as *const _,
            (qkv + 4 * d as u64) as *const _,
            h16,
            ld3,
            128,
            scores as *const _,
            h16,
            ti,
            (t * t) as i64,
            (&zero) as *const f32 as *const _,
            out as *mut _,
            h16,
            d as i32,
            128,
            heads as i32,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Correctness of the decoder kernels against CPU references on random data.

/// One check's outcome.
#[derive(Debug, Clone)]
pub struct KernelCheck {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

fn f16_vec(rng: &mut SplitMix64, n: usize, lo: f32, hi: f32) -> Vec<u16> {
    rng.f32_vec(n, lo, hi).into_iter().map(|v| f16::from_f32(v).to_bits()).collect()
}
fn h2f(b: u16) -> f64 {
    f16::from_bits(b).to_f32() as f64
}

/// Compares int4 quantization (scales, and values within 1 step where the f64 reference rounds
/// differently at a tie boundary) against reference rows.
fn compare_quant(name: &str, ref_rows: &[Vec<f64>], q: &[u32], sx: &[f32]) -> KernelCheck {
    let d = ref_rows[0].len();
    let vals = unpack_int4_split(q);
    let (mut worst_s, mut off_by_one, mut worse) = (0f64, 0usize, 0usize);
    for (m, row) in ref_rows.iter().enumerate() {
        let amax = row.iter().fold(0f64, |a, v| a.max(v.abs()));
        let s = amax / 7.0;
        worst_s = worst_s.max((sx[m] as f64 - s).abs() / s);
        for (i, v) in row.iter().enumerate() {
            let want = (v / s).round().clamp(-8.0, 7.0) as i32;
            let got = vals[m * d + i] as i32;
            match (got - want).abs() {
                0 => {}
                1 => off_by_one += 1,
                _ => worse += 1,
            }
        }
    }
    let total = ref_rows.len() * d;
    let ok = worst_s < 1e-4 && worse == 0 && off_by_one * 200 <= total;
    KernelCheck {
        name: name.into(),
        ok,
        detail: format!(
            "scale rel err {worst_s:.1e}; {off_by_one} of {total} values off by one step (ties), {worse} worse"
        ),
    }
}

fn compare_f16(name: &str, want: &[f64], got: &[u16], rel: f64, abs: f64) -> KernelCheck {
    let mut worst = 0f64;
    let mut bad = 0usize;
    for (w, g) in want.iter().zip(got) {
        let gv = h2f(*g);
        let err = (gv - w).abs();
        // NaN (an unwritten, poisoned output) counts as bad.
        if err.is_nan() || err > rel * w.abs() + abs {
            bad += 1;
        }
        if err.is_finite() {
            worst = worst.max(err);
        } else {
            worst = f64::INFINITY;
        }
    }
    KernelCheck {
        name: name.into(),
        ok: bad == 0 && !got.is_empty(),
        detail: format!("{} values, max abs err {worst:.2e}, {bad} outside {rel:.0e} rel + {abs:.0e} abs", got.len()),
    }
}

fn rms_ref(x: &[f64], gamma: Option<&[f64]>) -> Vec<f64> {
    match gamma {
        None => x.to_vec(),
        Some(g) => {
            let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
            let r = 1.0 / (ms + EPS as f64).sqrt();
            x.iter().zip(g).map(|(v, gg)| v * r * gg).collect()
        }
    }
}

fn silu(g: f64) -> f64 {
    g / (1.0 + (-g).exp())
}

/// Runs every decoder-kernel check (random data, poisoned outputs).
pub fn check_decoder_kernels(gpu: &Gpu) -> Result<Vec<KernelCheck>, CudaError> {
    let k = DecoderKernels::new(gpu);
    let s = &gpu.stream;
    let mut out = Vec::new();
    let mut rng = SplitMix64(0xDEC0DE);

    // Seeded fills against SplitMix64 on the CPU (bit-exact).
    {
        let n = 3001;
        let seed = 77u64;
        let d_u = s.clone_htod(&vec![0u32; n])?;
        let d_h = s.clone_htod(&vec![0u16; n])?;
        let d_f = s.clone_htod(&vec![0f32; n])?;
        k.fill_u32(dptr(gpu, &d_u), n, seed)?;
        k.fill_f16(dptr(gpu, &d_h), n, seed, -0.5, 0.25)?;
        k.fill_f32(dptr(gpu, &d_f), n, seed, 0.125, 2.0)?;
        let (gu, gh, gf) = (s.clone_dtoh(&d_u)?, s.clone_dtoh(&d_h)?, s.clone_dtoh(&d_f)?);
        let mut r = SplitMix64(seed);
        let wu: Vec<u32> = (0..n).map(|_| r.next_u64() as u32).collect();
        let mut r = SplitMix64(seed);
        let wh: Vec<u16> = r.f32_vec(n, -0.5, 0.25).into_iter().map(|v| f16::from_f32(v).to_bits()).collect();
        let mut r = SplitMix64(seed);
        let wf: Vec<u32> = r.f32_vec(n, 0.125, 2.0).into_iter().map(f32::to_bits).collect();
        let gfb: Vec<u32> = gf.iter().map(|v| v.to_bits()).collect();
        let ok = gu == wu && gh == wh && gfb == wf;
        out.push(KernelCheck {
            name: "fill_u32/f16/f32".into(),
            ok,
            detail: format!("{n} values each, bit-exact: {ok}"),
        });
    }

    // RMSNorm + quantize (with gamma) and plain quantize (gamma null).
    for (d, with_gamma) in [(4096usize, true), (576, false), (11008, true)] {
        let m = 3;
        let x = f16_vec(&mut rng, m * d, -3.0, 3.0);
        let g = f16_vec(&mut rng, d, 0.5, 1.5);
        let d_x = s.clone_htod(&x)?;
        let d_g = s.clone_htod(&g)?;
        let d_q = s.clone_htod(&vec![0xFFFF_FFFFu32; m * d / 8])?;
        let d_s = s.clone_htod(&vec![f32::NAN; m])?;
        let gptr = if with_gamma { dptr(gpu, &d_g) } else { 0 };
        k.rmsnorm_quant_a4(dptr(gpu, &d_x), gptr, dptr(gpu, &d_q), dptr(gpu, &d_s), m, d)?;
        let (q, sx) = (s.clone_dtoh(&d_q)?, s.clone_dtoh(&d_s)?);
        let gf: Vec<f64> = g.iter().map(|&b| h2f(b)).collect();
        let rows: Vec<Vec<f64>> = x
            .chunks(d)
            .map(|r| rms_ref(&r.iter().map(|&b| h2f(b)).collect::<Vec<_>>(), with_gamma.then_some(&gf[..])))
            .collect();
        out.push(compare_quant(&format!("rmsnorm_quant_a4 D={d} gamma={with_gamma}"), &rows, &q, &sx));
        let d_part = s.clone_htod(&vec![f32::NAN; m * d.div_ceil(256) * 2])?;
        let d_q2 = s.clone_htod(&vec![0xFFFF_FFFFu32; m * d / 8])?;
        let d_s2 = s.clone_htod(&vec![f32::NAN; m])?;
        k.rmsnorm_quant_split(dptr(gpu, &d_x), gptr, dptr(gpu, &d_part), dptr(gpu, &d_q2), dptr(gpu, &d_s2), m, d)?;
        let (q2, sx2) = (s.clone_dtoh(&d_q2)?, s.clone_dtoh(&d_s2)?);
        out.push(compare_quant(&format!("rmsnorm_part+quant_parts D={d} gamma={with_gamma}"), &rows, &q2, &sx2));
        if with_gamma {
            let d_y = s.clone_htod(&vec![0xFFFFu16; m * d])?;
            k.rmsnorm_f16(dptr(gpu, &d_x), dptr(gpu, &d_g), dptr(gpu, &d_y), m, d)?;
            let y = s.clone_dtoh(&d_y)?;
            let want: Vec<f64> = rows.concat();
            out.push(compare_f16(&format!("rmsnorm_f16 D={d}"), &want, &y, 2e-3, 1e-3));
        }
    }

    // SwiGLU (+ 256-block Hadamard) + quantize, and SwiGLU f16.
    for (ffn, had) in [(11008usize, true), (11008, false), (512, true)] {
        let m = 2;
        let gu = f16_vec(&mut rng, m * 2 * ffn, -4.0, 4.0);
        let d_gu = s.clone_htod(&gu)?;
        let d_q = s.clone_htod(&vec![0xFFFF_FFFFu32; m * ffn / 8])?;
        let d_s = s.clone_htod(&vec![f32::NAN; m])?;
        k.swiglu_quant_a4(dptr(gpu, &d_gu), dptr(gpu, &d_q), dptr(gpu, &d_s), m, ffn, had)?;
        let (q, sx) = (s.clone_dtoh(&d_q)?, s.clone_dtoh(&d_s)?);
        let rows: Vec<Vec<f64>> = gu
            .chunks(2 * ffn)
            .map(|r| {
                let mut h: Vec<f64> = (0..ffn).map(|i| silu(h2f(r[i])) * h2f(r[ffn + i])).collect();
                if had {
                    for blk in h.chunks_mut(256) {
                        let mut len = 1;
                        while len < 256 {
                            for i in 0..256 {
                                if i & len == 0 {
                                    let (a, b) = (blk[i], blk[i + len]);
                                    blk[i] = a + b;
                                    blk[i + len] = a - b;
                                }
                            }
                            len <<= 1;
                        }
                        blk.iter_mut().for_each(|v| *v /= 16.0);
                    }
                }
                h
            })
            .collect();
        out.push(compare_quant(&format!("swiglu_quant_a4 F={ffn} hadamard={had}"), &rows, &q, &sx));
        let d_t = s.clone_htod(&vec![f32::NAN; m * ffn])?;
        let d_b = s.clone_htod(&vec![f32::NAN; m * ffn / 256])?;
        let d_q2 = s.clone_htod(&vec![0xFFFF_FFFFu32; m * ffn / 8])?;
        let d_s2 = s.clone_htod(&vec![f32::NAN; m])?;
        k.swiglu_quant_split(
            dptr(gpu, &d_gu),
            dptr(gpu, &d_t),
            dptr(gpu, &d_b),
            dptr(gpu, &d_q2),
            dptr(gpu, &d_s2),
            m,
            ffn,
            had,
        )?;
        let (q2, sx2) = (s.clone_dtoh(&d_q2)?, s.clone_dtoh(&d_s2)?);
        out.push(compare_quant(&format!("swiglu_had_part+quant_pack_parts F={ffn} hadamard={had}"), &rows, &q2, &sx2));
        if !had && ffn == 11008 {
            let d_y = s.clone_htod(&vec![0xFFFFu16; m * ffn])?;
            k.swiglu_f16(dptr(gpu, &d_gu), dptr(gpu, &d_y), m, ffn)?;
            let y = s.clone_dtoh(&d_y)?;
            out.push(compare_f16("swiglu_f16 F=11008", &rows.concat(), &y, 2e-3, 1e-3));
        }
    }

    // Rotary + cache write, then decode attention over the cache.
    {
        let (m, heads, tmax, pos) = (2usize, 4usize, 600usize, 512usize);
        let d = heads * 128;
        let t = pos + 1;
        let qkv = f16_vec(&mut rng, m * 3 * d, -1.0, 1.0);
        let cache_len = m * heads * tmax * 128;
        let kc = f16_vec(&mut rng, cache_len, -1.0, 1.0);
        let vc = f16_vec(&mut rng, cache_len, -1.0, 1.0);
        let d_qkv = s.clone_htod(&qkv)?;
        let d_k = s.clone_htod(&kc)?;
        let d_v = s.clone_htod(&vc)?;
        let d_q = s.clone_htod(&vec![0xFFFFu16; m * d])?;
        k.rope_kv(dptr(gpu, &d_qkv), heads, pos, tmax, dptr(gpu, &d_q), dptr(gpu, &d_k), dptr(gpu, &d_v), m)?;
        let (gq, gk, gv) = (s.clone_dtoh(&d_q)?, s.clone_dtoh(&d_k)?, s.clone_dtoh(&d_v)?);
        // Reference rotary in f64.
        let (mut wq, mut wk, mut got_k, mut wv, mut got_v) = (vec![], vec![], vec![], vec![], vec![]);
        for mi in 0..m {
            for h in 0..heads {
                let base = mi * 3 * d + h * 128;
                let slot = ((mi * heads + h) * tmax + pos) * 128;
                for i in 0..64 {
                    let inv = 10000f64.powf(-(i as f64) / 64.0);
                    let (sn, cs) = (pos as f64 * inv).sin_cos();
                    let rot = |a: f64, b: f64| (a * cs - b * sn, b * cs + a * sn);
                    let (q0, q1) = rot(h2f(qkv[base + i]), h2f(qkv[base + i + 64]));
                    let (k0, k1) = rot(h2f(qkv[base + d + i]), h2f(qkv[base + d + i + 64]));
                    wq.extend([q0, q1]);
                    wk.extend([k0, k1]);
                    got_k.extend([gk[slot + i], gk[slot + i + 64]]);
                    wv.extend([h2f(qkv[base + 2 * d + i]), h2f(qkv[base + 2 * d + i + 64])]);
                    got_v.extend([gv[slot + i], gv[slot + i + 64]]);
                }
            }
        }
        let got_q: Vec<u16> = (0..m)
            .flat_map(|mi| (0..heads).flat_map(move |h| (0..64).map(move |i| (mi, h, i))))
            .flat_map(|(mi, h, i)| {
                let b = mi * d + h * 128;
                [gq[b + i], gq[b + i + 64]]
            })
            .collect();
        out.push(compare_f16("rope_kv q", &wq, &got_q, 2e-3, 2e-3));
        out.push(compare_f16("rope_kv k (cache)", &wk, &got_k, 2e-3, 2e-3));
        out.push(compare_f16("rope_kv v (cache)", &wv, &got_v, 0.0, 0.0));
        // Untouched cache positions must be unchanged.
        let untouched = gk.iter().zip(&kc).enumerate().all(|(i, (a, b))| (i / 128) % tmax == pos || a == b);
        out.push(KernelCheck {
            name: "rope_kv other cache slots".into(),
            ok: untouched,
            detail: format!("positions != {pos} unchanged: {untouched}"),
        });

        let s_chunks = t.div_ceil(ATT_CHUNK);
        let d_part = s.clone_htod(&vec![f32::NAN; m * heads * s_chunks * 130])?;
        let d_o = s.clone_htod(&vec![0xFFFFu16; m * d])?;
        k.attention(
            dptr(gpu, &d_q),
            dptr(gpu, &d_k),
            dptr(gpu, &d_v),
            dptr(gpu, &d_part),
            dptr(gpu, &d_o),
            m,
            heads,
            tmax,
            t,
        )?;
        let o = s.clone_dtoh(&d_o)?;
        let mut want = vec![0f64; m * d];
        let scale = 1.0 / 128f64.sqrt();
        for mi in 0..m {
            for h in 0..heads {
                let q: Vec<f64> = (0..128).map(|i| h2f(gq[mi * d + h * 128 + i])).collect();
                let head = (mi * heads + h) * tmax * 128;
                let sc: Vec<f64> =
                    (0..t).map(|j| (0..128).map(|i| q[i] * h2f(gk[head + j * 128 + i])).sum::<f64>() * scale).collect();
                let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = sc.iter().map(|v| (v - mx).exp()).collect();
                let sum: f64 = e.iter().sum();
                for i in 0..128 {
                    want[mi * d + h * 128 + i] = (0..t).map(|j| e[j] * h2f(gv[head + j * 128 + i])).sum::<f64>() / sum;
                }
            }
        }
        out.push(compare_f16(&format!("attn_decode T={t} (part + combine)"), &want, &o, 2e-3, 1e-3));
    }

    // Prefill: rotary in place, then causal attention (cuBLAS batched + softmax_causal_f16).
    {
        let (heads, t) = (2usize, 70usize);
        let d = heads * 128;
        let qkv = f16_vec(&mut rng, t * 3 * d, -1.0, 1.0);
        let d_qkv = s.clone_htod(&qkv)?;
        let d_s = s.clone_htod(&vec![0xFFFFu16; heads * t * t])?;
        let d_o = s.clone_htod(&vec![0xFFFFu16; t * d])?;
        let blas = CudaBlas::new(gpu.stream.clone())?;
        k.rope_prefill(dptr(gpu, &d_qkv), heads, t)?;
        let roped = s.clone_dtoh(&d_qkv)?;
        prefill_attention(&blas, &k, dptr(gpu, &d_qkv), dptr(gpu, &d_s), dptr(gpu, &d_o), heads, t)?;
        let o = s.clone_dtoh(&d_o)?;
        // Rotary reference (f64) on q and k; v untouched.
        let mut want_r = vec![0f64; t * 3 * d];
        for m in 0..t {
            for h in 0..heads {
                for part in 0..3 {
                    let b = m * 3 * d + part * d + h * 128;
                    for i in 0..64 {
                        let (a, c) = (h2f(qkv[b + i]), h2f(qkv[b + i + 64]));
                        if part == 2 {
                            want_r[b + i] = a;
                            want_r[b + i + 64] = c;
                        } else {
                            let inv = 10000f64.powf(-(i as f64) / 64.0);
                            let (sn, cs) = (m as f64 * inv).sin_cos();
                            want_r[b + i] = a * cs - c * sn;
                            want_r[b + i + 64] = c * cs + a * sn;
                        }
                    }
                }
            }
        }
        out.push(compare_f16(&format!("rope_prefill T={t}"), &want_r, &roped, 2e-3, 2e-3));
        // Attention reference (f64) on the GPU's rotated (f16) q, k, v.
        let r = |i: usize| h2f(roped[i]);
        let scale = 1.0 / 128f64.sqrt();
        let mut want = vec![0f64; t * d];
        for h in 0..heads {
            for i in 0..t {
                let sc: Vec<f64> = (0..=i)
                    .map(|j| {
                        (0..128).map(|c| r(i * 3 * d + h * 128 + c) * r(j * 3 * d + d + h * 128 + c)).sum::<f64>()
                            * scale
                    })
                    .collect();
                let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = sc.iter().map(|v| (v - mx).exp()).collect();
                let sum: f64 = e.iter().sum();
                for c in 0..128 {
                    want[i * d + h * 128 + c] =
                        (0..=i).map(|j| e[j] * r(j * 3 * d + 2 * d + h * 128 + c)).sum::<f64>() / sum;
                }
            }
        }
        out.push(compare_f16(&format!("prefill attention H={heads} T={t} (causal)"), &want, &o, 1e-2, 3e-3));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The model and its decode step.

struct W4Linear {
    w: CudaSlice<u32>,
    sw: CudaSlice<f32>,
    n: usize,
    k: usize,
}

struct Layer {
    g1: CudaSlice<u16>,
    g2: CudaSlice<u16>,
    w4: Vec<W4Linear>,        // qkv, o, gate-up, down
    f16: Vec<CudaSlice<u16>>, // same, fp16 [N, K]
    kc: CudaSlice<u16>,
    vc: CudaSlice<u16>,
}

struct Buffers {
    h0: CudaSlice<u16>,
    h: CudaSlice<u16>,
    xq: CudaSlice<u32>,
    sx: CudaSlice<f32>,
    qkv: CudaSlice<u16>,
    qr: CudaSlice<u16>,
    att: CudaSlice<u16>,
    part: CudaSlice<f32>,
    gu: CudaSlice<u16>,
    xn: CudaSlice<u16>,
    act: CudaSlice<u16>,
    logits: CudaSlice<u16>,
    /// Split quantization scratch: SwiGLU output f32 [M, F], slice maxima, RMSNorm partials.
    t: CudaSlice<f32>,
    bmax: CudaSlice<f32>,
    npart: CudaSlice<f32>,
}

/// A decoder with both weight sets on the device.
pub struct Model {
    pub shape: DecoderShape,
    pub max_batch: usize,
    pub past: usize,
    tmax: usize,
    layers: Vec<Layer>,
    gf: CudaSlice<u16>,
    lm: CudaSlice<u16>,
    buf: Buffers,
}

/// Kernel choices of the W4A4 step: the GEMV of each linear (qkv, o, gate-up, down) and whether the
/// row quantizations use the split (two-kernel, many-block) forms.
#[derive(Debug, Clone, Copy)]
pub struct W4Plan {
    pub gemv: [GemvVariant; 4],
    pub split_norm: bool,
    pub split_swiglu: bool,
}

/// Which side of the comparison a step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    W4A4,
    F16,
}

impl Model {
    /// Allocates and fills (seeded, on the device) both weight sets, the caches and buffers.
    pub fn new(gpu: &Gpu, shape: DecoderShape, max_batch: usize, past: usize, seed: u64) -> Result<Model, CudaError> {
        let k = DecoderKernels::new(gpu);
        let s = &gpu.stream;
        let (d, f, v) = (shape.d, shape.ffn, shape.vocab);
        let tmax = past + 1;
        let mut seq = seed;
        let mut next = || {
            seq += 1;
            seq.wrapping_mul(0x9E37_79B9)
        };
        let f16_buf = |n: usize, lo: f32, hi: f32, sd: u64| -> Result<CudaSlice<u16>, CudaError> {
            let b = unsafe { s.alloc::<u16>(n) }?;
            k.fill_f16(dptr(gpu, &b), n, sd, lo, hi)?;
            Ok(b)
        };
        let dims = [(3 * d, d), (d, d), (2 * f, d), (d, f)];
        let mut layers = Vec::with_capacity(shape.layers);
        for _ in 0..shape.layers {
            let mut w4 = Vec::new();
            let mut wf = Vec::new();
            for &(n, kk) in &dims {
                let words = crate::cuda::pack::tiled_words(n, kk);
                let w = unsafe { s.alloc::<u32>(words) }?;
                k.fill_u32(dptr(gpu, &w), words, next())?;
                let sw = unsafe { s.alloc::<f32>(n) }?;
                // Output ~ unit scale: |acc| ~ sqrt(K) * 20, sx ~ amax / 7.
                let a = 0.1 / (kk as f32).sqrt();
                k.fill_f32(dptr(gpu, &sw), n, next(), 0.5 * a, a)?;
                w4.push(W4Linear { w, sw, n, k: kk });
                let bound = (3.0 / kk as f32).sqrt();
                wf.push(f16_buf(n * kk, -bound, bound, next())?);
            }
            let cache = max_batch * shape.heads * tmax * 128;
            layers.push(Layer {
                g1: f16_buf(d, 0.8, 1.2, next())?,
                g2: f16_buf(d, 0.8, 1.2, next())?,
                w4,
                f16: wf,
                kc: f16_buf(cache, -1.0, 1.0, next())?,
                vc: f16_buf(cache, -1.0, 1.0, next())?,
            });
        }
        let gf = f16_buf(d, 0.8, 1.2, next())?;
        let lm_bound = (3.0 / d as f32).sqrt();
        let lm = f16_buf(v * d, -lm_bound, lm_bound, next())?;
        let mb = max_batch;
        let chunks = tmax.div_ceil(ATT_CHUNK);
        let buf = Buffers {
            h0: f16_buf(mb * d, -1.0, 1.0, next())?,
            h: s.alloc_zeros::<u16>(mb * d)?,
            xq: s.alloc_zeros::<u32>(mb * d.max(f) / 8)?,
            sx: s.alloc_zeros::<f32>(mb)?,
            qkv: s.alloc_zeros::<u16>(mb * 3 * d)?,
            qr: s.alloc_zeros::<u16>(mb * d)?,
            att: s.alloc_zeros::<u16>(mb * d)?,
            part: s.alloc_zeros::<f32>(mb * shape.heads * chunks * 130)?,
            gu: s.alloc_zeros::<u16>(mb * 2 * f)?,
            xn: s.alloc_zeros::<u16>(mb * d)?,
            act: s.alloc_zeros::<u16>(mb * f)?,
            logits: s.alloc_zeros::<u16>(mb * v)?,
            t: s.alloc_zeros::<f32>(mb * f)?,
            bmax: s.alloc_zeros::<f32>(mb * f.div_ceil(256))?,
            npart: s.alloc_zeros::<f32>(mb * d.max(f).div_ceil(256) * 2)?,
        };
        s.synchronize()?;
        Ok(Model { shape, max_batch, past, tmax, layers, gf, lm, buf })
    }

    fn w4_args(&self, gpu: &Gpu, lin: &W4Linear, x: u64, residual: u64, y: u64, m: usize) -> W4LinearArgs {
        W4LinearArgs {
            w: dptr(gpu, &lin.w),
            sw: dptr(gpu, &lin.sw),
            x,
            sx: dptr(gpu, &self.buf.sx),
            bias: 0,
            residual,
            y,
            m,
            n: lin.n,
            k: lin.k,
        }
    }

    /// Enqueues one decode step for batch `m` (token position `past`). `gemv[i]` is the GEMV of
    /// linear i (qkv, o, gate-up, down). `linears_only` leaves every non-linear kernel out (to split
    /// the step's time).
    pub fn step(
        &self,
        gpu: &Gpu,
        blas: &CudaBlas,
        path: Path,
        m: usize,
        plan: &W4Plan,
        linears_only: bool,
    ) -> Result<(), CudaError> {
        let gemv = &plan.gemv;
        let k = DecoderKernels::new(gpu);
        let sh = self.shape;
        let (d, f) = (sh.d, sh.ffn);
        let b = &self.buf;
        let p = |x: &CudaSlice<u16>| dptr(gpu, x);
        let (h, xq, sx) = (p(&b.h), dptr(gpu, &b.xq), dptr(gpu, &b.sx));
        let t = self.past + 1;
        // Embedding rows (a copy standing in for the lookup).
        // SAFETY: h0 and h are distinct device buffers of max_batch * d halves, m <= max_batch.
        unsafe { cudarc::driver::result::memcpy_dtod_async(h, p(&b.h0), m * d * 2, gpu.stream.cu_stream()) }?;
        for l in &self.layers {
            match path {
                Path::W4A4 => {
                    if !linears_only {
                        self.norm_quant(&k, plan, h, p(&l.g1), m)?;
                    }
                    gpu.launch_gemv(gemv[0], &self.w4_args(gpu, &l.w4[0], xq, 0, p(&b.qkv), m))?;
                    if !linears_only {
                        self.rope_attention(&k, gpu, l, m, t)?;
                        self.norm_quant(&k, plan, p(&b.att), 0, m)?;
                    }
                    gpu.launch_gemv(gemv[1], &self.w4_args(gpu, &l.w4[1], xq, h, h, m))?;
                    if !linears_only {
                        self.norm_quant(&k, plan, h, p(&l.g2), m)?;
                    }
                    gpu.launch_gemv(gemv[2], &self.w4_args(gpu, &l.w4[2], xq, 0, p(&b.gu), m))?;
                    if !linears_only {
                        if plan.split_swiglu {
                            let (t, bm) = (dptr(gpu, &b.t), dptr(gpu, &b.bmax));
                            k.swiglu_quant_split(p(&b.gu), t, bm, xq, sx, m, f, true)?;
                        } else {
                            k.swiglu_quant_a4(p(&b.gu), xq, sx, m, f, true)?;
                        }
                    }
                    gpu.launch_gemv(gemv[3], &self.w4_args(gpu, &l.w4[3], xq, h, h, m))?;
                }
                Path::F16 => {
                    if !linears_only {
                        k.rmsnorm_f16(h, p(&l.g1), p(&b.xn), m, d)?;
                    }
                    cublas_linear(blas, p(&l.f16[0]), p(&b.xn), p(&b.qkv), m, 3 * d, d, 0.0)?;
                    if !linears_only {
                        self.rope_attention(&k, gpu, l, m, t)?;
                    }
                    cublas_linear(blas, p(&l.f16[1]), p(&b.att), h, m, d, d, 1.0)?;
                    if !linears_only {
                        k.rmsnorm_f16(h, p(&l.g2), p(&b.xn), m, d)?;
                    }
                    cublas_linear(blas, p(&l.f16[2]), p(&b.xn), p(&b.gu), m, 2 * f, d, 0.0)?;
                    if !linears_only {
                        k.swiglu_f16(p(&b.gu), p(&b.act), m, f)?;
                    }
                    cublas_linear(blas, p(&l.f16[3]), p(&b.act), h, m, d, f, 1.0)?;
                }
            }
        }
        if !linears_only {
            k.rmsnorm_f16(h, p(&self.gf), p(&b.xn), m, d)?;
        }
        cublas_linear(blas, p(&self.lm), p(&b.xn), p(&b.logits), m, sh.vocab, d, 0.0)?;
        Ok(())
    }

    /// Rotary on q and k with the new k/v written into layer `l`'s cache, then decode attention over
    /// `t` positions into `buf.att` (the same on both paths).
    fn rope_attention(
        &self,
        k: &DecoderKernels<'_>,
        gpu: &Gpu,
        l: &Layer,
        m: usize,
        t: usize,
    ) -> Result<(), CudaError> {
        let b = &self.buf;
        let p = |x: &CudaSlice<u16>| dptr(gpu, x);
        let heads = self.shape.heads;
        k.rope_kv(p(&b.qkv), heads, self.past, self.tmax, p(&b.qr), p(&l.kc), p(&l.vc), m)?;
        k.attention(p(&b.qr), p(&l.kc), p(&l.vc), dptr(gpu, &b.part), p(&b.att), m, heads, self.tmax, t)
    }

    fn norm_quant(&self, k: &DecoderKernels<'_>, plan: &W4Plan, x: u64, gamma: u64, m: usize) -> Result<(), CudaError> {
        let gpu = k.gpu;
        let (xq, sx) = (dptr(gpu, &self.buf.xq), dptr(gpu, &self.buf.sx));
        if plan.split_norm {
            k.rmsnorm_quant_split(x, gamma, dptr(gpu, &self.buf.npart), xq, sx, m, self.shape.d)
        } else {
            k.rmsnorm_quant_a4(x, gamma, xq, sx, m, self.shape.d)
        }
    }

    /// Per-kernel times at batch m (each launch on the next layer's buffers, median per launch), the
    /// calls per step, and whether the split row quantizations are faster.
    pub fn breakdown(
        &self,
        gpu: &Gpu,
        blas: &CudaBlas,
        m: usize,
        gemv: &[GemvVariant; 4],
    ) -> Result<(Vec<String>, bool, bool), CudaError> {
        let k = DecoderKernels::new(gpu);
        let sh = self.shape;
        let (d, f, nl) = (sh.d, sh.ffn, self.layers.len());
        let b = &self.buf;
        let p = |x: &CudaSlice<u16>| dptr(gpu, x);
        let (h, xq, sx) = (p(&b.h), dptr(gpu, &b.xq), dptr(gpu, &b.sx));
        let (t, bm, np) = (dptr(gpu, &b.t), dptr(gpu, &b.bmax), dptr(gpu, &b.npart));
        let tt = self.past + 1;
        let mut rows: Vec<(String, f64, usize, &str)> = Vec::new();
        let mut time = |name: &str,
                        calls: usize,
                        side: &'static str,
                        f: &mut dyn FnMut(usize) -> Result<(), CudaError>|
         -> Result<f64, CudaError> {
            let (us, _) = time_launches(gpu, nl, f)?;
            rows.push((name.to_string(), us, calls, side));
            Ok(us)
        };
        let single_norm = time("rmsnorm_quant_a4 (1 block/row)", 3, "w4", &mut |j| {
            k.rmsnorm_quant_a4(h, p(&self.layers[j].g1), xq, sx, m, d)
        })?;
        let split_norm = time("rmsnorm_part + quant_parts", 3, "w4", &mut |j| {
            k.rmsnorm_quant_split(h, p(&self.layers[j].g1), np, xq, sx, m, d)
        })?;
        let single_sw =
            time("swiglu_quant_a4 (1 block/row)", 1, "w4", &mut |_| k.swiglu_quant_a4(p(&b.gu), xq, sx, m, f, true))?;
        let split_sw = time("swiglu_had_part + quant_pack_parts", 1, "w4", &mut |_| {
            k.swiglu_quant_split(p(&b.gu), t, bm, xq, sx, m, f, true)
        })?;
        time("rmsnorm_f16", 2, "f16", &mut |j| k.rmsnorm_f16(h, p(&self.layers[j].g1), p(&b.xn), m, d))?;
        time("swiglu_f16", 1, "f16", &mut |_| k.swiglu_f16(p(&b.gu), p(&b.act), m, f))?;
        time("rope_kv", 1, "both", &mut |j| {
            let l = &self.layers[j];
            k.rope_kv(p(&b.qkv), sh.heads, self.past, self.tmax, p(&b.qr), p(&l.kc), p(&l.vc), m)
        })?;
        time("attention (part + combine)", 1, "both", &mut |j| {
            let l = &self.layers[j];
            k.attention(p(&b.qr), p(&l.kc), p(&l.vc), dptr(gpu, &b.part), p(&b.att), m, sh.heads, self.tmax, tt)
        })?;
        for (i, name) in ["qkv", "o", "gate-up", "down"].iter().enumerate() {
            let lin = &self.layers[0].w4[i];
            let (n, kk) = (lin.n, lin.k);
            time(&format!("cuBLAS fp16 {name} {n}x{kk}"), 1, "f16", &mut |j| {
                cublas_linear(blas, p(&self.layers[j].f16[i]), p(&b.xn), p(&b.gu), m, n, kk, 0.0)
            })?;
            time(&format!("{} {name}", gemv[i].kernel_name()), 1, "w4", &mut |j| {
                gpu.launch_gemv(gemv[i], &self.w4_args(gpu, &self.layers[j].w4[i], xq, 0, p(&b.gu), m))
            })?;
        }
        let lines = rows
            .iter()
            .map(|(name, us, calls, side)| {
                format!(
                    "    [{side:<4}] {name:<44} {us:>8.2} us x {calls} x {nl} layers = {:>8.1} us/step",
                    us * (*calls * nl) as f64
                )
            })
            .collect();
        Ok((lines, split_norm < single_norm, split_sw < single_sw))
    }

    /// Captures one step as a CUDA graph and times its replays (median of `reps`, microseconds).
    #[allow(clippy::too_many_arguments)]
    pub fn time_step(
        &self,
        gpu: &Gpu,
        blas: &CudaBlas,
        path: Path,
        m: usize,
        plan: &W4Plan,
        linears_only: bool,
        reps: usize,
    ) -> Result<f64, CudaError> {
        let stream = &gpu.stream;
        // Eager run first: compiles/loads every kernel outside the capture.
        self.step(gpu, blas, path, m, plan, linears_only)?;
        stream.synchronize()?;
        stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        let launched = self.step(gpu, blas, path, m, plan, linears_only);
        let graph = stream.end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
        launched?;
        let graph = graph?.ok_or_else(|| CudaError::Mismatch("empty decode graph".into()))?;
        graph.upload()?;
        let start = gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        let end = gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        for _ in 0..3 {
            graph.launch()?;
        }
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps {
            start.record(stream)?;
            graph.launch()?;
            end.record(stream)?;
            end.synchronize()?;
            times.push(start.elapsed_ms(&end)? as f64 * 1e3);
        }
        times.sort_by(f64::total_cmp);
        Ok(times[reps / 2])
    }

    /// Logits of the last step: (count of non-finite values, mean |logit|) for batch m.
    pub fn logits_summary(&self, gpu: &Gpu, m: usize) -> Result<(usize, f64), CudaError> {
        let v: Vec<u16> = gpu.stream.clone_dtoh(&self.buf.logits.slice(0..m * self.shape.vocab))?;
        let vals: Vec<f64> = v.iter().map(|&b| h2f(b)).collect();
        let bad = vals.iter().filter(|x| !x.is_finite()).count();
        let mean = vals.iter().filter(|x| x.is_finite()).map(|x| x.abs()).sum::<f64>() / vals.len().max(1) as f64;
        Ok((bad, mean))
    }

    /// Picks the fastest GEMV variant per linear at batch m among `candidates`, timing each over
    /// the 32 layers' weights in turn (so no launch finds its weights in L2).
    pub fn tune_gemv(
        &self,
        gpu: &Gpu,
        m: usize,
        candidates: &[GemvVariant],
    ) -> Result<([GemvVariant; 4], Vec<String>), CudaError> {
        let mut best = [candidates[0]; 4];
        let mut lines = Vec::new();
        let xq = dptr(gpu, &self.buf.xq);
        let y = dptr(gpu, &self.buf.gu);
        let nl = self.layers.len();
        for (i, name) in ["qkv", "o", "gate-up", "down"].iter().enumerate() {
            let mut times: HashMap<String, f64> = HashMap::new();
            let mut best_t = f64::INFINITY;
            for &v in candidates {
                let timed = time_launches(gpu, nl, |j| {
                    gpu.launch_gemv(v, &self.w4_args(gpu, &self.layers[j].w4[i], xq, 0, y, m))
                });
                // A variant that cannot launch here is reported and skipped, not fatal.
                let us = match timed {
                    Ok((us, _)) => us,
                    Err(e) => {
                        lines.push(format!("  gemv M={m} {name}: {} skipped: {e}", v.kernel_name()));
                        gpu.stream.synchronize()?;
                        continue;
                    }
                };
                times.insert(v.kernel_name(), us);
                if us < best_t {
                    best_t = us;
                    best[i] = v;
                }
            }
            let lin = &self.layers[0].w4[i];
            let mut all: Vec<_> = times.into_iter().collect();
            all.sort_by(|a, b| a.1.total_cmp(&b.1));
            let list: Vec<String> = all.iter().map(|(k, t)| format!("{k} {t:.2}")).collect();
            lines.push(format!(
                "  gemv M={m} {name:<7} {}x{}: best {} {:.2} us ({:.0} GB/s weights) | {}",
                lin.n,
                lin.k,
                best[i].kernel_name(),
                best_t,
                (lin.n * lin.k / 2) as f64 / best_t / 1e3,
                list.join(", ")
            ));
        }
        Ok((best, lines))
    }
}

/// Buffers of a prefill of `t` tokens (one sequence).
pub struct PrefillBuffers {
    t: usize,
    h0: CudaSlice<u16>,
    h: CudaSlice<u16>,
    xq: CudaSlice<u32>,
    sx: CudaSlice<f32>,
    qkv: CudaSlice<u16>,
    att: CudaSlice<u16>,
    gu: CudaSlice<u16>,
    xn: CudaSlice<u16>,
    act: CudaSlice<u16>,
    scores: CudaSlice<u16>,
    logits: CudaSlice<u16>,
}

impl PrefillBuffers {
    pub fn new(gpu: &Gpu, shape: DecoderShape, t: usize) -> Result<Self, CudaError> {
        let s = &gpu.stream;
        let (d, f) = (shape.d, shape.ffn);
        let h0 = unsafe { s.alloc::<u16>(t * d) }?;
        DecoderKernels::new(gpu).fill_f16(dptr(gpu, &h0), t * d, 0x9E11, -1.0, 1.0)?;
        let b = PrefillBuffers {
            t,
            h0,
            h: s.alloc_zeros::<u16>(t * d)?,
            xq: s.alloc_zeros::<u32>(t * d.max(f) / 8)?,
            sx: s.alloc_zeros::<f32>(t)?,
            qkv: s.alloc_zeros::<u16>(t * 3 * d)?,
            att: s.alloc_zeros::<u16>(t * d)?,
            gu: s.alloc_zeros::<u16>(t * 2 * f)?,
            xn: s.alloc_zeros::<u16>(t * d)?,
            act: s.alloc_zeros::<u16>(t * f)?,
            scores: s.alloc_zeros::<u16>(shape.heads * t * t)?,
            logits: s.alloc_zeros::<u16>(shape.vocab)?,
        };
        // Random (never zero) operands for the GEMM tuning that runs before any prefill.
        let k = DecoderKernels::new(gpu);
        k.fill_u32(dptr(gpu, &b.xq), t * d.max(f) / 8, 0x9E12)?;
        k.fill_f32(dptr(gpu, &b.sx), t, 0x9E13, 0.01, 0.1)?;
        k.fill_f16(dptr(gpu, &b.xn), t * d, 0x9E14, -1.0, 1.0)?;
        s.synchronize()?;
        Ok(b)
    }
}

impl Model {
    /// Prefill GEMM args for linear `lin` at `t` tokens. The W4A4 weights on the device were filled
    /// (seeded random words) for the tiled GEMV layout; K % 128 == 0 for every Llama linear, so the
    /// same words read as split-nibble rows [N, K/8] are an equally random weight matrix of the same
    /// size for the GEMM (a deployment keeps the row layout for prefill, or converts at load).
    fn gemm_args(&self, gpu: &Gpu, lin: &W4Linear, pb: &PrefillBuffers, residual: u64, y: u64) -> W4LinearArgs {
        W4LinearArgs {
            w: dptr(gpu, &lin.w),
            sw: dptr(gpu, &lin.sw),
            x: dptr(gpu, &pb.xq),
            sx: dptr(gpu, &pb.sx),
            bias: 0,
            residual,
            y,
            m: pb.t,
            n: lin.n,
            k: lin.k,
        }
    }

    /// Enqueues the prefill of one sequence of `pb.t` tokens: every layer on all tokens (causal
    /// attention, [`prefill_attention`]), then the final norm and LM head on the last token. W4A4:
    /// row quantization kernels and the W4A4 GEMM `gemm[i]` for linear i (qkv, o, gate-up, down,
    /// residual adds in its epilogue); fp16: cuBLAS. The KV cache write is left out on both sides.
    pub fn prefill(
        &self,
        gpu: &Gpu,
        blas: &CudaBlas,
        path: Path,
        pb: &PrefillBuffers,
        gemm: &[GemmVariant; 4],
    ) -> Result<(), CudaError> {
        let k = DecoderKernels::new(gpu);
        let sh = self.shape;
        let (d, f, t) = (sh.d, sh.ffn, pb.t);
        let p = |x: &CudaSlice<u16>| dptr(gpu, x);
        let (h, xq, sx) = (p(&pb.h), dptr(gpu, &pb.xq), dptr(gpu, &pb.sx));
        // SAFETY: h0 and h are distinct device buffers of t * d halves.
        unsafe { cudarc::driver::result::memcpy_dtod_async(h, p(&pb.h0), t * d * 2, gpu.stream.cu_stream()) }?;
        for l in &self.layers {
            match path {
                Path::W4A4 => {
                    k.rmsnorm_quant_a4(h, p(&l.g1), xq, sx, t, d)?;
                    gpu.launch_gemm(gemm[0], &self.gemm_args(gpu, &l.w4[0], pb, 0, p(&pb.qkv)))?;
                    k.rope_prefill(p(&pb.qkv), sh.heads, t)?;
                    prefill_attention(blas, &k, p(&pb.qkv), p(&pb.scores), p(&pb.att), sh.heads, t)?;
                    k.rmsnorm_quant_a4(p(&pb.att), 0, xq, sx, t, d)?;
                    gpu.launch_gemm(gemm[1], &self.gemm_args(gpu, &l.w4[1], pb, h, h))?;
                    k.rmsnorm_quant_a4(h, p(&l.g2), xq, sx, t, d)?;
                    gpu.launch_gemm(gemm[2], &self.gemm_args(gpu, &l.w4[2], pb, 0, p(&pb.gu)))?;
                    k.swiglu_quant_a4(p(&pb.gu), xq, sx, t, f, true)?;
                    gpu.launch_gemm(gemm[3], &self.gemm_args(gpu, &l.w4[3], pb, h, h))?;
                }
                Path::F16 => {
                    k.rmsnorm_f16(h, p(&l.g1), p(&pb.xn), t, d)?;
                    cublas_linear(blas, p(&l.f16[0]), p(&pb.xn), p(&pb.qkv), t, 3 * d, d, 0.0)?;
                    k.rope_prefill(p(&pb.qkv), sh.heads, t)?;
                    prefill_attention(blas, &k, p(&pb.qkv), p(&pb.scores), p(&pb.att), sh.heads, t)?;
                    cublas_linear(blas, p(&l.f16[1]), p(&pb.att), h, t, d, d, 1.0)?;
                    k.rmsnorm_f16(h, p(&l.g2), p(&pb.xn), t, d)?;
                    cublas_linear(blas, p(&l.f16[2]), p(&pb.xn), p(&pb.gu), t, 2 * f, d, 0.0)?;
                    k.swiglu_f16(p(&pb.gu), p(&pb.act), t, f)?;
                    cublas_linear(blas, p(&l.f16[3]), p(&pb.act), h, t, d, f, 1.0)?;
                }
            }
        }
        let last = h + ((t - 1) * d * 2) as u64;
        k.rmsnorm_f16(last, p(&self.gf), p(&pb.xn), 1, d)?;
        cublas_linear(blas, p(&self.lm), p(&pb.xn), p(&pb.logits), 1, sh.vocab, d, 0.0)?;
        Ok(())
    }

    /// Times [`Self::prefill`] (eager launches between CUDA events, one warm-up, median of `reps`),
    /// microseconds.
    pub fn time_prefill(
        &self,
        gpu: &Gpu,
        blas: &CudaBlas,
        path: Path,
        pb: &PrefillBuffers,
        gemm: &[GemmVariant; 4],
        reps: usize,
    ) -> Result<f64, CudaError> {
        let stream = &gpu.stream;
        self.prefill(gpu, blas, path, pb, gemm)?;
        stream.synchronize()?;
        let start = gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        let end = gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps {
            start.record(stream)?;
            self.prefill(gpu, blas, path, pb, gemm)?;
            end.record(stream)?;
            end.synchronize()?;
            times.push(start.elapsed_ms(&end)? as f64 * 1e3);
        }
        times.sort_by(f64::total_cmp);
        Ok(times[reps / 2])
    }

    /// Picks the fastest verified (bit-exact on this device) W4A4 GEMM per linear at `pb.t` tokens,
    /// each timed over the layers' weights in turn; also times cuBLAS fp16 on the same shapes.
    pub fn tune_gemm(
        &self,
        gpu: &Gpu,
        blas: &CudaBlas,
        pb: &PrefillBuffers,
    ) -> Result<([GemmVariant; 4], Vec<String>), CudaError> {
        let candidates: Vec<GemmVariant> =
            // Int4 weight storage only: the pre-unpacked int8 layout (w4a4p8) is not what e2e holds.
            GemmVariant::ALL
                .into_iter()
                .filter(|v| !v.int8_weights() && super::gemm_verified(gpu, *v).is_ok())
                .collect();
        if candidates.is_empty() {
            return Err(CudaError::Mismatch("no W4A4 GEMM variant is bit-exact on this device".into()));
        }
        let mut best = [candidates[0]; 4];
        let mut lines = Vec::new();
        let nl = self.layers.len();
        let y = dptr(gpu, &pb.gu);
        for (i, name) in ["qkv", "o", "gate-up", "down"].iter().enumerate() {
            let lin = &self.layers[0].w4[i];
            let mut all = Vec::new();
            for &v in &candidates {
                let (us, _) = time_launches(gpu, nl, |j| {
                    gpu.launch_gemm(v, &self.gemm_args(gpu, &self.layers[j].w4[i], pb, 0, y))
                })?;
                all.push((v, us));
            }
            all.sort_by(|a, b| a.1.total_cmp(&b.1));
            best[i] = all[0].0;
            let (cu, _) = time_launches(gpu, nl, |j| {
                cublas_linear(blas, dptr(gpu, &self.layers[j].f16[i]), dptr(gpu, &pb.xn), y, pb.t, lin.n, lin.k, 0.0)
            })?;
            let list: Vec<String> = all.iter().map(|(v, us)| format!("{} {us:.1}", v.kernel_name())).collect();
            lines.push(format!(
                "  gemm M={} {name:<7} {}x{}: best {} {:.1} us ({:.0} TOPS) vs cuBLAS fp16 {cu:.1} us = x{:.2} | {}",
                pb.t,
                lin.n,
                lin.k,
                all[0].0.kernel_name(),
                all[0].1,
                2.0 * (pb.t * lin.n * lin.k) as f64 / all[0].1 / 1e6,
                cu / all[0].1,
                list.join(", ")
            ));
        }
        Ok((best, lines))
    }

    /// Logits of the last prefill: (count of non-finite values, mean |logit|).
    pub fn prefill_logits_summary(&self, gpu: &Gpu, pb: &PrefillBuffers) -> Result<(usize, f64), CudaError> {
        let v: Vec<u16> = gpu.stream.clone_dtoh(&pb.logits)?;
        let vals: Vec<f64> = v.iter().map(|&b| h2f(b)).collect();
        let bad = vals.iter().filter(|x| !x.is_finite()).count();
        let mean = vals.iter().filter(|x| x.is_finite()).map(|x| x.abs()).sum::<f64>() / vals.len().max(1) as f64;
        Ok((bad, mean))
    }
}

/// GEMV variants the end-to-end benchmark may pick from (tiled W4A4).
pub fn e2e_candidates() -> Vec<GemvVariant> {
    GemvVariant::ALL.into_iter().filter(|v| v.tiled() && v.act == ActBits::A4).collect()
}

/// `qcc-run bench --e2e [--past N] [--batches 1,16]`: checks, then the decode comparison.
pub fn run_e2e(gpu: &Gpu, args: &[String], mut emit: impl FnMut(String)) -> Result<bool, CudaError> {
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let past: usize = arg("--past").and_then(|v| v.parse().ok()).unwrap_or(512);
    let batches: Vec<usize> =
        arg("--batches").map(|v| v.split(',').filter_map(|x| x.parse().ok()).collect()).unwrap_or_else(|| vec![1, 16]);
    let layers: usize = arg("--layers").and_then(|v| v.parse().ok()).unwrap_or(LLAMA2_7B.layers);
    let prefill_t: usize = arg("--prefill").and_then(|v| v.parse().ok()).unwrap_or(2048);
    let shape = DecoderShape { layers, ..LLAMA2_7B };
    emit(format!("== e2e decode: {}", gpu.describe()));
    emit("   a Llama-2-7B-shaped decoder built from qcc-runtime's kernels (not an artifact compiled by qcc),".into());
    emit(format!(
        "   {} layers, d {}, ffn {}, {} heads x 128, vocab {}, seeded random weights made on the device, KV cache of {past} past tokens",
        shape.layers, shape.d, shape.ffn, shape.heads, shape.vocab
    ));
    let mut ok = true;
    for c in check_decoder_kernels(gpu)? {
        ok &= c.ok;
        emit(format!("{} {:<40} {}", if c.ok { "PASS" } else { "FAIL" }, c.name, c.detail));
    }
    let blas = CudaBlas::new(gpu.stream.clone())?;
    let max_batch = batches.iter().copied().max().unwrap_or(1);
    if max_batch > 16 {
        return Err(CudaError::BadShape { kernel: "e2e".into(), what: "batch > 16 (GEMV limit)".into() });
    }
    let t0 = std::time::Instant::now();
    let model = Model::new(gpu, shape, max_batch, past, 0x5EED)?;
    emit(format!("   weights made in {:.1} s", t0.elapsed().as_secs_f64()));
    let reps = 15;
    let mut summary = Vec::new();
    if prefill_t > 0 {
        let pb = PrefillBuffers::new(gpu, shape, prefill_t)?;
        let (gemm, lines) = model.tune_gemm(gpu, &blas, &pb)?;
        lines.into_iter().for_each(&mut emit);
        let w4 = model.time_prefill(gpu, &blas, Path::W4A4, &pb, &gemm, 5)?;
        let (bad4, mean4) = model.prefill_logits_summary(gpu, &pb)?;
        let f16 = model.time_prefill(gpu, &blas, Path::F16, &pb, &gemm, 5)?;
        let (bad16, mean16) = model.prefill_logits_summary(gpu, &pb)?;
        emit(format!(
            "   prefill T={prefill_t}: W4A4 {:.2} ms ({:.0} tok/s) | fp16 {:.2} ms ({:.0} tok/s) | speedup x{:.2}",
            w4 / 1e3,
            prefill_t as f64 * 1e6 / w4,
            f16 / 1e3,
            prefill_t as f64 * 1e6 / f16,
            f16 / w4
        ));
        emit(format!(
            "        last-token logits: W4A4 {bad4} non-finite, mean |x| {mean4:.3}; fp16 {bad16} non-finite, mean |x| {mean16:.3}"
        ));
        summary.push(format!(
            "e2e prefill T={prefill_t} (batch 1): W4A4 {:.0} tok/s ({:.2} ms) vs fp16 {:.0} tok/s ({:.2} ms) = x{:.2}; GEMMs {}",
            prefill_t as f64 * 1e6 / w4,
            w4 / 1e3,
            prefill_t as f64 * 1e6 / f16,
            f16 / 1e3,
            f16 / w4,
            gemm.iter().map(|g| g.kernel_name()).collect::<Vec<_>>().join(", ")
        ));
    }
    for &m in &batches {
        let (gemv, lines) = model.tune_gemv(gpu, m, &e2e_candidates())?;
        lines.into_iter().for_each(&mut emit);
        let (lines, split_norm, split_swiglu) = model.breakdown(gpu, &blas, m, &gemv)?;
        emit(format!("  kernel times at M={m} (median per launch over the {} layers' buffers):", shape.layers));
        lines.into_iter().for_each(&mut emit);
        let plan = W4Plan { gemv, split_norm, split_swiglu };
        emit(format!("  W4A4 plan: split rmsnorm-quant {split_norm}, split swiglu-quant {split_swiglu}"));
        let w4 = model.time_step(gpu, &blas, Path::W4A4, m, &plan, false, reps)?;
        let (bad4, mean4) = model.logits_summary(gpu, m)?;
        let w4_lin = model.time_step(gpu, &blas, Path::W4A4, m, &plan, true, reps)?;
        let f16 = model.time_step(gpu, &blas, Path::F16, m, &plan, false, reps)?;
        let (bad16, mean16) = model.logits_summary(gpu, m)?;
        let f16_lin = model.time_step(gpu, &blas, Path::F16, m, &plan, true, reps)?;
        emit(format!(
            "   M={m:<2} W4A4 step {:>8.1} us ({:>7.1} tok/s; linears + LM head alone {:>8.1} us) | fp16 step {:>8.1} us ({:>7.1} tok/s; linears alone {:>8.1} us) | speedup x{:.2}",
            w4,
            m as f64 * 1e6 / w4,
            w4_lin,
            f16,
            m as f64 * 1e6 / f16,
            f16_lin,
            f16 / w4
        ));
        emit(format!(
            "        logits: W4A4 {bad4} non-finite, mean |x| {mean4:.3}; fp16 {bad16} non-finite, mean |x| {mean16:.3}"
        ));
        summary.push(format!(
            "e2e decode M={m:<2} past={past}: W4A4 {:.1} tok/s ({:.3} ms/step) vs fp16 {:.1} tok/s ({:.3} ms/step) = x{:.2}",
            m as f64 * 1e6 / w4,
            w4 / 1e3,
            m as f64 * 1e6 / f16,
            f16 / 1e3,
            f16 / w4
        ));
    }
    emit(
        "== e2e summary (decode: CUDA graph of one step, median of 15 replays; prefill: eager launches, median of 5)"
            .into(),
    );
    summary.into_iter().for_each(&mut emit);
    Ok(ok)
}

/// `qcc-run bench --profile`: a few launches of chosen GEMV variants and cuBLAS at 11008x4096, M=1
/// (for `ncu -k regex:gemv`), each on its own weights copy.
pub fn run_profile(gpu: &Gpu, names: &[&str]) -> Result<(), CudaError> {
    let (n, k, m) = (11008usize, 4096usize, 1usize);
    let blas = CudaBlas::new(gpu.stream.clone())?;
    let dk = DecoderKernels::new(gpu);
    let s = &gpu.stream;
    let words = crate::cuda::pack::tiled_words(n, k);
    let w = unsafe { s.alloc::<u32>(words) }?;
    dk.fill_u32(dptr(gpu, &w), words, 1)?;
    let sw = unsafe { s.alloc::<f32>(n) }?;
    dk.fill_f32(dptr(gpu, &sw), n, 2, 0.001, 0.01)?;
    let x = unsafe { s.alloc::<u32>(k / 4) }?;
    dk.fill_u32(dptr(gpu, &x), k / 4, 3)?;
    let sx = unsafe { s.alloc::<f32>(m) }?;
    dk.fill_f32(dptr(gpu, &sx), m, 4, 0.001, 0.01)?;
    let y = s.alloc_zeros::<u16>(n * m)?;
    let wf = unsafe { s.alloc::<u16>(n * k) }?;
    dk.fill_f16(dptr(gpu, &wf), n * k, 5, -1.0, 1.0)?;
    let xf = unsafe { s.alloc::<u16>(m * k) }?;
    dk.fill_f16(dptr(gpu, &xf), m * k, 6, -1.0, 1.0)?;
    for name in names {
        let v = GemvVariant::by_name(name).ok_or_else(|| CudaError::UnknownKernel(name.to_string()))?;
        let args = W4LinearArgs {
            w: dptr(gpu, &w),
            sw: dptr(gpu, &sw),
            x: dptr(gpu, &x),
            sx: dptr(gpu, &sx),
            bias: 0,
            residual: 0,
            y: dptr(gpu, &y),
            m,
            n,
            k,
        };
        for _ in 0..2 {
            gpu.launch_gemv(v, &args)?;
        }
    }
    for _ in 0..2 {
        cublas_linear(&blas, dptr(gpu, &wf), dptr(gpu, &xf), dptr(gpu, &y), m, n, k, 0.0)?;
    }
    s.synchronize()?;
    println!("profiled launches done: {} GEMV variants x 2, cuBLAS fp16 x 2", names.len());
    Ok(())
}

/// The `qcc-run bench` flags handled here: `--e2e [--past N] [--batches 1,16] [--prefill T] [--layers L] [--out FILE]`
/// and `--profile [VARIANT,...]`. Returns `None` when neither is given (the kernel benchmark runs).
pub fn dispatch(gpu: &Gpu, args: &[String]) -> Option<Result<bool, CudaError>> {
    let out = args.iter().position(|a| a == "--out").and_then(|i| args.get(i + 1));
    if args.iter().any(|a| a == "--e2e") {
        let mut file = match out.map(std::fs::File::create).transpose() {
            Ok(f) => f,
            Err(e) => return Some(Err(CudaError::Mismatch(format!("--out: {e}")))),
        };
        return Some(run_e2e(gpu, args, |line| {
            println!("{line}");
            if let Some(f) = file.as_mut() {
                use std::io::Write;
                let _ = writeln!(f, "{line}");
            }
        }));
    }
    let i = args.iter().position(|a| a == "--profile")?;
    let default =
        "w4a4_gemv_ks8_u4,w4a8_gemv_ks16_u2,w4a4_gemvt_ks8_u4,w4a4_gemvtp_ks8_u4,w4a4_gemvq_ks1_u4,w4a4_gemvq_ks2_u4";
    let list = args.get(i + 1).filter(|a| !a.starts_with("--")).map(String::as_str).unwrap_or(default);
    let names: Vec<&str> = list.split(',').collect();
    Some(run_profile(gpu, &names).map(|_| true))
}

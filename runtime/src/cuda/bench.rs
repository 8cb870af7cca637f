//! `qcc-run bench`: W4 kernels against cuBLAS fp16 (cudarc's cublas `gemm` on f16, fp32 compute) at
//! real linear shapes, in the same run on the same device.
//!
//! Every timed launch reads a different copy of its operands: copies are rotated until they span
//! at least [`ROTATE_BYTES`] (several times the H100's 50 MB L2), so no launch finds its weights in
//! cache. Times come from CUDA events around batches of launches (median of [`REPS`] batches, after
//! warm-up, which also keeps NVRTC compilation and cuBLAS handle creation out of the numbers).
//! Operands hold random data (int4 words drawn uniformly; fp16 uniform in [-1, 1)), never zeros.

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::sys::{CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaSlice, DevicePtr};
use half::f16;

use super::device::{ActBits, GemmVariant, GemvVariant, Gpu, W4LinearArgs};
use super::pack::SplitMix64;
use super::CudaError;

/// The end-to-end decode benchmark (`qcc-run bench --e2e`).
#[path = "e2e.rs"]
pub mod e2e;

/// Bytes each rotation spans (operand copies cycled per launch).
pub const ROTATE_BYTES: usize = 256 << 20;
/// Timed batches per measurement (the median is reported).
pub const REPS: usize = 7;

/// A linear layer shape: `Y[M, N] = X[M, K] . W[N, K]^T`.
#[derive(Debug, Clone, Copy)]
pub struct LinearShape {
    pub model: &'static str,
    pub name: &'static str,
    pub n: usize,
    pub k: usize,
}

/// Llama-2-7B and SmolLM2-135M linear shapes.
pub const SHAPES: &[LinearShape] = &[
    LinearShape { model: "llama2-7b", name: "qkvo", n: 4096, k: 4096 },
    LinearShape { model: "llama2-7b", name: "gate/up", n: 11008, k: 4096 },
    LinearShape { model: "llama2-7b", name: "down", n: 4096, k: 11008 },
    LinearShape { model: "smollm2", name: "q/o", n: 576, k: 576 },
    LinearShape { model: "smollm2", name: "k/v", n: 192, k: 576 },
    LinearShape { model: "smollm2", name: "gate/up", n: 1536, k: 576 },
    LinearShape { model: "smollm2", name: "down", n: 576, k: 1536 },
];

/// Batch sizes (tokens) benchmarked.
pub const BATCHES: &[usize] = &[1, 16, 128, 2048];

/// One timed kernel.
#[derive(Debug, Clone)]
pub struct Timing {
    pub kernel: String,
    /// "graph" (CUDA-graph replay) or "loop" (plain launches).
    pub method: &'static str,
    pub micros: f64,
    pub bytes: usize,
    pub flops: f64,
}

impl Timing {
    pub fn gbps(&self) -> f64 {
        self.bytes as f64 / self.micros / 1e3
    }
    pub fn tops(&self) -> f64 {
        self.flops / self.micros / 1e6
    }
}

/// One benchmark row: our best variant(s) against cuBLAS fp16.
#[derive(Debug, Clone)]
pub struct BenchRow {
    pub shape: LinearShape,
    pub m: usize,
    pub ours: Vec<Timing>,
    pub cublas: Timing,
}

fn random_words(rng: &mut SplitMix64, len: usize) -> Vec<u32> {
    (0..len).map(|_| rng.next_u64() as u32).collect()
}

/// `sets` copies of `host` in one device buffer; returns it and the element stride between copies.
fn rotated<T: cudarc::driver::DeviceRepr + Copy>(
    gpu: &Gpu,
    host: &[T],
    sets: usize,
) -> Result<(CudaSlice<T>, usize), CudaError> {
    // Round each copy up to 256 bytes so every copy starts aligned.
    let align = (256 / std::mem::size_of::<T>()).max(1);
    let stride = host.len().div_ceil(align) * align;
    let mut buf = unsafe { gpu.stream.alloc::<T>(stride * sets) }?;
    for s in 0..sets {
        let mut view = buf.slice_mut(s * stride..s * stride + host.len());
        gpu.stream.memcpy_htod(host, &mut view)?;
    }
    Ok((buf, stride))
}

fn sets_for(bytes_per_set: usize) -> usize {
    ROTATE_BYTES.div_ceil(bytes_per_set.max(1)).clamp(2, 4096)
}

/// Times `launch(i)` (i = rotation index): warm-up, a plain-loop estimate, then `count` launches
/// captured into one CUDA graph (so host launch overhead cannot starve the GPU on microsecond
/// kernels) replayed [`REPS`] times between CUDA events; the median per-launch time is returned with
/// the method used ("graph", or "loop" where capture failed).
fn time_launches(
    gpu: &Gpu,
    sets: usize,
    mut launch: impl FnMut(usize) -> Result<(), CudaError>,
) -> Result<(f64, &'static str), CudaError> {
    let stream = &gpu.stream;
    let start = gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let end = gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let mut next = 0usize;
    let mut run_loop =
        |count: usize, launch: &mut dyn FnMut(usize) -> Result<(), CudaError>| -> Result<f64, CudaError> {
            start.record(stream)?;
            for _ in 0..count {
                launch(next % sets)?;
                next += 1;
            }
            end.record(stream)?;
            end.synchronize()?;
            Ok(start.elapsed_ms(&end)? as f64 * 1e3 / count as f64)
        };
    run_loop(3, &mut launch)?;
    let estimate = run_loop(10, &mut launch)?;
    let count = ((2000.0 / estimate.max(0.5)).ceil() as usize).clamp(10, 2000);

    let graph = (|| -> Result<Option<cudarc::driver::CudaGraph>, CudaError> {
        stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        let mut launched = Ok(());
        for i in 0..count {
            launched = launch(i % sets);
            if launched.is_err() {
                break;
            }
        }
        let graph = stream.end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
        launched?;
        Ok(graph?)
    })();
    let mut times = Vec::with_capacity(REPS);
    let method = match graph {
        Ok(Some(graph)) => {
            graph.upload()?;
            graph.launch()?;
            for _ in 0..REPS {
                start.record(stream)?;
                graph.launch()?;
                end.record(stream)?;
                end.synchronize()?;
                times.push(start.elapsed_ms(&end)? as f64 * 1e3 / count as f64);
            }
            "graph"
        }
        _ => {
            // Capture failed (the stream may be left invalidated): plain launches instead.
            stream.synchronize().ok();
            for _ in 0..REPS {
                times.push(run_loop(count, &mut launch)?);
            }
            "loop"
        }
    };
    times.sort_by(f64::total_cmp);
    Ok((times[REPS / 2], method))
}

/// Benchmarks one shape at batch `m`: every applicable W4 variant and cuBLAS fp16.
pub fn bench_one(gpu: &Gpu, blas: &CudaBlas, shape: LinearShape, m: usize, seed: u64) -> Result<BenchRow, CudaError> {
    let (n, k) = (shape.n, shape.k);
    let mut rng = SplitMix64(seed);
    let flops = 2.0 * m as f64 * n as f64 * k as f64;

    // --- ours: int4 weights, int4 or int8 activations, f16 out.
    // Enough words for the largest layout (the tiled one pads K to a multiple of 128).
    // (and the pre-unpacked int8 prefill layout of the w4a4p8 kernels doubles the bytes).
    let w_words = super::pack::tiled_words(n, k).max(n * super::pack::int8_wgmma_row_bytes(k) / 4);
    let w_host = random_words(&mut rng, w_words);
    let sw_host = rng.f32_vec(n, 0.001, 0.01);
    let sx_host = rng.f32_vec(m, 0.001, 0.01);
    let x4_host = random_words(&mut rng, m * k / 8);
    let x8_host: Vec<u8> = (0..m * k).map(|_| rng.next_u64() as u8).collect();
    let w_set_bytes = w_words * 4 + n * 4 + m * k + m * n * 2;
    let sets = sets_for(w_set_bytes);
    let (d_w, w_stride) = rotated(gpu, &w_host, sets)?;
    let (d_sw, sw_stride) = rotated(gpu, &sw_host, sets)?;
    let (d_sx, sx_stride) = rotated(gpu, &sx_host, sets)?;
    let (d_x4, x4_stride) = rotated(gpu, &x4_host, sets)?;
    let (d_x8, x8_stride) = rotated(gpu, &x8_host, sets)?;
    let mut d_y = unsafe { gpu.stream.alloc::<u16>(m * n * sets) }?;
    let poison = vec![0xFFFFu16; m * n * sets];
    gpu.stream.memcpy_htod(&poison, &mut d_y)?;
    let s = &gpu.stream;
    let (pw, psw, psx, px4, px8, py) = (
        d_w.device_ptr(s).0,
        d_sw.device_ptr(s).0,
        d_sx.device_ptr(s).0,
        d_x4.device_ptr(s).0,
        d_x8.device_ptr(s).0,
        d_y.device_ptr(s).0,
    );
    let args_for = |set: usize, act: ActBits| W4LinearArgs {
        w: pw + (set * w_stride * 4) as u64,
        sw: psw + (set * sw_stride * 4) as u64,
        x: match act {
            ActBits::A4 => px4 + (set * x4_stride * 4) as u64,
            ActBits::A8 => px8 + (set * x8_stride) as u64,
        },
        sx: psx + (set * sx_stride * 4) as u64,
        bias: 0,
        residual: 0,
        y: py + (set * m * n * 2) as u64,
        m,
        n,
        k,
    };
    let mut ours = Vec::new();
    if m <= 16 {
        for v in GemvVariant::ALL {
            // A variant that cannot launch here is reported and skipped, not fatal.
            let (micros, method) = match time_launches(gpu, sets, |i| gpu.launch_gemv(v, &args_for(i, v.act))) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("{} {}x{} M={m}: skipped: {e}", v.kernel_name(), n, k);
                    gpu.stream.synchronize()?;
                    continue;
                }
            };
            let xbytes = match v.act {
                ActBits::A4 => m * k / 2,
                ActBits::A8 => m * k,
            };
            ours.push(Timing {
                kernel: v.kernel_name(),
                method,
                micros,
                bytes: n * k / 2 + n * 4 + xbytes + m * n * 2,
                flops,
            });
        }
    }
    if m > 1 {
        for v in GemmVariant::ALL {
            // Only variants that pass a bit-exact check on this device are timed (a variant that
            // computes wrong results or cannot launch here is reported and skipped).
            if let Err(why) = gemm_verified(gpu, v) {
                eprintln!("{} {}x{} M={m}: skipped: {why}", v.kernel_name(), n, k);
                continue;
            }
            let (micros, method) = time_launches(gpu, sets, |i| gpu.launch_gemm(v, &args_for(i, ActBits::A4)))?;
            ours.push(Timing {
                kernel: v.kernel_name(),
                method,
                micros,
                bytes: v.weight_bytes(n, k) + n * 4 + m * k / 2 + m * n * 2,
                flops,
            });
        }
    }
    // Every output must have been written (no NaN poison left in the first set).
    let y_first: Vec<u16> = gpu.stream.clone_dtoh(&d_y.slice(0..m * n))?;
    if let Some(pos) = y_first.iter().position(|&b| b == 0xFFFF) {
        return Err(CudaError::Mismatch(format!("{} M={m}: output {pos} never written", shape.name)));
    }
    drop((d_w, d_sw, d_sx, d_x4, d_x8, d_y));

    // --- cuBLAS fp16: Y^T (N x M, column-major) = W (K x N col-major, transposed) . X^T (K x M).
    let to_f16 = |v: Vec<f32>| -> Vec<f16> { v.into_iter().map(f16::from_f32).collect() };
    let wh = to_f16(rng.f32_vec(n * k, -1.0, 1.0));
    let xh = to_f16(rng.f32_vec(m * k, -1.0, 1.0));
    let set_bytes = (n * k + m * k + m * n) * 2;
    let hsets = sets_for(set_bytes);
    let (d_wh, wh_stride) = rotated(gpu, &wh, hsets)?;
    let (d_xh, xh_stride) = rotated(gpu, &xh, hsets)?;
    let mut d_yh = unsafe { gpu.stream.alloc::<f16>(m * n * hsets) }?;
    let cfg = GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_T,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: n as i32,
        n: m as i32,
        k: k as i32,
        alpha: f16::ONE,
        lda: k as i32,
        ldb: k as i32,
        beta: f16::ZERO,
        ldc: n as i32,
    };
    let (micros, method) = time_launches(gpu, hsets, |i| {
        let a = d_wh.slice(i * wh_stride..i * wh_stride + n * k);
        let b = d_xh.slice(i * xh_stride..i * xh_stride + m * k);
        let mut c = d_yh.slice_mut(i * m * n..(i + 1) * m * n);
        // SAFETY: the views have exactly the sizes the config describes.
        unsafe { blas.gemm(cfg, &a, &b, &mut c) }?;
        Ok(())
    })?;
    let cublas = Timing { kernel: "cublas_f16".into(), method, micros, bytes: set_bytes, flops };
    Ok(BenchRow { shape, m, ours, cublas })
}

/// Whether GEMM variant `v` computes bit-exact results on `gpu` (a case with M, N and K tails, bias
/// and residual), checked once per process; `Err` says why not.
pub fn gemm_verified(gpu: &Gpu, v: GemmVariant) -> Result<(), String> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static SEEN: OnceLock<Mutex<HashMap<String, Result<(), String>>>> = OnceLock::new();
    let seen = SEEN.get_or_init(Default::default);
    let name = v.kernel_name();
    if let Some(r) = seen.lock().ok().and_then(|m| m.get(&name).cloned()) {
        return r;
    }
    // QCC_GEMM_SKIP=PREFIX[,PREFIX..]: variants not to launch at all (e.g. one whose check hung).
    if let Ok(skip) = std::env::var("QCC_GEMM_SKIP") {
        if skip.split(',').any(|p| !p.is_empty() && name.starts_with(p)) {
            return Err("skipped (QCC_GEMM_SKIP)".into());
        }
    }
    let case = super::check::CheckCase {
        kernel: super::check::KernelChoice::Gemm(v),
        m: 300,
        n: 584,
        k: 1056,
        bias: true,
        residual: true,
        values: super::check::Values::Random,
        seed: 0xC0FFEE,
    };
    let r = match super::check::run_case(gpu, case) {
        Ok(rep) if rep.mismatches == 0 => Ok(()),
        Ok(rep) => Err(format!("not bit-exact: {rep}")),
        Err(e) => {
            gpu.stream.synchronize().ok();
            Err(format!("check failed: {e}"))
        }
    };
    if let Ok(mut m) = seen.lock() {
        m.insert(name, r.clone());
    }
    r
}

/// Device-to-device copy bandwidth (bytes read + written per second), the memory ceiling.
pub fn copy_bandwidth_gbps(gpu: &Gpu) -> Result<f64, CudaError> {
    let len = 1usize << 29; // 512 MiB each way
    let src = gpu.stream.alloc_zeros::<u8>(len)?;
    let mut dst = gpu.stream.alloc_zeros::<u8>(len)?;
    let (micros, _) = time_launches(gpu, 1, |_| {
        gpu.stream.memcpy_dtod(&src, &mut dst)?;
        Ok(())
    })?;
    Ok(2.0 * len as f64 / micros / 1e3)
}

/// Formats one row group: every variant of ours, cuBLAS, and the best-vs-cuBLAS ratio per family.
pub fn format_row(row: &BenchRow) -> Vec<String> {
    let mut lines = Vec::new();
    let head =
        format!("{:<9} {:<7} {:>5}x{:<5} M={:<4}", row.shape.model, row.shape.name, row.shape.n, row.shape.k, row.m);
    let c = &row.cublas;
    lines.push(format!(
        "{head} {:<18} {:>9.2} us {:>7.0} GB/s {:>7.1} TOPS  [{}]",
        c.kernel,
        c.micros,
        c.gbps(),
        c.tops(),
        c.method
    ));
    for t in &row.ours {
        lines.push(format!(
            "{head} {:<18} {:>9.2} us {:>7.0} GB/s {:>7.1} TOPS  x{:.2} vs cuBLAS [{}]",
            t.kernel,
            t.micros,
            t.gbps(),
            t.tops(),
            c.micros / t.micros,
            t.method
        ));
    }
    lines
}

/// Best of our variants whose kernel name starts with `prefix`.
pub fn best<'a>(row: &'a BenchRow, prefix: &str) -> Option<&'a Timing> {
    row.ours.iter().filter(|t| t.kernel.starts_with(prefix)).min_by(|a, b| a.micros.total_cmp(&b.micros))
}

//! Routes a compiled artifact's linear launches to the runtime's tuned kernels instead of the
//! correctness-first micro-kernels the plan names (compiler/src/lower/micro.rs), with the same
//! outputs.
//!
//! - `int_linear` with int4 weights and integer activations held one value per element (`i16` when
//!   the op keeps 16-bit prefix rows, `i4` otherwise; what `-O w4a4` plans contain), K % 32 == 0 and
//!   N % 8 == 0: the weights are repacked once at load into the split-nibble rows of the W4 GEMM and
//!   the tiled layout of the W4 GEMV ([`super::pack`]). M <= 8 (decode): one launch,
//!   `w4_gemv_x{i16,i8}_*`, the W4 GEMV's MMA on the plan's activations narrowed to int8 in
//!   registers, with the 32-value pieces of 16-bit prefix rows summed exactly beside it (at M = 1,
//!   `_m1`: the warp narrows each chunk's 128 values together and shuffles them to the MMA). M > 8:
//!   `pack_act_rows_*` packs the rows and flags the ones with a value outside -8..7 (16-bit prefix
//!   rows), the W4A4 GEMV (M <= 16) or mma.sync GEMM computes every row with per-token scale 1 and
//!   the plan's per-channel scale and bias, writing the plan's output type (f32 or f16), and
//!   `int_linear_fix_rows_*`
//!   recomputes the flagged rows exactly (runtime/kernels/fast_linear.cu). The integer sums are
//!   exact on every path and the epilogue rounds the same steps in the same order, so the outputs
//!   are bit-identical to the micro-kernel's (and to the CPU executor's).
//! - `int_linear` with int16 activations and int8 weights (the 8-bit LM head of `-O w4a4` plans),
//!   K % 16 == 0: M <= 16 runs `w8_gemv_xi16_*` (one warp per output channel, weights read once);
//!   larger M splits x = 256 hi + lo + 128 into two int8 operands, multiplies both on cuBLAS's int8
//!   GEMM (exact int32) and combines 256 C_hi + C_lo + 128 sum(w) in int64 before the same f32
//!   epilogue: exact, like the micro-kernel.
//! - weight-only `int_linear` (f32 activations without `act_bits`, int8 weights, f32 out; an LM head
//!   whose input stays float), K % 16 == 0: M <= 16 runs `wf8_gemv_m{1,2,4,8}_xf32_f32` or
//!   `wf8_gemv_xf32_f32` (row tiles of 1 to 16: the int8 weights, repacked at load so that each warp
//!   load reads 512 contiguous bytes, read once for all rows; x staged per block in shared memory,
//!   16 channels per warp sharing each read of it); larger M splits x
//!   into two f16 halves (hi + lo, 22 significant bits) and runs cuBLAS's f16 GEMM with f32
//!   accumulation over the weights widened to f16 at load (exact for int8), twice, then the
//!   epilogue. Float sums, so within the float tolerance rather than bit-exact (as the
//!   micro-kernel).
//! - `linear` in f16 or f32 (weights of the same type, no bias): cuBLAS (f32 compute; no TF32).
//! - `hadamard` (the online rotation of the down_proj input): `hadamard_fast_*`
//!   (runtime/kernels/hadamard.cu), the CPU's own algorithm and order (butterflies over each
//!   power-of-two sub-row, then the dense factor), so bit-identical to it, in O(n log n + n m)
//!   instead of the micro-kernel's dense O(n^2) per row.
//!   Float sums then follow cuBLAS's order, as the micro-kernel's follow its own.
//!
//! `QCC_FAST_LINEAR=0` keeps every launch on its micro-kernel. `QCC_FAST_GEMV=<name>` runs M <= 8
//! on the packed path too (pack, that GEMV of w4_gemv.cu, e.g. [`DEFAULT_GEMV`], fix-up),
//! `QCC_FAST_GEMM=<name>` picks the GEMM (default [`DEFAULT_WS_GEMM`] from [`WS_MIN_ROWS`] rows on an
//! sm_90 GPU, else [`DEFAULT_GEMM`]).

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig};
use qcc_ir::DType;

use super::device::{GemmVariant, GemvVariant, Gpu, W4LinearArgs};
use super::pack::{pack_int4_split, pack_int4_tiled, pack_wf8_tiled, tiled_words, wf8_tiled_bytes};
use super::CudaError;
use crate::artifact::{Arg, DimExpr, Launch, Manifest, Place, SymbolValues};

/// The GEMV of the fast `int_linear` route (the best at 11008x4096, M = 1, on an H200).
pub const DEFAULT_GEMV: &str = "w4a4_gemvq_ks4_u2";
/// The GEMM of the fast `int_linear` route for 16 < M < [`WS_MIN_ROWS`], or on a GPU other than
/// sm_90 (mma.sync: it has f32-output twins).
pub const DEFAULT_GEMM: &str = "w4a4_gemm_128x128_w4";
/// The GEMM from [`WS_MIN_ROWS`] rows on, on sm_90: the warp-specialised wgmma GEMM (1.6-1.8x cuBLAS
/// fp16 at M = 2048 on the Llama-2-7B shapes, where the mma.sync GEMM ran at ~0.9x), with an f32
/// output twin (`_f32`) for the plans' f32 outputs.
pub const DEFAULT_WS_GEMM: &str = "w4a4_ws_256x128_s6_b4_c";
/// Rows from which the 256-row tiles of [`DEFAULT_WS_GEMM`] are at least half full.
pub const WS_MIN_ROWS: usize = 129;

/// Whether routing is on (`QCC_FAST_LINEAR` unset or not `0`).
pub fn enabled() -> bool {
    std::env::var_os("QCC_FAST_LINEAR").is_none_or(|v| v != "0")
}

/// The operands of an `int_linear` launch as the plan gives them: buffer ids, the row count (an
/// expression of the symbols) and the constant N and K.
pub struct Operands {
    x: u32,
    w: u32,
    scale: u32,
    bias: Option<u32>,
    /// The residual added to the f32 result (`_res` entries).
    res: Option<u32>,
    y: u32,
    m: DimExpr,
    n: usize,
    k: usize,
}

/// [`Operands`] bound for one run: the row count and device addresses (`bias` 0 when absent).
struct Bound {
    m: usize,
    x: u64,
    w: u64,
    scale: u64,
    bias: u64,
    y: u64,
}

impl Operands {
    /// `None` when the run has no rows.
    fn bind(&self, values: &SymbolValues, ptr: &dyn Fn(u32) -> Result<u64, String>) -> Result<Option<Bound>, String> {
        let m = eval_rows(&self.m, values)?;
        if m == 0 {
            return Ok(None);
        }
        let bias = match self.bias {
            Some(b) => ptr(b)?,
            None => 0,
        };
        Ok(Some(Bound { m, x: ptr(self.x)?, w: ptr(self.w)?, scale: ptr(self.scale)?, bias, y: ptr(self.y)? }))
    }

    /// Adds the residual to the result (y [m, n] f32 += res) where the product's kernels did not.
    fn add_residual(
        &self,
        gpu: &Gpu,
        values: &SymbolValues,
        ptr: &dyn Fn(u32) -> Result<u64, String>,
    ) -> Result<(), String> {
        let Some(res) = self.res else { return Ok(()) };
        let m = eval_rows(&self.m, values)?;
        if m == 0 {
            return Ok(());
        }
        let (y, res, count) = (ptr(self.y)?, ptr(res)?, (m * self.n) as i64);
        let f = gpu.function("fast_linear", "add_residual_f32").map_err(|e| e.to_string())?;
        let mut b = gpu.launcher(&f);
        b.arg(&y).arg(&res).arg(&count);
        // SAFETY: signature (float*, float*, long); y and res hold m x n f32 (the plan's `_res` launch).
        unsafe { b.launch(grid_stride(m * self.n)) }.map(|_| ()).map_err(|e| format!("add_residual_f32: {e}"))
    }
}

/// A W4A4 `int_linear` launch on the tuned kernels.
pub struct W4Route {
    ops: Operands,
    x_i16: bool,
    y_f32: bool,
    /// Split-nibble rows [N, K/8] (GEMM and the exact row fix-up).
    rows: Option<CudaSlice<u32>>,
    /// Tiled GEMV layout.
    tiled: Option<CudaSlice<u32>>,
    /// Later launches of GEMVs of the same activations that run with this one ([`group_w4`]):
    /// one `_m1g` launch at batch 1, else each after this one.
    group: Vec<W4Route>,
}

/// The `W4GemvGroup` kernel parameter of `w4_gemv_*_m1g` (fast_linear.cu), field for field.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct W4GemvGroup {
    w: [u64; 4],
    scale: [u64; 4],
    bias: [u64; 4],
    y: [u64; 4],
    n: [i32; 4],
    count: i32,
}

// SAFETY: plain old data laid out as the kernel's struct (repr(C), the same field order and types).
unsafe impl cudarc::driver::DeviceRepr for W4GemvGroup {}

/// The arena bytes buffer `id` occupies at the symbols' max values; `None` for weights and host
/// values (no launch writes them).
fn arena_range(manifest: &Manifest, id: u32) -> Option<(u64, u64)> {
    match manifest.buffer(id)?.place {
        Place::Arena { offset, bytes } => Some((offset, offset + bytes)),
        _ => None,
    }
}

fn overlap(a: Option<(u64, u64)>, b: Option<(u64, u64)>) -> bool {
    matches!((a, b), (Some(a), Some(b)) if a.0 < b.1 && b.0 < a.1)
}

/// Joins W4 launches that read the same activations (q, k, v; gate, up) into their first one's
/// route, leaving [`Route::Grouped`] at the others. A later launch joins when moving it up is
/// invisible: no launch in between touches arena bytes that overlap its output or the shared
/// activations (a launch that might write those ends the search), and its weights, scales and bias
/// are weights. Up to 4 per group, within 12 launches.
pub fn group_w4(manifest: &Manifest, routes: &mut [Option<Route>]) {
    for lead in 0..routes.len() {
        let Some(Route::W4(first)) = &routes[lead] else { continue };
        if first.ops.res.is_some() {
            continue;
        }
        let (x, k, x_i16, y_f32, m) = (first.ops.x, first.ops.k, first.x_i16, first.y_f32, first.ops.m.clone());
        let x_range = arena_range(manifest, x);
        let mut outputs = vec![arena_range(manifest, first.ops.y)];
        let mut touched: Vec<Option<(u64, u64)>> = Vec::new();
        let mut members = Vec::new();
        for (j, route) in routes.iter().enumerate().take(lead + 12).skip(lead + 1) {
            if let Some(Route::W4(r)) = route {
                let y = arena_range(manifest, r.ops.y);
                let joins = members.len() < 3
                    && r.ops.res.is_none()
                    && (r.ops.x, r.ops.k, r.x_i16, r.y_f32) == (x, k, x_i16, y_f32)
                    && r.ops.m == m
                    && [Some(r.ops.w), Some(r.ops.scale), r.ops.bias]
                        .into_iter()
                        .flatten()
                        .all(|b| arena_range(manifest, b).is_none())
                    && !overlap(y, x_range)
                    && !outputs.iter().chain(&touched).any(|&o| overlap(o, y));
                if joins {
                    members.push(j);
                    outputs.push(y);
                    continue;
                }
            }
            let buffers: Vec<u32> = manifest.launches[j]
                .args
                .iter()
                .filter_map(|a| if let Arg::Buffer(b) = a { Some(*b) } else { None })
                .collect();
            if buffers.iter().any(|&b| b == x || overlap(arena_range(manifest, b), x_range)) {
                break;
            }
            touched.extend(buffers.iter().map(|&b| arena_range(manifest, b)));
        }
        let taken: Vec<W4Route> = members
            .iter()
            .filter_map(|&j| match routes[j].replace(Route::Grouped) {
                Some(Route::W4(r)) => Some(r),
                _ => None,
            })
            .collect();
        if let Some(Route::W4(first)) = &mut routes[lead] {
            first.group = taken;
        }
    }
}

/// A float `linear` launch on cuBLAS.
pub struct BlasRoute {
    x: u32,
    w: u32,
    y: u32,
    dtype: cudaDataType_t,
    m: DimExpr,
    n: usize,
    k: usize,
}

/// The int16 x int8 `int_linear` (an 8-bit LM head) on the W8 GEMV or cuBLAS int8.
pub struct W8Route {
    ops: Operands,
    y_f32: bool,
    /// Row sums of the weights, i32 [N].
    wsum: Option<CudaSlice<i32>>,
}

/// The weight-only int8 `int_linear` with f32 activations and output.
pub struct WfRoute {
    ops: Operands,
    /// The weights as f16 [N, K] (exact for int8; the cuBLAS path at M > 16).
    wide: Option<CudaSlice<u16>>,
    /// The weights in the tiled layout of `wf8_gemv_*` ([`pack_wf8_tiled`]; M <= 16).
    tiled: Option<CudaSlice<u8>>,
}

/// A `hadamard` launch on the fast transform.
pub struct HadRoute {
    x: u32,
    /// `up` of a fused `hadamard_swiglu_f32*` launch (x is then the gate).
    up: Option<u32>,
    out: u32,
    rows: DimExpr,
    n: usize,
    /// Entry suffix: the storage type (f32, f16, bf16), after `swiglu_` for a fused launch.
    dtype: String,
    /// A quantized output's arguments (`_q{i16,i8}` entries), passed through as the plan gives them.
    quant: Option<OutQuantArgs>,
    m: usize,
    p: usize,
    scale: f64,
    /// The dense factor as sign words (hadamard.cu): bit a % 32 of word [b * W + a / 32] is set
    /// when H[a][b] = -1, W = ceil(m / 32).
    signs: Option<CudaSlice<u32>>,
}

/// How one launch of the plan runs.
pub enum Route {
    W4(W4Route),
    W8(W8Route),
    Wf(WfRoute),
    Blas(BlasRoute),
    Had(HadRoute),
    Attn(Box<super::fast_attention::AttnRoute>),
    /// A W4 launch that runs with an earlier one ([`group_w4`]): nothing to launch here.
    Grouped,
}

/// Scratch one route needs for some symbol values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Need {
    /// Rows of per-token scales and flags (W4).
    pub rows: usize,
    /// Packed int4 activation words (W4).
    pub words: usize,
    /// Bytes of split activations and int32 partial products (W8 at M > 16).
    pub bytes: usize,
}

fn buffer_dtype(manifest: &Manifest, id: u32) -> Option<DType> {
    manifest.buffer(id).and_then(|b| DType::from_name(&b.dtype))
}

fn const_arg(a: &Arg) -> Option<usize> {
    match a {
        Arg::I64(DimExpr::Const(v)) => usize::try_from(*v).ok(),
        _ => None,
    }
}

impl Route {
    /// The route for `launch`, if one applies (weights not yet repacked: see [`Route::weight`]).
    pub fn plan(manifest: &Manifest, launch: &Launch) -> Option<Route> {
        if launch.module == "hadamard" {
            return HadRoute::plan(manifest, launch).map(Route::Had);
        }
        if launch.module == "attention" {
            return super::fast_attention::AttnRoute::plan(manifest, launch).map(|r| Route::Attn(Box::new(r)));
        }
        let bufs: Vec<u32> =
            launch.args.iter().filter_map(|a| if let Arg::Buffer(b) = a { Some(*b) } else { None }).collect();
        let ints: Vec<&Arg> = launch.args.iter().filter(|a| matches!(a, Arg::I64(_))).collect();
        let [m, n, k] = ints.as_slice() else { return None };
        let Arg::I64(m) = m else { return None };
        let (n, k) = (const_arg(n)?, const_arg(k)?);
        match launch.module.as_str() {
            "int_linear" => {
                // int_linear_x{X}_w{W}[_a{bits}][_bias][_res]_{Y}: buffers x, w, scale, [bias], [res], y.
                let [x, w, scale, rest @ ..] = bufs.as_slice() else { return None };
                let (x, w, scale) = (*x, *w, *scale);
                let (bias, res, y) = match (rest, launch.entry.ends_with("_res_f32")) {
                    ([y], false) => (None, None, *y),
                    ([b, y], false) => (Some(*b), None, *y),
                    ([r, y], true) => (None, Some(*r), *y),
                    ([b, r, y], true) => (Some(*b), Some(*r), *y),
                    _ => return None,
                };
                let y_f32 = match buffer_dtype(manifest, y)? {
                    DType::F32 => true,
                    DType::F16 => false,
                    _ => return None,
                };
                let (xd, wd) = (buffer_dtype(manifest, x)?, buffer_dtype(manifest, w)?);
                // `_a{bits}` in the entry: float activations quantized per row (not routed).
                let dynamic =
                    launch.entry.split('_').any(|p| p.len() > 1 && p.starts_with('a') && p[1..].parse::<u32>().is_ok());
                let ops = Operands { x, w, scale, bias, res, y, m: m.clone(), n, k };
                if (xd, wd) == (DType::F32, DType::I8) && y_f32 && !dynamic && k % 16 == 0 && n > 0 {
                    return Some(Route::Wf(WfRoute { ops, wide: None, tiled: None }));
                }
                if (xd, wd) == (DType::I16, DType::I8) {
                    if k % 16 != 0 || n == 0 {
                        return None;
                    }
                    return Some(Route::W8(W8Route { ops, y_f32, wsum: None }));
                }
                let x_i16 = match xd {
                    DType::I16 => true,
                    DType::I4 => false,
                    _ => return None,
                };
                let shapes_ok = n % 8 == 0 && k % 32 == 0 && n > 0 && k > 0;
                if buffer_dtype(manifest, w)? != DType::I4 || !shapes_ok {
                    return None;
                }
                Some(Route::W4(W4Route { ops, x_i16, y_f32, rows: None, tiled: None, group: Vec::new() }))
            }
            "linear" => {
                let [x, w, y] = bufs.as_slice() else { return None };
                let dt = buffer_dtype(manifest, *x)?;
                if buffer_dtype(manifest, *w)? != dt || buffer_dtype(manifest, *y)? != dt {
                    return None;
                }
                let dtype = match dt {
                    DType::F16 => cudaDataType_t::CUDA_R_16F,
                    DType::F32 => cudaDataType_t::CUDA_R_32F,
                    _ => return None,
                };
                Some(Route::Blas(BlasRoute { x: *x, w: *w, y: *y, dtype, m: m.clone(), n, k }))
            }
            _ => None,
        }
    }

    /// Adds a `_res` launch's residual after the route's product, unless the W4 batch-1 GEMV added
    /// it in its epilogue ([`W4Route::fuses_residual`]).
    pub fn add_residual(
        &self,
        gpu: &Gpu,
        values: &SymbolValues,
        ptr: &dyn Fn(u32) -> Result<u64, String>,
    ) -> Result<(), String> {
        match self {
            Route::W4(r) if !r.fuses_residual(values)? => r.ops.add_residual(gpu, values, ptr),
            Route::W8(r) => r.ops.add_residual(gpu, values, ptr),
            Route::Wf(r) => r.ops.add_residual(gpu, values, ptr),
            _ => Ok(()),
        }
    }

    /// The weight buffer whose bytes [`Route::attach_weights`] needs (W4 and W8 routes).
    pub fn weight(&self) -> Option<u32> {
        match self {
            Route::W4(r) => Some(r.ops.w),
            Route::W8(r) => Some(r.ops.w),
            Route::Wf(r) => Some(r.ops.w),
            Route::Attn(_) | Route::Grouped => None,
            Route::Blas(_) | Route::Had(_) => None,
        }
    }

    /// Repacks the plan's int4 weights (`[N, K]`, two per byte along K, low nibble first) into the
    /// W4 kernels' layouts on the device. `None` bytes: fill both layouts with seeded random words
    /// instead (synthetic weights; the layout of random words does not matter).
    pub fn attach_weights(&mut self, gpu: &Gpu, bytes: Option<&[u8]>, seed: u64) -> Result<(), String> {
        if let Route::W8(r) = self {
            // Row sums of the int8 weights (zeros for synthetic weights: the values mean nothing).
            let sums: Vec<i32> = match bytes {
                Some(b) if b.len() == r.ops.n * r.ops.k => {
                    b.chunks_exact(r.ops.k).map(|row| row.iter().map(|&v| v as i8 as i32).sum()).collect()
                }
                Some(b) => return Err(format!("int8 weight of {} bytes, expected {} x {}", b.len(), r.ops.n, r.ops.k)),
                None => vec![0; r.ops.n],
            };
            r.wsum = Some(gpu.stream.clone_htod(&sums).map_err(|e| e.to_string())?);
            return Ok(());
        }
        if let Route::Wf(r) = self {
            let (n, k) = (r.ops.n, r.ops.k);
            let (wide, tiled) = match bytes {
                Some(b) if b.len() == n * k => {
                    let f: Vec<u16> = b.iter().map(|&v| half::f16::from_f32(v as i8 as f32).to_bits()).collect();
                    let tiled = pack_wf8_tiled(b, n, k).ok_or("tiled int8 layout")?;
                    (
                        gpu.stream.clone_htod(&f).map_err(|e| e.to_string())?,
                        gpu.stream.clone_htod(&tiled).map_err(|e| e.to_string())?,
                    )
                }
                Some(b) => return Err(format!("int8 weight of {} bytes, expected {n} x {k}", b.len())),
                None => {
                    let wide = gpu.stream.alloc_zeros::<u16>(n * k).map_err(|e| e.to_string())?;
                    let tiled = gpu.stream.alloc_zeros::<u8>(wf8_tiled_bytes(n, k)).map_err(|e| e.to_string())?;
                    let kernels = super::bench::e2e::DecoderKernels::new(gpu);
                    let p = wide.device_ptr(&gpu.stream).0;
                    kernels.fill_f16(p, n * k, seed, -100.0, 100.0).map_err(|e| e.to_string())?;
                    let p = tiled.device_ptr(&gpu.stream).0;
                    kernels.fill_u32(p, wf8_tiled_bytes(n, k) / 4, seed ^ 1).map_err(|e| e.to_string())?;
                    (wide, tiled)
                }
            };
            r.wide = Some(wide);
            r.tiled = Some(tiled);
            return Ok(());
        }
        let Route::W4(r) = self else { return Ok(()) };
        let (n, k) = (r.ops.n, r.ops.k);
        let stream = &gpu.stream;
        let err = |e: cudarc::driver::DriverError| e.to_string();
        match bytes {
            Some(bytes) => {
                if bytes.len() != n * k / 2 {
                    return Err(format!("int4 weight of {} bytes, expected {n} x {k} / 2", bytes.len()));
                }
                let values: Vec<i8> = bytes.iter().flat_map(|&b| [((b << 4) as i8) >> 4, (b as i8) >> 4]).collect();
                let rows = pack_int4_split(&values, n, k).ok_or("int4 weight values out of range")?;
                let tiled = pack_int4_tiled(&rows, n, k).ok_or("tiled layout")?;
                r.rows = Some(stream.clone_htod(&rows).map_err(err)?);
                r.tiled = Some(stream.clone_htod(&tiled).map_err(err)?);
            }
            None => {
                let kernels = super::bench::e2e::DecoderKernels::new(gpu);
                let rows = stream.alloc_zeros::<u32>(n * k / 8).map_err(err)?;
                let tiled = stream.alloc_zeros::<u32>(tiled_words(n, k)).map_err(err)?;
                kernels.fill_u32(rows.device_ptr(stream).0, n * k / 8, seed).map_err(|e| e.to_string())?;
                kernels.fill_u32(tiled.device_ptr(stream).0, tiled_words(n, k), seed ^ 1).map_err(|e| e.to_string())?;
                r.rows = Some(rows);
                r.tiled = Some(tiled);
            }
        }
        Ok(())
    }

    /// The scratch this route needs for these symbol values.
    pub fn scratch_need(&self, values: &SymbolValues) -> Result<Need, String> {
        Ok(match self {
            Route::W4(r) => {
                let m = eval_rows(&r.ops.m, values)?;
                Need { rows: m, words: m * r.ops.k / 8, bytes: 0 }
            }
            Route::W8(r) => {
                let m = eval_rows(&r.ops.m, values)?;
                Need { bytes: if m > 16 { W8Route::split_bytes(m, r.ops.n, r.ops.k) } else { 0 }, ..Need::default() }
            }
            Route::Wf(r) => {
                let m = eval_rows(&r.ops.m, values)?;
                Need { bytes: if m > 16 { 4 * m * r.ops.k } else { 0 }, ..Need::default() }
            }
            Route::Attn(r) => Need { bytes: r.scratch_bytes(values)?, ..Need::default() },
            Route::Grouped => Need::default(),
            Route::Had(r) => {
                let rows = eval_rows(&r.rows, values)?;
                Need { bytes: if r.swiglu_first(rows) { 4 * rows * r.n } else { 0 }, ..Need::default() }
            }
            Route::Blas(_) => Need::default(),
        })
    }
}

/// Launch geometry of the element-wise grid-stride kernels of fast_linear.cu over `count` elements.
fn grid_stride(count: usize) -> LaunchConfig {
    let grid = count.div_ceil(256).clamp(1, 65_535) as u32;
    LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// Every size of `exprs` at these symbol values.
pub(crate) fn eval_all<const N: usize>(exprs: &[DimExpr; N], values: &SymbolValues) -> Result<[i64; N], String> {
    let mut out = [0i64; N];
    for (v, e) in out.iter_mut().zip(exprs) {
        *v = e.eval(values).map_err(|e| e.to_string())?;
    }
    Ok(out)
}

fn eval_rows(m: &DimExpr, values: &SymbolValues) -> Result<usize, String> {
    let v = m.eval(values).map_err(|e| e.to_string())?;
    usize::try_from(v).map_err(|_| format!("row count {m} = {v}"))
}

/// Device scratch of the routes: per-token scales of 1.0, row flags and packed activations (W4), and
/// bytes (split activations, a decode's attention scores, ...).
pub struct Scratch {
    ones: CudaSlice<f32>,
    flags: CudaSlice<i32>,
    xq: CudaSlice<u32>,
    bytes: CudaSlice<u8>,
}

impl Scratch {
    /// The byte scratch (one route uses it at a time: launches run in order on one stream).
    pub fn bytes(&self) -> &CudaSlice<u8> {
        &self.bytes
    }

    /// The device address of the byte scratch, which must hold `need` bytes.
    fn bytes_ptr(&self, gpu: &Gpu, need: usize) -> Result<u64, String> {
        if self.bytes.len() < need {
            return Err(format!("scratch of {} bytes, {need} needed", self.bytes.len()));
        }
        Ok(self.bytes.device_ptr(&gpu.stream).0)
    }

    /// Scratch for `need` (grown, never shrunk).
    pub fn ensure(current: Option<Scratch>, gpu: &Gpu, need: Need) -> Result<Scratch, CudaError> {
        if let Some(s) = current {
            if s.ones.len() >= need.rows && s.xq.len() >= need.words && s.bytes.len() >= need.bytes {
                return Ok(s);
            }
        }
        let stream = &gpu.stream;
        let rows = need.rows.max(16);
        Ok(Scratch {
            ones: stream.clone_htod(&vec![1.0f32; rows])?,
            flags: stream.alloc_zeros::<i32>(rows)?,
            xq: stream.alloc_zeros::<u32>(need.words.max(1))?,
            bytes: stream.alloc_zeros::<u8>(need.bytes.max(1))?,
        })
    }

    fn rows(&self) -> usize {
        self.ones.len()
    }

    fn ptrs(&self, gpu: &Gpu) -> (u64, u64, u64) {
        let s = &gpu.stream;
        (self.ones.device_ptr(s).0, self.flags.device_ptr(s).0, self.xq.device_ptr(s).0)
    }
}

impl W4Route {
    /// Enqueues this GEMV and those of its group ([`group_w4`]): one `_m1g` launch at batch 1, else
    /// one after another.
    pub fn launch(
        &self,
        gpu: &Gpu,
        scratch: &Scratch,
        values: &SymbolValues,
        ptr: &dyn Fn(u32) -> Result<u64, String>,
    ) -> Result<(), String> {
        if self.group.is_empty() || std::env::var_os("QCC_FAST_GEMV").is_some() || eval_rows(&self.ops.m, values)? != 1
        {
            self.launch_alone(gpu, scratch, values, ptr)?;
            return self.group.iter().try_for_each(|r| r.launch_alone(gpu, scratch, values, ptr));
        }
        let mut g = W4GemvGroup { count: 1 + self.group.len() as i32, ..W4GemvGroup::default() };
        let mut tiles = 0usize;
        for (i, r) in std::iter::once(self).chain(&self.group).enumerate() {
            let Some(b) = r.ops.bind(values, ptr)? else { return Ok(()) };
            g.w[i] = r.tiled.as_ref().ok_or("weights not attached")?.device_ptr(&gpu.stream).0;
            (g.scale[i], g.bias[i], g.y[i], g.n[i]) = (b.scale, b.bias, b.y, r.ops.n as i32);
            tiles += r.ops.n / 8;
        }
        let x = ptr(self.ops.x)?;
        let k32 = self.ops.k as i32;
        let name = format!(
            "w4_gemv_x{}_{}_m1g",
            if self.x_i16 { "i16" } else { "i8" },
            if self.y_f32 { "f32" } else { "f16" }
        );
        let f = gpu.function("fast_linear", &name).map_err(|e| e.to_string())?;
        let mut b = gpu.launcher(&f);
        b.arg(&g).arg(&x).arg(&k32);
        let cfg = LaunchConfig { grid_dim: (tiles as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: signature (W4GemvGroup, void*, int); every member reads the same x (one row of k
        // values) and writes its own y (n outputs), with tiled weights of [n / 8][ceil(k / 128)][32][4]
        // words; the grid is the sum of the members' n / 8 tiles, as the kernel walks them.
        unsafe { b.launch(cfg) }.map_err(|e| format!("w4_gemv group: {e}"))
    }

    /// Whether the batch-1 GEMV adds this launch's residual in its epilogue (`_m1r`); otherwise
    /// [`Route::add_residual`] adds it after the product.
    fn fuses_residual(&self, values: &SymbolValues) -> Result<bool, String> {
        Ok(self.ops.res.is_some()
            && self.y_f32
            && std::env::var_os("QCC_FAST_GEMV").is_none()
            && eval_rows(&self.ops.m, values)? == 1)
    }

    /// Enqueues the GEMV on the plan's activations (M <= 8), or pack, GEMV/GEMM and the exact fix-up
    /// of the flagged rows; the residual only where [`Self::fuses_residual`]. `ptr` resolves buffer ids.
    fn launch_alone(
        &self,
        gpu: &Gpu,
        scratch: &Scratch,
        values: &SymbolValues,
        ptr: &dyn Fn(u32) -> Result<u64, String>,
    ) -> Result<(), String> {
        let Some(Bound { m, x, scale, bias, y, .. }) = self.ops.bind(values, ptr)? else { return Ok(()) };
        let (n, k) = (self.ops.n, self.ops.k);
        let xt = if self.x_i16 { "i16" } else { "i8" };
        let yt = if self.y_f32 { "f32" } else { "f16" };
        let launch_err = |what: &str, e: &dyn std::fmt::Display| format!("{what}: {e}");

        // Decode (M <= 8): one launch on the plan's own activations, unless QCC_FAST_GEMV names a
        // GEMV of the packed path (kept to compare the two). From 9 rows on, narrowing both row halves
        // in every lane costs more than pack + GEMV + fix-up (H200: 16.8 against ~12 us per 4096x4096
        // at 16 rows).
        if m <= 8 && std::env::var_os("QCC_FAST_GEMV").is_none() {
            let tiled = self.tiled.as_ref().ok_or("weights not attached")?.device_ptr(&gpu.stream).0;
            let res = match self.ops.res {
                Some(r) if self.fuses_residual(values)? => Some(ptr(r)?),
                _ => None,
            };
            let twin = match (m, res) {
                (1, Some(_)) => "_m1r",
                (1, None) => "_m1",
                _ => "_m8",
            };
            let f = gpu.function("fast_linear", &format!("w4_gemv_x{xt}_{yt}{twin}")).map_err(|e| e.to_string())?;
            let (m32, n32, k32) = (m as i32, n as i32, k as i32);
            let mut b = gpu.launcher(&f);
            b.arg(&tiled).arg(&x).arg(&scale).arg(&bias);
            if let Some(res) = &res {
                b.arg(res);
            }
            b.arg(&y).arg(&m32).arg(&n32).arg(&k32);
            let cfg = LaunchConfig { grid_dim: ((n / 8) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: signature (u32*, void*, float*, float*, [float* res,] void*, int, int, int); tiled
            // holds the [N / 8][ceil(K / 128)][32][4] words of the weights, x m rows of k values, y (and
            // res, `_m1r`) m x n outputs.
            return unsafe { b.launch(cfg) }.map(|_| ()).map_err(|e| launch_err("w4_gemv", &e));
        }

        if m > scratch.rows() || m * k / 8 > scratch.xq.len() {
            return Err(format!("scratch for {} rows, {m} needed", scratch.rows()));
        }
        let (ones, flags, xq) = scratch.ptrs(gpu);
        let (n64, k64) = (n as i64, k as i64);
        let pack = gpu.function("fast_linear", &format!("pack_act_rows_{xt}")).map_err(|e| e.to_string())?;
        let mut b = gpu.launcher(&pack);
        b.arg(&x).arg(&xq).arg(&flags).arg(&k64);
        let cfg = LaunchConfig { grid_dim: (m as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: signature (T*, u32*, int*, long); x holds m * k values, xq m * k / 8 words, flags m ints.
        unsafe { b.launch(cfg) }.map_err(|e| launch_err("pack_act_rows", &e))?;

        let rows = self.rows.as_ref().ok_or("weights not attached")?;
        let tiled = self.tiled.as_ref().ok_or("weights not attached")?;
        let mut args = W4LinearArgs {
            w: rows.device_ptr(&gpu.stream).0,
            sw: scale,
            x: xq,
            sx: ones,
            bias,
            residual: 0,
            y,
            m,
            n,
            k,
        };
        if m <= 16 {
            args.w = tiled.device_ptr(&gpu.stream).0;
            let name = std::env::var("QCC_FAST_GEMV").unwrap_or_else(|_| DEFAULT_GEMV.to_string());
            let v = GemvVariant::by_name(&name).ok_or_else(|| format!("QCC_FAST_GEMV: no GEMV {name}"))?;
            if !v.tiled() || v.act != super::ActBits::A4 {
                return Err(format!("QCC_FAST_GEMV: {name} is not a tiled W4A4 GEMV"));
            }
            gpu.launch_gemv_to(v, &args, self.y_f32).map_err(|e| e.to_string())?;
        } else {
            let default = if m >= WS_MIN_ROWS && gpu.is_sm90() { DEFAULT_WS_GEMM } else { DEFAULT_GEMM };
            let name = std::env::var("QCC_FAST_GEMM").unwrap_or_else(|_| default.to_string());
            let v = GemmVariant::by_name(&name).ok_or_else(|| format!("QCC_FAST_GEMM: no GEMM {name}"))?;
            if !v.has_f32_output() {
                return Err(format!("QCC_FAST_GEMM: {name} has no f32-output twin (an mma.sync GEMM or `_c`)"));
            }
            gpu.launch_gemm_to(v, &args, self.y_f32).map_err(|e| e.to_string())?;
        }

        let fix = gpu.function("fast_linear", &format!("int_linear_fix_rows_x{xt}_{yt}")).map_err(|e| e.to_string())?;
        let w_rows = rows.device_ptr(&gpu.stream).0;
        let m64 = m as i64;
        let mut b = gpu.launcher(&fix);
        b.arg(&x).arg(&w_rows).arg(&scale).arg(&bias).arg(&y).arg(&flags).arg(&m64).arg(&n64).arg(&k64);
        // At most 16 block rows walk the M rows in windows of 32 (one ballot of flags per window).
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(8) as u32, m.div_ceil(32).min(16) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: signature (T*, u32*, float*, float*, void*, int*, long, long, long) over the buffers above.
        unsafe { b.launch(cfg) }.map_err(|e| launch_err("int_linear_fix_rows", &e))?;
        Ok(())
    }
}

impl W8Route {
    /// Scratch bytes at M > 16: hi and lo int8 [M, K], then C_hi and C_lo int32 [M, N] (256-aligned).
    fn split_bytes(m: usize, n: usize, k: usize) -> usize {
        2 * (m * k).div_ceil(256) * 256 + 8 * m * n
    }

    /// Enqueues the exact int16 x int8 product and its epilogue (the residual after: [`Route::add_residual`]).
    pub fn launch(
        &self,
        gpu: &Gpu,
        blas: &CudaBlas,
        scratch: &Scratch,
        values: &SymbolValues,
        ptr: &dyn Fn(u32) -> Result<u64, String>,
    ) -> Result<(), String> {
        let Some(Bound { m, x, w, scale, bias, y }) = self.ops.bind(values, ptr)? else { return Ok(()) };
        let (n, k) = (self.ops.n, self.ops.k);
        let (n64, k64) = (n as i64, k as i64);
        let yt = if self.y_f32 { "f32" } else { "f16" };
        let func = |name: &str| gpu.function("fast_linear", name).map_err(|e| e.to_string());
        if m <= 16 {
            let f = func(&format!("w8_gemv_xi16_{yt}"))?;
            let m32 = m as i32;
            let mut b = gpu.launcher(&f);
            b.arg(&x).arg(&w).arg(&scale).arg(&bias).arg(&y).arg(&m32).arg(&n64).arg(&k64);
            let cfg =
                LaunchConfig { grid_dim: (n.div_ceil(8) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: signature (short*, i8*, float*, float*, void*, int, long, long); x [m, k] i16,
            // w [n, k] i8 (16-byte rows: k % 16 == 0), y [m, n].
            return unsafe { b.launch(cfg) }.map(|_| ()).map_err(|e| format!("w8_gemv: {e}"));
        }
        let base = scratch.bytes_ptr(gpu, Self::split_bytes(m, n, k))?;
        let half = ((m * k).div_ceil(256) * 256) as u64;
        let (hi, lo, c_hi) = (base, base + half, base + 2 * half);
        let c_lo = c_hi + (4 * m * n) as u64;
        let count = (m * k) as i64;
        let f = func("split_i16_to_i8")?;
        let mut b = gpu.launcher(&f);
        b.arg(&x).arg(&hi).arg(&lo).arg(&count);
        let cfg = grid_stride(m * k);
        // SAFETY: signature (short*, i8*, i8*, long); x holds m * k values, hi and lo m * k bytes each.
        unsafe { b.launch(cfg) }.map_err(|e| format!("split_i16_to_i8: {e}"))?;
        for (a, c) in [(hi, c_hi), (lo, c_lo)] {
            let types = (cudaDataType_t::CUDA_R_8I, cudaDataType_t::CUDA_R_32I);
            // SAFETY: w [n, k] and a [m, k] int8, c [m, n] int32 (the scratch sized above).
            unsafe { gemm_tn(blas, (w, a, c), (m, n, k), types, cublasComputeType_t::CUBLAS_COMPUTE_32I, 1i32, 0i32) }
                .map_err(|e| format!("cuBLAS int8 gemm: {e}"))?;
        }
        let wsum = self.wsum.as_ref().ok_or("weights not attached")?.device_ptr(&gpu.stream).0;
        let f = func(&format!("combine_w8_{yt}"))?;
        let m64 = m as i64;
        let mut b = gpu.launcher(&f);
        b.arg(&c_hi).arg(&c_lo).arg(&wsum).arg(&scale).arg(&bias).arg(&y).arg(&m64).arg(&n64);
        let cfg = grid_stride(m * n);
        // SAFETY: signature (int*, int*, int*, float*, float*, void*, long, long) over the buffers above.
        unsafe { b.launch(cfg) }.map(|_| ()).map_err(|e| format!("combine_w8: {e}"))
    }
}

/// The output quantization arguments of a fused launch (`_q{i16,i8}` entries of hadamard.cu,
/// attention.cu, fast_attention.cu; common.cuh `OutQuant`): the step buffer, seq, past and prefix,
/// then lo, hi, plo, phi, as the plan lists them (compiler/src/lower/micro.rs `fused_quant`).
#[derive(Clone, Debug)]
pub struct OutQuantArgs {
    /// Entry suffix: `_qi16` or `_qi8`.
    pub suffix: String,
    step: u32,
    ints: [DimExpr; 3],
    bounds: [f32; 4],
}

/// [`OutQuantArgs`] for one run: the step's device pointer and the evaluated sizes.
pub struct BoundQuant {
    step: u64,
    ints: [i64; 3],
    bounds: [f32; 4],
}

impl OutQuantArgs {
    /// An entry name split before its quantized-output suffix (`attention_f32_mask_qi16` ->
    /// (`attention_f32_mask`, Some(`_qi16`))).
    pub fn split_entry(entry: &str) -> (&str, Option<&str>) {
        match entry.find("_q") {
            Some(i) => (&entry[..i], Some(&entry[i..])),
            None => (entry, None),
        }
    }

    /// The entry's suffix (`_qi16`, `_qi8`) and its 8 trailing arguments.
    pub fn parse(suffix: &str, args: &[Arg]) -> Option<OutQuantArgs> {
        let [Arg::Buffer(step), Arg::I64(seq), Arg::I64(past), Arg::I64(prefix), Arg::F32(lo), Arg::F32(hi), Arg::F32(plo), Arg::F32(phi)] =
            args
        else {
            return None;
        };
        if !matches!(suffix, "_qi16" | "_qi8") {
            return None;
        }
        Some(OutQuantArgs {
            suffix: suffix.to_string(),
            step: *step,
            ints: [seq.clone(), past.clone(), prefix.clone()],
            bounds: [*lo, *hi, *plo, *phi],
        })
    }

    pub fn bind(&self, values: &SymbolValues, ptr: &dyn Fn(u32) -> Result<u64, String>) -> Result<BoundQuant, String> {
        let ints = eval_all(&self.ints, values)?;
        if ints[0] <= 0 {
            return Err(format!("quantized output: seq {}", ints[0]));
        }
        Ok(BoundQuant { step: ptr(self.step)?, ints, bounds: self.bounds })
    }
}

impl BoundQuant {
    /// Appends the 8 arguments (float*, long x 3, float x 4).
    pub fn push<'a>(&'a self, b: &mut super::pdl::Launcher<'a>) {
        b.arg(&self.step);
        for v in &self.ints {
            b.arg(v);
        }
        for v in &self.bounds {
            b.arg(v);
        }
    }
}

impl HadRoute {
    /// `hadamard_{X}(x, out, rows, n)`, or a fused f32 form (`hadamard_swiglu_f32(g, u, out, rows,
    /// n)`, `hadamard_[swiglu_]f32_q{i16,i8}(..., step, seq, past, prefix, lo, hi, plo, phi)`), with
    /// one exact block (no block-diagonal fallback).
    fn plan(manifest: &Manifest, launch: &Launch) -> Option<HadRoute> {
        let rest = launch.entry.strip_prefix("hadamard_")?;
        let (rest, swiglu) = match rest.strip_prefix("swiglu_") {
            Some(r) => (r, true),
            None => (rest, false),
        };
        let (dtype, qsuffix) = OutQuantArgs::split_entry(rest);
        let ins = 1 + swiglu as usize;
        let head = launch.args.get(..ins + 3)?;
        let [Arg::Buffer(out), Arg::I64(rows), n] = &head[ins..] else { return None };
        let Arg::Buffer(x) = head[0] else { return None };
        let up = match head.get(1) {
            Some(Arg::Buffer(u)) if swiglu => Some(*u),
            _ => None,
        };
        let quant = match qsuffix {
            Some(q) => Some(OutQuantArgs::parse(q, &launch.args[ins + 3..])?),
            None if launch.args.len() == ins + 3 => None,
            None => return None,
        };
        let n = const_arg(n)?;
        if !matches!(dtype, "f32" | "f16" | "bf16") || buffer_dtype(manifest, x)?.name() != dtype {
            return None;
        }
        if (swiglu || quant.is_some()) && dtype != "f32" {
            return None;
        }
        let dtype = if swiglu { format!("swiglu_{dtype}") } else { dtype.to_string() };
        let h = qcc_ir::hadamard::Hadamard::new(n);
        let (m, p, dense) = h.factors();
        // At most Hopper's 227 KiB of shared memory opt-in. Only +-1 dense entries (an exact
        // construction: no zero blocks).
        if h.block_size() != n || m * p != n || Self::smem_bytes(n, m) > 227 * 1024 || dense.contains(&0) {
            return None;
        }
        let scale = 1.0 / (h.block_size() as f64).sqrt();
        Some(HadRoute { x, up, out: *out, rows: rows.clone(), n, dtype, quant, m, p, scale, signs: None })
    }

    /// Dynamic shared memory of `hadamard_fast_*`: the row in f64, then the sign words.
    fn smem_bytes(n: usize, m: usize) -> usize {
        8 * n + 4 * m * m.div_ceil(32)
    }

    /// The dense factor's sign words (see [`HadRoute::signs`]).
    fn sign_words(dense: &[i8], m: usize) -> Vec<u32> {
        let w = m.div_ceil(32);
        let mut words = vec![0u32; m * w];
        for a in 0..m {
            for b in 0..m {
                if dense[a * m + b] < 0 {
                    words[b * w + a / 32] |= 1 << (a % 32);
                }
            }
        }
        words
    }

    /// Uploads the dense factor's sign words (once per route).
    pub fn attach(&mut self, gpu: &Gpu) -> Result<(), String> {
        let h = qcc_ir::hadamard::Hadamard::new(self.n);
        let words = Self::sign_words(h.factors().2, self.m);
        self.signs = Some(gpu.stream.clone_htod(&words).map_err(|e| e.to_string())?);
        Ok(())
    }

    /// Blocks per row and output sub-rows per block (a multiple of 4; 0 when m = 1): few rows
    /// (decode) split each row's outputs to fill the GPU (about four blocks per SM of an H100/H200).
    /// (1024-thread blocks with 4x fewer of them were measured slower on a decode row of 11008: 18.4
    /// against 11 us, each SM then runs 4x the dense chains; docs/gpu-results.md, 2026-12-04.)
    fn splits(&self, rows: usize) -> (usize, usize) {
        let wanted = if rows >= Self::WHOLE_ROW_ROWS { 1 } else { 528usize.div_ceil(rows) };
        if self.m == 1 {
            return (wanted.clamp(1, 16), 0);
        }
        let a_per = self.m.div_ceil(wanted).next_multiple_of(4);
        (self.m.div_ceil(a_per), a_per)
    }

    /// Rows from which one block transforms a whole row (fewer split each row over blocks).
    const WHOLE_ROW_ROWS: usize = 264;

    /// Whether a fused swiglu runs as its own kernel into the scratch first: with a row's outputs
    /// split over blocks, each block would recompute the whole row's swiglu (43 swiglus per thread
    /// of a 256-thread block at 11008), more than a separate launch costs.
    fn swiglu_first(&self, rows: usize) -> bool {
        self.up.is_some() && rows < Self::WHOLE_ROW_ROWS
    }

    /// Enqueues the transform of every row.
    pub fn launch(
        &self,
        gpu: &Gpu,
        scratch: &Scratch,
        values: &SymbolValues,
        ptr: &dyn Fn(u32) -> Result<u64, String>,
    ) -> Result<(), String> {
        let rows = eval_rows(&self.rows, values)?;
        if rows == 0 {
            return Ok(());
        }
        if rows > 0x7FFF_FFFF {
            return Err(format!("{rows} rows"));
        }
        let (mut x, out) = (ptr(self.x)?, ptr(self.out)?);
        let mut up = self.up.map(ptr).transpose()?;
        let mut dtype = self.dtype.as_str();
        if let (true, Some(u)) = (self.swiglu_first(rows), up) {
            let count = (rows * self.n) as i64;
            let y = scratch.bytes_ptr(gpu, 4 * count as usize)?;
            let f = gpu.function("hadamard", "swiglu_rows_f32").map_err(|e| e.to_string())?;
            let mut b = gpu.launcher(&f);
            b.arg(&x).arg(&u).arg(&y).arg(&count);
            // SAFETY: signature (float*, float*, float*, long); g and u hold count values, the scratch
            // at least count floats (checked above).
            unsafe { b.launch(grid_stride(count as usize)) }.map_err(|e| format!("swiglu_rows_f32: {e}"))?;
            (x, up, dtype) = (y, None, "f32");
        }
        let signs = self.signs.as_ref().ok_or("dense factor not attached")?.device_ptr(&gpu.stream).0;
        let (splits, a_per) = self.splits(rows);
        let qsuffix = self.quant.as_ref().map_or("", |q| q.suffix.as_str());
        let entry = format!("hadamard_fast_{dtype}{qsuffix}");
        let f = gpu.function("hadamard", &entry).map_err(|e| e.to_string())?;
        let smem = Self::smem_bytes(self.n, self.m) as u32;
        if smem > 48 * 1024 {
            f.set_attribute(
                cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .map_err(|e| format!("shared memory {smem} bytes: {e}"))?;
        }
        let (n64, m32, p64, a_per32) = (self.n as i64, self.m as i32, self.p as i64, a_per as i32);
        let quant =
            self.quant.as_ref().map(|q| q.bind(values, ptr)).transpose().map_err(|e| format!("{entry}: {e}"))?;
        let mut b = gpu.launcher(&f);
        b.arg(&x);
        if let Some(up) = &up {
            b.arg(up);
        }
        b.arg(&out).arg(&n64).arg(&m32).arg(&p64).arg(&signs).arg(&self.scale).arg(&a_per32);
        if let Some(q) = &quant {
            q.push(&mut b);
        }
        let cfg =
            LaunchConfig { grid_dim: (rows as u32, splits as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: smem };
        // SAFETY: signature (T*, [float* up,] O*, long, int, long, u32*, double, int, [float* step, long
        // x 3, float x 4]) as hadamard.cu's entry of this name; x, up and out hold rows * n values,
        // step n (the plan sized them), signs m * ceil(m / 32) words; the shared memory holds one row
        // in f64 and the signs.
        unsafe { b.launch(cfg) }.map(|_| ()).map_err(|e| format!("hadamard_fast: {e}"))
    }
}

impl WfRoute {
    /// Enqueues the weight-only product and its epilogue (the residual after: [`Route::add_residual`]).
    pub fn launch(
        &self,
        gpu: &Gpu,
        blas: &CudaBlas,
        scratch: &Scratch,
        values: &SymbolValues,
        ptr: &dyn Fn(u32) -> Result<u64, String>,
    ) -> Result<(), String> {
        let Some(Bound { m, x, scale, bias, y, .. }) = self.ops.bind(values, ptr)? else { return Ok(()) };
        let (n, k) = (self.ops.n, self.ops.k);
        let (m64, n64, k64) = (m as i64, n as i64, k as i64);
        let func = |name: &str| gpu.function("fast_linear", name).map_err(|e| e.to_string());
        if m <= 16 {
            let w = self.tiled.as_ref().ok_or("weights not attached")?.device_ptr(&gpu.stream).0;
            // The entry whose row tile MT (1, 2, 4, 8, 16) is the least >= m; 128 channels per block;
            // two x chunk buffers of [MT, 4096 / MT] f32 (fast_linear.cu).
            let f = match m.next_power_of_two() {
                16 => func("wf8_gemv_xf32_f32")?,
                mt => func(&format!("wf8_gemv_m{mt}_xf32_f32"))?,
            };
            let m32 = m as i32;
            let mut b = gpu.launcher(&f);
            b.arg(&x).arg(&w).arg(&scale).arg(&bias).arg(&y).arg(&m32).arg(&n64).arg(&k64);
            let cfg = LaunchConfig {
                grid_dim: (n.div_ceil(128) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 2 * 4096 * 4,
            };
            // SAFETY: signature (float*, i8*, float*, float*, void*, int, long, long); x [m, k] f32
            // (16-byte rows: k % 16 == 0), w the tiled [n, k] i8 (wf8_tiled_bytes), y [m, n] f32; 32 KiB of shared memory, the
            // kernel's two chunk buffers; 256 threads, as the kernel's block layout assumes.
            return unsafe { b.launch(cfg) }.map(|_| ()).map_err(|e| format!("wf8_gemv: {e}"));
        }
        let wide = self.wide.as_ref().ok_or("weights not attached")?.device_ptr(&gpu.stream).0;
        let hi = scratch.bytes_ptr(gpu, 4 * m * k)?;
        let lo = hi + (2 * m * k) as u64;
        let count = (m * k) as i64;
        let f = func("split_f32_to_f16")?;
        let mut b = gpu.launcher(&f);
        b.arg(&x).arg(&hi).arg(&lo).arg(&count);
        let cfg = grid_stride(m * k);
        // SAFETY: signature (float*, u16*, u16*, long); x holds m * k floats, hi and lo m * k halves.
        unsafe { b.launch(cfg) }.map_err(|e| format!("split_f32_to_f16: {e}"))?;
        for (part, beta) in [(hi, 0.0f32), (lo, 1.0f32)] {
            let types = (cudaDataType_t::CUDA_R_16F, cudaDataType_t::CUDA_R_32F);
            // SAFETY: wide [n, k] and part [m, k] f16, y [m, n] f32.
            unsafe {
                gemm_tn(blas, (wide, part, y), (m, n, k), types, cublasComputeType_t::CUBLAS_COMPUTE_32F, 1.0f32, beta)
            }
            .map_err(|e| format!("cuBLAS gemm: {e}"))?;
        }
        let f = func("scale_bias_f32")?;
        let mut b = gpu.launcher(&f);
        b.arg(&y).arg(&scale).arg(&bias).arg(&m64).arg(&n64);
        let cfg = grid_stride(m * n);
        // SAFETY: signature (float*, float*, float*, long, long); y [m, n], scale and bias [n].
        unsafe { b.launch(cfg) }.map(|_| ()).map_err(|e| format!("scale_bias_f32: {e}"))
    }
}

/// `C[M, N] = alpha * X[M, K] . W[N, K]^T + beta * C` on cuBLAS for the runtime's row-major operands
/// (the column-major TN call): `ab` is the type of W and X, `c` of C; `alpha` and `beta` are host
/// scalars of the compute type (i32 for `CUBLAS_COMPUTE_32I`, else f32).
///
/// # Safety
/// `w`, `x` and `c` must be device buffers of at least n * k, m * k and m * n elements of their
/// types on the handle's stream.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_tn<S>(
    blas: &CudaBlas,
    (w, x, c): (u64, u64, u64),
    (m, n, k): (usize, usize, usize),
    (ab, ct): (cudaDataType_t, cudaDataType_t),
    compute: cublasComputeType_t,
    alpha: S,
    beta: S,
) -> Result<(), cudarc::cublas::result::CublasError> {
    // SAFETY: the caller's contract above; the scalars live on this stack frame during the call.
    unsafe {
        cudarc::cublas::result::gemm_ex(
            *blas.handle(),
            cublasOperation_t::CUBLAS_OP_T,
            cublasOperation_t::CUBLAS_OP_N,
            n as i32,
            m as i32,
            k as i32,
            (&alpha) as *const S as *const _,
            w as *const _,
            ab,
            k as i32,
            x as *const _,
            ab,
            k as i32,
            (&beta) as *const S as *const _,
            c as *mut _,
            ct,
            n as i32,
            compute,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
}

impl BlasRoute {
    /// Y[M, N] = X[M, K] . W[N, K]^T on cuBLAS (f32 compute, default algorithm).
    pub fn launch(
        &self,
        blas: &CudaBlas,
        values: &SymbolValues,
        ptr: &dyn Fn(u32) -> Result<u64, String>,
    ) -> Result<(), String> {
        let m = eval_rows(&self.m, values)?;
        if m == 0 {
            return Ok(());
        }
        let (x, w, y) = (ptr(self.x)?, ptr(self.w)?, ptr(self.y)?);
        let compute = cublasComputeType_t::CUBLAS_COMPUTE_32F;
        // SAFETY: w [n, k], x [m, k], y [m, n] of `dtype` (the plan sized them for these symbols).
        unsafe { gemm_tn(blas, (w, x, y), (m, self.n, self.k), (self.dtype, self.dtype), compute, 1.0f32, 0.0f32) }
            .map_err(|e| format!("cuBLAS gemm: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifact::{Buffer, Place};

    fn manifest(buffers: &[(&str, &str, &[i64], bool)]) -> Manifest {
        Manifest::with_buffers(
            buffers
                .iter()
                .enumerate()
                .map(|(i, (name, dtype, dims, weight))| Buffer {
                    id: i as u32,
                    name: name.to_string(),
                    dtype: dtype.to_string(),
                    dims: dims.iter().map(|&d| DimExpr::Const(d)).collect(),
                    place: if *weight {
                        Place::Weight { tensor: name.to_string() }
                    } else {
                        Place::Arena { offset: 0, bytes: 0 }
                    },
                    order: None,
                })
                .collect(),
        )
    }

    fn launch(module: &str, bufs: &[u32], m: DimExpr, n: i64, k: i64) -> Launch {
        let mut args: Vec<Arg> = bufs.iter().map(|&b| Arg::Buffer(b)).collect();
        args.extend([Arg::I64(m), Arg::I64(DimExpr::Const(n)), Arg::I64(DimExpr::Const(k))]);
        Launch {
            node: "n".into(),
            module: module.into(),
            entry: "e".into(),
            grid: [DimExpr::Const(1), DimExpr::Const(1), DimExpr::Const(1)],
            block: [128, 1, 1],
            shared_bytes: 0,
            args,
        }
    }

    #[test]
    fn w4_launches_of_one_activation_join_the_first_unless_moving_them_up_shows() {
        let m = || DimExpr::Sym("seq".into());
        let arena = |offset: u64| Place::Arena { offset, bytes: 100 };
        let mut mf = manifest(&[
            ("x", "i16", &[1, 576], false),  // 0
            ("wq", "i4", &[576, 576], true), // 1
            ("s", "f32", &[576], true),      // 2
            ("q", "f32", &[1, 576], false),  // 3
            ("wk", "i4", &[576, 576], true), // 4
            ("k", "f32", &[1, 576], false),  // 5
            ("wv", "i4", &[576, 576], true), // 6
            ("v", "f32", &[1, 576], false),  // 7
            ("qr", "f32", &[1, 576], false), // 8: the rotary output of q
            ("x2", "i16", &[1, 576], false), // 9: another activation
            ("wo", "i4", &[576, 576], true), // 10
        ]);
        for (id, offset) in [(0, 0), (3, 100), (5, 200), (7, 300), (8, 400), (9, 500)] {
            mf.buffers[id].place = arena(offset);
        }
        let rotary =
            |out: u32, input: u32| Launch { module: "qcc_generated".into(), ..launch("r", &[out, input], m(), 1, 1) };
        let plan = |mf: &Manifest, launches: &[Launch]| -> Vec<&'static str> {
            let mf = Manifest { launches: launches.to_vec(), ..mf.clone() };
            let mut routes: Vec<Option<Route>> = launches.iter().map(|l| Route::plan(&mf, l)).collect();
            group_w4(&mf, &mut routes);
            routes
                .iter()
                .map(|r| match r {
                    Some(Route::W4(r)) => ["w4", "w4+1", "w4+2", "w4+3"][r.group.len()],
                    Some(Route::Grouped) => "grouped",
                    Some(_) => "other",
                    None => "-",
                })
                .collect()
        };
        // q, rotary(q), k, v: k and v run with q.
        let qkv = [
            launch("int_linear", &[0, 1, 2, 3], m(), 576, 576),
            rotary(8, 3),
            launch("int_linear", &[0, 4, 2, 5], m(), 576, 576),
            launch("int_linear", &[0, 6, 2, 7], m(), 576, 576),
        ];
        assert_eq!(plan(&mf, &qkv), ["w4+2", "-", "grouped", "grouped"]);
        // The rotary's output shares arena bytes with k's: k would clobber it, so k stays where it
        // is, and (reading x) ends q's search; v joins k.
        let mut shared = mf.clone();
        shared.buffers[8].place = arena(150);
        assert_eq!(plan(&shared, &qkv), ["w4", "-", "w4+1", "grouped"]);
        // A launch that may write the activations ends the search.
        let rewrite = [qkv[0].clone(), rotary(0, 8), qkv[2].clone()];
        assert_eq!(plan(&mf, &rewrite), ["w4", "-", "w4"]);
        // Another activation, or another row count, does not join.
        let other = [qkv[0].clone(), launch("int_linear", &[9, 10, 2, 5], m(), 576, 576)];
        assert_eq!(plan(&mf, &other), ["w4", "w4"]);
        let rows = [qkv[0].clone(), launch("int_linear", &[0, 4, 2, 5], DimExpr::Const(1), 576, 576)];
        assert_eq!(plan(&mf, &rows), ["w4", "w4"]);
        // A launch with a residual (its add fused) neither leads nor joins a group.
        let mut with_res = launch("int_linear", &[0, 4, 2, 9, 5], m(), 576, 576);
        with_res.entry = "int_linear_xi16_wi4_res_f32".into();
        assert_eq!(plan(&mf, &[qkv[0].clone(), with_res.clone()]), ["w4", "w4"]);
        assert_eq!(plan(&mf, &[with_res, qkv[2].clone()]), ["w4", "w4"]);
    }

    #[test]
    fn routes_w4a4_int_linear_and_plain_float_linear_only() {
        let m = || DimExpr::Sym("seq".into());
        let mf = manifest(&[
            ("x16", "i16", &[8, 576], false),  // 0
            ("w4", "i4", &[1536, 576], true),  // 1
            ("s", "f32", &[1536], true),       // 2
            ("y32", "f32", &[8, 1536], false), // 3
            ("x4", "i4", &[8, 576], false),    // 4
            ("w8", "i8", &[1536, 576], true),  // 5
            ("xf", "f16", &[8, 576], false),   // 6
            ("wf", "f16", &[1536, 576], true), // 7
            ("yf", "f16", &[8, 1536], false),  // 8
            ("xf32", "f32", &[8, 576], false), // 9
            ("b", "f32", &[1536], true),       // 10
            ("y64", "i64", &[8, 1536], false), // 11
        ]);
        let is_w4 = |l: &Launch| matches!(Route::plan(&mf, l), Some(Route::W4(_)));
        let is_blas = |l: &Launch| matches!(Route::plan(&mf, l), Some(Route::Blas(_)));
        // W4A4: i16 (prefix rows) or i4 activations, int4 weights, f32 or f16 out, with or without bias.
        assert!(is_w4(&launch("int_linear", &[0, 1, 2, 3], m(), 1536, 576)));
        assert!(is_w4(&launch("int_linear", &[4, 1, 2, 10, 8], m(), 1536, 576)));
        // Not routed: float activations (dynamic quantization), K % 32 != 0, N % 8 != 0, an integer
        // output.
        // W8 (the 8-bit LM head): int16 activations, int8 weights, K % 16 == 0.
        assert!(matches!(Route::plan(&mf, &launch("int_linear", &[0, 5, 2, 3], m(), 1536, 576)), Some(Route::W8(_))));
        assert!(Route::plan(&mf, &launch("int_linear", &[0, 5, 2, 3], m(), 1536, 568)).is_none());
        assert!(Route::plan(&mf, &launch("int_linear", &[4, 5, 2, 3], m(), 1536, 576)).is_none());
        assert!(Route::plan(&mf, &launch("int_linear", &[9, 1, 2, 3], m(), 1536, 576)).is_none());
        // Weight-only int8 with f32 activations: routed unless quantized per row (`_a8`).
        assert!(matches!(Route::plan(&mf, &launch("int_linear", &[9, 5, 2, 3], m(), 1536, 576)), Some(Route::Wf(_))));
        let mut dynamic = launch("int_linear", &[9, 5, 2, 3], m(), 1536, 576);
        dynamic.entry = "int_linear_xf32_wi8_a8_f32".into();
        assert!(Route::plan(&mf, &dynamic).is_none());
        assert!(Route::plan(&mf, &launch("int_linear", &[0, 1, 2, 3], m(), 1536, 560)).is_none());
        assert!(Route::plan(&mf, &launch("int_linear", &[0, 1, 2, 3], m(), 1532, 576)).is_none());
        assert!(Route::plan(&mf, &launch("int_linear", &[0, 1, 2, 11], m(), 1536, 576)).is_none());
        // A residual (`_res`, f32 out): the buffer before y; no grouping with it (fused at batch 1).
        let mut res = launch("int_linear", &[0, 1, 2, 10, 9, 3], m(), 1536, 576);
        res.entry = "int_linear_xi16_wi4_bias_res_f32".into();
        let Some(Route::W4(r)) = Route::plan(&mf, &res) else { panic!("a residual W4 launch is routed") };
        assert_eq!((r.ops.bias, r.ops.res, r.ops.y), (Some(10), Some(9), 3));
        res.args.remove(3);
        res.entry = "int_linear_xi16_wi4_res_f32".into();
        let Some(Route::W4(r)) = Route::plan(&mf, &res) else { panic!("without bias") };
        assert_eq!((r.ops.bias, r.ops.res, r.ops.y), (None, Some(9), 3));
        res.args.remove(3);
        assert!(Route::plan(&mf, &res).is_none(), "a `_res` entry without its buffer");
        let mut w8res = launch("int_linear", &[0, 5, 2, 9, 3], m(), 1536, 576);
        w8res.entry = "int_linear_xi16_wi8_res_f32".into();
        assert!(matches!(Route::plan(&mf, &w8res), Some(Route::W8(r)) if r.ops.res == Some(9)));
        // cuBLAS: one float type throughout and no bias.
        assert!(is_blas(&launch("linear", &[6, 7, 8], m(), 1536, 576)));
        assert!(Route::plan(&mf, &launch("linear", &[6, 7, 10, 8], m(), 1536, 576)).is_none());
        assert!(Route::plan(&mf, &launch("linear", &[9, 7, 3], m(), 1536, 576)).is_none());
        assert!(Route::plan(&mf, &launch("attention", &[6, 7, 8], m(), 1536, 576)).is_none());
        // Only W4 routes need scratch: rows from the symbols.
        let r = Route::plan(&mf, &launch("int_linear", &[0, 1, 2, 3], m(), 1536, 576)).unwrap();
        let values: SymbolValues = [("seq".to_string(), 77)].into_iter().collect();
        assert_eq!(r.scratch_need(&values).unwrap(), Need { rows: 77, words: 77 * 576 / 8, bytes: 0 });
        let w8 = Route::plan(&mf, &launch("int_linear", &[0, 5, 2, 3], m(), 1536, 576)).unwrap();
        assert_eq!(w8.scratch_need(&values).unwrap().bytes, 2 * 44_544 + 8 * 77 * 1536);
        // Hadamard: every exact size of the real models (and none with a block-diagonal fallback).
        for n in [64i64, 576, 1536, 44, 11008] {
            let hm = manifest(&[("x", "f32", &[4, n], false), ("y", "f32", &[4, n], false)]);
            let mut l = launch("hadamard", &[0, 1], m(), 0, 0);
            l.entry = "hadamard_f32".into();
            l.args = vec![Arg::Buffer(0), Arg::Buffer(1), Arg::I64(m()), Arg::I64(DimExpr::Const(n))];
            let Some(Route::Had(h)) = Route::plan(&hm, &l) else { panic!("hadamard n={n} not routed") };
            assert_eq!(h.m * h.p, n as usize, "n={n}");
            l.entry = "hadamard_f16".into();
            assert!(Route::plan(&hm, &l).is_none(), "entry type must match the buffer's");
        }
        let one: SymbolValues = [("seq".to_string(), 16)].into_iter().collect();
        assert_eq!(w8.scratch_need(&one).unwrap(), Need::default(), "the GEMV needs no scratch");
        assert_eq!(r.weight(), Some(1));
        // The fused Hadamard (compiler/src/lower/micro.rs): swiglu of g (0) and u (1) into y (2, i16),
        // quantized with the step buffer 3. Rows below WHOLE_ROW_ROWS run the swiglu first into the
        // scratch (4 bytes per element); 264 rows and more compute it in the transform's loads.
        let n = 11008i64;
        let hm = manifest(&[
            ("g", "f32", &[4, n], false),
            ("u", "f32", &[4, n], false),
            ("y", "i16", &[4, n], false),
            ("step", "f32", &[n], true),
        ]);
        let mut l = launch("hadamard", &[0, 1, 2], m(), 0, 0);
        l.entry = "hadamard_swiglu_f32_qi16".into();
        l.args = vec![Arg::Buffer(0), Arg::Buffer(1), Arg::Buffer(2), Arg::I64(m()), Arg::I64(DimExpr::Const(n))];
        l.args.extend([Arg::Buffer(3), Arg::I64(m()), Arg::I64(DimExpr::Const(0)), Arg::I64(DimExpr::Const(1))]);
        l.args.extend([-8.0, 7.0, -32768.0, 32767.0].map(Arg::F32));
        let Some(Route::Had(h)) = Route::plan(&hm, &l) else { panic!("fused hadamard not routed") };
        assert_eq!((h.x, h.up, h.out, h.dtype.as_str()), (0, Some(1), 2, "swiglu_f32"));
        assert_eq!(h.quant.as_ref().map(|q| q.suffix.as_str()), Some("_qi16"));
        let rows = |r: i64| -> SymbolValues { [("seq".to_string(), r)].into_iter().collect() };
        let had = Route::Had(h);
        assert_eq!(had.scratch_need(&rows(1)).unwrap().bytes, 4 * 11008);
        assert_eq!(had.scratch_need(&rows(263)).unwrap().bytes, 4 * 263 * 11008);
        assert_eq!(had.scratch_need(&rows(264)).unwrap(), Need::default());
        // Declined: an unknown output type, a quantization argument missing, a quantized f16 input.
        let mut bad = l.clone();
        bad.entry = "hadamard_swiglu_f32_qi4".into();
        assert!(Route::plan(&hm, &bad).is_none());
        let mut bad = l.clone();
        bad.args.pop();
        assert!(Route::plan(&hm, &bad).is_none());
        let hm16 = manifest(&[("x", "f16", &[4, n], false), ("y", "i16", &[4, n], false), ("step", "f32", &[n], true)]);
        let mut bad = launch("hadamard", &[0, 1], m(), 0, 0);
        bad.entry = "hadamard_f16_qi16".into();
        bad.args = vec![Arg::Buffer(0), Arg::Buffer(1), Arg::I64(m()), Arg::I64(DimExpr::Const(n))];
        bad.args.extend(l.args[5..].iter().cloned());
        assert!(Route::plan(&hm16, &bad).is_none());
    }

    #[test]
    fn hadamard_sign_words_and_splits_cover_every_output_sub_row() {
        for n in [11008usize, 4992, 4480, 1536, 44, 4096] {
            let h = qcc_ir::hadamard::Hadamard::new(n);
            let (m, p, dense) = h.factors();
            let words = HadRoute::sign_words(dense, m);
            let w = m.div_ceil(32);
            for a in 0..m {
                for b in 0..m {
                    let negative = words[b * w + a / 32] >> (a % 32) & 1 == 1;
                    assert_eq!(negative, dense[a * m + b] < 0, "n={n} H[{a}][{b}]");
                }
            }
            let route = HadRoute {
                x: 0,
                up: None,
                out: 1,
                rows: DimExpr::Const(1),
                n,
                dtype: "f32".into(),
                quant: None,
                m,
                p,
                scale: 1.0,
                signs: None,
            };
            for rows in [1usize, 5, 16, 17, 263, 264, 2048] {
                let (splits, a_per) = route.splits(rows);
                if m == 1 {
                    assert!((1..=16).contains(&splits) && a_per == 0);
                    continue;
                }
                // Whole tiles of 4 sub-rows per block, every sub-row in exactly one block.
                assert_eq!(a_per % 4, 0, "n={n} rows={rows}");
                assert!(splits * a_per >= m && (splits - 1) * a_per < m, "n={n} rows={rows}: {splits} x {a_per}");
                if rows >= 264 {
                    assert_eq!(splits, 1);
                }
            }
        }
    }
}

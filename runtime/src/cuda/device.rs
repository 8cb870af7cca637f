//! The GPU handle: driver context and stream (cudarc), NVRTC-built modules loaded once, and typed
//! launchers for the W4 kernels.
//!
//! Kernel arguments are raw device addresses (`u64`) so callers can point into rotated buffers;
//! [`W4LinearArgs`] documents what each must point at.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute_enum};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;

use super::{nvrtc, CudaError};

/// Device addresses and sizes of one W4 linear: `Y[M, N] = X[M, K] . W[N, K]^T` + epilogue.
#[derive(Debug, Clone, Copy)]
pub struct W4LinearArgs {
    /// Weights, split-nibble int4, [N, K/8] u32 words.
    pub w: u64,
    /// Per-output-channel scales, f32 [N].
    pub sw: u64,
    /// Activations: split-nibble int4 [M, K/8] u32 (A4) or plain int8 [M, K] (A8).
    pub x: u64,
    /// Per-token scales, f32 [M].
    pub sx: u64,
    /// Bias f32 [N], or 0 for none.
    pub bias: u64,
    /// Residual f16 [M, N], or 0 for none.
    pub residual: u64,
    /// Output f16 [M, N].
    pub y: u64,
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

/// Activation format of a W4 kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActBits {
    A4,
    A8,
}

/// Weight layout a GEMV variant reads (runtime/src/cuda/pack.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemvLayout {
    /// Split-nibble rows [N, K/8] ([`super::pack::pack_int4_split`]).
    Rows,
    /// Tiled [N/8][ceil(K/128)][32][4] ([`super::pack::pack_int4_tiled`]): 512 contiguous bytes per
    /// warp load.
    Tiled,
    /// Tiled, with the `.L2::256B` prefetch hint on the weight loads.
    TiledPrefetch,
    /// Tiled, software-pipelined loop (next batch's loads in flight during this batch's MMAs).
    TiledPipelined,
    /// Tiled, cp.async into a per-warp ring of 4 batches in shared memory.
    TiledAsync,
    /// As [`GemvLayout::TiledPipelined`] with two n8 tiles per warp (activations unpacked once).
    TiledPipelined2,
}

/// A decode GEMV variant (must match an instantiation in kernels/w4_gemv.cu): activation format,
/// warps splitting K, 16-byte weight loads per thread in flight, and weight layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemvVariant {
    pub act: ActBits,
    pub ksplit: u32,
    pub unroll: u32,
    pub layout: GemvLayout,
}

impl GemvVariant {
    pub const ALL: [GemvVariant; 39] = {
        const fn v(act: ActBits, ksplit: u32, unroll: u32, layout: GemvLayout) -> GemvVariant {
            GemvVariant { act, ksplit, unroll, layout }
        }
        use ActBits::{A4, A8};
        use GemvLayout::{
            Rows as R, Tiled as T, TiledAsync as S, TiledPipelined as Q, TiledPipelined2 as Q2, TiledPrefetch as P,
        };
        [
            v(A4, 2, 8, R),
            v(A4, 4, 4, R),
            v(A4, 4, 8, R),
            v(A4, 8, 4, R),
            v(A4, 16, 2, R),
            v(A8, 2, 8, R),
            v(A8, 4, 4, R),
            v(A8, 4, 8, R),
            v(A8, 8, 4, R),
            v(A8, 16, 2, R),
            v(A4, 4, 4, T),
            v(A4, 8, 2, T),
            v(A4, 8, 4, T),
            v(A4, 16, 2, T),
            v(A8, 8, 4, T),
            v(A8, 16, 2, T),
            v(A4, 4, 4, P),
            v(A4, 8, 4, P),
            v(A4, 16, 2, P),
            v(A4, 1, 2, Q),
            v(A4, 1, 4, Q),
            v(A4, 2, 2, Q),
            v(A4, 2, 4, Q),
            v(A4, 4, 2, Q),
            v(A4, 4, 4, Q),
            v(A8, 1, 4, Q),
            v(A8, 2, 2, Q),
            v(A4, 1, 2, S),
            v(A4, 1, 4, S),
            v(A4, 2, 2, S),
            v(A4, 2, 4, S),
            v(A4, 4, 2, S),
            v(A4, 4, 4, S),
            v(A8, 2, 2, S),
            v(A4, 2, 2, Q2),
            v(A4, 2, 4, Q2),
            v(A4, 4, 2, Q2),
            v(A4, 4, 4, Q2),
            v(A4, 8, 2, Q2),
        ]
    };
    pub fn kernel_name(&self) -> String {
        let act = match self.act {
            ActBits::A4 => "w4a4",
            ActBits::A8 => "w4a8",
        };
        let layout = match self.layout {
            GemvLayout::Rows => "gemv",
            GemvLayout::Tiled => "gemvt",
            GemvLayout::TiledPrefetch => "gemvtp",
            GemvLayout::TiledPipelined => "gemvq",
            GemvLayout::TiledAsync => "gemva",
            GemvLayout::TiledPipelined2 => "gemvq2",
        };
        format!("{act}_{layout}_ks{}_u{}", self.ksplit, self.unroll)
    }
    /// u32 words of the weight operand of an [n, k] matrix in this variant's layout.
    pub fn weight_words(&self, n: usize, k: usize) -> usize {
        match self.layout {
            GemvLayout::Rows => n * k / 8,
            GemvLayout::Tiled
            | GemvLayout::TiledPrefetch
            | GemvLayout::TiledPipelined
            | GemvLayout::TiledAsync
            | GemvLayout::TiledPipelined2 => super::pack::tiled_words(n, k),
        }
    }
    /// Dynamic shared memory of a launch (the cp.async ring of the `gemva` kernels: 4 stages).
    pub fn shared_bytes(&self) -> u32 {
        match self.layout {
            GemvLayout::TiledAsync => {
                let pieces = match self.act {
                    ActBits::A4 => 3,
                    ActBits::A8 => 5,
                };
                self.ksplit * 4 * self.unroll * pieces * 512
            }
            _ => 0,
        }
    }
    /// Whether the weights are in the tiled layout.
    pub fn tiled(&self) -> bool {
        self.layout != GemvLayout::Rows
    }
    /// Looks a variant up by kernel name.
    pub fn by_name(name: &str) -> Option<GemvVariant> {
        Self::ALL.into_iter().find(|v| v.kernel_name() == name)
    }
}

/// Stream-K work split of the `QCC_WS2` kernels ([`stream_k_plan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamK {
    /// One CTA per tile.
    Off,
    /// Whole-tile waves, then the last full wave and the partial one shared by one CTA per SM.
    Tail,
    /// Every tile's k tiles shared evenly by one CTA per SM (a persistent grid).
    All,
    /// A persistent grid of one CTA per SM, each taking a contiguous run of whole tiles (no
    /// partial sums; the producer runs on into the next tile during the epilogue).
    Tiles,
}

/// Which prefill GEMM kernel family a [`GemmVariant`] belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmKind {
    /// kernels/w4a4_gemm.cu: mma.sync m16n8k32, cp.async pipeline.
    MmaSync,
    /// kernels/w4a4_wgmma.cu (sm_90a): wgmma m64nNk32 with the activations as the register operand
    /// and the weights unpacked to int8 in shared memory. `deep`: three int8 weight buffers, one
    /// wgmma group kept in flight across the barrier; `swizzle`: that buffer in the 128-byte
    /// swizzle layout (else no swizzle).
    Wgmma { deep: bool, swizzle: bool },
    /// kernels/w4a4_wgmma.cu `QCC_WS` (sm_90a), warp-specialised: a TMA producer thread, an unpack
    /// warpgroup writing int8 weight tiles into a ring of `nb` buffers (`swizzle`: 128-byte swizzle
    /// layout), two consumer warpgroups synchronised by mbarriers only; 384 threads. `epi`: the
    /// epilogue's scales / bias staged in shared memory during the main loop and a guard-free
    /// epilogue for whole tiles (`_e`); `persist`: a persistent 1-D grid of min(tiles, SMs) CTAs
    /// walking the tiles, the producer running into the next tile during the epilogue (`_pe`).
    /// `gw`: the unpack warpgroup reads the int4 weight rows from global memory itself (no TMA copy
    /// of the weights, the ring holds the activations only; `_gw`, same int4 storage).
    Ws { nb: u32, swizzle: bool, epi: bool, persist: bool, gw: bool },
    /// kernels/w4a4_wgmma.cu `QCC_WS2` (sm_90a): the [`GemmKind::Ws`] pipeline with `nb` int8
    /// buffers, the `_e` staging and a coalesced epilogue (weight rows permuted in the int8 tile so
    /// each thread's accumulators are 8 contiguous output columns: 16-byte stores; `_c`). `ga`: the
    /// consumers load the int4 activations from global memory themselves (the TMA ring holds the
    /// weights only; `a`). `sk`: stream-K ([`StreamK`], int32 partials through a workspace,
    /// [`stream_k_plan`]; `k` for [`StreamK::Tail`], `s` for [`StreamK::All`]).
    /// `w0`: one activation register set and `wgmma.wait_group 0` per k tile (`w`; implied by `ga`).
    /// `up`: the unpack warps read the next int4 weight tile before the current one's proxy fence
    /// (`p`). `pr`: the weight rows come permuted at pack time ([`super::pack::permute_rows32`], same
    /// int4 bytes per row, rows padded to a multiple of 32), so the unpack writes each row to its own
    /// B row (`r`).
    Ws2 { nb: u32, ga: bool, sk: StreamK, w0: bool, up: bool, pr: bool },
    /// As [`GemmKind::Ws`] with the weights pre-unpacked to int8 at pack time
    /// ([`super::pack::pack_int8_wgmma`], twice the int4 weight bytes), copied by TMA straight into
    /// the wgmma B operand (no unpack warps). Not the int4-storage kernel: reported separately.
    WsInt8Weights,
}

/// A prefill GEMM tile configuration (must match an instantiation in kernels/w4a4_gemm.cu or
/// kernels/w4a4_wgmma.cu).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmVariant {
    pub bm: u32,
    pub bn: u32,
    pub warps: u32,
    pub stages: u32,
    pub kind: GemmKind,
}

impl GemmVariant {
    pub const ALL: [GemmVariant; 35] = {
        const fn mma(bm: u32, bn: u32, warps: u32, stages: u32) -> GemmVariant {
            GemmVariant { bm, bn, warps, stages, kind: GemmKind::MmaSync }
        }
        const fn wg(bn: u32, stages: u32, deep: bool, swizzle: bool) -> GemmVariant {
            GemmVariant { bm: 128, bn, warps: 8, stages, kind: GemmKind::Wgmma { deep, swizzle } }
        }
        const fn ws(bm: u32, bn: u32, stages: u32, nb: u32, swizzle: bool) -> GemmVariant {
            GemmVariant {
                bm,
                bn,
                warps: 12,
                stages,
                kind: GemmKind::Ws { nb, swizzle, epi: false, persist: false, gw: false },
            }
        }
        const fn ws_epi(bm: u32, bn: u32, stages: u32, nb: u32, persist: bool) -> GemmVariant {
            GemmVariant {
                bm,
                bn,
                warps: 12,
                stages,
                kind: GemmKind::Ws { nb, swizzle: false, epi: true, persist, gw: false },
            }
        }
        const fn ws_gw(bm: u32, bn: u32, stages: u32, nb: u32, persist: bool) -> GemmVariant {
            GemmVariant {
                bm,
                bn,
                warps: 12,
                stages,
                kind: GemmKind::Ws { nb, swizzle: false, epi: true, persist, gw: true },
            }
        }
        const fn ws2(stages: u32, nb: u32, ga: bool, sk: StreamK, w0: bool, up: bool, pr: bool) -> GemmVariant {
            GemmVariant { bm: 256, bn: 128, warps: 12, stages, kind: GemmKind::Ws2 { nb, ga, sk, w0, up, pr } }
        }
        const fn p8(bm: u32, bn: u32, stages: u32) -> GemmVariant {
            GemmVariant { bm, bn, warps: 12, stages, kind: GemmKind::WsInt8Weights }
        }
        [
            mma(128, 128, 8, 4),
            mma(128, 256, 8, 3),
            mma(64, 128, 4, 4),
            mma(64, 256, 8, 4),
            mma(128, 128, 4, 4),
            wg(256, 4, false, false),
            wg(256, 5, true, false),
            wg(256, 5, true, true),
            wg(256, 4, true, false),
            wg(128, 4, false, false),
            wg(128, 4, true, false),
            wg(128, 4, false, true),
            ws(256, 128, 6, 3, false),
            ws(256, 128, 6, 3, true),
            ws(256, 128, 7, 2, false),
            ws(128, 256, 5, 2, false),
            p8(256, 128, 6),
            p8(128, 256, 4),
            ws_epi(256, 128, 6, 3, false),
            ws_epi(256, 128, 6, 3, true),
            ws_epi(256, 128, 6, 4, false),
            ws_gw(256, 128, 6, 3, false),
            ws_gw(256, 128, 8, 4, false),
            ws_gw(256, 128, 8, 5, false),
            ws2(6, 4, false, StreamK::Off, false, false, false),
            ws2(6, 4, false, StreamK::Off, false, true, false),
            ws2(6, 4, false, StreamK::Off, true, false, false),
            ws2(6, 4, false, StreamK::Tail, true, false, false),
            ws2(6, 4, false, StreamK::All, true, false, false),
            ws2(6, 4, false, StreamK::All, true, true, false),
            ws2(6, 4, false, StreamK::Tiles, true, true, false),
            ws2(6, 4, false, StreamK::Off, false, true, true),
            ws2(6, 4, false, StreamK::All, true, true, true),
            ws2(10, 5, true, StreamK::Off, true, false, false),
            ws2(12, 6, true, StreamK::Off, true, false, false),
        ]
    };
    /// Whether the kernel has an `_f32` twin that stores f32 outputs (compiled plans' `int_linear`).
    pub fn has_f32_output(&self) -> bool {
        match self.kind {
            GemmKind::MmaSync => true,
            GemmKind::Ws2 { nb, ga, sk, w0, up, pr } => {
                self.stages == 6 && nb == 4 && !ga && sk == StreamK::Off && !w0 && !up && !pr
            }
            _ => false,
        }
    }

    pub fn kernel_name(&self) -> String {
        match self.kind {
            GemmKind::MmaSync => format!("w4a4_gemm_{}x{}_w{}", self.bm, self.bn, self.warps),
            GemmKind::Wgmma { deep, swizzle } => {
                let deep = if deep { "_d" } else { "" };
                let sw = if swizzle { "_sw" } else { "" };
                format!("w4a4_wgmma_{}x{}_s{}{deep}{sw}", self.bm, self.bn, self.stages)
            }
            GemmKind::Ws { nb, swizzle, epi, persist, gw } => {
                let sw = match (swizzle, gw) {
                    (true, _) => "_sw",
                    (false, true) => "_gw",
                    (false, false) => "",
                };
                let epi = match (epi, persist) {
                    (_, true) => "_pe",
                    (true, false) => "_e",
                    (false, false) => "",
                };
                format!("w4a4_ws_{}x{}_s{}_b{nb}{sw}{epi}", self.bm, self.bn, self.stages)
            }
            GemmKind::Ws2 { nb, ga, sk, w0, up, pr } => {
                let a = if ga { "a" } else { "" };
                let k = match sk {
                    StreamK::Off => "",
                    StreamK::Tail => "k",
                    StreamK::All => "s",
                    StreamK::Tiles => "t",
                };
                let w = if w0 && !ga { "w" } else { "" };
                let p = if up { "p" } else { "" };
                let r = if pr { "r" } else { "" };
                format!("w4a4_ws_{}x{}_s{}_b{nb}_c{a}{k}{w}{p}{r}", self.bm, self.bn, self.stages)
            }
            GemmKind::WsInt8Weights => format!("w4a4p8_ws_{}x{}_s{}", self.bm, self.bn, self.stages),
        }
    }
    /// Whether the weights are the pre-unpacked int8 layout ([`super::pack::pack_int8_wgmma`])
    /// instead of split-nibble int4 rows.
    pub fn int8_weights(&self) -> bool {
        self.kind == GemmKind::WsInt8Weights
    }
    /// Whether the weights are the row-permuted int4 layout ([`super::pack::permute_rows32`]).
    pub fn rows_permuted32(&self) -> bool {
        matches!(self.kind, GemmKind::Ws2 { pr: true, .. })
    }
    /// Bytes of the weight operand of an [n, k] matrix in this variant's layout.
    pub fn weight_bytes(&self, n: usize, k: usize) -> usize {
        if self.rows_permuted32() {
            return n.div_ceil(32) * 32 * k / 2;
        }
        if self.int8_weights() {
            n * super::pack::int8_wgmma_row_bytes(k)
        } else {
            n * k / 2
        }
    }
    /// The kernel file holding this variant.
    pub fn file(&self) -> &'static str {
        match self.kind {
            GemmKind::MmaSync => "w4a4_gemm",
            GemmKind::Wgmma { .. } | GemmKind::Ws { .. } | GemmKind::Ws2 { .. } | GemmKind::WsInt8Weights => {
                "w4a4_wgmma"
            }
        }
    }
    pub fn shared_bytes(&self) -> u32 {
        let ring = self.stages * (self.bm + self.bn) * 64;
        match self.kind {
            GemmKind::MmaSync => ring,
            // The int8 weight buffers: 2 (3 when deep) x BN rows x 128 bytes.
            GemmKind::Wgmma { deep, .. } => ring + if deep { 3 } else { 2 } * self.bn * 128,
            // 1024 bytes of alignment slack, the int4 ring, the int8 ring and the mbarriers (with
            // `epi`: 256 bytes for them, then two warpgroups' sw | bias | sx floats).
            GemmKind::Ws { nb, epi: false, .. } => 1024 + ring + nb * self.bn * 128 + 8 * (2 * self.stages + 2 * nb),
            GemmKind::Ws { nb, epi: true, gw, .. } => {
                // `gw`: the ring holds the activation tiles only.
                let ring = if gw { self.stages * self.bm * 64 } else { ring };
                1024 + ring + nb * self.bn * 128 + 256 + 2 * (2 * self.bn + self.bm / 2) * 4
            }
            GemmKind::Ws2 { nb, ga, .. } => {
                // `ga`: the ring holds the int4 weight tiles only.
                // Two staging buffers per consumer warpgroup.
                let ring = if ga { self.stages * self.bn * 64 } else { ring };
                1024 + ring + nb * self.bn * 128 + 256 + 2 * 2 * (2 * self.bn + self.bm / 2) * 4
            }
            GemmKind::WsInt8Weights => 1024 + self.stages * (self.bm * 64 + self.bn * 128) + 16 * self.stages,
        }
    }
    /// Looks a variant up by kernel name.
    pub fn by_name(name: &str) -> Option<GemmVariant> {
        Self::ALL.into_iter().find(|v| v.kernel_name() == name)
    }
}

/// A TMA tensor map (`CUtensorMap`, 128 bytes), passed to kernels by value (`__grid_constant__`).
#[repr(transparent)]
#[derive(Clone, Copy)]
pub struct TensorMap(cudarc::driver::sys::CUtensorMap);

// SAFETY: a plain 128-byte, 64-byte-aligned value that the kernel reads as `TmaDesc`.
unsafe impl cudarc::driver::DeviceRepr for TensorMap {}

impl TensorMap {
    /// A 2-D byte tensor of `rows` rows of `row_bytes` bytes at device address `addr`, copied in
    /// boxes of `box_bytes` x `box_rows` with swizzle `swizzle`, zero-filled out of bounds.
    pub fn rows(
        addr: u64,
        rows: usize,
        row_bytes: usize,
        box_bytes: u32,
        box_rows: u32,
        swizzle: cudarc::driver::sys::CUtensorMapSwizzle,
    ) -> Result<TensorMap, String> {
        use cudarc::driver::sys;
        if !addr.is_multiple_of(16) || !row_bytes.is_multiple_of(16) {
            return Err(format!("tensor map: address {addr:#x} or row stride {row_bytes} not 16-byte aligned"));
        }
        let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
        let dims: [u64; 2] = [row_bytes as u64, rows as u64];
        let strides: [u64; 1] = [row_bytes as u64];
        let boxes: [u32; 2] = [box_bytes, box_rows];
        let elem: [u32; 2] = [1, 1];
        // SAFETY: every pointer is valid for the rank (2) the call is given; the map is written.
        let r = unsafe {
            sys::cuTensorMapEncodeTiled(
                map.as_mut_ptr(),
                sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8,
                2,
                addr as *mut std::ffi::c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                boxes.as_ptr(),
                elem.as_ptr(),
                sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                swizzle,
                sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(format!("cuTensorMapEncodeTiled({rows} x {row_bytes} B, box {box_bytes} x {box_rows}): {r:?}"));
        }
        // SAFETY: initialised by the successful call.
        Ok(TensorMap(unsafe { map.assume_init() }))
    }
}

/// Checks the shape constraints every W4 kernel relies on.
pub fn check_w4_shape(kernel: &str, m: usize, n: usize, k: usize) -> Result<(), CudaError> {
    let bad = |what: String| Err(CudaError::BadShape { kernel: kernel.to_string(), what });
    if m == 0 || n == 0 || k == 0 {
        return bad(format!("empty shape M={m} N={n} K={k}"));
    }
    if !k.is_multiple_of(32) {
        return bad(format!("K={k} is not a multiple of 32"));
    }
    if !n.is_multiple_of(8) {
        return bad(format!("N={n} is not a multiple of 8"));
    }
    if k > 65_536 {
        return bad(format!("K={k} exceeds 65536 (int32 accumulation of x256-scaled products)"));
    }
    if m > i32::MAX as usize || n > i32::MAX as usize {
        return bad(format!("M={m} or N={n} exceeds i32"));
    }
    Ok(())
}

/// One CUDA device with its default stream and the qcc kernel modules.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    /// Loaded modules and whether their PTX was patched for PDL (super::pdl).
    modules: Mutex<HashMap<String, (Arc<CudaModule>, bool)>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
    /// Handles of the functions from PDL-patched modules ([`Gpu::launcher`] launches them with PDL).
    pdl_functions: Mutex<HashSet<usize>>,
    /// Whether [`Gpu::launcher`] uses PDL now ([`Gpu::set_pdl`]; on by default).
    pdl_on: std::sync::atomic::AtomicBool,
    /// Stream-K workspace of the `QCC_WS2` `sk` kernels: int32 partial tiles, then the flags
    /// (zeroed once; every launch leaves them zero). Allocated at the first such launch.
    stream_k_ws: Mutex<Option<CudaSlice<u8>>>,
}

/// Stream-K split of `tiles` work tiles on `sms` multiprocessors (one CTA each): `(n_dp, g_sk)` =
/// `n_dp` whole-tile CTAs, then `g_sk` CTAs sharing the remaining tiles' k tiles evenly.
/// [`StreamK::Tail`]: whole tiles for every wave but the last full one, no split (`(tiles, 0)`) when
/// there is no full wave or the last wave is at least three quarters full; [`StreamK::All`]:
/// `(0, sms)` once there are at least `sms` tiles ([`StreamK::Tiles`] too, rounding each CTA's range
/// to whole tiles in the kernel). The kernels rely on `g_sk <= tiles - n_dp` (each
/// CTA's range then covers at least a whole tile's k tiles, so a tile is shared by two CTAs at most).
pub fn stream_k_plan(tiles: usize, sms: usize, mode: StreamK) -> (usize, usize) {
    let sms = sms.max(1);
    let (waves, rem) = (tiles / sms, tiles % sms);
    match mode {
        StreamK::All | StreamK::Tiles if waves > 0 => (0, sms),
        StreamK::Tail if waves > 0 && rem > 0 && 4 * rem < 3 * sms => ((waves - 1) * sms, sms),
        _ => (tiles, 0),
    }
}

impl Gpu {
    /// Opens device `ordinal`. Fails with [`CudaError::NoDriver`] (instead of cudarc's panic) when
    /// libcuda cannot be loaded, so callers can skip cleanly.
    pub fn new(ordinal: usize) -> Result<Self, CudaError> {
        // SAFETY: only probes dlopen for libcuda.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(CudaError::NoDriver);
        }
        let count = CudaContext::device_count()?;
        if count <= ordinal as i32 {
            return Err(CudaError::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal)?;
        // One explicit (non-default) stream, so work can be captured into CUDA graphs; with a single
        // stream cudarc's per-buffer event tracking only adds launch overhead, so it is turned off.
        // SAFETY: every buffer of this context is used on `stream` alone.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        Ok(Gpu {
            ctx,
            stream,
            modules: Default::default(),
            functions: Default::default(),
            pdl_functions: Default::default(),
            pdl_on: std::sync::atomic::AtomicBool::new(true),
            stream_k_ws: Default::default(),
        })
    }

    /// Device name, compute capability and memory, for reports.
    pub fn describe(&self) -> String {
        let name = self.ctx.name().unwrap_or_else(|e| format!("<name: {e}>"));
        let cc = self.ctx.compute_capability().map(|(a, b)| format!("sm_{a}{b}")).unwrap_or_default();
        let mem = self.ctx.total_mem().map(|b| b as f64 / (1u64 << 30) as f64).unwrap_or(0.0);
        format!("{name} ({cc}, {mem:.1} GiB)")
    }

    /// Whether the device is an sm_90 (Hopper) GPU: the wgmma kernels (`arch_for`: sm_90a) load there only.
    pub fn is_sm90(&self) -> bool {
        self.ctx.compute_capability().is_ok_and(|cc| cc == (9, 0))
    }

    /// Loads (compiling with NVRTC on first use) kernel file `file` and returns function `kernel`.
    pub fn function(&self, file: &str, kernel: &str) -> Result<CudaFunction, CudaError> {
        let key = format!("{file}::{kernel}");
        if let Some(f) = self.functions.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(f);
        }
        let (module, pdl) = {
            let cached = self.modules.lock().ok().and_then(|m| m.get(file).cloned());
            match cached {
                Some(m) => m,
                None => {
                    // Patched for PDL: the kernels then wait for their predecessor inside and
                    // let the next kernel launch early (super::pdl).
                    let (ptx, pdl) = super::pdl::prepare(nvrtc::compile_ptx(file)?);
                    let m = self.ctx.load_module(Ptx::from_src(ptx))?;
                    if let Ok(mut mods) = self.modules.lock() {
                        mods.insert(file.to_string(), (m.clone(), pdl));
                    }
                    (m, pdl)
                }
            }
        };
        let f = module.load_function(kernel).map_err(|e| CudaError::Launch {
            kernel: kernel.to_string(),
            what: format!("function not found in {file}.cu: {e}"),
        })?;
        if pdl {
            if let Ok(mut set) = self.pdl_functions.lock() {
                set.insert(f.cu_function() as usize);
            }
        }
        if let Ok(mut fs) = self.functions.lock() {
            fs.insert(key, f.clone());
        }
        Ok(f)
    }

    /// A launch of `f` (from [`Gpu::function`]) on this GPU's stream, with PDL when its module was
    /// patched for it.
    pub fn launcher<'a>(&'a self, f: &'a CudaFunction) -> super::pdl::Launcher<'a> {
        let pdl = self.pdl_on.load(std::sync::atomic::Ordering::Relaxed)
            && self.pdl_functions.lock().is_ok_and(|set| set.contains(&(f.cu_function() as usize)));
        super::pdl::Launcher::new(&self.stream, f, pdl)
    }

    /// Whether [`Gpu::launcher`] launches patched kernels with PDL from now on.
    pub fn set_pdl(&self, on: bool) {
        self.pdl_on.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Decode GEMV (1 <= M <= 16).
    pub fn launch_gemv(&self, variant: GemvVariant, a: &W4LinearArgs) -> Result<(), CudaError> {
        self.launch_gemv_to(variant, a, false)
    }

    /// [`Gpu::launch_gemv`]; `f32_out`: the kernel's `_f32` twin, whose `y` is f32 [M, N] (the
    /// pipelined layouts only).
    pub fn launch_gemv_to(&self, variant: GemvVariant, a: &W4LinearArgs, f32_out: bool) -> Result<(), CudaError> {
        let name = variant.kernel_name();
        check_w4_shape(&name, a.m, a.n, a.k)?;
        if a.m > 16 {
            return Err(CudaError::BadShape { kernel: name, what: format!("M={} > 16 (use the GEMM)", a.m) });
        }
        // The pipelined kernels have a twin without the MMA's rows 8..15 for M <= 8.
        let pipelined = matches!(variant.layout, GemvLayout::TiledPipelined | GemvLayout::TiledPipelined2);
        if f32_out && !pipelined {
            return Err(CudaError::BadShape { kernel: name, what: "f32 output needs a pipelined GEMV".into() });
        }
        let entry = if pipelined && a.m <= 8 { format!("{name}_m8") } else { name.clone() };
        let entry = if f32_out { format!("{entry}_f32") } else { entry };
        let f = self.function("w4_gemv", &entry)?;
        let smem = variant.shared_bytes();
        if smem > 0 {
            // Static + dynamic shared memory above 48 KiB needs the opt-in (set whenever used).
            f.set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)?;
        }
        let tiles_per_block = if variant.layout == GemvLayout::TiledPipelined2 { 2 } else { 1 };
        let cfg = LaunchConfig {
            grid_dim: ((a.n / 8).div_ceil(tiles_per_block) as u32, 1, 1),
            block_dim: (variant.ksplit * 32, 1, 1),
            shared_mem_bytes: smem,
        };
        self.launch_linear(&f, &name, cfg, a)
    }

    /// Prefill W4A4 GEMM (any M).
    pub fn launch_gemm(&self, variant: GemmVariant, a: &W4LinearArgs) -> Result<(), CudaError> {
        self.launch_gemm_to(variant, a, false)
    }

    /// [`Gpu::launch_gemm`]; `f32_out`: the kernel's `_f32` twin, whose `y` is f32 [M, N] (mma.sync
    /// kernels only).
    pub fn launch_gemm_to(&self, variant: GemmVariant, a: &W4LinearArgs, f32_out: bool) -> Result<(), CudaError> {
        let name = variant.kernel_name();
        check_w4_shape(&name, a.m, a.n, a.k)?;
        if f32_out && !variant.has_f32_output() {
            return Err(CudaError::BadShape {
                kernel: name,
                what: "f32 output needs an mma.sync GEMM or the ws `_c` GEMM (an `_f32` twin)".into(),
            });
        }
        let entry = if f32_out { format!("{name}_f32") } else { name.clone() };
        let f = self.function(variant.file(), &entry)?;
        let smem = variant.shared_bytes();
        f.set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)?;
        let mut grid_x = a.n.div_ceil(variant.bn as usize) as u32;
        let mut grid_y = a.m.div_ceil(variant.bm as usize) as u32;
        if grid_y > 65_535 {
            return Err(CudaError::BadShape { kernel: name, what: format!("M={} needs > 65535 row tiles", a.m) });
        }
        if matches!(variant.kind, GemmKind::Ws { persist: true, .. }) {
            // Persistent: one CTA per SM at most (1 CTA fits an SM), each walking the tiles.
            let sms = self.ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
            grid_x = (grid_x * grid_y).min(sms.max(1) as u32);
            grid_y = 1;
        }
        let cfg = LaunchConfig {
            grid_dim: (grid_x, grid_y, 1),
            block_dim: (variant.warps * 32, 1, 1),
            shared_mem_bytes: smem,
        };
        if let GemmKind::Ws2 { sk, .. } = variant.kind {
            return self.launch_ws2(&f, &name, variant, cfg, sk, a);
        }
        if matches!(variant.kind, GemmKind::Ws { .. } | GemmKind::WsInt8Weights) {
            return self.launch_ws(&f, &name, variant, cfg, a);
        }
        self.launch_linear(&f, &name, cfg, a)
    }

    /// Launches a `QCC_WS` kernel: tensor maps over the weights and the activations (by value).
    fn launch_ws(
        &self,
        f: &CudaFunction,
        name: &str,
        variant: GemmVariant,
        cfg: LaunchConfig,
        a: &W4LinearArgs,
    ) -> Result<(), CudaError> {
        use cudarc::driver::sys::CUtensorMapSwizzle as Sw;
        let err = |what: String| CudaError::Launch { kernel: name.to_string(), what };
        let (w_row, w_box, w_sw) = if variant.int8_weights() {
            (super::pack::int8_wgmma_row_bytes(a.k), 128, Sw::CU_TENSOR_MAP_SWIZZLE_128B)
        } else {
            (a.k / 2, 64, Sw::CU_TENSOR_MAP_SWIZZLE_64B)
        };
        let tw = TensorMap::rows(a.w, a.n, w_row, w_box, variant.bn, w_sw).map_err(&err)?;
        let tx = TensorMap::rows(a.x, a.m, a.k / 2, 64, variant.bm, Sw::CU_TENSOR_MAP_SWIZZLE_64B).map_err(&err)?;
        let (m, n, k) = (a.m as i32, a.n as i32, a.k as i32);
        let mut builder = self.stream.launch_builder(f);
        builder.arg(&tw).arg(&tx).arg(&a.sw).arg(&a.sx).arg(&a.bias).arg(&a.residual).arg(&a.y);
        builder.arg(&m).arg(&n).arg(&k);
        if matches!(variant.kind, GemmKind::Ws { gw: true, .. }) {
            builder.arg(&a.w);
        }
        // SAFETY: the argument list matches the kernel signature (2 tensor maps by value, 5
        // pointers, 3 ints, and for `gw` the weight pointer); the tensor maps describe the caller's
        // buffers of the documented sizes.
        unsafe { builder.launch(cfg) }.map_err(|e| err(e.to_string()))?;
        Ok(())
    }

    /// Launches a `QCC_WS2` kernel: 1-D grid of `n_dp + g_sk` CTAs ([`stream_k_plan`] for `sk`, else
    /// one per tile), tensor maps as [`Self::launch_ws`], the activation pointer and the stream-K
    /// workspace.
    fn launch_ws2(
        &self,
        f: &CudaFunction,
        name: &str,
        variant: GemmVariant,
        cfg: LaunchConfig,
        sk: StreamK,
        a: &W4LinearArgs,
    ) -> Result<(), CudaError> {
        use cudarc::driver::sys::CUtensorMapSwizzle as Sw;
        let err = |what: String| CudaError::Launch { kernel: name.to_string(), what };
        let tiles = cfg.grid_dim.0 as usize * cfg.grid_dim.1 as usize;
        let sms = self.ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let (n_dp, g_sk) = stream_k_plan(tiles, sms.max(1) as usize, sk);
        let (mut ws, mut flags) = (0u64, 0u64);
        if matches!(sk, StreamK::Tail | StreamK::All) {
            // Sized for one slot per SM (g_sk <= SMs), so it is allocated once, before any graph
            // capture (the bit-exact check launches first).
            let slots = (sms.max(1) as usize).max(g_sk);
            let tile_bytes = (variant.bm * variant.bn * 4) as usize;
            let need = slots * (tile_bytes + 8);
            let mut guard = self.stream_k_ws.lock().map_err(|e| err(format!("workspace lock: {e}")))?;
            if guard.as_ref().is_none_or(|b| b.len() < need) {
                *guard = Some(self.stream.alloc_zeros::<u8>(need)?);
            }
            let buf = guard.as_ref().expect("allocated above");
            ws = buf.device_ptr(&self.stream).0;
            flags = ws + (slots * tile_bytes) as u64;
        }
        // `pr`: the weight rows are padded to a multiple of 32.
        let w_rows = if variant.rows_permuted32() { a.n.div_ceil(32) * 32 } else { a.n };
        let tw = TensorMap::rows(a.w, w_rows, a.k / 2, 64, variant.bn, Sw::CU_TENSOR_MAP_SWIZZLE_64B).map_err(&err)?;
        let tx = TensorMap::rows(a.x, a.m, a.k / 2, 64, variant.bm, Sw::CU_TENSOR_MAP_SWIZZLE_64B).map_err(&err)?;
        let (m, n, k) = (a.m as i32, a.n as i32, a.k as i32);
        let (n_dp_i, g_sk_i) = (n_dp as i32, g_sk as i32);
        let cfg = LaunchConfig { grid_dim: ((n_dp + g_sk) as u32, 1, 1), ..cfg };
        let mut builder = self.stream.launch_builder(f);
        builder.arg(&tw).arg(&tx).arg(&a.sw).arg(&a.sx).arg(&a.bias).arg(&a.residual).arg(&a.y);
        builder.arg(&m).arg(&n).arg(&k).arg(&a.x).arg(&n_dp_i).arg(&g_sk_i).arg(&ws).arg(&flags);
        // SAFETY: the argument list matches the `QCC_WS2` signature (2 tensor maps by value, 5
        // pointers, 3 ints, the activation pointer, 2 ints, 2 workspace pointers); the tensor maps
        // and pointers describe the caller's buffers of the documented sizes and the workspace
        // holds `slots >= g_sk` partial tiles and flags.
        unsafe { builder.launch(cfg) }.map_err(|e| err(e.to_string()))?;
        Ok(())
    }

    fn launch_linear(
        &self,
        f: &CudaFunction,
        name: &str,
        cfg: LaunchConfig,
        a: &W4LinearArgs,
    ) -> Result<(), CudaError> {
        let (m, n, k) = (a.m as i32, a.n as i32, a.k as i32);
        let mut builder = self.stream.launch_builder(f);
        builder.arg(&a.w).arg(&a.sw).arg(&a.x).arg(&a.sx).arg(&a.bias).arg(&a.residual).arg(&a.y);
        builder.arg(&m).arg(&n).arg(&k);
        // SAFETY: the argument list matches the kernel signature (7 pointers, 3 ints); the caller
        // guarantees the addresses point at buffers of the documented sizes.
        unsafe { builder.launch(cfg) }
            .map_err(|e| CudaError::Launch { kernel: name.to_string(), what: e.to_string() })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{stream_k_plan, GemmKind, GemmVariant, StreamK};

    #[test]
    fn stream_k_plan_splits_only_a_thin_last_wave() {
        // Llama-2-7B gate/up at M = 2048 with 256 x 128 tiles: 688 tiles on 132 SMs = 5 full waves
        // + 28: four whole-tile waves, then 132 CTAs share the last 160 tiles.
        let tail = StreamK::Tail;
        assert_eq!(stream_k_plan(688, 132, tail), (528, 132));
        // 256 tiles = 1 wave + 124 (94% full): no split; 264 = exactly 2 waves; 100 < one wave.
        assert_eq!(stream_k_plan(256, 132, tail), (256, 0));
        assert_eq!(stream_k_plan(264, 132, tail), (264, 0));
        assert_eq!(stream_k_plan(100, 132, tail), (100, 0));
        // The check case (M 300, N 9080: 2 x 71 tiles): no whole-tile wave, all 142 tiles shared.
        assert_eq!(stream_k_plan(142, 132, tail), (0, 132));
        // All: a persistent grid of one CTA per SM once there is a full wave.
        assert_eq!(stream_k_plan(256, 132, StreamK::All), (0, 132));
        assert_eq!(stream_k_plan(100, 132, StreamK::All), (100, 0));
        assert_eq!(stream_k_plan(688, 132, StreamK::Off), (688, 0));
        assert_eq!(stream_k_plan(688, 132, StreamK::Tiles), (0, 132));
        // The kernels need g_sk <= remaining tiles (each CTA covers >= one tile's k tiles).
        for mode in [StreamK::Off, StreamK::Tail, StreamK::All, StreamK::Tiles] {
            for tiles in 1..2000 {
                let (n_dp, g_sk) = stream_k_plan(tiles, 132, mode);
                assert!(n_dp <= tiles && g_sk <= tiles - n_dp, "tiles {tiles}: ({n_dp}, {g_sk})");
                assert!(g_sk > 0 || n_dp == tiles);
            }
        }
    }

    #[test]
    fn gemm_variant_names_are_unique_and_ws_shared_memory_fits_hopper() {
        let names: Vec<String> = GemmVariant::ALL.iter().map(|v| v.kernel_name()).collect();
        for (i, n) in names.iter().enumerate() {
            assert!(!names[i + 1..].contains(n), "duplicate kernel name {n}");
            assert_eq!(GemmVariant::by_name(n), Some(GemmVariant::ALL[i]));
        }
        // Hopper's opt-in maximum of dynamic shared memory per block: 227 KiB.
        for v in GemmVariant::ALL.iter().filter(|v| matches!(v.kind, GemmKind::Ws { .. })) {
            assert!(v.shared_bytes() <= 227 * 1024, "{}: {} bytes", v.kernel_name(), v.shared_bytes());
        }
        for v in GemmVariant::ALL.iter().filter(|v| matches!(v.kind, GemmKind::Ws2 { .. })) {
            assert!(v.shared_bytes() <= 227 * 1024, "{}: {} bytes", v.kernel_name(), v.shared_bytes());
        }
        let ga = GemmVariant::by_name("w4a4_ws_256x128_s10_b5_ca").expect("ws2 ga variant");
        assert_eq!(ga.kind, GemmKind::Ws2 { nb: 5, ga: true, sk: StreamK::Off, w0: true, up: false, pr: false });
        let sk = GemmVariant::by_name("w4a4_ws_256x128_s6_b4_ckw").expect("ws2 stream-K variant");
        assert_eq!(sk.kind, GemmKind::Ws2 { nb: 4, ga: false, sk: StreamK::Tail, w0: true, up: false, pr: false });
        let all = GemmVariant::by_name("w4a4_ws_256x128_s6_b4_csw").expect("ws2 all-stream-K variant");
        assert_eq!(all.kind, GemmKind::Ws2 { nb: 4, ga: false, sk: StreamK::All, w0: true, up: false, pr: false });
        // `ga`: the ring holds the int4 weight tiles only (10 x 128 x 64 bytes).
        assert_eq!(ga.shared_bytes(), 1024 + 10 * 128 * 64 + 5 * 128 * 128 + 256 + 2 * 2 * (2 * 128 + 128) * 4);
        let gw = GemmVariant::by_name("w4a4_ws_256x128_s8_b4_gw_e").expect("gw variant");
        let tma = GemmVariant::by_name("w4a4_ws_256x128_s6_b4_e").expect("b4 variant");
        // `gw`: the ring holds the activation tiles only (8 x 256 x 64 bytes), no int4 weight tiles.
        assert_eq!(gw.shared_bytes(), 1024 + 8 * 256 * 64 + 4 * 128 * 128 + 256 + 2 * (2 * 128 + 128) * 4);
        assert_eq!(tma.shared_bytes(), 1024 + 6 * (256 + 128) * 64 + 4 * 128 * 128 + 256 + 2 * (2 * 128 + 128) * 4);
        assert!(!gw.int8_weights() && gw.weight_bytes(4096, 4096) == 4096 * 2048);
    }
}

//! Correctness checks of the W4 kernels on the GPU against the exact CPU reference
//! ([`super::pack::reference_w4_linear`]): random (never zero) data, output poisoned with NaN before
//! each launch, and every output bit compared. Used by the `cuda_kernels` test and `qcc-run check`.

use half::f16;

use super::device::{ActBits, GemmKind, GemmVariant, GemvVariant, Gpu, StreamK, W4LinearArgs};
use super::pack::{
    pack_int4_split, pack_int4_tiled, pack_int8_wgmma, permute_rows32, reference_w4_linear, Epilogue, SplitMix64,
};
use super::CudaError;
use cudarc::driver::DevicePtr;

/// Which kernel a check runs.
#[derive(Debug, Clone, Copy)]
pub enum KernelChoice {
    Gemv(GemvVariant),
    Gemm(GemmVariant),
}

impl KernelChoice {
    pub fn name(&self) -> String {
        match self {
            KernelChoice::Gemv(v) => v.kernel_name(),
            KernelChoice::Gemm(v) => v.kernel_name(),
        }
    }
    fn act(&self) -> ActBits {
        match self {
            KernelChoice::Gemv(v) => v.act,
            KernelChoice::Gemm(_) => ActBits::A4,
        }
    }
}

/// How the integer inputs are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Values {
    /// Uniform over the full int4 / int8 range.
    Random,
    /// Every value at the negative extreme (-8 / -128): the largest possible |sum|.
    Extreme,
}

/// One check case.
#[derive(Debug, Clone, Copy)]
pub struct CheckCase {
    pub kernel: KernelChoice,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub bias: bool,
    pub residual: bool,
    pub values: Values,
    pub seed: u64,
}

/// Result of one check: exact match or the first mismatches.
#[derive(Debug, Clone)]
pub struct CheckReport {
    pub case: CheckCase,
    pub mismatches: usize,
    pub first: Vec<String>,
}

impl std::fmt::Display for CheckReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.case;
        write!(
            f,
            "{:<18} M={:<5} N={:<5} K={:<5} bias={} res={} {:?}: ",
            c.kernel.name(),
            c.m,
            c.n,
            c.k,
            c.bias as u8,
            c.residual as u8,
            c.values
        )?;
        if self.mismatches == 0 {
            write!(f, "bit-exact ({} outputs)", c.m * c.n)
        } else {
            write!(f, "{} of {} outputs differ; first: {}", self.mismatches, c.m * c.n, self.first.join("; "))
        }
    }
}

/// Runs one case on `gpu`.
pub fn run_case(gpu: &Gpu, case: CheckCase) -> Result<CheckReport, CudaError> {
    let CheckCase { m, n, k, .. } = case;
    let mut rng = SplitMix64(case.seed);
    let act = case.kernel.act();
    let (xlo, xhi) = match act {
        ActBits::A4 => (-8, 7),
        ActBits::A8 => (-128, 127),
    };
    let (x, w) = match case.values {
        Values::Random => (rng.i8_vec(m * k, xlo, xhi), rng.i8_vec(n * k, -8, 7)),
        Values::Extreme => (vec![xlo; m * k], vec![-8; n * k]),
    };
    // Scales small enough that extreme sums stay finite in f16.
    let scale_hi = if case.values == Values::Extreme { 1e-4 } else { 0.05 };
    let sx = rng.f32_vec(m, scale_hi * 0.1, scale_hi);
    let sw = rng.f32_vec(n, scale_hi * 0.1, scale_hi);
    let bias = case.bias.then(|| rng.f32_vec(n, -2.0, 2.0));
    let residual: Option<Vec<f16>> =
        case.residual.then(|| rng.f32_vec(m * n, -4.0, 4.0).into_iter().map(f16::from_f32).collect());
    let ep = Epilogue { sx: &sx, sw: &sw, bias: bias.as_deref(), residual: residual.as_deref() };
    let want = reference_w4_linear(&x, &w, m, n, k, &ep);

    let bad_shape = |what: &str| CudaError::BadShape { kernel: case.kernel.name(), what: what.to_string() };
    let mut w_packed = pack_int4_split(&w, n, k).ok_or_else(|| bad_shape("weights do not pack"))?;
    if let KernelChoice::Gemv(v) = case.kernel {
        if v.tiled() {
            w_packed = pack_int4_tiled(&w_packed, n, k).ok_or_else(|| bad_shape("weights do not tile"))?;
        }
    }
    let w_bytes: Vec<u8> = match case.kernel {
        KernelChoice::Gemm(v) if v.int8_weights() => {
            pack_int8_wgmma(&w_packed, n, k).ok_or_else(|| bad_shape("weights do not pack to int8"))?
        }
        KernelChoice::Gemm(v) if v.rows_permuted32() => {
            let rows = permute_rows32(&w_packed, n, k).ok_or_else(|| bad_shape("weights do not permute"))?;
            bytemuck::cast_slice::<u32, u8>(&rows).to_vec()
        }
        _ => bytemuck::cast_slice::<u32, u8>(&w_packed).to_vec(),
    };
    let stream = &gpu.stream;
    let d_w = stream.clone_htod(&w_bytes)?;
    let d_x = match act {
        ActBits::A4 => {
            let xp = pack_int4_split(&x, m, k).ok_or_else(|| bad_shape("activations do not pack"))?;
            stream.clone_htod(bytemuck::cast_slice::<u32, u8>(&xp))?
        }
        ActBits::A8 => stream.clone_htod(bytemuck::cast_slice::<i8, u8>(&x))?,
    };
    let d_sw = stream.clone_htod(&sw)?;
    let d_sx = stream.clone_htod(&sx)?;
    let d_bias = bias.as_ref().map(|b| stream.clone_htod(b)).transpose()?;
    let res_bits: Option<Vec<u16>> = residual.as_ref().map(|r| r.iter().map(|v| v.to_bits()).collect());
    let d_res = res_bits.as_ref().map(|r| stream.clone_htod(r)).transpose()?;
    // Poison: 0xFFFF is an f16 NaN, so an unwritten output can never match.
    let d_y = stream.clone_htod(&vec![0xFFFFu16; m * n])?;

    let args = W4LinearArgs {
        w: d_w.device_ptr(stream).0,
        sw: d_sw.device_ptr(stream).0,
        x: d_x.device_ptr(stream).0,
        sx: d_sx.device_ptr(stream).0,
        bias: d_bias.as_ref().map_or(0, |b| b.device_ptr(stream).0),
        residual: d_res.as_ref().map_or(0, |r| r.device_ptr(stream).0),
        y: d_y.device_ptr(stream).0,
        m,
        n,
        k,
    };
    match case.kernel {
        KernelChoice::Gemv(v) => gpu.launch_gemv(v, &args)?,
        KernelChoice::Gemm(v) => gpu.launch_gemm(v, &args)?,
    }
    let got: Vec<u16> = stream.clone_dtoh(&d_y)?;
    stream.synchronize()?;

    let mut mismatches = 0;
    let mut first = Vec::new();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        if *g != w.to_bits() {
            mismatches += 1;
            if first.len() < 4 {
                first.push(format!("y[{}, {}] = {} want {}", i / n, i % n, f16::from_bits(*g), w));
            }
        }
    }
    Ok(CheckReport { case, mismatches, first })
}

/// The standard case list: every kernel variant at odd and real shapes, tails in M, N and K
/// (K = 576 is not a multiple of 128), bias / residual on and off, and extreme values.
pub fn standard_cases() -> Vec<CheckCase> {
    let mut cases = Vec::new();
    let mut seed = 1u64;
    let mut push = |kernel, m, n, k, bias, residual, values| {
        seed += 1;
        cases.push(CheckCase { kernel, m, n, k, bias, residual, values, seed });
    };
    for v in GemvVariant::ALL {
        let kc = KernelChoice::Gemv(v);
        for &(m, n, k) in &[(1, 64, 576), (3, 192, 4096), (8, 40, 1536), (9, 576, 576), (16, 256, 11008), (16, 8, 32)] {
            push(kc, m, n, k, false, false, Values::Random);
        }
        push(kc, 5, 128, 576, true, true, Values::Random);
        push(kc, 16, 64, 11008, false, false, Values::Extreme);
    }
    for v in GemmVariant::ALL {
        let kc = KernelChoice::Gemm(v);
        for &(m, n, k) in &[(1, 64, 576), (77, 192, 576), (128, 256, 4096), (300, 584, 1536), (256, 512, 160)] {
            push(kc, m, n, k, false, false, Values::Random);
        }
        push(kc, 130, 136, 576, true, true, Values::Random);
        push(kc, 64, 128, 11008, false, false, Values::Extreme);
        // Whole 256 x 128 tiles next to N / M tails, with bias and residual (the `_e` epilogue's
        // guard-free path).
        push(kc, 300, 264, 1056, true, true, Values::Random);
        if matches!(v.kind, GemmKind::Ws { persist: true, .. }) {
            // More tiles (3 x 130) than SMs: each persistent CTA walks 2-3 tiles.
            push(kc, 520, 16520, 288, true, true, Values::Random);
        }
        if matches!(v.kind, GemmKind::Ws2 { sk: StreamK::Tail | StreamK::All | StreamK::Tiles, .. }) {
            // Stream-K on a 132-SM H200 (device::stream_k_plan): 2 x 71 tiles, all shared by 132 CTAs
            // (9 k tiles with a K tail, M and N tails); 2 x 142 tiles = 2 waves + 20: Tail, one
            // whole-tile wave, then 152 tiles of 3 k tiles shared by 132 CTAs; All, 284 tiles shared
            // (up to 3 pieces per CTA); Tiles, 1-3 whole tiles per persistent CTA.
            push(kc, 300, 9080, 1056, true, true, Values::Random);
            push(kc, 512, 18168, 288, true, true, Values::Random);
        }
    }
    cases
}

/// Runs [`standard_cases`]; returns the reports (all bit-exact on success).
pub fn run_standard(gpu: &Gpu) -> Result<Vec<CheckReport>, CudaError> {
    standard_cases().into_iter().map(|c| run_case(gpu, c)).collect()
}

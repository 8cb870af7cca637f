//! The CUDA side of the runtime: W4 kernels (runtime/kernels/*.cu) compiled by NVRTC at load,
//! launched through cudarc, checked against an exact CPU reference and timed against cuBLAS fp16.
//!
//! [`pack`] (data layout and CPU reference) is always built; everything that touches CUDA is behind
//! the `cuda` cargo feature and loads libcuda / libnvrtc / libcublas dynamically, so a build with the
//! feature still runs (and skips GPU work with a reason) on machines without them.

pub mod pack;

#[cfg(feature = "cuda")]
pub mod bench;
#[cfg(feature = "cuda")]
pub mod check;
#[cfg(feature = "cuda")]
pub mod device;
#[cfg(feature = "cuda")]
pub mod executor;
#[cfg(feature = "cuda")]
pub mod fast_attention;
#[cfg(feature = "cuda")]
pub mod fast_linear;
#[cfg(feature = "cuda")]
pub mod lm;
#[cfg(feature = "cuda")]
pub mod nvrtc;
#[cfg(feature = "cuda")]
pub mod pdl;

#[cfg(feature = "cuda")]
pub use device::{ActBits, GemmKind, GemmVariant, GemvVariant, Gpu, W4LinearArgs};
#[cfg(feature = "cuda")]
pub use executor::{CudaExecutor, ExecutorError};
#[cfg(feature = "cuda")]
pub use lm::{CudaKvDecoder, CudaLm};

/// Errors of the CUDA runtime.
#[cfg(feature = "cuda")]
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("no CUDA driver: libcuda could not be loaded")]
    NoDriver,
    #[error("CUDA device {ordinal} requested but only {count} present")]
    NoDevice { ordinal: usize, count: i32 },
    #[error("libnvrtc.so.13 not found (set QCC_CUDA_LIB_DIR or run scripts/fixtures.sh)")]
    NvrtcMissing,
    #[error("no kernel source named {0:?}")]
    UnknownKernel(String),
    #[error("NVRTC failed to compile {kernel}.cu:\n{log}")]
    Compile { kernel: String, log: String },
    #[error("kernel {kernel}: {what}")]
    BadShape { kernel: String, what: String },
    #[error("launching {kernel}: {what}")]
    Launch { kernel: String, what: String },
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("cuBLAS: {0}")]
    Cublas(#[from] cudarc::cublas::result::CublasError),
    #[error("check failed: {0}")]
    Mismatch(String),
}

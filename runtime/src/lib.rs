//! qcc runtime: the CPU reference executor (and, later, the CUDA executor and artifact loader).
//!
//! [`CpuExecutor`] runs any qcc IR [`qcc_ir::Graph`] with ONNX semantics on [`RtTensor`]s:
//!
//! ```ignore
//! let exec = CpuExecutor::new(&graph)?;
//! let outputs = exec.run(&[("x", RtTensor::from_vec(&[2, 3], vec![0f32; 6]).unwrap())])?;
//! ```

/// Compiled artifacts: manifest types and the checked loader (no CUDA needed).
pub mod artifact;
pub mod cpu;
/// GPU kernels (feature `cuda`) and their host-side layout / reference (always built).
pub mod cuda;
/// Logits of one sequence: log-probabilities, argmax, next-token NLL.
pub mod logits;

pub use cpu::value::{RtTensor, Scalar};
pub use cpu::{CpuExecutor, ExecError};
pub use logits::Logits;

//! qcc compiler library: ONNX import, pipelines and the CLI.

pub mod calibrate;
pub mod cli;
pub mod eval;
pub mod gguf;
pub mod lower;
pub mod mlir;
pub mod model;
pub mod npy;
pub mod onnx;
pub mod report;
pub mod tokenizer;

//! qcc compiler library: ONNX import, pipelines and the CLI.

pub mod onnx;

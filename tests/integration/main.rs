//! The integration test binary: one module per area.
mod tokenizer;
mod onnx_import;
mod conformance;
mod passes;
mod filetests;

//! The integration test binary: one module per area.
mod conformance;
mod equivalence;
mod filetests;
mod lower;
mod onnx_import;
mod passes;
mod quantize;
mod smollm2;
mod tokenizer;

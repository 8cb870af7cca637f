//! ONNX import: a model file (or in-memory bytes) -> [`qcc_ir::Graph`] plus model metadata.
//!
//! The file is memory-mapped and decoded with our own prost messages ([`proto`]) so that initializer bytes,
//! inline (`raw_data`) or external, are never copied: constants in the graph are views into the mappings,
//! which the `Bytes` keep alive. Nodes are converted through a registry of op families ([`ops`]) that
//! normalises every supported opset to one IR form. Unsupported ops are collected and reported together.

pub mod build;
mod convert;
pub mod ops;
pub mod proto;
mod tensor;

pub use tensor::{dtype_from_onnx, dtype_to_onnx};

use bytes::Bytes;
use prost::Message;
use qcc_ir::Graph;
use std::fmt;
use std::path::{Path, PathBuf};

/// A converted model.
#[derive(Debug)]
pub struct ImportedModel {
    pub graph: Graph,
    pub ir_version: i64,
    /// `(domain, version)` as listed in the model; the ONNX domain is spelled "" or "ai.onnx".
    pub opset_imports: Vec<(String, i64)>,
    pub producer_name: String,
    pub producer_version: String,
    pub model_version: i64,
    pub metadata_props: Vec<(String, String)>,
    /// The file the model was read from (`None` for in-memory models).
    pub source: Option<PathBuf>,
}

impl ImportedModel {
    /// The opset version of the default ONNX domain.
    pub fn onnx_opset(&self) -> i64 {
        convert::Opsets::new(&self.opset_imports).onnx
    }
}

/// One node the importer cannot convert.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnsupportedNode {
    pub node: String,
    pub op_type: String,
    pub domain: String,
    pub opset: i64,
    pub reason: String,
}

impl fmt::Display for UnsupportedNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let domain = if self.domain.is_empty() { "ai.onnx" } else { &self.domain };
        write!(f, "node '{}': {} (domain {domain}, opset {}): {}", self.node, self.op_type, self.opset, self.reason)
    }
}

fn list_unsupported(nodes: &[UnsupportedNode]) -> String {
    nodes.iter().map(|n| format!("\n  {n}")).collect()
}

/// Why a model could not be imported. Every message starts with the model's path (`<memory>` for bytes).
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path}: cannot read the model file: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid ONNX model (protobuf decoding failed: {source}); is the file truncated or not ONNX?")]
    Decode {
        path: String,
        #[source]
        source: prost::DecodeError,
    },
    #[error("{path}: {message}")]
    InvalidModel { path: String, message: String },
    /// `tensor` says which tensor: "initializer 'w'", "attribute 'value' of node 'c'".
    #[error("{path}: {tensor} {message}")]
    InvalidTensor { path: String, tensor: String, message: String },
    #[error("{path}: {tensor} has element type {dtype_name} (ONNX data type {dtype}), which qcc does not support")]
    UnsupportedDType { path: String, tensor: String, dtype: i32, dtype_name: &'static str },
    #[error("{path}: graph input '{value}' is a sequence, optional or map; qcc supports tensor values only")]
    UnsupportedValueType { path: String, value: String },
    #[error(
        "{path}: node '{node}' ({op_type}) reads '{input}', which is not a graph input, an initializer or the output of any node"
    )]
    DanglingInput { path: String, node: String, op_type: String, input: String },
    #[error("{path}: the graph has a cycle through node '{node}' ({op_type})")]
    Cycle { path: String, node: String, op_type: String },
    #[error("{path}: node '{node}' ({op_type}): {message}")]
    InvalidNode { path: String, node: String, op_type: String, message: String },
    #[error("{path}: type inference failed: {source}")]
    TypeInference {
        path: String,
        #[source]
        source: qcc_ir::infer::InferError,
    },
    #[error("{path}: {} unsupported node(s):{}", nodes.len(), list_unsupported(nodes))]
    UnsupportedOps { path: String, nodes: Vec<UnsupportedNode> },
}

impl ImportError {
    /// The model path (or `<memory>`) the error is about.
    pub fn path(&self) -> &str {
        match self {
            ImportError::Io { path, .. }
            | ImportError::Decode { path, .. }
            | ImportError::InvalidModel { path, .. }
            | ImportError::InvalidTensor { path, .. }
            | ImportError::UnsupportedDType { path, .. }
            | ImportError::UnsupportedValueType { path, .. }
            | ImportError::DanglingInput { path, .. }
            | ImportError::Cycle { path, .. }
            | ImportError::InvalidNode { path, .. }
            | ImportError::TypeInference { path, .. }
            | ImportError::UnsupportedOps { path, .. } => path,
        }
    }
}

const MEMORY: &str = "<memory>";

/// Imports an ONNX model file. External data is resolved relative to the file's folder.
///
/// The file and its external data files are memory-mapped and the graph's constants point into them, so
/// they must not be truncated or rewritten while the returned model is alive.
pub fn import_model(path: impl AsRef<Path>) -> Result<ImportedModel, ImportError> {
    let path = path.as_ref();
    let shown = path.display().to_string();
    let bytes = tensor::map_file(path).map_err(|source| ImportError::Io { path: shown.clone(), source })?;
    let model = decode(bytes, &shown)?;
    let base_dir =
        path.parent().map(|p| if p.as_os_str().is_empty() { Path::new(".") } else { p }).map(Path::to_path_buf);
    convert::convert_model(model, &shown, base_dir, Some(path.to_path_buf()))
}

/// Imports a model held in memory. `external_data_dir` resolves external data; with `None`, a model that
/// uses external data is an error. Initializers are views into `bytes`.
pub fn import_bytes(bytes: Bytes, external_data_dir: Option<&Path>) -> Result<ImportedModel, ImportError> {
    let model = decode(bytes, MEMORY)?;
    convert::convert_model(model, MEMORY, external_data_dir.map(Path::to_path_buf), None)
}

/// Decodes one serialized `TensorProto` (the `.pb` files of ONNX test data) into a tensor; `raw_data` stays
/// a view into `bytes`. External data is not allowed here.
pub fn decode_tensor(bytes: Bytes) -> Result<qcc_ir::Tensor, ImportError> {
    let proto =
        proto::TensorProto::decode(bytes).map_err(|source| ImportError::Decode { path: MEMORY.into(), source })?;
    let what = format!("tensor '{}'", proto.name);
    tensor::load_tensor(&proto, &mut tensor::ExternalData::new(None)).map_err(|p| p.at(MEMORY.into(), what))
}

/// Decodes the protobuf only (no conversion). Byte fields are views into `bytes`.
pub fn load_from_bytes(bytes: Bytes) -> Result<proto::ModelProto, ImportError> {
    decode(bytes, MEMORY)
}

fn decode(bytes: Bytes, path: &str) -> Result<proto::ModelProto, ImportError> {
    // Decoding from `Bytes` (not `&[u8]`) is what makes `bytes` fields zero-copy slices.
    proto::ModelProto::decode(bytes).map_err(|source| ImportError::Decode { path: path.to_string(), source })
}

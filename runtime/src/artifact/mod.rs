//! Compiled artifacts (`model.qcc` directories): the manifest the compiler writes and the runtime
//! follows. Needs no CUDA; the CUDA executor (`crate::cuda`, feature `cuda`) consumes it.

pub mod compare;
pub mod manifest;
pub mod npy;

pub use manifest::{
    artifact_path, file_sha256, sha256_hex, Arg, Buffer, DimExpr, FileRef, HostPrologue, Io, Launch, Manifest,
    ManifestError, Module, ModuleKind, Place, Symbol, SymbolValues, FORMAT_VERSION, MANIFEST_FILE,
};

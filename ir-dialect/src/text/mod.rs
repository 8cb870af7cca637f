//! The `.qir` text format: an MLIR-flavoured, line-per-node canonical form of a [`Graph`].
//!
//! ```text
//! graph @smollm2(%input_ids: i64[batch,seq]) -> (%logits) {
//!   %embed = constant {value = dense<f32[49152,576], digest "3fa2c1d09b8e7a61">} : f32[49152,576]
//!   %eps = constant {value = dense<f32[] [1e-5]>} : f32[]
//!   %0 = gather(%embed, %input_ids) {axis = 0} : f32[batch,seq,576]
//!   %q, %k = split(%x, _) {axis = -1} : f32[batch,seq,64], f32[batch,seq,64]
//!   return %v
//! }
//! ```
//!
//! - The header lists graph inputs with their types and the graph outputs' names; `return` gives the
//!   values of those outputs in the same order (so an output may be named differently from its value).
//! - One line per node in [`Graph::topo_order`]: outputs, op, input slots (`_` for an absent optional
//!   input; no parentheses for ops without input slots), attributes sorted by name, output types, and a
//!   `loc("name")` suffix when the node's name differs from its first output's.
//! - Names are bare when made of `[A-Za-z0-9_.$/-]` and interior `:`, quoted otherwise.
//! - Types: `f32[batch,seq,576]` (known, symbolic and `?` unknown dims), `f32[]` scalar, `f32[*]` unranked.
//! - Attributes: `1`, `1.0`/`1e-5`/`inf`/`nan` (a float always shows `.`, `e` or a keyword), `"str"`,
//!   `[1, 2]`, `[1.0]`, `["a"]`, typed empty lists `ints[]`/`floats[]`/`strs[]`, dtypes `i8`, and tensors
//!   `dense<f32[2] [1.0, 2.0]>`, `dense<f32[2,3], digest "..">` (elided) or `dense_resource<f32[2,3], "key">`.
//!   Floats use Rust's shortest round-trip form, so every finite f32/f64/f16/bf16/f8 value survives
//!   exactly; non-canonical NaNs in tensors print as raw bits (`0x7fc00001`). `//` starts a comment.
//!
//! `print(parse(s)) == s` for every printed graph.

mod lexer;
mod parser;
mod printer;

use crate::{DType, Graph, Tensor, TensorData};
use bytes::Bytes;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

pub use parser::Resolver;
pub use printer::{f32_text, quote, type_text};

/// How constants' values are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConstantMode {
    /// Tensors up to `max_inline_elements` print their values, larger ones only dtype, shape and digest
    /// (parsing those gives [`TensorData::Elided`]).
    Elide { max_inline_elements: usize },
    /// Every value is printed.
    Inline,
    /// Tensors larger than `max_inline_elements` go to a side-car weights file, referenced by key.
    External { max_inline_elements: usize },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrintOptions {
    pub constants: ConstantMode,
}

impl Default for PrintOptions {
    fn default() -> PrintOptions {
        PrintOptions { constants: ConstantMode::Elide { max_inline_elements: 16 } }
    }
}

/// Printed text plus, in [`ConstantMode::External`], the tensors it refers to by key.
#[derive(Clone, Debug)]
pub struct Printed {
    pub text: String,
    pub resources: Vec<(String, Tensor)>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{line}:{col}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub col: usize,
    pub message: String,
}

/// Prints with the default options (small constants inline, large ones elided).
pub fn print(graph: &Graph) -> String {
    printer::print(graph, &PrintOptions::default()).text
}

pub fn print_with(graph: &Graph, options: &PrintOptions) -> Printed {
    printer::print(graph, options)
}

/// Parses a graph; `dense_resource` constants are errors (use [`parse_with_resources`] or [`load`]).
pub fn parse(text: &str) -> Result<Graph, ParseError> {
    parser::parse(text, &mut |_| None)
}

/// Parses a graph, asking `resolve` for the bytes of each `dense_resource` key.
pub fn parse_with_resources(text: &str, resolve: &mut Resolver<'_>) -> Result<Graph, ParseError> {
    parser::parse(text, resolve)
}

#[derive(Debug, thiserror::Error)]
pub enum TextIoError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}:{source}")]
    Parse { path: PathBuf, source: ParseError },
    #[error("{path}: {message}")]
    Weights { path: PathBuf, message: String },
}

/// Side-car weights file of a `.qir` file: `x.qir` -> `x.qir.safetensors`.
pub fn weights_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".safetensors");
    PathBuf::from(p)
}

/// Writes `path` (text) and its side-car `path.safetensors` (tensors over 16 elements). Each file is
/// written to a temporary in the same directory and renamed into place, weights first.
pub fn save(path: &Path, graph: &Graph) -> Result<(), TextIoError> {
    let printed =
        printer::print(graph, &PrintOptions { constants: ConstantMode::External { max_inline_elements: 16 } });
    let weights = weights_path(path);
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| TextIoError::Io { path: p, source }
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut views = Vec::with_capacity(printed.resources.len());
    for (key, t) in &printed.resources {
        let TensorData::Bytes(bytes) = &t.data else { continue };
        let (dtype, shape) = match safetensors_dtype(t.dtype) {
            Some(d) => (d, t.dims.clone()),
            // Sub-byte types travel as raw bytes; the text records their real dtype and shape.
            None => (safetensors::Dtype::U8, vec![bytes.len()]),
        };
        let view = safetensors::tensor::TensorView::new(dtype, shape, bytes)
            .map_err(|e| TextIoError::Weights { path: weights.clone(), message: format!("tensor \"{key}\": {e}") })?;
        views.push((key.clone(), view));
    }
    let tmp = output_temp_file(&dir).map_err(io(&dir))?;
    safetensors::serialize_to_file(views, None, tmp.path())
        .map_err(|e| TextIoError::Weights { path: weights.clone(), message: e.to_string() })?;
    tmp.persist(&weights).map_err(|e| TextIoError::Io { path: weights.clone(), source: e.error })?;
    let mut tmp = output_temp_file(&dir).map_err(io(&dir))?;
    tmp.write_all(printed.text.as_bytes()).map_err(io(path))?;
    tmp.as_file().sync_all().map_err(io(path))?;
    tmp.persist(path).map_err(|e| TextIoError::Io { path: path.to_path_buf(), source: e.error })?;
    Ok(())
}

/// A temporary file in `dir` that becomes an output by rename: readable like any file the user writes
/// (mode 0644 less the umask) rather than tempfile's private 0600.
fn output_temp_file(dir: &Path) -> std::io::Result<tempfile::NamedTempFile> {
    let mut builder = tempfile::Builder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o644));
    }
    builder.tempfile_in(dir)
}

/// Reads a `.qir` file and its side-car weights; tensors are zero-copy views into the memory-mapped
/// weights file (which must not be modified while the graph is alive).
pub fn load(path: &Path) -> Result<Graph, TextIoError> {
    let text = std::fs::read_to_string(path).map_err(|source| TextIoError::Io { path: path.to_path_buf(), source })?;
    let weights = weights_path(path);
    let mut tensors: HashMap<String, Bytes> = HashMap::new();
    if weights.exists() {
        let file = std::fs::File::open(&weights).map_err(|source| TextIoError::Io { path: weights.clone(), source })?;
        // SAFETY: the mapping is read-only; like every mmap-based loader we rely on the file not being
        // truncated or rewritten while mapped (save() replaces files by rename, never in place).
        let map =
            unsafe { memmap2::Mmap::map(&file) }.map_err(|source| TextIoError::Io { path: weights.clone(), source })?;
        let all = Bytes::from_owner(map);
        let st = safetensors::SafeTensors::deserialize(&all)
            .map_err(|e| TextIoError::Weights { path: weights.clone(), message: e.to_string() })?;
        let base = all.as_ptr() as usize;
        for (key, view) in st.tensors() {
            let data = view.data();
            let offset = data.as_ptr() as usize - base;
            tensors.insert(key, all.slice(offset..offset + data.len()));
        }
    }
    parse_with_resources(&text, &mut |key| tensors.get(key).cloned())
        .map_err(|source| TextIoError::Parse { path: path.to_path_buf(), source })
}

fn safetensors_dtype(d: DType) -> Option<safetensors::Dtype> {
    use safetensors::Dtype as S;
    Some(match d {
        DType::F64 => S::F64,
        DType::F32 => S::F32,
        DType::F16 => S::F16,
        DType::BF16 => S::BF16,
        DType::F8E4M3 => S::F8_E4M3,
        DType::I64 => S::I64,
        DType::I32 => S::I32,
        DType::I16 => S::I16,
        DType::I8 => S::I8,
        DType::U64 => S::U64,
        DType::U32 => S::U32,
        DType::U16 => S::U16,
        DType::U8 => S::U8,
        DType::Bool => S::BOOL,
        DType::I4 | DType::U4 => return None,
    })
}

#[cfg(test)]
mod tests;

//! The manifest of a compiled artifact (`model.qcc/manifest.json`): the contract between the
//! compiler, which plans buffers and kernel launches, and the runtime, which follows that plan.
//!
//! Everything here is plain serde data; nothing needs CUDA. [`Manifest::load`] reads a manifest,
//! checks its format version, the sha256 of every file it references and its internal references
//! (buffer ids, module names, symbols, arena bounds), so an executor can trust what it gets.
//! Dynamic sizes are [`DimExpr`]s over named symbols (`batch`, `seq`, `past`), evaluated at run
//! time with [`DimExpr::eval`].

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The manifest format this runtime reads; bumped whenever the meaning of a field changes.
pub const FORMAT_VERSION: u32 = 1;

/// The manifest's file name inside an artifact directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Why an artifact could not be loaded or a size could not be evaluated.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid manifest: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} has format version {found}, this runtime reads version {expected}: recompile the artifact with a matching qcc")]
    FormatVersion { path: PathBuf, found: u64, expected: u32 },
    #[error("checksum mismatch for {path}: manifest says sha256 {expected}, file has {actual}")]
    Checksum { path: PathBuf, expected: String, actual: String },
    #[error("manifest references {path:?}, which is not a relative path inside the artifact")]
    UnsafePath { path: String },
    #[error("invalid manifest: {0}")]
    Invalid(String),
    #[error("size expression {expr} uses symbol `{name}`, which has no value")]
    UnknownSymbol { expr: String, name: String },
    #[error("size expression {expr} overflows or divides by zero with {values}")]
    Arithmetic { expr: String, values: String },
}

/// A file of the artifact and the sha256 (lowercase hex) of its contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    pub path: String,
    pub sha256: String,
}

/// A dynamic dimension and the largest value the memory plan was made for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Symbol {
    pub name: String,
    pub max: u64,
}

/// A graph input or output: its IR value name, element type (qcc dtype name: "f32", "i64", ...),
/// dimensions and the buffer that holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Io {
    pub name: String,
    pub dtype: String,
    pub dims: Vec<DimExpr>,
    pub buffer: u32,
}

/// Where a buffer lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Place {
    /// A tensor of the weights file (safetensors name), uploaded once at load.
    Weight { tensor: String },
    /// A byte range of the one device arena (offset and size at the symbols' max values).
    Arena { offset: u64, bytes: u64 },
    /// Computed or kept on the host (shape values, host-prologue results not needed on the device).
    Host,
}

/// One planned tensor: `name` is the IR value name it holds (for errors and the host prologue).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Buffer {
    pub id: u32,
    pub name: String,
    pub dtype: String,
    pub dims: Vec<DimExpr>,
    pub place: Place,
    /// Storage order when not row-major: storage axis i holds axis `order[i]` of `dims`. A resident
    /// KV cache keeps its positions outermost, so the `past_*` input it holds is a prefix of the
    /// `present.*` output (one buffer serves both and a decode step writes only the new rows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<Vec<usize>>,
}

impl Buffer {
    /// `dims` in storage order.
    pub fn storage_dims<T: Clone>(&self, dims: &[T]) -> Vec<T> {
        match &self.order {
            Some(order) => order.iter().map(|&a| dims[a].clone()).collect(),
            None => dims.to_vec(),
        }
    }
}

/// How a kernel module's code is shipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModuleKind {
    /// PTX generated through MLIR (sm_90), loaded as is.
    Generated,
    /// CUDA C++ source of a runtime micro-kernel, compiled with NVRTC at load (cached).
    Micro,
}

/// A kernel module file of the artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Module {
    pub name: String,
    pub kind: ModuleKind,
    pub path: String,
    pub sha256: String,
}

/// One kernel argument, in the kernel's parameter order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arg {
    /// Device pointer of a buffer (bare pointer; weights and arena alike).
    Buffer(u32),
    /// A 64-bit integer, usually a size evaluated from the symbols.
    I64(DimExpr),
    /// A 32-bit float constant.
    F32(f32),
}

/// One kernel launch of the plan, executed in manifest order on one stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Launch {
    /// IR node name this launch implements (for error messages).
    pub node: String,
    pub module: String,
    pub entry: String,
    pub grid: [DimExpr; 3],
    pub block: [u32; 3],
    pub shared_bytes: u32,
    pub args: Vec<Arg>,
}

/// Values the runtime computes on the host with the CPU executor before the launches (from the
/// graph inputs), then uploads into the buffers of the same names (e.g. positions, rotary tables).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostPrologue {
    pub values: Vec<String>,
}

/// The whole plan of a compiled artifact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub model: String,
    /// Quantization scheme: "fp16", "w8a8", "w4a4", ...
    pub scheme: String,
    /// The graph text (`model.qir`); its weights are `weights`.
    pub graph: String,
    pub weights: FileRef,
    pub symbols: Vec<Symbol>,
    pub inputs: Vec<Io>,
    pub outputs: Vec<Io>,
    pub buffers: Vec<Buffer>,
    pub arena_bytes: u64,
    pub modules: Vec<Module>,
    pub launches: Vec<Launch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_prologue: Option<HostPrologue>,
}

impl Manifest {
    /// A manifest holding only `buffers` (route planner unit tests).
    #[cfg(test)]
    pub(crate) fn with_buffers(buffers: Vec<Buffer>) -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            model: "t".into(),
            scheme: "t".into(),
            graph: "model.qir".into(),
            weights: FileRef { path: "w".into(), sha256: String::new() },
            symbols: vec![],
            inputs: vec![],
            outputs: vec![],
            buffers,
            arena_bytes: 0,
            modules: vec![],
            launches: vec![],
            host_prologue: None,
        }
    }
}

/// A size: a constant, a symbol, or arithmetic over sizes. Serialized as `{"const": 4}`,
/// `{"sym": "seq"}`, `{"mul": [a, b]}`, `{"add": [a, b]}`, `{"ceil_div": [a, b]}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DimExpr {
    Const(i64),
    Sym(String),
    Mul(Box<DimExpr>, Box<DimExpr>),
    Add(Box<DimExpr>, Box<DimExpr>),
    CeilDiv(Box<DimExpr>, Box<DimExpr>),
}

/// Values of the symbols for one run.
pub type SymbolValues = BTreeMap<String, i64>;

impl DimExpr {
    pub fn sym(name: &str) -> DimExpr {
        DimExpr::Sym(name.to_string())
    }

    #[allow(clippy::should_implement_trait)]
    pub fn mul(a: DimExpr, b: DimExpr) -> DimExpr {
        DimExpr::Mul(Box::new(a), Box::new(b))
    }

    #[allow(clippy::should_implement_trait)]
    pub fn add(a: DimExpr, b: DimExpr) -> DimExpr {
        DimExpr::Add(Box::new(a), Box::new(b))
    }

    pub fn ceil_div(a: DimExpr, b: DimExpr) -> DimExpr {
        DimExpr::CeilDiv(Box::new(a), Box::new(b))
    }

    /// The value of this size with the given symbol values (checked arithmetic; ceil-division by
    /// a positive divisor only).
    pub fn eval(&self, values: &SymbolValues) -> Result<i64, ManifestError> {
        self.eval_inner(values).map_err(|missing| match missing {
            Some(name) => ManifestError::UnknownSymbol { expr: self.to_string(), name },
            None => ManifestError::Arithmetic { expr: self.to_string(), values: format!("{values:?}") },
        })
    }

    /// `Err(Some(name))`: unknown symbol; `Err(None)`: overflow or bad division.
    fn eval_inner(&self, values: &SymbolValues) -> Result<i64, Option<String>> {
        Ok(match self {
            DimExpr::Const(c) => *c,
            DimExpr::Sym(name) => *values.get(name).ok_or_else(|| Some(name.clone()))?,
            DimExpr::Mul(a, b) => a.eval_inner(values)?.checked_mul(b.eval_inner(values)?).ok_or(None)?,
            DimExpr::Add(a, b) => a.eval_inner(values)?.checked_add(b.eval_inner(values)?).ok_or(None)?,
            DimExpr::CeilDiv(a, b) => {
                let (a, b) = (a.eval_inner(values)?, b.eval_inner(values)?);
                if b <= 0 {
                    return Err(None);
                }
                a.div_euclid(b) + i64::from(a.rem_euclid(b) != 0)
            }
        })
    }

    /// Every symbol name this expression reads.
    pub fn symbols(&self, into: &mut Vec<String>) {
        match self {
            DimExpr::Const(_) => {}
            DimExpr::Sym(name) => into.push(name.clone()),
            DimExpr::Mul(a, b) | DimExpr::Add(a, b) | DimExpr::CeilDiv(a, b) => {
                a.symbols(into);
                b.symbols(into);
            }
        }
    }
}

impl fmt::Display for DimExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DimExpr::Const(c) => write!(f, "{c}"),
            DimExpr::Sym(name) => write!(f, "{name}"),
            DimExpr::Mul(a, b) => write!(f, "({a} * {b})"),
            DimExpr::Add(a, b) => write!(f, "({a} + {b})"),
            DimExpr::CeilDiv(a, b) => write!(f, "ceil({a} / {b})"),
        }
    }
}

impl From<i64> for DimExpr {
    fn from(c: i64) -> DimExpr {
        DimExpr::Const(c)
    }
}

/// Lowercase hex sha256 of some bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex_string(&Sha256::digest(bytes))
}

/// Lowercase hex sha256 of a file's contents, streamed.
pub fn file_sha256(path: &Path) -> Result<String, ManifestError> {
    let io_err = |source| ManifestError::Io { path: path.to_path_buf(), source };
    let mut file = std::fs::File::open(path).map_err(io_err)?;
    let mut hasher = Sha256::new();
    let mut chunk = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut chunk).map_err(io_err)?;
        if n == 0 {
            break;
        }
        hasher.update(&chunk[..n]);
    }
    Ok(hex_string(&hasher.finalize()))
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Manifest {
    /// Reads `dir/manifest.json`, checks the format version, the internal references and the
    /// sha256 of the weights and of every module file.
    pub fn load(dir: &Path) -> Result<Manifest, ManifestError> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| ManifestError::Io { path: path.clone(), source })?;
        let manifest = Manifest::from_json(&text, &path)?;
        manifest.validate()?;
        manifest.verify_files(dir)?;
        Ok(manifest)
    }

    /// [`Manifest::load`] for an artifact that travelled without its weights file (timing runs with
    /// synthetic weights): every check but the weights file's checksum.
    pub fn load_without_weights(dir: &Path) -> Result<Manifest, ManifestError> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| ManifestError::Io { path: path.clone(), source })?;
        let manifest = Manifest::from_json(&text, &path)?;
        manifest.validate()?;
        manifest.verify_module_files(dir)?;
        Ok(manifest)
    }

    /// Parses manifest text; `path` is only used in errors. The version is checked before the
    /// rest is parsed, so a manifest of another version fails on its version, not on a field.
    pub fn from_json(text: &str, path: &Path) -> Result<Manifest, ManifestError> {
        let json_err = |source| ManifestError::Json { path: path.to_path_buf(), source };
        #[derive(Deserialize)]
        struct VersionOnly {
            format_version: u64,
        }
        let version: VersionOnly = serde_json::from_str(text).map_err(json_err)?;
        if version.format_version != u64::from(FORMAT_VERSION) {
            return Err(ManifestError::FormatVersion {
                path: path.to_path_buf(),
                found: version.format_version,
                expected: FORMAT_VERSION,
            });
        }
        serde_json::from_str(text).map_err(json_err)
    }

    /// Pretty JSON text of this manifest.
    pub fn to_json(&self) -> String {
        // Serializing plain data with string keys cannot fail; keep a readable fallback anyway.
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    /// Checks the sha256 of the weights file and every module file inside `dir`.
    pub fn verify_files(&self, dir: &Path) -> Result<(), ManifestError> {
        Self::verify_checksums(dir, [(&self.weights.path, &self.weights.sha256)])?;
        self.verify_module_files(dir)
    }

    /// Checks the sha256 of every module file inside `dir` and that the graph path is inside it.
    pub fn verify_module_files(&self, dir: &Path) -> Result<(), ManifestError> {
        Self::verify_checksums(dir, self.modules.iter().map(|m| (&m.path, &m.sha256)))?;
        artifact_path(dir, &self.graph)?;
        Ok(())
    }

    fn verify_checksums<'a>(
        dir: &Path,
        files: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Result<(), ManifestError> {
        for (rel, expected) in files {
            let path = artifact_path(dir, rel)?;
            let actual = file_sha256(&path)?;
            if !actual.eq_ignore_ascii_case(expected) {
                return Err(ManifestError::Checksum { path, expected: expected.clone(), actual });
            }
        }
        Ok(())
    }

    /// Checks references inside the manifest: unique buffer ids, existing buffers and modules,
    /// declared symbols, arena ranges within `arena_bytes`, known dtypes.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let invalid = |msg: String| Err(ManifestError::Invalid(msg));
        let declared: HashSet<&str> = self.symbols.iter().map(|s| s.name.as_str()).collect();
        let check_expr = |expr: &DimExpr, place: &str| -> Result<(), ManifestError> {
            let mut names = Vec::new();
            expr.symbols(&mut names);
            match names.iter().find(|n| !declared.contains(n.as_str())) {
                Some(name) => invalid(format!("{place}: size {expr} uses undeclared symbol `{name}`")),
                None => Ok(()),
            }
        };
        let check_dtype = |dtype: &str, place: &str| -> Result<(), ManifestError> {
            match qcc_ir::DType::from_name(dtype) {
                Some(_) => Ok(()),
                None => invalid(format!("{place}: unknown dtype `{dtype}`")),
            }
        };
        let mut ids = HashSet::new();
        for buffer in &self.buffers {
            let place = format!("buffer {} (`{}`)", buffer.id, buffer.name);
            if !ids.insert(buffer.id) {
                return invalid(format!("{place}: duplicate buffer id"));
            }
            check_dtype(&buffer.dtype, &place)?;
            for d in &buffer.dims {
                check_expr(d, &place)?;
            }
            if let Some(order) = &buffer.order {
                let mut sorted = order.clone();
                sorted.sort_unstable();
                if sorted != (0..buffer.dims.len()).collect::<Vec<_>>() {
                    return invalid(format!(
                        "{place}: order {order:?} is not a permutation of its {} dims",
                        buffer.dims.len()
                    ));
                }
            }
            if let Place::Arena { offset, bytes } = buffer.place {
                if offset.checked_add(bytes).is_none_or(|end| end > self.arena_bytes) {
                    return invalid(format!(
                        "{place}: arena range {offset}+{bytes} exceeds arena_bytes {}",
                        self.arena_bytes
                    ));
                }
            }
        }
        for (kind, list) in [("input", &self.inputs), ("output", &self.outputs)] {
            for io in list {
                let place = format!("{kind} `{}`", io.name);
                if !ids.contains(&io.buffer) {
                    return invalid(format!("{place}: unknown buffer {}", io.buffer));
                }
                check_dtype(&io.dtype, &place)?;
                for d in &io.dims {
                    check_expr(d, &place)?;
                }
            }
        }
        let mut module_names = HashSet::new();
        for module in &self.modules {
            if !module_names.insert(module.name.as_str()) {
                return invalid(format!("module `{}` listed twice", module.name));
            }
        }
        for (i, launch) in self.launches.iter().enumerate() {
            let place = format!("launch {i} (node `{}`, entry `{}`)", launch.node, launch.entry);
            if !module_names.contains(launch.module.as_str()) {
                return invalid(format!("{place}: unknown module `{}`", launch.module));
            }
            for g in &launch.grid {
                check_expr(g, &place)?;
            }
            if launch.block.contains(&0) {
                return invalid(format!("{place}: zero block size {:?}", launch.block));
            }
            for arg in &launch.args {
                match arg {
                    Arg::Buffer(id) if !ids.contains(id) => {
                        return invalid(format!("{place}: unknown buffer {id}"));
                    }
                    Arg::I64(expr) => check_expr(expr, &place)?,
                    _ => {}
                }
            }
        }
        if let Some(prologue) = &self.host_prologue {
            for value in &prologue.values {
                if !self.buffers.iter().any(|b| &b.name == value) {
                    return invalid(format!("host prologue value `{value}` has no buffer"));
                }
            }
        }
        Ok(())
    }

    /// Symbol values for a run, checked against the planned maxima (every symbol needs a value).
    pub fn symbol_values(&self, given: &[(&str, i64)]) -> Result<SymbolValues, ManifestError> {
        let mut values = SymbolValues::new();
        for symbol in &self.symbols {
            let value = given
                .iter()
                .find(|(name, _)| *name == symbol.name)
                .map(|(_, v)| *v)
                .ok_or_else(|| ManifestError::Invalid(format!("no value given for symbol `{}`", symbol.name)))?;
            if value < 0 || value as u64 > symbol.max {
                return Err(ManifestError::Invalid(format!(
                    "symbol `{}` = {value} is outside the planned range 0..={}",
                    symbol.name, symbol.max
                )));
            }
            values.insert(symbol.name.clone(), value);
        }
        Ok(values)
    }

    /// The buffer with this id.
    pub fn buffer(&self, id: u32) -> Option<&Buffer> {
        self.buffers.iter().find(|b| b.id == id)
    }

    /// The path of the graph text inside `dir`.
    pub fn graph_path(&self, dir: &Path) -> Result<PathBuf, ManifestError> {
        artifact_path(dir, &self.graph)
    }
}

/// `dir/rel`, refusing absolute paths and `..` so a manifest cannot point outside its artifact.
pub fn artifact_path(dir: &Path, rel: &str) -> Result<PathBuf, ManifestError> {
    let relative = Path::new(rel);
    let safe = !rel.is_empty() && relative.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if !safe {
        return Err(ManifestError::UnsafePath { path: rel.to_string() });
    }
    Ok(dir.join(relative))
}

#[cfg(test)]
#[path = "manifest_tests.rs"]
mod tests;

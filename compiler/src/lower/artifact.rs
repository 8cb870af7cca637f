//! The GPU side of `qcc compile`: lowering, MLIR -> PTX, `--emit mlir|ptx`, and writing the
//! compiled artifact `model.qcc/` (graph, weights, tokenizer, `manifest.json`, `kernels/`) atomically:
//! everything goes into a temporary directory beside the target, which is then renamed into place.
//!
//! `--emit KIND` prints to stdout, `--emit KIND=FILE` writes FILE (KIND: `mlir`, the generated module
//! as verified by MLIR; `ptx`, the PTX of that module for sm_90). An artifact always carries
//! `kernels/qcc_generated.mlir` beside `kernels/qcc_generated.ptx` for inspection.

use super::{lower, LowerOptions, Lowered, GENERATED_MODULE};
use crate::mlir::{Compiled, Mlir};
use anyhow::{anyhow, bail, Context, Result};
use qcc_ir::Graph;
use qcc_runtime::artifact::{
    file_sha256, sha256_hex, FileRef, HostPrologue, Manifest, Module, ModuleKind, FORMAT_VERSION, MANIFEST_FILE,
};
use std::io::Write;
use std::path::{Path, PathBuf};

/// What `--emit` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmitKind {
    Mlir,
    Ptx,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Emit {
    pub kind: EmitKind,
    /// None: stdout.
    pub file: Option<PathBuf>,
}

impl std::str::FromStr for Emit {
    type Err = String;

    fn from_str(s: &str) -> Result<Emit, String> {
        let (kind, file) = match s.split_once('=') {
            Some((k, f)) => (k, Some(PathBuf::from(f))),
            None => (s, None),
        };
        let kind = match kind {
            "mlir" => EmitKind::Mlir,
            "ptx" => EmitKind::Ptx,
            other => return Err(format!("unknown --emit kind '{other}' (mlir, ptx; KIND=FILE writes a file)")),
        };
        Ok(Emit { kind, file })
    }
}

/// Where the micro-kernel sources are: `$QCC_KERNELS_DIR`, else the repository's runtime/kernels.
pub fn kernels_dir() -> PathBuf {
    match std::env::var_os("QCC_KERNELS_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../runtime/kernels"),
    }
}

/// Lowers `graph` and compiles its generated kernels; `print_stages` prints the MLIR after each stage
/// (as `--print-ir-after-all` does for the graph passes).
pub fn compile_gpu(graph: &Graph, options: &LowerOptions, print_stages: bool) -> Result<(Lowered, Compiled)> {
    let lowered = lower(graph, options)?;
    let mlir = Mlir::new();
    let compiled = mlir.compile_to_ptx(GENERATED_MODULE, &lowered.mlir, print_stages)?;
    if print_stages {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "// -----// MLIR after lower (qcc) //----- //\n{}", lowered.mlir);
        for (stage, text) in &compiled.stages {
            let _ = writeln!(out, "// -----// MLIR after {stage} //----- //\n{text}");
        }
    }
    Ok((lowered, compiled))
}

/// The compile command's output step: `--emit` requests and the `-o` file or artifact. A `.qcc` output
/// gets the GPU plan, and `--print-ir-after-all` (`print_stages`) also prints the MLIR stages; if
/// lowering fails and nothing was explicitly emitted, the CPU artifact is still written and a warning
/// says why the plan is missing.
#[allow(clippy::too_many_arguments)]
pub fn finish_compile(
    graph: &Graph,
    source_model: &Path,
    output: Option<&Path>,
    emits: &[Emit],
    options: &LowerOptions,
    print_stages: bool,
    scheme: &str,
) -> Result<()> {
    let wants_artifact = output.is_some_and(|o| o.extension().is_some_and(|e| e == "qcc"));
    if emits.is_empty() && !wants_artifact && !print_stages {
        if let Some(out) = output {
            crate::cli::save_model(out, source_model, graph)?;
        }
        return Ok(());
    }
    let gpu = compile_gpu(graph, options, print_stages);
    let gpu = match gpu {
        Ok(g) => Some(g),
        Err(e) if emits.is_empty() => {
            eprintln!("warning: not lowered to the GPU (no plan in the artifact): {e:#}");
            None
        }
        Err(e) => return Err(e),
    };
    if let Some((lowered, compiled)) = &gpu {
        for emit in emits {
            let text = match emit.kind {
                EmitKind::Mlir => lowered.mlir.clone(),
                EmitKind::Ptx => compiled.ptx.iter().map(|(_, p)| p.as_str()).collect::<Vec<_>>().join("\n"),
            };
            match &emit.file {
                Some(f) => write_file_atomic(f, text.as_bytes())?,
                None => {
                    let mut out = std::io::stdout().lock();
                    match out.write_all(text.as_bytes()) {
                        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                        other => other?,
                    }
                }
            }
        }
    }
    let Some(out) = output else { return Ok(()) };
    if !wants_artifact {
        return crate::cli::save_model(out, source_model, graph);
    }
    let mut gpu = gpu;
    if let Some((lowered, _)) = &gpu {
        let dir = kernels_dir();
        let missing: Vec<String> = lowered
            .micro_modules
            .iter()
            .filter(|m| !dir.join(format!("{m}.cu")).is_file())
            .map(|m| format!("{m}.cu"))
            .collect();
        if !missing.is_empty() {
            eprintln!(
                "warning: no GPU plan in the artifact: micro-kernel sources missing from {} ({}); set QCC_KERNELS_DIR",
                dir.display(),
                missing.join(", ")
            );
            gpu = None;
        }
    }
    write_artifact(out, source_model, graph, gpu.as_ref(), scheme)
}

fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut builder = tempfile::Builder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o644));
    }
    let mut tmp = builder.tempfile_in(&dir).with_context(|| format!("creating a file in {}", dir.display()))?;
    tmp.write_all(bytes).with_context(|| format!("writing {}", path.display()))?;
    tmp.persist(path).map_err(|e| anyhow!("writing {}: {}", path.display(), e.error))?;
    Ok(())
}

/// Writes `out` (a `.qcc` directory) atomically: CPU part (graph, weights, tokenizer), then the
/// manifest and kernels when there is a GPU plan.
pub fn write_artifact(
    out: &Path,
    source_model: &Path,
    graph: &Graph,
    gpu: Option<&(Lowered, Compiled)>,
    scheme: &str,
) -> Result<()> {
    let parent = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".qcc-")
        .tempdir_in(&parent)
        .with_context(|| format!("creating a temporary directory in {}", parent.display()))?;
    let staging = tmp.path().join("model.qcc");
    crate::cli::save_model(&staging, source_model, graph)?;
    if let Some((lowered, compiled)) = gpu {
        let manifest = manifest(&staging, source_model, lowered, compiled, scheme)?;
        write_file_atomic(&staging.join(MANIFEST_FILE), manifest.to_json().as_bytes())?;
    }
    // Replace any previous artifact: move it aside, move the new one in, then delete the old one.
    let old = tmp.path().join("previous");
    let had_old = out.exists();
    if had_old {
        std::fs::rename(out, &old).with_context(|| format!("moving the previous {} aside", out.display()))?;
    }
    if let Err(e) = std::fs::rename(&staging, out) {
        if had_old {
            let _ = std::fs::rename(&old, out);
        }
        bail!("moving the new artifact to {}: {e}", out.display());
    }
    Ok(())
}

/// Writes `kernels/` into `dir` and returns the manifest describing it.
fn manifest(dir: &Path, source_model: &Path, lowered: &Lowered, compiled: &Compiled, scheme: &str) -> Result<Manifest> {
    let kernels = dir.join("kernels");
    std::fs::create_dir_all(&kernels).with_context(|| format!("creating {}", kernels.display()))?;
    let mut modules = Vec::new();
    for (name, ptx) in &compiled.ptx {
        let rel = format!("kernels/{name}.ptx");
        std::fs::write(dir.join(&rel), ptx).with_context(|| format!("writing {rel}"))?;
        modules.push(Module {
            name: name.clone(),
            kind: ModuleKind::Generated,
            path: rel,
            sha256: sha256_hex(ptx.as_bytes()),
        });
    }
    std::fs::write(kernels.join(format!("{GENERATED_MODULE}.mlir")), &lowered.mlir).context("writing the MLIR")?;
    let source_dir = kernels_dir();
    for name in &lowered.micro_modules {
        let src = source_dir.join(format!("{name}.cu"));
        let text = std::fs::read(&src).with_context(|| {
            format!(
                "micro-kernel module '{name}': reading {} (set QCC_KERNELS_DIR to the runtime's kernels)",
                src.display()
            )
        })?;
        let rel = format!("kernels/{name}.cu");
        std::fs::write(dir.join(&rel), &text).with_context(|| format!("writing {rel}"))?;
        modules.push(Module { name: name.clone(), kind: ModuleKind::Micro, path: rel, sha256: sha256_hex(&text) });
        // Headers the sources include travel with them (not modules of their own).
        for header in std::fs::read_dir(&source_dir).into_iter().flatten().flatten() {
            let p = header.path();
            if p.extension().is_some_and(|e| e == "cuh") {
                if let Some(file) = p.file_name() {
                    std::fs::copy(&p, kernels.join(file)).with_context(|| format!("copying {}", p.display()))?;
                }
            }
        }
    }
    let weights_rel = "model.qir.safetensors";
    let weights_sha256 = file_sha256(&dir.join(weights_rel))?;
    let model = source_model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(Manifest {
        format_version: FORMAT_VERSION,
        model,
        scheme: scheme.to_string(),
        graph: "model.qir".to_string(),
        weights: FileRef { path: weights_rel.to_string(), sha256: weights_sha256 },
        symbols: lowered.symbols.clone(),
        inputs: lowered.inputs.clone(),
        outputs: lowered.outputs.clone(),
        buffers: lowered.buffers.clone(),
        arena_bytes: lowered.arena_bytes,
        modules,
        launches: lowered.launches.clone(),
        host_prologue: (!lowered.host_prologue.is_empty())
            .then(|| HostPrologue { values: lowered.host_prologue.clone() }),
    })
}

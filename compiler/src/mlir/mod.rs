//! MLIR in-process: a context with every dialect, pass and LLVM translation registered, a diagnostic
//! handler that collects MLIR's messages into [`MlirError`], the verifier, and the `module -> PTX`
//! pipeline for sm_90 (no GPU and no CUDA toolkit needed).
//!
//! The pipeline (DESIGN.md §6, run as named stages so `--print-ir-after-all` can show each one):
//!
//! ```text
//! attach-target  builtin.module(nvvm-attach-target{chip=sm_90 O=3})
//! to-nvvm        builtin.module(gpu.module(convert-scf-to-cf,
//!                    convert-gpu-to-nvvm{use-bare-ptr-memref-call-conv=1}, canonicalize, cse),
//!                    reconcile-unrealized-casts)
//! to-binary      builtin.module(gpu-module-to-binary{format=isa})
//! ```
//!
//! The generated kernels are already `gpu.func`s inside a `gpu.module` (see `crate::lower`), so the
//! `gpu-kernel-outlining` step of DESIGN §6 has nothing to do and is left out. `convert-gpu-to-nvvm`
//! turns `math` ops into libdevice calls (`__nv_expf`), which cannot be linked without a CUDA toolkit;
//! the generator therefore calls LLVM intrinsics that NVPTX implements natively (`llvm.sqrt.f32` ->
//! `sqrt.rn.f32`, `llvm.roundeven.f32` -> `cvt.rni.f32.f32`, `llvm.exp2.f32` -> `ex2.approx.f32`).

use melior::dialect::DialectRegistry;
use melior::ir::attribute::ArrayAttribute;
use melior::ir::block::BlockLike;
use melior::ir::operation::OperationLike;
use melior::ir::Module;
use melior::pass::PassManager;
use melior::utility::{
    parse_pass_pipeline, register_all_dialects, register_all_llvm_translations, register_all_passes,
};
use melior::Context;
use std::sync::{Arc, Mutex};

/// The target every generated kernel is compiled for.
pub const CHIP: &str = "sm_90";

/// The pipeline stages from a generated module to PTX, in order: (name, pass pipeline).
pub const STAGES: [(&str, &str); 3] = [
    ("attach-target", "builtin.module(nvvm-attach-target{chip=sm_90 O=3})"),
    (
        "to-nvvm",
        "builtin.module(gpu.module(convert-scf-to-cf, convert-gpu-to-nvvm{use-bare-ptr-memref-call-conv=1}, \
         canonicalize, cse), reconcile-unrealized-casts)",
    ),
    ("to-binary", "builtin.module(gpu-module-to-binary{format=isa})"),
];

/// What went wrong inside MLIR. `diagnostics` are MLIR's own messages (with their locations, which name
/// the graph node and op a kernel was generated for).
#[derive(Debug, thiserror::Error)]
pub enum MlirError {
    #[error("MLIR could not parse the generated module '{module}':\n{diagnostics}")]
    Parse { module: String, diagnostics: String },
    #[error("the MLIR verifier rejected the generated module '{module}':\n{diagnostics}")]
    Verify { module: String, diagnostics: String },
    #[error("MLIR pass pipeline '{pipeline}' is invalid: {message}")]
    Pipeline { pipeline: String, message: String },
    #[error("MLIR stage '{stage}' failed on module '{module}':\n{diagnostics}")]
    Stage { stage: String, module: String, diagnostics: String },
    #[error("module '{module}': {what}")]
    Binary { module: String, what: String },
}

/// A compiled module: PTX per `gpu.module`, and the module text after each stage when asked for.
#[derive(Clone, Debug, Default)]
pub struct Compiled {
    /// (gpu.module name, PTX text).
    pub ptx: Vec<(String, String)>,
    /// (stage name, module text after it), when `keep_stages` was set.
    pub stages: Vec<(String, String)>,
}

/// An MLIR context ready for qcc's kernels: all dialects, passes and LLVM translations registered, with
/// a diagnostic handler collecting every message.
pub struct Mlir {
    context: Context,
    diagnostics: Arc<Mutex<Vec<String>>>,
}

impl Default for Mlir {
    fn default() -> Self {
        Mlir::new()
    }
}

impl Mlir {
    pub fn new() -> Mlir {
        register_all_passes();
        let registry = DialectRegistry::new();
        register_all_dialects(&registry);
        let context = Context::new();
        context.append_dialect_registry(&registry);
        context.load_all_available_dialects();
        register_all_llvm_translations(&context);
        let diagnostics = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&diagnostics);
        context.attach_diagnostic_handler(move |d| {
            let mut text = format!("{}: {}: {d}", d.severity_name(), d.location());
            for i in 0..d.note_count() {
                if let Ok(note) = d.note(i) {
                    text.push_str(&format!("\n  note: {}: {note}", note.location()));
                }
            }
            if let Ok(mut all) = sink.lock() {
                all.push(text);
            }
            true // handled: MLIR does not also print it to stderr
        });
        Mlir { context, diagnostics }
    }

    /// Messages collected since the last call (and clears them).
    fn take_diagnostics(&self) -> String {
        let mut all = self.diagnostics.lock().map(|mut d| std::mem::take(&mut *d)).unwrap_or_default();
        if all.is_empty() {
            all.push("(MLIR reported no diagnostic)".to_string());
        }
        all.join("\n")
    }

    /// Parses and verifies `source`; returns its canonical printed form (what `--emit mlir` writes).
    pub fn check(&self, name: &str, source: &str) -> Result<String, MlirError> {
        let module = self.parse(name, source)?;
        Ok(module.as_operation().to_string())
    }

    fn parse(&self, name: &str, source: &str) -> Result<Module<'_>, MlirError> {
        self.take_diagnostics();
        let module = Module::parse(&self.context, source).ok_or_else(|| MlirError::Parse {
            module: name.to_string(),
            diagnostics: annotate(source, &self.take_diagnostics()),
        })?;
        if !module.as_operation().verify() {
            return Err(MlirError::Verify {
                module: name.to_string(),
                diagnostics: annotate(source, &self.take_diagnostics()),
            });
        }
        Ok(module)
    }

    /// Compiles `source` (a module holding `gpu.module`s) to PTX for [`CHIP`], in-process.
    pub fn compile_to_ptx(&self, name: &str, source: &str, keep_stages: bool) -> Result<Compiled, MlirError> {
        let mut module = self.parse(name, source)?;
        let mut compiled = Compiled::default();
        for (stage, pipeline) in STAGES {
            let manager = PassManager::new(&self.context);
            manager.enable_verifier(true);
            parse_pass_pipeline(manager.as_operation_pass_manager(), pipeline)
                .map_err(|e| MlirError::Pipeline { pipeline: pipeline.to_string(), message: e.to_string() })?;
            self.take_diagnostics();
            manager.run(&mut module).map_err(|_| MlirError::Stage {
                stage: stage.to_string(),
                module: name.to_string(),
                diagnostics: annotate(source, &self.take_diagnostics()),
            })?;
            if keep_stages {
                compiled.stages.push((stage.to_string(), module.as_operation().to_string()));
            }
        }
        compiled.ptx = binaries(&module).map_err(|what| MlirError::Binary { module: name.to_string(), what })?;
        Ok(compiled)
    }
}

/// Adds to each diagnostic line that points into `source` (`loc("-":LINE:COL)`) the kernel it is in
/// and that kernel's own location, which names the graph node and op it was generated for.
fn annotate(source: &str, diagnostics: &str) -> String {
    let lines: Vec<&str> = source.lines().collect();
    let kernel_at = |line: usize| -> Option<String> {
        let start = (0..line.min(lines.len())).rev().find(|&i| lines[i].trim_start().starts_with("gpu.func @"))?;
        let name = lines[start].trim_start().trim_start_matches("gpu.func @").split('(').next()?.to_string();
        let end = (start..lines.len()).find(|&i| lines[i].trim_start().starts_with("} loc("));
        let origin = end.map(|i| lines[i].trim_start().trim_start_matches("} ").to_string()).unwrap_or_default();
        Some(format!("[in kernel @{name} {origin}]"))
    };
    diagnostics
        .lines()
        .map(|l| {
            let line_no = l
                .split("loc(\"-\":")
                .nth(1)
                .and_then(|rest| rest.split(':').next())
                .and_then(|n| n.parse::<usize>().ok());
            match line_no.and_then(kernel_at) {
                Some(k) => format!("{l} {k}"),
                None => l.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The PTX of every `gpu.binary` in a module after `gpu-module-to-binary{format=isa}`.
fn binaries(module: &Module) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let body = module.body();
    let mut op = body.first_operation();
    while let Some(current) = op {
        if current.name().as_string_ref().as_str() == Ok("gpu.binary") {
            let name = current
                .attribute("sym_name")
                .map_err(|e| format!("gpu.binary without a name: {e}"))?
                .to_string()
                .trim_matches('"')
                .to_string();
            let objects: ArrayAttribute = current
                .attribute("objects")
                .and_then(ArrayAttribute::try_from)
                .map_err(|e| format!("gpu.binary @{name} has no objects: {e}"))?;
            let object = objects.element(0).map_err(|e| format!("gpu.binary @{name} is empty: {e}"))?;
            out.push((name, object_text(object)?));
        }
        op = current.next_in_block();
    }
    if out.is_empty() {
        return Err("the pipeline produced no gpu.binary".to_string());
    }
    Ok(out)
}

/// The assembly string of one `#gpu.object`.
fn object_text(object: melior::ir::Attribute) -> Result<String, String> {
    use melior::ir::attribute::AttributeLike;
    let raw = object.to_raw();
    // SAFETY: `raw` is a live attribute of the module (the context outlives this call); the C API returns
    // a string reference into the attribute's storage, which is copied before returning.
    let text = unsafe {
        if !mlir_sys::mlirAttributeIsAGPUObjectAttr(raw) {
            return Err(format!("expected a #gpu.object, got {object}"));
        }
        let s = mlir_sys::mlirGPUObjectAttrGetObject(raw);
        let bytes = std::slice::from_raw_parts(s.data as *const u8, s.length);
        String::from_utf8_lossy(bytes).into_owned()
    };
    Ok(text)
}

trait SeverityName {
    fn severity_name(&self) -> &'static str;
}

impl SeverityName for melior::diagnostic::Diagnostic<'_> {
    fn severity_name(&self) -> &'static str {
        use melior::diagnostic::DiagnosticSeverity::*;
        match self.severity() {
            Error => "error",
            Warning => "warning",
            Note => "note",
            Remark => "remark",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADD: &str = r#"module attributes {gpu.container_module} {
  gpu.module @t {
    gpu.func @add(%a: memref<1024xf32>, %b: memref<1024xf32>, %n: i64) kernel {
      %i = gpu.thread_id x
      %x = memref.load %a[%i] : memref<1024xf32>
      %r = llvm.call_intrinsic "llvm.sqrt.f32"(%x) : (f32) -> f32
      memref.store %r, %b[%i] : memref<1024xf32>
      gpu.return
    }
  }
}"#;

    #[test]
    fn compiles_a_kernel_to_ptx() {
        let mlir = Mlir::new();
        let out = mlir.compile_to_ptx("t", ADD, true).unwrap();
        assert_eq!(out.stages.len(), STAGES.len());
        let (name, ptx) = &out.ptx[0];
        assert_eq!(name, "t");
        assert!(ptx.contains(".target sm_90"), "{ptx}");
        assert!(ptx.contains(".entry add"), "{ptx}");
        assert!(ptx.contains("sqrt.rn.f32"), "{ptx}");
    }

    #[test]
    fn diagnostics_reach_the_error() {
        let mlir = Mlir::new();
        let bad = ADD.replace("%r, %b[%i] : memref<1024xf32>", "%i, %b[%i] : memref<1024xf32>");
        let err = mlir.compile_to_ptx("t", &bad, false).unwrap_err().to_string();
        assert!(err.contains("could not parse") && err.contains("error"), "{err}");
        // A module that parses but fails the verifier: a kernel returning a value.
        let bad = ADD.replace(
            "gpu.func @add(",
            "func.func @f() -> i32 { %c = arith.constant 1 : i64\n return %c : i64 }\n gpu.func @add(",
        );
        let err = mlir.compile_to_ptx("t", &bad, false).unwrap_err().to_string();
        assert!(err.contains("error"), "{err}");
    }
}

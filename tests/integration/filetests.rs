//! Pass filetests: `tests/passes/<pass>/<case>.qir`, each a `// pipeline: ...` header and graphs separated
//! by `// -----` (a case may override the pipeline with its own `// pipeline:` line). Every case is
//! parsed, run through its pipeline (the verifier runs after each pass), snapshotted with insta into
//! `snapshots/passes/` (IR after the pipeline, preceded by the rewrites each pass applied), and checked
//! numerically: the CPU executor must give the same outputs before and after on deterministic inputs.
//! A case containing a `// calibrate` line runs with a small deterministic calibration set; a lossy pass's
//! case states its allowed relative output change with `// tolerance: X` (default 1e-5).
//! Every registered pass must have at least one filetest.

use qcc_ir::{Dim, Graph};
use qcc_passes::{PassManager, PassStats, Registry};
use qcc_runtime::{CpuExecutor, RtTensor};
use std::path::{Path, PathBuf};

fn passes_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("passes")
}

fn snapshot_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is in the repo root").join("snapshots/passes")
}

struct Case {
    pipeline: String,
    text: String,
}

/// Splits a filetest into cases, each with its pipeline.
fn cases(file: &Path) -> Vec<Case> {
    let text = std::fs::read_to_string(file).unwrap();
    let pipeline_of =
        |chunk: &str| chunk.lines().find_map(|l| l.trim().strip_prefix("// pipeline:")).map(|p| p.trim().to_string());
    let chunks: Vec<String> = text.split("\n// -----\n").map(str::to_string).collect();
    let default =
        pipeline_of(&chunks[0]).unwrap_or_else(|| panic!("{}: first line must be '// pipeline: ...'", file.display()));
    chunks.into_iter().map(|c| Case { pipeline: pipeline_of(&c).unwrap_or_else(|| default.clone()), text: c }).collect()
}

fn filetest_files() -> Vec<(String, PathBuf)> {
    let mut files = Vec::new();
    for dir in std::fs::read_dir(passes_dir()).unwrap() {
        let dir = dir.unwrap().path();
        let pass = dir.file_name().unwrap().to_string_lossy().into_owned();
        for f in std::fs::read_dir(&dir).unwrap() {
            let f = f.unwrap().path();
            if f.extension().is_some_and(|e| e == "qir") {
                files.push((pass.clone(), f));
            }
        }
    }
    files.sort();
    files
}

/// Deterministic inputs: symbolic dims become 3; floats in (-2, 2), integers in [-7, 7].
fn inputs_for(g: &Graph) -> Option<Vec<(String, RtTensor)>> {
    let mut out = Vec::new();
    for (k, &id) in g.graph_inputs().iter().enumerate() {
        let info = &g.node(id).outputs[0];
        let dims: Vec<usize> = info
            .ty
            .shape
            .as_ref()?
            .0
            .iter()
            .map(|d| match d {
                Dim::Known(n) => *n as usize,
                _ => 3,
            })
            .collect();
        let n: usize = dims.iter().product();
        let t = if info.ty.dtype.is_float() {
            let vals: Vec<f32> = (0..n).map(|i| 2.0 * ((i * 7 + k * 13) as f32 * 0.731).sin()).collect();
            RtTensor::from_vec(&dims, vals)?.cast(info.ty.dtype)
        } else if info.ty.dtype.is_int() {
            let vals: Vec<i64> = (0..n).map(|i| ((i * 5 + k * 3) % 15) as i64 - 7).collect();
            RtTensor::from_vec(&dims, vals)?.cast(info.ty.dtype)
        } else {
            return None;
        };
        out.push((info.name.clone(), t));
    }
    Some(out)
}

/// A case with a `// calibrate` line gets a calibration set of 3 deterministic samples (inputs shaped as
/// for the numerical check, values varied per sample).
pub(crate) fn calibration_set(g: &Graph) -> qcc_passes::CalibrationSet {
    let samples = (0..3)
        .map(|seed| {
            inputs_for(g)
                .expect("calibrated cases have float or integer inputs")
                .into_iter()
                .map(|(name, t)| {
                    let t = match t.dtype() {
                        d if d.is_float() => RtTensor::F64(
                            t.cast_array::<f64>().mapv(|x| x * (1.0 + 0.3 * seed as f64) + 0.1 * seed as f64),
                        )
                        .cast(d),
                        _ => t,
                    };
                    (name, t.to_ir_tensor())
                })
                .collect()
        })
        .collect();
    qcc_passes::CalibrationSet { samples, key: "filetest".into() }
}

/// Runs `g` on `inputs` (made for the original graph), each cast to `g`'s declared input type: a pass
/// may change interface types (convert-precision's half-precision KV cache).
fn run_graph(g: &Graph, inputs: &[(String, RtTensor)]) -> Vec<Vec<f64>> {
    let exec = CpuExecutor::new(g).unwrap();
    let declared = |name: &str| g.value_by_name(name).map(|v| g.value_type(v).dtype);
    let refs: Vec<(&str, RtTensor)> =
        inputs.iter().map(|(n, t)| (n.as_str(), declared(n).map_or_else(|| t.clone(), |d| t.cast(d)))).collect();
    exec.run(&refs).unwrap().into_iter().map(|(_, t)| t.to_f64_vec()).collect()
}

fn max_rel_error(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(1e-6f64, |m, x| m.max(x.abs()));
    a.iter().zip(b).map(|(x, y)| (x - y).abs() / scale).fold(0.0, f64::max)
}

#[test]
fn every_registered_pass_has_a_filetest() {
    let files = filetest_files();
    let missing: Vec<&str> =
        Registry::standard().names().into_iter().filter(|name| !files.iter().any(|(p, _)| p == name)).collect();
    assert!(missing.is_empty(), "passes without a filetest in tests/passes/<pass>/: {missing:?}");
}

#[test]
fn pass_filetests() {
    let registry = Registry::standard();
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path(snapshot_dir());
    settings.set_prepend_module_to_snapshot(false);
    settings.set_omit_expression(true);
    for (pass, file) in filetest_files() {
        let stem = file.file_stem().unwrap().to_string_lossy().into_owned();
        for (i, case) in cases(&file).into_iter().enumerate() {
            let what = format!("{}: case {i}", file.display());
            let original = qcc_ir::text::parse(&case.text).unwrap_or_else(|e| panic!("{what}: {e}"));
            let mut graph = original.clone();
            let pipeline = registry.parse_pipeline(&case.pipeline).unwrap_or_else(|e| panic!("{what}: {e}"));
            let mut stats = PassStats::new();
            let mut ctx = qcc_passes::PassContext::new();
            if case.text.lines().any(|l| l.trim() == "// calibrate") {
                ctx.set_calibration(calibration_set(&original));
            }
            PassManager::new(pipeline)
                .run_with_context(&mut graph, &mut ctx, &mut [&mut stats])
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            let rewrites: Vec<String> =
                stats.rows.iter().map(|r| format!("{}={}", r.name, r.report.outcome.rewrites)).collect();
            let snapshot = format!(
                "// pipeline: {}\n// rewrites: {}\n{}",
                case.pipeline,
                rewrites.join(" "),
                qcc_ir::text::print_with(
                    &graph,
                    &qcc_ir::text::PrintOptions { constants: qcc_ir::text::ConstantMode::Inline }
                )
                .text
            );
            settings.bind(|| insta::assert_snapshot!(format!("{pass}__{stem}__{i}"), snapshot));
            // Lossy passes (quantization) declare how far the outputs may move: `// tolerance: 0.05`.
            let tolerance = case
                .text
                .lines()
                .find_map(|l| l.trim().strip_prefix("// tolerance:").and_then(|t| t.trim().parse::<f64>().ok()))
                .unwrap_or(1e-5);
            if let Some(inputs) = inputs_for(&original) {
                let (before, after) = (run_graph(&original, &inputs), run_graph(&graph, &inputs));
                for (k, (a, b)) in before.iter().zip(&after).enumerate() {
                    let err = max_rel_error(a, b);
                    assert!(err < tolerance, "{what}: output {k} changed by {err:e}");
                }
            }
        }
    }
}

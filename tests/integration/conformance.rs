//! ONNX backend node conformance: every node test shipped in the onnx 1.22.0 wheel is imported and run on
//! the CPU executor, and its outputs compared with the expected ones (the ONNX reference implementation's).
//!
//! `tests/conformance/allow.txt` names the cases expected to pass: one of those failing fails the test.
//! `tests/conformance/known-failures.txt` names cases of supported ops that do not pass yet, each with a
//! reason. Cases whose model uses an op qcc does not import are counted as skipped.
//! `QCC_BLESS_CONFORMANCE=1` rewrites allow.txt from the current results.

use bytes::Bytes;
use qcc_runtime::{CpuExecutor, RtTensor};
use qcc_tests::{fixture, repo_root};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

enum Outcome {
    Pass,
    Fail(String),
    /// An op, element type or value kind qcc does not import; the reason is kept for the survey printout.
    Skip(String),
}

/// Tolerances per element type (the ONNX backend runner uses rtol 1e-3, atol 1e-7 for float32; we allow a
/// slightly larger atol for results that pass through exp/log near zero).
fn tolerance(dtype: qcc_ir::DType) -> Option<(f64, f64)> {
    use qcc_ir::DType::*;
    match dtype {
        F64 => Some((1e-6, 1e-7)),
        F32 => Some((1e-3, 1e-5)),
        F16 | BF16 | F8E4M3 => Some((1e-2, 1e-3)),
        _ => None,
    }
}

fn compare(name: &str, got: &RtTensor, want: &RtTensor) -> Result<(), String> {
    if got.shape() != want.shape() {
        return Err(format!("output '{name}': shape {:?}, expected {:?}", got.shape(), want.shape()));
    }
    if got.dtype() != want.dtype() {
        return Err(format!("output '{name}': dtype {}, expected {}", got.dtype(), want.dtype()));
    }
    let (g, w) = (got.to_f64_vec(), want.to_f64_vec());
    match tolerance(want.dtype()) {
        Some((rtol, atol)) => {
            for (i, (&a, &b)) in g.iter().zip(&w).enumerate() {
                let same = (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= atol + rtol * b.abs();
                if !same {
                    return Err(format!("output '{name}'[{i}] = {a}, expected {b}"));
                }
            }
        }
        None => {
            if let Some(i) = g.iter().zip(&w).position(|(a, b)| a != b) {
                return Err(format!("output '{name}'[{i}] = {}, expected {}", g[i], w[i]));
            }
        }
    }
    Ok(())
}

fn read_pb(path: &Path) -> Result<RtTensor, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let t = qcc::onnx::decode_tensor(Bytes::from(bytes)).map_err(|e| format!("{}: {e}", path.display()))?;
    RtTensor::from_ir_tensor(&t).map_err(|e| e.to_string())
}

fn run_case(dir: &Path) -> Outcome {
    let model = match qcc::onnx::import_model(dir.join("model.onnx")) {
        Ok(m) => m,
        Err(e @ qcc::onnx::ImportError::UnsupportedOps { .. }) => return Outcome::Skip(e.to_string()),
        Err(
            e @ (qcc::onnx::ImportError::UnsupportedDType { .. } | qcc::onnx::ImportError::UnsupportedValueType { .. }),
        ) => return Outcome::Skip(e.to_string()),
        Err(e) => return Outcome::Fail(format!("import: {e}")),
    };
    let graph = &model.graph;
    let data = dir.join("test_data_set_0");
    let mut inputs = Vec::new();
    for (i, &id) in graph.graph_inputs().iter().enumerate() {
        let p = data.join(format!("input_{i}.pb"));
        if !p.exists() {
            break;
        }
        match read_pb(&p) {
            Ok(t) => inputs.push((graph.node(id).outputs[0].name.clone(), t)),
            Err(e) => return Outcome::Skip(format!("input {i}: {e}")),
        }
    }
    let executor = match CpuExecutor::new(graph) {
        Ok(e) => e,
        Err(e) => return Outcome::Fail(format!("plan: {e}")),
    };
    let refs: Vec<(&str, RtTensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    let outputs = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| executor.run(&refs))) {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => return Outcome::Fail(format!("run: {e}")),
        Err(_) => return Outcome::Fail("run: PANIC".to_string()),
    };
    for (i, (name, got)) in outputs.iter().enumerate() {
        let want = match read_pb(&data.join(format!("output_{i}.pb"))) {
            Ok(t) => t,
            Err(e) => return Outcome::Skip(format!("output {i}: {e}")),
        };
        if let Err(e) = compare(name, got, &want) {
            return Outcome::Fail(e);
        }
    }
    Outcome::Pass
}

/// A short grouping key for why a case was skipped: the unsupported op type or element type.
fn skip_reason(why: &str) -> String {
    if let Some(rest) = why.split("): ").next().and_then(|s| s.split("unsupported node(s):\n  node '").nth(1)) {
        if let Some(op) = rest.split("': ").nth(1).and_then(|s| s.split(' ').next()) {
            return op.to_string();
        }
    }
    if why.contains("element type") {
        return "element type".to_string();
    }
    if why.contains("sequence, optional or map") {
        return "non-tensor value".to_string();
    }
    "other".to_string()
}

fn read_list(path: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| match l.split_once('#') {
            Some((case, reason)) => (case.trim().to_string(), reason.trim().to_string()),
            None => (l.to_string(), String::new()),
        })
        .collect()
}

#[test]
fn onnx_backend_node_tests() {
    let root = fixture("onnx-node-tests");
    let list_dir = repo_root().join("tests/conformance");
    let allowed = read_list(&list_dir.join("allow.txt"));
    let known = read_list(&list_dir.join("known-failures.txt"));
    let mut cases: Vec<_> = std::fs::read_dir(&root).unwrap().filter_map(|e| e.ok().map(|e| e.path())).collect();
    cases.sort();

    // Cases run in parallel; a panic inside the executor is contained per case.
    use rayon::prelude::*;
    let results: Vec<(String, Outcome)> = cases
        .par_iter()
        .filter(|d| d.join("model.onnx").exists())
        .map(|d| (d.file_name().unwrap().to_string_lossy().into_owned(), run_case(d)))
        .collect();

    let mut passed = BTreeSet::new();
    let mut failed = BTreeMap::new();
    let mut skipped: BTreeMap<String, usize> = BTreeMap::new();
    for (name, outcome) in results {
        match outcome {
            Outcome::Pass => {
                passed.insert(name);
            }
            Outcome::Fail(why) => {
                failed.insert(name, why);
            }
            Outcome::Skip(why) => *skipped.entry(skip_reason(&why)).or_default() += 1,
        }
    }
    let regressions: Vec<_> = allowed.keys().filter(|c| failed.contains_key(*c)).collect();
    let unexplained: Vec<_> = failed.keys().filter(|c| !allowed.contains_key(*c) && !known.contains_key(*c)).collect();
    let newly_passing: Vec<_> = passed.iter().filter(|c| !allowed.contains_key(*c)).collect();
    for c in &unexplained {
        println!("FAIL (not in known-failures.txt) {c}: {}", failed[*c]);
    }
    for c in &regressions {
        println!("REGRESSION {c}: {}", failed[*c]);
    }
    if !newly_passing.is_empty() {
        println!("{} passing cases are not in allow.txt yet (QCC_BLESS_CONFORMANCE=1 adds them)", newly_passing.len());
    }
    let mut reasons: Vec<_> = skipped.iter().collect();
    reasons.sort_by(|a, b| b.1.cmp(a.1));
    let top: Vec<String> = reasons.iter().take(12).map(|(r, n)| format!("{r} ({n})")).collect();
    println!("skipped, most common reasons: {}", top.join(", "));
    let skipped: usize = skipped.values().sum();
    println!("conformance: {} passed, {} failed, {} skipped", passed.len(), failed.len(), skipped);
    if std::env::var_os("QCC_BLESS_CONFORMANCE").is_some() {
        let text: String = passed.iter().map(|c| format!("{c}\n")).collect();
        std::fs::write(
            list_dir.join("allow.txt"),
            format!("# ONNX node tests expected to pass (blessed by QCC_BLESS_CONFORMANCE=1)\n{text}"),
        )
        .unwrap();
        let known_text: String = failed
            .iter()
            .map(|(c, why)| {
                format!(
                    "{c}  # {}\n",
                    known.get(c).filter(|r| !r.is_empty()).cloned().unwrap_or_else(|| why.replace('\n', " "))
                )
            })
            .collect();
        std::fs::write(
            list_dir.join("known-failures.txt"),
            format!("# Supported-op node tests that do not pass yet, with the reason\n{known_text}"),
        )
        .unwrap();
    }
    assert!(regressions.is_empty(), "{} allow-listed cases failed", regressions.len());
    assert!(unexplained.is_empty(), "{} cases fail without a reason in known-failures.txt", unexplained.len());
    assert!(passed.len() >= 500, "only {} node tests pass", passed.len());
}

//! The `qcc` binary as a user runs it: every subcommand on a small model built here and on the real SmolLM2
//! fixture, exit codes, one-line errors, and no output file left behind when a command fails.

use prost::Message;
use qcc::onnx::build::{graph, model, node, raw_f32_tensor, tensor_value_info, DimSpec};
use qcc::onnx::proto::data_type;
use qcc_runtime::RtTensor;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn qcc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qcc")).args(args).output().expect("qcc runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn fixture(relative: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache").join(relative);
    assert!(p.exists(), "fixture {} is missing: run scripts/fixtures.sh first", p.display());
    p
}

/// y = relu(x @ W + b) with W = [[1, -1], [2, 0], [0, 3]] and b = [0.5, -0.5], x: f32[batch, 3].
fn small_model(dir: &Path) -> PathBuf {
    let w = raw_f32_tensor("W", &[3, 2], &[1.0, -1.0, 2.0, 0.0, 0.0, 3.0]);
    let b = raw_f32_tensor("b", &[2], &[0.5, -0.5]);
    let g = graph(
        vec![
            node("mm", "MatMul", &["x", "W"], &["xw"], vec![]),
            node("add", "Add", &["xw", "b"], &["pre"], vec![]),
            node("relu", "Relu", &["pre"], &["y"], vec![]),
        ],
        vec![w, b],
        vec![tensor_value_info("x", data_type::FLOAT, &[DimSpec::Param("batch"), DimSpec::Value(3)])],
        &["y"],
    );
    let path = dir.join("small.onnx");
    std::fs::write(&path, model(g, 17).encode_to_vec()).unwrap();
    path
}

#[test]
fn version_and_help() {
    let v = qcc(&["--version"]);
    assert!(v.status.success());
    assert_eq!(stdout(&v).trim(), format!("qcc {}", env!("CARGO_PKG_VERSION")));
    let h = qcc(&["--help"]);
    for cmd in ["import", "compile", "run", "eval", "passes"] {
        assert!(stdout(&h).contains(cmd), "help lacks {cmd}");
    }
}

#[test]
fn passes_lists_every_registered_pass() {
    let out = qcc(&["passes"]);
    assert!(out.status.success());
    let text = stdout(&out);
    for entry in qcc_passes::Registry::standard().entries() {
        let line = text.lines().find(|l| l.split_whitespace().next() == Some(entry.name));
        let line = line.unwrap_or_else(|| panic!("{} is not listed", entry.name));
        assert!(line.len() > entry.name.len() + 5, "{} has no description", entry.name);
    }
}

#[test]
fn import_prints_ir_that_parses_back() {
    let dir = tempfile::tempdir().unwrap();
    let m = small_model(dir.path());
    let out = qcc(&["import", m.to_str().unwrap(), "--print-constants"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("matmul(") && text.contains("relu(") && text.contains("f32[batch,2]"), "{text}");
    let g = qcc_ir::text::parse(&text).expect("printed IR parses");
    assert_eq!(qcc_ir::text::print_with(&g, &inline()).text, text);
}

fn inline() -> qcc_ir::text::PrintOptions {
    qcc_ir::text::PrintOptions { constants: qcc_ir::text::ConstantMode::Inline }
}

#[test]
fn run_reads_and_writes_npy() {
    let dir = tempfile::tempdir().unwrap();
    let m = small_model(dir.path());
    let x = RtTensor::from_vec(&[2, 3], vec![1.0f32, 1.0, 1.0, -1.0, 0.5, -2.0]).unwrap();
    let x_path = dir.path().join("x.npy");
    qcc::npy::write(&x_path, &x).unwrap();
    let out_dir = dir.path().join("out");
    let out = qcc(&[
        "run",
        m.to_str().unwrap(),
        "--input",
        &format!("x={}", x_path.display()),
        "--output-dir",
        out_dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let y = qcc::npy::read(&out_dir.join("y.npy")).unwrap();
    assert_eq!(y.shape(), &[2, 2]);
    // Row 1: [1+2+0, -1+0+3] + b = [3.5, 1.5]; row 2: [-1+1+0, 1+0-6] + b = [0.5, -5.5] -> relu.
    assert_eq!(y.to_f64_vec(), vec![3.5, 1.5, 0.5, 0.0]);
}

#[test]
fn compile_inspection_flags() {
    let dir = tempfile::tempdir().unwrap();
    let m = small_model(dir.path());
    let m = m.to_str().unwrap();
    let pipeline = qcc(&["compile", m, "-O", "w4a4", "--show-pipeline"]);
    assert!(pipeline.status.success());
    let passes: Vec<String> = stdout(&pipeline).trim().split(',').map(|s| s.to_string()).collect();
    assert!(!passes.is_empty());
    let text = stdout(&pipeline);
    assert!(text.contains("weight-rounding=gptq") && text.contains("gram=true"), "{text}");
    // RTN: every quantize rounds to nearest, and clip no longer collects the Grams only GPTQ reads.
    let rtn = stdout(&qcc(&["compile", m, "-O", "w4a4", "--weight-rounding", "rtn", "--show-pipeline"]));
    assert!(rtn.contains("weight-rounding=rtn") && !rtn.contains("gptq"), "{rtn}");
    assert!(rtn.contains("gram=false") && !rtn.contains("gram=true"), "{rtn}");

    let all = qcc(&["compile", m, "-O", "none", "--print-ir-after-all"]);
    assert!(all.status.success(), "{}", stderr(&all));
    let text = stdout(&all);
    let none_pipeline = stdout(&qcc(&["compile", m, "-O", "none", "--show-pipeline"]));
    for p in none_pipeline.trim().split(',') {
        let name = p.split('{').next().unwrap();
        assert!(text.contains(&format!("'{name}")), "no IR printed after {name}:\n{text}");
    }

    let dump = dir.path().join("dump");
    let d =
        qcc(&["compile", m, "--passes", "fold-constants,eliminate-dead-code", "--dump-dir", dump.to_str().unwrap()]);
    assert!(d.status.success(), "{}", stderr(&d));
    let mut files: Vec<String> =
        std::fs::read_dir(&dump).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    files.sort();
    assert_eq!(files, ["00-input.qir", "01-fold-constants.qir", "02-eliminate-dead-code.qir"]);
    for f in &files {
        qcc_ir::text::parse(&std::fs::read_to_string(dump.join(f)).unwrap()).expect("dumped IR parses");
    }

    let bisect =
        qcc(&["compile", m, "--passes", "fold-constants,eliminate-dead-code", "--bisect", "1", "--pass-stats"]);
    assert!(bisect.status.success(), "{}", stderr(&bisect));
    let stats = stderr(&bisect);
    assert!(stats.contains("fold-constants") && !stats.contains("eliminate-dead-code"), "{stats}");

    let out_qir = dir.path().join("out.qir");
    let c = qcc(&["compile", m, "-O", "none", "-o", out_qir.to_str().unwrap()]);
    assert!(c.status.success(), "{}", stderr(&c));
    let back = qcc_ir::text::load(&out_qir).unwrap();
    assert_eq!(back.graph_outputs().len(), 1);
}

#[test]
fn errors_are_one_line_and_leave_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.onnx");
    std::fs::write(&garbage, b"this is not a protobuf \xff\xff\xff").unwrap();
    let out_qir = dir.path().join("out.qir");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["import".into(), "/no/such/model.onnx".into()], "/no/such/model.onnx"),
        (
            vec!["import".into(), garbage.display().to_string(), "-o".into(), out_qir.display().to_string()],
            "garbage.onnx",
        ),
        (
            vec!["compile".into(), garbage.display().to_string(), "--passes".into(), "no-such-pass".into()],
            "no-such-pass",
        ),
        (vec!["compile".into(), "x.onnx".into(), "-O".into(), "w3a3".into()], "w3a3"),
        (vec!["run".into(), garbage.display().to_string(), "--input".into(), "x".into()], "garbage.onnx"),
    ];
    for (args, needle) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = qcc(&args);
        let err = stderr(&out);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(needle), "{args:?}: error does not name {needle}: {err}");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    }
    assert!(!out_qir.exists(), "a failed import left {}", out_qir.display());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 1, "temporary files left: {leftovers:?}");
}

#[test]
fn real_model_eval_json_and_generation() {
    let model = fixture("models/smollm2-135m/smollm2-135m.onnx");
    let text = fixture("data/sotu-last.txt");
    let out = qcc(&[
        "eval",
        model.to_str().unwrap(),
        "--perplexity",
        text.to_str().unwrap(),
        "--ctx",
        "128",
        "--windows",
        "1",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).expect("one JSON object");
    for key in ["model", "dataset", "tokens", "ppl", "seconds"] {
        assert!(v.get(key).is_some(), "no '{key}' in {v}");
    }
    assert_eq!(v["tokens"], 127);
    let ppl = v["ppl"].as_f64().unwrap();
    assert!(ppl > 5.0 && ppl < 60.0, "implausible perplexity {ppl}");

    let tasks = fixture("data/oe_eval_tasks");
    let t = qcc(&[
        "eval",
        model.to_str().unwrap(),
        "--task",
        "arc_easy",
        "--limit",
        "4",
        "--tasks-dir",
        tasks.to_str().unwrap(),
        "--json",
    ]);
    assert!(t.status.success(), "{}", stderr(&t));
    let v: serde_json::Value = serde_json::from_str(stdout(&t).trim()).unwrap();
    assert_eq!(v["docs"], 4);
    assert!(v["acc"].as_f64().unwrap() >= 0.0 && v["acc_norm"].as_f64().unwrap() <= 1.0);

    let g = qcc(&["run", model.to_str().unwrap(), "--prompt", "The capital of France is", "--max-tokens", "3"]);
    assert!(g.status.success(), "{}", stderr(&g));
    assert!(stdout(&g).starts_with("The capital of France is Paris."), "{}", stdout(&g));
}

/// `--device cuda` runs compiled artifacts: an ONNX model is refused with a hint, an unknown device is a
/// usage error, and an artifact either runs on the GPU (same outputs as the CPU executor, 1e-3
/// relative) or, on a machine without one, fails with one line naming the missing driver or device.
#[test]
fn device_cuda_runs_artifacts_or_says_why_not() {
    let dir = tempfile::tempdir().unwrap();
    let m = small_model(dir.path());
    let x = RtTensor::from_vec(&[2, 3], vec![1.0f32, 1.0, 1.0, -1.0, 0.5, -2.0]).unwrap();
    let x_path = dir.path().join("x.npy");
    qcc::npy::write(&x_path, &x).unwrap();
    let input = format!("x={}", x_path.display());

    let onnx = qcc(&["run", m.to_str().unwrap(), "--device", "cuda", "--input", &input]);
    assert_eq!(onnx.status.code(), Some(1));
    assert!(stderr(&onnx).contains("--device cuda runs compiled artifacts"), "{}", stderr(&onnx));
    let bad = qcc(&["run", m.to_str().unwrap(), "--device", "tpu", "--input", &input]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("unknown device 'tpu'"), "{}", stderr(&bad));

    let art = dir.path().join("small.qcc");
    let c = qcc(&["compile", m.to_str().unwrap(), "-O", "none", "-o", art.to_str().unwrap()]);
    assert!(c.status.success(), "{}", stderr(&c));
    let out_dir = dir.path().join("gpu");
    let g = qcc(&[
        "run",
        art.to_str().unwrap(),
        "--device",
        "cuda",
        "--input",
        &input,
        "--output-dir",
        out_dir.to_str().unwrap(),
    ]);
    if g.status.success() {
        let y = qcc::npy::read(&out_dir.join("y.npy")).unwrap().to_f64_vec();
        let want = [3.5, 1.5, 0.5, 0.0];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() <= 1e-3 * b.abs().max(1.0), "GPU {y:?} vs {want:?}");
        }
    } else {
        let err = stderr(&g);
        assert_eq!(g.status.code(), Some(1), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(
            err.contains("small.qcc on cuda:0") && (err.contains("CUDA driver") || err.contains("CUDA device")),
            "{err}"
        );
        eprintln!("no GPU here: {}", err.trim());
    }
}

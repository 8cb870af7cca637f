//! GPU lowering (compiler/src/lower, compiler/src/mlir): one insta snapshot per lowering pattern of
//! the MLIR it generates plus its launch plan (snapshots/lower/), every generated module compiled to
//! PTX in-process and assembled by ptxas for sm_90, the artifact's manifest loaded back by the
//! runtime's loader, and the real SmolLM2 model lowered end to end. Numerical agreement of the
//! kernels with the CPU executor needs a GPU (scripts/gpu_check.sh).

use qcc::lower::{lower, LowerOptions, Lowered};
use qcc::mlir::Mlir;
use qcc_runtime::artifact::{Arg, Manifest, Place};
use std::path::PathBuf;
use std::process::Command;

fn snapshot_dir() -> PathBuf {
    qcc_tests::repo_root().join("snapshots/lower")
}

fn ptxas() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("QCC_PTXAS") {
        return Some(PathBuf::from(p));
    }
    let p = qcc_tests::cache_dir().join("venv/lib/python3.11/site-packages/nvidia/cu13/bin/ptxas");
    p.is_file().then_some(p)
}

/// Compiles the lowered module to PTX and assembles it for sm_90 (ptxas from the PyPI wheel).
fn assemble(name: &str, lowered: &Lowered) {
    let compiled = Mlir::new().compile_to_ptx(name, &lowered.mlir, false).unwrap_or_else(|e| panic!("{name}: {e}"));
    let Some(ptxas) = ptxas() else {
        // scripts/test.sh sets QCC_REQUIRE_PTXAS so that CI cannot skip this silently.
        assert!(std::env::var_os("QCC_REQUIRE_PTXAS").is_none(), "ptxas not found and QCC_REQUIRE_PTXAS is set");
        eprintln!("SKIPPED ptxas for {name}: ptxas not found (run scripts/fixtures.sh or set QCC_PTXAS)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for (module, ptx) in &compiled.ptx {
        assert!(ptx.contains(".target sm_90"), "{name}: {module} is not for sm_90");
        assert!(!ptx.contains("fma."), "{name}: fused multiply-adds would break bit-exactness with the CPU");
        if !ptx.contains(".entry") {
            continue; // every op went to micro-kernels
        }
        // As the runtime loads it: every entry patched for programmatic dependent launch.
        let ptx = qcc_runtime::cuda::pdl::patch_entries(ptx).unwrap_or_else(|| panic!("{name}: {module}: PDL patch"));
        let path = dir.path().join(format!("{module}.ptx"));
        std::fs::write(&path, ptx).unwrap();
        let out = Command::new(&ptxas)
            .args(["-arch=sm_90", "-v"])
            .arg(&path)
            .arg("-o")
            .arg(dir.path().join(format!("{module}.cubin")))
            .output()
            .expect("running ptxas");
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "ptxas rejected {name}/{module}.ptx:\n{log}");
        // The row kernels hold whole rounds of loads in registers: none may spill to local memory.
        let spills = log
            .lines()
            .filter(|l| l.contains("bytes spill") && !l.contains(" 0 bytes spill stores, 0 bytes spill loads"));
        assert_eq!(spills.count(), 0, "{name}/{module}.ptx spills registers:\n{log}");
    }
}

/// The launch plan in a compact text form for the snapshot.
fn plan_text(l: &Lowered) -> String {
    let mut s = String::new();
    for b in &l.buffers {
        let place = match &b.place {
            Place::Weight { tensor } => format!("weight {tensor}"),
            Place::Arena { offset, bytes } => format!("arena {offset}+{bytes}"),
            Place::Host => "host".into(),
        };
        let dims: Vec<String> = b.dims.iter().map(|d| d.to_string()).collect();
        let order = b.order.as_ref().map(|o| format!(" order {o:?}")).unwrap_or_default();
        s.push_str(&format!("buffer {} %{} {}[{}]{order} {place}\n", b.id, b.name, b.dtype, dims.join(",")));
    }
    for launch in &l.launches {
        let args: Vec<String> = launch
            .args
            .iter()
            .map(|a| match a {
                Arg::Buffer(b) => format!("#{b}"),
                Arg::I64(d) => d.to_string(),
                Arg::F32(v) => format!("{v:?}f"),
            })
            .collect();
        let grid: Vec<String> = launch.grid.iter().map(|d| d.to_string()).collect();
        s.push_str(&format!(
            "launch {}::{} node {:?} grid [{}] block {:?} shared {} ({})\n",
            launch.module,
            launch.entry,
            launch.node,
            grid.join(", "),
            launch.block,
            launch.shared_bytes,
            args.join(", ")
        ));
    }
    s.push_str(&format!("arena_bytes {}\nhost_prologue {:?}\n", l.arena_bytes, l.host_prologue));
    s
}

fn lower_text(qir: &str) -> Lowered {
    let graph = qcc_ir::text::parse(qir).unwrap_or_else(|e| panic!("{e}"));
    lower(&graph, &LowerOptions { max_batch: 2, max_tokens: 16 }).unwrap_or_else(|e| panic!("{e}"))
}

/// Snapshot of the generated MLIR (as MLIR prints it back after parsing and verifying) and the plan.
fn check(case: &str, qir: &str) -> Lowered {
    let lowered = lower_text(qir);
    let verified = Mlir::new().check(case, &lowered.mlir).unwrap_or_else(|e| panic!("{case}: {e}"));
    assemble(case, &lowered);
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path(snapshot_dir());
    settings.set_prepend_module_to_snapshot(false);
    settings.bind(|| insta::assert_snapshot!(case, format!("{}\n// ---- mlir\n{verified}", plan_text(&lowered))));
    lowered
}

#[test]
fn rms_norm_with_prefix_quantization() {
    // 600 elements: one unrolled round of 16 x 32 per lane, then a tail of 88 (lanes end unevenly).
    let gamma: Vec<String> = (0..600).map(|i| format!("{:?}", 0.25 + (i % 7) as f32 * 0.5)).collect();
    check(
        "rms_norm_quant_prefix",
        &format!(
            r#"graph @t(%x: f32[batch,seq,600]) -> (%y) {{
  %g = constant {{value = dense<f32[600] [{}]>}} : f32[600]
  %y = rms_norm(%x, %g) {{epsilon = 1e-5, prefix_to = i16, prefix_tokens = 1, to = i4}} : i16[batch,seq,600]
  return %y
}}"#,
            gamma.join(", ")
        ),
    );
}

#[test]
fn rms_norm_of_wide_rows_issues_its_loads_in_rounds_without_spilling() {
    // A 4096 row (Llama-2-7B): rounds of 64 x values per lane in the sum, 16 elements of x, gamma and
    // step per lane in the output pass (a decode row's 128 chunks of 32: one round of each of its 8
    // shares); 2560: rounds of 64 with a tail of 512, then rounds of 16. No snapshot
    // (thousands of unrolled lines): MLIR verifies, ptxas assembles without spills (`assemble`).
    for (k, unrolled) in [(4096usize, 64usize), (2560, 64)] {
        let gamma: Vec<String> = (0..k).map(|i| format!("{:?}", 0.5 + (i % 5) as f32 * 0.25)).collect();
        let step: Vec<String> = (0..k).map(|i| format!("{:?}", 0.01 + (i % 3) as f32 * 0.01)).collect();
        let qir = format!(
            r#"graph @t(%x: f32[batch,seq,{k}]) -> (%y) {{
  %g = constant {{value = dense<f32[{k}] [{}]>}} : f32[{k}]
  %y = rms_norm(%x, %g) {{epsilon = 1e-5, step = dense<f32[{k}] [{}]>, to = i8}} : i8[batch,seq,{k}]
  return %y
}}"#,
            gamma.join(", "),
            step.join(", ")
        );
        let lowered = lower_text(&qir);
        let case = format!("rms_norm_k{k}");
        Mlir::new().check(&case, &lowered.mlir).unwrap_or_else(|e| panic!("{case}: {e}"));
        assemble(&case, &lowered);
        // The first pass's loop body holds `unrolled` loads of x, the second 16 of x and of gamma.
        let loads = lowered.mlir.matches("memref.load %x").count();
        let gammas = lowered.mlir.matches("memref.load %gamma").count();
        assert_eq!(loads, unrolled + 1 + 16 + 1, "k={k}: x loads (rounds, tail, rounds, tail)");
        assert_eq!(gammas, 16 + 1, "k={k}: gamma loads");
        // Few rows split each row's outputs over grid y: 8 shares for one row, 1 from 15 rows on.
        let rms = lowered.launches.iter().find(|l| l.entry.starts_with("rms_norm")).expect("rms_norm launch");
        let shares =
            |rows: i64| rms.grid[1].eval(&[("batch".to_string(), 1), ("seq".to_string(), rows)].into()).unwrap();
        assert_eq!([shares(1), shares(2), shares(7), shares(15), shares(2048)], [8, 6, 2, 1, 1], "k={k}");
    }
}

#[test]
fn prefix_rows_offset_by_the_past_length_of_a_kv_cache() {
    // `prefix_offset`: positions count from the start of the sequence, the kernels take `%past`.
    check(
        "prefix_offset_past",
        r#"graph @t(%x: f32[batch,seq,8], %past_key_values.0.key: f32[batch,2,past_seq,4]) -> (%y, %z) {
  %g = constant {value = dense<f32[8] [0.5, 2.0, -1.0, 3.0, 1.0, 1.0, 0.25, 4.0]>} : f32[8]
  %s = constant {value = dense<f32[8] [0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0]>} : f32[8]
  %y = rms_norm(%x, %g) {epsilon = 1e-5, prefix_offset = "past_seq", prefix_to = i16, prefix_tokens = 1, to = i4} : i16[batch,seq,8]
  %z = quantize(%x, %s) {prefix_offset = "past_seq", prefix_to = i16, prefix_tokens = 1, to = i4} : i16[batch,seq,8]
  return %y, %z
}"#,
    );
}

#[test]
fn rms_norm_float_with_beta_and_per_channel_step() {
    check(
        "rms_norm_beta_step",
        r#"graph @t(%x: f32[batch,seq,4]) -> (%y, %z) {
  %g = constant {value = dense<f32[4] [0.5, 2.0, -1.0, 3.0]>} : f32[4]
  %b = constant {value = dense<f32[4] [0.1, 0.2, 0.3, 0.4]>} : f32[4]
  %y = rms_norm(%x, %g, %b) {epsilon = 1e-6} : f32[batch,seq,4]
  %z = rms_norm(%x, %g) {epsilon = 1e-6, step = dense<f32[4] [0.1, 0.2, 0.4, 0.8]>, to = i8} : i8[batch,seq,4]
  return %y, %z
}"#,
    );
}

#[test]
fn residual_add_and_broadcast_bias() {
    check(
        "add_broadcast",
        r#"graph @t(%a: f32[batch,seq,4], %b: f32[batch,seq,4]) -> (%y) {
  %bias = constant {value = dense<f32[4] [0.1, 0.2, 0.3, 0.4]>} : f32[4]
  %s = add(%a, %b) : f32[batch,seq,4]
  %y = sub(%s, %bias) : f32[batch,seq,4]
  return %y
}"#,
    );
}

#[test]
fn swiglu_plain_and_quantized() {
    check(
        "swiglu",
        r#"graph @t(%g: f32[batch,seq,8], %u: f32[batch,seq,8]) -> (%y, %q) {
  %y = swiglu(%g, %u) : f32[batch,seq,8]
  %q = swiglu(%g, %u) {prefix_to = i16, prefix_tokens = 1, step = dense<f32[] [0.5]>, to = i4} : i16[batch,seq,8]
  return %y, %q
}"#,
    );
}

#[test]
fn rotary_reads_a_transposed_view_and_host_tables() {
    // Position ids and the cos/sin gather depend only on the input's shape: host prologue. The
    // transpose is a strided view read directly by the rotary kernel.
    let lowered = check(
        "rotary_view_prologue",
        r#"graph @t(%x: f32[batch,seq,2,4]) -> (%y) {
  %cos_cached = constant {value = dense<f32[4,4] [1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0, -0.5, -0.5, -0.5, -0.5]>} : f32[4,4]
  %sin_cached = constant {value = dense<f32[4,4] [0.0, 0.0, 0.0, 0.0, 0.8, 0.8, 0.8, 0.8, 1.0, 1.0, 1.0, 1.0, 0.8, 0.8, 0.8, 0.8]>} : f32[4,4]
  %shape = shape(%x) : i64[4]
  %c1 = constant {value = dense<i64[1] [1]>} : i64[1]
  %c2 = constant {value = dense<i64[1] [2]>} : i64[1]
  %c0 = constant {value = dense<i64[1] [0]>} : i64[1]
  %seq1 = slice(%shape, %c1, %c2) : i64[1]
  %seq = squeeze(%seq1, %c0) : i64[]
  %zero = constant {value = dense<i64[] [0]>} : i64[]
  %one = constant {value = dense<i64[] [1]>} : i64[]
  %pos = range(%zero, %seq, %one) : i64[?]
  %cos = gather(%cos_cached, %pos) {axis = 0} : f32[?,4]
  %sin = gather(%sin_cached, %pos) {axis = 0} : f32[?,4]
  %axes = constant {value = dense<i64[2] [0, 1]>} : i64[2]
  %cos4 = unsqueeze(%cos, %axes) : f32[1,1,?,4]
  %sin4 = unsqueeze(%sin, %axes) : f32[1,1,?,4]
  %xt = transpose(%x) {perm = [0, 2, 1, 3]} : f32[batch,2,seq,4]
  %y = rotary(%xt, %cos4, %sin4) : f32[batch,2,?,4]
  return %y
}"#,
    );
    assert_eq!(lowered.host_prologue, vec!["cos4".to_string(), "sin4".to_string()]);
    assert_eq!(lowered.launches.len(), 1, "the transpose is a view, not a copy");
}

#[test]
fn embedding_gather() {
    check(
        "gather_rows",
        r#"graph @t(%ids: i64[batch,seq]) -> (%x) {
  %embed = constant {value = dense<f32[3,4] [0.1, 0.2, 0.3, 0.4, 1.1, 1.2, 1.3, 1.4, 2.1, 2.2, 2.3, 2.4]>} : f32[3,4]
  %x = gather(%embed, %ids) {axis = 0} : f32[batch,seq,4]
  return %x
}"#,
    );
}

#[test]
fn int_linear_micro_kernel_after_a_materialised_transpose() {
    // The transposed i16 activations are not contiguous: a generated copy feeds the micro-kernel.
    let lowered = check(
        "int_linear_copy",
        r#"graph @t(%x: i16[batch,2,seq,4]) -> (%y) {
  %w = constant {value = dense<i8[3,8] [1, -2, 3, -4, 5, -6, 7, -8, 1, 1, 1, 1, 1, 1, 1, 1, -1, 0, 1, 0, -1, 0, 1, 0]>} : i8[3,8]
  %s = constant {value = dense<f32[3] [0.5, 0.25, 0.125]>} : f32[3]
  %shape = constant {value = dense<i64[3] [0, 0, 8]>} : i64[3]
  %xt = transpose(%x) {perm = [0, 2, 1, 3]} : i16[batch,seq,2,4]
  %xr = reshape(%xt, %shape) : i16[batch,seq,8]
  %y = int_linear(%xr, %w, %s) : f32[batch,seq,3]
  return %y
}"#,
    );
    let entries: Vec<&str> = lowered.launches.iter().map(|l| l.entry.as_str()).collect();
    assert_eq!(entries, ["copy_i16_i16", "int_linear_xi16_wi8_f32"]);
}

#[test]
fn residual_add_after_an_int_linear_moves_into_its_epilogue() {
    // o_proj then `h = add(r, o)`: the launch takes r and writes h (`_res`), no add kernel. An
    // int_linear read twice, or added to a broadcast operand, keeps its add.
    let lowered = check(
        "int_linear_residual",
        r#"graph @t(%x: i16[batch,seq,8], %r: f32[batch,seq,2], %b: f32[2]) -> (%h, %p, %q) {
  %w = constant {value = dense<i8[2,8] [1, -2, 3, -4, 5, -6, 7, -8, 1, 1, 1, 1, 1, 1, 1, 1]>} : i8[2,8]
  %s = constant {value = dense<f32[2] [0.5, 0.25]>} : f32[2]
  %bias = constant {value = dense<f32[2] [1.0, -1.0]>} : f32[2]
  %o = int_linear(%x, %w, %s, %bias) : f32[batch,seq,2]
  %h = add(%r, %o) : f32[batch,seq,2]
  %o2 = int_linear(%x, %w, %s) : f32[batch,seq,2]
  %p = add(%o2, %b) : f32[batch,seq,2]
  %o3 = int_linear(%x, %w, %s) : f32[batch,seq,2]
  %q = add(%o3, %r) : f32[batch,seq,2]
  %n = neg(%o3) : f32[batch,seq,2]
  return %h, %p, %q
}"#,
    );
    let entries: Vec<&str> = lowered.launches.iter().map(|l| l.entry.as_str()).collect();
    assert!(entries.contains(&"int_linear_xi16_wi8_bias_res_f32"), "{entries:?}");
    let fused = lowered.launches.iter().find(|l| l.entry == "int_linear_xi16_wi8_bias_res_f32").unwrap();
    let h = lowered.outputs.iter().find(|o| o.name == "h").unwrap();
    let r = lowered.inputs.iter().find(|i| i.name == "r").unwrap();
    // x, w, scale, bias, res = r, y = h's buffer.
    assert!(matches!(fused.args[4], Arg::Buffer(b) if b == r.buffer));
    assert!(matches!(fused.args[5], Arg::Buffer(b) if b == h.buffer));
    assert!(!lowered.launches.iter().any(|l| l.node == "h"), "the add is gone");
    assert!(lowered.launches.iter().any(|l| l.node == "p"), "a broadcast operand keeps its add");
    assert!(lowered.launches.iter().any(|l| l.node == "q"), "a result read twice keeps its add");
}

#[test]
fn int_linears_of_one_activation_launch_together() {
    // q's float op comes first in the graph, then k reads the same activations: k moves up next to
    // q (its weights with it), so the runtime can run both as one GEMV launch; v reads other
    // activations and stays in place.
    let lowered = check(
        "int_linear_siblings",
        r#"graph @t(%x: i16[batch,seq,8], %x2: i16[batch,seq,8]) -> (%qn, %k, %v) {
  %wq = constant {value = dense<i8[2,8] [1, -2, 3, -4, 5, -6, 7, -8, 1, 1, 1, 1, 1, 1, 1, 1]>} : i8[2,8]
  %sq = constant {value = dense<f32[2] [0.5, 0.25]>} : f32[2]
  %q = int_linear(%x, %wq, %sq) : f32[batch,seq,2]
  %qn = neg(%q) : f32[batch,seq,2]
  %wk = constant {value = dense<i8[2,8] [-1, 2, -3, 4, -5, 6, -7, 8, 1, 0, 1, 0, 1, 0, 1, 0]>} : i8[2,8]
  %sk = constant {value = dense<f32[2] [0.125, 2.0]>} : f32[2]
  %k = int_linear(%x, %wk, %sk) : f32[batch,seq,2]
  %v = int_linear(%x2, %wk, %sk) : f32[batch,seq,2]
  return %qn, %k, %v
}"#,
    );
    let nodes: Vec<&str> = lowered.launches.iter().map(|l| l.node.as_str()).collect();
    assert_eq!(nodes, ["q", "k", "qn", "v"]);
}

#[test]
fn attention_and_hadamard_get_quantization_epilogues() {
    check(
        "attention_hadamard_quant",
        r#"graph @t(%q: f32[batch,4,seq,8], %k: f32[batch,2,seq,8], %v: f32[batch,2,seq,8]) -> (%a, %h) {
  %a = attention(%q, %k, %v) {causal = 1, prefix_to = i16, prefix_tokens = 1, scale = 0.35355338, to = i4} : i16[batch,4,seq,8]
  %h = hadamard(%q) {size = 8, step = dense<f32[8] [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]>, to = i8} : i8[batch,4,seq,8]
  return %a, %h
}"#,
    );
}

#[test]
fn hadamard_of_a_swiglu_loads_gate_and_up_and_quantizes_its_own_output() {
    // The down_proj input of a W4A4 MLP (KV-cache graph): swiglu read only by the hadamard, whose
    // per-channel int4 output with a 16-bit first position (offset by the past length) is stored by
    // the Hadamard launch itself: one `hadamard_swiglu_f32_qi16` launch, no swiglu or epilogue kernel.
    // A swiglu with a second reader keeps its own kernel (the second graph).
    let lowered = check(
        "hadamard_swiglu_quant",
        r#"graph @t(%g: f32[batch,seq,8], %u: f32[batch,seq,8], %past: f32[batch,past_seq,8]) -> (%h) {
  %s = swiglu(%g, %u) : f32[batch,seq,8]
  %h = hadamard(%s) {prefix_offset = "past_seq", prefix_to = i16, prefix_tokens = 1, size = 8, step = dense<f32[8] [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]>, to = i4} : i16[batch,seq,8]
  return %h
}"#,
    );
    let entries: Vec<&str> = lowered.launches.iter().map(|l| l.entry.as_str()).collect();
    assert_eq!(entries, ["hadamard_swiglu_f32_qi16"]);
    let lowered = lower_text(
        r#"graph @t(%g: f32[batch,seq,8], %u: f32[batch,seq,8]) -> (%h, %s) {
  %s = swiglu(%g, %u) : f32[batch,seq,8]
  %h = hadamard(%s) {size = 8} : f32[batch,seq,8]
  return %h, %s
}"#,
    );
    let entries: Vec<&str> = lowered.launches.iter().map(|l| l.entry.as_str()).collect();
    assert_eq!(entries, ["swiglu_f32_f32_f32", "hadamard_f32"]);
}

#[test]
fn epilogue_stores_in_the_order_of_its_transposed_reader() {
    // attention -> quantize epilogue -> transpose -> reshape -> o_proj: the epilogue writes
    // [B, S, H, D] directly, so the reshape is free and no copy precedes the micro-kernel.
    let lowered = check(
        "epilogue_transposed",
        r#"graph @t(%q: f32[batch,2,seq,4], %k: f32[batch,2,seq,4], %v: f32[batch,2,seq,4]) -> (%y) {
  %w = constant {value = dense<i8[2,8] [1, -2, 3, -4, 5, -6, 7, -8, 1, 1, 1, 1, 1, 1, 1, 1]>} : i8[2,8]
  %s = constant {value = dense<f32[2] [0.5, 0.25]>} : f32[2]
  %shape = constant {value = dense<i64[3] [0, 0, 8]>} : i64[3]
  %a = attention(%q, %k, %v) {causal = 1, prefix_to = i16, prefix_tokens = 1, scale = 0.5, to = i4} : i16[batch,2,seq,4]
  %at = transpose(%a) {perm = [0, 2, 1, 3]} : i16[batch,seq,2,4]
  %ar = reshape(%at, %shape) : i16[batch,seq,8]
  %y = int_linear(%ar, %w, %s) : f32[batch,seq,2]
  return %y
}"#,
    );
    let entries: Vec<&str> = lowered.launches.iter().map(|l| l.entry.as_str()).collect();
    assert_eq!(entries, ["attention_f32", "copy_f32_i16_qi4_p1", "int_linear_xi16_wi8_f32"]);
}

#[test]
fn attention_epilogue_with_steps_per_head_and_channel() {
    // In a KV-cache graph v is concatenated with the cache input, so QSM cannot fold the attention's
    // output step into v_proj and leaves H * D steps on the attention: element (b, h, s, d) divides
    // by step[h * D + d]. The attention launch quantizes in its epilogue (`attention_f32_qi16`) and
    // stores [B, S, H, D] (head stride 4, row stride 8) for o_proj: no epilogue kernel, no copy.
    let lowered = check(
        "attention_step_per_head",
        r#"graph @t(%q: f32[batch,2,seq,4], %k: f32[batch,2,seq,4], %v: f32[batch,2,seq,4]) -> (%y) {
  %w = constant {value = dense<i8[2,8] [1, -2, 3, -4, 5, -6, 7, -8, 1, 1, 1, 1, 1, 1, 1, 1]>} : i8[2,8]
  %s = constant {value = dense<f32[2] [0.5, 0.25]>} : f32[2]
  %shape = constant {value = dense<i64[3] [0, 0, 8]>} : i64[3]
  %a = attention(%q, %k, %v) {causal = 1, prefix_to = i16, prefix_tokens = 1, scale = 0.5, step = dense<f32[8] [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]>, to = i4} : i16[batch,2,seq,4]
  %at = transpose(%a) {perm = [0, 2, 1, 3]} : i16[batch,seq,2,4]
  %ar = reshape(%at, %shape) : i16[batch,seq,8]
  %y = int_linear(%ar, %w, %s) : f32[batch,seq,2]
  return %y
}"#,
    );
    let entries: Vec<&str> = lowered.launches.iter().map(|l| l.entry.as_str()).collect();
    assert_eq!(entries, ["attention_f32_qi16", "int_linear_xi16_wi8_f32"]);
    // A step count that is neither one per channel nor one per (head, channel) is an error.
    let bad = qcc_ir::text::parse(
        r#"graph @t(%q: f32[1,2,4,4], %k: f32[1,2,4,4], %v: f32[1,2,4,4]) -> (%a) {
  %a = attention(%q, %k, %v) {causal = 1, scale = 0.5, step = dense<f32[3] [0.1, 0.2, 0.3]>, to = i4} : i4[1,2,4,4]
  return %a
}"#,
    )
    .unwrap();
    let err = lower(&bad, &LowerOptions { max_batch: 1, max_tokens: 4 }).unwrap_err().to_string();
    assert!(err.contains("per head and channel"), "{err}");
}

#[test]
fn standalone_quantize_and_float_cast() {
    check(
        "quantize_cast",
        r#"graph @t(%x: f32[batch,seq,4]) -> (%q, %h) {
  %s = constant {value = dense<f32[4] [0.1, 0.2, 0.4, 0.8]>} : f32[4]
  %q = quantize(%x, %s) {axis = -1, to = i8} : i8[batch,seq,4]
  %h = cast(%x) {to = f16} : f16[batch,seq,4]
  return %q, %h
}"#,
    );
}

#[test]
fn kv_cache_concat_unary_ops_and_softmax() {
    // The KV-cache append: the past input and the output share one buffer stored positions first
    // (order [2, 0, 1, 3]), so only the new rows are copied, at offset past * (2 batch) * 4; the
    // softmax reads a contiguous copy.
    let lowered = check(
        "concat_unary",
        r#"graph @t(%past: f32[batch,2,past,4], %new: f32[batch,2,seq,4]) -> (%kv, %s, %p) {
  %kv = concat(%past, %new) {axis = 2} : f32[batch,2,total,4]
  %s = sigmoid(%new) : f32[batch,2,seq,4]
  %p = softmax(%kv) {axis = -1} : f32[batch,2,total,4]
  return %kv, %s, %p
}"#,
    );
    assert_eq!(lowered.outputs[0].dims[2].to_string(), "(past + seq)");
    assert_eq!(lowered.inputs[0].buffer, lowered.outputs[0].buffer, "the past is a prefix of the output");
    assert_eq!(lowered.buffers[lowered.outputs[0].buffer as usize].order, Some(vec![2, 0, 1, 3]));
    let copies = lowered.launches.iter().filter(|l| l.node == "kv").count();
    assert_eq!(copies, 1, "only the new rows are copied");
}

#[test]
fn resident_kv_cache_is_read_by_attention_at_its_strides() {
    // A decode layer's cache: present = identity(concat(past, k)) is a graph output and attention
    // reads it in place (kb = H D, kh = D, kt = B H D), so the only copies are the new rows. A past
    // read by another device op, or a concat whose result is not an output, stays contiguous.
    let lowered = check(
        "resident_kv_cache",
        r#"graph @t(%q: f32[batch,2,seq,4], %k: f32[batch,2,seq,4], %v: f32[batch,2,seq,4], %past_key_values.0.key: f32[batch,2,past,4], %past_key_values.0.value: f32[batch,2,past,4]) -> (%a, %present.0.key, %present.0.value) {
  %kc = concat(%past_key_values.0.key, %k) {axis = 2} : f32[batch,2,total,4]
  %vc = concat(%past_key_values.0.value, %v) {axis = -2} : f32[batch,2,total,4]
  %a = attention(%q, %kc, %vc) {causal = 1, scale = 0.5} : f32[batch,2,seq,4]
  %present.0.key = identity(%kc) : f32[batch,2,total,4]
  %present.0.value = identity(%vc) : f32[batch,2,total,4]
  return %a, %present.0.key, %present.0.value
}"#,
    );
    for (past, present) in [(3, 1), (4, 2)] {
        assert_eq!(lowered.inputs[past].buffer, lowered.outputs[present].buffer);
    }
    let entries: Vec<&str> = lowered.launches.iter().map(|l| l.entry.as_str()).collect();
    assert_eq!(entries, ["copy4_f32_f32", "copy4_f32_f32", "attention_f32"]);
    let attention = &lowered.launches[2];
    let strides: Vec<String> = attention.args[13..19].iter().map(|a| format!("{a:?}")).collect();
    assert_eq!(strides[..3], strides[3..], "k and v alike");
    assert_eq!(
        attention.args[13..16]
            .iter()
            .map(|a| match a {
                Arg::I64(d) => d.to_string(),
                other => format!("{other:?}"),
            })
            .collect::<Vec<_>>(),
        ["8", "4", "(8 * batch)"]
    );
    let declined = lower_text(
        r#"graph @t(%k: f32[batch,2,seq,4], %past: f32[batch,2,past,4]) -> (%kc, %s) {
  %kc = concat(%past, %k) {axis = 2} : f32[batch,2,total,4]
  %s = sigmoid(%past) : f32[batch,2,past,4]
  return %kc, %s
}"#,
    );
    assert!(declined.buffers.iter().all(|b| b.order.is_none()));
    assert_ne!(declined.inputs[1].buffer, declined.outputs[0].buffer);
}

#[test]
fn copies_and_float_casts_move_16_bytes_per_thread_where_rows_align() {
    // A decode step's KV append of 128-wide heads (only the new rows: the cache is resident): one
    // thread moves 4 f32 (copy4) or casts 4 f32 to f16 (copy4_f32_f16, reading the cache at its
    // strides); 16-bit copies take 8 lanes. Rows of 6 do not align and keep one element
    // per thread.
    let lowered = check(
        "vector_copies",
        r#"graph @t(%past: f32[batch,4,past,128], %new: f32[batch,4,seq,128], %h: f16[batch,seq,64], %odd: f32[batch,seq,6]) -> (%kv, %half, %h2, %o) {
  %kv = concat(%past, %new) {axis = 2} : f32[batch,4,total,128]
  %half = cast(%kv) {to = f16} : f16[batch,4,total,128]
  %h2 = concat(%h, %h) {axis = 1} : f16[batch,seq2,64]
  %o = concat(%odd, %odd) {axis = 1} : f32[batch,seq2,6]
  return %kv, %half, %h2, %o
}"#,
    );
    let entries: Vec<&str> = lowered.launches.iter().map(|l| l.entry.as_str()).collect();
    assert_eq!(
        entries,
        ["copy4_f32_f32", "copy4_f32_f16", "copy8_f16_f16", "copy8_f16_f16_2", "copy_f32_f32", "copy_f32_f32_2"]
    );
    let compiled = Mlir::new().compile_to_ptx("vector_copies", &lowered.mlir, false).unwrap();
    let ptx = &compiled.ptx.iter().find(|(m, _)| m == "qcc_generated").unwrap().1;
    let body = |entry: &str| {
        let start = ptx.find(&format!(".entry {entry}(")).unwrap_or_else(|| panic!("no entry {entry}"));
        let end = ptx[start..].find("\n}").map_or(ptx.len(), |e| start + e);
        &ptx[start..end]
    };
    for entry in ["copy4_f32_f32", "copy4_f32_f16", "copy8_f16_f16"] {
        assert!(body(entry).contains("ld.global.v4"), "{entry} does not load 16 bytes at once:\n{}", body(entry));
    }
    assert!(body("copy4_f32_f16").contains("st.global.v4.b16") || body("copy4_f32_f16").contains("st.global.v2"));
    assert!(!body("copy_f32_f32").contains(".v4"));
}

#[test]
fn half_precision_graph() {
    // An fp16 model: generated kernels load and store f16 and compute in f32; linear is a micro-kernel.
    let lowered = check(
        "fp16",
        r#"graph @t(%x: f16[batch,seq,8], %r: f16[batch,seq,8]) -> (%y) {
  %g = constant {value = dense<f16[8] [0.5, 2.0, -1.0, 3.0, 1.0, 1.0, 0.25, 4.0]>} : f16[8]
  %w = constant {value = dense<f16[2,8] [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]>} : f16[2,8]
  %n = rms_norm(%x, %g) {epsilon = 1e-5} : f16[batch,seq,8]
  %s = add(%n, %r) : f16[batch,seq,8]
  %y = linear(%s, %w) : f16[batch,seq,2]
  return %y
}"#,
    );
    let entries: Vec<&str> = lowered.launches.iter().map(|l| l.entry.as_str()).collect();
    assert_eq!(entries, ["rms_norm_f16_f16_k8", "add_f16_f16_f16", "linear_f16_wf16"]);
}

#[test]
fn unsupported_ops_name_the_node_and_op() {
    let graph = qcc_ir::text::parse(
        r#"graph @t(%x: f32[batch,seq,4]) -> (%y) {
  %y = erf(%x) : f32[batch,seq,4] loc("my/erf_node")
  return %y
}"#,
    )
    .unwrap();
    let err = lower(&graph, &LowerOptions::default()).unwrap_err().to_string();
    assert!(err.contains("erf") && err.contains("no GPU lowering"), "{err}");
}

#[test]
fn mlir_errors_carry_the_node_location() {
    // A kernel body MLIR rejects: the diagnostic names the node the kernel was generated for.
    let lowered = lower_text(
        r#"graph @t(%a: f32[batch,seq,4], %b: f32[batch,seq,4]) -> (%y) {
  %y = add(%a, %b) : f32[batch,seq,4] loc("the_residual")
  return %y
}"#,
    );
    let broken = lowered.mlir.replacen("arith.addf", "arith.addi", 1);
    let err = Mlir::new().compile_to_ptx("t", &broken, false).unwrap_err().to_string();
    assert!(err.contains("the_residual") && err.contains("(add)"), "{err}");
}

#[test]
fn artifact_manifest_loads_back_with_checksums() {
    let graph = qcc_ir::text::parse(
        r#"graph @t(%ids: i64[batch,seq]) -> (%y) {
  %embed = constant {value = dense<f32[3,4] [0.1, 0.2, 0.3, 0.4, 1.1, 1.2, 1.3, 1.4, 2.1, 2.2, 2.3, 2.4]>} : f32[3,4]
  %g = constant {value = dense<f32[4] [0.5, 2.0, -1.0, 3.0]>} : f32[4]
  %x = gather(%embed, %ids) {axis = 0} : f32[batch,seq,4]
  %n = rms_norm(%x, %g) {epsilon = 1e-5} : f32[batch,seq,4]
  %y = add(%x, %n) : f32[batch,seq,4]
  return %y
}"#,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.qcc");
    let options = LowerOptions { max_batch: 1, max_tokens: 32 };
    // Written twice: the second write replaces the first atomically.
    for _ in 0..2 {
        qcc::lower::artifact::finish_compile(
            &graph,
            &dir.path().join("m.onnx"),
            Some(&out),
            &[],
            &options,
            false,
            "none",
        )
        .unwrap();
    }
    let manifest = Manifest::load(&out).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(manifest.launches.len(), 3);
    assert_eq!(
        manifest.symbols.iter().map(|s| (s.name.as_str(), s.max)).collect::<Vec<_>>(),
        [("batch", 1), ("seq", 32)]
    );
    // ids (32 i64 = 256 bytes) is read only by the gather; x, n and y (32 x 4 f32 = 512 bytes each)
    // are all live at the add. The peak is 3 x 512 and ids reuses part of it (the sum is 1792).
    assert_eq!(manifest.arena_bytes, 3 * 512);
    std::fs::write(out.join("kernels/qcc_generated.ptx"), "// tampered").unwrap();
    let err = Manifest::load(&out).unwrap_err().to_string();
    assert!(err.contains("checksum") && err.contains("qcc_generated.ptx"), "{err}");
}

fn smollm2(file: &str) -> Lowered {
    let mut graph = qcc::cli::load_model(&qcc_tests::smollm2_dir().join(file)).unwrap();
    let registry = qcc_passes::Registry::standard();
    let pipeline = registry.parse_pipeline(&qcc_passes::OptLevel::None.pipeline()).unwrap();
    qcc_passes::PassManager::new(pipeline).run(&mut graph, &mut []).unwrap();
    let lowered = lower(&graph, &LowerOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    assemble(file, &lowered);
    // Every size uses only the declared symbols (what Manifest::validate checks on load).
    let declared: Vec<&str> = lowered.symbols.iter().map(|s| s.name.as_str()).collect();
    let mut used = Vec::new();
    for b in &lowered.buffers {
        b.dims.iter().for_each(|d| d.symbols(&mut used));
    }
    for l in &lowered.launches {
        l.grid.iter().for_each(|d| d.symbols(&mut used));
    }
    assert!(used.iter().all(|s| declared.contains(&s.as_str())), "{file}: undeclared symbol among {used:?}");
    lowered
}

/// The real SmolLM2 model, unquantized (-O none): every node lowers, the PTX assembles, and the
/// arena is far smaller than the sum of its buffers.
#[test]
fn smollm2_lowers_end_to_end() {
    let lowered = smollm2("smollm2-135m.onnx");
    let count = |entry: &str| lowered.launches.iter().filter(|l| l.entry.starts_with(entry)).count();
    assert_eq!(count("linear_f32"), 211, "7 projections x 30 layers + the LM head");
    assert_eq!(count("attention_f32"), 30);
    assert_eq!(count("rms_norm_f32_f32"), 61);
    let total: u64 = lowered
        .buffers
        .iter()
        .filter_map(|b| match b.place {
            Place::Arena { bytes, .. } => Some(bytes),
            _ => None,
        })
        .sum();
    assert!(lowered.arena_bytes * 4 < total, "arena {} of {total}", lowered.arena_bytes);
}

/// The KV-cache variant: past keys/values are graph inputs, the appended caches graph outputs.
#[test]
fn smollm2_kv_cache_lowers_end_to_end() {
    let lowered = smollm2("smollm2-135m-kv.onnx");
    assert_eq!(lowered.outputs.len(), 1 + 2 * 30, "logits and present.{{0..29}}.{{key,value}}");
    assert_eq!(lowered.symbols.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["batch", "past_seq", "seq"]);
    // Every cache is resident: past_key_values.i.* and present.i.* share a buffer, positions first,
    // and each layer's attention reads K and V there (no contiguous copy of the cache).
    for past in lowered.inputs.iter().filter(|i| i.name.starts_with("past_key_values.")) {
        let present = past.name.replacen("past_key_values.", "present.", 1);
        let out = lowered.outputs.iter().find(|o| o.name == present).unwrap();
        assert_eq!(out.buffer, past.buffer, "{present}");
        assert_eq!(lowered.buffers[past.buffer as usize].order, Some(vec![2, 0, 1, 3]));
    }
    let cache_buffers: Vec<u32> = lowered.outputs[1..].iter().map(|o| o.buffer).collect();
    let readers = |b: u32| {
        lowered.launches.iter().filter(|l| l.args.iter().any(|a| matches!(a, Arg::Buffer(x) if *x == b))).count()
    };
    assert!(cache_buffers.iter().all(|&b| readers(b) == 2), "one append and the attention per cache");
}

//! The CUDA executor and its micro-kernels on hand-written artifacts: each case builds a one-op graph
//! (saved as model.qir + safetensors), a manifest launching the runtime's micro-kernel the way
//! compiler/src/lower/micro.rs does, and compares the GPU's output with the CPU executor's on the same
//! graph (random, non-zero data; integer paths bit-exact, float paths by relative error).
//!
//! Without a GPU every case still checks its plan (entries exist in the NVRTC-compiled kernels, the
//! parameter widths match the arguments, weights have their planned sizes) and prints why the GPU part
//! was skipped; without NVRTC the whole test is skipped with a reason.

use std::path::Path;

use qcc_ir::{DType, Graph, Op, OpKind, Tensor, TensorType};
use qcc_runtime::artifact::{
    compare, sha256_hex, Arg, Buffer, DimExpr, FileRef, Io, Launch, Manifest, Module, ModuleKind, Place, FORMAT_VERSION,
};
use qcc_runtime::cuda::{executor, nvrtc, CudaExecutor};
use qcc_runtime::{CpuExecutor, RtTensor};

/// Deterministic pseudo-random integers in [lo, hi].
struct Rng(u64);
impl Rng {
    fn int(&mut self, lo: i64, hi: i64) -> i64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        lo + ((self.0 >> 33) % (hi - lo + 1) as u64) as i64
    }
    fn float(&mut self) -> f32 {
        self.int(-1_000_000, 1_000_000) as f32 / 1_000_000.0
    }
}

fn c(v: i64) -> DimExpr {
    DimExpr::Const(v)
}

/// One test artifact under construction: graph buffers are listed as the manifest's.
struct Plan {
    buffers: Vec<Buffer>,
    arena: u64,
}

impl Plan {
    fn arena(&mut self, name: &str, dtype: DType, dims: &[usize]) -> u32 {
        let bytes = (dims.iter().product::<usize>() * executor::element_bytes(dtype)) as u64;
        let id = self.buffers.len() as u32;
        self.buffers.push(Buffer {
            id,
            name: name.into(),
            dtype: dtype.name().into(),
            dims: dims.iter().map(|&d| c(d as i64)).collect(),
            place: Place::Arena { offset: self.arena, bytes },
            order: None,
        });
        self.arena += bytes.div_ceil(256) * 256;
        id
    }
    fn weight(&mut self, name: &str, dtype: DType, dims: &[usize]) -> u32 {
        let id = self.buffers.len() as u32;
        self.buffers.push(Buffer {
            id,
            name: name.into(),
            dtype: dtype.name().into(),
            dims: dims.iter().map(|&d| c(d as i64)).collect(),
            place: Place::Weight { tensor: name.into() },
            order: None,
        });
        id
    }
}

/// Writes the artifact, checks its plan, and (with a GPU) runs it against the CPU executor.
/// Returns the agreement of the single output, or None when the GPU part was skipped.
fn run_case(
    label: &str,
    graph: &Graph,
    plan: Plan,
    inputs: Vec<(&str, RtTensor, u32)>,
    output: u32,
    launch: Launch,
) -> Option<compare::Agreement> {
    let dir = write_artifact(label, graph, plan, &inputs, &[("y", output)], vec![launch]);
    let d = dir.path();
    let feed: Vec<(&str, RtTensor)> = inputs.iter().map(|(n, t, _)| (*n, t.clone())).collect();
    let want = CpuExecutor::new(graph).unwrap().run(&feed).unwrap_or_else(|e| panic!("{label}: CPU: {e}"));
    // SAFETY: only probes dlopen for libcuda.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        eprintln!("{label}: plan ok; GPU part SKIPPED: no CUDA driver");
        return None;
    }
    let mut gpu = CudaExecutor::load(d, 0).unwrap_or_else(|e| panic!("{label}: {e}"));
    gpu.set_sync_each(true);
    let got = gpu.run(&feed).unwrap_or_else(|e| panic!("{label}: {e}"));
    let a = compare::agreement(&got[0].1, &want[0].1).unwrap_or_else(|| panic!("{label}: shapes differ"));
    let (w4, blas) = gpu.routed_launches();
    let had = gpu.routed_hadamards();
    println!("{label}: {a} (routed launches: {w4} int_linear, {blas} cuBLAS, {had} fast hadamard)");
    LAST_ROUTED.with(|r| r.set((w4 + had, blas)));
    Some(a)
}

/// Writes the artifact (graph, empty or saved weights, manifest; the launches of one module) into a
/// temporary directory and checks its plan.
fn write_artifact(
    label: &str,
    graph: &Graph,
    plan: Plan,
    inputs: &[(&str, RtTensor, u32)],
    outputs: &[(&str, u32)],
    launches: Vec<Launch>,
) -> tempfile::TempDir {
    let launch = &launches[0];
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qcc_ir::text::save(&d.join("model.qir"), graph).unwrap();
    std::fs::create_dir_all(d.join("kernels")).unwrap();
    let src_path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("kernels/{}.cu", launch.module));
    let src = std::fs::read(&src_path).unwrap();
    std::fs::write(d.join(format!("kernels/{}.cu", launch.module)), &src).unwrap();
    let weights = d.join("model.qir.safetensors");
    let weights_sha = if weights.exists() {
        sha256_hex(&std::fs::read(&weights).unwrap())
    } else {
        std::fs::write(&weights, b"").unwrap();
        sha256_hex(b"")
    };
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        model: label.into(),
        scheme: "test".into(),
        graph: "model.qir".into(),
        weights: FileRef { path: "model.qir.safetensors".into(), sha256: weights_sha },
        symbols: vec![],
        inputs: inputs
            .iter()
            .map(|(name, t, b)| Io {
                name: name.to_string(),
                dtype: t.dtype().name().into(),
                dims: t.shape().iter().map(|&d| c(d as i64)).collect(),
                buffer: *b,
            })
            .collect(),
        outputs: outputs
            .iter()
            .map(|&(name, buffer)| Io {
                name: name.into(),
                dtype: plan.buffers[buffer as usize].dtype.clone(),
                dims: plan.buffers[buffer as usize].dims.clone(),
                buffer,
            })
            .collect(),
        buffers: plan.buffers,
        arena_bytes: plan.arena,
        modules: vec![Module {
            name: launch.module.clone(),
            kind: ModuleKind::Micro,
            path: format!("kernels/{}.cu", launch.module),
            sha256: sha256_hex(&src),
        }],
        launches,
        host_prologue: None,
    };
    std::fs::write(d.join("manifest.json"), manifest.to_json()).unwrap();
    let problems = executor::check_plan(d).unwrap_or_else(|e| panic!("{label}: {e}"));
    assert!(problems.is_empty() || label.starts_with("(bad plan)"), "{label}: {problems:?}");
    dir
}

thread_local! {
    /// The tuned-kernel routes of the last [`run_case`] on this thread (integer int_linear and
    /// hadamard, cuBLAS).
    static LAST_ROUTED: std::cell::Cell<(usize, usize)> = const { std::cell::Cell::new((0, 0)) };
}

fn int_tensor(dtype: DType, dims: &[usize], values: Vec<i64>) -> Tensor {
    match dtype {
        DType::I4 => Tensor::from_bytes(DType::I4, dims.to_vec(), qcc_ir::pack_nibbles(values).into()).unwrap(),
        DType::I8 => Tensor::from_slice(dims.to_vec(), &values.iter().map(|&v| v as i8).collect::<Vec<_>>()),
        DType::I16 => Tensor::from_slice(dims.to_vec(), &values.iter().map(|&v| v as i16).collect::<Vec<_>>()),
        other => panic!("{other}"),
    }
}

/// int_linear(x, w, scale, bias?) for integer or float activations, as micro.rs launches it.
fn int_linear_case(x_dtype: DType, w_dtype: DType, act_bits: Option<i64>, bias: bool, seed: u64) {
    int_linear_sized(x_dtype, w_dtype, act_bits, bias, seed, (5, 72, 96), DType::F32);
}

/// [`int_linear_case`] at size (m, n, k) with output dtype `y_dtype`. With int4 weights and
/// i16/i4 activations (K % 32 == 0, N % 8 == 0) the executor runs it on the W4 GEMV (m <= 16) or
/// GEMM, plus the exact fix-up of the 16-bit prefix row; the test checks that it did. i16 rows 0
/// and 9 hold 16-bit prefix values, row 3 int8-range values (see [`I16Rows`]).
fn int_linear_sized(
    x_dtype: DType,
    w_dtype: DType,
    act_bits: Option<i64>,
    bias: bool,
    seed: u64,
    size: (usize, usize, usize),
    y_dtype: DType,
) {
    let rows = I16Rows { prefix: &[0, 9], int8: &[3], mixed: &[] };
    int_linear_rows(x_dtype, w_dtype, act_bits, bias, seed, size, y_dtype, rows);
}

/// What the rows of an i16 activation hold (the others: int4 values, as w4a4 graphs carry them).
#[derive(Clone, Copy)]
struct I16Rows {
    /// 16-bit prefix values throughout.
    prefix: &'static [usize],
    /// Values in -128..127: past int4, within the decode GEMV's int8 narrowing.
    int8: &'static [usize],
    /// int4 values with a 16-bit one every 37 elements (some 4- and 32-value pieces exact, the
    /// others narrowed).
    mixed: &'static [usize],
}

/// The micro-kernel launch of `entry` over buffers `bufs` at size (m, n, k), as micro.rs plans it.
fn int_linear_launch(entry: &str, bufs: impl Iterator<Item = u32>, (m, n, k): (usize, usize, usize)) -> Launch {
    let mut args: Vec<Arg> = bufs.map(Arg::Buffer).collect();
    args.extend([m, n, k].map(|v| Arg::I64(c(v as i64))));
    Launch {
        node: "int_linear".into(),
        module: "int_linear".into(),
        entry: entry.to_string(),
        grid: [c(n.div_ceil(64) as i64), c(m.div_ceil(16) as i64), c(1)],
        block: [128, 1, 1],
        shared_bytes: 0,
        args,
    }
}

/// Random weights of `w_dtype` [n, k] (full range), positive scales and biases of an int_linear.
fn linear_operands(rng: &mut Rng, w_dtype: DType, n: usize, k: usize) -> (Vec<i64>, Vec<f32>, Vec<f32>) {
    let (wlo, whi) = if w_dtype == DType::I4 { (-8, 7) } else { (-128, 127) };
    let w_vals: Vec<i64> = (0..n * k).map(|_| rng.int(wlo, whi)).collect();
    let scale: Vec<f32> = (0..n).map(|_| rng.float().abs() * 1e-2 + 1e-4).collect();
    let bias_v: Vec<f32> = (0..n).map(|_| rng.float()).collect();
    (w_vals, scale, bias_v)
}

/// [`int_linear_sized`] with the given kinds of i16 rows.
#[allow(clippy::too_many_arguments)]
fn int_linear_rows(
    x_dtype: DType,
    w_dtype: DType,
    act_bits: Option<i64>,
    bias: bool,
    seed: u64,
    (m, n, k): (usize, usize, usize),
    y_dtype: DType,
    rows: I16Rows,
) {
    let mut rng = Rng(seed);
    let (w_vals, scale, bias_v) = linear_operands(&mut rng, w_dtype, n, k);
    let x = match x_dtype {
        // `rows` says which rows hold what; with int8 weights (the 8-bit LM head) every row is 16-bit.
        DType::I16 => RtTensor::from_vec(
            &[m, k],
            (0..m * k)
                .map(|i| {
                    let row = i / k;
                    if w_dtype == DType::I8 || rows.prefix.contains(&row) {
                        rng.int(-32768, 32767) as i16
                    } else if rows.int8.contains(&row) {
                        rng.int(-128, 127) as i16
                    } else if rows.mixed.contains(&row) && i % 37 == 0 {
                        rng.int(-32768, 32767) as i16
                    } else {
                        rng.int(-8, 7) as i16
                    }
                })
                .collect(),
        ),
        DType::I8 => RtTensor::from_vec(&[m, k], (0..m * k).map(|_| rng.int(-128, 127) as i8).collect()),
        DType::I4 => {
            RtTensor::from_vec(&[m, k], (0..m * k).map(|_| rng.int(-8, 7) as i8).collect()).map(|t| t.cast(DType::I4))
        }
        _ => RtTensor::from_vec(&[m, k], (0..m * k).map(|i| rng.float() * if i < k { 300.0 } else { 3.0 }).collect()),
    }
    .unwrap();
    let mut g = Graph::new("t");
    let xv = g.add_input("x", TensorType::known(x_dtype, &[m, k])).unwrap();
    let wv = g.add_constant("w", int_tensor(w_dtype, &[n, k], w_vals)).unwrap();
    let sv = g.add_constant("scale", Tensor::from_slice(vec![n], &scale)).unwrap();
    let mut ins = vec![xv, wv, sv];
    if bias {
        ins.push(g.add_constant("bias", Tensor::from_slice(vec![n], &bias_v)).unwrap());
    }
    let mut op = Op::new(OpKind::IntLinear);
    if let Some(b) = act_bits {
        op = op.with("act_bits", qcc_ir::Attr::Int(b));
    }
    let y = g.add_op(op, &ins, TensorType::known(y_dtype, &[m, n]));
    g.add_output("y", y);

    let mut plan = Plan { buffers: vec![], arena: 0 };
    let bx = plan.arena("x", x_dtype, &[m, k]);
    let bw = plan.weight("w", w_dtype, &[n, k]);
    let bs = plan.weight("scale", DType::F32, &[n]);
    let bb = bias.then(|| plan.weight("bias", DType::F32, &[n]));
    let by = plan.arena("y", y_dtype, &[m, n]);
    let mut entry = format!("int_linear_x{}_w{}", x_dtype.name(), w_dtype.name());
    if let Some(b) = act_bits {
        entry.push_str(&format!("_a{b}"));
    }
    if bias {
        entry.push_str("_bias");
    }
    entry.push_str(&format!("_{}", y_dtype.name()));
    let launch = int_linear_launch(&entry, [bx, bw, bs].into_iter().chain(bb).chain([by]), (m, n, k));
    let label = format!("{entry} m{m} n{n} k{k}");
    if let Some(a) = run_case(&label, &g, plan, vec![("x", x, bx)], by, launch) {
        if x_dtype.is_float() && act_bits.is_none() {
            // Weight-only: float sums in another order than the CPU's sgemm.
            assert!(a.passes(1e-5), "{label}: {a}");
        } else {
            // Exact integer sums and the same f32 epilogue: every output bit agrees.
            assert_eq!(a.differing, 0, "{label}: {a}");
        }
        let w4 = w_dtype == DType::I4 && matches!(x_dtype, DType::I16 | DType::I4) && k % 32 == 0 && n % 8 == 0;
        let w8 = w_dtype == DType::I8
            && k % 16 == 0
            && (x_dtype == DType::I16 || (x_dtype == DType::F32 && act_bits.is_none()));
        let routable = w4 || w8;
        let want = if routable { (1, 0) } else { (0, 0) };
        assert_eq!(LAST_ROUTED.with(|r| r.get()), want, "{label}: launches on the tuned kernels");
    }
}

/// An `int_linear` whose f32 result only feeds `h = add(r, y)`: the plan's `_res` launch (the add in
/// the epilogue, compiler/src/lower/micro.rs `fused_residual`) against the CPU executor's two ops,
/// every output bit equal; int16 activations with int4 prefix rows 0 and 9 (W4: the fused `_m1r`
/// GEMV at one row, the GEMV / GEMM and fix-up then `add_residual_f32` at more), int8 weights (W8),
/// int8 activations with int8 weights (the micro-kernel).
fn int_linear_residual_case(x_dtype: DType, w_dtype: DType, bias: bool, seed: u64, (m, n, k): (usize, usize, usize)) {
    let mut rng = Rng(seed);
    let (w_vals, scale, bias_v) = linear_operands(&mut rng, w_dtype, n, k);
    let x = match x_dtype {
        DType::I16 => RtTensor::from_vec(
            &[m, k],
            (0..m * k)
                .map(|i| {
                    if [0, 9].contains(&(i / k)) || w_dtype == DType::I8 {
                        rng.int(-32768, 32767)
                    } else {
                        rng.int(-8, 7)
                    }
                })
                .map(|v| v as i16)
                .collect(),
        ),
        _ => RtTensor::from_vec(&[m, k], (0..m * k).map(|_| rng.int(-128, 127) as i8).collect()),
    }
    .unwrap();
    let r = RtTensor::from_vec(&[m, n], (0..m * n).map(|_| rng.float() * 10.0).collect::<Vec<f32>>()).unwrap();
    let mut g = Graph::new("t");
    let xv = g.add_input("x", TensorType::known(x_dtype, &[m, k])).unwrap();
    let rv = g.add_input("r", TensorType::known(DType::F32, &[m, n])).unwrap();
    let mut ins = vec![
        xv,
        g.add_constant("w", int_tensor(w_dtype, &[n, k], w_vals)).unwrap(),
        g.add_constant("scale", Tensor::from_slice(vec![n], &scale)).unwrap(),
    ];
    if bias {
        ins.push(g.add_constant("bias", Tensor::from_slice(vec![n], &bias_v)).unwrap());
    }
    let y = g.add_op(Op::new(OpKind::IntLinear), &ins, TensorType::known(DType::F32, &[m, n]));
    let h = g.add_op(Op::new(OpKind::Add), &[rv, y], TensorType::known(DType::F32, &[m, n]));
    g.add_output("h", h);
    let mut plan = Plan { buffers: vec![], arena: 0 };
    let (bx, br) = (plan.arena("x", x_dtype, &[m, k]), plan.arena("r", DType::F32, &[m, n]));
    let (bw, bs) = (plan.weight("w", w_dtype, &[n, k]), plan.weight("scale", DType::F32, &[n]));
    let bb = bias.then(|| plan.weight("bias", DType::F32, &[n]));
    let bh = plan.arena("h", DType::F32, &[m, n]);
    let entry =
        format!("int_linear_x{}_w{}{}_res_f32", x_dtype.name(), w_dtype.name(), if bias { "_bias" } else { "" });
    let launch = int_linear_launch(&entry, [bx, bw, bs].into_iter().chain(bb).chain([br, bh]), (m, n, k));
    let label = format!("{entry} m{m} n{n} k{k}");
    if let Some(a) = run_case(&label, &g, plan, vec![("x", x, bx), ("r", r, br)], bh, launch) {
        assert_eq!(a.differing, 0, "{label}: {a}");
        let routed = w_dtype == DType::I4 || x_dtype == DType::I16;
        assert_eq!(LAST_ROUTED.with(|r| r.get()), (routed as usize, 0), "{label}: launches on the tuned kernels");
    }
}

#[test]
fn int_linear_with_a_fused_residual_matches_the_cpu_bit_for_bit() {
    if !nvrtc::nvrtc_available() {
        eprintln!("SKIPPED: libnvrtc.so.13 not found");
        return;
    }
    int_linear_residual_case(DType::I16, DType::I4, true, 51, (1, 4096, 4096));
    int_linear_residual_case(DType::I16, DType::I4, false, 52, (1, 4096, 11008));
    int_linear_residual_case(DType::I16, DType::I4, false, 53, (5, 576, 1536));
    int_linear_residual_case(DType::I16, DType::I4, true, 54, (300, 584, 576));
    int_linear_residual_case(DType::I16, DType::I8, true, 55, (3, 1000, 576));
    int_linear_residual_case(DType::I8, DType::I8, false, 56, (5, 72, 96));
}

/// Three W4 `int_linear`s of one activation row (q, k, v: n = 4096, 1024, 1024 at k = 4096, q with a
/// bias, all `y_dtype` out): the executor runs all three in one grouped launch at batch 1
/// (`w4_gemv_*_m1g`, fast_linear::group_w4), one after another at more rows; every output bit
/// equal to the CPU's.
fn int_linear_group_case(m: usize, seed: u64, rows: I16Rows, y_dtype: DType) {
    let (k, ns) = (4096usize, [4096usize, 1024, 1024]);
    let mut rng = Rng(seed);
    let x: Vec<i16> = (0..m * k)
        .map(|i| {
            let row = i / k;
            if rows.prefix.contains(&row) || (rows.mixed.contains(&row) && i % 37 == 0) {
                rng.int(-32768, 32767) as i16
            } else {
                rng.int(-8, 7) as i16
            }
        })
        .collect();
    let x = RtTensor::from_vec(&[m, k], x).unwrap();
    let mut g = Graph::new("t");
    let mut plan = Plan { buffers: vec![], arena: 0 };
    let xv = g.add_input("x", TensorType::known(DType::I16, &[m, k])).unwrap();
    let bx = plan.arena("x", DType::I16, &[m, k]);
    let mut launches = Vec::new();
    let mut outputs = Vec::new();
    for (i, &n) in ns.iter().enumerate() {
        let (name, bias) = [("q", true), ("k", false), ("v", false)][i];
        let w_vals: Vec<i64> = (0..n * k).map(|_| rng.int(-8, 7)).collect();
        let scale: Vec<f32> = (0..n).map(|_| rng.float().abs() * 1e-2 + 1e-4).collect();
        let wv = g.add_constant(&format!("w{name}"), int_tensor(DType::I4, &[n, k], w_vals)).unwrap();
        let sv = g.add_constant(&format!("s{name}"), Tensor::from_slice(vec![n], &scale)).unwrap();
        let mut ins = vec![xv, wv, sv];
        let bw = plan.weight(&format!("w{name}"), DType::I4, &[n, k]);
        let bs = plan.weight(&format!("s{name}"), DType::F32, &[n]);
        let mut args = vec![Arg::Buffer(bx), Arg::Buffer(bw), Arg::Buffer(bs)];
        if bias {
            let b: Vec<f32> = (0..n).map(|_| rng.float()).collect();
            ins.push(g.add_constant(&format!("b{name}"), Tensor::from_slice(vec![n], &b)).unwrap());
            args.push(Arg::Buffer(plan.weight(&format!("b{name}"), DType::F32, &[n])));
        }
        let y = g.add_op(Op::new(OpKind::IntLinear), &ins, TensorType::known(y_dtype, &[m, n]));
        g.add_output(name, y);
        let by = plan.arena(name, y_dtype, &[m, n]);
        args.extend([Arg::Buffer(by), Arg::I64(c(m as i64)), Arg::I64(c(n as i64)), Arg::I64(c(k as i64))]);
        let entry = format!("int_linear_xi16_wi4{}_{}", if bias { "_bias" } else { "" }, y_dtype.name());
        launches.push(Launch {
            node: name.into(),
            module: "int_linear".into(),
            entry,
            grid: [c(n.div_ceil(64) as i64), c(m.div_ceil(16) as i64), c(1)],
            block: [128, 1, 1],
            shared_bytes: 0,
            args,
        });
        outputs.push((name, by));
    }
    let label = format!("w4 group q/k/v m{m}");
    let feed = vec![("x", x.clone())];
    let want = CpuExecutor::new(&g).unwrap().run(&feed).unwrap_or_else(|e| panic!("{label}: CPU: {e}"));
    let dir = write_artifact(&label, &g, plan, &[("x", x, bx)], &outputs, launches);
    // SAFETY: only probes dlopen for libcuda.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        eprintln!("{label}: plan ok; GPU part SKIPPED: no CUDA driver");
        return;
    }
    let mut gpu = CudaExecutor::load(dir.path(), 0).unwrap_or_else(|e| panic!("{label}: {e}"));
    gpu.set_sync_each(true);
    assert!(gpu.is_grouped(1) && gpu.is_grouped(2), "{label}: k and v run with q");
    let got = gpu.run(&feed).unwrap_or_else(|e| panic!("{label}: {e}"));
    for ((name, got), (_, want)) in got.iter().zip(&want) {
        let a = compare::agreement(got, want).unwrap_or_else(|| panic!("{label}: {name}: shapes differ"));
        println!("{label} {name}: {a}");
        assert_eq!(a.differing, 0, "{label} {name}: {a}");
    }
}

#[test]
fn grouped_w4_gemvs_of_one_activation_match_the_cpu_bit_for_bit() {
    if !nvrtc::nvrtc_available() {
        eprintln!("SKIPPED: libnvrtc.so.13 not found (run scripts/fixtures.sh or set QCC_CUDA_LIB_DIR)");
        return;
    }
    int_linear_group_case(1, 41, I16Rows { prefix: &[], int8: &[], mixed: &[0] }, DType::F32);
    int_linear_group_case(1, 42, I16Rows { prefix: &[0], int8: &[], mixed: &[] }, DType::F16);
    int_linear_group_case(5, 43, I16Rows { prefix: &[0], int8: &[], mixed: &[2] }, DType::F32);
}

#[test]
fn int_linear_on_the_tuned_kernels_matches_the_cpu_bit_for_bit() {
    if !nvrtc::nvrtc_available() {
        eprintln!("SKIPPED: libnvrtc.so.13 not found (run scripts/fixtures.sh or set QCC_CUDA_LIB_DIR)");
        return;
    }
    // W4A4: GEMV on the plan's activations (M <= 8 and M = 16; 16-bit prefix rows 0 and 9 summed
    // exactly beside the MMA, int8-range row 3 narrowed), GEMM (K tail 576 = 4.5 x 128, N tail; the
    // wgmma GEMM from 129 rows) with
    // the flagged rows recomputed by the fix-up, f32 and f16 outputs, bias, a lone prefix row.
    int_linear_sized(DType::I16, DType::I4, None, false, 11, (1, 64, 128), DType::F32);
    int_linear_sized(DType::I16, DType::I4, None, true, 22, (5, 4096, 4096), DType::F16);
    int_linear_sized(DType::I16, DType::I4, None, false, 23, (12, 1024, 11008), DType::F32);
    int_linear_sized(DType::I4, DType::I4, None, false, 24, (1, 11008, 4096), DType::F32);
    // Batch 1 (`_m1`: the warp narrows each chunk together): an int8-range row, a row with scattered
    // 16-bit values (exact 4-value pieces beside narrowed ones), a K tail (576 = 4.5 x 128).
    let int8_row = I16Rows { prefix: &[], int8: &[0], mixed: &[] };
    int_linear_rows(DType::I16, DType::I4, None, true, 31, (1, 4096, 4096), DType::F32, int8_row);
    let mixed_row = I16Rows { prefix: &[], int8: &[], mixed: &[0] };
    int_linear_rows(DType::I16, DType::I4, None, false, 32, (1, 1024, 11008), DType::F16, mixed_row);
    let mixed_tail = I16Rows { prefix: &[], int8: &[], mixed: &[0, 2] };
    int_linear_rows(DType::I16, DType::I4, None, false, 33, (1, 520, 576), DType::F32, mixed_tail);
    int_linear_rows(DType::I16, DType::I4, None, true, 34, (3, 1536, 576), DType::F32, mixed_tail);
    int_linear_sized(DType::I4, DType::I4, None, true, 12, (16, 1536, 576), DType::F16);
    int_linear_sized(DType::I16, DType::I4, None, true, 13, (16, 576, 1536), DType::F32);
    int_linear_sized(DType::I16, DType::I4, None, false, 14, (300, 584, 576), DType::F32);
    int_linear_sized(DType::I4, DType::I4, None, true, 15, (77, 1536, 576), DType::F16);
    int_linear_sized(DType::I16, DType::I4, None, true, 16, (130, 256, 4096), DType::F16);
    // From 129 rows on sm_90: the warp-specialised wgmma GEMM (`_c`, 256 x 128 tiles) and its f32
    // twin; whole tiles (the guard-free epilogue) and M / N / K tails (the guarded one).
    int_linear_sized(DType::I16, DType::I4, None, true, 35, (512, 1024, 4096), DType::F32);
    int_linear_sized(DType::I16, DType::I4, None, false, 36, (300, 1000, 1056), DType::F32);
    // The 8-bit LM head (int16 x int8): the W8 GEMV (M <= 16) and the split cuBLAS int8 path.
    int_linear_sized(DType::I16, DType::I8, None, true, 17, (16, 1000, 576), DType::F32);
    int_linear_sized(DType::I16, DType::I8, None, false, 18, (40, 1024, 4096), DType::F32);
    int_linear_sized(DType::I16, DType::I8, None, true, 19, (300, 520, 576), DType::F16);
    // Weight-only int8 with f32 activations: the GEMV (row tiles 1, 4, 8, 16; N tails of its
    // 128-channel blocks; K = 1040 and 8208 end in a partial 64-k piece and a partial x chunk, 8208
    // takes several chunks at M = 1 too) and cuBLAS f32 over the widened weights.
    int_linear_sized(DType::F32, DType::I8, None, false, 20, (3, 1000, 576), DType::F32);
    int_linear_sized(DType::F32, DType::I8, None, false, 25, (1, 1000, 4096), DType::F32);
    int_linear_sized(DType::F32, DType::I8, None, true, 26, (8, 1000, 4096), DType::F32);
    int_linear_sized(DType::F32, DType::I8, None, true, 27, (16, 1000, 4096), DType::F32);
    int_linear_sized(DType::F32, DType::I8, None, false, 28, (16, 520, 1040), DType::F32);
    int_linear_sized(DType::F32, DType::I8, None, true, 29, (5, 300, 8208), DType::F32);
    int_linear_sized(DType::F32, DType::I8, None, true, 30, (1, 200, 8208), DType::F32);
    int_linear_sized(DType::F32, DType::I8, None, true, 21, (200, 512, 1024), DType::F32);
}

#[test]
fn int_linear_matches_the_cpu_bit_for_bit() {
    if !nvrtc::nvrtc_available() {
        eprintln!("SKIPPED: libnvrtc.so.13 not found (run scripts/fixtures.sh or set QCC_CUDA_LIB_DIR)");
        return;
    }
    int_linear_case(DType::I16, DType::I4, None, true, 1);
    int_linear_case(DType::I16, DType::I8, None, false, 2);
    int_linear_case(DType::I8, DType::I8, None, true, 3);
    int_linear_case(DType::F32, DType::I4, Some(4), false, 4);
    int_linear_case(DType::F32, DType::I8, Some(8), true, 5);
}

/// y = hadamard(x) of f32 [rows, n] as micro.rs launches it (`hadamard_f32`), with `size` as the
/// launch's n argument: the graph, the plan, buffers [x, y] and the launch.
fn hadamard_f32_case(rows: usize, n: usize, size: usize) -> (Graph, Plan, [u32; 2], Launch) {
    let mut g = Graph::new("t");
    let xv = g.add_input("x", TensorType::known(DType::F32, &[rows, n])).unwrap();
    let y = g.add_op(
        Op::new(OpKind::Hadamard).with("size", qcc_ir::Attr::Int(n as i64)),
        &[xv],
        TensorType::known(DType::F32, &[rows, n]),
    );
    g.add_output("y", y);
    let mut plan = Plan { buffers: vec![], arena: 0 };
    let bx = plan.arena("x", DType::F32, &[rows, n]);
    let by = plan.arena("y", DType::F32, &[rows, n]);
    let launch = Launch {
        node: "hadamard".into(),
        module: "hadamard".into(),
        entry: "hadamard_f32".into(),
        grid: [c(rows as i64), c(1), c(1)],
        block: [128, 1, 1],
        shared_bytes: 8 * n as u32,
        args: vec![Arg::Buffer(bx), Arg::Buffer(by), Arg::I64(c(rows as i64)), Arg::I64(c(size as i64))],
    };
    (g, plan, [bx, by], launch)
}

#[test]
fn hadamard_matches_the_cpu_for_power_of_two_and_kronecker_sizes() {
    if !nvrtc::nvrtc_available() {
        eprintln!("SKIPPED: libnvrtc.so.13 not found");
        return;
    }
    // 64 = 2^6, 576 = 36 x 16 and 1536 = 12 x 128 (Paley x Sylvester), 44 (Paley, no power of two),
    // 11008 = 172 x 64 and 4992 = 156 x 32 (Williamson x Sylvester; the first is Llama-2-7B's FFN),
    // 4480 = 140 x 32 (a long Paley factor), 2560 = 20 x 128; sub-rows of 32 to 512 values take the
    // warp-register butterflies, 16, 1 and 4096 the shared-memory ones; 1 to 16 rows split each row's
    // outputs over blocks (decode), 300 take one block per row.
    for (seed, n, rows) in [
        (11u64, 64usize, 3usize),
        (12, 576, 3),
        (13, 1536, 300),
        (14, 44, 3),
        (15, 11008, 1),
        (16, 11008, 5),
        (17, 11008, 16),
        (18, 11008, 300),
        (19, 2560, 2),
        (20, 256, 4),
        (21, 512, 1),
        (22, 4096, 2),
        (23, 4992, 1),
        (24, 4480, 270),
    ] {
        let mut rng = Rng(seed);
        let x = RtTensor::from_vec(&[rows, n], (0..rows * n).map(|_| rng.float() * 4.0).collect()).unwrap();
        let (g, plan, [bx, by], launch) = hadamard_f32_case(rows, n, n);
        let label = format!("hadamard n={n} rows={rows}");
        if let Some(a) = run_case(&label, &g, plan, vec![("x", x, bx)], by, launch) {
            // The fast transform follows the CPU's algorithm and order in f64: every bit agrees.
            assert_eq!(a.differing, 0, "{label}: {a}");
            assert_eq!(LAST_ROUTED.with(|r| r.get()), (1, 0), "{label}: runs on the fast transform");
        }
    }
}

#[test]
fn fused_hadamard_of_swiglu_with_quantized_output_matches_the_cpu() {
    if !nvrtc::nvrtc_available() {
        eprintln!("SKIPPED: libnvrtc.so.13 not found");
        return;
    }
    // The fused forms compiler/src/lower/micro.rs launches: `hadamard_swiglu_f32_qi16` (the
    // down_proj input of a W4A4 MLP: swiglu(gate, up) transformed, quantized to int4 per channel,
    // 16-bit for the first `prefix` positions of each sequence) and `hadamard_f32_q{i16,i8}`.
    // Positions repeat every `seq` rows (rows = batch * seq). 11008 at 1 and 6 rows takes the
    // 1024-thread decode blocks, at 300 rows one block per row, 188 (no exact order: block
    // diagonal) the micro-kernel.
    for (seed, n, batch, seq, swiglu, to, prefix) in [
        (31u64, 11008usize, 1usize, 1usize, true, DType::I4, 1usize),
        (32, 11008, 2, 3, true, DType::I4, 1),
        (33, 11008, 100, 3, true, DType::I4, 1),
        (34, 4096, 1, 2, false, DType::I8, 0),
        (35, 1536, 2, 2, false, DType::I4, 2),
        (36, 188, 1, 3, true, DType::I4, 1),
    ] {
        let mut rng = Rng(seed);
        let rows = batch * seq;
        let dims = [batch, seq, n];
        let mut data =
            |scale: f32| RtTensor::from_vec(&dims, (0..rows * n).map(|_| rng.float() * scale).collect()).unwrap();
        let (gate, up) = (data(4.0), data(2.0));
        let step: Vec<f32> = (0..n).map(|_| 0.05 + 0.3 * rng.float().abs()).collect();
        let out_dtype = if prefix > 0 { DType::I16 } else { to };
        let mut g = Graph::new("t");
        let gv = g.add_input("g", TensorType::known(DType::F32, &dims)).unwrap();
        let x = if swiglu {
            let uv = g.add_input("u", TensorType::known(DType::F32, &dims)).unwrap();
            g.add_op(Op::new(OpKind::Swiglu), &[gv, uv], TensorType::known(DType::F32, &dims))
        } else {
            gv
        };
        let mut op = Op::new(OpKind::Hadamard)
            .with("size", qcc_ir::Attr::Int(n as i64))
            .with("to", qcc_ir::Attr::DType(to))
            .with("step", qcc_ir::Attr::Tensor(Tensor::from_slice(vec![n], &step)));
        if prefix > 0 {
            op = op
                .with("prefix_tokens", qcc_ir::Attr::Int(prefix as i64))
                .with("prefix_to", qcc_ir::Attr::DType(DType::I16));
        }
        let y = g.add_op(op, &[x], TensorType::known(out_dtype, &dims));
        g.add_output("y", y);
        let mut plan = Plan { buffers: vec![], arena: 0 };
        let bg = plan.arena("g", DType::F32, &dims);
        let bu = swiglu.then(|| plan.arena("u", DType::F32, &dims));
        let by = plan.arena("y", out_dtype, &dims);
        let bstep = plan.weight(&format!("{}.step", g.value_name(y)), DType::F32, &[n]);
        let (lo, hi) = to.int_range().unwrap();
        let (plo, phi) = if prefix > 0 { DType::I16.int_range().unwrap() } else { (lo, hi) };
        let mut args = vec![Arg::Buffer(bg)];
        args.extend(bu.map(Arg::Buffer));
        args.extend([Arg::Buffer(by), Arg::I64(c(rows as i64)), Arg::I64(c(n as i64))]);
        args.extend([Arg::Buffer(bstep), Arg::I64(c(seq as i64)), Arg::I64(c(0)), Arg::I64(c(prefix as i64))]);
        args.extend([lo, hi, plo, phi].map(|v| Arg::F32(v as f32)));
        let entry = format!(
            "hadamard_{}f32_q{}",
            if swiglu { "swiglu_" } else { "" },
            if out_dtype == DType::I16 { "i16" } else { "i8" }
        );
        let launch = Launch {
            node: "hadamard".into(),
            module: "hadamard".into(),
            entry: entry.clone(),
            grid: [c(rows as i64), c(1), c(1)],
            block: [128, 1, 1],
            shared_bytes: 8 * n as u32,
            args,
        };
        let label = format!("{entry} n={n} rows={batch}x{seq}");
        let mut inputs = vec![("g", gate, bg)];
        if let Some(bu) = bu {
            inputs.push(("u", up, bu));
        }
        if let Some(a) = run_case(&label, &g, plan, inputs, by, launch) {
            if swiglu {
                // The GPU's swiglu takes exp as ex2.approx (the generated kernel's, so the fused launch
                // equals the unfused pair); the CPU's is exact: a few values land one step apart.
                assert!(a.max_abs <= 1.0 && a.differing * 200 <= a.elements, "{label}: {a}");
            } else {
                assert_eq!(a.differing, 0, "{label}: {a}");
            }
            let fast = usize::from(n != 188);
            assert_eq!(LAST_ROUTED.with(|r| r.get()), (fast, 0), "{label}: route");
        }
    }
}

/// Host quantization of one value as the generated epilogue (and common.cuh `OutQuant`) does it.
fn quantize_like_the_epilogue(y: f32, step: f32, (lo, hi): (i64, i64)) -> f64 {
    f64::from((y / step).round_ties_even().clamp(lo as f32, hi as f32))
}

#[test]
fn attention_quantized_in_its_epilogue_equals_its_float_output_quantized() {
    if !nvrtc::nvrtc_available() {
        eprintln!("SKIPPED: libnvrtc.so.13 not found");
        return;
    }
    // `attention_f32[_mask]_q{i16,i8}` (compiler/src/lower/micro.rs `fused_quant`): steps per head
    // and channel, 16-bit clamps for positions (+ past) below `prefix`, the output in [B, S, H, D]
    // order (o_proj's) or [B, H, S, D]. Checked against the same plan's float launch, quantized on the
    // host: the fast decode (S = 1), mid (S = 7) and prefill (S = 300) kernels at D = 128 / 64, and
    // the micro-kernel (D = 32, which the fast kernels decline).
    for (seed, (b, hq, s, t, d), transposed, prefix, past, to) in [
        (41u64, (1usize, 32usize, 1usize, 516usize, 128usize), true, 1usize, 515usize, DType::I4),
        (42, (1, 32, 1, 40, 128), true, 1, 0, DType::I4),
        (43, (2, 8, 7, 520, 128), false, 2, 1, DType::I4),
        (44, (1, 8, 300, 300, 64), true, 1, 0, DType::I4),
        (45, (2, 4, 5, 9, 32), true, 0, 0, DType::I8),
        (46, (1, 32, 1, 300, 128), false, 0, 0, DType::I8),
    ] {
        let mut rng = Rng(seed);
        let mut tensor = |dims: &[usize], scale: f32| {
            let n = dims.iter().product();
            RtTensor::from_vec(dims, (0..n).map(|_| rng.float() * scale).collect::<Vec<f32>>()).unwrap()
        };
        let (q, k, v) = (tensor(&[b, hq, s, d], 2.0), tensor(&[b, hq, t, d], 2.0), tensor(&[b, hq, t, d], 1.0));
        let step: Vec<f32> = (0..hq * d).map(|_| 0.01 + 0.05 * rng.float().abs()).collect();
        let out_dtype = if prefix > 0 { DType::I16 } else { to };
        let mut g = Graph::new("t");
        let ins: Vec<_> = [("q", [b, hq, s, d]), ("k", [b, hq, t, d]), ("v", [b, hq, t, d])]
            .iter()
            .map(|(n, dims)| g.add_input(n, TensorType::known(DType::F32, dims)).unwrap())
            .collect();
        let scale = 0.088f32;
        let op = Op::new(OpKind::Attention)
            .with("scale", qcc_ir::Attr::Float(scale))
            .with("causal", qcc_ir::Attr::Int(1))
            .with("to", qcc_ir::Attr::DType(to))
            .with("step", qcc_ir::Attr::Tensor(Tensor::from_slice(vec![hq * d], &step)));
        let y = g.add_op(op, &ins, TensorType::known(out_dtype, &[b, hq, s, d]));
        g.add_output("y", y);
        let step_name = format!("{}.step", g.value_name(y));
        let out_dims = if transposed { [b, s, hq, d] } else { [b, hq, s, d] };
        let run = |quantized: bool| -> Option<Vec<f64>> {
            let mut plan = Plan { buffers: vec![], arena: 0 };
            let (bq, bk, bv) = (
                plan.arena("q", DType::F32, &[b, hq, s, d]),
                plan.arena("k", DType::F32, &[b, hq, t, d]),
                plan.arena("v", DType::F32, &[b, hq, t, d]),
            );
            let by = if quantized {
                plan.arena("y", out_dtype, &out_dims)
            } else {
                plan.arena("y", DType::F32, &[b, hq, s, d])
            };
            let bstep = plan.weight(&step_name, DType::F32, &[hq * d]);
            let mut args = vec![Arg::Buffer(bq), Arg::Buffer(bk), Arg::Buffer(bv), Arg::Buffer(by)];
            for x in [b, hq, hq, s, t, d, d, 1] {
                args.push(Arg::I64(c(x as i64)));
            }
            args.push(Arg::F32(scale));
            args.extend(kv_strides([b, hq, t, d], false).map(Arg::I64));
            args.extend(kv_strides([b, hq, t, d], false).map(Arg::I64));
            let mut entry = "attention_f32".to_string();
            if quantized {
                let (lo, hi) = to.int_range().unwrap();
                let (plo, phi) = if prefix > 0 { DType::I16.int_range().unwrap() } else { (lo, hi) };
                args.extend([
                    Arg::Buffer(bstep),
                    Arg::I64(c(s as i64)),
                    Arg::I64(c(past as i64)),
                    Arg::I64(c(prefix as i64)),
                ]);
                args.extend([lo, hi, plo, phi].map(|v| Arg::F32(v as f32)));
                let (osh, oss) = if transposed { (d, hq * d) } else { (s * d, d) };
                args.extend([Arg::I64(c(osh as i64)), Arg::I64(c(oss as i64))]);
                entry = format!("attention_f32_q{}", if out_dtype == DType::I16 { "i16" } else { "i8" });
            }
            let launch = Launch {
                node: "attention".into(),
                module: "attention".into(),
                entry,
                grid: [c(s as i64), c(hq as i64), c(b as i64)],
                block: [128, 1, 1],
                shared_bytes: 4 * t as u32,
                args,
            };
            let inputs = [("q", q.clone(), bq), ("k", k.clone(), bk), ("v", v.clone(), bv)];
            let dir = write_artifact("attention quantized", &g, plan, &inputs, &[("y", by)], vec![launch]);
            // SAFETY: only probes dlopen for libcuda.
            if !unsafe { cudarc::driver::sys::is_culib_present() } {
                return None;
            }
            let mut gpu = CudaExecutor::load(dir.path(), 0).unwrap();
            gpu.set_sync_each(true);
            let feed: Vec<(&str, RtTensor)> = inputs.iter().map(|(n, t, _)| (*n, t.clone())).collect();
            Some(gpu.run(&feed).unwrap()[0].1.to_f64_vec())
        };
        let label = format!(
            "attention_f32_q B={b} H={hq} S={s} T={t} D={d} transposed={transposed} prefix={prefix} past={past}"
        );
        let (Some(float), Some(got)) = (run(false), run(true)) else {
            eprintln!("{label}: plans ok; GPU part SKIPPED: no CUDA driver");
            continue;
        };
        let mut differing = 0;
        for bi in 0..b {
            for h in 0..hq {
                for si in 0..s {
                    let range =
                        if si + past < prefix { DType::I16.int_range().unwrap() } else { to.int_range().unwrap() };
                    for di in 0..d {
                        let y = float[((bi * hq + h) * s + si) * d + di] as f32;
                        let want = quantize_like_the_epilogue(y, step[h * d + di], range);
                        let at = if transposed {
                            ((bi * s + si) * hq + h) * d + di
                        } else {
                            ((bi * hq + h) * s + si) * d + di
                        };
                        differing += usize::from(got[at] != want);
                    }
                }
            }
        }
        println!("{label}: {differing} of {} differ", got.len());
        assert_eq!(differing, 0, "{label}");
    }
}

#[test]
fn a_hadamard_launch_whose_size_is_not_its_input_width_is_a_plan_problem() {
    if !nvrtc::nvrtc_available() {
        eprintln!("SKIPPED: libnvrtc.so.13 not found");
        return;
    }
    // The executor reads n as the second size after the buffers (x or g, u; out): a fused launch
    // whose n sits elsewhere, or a wrong n, must fail the plan check, not build a wrong H on the GPU.
    let (rows, n) = (3usize, 64usize);
    for (label, size) in [("(bad plan) n = rows", rows), ("n = width", n)] {
        let (g, plan, [bx, by], launch) = hadamard_f32_case(rows, n, size);
        let x = RtTensor::from_vec(&[rows, n], vec![1.0f32; rows * n]).unwrap();
        let dir = write_artifact(label, &g, plan, &[("x", x, bx)], &[("y", by)], vec![launch]);
        let problems = executor::check_plan(dir.path()).unwrap();
        if size == n {
            assert!(problems.is_empty(), "{label}: {problems:?}");
        } else {
            assert!(problems.iter().any(|p| p.contains("size n = 3")), "{label}: {problems:?}");
        }
    }
}

#[test]
fn attention_matches_the_cpu_with_gqa_causal_offset_and_mask() {
    if !nvrtc::nvrtc_available() {
        eprintln!("SKIPPED: libnvrtc.so.13 not found");
        return;
    }
    // S < T: queries are the last S of T positions (decode-like causal offset); 6 query heads share 2
    // KV heads; Dv != D.
    let (b, hq, hkv, s, t, d, dv) = (2usize, 6usize, 2usize, 5usize, 9usize, 32usize, 16usize);
    for (seed, dtype, with_mask) in [(21u64, DType::F32, false), (22, DType::F32, true), (23, DType::F16, false)] {
        let mut rng = Rng(seed);
        let mut tensor = |dims: &[usize], scale: f32| {
            let n = dims.iter().product();
            RtTensor::from_vec(dims, (0..n).map(|_| rng.float() * scale).collect::<Vec<f32>>()).unwrap().cast(dtype)
        };
        let (q, k, v) = (tensor(&[b, hq, s, d], 2.0), tensor(&[b, hkv, t, d], 2.0), tensor(&[b, hkv, t, dv], 1.0));
        let mask = tensor(&[s, t], 3.0).cast(DType::F32);
        let mut g = Graph::new("t");
        let qv = g.add_input("q", TensorType::known(dtype, &[b, hq, s, d])).unwrap();
        let kv = g.add_input("k", TensorType::known(dtype, &[b, hkv, t, d])).unwrap();
        let vv = g.add_input("v", TensorType::known(dtype, &[b, hkv, t, dv])).unwrap();
        let mut ins = vec![qv, kv, vv];
        if with_mask {
            ins.push(g.add_input("mask", TensorType::known(DType::F32, &[s, t])).unwrap());
        }
        let scale = 0.17f32;
        let op =
            Op::new(OpKind::Attention).with("scale", qcc_ir::Attr::Float(scale)).with("causal", qcc_ir::Attr::Int(1));
        let y = g.add_op(op, &ins, TensorType::known(dtype, &[b, hq, s, dv]));
        g.add_output("y", y);
        let mut plan = Plan { buffers: vec![], arena: 0 };
        let (bq, bk, bv) = (
            plan.arena("q", dtype, &[b, hq, s, d]),
            plan.arena("k", dtype, &[b, hkv, t, d]),
            plan.arena("v", dtype, &[b, hkv, t, dv]),
        );
        let bm = with_mask.then(|| plan.arena("mask", DType::F32, &[s, t]));
        let by = plan.arena("y", dtype, &[b, hq, s, dv]);
        let mut args = vec![Arg::Buffer(bq), Arg::Buffer(bk), Arg::Buffer(bv)];
        args.extend(bm.map(Arg::Buffer));
        args.push(Arg::Buffer(by));
        for x in [b, hq, hkv, s, t, d, dv, 1] {
            args.push(Arg::I64(c(x as i64)));
        }
        args.push(Arg::F32(scale));
        args.extend(kv_strides([b, hkv, t, d], false).map(Arg::I64));
        args.extend(kv_strides([b, hkv, t, dv], false).map(Arg::I64));
        let entry = format!("attention_{}{}", dtype.name(), if with_mask { "_mask" } else { "" });
        let launch = Launch {
            node: "attention".into(),
            module: "attention".into(),
            entry: entry.clone(),
            grid: [c(s as i64), c(hq as i64), c(b as i64)],
            block: [128, 1, 1],
            shared_bytes: 4 * t as u32,
            args,
        };
        let mut inputs = vec![("q", q, bq), ("k", k, bk), ("v", v, bv)];
        if let Some(bm) = bm {
            inputs.push(("mask", mask, bm));
        }
        if let Some(a) = run_case(&entry, &g, plan, inputs, by, launch) {
            let tol = if dtype == DType::F16 { 2e-3 } else { 1e-5 };
            assert!(a.non_finite == 0 && a.max_rel < tol, "{entry}: {a}");
        }
    }
}
/// The batch, head and row strides of keys (or values) [b, hkv, t, d]: contiguous, or positions
/// first as a resident KV cache stores them ([t, b, hkv, d], compiler/src/lower/mod.rs).
fn kv_strides([b, hkv, t, d]: [usize; 4], positions_first: bool) -> [DimExpr; 3] {
    let s = if positions_first { [hkv * d, d, b * hkv * d] } else { [hkv * t * d, t * d, d] };
    s.map(|x| c(x as i64))
}

/// One attention case run twice in one artifact: launch 0 as micro.rs plans it (the executor routes
/// it to the fast kernels) and launch 1, the same attention into a second output with the head size
/// given as an expression (1 * D), which the route declines: it stays on the micro-kernel. q
/// [1, hq, s, d], k and v [1, hkv, t, d] of `dtype` (random, non-zero), causal or not, with a mask
/// input (`mask`: "causal" = 0 / -inf after the diagonal, "random" = values in [-3, 3]) or none; k
/// and v stored positions first when `positions_first` (uploaded through the buffer's order, read
/// at their strides).
struct AttentionArtifact {
    graph: Graph,
    plan: Plan,
    inputs: Vec<(&'static str, RtTensor, u32)>,
    /// (fast, micro) output buffers.
    outputs: [u32; 2],
    launches: Vec<Launch>,
    label: String,
}

fn attention_artifact(
    seed: u64,
    dtype: DType,
    (hq, hkv, s, t, d): (usize, usize, usize, usize, usize),
    causal: bool,
    mask: Option<&str>,
    positions_first: bool,
) -> AttentionArtifact {
    let b = 1usize;
    let mut rng = Rng(seed);
    let mut tensor = |dims: &[usize], scale: f32| {
        let n = dims.iter().product();
        RtTensor::from_vec(dims, (0..n).map(|_| rng.float() * scale).collect::<Vec<f32>>()).unwrap().cast(dtype)
    };
    let (q, k, v) = (tensor(&[b, hq, s, d], 2.0), tensor(&[b, hkv, t, d], 2.0), tensor(&[b, hkv, t, d], 1.0));
    let mask_t = match mask {
        Some("causal") => {
            let vals: Vec<f32> =
                (0..s * t).map(|i| if i % t + s > t + i / t { f32::NEG_INFINITY } else { 0.0 }).collect();
            Some(RtTensor::from_vec(&[s, t], vals).unwrap().cast(dtype))
        }
        Some(_) => Some(tensor(&[s, t], 3.0)),
        None => None,
    };
    let mut g = Graph::new("t");
    let qv = g.add_input("q", TensorType::known(dtype, &[b, hq, s, d])).unwrap();
    let kv = g.add_input("k", TensorType::known(dtype, &[b, hkv, t, d])).unwrap();
    let vv = g.add_input("v", TensorType::known(dtype, &[b, hkv, t, d])).unwrap();
    let mut ins = vec![qv, kv, vv];
    if mask_t.is_some() {
        ins.push(g.add_input("mask", TensorType::known(dtype, &[s, t])).unwrap());
    }
    let scale = 1.0 / (d as f32).sqrt();
    for name in ["y", "y_micro"] {
        let op = Op::new(OpKind::Attention)
            .with("scale", qcc_ir::Attr::Float(scale))
            .with("causal", qcc_ir::Attr::Int(causal as i64));
        let y = g.add_op(op, &ins, TensorType::known(dtype, &[b, hq, s, d]));
        g.add_output(name, y);
    }
    let mut plan = Plan { buffers: vec![], arena: 0 };
    let (bq, bk, bv) = (
        plan.arena("q", dtype, &[b, hq, s, d]),
        plan.arena("k", dtype, &[b, hkv, t, d]),
        plan.arena("v", dtype, &[b, hkv, t, d]),
    );
    if positions_first {
        for id in [bk, bv] {
            plan.buffers[id as usize].order = Some(vec![2, 0, 1, 3]);
        }
    }
    let bm = mask_t.as_ref().map(|_| plan.arena("mask", dtype, &[s, t]));
    let outputs = [plan.arena("y", dtype, &[b, hq, s, d]), plan.arena("y_micro", dtype, &[b, hq, s, d])];
    let entry = format!("attention_{}{}", dtype.name(), if mask_t.is_some() { "_mask" } else { "" });
    let launches = outputs
        .iter()
        .map(|&by| {
            let mut args = vec![Arg::Buffer(bq), Arg::Buffer(bk), Arg::Buffer(bv)];
            args.extend(bm.map(Arg::Buffer));
            args.push(Arg::Buffer(by));
            for x in [b, hq, hkv, s, t] {
                args.push(Arg::I64(c(x as i64)));
            }
            let head = if by == outputs[0] { c(d as i64) } else { DimExpr::Mul(Box::new(c(1)), Box::new(c(d as i64))) };
            args.extend([Arg::I64(head.clone()), Arg::I64(head), Arg::I64(c(causal as i64)), Arg::F32(scale)]);
            for _ in 0..2 {
                args.extend(kv_strides([b, hkv, t, d], positions_first).map(Arg::I64));
            }
            Launch {
                node: "attention".into(),
                module: "attention".into(),
                entry: entry.clone(),
                grid: [c(s as i64), c(hq as i64), c(b as i64)],
                block: [128, 1, 1],
                shared_bytes: 4 * t as u32,
                args,
            }
        })
        .collect();
    let mut inputs = vec![("q", q, bq), ("k", k, bk), ("v", v, bv)];
    if let (Some(m), Some(bm)) = (mask_t, bm) {
        inputs.push(("mask", m, bm));
    }
    let label = format!(
        "{entry} hq={hq} hkv={hkv} s={s} t={t} d={d} causal={causal} mask={mask:?} positions_first={positions_first}"
    );
    AttentionArtifact { graph: g, plan, inputs, outputs, launches, label }
}

/// Runs [`attention_artifact`]: the fast kernels' output must equal the micro-kernel's bit for bit,
/// and both agree with the CPU executor (bit for bit where the CPU's products are single FMA chains;
/// its GEMMs split long ones, so within 1e-5 relative in f32, 2e-3 in f16 / bf16). Returns
/// whether the GPU part ran.
fn attention_exact_case(
    seed: u64,
    dtype: DType,
    shape: (usize, usize, usize, usize, usize),
    causal: bool,
    mask: Option<&str>,
    positions_first: bool,
) -> bool {
    let AttentionArtifact { graph, plan, inputs, outputs, launches, label } =
        attention_artifact(seed, dtype, shape, causal, mask, positions_first);
    let dir = write_artifact(&label, &graph, plan, &inputs, &[("y", outputs[0]), ("y_micro", outputs[1])], launches);
    let feed: Vec<(&str, RtTensor)> = inputs.iter().map(|(n, t, _)| (*n, t.clone())).collect();
    let want = CpuExecutor::new(&graph).unwrap().run(&feed).unwrap_or_else(|e| panic!("{label}: CPU: {e}"));
    // SAFETY: only probes dlopen for libcuda.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        eprintln!("{label}: plan ok; GPU part SKIPPED: no CUDA driver");
        return false;
    }
    let mut gpu = CudaExecutor::load(dir.path(), 0).unwrap_or_else(|e| panic!("{label}: {e}"));
    gpu.set_sync_each(true);
    let routed = std::env::var_os("QCC_FAST_LINEAR").is_none_or(|v| v != "0");
    assert_eq!((gpu.is_routed(0), gpu.is_routed(1)), (routed, false), "{label}: launch 0 on the fast kernels");
    let got = gpu.run(&feed).unwrap_or_else(|e| panic!("{label}: {e}"));
    let exact = compare::agreement(&got[0].1, &got[1].1).unwrap();
    let cpu = compare::agreement(&got[0].1, &want[0].1).unwrap();
    println!("{label}: fast vs micro-kernel {exact}; vs CPU {cpu}");
    assert!(exact.differing == 0 && exact.non_finite == 0, "{label}: fast vs micro-kernel: {exact}");
    let tol = if dtype == DType::F32 { 1e-5 } else { 2e-3 };
    assert!(cpu.non_finite == 0 && cpu.max_rel < tol, "{label}: vs CPU: {cpu}");
    true
}

#[test]
fn attention_on_the_fast_kernels_matches_the_micro_kernel_bit_for_bit() {
    if !nvrtc::nvrtc_available() {
        eprintln!("SKIPPED: libnvrtc.so.13 not found");
        return;
    }
    // Decode (one query row: the decode kernel, channels split over blocks), T = 1, 37, 516; a few
    // rows and S = T = 77 with 8 heads (80 row tiles x heads: the tiled kernel split by channels);
    // S = T = 300 (the tiled prefill: scores, softmax, p v); causal, with an explicit causal mask, with a random mask and
    // without causality; GQA 8 / 2; D = 64 and 128; f32, f16, bf16.
    let mut seed = 100u64;
    let mut case = |dtype: DType, shape: (usize, usize, usize, usize, usize), causal: bool, mask: Option<&str>| {
        seed += 1;
        attention_exact_case(seed, dtype, shape, causal, mask, false)
    };
    for d in [64usize, 128] {
        for t in [1usize, 37, 516] {
            case(DType::F32, (8, 2, 1, t, d), true, None);
        }
        case(DType::F32, (8, 8, 1, 516, d), true, None);
        case(DType::F32, (8, 2, 5, 37, d), true, None);
        for s in [77usize, 300] {
            case(DType::F32, (8, 2, s, s, d), true, None);
            case(DType::F32, (8, 2, s, s, d), false, Some("causal"));
        }
        case(DType::F32, (8, 2, 77, 77, d), true, Some("random"));
        case(DType::F32, (8, 2, 300, 300, d), false, None);
        case(DType::F32, (4, 2, 40, 300, d), true, None);
        case(DType::F16, (8, 2, 1, 516, d), true, None);
        case(DType::F16, (8, 2, 77, 77, d), true, None);
        case(DType::F16, (8, 2, 77, 77, d), false, Some("causal"));
        case(DType::F16, (8, 2, 77, 77, d), true, Some("random"));
    }
    case(DType::BF16, (8, 2, 1, 37, 128), true, None);
    case(DType::BF16, (8, 2, 77, 77, 128), true, None);
    // The tiled prefill (three launches) in 16-bit types, with and without the mask, and a tail of
    // rows and keys that is no multiple of its 64-row / 64-key / 32-key tiles.
    for d in [64usize, 128] {
        case(DType::F16, (8, 2, 300, 300, d), true, None);
        case(DType::F16, (8, 2, 300, 300, d), false, Some("random"));
        case(DType::BF16, (8, 2, 300, 300, d), true, None);
    }
    case(DType::F32, (32, 8, 131, 259, 128), true, None);
}

#[test]
fn attention_reads_a_resident_kv_cache_stored_positions_first() {
    if !nvrtc::nvrtc_available() {
        eprintln!("SKIPPED: libnvrtc.so.13 not found");
        return;
    }
    // K and V uploaded through the buffer order [2, 0, 1, 3] ([T, B, Hkv, D]) and read at those
    // strides: decode, a few rows and prefill on the fast kernels, bit for bit the micro-kernel's
    // (which reads the same strides), and the CPU's values.
    let mut seed = 300u64;
    for (dtype, shape, mask) in [
        (DType::F32, (8, 2, 1, 516, 128), None),
        (DType::F32, (8, 8, 1, 37, 64), Some("random")),
        (DType::F32, (8, 2, 5, 300, 128), None),
        (DType::F32, (8, 2, 300, 300, 64), None),
        (DType::F16, (8, 2, 1, 516, 128), None),
        (DType::F16, (8, 2, 77, 77, 128), Some("causal")),
    ] {
        seed += 1;
        attention_exact_case(seed, dtype, shape, mask.is_none(), mask, true);
    }
}

/// Llama-2-7B-shaped attention (Hq = Hkv = 32, D = 128, causal or with a causal mask): decode
/// (S = 1, T = 516 and 4096), a few rows (S = 7, 16) and prefill (S = T = 2048), f32 and f16, on the fast
/// kernels (launch 0) and the micro-kernel (launch 1), each timed over repeated launches; outputs
/// bit for bit equal. GPU only: `cargo test --release -p qcc-runtime --features cuda --test
/// cuda_executor -- --ignored --nocapture attention_fast_kernels_at_llama`.
#[test]
#[ignore]
fn attention_fast_kernels_at_llama_7b_shapes_match_the_micro_kernel_and_are_timed() {
    // SAFETY: only probes dlopen for libcuda.
    if !nvrtc::nvrtc_available() || !unsafe { cudarc::driver::sys::is_culib_present() } {
        eprintln!("SKIPPED: needs libnvrtc and a CUDA driver");
        return;
    }
    let cases = [
        (DType::F32, 1usize, 516usize, None),
        (DType::F16, 1, 516, None),
        (DType::F32, 1, 4096, None),
        (DType::F32, 7, 4096, None),
        (DType::F32, 16, 2048, None),
        (DType::F32, 2048, 2048, None),
        (DType::F16, 2048, 2048, None),
        (DType::F32, 2048, 2048, Some("causal")),
    ];
    for (dtype, s, t, mask) in cases {
        let AttentionArtifact { graph, plan, inputs, outputs, launches, label } =
            attention_artifact(7, dtype, (32, 32, s, t, 128), mask.is_none(), mask, false);
        let outs = [("y", outputs[0]), ("y_micro", outputs[1])];
        let dir = write_artifact(&label, &graph, plan, &inputs, &outs, launches);
        let feed: Vec<(&str, RtTensor)> = inputs.iter().map(|(n, t, _)| (*n, t.clone())).collect();
        let mut gpu = CudaExecutor::load(dir.path(), 0).unwrap_or_else(|e| panic!("{label}: {e}"));
        assert!(gpu.is_routed(0) && !gpu.is_routed(1), "{label}");
        let values = gpu.prepare(&feed).unwrap();
        let iters = if s * t > 1 << 20 { 5 } else { 200 };
        let mut ms = [0f64; 2];
        for (i, m) in ms.iter_mut().enumerate() {
            gpu.launch_one(i, &values).unwrap();
            gpu.gpu().stream.synchronize().unwrap();
            let start = std::time::Instant::now();
            for _ in 0..iters {
                gpu.launch_one(i, &values).unwrap();
            }
            gpu.gpu().stream.synchronize().unwrap();
            *m = start.elapsed().as_secs_f64() * 1e3 / iters as f64;
        }
        let got = gpu.outputs(&values).unwrap();
        let a = compare::agreement(&got[0].1, &got[1].1).unwrap();
        println!(
            "{label}: fast {:.4} ms, micro-kernel {:.4} ms per launch ({:.1}x); fast vs micro {a}",
            ms[0],
            ms[1],
            ms[1] / ms[0]
        );
        assert!(a.differing == 0 && a.non_finite == 0, "{label}: {a}");
    }
}

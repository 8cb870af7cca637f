//! `qcc-run`: the runtime's GPU driver program (built with `--features cuda`, no MLIR, small enough to
//! carry to a GPU machine).
//!
//! ```text
//! qcc-run info                 device, NVRTC, kernel compile summary
//! qcc-run ptx DIR              write every kernel's PTX to DIR/<file>.ptx (fallback input, QCC_PTX_DIR)
//! qcc-run check [--only PREFIX] every W4 kernel variant against the exact CPU reference (bit-exact)
//! qcc-run bench [--quick] [--m 1,16,128,2048] [--out FILE]
//!                              W4 kernels vs cuBLAS fp16 at Llama-2-7B / SmolLM2 shapes (--quick: Llama
//!                              only), M = 1, 16, 128, 2048 by default; GEMM variants are timed only
//!                              after a bit-exact check on the device
//! qcc-run bench --e2e [--past N] [--batches 1,16] [--prefill T] [--layers L] [--out FILE]
//!                              Llama-2-7B-shaped decoder from runtime kernels: prefill of T tokens
//!                              (default 2048, 0 skips) and decode, W4A4 vs fp16 (src/cuda/e2e.rs)
//! qcc-run run ART --input NAME=FILE.npy.. [--output-dir DIR] [--reference DIR] [--tolerance T] [--repeat N [--graph]] [--profile]
//!                              run a compiled artifact (model.qcc) on the GPU; compare every output with
//!                              DIR/<name>.npy (integers exactly, floats by max relative error <= T, default 1e-3);
//!                              --profile times each launch alone and sums the times per kernel module.
//!                              Linears and hadamards run on the tuned kernels (QCC_FAST_LINEAR=0: the
//!                              plan's micro-kernels); QCC_SYNTHETIC_WEIGHTS=SEED loads an artifact without
//!                              its weights file (random weights made on the device; timing only)
//! qcc-run plan ART              GPU-less check of the plan: every launch's entry exists in its module (micro-
//!                              kernels compiled with NVRTC) and its parameters match the launch's arguments
//! qcc-run verify ART --input NAME=FILE.npy.. [--tolerance T]
//!                              run the artifact's graph on the CPU executor here and compare, after every
//!                              launch, each buffer it touched with the CPU's value of that name
//!                              (integers exactly, floats by max relative error)
//! qcc-run generate ART --ids FILE.npy [--max-tokens N] [--batch B] [--check] [--profile] [--time-prefill]
//!                              greedy decoding with the KV cache kept on the device (an artifact compiled
//!                              from a model with past_key_values.* inputs and present.* outputs); one
//!                              decode step is also timed as a CUDA graph; --batch B decodes B copies of
//!                              the prompt side by side (a plan compiled with --max-batch >= B) and
//!                              reports tokens/s at that batch; --check (batch 1) recomputes the whole
//!                              sequence without cache on the GPU and on the CPU executor and compares;
//!                              --time-prefill first times the prompt's forward into an empty cache
//! qcc-run eval ART --ids FILE.npy [--ctx N] [--windows W] [--check [--tolerance T]]
//!                              perplexity of a token sequence (ids from `qcc tokenizer`/numpy) on the GPU
//! ```
//! Exit status: 0 on success, 1 on a failed check or error, 2 on bad usage, 3 when no GPU is present.

use std::io::Write;
use std::process::ExitCode;

use qcc_ir::DType;
use qcc_runtime::artifact::{compare, npy};
use qcc_runtime::cuda::{bench, check, nvrtc, CudaError, CudaExecutor, CudaKvDecoder, CudaLm, Gpu};
use qcc_runtime::{Logits, RtTensor};

fn open_gpu() -> Result<Gpu, ExitCode> {
    match Gpu::new(0) {
        Ok(gpu) => {
            println!("device: {}", gpu.describe());
            Ok(gpu)
        }
        Err(e @ (CudaError::NoDriver | CudaError::NoDevice { .. })) => {
            println!("SKIPPED: {e}");
            Err(ExitCode::from(3))
        }
        Err(e) => {
            eprintln!("error: {e}");
            Err(ExitCode::from(1))
        }
    }
}

fn info() -> Result<(), CudaError> {
    println!("nvrtc preloaded from: {:?}; libnvrtc loadable: {}", nvrtc::preload_nvrtc(), nvrtc::nvrtc_available());
    for (name, _) in nvrtc::KERNEL_SOURCES {
        let ptx = nvrtc::compile_ptx(name)?;
        println!("{name}.cu: {} bytes of PTX", ptx.len());
    }
    Ok(())
}

fn run_check(gpu: &Gpu, only: Option<&str>) -> Result<bool, CudaError> {
    let mut ok = true;
    for case in check::standard_cases() {
        if only.is_some_and(|p| !case.kernel.name().starts_with(p)) {
            continue;
        }
        let report = check::run_case(gpu, case)?;
        ok &= report.mismatches == 0;
        println!("{} {report}", if report.mismatches == 0 { "PASS" } else { "FAIL" });
    }
    Ok(ok)
}

fn run_bench(gpu: &Gpu, quick: bool, batches: &[usize], out: Option<&str>) -> Result<(), CudaError> {
    let blas = cudarc::cublas::CudaBlas::new(gpu.stream.clone())?;
    let mut file =
        out.map(std::fs::File::create).transpose().map_err(|e| CudaError::Mismatch(format!("--out: {e}")))?;
    let mut emit = |line: String| {
        println!("{line}");
        if let Some(f) = file.as_mut() {
            let _ = writeln!(f, "{line}");
        }
    };
    let copy = bench::copy_bandwidth_gbps(gpu)?;
    emit(format!("device-to-device copy: {copy:.0} GB/s (read + write)"));
    let mut rows = Vec::new();
    let shapes: Vec<_> = if quick { bench::SHAPES[..3].to_vec() } else { bench::SHAPES.to_vec() };
    for (i, shape) in shapes.iter().enumerate() {
        for &m in batches {
            let row = bench::bench_one(gpu, &blas, *shape, m, 1000 + i as u64 * 17 + m as u64)?;
            for line in bench::format_row(&row) {
                emit(line);
            }
            rows.push(row);
        }
    }
    emit("== summary: best W4 variant vs cuBLAS fp16 (same run)".into());
    for row in &rows {
        let c = row.cublas.micros;
        let mut parts = vec![format!(
            "{:<9} {:<7} {:>5}x{:<5} M={:<4} cublas {:>8.2} us",
            row.shape.model, row.shape.name, row.shape.n, row.shape.k, row.m, c
        )];
        // w4a4p8: weights pre-unpacked to int8 (twice the weight bytes), not the int4 storage.
        for prefix in ["w4a4_gemv", "w4a8_gemv", "w4a4_gemm", "w4a4_wgmma", "w4a4_ws", "w4a4p8"] {
            if let Some(t) = bench::best(row, prefix) {
                parts.push(format!("{prefix} {:>8.2} us x{:.2} ({})", t.micros, c / t.micros, t.kernel));
            }
        }
        emit(parts.join(" | "));
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmd = args.first().map(String::as_str).unwrap_or("");
    let out = args.iter().position(|a| a == "--out").and_then(|i| args.get(i + 1)).map(String::as_str);
    let quick = args.iter().any(|a| a == "--quick");
    // `bench --m 128,2048`: the batch sizes to run (default bench::BATCHES).
    let batches: Vec<usize> = args
        .iter()
        .position(|a| a == "--m")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| bench::BATCHES.to_vec());
    // `check --only PREFIX`: only the kernels whose name starts with PREFIX.
    let only = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)).map(String::as_str);
    let result = match cmd {
        "info" => {
            if let Err(e) = info() {
                eprintln!("error: {e}");
                return ExitCode::from(1);
            }
            match open_gpu() {
                Ok(_) | Err(_) => return ExitCode::SUCCESS,
            }
        }
        "ptx" => {
            let Some(dir) = args.get(1) else {
                eprintln!("usage: qcc-run ptx DIR");
                return ExitCode::from(2);
            };
            let written = std::fs::create_dir_all(dir).map_err(|e| e.to_string()).and_then(|_| {
                nvrtc::KERNEL_SOURCES.iter().try_for_each(|(name, _)| {
                    let ptx = nvrtc::compile_ptx(name).map_err(|e| e.to_string())?;
                    std::fs::write(std::path::Path::new(dir).join(format!("{name}.ptx")), ptx)
                        .map_err(|e| e.to_string())
                })
            });
            return match written {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            };
        }
        "check" => match open_gpu() {
            Ok(gpu) => run_check(&gpu, only).map(|ok| if ok { ExitCode::SUCCESS } else { ExitCode::from(1) }),
            Err(code) => return code,
        },
        "bench" => match open_gpu() {
            // `--e2e` / `--profile`: runtime/src/cuda/e2e.rs; otherwise the kernel benchmark.
            Ok(gpu) => match bench::e2e::dispatch(&gpu, &args) {
                Some(r) => r.map(|ok| if ok { ExitCode::SUCCESS } else { ExitCode::from(1) }),
                None => run_bench(&gpu, quick, &batches, out).map(|_| ExitCode::SUCCESS),
            },
            Err(code) => return code,
        },
        "plan" => {
            let Some(dir) = args.get(1) else {
                eprintln!("usage: qcc-run plan ART");
                return ExitCode::from(2);
            };
            return match qcc_runtime::cuda::executor::check_plan(std::path::Path::new(dir)) {
                Ok(problems) if problems.is_empty() => {
                    println!("plan ok: every launch matches its kernel");
                    ExitCode::SUCCESS
                }
                Ok(problems) => {
                    problems.iter().for_each(|p| println!("PROBLEM {p}"));
                    ExitCode::from(1)
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            };
        }
        "run" | "eval" | "verify" | "generate" => {
            // SAFETY: only probes dlopen for libcuda.
            if !unsafe { cudarc::driver::sys::is_culib_present() } {
                println!("SKIPPED: no CUDA driver (libcuda could not be loaded)");
                return ExitCode::from(3);
            }
            let done = match cmd {
                "run" => run_artifact(&args[1..]),
                "verify" => verify_artifact(&args[1..]),
                "generate" => generate(&args[1..]),
                _ => eval_artifact(&args[1..]),
            };
            return match done {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            };
        }
        _ => {
            eprintln!(
                "usage: qcc-run info | ptx DIR | check [--only PREFIX] | bench [--quick] [--m LIST] [--out FILE] | run ART .. | eval ART .."
            );
            return ExitCode::from(2);
        }
    };
    result.unwrap_or_else(|e| {
        eprintln!("error: {e}");
        ExitCode::from(1)
    })
}

/// Values of a repeatable `--flag VALUE` option.
fn option_values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
    args.windows(2).filter(|w| w[0] == flag).map(|w| w[1].as_str()).collect()
}

fn option<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    option_values(args, flag).into_iter().last()
}

fn load_artifact(args: &[String]) -> Result<CudaExecutor, String> {
    let art = args.first().filter(|a| !a.starts_with("--")).ok_or("missing the artifact directory")?;
    let t0 = std::time::Instant::now();
    let exec = CudaExecutor::load(std::path::Path::new(art), 0).map_err(|e| e.to_string())?;
    println!(
        "device: {}\nloaded {art} ({} {}, {} launches, arena {:.1} MiB) in {:.2} s",
        exec.gpu().describe(),
        exec.manifest.model,
        exec.manifest.scheme,
        exec.manifest.launches.len(),
        exec.manifest.arena_bytes as f64 / (1u64 << 20) as f64,
        t0.elapsed().as_secs_f64()
    );
    let (w4, blas) = exec.routed_launches();
    println!(
        "routed to tuned kernels: {w4} int_linear (W4A4 GEMV/GEMM, 8-bit LM head), {blas} float linear (cuBLAS), {} hadamard (fast transform)",
        exec.routed_hadamards()
    );
    Ok(exec)
}

fn read_inputs(args: &[String]) -> Result<Vec<(String, RtTensor)>, String> {
    let mut inputs = Vec::new();
    for spec in option_values(args, "--input") {
        let (name, file) = spec.split_once('=').ok_or(format!("--input '{spec}' is not NAME=FILE.npy"))?;
        inputs.push((name.to_string(), npy::read(std::path::Path::new(file)).map_err(|e| e.to_string())?));
    }
    Ok(inputs)
}

/// `qcc-run verify`: every value the GPU computes against the CPU executor's, launch by launch.
fn verify_artifact(args: &[String]) -> Result<bool, String> {
    let mut exec = load_artifact(args)?;
    let inputs = read_inputs(args)?;
    let refs: Vec<(&str, RtTensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    let tolerance: f64 = option(args, "--tolerance")
        .map(|t| t.parse().map_err(|e| format!("--tolerance: {e}")))
        .transpose()?
        .unwrap_or(1e-3);
    let graph_path = exec.manifest.graph_path(&exec.dir).map_err(|e| e.to_string())?;
    let graph = qcc_ir::text::load(&graph_path).map_err(|e| format!("{}: {e}", graph_path.display()))?;
    let cpu = qcc_runtime::CpuExecutor::new(&graph).map_err(|e| e.to_string())?;
    let mut reference: std::collections::HashMap<String, RtTensor> = Default::default();
    let t0 = std::time::Instant::now();
    cpu.run_observed(&refs, &mut |v, t| {
        reference.insert(graph.value_name(v).to_string(), t.clone());
    })
    .map_err(|e| e.to_string())?;
    println!("CPU executor: {} values in {:.2} s", reference.len(), t0.elapsed().as_secs_f64());
    let values = exec.prepare(&refs).map_err(|e| e.to_string())?;
    let mut checked = std::collections::HashSet::new();
    let (mut ok, mut int_values, mut int_exact, mut worst_float) = (true, 0usize, 0usize, 0f64);
    for index in 0..exec.manifest.launches.len() {
        exec.launch_one(index, &values).map_err(|e| e.to_string())?;
        exec.gpu().stream.synchronize().map_err(|e| format!("launch {index}: {e}"))?;
        let launch = exec.manifest.launches[index].clone();
        for arg in &launch.args {
            let qcc_runtime::artifact::Arg::Buffer(id) = arg else { continue };
            let Some(buffer) = exec.manifest.buffer(*id).cloned() else { continue };
            let Some(cpu_value) = reference.get(&buffer.name) else { continue };
            if !checked.insert(*id) {
                continue;
            }
            let Some(gpu_value) = exec.read_buffer(*id, &values).map_err(|e| e.to_string())? else { continue };
            if gpu_value.len() != cpu_value.len() {
                println!(
                    "SKIP {:<48} {} elements on the GPU, {} on the CPU",
                    buffer.name,
                    gpu_value.len(),
                    cpu_value.len()
                );
                continue;
            }
            // The plan may store a value in the layout of a later transpose (a fused epilogue writes
            // [b, s, h, d] for an attention output [b, h, s, d]): compare in the buffer's layout.
            let Some(cpu_values) = in_layout(cpu_value, gpu_value.shape()) else {
                println!(
                    "SKIP {:<48} buffer dims {:?}, value dims {:?}",
                    buffer.name,
                    gpu_value.shape(),
                    cpu_value.shape()
                );
                continue;
            };
            let integer = !cpu_value.dtype().is_float();
            let a = compare::agreement_of_values(&gpu_value.to_f64_vec(), &cpu_values, integer);
            let pass = a.passes(tolerance);
            ok &= pass;
            if integer {
                int_values += 1;
                int_exact += usize::from(a.differing == 0);
            } else {
                worst_float = worst_float.max(a.max_rel);
            }
            println!(
                "{} [{index:>3} {}] {:<40} {:>6} {a}",
                if pass { "PASS" } else { "FAIL" },
                launch.entry,
                buffer.name,
                cpu_value.dtype().name()
            );
        }
    }
    println!(
        "verify: {} values compared; integer values exact: {int_exact} of {int_values}; worst float max rel {worst_float:.3e}; {}",
        checked.len(),
        if ok { "PASS" } else { "FAIL" }
    );
    Ok(ok)
}

/// The values of `t` in the row-major order of `dims`: as they are when the shapes agree (up to unit
/// dims), transposed when `dims` is a permutation of its non-unit dims that is unambiguous.
fn in_layout(t: &RtTensor, dims: &[usize]) -> Option<Vec<f64>> {
    let squeeze = |d: &[usize]| d.iter().copied().filter(|&x| x != 1).collect::<Vec<_>>();
    let (have, want) = (squeeze(t.shape()), squeeze(dims));
    if have == want {
        return Some(t.to_f64_vec());
    }
    let mut perm = Vec::new();
    for w in &want {
        let mut hits = have.iter().enumerate().filter(|(_, h)| *h == w);
        let (i, _) = hits.next()?;
        if hits.next().is_some() || perm.contains(&i) {
            return None;
        }
        perm.push(i);
    }
    if perm.len() != have.len() {
        return None;
    }
    let a = t.cast_array::<f64>().into_shape_with_order(ndarray::IxDyn(&have)).ok()?;
    Some(a.permuted_axes(ndarray::IxDyn(&perm)).iter().copied().collect())
}

/// `--profile`: every launch timed alone (synchronized, median of 5), summed per kernel module
/// (routed launches under "routed:<module>"), and the 12 slowest launches.
fn profile_launches(exec: &mut CudaExecutor, refs: &[(&str, RtTensor)]) -> Result<(), String> {
    let values = exec.prepare(refs).map_err(|e| e.to_string())?;
    profile_prepared(exec, &values)
}

/// [`profile_launches`] for inputs already in place (a KV-cache decode step).
fn profile_prepared(exec: &CudaExecutor, values: &qcc_runtime::artifact::SymbolValues) -> Result<(), String> {
    let values = values.clone();
    let sync = |exec: &CudaExecutor| exec.gpu().stream.synchronize().map_err(|e| e.to_string());
    let mut rows: Vec<(f64, usize)> = Vec::new();
    for i in 0..exec.manifest.launches.len() {
        let mut t = Vec::new();
        for _ in 0..5 {
            sync(exec)?;
            let t0 = std::time::Instant::now();
            exec.launch_one(i, &values).map_err(|e| e.to_string())?;
            sync(exec)?;
            t.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        t.sort_by(f64::total_cmp);
        rows.push((t[2], i));
    }
    let total: f64 = rows.iter().map(|r| r.0).sum();
    let mut per_module: std::collections::BTreeMap<String, (f64, usize)> = Default::default();
    for &(ms, i) in &rows {
        let l = &exec.manifest.launches[i];
        let key = if exec.is_routed(i) { format!("routed:{}", l.module) } else { l.module.clone() };
        let e = per_module.entry(key).or_default();
        e.0 += ms;
        e.1 += 1;
    }
    println!("profile: {} launches, {total:.3} ms timed one by one (host-synchronized)", rows.len());
    let mut modules: Vec<_> = per_module.into_iter().collect();
    modules.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
    for (m, (ms, n)) in modules {
        println!("profile module {m:<24} {n:>4} launches {ms:>9.3} ms {:>5.1}%", 100.0 * ms / total.max(1e-9));
    }
    rows.sort_by(|a, b| b.0.total_cmp(&a.0));
    for &(ms, i) in rows.iter().take(12) {
        let l = &exec.manifest.launches[i];
        println!("profile launch {i:>4} {ms:>8.3} ms {}::{} ({})", l.module, l.entry, l.node);
    }
    Ok(())
}

/// `qcc-run run`: outputs written and/or compared with CPU reference outputs. Ok(false) = mismatch.
fn run_artifact(args: &[String]) -> Result<bool, String> {
    let mut exec = load_artifact(args)?;
    let inputs = read_inputs(args)?;
    let refs: Vec<(&str, RtTensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    let repeat: usize =
        option(args, "--repeat").map(|r| r.parse().map_err(|e| format!("--repeat: {e}"))).transpose()?.unwrap_or(0);
    let t0 = std::time::Instant::now();
    let outputs = exec.run(&refs).map_err(|e| e.to_string())?;
    println!("first run (inputs, prologue, launches, outputs): {:.2} ms", t0.elapsed().as_secs_f64() * 1e3);
    if repeat > 0 {
        // Inputs and host-prologue values live in arena ranges that later buffers reuse: upload them
        // again before every replay (outside the timed region).
        let values = exec.prepare(&refs).map_err(|e| e.to_string())?;
        let mut times = Vec::new();
        for _ in 0..repeat {
            exec.prepare(&refs).map_err(|e| e.to_string())?;
            exec.gpu().stream.synchronize().map_err(|e| e.to_string())?;
            let t = std::time::Instant::now();
            exec.launch_all(&values).map_err(|e| e.to_string())?;
            exec.gpu().stream.synchronize().map_err(|e| e.to_string())?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        println!("launches only: median {:.3} ms over {repeat} runs (min {:.3})", times[repeat / 2], times[0]);
        if args.iter().any(|a| a == "--graph") {
            // The same launches as one CUDA graph: replay time, and outputs identical to the eager run's.
            let graph = exec.capture(&values).map_err(|e| e.to_string())?;
            let mut times = Vec::new();
            for _ in 0..repeat {
                exec.prepare(&refs).map_err(|e| e.to_string())?;
                exec.gpu().stream.synchronize().map_err(|e| e.to_string())?;
                let t = std::time::Instant::now();
                graph.launch().map_err(|e| e.to_string())?;
                exec.gpu().stream.synchronize().map_err(|e| e.to_string())?;
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            times.sort_by(f64::total_cmp);
            let replayed = exec.outputs(&values).map_err(|e| e.to_string())?;
            let same = replayed.iter().zip(&outputs).all(|((_, a), (_, b))| a == b);
            println!(
                "CUDA graph replay: median {:.3} ms over {repeat} runs (min {:.3}); outputs {} the eager run's",
                times[repeat / 2],
                times[0],
                if same { "bit-identical to" } else { "DIFFER from" }
            );
        }
    }
    if args.iter().any(|a| a == "--profile") {
        profile_launches(&mut exec, &refs)?;
    }
    if let Some(dir) = option(args, "--output-dir") {
        std::fs::create_dir_all(dir).map_err(|e| format!("{dir}: {e}"))?;
        for (name, t) in &outputs {
            npy::write(&std::path::Path::new(dir).join(format!("{}.npy", file_stem(name))), t)
                .map_err(|e| e.to_string())?;
        }
    }
    let tolerance: f64 = option(args, "--tolerance")
        .map(|t| t.parse().map_err(|e| format!("--tolerance: {e}")))
        .transpose()?
        .unwrap_or(1e-3);
    let mut ok = true;
    if let Some(dir) = option(args, "--reference") {
        for (name, t) in &outputs {
            let path = std::path::Path::new(dir).join(format!("{}.npy", file_stem(name)));
            let reference = npy::read(&path).map_err(|e| e.to_string())?;
            match compare::agreement(t, &reference) {
                Some(a) => {
                    let pass = a.passes(tolerance);
                    ok &= pass;
                    println!("{} {name}: {a} (tolerance {tolerance:e})", if pass { "PASS" } else { "FAIL" });
                }
                None => {
                    ok = false;
                    println!("FAIL {name}: shape {:?} vs reference {:?}", t.shape(), reference.shape());
                }
            }
        }
    }
    Ok(ok)
}

/// Same file-name mapping as `qcc run --output-dir` (characters outside [A-Za-z0-9._-] become '_').
fn file_stem(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect()
}

/// Loads a graph's CPU executor from the artifact (`model.qir` beside the manifest).
fn cpu_executor(exec: &CudaExecutor) -> Result<qcc_runtime::CpuExecutor, String> {
    let graph_path = exec.manifest.graph_path(&exec.dir).map_err(|e| e.to_string())?;
    let graph = qcc_ir::text::load(&graph_path).map_err(|e| format!("{}: {e}", graph_path.display()))?;
    qcc_runtime::CpuExecutor::new(&graph).map_err(|e| e.to_string())
}

fn parsed<T: std::str::FromStr>(args: &[String], flag: &str, default: T) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    option(args, flag)
        .map(|v| v.parse::<T>().map_err(|e| format!("{flag}: {e}")))
        .transpose()
        .map(|v| v.unwrap_or(default))
}

fn read_ids(args: &[String]) -> Result<Vec<i64>, String> {
    let path = option(args, "--ids").ok_or("missing --ids FILE.npy")?;
    let ids = npy::read(std::path::Path::new(path)).map_err(|e| format!("{path}: {e}"))?;
    ids.to_i64_vec().ok_or_else(|| format!("{path}: --ids must hold integers"))
}

/// `qcc-run eval`: perplexity over consecutive windows of `--ctx` tokens of `--ids` (the same
/// [`CudaLm`] path as `qcc eval --device cuda`); `--check` also runs every window on the CPU executor
/// and compares the two perplexities (relative difference <= `--tolerance`, default 1e-3).
fn eval_artifact(args: &[String]) -> Result<bool, String> {
    let mut lm = CudaLm::new(load_artifact(args)?).map_err(|e| e.to_string())?;
    let ids = read_ids(args)?;
    let ctx: usize = parsed(args, "--ctx", 512)?;
    let windows: usize = parsed(args, "--windows", usize::MAX)?;
    let tolerance: f64 = parsed(args, "--tolerance", 1e-3)?;
    let check = args.iter().any(|a| a == "--check");
    let cpu = if check { Some(cpu_executor(&lm.exec)?) } else { None };
    let input = lm.input_name().to_string();
    let (mut nll, mut cpu_nll, mut count, mut used, mut gpu_s) = (0f64, 0f64, 0usize, 0usize, 0f64);
    for window in ids.chunks(ctx).filter(|w| w.len() == ctx).take(windows) {
        let t = std::time::Instant::now();
        let logits = lm.logits(window).map_err(|e| e.to_string())?;
        gpu_s += t.elapsed().as_secs_f64();
        let (sum, n) = logits.next_token_nll(window)?;
        nll += sum;
        count += n;
        used += 1;
        if let Some(cpu) = &cpu {
            let t = RtTensor::from_vec(&[1, ctx], window.to_vec()).ok_or("bad window")?;
            let outputs = cpu.run(&[(input.as_str(), t)]).map_err(|e| e.to_string())?;
            let row = outputs.iter().find(|(n, _)| n == "logits").or(outputs.first()).ok_or("no CPU output")?;
            cpu_nll += Logits::from_tensor(&row.1, ctx)?.next_token_nll(window)?.0;
        }
    }
    if count == 0 {
        return Err(format!("fewer than {ctx} tokens in the --ids sequence ({})", ids.len()));
    }
    let ppl = (nll / count as f64).exp();
    println!(
        "{{\"model\": \"{}\", \"scheme\": \"{}\", \"device\": \"cuda\", \"tokens\": {count}, \"windows\": {used}, \"ppl\": {ppl:.6}, \"gpu_seconds\": {gpu_s:.3}}}",
        lm.exec.manifest.model, lm.exec.manifest.scheme,
    );
    if cpu.is_none() {
        return Ok(true);
    }
    let cpu_ppl = (cpu_nll / count as f64).exp();
    let rel = (ppl - cpu_ppl).abs() / cpu_ppl;
    let ok = rel <= tolerance;
    println!(
        "{} perplexity GPU {ppl:.6} vs CPU executor {cpu_ppl:.6}: relative difference {rel:.2e} (bound {tolerance:.0e})",
        if ok { "PASS" } else { "FAIL" }
    );
    Ok(ok)
}

/// The prompt's forward (the cache filled from empty), timed three times after a warm-up: inputs
/// uploaded, every launch, synchronized; the logits are computed for every position but not read back.
fn time_prefill(dec: &mut CudaKvDecoder, prompt: &[i64]) -> Result<String, String> {
    let mut ms = Vec::new();
    for run in 0..4 {
        dec.reset();
        let t = std::time::Instant::now();
        let values = dec.prepare(prompt).map_err(|e| e.to_string())?;
        dec.exec.launch_all(&values).map_err(|e| e.to_string())?;
        dec.exec.gpu().stream.synchronize().map_err(|e| e.to_string())?;
        if run > 0 {
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    dec.reset();
    ms.sort_by(f64::total_cmp);
    let (median, batch) = (ms[ms.len() / 2], dec.batch());
    Ok(format!(
        "prefill: {} token(s) x batch {batch}, median {median:.3} ms of 3 after a warm-up (inputs, launches; every position's logits computed, none read back) = {:.1} tokens/s",
        prompt.len(),
        (prompt.len() * batch) as f64 * 1e3 / median
    ))
}

/// `qcc-run generate`: greedy decoding with a device-resident KV cache ([`CudaKvDecoder`], the path of
/// `qcc run --device cuda --prompt`); one decode step is also timed as a CUDA graph.
fn generate(args: &[String]) -> Result<bool, String> {
    let mut dec = CudaKvDecoder::new(load_artifact(args)?).map_err(|e| e.to_string())?;
    let prompt = read_ids(args)?;
    let max_new: usize = parsed(args, "--max-tokens", 16)?;
    let batch: usize = parsed(args, "--batch", 1)?;
    if batch > 1 && args.iter().any(|a| a == "--check") {
        return Err("--check compares one sequence: leave out --batch".into());
    }
    dec.set_batch(batch).map_err(|e| e.to_string())?;
    if args.iter().any(|a| a == "--time-prefill") {
        println!("{}", time_prefill(&mut dec, &prompt)?);
    }
    let mut tokens = prompt.clone();
    let mut step_logits: Vec<Logits> = Vec::new();
    let mut step_ms = Vec::new();
    let mut feed: Vec<i64> = prompt.clone();
    let mut graph_report = String::new();
    for step in 0..max_new {
        if step == max_new / 2 && step > 0 {
            graph_report = time_graph_step(&mut dec, &feed)?;
            if args.iter().any(|a| a == "--profile") {
                let values = dec.prepare(&feed).map_err(|e| e.to_string())?;
                profile_prepared(&dec.exec, &values)?;
            }
        }
        let t = std::time::Instant::now();
        let last = dec.feed(&feed).map_err(|e| e.to_string())?;
        if step > 0 {
            step_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let next = i64::from(last.argmax(0));
        step_logits.push(last);
        tokens.push(next);
        feed = vec![next];
    }
    let generated = &tokens[prompt.len()..];
    println!("generated ids: {generated:?}");
    step_ms.sort_by(f64::total_cmp);
    if !step_ms.is_empty() {
        let median = step_ms[step_ms.len() / 2];
        println!(
            "decode: {} steps, median {median:.3} ms per step of {batch} token(s), {:.1} tokens/s (inputs, cache copies, launches, logits read back)",
            step_ms.len(),
            batch as f64 * 1e3 / median
        );
    }
    if !graph_report.is_empty() {
        println!("{graph_report}");
    }
    if !args.iter().any(|a| a == "--check") {
        return Ok(true);
    }
    // Recompute the whole sequence (no cache) on the GPU and on the CPU executor.
    let full = &tokens[..tokens.len() - 1];
    let ids = RtTensor::from_vec(&[1, full.len()], full.to_vec()).ok_or("bad ids")?;
    let mut all_inputs: Vec<(&str, RtTensor)> = vec![("input_ids", ids)];
    let empty_caches = dec.cache_shapes(0);
    for (name, shape) in &empty_caches {
        // Empty caches in the plan's cache type (an fp16 plan keeps its cache in f16).
        let dtype = dec.exec.manifest.inputs.iter().find(|i| i.name == *name).and_then(|i| DType::from_name(&i.dtype));
        let empty = RtTensor::from_vec(shape, Vec::<f32>::new()).ok_or("bad cache")?;
        all_inputs.push((name.as_str(), empty.cast(dtype.unwrap_or(DType::F32))));
    }
    let gpu_full = dec.exec.run(&all_inputs).map_err(|e| e.to_string())?;
    let cpu_full = cpu_executor(&dec.exec)?.run(&all_inputs).map_err(|e| e.to_string())?;
    let logits_of = |outs: &[(String, RtTensor)]| -> Result<Logits, String> {
        let (_, t) = outs.iter().find(|(n, _)| n == "logits").ok_or("no logits output")?;
        Logits::from_tensor(t, full.len())
    };
    let (g, c) = (logits_of(&gpu_full)?, logits_of(&cpu_full)?);
    let first = prompt.len() - 1;
    let kv: Vec<f64> = step_logits.iter().flat_map(|l| &l.data).map(|&v| v as f64).collect();
    let tail = |l: &Logits| l.data[first * l.vocab..].iter().map(|&v| v as f64).collect::<Vec<f64>>();
    let kv_vs_cpu = compare::agreement_of_values(&kv, &tail(&c), false);
    let full_vs_cpu = compare::agreement_of_values(&tail(&g), &tail(&c), false);
    let cpu_tokens: Vec<i64> = (0..generated.len()).map(|i| i64::from(c.argmax(first + i))).collect();
    println!("KV-cache GPU logits vs CPU recompute: {kv_vs_cpu}");
    println!("no-cache GPU logits vs CPU recompute: {full_vs_cpu}");
    let same = cpu_tokens == generated;
    println!(
        "greedy tokens: CPU (teacher-forced argmax) {cpu_tokens:?} {} the GPU's",
        if same { "equal" } else { "DIFFER from" }
    );
    Ok(same && kv_vs_cpu.passes(1e-2))
}

/// Times one decode step (`feed` after the cached positions, cache left as it was) as eager launches
/// and as a CUDA graph replay; the graph's logits must equal the eager ones.
fn time_graph_step(dec: &mut CudaKvDecoder, feed: &[i64]) -> Result<String, String> {
    let values = dec.prepare(feed).map_err(|e| e.to_string())?;
    let graph = dec.exec.capture(&values).map_err(|e| e.to_string())?;
    let sync = |dec: &CudaKvDecoder| dec.exec.gpu().stream.synchronize().map_err(|e| e.to_string());
    let (mut eager, mut replay) = (Vec::new(), Vec::new());
    let mut outputs = Vec::new();
    for _ in 0..20 {
        dec.prepare(feed).map_err(|e| e.to_string())?;
        sync(dec)?;
        let t = std::time::Instant::now();
        dec.exec.launch_all(&values).map_err(|e| e.to_string())?;
        sync(dec)?;
        eager.push(t.elapsed().as_secs_f64() * 1e3);
        let eager_logits = dec.exec.read_output("logits", &values).map_err(|e| e.to_string())?.to_f64_vec();
        dec.prepare(feed).map_err(|e| e.to_string())?;
        sync(dec)?;
        let t = std::time::Instant::now();
        graph.launch().map_err(|e| e.to_string())?;
        sync(dec)?;
        replay.push(t.elapsed().as_secs_f64() * 1e3);
        let replayed = dec.exec.read_output("logits", &values).map_err(|e| e.to_string())?.to_f64_vec();
        outputs.push(eager_logits == replayed);
    }
    eager.sort_by(f64::total_cmp);
    replay.sort_by(f64::total_cmp);
    Ok(format!(
        "decode step (past {}, batch {}): eager launches {:.3} ms, CUDA graph replay {:.3} ms = {:.1} tokens/s (medians of 20); graph logits {} the eager step's",
        dec.past,
        dec.batch(),
        eager[10],
        replay[10],
        dec.batch() as f64 * 1e3 / replay[10],
        if outputs.iter().all(|&same| same) { "bit-identical to" } else { "DIFFER from" }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_compared_in_the_buffer_layout() {
        // t[0, h, s, d] = 100 h + 10 s + d for h < 2, s < 3, d < 4; buffer layout [1, s, h, d].
        let t = RtTensor::from_vec(
            &[1, 2, 3, 4],
            (0..2).flat_map(|h| (0..3).flat_map(move |s| (0..4).map(move |d| (100 * h + 10 * s + d) as f32))).collect(),
        )
        .unwrap();
        let got = in_layout(&t, &[1, 3, 2, 4]).unwrap();
        let want: Vec<f64> =
            (0..3).flat_map(|s| (0..2).flat_map(move |h| (0..4).map(move |d| (100 * h + 10 * s + d) as f64))).collect();
        assert_eq!(got, want);
        assert_eq!(in_layout(&t, &[2, 3, 4]).unwrap(), t.to_f64_vec());
        // Ambiguous (two axes of one size) or foreign shapes are not guessed.
        let sq = RtTensor::from_vec(&[3, 3], vec![0f32; 9]).unwrap();
        assert!(in_layout(&sq, &[3, 3]).is_some());
        assert!(in_layout(&t, &[4, 6]).is_none());
    }
}

//! `qcc-run`: the runtime's GPU driver program (built with `--features cuda`, no MLIR, small enough to
//! carry to a GPU machine).
//!
//! ```text
//! qcc-run info                 device, NVRTC, kernel compile summary
//! qcc-run ptx DIR              write every kernel's PTX to DIR/<file>.ptx (fallback input, QCC_PTX_DIR)
//! qcc-run check                every W4 kernel variant against the exact CPU reference (bit-exact)
//! qcc-run bench [--quick] [--out FILE]
//!                              W4 kernels vs cuBLAS fp16 at Llama-2-7B / SmolLM2 shapes, M = 1, 16, 128, 2048
//! ```
//! Exit status: 0 on success, 1 on a failed check or error, 2 on bad usage, 3 when no GPU is present.

use std::io::Write;
use std::process::ExitCode;

use qcc_runtime::cuda::{bench, check, nvrtc, CudaError, Gpu};

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

fn run_check(gpu: &Gpu) -> Result<bool, CudaError> {
    let mut ok = true;
    for case in check::standard_cases() {
        let report = check::run_case(gpu, case)?;
        ok &= report.mismatches == 0;
        println!("{} {report}", if report.mismatches == 0 { "PASS" } else { "FAIL" });
    }
    Ok(ok)
}

fn run_bench(gpu: &Gpu, quick: bool, out: Option<&str>) -> Result<(), CudaError> {
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
        for &m in bench::BATCHES {
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
        for prefix in ["w4a4_gemv", "w4a8_gemv", "w4a4_gemm"] {
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
            Ok(gpu) => run_check(&gpu).map(|ok| if ok { ExitCode::SUCCESS } else { ExitCode::from(1) }),
            Err(code) => return code,
        },
        "bench" => match open_gpu() {
            Ok(gpu) => run_bench(&gpu, quick, out).map(|_| ExitCode::SUCCESS),
            Err(code) => return code,
        },
        _ => {
            eprintln!("usage: qcc-run info | ptx DIR | check | bench [--quick] [--out FILE]");
            return ExitCode::from(2);
        }
    };
    result.unwrap_or_else(|e| {
        eprintln!("error: {e}");
        ExitCode::from(1)
    })
}

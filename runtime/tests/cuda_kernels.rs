//! GPU correctness of every W4 kernel variant against the exact CPU reference (bit-exact outputs on
//! random data; see qcc_runtime::cuda::check). Skips with a printed reason without a CUDA driver.

use qcc_runtime::cuda::{check, CudaError, Gpu};

#[test]
fn w4_kernels_match_cpu_reference_bit_for_bit() {
    let gpu = match Gpu::new(0) {
        Ok(gpu) => gpu,
        Err(e @ (CudaError::NoDriver | CudaError::NoDevice { .. })) => {
            eprintln!("SKIPPED: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let reports = check::run_standard(&gpu).unwrap_or_else(|e| panic!("{e}"));
    let failed: Vec<String> = reports.iter().filter(|r| r.mismatches > 0).map(|r| r.to_string()).collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn decoder_kernels_match_cpu_references() {
    let gpu = match Gpu::new(0) {
        Ok(gpu) => gpu,
        Err(e @ (CudaError::NoDriver | CudaError::NoDevice { .. })) => {
            eprintln!("SKIPPED: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let checks = qcc_runtime::cuda::bench::e2e::check_decoder_kernels(&gpu).unwrap_or_else(|e| panic!("{e}"));
    let failed: Vec<String> = checks.iter().filter(|c| !c.ok).map(|c| format!("{}: {}", c.name, c.detail)).collect();
    assert!(checks.len() >= 10 && failed.is_empty(), "{}", failed.join("\n"));
}

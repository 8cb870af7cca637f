//! GPU correctness of every W4 kernel variant against the exact CPU reference (bit-exact outputs on
//! random data; see qcc_runtime::cuda::check). Skips with a printed reason without a CUDA driver.

use qcc_runtime::cuda::{check, CudaError, Gpu};

/// Device 0, or `None` (with the reason printed) where there is no CUDA driver or device.
fn gpu() -> Option<Gpu> {
    match Gpu::new(0) {
        Ok(gpu) => Some(gpu),
        Err(e @ (CudaError::NoDriver | CudaError::NoDevice { .. })) => {
            eprintln!("SKIPPED: {e}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn w4_kernels_match_cpu_reference_bit_for_bit() {
    let Some(gpu) = gpu() else { return };
    let reports = check::run_standard(&gpu).unwrap_or_else(|e| panic!("{e}"));
    let failed: Vec<String> = reports.iter().filter(|r| r.mismatches > 0).map(|r| r.to_string()).collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn decoder_kernels_match_cpu_references() {
    let Some(gpu) = gpu() else { return };
    let checks = qcc_runtime::cuda::bench::e2e::check_decoder_kernels(&gpu).unwrap_or_else(|e| panic!("{e}"));
    let failed: Vec<String> = checks.iter().filter(|c| !c.ok).map(|c| format!("{}: {}", c.name, c.detail)).collect();
    assert!(checks.len() >= 10 && failed.is_empty(), "{}", failed.join("\n"));
}

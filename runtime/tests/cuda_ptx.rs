//! GPU-less validity check of every CUDA kernel: NVRTC compiles each runtime/kernels/*.cu to PTX for
//! sm_90 and ptxas (PyPI nvidia-cuda-nvcc==13.0.88, installed by scripts/fixtures.sh) assembles it,
//! as the runtime loads it (patched for programmatic dependent launch, runtime/src/cuda/pdl.rs).
//! ptxas's resource report (registers, spills, shared memory) is printed, and spills fail the test.
//! Skips with a printed reason when NVRTC or ptxas is not installed.

use std::path::PathBuf;
use std::process::Command;

use qcc_runtime::cuda::{nvrtc, pdl};

fn ptxas() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("QCC_PTXAS") {
        return Some(PathBuf::from(p));
    }
    nvrtc::cuda_lib_dirs().into_iter().map(|lib| lib.join("../bin/ptxas")).find(|p| p.is_file())
}

#[test]
fn every_kernel_compiles_with_nvrtc_and_assembles_for_sm90() {
    if !nvrtc::nvrtc_available() {
        eprintln!("SKIPPED: libnvrtc.so.13 not found (run scripts/fixtures.sh or set QCC_CUDA_LIB_DIR)");
        return;
    }
    let ptxas = ptxas();
    if ptxas.is_none() {
        eprintln!("SKIPPED ptxas step: ptxas not found (run scripts/fixtures.sh or set QCC_PTXAS)");
    }
    let dir = tempfile::tempdir().unwrap();
    for (name, _) in nvrtc::KERNEL_SOURCES {
        let ptx = nvrtc::compile_ptx(name).unwrap_or_else(|e| panic!("{e}"));
        assert!(ptx.contains(".target sm_90"), "{name}: PTX not for sm_90");
        assert!(ptx.contains(".entry"), "{name}: no kernel entry in PTX");
        // What the runtime loads: every entry patched for programmatic dependent launch.
        let ptx = pdl::patch_entries(&ptx).unwrap_or_else(|| panic!("{name}: PDL patch"));
        let entries = ptx.lines().filter(|l| l.contains(".entry ")).count();
        assert_eq!(ptx.matches("griddepcontrol.wait;").count(), entries, "{name}: one wait per entry");
        let Some(ptxas) = &ptxas else { continue };
        let ptx_path = dir.path().join(format!("{name}.ptx"));
        std::fs::write(&ptx_path, &ptx).unwrap();
        let out = Command::new(ptxas)
            .arg(format!("-arch={}", nvrtc::arch_for(name).replace("compute_", "sm_")))
            .arg("-v")
            .arg("--warn-on-spills")
            .arg(&ptx_path)
            .arg("-o")
            .arg(dir.path().join(format!("{name}.cubin")))
            .output()
            .expect("running ptxas");
        let log = String::from_utf8_lossy(&out.stderr);
        eprintln!("== ptxas {name}.ptx\n{log}");
        assert!(out.status.success(), "ptxas rejected {name}.ptx:\n{log}");
        let spilling = log
            .lines()
            .filter(|l| l.contains("spill stores"))
            .any(|l| !l.trim_start().starts_with("0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"));
        assert!(!spilling, "{name}: stack frame or register spills:\n{log}");
    }
}

#[test]
fn every_kernel_file_is_registered() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("kernels");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "cu") {
            let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
            assert!(
                nvrtc::KERNEL_SOURCES.iter().any(|(s, _)| *s == stem),
                "{stem}.cu is not listed in nvrtc::KERNEL_SOURCES"
            );
        }
    }
}

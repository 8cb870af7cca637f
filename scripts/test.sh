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

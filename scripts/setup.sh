#!/usr/bin/env bash
# Everything qcc needs on a fresh Debian 12 machine with a Rust toolchain, installed idempotently into
# caches that .gitignore excludes: the Python venv and data fixtures (scripts/fixtures.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

need_apt=()
command -v python3 >/dev/null || need_apt+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
command -v npm >/dev/null || need_apt+=(npm)
if ((${#need_apt[@]})); then
  echo "[setup] apt-get install ${need_apt[*]}" >&2
  SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO=sudo
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${need_apt[@]}"
fi
bash scripts/mlir.sh  # LLVM/MLIR 22 for the compiler crate (melior)
command -v cargo >/dev/null || { echo "[setup] a Rust toolchain (cargo) is required: https://rustup.rs" >&2; exit 1; }
bash scripts/fixtures.sh >/dev/null

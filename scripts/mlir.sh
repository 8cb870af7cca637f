#!/usr/bin/env bash
# Installs Debian's LLVM/MLIR 22 (bookworm-security) for melior/mlir-sys, which .cargo/config.toml points at
# /usr/lib/llvm-22. Idempotent: a machine that already has every package returns at once without apt.
set -euo pipefail
packages=(llvm-22-dev libmlir-22-dev libclang1-22 libclang-common-22-dev libpolly-22-dev libzstd-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
((${#missing[@]})) || exit 0
echo "[mlir] apt-get install ${missing[*]}" >&2
SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
# Debian 12's default sources include bookworm-security, which carries the LLVM 22 packages.
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
test -x /usr/lib/llvm-22/bin/llvm-config || { echo "[mlir] /usr/lib/llvm-22/bin/llvm-config missing after install" >&2; exit 1; }

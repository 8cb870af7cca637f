#!/usr/bin/env bash
# Builds here what the GPU machine runs (it has no Rust toolchain) into .gpu/, for `run` with
# carry [".gpu"] and then scripts/gpu_check.sh (or gpu_decode_profile.sh, gpu_prefill.sh) there:
#   .gpu/qcc-run          release qcc-run with the CUDA runtime, stripped
#   .gpu/cuda_executor    release test binary of runtime/tests/cuda_executor.rs, stripped
#   .gpu/cache/nvrtc/     NVRTC's PTX of every runtime kernel and of the micro-kernels of every full
#                         artifact under .cache/gpu-art*/ (as `qcc-run plan` compiles them), keyed as
#                         the runtime keys its disk cache: scripts/gpu_env.sh seeds the device's
#                         QCC_CACHE_DIR from it, so a fresh machine skips about a minute of NVRTC
# The artifacts themselves come from scripts/gpu_artifacts*.sh (run those first when they changed).
# Fails when .gpu exceeds what one `run` call carries (64 MiB; 62 kept as the limit for margin).
#   bash scripts/gpu_build.sh [--ptx]    (--ptx also writes .gpu/ptx, the fallback for a machine
#                                         without libnvrtc; about 33 MiB)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

cargo build --release -p qcc-runtime --features cuda --bin qcc-run
mkdir -p .gpu
strip -o .gpu/qcc-run target/release/qcc-run
exe="$(cargo test --release -p qcc-runtime --features cuda --test cuda_executor --no-run --message-format=json |
  python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cuda_executor":
        print(m["executable"])')"
[[ -x "$exe" ]] || { echo "no cuda_executor test binary" >&2; exit 1; }
strip -o .gpu/cuda_executor "$exe"

rm -rf .gpu/cache .gpu/nvrtc-cache.tar.xz
export QCC_CACHE_DIR="$ROOT/.gpu/cache"
if [[ "${1:-}" == "--ptx" ]]; then
  ptx_dir=.gpu/ptx
else
  ptx_dir="$(mktemp -d)"
  trap 'rm -rf "$ptx_dir"' EXIT
  rm -rf .gpu/ptx
fi
.gpu/qcc-run ptx "$ptx_dir"
shopt -s nullglob
for art in .cache/gpu-art*/*.qcc; do
  [[ -f "$art/manifest.json" ]] || continue
  .gpu/qcc-run plan "$art" | sed "s|^|$art: |"
done
find .gpu -name tokenizer.json -delete
# PTX is text: packed, the cache travels at about a tenth of its size (scripts/gpu_env.sh unpacks it).
tar -C .gpu/cache -cJf .gpu/nvrtc-cache.tar.xz nvrtc && rm -rf .gpu/cache
du -sh .gpu/*; du -sh .gpu
# .gpu/qcc.xz and .gpu/src7b serve scripts/gpu_7b_whole.sh, whose calls carry them without the rest.
size_kib=$(du -sk --exclude=qcc.xz --exclude=src7b .gpu | cut -f1)
((size_kib <= 62 * 1024)) || { echo "error: .gpu is $((size_kib / 1024)) MiB (a run carries 64 MiB)" >&2; exit 1; }
echo ".gpu ready: $((size_kib / 1024)) MiB without qcc.xz and src7b (carry those paths apart)"

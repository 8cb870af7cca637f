#!/usr/bin/env bash
# The one script that runs on the GPU machine: kernel correctness (bit-exact against the CPU
# reference) and the benchmark against cuBLAS fp16, with results under $OUT.
#
# The GPU machine has no Rust toolchain: build here and carry the stripped binary (and PTX fallback):
#   cargo build --release -p qcc-runtime --features cuda --bin qcc-run
#   mkdir -p .gpu && strip -o .gpu/qcc-run target/release/qcc-run && .gpu/qcc-run ptx .gpu/ptx
# then on the device (run tool, carry [".gpu"]):  bash scripts/gpu_check.sh [--quick]
#
# `bash scripts/gpu_check.sh --artifacts` instead checks compiled artifacts (built here by
# scripts/gpu_artifacts.sh into .gpu/art/): for each of fp32, fp16, w8a8, w4a4, `qcc-run verify` (every
# value the GPU computes against the CPU executor's, launch by launch: integers exactly, floats by
# max relative error) and `qcc-run run` (GPU logits against the CPU reference logits written here).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/.gpu/out}"
mkdir -p "$OUT"
BIN="${QCC_RUN:-$ROOT/.gpu/qcc-run}"
export QCC_PTX_DIR="${QCC_PTX_DIR:-$ROOT/.gpu/ptx}"

# libnvrtc.so.13 and libcublas.so.13: the CUDA toolkit's, else any pip-installed nvidia wheel's.
libdirs=()
for lib in libnvrtc.so.13 libcublas.so.13; do
  d="$(ldconfig -p 2>/dev/null | awk -v l="$lib" '$1 == l {print $NF; exit}')"
  [[ -n "$d" ]] && continue
  f="$(find /usr/local/cuda*/ /usr/local/cuda/targets /opt /usr/lib -name "$lib" 2>/dev/null | head -n1)"
  [[ -n "$f" ]] && libdirs+=("$(dirname "$f")")
done
if ((${#libdirs[@]})); then
  export LD_LIBRARY_PATH="$(printf '%s:' "${libdirs[@]}")${LD_LIBRARY_PATH:-}"
  export QCC_CUDA_LIB_DIR="$(printf '%s:' "${libdirs[@]}")"
fi
echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv; } \
  2>&1 | tee "$OUT/device.txt"
status=0
if [[ "${1:-}" == "--artifacts" ]]; then
  shift
  ART="$ROOT/.gpu/art"
  export QCC_CACHE_DIR=/tmp/qcc-cache
  for name in fp32 fp16 w8a8 w4a4; do
    [[ -d "$ART/$name.qcc" ]] || { echo "== $name: not carried this time ($ART/$name.qcc missing), skipped"; continue; }
    echo "== $name: verify (GPU vs CPU executor, every value)"
    QCC_CUDA_SYNC=1 "$BIN" verify "$ART/$name.qcc" --input input_ids="$ART/ids.npy" > "$OUT/verify-$name.txt" 2>&1 || status=1
    grep -v '^PASS' "$OUT/verify-$name.txt" | tail -n 25
    echo "== $name: logits against the CPU reference"
    "$BIN" run "$ART/$name.qcc" --input input_ids="$ART/ids.npy" --reference "$ART/ref-$name" --repeat 20 \
      --graph --output-dir "/tmp/gpu-$name" 2>&1 | tee "$OUT/run-$name.txt" || status=1
  done
  if [[ -d "$ART/kv-fp16.qcc" ]]; then
    echo "== kv-fp16: greedy generation with the KV cache on the device"
    "$BIN" generate "$ART/kv-fp16.qcc" --ids "$ART/prompt.npy" --max-tokens 16 --check 2>&1 | tee "$OUT/generate.txt" || status=1
  fi
  for name in w8a8 w4a4; do
    echo "== $name: verify with 77 tokens (plan made for more)"
    "$BIN" verify "$ART/$name.qcc" --input input_ids="$ART/ids-77.npy" | tail -n 1 || status=1
  done
  if [[ -x "$ROOT/.gpu/cuda_executor" ]]; then
    echo "== micro-kernels against the CPU executor (runtime/tests/cuda_executor.rs)"
    "$ROOT/.gpu/cuda_executor" --nocapture --test-threads 1 > /tmp/cuda_executor.txt 2>&1 || status=1
    grep -E '^(int_linear|hadamard|attention|test |test result)|panicked' -A2 /tmp/cuda_executor.txt
  fi
  echo "gpu_check status: $status"
  exit $status
fi
"$BIN" info 2>&1 | tee "$OUT/info.txt" || status=1
"$BIN" check > "$OUT/check.txt" 2>&1 || status=1
echo "check: $(grep -c '^PASS' "$OUT/check.txt") passed, $(grep -c '^FAIL' "$OUT/check.txt") failed"
grep -v '^PASS' "$OUT/check.txt"
"$BIN" bench "$@" --out "$OUT/bench.txt" > "$OUT/bench-log.txt" 2>&1 || { status=1; tail -n 20 "$OUT/bench-log.txt"; }
head -n 1 "$OUT/bench.txt"
sed -n '/== summary/,$p' "$OUT/bench.txt"
echo "gpu_check status: $status"
exit $status

#!/usr/bin/env bash
# Prefill (M = 2048) W4A4 GEMM work on the GPU machine: bit-exact checks of the GEMM variants (wgmma
# and mma.sync), the wgmma SASS instruction count, `qcc-run bench --quick --m 2048` (Llama-2-7B shapes
# against cuBLAS fp16) and `qcc-run bench --e2e` (prefill of 2048 tokens + decode at batch 1), with
# results under $OUT. Build here first as scripts/gpu_check.sh says; run with carry [".gpu"].
#   bash scripts/gpu_prefill.sh [--no-e2e] [--ncu KERNEL_REGEX]
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/.gpu/out}"
mkdir -p "$OUT"
BIN="${QCC_RUN:-$ROOT/.gpu/qcc-run}"
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
e2e=1; ncu_re=""
while (($#)); do
  case "$1" in
    --no-e2e) e2e=0 ;;
    --ncu) ncu_re="$2"; shift ;;
  esac
  shift
done
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv; } \
  2>&1 | tee "$OUT/device.txt"
status=0
t0=$SECONDS
"$BIN" check --only w4a4_wgmma > "$OUT/check.txt" 2>&1 || status=1
"$BIN" check --only w4a4_gemm_ >> "$OUT/check.txt" 2>&1 || status=1
echo "check (GEMM variants): $(grep -c '^PASS' "$OUT/check.txt") passed, $(grep -c '^FAIL' "$OUT/check.txt") failed ($((SECONDS - t0)) s)"
grep -v '^PASS' "$OUT/check.txt" | cut -c1-220 | head -n 30
# Which tensor-core instructions the wgmma kernels became.
PTXAS="$(command -v ptxas || ls /usr/local/cuda*/bin/ptxas 2>/dev/null | head -n1)"
CUOBJDUMP="$(command -v cuobjdump || ls /usr/local/cuda*/bin/cuobjdump 2>/dev/null | head -n1)"
if [[ -n "$PTXAS" && -n "$CUOBJDUMP" ]] && "$BIN" ptx /tmp/qcc-ptx >/dev/null 2>&1; then
  "$PTXAS" -arch=sm_90a -v /tmp/qcc-ptx/w4a4_wgmma.ptx -o /tmp/wgmma.cubin > "$OUT/ptxas.txt" 2>&1
  "$CUOBJDUMP" -sass /tmp/wgmma.cubin > /tmp/wgmma.sass 2>&1
  echo "SASS of w4a4_wgmma.cu: $(grep -c IGMMA /tmp/wgmma.sass) IGMMA, $(grep -c HGMMA /tmp/wgmma.sass) HGMMA, $(grep -c 'IMMA' /tmp/wgmma.sass) IMMA lines"
  grep -m3 IGMMA /tmp/wgmma.sass
fi
t0=$SECONDS
"$BIN" bench --quick --m 2048 --out "$OUT/bench.txt" > "$OUT/bench-log.txt" 2>&1 || { status=1; tail -n 20 "$OUT/bench-log.txt"; }
echo "bench ($((SECONDS - t0)) s):"
grep -E 'skipped' "$OUT/bench-log.txt" | cut -c1-200 | head -n 12
grep -E 'cublas_f16|wgmma|gemm_128x128_w8' "$OUT/bench.txt"
sed -n '/== summary/,$p' "$OUT/bench.txt"
if [[ -n "$ncu_re" ]]; then
  NCU="$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n1)"
  # Skip the bit-exact check's launch; profile the first timed launch (4096x4096, M=2048).
  timeout 200 "$NCU" --clock-control none -k "regex:$ncu_re" --launch-skip 1 -c 1 --section SpeedOfLight \
    --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
    --section MemoryWorkloadAnalysis_Tables --section ComputeWorkloadAnalysis --section Occupancy \
    --section LaunchStats "$BIN" bench --quick --m 2048 > "$OUT/ncu.txt" 2>&1
  grep -E '^  [a-z_0-9]+|Duration|Throughput|Pipe|[Ss]tall|Warp Cycles|Occupancy|[Bb]ank|Issue|Tensor|Shared|L2 Hit|Registers|Eligible' "$OUT/ncu.txt" | cut -c1-160 | head -n 90
fi
if ((e2e)); then
  t0=$SECONDS
  "$BIN" bench --e2e --batches 1 --prefill 2048 --out "$OUT/e2e.txt" > "$OUT/e2e-log.txt" 2>&1 || { status=1; tail -n 30 "$OUT/e2e-log.txt"; }
  echo "e2e ($((SECONDS - t0)) s):"
  grep -vE '^PASS|^    \[' "$OUT/e2e.txt" | cut -c1-400
fi
echo "gpu_prefill status: $status"
exit $status

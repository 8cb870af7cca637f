#!/usr/bin/env bash
# Warp-specialised prefill GEMM variants on the GPU machine (kernels/w4a4_wgmma.cu QCC_WS): bit-exact
# checks (each under a timeout: a broken mbarrier protocol hangs instead of failing), SASS summary
# (IGMMA count, local memory), then `qcc-run bench --quick --m 2048` (every verified GEMM variant vs
# cuBLAS fp16), optional e2e prefill. Build here as scripts/gpu_check.sh says; carry [".gpu"].
#   bash scripts/gpu_prefill_ws.sh [--e2e] [--ncu KERNEL_REGEX]
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/.gpu/out}"
mkdir -p "$OUT"
BIN="${QCC_RUN:-$ROOT/.gpu/qcc-run}"
for lib in libnvrtc.so.13 libcublas.so.13; do
  ldconfig -p 2>/dev/null | grep -q "$lib" && continue
  f="$(find /usr/local/cuda*/ /opt /usr/lib -name "$lib" 2>/dev/null | head -n1)"
  [[ -n "$f" ]] && export LD_LIBRARY_PATH="$(dirname "$f"):${LD_LIBRARY_PATH:-}" QCC_CUDA_LIB_DIR="$(dirname "$f")"
done
e2e=0; ncu_re=""
while (($#)); do
  case "$1" in --e2e) e2e=1 ;; --ncu) ncu_re="$2"; shift ;; esac
  shift
done
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/device.txt"
skip=""
for p in w4a4_ws w4a4p8; do
  timeout 120 "$BIN" check --only "$p" > "$OUT/check-$p.txt" 2>&1; rc=$?
  echo "check $p: rc $rc, $(grep -c '^PASS' "$OUT/check-$p.txt") pass, $(grep -c '^FAIL' "$OUT/check-$p.txt") fail"
  grep -v '^PASS' "$OUT/check-$p.txt" | cut -c1-240 | head -n 12
  ((rc == 0)) || skip="${skip:+$skip,}$p"
done
export QCC_GEMM_SKIP="${skip:-}"
[[ -n "${skip:-}" ]] && echo "bench skips: $skip"
PTXAS="$(command -v ptxas || ls /usr/local/cuda*/bin/ptxas 2>/dev/null | head -n1)"
CUOBJDUMP="$(command -v cuobjdump || ls /usr/local/cuda*/bin/cuobjdump 2>/dev/null | head -n1)"
if [[ -n "$PTXAS" && -n "$CUOBJDUMP" ]] && "$BIN" ptx /tmp/qcc-ptx >/dev/null 2>&1; then
  "$PTXAS" -arch=sm_90a -v /tmp/qcc-ptx/w4a4_wgmma.ptx -o /tmp/wgmma.cubin > "$OUT/ptxas.txt" 2>&1
  "$CUOBJDUMP" -sass /tmp/wgmma.cubin > "$OUT/wgmma.sass" 2>&1
  awk '/Function :/ {f=$3} /IGMMA/ {g[f]++} /LDL|STL/ {l[f]++} END {for (k in g) printf "%s: %d IGMMA, %d LDL/STL\n", k, g[k], l[k]+0}' "$OUT/wgmma.sass" | sort
fi
if true; then
  timeout 300 "$BIN" bench --quick --m 2048 --out "$OUT/bench.txt" > "$OUT/bench-log.txt" 2>&1 || { echo "bench rc $?"; tail -n 5 "$OUT/bench-log.txt"; }
  grep -E 'skipped' "$OUT/bench-log.txt" | cut -c1-200 | head -n 8
  grep -E 'cublas_f16|wgmma_128x128_s4 |_ws_' "$OUT/bench.txt" | cut -c1-150
  sed -n '/== summary/,$p' "$OUT/bench.txt"
fi
if [[ -n "$ncu_re" ]]; then
  NCU="$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n1)"
  timeout 150 "$NCU" --clock-control none -k "regex:$ncu_re" --launch-skip 1 -c 1 --section SpeedOfLight \
    --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
    "$BIN" bench --quick --m 2048 > "$OUT/ncu.txt" 2>&1
  grep -E '^  [a-z_0-9]+|Duration|Throughput|Pipe|[Ss]tall|Issue|Eligible|Bank' "$OUT/ncu.txt" | cut -c1-150 | head -n 50
fi
if ((e2e)); then
  timeout 200 "$BIN" bench --e2e --batches 1 --prefill 2048 --out "$OUT/e2e.txt" > "$OUT/e2e-log.txt" 2>&1 || tail -n 10 "$OUT/e2e-log.txt"
  grep -vE '^PASS|^    \[' "$OUT/e2e.txt" | cut -c1-300
fi

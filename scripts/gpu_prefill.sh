#!/usr/bin/env bash
# Prefill (M = 2048) W4A4 GEMM work on the GPU machine, in one call: bit-exact checks of the GEMM
# variants (each group under a timeout: a broken mbarrier protocol hangs instead of failing; a group
# that fails is left out of the bench), the SASS summary of kernels/w4a4_wgmma.cu (IGMMA and local
# memory per kernel), `qcc-run bench --quick --m 2048` (Llama-2-7B shapes against cuBLAS fp16, only
# device-verified variants), `qcc-run bench --e2e --prefill 2048` and optionally Nsight Compute on one
# kernel. Results under $OUT. Build here first as scripts/gpu_check.sh says; run with carry [".gpu"].
#
#   bash scripts/gpu_prefill.sh [--check LIST] [--skip LIST] [--no-e2e] [--ncu KERNEL_REGEX]
#     --check LIST  comma-separated variant names or prefixes to check (default: every prefill family)
#     --skip LIST   comma-separated names or prefixes the bench leaves out (QCC_GEMM_SKIP), e.g. the
#                   older families when only new variants are of interest
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source "$ROOT/scripts/gpu_env.sh"
checks="w4a4_gemm_,w4a4_wgmma_,w4a4_ws,w4a4p8"; skip=""; e2e=1; ncu_re=""
while (($#)); do
  case "$1" in
    --check) checks="$2"; shift ;;
    --skip) skip="$2"; shift ;;
    --no-e2e) e2e=0 ;;
    --ncu) ncu_re="$2"; shift ;;
    *) echo "gpu_prefill.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
  shift
done
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv; } \
  2>&1 | tee "$OUT/device.txt"
status=0
IFS=, read -ra groups <<< "$checks"
for v in "${groups[@]}"; do
  timeout 120 "$BIN" check --only "$v" > "$OUT/check-$v.txt" 2>&1; rc=$?
  echo "check $v: rc $rc, $(grep -c '^PASS' "$OUT/check-$v.txt") pass, $(grep -c '^FAIL' "$OUT/check-$v.txt") fail"
  grep -v '^PASS' "$OUT/check-$v.txt" | cut -c1-240 | head -n 8
  ((rc == 0)) || { status=1; skip="${skip:+$skip,}$v"; }
done
export QCC_GEMM_SKIP="$skip"
[[ -n "$skip" ]] && echo "bench skips: $skip"
PTXAS="$(command -v ptxas || ls /usr/local/cuda*/bin/ptxas 2>/dev/null | head -n1)"
CUOBJDUMP="$(command -v cuobjdump || ls /usr/local/cuda*/bin/cuobjdump 2>/dev/null | head -n1)"
if [[ -n "$PTXAS" && -n "$CUOBJDUMP" ]] && "$BIN" ptx /tmp/qcc-ptx >/dev/null 2>&1; then
  "$PTXAS" -arch=sm_90a -v /tmp/qcc-ptx/w4a4_wgmma.ptx -o /tmp/wgmma.cubin > "$OUT/ptxas.txt" 2>&1
  grep -i warn "$OUT/ptxas.txt" | head -n 4
  "$CUOBJDUMP" -sass /tmp/wgmma.cubin > /tmp/wgmma.sass 2>&1
  awk '/Function :/ {f=$3} /IGMMA/ {g[f]++} /LDL|STL/ {l[f]++} END {for (k in g) printf "%s: %d IGMMA, %d LDL/STL\n", k, g[k], l[k]+0}' \
    /tmp/wgmma.sass | sort | tee "$OUT/sass-summary.txt"
fi
t0=$SECONDS
timeout 240 "$BIN" bench --quick --m 2048 --out "$OUT/bench.txt" > "$OUT/bench-log.txt" 2>&1 || { status=1; tail -n 20 "$OUT/bench-log.txt"; }
echo "bench ($((SECONDS - t0)) s):"
grep -E 'cublas_f16|w4a4' "$OUT/bench.txt" | grep 'M=2048' | cut -c1-130
sed -n '/== summary/,$p' "$OUT/bench.txt" | cut -c1-400
if ((e2e)); then
  t0=$SECONDS
  timeout 150 "$BIN" bench --e2e --batches 1 --prefill 2048 --out "$OUT/e2e.txt" > "$OUT/e2e-log.txt" 2>&1 || { status=1; tail -n 30 "$OUT/e2e-log.txt"; }
  echo "e2e ($((SECONDS - t0)) s):"
  grep -vE '^PASS|^    \[' "$OUT/e2e.txt" | cut -c1-400
fi
if [[ -n "$ncu_re" ]]; then
  NCU="$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n1)"
  # Skip the bit-exact check's launch; profile the first timed launch (4096x4096, M=2048).
  timeout 200 "$NCU" --clock-control none -k "regex:$ncu_re" --launch-skip 1 -c 1 --section SpeedOfLight \
    --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
    --section ComputeWorkloadAnalysis --section Occupancy --section LaunchStats \
    "$BIN" bench --quick --m 2048 > "$OUT/ncu.txt" 2>&1
  grep -E '^  [a-z_0-9]+|Duration|Throughput|Pipe|[Ss]tall|Warp Cycles|Occupancy|Issue|Tensor|Shared|Registers|Eligible' \
    "$OUT/ncu.txt" | cut -c1-160 | head -n 90
fi
echo "gpu_prefill status: $status (${SECONDS} s)"
exit $status

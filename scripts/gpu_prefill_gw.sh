#!/usr/bin/env bash
# Prefill W4A4 GEMM, `_b4_e` / `_gw_e` variants (kernels/w4a4_wgmma.cu QCC_WS NB = 4, QCC_WSG) on the GPU
# machine: one bit-exact check per new variant (each under a timeout: a broken mbarrier protocol
# hangs), SASS summary, `qcc-run bench --quick --m 2048` over the warp-specialised variants only
# (QCC_GEMM_SKIP drops the older families and any variant whose check failed), e2e prefill of 2048
# tokens, then ncu on one kernel while time is left. Build here as scripts/gpu_check.sh says; carry
# [".gpu"].   bash scripts/gpu_prefill_gw.sh [NCU_KERNEL_REGEX]
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
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/device.txt"
skip="w4a4_gemm_,w4a4_wgmma_,w4a4_ws_256x128_s7_b2,w4a4_ws_128x256_s5_b2,w4a4p8_ws_128x256_s4,w4a4_ws_256x128_s6_b3_sw,w4a4_ws_256x128_s6_b3_pe"
for v in w4a4_ws_256x128_s6_b4_e w4a4_ws_256x128_s6_b3_gw_e w4a4_ws_256x128_s8_b4_gw_e w4a4_ws_256x128_s8_b5_gw_e; do
  timeout 60 "$BIN" check --only "$v" > "$OUT/check-$v.txt" 2>&1; rc=$?
  echo "check $v: rc $rc, $(grep -c 'bit-exact' "$OUT/check-$v.txt") bit-exact"
  grep -v 'bit-exact' "$OUT/check-$v.txt" | cut -c1-240 | head -n 6
  ((rc == 0)) || skip="$skip,$v"
done
export QCC_GEMM_SKIP="$skip"
echo "QCC_GEMM_SKIP=$skip"
PTXAS="$(command -v ptxas || ls /usr/local/cuda*/bin/ptxas 2>/dev/null | head -n1)"
CUOBJDUMP="$(command -v cuobjdump || ls /usr/local/cuda*/bin/cuobjdump 2>/dev/null | head -n1)"
if [[ -n "$PTXAS" && -n "$CUOBJDUMP" ]] && "$BIN" ptx /tmp/qcc-ptx >/dev/null 2>&1; then
  "$PTXAS" -arch=sm_90a -v /tmp/qcc-ptx/w4a4_wgmma.ptx -o /tmp/wgmma.cubin > "$OUT/ptxas.txt" 2>&1
  grep -i warn "$OUT/ptxas.txt" | head -n 4
  "$CUOBJDUMP" -sass /tmp/wgmma.cubin > /tmp/wgmma.sass 2>&1
  awk '/Function :/ {f=$3} /IGMMA/ {g[f]++} /LDL|STL/ {l[f]++} END {for (k in g) printf "%s: %d IGMMA, %d LDL/STL\n", k, g[k], l[k]+0}' /tmp/wgmma.sass | sort | grep _ws_
fi
timeout 170 "$BIN" bench --quick --m 2048 --out "$OUT/bench.txt" > "$OUT/bench-log.txt" 2>&1 || { echo "bench rc $?"; tail -n 5 "$OUT/bench-log.txt"; }
grep -E 'cublas_f16|_ws_' "$OUT/bench.txt" | grep 'M=2048' | cut -c1-130
sed -n '/== summary/,$p' "$OUT/bench.txt" | cut -c1-400
echo "elapsed ${SECONDS}s"
if ((SECONDS < 200)); then
  timeout 100 "$BIN" bench --e2e --batches 1 --prefill 2048 --out "$OUT/e2e.txt" > "$OUT/e2e-log.txt" 2>&1 || tail -n 6 "$OUT/e2e-log.txt"
  grep -vE '^PASS|^    \[' "$OUT/e2e.txt" | cut -c1-400
fi
echo "elapsed ${SECONDS}s"
if [[ -n "${1:-}" ]] && ((SECONDS < 170)); then
  NCU="$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n1)"
  QCC_GEMM_SKIP="$skip,w4a4p8" timeout $((225 - SECONDS)) "$NCU" --clock-control none -k "regex:$1" --launch-skip 1 -c 1 \
    --section SpeedOfLight --section WarpStateStats --section SchedulerStats "$BIN" bench --quick --m 2048 > "$OUT/ncu.txt" 2>&1
  grep -E '^  [a-z_0-9]+|Duration|Throughput|Eligible|Issued Warp|[Ss]tall|cycles being' "$OUT/ncu.txt" | cut -c1-150 | head -n 30
fi
echo "elapsed ${SECONDS}s"

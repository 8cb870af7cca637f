#!/usr/bin/env bash
# Where one decode step of the compiled Llama-2-7B-shaped plans goes, kernel by kernel (runs on the
# GPU machine after scripts/gpu_artifacts_7b.sh built .gpu/art7b with KV=1; carry [".gpu"]):
#   bash scripts/gpu_decode_profile.sh [PLAN ...]      (default: kv-w4a4 kv-fp16)
#   bash scripts/gpu_decode_profile.sh --prefill [PLAN ...]   (default: w4a4 fp16; 2048-token prefill)
# Nsight Compute times every kernel of a 512-token prefill and two decode steps (synthetic weights,
# seed 7); scripts/ncu_step.py prints the last decode step (between the last two embedding gathers).
# Kernels run one at a time with caches flushed, so the sum exceeds the CUDA-graph step time.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source "$ROOT/scripts/gpu_env.sh"
export QCC_CACHE_DIR=/tmp/qcc-cache QCC_SYNTHETIC_WEIGHTS=7
NCU="$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n1)"
[[ -n "$NCU" ]] || { echo "ncu not found"; exit 1; }
status=0
if [[ "${1:-}" == "--prefill" ]]; then
  shift
  plans=("$@")
  ((${#plans[@]})) || plans=(w4a4 fp16)
  for p in "${plans[@]}"; do
    echo "== ncu: the second of two 2048-token prefills of art7b/$p"
    "$NCU" --clock-control none --metrics gpu__time_duration.sum --csv -c 400 "$BIN" run ".gpu/art7b/$p.qcc" \
      --input input_ids=.gpu/art7b/ids-2048.npy --repeat 2 > "$OUT/ncu-prefill-$p.csv" 2>&1 || status=1
    python3 "$ROOT/scripts/ncu_step.py" "$OUT/ncu-prefill-$p.csv" --tail || status=1
  done
  exit $status
fi
plans=("$@")
((${#plans[@]})) || plans=(kv-w4a4 kv-fp16)
for p in "${plans[@]}"; do
  echo "== ncu: one decode step of art7b/$p"
  "$NCU" --clock-control none --metrics gpu__time_duration.sum --csv -c 140 "$BIN" generate \
    ".gpu/art7b/$p.qcc" --ids .gpu/art7b/prompt-512.npy --max-tokens 3 > "$OUT/ncu-$p.csv" 2>&1 || status=1
  python3 "$ROOT/scripts/ncu_step.py" "$OUT/ncu-$p.csv" || status=1
done
exit $status

#!/usr/bin/env bash
# The whole Llama-2-7B-shaped model (32 layers, 6.7 G parameters) end to end on the GPU machine: its
# 27 GB of fp32 weights cannot travel, and its w4a4 compile needs more memory than this build machine
# has (about 2.3 GB of heap per layer), so the model is drawn and compiled THERE, by the compiler
# carried as .gpu/qcc.xz, and the plans come back without weights for later runs.
#
# Here:    bash scripts/gpu_7b_whole.sh prepare
#            .gpu/qcc.xz (the release compiler, stripped, xz) and .gpu/src7b/ (SmolLM2 tokenizer, the
#            in-vocabulary calibration text and token ids of scripts/gpu_artifacts_7b.sh; run it first)
# Device:  run tool, carry [".gpu/qcc.xz", ".gpu/qcc-run", ".gpu/nvrtc-cache.tar.xz", ".gpu/src7b"]:
#          [SCHEMES="kv-w4a4 kv-fp16"] [PEER=1] bash scripts/gpu_7b_whole.sh compile
#            1. scripts/make_smollm2_onnx.py --synthetic llama2-7b --layers $LAYERS (the same seeded
#               weights as the build machine's shorter models; the device's python has numpy and onnx)
#            2. qcc compile of the KV-cache graph -O w4a4 (RTN weights, a small calibration: the plan,
#               its kernels and its buffers do not depend on either) and -O fp16, each with a GPU plan
#               for MAX_BATCH sequences of up to SEQ tokens; wall time and peak RSS of each
#            3. the plans without weights as $OUT/art7b-L$LAYERS-<name>.tar.xz (copy them into .gpu/src7b)
#            4. when time is left (the call's limit is 600 s): the timings below on the full artifacts,
#               and with PEER=1 the PyTorch peer
#          bash scripts/gpu_7b_whole.sh time [DIR]   (DIR: plans carried without weights; default:
#                                                    .gpu/src7b/art7b-L32-*.tar.xz, the `compile`
#                                                    stage's output copied there; weights drawn on the GPU)
#            qcc-run generate: prefill of 2048 tokens, then decode after a 512-token prompt at batch 1
#            and 16 (eager steps and CUDA graph replay), w4a4 and fp16; then the PyTorch fp16 eager
#            peer of the same shape (scripts/torch_peer.py) when torch is importable
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
LAYERS="${LAYERS:-32}" SEQ="${SEQ:-2048}" MAX_BATCH="${MAX_BATCH:-16}"
STEM="llama2-7b-shaped-L$LAYERS"
SRC="$ROOT/.gpu/src7b"

prepare() {
  set -e
  local work="$ROOT/.cache/gpu-art-7b" ids="$ROOT/.gpu/art7b"
  for f in "$work/model/tokenizer.json" "$work/calib.txt" "$ids/prompt-512.npy" "$ids/ids-2048.npy"; do
    [[ -f "$f" ]] || { echo "$f missing: run scripts/gpu_artifacts_7b.sh first" >&2; exit 1; }
  done
  mkdir -p "$SRC"
  # Not named tokenizer.json: scripts/gpu_build.sh deletes those under .gpu (the artifacts' copies).
  cp "$work/model/tokenizer.json" "$SRC/smollm2-tokenizer.json"
  cp "$work/calib.txt" "$ids/prompt-512.npy" "$ids/ids-2048.npy" "$SRC/"
  cargo build --release -p qcc --bin qcc
  strip -o "$work/qcc-stripped" target/release/qcc
  xz -T0 -6 -c "$work/qcc-stripped" > "$ROOT/.gpu/qcc.xz.tmp" && mv "$ROOT/.gpu/qcc.xz.tmp" "$ROOT/.gpu/qcc.xz"
  du -sh "$ROOT/.gpu/qcc.xz" "$SRC" "$ROOT/.gpu/qcc-run" "$ROOT/.gpu/nvrtc-cache.tar.xz"
}

# name, plan directory (with or without weights), extra env: prefill and decode timings.
time_plan() {
  local name=$1 art=$2
  echo "== $name ($art): prefill of 2048 tokens"
  "$BIN" generate "$art" --ids "$SRC/ids-2048.npy" --max-tokens 0 --time-prefill 2>&1 | tee "$OUT/prefill-$name.txt"
  for b in 1 16; do
    echo "== $name: decode after a 512-token prompt, batch $b"
    "$BIN" generate "$art" --ids "$SRC/prompt-512.npy" --max-tokens 8 --batch "$b" 2>&1 | tee "$OUT/decode-$name-b$b.txt"
  done
}

torch_peer() {
  if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
    echo "== PyTorch fp16 eager peer, $LAYERS layers"
    python3 scripts/torch_peer.py --layers "$LAYERS" --past 512 --batch 1 16 --prefill 2048 --cuda-graph \
      --json "$OUT/torch-peer-L$LAYERS.json" 2>&1 | tee "$OUT/torch-peer-L$LAYERS.txt"
  else
    echo "== no torch with CUDA here: the PyTorch peer is skipped"
  fi
}

case "${1:-}" in
  prepare)
    prepare
    ;;
  compile)
    source "$ROOT/scripts/gpu_env.sh"
    { date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc; free -g; } | tee "$OUT/device.txt"
    work=/tmp/qcc-7b-whole
    rm -rf "$work" && mkdir -p "$work"
    xz -dc "$ROOT/.gpu/qcc.xz" > "$work/qcc" && chmod +x "$work/qcc"
    /usr/bin/time -f "synthetic ONNX ($LAYERS layers): %e s, %M KB peak" \
      python3 scripts/make_smollm2_onnx.py --synthetic llama2-7b --layers "$LAYERS" --seed 0 --out "$work/model" \
      2>&1 | tail -n 3 | tee "$OUT/model.txt"
    cp "$SRC/smollm2-tokenizer.json" "$work/model/tokenizer.json"
    compile_one() {  # name, scheme, extra args
      local name=$1 scheme=$2; shift 2
      /usr/bin/time -f "$name: compile %e s, %M KB peak RSS" "$work/qcc" compile "$work/model/$STEM-kv.onnx" \
        -O "$scheme" --max-tokens "$SEQ" --max-batch "$MAX_BATCH" -o "$work/$name.qcc" --pass-stats "$@" \
        > "$OUT/compile-$name.txt" 2>&1
      local rc=$?
      grep -E "compile .* s,|^ +[0-9]+ |total|error" "$OUT/compile-$name.txt"
      [[ $rc == 0 && -f "$work/$name.qcc/manifest.json" ]] || { echo "$name: compile failed ($rc)"; return 1; }
      # One file: what comes back from the device is limited in depth and count.
      tar -C "$work" --exclude='*.safetensors' --exclude='*.tmp*' -cJf "$OUT/art7b-L$LAYERS-$name.tar.xz" "$name.qcc"
    }
    for name in ${SCHEMES:-kv-w4a4 kv-fp16}; do
      case $name in
        kv-w4a4) compile_one kv-w4a4 w4a4 --weight-rounding rtn --calib "$SRC/calib.txt" --calib-samples 2 \
                   --calib-ctx 64 --no-stats-cache ;;
        kv-fp16) compile_one kv-fp16 fp16 ;;
      esac
    done
    rm -rf "$work/model"
    echo "compile stage done after ${SECONDS} s"
    for name in ${SCHEMES:-kv-w4a4 kv-fp16}; do
      ((SECONDS < 420)) && [[ -f "$work/$name.qcc/manifest.json" ]] && time_plan "$name" "$work/$name.qcc"
    done
    ((SECONDS < 480)) && [[ "${PEER:-0}" == 1 ]] && torch_peer
    ;;
  time)
    source "$ROOT/scripts/gpu_env.sh"
    dir="${2:-}"
    if [[ -z "$dir" ]]; then  # the plans as they came back from `compile`, kept packed in .gpu/src7b
      dir=/tmp/art7b-L$LAYERS
      rm -rf "$dir" && mkdir -p "$dir"
      for f in "$SRC"/art7b-L$LAYERS-*.tar.xz; do tar -C "$dir" -xJf "$f"; done
    fi
    { date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; } | tee "$OUT/device.txt"
    export QCC_SYNTHETIC_WEIGHTS="${QCC_SYNTHETIC_WEIGHTS:-7}"
    for name in kv-w4a4 kv-fp16; do
      [[ -f "$dir/$name.qcc/manifest.json" ]] && time_plan "$name" "$dir/$name.qcc"
    done
    torch_peer
    ;;
  *)
    echo "usage: bash scripts/gpu_7b_whole.sh prepare | compile | time [DIR]" >&2
    exit 2
    ;;
esac

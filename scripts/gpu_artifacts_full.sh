#!/usr/bin/env bash
# The whole SmolLM2-135M (30 layers, real weights here) compiled -O fp16 and -O w4a4, plain and with
# a KV cache, copied into .gpu/artfull/ WITHOUT their weights (the w4a4 model's weights are over
# what a device call carries): on the GPU, `QCC_SYNTHETIC_WEIGHTS` fills the buffers with seeded
# random data, so these artifacts time the real compiled plans (scripts/gpu_check.sh --artifacts);
# their outputs mean nothing there. Also token ids for prefill (128, 1024, 2048) and a 512-token
# prompt for decode. Needs target/release/qcc (or QCC=...) and scripts/setup.sh's fixtures.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
QCC="${QCC:-$ROOT/target/release/qcc}"
[[ -x "$QCC" ]] || { echo "no qcc binary: cargo build --release -p qcc (or set QCC)" >&2; exit 1; }
MODEL_DIR="$ROOT/.cache/models/smollm2-135m" WORK="$ROOT/.cache/gpu-art-full" OUT="$ROOT/.gpu/artfull"
SEQ="${SEQ:-2048}"
mkdir -p "$WORK" "$OUT"
rm -rf "${OUT:?}"/*
for kind in "" "-kv"; do
  for scheme in fp16 w4a4; do
    name="${kind#-}${kind:+-}$scheme"
    calib=()
    [[ $scheme == w4a4 ]] && calib=(--calib "$ROOT/.cache/data/calib.txt")
    /usr/bin/time -f "$name: compile %e s, %M KB peak" "$QCC" compile "$MODEL_DIR/smollm2-135m$kind.onnx" \
      -O "$scheme" "${calib[@]}" --max-tokens "$SEQ" -o "$WORK/$name.qcc"
    mkdir -p "$OUT/$name.qcc"
    (cd "$WORK/$name.qcc" && find . -type f ! -name '*.safetensors' ! -name '*.tmp*' -print0 |
      xargs -0 cp --parents -t "$OUT/$name.qcc")
  done
done
"$ROOT/.cache/venv/bin/python" - "$OUT" <<'PY'
import sys
import numpy as np
out = sys.argv[1]
rng = np.random.default_rng(0)
for n in (128, 1024, 2048):
    np.save(f"{out}/ids-{n}.npy", rng.integers(0, 32000, size=(1, n), dtype=np.int64))
np.save(f"{out}/prompt-512.npy", rng.integers(0, 32000, size=(1, 512), dtype=np.int64))
PY
du -sh "$OUT" "$OUT"/*

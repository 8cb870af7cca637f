#!/usr/bin/env bash
# Builds, here on the CPU, compiled qcc artifacts of a Llama-2-7B-shaped decoder with seeded random weights,
# and copies them WITHOUT their weights into .gpu/art7b/ (a few MiB: they travel with the `run` tool,
# carry [".gpu"]; the GPU runtime fills the weight buffers with seeded random data itself).
#   - the synthetic model: scripts/make_smollm2_onnx.py --synthetic llama2-7b --layers LAYERS --seed SEED
#     (hidden 4096, ffn 11008, 32 heads, 32 KV heads, head_dim 128, vocab 32000, untied LM head),
#     in .cache/gpu-art-7b/model/llama2-7b-shaped-L<LAYERS>{,-kv}.onnx(.data)
#   - a calibration text whose SmolLM2-tokenizer ids are all < 32000 (out-of-vocabulary spans dropped;
#     Llama-2's own tokenizer is not at hand, and with random weights only the ids' range matters)
#   - artifacts $SCHEMES (default fp16 w4a4; fp32 = -O none), compiled with a small calibration
#     (CALIB_SAMPLES windows of CALIB_CTX tokens) and a GPU memory plan for up to SEQ tokens (any
#     sequence length up to SEQ binds at run time), in .cache/gpu-art-7b/<name>.qcc (with weights)
#   - the same artifacts minus the weights file (model.qir.safetensors) in .gpu/art7b/<name>.qcc
#     (.gpu/art7b-L<LAYERS>/ for more than one layer)
#   - token ids for runs: .gpu/art7b/ids-16.npy and ids-128.npy ([1, n] int64, all < 32000)
#   - a CPU check of every full artifact: `qcc run <name>.qcc --input input_ids=ids-16.npy` gives finite
#     logits [1, 16, 32000] (.cache/gpu-art-7b/ref-<name>/logits.npy; seeded weights, not the GPU's)
# Each compile runs under /usr/bin/time -v (log: .cache/gpu-art-7b/time-<name>.log): wall time, peak RSS.
# KV=1 also compiles the KV-cache graph as kv-fp16.qcc (-O fp16) and kv-w4a4.qcc (-O w4a4, when w4a4 is
# among SCHEMES), with a GPU memory plan for up to MAX_BATCH sequences (default 1; MAX_BATCH=16 lets
# `qcc-run generate --batch 16` time batch-16 decode); artifacts not rebuilt stay as they were. STATS_CACHE=1 keeps the calibration
# statistics cache beside the model (GBs at this size; off by default).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
LAYERS="${LAYERS:-1}" SEED="${SEED:-0}" SEQ="${SEQ:-2048}"
SCHEMES="${SCHEMES-fp16 w4a4}" KV="${KV:-0}" STATS_CACHE="${STATS_CACHE:-0}" MAX_BATCH="${MAX_BATCH:-1}"
CALIB_SAMPLES="${CALIB_SAMPLES:-4}" CALIB_CTX="${CALIB_CTX:-128}"
VOCAB=32000
PY="$ROOT/.cache/venv/bin/python"
WORK="$ROOT/.cache/gpu-art-7b"; [[ "$LAYERS" == 1 ]] || WORK="$WORK-L$LAYERS"
# One layer (the default) goes to .gpu/art7b, more layers to .gpu/art7b-L<LAYERS> (gpu_check times both).
if [[ "$LAYERS" == 1 ]]; then OUT="$ROOT/.gpu/art7b"; else OUT="$ROOT/.gpu/art7b-L$LAYERS"; fi
STEM="llama2-7b-shaped-L$LAYERS"
MODEL="$WORK/model/$STEM.onnx"
GGUF="$ROOT/.cache/models/smollm2-135m/smollm2-135m.gguf"
QCC="${QCC:-}"
if [[ -z "$QCC" ]]; then
  for q in target/release/qcc target/debug/qcc; do [[ -x $q ]] && { QCC="$ROOT/$q"; break; }; done
fi
[[ -x "$QCC" ]] || { echo "no qcc binary: cargo build --release -p qcc --bin qcc (or set QCC)" >&2; exit 1; }
[[ -f "$GGUF" ]] || { echo "$GGUF missing (the SmolLM2 tokenizer): run scripts/fixtures.sh" >&2; exit 1; }
echo "qcc: $QCC ($(stat -c %y "$QCC"))"

mkdir -p "$WORK" "$OUT"
# The model is rebuilt when its layer count, seed or the generator changed.
WANT="$(sha256sum scripts/make_smollm2_onnx.py | cut -d' ' -f1) L$LAYERS seed$SEED"
if [[ ! -s "$MODEL" || ! -s "$WORK/model/$STEM.onnx.data" || "$(cat "$WORK/model/.stamp" 2>/dev/null)" != "$WANT" ]]; then
  /usr/bin/time -f "synthetic ONNX: %e s, %M KB peak" \
    "$PY" scripts/make_smollm2_onnx.py --synthetic llama2-7b --layers "$LAYERS" --seed "$SEED" --out "$WORK/model"
  printf '%s' "$WANT" > "$WORK/model/.stamp"
fi
# qcc compile finds the tokenizer beside the model (it has no --tokenizer option).
"$QCC" tokenizer --from-gguf "$GGUF" -o "$WORK/model/tokenizer.json"

# Texts inside the vocabulary: drop the character spans of tokens >= VOCAB and re-encode until every
# token id is < VOCAB.
"$PY" - "$WORK" "$OUT" "$VOCAB" <<'EOF'
import sys
import numpy as np
from tokenizers import Tokenizer
work, out, vocab = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = Tokenizer.from_file(f"{work}/model/tokenizer.json")

sys.path.insert(0, "scripts")
from in_vocab import in_vocab as cut_text


def in_vocab(text):
    return cut_text(tok, text, vocab)

calib, calib_ids = in_vocab(open(".cache/data/calib.txt").read())
assert max(calib_ids) < vocab
open(f"{work}/calib.txt", "w").write(calib)
_, ids = in_vocab(open(".cache/data/sotu-last.txt").read())
assert len(ids) >= 2048 and max(ids) < vocab
for n in (16, 128, 2048):
    np.save(f"{out}/ids-{n}.npy", np.array(ids[:n], dtype=np.int64).reshape(1, n))
# The prompt of the KV-cache decode timing (gpu_check.sh: decode steps after 512 cached positions).
np.save(f"{out}/prompt-512.npy", np.array(ids[:512], dtype=np.int64).reshape(1, 512))
print(f"calibration text {len(calib)} chars, {len(calib_ids)} tokens (all < {vocab}); ids-16/128/2048.npy, prompt-512.npy")
EOF

cache_flag=(--no-stats-cache); [[ "$STATS_CACHE" == 1 ]] && cache_flag=()
compile() {  # name, model, scheme, extra args...
  local name=$1 model=$2 scheme=$3; shift 3
  rm -rf "$WORK/$name.qcc" "$WORK/ref-$name"
  /usr/bin/time -v -o "$WORK/time-$name.log" "$QCC" compile "$model" -O "$scheme" --max-tokens "$SEQ" \
    -o "$WORK/$name.qcc" "$@"
  [[ -f "$WORK/$name.qcc/manifest.json" ]] || { echo "$name.qcc has no GPU plan (manifest.json)" >&2; exit 1; }
  local wall rss
  wall=$(sed -n 's/.*Elapsed (wall clock) time (h:mm:ss or m:ss): //p' "$WORK/time-$name.log")
  rss=$(sed -n 's/.*Maximum resident set size (kbytes): //p' "$WORK/time-$name.log")
  echo "$name: compile wall $wall, peak RSS $((rss / 1024)) MiB"
}
strip_weights() {  # name: the artifact without its weights, into $OUT
  local name=$1
  rm -rf "$OUT/$name.qcc"
  mkdir -p "$OUT/$name.qcc"
  (cd "$WORK/$name.qcc" && find . -type f ! -name '*.safetensors' ! -name '*.tmp*' -print0 |
    xargs -0 cp --parents -t "$OUT/$name.qcc")
}
check_cpu() {  # name: logits of the full artifact on the CPU executor are finite
  local name=$1
  /usr/bin/time -f "$name: CPU run %e s, %M KB peak" \
    "$QCC" run "$WORK/$name.qcc" --input input_ids="$OUT/ids-16.npy" --output-dir "$WORK/ref-$name"
  "$PY" - "$WORK/ref-$name/logits.npy" "$name" <<'EOF'
import sys
import numpy as np
x = np.load(sys.argv[1])
assert x.shape == (1, 16, 32000), x.shape
assert np.isfinite(x).all(), "non-finite logits"
print(f"{sys.argv[2]}: logits {x.shape} finite, mean {x.mean():.4f} std {x.std():.4f} "
      f"argmax {x[0].argmax(-1)[:8].tolist()}...")
EOF
}

# Only the artifacts named here are replaced (SCHEMES= KV=1 rebuilds kv-fp16 alone).
for name in $SCHEMES; do
  scheme=$name; [[ $name == fp32 ]] && scheme=none
  compile "$name" "$MODEL" "$scheme" --calib "$WORK/calib.txt" --calib-samples "$CALIB_SAMPLES" \
    --calib-ctx "$CALIB_CTX" "${cache_flag[@]}"
  strip_weights "$name"
  check_cpu "$name"
done
if [[ "$KV" == 1 ]]; then
  # The KV-cache graph: fp16, and w4a4 calibrated as prefills from an empty cache.
  compile kv-fp16 "$WORK/model/$STEM-kv.onnx" fp16 --max-batch "$MAX_BATCH"
  strip_weights kv-fp16
  if [[ " $SCHEMES " == *" w4a4 "* ]]; then
    compile kv-w4a4 "$WORK/model/$STEM-kv.onnx" w4a4 --calib "$WORK/calib.txt" --calib-samples "$CALIB_SAMPLES" \
      --calib-ctx "$CALIB_CTX" "${cache_flag[@]}" --max-batch "$MAX_BATCH"
    strip_weights kv-w4a4
  fi
fi

echo "artifacts with weights:"
du -sh "$WORK"/*.qcc
echo "without weights ($OUT):"
for d in "$OUT"/*.qcc; do
  echo "$d:"; (cd "$d" && find . -type f -printf '  %p %s\n' | sort)
done
du -sh "$OUT" "$OUT"/*
size_kib=$(du -sk "$OUT" | cut -f1)
((size_kib < 20 * 1024)) || { echo "error: $OUT is $((size_kib / 1024)) MiB (budget 20 MiB)" >&2; exit 1; }

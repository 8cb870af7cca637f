#!/usr/bin/env bash
# Builds, here on the CPU, everything the GPU check of compiled artifacts needs, under .gpu/art/
# (small enough to travel with the `run` tool, carry [".gpu"]):
#   - the real SmolLM2 cut to its first LAYERS layers, VOCAB vocabulary rows and CTX rotary positions
#     (scripts/make_smollm2_onnx.py --layers/--vocab/--ctx), in .cache/gpu-art/model/
#   - a calibration text and an evaluation token sequence whose tokens all fall inside that
#     vocabulary (the cut embedding has VOCAB rows), from the fixture texts
#   - artifacts $SCHEMES (default fp16 w8a8 w4a4; fp32 = -O none) as <name>.qcc (`qcc compile ... -o X.qcc`, plan for SEQ tokens)
#   - kv-fp16.qcc: the KV-cache variant of the model (-O fp16) and a 16-token prompt, for `qcc-run generate`
#   - CPU-executor reference logits: ref-<scheme>/logits.npy (`qcc run X.qcc --input ... --output-dir`)
# Then: cargo build --release -p qcc-runtime --features cuda --bin qcc-run &&
#       strip -o .gpu/qcc-run target/release/qcc-run; optionally the micro-kernel tests:
#       cargo test --release -p qcc-runtime --features cuda --test cuda_executor --no-run, stripped to
#       .gpu/cuda_executor; on the device: bash scripts/gpu_check.sh --artifacts
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
LAYERS="${LAYERS:-1}" VOCAB="${VOCAB:-1024}" CTX="${CTX:-1024}" SEQ="${SEQ:-128}"
# Which artifacts to build (a call carries at most 64 MiB: with qcc-run, fp32 and kv-fp16 do not both fit).
SCHEMES="${SCHEMES:-fp16 w8a8 w4a4}" KV="${KV:-1}"
PY="$ROOT/.cache/venv/bin/python"
WORK="$ROOT/.cache/gpu-art"
OUT="$ROOT/.gpu/art"
QCC="${QCC:-}"
if [[ -z "$QCC" ]]; then
  for q in target/release/qcc target/debug/qcc; do [[ -x $q ]] && { QCC="$ROOT/$q"; break; }; done
fi
[[ -x "$QCC" ]] || { echo "no qcc binary: cargo build --release -p qcc (or set QCC)" >&2; exit 1; }
echo "qcc: $QCC ($(stat -c %y "$QCC"))"

mkdir -p "$WORK" "$OUT"
"$PY" scripts/make_smollm2_onnx.py --layers "$LAYERS" --vocab "$VOCAB" --ctx "$CTX" --out "$WORK/model"
cp .cache/models/smollm2-135m/tokenizer.json "$WORK/model/tokenizer.json"

# Texts inside the cut vocabulary: drop the character spans of out-of-vocabulary tokens and
# re-encode until every token id is < VOCAB.
"$PY" - "$WORK" "$OUT" "$VOCAB" "$SEQ" <<'EOF'
import sys
import numpy as np
from tokenizers import Tokenizer
work, out, vocab, seq = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
tok = Tokenizer.from_file(f"{work}/model/tokenizer.json")

sys.path.insert(0, "scripts")
from in_vocab import in_vocab as cut_text


def in_vocab(text):
    return cut_text(tok, text, vocab)

calib, _ = in_vocab(open(".cache/data/calib.txt").read())
open(f"{work}/calib.txt", "w").write(calib)
_, ids = in_vocab(open(".cache/data/sotu-last.txt").read())
assert len(ids) >= seq and max(ids) < vocab
np.save(f"{out}/ids.npy", np.array(ids[:seq], dtype=np.int64).reshape(1, seq))
# A shorter sequence than the plan's maximum: sizes bound at run time (checked on the GPU by verify).
np.save(f"{out}/ids-77.npy", np.array(ids[seq:seq + 77], dtype=np.int64).reshape(1, 77))
np.save(f"{out}/prompt.npy", np.array(ids[:16], dtype=np.int64).reshape(1, 16))
# Text for `qcc eval/run --device cuda` (the compiler's CLI on the GPU): in-vocabulary SOTU text.
text, _ = in_vocab(open(".cache/data/sotu-last.txt").read())
open(f"{out}/eval.txt", "w").write(text[:6000])
prompt = next(p for p in (tok.decode(ids[:n]) for n in range(16, 0, -1))
              if max(tok.encode(p, add_special_tokens=False).ids) < vocab)
open(f"{out}/prompt.txt", "w").write(prompt)
print(f"calibration text {len(calib)} chars; eval ids: {seq} of {len(ids)} in-vocabulary tokens")
EOF

rm -rf "$OUT"/*.qcc "$OUT"/ref-*
for name in $SCHEMES; do
  scheme=$name; [[ $name == fp32 ]] && scheme=none
  rm -rf "$OUT/$name.qcc" "$OUT/ref-$name"
  /usr/bin/time -f "$name: compile %e s, %M KB peak" "$QCC" compile "$WORK/model/smollm2-135m.onnx" -O "$scheme" \
    --calib "$WORK/calib.txt" --calib-samples 8 --calib-ctx 128 --max-tokens "$SEQ" -o "$OUT/$name.qcc"
  [[ -f "$OUT/$name.qcc/manifest.json" ]] || { echo "$name.qcc has no GPU plan (manifest.json)" >&2; exit 1; }
  "$QCC" run "$OUT/$name.qcc" --input input_ids="$OUT/ids.npy" --output-dir "$OUT/ref-$name"
done
# Generation with the KV cache: the same cut model with past_key_values.* inputs, fp16 and w4a4
# (calibrated as prefills from an empty cache).
if [[ "$KV" == 1 ]]; then
  "$QCC" compile "$WORK/model/smollm2-135m-kv.onnx" -O fp16 --max-tokens "$SEQ" -o "$OUT/kv-fp16.qcc"
  [[ -f "$OUT/kv-fp16.qcc/manifest.json" ]] || { echo "kv-fp16.qcc has no GPU plan" >&2; exit 1; }
  if [[ " $SCHEMES " == *" w4a4 "* ]]; then
    "$QCC" compile "$WORK/model/smollm2-135m-kv.onnx" -O w4a4 --calib "$WORK/calib.txt" --calib-samples 8 \
      --calib-ctx 128 --max-tokens "$SEQ" -o "$OUT/kv-w4a4.qcc"
    [[ -f "$OUT/kv-w4a4.qcc/manifest.json" ]] || { echo "kv-w4a4.qcc has no GPU plan" >&2; exit 1; }
  fi
fi
# CPU references for the compiler's own CLI with --device cuda (gpu_check.sh --artifacts, when .gpu/qcc.xz
# is carried): perplexity of the w4a4 artifact and greedy text from the KV-cache artifact.
if [[ -d "$OUT/w4a4.qcc" ]]; then
  "$QCC" eval "$OUT/w4a4.qcc" --perplexity "$OUT/eval.txt" --ctx 64 --windows 8 --json > "$OUT/ref-eval-w4a4.json"
  cat "$OUT/ref-eval-w4a4.json"
fi
if [[ -d "$OUT/kv-fp16.qcc" ]]; then
  "$QCC" run "$OUT/kv-fp16.qcc" --prompt "$(cat "$OUT/prompt.txt")" --max-tokens 12 > "$OUT/ref-run-kv-fp16.txt"
  cat "$OUT/ref-run-kv-fp16.txt"
fi
# The compiler itself (statically linked MLIR, no GPU libraries needed at build time), compressed to travel.
if [[ "${CARRY_QCC:-0}" == 1 ]]; then
  strip -o "$WORK/qcc" "$QCC" && xz -T2 -6 -c "$WORK/qcc" > "$ROOT/.gpu/qcc.xz"
  ls -la "$ROOT/.gpu/qcc.xz"
fi
rm -rf "$OUT"/*.qcc/model.qir.safetensors.tmp* 2>/dev/null || true
du -sh "$OUT" "$OUT"/*
size_mib=$(du -sm "$ROOT/.gpu" | cut -f1)
((size_mib < 58)) || echo "warning: .gpu is ${size_mib} MiB; with the working tree a call may exceed 64 MiB (drop a scheme)" >&2

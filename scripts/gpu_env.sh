# Sourced by the scripts that run on the GPU machine (gpu_check.sh, gpu_prefill.sh): $OUT, $BIN, and
# the library path for libnvrtc.so.13 and libcublas.so.13 (the CUDA toolkit's, else any pip-installed
# nvidia wheel's), exported for qcc-run's dynamic loading as QCC_CUDA_LIB_DIR too.
OUT="${OUT:-$ROOT/.gpu/out}"
mkdir -p "$OUT"
BIN="${QCC_RUN:-$ROOT/.gpu/qcc-run}"
libdirs=()
for lib in libnvrtc.so.13 libcublas.so.13; do
  d="$(ldconfig -p 2>/dev/null | awk -v l="$lib" '$1 == l {print $NF; exit}')"
  [[ -n "$d" ]] && continue
  f="$(find /usr/local/cuda*/ /usr/local/cuda/targets /opt /usr/lib -name "$lib" 2>/dev/null | head -n1)"
  [[ -n "$f" ]] && libdirs+=("$(dirname "$f")")
done
if ((${#libdirs[@]})); then
  export LD_LIBRARY_PATH="$(printf '%s:' "${libdirs[@]}")${LD_LIBRARY_PATH:-}"
  export QCC_CUDA_LIB_DIR="$(printf '%s:' "${libdirs[@]}")"
fi
# NVRTC's PTX compiled ahead of time (.gpu/nvrtc-cache.tar.xz or .gpu/cache, scripts/gpu_build.sh) seeds a writable cache
# directory, so a fresh GPU machine skips about a minute of NVRTC.
export QCC_CACHE_DIR="${QCC_CACHE_DIR:-/tmp/qcc-cache}"
if [[ -f "$ROOT/.gpu/nvrtc-cache.tar.xz" ]]; then
  mkdir -p "$QCC_CACHE_DIR"
  tar -C "$QCC_CACHE_DIR" --skip-old-files -xJf "$ROOT/.gpu/nvrtc-cache.tar.xz"
elif [[ -d "$ROOT/.gpu/cache/nvrtc" ]]; then
  mkdir -p "$QCC_CACHE_DIR/nvrtc"
  cp -n "$ROOT/.gpu/cache/nvrtc/"*.ptx "$QCC_CACHE_DIR/nvrtc/" 2>/dev/null || true
fi

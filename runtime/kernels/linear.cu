// Micro-kernel of the float `linear` op (the unquantized artifact) as qcc's lowering launches it
// (compiler/src/lower/micro.rs): y = x w^T (+ bias) in x's float type, f32 accumulation
// (runtime/src/cpu/ops/fused.rs `linear` sums in another order: agreement is to rounding).
// Geometry: grid [ceil(N/64), ceil(M/16)], 128 threads, a 16 x 64 tile of y per block.

#define TILE_N 64
#define TILE_M 16


// Element access by qcc dtype name. int4 activations take one byte each (sign-extended i8);
// int4 weights are packed two per byte along K, low nibble first.

// y = x w^T (+ bias), float operands, f32 accumulation, written in x's type.
template <class X, class W, bool BIAS>
__device__ void linear_float(const typename X::S* x, const typename W::S* w, const typename X::S* bias,
                             typename X::S* y, long M, long N, long K) {
  for (long n0 = (long)blockIdx.x * TILE_N; n0 < N; n0 += (long)gridDim.x * TILE_N) {
    long n = n0 + (threadIdx.x % TILE_N);
    for (long m0 = (long)blockIdx.y * TILE_M; m0 < M; m0 += (long)gridDim.y * TILE_M) {
      long mb = m0 + (threadIdx.x / TILE_N) * 8;
      if (n >= N) continue;
      float acc[8];
#pragma unroll
      for (int r = 0; r < 8; ++r) acc[r] = 0.0f;
      for (long k = 0; k < K; ++k) {
        float wv = W::get(w, n * K + k);
#pragma unroll
        for (int r = 0; r < 8; ++r) acc[r] = fmaf(X::get(x, min(mb + r, M - 1) * K + k), wv, acc[r]);
      }
#pragma unroll
      for (int r = 0; r < 8; ++r) {
        if (mb + r >= M) continue;
        float v = acc[r];
        if (BIAS) v = __fadd_rn(v, X::get(bias, n));
        X::put(y, (mb + r) * N + n, v);
      }
    }
  }
}

// Entry points: linear_{X}_w{W}[_bias].
#define LINEAR_ENTRY(XN, WN)                                                                             \
  extern "C" __global__ void __launch_bounds__(128) linear_##XN##_w##WN(                                 \
      const T_##XN::S* x, const T_##WN::S* w, T_##XN::S* y, long M, long N, long K) {                    \
    linear_float<T_##XN, T_##WN, false>(x, w, nullptr, y, M, N, K);                                      \
  }                                                                                                      \
  extern "C" __global__ void __launch_bounds__(128) linear_##XN##_w##WN##_bias(                          \
      const T_##XN::S* x, const T_##WN::S* w, const T_##XN::S* bias, T_##XN::S* y, long M, long N,       \
      long K) {                                                                                          \
    linear_float<T_##XN, T_##WN, true>(x, w, bias, y, M, N, K);                                          \
  }
LINEAR_ENTRY(f32, f32) LINEAR_ENTRY(f16, f16) LINEAR_ENTRY(bf16, bf16) LINEAR_ENTRY(f32, f16)
LINEAR_ENTRY(f16, f32)

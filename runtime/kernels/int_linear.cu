// Micro-kernels of the `int_linear` op as qcc's lowering launches them
// (compiler/src/lower/micro.rs is the contract: entry names, argument order, launch geometry).
// Correctness first: every output reproduces the CPU executor (runtime/src/cpu/ops/output_quant.rs
// `int_linear`) -- integer products are accumulated exactly in int64 (i16 prefix
// rows times int8 weights can pass 2^31), converted to f32 with one rounding (as the CPU's exact f32
// or f64 sums are), then the epilogue y = acc * scale[n] (+ bias[n]) with each step rounded in f32
// (no FMA contraction), then (`_res` entries, f32) + res[m, n]: the residual `add` that was the
// result's only reader (compiler/src/lower/micro.rs `fused_residual`), the same f32 addition. The
// fast W4 kernels (w4_gemv.cu, w4a4_gemm.cu) use another layout.
//
// Geometry: grid [ceil(N/64), ceil(M/16)], 128 threads; a block owns a 16 x 64 tile of y, each
// thread one column and 8 rows. Grid-stride loops keep any M, N correct.

#define TILE_N 64
#define TILE_M 16


// Element access by qcc dtype name. int4 activations take one byte each (sign-extended i8);
// int4 weights are packed two per byte along K, low nibble first.
struct T_i16 { typedef short S; static __device__ int geti(const S* p, long i) { return p[i]; } };
struct T_i8 { typedef i8 S; static __device__ int geti(const S* p, long i) { return p[i]; } };
typedef T_i8 T_i4;  // activations: one byte per value
struct W_i8 { static __device__ int geti(const unsigned char* w, long i) { return (int)(i8)w[i]; } };
struct W_i4 {
  static __device__ int geti(const unsigned char* w, long i) {
    unsigned char b = w[i >> 1];
    int nib = (i & 1) ? (b >> 4) : (b & 15);
    return nib >= 8 ? nib - 16 : nib;
  }
};

// Integer activations: y[m, n] = f32(sum_k x[m,k] w[n,k]) * scale[n] (+ bias[n]).
template <class X, class W, class Y, bool BIAS>
__device__ void int_linear_int(const typename X::S* x, const unsigned char* w, const float* scale,
                               const float* bias, const float* res, typename Y::S* y, long M, long N, long K) {
  for (long n0 = (long)blockIdx.x * TILE_N; n0 < N; n0 += (long)gridDim.x * TILE_N) {
    long n = n0 + (threadIdx.x % TILE_N);
    for (long m0 = (long)blockIdx.y * TILE_M; m0 < M; m0 += (long)gridDim.y * TILE_M) {
      long mb = m0 + (threadIdx.x / TILE_N) * 8;
      if (n >= N) continue;
      long long acc[8];
#pragma unroll
      for (int r = 0; r < 8; ++r) acc[r] = 0;
      for (long k = 0; k < K; ++k) {
        long long wv = W::geti(w, n * K + k);
#pragma unroll
        for (int r = 0; r < 8; ++r) acc[r] += (long long)X::geti(x, min(mb + r, M - 1) * K + k) * wv;
      }
#pragma unroll
      for (int r = 0; r < 8; ++r) {
        if (mb + r >= M) continue;
        float v = __fmul_rn(__ll2float_rn(acc[r]), scale[n]);
        if (BIAS) v = __fadd_rn(v, bias[n]);
        if (res) v = __fadd_rn(v, res[(mb + r) * N + n]);
        Y::put(y, (mb + r) * N + n, v);
      }
    }
  }
}

// Float activations. ACT_BITS > 0: each row is quantized dynamically (step = absmax / (2^(b-1)-1),
// q = clamp(rint(x / step))) and y = (f32(q . w) * step) * scale + bias; ACT_BITS = 0: weight-only
// quantization, y = f32 dot product * scale + bias (summation order differs from the CPU's sgemm).
template <class X, class W, class Y, int ACT_BITS, bool BIAS>
__device__ void int_linear_float(const typename X::S* x, const unsigned char* w, const float* scale,
                                 const float* bias, const float* res, typename Y::S* y, long M, long N, long K) {
  __shared__ float row_step[TILE_M];
  const float qmax = ACT_BITS > 0 ? (float)((1 << (ACT_BITS - 1)) - 1) : 1.0f;
  for (long m0 = (long)blockIdx.y * TILE_M; m0 < M; m0 += (long)gridDim.y * TILE_M) {
    __syncthreads();
    if (ACT_BITS > 0 && threadIdx.x < TILE_M) {
      long m = m0 + threadIdx.x;
      float amax = 0.0f;
      if (m < M)
        for (long k = 0; k < K; ++k) amax = fmaxf(amax, fabsf(X::get(x, m * K + k)));
      row_step[threadIdx.x] = amax > 0.0f ? __fdiv_rn(amax, qmax) : 1.0f;
    }
    __syncthreads();
    for (long n0 = (long)blockIdx.x * TILE_N; n0 < N; n0 += (long)gridDim.x * TILE_N) {
      long n = n0 + (threadIdx.x % TILE_N);
      int rb = (threadIdx.x / TILE_N) * 8;
      long mb = m0 + rb;
      if (n >= N) continue;
      // |q| <= 2^(b-1) and |w| <= 128: int32 holds K <= 2^15 products of 8-bit values exactly.
      int iacc[8];
      float facc[8];
#pragma unroll
      for (int r = 0; r < 8; ++r) { iacc[r] = 0; facc[r] = 0.0f; }
      for (long k = 0; k < K; ++k) {
        int wv = W::geti(w, n * K + k);
#pragma unroll
        for (int r = 0; r < 8; ++r) {
          // Rows past M repeat row M-1 (in range, results discarded): no predicates in the loop.
          float xv = X::get(x, min(mb + r, M - 1) * K + k);
          if (ACT_BITS > 0) {
            float q = rintf(__fdiv_rn(xv, row_step[rb + r]));
            q = fminf(fmaxf(q, -qmax - 1.0f), qmax);
            iacc[r] += (int)q * wv;
          } else {
            facc[r] = __fadd_rn(facc[r], __fmul_rn(xv, (float)wv));
          }
        }
      }
#pragma unroll
      for (int r = 0; r < 8; ++r) {
        if (mb + r >= M) continue;
        float v = ACT_BITS > 0 ? __fmul_rn(__int2float_rn(iacc[r]), row_step[rb + r]) : facc[r];
        v = __fmul_rn(v, scale[n]);
        if (BIAS) v = __fadd_rn(v, bias[n]);
        if (res) v = __fadd_rn(v, res[(mb + r) * N + n]);
        Y::put(y, (mb + r) * N + n, v);
      }
    }
  }
}

// Entry points: int_linear_x{X}_w{W}[_a{bits}][_bias][_res]_{Y}(x, w, scale, [bias], [res], y, M, N,
// K); `_res` only with an f32 output. One definition per entry: SUF the name's suffix, BP / RP the
// bias / res parameters (IL_PB, IL_PR, or IL_NO for none: function-like, so that they expand only in
// IL_DEF), BA / RA their names or nullptr.
#define IL_PB() , const float* bias
#define IL_PR() , const float* res
#define IL_NO()
#define IL_DEF(NAME, XN, YN, BP, RP, CALL)                                                               \
  extern "C" __global__ void __launch_bounds__(128) NAME(const T_##XN::S* x, const unsigned char* w,     \
                                                         const float* scale BP() RP(), T_##YN::S* y,     \
                                                         long M, long N, long K) {                       \
    CALL;                                                                                                \
  }
#define INT_DEF(XN, WN, YN, SUF, BIAS, BP, BA, RP, RA)                                                   \
  IL_DEF(int_linear_x##XN##_w##WN##SUF##_##YN, XN, YN, BP, RP,                                           \
         (int_linear_int<T_##XN, W_##WN, T_##YN, BIAS>(x, w, scale, BA, RA, y, M, N, K)))
#define FLOAT_DEF(XN, WN, YN, BITS, SUF, BIAS, BP, BA, RP, RA)                                           \
  IL_DEF(int_linear_x##XN##_w##WN##SUF##_##YN, XN, YN, BP, RP,                                           \
         (int_linear_float<T_##XN, W_##WN, T_##YN, BITS, BIAS>(x, w, scale, BA, RA, y, M, N, K)))
#define INT_ALL(XN, WN, YN)                                                                              \
  INT_DEF(XN, WN, YN, _bias, true, IL_PB, bias, IL_NO, nullptr)                                        \
  INT_DEF(XN, WN, YN, , false, IL_NO, nullptr, IL_NO, nullptr)
#define FLOAT_BIAS(XN, WN, YN, BITS, ASUF)                                                               \
  FLOAT_DEF(XN, WN, YN, BITS, ASUF##_bias, true, IL_PB, bias, IL_NO, nullptr)                          \
  FLOAT_DEF(XN, WN, YN, BITS, ASUF, false, IL_NO, nullptr, IL_NO, nullptr)
#define FLOAT_ALL(XN, WN, YN) FLOAT_BIAS(XN, WN, YN, 0, ) FLOAT_BIAS(XN, WN, YN, 4, _a4) FLOAT_BIAS(XN, WN, YN, 8, _a8)
#define INT_RES(XN, WN)                                                                                  \
  INT_DEF(XN, WN, f32, _bias_res, true, IL_PB, bias, IL_PR, res)                                         \
  INT_DEF(XN, WN, f32, _res, false, IL_NO, nullptr, IL_PR, res)
#define FLOAT_RES_BIAS(XN, WN, BITS, ASUF)                                                               \
  FLOAT_DEF(XN, WN, f32, BITS, ASUF##_bias_res, true, IL_PB, bias, IL_PR, res)                           \
  FLOAT_DEF(XN, WN, f32, BITS, ASUF##_res, false, IL_NO, nullptr, IL_PR, res)
#define FLOAT_RES(XN, WN) FLOAT_RES_BIAS(XN, WN, 0, ) FLOAT_RES_BIAS(XN, WN, 4, _a4) FLOAT_RES_BIAS(XN, WN, 8, _a8)
INT_RES(i16, i4) INT_RES(i16, i8) INT_RES(i8, i4) INT_RES(i8, i8) INT_RES(i4, i4) INT_RES(i4, i8)
FLOAT_RES(f32, i4) FLOAT_RES(f32, i8) FLOAT_RES(f16, i4) FLOAT_RES(f16, i8)

INT_ALL(i16, i4, f32) INT_ALL(i16, i8, f32) INT_ALL(i8, i4, f32) INT_ALL(i8, i8, f32)
INT_ALL(i4, i4, f32) INT_ALL(i4, i8, f32)
INT_ALL(i16, i4, f16) INT_ALL(i16, i8, f16) INT_ALL(i8, i4, f16) INT_ALL(i8, i8, f16)
INT_ALL(i4, i4, f16) INT_ALL(i4, i8, f16)
FLOAT_ALL(f32, i4, f32) FLOAT_ALL(f32, i8, f32) FLOAT_ALL(f16, i4, f16) FLOAT_ALL(f16, i8, f16)
FLOAT_ALL(f16, i4, f32) FLOAT_ALL(f16, i8, f32)


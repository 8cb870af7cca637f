// Helpers that let a compiled artifact's W4A4 `int_linear` launches run on the tuned W4 kernels
// (runtime/src/cuda/fast_linear.rs): the plan keeps integer activations one value per element (i16
// when the op has 16-bit prefix rows, else one byte per int4 value); the W4 kernels read split-nibble
// int4 rows (common.cuh). A row whose values all lie in -8..7 is packed and multiplied by the fast
// kernel; a row with any value outside (an attention-sink prefix row at 16 bits) is flagged, and
// `int_linear_fix_rows_*` recomputes exactly those rows afterwards with the micro-kernel's arithmetic
// (exact int64 sum, one rounding to f32, `* scale[n]`, `+ bias[n]`, each rounded in f32), so every
// output is bit-identical to the micro-kernel's and the CPU executor's.

// Packs row blockIdx.x of x [M, K] (K % 8 == 0) into split-nibble words [M, K/8] and sets
// flags[row] = 1 when a value does not fit int4 (that row's words are then meaningless).
template <typename T>
static __device__ __forceinline__ void pack_act_rows_body(const T* __restrict__ x, u32* __restrict__ q,
                                                          int* __restrict__ flags, long K) {
  const long row = blockIdx.x;
  const T* xr = x + row * K;
  u32* qr = q + row * (K >> 3);
  int bad = 0;
  for (long g = threadIdx.x; g < (K >> 3); g += blockDim.x) {
    u32 word = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int lo = xr[8 * g + j], hi = xr[8 * g + 4 + j];
      bad |= (lo < -8) | (lo > 7) | (hi < -8) | (hi > 7);
      word |= ((u32)(lo & 15) | ((u32)(hi & 15) << 4)) << (8 * j);
    }
    qr[g] = word;
  }
  bad = __syncthreads_or(bad);
  if (threadIdx.x == 0) flags[row] = bad;
}

extern "C" __global__ void __launch_bounds__(256) pack_act_rows_i16(const short* x, u32* q, int* flags, long K) {
  pack_act_rows_body<short>(x, q, flags, K);
}
extern "C" __global__ void __launch_bounds__(256) pack_act_rows_i8(const i8* x, u32* q, int* flags, long K) {
  pack_act_rows_body<i8>(x, q, flags, K);
}

// Recomputes the flagged rows of y [M, N] = x [M, K] . w [N, K]^T exactly: one warp per output
// (blocks over n; rows m = blockIdx.y, + gridDim.y, ...: a few block rows walk all M rows and skip
// the unflagged ones, instead of one block per row), lanes split the row's split-nibble weight
// words (coalesced), int64 partial sums reduced with shuffles, then the micro-kernel's f32 epilogue.
template <typename T, bool F32>
static __device__ __forceinline__ void fix_one(const T* __restrict__ x, const u32* __restrict__ w,
                                               const float* __restrict__ scale, const float* __restrict__ bias,
                                               void* __restrict__ y, long m, long n, long N, long K, int lane) {
  const T* xr = x + m * K;
  const u32* wr = w + n * (K >> 3);
  long long acc = 0;
  for (long g = lane; g < (K >> 3); g += 32) {
    const u32 word = wr[g];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int byte = (word >> (8 * j)) & 255;
      const int lo = (byte & 15) - ((byte & 8) << 1), hi = (byte >> 4) - ((byte & 128) >> 3);
      acc += (long long)xr[8 * g + j] * lo + (long long)xr[8 * g + 4 + j] * hi;
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
  if (lane == 0) {
    float v = __fmul_rn(__ll2float_rn(acc), scale[n]);
    if (bias) v = __fadd_rn(v, bias[n]);
    if (F32) {
      ((float*)y)[m * N + n] = v;
    } else {
      ((u16*)y)[m * N + n] = f32_to_f16(v);
    }
  }
}

template <typename T, bool F32>
static __device__ __forceinline__ void fix_rows_body(const T* __restrict__ x, const u32* __restrict__ w,
                                                     const float* __restrict__ scale, const float* __restrict__ bias,
                                                     void* __restrict__ y, const int* __restrict__ flags, long M,
                                                     long N, long K) {
  const int lane = threadIdx.x & 31;
  const long n = (long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (n >= N) return;
  // Block row y takes the 32-row windows y, y + gridDim.y, ...: one flag per lane and a ballot, so a
  // warp reads the flags of 32 rows at once instead of one dependent load per row.
  for (long base = (long)blockIdx.y * 32; base < M; base += (long)gridDim.y * 32) {
    unsigned todo = __ballot_sync(0xffffffffu, base + lane < M && flags[base + lane] != 0);
    while (todo) {
      const int b = __ffs(todo) - 1;
      todo &= todo - 1;
      fix_one<T, F32>(x, w, scale, bias, y, base + b, n, N, K, lane);
    }
  }
}

#define QCC_FIX_ROWS(XN, T, YN, F32)                                                                    \
  extern "C" __global__ void __launch_bounds__(256) int_linear_fix_rows_x##XN##_##YN(                   \
      const T* x, const u32* w, const float* scale, const float* bias, void* y, const int* flags, long M, \
      long N, long K) {                                                                                 \
    fix_rows_body<T, F32>(x, w, scale, bias, y, flags, M, N, K);                                        \
  }
QCC_FIX_ROWS(i16, short, f32, true)
QCC_FIX_ROWS(i16, short, f16, false)
QCC_FIX_ROWS(i8, i8, f32, true)
QCC_FIX_ROWS(i8, i8, f16, false)

// ---- The 8-bit LM head of -O w4a4 plans: `int_linear` of int16 activations (static 16-bit steps)
// and int8 weights, exact like the micro-kernel (int64 sums, then its f32 epilogue).

// M <= 16: one warp per output channel n, lanes over K in 16-byte pieces of the weight row (read
// once, coalesced), every row's int16 activations from the cache; int32 partials of at most 16
// products (|x w| < 2^22) folded into int64 per piece, reduced with shuffles.
template <bool F32>
static __device__ __forceinline__ void w8_gemv_body(const short* __restrict__ x, const i8* __restrict__ w,
                                                    const float* __restrict__ scale, const float* __restrict__ bias,
                                                    void* __restrict__ y, int M, long N, long K) {
  const int lane = threadIdx.x & 31;
  const long n = (long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (n >= N) return;
  const i8* wr = w + n * K;
  long long acc[16];
#pragma unroll
  for (int m = 0; m < 16; ++m) acc[m] = 0;
  for (long k0 = 16 * lane; k0 < K; k0 += 16 * 32) {
    const uint4 wv = *(const uint4*)(wr + k0);
    const i8* wb = (const i8*)&wv;
#pragma unroll
    for (int m = 0; m < 16; ++m) {
      if (m >= M) break;
      const uint4* xp = (const uint4*)(x + (long)m * K + k0);
      const uint4 x0 = xp[0], x1 = xp[1];
      const short* xa = (const short*)&x0;
      const short* xb = (const short*)&x1;
      int s = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) s += (int)xa[j] * wb[j] + (int)xb[j] * wb[8 + j];
      acc[m] += s;
    }
  }
#pragma unroll
  for (int m = 0; m < 16; ++m) {
    if (m >= M) break;
    long long a = acc[m];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) a += __shfl_down_sync(0xffffffffu, a, off);
    if (lane == 0) {
      float v = __fmul_rn(__ll2float_rn(a), scale[n]);
      if (bias) v = __fadd_rn(v, bias[n]);
      if (F32) ((float*)y)[(long)m * N + n] = v;
      else ((u16*)y)[(long)m * N + n] = f32_to_f16(v);
    }
  }
}
extern "C" __global__ void __launch_bounds__(256) w8_gemv_xi16_f32(const short* x, const i8* w, const float* scale,
                                                                  const float* bias, void* y, int M, long N, long K) {
  w8_gemv_body<true>(x, w, scale, bias, y, M, N, K);
}
extern "C" __global__ void __launch_bounds__(256) w8_gemv_xi16_f16(const short* x, const i8* w, const float* scale,
                                                                  const float* bias, void* y, int M, long N, long K) {
  w8_gemv_body<false>(x, w, scale, bias, y, M, N, K);
}

// M > 16 (cuBLAS int8 GEMMs, int32 results): x = 256 hi + lo + 128 with hi = x >> 8 and
// lo = (x & 255) - 128, both int8, so x . w = 256 (hi . w) + (lo . w) + 128 sum(w) exactly.
extern "C" __global__ void split_i16_to_i8(const short* x, i8* hi, i8* lo, long count) {
  for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < count; i += (long)gridDim.x * blockDim.x) {
    const int v = x[i];
    hi[i] = (i8)(v >> 8);
    lo[i] = (i8)((v & 255) - 128);
  }
}

template <bool F32>
static __device__ __forceinline__ void combine_body(const int* __restrict__ c_hi, const int* __restrict__ c_lo,
                                                    const int* __restrict__ wsum, const float* __restrict__ scale,
                                                    const float* __restrict__ bias, void* __restrict__ y, long M,
                                                    long N) {
  for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < M * N; i += (long)gridDim.x * blockDim.x) {
    const long n = i % N;
    const long long acc = 256LL * c_hi[i] + c_lo[i] + 128LL * wsum[n];
    float v = __fmul_rn(__ll2float_rn(acc), scale[n]);
    if (bias) v = __fadd_rn(v, bias[n]);
    if (F32) ((float*)y)[i] = v;
    else ((u16*)y)[i] = f32_to_f16(v);
  }
}
extern "C" __global__ void combine_w8_f32(const int* c_hi, const int* c_lo, const int* wsum, const float* scale,
                                          const float* bias, void* y, long M, long N) {
  combine_body<true>(c_hi, c_lo, wsum, scale, bias, y, M, N);
}
extern "C" __global__ void combine_w8_f16(const int* c_hi, const int* c_lo, const int* wsum, const float* scale,
                                          const float* bias, void* y, long M, long N) {
  combine_body<false>(c_hi, c_lo, wsum, scale, bias, y, M, N);
}

// ---- Weight-only int8 `int_linear` with float activations (no `act_bits`; the LM head of plans
// whose final norm output stays float): y = f32(x . w) * scale[n] + bias[n]. Float sums follow this
// kernel's order (as the micro-kernel's follow its own), within the float tolerance of the CPU's.
// M <= 16: one warp per output channel, the int8 weight row read once in 16-byte pieces.
template <bool F32>
static __device__ __forceinline__ void wf8_gemv_body(const float* __restrict__ x, const i8* __restrict__ w,
                                                     const float* __restrict__ scale, const float* __restrict__ bias,
                                                     void* __restrict__ y, int M, long N, long K) {
  const int lane = threadIdx.x & 31;
  const long n = (long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (n >= N) return;
  const i8* wr = w + n * K;
  // Rows in passes of 8 (one pass for M <= 8; the registers of 16 accumulators would spill).
  for (int m0 = 0; m0 < M; m0 += 8) {
    float acc[8];
#pragma unroll
    for (int r = 0; r < 8; ++r) acc[r] = 0.0f;
    for (long k0 = 16 * lane; k0 < K; k0 += 16 * 32) {
      const uint4 wv = *(const uint4*)(wr + k0);
      const i8* wb = (const i8*)&wv;
      float wf[16];  // the piece's weights widened once, shared by the pass's rows
#pragma unroll
      for (int j = 0; j < 16; ++j) wf[j] = (float)wb[j];
#pragma unroll
      for (int r = 0; r < 8; ++r) {
        if (m0 + r >= M) break;
        const float4* xp = (const float4*)(x + (long)(m0 + r) * K + k0);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const float4 xv = xp[q];
          acc[r] = fmaf(xv.x, wf[4 * q], acc[r]);
          acc[r] = fmaf(xv.y, wf[4 * q + 1], acc[r]);
          acc[r] = fmaf(xv.z, wf[4 * q + 2], acc[r]);
          acc[r] = fmaf(xv.w, wf[4 * q + 3], acc[r]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < 8; ++r) {
      if (m0 + r >= M) break;
      float a = acc[r];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) a += __shfl_down_sync(0xffffffffu, a, off);
      if (lane == 0) {
        float v = __fmul_rn(a, scale[n]);
        if (bias) v = __fadd_rn(v, bias[n]);
        const long m = m0 + r;
        if (F32) ((float*)y)[m * N + n] = v;
        else ((u16*)y)[m * N + n] = f32_to_f16(v);
      }
    }
  }
}
extern "C" __global__ void __launch_bounds__(256) wf8_gemv_xf32_f32(const float* x, const i8* w, const float* scale,
                                                                   const float* bias, void* y, int M, long N, long K) {
  wf8_gemv_body<true>(x, w, scale, bias, y, M, N, K);
}

// M > 16: the product comes from cuBLAS's f16 tensor-core GEMM with f32 accumulation, twice: the
// int8 weights are exact in f16, and x = hi + lo with hi = f16(x), lo = f16(x - hi) carries 22 of
// x's 24 significant bits (|x| < 65504, as normalised LM-head inputs are). Then the epilogue in
// place: y = y * scale[n] + bias[n].
extern "C" __global__ void split_f32_to_f16(const float* x, u16* hi, u16* lo, long count) {
  for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < count; i += (long)gridDim.x * blockDim.x) {
    const float v = x[i];
    const u16 h = f32_to_f16(v);
    hi[i] = h;
    lo[i] = f32_to_f16(v - f16_to_f32(h));
  }
}
extern "C" __global__ void scale_bias_f32(float* y, const float* scale, const float* bias, long M, long N) {
  for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < M * N; i += (long)gridDim.x * blockDim.x) {
    const long n = i % N;
    float v = __fmul_rn(y[i], scale[n]);
    if (bias) v = __fadd_rn(v, bias[n]);
    y[i] = v;
  }
}

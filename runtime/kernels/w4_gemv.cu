// Decode-time W4A4 / W4A8 GEMV (batch M = 1..16): Y[M, N] = X[M, K] . W[N, K]^T on int8 tensor cores.
//
// Memory-bound: the int4 weights (N*K/2 bytes) are streamed exactly once with 16-byte loads that skip
// L1; the activations (tiny) are re-read through the read-only cache. The batch is the MMA's M side
// (m16n8k32, rows >= M fed as zeros), so batch 1..16 costs the same weight traffic.
//
// Block = KSPLIT warps that share one n8 tile of W and split K into contiguous ranges; partial int32
// sums are reduced in shared memory, then one warp applies the epilogue (common.cuh).
// Per k128 chunk each thread holds one uint4 of its weight row g = lane/4 at byte 16*(lane%4):
// word j (j = 0..3) feeds MMA step j, and the activations use the same k assignment (any bijection
// of k works as long as A and B agree; zero-filled tails add nothing).
//
// Requirements (checked on the host): K % 32 == 0, N % 8 == 0, 1 <= M <= 16, 16-byte aligned rows.

template <int KSPLIT, int UNROLL, bool A8>
static __device__ __forceinline__ void w4_gemv_body(const u32* __restrict__ w, const float* __restrict__ sw,
                                                    const void* __restrict__ x, const float* __restrict__ sx,
                                                    const float* __restrict__ bias,
                                                    const u16* __restrict__ residual, u16* __restrict__ y,
                                                    int M, int N, int K) {
  __shared__ int partial[KSPLIT][32][4];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, tig = lane & 3;
  const int n0 = blockIdx.x * 8;
  const int words_per_row = K >> 3;
  const int nchunks = (K + 127) >> 7;
  const int per_warp = (nchunks + KSPLIT - 1) / KSPLIT;
  const int c_begin = warp * per_warp;
  const int c_end = min(nchunks, c_begin + per_warp);
  const bool row_hi = M > 8;  // rows g + 8 exist at all

  const u32* wrow = w + (size_t)(n0 + g) * words_per_row + 4 * tig;
  int acc[4] = {0, 0, 0, 0};

  // Activation words per chunk: A4 = one uint4 per row (rows g, g + 8); A8 = two per row.
  constexpr int XV = A8 ? 4 : 2;
  for (int c = c_begin; c < c_end; c += UNROLL) {
    // Issue every load of the batch (weights from DRAM, activations from L1/L2) before the first
    // use, so one memory latency covers UNROLL chunks.
    uint4 wv[UNROLL], xv[UNROLL][XV];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int cc = c + u;
      const bool kok = cc < c_end && (cc * 128 + 32 * tig) < K;
      const uint4 zero = make_uint4(0, 0, 0, 0);
      wv[u] = kok ? ld_stream_u4(wrow + cc * 16) : zero;
      const bool r0 = kok && g < M, r1 = kok && row_hi && g + 8 < M;
      if (A8) {
        const i8* xb = (const i8*)x;
        const size_t koff = (size_t)cc * 128 + 32 * tig;
        xv[u][0] = r0 ? ld_cached_u4(xb + (size_t)g * K + koff) : zero;
        xv[u][1] = r0 ? ld_cached_u4(xb + (size_t)g * K + koff + 16) : zero;
        xv[u][2] = r1 ? ld_cached_u4(xb + (size_t)(g + 8) * K + koff) : zero;
        xv[u][XV - 1] = r1 ? ld_cached_u4(xb + (size_t)(g + 8) * K + koff + 16) : zero;
      } else {
        const u32* xw = (const u32*)x;
        const size_t woff = (size_t)cc * 16 + 4 * tig;
        xv[u][0] = r0 ? ld_cached_u4(xw + (size_t)g * words_per_row + woff) : zero;
        xv[u][1] = r1 ? ld_cached_u4(xw + (size_t)(g + 8) * words_per_row + woff) : zero;
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      u32 alo[4], ahi[4];  // per step j: A words for row g (lo = k 0..3 of the 8-group, hi = 4..7)
      u32 blo[4], bhi[4];  // same for row g + 8
      if (A8) {
        const uint4 r0a = xv[u][0], r0b = xv[u][1], r1a = xv[u][2], r1b = xv[u][XV - 1];
        alo[0] = r0a.x; ahi[0] = r0a.y; alo[1] = r0a.z; ahi[1] = r0a.w;
        alo[2] = r0b.x; ahi[2] = r0b.y; alo[3] = r0b.z; ahi[3] = r0b.w;
        blo[0] = r1a.x; bhi[0] = r1a.y; blo[1] = r1a.z; bhi[1] = r1a.w;
        blo[2] = r1b.x; bhi[2] = r1b.y; blo[3] = r1b.z; bhi[3] = r1b.w;
      } else {
        const uint4 r0 = xv[u][0], r1 = xv[u][1];
        const u32 a0[4] = {r0.x, r0.y, r0.z, r0.w};
        const u32 a1[4] = {r1.x, r1.y, r1.z, r1.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          alo[j] = lo_nibbles_x16(a0[j]); ahi[j] = hi_nibbles_x16(a0[j]);
          blo[j] = lo_nibbles_x16(a1[j]); bhi[j] = hi_nibbles_x16(a1[j]);
        }
      }
      const u32 ww[4] = {wv[u].x, wv[u].y, wv[u].z, wv[u].w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        mma_s8_16832(acc, alo[j], blo[j], ahi[j], bhi[j], lo_nibbles_x16(ww[j]), hi_nibbles_x16(ww[j]));
      }
    }
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) partial[warp][lane][i] = acc[i];
  __syncthreads();
  if (warp != 0) return;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    int s = 0;
#pragma unroll
    for (int q = 0; q < KSPLIT; ++q) s += partial[q][lane][i];
    // Remove the exact x16 per int4 operand (arithmetic shift of a multiple of 2^shift).
    acc[i] = A8 ? (s >> 4) : (s >> 8);
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int m = g + 8 * h;
    if (m >= M) continue;
    const int n = n0 + 2 * tig;
    const float sxm = sx[m];
    const u16 y0 = epilogue(acc[2 * h], sxm, sw[n], bias, residual, m, n, N);
    const u16 y1 = epilogue(acc[2 * h + 1], sxm, sw[n + 1], bias, residual, m, n + 1, N);
    *(u32*)(y + (size_t)m * N + n) = (u32)y0 | ((u32)y1 << 16);
  }
}

#define QCC_GEMV(NAME, KSPLIT, UNROLL, A8)                                                          \
  extern "C" __global__ void __launch_bounds__(KSPLIT * 32)                                         \
      NAME(const u32* w, const float* sw, const void* x, const float* sx, const float* bias,        \
           const u16* residual, u16* y, int M, int N, int K) {                                      \
    w4_gemv_body<KSPLIT, UNROLL, A8>(w, sw, x, sx, bias, residual, y, M, N, K);                     \
  }

// Variants: KSPLIT warps per block x UNROLL chunks (16 bytes per thread each) in flight per warp.
QCC_GEMV(w4a4_gemv_ks2_u8, 2, 8, false)
QCC_GEMV(w4a4_gemv_ks4_u4, 4, 4, false)
QCC_GEMV(w4a4_gemv_ks4_u8, 4, 8, false)
QCC_GEMV(w4a4_gemv_ks8_u4, 8, 4, false)
QCC_GEMV(w4a4_gemv_ks16_u2, 16, 2, false)
QCC_GEMV(w4a8_gemv_ks2_u8, 2, 8, true)
QCC_GEMV(w4a8_gemv_ks4_u4, 4, 4, true)
QCC_GEMV(w4a8_gemv_ks4_u8, 4, 8, true)
QCC_GEMV(w4a8_gemv_ks8_u4, 8, 4, true)
QCC_GEMV(w4a8_gemv_ks16_u2, 16, 2, true)

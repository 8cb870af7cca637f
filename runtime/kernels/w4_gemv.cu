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
//
// TILED weight layout (pack.rs `pack_int4_tiled`, "gemvt" kernels): the same 16-byte pieces, stored in
// the order the warp reads them: [N/8 tiles][ceil(K/128) chunks][32 lanes][16 bytes], K zero-padded
// to a multiple of 128. Each warp load instruction then reads 512 contiguous bytes (four whole
// 128-byte lines) instead of 64-byte halves of 8 rows 2 KB apart, and a warp's k range is one
// contiguous stream. L2PF adds the `.L2::256B` prefetch hint to the weight loads.

// Streaming weight load with the L2 256-byte prefetch hint.
QCC_DEVICE uint4 ld_stream_u4_pf(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

template <int KSPLIT, int UNROLL, bool A8, bool TILED = false, bool L2PF = false>
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

  // Rows layout: row n0 + g, 16 words per chunk. Tiled: this lane's piece of chunk 0 of the tile,
  // 128 words (512 bytes) per chunk.
  const u32* wrow = TILED ? w + ((size_t)blockIdx.x * nchunks * 32 + lane) * 4
                          : w + (size_t)(n0 + g) * words_per_row + 4 * tig;
  constexpr int WSTEP = TILED ? 128 : 16;
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
      // Tiled chunks are zero-padded past K: only the chunk range bounds the weight load.
      const bool wok = TILED ? cc < c_end : kok;
      wv[u] = wok ? (L2PF ? ld_stream_u4_pf(wrow + cc * WSTEP) : ld_stream_u4(wrow + cc * WSTEP)) : zero;
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

  if (!ksplit_sum(partial, acc, warp, lane)) return;
  // Remove the exact x16 per int4 operand (arithmetic shift of a multiple of 2^shift).
#pragma unroll
  for (int i = 0; i < 4; ++i) acc[i] = A8 ? (acc[i] >> 4) : (acc[i] >> 8);
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

#define QCC_GEMV_L(NAME, KSPLIT, UNROLL, A8, TILED, L2PF)                                           \
  extern "C" __global__ void __launch_bounds__(KSPLIT * 32)                                         \
      NAME(const u32* w, const float* sw, const void* x, const float* sx, const float* bias,        \
           const u16* residual, u16* y, int M, int N, int K) {                                      \
    w4_gemv_body<KSPLIT, UNROLL, A8, TILED, L2PF>(w, sw, x, sx, bias, residual, y, M, N, K);        \
  }
#define QCC_GEMV(NAME, KSPLIT, UNROLL, A8) QCC_GEMV_L(NAME, KSPLIT, UNROLL, A8, false, false)

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
// Tiled weight layout (gemvt) and tiled + L2 256-byte prefetch hint (gemvtp).
QCC_GEMV_L(w4a4_gemvt_ks4_u4, 4, 4, false, true, false)
QCC_GEMV_L(w4a4_gemvt_ks8_u2, 8, 2, false, true, false)
QCC_GEMV_L(w4a4_gemvt_ks8_u4, 8, 4, false, true, false)
QCC_GEMV_L(w4a4_gemvt_ks16_u2, 16, 2, false, true, false)
QCC_GEMV_L(w4a8_gemvt_ks8_u4, 8, 4, true, true, false)
QCC_GEMV_L(w4a8_gemvt_ks16_u2, 16, 2, true, true, false)
QCC_GEMV_L(w4a4_gemvtp_ks4_u4, 4, 4, false, true, true)
QCC_GEMV_L(w4a4_gemvtp_ks8_u4, 8, 4, false, true, true)
QCC_GEMV_L(w4a4_gemvtp_ks16_u2, 16, 2, false, true, true)

// ---------------------------------------------------------------------------------------------
// Software-pipelined GEMV on the tiled layout ("gemvq"): while a warp's MMAs consume one batch of
// UNROLL chunks, the loads of its next batch are already in flight (register double buffer), so a
// warp that streams many chunks keeps the memory pipe busy without the bubble between batches that
// the plain loop has (its loads and MMAs are volatile asm, kept in program order). KSPLIT = 1 needs
// no shared-memory reduction: each warp owns a whole n8 tile (grid of N/8 one-warp blocks).

template <int UNROLL, bool A8>
struct GemvBatch {
  static constexpr int XV = A8 ? 4 : 2;
  uint4 w[UNROLL];
  uint4 x[UNROLL][XV];
};

template <int UNROLL, bool A8>
static __device__ __forceinline__ void gemv_load_batch(GemvBatch<UNROLL, A8>& b, const u32* __restrict__ wrow,
                                                       const void* __restrict__ x, int c, int c_end, int g,
                                                       int tig, int M, bool row_hi, int K, int words_per_row) {
  constexpr int XV = GemvBatch<UNROLL, A8>::XV;
  const uint4 zero = make_uint4(0, 0, 0, 0);
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    const int cc = c + u;
    const bool in = cc < c_end;
    const bool kok = in && (cc * 128 + 32 * tig) < K;
    b.w[u] = in ? ld_stream_u4(wrow + cc * 128) : zero;
    const bool r0 = kok && g < M, r1 = kok && row_hi && g + 8 < M;
    if (A8) {
      const i8* xb = (const i8*)x;
      const size_t koff = (size_t)cc * 128 + 32 * tig;
      b.x[u][0] = r0 ? ld_cached_u4(xb + (size_t)g * K + koff) : zero;
      b.x[u][1] = r0 ? ld_cached_u4(xb + (size_t)g * K + koff + 16) : zero;
      b.x[u][2] = r1 ? ld_cached_u4(xb + (size_t)(g + 8) * K + koff) : zero;
      b.x[u][XV - 1] = r1 ? ld_cached_u4(xb + (size_t)(g + 8) * K + koff + 16) : zero;
    } else {
      const u32* xw = (const u32*)x;
      const size_t woff = (size_t)cc * 16 + 4 * tig;
      b.x[u][0] = r0 ? ld_cached_u4(xw + (size_t)g * words_per_row + woff) : zero;
      b.x[u][1] = r1 ? ld_cached_u4(xw + (size_t)(g + 8) * words_per_row + woff) : zero;
    }
  }
}

template <int UNROLL, bool A8>
static __device__ __forceinline__ void gemv_mma_batch(int (&acc)[4], const GemvBatch<UNROLL, A8>& b) {
  constexpr int XV = GemvBatch<UNROLL, A8>::XV;
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    u32 alo[4], ahi[4], blo[4], bhi[4];
    if (A8) {
      const uint4 r0a = b.x[u][0], r0b = b.x[u][1], r1a = b.x[u][2], r1b = b.x[u][XV - 1];
      alo[0] = r0a.x; ahi[0] = r0a.y; alo[1] = r0a.z; ahi[1] = r0a.w;
      alo[2] = r0b.x; ahi[2] = r0b.y; alo[3] = r0b.z; ahi[3] = r0b.w;
      blo[0] = r1a.x; bhi[0] = r1a.y; blo[1] = r1a.z; bhi[1] = r1a.w;
      blo[2] = r1b.x; bhi[2] = r1b.y; blo[3] = r1b.z; bhi[3] = r1b.w;
    } else {
      const uint4 r0 = b.x[u][0], r1 = b.x[u][1];
      const u32 a0[4] = {r0.x, r0.y, r0.z, r0.w};
      const u32 a1[4] = {r1.x, r1.y, r1.z, r1.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        alo[j] = lo_nibbles_x16(a0[j]); ahi[j] = hi_nibbles_x16(a0[j]);
        blo[j] = lo_nibbles_x16(a1[j]); bhi[j] = hi_nibbles_x16(a1[j]);
      }
    }
    const u32 ww[4] = {b.w[u].x, b.w[u].y, b.w[u].z, b.w[u].w};
#pragma unroll
    for (int j = 0; j < 4; ++j)
      mma_s8_16832(acc, alo[j], blo[j], ahi[j], bhi[j], lo_nibbles_x16(ww[j]), hi_nibbles_x16(ww[j]));
  }
}

// NT n8 tiles per warp (the activation fragments are loaded and unpacked once for all NT tiles) and
// ROWHI = false for M <= 8 (the MMA's rows 8..15 are constant zeros: no loads, no unpacking).
template <int UNROLL, bool A8, int NT>
struct GemvBatchN {
  static constexpr int XV = A8 ? 4 : 2;
  uint4 w[UNROLL][NT];
  uint4 x[UNROLL][XV];
};

template <int UNROLL, bool A8, int NT, bool ROWHI>
static __device__ __forceinline__ void gemv_load_batch_n(GemvBatchN<UNROLL, A8, NT>& b, const u32* __restrict__ wrow,
                                                         size_t tile_words, bool t1ok, const void* __restrict__ x,
                                                         int c, int c_end, int g, int tig, int M, int K,
                                                         int words_per_row) {
  constexpr int XV = GemvBatchN<UNROLL, A8, NT>::XV;
  const uint4 zero = make_uint4(0, 0, 0, 0);
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    const int cc = c + u;
    const bool in = cc < c_end;
    const bool kok = in && (cc * 128 + 32 * tig) < K;
#pragma unroll
    for (int t = 0; t < NT; ++t)
      b.w[u][t] = (in && (t == 0 || t1ok)) ? ld_stream_u4(wrow + t * tile_words + cc * 128) : zero;
    const bool r0 = kok && g < M, r1 = ROWHI && kok && g + 8 < M;
    if (A8) {
      const i8* xb = (const i8*)x;
      const size_t koff = (size_t)cc * 128 + 32 * tig;
      b.x[u][0] = r0 ? ld_cached_u4(xb + (size_t)g * K + koff) : zero;
      b.x[u][1] = r0 ? ld_cached_u4(xb + (size_t)g * K + koff + 16) : zero;
      if (ROWHI) {
        b.x[u][2] = r1 ? ld_cached_u4(xb + (size_t)(g + 8) * K + koff) : zero;
        b.x[u][XV - 1] = r1 ? ld_cached_u4(xb + (size_t)(g + 8) * K + koff + 16) : zero;
      }
    } else {
      const u32* xw = (const u32*)x;
      const size_t woff = (size_t)cc * 16 + 4 * tig;
      b.x[u][0] = r0 ? ld_cached_u4(xw + (size_t)g * words_per_row + woff) : zero;
      if (ROWHI) b.x[u][1] = r1 ? ld_cached_u4(xw + (size_t)(g + 8) * words_per_row + woff) : zero;
    }
  }
}

template <int UNROLL, bool A8, int NT, bool ROWHI>
static __device__ __forceinline__ void gemv_mma_batch_n(int (&acc)[NT][4], const GemvBatchN<UNROLL, A8, NT>& b) {
  constexpr int XV = GemvBatchN<UNROLL, A8, NT>::XV;
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    u32 alo[4], ahi[4], blo[4] = {0, 0, 0, 0}, bhi[4] = {0, 0, 0, 0};
    if (A8) {
      const uint4 r0a = b.x[u][0], r0b = b.x[u][1];
      alo[0] = r0a.x; ahi[0] = r0a.y; alo[1] = r0a.z; ahi[1] = r0a.w;
      alo[2] = r0b.x; ahi[2] = r0b.y; alo[3] = r0b.z; ahi[3] = r0b.w;
      if (ROWHI) {
        const uint4 r1a = b.x[u][2], r1b = b.x[u][XV - 1];
        blo[0] = r1a.x; bhi[0] = r1a.y; blo[1] = r1a.z; bhi[1] = r1a.w;
        blo[2] = r1b.x; bhi[2] = r1b.y; blo[3] = r1b.z; bhi[3] = r1b.w;
      }
    } else {
      const uint4 r0 = b.x[u][0];
      const u32 a0[4] = {r0.x, r0.y, r0.z, r0.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        alo[j] = lo_nibbles_x16(a0[j]);
        ahi[j] = hi_nibbles_x16(a0[j]);
      }
      if (ROWHI) {
        const uint4 r1 = b.x[u][1];
        const u32 a1[4] = {r1.x, r1.y, r1.z, r1.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          blo[j] = lo_nibbles_x16(a1[j]);
          bhi[j] = hi_nibbles_x16(a1[j]);
        }
      }
    }
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const u32 ww[4] = {b.w[u][t].x, b.w[u][t].y, b.w[u][t].z, b.w[u][t].w};
#pragma unroll
      for (int j = 0; j < 4; ++j)
        mma_s8_16832(acc[t], alo[j], blo[j], ahi[j], bhi[j], lo_nibbles_x16(ww[j]), hi_nibbles_x16(ww[j]));
    }
  }
}

template <int KSPLIT, int UNROLL, bool A8, int NT, bool ROWHI, bool F32 = false>
static __device__ __forceinline__ void w4_gemv_pipe_body(const u32* __restrict__ w, const float* __restrict__ sw,
                                                         const void* __restrict__ x, const float* __restrict__ sx,
                                                         const float* __restrict__ bias,
                                                         const u16* __restrict__ residual, void* __restrict__ y,
                                                         int M, int N, int K) {
  __shared__ int partial[KSPLIT > 1 ? KSPLIT : 1][NT][32][4];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, tig = lane & 3;
  const int tile0 = blockIdx.x * NT;
  const int words_per_row = K >> 3;
  const int nchunks = (K + 127) >> 7;
  const int per_warp = (nchunks + KSPLIT - 1) / KSPLIT;
  const int c_begin = warp * per_warp;
  const int c_end = min(nchunks, c_begin + per_warp);
  const size_t tile_words = (size_t)nchunks * 128;
  const bool t1ok = (tile0 + 1) * 8 < N;  // the block's second tile exists (NT = 2, N % 16 == 8)
  const u32* wrow = w + ((size_t)tile0 * nchunks * 32 + lane) * 4;
  int acc[NT][4];
#pragma unroll
  for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0;

  GemvBatchN<UNROLL, A8, NT> cur, nxt;
  gemv_load_batch_n<UNROLL, A8, NT, ROWHI>(cur, wrow, tile_words, t1ok, x, c_begin, c_end, g, tig, M, K, words_per_row);
  for (int c = c_begin; c < c_end; c += UNROLL) {
    // Issue the next batch's loads (zero-filled past c_end) before this batch's MMAs.
    gemv_load_batch_n<UNROLL, A8, NT, ROWHI>(nxt, wrow, tile_words, t1ok, x, c + UNROLL, c_end, g, tig, M, K,
                                             words_per_row);
    gemv_mma_batch_n<UNROLL, A8, NT, ROWHI>(acc, cur);
    cur = nxt;
  }

  if (KSPLIT > 1) {
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int i = 0; i < 4; ++i) partial[warp][t][lane][i] = acc[t][i];
    __syncthreads();
    if (warp != 0) return;
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        int s = 0;
#pragma unroll
        for (int q = 0; q < KSPLIT; ++q) s += partial[q][t][lane][i];
        acc[t][i] = s;
      }
  }
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    if (t == 1 && !t1ok) break;
    const int n0 = (tile0 + t) * 8;
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[t][i] = A8 ? (acc[t][i] >> 4) : (acc[t][i] >> 8);
#pragma unroll
    for (int h = 0; h < (ROWHI ? 2 : 1); ++h) {
      const int m = g + 8 * h;
      if (m >= M) continue;
      const int n = n0 + 2 * tig;
      store_pair<F32>(y, acc[t][2 * h], acc[t][2 * h + 1], sx[m], sw, bias, residual, m, n, N);
    }
  }
}

// Each name has an "_m8" twin for M <= 8 (launch_gemv picks it), and both have "_f32" twins that
// write f32 outputs (compiled artifacts' f32 `int_linear`, residual unused there).
#define QCC_GEMV_PIPE_NT(NAME, KSPLIT, UNROLL, A8, NT)                                              \
  extern "C" __global__ void __launch_bounds__(KSPLIT * 32)                                         \
      NAME(const u32* w, const float* sw, const void* x, const float* sx, const float* bias,        \
           const u16* residual, u16* y, int M, int N, int K) {                                      \
    w4_gemv_pipe_body<KSPLIT, UNROLL, A8, NT, true>(w, sw, x, sx, bias, residual, y, M, N, K);      \
  }                                                                                                 \
  extern "C" __global__ void __launch_bounds__(KSPLIT * 32)                                         \
      NAME##_m8(const u32* w, const float* sw, const void* x, const float* sx, const float* bias,   \
                const u16* residual, u16* y, int M, int N, int K) {                                 \
    w4_gemv_pipe_body<KSPLIT, UNROLL, A8, NT, false>(w, sw, x, sx, bias, residual, y, M, N, K);     \
  }                                                                                                 \
  extern "C" __global__ void __launch_bounds__(KSPLIT * 32)                                         \
      NAME##_f32(const u32* w, const float* sw, const void* x, const float* sx, const float* bias,  \
                 const u16* residual, float* y, int M, int N, int K) {                              \
    w4_gemv_pipe_body<KSPLIT, UNROLL, A8, NT, true, true>(w, sw, x, sx, bias, residual, y, M, N, K); \
  }                                                                                                 \
  extern "C" __global__ void __launch_bounds__(KSPLIT * 32)                                         \
      NAME##_m8_f32(const u32* w, const float* sw, const void* x, const float* sx, const float* bias, \
                    const u16* residual, float* y, int M, int N, int K) {                           \
    w4_gemv_pipe_body<KSPLIT, UNROLL, A8, NT, false, true>(w, sw, x, sx, bias, residual, y, M, N, K); \
  }
#define QCC_GEMV_PIPE(NAME, KSPLIT, UNROLL, A8) QCC_GEMV_PIPE_NT(NAME, KSPLIT, UNROLL, A8, 1)
QCC_GEMV_PIPE(w4a4_gemvq_ks1_u4, 1, 4, false)
QCC_GEMV_PIPE(w4a4_gemvq_ks1_u2, 1, 2, false)
QCC_GEMV_PIPE(w4a4_gemvq_ks2_u4, 2, 4, false)
QCC_GEMV_PIPE(w4a4_gemvq_ks2_u2, 2, 2, false)
QCC_GEMV_PIPE(w4a4_gemvq_ks4_u2, 4, 2, false)
QCC_GEMV_PIPE(w4a4_gemvq_ks4_u4, 4, 4, false)
QCC_GEMV_PIPE(w4a8_gemvq_ks1_u4, 1, 4, true)
QCC_GEMV_PIPE(w4a8_gemvq_ks2_u2, 2, 2, true)
// Two tiles per warp ("gemvq2"; grid ceil(N/16)).
QCC_GEMV_PIPE_NT(w4a4_gemvq2_ks2_u2, 2, 2, false, 2)
QCC_GEMV_PIPE_NT(w4a4_gemvq2_ks2_u4, 2, 4, false, 2)
QCC_GEMV_PIPE_NT(w4a4_gemvq2_ks4_u2, 4, 2, false, 2)
QCC_GEMV_PIPE_NT(w4a4_gemvq2_ks4_u4, 4, 4, false, 2)
QCC_GEMV_PIPE_NT(w4a4_gemvq2_ks8_u2, 8, 2, false, 2)

// ---------------------------------------------------------------------------------------------
// Asynchronous-copy GEMV on the tiled layout ("gemva"): each thread streams its 16-byte weight pieces
// and its activation pieces with cp.async into a per-warp ring of STAGES batches in shared memory
// (STAGES - 1 batches in flight while one is consumed), without holding them in registers. Each
// thread reads back only the bytes it copied itself, so cp.async.wait_group alone orders it (no
// barrier). Dynamic shared memory: KSPLIT * STAGES * UNROLL * (1 + XV) * 512 bytes.

template <int KSPLIT, int UNROLL, int STAGES, bool A8>
static __device__ __forceinline__ void w4_gemv_async_body(const u32* __restrict__ w, const float* __restrict__ sw,
                                                          const void* __restrict__ x, const float* __restrict__ sx,
                                                          const float* __restrict__ bias,
                                                          const u16* __restrict__ residual, u16* __restrict__ y,
                                                          int M, int N, int K) {
  constexpr int XV = A8 ? 4 : 2;
  constexpr int PIECES = 1 + XV;
  extern __shared__ uint4 gemv_ring[];
  __shared__ int partial[KSPLIT > 1 ? KSPLIT : 1][32][4];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, tig = lane & 3;
  const int n0 = blockIdx.x * 8;
  const int words_per_row = K >> 3;
  const int nchunks = (K + 127) >> 7;
  const int per_warp = (nchunks + KSPLIT - 1) / KSPLIT;
  const int c_begin = warp * per_warp;
  const int c_end = min(nchunks, c_begin + per_warp);
  const bool row_hi = M > 8;
  const u32* wrow = w + ((size_t)blockIdx.x * nchunks * 32 + lane) * 4;
  uint4* ring = gemv_ring + (size_t)warp * STAGES * UNROLL * PIECES * 32 + lane;  // [stage][u][piece][lane]
  int acc[4] = {0, 0, 0, 0};

  auto issue = [&](int stage, int c) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int cc = c + u;
      const bool in = cc < c_end;
      const bool kok = in && (cc * 128 + 32 * tig) < K;
      uint4* slot = ring + ((stage * UNROLL + u) * PIECES) * 32;
      cp_async_16(slot, in ? (const void*)(wrow + cc * 128) : (const void*)wrow, in ? 16 : 0);
      const bool r0 = kok && g < M, r1 = kok && row_hi && g + 8 < M;
      if (A8) {
        const i8* xb = (const i8*)x;
        const size_t koff = kok ? (size_t)cc * 128 + 32 * tig : 0;
        const size_t g0 = r0 ? (size_t)g * K : 0, g1 = r1 ? (size_t)(g + 8) * K : 0;
        cp_async_16(slot + 32, xb + g0 + koff, r0 ? 16 : 0);
        cp_async_16(slot + 64, xb + g0 + koff + 16, r0 ? 16 : 0);
        cp_async_16(slot + 96, xb + g1 + koff, r1 ? 16 : 0);
        cp_async_16(slot + 128, xb + g1 + koff + 16, r1 ? 16 : 0);
      } else {
        const u32* xw = (const u32*)x;
        const size_t woff = kok ? (size_t)cc * 16 + 4 * tig : 0;
        const size_t g0 = r0 ? (size_t)g * words_per_row : 0, g1 = r1 ? (size_t)(g + 8) * words_per_row : 0;
        cp_async_16(slot + 32, xw + g0 + woff, r0 ? 16 : 0);
        cp_async_16(slot + 64, xw + g1 + woff, r1 ? 16 : 0);
      }
    }
    cp_async_commit();
  };

  const int nb = (c_end - c_begin + UNROLL - 1) / UNROLL;
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) issue(s, c_begin + s * UNROLL);
  for (int i = 0; i < nb; ++i) {
    issue((i + STAGES - 1) % STAGES, c_begin + (i + STAGES - 1) * UNROLL);
    cp_async_wait<STAGES - 1>();
    GemvBatch<UNROLL, A8> b;
    const uint4* st = ring + ((i % STAGES) * UNROLL * PIECES) * 32;
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      b.w[u] = st[(u * PIECES) * 32];
#pragma unroll
      for (int p = 0; p < XV; ++p) b.x[u][p] = st[(u * PIECES + 1 + p) * 32];
    }
    gemv_mma_batch<UNROLL, A8>(acc, b);
  }
  cp_async_wait<0>();

  if (KSPLIT > 1 && !ksplit_sum(partial, acc, warp, lane)) return;
#pragma unroll
  for (int i = 0; i < 4; ++i) acc[i] = A8 ? (acc[i] >> 4) : (acc[i] >> 8);
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

#define QCC_GEMV_ASYNC(NAME, KSPLIT, UNROLL, A8)                                                    \
  extern "C" __global__ void __launch_bounds__(KSPLIT * 32)                                         \
      NAME(const u32* w, const float* sw, const void* x, const float* sx, const float* bias,        \
           const u16* residual, u16* y, int M, int N, int K) {                                      \
    w4_gemv_async_body<KSPLIT, UNROLL, 4, A8>(w, sw, x, sx, bias, residual, y, M, N, K);            \
  }
QCC_GEMV_ASYNC(w4a4_gemva_ks1_u2, 1, 2, false)
QCC_GEMV_ASYNC(w4a4_gemva_ks1_u4, 1, 4, false)
QCC_GEMV_ASYNC(w4a4_gemva_ks2_u2, 2, 2, false)
QCC_GEMV_ASYNC(w4a4_gemva_ks2_u4, 2, 4, false)
QCC_GEMV_ASYNC(w4a4_gemva_ks4_u2, 4, 2, false)
QCC_GEMV_ASYNC(w4a4_gemva_ks4_u4, 4, 4, false)
QCC_GEMV_ASYNC(w4a8_gemva_ks2_u2, 2, 2, true)

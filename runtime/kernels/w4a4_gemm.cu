// Prefill W4A4 GEMM: Y[M, N] = X[M, K] . W[N, K]^T with int4 X and W (split-nibble layout, common.cuh),
// unpacked to int8 in registers and multiplied on int8 tensor cores (mma.sync m16n8k32, exact int32
// accumulation), then the shared epilogue (per-token x per-output-channel scale, bias, residual).
//
// Tiles: BM x BN per block, BK = 128 k (64 bytes per row) per pipeline stage, STAGES-deep cp.async
// pipeline in dynamic shared memory; warps arranged WARPS_M x WARPS_N, each owning a
// (BM/WARPS_M) x (BN/WARPS_N) tile of m16n8 accumulators. Within a k128 tile every thread reads one
// 16-byte vector per row it needs (row g = lane/4 of each m16 / n8 sub-tile, byte 16*(lane%4)):
// with 64-byte rows the 8 threads of each shared-memory phase touch 128 contiguous bytes, so the
// reads are conflict-free without padding. Word j of that vector feeds MMA step j for A and B alike.
//
// Requirements (checked on the host): K % 32 == 0, N % 8 == 0, 16-byte aligned rows. M, N, K tails
// are zero-filled by cp.async (src-size 0) and masked at the store.

template <int BM, int BN, int WARPS_M, int WARPS_N, int STAGES, bool F32 = false>
static __device__ __forceinline__ void w4a4_gemm_body(const u32* __restrict__ w, const float* __restrict__ sw,
                                                      const u32* __restrict__ x, const float* __restrict__ sx,
                                                      const float* __restrict__ bias,
                                                      const u16* __restrict__ residual, void* __restrict__ y,
                                                      int M, int N, int K) {
  constexpr int THREADS = WARPS_M * WARPS_N * 32;
  constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  constexpr int MT = WM / 16, NT = WN / 8;
  constexpr int ROW_BYTES = 64;  // 128 int4 per row per stage
  constexpr int A_BYTES = BM * ROW_BYTES, B_BYTES = BN * ROW_BYTES;
  constexpr int STAGE_BYTES = A_BYTES + B_BYTES;
  extern __shared__ __align__(128) unsigned char smem[];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, tig = lane & 3;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;
  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
  const int row_bytes = K >> 1;
  const int ktiles = (K + 127) >> 7;
  const unsigned char* xb = (const unsigned char*)x;
  const unsigned char* wb = (const unsigned char*)w;

  auto load_stage = [&](int kt, int slot) {
    unsigned char* sa = smem + slot * STAGE_BYTES;
    unsigned char* sb = sa + A_BYTES;
    const int kbyte = kt * ROW_BYTES;
#pragma unroll
    for (int i = tid; i < BM * 4; i += THREADS) {
      const int r = i >> 2, c = i & 3;
      const int gr = m0 + r, gk = kbyte + 16 * c;
      const bool ok = gr < M && gk < row_bytes;
      cp_async_16(sa + r * ROW_BYTES + 16 * c, xb + (ok ? (size_t)gr * row_bytes + gk : 0), ok ? 16 : 0);
    }
#pragma unroll
    for (int i = tid; i < BN * 4; i += THREADS) {
      const int r = i >> 2, c = i & 3;
      const int gr = n0 + r, gk = kbyte + 16 * c;
      const bool ok = gr < N && gk < row_bytes;
      cp_async_16(sb + r * ROW_BYTES + 16 * c, wb + (ok ? (size_t)gr * row_bytes + gk : 0), ok ? 16 : 0);
    }
  };

  int acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][j][q] = 0;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < ktiles) load_stage(s, s);
    cp_async_commit();
  }

  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    {
      const int next = kt + STAGES - 1;
      if (next < ktiles) load_stage(next, next % STAGES);
      cp_async_commit();
    }
    const unsigned char* sa = smem + (kt % STAGES) * STAGE_BYTES;
    const unsigned char* sb = sa + A_BYTES;
    uint4 av[MT][2], bv[NT];
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      const int r = wm * WM + i * 16 + g;
      av[i][0] = *(const uint4*)(sa + r * ROW_BYTES + 16 * tig);
      av[i][1] = *(const uint4*)(sa + (r + 8) * ROW_BYTES + 16 * tig);
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int r = wn * WN + j * 8 + g;
      bv[j] = *(const uint4*)(sb + r * ROW_BYTES + 16 * tig);
    }
#pragma unroll
    for (int step = 0; step < 4; ++step) {
      u32 a[MT][4], b[NT][2];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        const u32 r0 = step == 0 ? av[i][0].x : step == 1 ? av[i][0].y : step == 2 ? av[i][0].z : av[i][0].w;
        const u32 r1 = step == 0 ? av[i][1].x : step == 1 ? av[i][1].y : step == 2 ? av[i][1].z : av[i][1].w;
        a[i][0] = lo_nibbles_x16(r0);
        a[i][1] = lo_nibbles_x16(r1);
        a[i][2] = hi_nibbles_x16(r0);
        a[i][3] = hi_nibbles_x16(r1);
      }
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const u32 r = step == 0 ? bv[j].x : step == 1 ? bv[j].y : step == 2 ? bv[j].z : bv[j].w;
        b[j][0] = lo_nibbles_x16(r);
        b[j][1] = hi_nibbles_x16(r);
      }
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
          mma_s8_16832(acc[i][j], a[i][0], a[i][1], a[i][2], a[i][3], b[j][0], b[j][1]);
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = m0 + wm * WM + i * 16 + g + 8 * h;
      if (m >= M) continue;
      const float sxm = sx[m];
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int n = n0 + wn * WN + j * 8 + 2 * tig;
        if (n >= N) continue;
        // Remove the exact x256 (x16 per int4 operand) with an arithmetic shift.
        store_pair<F32>(y, acc[i][j][2 * h] >> 8, acc[i][j][2 * h + 1] >> 8, sxm, sw, bias, residual, m, n, N);
      }
    }
  }
}

// Dynamic shared memory: STAGES * (BM + BN) * 64 bytes (the host sets the attribute above 48 KiB).
// Each name has an "_f32" twin writing f32 outputs (compiled artifacts' f32 `int_linear`).
#define QCC_GEMM(NAME, BM, BN, WARPS_M, WARPS_N, STAGES, MIN_BLOCKS)                               \
  extern "C" __global__ void __launch_bounds__(WARPS_M * WARPS_N * 32, MIN_BLOCKS)                 \
      NAME(const u32* w, const float* sw, const u32* x, const float* sx, const float* bias,        \
           const u16* residual, u16* y, int M, int N, int K) {                                     \
    w4a4_gemm_body<BM, BN, WARPS_M, WARPS_N, STAGES>(w, sw, x, sx, bias, residual, y, M, N, K);    \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(WARPS_M * WARPS_N * 32, MIN_BLOCKS)                 \
      NAME##_f32(const u32* w, const float* sw, const u32* x, const float* sx, const float* bias,  \
                 const u16* residual, float* y, int M, int N, int K) {                             \
    w4a4_gemm_body<BM, BN, WARPS_M, WARPS_N, STAGES, true>(w, sw, x, sx, bias, residual, y, M, N, K); \
  }

// MIN_BLOCKS = 2 asks ptxas for two blocks per SM (a register cap); 128x128_w8 spills under it.
QCC_GEMM(w4a4_gemm_128x128_w8, 128, 128, 2, 4, 4, 1)
QCC_GEMM(w4a4_gemm_128x256_w8, 128, 256, 2, 4, 3, 1)
QCC_GEMM(w4a4_gemm_64x128_w4, 64, 128, 2, 2, 4, 2)
QCC_GEMM(w4a4_gemm_64x256_w8, 64, 256, 2, 4, 4, 1)
QCC_GEMM(w4a4_gemm_128x128_w4, 128, 128, 2, 2, 4, 1)

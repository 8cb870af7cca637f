// Prefill W4A4 GEMM on Hopper's warpgroup tensor cores (wgmma, s8.s8 -> s32; needs sm_90a: this file
// alone is compiled for it, see nvrtc::arch_for): Y[M, N] = X[M, K] . W[N, K]^T with int4 X and W in
// the split-nibble layout of common.cuh, exact int32 accumulation, then the shared epilogue
// (identical to w4a4_gemm.cu, including the exact >> 8 that removes the x16 of each unpacked operand).
//
// Roles: wgmma's A operand (64 rows per warpgroup) is the activations, from registers: each thread
// reads one 16-byte int4 vector per row it owns from shared memory and unpacks it with one shift and
// two ANDs, exactly as the mma.sync kernel does. wgmma's B operand must be int8 in shared memory, so
// the weight tile is unpacked by all threads from the int4 staging ring into an int8 buffer in the
// canonical no-swizzle K-major layout (8x16-byte core matrices; LBO = 128 bytes to the next 16 k,
// SBO = 256 bytes to the next 8 rows), then fence.proxy.async + a barrier make it visible to wgmma.
//
// K order: within a k128 tile a row is 16 words (64 bytes); word w holds k = 8w..8w+7. wgmma step s
// (k32) uses word s of each of the row's four 16-byte vectors t: logical k 4t..4t+3 <- low nibbles
// of word 4t+s, 16+4t..16+4t+3 <- its high nibbles. A (registers) and B (shared) apply the same
// permutation, so the dot products are unchanged.
//
// Pipeline (one CTA = NWG consumer warpgroups, all threads also load and unpack; no warp
// specialisation): STAGES-deep cp.async ring of int4 tiles (A: BM x 64 B, B: BN x 64 B, 16-byte
// chunks XOR-swizzled by (row >> 1) & 3 so the unpack reads and A-fragment reads are conflict-free);
// NB int8 B buffers. Iteration kt: A fragments of tile kt, four async wgmmas on buffer kt % NB,
// cp.async of tile kt + STAGES - 1, unpack of tile kt + 1 into buffer (kt + 1) % NB (overlapping
// the tensor cores), wgmma.wait_group NB - 2, one barrier. NB = 3 keeps one group in flight across
// the barrier (two register sets for A, loop unrolled by 2). SW selects the 128-byte-swizzle layout
// for the int8 buffer (see w4a4_wgmma_body).
//
// Requirements (checked on the host): K % 32 == 0, N % 8 == 0, 16-byte aligned rows; tails in M, N
// and K are zero-filled by cp.async and masked at the store.

QCC_DEVICE void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
QCC_DEVICE void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
QCC_DEVICE void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
QCC_DEVICE void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Keeps the compiler from moving accesses of `r` across the wgmma issue / wait points.
QCC_DEVICE void reg_fence(int& r) { asm volatile("" : "+r"(r)::"memory"); }
QCC_DEVICE void reg_fence_u(u32& r) { asm volatile("" : "+r"(r)::"memory"); }

// Shared-memory matrix descriptor, no swizzle (layout type 0), base offset 0.
QCC_DEVICE u64 wg_desc(u32 addr, u32 lbo, u32 sbo) {
  return (u64)((addr >> 4) & 0x3FFFu) | ((u64)((lbo >> 4) & 0x3FFFu) << 16) | ((u64)((sbo >> 4) & 0x3FFFu) << 32);
}

QCC_DEVICE void wgmma_m64n256k32_s8_rs(int (&d)[128], u32 a0, u32 a1, u32 a2, u32 a3, u64 desc,
                                       u32 scale = 1) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k32.s32.s8.s8 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
      "}, {%128, %129, %130, %131}, %132, p;\n}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
        "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
        "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
        "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]),
        "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]),
        "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]),
        "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]),
        "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63]),
        "+r"(d[64]), "+r"(d[65]), "+r"(d[66]), "+r"(d[67]), "+r"(d[68]), "+r"(d[69]), "+r"(d[70]), "+r"(d[71]),
        "+r"(d[72]), "+r"(d[73]), "+r"(d[74]), "+r"(d[75]), "+r"(d[76]), "+r"(d[77]), "+r"(d[78]), "+r"(d[79]),
        "+r"(d[80]), "+r"(d[81]), "+r"(d[82]), "+r"(d[83]), "+r"(d[84]), "+r"(d[85]), "+r"(d[86]), "+r"(d[87]),
        "+r"(d[88]), "+r"(d[89]), "+r"(d[90]), "+r"(d[91]), "+r"(d[92]), "+r"(d[93]), "+r"(d[94]), "+r"(d[95]),
        "+r"(d[96]), "+r"(d[97]), "+r"(d[98]), "+r"(d[99]), "+r"(d[100]), "+r"(d[101]), "+r"(d[102]), "+r"(d[103]),
        "+r"(d[104]), "+r"(d[105]), "+r"(d[106]), "+r"(d[107]), "+r"(d[108]), "+r"(d[109]), "+r"(d[110]), "+r"(d[111]),
        "+r"(d[112]), "+r"(d[113]), "+r"(d[114]), "+r"(d[115]), "+r"(d[116]), "+r"(d[117]), "+r"(d[118]), "+r"(d[119]),
        "+r"(d[120]), "+r"(d[121]), "+r"(d[122]), "+r"(d[123]), "+r"(d[124]), "+r"(d[125]), "+r"(d[126]), "+r"(d[127])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc), "r"(scale));
}

QCC_DEVICE void wgmma_m64n128k32_s8_rs(int (&d)[64], u32 a0, u32 a1, u32 a2, u32 a3, u64 desc,
                                       u32 scale = 1) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, {%64, %65, %66, %67}, %68, p;\n}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
        "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
        "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
        "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]),
        "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]),
        "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]),
        "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]),
        "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc), "r"(scale));
}

// As wgmma_m64n128k32_s8_rs with scale-d = 0 and write-only accumulators: the first k32 step of a
// work tile, so the accumulators are not live into it (no loop-carried values across tiles).
QCC_DEVICE void wgmma_m64n128k32_s8_rs_first(int (&d)[64], u32 a0, u32 a1, u32 a2, u32 a3, u64 desc) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, %69;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, {%64, %65, %66, %67}, %68, p;\n}\n"
      : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3]), "=r"(d[4]), "=r"(d[5]), "=r"(d[6]), "=r"(d[7]),
        "=r"(d[8]), "=r"(d[9]), "=r"(d[10]), "=r"(d[11]), "=r"(d[12]), "=r"(d[13]), "=r"(d[14]), "=r"(d[15]),
        "=r"(d[16]), "=r"(d[17]), "=r"(d[18]), "=r"(d[19]), "=r"(d[20]), "=r"(d[21]), "=r"(d[22]), "=r"(d[23]),
        "=r"(d[24]), "=r"(d[25]), "=r"(d[26]), "=r"(d[27]), "=r"(d[28]), "=r"(d[29]), "=r"(d[30]), "=r"(d[31]),
        "=r"(d[32]), "=r"(d[33]), "=r"(d[34]), "=r"(d[35]), "=r"(d[36]), "=r"(d[37]), "=r"(d[38]), "=r"(d[39]),
        "=r"(d[40]), "=r"(d[41]), "=r"(d[42]), "=r"(d[43]), "=r"(d[44]), "=r"(d[45]), "=r"(d[46]), "=r"(d[47]),
        "=r"(d[48]), "=r"(d[49]), "=r"(d[50]), "=r"(d[51]), "=r"(d[52]), "=r"(d[53]), "=r"(d[54]), "=r"(d[55]),
        "=r"(d[56]), "=r"(d[57]), "=r"(d[58]), "=r"(d[59]), "=r"(d[60]), "=r"(d[61]), "=r"(d[62]), "=r"(d[63])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc), "r"(0u));
}

template <int NWG, int BN>
struct WgmmaOp;
template <int NWG>
struct WgmmaOp<NWG, 256> {
  static __device__ __forceinline__ void run(int (&d)[128], u32 a0, u32 a1, u32 a2, u32 a3, u64 desc,
                                             u32 scale = 1) {
    wgmma_m64n256k32_s8_rs(d, a0, a1, a2, a3, desc, scale);
  }
};
template <int NWG>
struct WgmmaOp<NWG, 128> {
  static __device__ __forceinline__ void run(int (&d)[64], u32 a0, u32 a1, u32 a2, u32 a3, u64 desc,
                                             u32 scale = 1) {
    wgmma_m64n128k32_s8_rs(d, a0, a1, a2, a3, desc, scale);
  }
};

QCC_DEVICE u32 u4_word(const uint4& v, int s) { return s == 0 ? v.x : s == 1 ? v.y : s == 2 ? v.z : v.w; }
// Byte offset of 16-byte chunk c of staging row r (64-byte rows, chunks XOR-swizzled).
QCC_DEVICE int stage_off(int r, int c) { return r * 64 + 16 * (c ^ ((r >> 1) & 3)); }

// SW: the int8 B buffer in the 128-byte-swizzle K-major layout instead of no-swizzle: row n of a
// k128 tile is 128 contiguous bytes (8-row atoms of 1024 bytes), logical 16-byte chunk c = 2s + kc
// stored at chunk c ^ (n % 8); step s's descriptor starts 32 s bytes into the atom (SBO = 1024).
template <int NWG, int BN, int STAGES, bool DEEP, bool SW>
static __device__ __forceinline__ void w4a4_wgmma_body(const u32* __restrict__ w, const float* __restrict__ sw,
                                                       const u32* __restrict__ x, const float* __restrict__ sx,
                                                       const float* __restrict__ bias,
                                                       const u16* __restrict__ residual, u16* __restrict__ y,
                                                       int M, int N, int K) {
  constexpr int THREADS = NWG * 128;
  constexpr int BM = NWG * 64;
  constexpr int NB = DEEP ? 3 : 2;
  constexpr int A_BYTES = BM * 64, B_BYTES = BN * 64;
  constexpr int STAGE_BYTES = A_BYTES + B_BYTES;
  constexpr int BUF_BYTES = BN * 128;  // 4 k32 steps x BN rows x 32 bytes
  constexpr int NACC = BN / 2;
  constexpr u32 LBO = SW ? 16 : 128, SBO = SW ? 1024 : 256;
  static_assert(STAGES >= 3, "the pipeline waits for tile kt + 2 at the end of iteration kt");
  static_assert(BN == THREADS || BN * 2 == THREADS, "unpack: one or two threads per B row");
  extern __shared__ __align__(1024) unsigned char smem[];
  unsigned char* ring = smem;
  unsigned char* bufb = smem + STAGES * STAGE_BYTES;
  const u32 bufb_s = (u32)__cvta_generic_to_shared(bufb);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wg = warp >> 2, wq = warp & 3;
  const int g = lane >> 2, tig = lane & 3;
  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
  const int row_bytes = K >> 1;
  const int ktiles = (K + 127) >> 7;
  const unsigned char* xb = (const unsigned char*)x;
  const unsigned char* wb = (const unsigned char*)w;

  auto load_stage = [&](int kt, int slot) {
    unsigned char* sa = ring + slot * STAGE_BYTES;
    unsigned char* sb = sa + A_BYTES;
    const int kbyte = kt * 64;
#pragma unroll
    for (int i = tid; i < BM * 4; i += THREADS) {
      const int r = i >> 2, c = i & 3;
      const int gr = m0 + r, gk = kbyte + 16 * c;
      const bool ok = gr < M && gk < row_bytes;
      cp_async_16(sa + stage_off(r, c), xb + (ok ? (size_t)gr * row_bytes + gk : 0), ok ? 16 : 0);
    }
#pragma unroll
    for (int i = tid; i < BN * 4; i += THREADS) {
      const int r = i >> 2, c = i & 3;
      const int gr = n0 + r, gk = kbyte + 16 * c;
      const bool ok = gr < N && gk < row_bytes;
      cp_async_16(sb + stage_off(r, c), wb + (ok ? (size_t)gr * row_bytes + gk : 0), ok ? 16 : 0);
    }
  };

  // int4 B tile (staging slot) -> int8 buffer `buf`: step s, row r at s*BN*32 + (r/8)*256 + kc*128 + (r%8)*16.
  auto unpack_b = [&](int slot, int buf) {
    const unsigned char* sb = ring + slot * STAGE_BYTES + A_BYTES;
    unsigned char* dst = bufb + buf * BUF_BYTES;
    const int r = tid % BN, part = tid / BN;
    uint4 v[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) v[c] = *(const uint4*)(sb + stage_off(r, c));
    unsigned char* rowdst = SW ? dst + (r >> 3) * 1024 + (r & 7) * 128 : dst + (r >> 3) * 256 + (r & 7) * 16;
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const u32 w0 = u4_word(v[0], s), w1 = u4_word(v[1], s), w2 = u4_word(v[2], s), w3 = u4_word(v[3], s);
      if (BN == THREADS || part == 0) {
        uint4 o;
        o.x = lo_nibbles_x16(w0);
        o.y = lo_nibbles_x16(w1);
        o.z = lo_nibbles_x16(w2);
        o.w = lo_nibbles_x16(w3);
        *(uint4*)(SW ? rowdst + 16 * ((2 * s) ^ (r & 7)) : rowdst + s * BN * 32) = o;
      }
      if (BN == THREADS || part == 1) {
        uint4 o;
        o.x = hi_nibbles_x16(w0);
        o.y = hi_nibbles_x16(w1);
        o.z = hi_nibbles_x16(w2);
        o.w = hi_nibbles_x16(w3);
        *(uint4*)(SW ? rowdst + 16 * ((2 * s + 1) ^ (r & 7)) : rowdst + s * BN * 32 + 128) = o;
      }
    }
  };

  const int ra = wg * 64 + wq * 16 + g, rb = ra + 8;
  auto load_a = [&](int slot, u32(&af)[4][4]) {
    const unsigned char* sa = ring + slot * STAGE_BYTES;
    const uint4 va = *(const uint4*)(sa + stage_off(ra, tig));
    const uint4 vb = *(const uint4*)(sa + stage_off(rb, tig));
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const u32 r0 = u4_word(va, s), r1 = u4_word(vb, s);
      af[s][0] = lo_nibbles_x16(r0);
      af[s][1] = lo_nibbles_x16(r1);
      af[s][2] = hi_nibbles_x16(r0);
      af[s][3] = hi_nibbles_x16(r1);
    }
  };

  int acc[NACC];
#pragma unroll
  for (int i = 0; i < NACC; ++i) acc[i] = 0;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < ktiles) load_stage(s, s);
    cp_async_commit();
  }
  cp_async_wait<STAGES - 2>();
  __syncthreads();
  unpack_b(0, 0);
  cp_async_wait<STAGES - 3>();
  fence_proxy_async();
  __syncthreads();

  auto iteration = [&](int kt, u32(&af)[4][4]) {
    load_a(kt % STAGES, af);
    wgmma_fence();
    const u32 base = bufb_s + (kt % NB) * BUF_BYTES;
#pragma unroll
    for (int s = 0; s < 4; ++s)
      WgmmaOp<NWG, BN>::run(acc, af[s][0], af[s][1], af[s][2], af[s][3],
                            wg_desc(base + (SW ? 32 * s : s * BN * 32), LBO, SBO) | (SW ? (1ull << 62) : 0ull));
    wgmma_commit();
    {
      const int next = kt + STAGES - 1;
      if (next < ktiles) load_stage(next, next % STAGES);
      cp_async_commit();
    }
    if (kt + 1 < ktiles) unpack_b((kt + 1) % STAGES, (kt + 1) % NB);
    fence_proxy_async();
    wgmma_wait<NB - 2>();
    cp_async_wait<STAGES - 3>();
    __syncthreads();
  };

  u32 af0[4][4], af1[4][4];
  // Unrolled by two (A register sets af0 / af1) with no branch inside the body: a conditional second
  // iteration would merge the accumulators at a phi (register moves while wgmmas are in flight, which
  // makes ptxas serialize them, warning C7513).
  int kt = 0;
  for (; kt + 1 < ktiles; kt += 2) {
    iteration(kt, af0);
    iteration(kt + 1, af1);
  }
  if (kt < ktiles) iteration(kt, af0);
  wgmma_wait<0>();
#pragma unroll
  for (int i = 0; i < NACC; ++i) reg_fence(acc[i]);
  cp_async_wait<0>();

  // Accumulator j*4 + 2h + e: row 16*wq + g + 8h of this warpgroup's 64, column 8j + 2*tig + e.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int m = m0 + wg * 64 + wq * 16 + g + 8 * h;
    if (m >= M) continue;
    const float sxm = sx[m];
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      const int n = n0 + 8 * j + 2 * tig;
      if (n >= N) continue;
      // Remove the exact x256 (x16 per int4 operand) with an arithmetic shift.
      const u16 y0 = epilogue(acc[4 * j + 2 * h] >> 8, sxm, sw[n], bias, residual, m, n, N);
      const u16 y1 = epilogue(acc[4 * j + 2 * h + 1] >> 8, sxm, sw[n + 1], bias, residual, m, n + 1, N);
      *(u32*)(y + (size_t)m * N + n) = (u32)y0 | ((u32)y1 << 16);
    }
  }
}

// Dynamic shared memory: STAGES * (64 * NWG + BN) * 64 + NB * BN * 128 bytes (device.rs GemmVariant).
#define QCC_WGMMA(NAME, NWG, BN, STAGES, DEEP, SW, MIN_BLOCKS)                                      \
  extern "C" __global__ void __launch_bounds__(NWG * 128, MIN_BLOCKS)                               \
      NAME(const u32* w, const float* sw, const u32* x, const float* sx, const float* bias,        \
           const u16* residual, u16* y, int M, int N, int K) {                                     \
    w4a4_wgmma_body<NWG, BN, STAGES, DEEP, SW>(w, sw, x, sx, bias, residual, y, M, N, K);          \
  }

// (NAME, warpgroups, BN, STAGES, DEEP, SW, MIN_BLOCKS); device.rs GemmVariant::ALL lists them.
// MIN_BLOCKS = 2 (a 128-register cap) only where ptxas fits it without spills.
QCC_WGMMA(w4a4_wgmma_128x256_s4, 2, 256, 4, false, false, 1)
QCC_WGMMA(w4a4_wgmma_128x256_s5_d, 2, 256, 5, true, false, 1)
QCC_WGMMA(w4a4_wgmma_128x256_s5_d_sw, 2, 256, 5, true, true, 1)
QCC_WGMMA(w4a4_wgmma_128x256_s4_d, 2, 256, 4, true, false, 1)
QCC_WGMMA(w4a4_wgmma_128x128_s4, 2, 128, 4, false, false, 2)
QCC_WGMMA(w4a4_wgmma_128x128_s4_sw, 2, 128, 4, false, true, 1)
QCC_WGMMA(w4a4_wgmma_128x128_s4_d, 2, 128, 4, true, false, 1)

// ---------------------------------------------------------------------------------------------------
// Warp-specialised variants (w4a4_ws_* and w4a4p8_ws_*): TMA producer, mbarrier rings, no CTA-wide
// barrier in the main loop. 384 threads = 3 warpgroups:
//   WG0 (warps 0-3, setmaxnreg.dec): thread 0 issues the TMA copies (cp.async.bulk.tensor, tensor
//     maps passed as __grid_constant__ parameters, 64-byte swizzle for the int4 tiles) into a
//     STAGES-deep ring of [A int4 BM x 64 B | B int4 BN x 64 B] slots (full[] barriers with
//     expect_tx); all 128 threads unpack the int4 weight tile into a second ring of NB int8 tiles
//     (the canonical K-major layout of the wgmma B operand, same K order as above), then
//     fence.proxy.async and arrive on full8[] / empty[].
//   WG1, WG2 (setmaxnreg.inc): consumers, BM/2 token rows each (BM/128 m64 blocks), all BN columns:
//     wait full[] + full8[], A fragments from the int4 slot (registers, as above), async wgmmas on
//     the int8 tile, arrive empty[] (A read), wait for the previous tile's wgmmas, arrive empty8[].
// The TMA runs LOOK = STAGES - NB tiles ahead of the unpack, so the producer's empty[] wait never
// blocks the unpack (a slot is reused only after its tile's int8 buffer was released).
//
// P8 ("pre-unpacked int8 prefill weights", w4a4p8_*): the weights come from a second, pack-time
// layout (pack.rs pack_int8_wgmma: 16*q as int8, each k128 block in the wgmma K order above, rows
// padded to a multiple of 128 bytes) — twice the weight bytes of the int4 storage. TMA copies them
// with the 128-byte swizzle straight into the slot that the consumers hand to wgmma (no unpack
// warps; WG0 is the producer alone); the activations stay int4 and are unpacked in registers.
// ---------------------------------------------------------------------------------------------------

struct __align__(64) TmaDesc {
  u64 v[16];
};

QCC_DEVICE void mbar_init(u32 bar, u32 count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
QCC_DEVICE void mbar_arrive(u32 bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
QCC_DEVICE void mbar_arrive_tx(u32 bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// Waits until the phase with parity `parity` has completed (parity 1 on a fresh barrier: at once).
QCC_DEVICE void mbar_wait(u32 bar, u32 parity) {
  u32 done;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}
QCC_DEVICE void tma_load_2d(u32 dst, const TmaDesc* desc, int c0, int c1, u32 bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], "
      "[%4];\n" ::"r"(dst),
      "l"((u64)desc), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}

// GW ("global weights", `_gw`): the unpack warpgroup reads the int4 weight rows straight from
// global memory (16-byte read-only loads, one k tile ahead in registers) instead of a TMA copy into
// the ring and an ld.shared back: the ring holds only the activations, and each k128 tile costs
// 16 KB less shared-memory traffic (8 KB TMA write + 8 KB unpack read of 128 KB in total with the
// wgmma B reads). Measured slower on H200 (docs/gpu-results.md, 2026-12-03 08:12: main loop ~1,970
// vs 1,367 cycles per k tile for `_b4_e`: one L2 round trip per tile exposed at 56 registers); kept
// as a verified variant for the bench. `wq4`: the int4 weights.
template <int BM, int BN, int STAGES, int NB, bool SW, bool P8, bool PERSIST, bool EPI, bool GW = false>
static __device__ __forceinline__ void w4a4_ws_body(const TmaDesc* tw, const TmaDesc* tx, const float* __restrict__ sw,
                                                    const float* __restrict__ sx, const float* __restrict__ bias,
                                                    const u16* __restrict__ residual, u16* __restrict__ y, int M,
                                                    int N, int K, const u32* __restrict__ wq4 = nullptr) {
  constexpr int MB = BM / 128;  // m64 blocks per consumer warpgroup
  constexpr int A_BYTES = BM * 64;
  constexpr int B8_BYTES = BN * 128;
  constexpr int SLOT = A_BYTES + (P8 ? B8_BYTES : GW ? 0 : BN * 64);
  constexpr int RING8 = P8 ? 0 : NB * B8_BYTES;
  constexpr int NACC = BN / 2;
  constexpr int LOOK = P8 ? STAGES : STAGES - NB;
  constexpr int NB1 = NB > 0 ? NB : 1;  // modulus in code that P8 never runs
  constexpr bool B_SW = P8 || SW;  // B operand in the 128-byte-swizzle layout
  constexpr u32 LBO = B_SW ? 16 : 128, SBO = B_SW ? 1024 : 256;
  static_assert(BM == 128 || BM == 256, "BM");
  static_assert(BN == 128 || BN == 256, "BN");
  static_assert(P8 || (NB >= 2 && LOOK >= 1), "ring depths");
  static_assert(!(GW && (P8 || SW)), "GW: int4 weights, no-swizzle int8 ring");
  extern __shared__ unsigned char smem_raw[];
  const u32 raw = (u32)__cvta_generic_to_shared(smem_raw);
  const u32 base = (raw + 1023u) & ~1023u;
  unsigned char* smem = smem_raw + (base - raw);
  const u32 ring8 = base + STAGES * SLOT;
  const u32 bars = ring8 + RING8;
  // Barriers: full[STAGES], empty[STAGES], full8[NB], empty8[NB].
  auto full = [&](int i) { return bars + 8u * i; };
  auto empty = [&](int i) { return bars + 8u * (STAGES + i); };
  auto full8 = [&](int i) { return bars + 8u * (2 * STAGES + i); };
  auto empty8 = [&](int i) { return bars + 8u * (2 * STAGES + NB + i); };

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int ktiles = (K + 127) >> 7;
  // Work tiles of this CTA: one (grid x = N tiles, y = M tiles), or, PERSIST, tiles blockIdx.x,
  // blockIdx.x + gridDim.x, ... of the N-fastest order (1-D grid of at most one CTA per SM). Global
  // k-tile counter q = i * ktiles + kt over this CTA's i-th tile drives both rings' slots and
  // phases, so the producer and the unpack run on into the next tile during this tile's epilogue.
  const int tiles_n = (N + BN - 1) / BN;
  const int ntiles = PERSIST ? tiles_n * ((M + BM - 1) / BM) : 1;
  const int my_tiles = PERSIST ? (ntiles > (int)blockIdx.x ? (ntiles - 1 - (int)blockIdx.x) / (int)gridDim.x + 1 : 0) : 1;
  const int Q = my_tiles * ktiles;
  auto tile_m0 = [&](int q) {
    return PERSIST ? ((int)blockIdx.x + (q / ktiles) * (int)gridDim.x) / tiles_n * BM : (int)blockIdx.y * BM;
  };
  auto tile_n0 = [&](int q) {
    return PERSIST ? ((int)blockIdx.x + (q / ktiles) * (int)gridDim.x) % tiles_n * BN : (int)blockIdx.x * BN;
  };

  if (tid == 0) {
    for (int i = 0; i < STAGES; ++i) {
      mbar_init(full(i), 1);
      mbar_init(empty(i), P8 || GW ? 8 : 12);
    }
    if (!P8)
      for (int i = 0; i < NB; ++i) {
        mbar_init(full8(i), 4);
        mbar_init(empty8(i), 8);
      }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    fence_proxy_async();
    asm volatile("prefetch.tensormap [%0];\n" ::"l"((u64)tw) : "memory");
    asm volatile("prefetch.tensormap [%0];\n" ::"l"((u64)tx) : "memory");
  }
  __syncthreads();

  if (warp < 4) {
    // ---- producer / unpack warpgroup
    asm volatile("setmaxnreg.dec.sync.aligned.u32 56;\n" ::: "memory");
    auto issue = [&](int q) {
      const int slot = q % STAGES, t = q % ktiles;
      mbar_wait(empty(slot), ((q / STAGES) & 1) ^ 1);
      mbar_arrive_tx(full(slot), SLOT);
      tma_load_2d(base + slot * SLOT, tx, t * 64, tile_m0(q), full(slot));
      if (!GW) tma_load_2d(base + slot * SLOT + A_BYTES, tw, P8 ? t * 128 : t * 64, tile_n0(q), full(slot));
    };
    if (P8) {
      if (tid == 0)
        for (int q = 0; q < Q; ++q) issue(q);
    } else if (GW) {
      // Row r = tid (+ 128 rr) of the weight tile: 4 x 16 bytes per k tile, zero past N / K (K % 32
      // == 0, so the row's byte count is a multiple of 16 and the K tail is chunk-exact).
      const int row_bytes = K >> 1;
      const unsigned char* wb = (const unsigned char*)wq4;
      auto gload = [&](int q, uint4(&v)[BN / 128][4]) {
        const int t = q % ktiles, n0q = tile_n0(q);
#pragma unroll
        for (int rr = 0; rr < BN / 128; ++rr) {
          const int gr = n0q + tid + 128 * rr;
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int gk = t * 64 + 16 * c;
            v[rr][c] = make_uint4(0u, 0u, 0u, 0u);
            if (gr < N && gk < row_bytes) v[rr][c] = __ldg((const uint4*)(wb + (size_t)gr * row_bytes + gk));
          }
        }
      };
      if (tid == 0)
        for (int q = 0; q < LOOK && q < Q; ++q) issue(q);
      uint4 cur[BN / 128][4];
      if (Q > 0) gload(0, cur);
      for (int kt = 0; kt < Q; ++kt) {
        uint4 nxt[BN / 128][4];
        if (kt + 1 < Q) gload(kt + 1, nxt);
        const int b = kt % NB1;
        mbar_wait(empty8(b), ((kt / NB1) & 1) ^ 1);
        if (tid == 0 && kt + LOOK < Q) issue(kt + LOOK);
        unsigned char* dst = smem + STAGES * SLOT + b * B8_BYTES;
#pragma unroll
        for (int rr = 0; rr < BN / 128; ++rr) {
          const int r = tid + 128 * rr;
          unsigned char* rowdst = dst + (r >> 3) * 256 + (r & 7) * 16;
#pragma unroll
          for (int s = 0; s < 4; ++s) {
            const u32 w0 = u4_word(cur[rr][0], s), w1 = u4_word(cur[rr][1], s), w2 = u4_word(cur[rr][2], s),
                      w3 = u4_word(cur[rr][3], s);
            *(uint4*)(rowdst + s * BN * 32) =
                make_uint4(lo_nibbles_x16(w0), lo_nibbles_x16(w1), lo_nibbles_x16(w2), lo_nibbles_x16(w3));
            *(uint4*)(rowdst + s * BN * 32 + 128) =
                make_uint4(hi_nibbles_x16(w0), hi_nibbles_x16(w1), hi_nibbles_x16(w2), hi_nibbles_x16(w3));
          }
        }
        fence_proxy_async();
        __syncwarp();
        if (lane == 0) mbar_arrive(full8(b));
#pragma unroll
        for (int rr = 0; rr < BN / 128; ++rr)
#pragma unroll
          for (int c = 0; c < 4; ++c) cur[rr][c] = nxt[rr][c];
      }
    } else {
      if (tid == 0)
        for (int q = 0; q < LOOK && q < Q; ++q) issue(q);
      for (int kt = 0; kt < Q; ++kt) {
        const int b = kt % NB1, slot = kt % STAGES;
        mbar_wait(empty8(b), ((kt / NB1) & 1) ^ 1);
        if (tid == 0 && kt + LOOK < Q) issue(kt + LOOK);
        mbar_wait(full(slot), (kt / STAGES) & 1);
        const unsigned char* sb = smem + slot * SLOT + A_BYTES;
        unsigned char* dst = smem + STAGES * SLOT + b * B8_BYTES;
#pragma unroll
        for (int rr = 0; rr < BN / 128; ++rr) {
          const int r = tid + 128 * rr;
          uint4 v[4];
#pragma unroll
          for (int c = 0; c < 4; ++c) v[c] = *(const uint4*)(sb + stage_off(r, c));
          unsigned char* rowdst = SW ? dst + (r >> 3) * 1024 + (r & 7) * 128 : dst + (r >> 3) * 256 + (r & 7) * 16;
#pragma unroll
          for (int s = 0; s < 4; ++s) {
            const u32 w0 = u4_word(v[0], s), w1 = u4_word(v[1], s), w2 = u4_word(v[2], s), w3 = u4_word(v[3], s);
            uint4 lo, hi;
            lo.x = lo_nibbles_x16(w0);
            lo.y = lo_nibbles_x16(w1);
            lo.z = lo_nibbles_x16(w2);
            lo.w = lo_nibbles_x16(w3);
            hi.x = hi_nibbles_x16(w0);
            hi.y = hi_nibbles_x16(w1);
            hi.z = hi_nibbles_x16(w2);
            hi.w = hi_nibbles_x16(w3);
            *(uint4*)(SW ? rowdst + 16 * ((2 * s) ^ (r & 7)) : rowdst + s * BN * 32) = lo;
            *(uint4*)(SW ? rowdst + 16 * ((2 * s + 1) ^ (r & 7)) : rowdst + s * BN * 32 + 128) = hi;
          }
        }
        fence_proxy_async();
        __syncwarp();
        if (lane == 0) {
          mbar_arrive(empty(slot));
          mbar_arrive(full8(b));
        }
      }
    }
  } else {
    // ---- consumer warpgroups
    asm volatile("setmaxnreg.inc.sync.aligned.u32 224;\n" ::: "memory");
    const int cw = warp - 4, cg = cw >> 2, wq = cw & 3;
    const int g = lane >> 2, tig = lane & 3;
    const int ct = cw * 32 + lane - cg * 128;  // thread index within this consumer warpgroup
    int acc[MB][NACC];
    // EPI: the first k32 step of each work tile overwrites the accumulators (wgmma scale-d = 0), so
    // no zeroing instructions sit between the tiles' wgmma pipelines; zeroed once for the compiler.
#pragma unroll
    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
      for (int i = 0; i < NACC; ++i) acc[mb][i] = 0;

    auto load_a = [&](int slot, u32(&af)[MB][4][4]) {
      const unsigned char* sa = smem + slot * SLOT;
#pragma unroll
      for (int mb = 0; mb < MB; ++mb) {
        const int ra = cg * (BM / 2) + mb * 64 + wq * 16 + g;
        const uint4 va = *(const uint4*)(sa + stage_off(ra, tig));
        const uint4 vb = *(const uint4*)(sa + stage_off(ra + 8, tig));
#pragma unroll
        for (int s = 0; s < 4; ++s) {
          const u32 r0 = u4_word(va, s), r1 = u4_word(vb, s);
          af[mb][s][0] = lo_nibbles_x16(r0);
          af[mb][s][1] = lo_nibbles_x16(r1);
          af[mb][s][2] = hi_nibbles_x16(r0);
          af[mb][s][3] = hi_nibbles_x16(r1);
        }
      }
    };

    // kt: global k-tile counter q; first: the first k tile of a work tile (nothing to release; with
    // EPI also the accumulator reset).
    auto iteration = [&](int kt, bool first, u32(&af)[MB][4][4]) {
      const int slot = kt % STAGES;
      mbar_wait(full(slot), (kt / STAGES) & 1);
      if (!P8) mbar_wait(full8(kt % NB1), (kt / NB1) & 1);
      load_a(slot, af);
      wgmma_fence();
      const u32 bbase = P8 ? base + slot * SLOT + A_BYTES : ring8 + (kt % NB1) * B8_BYTES;
      const u32 scale0 = (EPI && first) ? 0u : 1u;
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const u64 desc = wg_desc(bbase + (B_SW ? 32 * s : s * BN * 32), LBO, SBO) | (B_SW ? (1ull << 62) : 0ull);
#pragma unroll
        for (int mb = 0; mb < MB; ++mb)
          WgmmaOp<2, BN>::run(acc[mb], af[mb][s][0], af[mb][s][1], af[mb][s][2], af[mb][s][3], desc,
                              s == 0 ? scale0 : 1u);
      }
      wgmma_commit();
      if (!P8) {  // the activations were read (GW: the slot holds nothing else)
        __syncwarp();
        if (lane == 0) mbar_arrive(empty(slot));
      }
      wgmma_wait<1>();
      __syncwarp();
      if (lane == 0 && !first) mbar_arrive(P8 ? empty((kt - 1) % STAGES) : empty8((kt - 1) % NB1));
    };

    // EPI staging (per consumer warpgroup, after the mbarriers): sw[BN] | bias[BN] | sx[BM/2] of the
    // current work tile, read from global memory at the tile's start (latency hidden by the main
    // loop) and written to shared memory after it, so the epilogue has no dependent global loads.
    constexpr int STG = 2 * BN + BM / 2;
    float* stg = (float*)(smem + (bars - base) + 256) + cg * STG;

    u32 af0[MB][4][4], af1[MB][4][4];
    for (int q0 = 0; q0 < Q; q0 += ktiles) {
    const int m0 = tile_m0(q0), n0 = tile_n0(q0);
    float r_sw[BN / 128], r_b[BN / 128], r_sx = 0.f;
    if (EPI) {
#pragma unroll
      for (int i = 0; i < BN / 128; ++i) {
        const int n = n0 + ct + 128 * i;
        r_sw[i] = n < N ? sw[n] : 0.f;
        r_b[i] = (bias != nullptr && n < N) ? bias[n] : 0.f;
      }
      const int mr = m0 + cg * (BM / 2) + ct;
      if (ct < BM / 2 && mr < M) r_sx = sx[mr];
    } else {
#pragma unroll
      for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int i = 0; i < NACC; ++i) acc[mb][i] = 0;
    }
    int kt = 0;
    for (; kt + 1 < ktiles; kt += 2) {
      iteration(q0 + kt, kt == 0, af0);
      iteration(q0 + kt + 1, false, af1);
    }
    if (kt < ktiles) iteration(q0 + kt, kt == 0, af0);
    wgmma_wait<0>();
#pragma unroll
    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
      for (int i = 0; i < NACC; ++i) reg_fence(acc[mb][i]);
    // The last k tile's buffers are free once its wgmmas completed.
    __syncwarp();
    if (lane == 0) {
      const int last = q0 + ktiles - 1;
      mbar_arrive(P8 ? empty(last % STAGES) : empty8(last % NB1));
    }

    if (EPI && m0 + BM <= M && n0 + BN <= N) {
      // Whole tile in range: no per-element guards, so the loads below issue back to back.
      // Warpgroup barrier 1 + cg: the previous tile's epilogue reads are done; then the stores are
      // visible to the whole warpgroup.
      asm volatile("bar.sync %0, 128;\n" ::"r"(1 + cg) : "memory");
#pragma unroll
      for (int i = 0; i < BN / 128; ++i) {
        stg[ct + 128 * i] = r_sw[i];
        stg[BN + ct + 128 * i] = r_b[i];
      }
      if (ct < BM / 2) stg[2 * BN + ct] = r_sx;
      asm volatile("bar.sync %0, 128;\n" ::"r"(1 + cg) : "memory");
      const bool hb = bias != nullptr, hr = residual != nullptr;
#pragma unroll
      for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int ml = mb * 64 + wq * 16 + g + 8 * h;
          const int m = m0 + cg * (BM / 2) + ml;
          const float sxm = stg[2 * BN + ml];
          u32 res[BN / 8];
          if (hr) {
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) res[j] = *(const u32*)(residual + (size_t)m * N + n0 + 8 * j + 2 * tig);
          }
#pragma unroll
          for (int j = 0; j < BN / 8; ++j) {
            const int nl = 8 * j + 2 * tig;
            // Same arithmetic as epilogue() (common.cuh): exact >> 8, x sx, x sw, + bias, + residual.
            float v0 = __fmul_rn(__fmul_rn((float)(acc[mb][4 * j + 2 * h] >> 8), sxm), stg[nl]);
            float v1 = __fmul_rn(__fmul_rn((float)(acc[mb][4 * j + 2 * h + 1] >> 8), sxm), stg[nl + 1]);
            if (hb) {
              v0 = __fadd_rn(v0, stg[BN + nl]);
              v1 = __fadd_rn(v1, stg[BN + nl + 1]);
            }
            if (hr) {
              v0 = __fadd_rn(v0, f16_to_f32((u16)(res[j] & 0xFFFFu)));
              v1 = __fadd_rn(v1, f16_to_f32((u16)(res[j] >> 16)));
            }
            *(u32*)(y + (size_t)m * N + n0 + nl) = (u32)f32_to_f16(v0) | ((u32)f32_to_f16(v1) << 16);
          }
        }
      continue;
    }

    // Accumulator j*4 + 2h + e of block mb: row 16*wq + g + 8h of the block, column 8j + 2*tig + e.
#pragma unroll
    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = m0 + cg * (BM / 2) + mb * 64 + wq * 16 + g + 8 * h;
        if (m >= M) continue;
        const float sxm = sx[m];
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
          const int n = n0 + 8 * j + 2 * tig;
          if (n >= N) continue;
          // Remove the exact x256 (x16 per int4 operand) with an arithmetic shift.
          const u16 y0 = epilogue(acc[mb][4 * j + 2 * h] >> 8, sxm, sw[n], bias, residual, m, n, N);
          const u16 y1 = epilogue(acc[mb][4 * j + 2 * h + 1] >> 8, sxm, sw[n + 1], bias, residual, m, n + 1, N);
          *(u32*)(y + (size_t)m * N + n) = (u32)y0 | ((u32)y1 << 16);
        }
      }
    }
  }
}

// Dynamic shared memory: 1024 (alignment) + STAGES * slot + NB * BN * 128 (int4 only) + barriers
// (256 bytes) + the EPI staging, 2 x (2 * BN + BM / 2) floats (device.rs GemmVariant::shared_bytes).
// Tensor maps: tw over the weights (int4: [N, K/2] bytes, box 64 x BN, 64-byte swizzle; P8: [N, Kp]
// bytes, box 128 x BN, 128-byte swizzle), tx over the activations ([M, K/2] bytes, box 64 x BM,
// 64-byte swizzle); zero fill out of bounds.
#define QCC_WS(NAME, BM, BN, STAGES, NB, SW, P8, PERSIST, EPI)                                      \
  extern "C" __global__ void __launch_bounds__(384, 1)                                               \
      NAME(const __grid_constant__ TmaDesc tw, const __grid_constant__ TmaDesc tx, const float* sw,  \
           const float* sx, const float* bias, const u16* residual, u16* y, int M, int N, int K) {   \
    w4a4_ws_body<BM, BN, STAGES, NB, SW, P8, PERSIST, EPI>(&tw, &tx, sw, sx, bias, residual, y, M, N, K); \
  }

// (NAME, BM, BN, STAGES, NB, SW, P8, PERSIST, EPI); device.rs GemmVariant::ALL lists them.
// EPI (`_e`): the epilogue's scales and bias staged in shared memory during the main loop and a
// guard-free epilogue for whole tiles (the plain form issues one dependent global load chain per
// 8 columns). PERSIST (`_pe`, with EPI): grid = min(tiles, SMs), 1-D; each CTA walks tiles
// blockIdx.x, blockIdx.x + gridDim.x, ... with one k-tile counter across tiles, so the TMA producer
// and the unpack run into the next tile while the consumers finish the current one.
QCC_WS(w4a4_ws_256x128_s6_b3, 256, 128, 6, 3, false, false, false, false)
QCC_WS(w4a4_ws_256x128_s6_b3_sw, 256, 128, 6, 3, true, false, false, false)
QCC_WS(w4a4_ws_256x128_s7_b2, 256, 128, 7, 2, false, false, false, false)
QCC_WS(w4a4_ws_128x256_s5_b2, 128, 256, 5, 2, false, false, false, false)
QCC_WS(w4a4p8_ws_256x128_s6, 256, 128, 6, 0, true, true, false, false)
QCC_WS(w4a4p8_ws_128x256_s4, 128, 256, 4, 0, true, true, false, false)
QCC_WS(w4a4_ws_256x128_s6_b3_e, 256, 128, 6, 3, false, false, false, true)
QCC_WS(w4a4_ws_256x128_s6_b3_pe, 256, 128, 6, 3, false, false, true, true)
// NB = 4 (`_b4`): the unpack can run two k tiles ahead of the consumers (with NB = 3 one: the
// consumers hold the current tile's buffer and the previous one until its wgmmas completed).
QCC_WS(w4a4_ws_256x128_s6_b4_e, 256, 128, 6, 4, false, false, false, true)

// GW (`_gw`, see w4a4_ws_body): the weights are read from global memory by the unpack warpgroup;
// the same int4 split-nibble rows as the other int4 variants, passed as the last parameter.
#define QCC_WSG(NAME, BM, BN, STAGES, NB, PERSIST)                                                  \
  extern "C" __global__ void __launch_bounds__(384, 1)                                               \
      NAME(const __grid_constant__ TmaDesc tw, const __grid_constant__ TmaDesc tx, const float* sw,  \
           const float* sx, const float* bias, const u16* residual, u16* y, int M, int N, int K,     \
           const u32* wq4) {                                                                         \
    w4a4_ws_body<BM, BN, STAGES, NB, false, false, PERSIST, true, true>(&tw, &tx, sw, sx, bias, residual, y, M, N, \
                                                                      K, wq4);                       \
  }
QCC_WSG(w4a4_ws_256x128_s6_b3_gw_e, 256, 128, 6, 3, false)
QCC_WSG(w4a4_ws_256x128_s8_b4_gw_e, 256, 128, 8, 4, false)
QCC_WSG(w4a4_ws_256x128_s8_b5_gw_e, 256, 128, 8, 5, false)

// ---------------------------------------------------------------------------------------------------
// Second-generation warp-specialised int4 kernel (w4a4_ws_*_c*, QCC_WS2): the `_b4_e` pipeline
// (TMA ring of int4 tiles, unpack warpgroup, int8 B ring of NB tiles, two consumer warpgroups)
// with three changes, each a template flag so the bench can tell them apart:
//
// * Coalesced epilogue (always): the unpack writes weight row n of the tile to B-operand row
//   col_perm(n), which swaps bits 1-2 and 3-4 of n (an involution within each 32 rows). wgmma's
//   accumulator column p = 8j + 2*tig + e then holds output column col_perm(p), so the eight
//   accumulators of j = 4jj..4jj+3 of a thread are the contiguous output columns 32jj + 8tig + 0..7:
//   one 16-byte store (and one 16-byte residual load) each, instead of four 4-byte stores that each
//   write half a sector. No shuffles; the permutation costs nothing in the main loop.
// * GA (`a` in the name): the consumers load their int4 activation fragments from global memory
//   themselves (16-byte ld.global.nc, two k tiles ahead in registers, zero past M / K) instead of
//   a TMA copy into the ring and an ld.shared back: 32 KB less shared-memory traffic per k128 tile
//   (of 128 KB). The ring holds the int4 weight tiles only, so it can be deeper. Register budget:
//   128 accumulators + 32 A fragment registers (one set: wgmma.wait_group 0 after each tile; the
//   other consumer warpgroup's wgmmas keep the tensor cores busy meanwhile) + 2 x 16 raw registers.
// * SK (`k` in the name): stream-K for the last waves. Work units u = tile * ktiles + kt (tiles in
//   N-fastest order). CTAs b < n_dp take one whole tile each (data-parallel waves); the g_sk CTAs
//   after them split the remaining tiles' units evenly, each a contiguous range of at least ktiles
//   units (host: g_sk <= remaining tiles), so a tile is split between at most two CTAs: CTA c's last
//   piece (the tile's k head, kt = 0..) and CTA c+1's first piece (its k tail, ..ktiles-1). The tail
//   piece stores its int32 partial sums to workspace slot c+1 and releases flags[slot][warpgroup];
//   the head piece (computed last by its CTA) acquires the flag, adds the partials (int32 addition:
//   bit-exact) and runs the epilogue. The reader resets the flag, so no per-launch clearing is
//   needed. All g_sk CTAs fit on the GPU at once (one per SM), so the waits cannot deadlock.
// ---------------------------------------------------------------------------------------------------

// Tile row n <-> B-operand row: swaps bits 1-2 with bits 3-4 (an involution).
QCC_DEVICE int col_perm(int p) { return (p & ~0x1E) | ((p & 0x6) << 2) | ((p >> 2) & 0x6); }

// 4-byte asynchronous global -> shared copy; src_bytes = 0 writes zero.
QCC_DEVICE void cp_async_4(float* smem, const float* gmem, int src_bytes) {
  u32 s = (u32)__cvta_generic_to_shared(smem);
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes) : "memory");
}
// One 16-byte shared-memory load into registers. (Binding `*(const uint4*)p` to frag's `const uint4&`
// made nvcc read each word on use: four 4-byte LDS per vector, 4-way bank-conflicted across the
// warp's 8 rows; ncu source counters, 2026-12-03: 31% of all shared wavefronts were such excess.)
QCC_DEVICE uint4 lds128(const unsigned char* p) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"((u32)__cvta_generic_to_shared(p))
               : "memory");
  return v;
}
QCC_DEVICE u32 ld_acquire_gpu(const u32* p) {
  u32 v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}
QCC_DEVICE void st_release_gpu(u32* p, u32 v) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}
// a0..a3 += the 4 int32 at p (L2 load: written by another CTA in this launch).
QCC_DEVICE void add_cg_i4(int& a0, int& a1, int& a2, int& a3, const int* p) {
  asm volatile(
      "{\n.reg .s32 t0, t1, t2, t3;\nld.global.cg.v4.s32 {t0, t1, t2, t3}, [%4];\n"
      "add.s32 %0, %0, t0;\nadd.s32 %1, %1, t1;\nadd.s32 %2, %2, t2;\nadd.s32 %3, %3, t3;\n}\n"
      : "+r"(a0), "+r"(a1), "+r"(a2), "+r"(a3)
      : "l"(p)
      : "memory");
}

template <int BM, int BN, int STAGES, int NB, bool GA, int SK, bool W0, bool UP, bool PR = false, bool F32 = false>
static __device__ __forceinline__ void w4a4_ws2_body(const TmaDesc* tw, const TmaDesc* tx, const float* __restrict__ sw,
                                                     const float* __restrict__ sx, const float* __restrict__ bias,
                                                     const u16* __restrict__ residual, void* __restrict__ y, int M,
                                                     int N, int K, const u32* __restrict__ xq4, int n_dp, int g_sk,
                                                     int* __restrict__ ws, u32* __restrict__ flags) {
  constexpr int MB = BM / 128;  // m64 blocks per consumer warpgroup
  constexpr int A_BYTES = GA ? 0 : BM * 64;
  constexpr int B8_BYTES = BN * 128;
  constexpr int SLOT = A_BYTES + BN * 64;
  constexpr int NACC = BN / 2;
  constexpr int LOOK = STAGES - NB;
  constexpr u32 LBO = 128, SBO = 256;
  static_assert(BM == 256 && BN == 128, "ws2: 256 x 128 tiles (one unpack row per thread)");
  static_assert(NB >= 2 && LOOK >= 1, "ring depths");
  extern __shared__ unsigned char smem_raw[];
  const u32 raw = (u32)__cvta_generic_to_shared(smem_raw);
  const u32 base = (raw + 1023u) & ~1023u;
  unsigned char* smem = smem_raw + (base - raw);
  const u32 ring8 = base + STAGES * SLOT;
  const u32 bars = ring8 + NB * B8_BYTES;
  auto full = [&](int i) { return bars + 8u * i; };
  auto empty = [&](int i) { return bars + 8u * (STAGES + i); };
  auto full8 = [&](int i) { return bars + 8u * (2 * STAGES + i); };
  auto empty8 = [&](int i) { return bars + 8u * (2 * STAGES + NB + i); };

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int ktiles = (K + 127) >> 7;
  const int tiles_n = (N + BN - 1) / BN;
  const int b = blockIdx.x;
  // SK: 0 one tile per CTA; 1 stream-K (k tiles split, partial sums); 2 persistent whole tiles
  // (CTA c of g_sk takes the contiguous tiles [c T / g_sk, (c + 1) T / g_sk), no partial sums).
  constexpr bool SPLIT = SK == 1, MULTI = SK != 0;
  // This CTA's unit range [u0, u1).
  int u0 = b * ktiles, u1 = u0 + ktiles;
  if (MULTI && b >= n_dp) {
    const int tsk = tiles_n * ((M + BM - 1) / BM) - n_dp, c = b - n_dp;
    if (SPLIT) {
      // usk * g_sk < 2^31: fewer than 2 x SMs stream-K tiles of at most 512 k tiles (K <= 65536).
      const int usk = tsk * ktiles;
      u0 = n_dp * ktiles + usk * c / g_sk;
      u1 = n_dp * ktiles + usk * (c + 1) / g_sk;
    } else {
      u0 = (n_dp + tsk * c / g_sk) * ktiles;
      u1 = (n_dp + tsk * (c + 1) / g_sk) * ktiles;
    }
  }
  const int Q = u1 - u0;

  if (tid == 0) {
    for (int i = 0; i < STAGES; ++i) {
      mbar_init(full(i), 1);
      mbar_init(empty(i), GA ? 4 : 12);
    }
    for (int i = 0; i < NB; ++i) {
      mbar_init(full8(i), 4);
      mbar_init(empty8(i), 8);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    fence_proxy_async();
    asm volatile("prefetch.tensormap [%0];\n" ::"l"((u64)tw) : "memory");
    if (!GA) asm volatile("prefetch.tensormap [%0];\n" ::"l"((u64)tx) : "memory");
  }
  __syncthreads();

  if (warp < 4) {
    // ---- producer (thread 0) / unpack warpgroup
    asm volatile("setmaxnreg.dec.sync.aligned.u32 56;\n" ::: "memory");
    // Thread 0's next unit to copy: tile it_t (rows it_m0, columns it_n0), k tile it_k.
    int it_t = u0 / ktiles, it_k = u0 - it_t * ktiles;
    int it_m0 = it_t / tiles_n * BM, it_n0 = (it_t % tiles_n) * BN;
    auto issue = [&](int q) {
      const int slot = q % STAGES;
      mbar_wait(empty(slot), ((q / STAGES) & 1) ^ 1);
      mbar_arrive_tx(full(slot), SLOT);
      if (!GA) tma_load_2d(base + slot * SLOT, tx, it_k * 64, it_m0, full(slot));
      tma_load_2d(base + slot * SLOT + A_BYTES, tw, it_k * 64, it_n0, full(slot));
      if (++it_k == ktiles) {
        it_k = 0;
        ++it_t;
        it_m0 = it_t / tiles_n * BM;
        it_n0 = (it_t % tiles_n) * BN;
      }
    };
    if (tid == 0)
      for (int q = 0; q < LOOK && q < Q; ++q) issue(q);
    // This thread's weight row nrow (staging row) goes to B row pr = col_perm(nrow). The 8 threads of
    // each quarter-warp phase (tid bits 0-2: e, r) take the rows with bits 1-2 = r and bits 3-4 =
    // r ^ d (d = tid bits 3-4), so their staging reads differ in row bits 0-2 and their int8 writes
    // in B-row bits 0-2: both conflict-free (thread tid -> row col_perm(tid) would be 4-way).
    // PR: the rows were permuted at pack time (pack.rs permute_rows32): staging row = B row = tid.
    const int nrow = PR ? tid : (tid & 0x67) | ((((tid >> 1) & 3) ^ ((tid >> 3) & 3)) << 3);
    const int pr = PR ? tid : col_perm(nrow);
    // UP: tile kt + 1's int4 row is read (after waiting for its TMA) before tile kt's proxy fence
    // and arrivals, so the read latency overlaps the fence.
    auto load_row = [&](int kt, uint4(&v)[4]) {
      const int slot = kt % STAGES;
      mbar_wait(full(slot), (kt / STAGES) & 1);
      const unsigned char* sb = smem + slot * SLOT + A_BYTES;
#pragma unroll
      for (int c = 0; c < 4; ++c) v[c] = *(const uint4*)(sb + stage_off(nrow, c));
    };
    uint4 v[4];
    if (UP && Q > 0) load_row(0, v);
    for (int kt = 0; kt < Q; ++kt) {
      const int bb = kt % NB, slot = kt % STAGES;
      mbar_wait(empty8(bb), ((kt / NB) & 1) ^ 1);
      if (tid == 0 && kt + LOOK < Q) issue(kt + LOOK);
      unsigned char* rowdst = smem + STAGES * SLOT + bb * B8_BYTES + (pr >> 3) * 256 + (pr & 7) * 16;
      if (!UP) load_row(kt, v);
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const u32 w0 = u4_word(v[0], s), w1 = u4_word(v[1], s), w2 = u4_word(v[2], s), w3 = u4_word(v[3], s);
        *(uint4*)(rowdst + s * BN * 32) =
            make_uint4(lo_nibbles_x16(w0), lo_nibbles_x16(w1), lo_nibbles_x16(w2), lo_nibbles_x16(w3));
        *(uint4*)(rowdst + s * BN * 32 + 128) =
            make_uint4(hi_nibbles_x16(w0), hi_nibbles_x16(w1), hi_nibbles_x16(w2), hi_nibbles_x16(w3));
      }
      if (UP && kt + 1 < Q) load_row(kt + 1, v);
      fence_proxy_async();
      __syncwarp();
      if (lane == 0) {
        mbar_arrive(empty(slot));
        mbar_arrive(full8(bb));
      }
    }
  } else {
    // ---- consumer warpgroups
    asm volatile("setmaxnreg.inc.sync.aligned.u32 224;\n" ::: "memory");
    const int cw = warp - 4, cg = cw >> 2, wq = cw & 3;
    const int g = lane >> 2, tig = lane & 3;
    const int ct = cw * 32 + lane - cg * 128;  // thread index within this consumer warpgroup
    const int row_bytes = K >> 1;
    // Not zeroed: every piece starts with scale-d = 0 (GA: write-only accumulator operands).
    int acc[MB][NACC];

    auto frag = [&](const uint4& va, const uint4& vb, u32(&af)[4][4]) {
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const u32 r0 = u4_word(va, s), r1 = u4_word(vb, s);
        af[s][0] = lo_nibbles_x16(r0);
        af[s][1] = lo_nibbles_x16(r1);
        af[s][2] = hi_nibbles_x16(r0);
        af[s][3] = hi_nibbles_x16(r1);
      }
    };
    // first (a work piece's first k tile): the first k32 step overwrites the accumulators.
    auto issue_mma = [&](int q, bool first, u32(&af)[MB][4][4]) {
      wgmma_fence();
      const u32 bbase = ring8 + (q % NB) * B8_BYTES;
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const u64 desc = wg_desc(bbase + s * BN * 32, LBO, SBO);
#pragma unroll
        for (int mb = 0; mb < MB; ++mb) {
          if ((GA || W0) && first && s == 0)
            wgmma_m64n128k32_s8_rs_first(acc[mb], af[mb][s][0], af[mb][s][1], af[mb][s][2], af[mb][s][3], desc);
          else
            WgmmaOp<2, BN>::run(acc[mb], af[mb][s][0], af[mb][s][1], af[mb][s][2], af[mb][s][3], desc,
                                (first && s == 0) ? 0u : 1u);
        }
      }
      wgmma_commit();
    };
    // TMA A path (as `_b4_e`): two A register sets, one wgmma group kept in flight.
    auto iteration = [&](int q, bool first, u32(&af)[MB][4][4]) {
      const int slot = q % STAGES;
      mbar_wait(full(slot), (q / STAGES) & 1);
      mbar_wait(full8(q % NB), (q / NB) & 1);
      const unsigned char* sa = smem + slot * SLOT;
#pragma unroll
      for (int mb = 0; mb < MB; ++mb) {
        const int ra = cg * (BM / 2) + mb * 64 + wq * 16 + g;
        frag(lds128(sa + stage_off(ra, tig)), lds128(sa + stage_off(ra + 8, tig)), af[mb]);
      }
      issue_mma(q, first, af);
      __syncwarp();
      if (lane == 0) mbar_arrive(empty(slot));
      wgmma_wait<1>();
      __syncwarp();
      if (lane == 0 && !first) mbar_arrive(empty8((q - 1) % NB));
    };
    // W0 (TMA A path): one A register set, wgmma.wait_group 0 after each k tile (32 registers fewer;
    // the other consumer warpgroup's wgmmas keep the tensor cores busy meanwhile).
    auto iteration_w0 = [&](int q, bool first) {
      const int slot = q % STAGES;
      mbar_wait(full(slot), (q / STAGES) & 1);
      mbar_wait(full8(q % NB), (q / NB) & 1);
      const unsigned char* sa = smem + slot * SLOT;
      u32 af[MB][4][4];
#pragma unroll
      for (int mb = 0; mb < MB; ++mb) {
        const int ra = cg * (BM / 2) + mb * 64 + wq * 16 + g;
        frag(lds128(sa + stage_off(ra, tig)), lds128(sa + stage_off(ra + 8, tig)), af[mb]);
      }
      issue_mma(q, first, af);
      __syncwarp();
      if (lane == 0) mbar_arrive(empty(slot));
      wgmma_wait<0>();
      __syncwarp();
      if (lane == 0) mbar_arrive(empty8(q % NB));
    };
    // GA path: raw int4 A vectors [mb][row, row + 8] of k tile kt, rows from m0, zero past M / K.
    auto gload = [&](int m0, int kt, uint4(&r)[MB][2]) {
      const int kb = kt * 64 + 16 * tig;
#pragma unroll
      for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = m0 + cg * (BM / 2) + mb * 64 + wq * 16 + g + 8 * h;
          r[mb][h] = make_uint4(0u, 0u, 0u, 0u);
          if (row < M && kb < row_bytes) r[mb][h] = ld_stream_u4(xq4 + ((size_t)row * row_bytes + kb) / 4);
        }
    };
    auto iteration_ga = [&](int q, bool first, uint4(&r)[MB][2], int m0, int kt_next) {
      mbar_wait(full8(q % NB), (q / NB) & 1);
      u32 af[MB][4][4];
#pragma unroll
      for (int mb = 0; mb < MB; ++mb) frag(r[mb][0], r[mb][1], af[mb]);
      issue_mma(q, first, af);
      if (kt_next >= 0) gload(m0, kt_next, r);  // the raw registers are free once unpacked
      wgmma_wait<0>();
      __syncwarp();
      if (lane == 0) mbar_arrive(empty8(q % NB));
    };

    constexpr int STG = 2 * BN + BM / 2;
    // Two staging buffers per warpgroup, alternating by work piece: a piece's cp.async copies are
    // issued at its start, when the warpgroup may still be reading the previous piece's buffer.
    float* stg_base = (float*)(smem + (bars - base) + 256) + cg * 2 * STG;
    const bool hb = bias != nullptr, hr = residual != nullptr;

    // Epilogue of a whole-k tile (or, `finish`, the k head of a split tile: the tail's partials
    // are added first).
    auto epilogue_tile = [&](int m0, int n0, float* stg, bool finish) {
      if (SPLIT && finish) {
        const int slot = b - n_dp + 1;
        if (ct == 0) {
          while (ld_acquire_gpu(flags + slot * 2 + cg) == 0u) {
          }
          flags[slot * 2 + cg] = 0u;
        }
        asm volatile("bar.sync %0, 128;\n" ::"r"(3 + cg) : "memory");
        const int* wsp = ws + ((size_t)slot * 2 + cg) * (MB * NACC * 128);
#pragma unroll
        for (int mb = 0; mb < MB; ++mb)
#pragma unroll
          for (int i4 = 0; i4 < NACC / 4; ++i4)
            add_cg_i4(acc[mb][4 * i4], acc[mb][4 * i4 + 1], acc[mb][4 * i4 + 2], acc[mb][4 * i4 + 3],
                      wsp + ((mb * (NACC / 4) + i4) * 128 + ct) * 4);
      }

      // Epilogue. Accumulator 4j + 2h + e of block mb: row 16 wq + g + 8h of the block, B row
      // 8j + 2 tig + e = output column col_perm(..): for j = 4jj + r, column 32jj + 8tig + 2r + e.
      // The piece's staging copies (issued at its start) are complete and visible to the warpgroup.
      cp_async_wait<0>();
      asm volatile("bar.sync %0, 128;\n" ::"r"(1 + cg) : "memory");
      if (m0 + BM <= M && n0 + BN <= N) {
#pragma unroll
        for (int mb = 0; mb < MB; ++mb)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int ml = mb * 64 + wq * 16 + g + 8 * h;
            const size_t rowoff = (size_t)(m0 + cg * (BM / 2) + ml) * N + n0;
            const float sxm = stg[2 * BN + ml];
            uint4 res[BN / 32];
            if (hr) {
#pragma unroll
              for (int jj = 0; jj < BN / 32; ++jj) res[jj] = *(const uint4*)(residual + rowoff + 32 * jj + 8 * tig);
            }
#pragma unroll
            for (int jj = 0; jj < BN / 32; ++jj) {
              const int c0 = 32 * jj + 8 * tig;
              const float4 s0 = *(const float4*)(stg + c0), s1 = *(const float4*)(stg + c0 + 4);
              const float scl[8] = {s0.x, s0.y, s0.z, s0.w, s1.x, s1.y, s1.z, s1.w};
              float bs[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
              if (hb) {
                const float4 b0 = *(const float4*)(stg + BN + c0), b1 = *(const float4*)(stg + BN + c0 + 4);
                bs[0] = b0.x; bs[1] = b0.y; bs[2] = b0.z; bs[3] = b0.w;
                bs[4] = b1.x; bs[5] = b1.y; bs[6] = b1.z; bs[7] = b1.w;
              }
              float v[8];
#pragma unroll
              for (int r = 0; r < 4; ++r) {
                float v0 = __fmul_rn(__fmul_rn((float)(acc[mb][4 * (4 * jj + r) + 2 * h] >> 8), sxm), scl[2 * r]);
                float v1 = __fmul_rn(__fmul_rn((float)(acc[mb][4 * (4 * jj + r) + 2 * h + 1] >> 8), sxm), scl[2 * r + 1]);
                if (hb) {
                  v0 = __fadd_rn(v0, bs[2 * r]);
                  v1 = __fadd_rn(v1, bs[2 * r + 1]);
                }
                if (hr) {
                  const u32 rw = u4_word(res[jj], r);
                  v0 = __fadd_rn(v0, f16_to_f32((u16)(rw & 0xFFFFu)));
                  v1 = __fadd_rn(v1, f16_to_f32((u16)(rw >> 16)));
                }
                v[2 * r] = v0;
                v[2 * r + 1] = v1;
              }
              if (F32) {
                // The compiled plans' f32 outputs: the same values before the f16 rounding, two
                // 16-byte stores per 8 columns.
                float4* yo = (float4*)((float*)y + rowoff + c0);
                yo[0] = make_float4(v[0], v[1], v[2], v[3]);
                yo[1] = make_float4(v[4], v[5], v[6], v[7]);
              } else {
                u32 o[4];
#pragma unroll
                for (int r = 0; r < 4; ++r) o[r] = (u32)f32_to_f16(v[2 * r]) | ((u32)f32_to_f16(v[2 * r + 1]) << 16);
                *(uint4*)((u16*)y + rowoff + c0) = make_uint4(o[0], o[1], o[2], o[3]);
              }
            }
          }
        return;
      }
      // Partial tile: guarded per 8-column group (N % 8 == 0: a group is wholly in or out).
#pragma unroll
      for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int m = m0 + cg * (BM / 2) + mb * 64 + wq * 16 + g + 8 * h;
          if (m >= M) continue;
          const float sxm = sx[m];
#pragma unroll
          for (int jj = 0; jj < BN / 32; ++jj) {
            const int n = n0 + 32 * jj + 8 * tig;
            if (n >= N) continue;
#pragma unroll
            for (int r = 0; r < 4; ++r)
              store_pair<F32>(y, acc[mb][4 * (4 * jj + r) + 2 * h] >> 8, acc[mb][4 * (4 * jj + r) + 2 * h + 1] >> 8, sxm,
                              sw, bias, residual, m, n + 2 * r, N);
          }
        }
    };

    int q = 0, seg = 0;
    for (int u = u0; u < u1;) {
      const int t = u / ktiles, kb = u - t * ktiles;
      const int ke = min(ktiles, u1 - t * ktiles), nk = ke - kb;
      const int mt = t / tiles_n;
      const int m0 = mt * BM, n0 = (t - mt * tiles_n) * BN;
      const bool contrib = SPLIT && kb > 0;                // k tail of a split tile: partials out
      const bool finish = SPLIT && !contrib && ke < ktiles;  // k head of a split tile: partials in
      // sw | bias | sx of this piece's tile into staging buffer `seg & 1` by cp.async (no registers
      // held over the main loop; zero past N / M and for a null bias).
      float* stg = stg_base + (seg & 1) * STG;
      ++seg;
      if (!contrib) {
        const int n = n0 + ct, mr = m0 + cg * (BM / 2) + ct;
        const bool nok = n < N;
        cp_async_4(stg + ct, sw + (nok ? n : 0), nok ? 4 : 0);
        cp_async_4(stg + BN + ct, hb && nok ? bias + n : sw, hb && nok ? 4 : 0);
        cp_async_4(stg + 2 * BN + ct, sx + (mr < M ? mr : 0), mr < M ? 4 : 0);
        cp_async_commit();
      }
      if (GA) {
        uint4 ra0[MB][2], ra1[MB][2];
        gload(m0, kb, ra0);
        if (nk > 1) gload(m0, kb + 1, ra1);
        // The first k tile peeled (write-only accumulators), then pairs (ra1, ra0).
        iteration_ga(q, true, ra0, m0, 2 < nk ? kb + 2 : -1);
        int i = 1;
        for (; i + 1 < nk; i += 2) {
          iteration_ga(q + i, false, ra1, m0, i + 2 < nk ? kb + i + 2 : -1);
          iteration_ga(q + i + 1, false, ra0, m0, i + 3 < nk ? kb + i + 3 : -1);
        }
        if (i < nk) iteration_ga(q + i, false, ra1, m0, -1);
      } else if (W0) {
        iteration_w0(q, true);
        for (int i = 1; i < nk; ++i) iteration_w0(q + i, false);
      } else {
        u32 af0[MB][4][4], af1[MB][4][4];
        int i = 0;
        for (; i + 1 < nk; i += 2) {
          iteration(q + i, i == 0, af0);
          iteration(q + i + 1, false, af1);
        }
        if (i < nk) iteration(q + i, i == 0, af0);
        wgmma_wait<0>();
        __syncwarp();
        if (lane == 0) mbar_arrive(empty8((q + nk - 1) % NB));
      }
#pragma unroll
      for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int i = 0; i < NACC; ++i) reg_fence(acc[mb][i]);
      u += nk;
      q += nk;

      if (SPLIT && contrib) {
        // Partial sums to slot (b - n_dp), thread-private order (16-byte stores, coalesced).
        int* wsp = ws + ((size_t)(b - n_dp) * 2 + cg) * (MB * NACC * 128);
#pragma unroll
        for (int mb = 0; mb < MB; ++mb)
#pragma unroll
          for (int i4 = 0; i4 < NACC / 4; ++i4)
            *(int4*)(wsp + ((mb * (NACC / 4) + i4) * 128 + ct) * 4) =
                make_int4(acc[mb][4 * i4], acc[mb][4 * i4 + 1], acc[mb][4 * i4 + 2], acc[mb][4 * i4 + 3]);
        __threadfence();
        asm volatile("bar.sync %0, 128;\n" ::"r"(3 + cg) : "memory");
        if (ct == 0) st_release_gpu(flags + (b - n_dp) * 2 + cg, 1u);
        continue;
      }
      epilogue_tile(m0, n0, stg, finish);
      if (!MULTI) break;  // one tile per CTA: no loop-carried state for the compiler
    }
  }
}
// Dynamic shared memory: 1024 (alignment) + STAGES * (GA ? BN * 64 : (BM + BN) * 64) + NB * BN * 128
// + 256 (barriers) + 2 x 2 x (2 * BN + BM / 2) floats (device.rs GemmVariant::shared_bytes). Grid: 1-D,
// n_dp + g_sk CTAs (without SK: one per tile, n_dp = tiles). `x`: the int4 activations (GA), `ws` /
// `flags`: the stream-K workspace (SK): g_sk x 2 x BM/2 x BN int32 partials, g_sk x 2 u32 flags
// (zero at the first launch; each launch leaves them zero).
#define QCC_WS2_F(NAME, BM, BN, STAGES, NB, GA, SK, W0, UP, PR, F32)                                  \
  extern "C" __global__ void __launch_bounds__(384, 1)                                                 \
      NAME(const __grid_constant__ TmaDesc tw, const __grid_constant__ TmaDesc tx, const float* sw,    \
           const float* sx, const float* bias, const u16* residual, void* y, int M, int N, int K,      \
           const u32* x, int n_dp, int g_sk, int* ws, u32* flags) {                                    \
    w4a4_ws2_body<BM, BN, STAGES, NB, GA, SK, W0, UP, PR, F32>(&tw, &tx, sw, sx, bias, residual, y, M, N, K, x, n_dp, \
                                                   g_sk, ws, flags);                                   \
  }
#define QCC_WS2(NAME, BM, BN, STAGES, NB, GA, SK, W0, UP, PR) QCC_WS2_F(NAME, BM, BN, STAGES, NB, GA, SK, W0, UP, PR, false)
// (NAME, BM, BN, STAGES, NB, GA, SK, W0, UP, PR); device.rs GemmVariant::ALL lists them (GemmKind::Ws2).
// SK: 0 one tile per CTA, 1 stream-K, 2 persistent whole tiles.
// `w`: W0 on the TMA A path (GA implies it). The SK TMA variants need W0: with two A register sets
// ptxas 13.0 serialises their wgmmas (C7512). `k`: stream-K for the last waves (device.rs
// StreamK::Tail), `s`: for all tiles (StreamK::All, n_dp = 0: a persistent grid); same kernel code.
// `p`: UP (the unpack reads the next tile before its proxy fence). `t` (SK = 2): persistent, whole
// tiles (device.rs StreamK::Tiles); with two A register sets ptxas 13.0 serialises it (C7512), so W0.
// `r` (PR): weight rows permuted at pack time (pack.rs permute_rows32, rows padded to 32; same int4
// bytes), so the unpack is `_b4_e`'s (thread tid: staging row tid -> B row tid).
QCC_WS2(w4a4_ws_256x128_s6_b4_c, 256, 128, 6, 4, false, 0, false, false, false)
// f32 outputs (the `int_linear`s of compiled w4a4 plans at prefill sizes): `_c` with y in f32.
QCC_WS2_F(w4a4_ws_256x128_s6_b4_c_f32, 256, 128, 6, 4, false, 0, false, false, false, true)
QCC_WS2(w4a4_ws_256x128_s6_b4_cp, 256, 128, 6, 4, false, 0, false, true, false)
QCC_WS2(w4a4_ws_256x128_s6_b4_cw, 256, 128, 6, 4, false, 0, true, false, false)
QCC_WS2(w4a4_ws_256x128_s6_b4_ckw, 256, 128, 6, 4, false, 1, true, false, false)
QCC_WS2(w4a4_ws_256x128_s6_b4_csw, 256, 128, 6, 4, false, 1, true, false, false)
QCC_WS2(w4a4_ws_256x128_s6_b4_cswp, 256, 128, 6, 4, false, 1, true, true, false)
QCC_WS2(w4a4_ws_256x128_s6_b4_ctwp, 256, 128, 6, 4, false, 2, true, true, false)
QCC_WS2(w4a4_ws_256x128_s6_b4_cpr, 256, 128, 6, 4, false, 0, false, true, true)
QCC_WS2(w4a4_ws_256x128_s6_b4_cswpr, 256, 128, 6, 4, false, 1, true, true, true)
QCC_WS2(w4a4_ws_256x128_s10_b5_ca, 256, 128, 10, 5, true, 0, true, false, false)
QCC_WS2(w4a4_ws_256x128_s12_b6_ca, 256, 128, 12, 6, true, 0, true, false, false)

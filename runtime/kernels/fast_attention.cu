// Fast kernels of the `attention` op that the CUDA executor launches instead of the micro-kernel
// (runtime/kernels/attention.cu; route in runtime/src/cuda/fast_attention.rs) with bit-identical
// outputs: every output element takes the micro-kernel's float operations in the same order.
//   score[t] = fmaf chain over d = 0..D-1 from 0.0f (q[d] * k[t][d]), __fmul_rn(., scale), then
//              __fadd_rn(., mask[s * T + t]) with a mask; keys after the row's last visible one are
//              -inf, i.e. take no part (exp(-inf - max) = 0 adds nothing to the sum);
//   max      = row max (order irrelevant), a non-finite max -> 0;
//   e[t]     = (float)exp((double)__fsub_rn(score, max)); sum = (float)(f64 sum of e);
//   p[t]     = __fdiv_rn(e, sum) when sum > 0;
//   out[d]   = fmaf chain over t = 0..last_visible from 0.0f (p[t] * v[t][d]), stored by X::put.
// Only the order of the f64 row sum may differ (it is rounded to f32 once): the decode kernel even
// keeps the micro-kernel's order (same thread striding and reduction tree).
//
// Everything else is parallel. Both kernels run 128 threads per block, one block per (tile of R
// query rows, query head, batch, slice of DVB output channels): grid [ceil(S / R), Hq, B * Dv / DVB].
// Keys and values pass through shared memory in tiles of TK rows (converted to f32), loaded once per
// block and shared by its R rows; the block's scores (R x T, f32) stay in shared memory between the
// two products. Score and output chains are register-tiled (a thread owns several rows / channels).
//   attention_fast_dec_{X}[_mask]_d{D}: R = 1, TK = 128, DVB = 32 (decode: S small; each row's
//       channels are split over Dv / 32 blocks, each recomputing the cheap scores, to fill the GPU);
//   attention_fast_pre_{X}[_mask]_d{D}: R = 8, TK = 64, DVB = Dv (prefill; row tiles launched in
//       decreasing order, heaviest causal rows first).
//   attention_fast_mid_{X}[_mask]_d{D}: R = 8, TK = 64, DVB = 32 (a few rows, or too few row tiles
//       and heads to fill the GPU: the prefill tiling with the decode kernel's channel split).
// D = Dv = 64 or 128. Dynamic shared memory: 4 * (R * (D + 4) + TK * (D + 4) + R * round_up(T, TK))
// bytes (`Kernel::smem_bytes` in runtime/src/cuda/fast_attention.rs). Layouts as the micro-kernel's: q [B, Hq, S, D],
// k [B, Hkv, T, D] and v [B, Hkv, T, Dv] at the strides of KvStrides, out [B, Hq, S, Dv], mask
// [S, T] of q's type; all rows of q, k, v and out 16-byte aligned (the route checks the base
// pointers and the strides).

#define FA_THREADS 128
#define FA_INF __int_as_float(0x7f800000)

// One 16-bit element as f32 (X::get without taking an address).
static __device__ __forceinline__ float fa_cvt(const T_f16*, u16 h) { return f16_to_f32(h); }
static __device__ __forceinline__ float fa_cvt(const T_bf16*, u16 h) { return bf16_to_f32(h); }

// Four consecutive elements as f32 (one 16-byte or 8-byte load).
template <class X>
static __device__ __forceinline__ float4 fa_load4(const typename X::S* p) {
  if constexpr (sizeof(typename X::S) == 4) {
    return *(const float4*)p;
  } else {
    const uint2 w = *(const uint2*)p;
    const X* x = nullptr;
    return make_float4(fa_cvt(x, (u16)(w.x & 0xffffu)), fa_cvt(x, (u16)(w.x >> 16)), fa_cvt(x, (u16)(w.y & 0xffffu)),
                       fa_cvt(x, (u16)(w.y >> 16)));
  }
}

// Block-wide max / f64 sum over FA_THREADS threads, in the micro-kernel's order (xor tree in each
// warp, then the warps in order).
static __device__ __forceinline__ float fa_block_max(float v, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = scratch[0];
  for (int w = 1; w < FA_THREADS / 32; ++w) r = fmaxf(r, scratch[w]);
  return r;
}
static __device__ __forceinline__ double fa_block_sum(double v, double* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  double r = scratch[0];
  for (int w = 1; w < FA_THREADS / 32; ++w) r += scratch[w];
  return r;
}

// One row's softmax by one warp, in place over its n visible scores: the max (a non-finite one -> 0),
// e = exp in f64 rounded to f32, their f64 sum by the warp's xor tree, p = e / sum when sum > 0
// (the prefill kernel's multi-row phase and attention_fast_psm).
static __device__ __forceinline__ void fa_warp_softmax(float* row, long n, int lane) {
  float m = -FA_INF;
  for (long t = lane; t < n; t += 32) m = fmaxf(m, row[t]);
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (!(m > -FA_INF && m < FA_INF)) m = 0.0f;
  double local = 0.0;
  for (long t = lane; t < n; t += 32) {
    float e = (float)exp((double)__fsub_rn(row[t], m));
    row[t] = e;
    local += (double)e;
  }
  for (int o = 16; o > 0; o >>= 1) local += __shfl_xor_sync(0xffffffffu, local, o);
  const float sum = (float)local;
  if (sum > 0.0f)
    for (long t = lane; t < n; t += 32) row[t] = __fdiv_rn(row[t], sum);
}

// Rows t0 .. t0 + ROWS - 1 (zeros from row n on) of COLS columns from column c0 of a row-major
// [*, ld] matrix into shared memory rows of `pitch` floats, as f32. f32 tiles are copied with
// cp.async (every 16-byte piece of the tile in flight at once, no registers: the decode kernel's
// 64 KiB key tiles were two register rounds); 16-bit ones through registers, up to 16 loads per
// thread before their stores.
template <class X, int ROWS, int COLS, int PITCH>
static __device__ __forceinline__ void fa_load_tile(float* dst, const typename X::S* __restrict__ src, long ld,
                                                    int c0, long t0, long n) {
  constexpr int PER = ROWS * COLS / 4 / FA_THREADS;
  constexpr int CHUNK = PER < 16 ? PER : 16;
  static_assert(PER * 4 * FA_THREADS == ROWS * COLS && PER % CHUNK == 0, "tile load");
  if constexpr (sizeof(typename X::S) == 4) {
#pragma unroll
    for (int u = 0; u < PER; ++u) {
      const int i = threadIdx.x + u * FA_THREADS;
      const int r = i / (COLS / 4), c = (i % (COLS / 4)) * 4;
      const long t = t0 + r;
      // Rows from n on: zero bytes read (a valid address all the same), the 16 bytes zero-filled.
      const float* from = (const float*)src + (t < n ? t * ld + c0 + c : 0);
      const unsigned to = (unsigned)__cvta_generic_to_shared(dst + r * PITCH + c);
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(to), "l"(from), "r"(t < n ? 16 : 0));
    }
    asm volatile("cp.async.commit_group;\n" ::);
    asm volatile("cp.async.wait_group 0;\n" ::);
    return;
  }
#pragma unroll 1
  for (int i0 = 0; i0 < PER; i0 += CHUNK) {
    float4 x[CHUNK];
#pragma unroll
    for (int u = 0; u < CHUNK; ++u) {
      const int i = threadIdx.x + (i0 + u) * FA_THREADS;
      const int r = i / (COLS / 4), c = (i % (COLS / 4)) * 4;
      const long t = t0 + r;
      x[u] = t < n ? fa_load4<X>(src + t * ld + c0 + c) : make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int u = 0; u < CHUNK; ++u) {
      const int i = threadIdx.x + (i0 + u) * FA_THREADS;
      const int r = i / (COLS / 4), c = (i % (COLS / 4)) * 4;
      *(float4*)(dst + r * PITCH + c) = x[u];
    }
  }
}

// GIVEN (decode, R = 1): the scores come from attention_fast_dsc_* in `given` ([B, Hq, T] f32, scaled
// and masked) and the block starts at the softmax.
template <class X, class O, bool MASK, int R, int TK, int D, int DVB, int CPT, bool GIVEN = false>
static __device__ __forceinline__ void fa_body(const typename X::S* __restrict__ q, const typename X::S* __restrict__ k,
                                               const typename X::S* __restrict__ v,
                                               const typename X::S* __restrict__ mask, O* __restrict__ out,
                                               long B, long Hq, long Hkv, long S, long T, long causal, float scale,
                                               const KvStrides& kv, const OutQuant& oq, long osh, long oss,
                                               const float* __restrict__ given = nullptr) {
  static_assert(!GIVEN || R == 1, "given scores are one row's");
  typedef typename X::S St;
  constexpr bool QUANT = !same_type<O, St>::value;
  constexpr int NT = FA_THREADS;
  constexpr int DV = D;
  // Score phase: TK key columns x RG row groups, RPT rows per thread.
  constexpr int RG = NT / TK;
  constexpr int RPT = R / RG;
  static_assert(RG * TK == NT && RPT * RG == R, "score tiling");
  // Output phase: CG channel groups of CPT channels x RG2 row groups, RPT2 rows per thread.
  constexpr int CG = DVB / CPT;
  constexpr int RG2 = (NT / CG) < R ? (NT / CG) : R;
  constexpr int RPT2 = R / RG2;
  static_assert(CG * CPT == DVB && RPT2 * RG2 == R && CG * RG2 <= NT && DV % DVB == 0, "output tiling");
  constexpr int NSPLIT = DV / DVB;
  constexpr int DP = D + 4;    // padded q / k row (conflict-free 16-byte reads by consecutive rows)
  constexpr int VP = DVB + 4;  // padded v row
  // Keys per value tile: with given scores the key tiles' space holds value tiles of 256 keys where
  // they fit (fewer round trips to memory for the one row), else TK.
  constexpr int TKV = GIVEN && 256 * VP <= TK * DP ? 256 : TK;

  extern __shared__ float4 fa_smem[];
  float* qs = (float*)fa_smem;  // [R][DP]
  float* tile = qs + R * DP;    // [TK][DP] keys, then [TK][VP] values
  float* sc = tile + TK * DP;   // [R][TP] scores, then probabilities
  __shared__ int nvis[R];
  __shared__ float fscratch[NT / 32];
  __shared__ double dscratch[NT / 32];

  const long TP = (T + TK - 1) / TK * TK;
  const long s0 = (long)(gridDim.x - 1 - blockIdx.x) * R;
  const long h = blockIdx.y;
  const long b = blockIdx.z / NSPLIT;
  const int dv0 = (int)(blockIdx.z % NSPLIT) * DVB;
  if (s0 >= S || h >= Hq || b >= B) return;
  const long hk = h / (Hq / Hkv);
  const St* kh = k + b * kv.kb + hk * kv.kh;
  const St* vh = v + b * kv.vb + hk * kv.vh;
  const int tid = threadIdx.x;

  // Keys each row sees: t <= last_visible and t < T (the micro-kernel's loop bound); 0 past S.
  if (tid < R) {
    long s = s0 + tid, n = 0;
    if (s < S) {
      long last = causal ? T - S + s : T - 1;
      n = last + 1 < T ? last + 1 : T;
      if (n < 0) n = 0;
    }
    nvis[tid] = (int)n;
  }
  if constexpr (GIVEN) {
    __syncthreads();
    const int n = nvis[0];
    for (int t = tid; t < n; t += NT) sc[t] = given[(b * Hq + h) * T + t];
  }
  for (int i = tid; i < R * D / 4 && !GIVEN; i += NT) {
    int r = i / (D / 4), c = (i % (D / 4)) * 4;
    long s = s0 + r;
    float4 x = s < S ? fa_load4<X>(q + ((b * Hq + h) * S + s) * D + c) : make_float4(0.f, 0.f, 0.f, 0.f);
    *(float4*)(qs + r * DP + c) = x;
  }
  __syncthreads();
  int nmax = 0;
#pragma unroll
  for (int r = 0; r < R; ++r) nmax = max(nmax, nvis[r]);

  // Scores: thread (kt, rg) computes key t0 + kt for rows rg * RPT + j.
  if constexpr (!GIVEN) {
    const int kt = tid % TK, rg = tid / TK;
    for (long t0 = 0; t0 < nmax; t0 += TK) {
      __syncthreads();
      fa_load_tile<X, TK, D, DP>(tile, kh, kv.kt, 0, t0, nmax);
      __syncthreads();
      const long t = t0 + kt;
      if (t >= nmax) continue;
      float acc[RPT];
#pragma unroll
      for (int j = 0; j < RPT; ++j) acc[j] = 0.0f;
      const float* kr = tile + kt * DP;
#pragma unroll(RPT == 1 ? 4 : 2)
      for (int d = 0; d < D; d += 4) {
        const float4 kv = *(const float4*)(kr + d);
#pragma unroll
        for (int j = 0; j < RPT; ++j) {
          const float4 qv = *(const float4*)(qs + (rg * RPT + j) * DP + d);
          acc[j] = fmaf(qv.x, kv.x, acc[j]);
          acc[j] = fmaf(qv.y, kv.y, acc[j]);
          acc[j] = fmaf(qv.z, kv.z, acc[j]);
          acc[j] = fmaf(qv.w, kv.w, acc[j]);
        }
      }
#pragma unroll
      for (int j = 0; j < RPT; ++j) {
        const int r = rg * RPT + j;
        if (t < nvis[r]) {
          float x = __fmul_rn(acc[j], scale);
          if (MASK) x = __fadd_rn(x, X::get(mask, (s0 + r) * T + t));
          sc[r * TP + t] = x;
        }
      }
    }
  }
  __syncthreads();

  // Softmax of each row over its visible keys (invisible ones are -inf: they change neither the
  // max nor the sum, and their p is 0 but never used).
  if (R == 1) {
    const int n = nvis[0];
    float m = -FA_INF;
    for (int t = tid; t < n; t += NT) m = fmaxf(m, sc[t]);
    m = fa_block_max(m, fscratch);
    if (!(m > -FA_INF && m < FA_INF)) m = 0.0f;
    double local = 0.0;
    for (int t = tid; t < n; t += NT) {
      float e = (float)exp((double)__fsub_rn(sc[t], m));
      sc[t] = e;
      local += (double)e;
    }
    const float sum = (float)fa_block_sum(local, dscratch);
    if (sum > 0.0f)
      for (int t = tid; t < n; t += NT) sc[t] = __fdiv_rn(sc[t], sum);
  } else {
    const int warp = tid / 32, lane = tid % 32;
    for (int r = warp; r < R; r += NT / 32) {
      fa_warp_softmax(sc + r * TP, nvis[r], lane);
    }
  }

  // out = p v: thread (cg, rg2) owns channels dv0 + cg * CPT + c of rows rg2 * RPT2 + j.
  const int cg = tid % CG, rg2 = tid / CG;
  const bool active = rg2 < RG2;
  float acc[RPT2][CPT];
  int mine[RPT2];
  int mine_min = 0x7fffffff;
#pragma unroll
  for (int j = 0; j < RPT2; ++j) {
    mine[j] = active ? nvis[rg2 * RPT2 + j] : 0;
    mine_min = min(mine_min, mine[j]);
#pragma unroll
    for (int c = 0; c < CPT; ++c) acc[j][c] = 0.0f;
  }
  for (long t0 = 0; t0 < nmax; t0 += TKV) {
    __syncthreads();
    fa_load_tile<X, TKV, DVB, VP>(tile, vh, kv.vt, dv0, t0, nmax);
    __syncthreads();
    if (!active) continue;
    const float* vc = tile + cg * CPT;
    if (t0 + TKV <= mine_min) {
      // Every row of this thread sees the whole tile: no per-key test.
#pragma unroll 2
      for (int tt = 0; tt < TKV; tt += 4) {
        float4 p[RPT2];
#pragma unroll
        for (int j = 0; j < RPT2; ++j) p[j] = *(const float4*)(sc + (rg2 * RPT2 + j) * TP + t0 + tt);
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          float vv[CPT];
          if constexpr (CPT == 4) {
            const float4 w = *(const float4*)(vc + (tt + u) * VP);
            vv[0] = w.x, vv[1] = w.y, vv[2] = w.z, vv[3] = w.w;
          } else {
#pragma unroll
            for (int c = 0; c < CPT; ++c) vv[c] = vc[(tt + u) * VP + c];
          }
#pragma unroll
          for (int j = 0; j < RPT2; ++j) {
            const float pj = u == 0 ? p[j].x : u == 1 ? p[j].y : u == 2 ? p[j].z : p[j].w;
#pragma unroll
            for (int c = 0; c < CPT; ++c) acc[j][c] = fmaf(pj, vv[c], acc[j][c]);
          }
        }
      }
    } else {
      const int tn = (int)(nmax - t0 < TKV ? nmax - t0 : TKV);
      for (int tt = 0; tt < tn; ++tt) {
        const long t = t0 + tt;
#pragma unroll
        for (int j = 0; j < RPT2; ++j) {
          if (t < mine[j]) {
            const float pj = sc[(rg2 * RPT2 + j) * TP + t];
#pragma unroll
            for (int c = 0; c < CPT; ++c) acc[j][c] = fmaf(pj, vc[tt * VP + c], acc[j][c]);
          }
        }
      }
    }
  }
  if (!active) return;
#pragma unroll
  for (int j = 0; j < RPT2; ++j) {
    const long s = s0 + rg2 * RPT2 + j;
    if (s >= S) continue;
    if constexpr (QUANT) {
      // Quantized in the epilogue (micro.rs `fused_quant`): steps per head and channel, element (b, h,
      // s, d) at b Hq S Dv + h osh + s oss + d (osh = Dv, oss = Hq Dv: the [B, S, Hq, Dv] order of
      // o_proj's input).
      const long c0 = dv0 + cg * CPT;
      O* orow = out + b * Hq * S * DV + h * osh + s * oss + c0;
#pragma unroll
      for (int c = 0; c < CPT; ++c) orow[c] = (O)oq.apply(acc[j][c], h * DV + c0 + c, s);
    } else {
      St* orow = out + ((b * Hq + h) * S + s) * DV + dv0 + cg * CPT;
#pragma unroll
      for (int c = 0; c < CPT; ++c) X::put(orow, c, acc[j][c]);
    }
  }
}

// Decode in two launches (one query row, S = 1: every key visible): attention_fast_dsc_* computes the
// scores of FA_THREADS keys per block, grid [ceil(T / FA_THREADS), Hq, B] (each key's K row read once,
// not once per channel split), into scores [B, Hq, T] f32, each the micro-kernel's FMA chain over d,
// times the scale, plus the mask (row 0); attention_fast_dout_* (fa_body with GIVEN) takes the softmax
// and p v from there, grid [1, Hq, B * Dv / 32]. Dynamic shared memory of the scores kernel:
// 4 * (D + 4) * (FA_THREADS + 1) bytes.
template <class X, bool MASK, int D>
static __device__ __forceinline__ void fa_dec_scores(const typename X::S* __restrict__ q,
                                                     const typename X::S* __restrict__ k,
                                                     const typename X::S* __restrict__ mask, float* __restrict__ scores,
                                                     long B, long Hq, long Hkv, long T, float scale,
                                                     const KvStrides& kv) {
  constexpr int TK = FA_THREADS;
  constexpr int DP = D + 4;
  extern __shared__ float4 fa_smem[];
  float* qs = (float*)fa_smem;  // [DP]
  float* tile = qs + DP;        // [TK][DP]
  const long t0 = (long)blockIdx.x * TK, h = blockIdx.y, b = blockIdx.z;
  if (t0 >= T || h >= Hq || b >= B) return;
  const long hk = h / (Hq / Hkv);
  for (int i = threadIdx.x; i < D / 4; i += FA_THREADS) *(float4*)(qs + 4 * i) = fa_load4<X>(q + (b * Hq + h) * D + 4 * i);
  fa_load_tile<X, TK, D, DP>(tile, k + b * kv.kb + hk * kv.kh, kv.kt, 0, t0, T);
  __syncthreads();
  const long t = t0 + threadIdx.x;
  if (t >= T) return;
  const float* kr = tile + threadIdx.x * DP;
  float acc = 0.0f;
#pragma unroll 4
  for (int d = 0; d < D; d += 4) {
    const float4 kv4 = *(const float4*)(kr + d);
    const float4 qv = *(const float4*)(qs + d);
    acc = fmaf(qv.x, kv4.x, acc);
    acc = fmaf(qv.y, kv4.y, acc);
    acc = fmaf(qv.z, kv4.z, acc);
    acc = fmaf(qv.w, kv4.w, acc);
  }
  float x = __fmul_rn(acc, scale);
  if (MASK) x = __fadd_rn(x, X::get(mask, t));
  scores[(b * Hq + h) * T + t] = x;
}

// Prefill in three launches, for many query rows (the route's `tiled` path; 4 B Hq S T bytes of
// scratch): the scores, their softmax and p v each as a register-tiled product over shared-memory
// tiles, so each K and V row is read once per 64 query rows instead of once per 8. Every value takes
// the micro-kernel's operations in its order, as in fa_body:
//   attention_fast_psc_{X}[_mask]_d{D}: grid [ceil(T / 64), ceil(S / 64), B Hq], tiles of 64 rows x 64
//       keys, a thread owning rows ty + 8 i (i < 8) and keys tx + 16 j (j < 4); the FMA chain over d,
//       times the scale, plus the mask, into scores [B, Hq, S, T] (only each row's visible keys).
//       Dynamic shared memory 4 * 128 * (D + 4) bytes.
//   attention_fast_psm: one warp per row of the scores, in place: max, e = exp(f64), f64 warp sum,
//       p = e / sum (the prefill kernel's multi-row softmax, the same tree). Grid [ceil(B Hq S / 4)].
//   attention_fast_ppv_{X}_d{D}[_q{O}]: grid [ceil(S / 64), 1, B Hq D / 64], 64 rows x 64 channels, a
//       thread owning rows rg + 8 i (i < 8) and channels 4 cg .. 4 cg + 3; the FMA chain over each
//       row's visible keys in order, tiles of 32 keys; the output (or its quantization) as fa_body's.
#define PT_ROWS 64
// Keys row s sees (t < n), as fa_body's nvis: all T, or causally up to T - S + s; none past S.
static __device__ __forceinline__ int pt_visible(long s, long S, long T, long causal) {
  if (s >= S) return 0;
  long n = causal ? T - S + s + 1 : T;
  n = n < T ? n : T;
  return n < 0 ? 0 : (int)n;
}
template <class X, bool MASK, int D>
static __device__ __forceinline__ void pt_scores(const typename X::S* __restrict__ q, const typename X::S* __restrict__ k,
                                                 const typename X::S* __restrict__ mask, float* __restrict__ scores,
                                                 long B, long Hq, long Hkv, long S, long T, long causal, float scale,
                                                 const KvStrides& kv) {
  constexpr int DP = D + 4;
  extern __shared__ float4 fa_smem[];
  float* qs = (float*)fa_smem;    // [64][DP]
  float* ks = qs + PT_ROWS * DP;  // [64][DP]
  const long t0 = (long)blockIdx.x * 64, s0 = (long)blockIdx.y * PT_ROWS, bh = blockIdx.z;
  if (s0 >= S || bh >= B * Hq) return;
  const long b = bh / Hq, h = bh % Hq, hk = h / (Hq / Hkv);
  // The tile's last row sees the most keys.
  const long last = s0 + PT_ROWS - 1 < S ? s0 + PT_ROWS - 1 : S - 1;
  const long nmax = pt_visible(last, S, T, causal);
  if (t0 >= nmax) return;
  fa_load_tile<X, PT_ROWS, D, DP>(qs, q + bh * S * D, D, 0, s0, S);
  fa_load_tile<X, 64, D, DP>(ks, k + b * kv.kb + hk * kv.kh, kv.kt, 0, t0, nmax);
  __syncthreads();
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[8][4];
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
#pragma unroll 2
  for (int d = 0; d < D; d += 4) {
    float4 kk[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) kk[j] = *(const float4*)(ks + (tx + 16 * j) * DP + d);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float4 qq = *(const float4*)(qs + (ty + 8 * i) * DP + d);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        acc[i][j] = fmaf(qq.x, kk[j].x, acc[i][j]);
        acc[i][j] = fmaf(qq.y, kk[j].y, acc[i][j]);
        acc[i][j] = fmaf(qq.z, kk[j].z, acc[i][j]);
        acc[i][j] = fmaf(qq.w, kk[j].w, acc[i][j]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const long s = s0 + ty + 8 * i;
    if (s >= S) continue;
    const long n = pt_visible(s, S, T, causal);
    float* row = scores + (bh * S + s) * T;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const long t = t0 + tx + 16 * j;
      if (t < n) {
        float x = __fmul_rn(acc[i][j], scale);
        if (MASK) x = __fadd_rn(x, X::get(mask, s * T + t));
        row[t] = x;
      }
    }
  }
}

extern "C" __global__ void __launch_bounds__(FA_THREADS) attention_fast_psm(float* scores, long rows, long S, long T,
                                                                            long causal) {
  const long r = (long)blockIdx.x * (FA_THREADS / 32) + threadIdx.x / 32;
  if (r >= rows) return;
  const int lane = threadIdx.x % 32;
  fa_warp_softmax(scores + r * T, pt_visible(r % S, S, T, causal), lane);
}

template <class X, class O, int D>
static __device__ __forceinline__ void pt_pv(const float* __restrict__ probs, const typename X::S* __restrict__ v,
                                             O* __restrict__ out, long B, long Hq, long Hkv, long S, long T,
                                             long causal, const KvStrides& kv, const OutQuant& oq, long osh, long oss) {
  typedef typename X::S St;
  constexpr bool QUANT = !same_type<O, St>::value;
  constexpr int DV = D, DVB = 64, TKV = 32, PP = TKV + 4, VP = DVB + 4, NSPLIT = DV / DVB;
  extern __shared__ float4 fa_smem[];
  float* ps = (float*)fa_smem;    // [64][PP] probabilities
  float* vs = ps + PT_ROWS * PP;  // [TKV][VP] values
  const long s0 = (long)(gridDim.x - 1 - blockIdx.x) * PT_ROWS;  // heaviest causal rows first
  const long bh = blockIdx.z / NSPLIT;
  const int dv0 = (int)(blockIdx.z % NSPLIT) * DVB;
  if (s0 >= S || bh >= B * Hq) return;
  const long b = bh / Hq, h = bh % Hq, hk = h / (Hq / Hkv);
  const St* vh = v + b * kv.vb + hk * kv.vh;
  const long last = s0 + PT_ROWS - 1 < S ? s0 + PT_ROWS - 1 : S - 1;
  const long nmax = pt_visible(last, S, T, causal);
  const int cg = threadIdx.x % 16, rg = threadIdx.x / 16;
  int mine[8];
  long mine_min = nmax;
  float acc[8][4];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    mine[i] = pt_visible(s0 + rg + 8 * i, S, T, causal);
    mine_min = mine[i] < mine_min ? mine[i] : mine_min;
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[i][c] = 0.0f;
  }
  for (long t0 = 0; t0 < nmax; t0 += TKV) {
    __syncthreads();
    for (int i = threadIdx.x; i < PT_ROWS * TKV; i += FA_THREADS) {
      const int r = i / TKV, c = i % TKV;
      const long s = s0 + r, t = t0 + c;
      ps[r * PP + c] = s < S && t < nmax ? probs[(bh * S + s) * T + t] : 0.0f;
    }
    fa_load_tile<X, TKV, DVB, VP>(vs, vh, kv.vt, dv0, t0, nmax);
    __syncthreads();
    const float* vc = vs + cg * 4;
    if (t0 + TKV <= mine_min) {
#pragma unroll 2
      for (int tt = 0; tt < TKV; tt += 4) {
        float4 p[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) p[i] = *(const float4*)(ps + (rg + 8 * i) * PP + tt);
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const float4 w = *(const float4*)(vc + (tt + u) * VP);
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            const float pi = u == 0 ? p[i].x : u == 1 ? p[i].y : u == 2 ? p[i].z : p[i].w;
            acc[i][0] = fmaf(pi, w.x, acc[i][0]);
            acc[i][1] = fmaf(pi, w.y, acc[i][1]);
            acc[i][2] = fmaf(pi, w.z, acc[i][2]);
            acc[i][3] = fmaf(pi, w.w, acc[i][3]);
          }
        }
      }
    } else {
      const int tn = (int)(nmax - t0 < TKV ? nmax - t0 : TKV);
      for (int tt = 0; tt < tn; ++tt) {
        const long t = t0 + tt;
        const float4 w = *(const float4*)(vc + tt * VP);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          if (t < mine[i]) {
            const float pi = ps[(rg + 8 * i) * PP + tt];
            acc[i][0] = fmaf(pi, w.x, acc[i][0]);
            acc[i][1] = fmaf(pi, w.y, acc[i][1]);
            acc[i][2] = fmaf(pi, w.z, acc[i][2]);
            acc[i][3] = fmaf(pi, w.w, acc[i][3]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const long s = s0 + rg + 8 * i;
    if (s >= S) continue;
    const long c0 = dv0 + cg * 4;
    if constexpr (QUANT) {
      O* orow = out + b * Hq * S * DV + h * osh + s * oss + c0;
#pragma unroll
      for (int c = 0; c < 4; ++c) orow[c] = (O)oq.apply(acc[i][c], h * DV + c0 + c, s);
    } else {
      St* orow = out + (bh * S + s) * DV + c0;
#pragma unroll
      for (int c = 0; c < 4; ++c) X::put(orow, c, acc[i][c]);
    }
  }
}

#define PT_ENTRIES(XN, D)                                                                                        \
  extern "C" __global__ void __launch_bounds__(FA_THREADS, 2) attention_fast_psc_##XN##_d##D(                         \
      const T_##XN::S* q, const T_##XN::S* k, const T_##XN::S* mask, float* scores, long B, long Hq, long Hkv,    \
      long S, long T, long causal, float scale, long kb, long kh, long kt) {                                     \
    pt_scores<T_##XN, false, D>(q, k, mask, scores, B, Hq, Hkv, S, T, causal, scale, KvStrides{kb, kh, kt, 0, 0, 0}); \
  }                                                                                                              \
  extern "C" __global__ void __launch_bounds__(FA_THREADS, 2) attention_fast_psc_##XN##_mask_d##D(                    \
      const T_##XN::S* q, const T_##XN::S* k, const T_##XN::S* mask, float* scores, long B, long Hq, long Hkv,    \
      long S, long T, long causal, float scale, long kb, long kh, long kt) {                                     \
    pt_scores<T_##XN, true, D>(q, k, mask, scores, B, Hq, Hkv, S, T, causal, scale, KvStrides{kb, kh, kt, 0, 0, 0}); \
  }                                                                                                              \
  extern "C" __global__ void __launch_bounds__(FA_THREADS, 2) attention_fast_ppv_##XN##_d##D(                         \
      const float* probs, const T_##XN::S* v, T_##XN::S* out, long B, long Hq, long Hkv, long S, long T,         \
      long causal, long vb, long vh, long vt) {                                                                  \
    pt_pv<T_##XN, T_##XN::S, D>(probs, v, out, B, Hq, Hkv, S, T, causal, KvStrides{0, 0, 0, vb, vh, vt},         \
                                OutQuant{}, 0, 0);                                                               \
  }
#define PT_QENTRY(D, ON, O)                                                                                      \
  extern "C" __global__ void __launch_bounds__(FA_THREADS, 2) attention_fast_ppv_f32_d##D##_q##ON(                    \
      const float* probs, const float* v, O* out, long B, long Hq, long Hkv, long S, long T, long causal, long vb, \
      long vh, long vt, const float* step, long seq, long past, long prefix, float lo, float hi, float plo,      \
      float phi, long osh, long oss) {                                                                           \
    pt_pv<T_f32, O, D>(probs, v, out, B, Hq, Hkv, S, T, causal, KvStrides{0, 0, 0, vb, vh, vt},                  \
                       OutQuant{step, seq, past, prefix, lo, hi, plo, phi}, osh, oss);                           \
  }
PT_ENTRIES(f32, 64) PT_ENTRIES(f32, 128)
PT_ENTRIES(f16, 64) PT_ENTRIES(f16, 128)
PT_ENTRIES(bf16, 64) PT_ENTRIES(bf16, 128)
PT_QENTRY(64, i16, short) PT_QENTRY(128, i16, short)
PT_QENTRY(64, i8, i8) PT_QENTRY(128, i8, i8)

#define FA_DSC_ENTRY(XN, MASK, MS, D)                                                                            \
  extern "C" __global__ void __launch_bounds__(FA_THREADS) attention_fast_dsc_##XN##MS##_d##D(                     \
      const T_##XN::S* q, const T_##XN::S* k, const T_##XN::S* mask, float* scores, long B, long Hq, long Hkv,    \
      long T, float scale, long kb, long kh, long kt) {                                                          \
    fa_dec_scores<T_##XN, MASK, D>(q, k, mask, scores, B, Hq, Hkv, T, scale, KvStrides{kb, kh, kt, 0, 0, 0});     \
  }
// attention_fast_dout_{X}_d{D}(scores, v, out, B, Hq, Hkv, T, vb, vh, vt) and the `_q{i16,i8}` forms
// of f32 (OutQuant's fields and the output strides appended, as the other quantized entries).
#define FA_DOUT_ENTRY(XN, D)                                                                                     \
  extern "C" __global__ void __launch_bounds__(FA_THREADS, 3) attention_fast_dout_##XN##_d##D(                     \
      const float* scores, const T_##XN::S* v, T_##XN::S* out, long B, long Hq, long Hkv, long T, long vb,        \
      long vh, long vt) {                                                                                        \
    fa_body<T_##XN, T_##XN::S, false, 1, 128, D, 32, 1, true>(nullptr, nullptr, v, nullptr, out, B, Hq, Hkv, 1, T, \
                                                              1, 0.0f, KvStrides{0, 0, 0, vb, vh, vt}, OutQuant{}, \
                                                              0, 0, scores);                                       \
  }
#define FA_DOUT_QENTRY(D, ON, O)                                                                                 \
  extern "C" __global__ void __launch_bounds__(FA_THREADS, 3) attention_fast_dout_f32_d##D##_q##ON(                \
      const float* scores, const float* v, O* out, long B, long Hq, long Hkv, long T, long vb, long vh, long vt,  \
      const float* step, long seq, long past, long prefix, float lo, float hi, float plo, float phi, long osh,   \
      long oss) {                                                                                                \
    fa_body<T_f32, O, false, 1, 128, D, 32, 1, true>(nullptr, nullptr, v, nullptr, out, B, Hq, Hkv, 1, T, 1, 0.0f, \
                                                     KvStrides{0, 0, 0, vb, vh, vt},                               \
                                                     OutQuant{step, seq, past, prefix, lo, hi, plo, phi}, osh, oss, \
                                                     scores);                                                      \
  }

#define FA_ENTRY(NAME, XN, MASK, R, TK, D, DVB, CPT)                                                             \
  extern "C" __global__ void __launch_bounds__(FA_THREADS, 3) NAME(                                                 \
      const T_##XN::S* q, const T_##XN::S* k, const T_##XN::S* v, const T_##XN::S* mask, T_##XN::S* out, long B, \
      long Hq, long Hkv, long S, long T, long causal, float scale, long kb, long kh, long kt, long vb, long vh,  \
      long vt) {                                                                                                 \
    fa_body<T_##XN, T_##XN::S, MASK, R, TK, D, DVB, CPT>(q, k, v, mask, out, B, Hq, Hkv, S, T, causal, scale,    \
                                                         KvStrides{kb, kh, kt, vb, vh, vt}, OutQuant{}, 0, 0);   \
  }
// Every entry takes (q, k, v, mask, out, B, Hq, Hkv, S, T, causal, scale, kb, kh, kt, vb, vh, vt):
// the K / V strides as the micro-kernel's (KvStrides, rows 16-byte aligned); mask is ignored (null)
// by the entries without `_mask`. The `_q{i16,i8}` entries (f32) store the output quantized and
// append OutQuant's fields and the output's head and row strides (osh, oss).
#define FA_QENTRY(NAME, MASK, R, TK, D, DVB, CPT, O)                                                             \
  extern "C" __global__ void __launch_bounds__(FA_THREADS, 3) NAME(                                                 \
      const float* q, const float* k, const float* v, const float* mask, O* out, long B, long Hq, long Hkv,      \
      long S, long T, long causal, float scale, long kb, long kh, long kt, long vb, long vh, long vt,            \
      const float* step, long seq, long past, long prefix, float lo, float hi, float plo, float phi, long osh,   \
      long oss) {                                                                                                \
    fa_body<T_f32, O, MASK, R, TK, D, DVB, CPT>(q, k, v, mask, out, B, Hq, Hkv, S, T, causal, scale,              \
                                                KvStrides{kb, kh, kt, vb, vh, vt},                                \
                                                OutQuant{step, seq, past, prefix, lo, hi, plo, phi}, osh, oss);   \
  }
#define FA_ENTRIES(XN, D)                                                                 \
  FA_DSC_ENTRY(XN, false, , D)                                                            \
  FA_DSC_ENTRY(XN, true, _mask, D)                                                        \
  FA_DOUT_ENTRY(XN, D)                                                                    \
  FA_ENTRY(attention_fast_dec_##XN##_d##D, XN, false, 1, 128, D, 32, 1)                   \
  FA_ENTRY(attention_fast_dec_##XN##_mask_d##D, XN, true, 1, 128, D, 32, 1)               \
  FA_ENTRY(attention_fast_pre_##XN##_d##D, XN, false, 8, 64, D, D, 4)                     \
  FA_ENTRY(attention_fast_pre_##XN##_mask_d##D, XN, true, 8, 64, D, D, 4)                 \
  FA_ENTRY(attention_fast_mid_##XN##_d##D, XN, false, 8, 64, D, 32, 1)                    \
  FA_ENTRY(attention_fast_mid_##XN##_mask_d##D, XN, true, 8, 64, D, 32, 1)
#define FA_QENTRIES(D, ON, O)                                                               \
  FA_DOUT_QENTRY(D, ON, O)                                                                  \
  FA_QENTRY(attention_fast_dec_f32_d##D##_q##ON, false, 1, 128, D, 32, 1, O)                \
  FA_QENTRY(attention_fast_dec_f32_mask_d##D##_q##ON, true, 1, 128, D, 32, 1, O)            \
  FA_QENTRY(attention_fast_pre_f32_d##D##_q##ON, false, 8, 64, D, D, 4, O)                  \
  FA_QENTRY(attention_fast_pre_f32_mask_d##D##_q##ON, true, 8, 64, D, D, 4, O)              \
  FA_QENTRY(attention_fast_mid_f32_d##D##_q##ON, false, 8, 64, D, 32, 1, O)                 \
  FA_QENTRY(attention_fast_mid_f32_mask_d##D##_q##ON, true, 8, 64, D, 32, 1, O)
FA_ENTRIES(f32, 64) FA_ENTRIES(f32, 128)
FA_ENTRIES(f16, 64) FA_ENTRIES(f16, 128)
FA_ENTRIES(bf16, 64) FA_ENTRIES(bf16, 128)
FA_QENTRIES(64, i16, short) FA_QENTRIES(128, i16, short)
FA_QENTRIES(64, i8, i8) FA_QENTRIES(128, i8, i8)

// Micro-kernel of the `hadamard` op as qcc's lowering launches it (compiler/src/lower/micro.rs):
// y = x H_n^T / sqrt(n) over rows of n elements, H_n = qcc_ir::hadamard::Hadamard::new(n) (any
// construction: Sylvester 2^k, Paley / Williamson / Kronecker sizes such as 1536 = 12 x 128, block-diagonal
// fallback). The runtime builds the n x n matrix of +-1/0 entries on the host and appends two
// arguments to the manifest's: its device pointer and the f64 scale 1/sqrt(block size) (1/sqrt(n)
// unless the fallback's blocks are smaller). Like the CPU executor (runtime/src/cpu/ops/fused.rs `hadamard`), the
// sums are taken in f64 and rounded once to the output type.
//
// Element access in f64 (D_*: read and written as f64, rounded once to the storage type).
// Geometry: grid [rows], 128 threads, dynamic shared memory 8 * n bytes (the row in f64).

QCC_DEVICE u16 f64_to_f16(double v) {
  u16 h;
  asm("cvt.rn.f16.f64 %0, %1;" : "=h"(h) : "d"(v));
  return h;
}
QCC_DEVICE u16 f64_to_bf16(double v) {
  u16 h;
  asm("cvt.rn.bf16.f64 %0, %1;" : "=h"(h) : "d"(v));
  return h;
}
struct D_f32 { typedef float S; static __device__ double get(const S* p, long i) { return p[i]; } static __device__ void put(S* p, long i, double v) { p[i] = __double2float_rn(v); } };
struct D_f16 { typedef u16 S; static __device__ double get(const S* p, long i) { return f16_to_f32(p[i]); } static __device__ void put(S* p, long i, double v) { p[i] = f64_to_f16(v); } };
struct D_bf16 { typedef u16 S; static __device__ double get(const S* p, long i) { return bf16_to_f32(p[i]); } static __device__ void put(S* p, long i, double v) { p[i] = f64_to_bf16(v); } };

// One output element: X's float rounding, or with a quantized output O (short, i8) the generated
// epilogue's quantization of that f32 value (common.cuh `OutQuant`).
template <class X, class O>
QCC_DEVICE void had_put(O* out, long idx, long channel, long pos, double v, const OutQuant& q) {
  if constexpr (same_type<O, typename X::S>::value) {
    X::put(out, idx, v);
  } else {
    out[idx] = (O)q.apply(__double2float_rn(v), channel, pos);
  }
}

// Element j of row r of the transform's input: x, or with SWIGLU (f32 only) swiglu(x, x2).
template <class X, bool SWIGLU>
QCC_DEVICE double had_get(const typename X::S* x, const typename X::S* x2, long i) {
  if constexpr (SWIGLU) {
    return swiglu_f32(x[i], x2[i]);
  } else {
    return X::get(x, i);
  }
}

template <class X, class O, bool SWIGLU>
__device__ void hadamard_impl(const typename X::S* x, const typename X::S* x2, O* out, long rows, long n,
                              const OutQuant& oq, const i8* h, double inv_sqrt) {
  extern __shared__ __align__(16) double row[];
  constexpr bool QUANT = !same_type<O, typename X::S>::value;
  for (long r = blockIdx.x; r < rows; r += gridDim.x) {
    const long pos = QUANT ? r % oq.seq : 0;
    __syncthreads();
    for (long j = threadIdx.x; j < n; j += blockDim.x) row[j] = had_get<X, SWIGLU>(x, x2, r * n + j);
    __syncthreads();
    for (long i = threadIdx.x; i < n; i += blockDim.x) {
      const i8* hi = h + i * n;
      double acc = 0.0;
      for (long j = 0; j < n; ++j) {
        int e = hi[j];
        if (e > 0) acc += row[j];
        else if (e < 0) acc -= row[j];
      }
      had_put<X, O>(out, r * n + i, i, pos, acc * inv_sqrt, oq);
    }
  }
}

// Entries: hadamard_{X}(x, out, rows, n, H, inv_sqrt); the fused forms of f32 (compiler/src/lower/
// micro.rs) hadamard_swiglu_f32(g, u, out, rows, n, H, inv_sqrt) (the transform of swiglu(g, u)) and
// hadamard_[swiglu_]f32_q{i16,i8}(x | g, u, out, rows, n, step, seq, past, prefix, lo, hi, plo, phi,
// H, inv_sqrt) (the output quantized, OutQuant's fields in that order).
#define HAD_ENTRY(XN)                                                                                    \
  extern "C" __global__ void __launch_bounds__(128) hadamard_##XN(const D_##XN::S* x, D_##XN::S* out,    \
                                                                  long rows, long n, const i8* h,         \
                                                                  double inv_sqrt) {                     \
    hadamard_impl<D_##XN, D_##XN::S, false>(x, nullptr, out, rows, n, OutQuant{}, h, inv_sqrt);          \
  }
HAD_ENTRY(f32) HAD_ENTRY(f16) HAD_ENTRY(bf16)
extern "C" __global__ void __launch_bounds__(128) hadamard_swiglu_f32(const float* g, const float* u, float* out,
                                                                      long rows, long n, const i8* h,
                                                                      double inv_sqrt) {
  hadamard_impl<D_f32, float, true>(g, u, out, rows, n, OutQuant{}, h, inv_sqrt);
}
#define HAD_Q_PARAMS const float *step, long seq, long past, long prefix, float lo, float hi, float plo, float phi
#define HAD_Q_FIELDS OutQuant { step, seq, past, prefix, lo, hi, plo, phi }
#define HAD_Q_ENTRY(ON, O)                                                                               \
  extern "C" __global__ void __launch_bounds__(128) hadamard_f32_q##ON(                                  \
      const float* x, O* out, long rows, long n, HAD_Q_PARAMS, const i8* h, double inv_sqrt) {           \
    hadamard_impl<D_f32, O, false>(x, nullptr, out, rows, n, HAD_Q_FIELDS, h, inv_sqrt);                 \
  }                                                                                                      \
  extern "C" __global__ void __launch_bounds__(128) hadamard_swiglu_f32_q##ON(                           \
      const float* g, const float* u, O* out, long rows, long n, HAD_Q_PARAMS, const i8* h,              \
      double inv_sqrt) {                                                                                 \
    hadamard_impl<D_f32, O, true>(g, u, out, rows, n, HAD_Q_FIELDS, h, inv_sqrt);                        \
  }
HAD_Q_ENTRY(i16, short) HAD_Q_ENTRY(i8, i8)

// ---- Fast form (runtime route for the `hadamard` launches, runtime/src/cuda/fast_linear.rs): the
// CPU's own algorithm and summation order (qcc_ir::hadamard::Hadamard::transform), so every output
// is bit-identical to the CPU executor's: per row, a fast Walsh-Hadamard transform of each of the m
// sub-rows of p = n / m values (butterflies a + b, a - b in f64, stages h = 1, 2, 4, ...), then the
// dense m x m factor (+-1 entries) across sub-rows, out[a][i] = 0 + sum over b in order of
// H[a][b] x[b][i] (added or subtracted: the same f64 result as the CPU's h * x with h = +-1), then
// x 1/sqrt(n), rounded once to the storage type.
// Grid [rows, splits]: block (r, s) loads the whole row r into shared memory, transforms it (each
// warp takes whole sub-rows in registers when 32 <= p <= 512) and writes its share of the outputs,
// sub-rows [s * a_per, (s + 1) * a_per) when m > 1 (a_per % 4 == 0), else elements. The dense factor comes as
// sign words: bit (a % 32) of signs[b * W + a / 32] is set when H[a][b] = -1 (W = ceil(m / 32)).
// Dynamic shared memory 8 * n + 4 * m * W bytes (the row in f64, then the sign words).

// Butterflies of one sub-row of 32 E values held by a warp, lane l holding elements l + 32 j:
// stages h < 32 pair lanes (shuffles), stages h >= 32 pair registers j and j + h / 32.
template <int E>
static __device__ __forceinline__ void wht_warp(double (&v)[E], int lane) {
#pragma unroll
  for (int h = 1; h < 32; h <<= 1) {
#pragma unroll
    for (int j = 0; j < E; ++j) {
      const double o = __shfl_xor_sync(0xffffffffu, v[j], h);
      v[j] = (lane & h) ? o - v[j] : v[j] + o;  // element i + h gets a - b, element i gets a + b
    }
  }
#pragma unroll
  for (int hj = 1; hj < E; hj <<= 1) {
#pragma unroll
    for (int j = 0; j < E; ++j) {
      if (!(j & hj)) {
        const double a = v[j], b = v[j + hj];
        v[j] = a + b;
        v[j + hj] = a - b;
      }
    }
  }
}

// Sub-rows of p = 32 E values, already in shared memory: warp w transforms sub-rows w U, ... in
// registers, U at a time (independent shuffle chains overlap; U = 4 for short sub-rows, whose rounds
// are mostly latency), and writes them back.
template <int E>
static __device__ __forceinline__ void wht_rows_warps(double* row, int m) {
  constexpr int U = E <= 2 ? 4 : 2;
  const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  for (int b0 = (threadIdx.x >> 5) * U; b0 < m; b0 += warps * U) {
    const int nb = min(U, m - b0);
    double v[U][E];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int j = 0; j < E; ++j) v[u][j] = u < nb ? row[(b0 + u) * 32 * E + 32 * j + lane] : 0.0;
#pragma unroll
    for (int u = 0; u < U; ++u) wht_warp<E>(v[u], lane);
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int j = 0; j < E; ++j)
        if (u < nb) row[(b0 + u) * 32 * E + 32 * j + lane] = v[u][j];
  }
}

template <class X, class O, bool SWIGLU>
__device__ void hadamard_fast_impl(const typename X::S* __restrict__ x, const typename X::S* __restrict__ x2,
                                   O* __restrict__ out, long n, int m, long p, const u32* __restrict__ signs,
                                   double scale, int a_per, const OutQuant& oq) {
  constexpr bool QUANT = !same_type<O, typename X::S>::value;
  extern __shared__ __align__(16) double row[];
  const long r = blockIdx.x;
  const long pos = QUANT ? r % oq.seq : 0;
  const int splits = gridDim.y, s = blockIdx.y;
  // 32-bit indices, and shifts for the power-of-two p: 64-bit divisions made this kernel ~5x slower.
  const int ni = (int)n, lp = __ffs((int)p) - 1, half = (int)(p >> 1);
  const int W = (m + 31) >> 5;
  u32* sg = (u32*)(row + ni);
  // Only the sign-word columns of this block's output sub-rows, loaded in batches (a decode block
  // needs one word per b: 172 of the 1032 words of H_172, and loads stored one by one waited on
  // memory one after another).
  const int a0 = s * a_per, a1 = min(m, a0 + a_per);
  if (m > 1) {
    const int w0 = a0 >> 5, wn = ((a1 - 1) >> 5) - w0 + 1, total = m * wn;
    for (int t0 = threadIdx.x; t0 < total; t0 += 8 * blockDim.x) {
      u32 v[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const int t = t0 + u * blockDim.x;
        v[u] = t < total ? signs[(t / wn) * W + w0 + t % wn] : 0u;
      }
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const int t = t0 + u * blockDim.x;
        if (t < total) sg[(t / wn) * W + w0 + t % wn] = v[u];
      }
    }
  }
  // The whole row into shared memory, in batches of loads written before their stores (the compiler
  // keeps a load after an earlier store to shared memory, and one load at a time waited ~40 times on
  // memory per row); rows not in 8-byte pieces take 8 elements per thread per batch.
  const typename X::S* xr = x + r * n;
  const typename X::S* xr2 = SWIGLU ? x2 + r * n : xr;
  constexpr int PER = 8 / (int)sizeof(typename X::S);
  // With SWIGLU two loads per piece (gate and up), half as many pieces per round.
  constexpr int L = SWIGLU ? 12 : 24;
  const int pieces = ni / PER;
  if (((((size_t)xr) | ((size_t)xr2)) & 7) == 0 && ni % PER == 0) {
    // 8-byte pieces, up to 24 per thread in flight (a whole 11008 f32 row in one round trip), each
    // stored as 16-byte f64 pairs: a warp's f32 stores fill whole shared-memory wavefronts.
    for (int w0 = threadIdx.x; w0 < pieces; w0 += L * blockDim.x) {
      uint2 v[L], v2[SWIGLU ? L : 1];
#pragma unroll
      for (int u = 0; u < L; ++u) {
        const int w = w0 + u * blockDim.x;
        v[u] = w < pieces ? ((const uint2*)xr)[w] : make_uint2(0, 0);
        if constexpr (SWIGLU) v2[u] = w < pieces ? ((const uint2*)xr2)[w] : make_uint2(0, 0);
      }
#pragma unroll
      for (int u = 0; u < L; ++u) {
        const int w = w0 + u * blockDim.x;
        if (w >= pieces) continue;
        if constexpr (SWIGLU) {
          const float2 g = *(const float2*)&v[u], up = *(const float2*)&v2[u];
          *(double2*)&row[w * PER] = make_double2(swiglu_f32(g.x, up.x), swiglu_f32(g.y, up.y));
        } else {
          const typename X::S* e = (const typename X::S*)&v[u];
#pragma unroll
          for (int t = 0; t < PER; t += 2)
            *(double2*)&row[w * PER + t] = make_double2(X::get(e, t), X::get(e, t + 1));
        }
      }
    }
  } else {
    for (int j0 = threadIdx.x; j0 < ni; j0 += 8 * blockDim.x) {
      double v[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const int j = j0 + u * blockDim.x;
        v[u] = j < ni ? had_get<X, SWIGLU>(xr, xr2, j) : 0.0;
      }
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const int j = j0 + u * blockDim.x;
        if (j < ni) row[j] = v[u];
      }
    }
  }
  __syncthreads();
  switch (p) {
    case 32: wht_rows_warps<1>(row, m); break;
    case 64: wht_rows_warps<2>(row, m); break;
    case 128: wht_rows_warps<4>(row, m); break;
    case 256: wht_rows_warps<8>(row, m); break;
    case 512: wht_rows_warps<16>(row, m); break;
    default:
      // Other sizes: one butterfly per thread per stage.
      for (int lh = 0; lh < lp; ++lh) {
        const int h = 1 << lh;
        for (int t = threadIdx.x; t < m * half; t += blockDim.x) {
          const int sub = t >> (lp - 1), w = t & (half - 1);
          const int i = (sub << lp) + ((w >> lh) << (lh + 1)) + (w & (h - 1));
          const double a = row[i], b = row[i + h];
          row[i] = a + b;
          row[i + h] = a - b;
        }
        __syncthreads();
      }
  }
  __syncthreads();
  if (m == 1) {
    const int per = (ni + splits - 1) / splits, e0 = s * per, e1 = min(ni, e0 + per);
    for (int e = e0 + threadIdx.x; e < e1; e += blockDim.x) had_put<X, O>(out, r * n + e, e, pos, row[e] * scale, oq);
    return;
  }
  // Dense factor. A block with at most one output per thread (a decode row split over blocks):
  // one chain per thread (the chain is the block's critical path; 4 per thread left 7 of 8 warps idle).
  if (((a1 - a0) << lp) <= (int)blockDim.x) {
    const int q = threadIdx.x;
    if (q < ((a1 - a0) << lp)) {
      const int i = q & ((1 << lp) - 1), a = a0 + (q >> lp);
      const u32* col = sg + (a >> 5);
      const int sh = a & 31;
      double acc = 0.0;
#pragma unroll 8
      for (int b = 0; b < m; ++b) {
        const double v = row[(b << lp) + i];
        acc += ((col[b * W] >> sh) & 1u) ? -v : v;
      }
      const long c = ((long)a << lp) + i;
      had_put<X, O>(out, r * n + c, c, pos, acc * scale, oq);
    }
    return;
  }
  // Else each thread owns column i of 4 consecutive output sub-rows (one sign word serves all 4:
  // a_per % 4 == 0), the x[b][i] read once for the 4 sums.
  const int tiles = (a1 - a0 + 3) >> 2;
  for (int q = threadIdx.x; q < tiles << lp; q += blockDim.x) {
    const int i = q & ((1 << lp) - 1), a = a0 + 4 * (q >> lp);
    const u32* col = sg + (a >> 5);
    const int sh = a & 31;
    double acc[4] = {0.0, 0.0, 0.0, 0.0};
#pragma unroll 4
    for (int b = 0; b < m; ++b) {
      const double v = row[(b << lp) + i];
      const u32 bits = col[b * W] >> sh;
#pragma unroll
      for (int t = 0; t < 4; ++t) acc[t] += ((bits >> t) & 1u) ? -v : v;
    }
#pragma unroll
    for (int t = 0; t < 4; ++t)
      if (a + t < a1) {
        const long c = ((long)(a + t) << lp) + i;
        had_put<X, O>(out, r * n + c, c, pos, acc[t] * scale, oq);
      }
  }
}

// 256 threads per block. Arguments (x, out, n, m, p, signs, scale, a_per); the fused f32 forms as the
// micro-kernel entries: `swiglu_` takes (g, u, out, ...), `_q{i16,i8}` appends OutQuant's fields.
#define HAD_FAST_PARAMS long n, int m, long p, const u32 *signs, double scale, int a_per
#define HAD_FAST_ARGS n, m, p, signs, scale, a_per
#define HAD_FAST_ENTRY(XN)                                                                                \
  extern "C" __global__ void __launch_bounds__(256)                                                      \
      hadamard_fast_##XN(const D_##XN::S* x, D_##XN::S* out, HAD_FAST_PARAMS) {                          \
    hadamard_fast_impl<D_##XN, D_##XN::S, false>(x, nullptr, out, HAD_FAST_ARGS, OutQuant{});             \
  }
HAD_FAST_ENTRY(f32) HAD_FAST_ENTRY(f16) HAD_FAST_ENTRY(bf16)
extern "C" __global__ void __launch_bounds__(256)
    hadamard_fast_swiglu_f32(const float* g, const float* u, float* out, HAD_FAST_PARAMS) {
  hadamard_fast_impl<D_f32, float, true>(g, u, out, HAD_FAST_ARGS, OutQuant{});
}
#define HAD_FAST_Q(ON, O)                                                                                 \
  extern "C" __global__ void __launch_bounds__(256)                                                      \
      hadamard_fast_f32_q##ON(const float* x, O* out, HAD_FAST_PARAMS, HAD_Q_PARAMS) {                    \
    hadamard_fast_impl<D_f32, O, false>(x, nullptr, out, HAD_FAST_ARGS, HAD_Q_FIELDS);                    \
  }                                                                                                       \
  extern "C" __global__ void __launch_bounds__(256)                                                      \
      hadamard_fast_swiglu_f32_q##ON(const float* g, const float* u, O* out, HAD_FAST_PARAMS, HAD_Q_PARAMS) { \
    hadamard_fast_impl<D_f32, O, true>(g, u, out, HAD_FAST_ARGS, HAD_Q_FIELDS);                           \
  }
HAD_FAST_Q(i16, short) HAD_FAST_Q(i8, i8)

// swiglu(g, u) of `count` elements into y, exactly as the fused loads compute it: the Hadamard route
// runs it first when a row's outputs are split over blocks (few rows: every block would otherwise
// recompute the whole row's swiglu), then the transform of y.
extern "C" __global__ void __launch_bounds__(256) swiglu_rows_f32(const float* g, const float* u, float* y, long count) {
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < count; i += (long)gridDim.x * blockDim.x)
    y[i] = swiglu_f32(g[i], u[i]);
}

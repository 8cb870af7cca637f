// Micro-kernel of the `hadamard` op as qcc's lowering launches it (compiler/src/lower/micro.rs):
// y = x H_n^T / sqrt(n) over rows of n elements, H_n = qcc_ir::hadamard::Hadamard::new(n) (any
// construction: Sylvester 2^k, Paley / Kronecker sizes such as 1536 = 12 x 128, block-diagonal
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

template <class X>
__device__ void hadamard_impl(const typename X::S* x, typename X::S* out, long rows, long n, const i8* h,
                              double inv_sqrt) {
  extern __shared__ double row[];
  for (long r = blockIdx.x; r < rows; r += gridDim.x) {
    __syncthreads();
    for (long j = threadIdx.x; j < n; j += blockDim.x) row[j] = X::get(x, r * n + j);
    __syncthreads();
    for (long i = threadIdx.x; i < n; i += blockDim.x) {
      const i8* hi = h + i * n;
      double acc = 0.0;
      for (long j = 0; j < n; ++j) {
        int e = hi[j];
        if (e > 0) acc += row[j];
        else if (e < 0) acc -= row[j];
      }
      X::put(out, r * n + i, acc * inv_sqrt);
    }
  }
}

#define HAD_ENTRY(XN)                                                                                    \
  extern "C" __global__ void __launch_bounds__(128) hadamard_##XN(const D_##XN::S* x, D_##XN::S* out,    \
                                                                  long rows, long n, const i8* h,         \
                                                                  double inv_sqrt) {                     \
    hadamard_impl<D_##XN>(x, out, rows, n, h, inv_sqrt);                                                         \
  }
HAD_ENTRY(f32) HAD_ENTRY(f16) HAD_ENTRY(bf16)

// ---- Fast form (runtime route for the `hadamard` launches, runtime/src/cuda/fast_linear.rs): the
// CPU's own algorithm and summation order (qcc_ir::hadamard::Hadamard::transform), so every output
// is bit-identical to the CPU executor's: per row, a fast Walsh-Hadamard transform of each of the m
// sub-rows of p = n / m values (butterflies a + b, a - b in f64, stages h = 1, 2, 4, ...), then the
// dense m x m factor (+-1 entries) across sub-rows, out[a][i] = 0 + sum over b in order of
// H[a][b] x[b][i], then x 1/sqrt(n), rounded once to the storage type.
// Grid [rows, splits]: block (r, s) transforms row r (the butterflies are cheap, so each split
// redoes them) and writes its share of the outputs, sub-rows [s * m / splits, (s + 1) * m / splits)
// when m > 1, else elements. Dynamic shared memory 8 * n bytes.
template <class X>
__device__ void hadamard_fast_impl(const typename X::S* x, typename X::S* out, long n, int m, long p,
                                   const i8* dense, double scale) {
  extern __shared__ double row[];
  const long r = blockIdx.x;
  const int splits = gridDim.y, s = blockIdx.y;
  // 32-bit indices, and shifts for the power-of-two p: 64-bit divisions made this kernel ~5x slower.
  const int ni = (int)n, lp = __ffs((int)p) - 1, half = (int)(p >> 1);
  for (int j = threadIdx.x; j < ni; j += blockDim.x) row[j] = X::get(x, r * n + j);
  __syncthreads();
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
  if (m == 1) {
    const int per = (ni + splits - 1) / splits, e0 = s * per, e1 = min(ni, e0 + per);
    for (int e = e0 + threadIdx.x; e < e1; e += blockDim.x) X::put(out, r * n + e, row[e] * scale);
    return;
  }
  const int a0 = (int)((long)s * m / splits), a1 = (int)((long)(s + 1) * m / splits);
  for (int e = threadIdx.x; e < (a1 - a0) << lp; e += blockDim.x) {
    const int a = a0 + (e >> lp), i = e & ((1 << lp) - 1);
    const i8* ha = dense + (long)a * m;
    double acc = 0.0;
    for (int b = 0; b < m; ++b) acc += (double)ha[b] * row[(b << lp) + i];
    X::put(out, r * n + ((long)a << lp) + i, acc * scale);
  }
}

#define HAD_FAST_ENTRY(XN)                                                                                \
  extern "C" __global__ void __launch_bounds__(256) hadamard_fast_##XN(                                   \
      const D_##XN::S* x, D_##XN::S* out, long n, int m, long p, const i8* dense, double scale) {          \
    hadamard_fast_impl<D_##XN>(x, out, n, m, p, dense, scale);                                             \
  }
HAD_FAST_ENTRY(f32) HAD_FAST_ENTRY(f16) HAD_FAST_ENTRY(bf16)

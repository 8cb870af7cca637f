// Micro-kernel of the `attention` op as qcc's lowering launches it (compiler/src/lower/micro.rs):
// softmax(q k^T * scale + mask) v per head, grouped-query (query head h reads KV head h / (Hq/Hkv)),
// causal masking counted from the end (key t visible for query s iff t <= T - S + s), computed in
// f32 like the CPU executor (runtime/src/cpu/ops/fused.rs `attention`): scores, row max, exp(x - max)
// and the row sum in f64 (rounded to f32), p = e / sum, then out = p v. Output in q's float type, or
// quantized by the `_q` entries below.
//
// Geometry: grid [S, Hq, B], 128 threads, dynamic shared memory 4 * T_max bytes (the score row).
// Layouts: q [B, Hq, S, D], out [B, Hq, S, Dv], mask [S, T] f32 contiguous; k [B, Hkv, T, D] and
// v [B, Hkv, T, Dv] with rows of contiguous channels at the batch, head and row strides kb, kh, kt
// (vb, vh, vt) the entries take after `scale`: contiguous ones, or a KV cache kept with its key
// positions outermost ([T, B, Hkv, D], compiler/src/lower/mod.rs `resident_cache`).


#define ATT_THREADS 128
#define QCC_INF __int_as_float(0x7f800000)

// Block-wide reduction (max or sum) over ATT_THREADS threads.
template <bool MAX>
__device__ float block_reduce(float v, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) {
    float other = __shfl_xor_sync(0xffffffffu, v, o);
    v = MAX ? fmaxf(v, other) : v + other;
  }
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = scratch[0];
  for (int w = 1; w < ATT_THREADS / 32; ++w) r = MAX ? fmaxf(r, scratch[w]) : r + scratch[w];
  return r;
}

// Block-wide f64 sum over ATT_THREADS threads.
__device__ double block_sum_f64(double v, double* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  double r = scratch[0];
  for (int w = 1; w < ATT_THREADS / 32; ++w) r += scratch[w];
  return r;
}

template <class X, class O, bool MASK>
__device__ void attention_impl(const typename X::S* q, const typename X::S* k, const typename X::S* v,
                               const typename X::S* mask, O* out, long B, long Hq, long Hkv, long S, long T, long D,
                               long Dv, long causal, float scale, const KvStrides& kv, const OutQuant& oq, long osh,
                               long oss) {
  constexpr bool QUANT = !same_type<O, typename X::S>::value;
  extern __shared__ float scores[];
  __shared__ float scratch[ATT_THREADS / 32];
  __shared__ double dscratch[ATT_THREADS / 32];
  long s = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  if (s >= S || h >= Hq || b >= B) return;
  long hk = h / (Hq / Hkv);
  const typename X::S* qrow = q + ((b * Hq + h) * S + s) * D;
  const typename X::S* kh = k + b * kv.kb + hk * kv.kh;
  const typename X::S* vh = v + b * kv.vb + hk * kv.vh;
  const long kt = kv.kt, vt = kv.vt;
  long last_visible = causal ? T - S + s : T - 1;
  float local_max = -QCC_INF;
  for (long t = threadIdx.x; t < T; t += ATT_THREADS) {
    float x;
    if (t > last_visible) {
      x = -QCC_INF;
    } else {
      float dot = 0.0f;
      for (long d = 0; d < D; ++d) dot = fmaf(X::get(qrow, d), X::get(kh, t * kt + d), dot);
      x = __fmul_rn(dot, scale);
      if (MASK) x = __fadd_rn(x, X::get(mask, s * T + t));
    }
    scores[t] = x;
    local_max = fmaxf(local_max, x);
  }
  float row_max = block_reduce<true>(local_max, scratch);
  if (!(row_max > -QCC_INF && row_max < QCC_INF)) row_max = 0.0f;
  // exp and the row sum in f64, rounded once to f32: independent of the math library and of the
  // summation order (the CPU sums sequentially, this kernel as a tree), so both sides agree bit for bit.
  double local_sum = 0.0;
  for (long t = threadIdx.x; t < T; t += ATT_THREADS) {
    float e = (float)exp((double)__fsub_rn(scores[t], row_max));
    scores[t] = e;
    local_sum += (double)e;
  }
  float sum = (float)block_sum_f64(local_sum, dscratch);
  __syncthreads();
  for (long t = threadIdx.x; t < T; t += ATT_THREADS)
    if (sum > 0.0f) scores[t] = __fdiv_rn(scores[t], sum);
  __syncthreads();
  const long orow = QUANT ? b * Hq * S * Dv + h * osh + s * oss : ((b * Hq + h) * S + s) * Dv;
  for (long d = threadIdx.x; d < Dv; d += ATT_THREADS) {
    float acc = 0.0f;
    for (long t = 0; t <= last_visible && t < T; ++t) acc = fmaf(scores[t], X::get(vh, t * vt + d), acc);
    if constexpr (QUANT) {
      out[orow + d] = (O)oq.apply(acc, h * Dv + d, s);
    } else {
      X::put(out + orow, d, acc);
    }
  }
}

#define ATT_KV long kb, long kh, long kt, long vb, long vh, long vt
#define ATT_ENTRY(XN)                                                                                    \
  extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_##XN(                              \
      const T_##XN::S* q, const T_##XN::S* k, const T_##XN::S* v, T_##XN::S* out, long B, long Hq,      \
      long Hkv, long S, long T, long D, long Dv, long causal, float scale, ATT_KV) {                     \
    attention_impl<T_##XN, T_##XN::S, false>(q, k, v, nullptr, out, B, Hq, Hkv, S, T, D, Dv, causal,    \
                                             scale, KvStrides{kb, kh, kt, vb, vh, vt}, OutQuant{}, 0, 0);         \
  }                                                                                                      \
  extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_##XN##_mask(                       \
      const T_##XN::S* q, const T_##XN::S* k, const T_##XN::S* v, const T_##XN::S* mask, T_##XN::S* out, \
      long B, long Hq, long Hkv, long S, long T, long D, long Dv, long causal, float scale, ATT_KV) {    \
    attention_impl<T_##XN, T_##XN::S, true>(q, k, v, mask, out, B, Hq, Hkv, S, T, D, Dv, causal, scale,  \
                                            KvStrides{kb, kh, kt, vb, vh, vt}, OutQuant{}, 0, 0);                 \
  }
ATT_ENTRY(f32) ATT_ENTRY(f16) ATT_ENTRY(bf16)

// Quantized output (compiler/src/lower/micro.rs `fused_quant`, f32): attention_f32[_mask]_q{i16,i8}
// take the float entry's arguments (with the K / V strides), then OutQuant's fields (steps per head and channel: h Dv + d;
// positions along S) and the output's head and row strides: element (b, h, s, d) at
// b Hq S Dv + h osh + s oss + d (osh = Dv, oss = Hq Dv when o_proj reads it as [B, S, Hq, Dv]).
#define ATT_QPARAMS                                                                                      \
  long B, long Hq, long Hkv, long S, long T, long D, long Dv, long causal, float scale, ATT_KV,           \
      const float *step,                                                                                 \
      long seq, long past, long prefix, float lo, float hi, float plo, float phi, long osh, long oss
#define ATT_QENTRY(ON, O)                                                                                \
  extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_f32_q##ON(                         \
      const float* q, const float* k, const float* v, O* out, ATT_QPARAMS) {                             \
    attention_impl<T_f32, O, false>(q, k, v, nullptr, out, B, Hq, Hkv, S, T, D, Dv, causal, scale,       \
                                    KvStrides{kb, kh, kt, vb, vh, vt}, OutQuant{step, seq, past, prefix, lo, hi, plo, phi}, osh, oss);      \
  }                                                                                                      \
  extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_f32_mask_q##ON(                    \
      const float* q, const float* k, const float* v, const float* mask, O* out, ATT_QPARAMS) {          \
    attention_impl<T_f32, O, true>(q, k, v, mask, out, B, Hq, Hkv, S, T, D, Dv, causal, scale,           \
                                   KvStrides{kb, kh, kt, vb, vh, vt}, OutQuant{step, seq, past, prefix, lo, hi, plo, phi}, osh, oss);       \
  }
ATT_QENTRY(i16, short) ATT_QENTRY(i8, i8)

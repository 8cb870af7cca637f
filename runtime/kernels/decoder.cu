// Decoder kernels of the end-to-end decode benchmark (runtime/src/cuda/e2e.rs): a Llama-shaped
// decoder step built from the runtime's kernels, W4A4 (int4 GEMV) against fp16 (cuBLAS). Written
// simply (one block per row for the row-wise ones); each has a CPU reference check in e2e.rs.
//
// Layouts: activations f16 [M, D] row-major; the fused qkv output [M, 3D] is q | k | v, each [H][128];
// the fused gate-up output [M, 2F] is gate | up; KV cache per layer [M][H][Tmax][128] f16;
// int4 activations in the split-nibble layout of common.cuh ([M, D/8] u32) with one f32 scale per row.

// --- seeded random fill: value i is SplitMix64(seed)'s (i+1)-th output (pack.rs `SplitMix64`).
QCC_DEVICE u64 dec_splitmix(u64 seed, u64 i) {
  u64 z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
// Uniform in [lo, hi) as pack.rs `float_in`: lo + (hi - lo) * unit, each step rounded in f32.
QCC_DEVICE float dec_unit_float(u64 h, float lo, float hi) {
  const float unit = (float)(h >> 40) / 16777216.0f;
  return __fadd_rn(lo, __fmul_rn(__fsub_rn(hi, lo), unit));
}
extern "C" __global__ void fill_u32(u32* p, long long n, u64 seed) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
    p[i] = (u32)dec_splitmix(seed, (u64)i);
}
extern "C" __global__ void fill_f16(u16* p, long long n, u64 seed, float lo, float hi) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
    p[i] = f32_to_f16(dec_unit_float(dec_splitmix(seed, (u64)i), lo, hi));
}
extern "C" __global__ void fill_f32(float* p, long long n, u64 seed, float lo, float hi) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
    p[i] = dec_unit_float(dec_splitmix(seed, (u64)i), lo, hi);
}

// Block-wide sum or max (blockDim a multiple of 32, <= 1024); every thread gets the result.
template <bool MAX>
QCC_DEVICE float dec_block_reduce(float v, float* red) {
  for (int o = 16; o > 0; o >>= 1) {
    const float w = __shfl_xor_sync(0xffffffffu, v, o);
    v = MAX ? fmaxf(v, w) : v + w;
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  __syncthreads();  // red may still be read by a previous reduction; row writes become visible
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float r = red[0];
  for (int i = 1; i < nw; ++i) r = MAX ? fmaxf(r, red[i]) : r + red[i];
  return r;
}

// Eight values v[0..8) quantized with step s (q = clamp(rint(v / s), -8, 7)) and packed split-nibble:
// byte j holds q[j] (low nibble) and q[4 + j] (high nibble).
QCC_DEVICE u32 dec_pack8_int4(const float* v, float s) {
  u32 w = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int lo = max(-8, min(7, __float2int_rn(__fdiv_rn(v[j], s))));
    const int hi = max(-8, min(7, __float2int_rn(__fdiv_rn(v[4 + j], s))));
    w |= (u32)((lo & 15) | ((hi & 15) << 4)) << (8 * j);
  }
  return w;
}

// Symmetric per-row int4 quantization of row[0..D) (shared memory, D % 8 == 0): s = amax / 7,
// q = clamp(rint(v / s), -8, 7), packed split-nibble into q[D/8]; *sx = s.
QCC_DEVICE void dec_quant_pack_row(const float* row, int D, float amax, u32* q, float* sx) {
  const float s = fmaxf(amax, 1e-30f) / 7.0f;
  for (int g = threadIdx.x; g < D / 8; g += blockDim.x) {
    q[g] = dec_pack8_int4(row + 8 * g, s);
  }
  if (threadIdx.x == 0) *sx = s;
}

// y = x * rsqrt(mean(x^2) + eps) * gamma (gamma null: no norm, plain copy), then int4 quantization
// per row. Grid [M]; dynamic shared memory 4 * D bytes.
extern "C" __global__ void rmsnorm_quant_a4(const u16* x, const u16* gamma, float eps, u32* q, float* sx, int D) {
  extern __shared__ float row[];
  __shared__ float red[32];
  const int m = blockIdx.x;
  const u16* xr = x + (size_t)m * D;
  float ss = 0.f;
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    const float v = f16_to_f32(xr[i]);
    row[i] = v;
    ss += v * v;
  }
  float r = 1.f;
  if (gamma) r = rsqrtf(dec_block_reduce<false>(ss, red) / (float)D + eps);
  float amax = 0.f;
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    float v = row[i];
    if (gamma) v = v * r * f16_to_f32(gamma[i]);
    row[i] = v;
    amax = fmaxf(amax, fabsf(v));
  }
  amax = dec_block_reduce<true>(amax, red);
  dec_quant_pack_row(row, D, amax, q + (size_t)m * (D / 8), sx + m);
}

// y = f16(x * rsqrt(mean(x^2) + eps) * gamma). Grid [M].
extern "C" __global__ void rmsnorm_f16(const u16* x, const u16* gamma, float eps, u16* y, int D) {
  __shared__ float red[32];
  const int m = blockIdx.x;
  const u16* xr = x + (size_t)m * D;
  float ss = 0.f;
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    const float v = f16_to_f32(xr[i]);
    ss += v * v;
  }
  const float r = rsqrtf(dec_block_reduce<false>(ss, red) / (float)D + eps);
  for (int i = threadIdx.x; i < D; i += blockDim.x)
    y[(size_t)m * D + i] = f32_to_f16(f16_to_f32(xr[i]) * r * f16_to_f32(gamma[i]));
}

QCC_DEVICE float dec_silu(float g) { return g / (1.f + expf(-g)); }

// h = silu(gate) * up over gu [M, 2F]; then (had != 0) a Walsh-Hadamard transform on each aligned
// block of 256 (scaled 1/16: orthonormal; F % 256 == 0), then int4 quantization per row.
// Grid [M]; dynamic shared memory 4 * F bytes.
extern "C" __global__ void swiglu_quant_a4(const u16* gu, int F, int had, u32* q, float* sx) {
  extern __shared__ float row[];
  __shared__ float red[32];
  const int m = blockIdx.x;
  const u16* g = gu + (size_t)m * 2 * F;
  for (int i = threadIdx.x; i < F; i += blockDim.x) row[i] = dec_silu(f16_to_f32(g[i])) * f16_to_f32(g[F + i]);
  if (had) {
    for (int h = 1; h < 256; h <<= 1) {
      __syncthreads();
      for (int p = threadIdx.x; p < F / 2; p += blockDim.x) {
        const int i = (p / h) * 2 * h + (p % h), j = i + h;
        const float a = row[i], b = row[j];
        row[i] = a + b;
        row[j] = a - b;
      }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < F; i += blockDim.x) row[i] *= 0.0625f;
  }
  float amax = 0.f;
  for (int i = threadIdx.x; i < F; i += blockDim.x) amax = fmaxf(amax, fabsf(row[i]));
  amax = dec_block_reduce<true>(amax, red);
  dec_quant_pack_row(row, F, amax, q + (size_t)m * (F / 8), sx + m);
}

// y = f16(silu(gate) * up). Grid-stride over M * F.
extern "C" __global__ void swiglu_f16(const u16* gu, int M, int F, u16* y) {
  for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < (long long)M * F;
       t += (long long)gridDim.x * blockDim.x) {
    const long long m = t / F, i = t % F;
    const u16* g = gu + m * 2 * F;
    y[t] = f32_to_f16(dec_silu(f16_to_f32(g[i])) * f16_to_f32(g[F + i]));
  }
}

// Rotary embedding (rotate-half pairs (i, i + 64) of each 128-dim head, theta_i = pos * 10000^(-i/64))
// of q and k from qkv [M, 3D] at position pos; q goes to qout [M, D], k and v to the cache at pos.
// Grid [H, M], 64 threads.
extern "C" __global__ void rope_kv(const u16* qkv, int H, int pos, int Tmax, u16* qout, u16* kc, u16* vc) {
  const int h = blockIdx.x, m = blockIdx.y, i = threadIdx.x, D = H * 128;
  const u16* base = qkv + (size_t)m * 3 * D + h * 128;
  const float inv = powf(10000.f, -(float)i / 64.f);
  float s, c;
  sincosf((float)pos * inv, &s, &c);
  const float q0 = f16_to_f32(base[i]), q1 = f16_to_f32(base[i + 64]);
  const float k0 = f16_to_f32(base[D + i]), k1 = f16_to_f32(base[D + i + 64]);
  u16* qo = qout + (size_t)m * D + h * 128;
  qo[i] = f32_to_f16(q0 * c - q1 * s);
  qo[i + 64] = f32_to_f16(q1 * c + q0 * s);
  const size_t slot = (((size_t)m * H + h) * Tmax + pos) * 128;
  kc[slot + i] = f32_to_f16(k0 * c - k1 * s);
  kc[slot + i + 64] = f32_to_f16(k1 * c + k0 * s);
  vc[slot + i] = base[2 * D + i];
  vc[slot + i + 64] = base[2 * D + i + 64];
}

// Split-T decode attention, part 1: block (h, m, s) takes keys [64 s, 64 s + 64) of T and writes
// its unnormalized partial: part[((m H + h) S + s) * 130 + {0: local max, 1: local sum, 2..130: sum_j
// e_j v_j}]. 128 threads (4 warps); q scaled by `scale`.
#define ATT_CHUNK 64
extern "C" __global__ void __launch_bounds__(128)
    attn_decode_part(const u16* q, const u16* kc, const u16* vc, float* part, int H, int Tmax, int T, float scale) {
  __shared__ float p[ATT_CHUNK];
  __shared__ float red[32];
  __shared__ float acc2[2][128];
  const int h = blockIdx.x, m = blockIdx.y, s = blockIdx.z, S = gridDim.z;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int j0 = s * ATT_CHUNK, nk = min(ATT_CHUNK, T - j0);
  const size_t head = ((size_t)m * H + h) * Tmax * 128;
  const uint2 qv = *(const uint2*)(q + ((size_t)m * H + h) * 128 + 4 * lane);
  const float qf[4] = {f16_to_f32(qv.x & 0xFFFF) * scale, f16_to_f32(qv.x >> 16) * scale,
                       f16_to_f32(qv.y & 0xFFFF) * scale, f16_to_f32(qv.y >> 16) * scale};
  // Scores: warp w takes keys w, w + 4, ...; 16 keys' loads issued before the reductions.
  uint2 kv[16];
#pragma unroll
  for (int t = 0; t < 16; ++t) {
    const int j = warp + 4 * t;
    kv[t] = j < nk ? *(const uint2*)(kc + head + (size_t)(j0 + j) * 128 + 4 * lane) : make_uint2(0, 0);
  }
  float lmax = -__int_as_float(0x7f800000);
#pragma unroll
  for (int t = 0; t < 16; ++t) {
    const int j = warp + 4 * t;
    float d = qf[0] * f16_to_f32(kv[t].x & 0xFFFF) + qf[1] * f16_to_f32(kv[t].x >> 16) +
              qf[2] * f16_to_f32(kv[t].y & 0xFFFF) + qf[3] * f16_to_f32(kv[t].y >> 16);
    for (int o = 16; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
    if (j < nk) {
      if (lane == 0) p[j] = d;
      lmax = fmaxf(lmax, d);
    }
  }
  lmax = dec_block_reduce<true>(lmax, red);
  float e = 0.f;
  if (threadIdx.x < nk) {
    e = expf(p[threadIdx.x] - lmax);
    p[threadIdx.x] = e;
  }
  const float lsum = dec_block_reduce<false>(e, red);
  // p v: thread = dim pair dp (64) x key half kh (2).
  const int dp = threadIdx.x & 63, kh = threadIdx.x >> 6;
  float a0 = 0.f, a1 = 0.f;
#pragma unroll 8
  for (int j = kh; j < nk; j += 2) {
    const u32 v2 = *(const u32*)(vc + head + (size_t)(j0 + j) * 128 + 2 * dp);
    a0 += p[j] * f16_to_f32(v2 & 0xFFFF);
    a1 += p[j] * f16_to_f32(v2 >> 16);
  }
  acc2[kh][2 * dp] = a0;
  acc2[kh][2 * dp + 1] = a1;
  __syncthreads();
  float* out = part + (((size_t)m * H + h) * S + s) * 130;
  out[2 + threadIdx.x] = acc2[0][threadIdx.x] + acc2[1][threadIdx.x];
  if (threadIdx.x == 0) {
    out[0] = lmax;
    out[1] = lsum;
  }
}

// Part 2: out[m, h*128 + d] = f16(sum_s w_s acc_s[d] / sum_s w_s lsum_s), w_s = exp(max_s - max).
// Grid [H, M], 128 threads.
extern "C" __global__ void attn_decode_combine(const float* part, u16* out, int H, int S) {
  const int h = blockIdx.x, m = blockIdx.y, d = threadIdx.x;
  const float* pr = part + ((size_t)m * H + h) * S * 130;
  float gmax = -__int_as_float(0x7f800000);
  for (int s = 0; s < S; ++s) gmax = fmaxf(gmax, pr[s * 130]);
  float num = 0.f, den = 0.f;
  for (int s = 0; s < S; ++s) {
    const float w = expf(pr[s * 130] - gmax);
    den += w * pr[s * 130 + 1];
    num += w * pr[s * 130 + 2 + d];
  }
  out[(size_t)m * H * 128 + h * 128 + d] = f32_to_f16(num / den);
}

// --- Split (two-kernel) row quantization: the row is cut into 256-element slices handled by separate
// blocks (so one row keeps many SMs busy at batch 1); part kernels write per-slice partials, the pack
// kernel reduces the (few) partials of its row and quantizes 256 words (2048 values) per block.

// SwiGLU + 256-point Walsh-Hadamard (had != 0; 5 butterfly stages by warp shuffles, 3 through shared
// memory; scaled 1/16) of one slice: t[m, slice] (f32) and bmax[m, slice] = max |t|. Grid [F/256, M].
extern "C" __global__ void __launch_bounds__(256) swiglu_had_part(const u16* gu, int F, int had, float* t, float* bmax) {
  __shared__ float buf[256];
  __shared__ float red[32];
  const int m = blockIdx.y, i = blockIdx.x * 256 + threadIdx.x;
  const u16* g = gu + (size_t)m * 2 * F;
  float v = dec_silu(f16_to_f32(g[i])) * f16_to_f32(g[F + i]);
  if (had) {
    const int lane = threadIdx.x & 31;
    for (int h = 1; h < 32; h <<= 1) {
      const float o = __shfl_xor_sync(0xffffffffu, v, h);
      v = (lane & h) ? o - v : v + o;
    }
    for (int h = 32; h < 256; h <<= 1) {
      buf[threadIdx.x] = v;
      __syncthreads();
      const float o = buf[threadIdx.x ^ h];
      __syncthreads();
      v = (threadIdx.x & h) ? o - v : v + o;
    }
    v *= 0.0625f;
  }
  t[(size_t)m * F + i] = v;
  const float a = dec_block_reduce<true>(fabsf(v), red);
  if (threadIdx.x == 0) bmax[m * gridDim.x + blockIdx.x] = a;
}

// Quantizes rows of t [M, F] with amax = max of the row's nb slice maxima. Grid [ceil(F/2048), M].
extern "C" __global__ void __launch_bounds__(256) quant_pack_parts(const float* t, const float* bmax, int nb, int F,
                                                                   u32* q, float* sx) {
  const int m = blockIdx.y;
  float a = 0.f;
  for (int j = threadIdx.x & 31; j < nb; j += 32) a = fmaxf(a, bmax[m * nb + j]);
  for (int o = 16; o > 0; o >>= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o));
  const float s = fmaxf(a, 1e-30f) / 7.0f;
  const int gi = blockIdx.x * 256 + threadIdx.x;
  if (gi < F / 8) {
    const float* row = t + (size_t)m * F + 8 * gi;
    q[(size_t)m * (F / 8) + gi] = dec_pack8_int4(row, s);
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) sx[m] = s;
}

// RMSNorm partials of one 256-element slice: part[m, slice] = {sum x^2, max |x * gamma|} (gamma null:
// max |x|). Grid [ceil(D/256), M].
extern "C" __global__ void __launch_bounds__(256) rmsnorm_part(const u16* x, const u16* gamma, int D, float* part) {
  __shared__ float red[32];
  const int m = blockIdx.y, i = blockIdx.x * 256 + threadIdx.x;
  float v = 0.f, a = 0.f;
  if (i < D) {
    v = f16_to_f32(x[(size_t)m * D + i]);
    a = fabsf(gamma ? v * f16_to_f32(gamma[i]) : v);
  }
  const float ss = dec_block_reduce<false>(v * v, red);
  a = dec_block_reduce<true>(a, red);
  if (threadIdx.x == 0) {
    part[(m * gridDim.x + blockIdx.x) * 2] = ss;
    part[(m * gridDim.x + blockIdx.x) * 2 + 1] = a;
  }
}

// From the nb partials of row m: r = rsqrt(sum/D + eps) (gamma null: r = 1, no norm), amax = r * max,
// then q = quant(x * r * gamma). Grid [ceil(D/2048), M].
extern "C" __global__ void __launch_bounds__(256) rmsnorm_quant_parts(const u16* x, const u16* gamma, float eps, int D,
                                                                      const float* part, int nb, u32* q, float* sx) {
  const int m = blockIdx.y;
  float ss = 0.f, a = 0.f;
  for (int j = threadIdx.x & 31; j < nb; j += 32) {
    ss += part[(m * nb + j) * 2];
    a = fmaxf(a, part[(m * nb + j) * 2 + 1]);
  }
  for (int o = 16; o > 0; o >>= 1) {
    ss += __shfl_xor_sync(0xffffffffu, ss, o);
    a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o));
  }
  const float r = gamma ? rsqrtf(ss / (float)D + eps) : 1.f;
  const float s = fmaxf(a * r, 1e-30f) / 7.0f;
  const int gi = blockIdx.x * 256 + threadIdx.x;
  if (gi < D / 8) {
    const u16* xr = x + (size_t)m * D + 8 * gi;
    float v[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      v[j] = f16_to_f32(xr[j]);
      if (gamma) v[j] = v[j] * r * f16_to_f32(gamma[8 * gi + j]);
    }
    q[(size_t)m * (D / 8) + gi] = dec_pack8_int4(v, s);
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) sx[m] = s;
}

// --- prefill (a whole sequence at once; src/cuda/e2e.rs `Model::prefill`).
// Rotary in place on the q and k parts of the fused qkv [T, 3D], position = token index. Grid [H, T],
// 64 threads.
extern "C" __global__ void rope_prefill(u16* qkv, int H) {
  const int h = blockIdx.x, m = blockIdx.y, i = threadIdx.x, D = H * 128;
  u16* base = qkv + (size_t)m * 3 * D + h * 128;
  const float inv = powf(10000.f, -(float)i / 64.f);
  float s, c;
  sincosf((float)m * inv, &s, &c);
#pragma unroll
  for (int part = 0; part < 2; ++part) {
    u16* p = base + part * D;
    const float a = f16_to_f32(p[i]), b = f16_to_f32(p[i + 64]);
    p[i] = f32_to_f16(a * c - b * s);
    p[i + 64] = f32_to_f16(b * c + a * s);
  }
}

// Causal softmax in place over the rows of scores S [H * T, T] f16 (row r is query i = r % T; keys
// j <= i kept, j > i set to 0), f32 arithmetic. Grid [H * T], 256 threads.
extern "C" __global__ void __launch_bounds__(256) softmax_causal_f16(u16* s, int T) {
  __shared__ float red[32];
  const long long r = blockIdx.x;
  const int i = (int)(r % T);
  u16* row = s + r * T;
  float mx = -3.0e38f;
  for (int j = threadIdx.x; j <= i; j += blockDim.x) mx = fmaxf(mx, f16_to_f32(row[j]));
  mx = dec_block_reduce<true>(mx, red);
  float sum = 0.f;
  for (int j = threadIdx.x; j <= i; j += blockDim.x) sum += __expf(f16_to_f32(row[j]) - mx);
  sum = dec_block_reduce<false>(sum, red);
  const float inv = 1.0f / sum;
  for (int j = threadIdx.x; j < T; j += blockDim.x)
    row[j] = j <= i ? f32_to_f16(__expf(f16_to_f32(row[j]) - mx) * inv) : (u16)0;
}

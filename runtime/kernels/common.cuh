// Shared prelude of qcc's CUDA kernels. The runtime prepends this file to every kernels/*.cu before
// NVRTC compiles it (NVRTC gets no include path: the kernels use no CUDA headers at all).
//
// Integer layout used by every W4 kernel ("split-nibble groups", see runtime/src/cuda/pack.rs):
// int4 values are stored in groups of 8 consecutive k as one 32-bit word whose byte j (j = 0..3)
// holds k = 8g + j in its low nibble and k = 8g + 4 + j in its high nibble (two's complement).
// Then `(w << 4) & 0xF0F0F0F0` is four int8 lanes 16*q[k..k+4] and `w & 0xF0F0F0F0` is
// 16*q[k+4..k+8], both in plain k order: one shift and two ANDs unpack 8 values for dp4a / MMA,
// at the price of an exact factor 16 per int4 operand that the epilogue removes with a shift.
#pragma once

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;
typedef signed char i8;

#define QCC_DEVICE static __device__ __forceinline__

QCC_DEVICE u32 lo_nibbles_x16(u32 w) { return (w << 4) & 0xF0F0F0F0u; }
QCC_DEVICE u32 hi_nibbles_x16(u32 w) { return w & 0xF0F0F0F0u; }

// f32 -> f16 (round to nearest even) and back, without cuda_fp16.h.
QCC_DEVICE u16 f32_to_f16(float v) {
  u16 h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
  return h;
}
QCC_DEVICE float f16_to_f32(u16 h) {
  float v;
  asm("cvt.f32.f16 %0, %1;" : "=f"(v) : "h"(h));
  return v;
}

// D += A * B on int8 tensor cores, m16n8k32, int32 accumulation (exact: no saturation needed,
// the callers keep |sum| < 2^31).
QCC_DEVICE void mma_s8_16832(int (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Sums the accumulators of the KSPLIT warps that split one tile's K into warp 0's (through
// `partial`, shared memory); false for the other warps, which are then done.
template <int KSPLIT>
QCC_DEVICE bool ksplit_sum(int (&partial)[KSPLIT][32][4], int (&acc)[4], int warp, int lane) {
#pragma unroll
  for (int i = 0; i < 4; ++i) partial[warp][lane][i] = acc[i];
  __syncthreads();
  if (warp != 0) return false;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    int s = 0;
#pragma unroll
    for (int q = 0; q < KSPLIT; ++q) s += partial[q][lane][i];
    acc[i] = s;
  }
  return true;
}

// Streaming 16-byte global load that bypasses L1 allocation (weights are read exactly once).
QCC_DEVICE uint4 ld_stream_u4(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}
// Cached 16-byte load (activations: small, re-read by every warp).
QCC_DEVICE uint4 ld_cached_u4(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Asynchronous global -> shared 16-byte copy; src_bytes = 0 zero-fills (out-of-range tiles).
QCC_DEVICE void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  u32 s = (u32)__cvta_generic_to_shared(smem);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
QCC_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
QCC_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// The shared epilogue: y = f16(((float(acc) * sx[m]) * sw[n] + bias[n]) + residual[m, n]), each
// step rounded in f32 in exactly this order (no FMA contraction: __fmul_rn / __fadd_rn), so the CPU
// reference reproduces every output bit. bias (f32 [N]) and residual (f16 [M, N]) may be null.
QCC_DEVICE float epilogue_f32(int acc, float sx, float sw, const float* bias, const u16* residual, int m,
                              int n, int ldn) {
  float v = __fmul_rn(__fmul_rn((float)acc, sx), sw);
  if (bias) v = __fadd_rn(v, bias[n]);
  if (residual) v = __fadd_rn(v, f16_to_f32(residual[(size_t)m * ldn + n]));
  return v;
}
QCC_DEVICE u16 epilogue(int acc, float sx, float sw, const float* bias, const u16* residual, int m,
                        int n, int ldn) {
  return f32_to_f16(epilogue_f32(acc, sx, sw, bias, residual, m, n, ldn));
}
// Stores the epilogue of two adjacent columns n, n + 1 of row m: f16 (one 32-bit store) or, with
// F32 (the f32 outputs of compiled artifacts' `int_linear`), f32 without the final f16 rounding.
template <bool F32>
QCC_DEVICE void store_pair(void* y, int acc0, int acc1, float sx, const float* sw, const float* bias,
                           const u16* residual, int m, int n, int ldn) {
  const float v0 = epilogue_f32(acc0, sx, sw[n], bias, residual, m, n, ldn);
  const float v1 = epilogue_f32(acc1, sx, sw[n + 1], bias, residual, m, n + 1, ldn);
  if (F32) {
    *(float2*)((float*)y + (size_t)m * ldn + n) = make_float2(v0, v1);
  } else {
    *(u32*)((u16*)y + (size_t)m * ldn + n) = (u32)f32_to_f16(v0) | ((u32)f32_to_f16(v1) << 16);
  }
}

// bf16 conversions and float element access by qcc dtype name (T_f32/T_f16/T_bf16: a storage type S
// read and written as f32), shared by the micro-kernels.
QCC_DEVICE float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }
QCC_DEVICE u16 f32_to_bf16(float v) {
  u16 h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
  return h;
}
struct T_f32 { typedef float S; static __device__ float get(const S* p, long i) { return p[i]; } static __device__ void put(S* p, long i, float v) { p[i] = v; } };
struct T_f16 { typedef u16 S; static __device__ float get(const S* p, long i) { return f16_to_f32(p[i]); } static __device__ void put(S* p, long i, float v) { p[i] = f32_to_f16(v); } };
struct T_bf16 { typedef u16 S; static __device__ float get(const S* p, long i) { return bf16_to_f32(p[i]); } static __device__ void put(S* p, long i, float v) { p[i] = f32_to_bf16(v); } };

// Element strides of an attention's keys and values: key t of batch b and KV head h starts at
// b kb + h kh + t kt (values likewise), its channels contiguous.
struct KvStrides {
  long kb, kh, kt, vb, vh, vt;
};

// ---- Output quantization inside a micro-kernel (compiler/src/lower/micro.rs `fused_quant`): the
// generated epilogue's arithmetic (compiler/src/lower/kernels.rs `emit_quant`), so a fused store is
// bit-identical to a float store followed by that epilogue: q = clamp(roundeven(y / step[c]), lo,
// hi), clamped to [plo, phi] instead where the position plus `past` is below `prefix` (the 16-bit
// attention-sink rows).
struct OutQuant {
  const float* step;
  long seq, past, prefix;
  float lo, hi, plo, phi;
  __device__ __forceinline__ float apply(float y, long channel, long pos) const {
    const float r = rintf(__fdiv_rn(y, step[channel]));
    const bool p = pos + past < prefix;
    return fminf(fmaxf(r, p ? plo : lo), p ? phi : hi);
  }
};
template <class A, class B>
struct same_type {
  static constexpr bool value = false;
};
template <class A>
struct same_type<A, A> {
  static constexpr bool value = true;
};

// swiglu(g, u) as the generated kernel computes it (kernels.rs, PointwiseOp::Swiglu): g / (1 +
// ex2.approx(g * -log2 e)) * u, each step rounded in f32 (no FMA).
QCC_DEVICE float swiglu_f32(float g, float u) {
  float e;
  asm("ex2.approx.f32 %0, %1;" : "=f"(e) : "f"(__fmul_rn(g, __int_as_float(0xBFB8AA3B))));
  return __fmul_rn(u, __fdiv_rn(g, __fadd_rn(e, 1.0f)));
}

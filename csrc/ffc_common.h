// ffc kernel support shared by the CPU and CUDA headers: storage types, their conversion to
// fp32, activations and the dims every kernel receives. Host code everywhere; also device code
// under nvcc.
#pragma once
// a guard macro too: kernels are compiled with this header precompiled and force-included
// (-include), so the copy next to them must see it is already in
#ifndef FFC_COMMON_H
#define FFC_COMMON_H
#include <cmath>
#include <cstdint>
#include <cstring>
#ifdef __CUDACC__
#define FFC_HD __host__ __device__ __forceinline__
#else
#define FFC_HD static inline
#endif

struct ffc_bf16 { uint16_t x; };
struct ffc_f16 { uint16_t x; };

FFC_HD float ffc_bits_to_f32(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}
FFC_HD float ffc_to_f32(float v) { return v; }
FFC_HD float ffc_to_f32(ffc_bf16 v) { return ffc_bits_to_f32(uint32_t(v.x) << 16); }
FFC_HD float ffc_to_f32(ffc_f16 v) {
#if defined(__F16C__) && !defined(__CUDA_ARCH__)
  return _cvtsh_ss(v.x);
#else
  uint32_t h = v.x, sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
  if (exp == 0) {
    if (man == 0) { u = sign; }
    else { exp = 127 - 15 + 1; while (!(man & 0x400)) { man <<= 1; --exp; } man &= 0x3ff; u = sign | (exp << 23) | (man << 13); }
  } else if (exp == 31) { u = sign | 0x7f800000u | (man << 13); }
  else { u = sign | ((exp + 127 - 15) << 23) | (man << 13); }
  return ffc_bits_to_f32(u);
#endif
}

FFC_HD float ffc_to_f32(int8_t v) { return float(v); }

// f32 -> bf16 / f16, rounded to nearest even (as torch's .to() does); NaN stays NaN
FFC_HD uint32_t ffc_f32_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}
FFC_HD ffc_bf16 ffc_to_bf16(float f) {
  const uint32_t u = ffc_f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return ffc_bf16{uint16_t((u >> 16) | 0x40)};
  return ffc_bf16{uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}
FFC_HD ffc_f16 ffc_to_f16(float f) {
#if defined(__F16C__) && !defined(__CUDA_ARCH__)
  return ffc_f16{_cvtss_sh(f, 0)};
#else
  const uint32_t u = ffc_f32_bits(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return ffc_f16{uint16_t(sign | 0x7e00u)};                 // NaN
  if (a >= 0x477ff000u) return ffc_f16{uint16_t(sign | 0x7c00u)};                // rounds past 65504: inf
  if (a < 0x38800000u) {                                                         // subnormal (or zero) half
    const uint32_t m = (a & 0x7fffffu) | 0x800000u, e = a >> 23;
    if (e < 102) return ffc_f16{uint16_t(sign)};
    const uint32_t shift = 126 - e, h = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    return ffc_f16{uint16_t(sign | (h + (rem > half || (rem == half && (h & 1u)))))};
  }
  const uint32_t h = ((a >> 13) - (112u << 10)), rem = a & 0x1fffu;
  return ffc_f16{uint16_t(sign | (h + (rem > 0x1000u || (rem == 0x1000u && (h & 1u)))))};
#endif
}

FFC_HD float ffc_silu(float x) { return x / (1.0f + expf(-x)); }
FFC_HD float ffc_gelu(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }
FFC_HD float ffc_gelu_tanh(float x) { return 0.5f * x * (1.0f + tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x))); }
FFC_HD float ffc_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
FFC_HD float ffc_relu(float x) { return x > 0.0f ? x : 0.0f; }

// The dynamic dims as the names the plan's expressions use.
#define FFC_DIMS                              \
  const int64_t T = d[0], N = d[1], S = d[2]; \
  (void)T; (void)N; (void)S;
#endif  // FFC_COMMON_H

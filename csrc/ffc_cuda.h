// ffc CUDA kernel support: the launcher ABI and device helpers. Generated .cu files include
// this header; each kernel is a __global__ function plus a host launcher with the ABI below.
#pragma once
#include <cstdint>
#include <cstring>
#include <cmath>
#ifdef __CUDACC__
#include <cuda_runtime.h>
#define FFC_HD __host__ __device__ __forceinline__
#else
#define FFC_HD inline
#endif

// p: argument pointers (device memory), d: dims {T, N, S}, stream: a cudaStream_t.
typedef void (*ffc_kernel_fn)(void* const* p, const int64_t* d, void* stream);

struct ffc_bf16 { uint16_t x; };
struct ffc_f16 { uint16_t x; };

FFC_HD float ffc_to_f32(float v) { return v; }
FFC_HD float ffc_bits_to_f32(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f; std::memcpy(&f, &u, 4); return f;
#endif
}
FFC_HD float ffc_to_f32(ffc_bf16 v) { return ffc_bits_to_f32(uint32_t(v.x) << 16); }
FFC_HD float ffc_to_f32(ffc_f16 v) {
  uint32_t h = v.x, sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
  if (exp == 0) {
    if (man == 0) { u = sign; }
    else { exp = 127 - 15 + 1; while (!(man & 0x400)) { man <<= 1; --exp; } man &= 0x3ff; u = sign | (exp << 23) | (man << 13); }
  } else if (exp == 31) { u = sign | 0x7f800000u | (man << 13); }
  else { u = sign | ((exp + 127 - 15) << 23) | (man << 13); }
  return ffc_bits_to_f32(u);
}
FFC_HD float ffc_silu(float x) { return x / (1.0f + expf(-x)); }
FFC_HD float ffc_gelu(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }
FFC_HD float ffc_gelu_tanh(float x) { return 0.5f * x * (1.0f + tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x))); }
FFC_HD float ffc_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
FFC_HD float ffc_relu(float x) { return x > 0.0f ? x : 0.0f; }

#define FFC_DIMS                                                   \
  const int64_t T = d[0], N = d[1], S = d[2];                      \
  (void)T; (void)N; (void)S;

#ifdef __CUDACC__
__device__ __forceinline__ float ffc_warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float ffc_block_sum(float v, float* smem) {
  v = ffc_warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  const int nw = (blockDim.x + 31) >> 5;
  v = (int)threadIdx.x < nw ? smem[threadIdx.x] : 0.0f;
  if (warp == 0) v = ffc_warp_sum(v);
  if (threadIdx.x == 0) smem[0] = v;
  __syncthreads();
  v = smem[0];
  __syncthreads();
  return v;
}
#define FFC_STREAM(s) (static_cast<cudaStream_t>(s))
#endif

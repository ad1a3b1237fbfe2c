// ffc CUDA kernel support: the launcher ABI and device helpers. Generated .cu files include
// this header; each kernel is a __global__ function plus a host launcher with the ABI below.
#pragma once
#ifdef __CUDACC__
#include <cuda_runtime.h>
#endif
#include "ffc_common.h"

// p: argument pointers (device memory), d: dims {T, N, S}, stream: a cudaStream_t.
typedef void (*ffc_kernel_fn)(void* const* p, const int64_t* d, void* stream);

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
__device__ __forceinline__ float ffc_block_max(float v, float* smem) {   // all threads of the block; v >= 0
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  const int nw = (blockDim.x + 31) >> 5;
  v = 0.0f;
  for (int w = 0; w < nw; ++w) v = fmaxf(v, smem[w]);
  __syncthreads();
  return v;
}

// A KV-cache row of D values in the cache's storage type (csrc/ffc_cpu.h has the CPU twin): value
// j written by thread j of a block of D threads; an int8 row's f32 scale follows its values.
__device__ __forceinline__ void ffc_kv_put(float* row, int j, float v, int, float*) { row[j] = v; }
__device__ __forceinline__ void ffc_kv_put(ffc_bf16* row, int j, float v, int, float*) { row[j] = ffc_to_bf16(v); }
__device__ __forceinline__ void ffc_kv_put(ffc_f16* row, int j, float v, int, float*) { row[j] = ffc_to_f16(v); }
__device__ __forceinline__ void ffc_kv_put(int8_t* row, int j, float v, int D, float* smem) {
  const float amax = ffc_block_max(fabsf(v), smem);
  const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
  row[j] = (int8_t)rintf(v * inv);
  if (j == 0) *(float*)(row + D) = amax / 127.0f;
}
template <typename C>
__device__ __forceinline__ float ffc_kv_scale(const C*, int) { return 1.0f; }
__device__ __forceinline__ float ffc_kv_scale(const int8_t* row, int D) { return *(const float*)(row + D); }
#define FFC_STREAM(s) (static_cast<cudaStream_t>(s))
#endif

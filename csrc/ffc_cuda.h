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
#define FFC_STREAM(s) (static_cast<cudaStream_t>(s))
#endif

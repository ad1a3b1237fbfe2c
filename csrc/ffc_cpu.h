// ffc CPU kernel support: the kernel ABI, work partitioning, dtype conversion and a small
// SIMD layer. Generated kernels include this header only; the ISA is whatever the compiler
// was told at build time (-march=native), chosen here by the predefined macros.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#include "ffc_common.h"

// Every kernel has this signature. p: argument pointers (resolved when the plan is bound);
// d: the step's dynamic dims {T, N, S}; each of nth threads calls it with its own tid, and the
// executor puts a barrier after it.
typedef void (*ffc_kernel_fn)(void* const* p, const int64_t* d, int tid, int nth);

extern "C" void ffc_barrier();  // all threads of the running step; defined by the executor

#if defined(__AVX512F__)
#define FFC_ISA "avx512"
#define FFC_VW 16
#elif defined(__AVX2__) && defined(__FMA__)
#define FFC_ISA "avx2"
#define FFC_VW 8
#else
#define FFC_ISA "scalar"
#define FFC_VW 1
#endif

// [begin, end) of n items for thread tid, in chunks that are multiples of `align`.
static inline void ffc_split(int64_t n, int tid, int nth, int64_t* b, int64_t* e, int64_t align = 1) {
  int64_t chunks = (n + align - 1) / align;
  int64_t per = chunks / nth, rem = chunks % nth;
  int64_t cb = tid * per + (tid < rem ? tid : rem);
  int64_t ce = cb + per + (tid < rem ? 1 : 0);
  *b = cb * align < n ? cb * align : n;
  *e = ce * align < n ? ce * align : n;
}

// ------------------------------------------------------------------ SIMD layer
#if FFC_VW == 16
typedef __m512 ffc_vf;
static inline ffc_vf ffc_vzero() { return _mm512_setzero_ps(); }
static inline ffc_vf ffc_vset(float v) { return _mm512_set1_ps(v); }
static inline ffc_vf ffc_vload(const float* p) { return _mm512_loadu_ps(p); }
static inline ffc_vf ffc_vload(const ffc_bf16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
static inline ffc_vf ffc_vload(const ffc_f16* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
static inline void ffc_vstore(float* p, ffc_vf v) { _mm512_storeu_ps(p, v); }
static inline ffc_vf ffc_vfma(ffc_vf a, ffc_vf b, ffc_vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline ffc_vf ffc_vadd(ffc_vf a, ffc_vf b) { return _mm512_add_ps(a, b); }
static inline ffc_vf ffc_vmul(ffc_vf a, ffc_vf b) { return _mm512_mul_ps(a, b); }
static inline ffc_vf ffc_vmax(ffc_vf a, ffc_vf b) { return _mm512_max_ps(a, b); }
static inline float ffc_vsum(ffc_vf v) { return _mm512_reduce_add_ps(v); }
static inline float ffc_vhmax(ffc_vf v) { return _mm512_reduce_max_ps(v); }
#elif FFC_VW == 8
typedef __m256 ffc_vf;
static inline ffc_vf ffc_vzero() { return _mm256_setzero_ps(); }
static inline ffc_vf ffc_vset(float v) { return _mm256_set1_ps(v); }
static inline ffc_vf ffc_vload(const float* p) { return _mm256_loadu_ps(p); }
static inline ffc_vf ffc_vload(const ffc_bf16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
static inline ffc_vf ffc_vload(const ffc_f16* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
static inline void ffc_vstore(float* p, ffc_vf v) { _mm256_storeu_ps(p, v); }
static inline ffc_vf ffc_vfma(ffc_vf a, ffc_vf b, ffc_vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline ffc_vf ffc_vadd(ffc_vf a, ffc_vf b) { return _mm256_add_ps(a, b); }
static inline ffc_vf ffc_vmul(ffc_vf a, ffc_vf b) { return _mm256_mul_ps(a, b); }
static inline ffc_vf ffc_vmax(ffc_vf a, ffc_vf b) { return _mm256_max_ps(a, b); }
static inline float ffc_vsum(ffc_vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
static inline float ffc_vhmax(ffc_vf v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#else
typedef float ffc_vf;
static inline ffc_vf ffc_vzero() { return 0.0f; }
static inline ffc_vf ffc_vset(float v) { return v; }
template <typename W> static inline ffc_vf ffc_vload(const W* p) { return ffc_to_f32(*p); }
static inline void ffc_vstore(float* p, ffc_vf v) { *p = v; }
static inline ffc_vf ffc_vfma(ffc_vf a, ffc_vf b, ffc_vf c) { return a * b + c; }
static inline ffc_vf ffc_vadd(ffc_vf a, ffc_vf b) { return a + b; }
static inline ffc_vf ffc_vmul(ffc_vf a, ffc_vf b) { return a * b; }
static inline ffc_vf ffc_vmax(ffc_vf a, ffc_vf b) { return a > b ? a : b; }
static inline float ffc_vsum(ffc_vf v) { return v; }
static inline float ffc_vhmax(ffc_vf v) { return v; }
#endif

// Dot product of n floats of x with n weights of any storage type, fp32 accumulation.
template <typename W>
static inline float ffc_dot(const float* x, const W* w, int64_t n) {
  ffc_vf a0 = ffc_vzero(), a1 = ffc_vzero();
  int64_t k = 0;
  for (; k + 2 * FFC_VW <= n; k += 2 * FFC_VW) {
    a0 = ffc_vfma(ffc_vload(x + k), ffc_vload(w + k), a0);
    a1 = ffc_vfma(ffc_vload(x + k + FFC_VW), ffc_vload(w + k + FFC_VW), a1);
  }
  for (; k + FFC_VW <= n; k += FFC_VW) a0 = ffc_vfma(ffc_vload(x + k), ffc_vload(w + k), a0);
  float s = ffc_vsum(ffc_vadd(a0, a1));
  for (; k < n; ++k) s += x[k] * ffc_to_f32(w[k]);
  return s;
}

// y[0:n] += a * v[0:n]
static inline void ffc_axpy(float* y, float a, const float* v, int64_t n) {
  int64_t k = 0;
  ffc_vf va = ffc_vset(a);
  for (; k + FFC_VW <= n; k += FFC_VW) ffc_vstore(y + k, ffc_vfma(va, ffc_vload(v + k), ffc_vload(y + k)));
  for (; k < n; ++k) y[k] += a * v[k];
}

static inline void ffc_scale(float* y, float a, int64_t n) {
  int64_t k = 0;
  ffc_vf va = ffc_vset(a);
  for (; k + FFC_VW <= n; k += FFC_VW) ffc_vstore(y + k, ffc_vmul(va, ffc_vload(y + k)));
  for (; k < n; ++k) y[k] *= a;
}

// Four dot products of x with four consecutive weight rows (row stride n), fp32 accumulation.
template <typename W>
static inline void ffc_dot4(const float* x, const W* w, int64_t n, float* out) {
  const W* w0 = w; const W* w1 = w + n; const W* w2 = w + 2 * n; const W* w3 = w + 3 * n;
  ffc_vf a0 = ffc_vzero(), a1 = ffc_vzero(), a2 = ffc_vzero(), a3 = ffc_vzero();
  int64_t k = 0;
  for (; k + FFC_VW <= n; k += FFC_VW) {
#if FFC_VW > 1
    if ((k * (int64_t)sizeof(W)) % 64 == 0)  // once per cache line: the next block of rows
      for (int r = 4; r < 8; ++r) _mm_prefetch((const char*)(w + r * n + k), _MM_HINT_T0);
#endif
    const ffc_vf xv = ffc_vload(x + k);
    a0 = ffc_vfma(xv, ffc_vload(w0 + k), a0);
    a1 = ffc_vfma(xv, ffc_vload(w1 + k), a1);
    a2 = ffc_vfma(xv, ffc_vload(w2 + k), a2);
    a3 = ffc_vfma(xv, ffc_vload(w3 + k), a3);
  }
  float s0 = ffc_vsum(a0), s1 = ffc_vsum(a1), s2 = ffc_vsum(a2), s3 = ffc_vsum(a3);
  for (; k < n; ++k) {
    const float xv = x[k];
    s0 += xv * ffc_to_f32(w0[k]); s1 += xv * ffc_to_f32(w1[k]);
    s2 += xv * ffc_to_f32(w2[k]); s3 += xv * ffc_to_f32(w3[k]);
  }
  out[0] = s0; out[1] = s1; out[2] = s2; out[3] = s3;
}

// Per-thread scratch that grows once and is then reused: no allocation in steady state.
static inline float* ffc_scratch(int slot, int64_t n) {
  static thread_local float* bufs[4] = {nullptr, nullptr, nullptr, nullptr};
  static thread_local int64_t caps[4] = {0, 0, 0, 0};
  if (caps[slot] < n) {
    std::free(bufs[slot]);
    int64_t bytes = ((n * (int64_t)sizeof(float) + 63) / 64) * 64;
    bufs[slot] = (float*)std::aligned_alloc(64, bytes);
    caps[slot] = n;
  }
  return bufs[slot];
}

// BLAS (MKL's sgemm, the one torch.mm uses, found in libtorch_cpu at link time).
extern "C" void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

// out[M, cb] (row-major) = x[M, K] (row stride ldx) @ w[cb, K]^T. Weights stored as bf16/fp16
// are converted tile-wise into per-thread scratch slot `slot` first.
static inline void ffc_sgemm_nt(const float* x, int64_t ldx, int64_t M, const float* w, int64_t K,
                                int64_t cb, float* out, int64_t ldo) {
  const int m = (int)cb, n = (int)M, k = (int)K, lda = (int)K, ldb = (int)ldx, ldc = (int)ldo;
  const float one = 1.0f, zero = 0.0f;
  sgemm_("T", "N", &m, &n, &k, &one, w, &lda, x, &ldb, &zero, out, &ldc);
}
// out[m, 0:cb] (row stride ldo) for cb weight rows starting at w.
static inline void ffc_gemm_rows(const float* x, int64_t ldx, int64_t M, const float* w, int64_t K,
                                 int64_t cb, float* out, int64_t ldo, int) {
  ffc_sgemm_nt(x, ldx, M, w, K, cb, out, ldo);
}
template <typename W>
static inline void ffc_gemm_rows(const float* x, int64_t ldx, int64_t M, const W* w, int64_t K,
                                 int64_t cb, float* out, int64_t ldo, int slot) {
  float* wf = ffc_scratch(slot, cb * K);
  for (int64_t i = 0; i < cb * K; i += FFC_VW) {
    if (i + FFC_VW <= cb * K) ffc_vstore(wf + i, ffc_vload(w + i));
    else for (int64_t j = i; j < cb * K; ++j) wf[j] = ffc_to_f32(w[j]);
  }
  ffc_sgemm_nt(x, ldx, M, wf, K, cb, out, ldo);
}

// ------------------------------------------------------------------ bf16 weights, AVX-512
// A 512-bit load holds 32 bf16 weights; as 16 32-bit lanes, lane j packs elements 2j (low
// half) and 2j+1 (high half). Shifting left by 16 gives the even elements as fp32, masking the
// high half gives the odd ones: 3 instructions for 32 weights. The activations are split once
// per kernel call into even/odd halves ("prepared" rows: [x0 x2 x4 ... | x1 x3 x5 ...]).
#if FFC_VW == 16
static inline const float* ffc_bf16_prep(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t* ld) {
  float* out = ffc_scratch(1, M * K);
  const int64_t half = (K + 1) / 2;
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * ldx;
    float* o = out + m * K;
    for (int64_t k = 0; k < K / 2; ++k) { o[k] = xm[2 * k]; o[half + k] = xm[2 * k + 1]; }
    if (K & 1) o[K / 2] = xm[K - 1];
  }
  *ld = K;
  return out;
}
static inline float ffc_bf16_tail(const float* xp, const ffc_bf16* w, int64_t k, int64_t n) {
  const int64_t half = (n + 1) / 2;
  float s = 0.0f;
  for (; k < n; ++k) s += (k & 1 ? xp[half + k / 2] : xp[k / 2]) * ffc_to_f32(w[k]);
  return s;
}
static inline void ffc_dot4(const float* xp, const ffc_bf16* w, int64_t n, float* out) {
  const int64_t half = (n + 1) / 2;
  const float* xe = xp;
  const float* xo = xp + half;
  const __m512i hi = _mm512_set1_epi32((int)0xFFFF0000u);
  __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t k = 0;
  for (; k + 32 <= n; k += 32) {
    const __m512 ve = _mm512_loadu_ps(xe + k / 2), vo = _mm512_loadu_ps(xo + k / 2);
    for (int r = 0; r < 4; ++r) {
      _mm_prefetch((const char*)(w + (r + 4) * n + k), _MM_HINT_T0);  // the next block of rows
      const __m512i wr = _mm512_loadu_si512((const void*)(w + r * n + k));
      a[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(wr, 16)), ve, a[r]);
      a[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(wr, hi)), vo, a[r]);
    }
  }
  for (int r = 0; r < 4; ++r) out[r] = _mm512_reduce_add_ps(a[r]) + ffc_bf16_tail(xp, w + r * n, k, n);
}
static inline float ffc_dot(const float* xp, const ffc_bf16* w, int64_t n) {
  const int64_t half = (n + 1) / 2;
  const __m512i hi = _mm512_set1_epi32((int)0xFFFF0000u);
  __m512 a = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= n; k += 32) {
    const __m512i wr = _mm512_loadu_si512((const void*)(w + k));
    a = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(wr, 16)), _mm512_loadu_ps(xp + k / 2), a);
    a = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(wr, hi)), _mm512_loadu_ps(xp + half + k / 2), a);
  }
  return _mm512_reduce_add_ps(a) + ffc_bf16_tail(xp, w, k, n);
}
#else
static inline const float* ffc_bf16_prep(const float* x, int64_t ldx, int64_t, int64_t, int64_t* ld) {
  *ld = ldx;
  return x;
}
#endif

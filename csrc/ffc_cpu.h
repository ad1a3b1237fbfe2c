// ffc CPU kernel support: the kernel ABI, work partitioning, dtype conversion and a small
// SIMD layer. Generated kernels include this header only; the ISA is whatever the compiler
// was told at build time (-march=native), chosen here by the predefined macros.
#pragma once
// a guard macro too: kernels are compiled with this header precompiled and force-included
// (-include), so the copy next to them must see it is already in
#ifndef FFC_CPU_H
#define FFC_CPU_H
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
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
static inline ffc_vf ffc_vload(const int8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p))); }
static inline void ffc_vstore(float* p, ffc_vf v) { _mm512_storeu_ps(p, v); }
static inline ffc_vf ffc_vfma(ffc_vf a, ffc_vf b, ffc_vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline ffc_vf ffc_vadd(ffc_vf a, ffc_vf b) { return _mm512_add_ps(a, b); }
static inline ffc_vf ffc_vmul(ffc_vf a, ffc_vf b) { return _mm512_mul_ps(a, b); }
static inline ffc_vf ffc_vmax(ffc_vf a, ffc_vf b) { return _mm512_max_ps(a, b); }
static inline ffc_vf ffc_vmin(ffc_vf a, ffc_vf b) { return _mm512_min_ps(a, b); }
static inline ffc_vf ffc_vround(ffc_vf v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline ffc_vf ffc_vldexp(ffc_vf p, ffc_vf k) { return _mm512_scalef_ps(p, k); }   // p * 2^k
static inline ffc_vf ffc_vzero_below(ffc_vf v, ffc_vf x, ffc_vf lo) {                  // x < lo ? 0 : v
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ), v);
}
static inline float ffc_vsum(ffc_vf v) { return _mm512_reduce_add_ps(v); }
static inline float ffc_vhmax(ffc_vf v) { return _mm512_reduce_max_ps(v); }
// out[j] = the sum of v[j]'s lanes for 16 vectors, by one transposing tree of adds (each sum in
// the same order: every lane pair, then the pairs' sums, whichever slot its vector is in)
static inline void ffc_vsums(const ffc_vf* v, float* out) {
  __m512 a[8], b[4];
  for (int k = 0; k < 8; ++k)   // per 128-bit lane: v[2k] x0+x2, v[2k+1] x0+x2, v[2k] x1+x3, v[2k+1] x1+x3
    a[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
  for (int k = 0; k < 4; ++k)   // per 128-bit lane: v[4k..4k+3]'s sums of that lane's four floats
    b[k] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * k], a[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(a[2 * k], a[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 c0 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(b[0], b[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 c1 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(b[2], b[3], _MM_SHUFFLE(3, 1, 3, 1)));
  _mm512_storeu_ps(out, _mm512_add_ps(_mm512_shuffle_f32x4(c0, c1, _MM_SHUFFLE(2, 0, 2, 0)),
                                      _mm512_shuffle_f32x4(c0, c1, _MM_SHUFFLE(3, 1, 3, 1))));
}
#elif FFC_VW == 8
typedef __m256 ffc_vf;
static inline ffc_vf ffc_vzero() { return _mm256_setzero_ps(); }
static inline ffc_vf ffc_vset(float v) { return _mm256_set1_ps(v); }
static inline ffc_vf ffc_vload(const float* p) { return _mm256_loadu_ps(p); }
static inline ffc_vf ffc_vload(const ffc_bf16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
static inline ffc_vf ffc_vload(const ffc_f16* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
static inline ffc_vf ffc_vload(const int8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p))); }
static inline void ffc_vstore(float* p, ffc_vf v) { _mm256_storeu_ps(p, v); }
static inline ffc_vf ffc_vfma(ffc_vf a, ffc_vf b, ffc_vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline ffc_vf ffc_vadd(ffc_vf a, ffc_vf b) { return _mm256_add_ps(a, b); }
static inline ffc_vf ffc_vmul(ffc_vf a, ffc_vf b) { return _mm256_mul_ps(a, b); }
static inline ffc_vf ffc_vmax(ffc_vf a, ffc_vf b) { return _mm256_max_ps(a, b); }
static inline ffc_vf ffc_vmin(ffc_vf a, ffc_vf b) { return _mm256_min_ps(a, b); }
static inline ffc_vf ffc_vround(ffc_vf v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline ffc_vf ffc_vldexp(ffc_vf p, ffc_vf k) {   // p * 2^k, integral k in [-126, 127]: k + 127 as the exponent
  return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k),
                                                                                  _mm256_set1_epi32(127)), 23)));
}
static inline ffc_vf ffc_vzero_below(ffc_vf v, ffc_vf x, ffc_vf lo) { return _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), v); }
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
// out[j] = the sum of v[j]'s lanes for 8 vectors (each in the same order, as above)
static inline void ffc_vsums(const ffc_vf* v, float* out) {
  const __m256 g0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 g1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(g0, g1, 0x20), _mm256_permute2f128_ps(g0, g1, 0x31)));
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
static inline ffc_vf ffc_vmin(ffc_vf a, ffc_vf b) { return a < b ? a : b; }
static inline ffc_vf ffc_vround(ffc_vf v) { return std::nearbyint(v); }
static inline ffc_vf ffc_vldexp(ffc_vf p, ffc_vf k) { return std::ldexp(p, (int)k); }
static inline ffc_vf ffc_vzero_below(ffc_vf v, ffc_vf x, ffc_vf lo) { return x < lo ? 0.0f : v; }
static inline float ffc_vsum(ffc_vf v) { return v; }
static inline float ffc_vhmax(ffc_vf v) { return v; }
static inline void ffc_vsums(const ffc_vf* v, float* out) { out[0] = v[0]; }
#endif

// Ask for the cache lines of [p, p + bytes), read soon (a panel's next k-steps; a KV row: the
// cache's paged blocks are too short for the hardware prefetchers, which stop at page boundaries).
// Into L1 by default; into L2 (FFC_TO_L2) for a burst of lines wanted a while later (the next
// block of K/V rows: hundreds of lines at once), which into L1 would fill its few miss buffers and
// stall the loads of the rows in use, where L2 has a deeper queue and serves a row at its latency.
enum FfcPrefetchTo { FFC_TO_L1, FFC_TO_L2 };
template <FfcPrefetchTo TO = FFC_TO_L1>
static inline void ffc_prefetch(const void* p, int64_t bytes) {
#if FFC_VW > 1
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch((const char*)p + b, TO == FFC_TO_L2 ? _MM_HINT_T1 : _MM_HINT_T0);
#else
  (void)p;
  (void)bytes;
#endif
}

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

// ------------------------------------------------------------------ KV-cache rows
// A cached K or V row of D values in the cache's storage type; an int8 row is D values
// rounded to nearest even after scaling by 127 / amax, then its f32 scale amax / 127 (the
// interpreter's kv_quantize). ffc_kv_scale: what a stored value is multiplied by.
static inline void ffc_kv_store(float* dst, const float* src, int64_t D) { std::memcpy(dst, src, D * sizeof(float)); }
static inline void ffc_kv_store(ffc_bf16* dst, const float* src, int64_t D) { for (int64_t j = 0; j < D; ++j) dst[j] = ffc_to_bf16(src[j]); }
static inline void ffc_kv_store(ffc_f16* dst, const float* src, int64_t D) { for (int64_t j = 0; j < D; ++j) dst[j] = ffc_to_f16(src[j]); }
static inline void ffc_kv_store(int8_t* dst, const float* src, int64_t D) {
  float amax = 0.0f;
  for (int64_t j = 0; j < D; ++j) amax = std::fmax(amax, std::fabs(src[j]));
  const float inv = amax > 0.0f ? 127.0f / amax : 0.0f, s = amax / 127.0f;
  for (int64_t j = 0; j < D; ++j) dst[j] = (int8_t)std::nearbyint(src[j] * inv);
  std::memcpy(dst + D, &s, sizeof(float));
}
template <typename C>
static inline float ffc_kv_scale(const C*, int64_t) { return 1.0f; }
static inline float ffc_kv_scale(const int8_t* row, int64_t D) { float s; std::memcpy(&s, row + D, sizeof(float)); return s; }

// exp for softmax weights, on the SIMD layer: x = k ln2 + r with |r| <= ln2/2, exp(x) = 2^k p(r),
// p a degree-6 polynomial (Cephes' expf coefficients, ~1 ulp); below -87.3 the result is 0.
static inline ffc_vf ffc_vexp(ffc_vf x) {
  const ffc_vf lo = ffc_vset(-87.3f);
  const ffc_vf xc = ffc_vmin(ffc_vmax(x, lo), ffc_vset(88.3f));
  const ffc_vf k = ffc_vround(ffc_vmul(xc, ffc_vset(1.44269504088896341f)));
  ffc_vf r = ffc_vfma(k, ffc_vset(-0.693359375f), xc);          // ln2 in two parts: exact k*hi
  r = ffc_vfma(k, ffc_vset(2.12194440e-4f), r);
  ffc_vf p = ffc_vset(1.9875691500e-4f);
  p = ffc_vfma(p, r, ffc_vset(1.3981999507e-3f));
  p = ffc_vfma(p, r, ffc_vset(8.3334519073e-3f));
  p = ffc_vfma(p, r, ffc_vset(4.1665795894e-2f));
  p = ffc_vfma(p, r, ffc_vset(1.6666665459e-1f));
  p = ffc_vfma(p, r, ffc_vset(5.0000001201e-1f));
  p = ffc_vfma(p, ffc_vmul(r, r), ffc_vadd(r, ffc_vset(1.0f)));
  return ffc_vzero_below(ffc_vldexp(p, k), x, lo);
}

// x[0:n] = exp(x[0:n])
static inline void ffc_exp_inplace(float* x, int64_t n) {
  int64_t k = 0;
  for (; k + FFC_VW <= n; k += FFC_VW) ffc_vstore(x + k, ffc_vexp(ffc_vload(x + k)));
  for (; k < n; ++k) x[k] = std::exp(x[k]);
}

// ------------------------------------------------------------------ attention
// max and sum of x[0:n], FFC_VW lanes at a time (the sum in a fixed order for each n)
static inline float ffc_max(const float* x, int64_t n) {
  ffc_vf m = ffc_vset(-INFINITY);
  int64_t k = 0;
  for (; k + FFC_VW <= n; k += FFC_VW) m = ffc_vmax(m, ffc_vload(x + k));
  float r = ffc_vhmax(m);
  for (; k < n; ++k) r = x[k] > r ? x[k] : r;
  return r;
}
static inline float ffc_sum(const float* x, int64_t n) {
  ffc_vf a = ffc_vzero();
  int64_t k = 0;
  for (; k + FFC_VW <= n; k += FFC_VW) a = ffc_vadd(a, ffc_vload(x + k));
  float r = ffc_vsum(a);
  for (; k < n; ++k) r += x[k];
  return r;
}

// Online softmax attention of query rows over one block of n keys (K and V rows kp[j], vp[j]).
// Per row r (q + r * D, its output acc + r * D, running max mx[r] and sum l[r]): scores
// s_r[j] = dot(q_r, K_j) (FFC_VW keys at a time, their lanes summed by ffc_vsums), finished in
// place by score(s_r, n, r) (scale, softcap, ALiBi); then the block's max m, the old sums
// rescaled by exp(mx - m), l += sum_j exp(s_j - m), acc += exp(s_j - m) vs[j] V_j, the V rows
// read once for RW rows at a time. s_r = s + r * ss, room for n rounded up to FFC_VW. A row's
// arithmetic depends on its own keys only, so decode, prefill and verify rows agree exactly.
template <int64_t D, int RW, typename C, typename Score>
static inline void ffc_attend_rows(const float* __restrict q, float* __restrict acc, float* mx, float* l,
                                   const C* const* kp, const C* const* vp, const float* vs, int64_t n,
                                   float* __restrict s, int64_t ss, Score score) {
  constexpr int64_t NV = D / FFC_VW, REM = D % FFC_VW;
  float corr[RW];
  for (int r = 0; r < RW; ++r) {
    const float* qr = q + r * D;
    float* sr = s + r * ss;
    ffc_vf qv[NV > 0 ? NV : 1];
    for (int64_t c = 0; c < NV; ++c) qv[c] = ffc_vload(qr + c * FFC_VW);
    for (int64_t j0 = 0; j0 < n; j0 += FFC_VW) {
      const int64_t m = n - j0 < FFC_VW ? n - j0 : FFC_VW;
      ffc_vf part[FFC_VW];
      for (int64_t j = 0; j < FFC_VW; ++j) {
        ffc_vf a = ffc_vzero();
        if (j < m)
          for (int64_t c = 0; c < NV; ++c) a = ffc_vfma(qv[c], ffc_vload(kp[j0 + j] + c * FFC_VW), a);
        part[j] = a;
      }
      ffc_vsums(part, sr + j0);
      for (int64_t c = NV * FFC_VW; c < D; ++c)
        for (int64_t j = j0; j < j0 + m; ++j) sr[j] += qr[c] * ffc_to_f32(kp[j][c]);
    }
    score(sr, n, r);
    const float bm = ffc_max(sr, n), nm = bm > mx[r] ? bm : mx[r];
    corr[r] = std::exp(mx[r] - nm);
    mx[r] = nm;
    for (int64_t j = 0; j < n; ++j) sr[j] -= nm;
    ffc_exp_inplace(sr, n);
    l[r] = l[r] * corr[r] + ffc_sum(sr, n);
  }
  ffc_vf av[RW][NV > 0 ? NV : 1];
  for (int r = 0; r < RW; ++r)
    for (int64_t c = 0; c < NV; ++c) av[r][c] = ffc_vmul(ffc_vset(corr[r]), ffc_vload(acc + r * D + c * FFC_VW));
  for (int64_t j = 0; j < n; ++j) {
    ffc_vf v[NV > 0 ? NV : 1];
    for (int64_t c = 0; c < NV; ++c) v[c] = ffc_vload(vp[j] + c * FFC_VW);
    for (int r = 0; r < RW; ++r) {
      const ffc_vf w = ffc_vset(s[r * ss + j] * vs[j]);
      for (int64_t c = 0; c < NV; ++c) av[r][c] = ffc_vfma(w, v[c], av[r][c]);
    }
  }
  for (int r = 0; r < RW; ++r)
    for (int64_t c = 0; c < NV; ++c) ffc_vstore(acc + r * D + c * FFC_VW, av[r][c]);
  if constexpr (REM > 0)
    for (int r = 0; r < RW; ++r) {
      float* ar = acc + r * D + NV * FFC_VW;
      for (int64_t c = 0; c < REM; ++c) ar[c] *= corr[r];
      for (int64_t j = 0; j < n; ++j)
        for (int64_t c = 0; c < REM; ++c) ar[c] += s[r * ss + j] * vs[j] * ffc_to_f32(vp[j][NV * FFC_VW + c]);
    }
}

// All QH query rows of a KV head over one block: RW rows at a time (as many as keep their
// outputs in registers), the rest one at a time; score(s_r, n, r) with r the row in 0..QH.
template <int64_t D, int64_t QH, typename C, typename Score>
static inline void ffc_attend_block(const float* q, float* acc, float* mx, float* l, const C* const* kp,
                                    const C* const* vp, const float* vs, int64_t n, float* s, int64_t ss,
                                    Score score) {
  constexpr int64_t NV = D / FFC_VW > 0 ? D / FFC_VW : 1;
  constexpr int RW = (int)(12 / NV < 1 ? 1 : (12 / NV > QH ? QH : 12 / NV));
  int64_t r0 = 0;
  for (; r0 + RW <= QH; r0 += RW)
    ffc_attend_rows<D, RW>(q + r0 * D, acc + r0 * D, mx + r0, l + r0, kp, vp, vs, n, s, ss,
                           [&](float* sr, int64_t m, int r) { score(sr, m, r0 + r); });
  for (; r0 < QH; ++r0)
    ffc_attend_rows<D, 1>(q + r0 * D, acc + r0 * D, mx + r0, l + r0, kp, vp, vs, n, s, ss,
                          [&](float* sr, int64_t m, int) { score(sr, m, r0); });
}

// A chunk of keys' softmax merged into the result so far, the chunks in order: each a partial of
// QH rows of output before normalising, then QH maxima and QH sums. Explicit operations (no
// contraction left to the compiler), so a row's result is the same whichever threads computed
// its chunks.
template <int64_t D, int64_t QH>
static inline void ffc_attend_merge(float* __restrict run, const float* __restrict chunk) {
  constexpr int64_t NV = D / FFC_VW;
  float *M = run + QH * D, *L = M + QH;
  const float *m = chunk + QH * D, *l = m + QH;
  for (int64_t r = 0; r < QH; ++r) {
    float* Ar = run + r * D;
    const float* ar = chunk + r * D;
    const float nm = m[r] > M[r] ? m[r] : M[r], ca = std::exp(M[r] - nm), cb = std::exp(m[r] - nm);
    const ffc_vf va = ffc_vset(ca), vb = ffc_vset(cb);
    for (int64_t c = 0; c < NV; ++c)
      ffc_vstore(Ar + c * FFC_VW, ffc_vfma(ffc_vload(Ar + c * FFC_VW), va, ffc_vmul(ffc_vload(ar + c * FFC_VW), vb)));
    for (int64_t c = NV * FFC_VW; c < D; ++c) Ar[c] = std::fma(Ar[c], ca, ar[c] * cb);
    L[r] = std::fma(L[r], ca, l[r] * cb);
    M[r] = nm;
  }
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

// ------------------------------------------------------------------ packed linear
// A linear's weights are repacked once, when the plan is bound, into panels of FFC_NR output
// rows: panel p holds W[p*NR + j, k] at [p][k][j] (rows past the end are zero). One k step of
// a panel is then NR contiguous weights, so a micro-tile of MR activation rows x NS columns
// keeps MR*NS/VW accumulators in registers, broadcasts one activation per row and reads each
// weight vector once for all MR rows: an outer-product GEMM that needs no horizontal sums and
// streams the weights front to back (the same code is the decode GEMV when M is 1).
// NR is part of the layout (lower.py PANEL_ROWS); MR and NS are the ISA's register blocking.
#define FFC_NR 48
#if FFC_VW == 16
#define FFC_MR 8
#define FFC_NS 48
#elif FFC_VW == 8
#define FFC_MR 6
#define FFC_NS 16
#else
#define FFC_MR 4
#define FFC_NS 16
#endif

// t[i][0:NR] = sum_k x[i, k] * panel[k][0:NR] for i < MR.
template <int MR, typename W>
static inline void ffc_panel_tile(const float* __restrict x, int64_t ldx, const W* __restrict panel, int64_t K,
                                  float* __restrict t) {
  constexpr int NV = FFC_NS / FFC_VW;
  for (int s = 0; s < FFC_NR; s += FFC_NS) {
    ffc_vf acc[MR][NV];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NV; ++j) acc[i][j] = ffc_vzero();
    const W* wp = panel + s;
    for (int64_t k = 0; k < K; ++k, wp += FFC_NR) {
      if (s == 0) {      // front to back: into L2 48 k-steps ahead, from there into L1 8 ahead
        ffc_prefetch<FFC_TO_L2>(wp + 48 * FFC_NR, FFC_NR * sizeof(W));
        ffc_prefetch(wp + 8 * FFC_NR, FFC_NR * sizeof(W));
      }
      ffc_vf w[NV];
      for (int j = 0; j < NV; ++j) w[j] = ffc_vload(wp + j * FFC_VW);
      for (int i = 0; i < MR; ++i) {
        const ffc_vf xv = ffc_vset(x[i * ldx + k]);
        for (int j = 0; j < NV; ++j) acc[i][j] = ffc_vfma(xv, w[j], acc[i][j]);
      }
    }
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NV; ++j) ffc_vstore(t + i * FFC_NR + s + j * FFC_VW, acc[i][j]);
  }
}

// The same for mr <= R rows (R = FFC_MR at the call): one instantiation per row count.
template <int R, typename W>
static inline void ffc_panel_rows(int mr, const float* x, int64_t ldx, const W* panel, int64_t K, float* t) {
  if constexpr (R > 1) {
    if (mr < R) {
      ffc_panel_rows<R - 1>(mr, x, ldx, panel, K, t);
      return;
    }
  }
  ffc_panel_tile<R>(x, ldx, panel, K, t);
}
#endif  // FFC_CPU_H

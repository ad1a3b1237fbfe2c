// ffc quantized linears on the CPU: weights in block formats (ir/quant.py), repacked at load
// into panels of 16 output rows (runtime/qpanels.py); activations quantized to int8 per block
// of 32 once per linear input; dot products in integer arithmetic (AVX-512 VNNI vpdpbusd,
// AVX-VNNI, AVX2/AVX-512BW maddubs, or plain C++), scaled per block in fp32.
//
// Panel layout (16 rows, K values): superblocks of SB chunks of 32 values; a superblock is a
// header of HB bytes then SB chunks of CB bytes; a chunk is its scale bytes then its values:
//   4-bit values: 4 groups of 64 bytes; group g, byte 4r+j: low nibble = value 4g+j of row r,
//                 high nibble = value 16+4g+j
//   8-bit values: 8 groups of 64 bytes; group g, byte 4r+j = value 4g+j of row r (unsigned)
// Every format reads as w = scale * q + min per row and block (half-block for q6_k), q the
// unsigned stored value; the kernel adds scale * dx * sum(q * xq) + min * dx * sum(xq) per
// block, where x ~ dx * xq is the block's quantized activation: that is sum(w * dx * xq),
// exactly the block's weights times the quantized activations (fp32 rounding aside).
#pragma once
#include "ffc_cpu.h"

#define FFC_QR 16          // rows per quantized panel: one int32 lane each
#define FFC_QK 32          // values per activation block (and per chunk)

// ------------------------------------------------------------------ 16-lane vectors
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define FFC_QISA "avx512"
typedef __m512i ffc_qv;    // 64 bytes: 16 lanes of 4 bytes
typedef __m512i ffc_qi;    // 16 int32
typedef __m512 ffc_qf;     // 16 float
static inline ffc_qv ffc_qv_load(const uint8_t* p) { return _mm512_loadu_si512((const void*)p); }
static inline ffc_qv ffc_qv_lo4(ffc_qv v) { return _mm512_and_si512(v, _mm512_set1_epi8(0x0F)); }
static inline ffc_qv ffc_qv_hi4(ffc_qv v) { return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0F)); }
static inline ffc_qi ffc_qi_zero() { return _mm512_setzero_si512(); }
// acc[l] += sum_j v[4l+j] * x[j]: v unsigned, x four signed bytes; BIG: v may exceed 127
template <bool BIG>
static inline ffc_qi ffc_dp4(ffc_qi acc, ffc_qv v, int32_t x) {
#if defined(__AVX512VNNI__)
  return _mm512_dpbusd_epi32(acc, v, _mm512_set1_epi32(x));
#else
  const __m512i xb = _mm512_set1_epi32(x), one = _mm512_set1_epi16(1);
  if (BIG) {   // maddubs saturates at 2 * 255 * 128: split off the top bit
    const __m512i lo = _mm512_and_si512(v, _mm512_set1_epi8(0x7F)), top = _mm512_and_si512(_mm512_srli_epi16(v, 7), _mm512_set1_epi8(1));
    acc = _mm512_add_epi32(acc, _mm512_slli_epi32(_mm512_madd_epi16(_mm512_maddubs_epi16(top, xb), one), 7));
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(lo, xb), one));
  }
  return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(v, xb), one));
#endif
}
static inline ffc_qf ffc_qf_zero() { return _mm512_setzero_ps(); }
static inline ffc_qf ffc_qf_set(float v) { return _mm512_set1_ps(v); }
static inline ffc_qf ffc_qf_cvt(ffc_qi v) { return _mm512_cvtepi32_ps(v); }
static inline ffc_qf ffc_qf_mul(ffc_qf a, ffc_qf b) { return _mm512_mul_ps(a, b); }
static inline ffc_qf ffc_qf_fma(ffc_qf a, ffc_qf b, ffc_qf c) { return _mm512_fmadd_ps(a, b, c); }
static inline ffc_qf ffc_qf_f16(const uint8_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
static inline ffc_qf ffc_qf_f32(const uint8_t* p) { return _mm512_loadu_ps((const float*)p); }
static inline ffc_qf ffc_qf_u8(const uint8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p))); }
static inline ffc_qf ffc_qf_s8(const uint8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p))); }
static inline void ffc_qf_store(float* p, ffc_qf v) { _mm512_storeu_ps(p, v); }
#elif defined(__AVX2__) && defined(__FMA__)
#define FFC_QISA "avx2"
struct ffc_qv { __m256i a, b; };
struct ffc_qi { __m256i a, b; };
struct ffc_qf { __m256 a, b; };
static inline ffc_qv ffc_qv_load(const uint8_t* p) { return {_mm256_loadu_si256((const __m256i*)p), _mm256_loadu_si256((const __m256i*)(p + 32))}; }
static inline __m256i ffc_lo4_(__m256i v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0F)); }
static inline __m256i ffc_hi4_(__m256i v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F)); }
static inline ffc_qv ffc_qv_lo4(ffc_qv v) { return {ffc_lo4_(v.a), ffc_lo4_(v.b)}; }
static inline ffc_qv ffc_qv_hi4(ffc_qv v) { return {ffc_hi4_(v.a), ffc_hi4_(v.b)}; }
static inline ffc_qi ffc_qi_zero() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
template <bool BIG>
static inline __m256i ffc_dp4_(__m256i acc, __m256i v, __m256i xb) {
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, v, xb);
#else
  const __m256i one = _mm256_set1_epi16(1);
  if (BIG) {
    const __m256i lo = _mm256_and_si256(v, _mm256_set1_epi8(0x7F)), top = _mm256_and_si256(_mm256_srli_epi16(v, 7), _mm256_set1_epi8(1));
    acc = _mm256_add_epi32(acc, _mm256_slli_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(top, xb), one), 7));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(lo, xb), one));
  }
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(v, xb), one));
#endif
}
template <bool BIG>
static inline ffc_qi ffc_dp4(ffc_qi acc, ffc_qv v, int32_t x) {
  const __m256i xb = _mm256_set1_epi32(x);
  return {ffc_dp4_<BIG>(acc.a, v.a, xb), ffc_dp4_<BIG>(acc.b, v.b, xb)};
}
static inline ffc_qf ffc_qf_zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline ffc_qf ffc_qf_set(float v) { return {_mm256_set1_ps(v), _mm256_set1_ps(v)}; }
static inline ffc_qf ffc_qf_cvt(ffc_qi v) { return {_mm256_cvtepi32_ps(v.a), _mm256_cvtepi32_ps(v.b)}; }
static inline ffc_qf ffc_qf_mul(ffc_qf a, ffc_qf b) { return {_mm256_mul_ps(a.a, b.a), _mm256_mul_ps(a.b, b.b)}; }
static inline ffc_qf ffc_qf_fma(ffc_qf a, ffc_qf b, ffc_qf c) { return {_mm256_fmadd_ps(a.a, b.a, c.a), _mm256_fmadd_ps(a.b, b.b, c.b)}; }
static inline ffc_qf ffc_qf_f16(const uint8_t* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + 16)))};
}
static inline ffc_qf ffc_qf_f32(const uint8_t* p) { return {_mm256_loadu_ps((const float*)p), _mm256_loadu_ps((const float*)p + 8)}; }
static inline __m256 ffc_u8x8_(const uint8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p))); }
static inline __m256 ffc_s8x8_(const uint8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p))); }
static inline ffc_qf ffc_qf_u8(const uint8_t* p) { return {ffc_u8x8_(p), ffc_u8x8_(p + 8)}; }
static inline ffc_qf ffc_qf_s8(const uint8_t* p) { return {ffc_s8x8_(p), ffc_s8x8_(p + 8)}; }
static inline void ffc_qf_store(float* p, ffc_qf v) { _mm256_storeu_ps(p, v.a); _mm256_storeu_ps(p + 8, v.b); }
#else
#define FFC_QISA "scalar"
struct ffc_qv { uint8_t v[64]; };
struct ffc_qi { int32_t v[16]; };
struct ffc_qf { float v[16]; };
static inline ffc_qv ffc_qv_load(const uint8_t* p) { ffc_qv r; std::memcpy(r.v, p, 64); return r; }
static inline ffc_qv ffc_qv_lo4(ffc_qv v) { for (int i = 0; i < 64; ++i) v.v[i] &= 0x0F; return v; }
static inline ffc_qv ffc_qv_hi4(ffc_qv v) { for (int i = 0; i < 64; ++i) v.v[i] >>= 4; return v; }
static inline ffc_qi ffc_qi_zero() { ffc_qi r; for (int i = 0; i < 16; ++i) r.v[i] = 0; return r; }
template <bool BIG>
static inline ffc_qi ffc_dp4(ffc_qi acc, ffc_qv v, int32_t x) {
  int8_t xs[4];
  std::memcpy(xs, &x, 4);
  for (int l = 0; l < 16; ++l)
    for (int j = 0; j < 4; ++j) acc.v[l] += int32_t(v.v[4 * l + j]) * int32_t(xs[j]);
  return acc;
}
static inline ffc_qf ffc_qf_set(float s) { ffc_qf r; for (int i = 0; i < 16; ++i) r.v[i] = s; return r; }
static inline ffc_qf ffc_qf_zero() { return ffc_qf_set(0.0f); }
static inline ffc_qf ffc_qf_cvt(ffc_qi a) { ffc_qf r; for (int i = 0; i < 16; ++i) r.v[i] = float(a.v[i]); return r; }
static inline ffc_qf ffc_qf_mul(ffc_qf a, ffc_qf b) { for (int i = 0; i < 16; ++i) a.v[i] *= b.v[i]; return a; }
static inline ffc_qf ffc_qf_fma(ffc_qf a, ffc_qf b, ffc_qf c) { for (int i = 0; i < 16; ++i) c.v[i] = std::fma(a.v[i], b.v[i], c.v[i]); return c; }
static inline ffc_qf ffc_qf_f16(const uint8_t* p) {
  ffc_qf r;
  for (int i = 0; i < 16; ++i) { ffc_f16 h; std::memcpy(&h.x, p + 2 * i, 2); r.v[i] = ffc_to_f32(h); }
  return r;
}
static inline ffc_qf ffc_qf_f32(const uint8_t* p) { ffc_qf r; std::memcpy(r.v, p, 64); return r; }
static inline ffc_qf ffc_qf_u8(const uint8_t* p) { ffc_qf r; for (int i = 0; i < 16; ++i) r.v[i] = float(p[i]); return r; }
static inline ffc_qf ffc_qf_s8(const uint8_t* p) { ffc_qf r; for (int i = 0; i < 16; ++i) r.v[i] = float(int8_t(p[i])); return r; }
static inline void ffc_qf_store(float* p, ffc_qf v) { std::memcpy(p, v.v, 64); }
#endif

// ------------------------------------------------------------------ formats
// Each format: BITS of a stored value, BIG (values above 127), HALVES (scale granularity: 1 per
// chunk, 2 per half-chunk), HB header bytes per superblock, CB bytes per chunk (its scale bytes
// SCB then the values), sb(KC) chunks per superblock, and scales(): the scale and min of each
// row for chunk j of a superblock.
template <int BITS_, bool BIG_, int HALVES_, int HB_, int SCB_, int SB_>
struct ffc_qfmt_base {
  static constexpr int BITS = BITS_, HALVES = HALVES_, HB = HB_, SCB = SCB_;
  static constexpr bool BIG = BIG_;
  static constexpr int CB = SCB_ + (BITS_ == 4 ? 256 : 512);
  static int64_t sb(int64_t kc) { return SB_ > 0 ? SB_ : kc; }
  static int64_t panel_bytes(int64_t K) { const int64_t kc = K / FFC_QK; return kc / sb(kc) * HB + kc * CB; }
};
struct ffc_fmt_q4_0 : ffc_qfmt_base<4, false, 1, 0, 32, 1> {        // d; w = d q - 8 d
  static void scales(const uint8_t*, const uint8_t* c, int, ffc_qf* s, ffc_qf* m) {
    s[0] = ffc_qf_f16(c); m[0] = ffc_qf_mul(s[0], ffc_qf_set(-8.0f));
  }
};
struct ffc_fmt_q4_1 : ffc_qfmt_base<4, false, 1, 0, 64, 1> {        // d, m; w = d q + m
  static void scales(const uint8_t*, const uint8_t* c, int, ffc_qf* s, ffc_qf* m) { s[0] = ffc_qf_f16(c); m[0] = ffc_qf_f16(c + 32); }
};
struct ffc_fmt_i4g64 : ffc_qfmt_base<4, false, 1, 64, 0, 2> {       // per 64: d, m in the header
  static void scales(const uint8_t* h, const uint8_t*, int, ffc_qf* s, ffc_qf* m) { s[0] = ffc_qf_f16(h); m[0] = ffc_qf_f16(h + 32); }
};
struct ffc_fmt_q8_0 : ffc_qfmt_base<8, true, 1, 0, 32, 1> {         // d; stored q + 128: w = d u - 128 d
  static void scales(const uint8_t*, const uint8_t* c, int, ffc_qf* s, ffc_qf* m) {
    s[0] = ffc_qf_f16(c); m[0] = ffc_qf_mul(s[0], ffc_qf_set(-128.0f));
  }
};
struct ffc_fmt_i8r : ffc_qfmt_base<8, true, 1, 64, 0, 0> {          // one f32 scale per row; stored q + 128
  static void scales(const uint8_t* h, const uint8_t*, int, ffc_qf* s, ffc_qf* m) {
    s[0] = ffc_qf_f32(h); m[0] = ffc_qf_mul(s[0], ffc_qf_set(-128.0f));
  }
};
struct ffc_fmt_q4_k : ffc_qfmt_base<4, false, 1, 64, 32, 8> {       // d, dmin per 256; 6-bit sc, m per 32
  static void scales(const uint8_t* h, const uint8_t* c, int, ffc_qf* s, ffc_qf* m) {
    s[0] = ffc_qf_mul(ffc_qf_f16(h), ffc_qf_u8(c));                            // d * sc (exact in fp32)
    m[0] = ffc_qf_mul(ffc_qf_mul(ffc_qf_f16(h + 32), ffc_qf_set(-1.0f)), ffc_qf_u8(c + 16));   // -(dmin * m)
  }
};
struct ffc_fmt_q6_k : ffc_qfmt_base<8, false, 2, 32, 32, 8> {       // d per 256; int8 sc per 16; w = d sc (q - 32)
  static void scales(const uint8_t* h, const uint8_t* c, int, ffc_qf* s, ffc_qf* m) {
    const ffc_qf d = ffc_qf_f16(h);
    for (int k = 0; k < 2; ++k) {
      s[k] = ffc_qf_mul(d, ffc_qf_s8(c + 16 * k));
      m[k] = ffc_qf_mul(s[k], ffc_qf_set(-32.0f));
    }
  }
};

// ------------------------------------------------------------------ activations
// One row of K activations quantized per block of 32: K int8 values, then per block four
// floats {dx, dx * sum(q), dx * sum(first 16 q), dx * sum(last 16 q)}; x ~ dx * q with
// dx = amax / 127 and q = round-to-nearest-even(x * (127 / amax)).
static inline int64_t ffc_qact_bytes(int64_t K) { return ((K + (K / FFC_QK) * 16) + 63) / 64 * 64; }

static inline void ffc_qact_row(const float* __restrict x, int64_t K, uint8_t* __restrict dst) {
  int8_t* q = (int8_t*)dst;
  float* info = (float*)(dst + K);
  for (int64_t c = 0; c < K / FFC_QK; ++c) {
    const float* xb = x + c * FFC_QK;
#if FFC_VW == 16
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(xb)),
                                                          _mm512_abs_ps(_mm512_loadu_ps(xb + 16))));
#else
    float amax = 0.0f;
    for (int i = 0; i < FFC_QK; ++i) amax = std::fmax(amax, std::fabs(xb[i]));
#endif
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f, dx = amax / 127.0f;
    int32_t s0 = 0, s1 = 0;
#if FFC_VW == 16
    for (int i = 0; i < FFC_QK; i += 16) {
      const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xb + i), _mm512_set1_ps(inv)));
      _mm_storeu_si128((__m128i*)(q + c * FFC_QK + i), _mm512_cvtsepi32_epi8(v));
      (i == 0 ? s0 : s1) = _mm512_reduce_add_epi32(v);
    }
#else
    for (int i = 0; i < FFC_QK; ++i) {
      const int32_t v = (int32_t)std::nearbyint(xb[i] * inv);
      q[c * FFC_QK + i] = (int8_t)v;
      (i < 16 ? s0 : s1) += v;
    }
#endif
    info[4 * c] = dx;
    info[4 * c + 1] = dx * float(s0 + s1);
    info[4 * c + 2] = dx * float(s0);
    info[4 * c + 3] = dx * float(s1);
  }
}

// ------------------------------------------------------------------ the micro-kernel
// t[i][0:16] = sum over K of w[row][k] * xhat[i][k] for i < MR: act rows at act + i * ald.
template <int MR, class F>
static inline void ffc_qtile(const uint8_t* __restrict act, int64_t ald, const uint8_t* __restrict panel, int64_t K,
                             float* __restrict t) {
  const int64_t KC = K / FFC_QK, SB = F::sb(KC);
  ffc_qf acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = ffc_qf_zero();
  const uint8_t* pp = panel;
  for (int64_t c0 = 0; c0 < KC; c0 += SB) {
    const uint8_t* hdr = pp;
    pp += F::HB;
    for (int64_t c = c0; c < c0 + SB; ++c, pp += F::CB) {
      for (int b = 0; b < F::CB; b += 64) {   // 8 chunks ahead; with several rows (a chunk takes longer)
        if constexpr (MR > 1) __builtin_prefetch(pp + 32 * F::CB + b, 0, 2);   // into L2 32 ahead first
        __builtin_prefetch(pp + 8 * F::CB + b);
      }
      ffc_qf sc[2], mn[2];
      F::scales(hdr, pp, (int)(c - c0), sc, mn);
      const uint8_t* vals = pp + F::SCB;
      if constexpr (F::BITS == 4) {
        ffc_qi d[MR];
        for (int i = 0; i < MR; ++i) d[i] = ffc_qi_zero();
        for (int g = 0; g < 4; ++g) {
          const ffc_qv v = ffc_qv_load(vals + 64 * g);
          const ffc_qv lo = ffc_qv_lo4(v), hi = ffc_qv_hi4(v);
          for (int i = 0; i < MR; ++i) {
            const uint8_t* xq = act + i * ald + c * FFC_QK;
            int32_t x0, x1;
            std::memcpy(&x0, xq + 4 * g, 4);
            std::memcpy(&x1, xq + 16 + 4 * g, 4);
            d[i] = ffc_dp4<false>(d[i], lo, x0);
            d[i] = ffc_dp4<false>(d[i], hi, x1);
          }
        }
        for (int i = 0; i < MR; ++i) {
          const float* info = (const float*)(act + i * ald + K) + 4 * c;
          acc[i] = ffc_qf_fma(ffc_qf_cvt(d[i]), ffc_qf_mul(sc[0], ffc_qf_set(info[0])), acc[i]);
          acc[i] = ffc_qf_fma(mn[0], ffc_qf_set(info[1]), acc[i]);
        }
      } else {
        for (int h = 0; h < F::HALVES; ++h) {
          ffc_qi d[MR];
          for (int i = 0; i < MR; ++i) d[i] = ffc_qi_zero();
          for (int g = h * 8 / F::HALVES; g < (h + 1) * 8 / F::HALVES; ++g) {
            const ffc_qv v = ffc_qv_load(vals + 64 * g);
            for (int i = 0; i < MR; ++i) {
              int32_t x0;
              std::memcpy(&x0, act + i * ald + c * FFC_QK + 4 * g, 4);
              d[i] = ffc_dp4<F::BIG>(d[i], v, x0);
            }
          }
          for (int i = 0; i < MR; ++i) {
            const float* info = (const float*)(act + i * ald + K) + 4 * c;
            acc[i] = ffc_qf_fma(ffc_qf_cvt(d[i]), ffc_qf_mul(sc[h], ffc_qf_set(info[0])), acc[i]);
            acc[i] = ffc_qf_fma(mn[h], ffc_qf_set(info[F::HALVES == 1 ? 1 : 2 + h]), acc[i]);
          }
        }
      }
    }
  }
  for (int i = 0; i < MR; ++i) ffc_qf_store(t + i * FFC_QR, acc[i]);
}

#if FFC_VW == 16
#define FFC_QMR 8
#elif FFC_VW == 8
#define FFC_QMR 3
#else
#define FFC_QMR 2
#endif

template <int R, class F>
static inline void ffc_qtile_rows(int mr, const uint8_t* act, int64_t ald, const uint8_t* panel, int64_t K, float* t) {
  if constexpr (R > 1) {
    if (mr < R) {
      ffc_qtile_rows<R - 1, F>(mr, act, ald, panel, K, t);
      return;
    }
  }
  ffc_qtile<R, F>(act, ald, panel, K, t);
}

// Row `row` of a quantized table packed in panels, dequantized into out[0:K] (embedding lookup).
template <class F>
static inline void ffc_qpanel_row(const uint8_t* __restrict tab, int64_t row, int64_t K, float* __restrict out) {
  const int64_t KC = K / FFC_QK, SB = F::sb(KC);
  const int lane = (int)(row % FFC_QR);
  const uint8_t* pp = tab + (row / FFC_QR) * F::panel_bytes(K);
  alignas(64) float s[2][16], m[2][16];
  for (int64_t c0 = 0; c0 < KC; c0 += SB) {
    const uint8_t* hdr = pp;
    pp += F::HB;
    for (int64_t c = c0; c < c0 + SB; ++c, pp += F::CB) {
      ffc_qf sc[2], mn[2];
      F::scales(hdr, pp, (int)(c - c0), sc, mn);
      for (int h = 0; h < F::HALVES; ++h) { ffc_qf_store(s[h], sc[h]); ffc_qf_store(m[h], mn[h]); }
      const uint8_t* vals = pp + F::SCB;
      float* o = out + c * FFC_QK;
      for (int k = 0; k < FFC_QK; ++k) {
        int q;
        if constexpr (F::BITS == 4) {
          const int g = (k % 16) / 4, j = k % 4;
          const uint8_t b = vals[64 * g + 4 * lane + j];
          q = k < 16 ? (b & 0x0F) : (b >> 4);
        } else {
          q = vals[64 * (k / 4) + 4 * lane + k % 4];
        }
        const int h = F::HALVES == 1 ? 0 : k / 16;
        o[k] = s[h][lane] * float(q) + m[h][lane];
      }
    }
  }
}

// Quantized weights read as stored (GGUF's row-major blocks, ir/quant.py): value k of a row of
// K values, dequantized as the reference does (w = scale * q + min, per block). The CUDA
// kernels read weights this way (a warp reads a block's 32 values side by side); host and
// device code.
#pragma once
#include "ffc_common.h"

#ifdef __CUDACC__
#define FFC_HDM __host__ __device__ __forceinline__    // a struct's static member, both sides
#else
#define FFC_HDM inline
#endif

FFC_HD float ffc_f16_at(const uint8_t* p) {
  ffc_f16 h;
  h.x = uint16_t(p[0] | (uint16_t(p[1]) << 8));
  return ffc_to_f32(h);
}
FFC_HD int ffc_nibble(const uint8_t* qs, int j, int half) {   // value j of 2 * half packed values
  return j < half ? (qs[j] & 0x0F) : (qs[j - half] >> 4);
}

struct ffc_row_q4_0 {
  static FFC_HDM int64_t bytes(int64_t K) { return K / 32 * 18; }
  static FFC_HDM float value(const uint8_t* row, int64_t k, int64_t) {
    const uint8_t* b = row + (k / 32) * 18;
    return ffc_f16_at(b) * float(ffc_nibble(b + 2, int(k % 32), 16) - 8);
  }
};
struct ffc_row_q4_1 {
  static FFC_HDM int64_t bytes(int64_t K) { return K / 32 * 20; }
  static FFC_HDM float value(const uint8_t* row, int64_t k, int64_t) {
    const uint8_t* b = row + (k / 32) * 20;
    return ffc_f16_at(b) * float(ffc_nibble(b + 4, int(k % 32), 16)) + ffc_f16_at(b + 2);
  }
};
struct ffc_row_i4g64 {
  static FFC_HDM int64_t bytes(int64_t K) { return K / 64 * 36; }
  static FFC_HDM float value(const uint8_t* row, int64_t k, int64_t) {
    const uint8_t* b = row + (k / 64) * 36;
    return ffc_f16_at(b) * float(ffc_nibble(b + 4, int(k % 64), 32)) + ffc_f16_at(b + 2);
  }
};
struct ffc_row_q8_0 {
  static FFC_HDM int64_t bytes(int64_t K) { return K / 32 * 34; }
  static FFC_HDM float value(const uint8_t* row, int64_t k, int64_t) {
    const uint8_t* b = row + (k / 32) * 34;
    return ffc_f16_at(b) * float(int8_t(b[2 + k % 32]));
  }
};
struct ffc_row_i8r {
  static FFC_HDM int64_t bytes(int64_t K) { return K + 4; }
  static FFC_HDM float value(const uint8_t* row, int64_t k, int64_t K) {
    float s;
    memcpy(&s, row + K, 4);
    return float(int8_t(row[k])) * s;
  }
};
struct ffc_row_q4_k {
  static FFC_HDM int64_t bytes(int64_t K) { return K / 256 * 144; }
  static FFC_HDM float value(const uint8_t* row, int64_t k, int64_t) {
    const uint8_t* b = row + (k / 256) * 144;
    const uint8_t* s = b + 4;
    const int j = int(k % 256) / 32, l = int(k % 32);
    int sc, m;
    if (j < 4) {
      sc = s[j] & 63;
      m = s[j + 4] & 63;
    } else {
      sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
      m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
    const uint8_t byte = b[16 + 32 * (j / 2) + l];
    const int q = (j % 2) ? (byte >> 4) : (byte & 0x0F);
    return (ffc_f16_at(b) * float(sc)) * float(q) - ffc_f16_at(b + 2) * float(m);
  }
};
struct ffc_row_q6_k {
  static FFC_HDM int64_t bytes(int64_t K) { return K / 256 * 210; }
  static FFC_HDM float value(const uint8_t* row, int64_t k, int64_t) {
    const uint8_t* b = row + (k / 256) * 210;
    const int i = int(k % 256), h = i / 128, r = i % 128;
    const int lo = ffc_nibble(b + 64 * h, r, 64);
    const int hi = (b[128 + 32 * h + r % 32] >> (2 * (r / 32))) & 3;
    return (ffc_f16_at(b + 208) * float(int8_t(b[192 + i / 16]))) * float((lo | (hi << 4)) - 32);
  }
};

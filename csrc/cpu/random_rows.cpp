// Vectorised Philox words, dropout and implicit R behind csrc/cpu/random_rows.h.
//
// Words: Philox4x32-10 on 8 (AVX-512) or 4 (AVX2) counters per register, one counter per 64-bit lane with
// its 32-bit word in the low half; _mm*_mul_epu32 gives the 32×32→64 products of a round directly. The high
// halves collect garbage that is never read (the multiply reads low halves only; outputs are truncated).
// Implicit R: Box–Muller on 8-lane float vectors with polynomial log and cos (Cephes-style minimax
// coefficients, about 1 ulp), so all of it runs in SIMD; sqrt is the hardware instruction.
#include "cpu/random_rows.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu/simd.h"
#include "svp/math.h"
#include "svp/philox.h"

#if SVP_X86_MULTIVERSION
#include <immintrin.h>
#endif

namespace svp::cpu {
namespace {

constexpr int kRounds = 10;
constexpr int64_t kBlock = 16;   // counters per call of a word kernel: buffers are whole blocks
constexpr int64_t kChunk = 256;  // offsets per stack buffer of words (a multiple of kBlock)

struct RoundKeys {
  uint64_t seed;
  uint32_t k0[kRounds], k1[kRounds];
};

RoundKeys round_keys(uint64_t seed) {
  RoundKeys keys;
  keys.seed = seed;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < kRounds; ++round) {
    keys.k0[round] = k0;
    keys.k1[round] = k1;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return keys;
}

// ---- Words 0 and 1 of `count` offsets from `first` (count a multiple of kBlock; word1 may be null) ------

void philox_words_scalar(const RoundKeys& keys, uint64_t first, int64_t count, uint32_t* word0, uint32_t* word1) {
  for (int64_t i = 0; i < count; ++i) {
    const PhiloxWords w = philox4x32_10(keys.seed, first + i);
    word0[i] = w.w0;
    if (word1 != nullptr) word1[i] = w.w1;
  }
}

#if SVP_X86_MULTIVERSION
// Two registers of 8 counters each per block: independent chains hide the multiply latency.
__attribute__((target("avx512f"))) void philox_words_avx512(const RoundKeys& keys, uint64_t first, int64_t count,
                                                            uint32_t* word0, uint32_t* word1) {
  constexpr int G = 2;
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0), m1 = _mm512_set1_epi64(kPhiloxM1);
  const __m512i lanes = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t i = 0; i < count; i += 8 * G) {
    __m512i c0[G], c1[G], c2[G], c3[G];
    for (int g = 0; g < G; ++g) {
      const __m512i offsets = _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>(first + i + 8 * g)), lanes);
      c0[g] = offsets;
      c1[g] = _mm512_srli_epi64(offsets, 32);
      c2[g] = c3[g] = _mm512_setzero_si512();
    }
    for (int round = 0; round < kRounds; ++round) {
      const __m512i k0 = _mm512_set1_epi64(keys.k0[round]), k1 = _mm512_set1_epi64(keys.k1[round]);
      for (int g = 0; g < G; ++g) {
        const __m512i product0 = _mm512_mul_epu32(c0[g], m0), product1 = _mm512_mul_epu32(c2[g], m1);
        c0[g] = _mm512_xor_si512(_mm512_xor_si512(_mm512_srli_epi64(product1, 32), c1[g]), k0);
        c2[g] = _mm512_xor_si512(_mm512_xor_si512(_mm512_srli_epi64(product0, 32), c3[g]), k1);
        c1[g] = product1;
        c3[g] = product0;
      }
    }
    for (int g = 0; g < G; ++g) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(word0 + i + 8 * g), _mm512_cvtepi64_epi32(c0[g]));
      if (word1 != nullptr) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(word1 + i + 8 * g), _mm512_cvtepi64_epi32(c1[g]));
      }
    }
  }
}

// Four registers of 4 counters each per block.
__attribute__((target("avx2"))) void philox_words_avx2(const RoundKeys& keys, uint64_t first, int64_t count,
                                                       uint32_t* word0, uint32_t* word1) {
  constexpr int G = 4;
  const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0), m1 = _mm256_set1_epi64x(kPhiloxM1);
  const __m256i lanes = _mm256_set_epi64x(3, 2, 1, 0);
  const __m256i low_halves = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  for (int64_t i = 0; i < count; i += 4 * G) {
    __m256i c0[G], c1[G], c2[G], c3[G];
    for (int g = 0; g < G; ++g) {
      const __m256i offsets = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<int64_t>(first + i + 4 * g)), lanes);
      c0[g] = offsets;
      c1[g] = _mm256_srli_epi64(offsets, 32);
      c2[g] = c3[g] = _mm256_setzero_si256();
    }
    for (int round = 0; round < kRounds; ++round) {
      const __m256i k0 = _mm256_set1_epi64x(keys.k0[round]), k1 = _mm256_set1_epi64x(keys.k1[round]);
      for (int g = 0; g < G; ++g) {
        const __m256i product0 = _mm256_mul_epu32(c0[g], m0), product1 = _mm256_mul_epu32(c2[g], m1);
        c0[g] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(product1, 32), c1[g]), k0);
        c2[g] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(product0, 32), c3[g]), k1);
        c1[g] = product1;
        c3[g] = product0;
      }
    }
    for (int g = 0; g < G; ++g) {
      const __m128i low0 = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(c0[g], low_halves));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(word0 + i + 4 * g), low0);
      if (word1 != nullptr) {
        const __m128i low1 = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(c1[g], low_halves));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(word1 + i + 4 * g), low1);
      }
    }
  }
}
#endif

enum class WordKernel { kScalar, kAvx2, kAvx512 };

WordKernel pick_word_kernel() {
#if SVP_X86_MULTIVERSION
  if (__builtin_cpu_supports("avx512f")) return WordKernel::kAvx512;
  if (__builtin_cpu_supports("avx2")) return WordKernel::kAvx2;
#endif
  return WordKernel::kScalar;
}

void philox_words(const RoundKeys& keys, uint64_t first, int64_t count, uint32_t* word0, uint32_t* word1) {
  static const WordKernel kernel = pick_word_kernel();
#if SVP_X86_MULTIVERSION
  if (kernel == WordKernel::kAvx512) return philox_words_avx512(keys, first, count, word0, word1);
  if (kernel == WordKernel::kAvx2) return philox_words_avx2(keys, first, count, word0, word1);
#endif
  philox_words_scalar(keys, first, count, word0, word1);
}

int64_t whole_blocks(int64_t n) { return (n + kBlock - 1) / kBlock * kBlock; }

// ---- Box–Muller on 8 lanes ---------------------------------------------------------------------------

using Floats = Vec<float>;
typedef int32_t Ints __attribute__((vector_size(32)));
typedef uint32_t Words __attribute__((vector_size(32)));
constexpr int kFloatLanes = kLanes<float>;

SVP_ALWAYS_INLINE Floats broadcast(float value) { return Floats{} + value; }

SVP_ALWAYS_INLINE Floats select(const Ints& condition, const Floats& if_true, const Floats& if_false) {
  return condition ? if_true : if_false;
}

// ln x for x in [2⁻²⁴, 1]: x = 2^e · m with m in [√½, √2), ln x = e ln 2 + ln m, ln m = f − f²/2 + f³·P(f)
// with f = m − 1; ln 2 is split in two so that e·ln 2 adds no rounding error of its own.
SVP_ALWAYS_INLINE Floats log_unit(const Floats& x) {
  const Ints bits = (Ints)x;  // the float's bits
  Ints exponent = (bits >> 23) - 126;  // x = 2^exponent · m, m in [0.5, 1)
  const Ints mantissa_bits = (bits & 0x007fffff) | 0x3f000000;
  const Floats m = (Floats)mantissa_bits;
  const Ints below = m < broadcast(0.70710678f);
  exponent = below ? exponent - 1 : exponent;
  const Floats f = select(below, m + m - 1.0f, m - 1.0f);
  const Floats z = f * f;
  Floats poly = broadcast(7.0376836292e-2f);
  poly = poly * f - 1.1514610310e-1f;
  poly = poly * f + 1.1676998740e-1f;
  poly = poly * f - 1.2420140846e-1f;
  poly = poly * f + 1.4249322787e-1f;
  poly = poly * f - 1.6668057665e-1f;
  poly = poly * f + 2.0000714765e-1f;
  poly = poly * f - 2.4999993993e-1f;
  poly = poly * f + 3.3333331174e-1f;
  const Floats e = __builtin_convertvector(exponent, Floats);
  Floats y = poly * f * z + e * -2.12194440e-4f;
  y = y - 0.5f * z;
  return (f + y) + e * 0.693359375f;
}

// cos a for a in [0, 2π]: a = k·π/2 + r with |r| ≤ π/4 (π/2 in three parts, Cody–Waite), then the sine or
// cosine polynomial of r and the sign of quadrant k.
SVP_ALWAYS_INLINE Floats cos_of_angle(const Floats& a) {
  const Ints k = __builtin_convertvector(a * 0.63661977236758134f + 0.5f, Ints);  // round(a / (π/2)), a ≥ 0
  const Floats kf = __builtin_convertvector(k, Floats);
  Floats r = a - kf * 1.5703125f;
  r = r - kf * 4.837512969970703125e-4f;
  r = r - kf * 7.54978995489188216e-8f;
  const Floats z = r * r;
  const Floats sine = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * r + r;
  const Floats cosine =
      ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z - 0.5f * z + 1.0f;
  const Floats value = select((k & 1) != 0, sine, cosine);
  return select(((k + 1) & 2) != 0, -value, value);
}

SVP_ALWAYS_INLINE Floats sqrt_of(const Floats& x) {
  Floats root;
  for (int lane = 0; lane < kFloatLanes; ++lane) root[lane] = std::sqrt(x[lane]);
  return root;
}

// out[i] for i < n from words 0 and 1 (both whole blocks long): the formula of svp::implicit_normal.
SVP_MULTIVERSION void normals_from_words(const uint32_t* word0, const uint32_t* word1, int64_t n, float std,
                                         float* out) {
  constexpr float kTwoPi = 6.28318530717958647692f;  // float32 2π, as in svp/philox.h
  for (int64_t i = 0; i < n; i += kFloatLanes) {
    Words first_words, second_words;
    std::memcpy(&first_words, word0 + i, sizeof(Words));
    std::memcpy(&second_words, word1 + i, sizeof(Words));
    // (w >> 8) < 2²⁴ + 1: exact as int32 and as float32.
    const Floats u1 = __builtin_convertvector((Ints)((first_words >> 8) + 1u), Floats) *
                      (1.0f / 16777216.0f);
    const Floats u2 = __builtin_convertvector((Ints)(second_words >> 8), Floats) *
                      (1.0f / 16777216.0f);
    const Floats value = sqrt_of(-2.0f * log_unit(u1)) * cos_of_angle(kTwoPi * u2) * std;
    if (i + kFloatLanes <= n) {
      store_vec(out + i, value);
    } else {
      for (int64_t lane = 0; lane < n - i; ++lane) out[i + lane] = value[lane];
    }
  }
}

template <typename T>
SVP_ALWAYS_INLINE void dropout_from_words_impl(const uint32_t* word0, int64_t n, float p, T scale, const T* source,
                                               T* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = dropped_value(source[i], word0[i], p, scale);
}

SVP_MULTIVERSION void dropout_from_words(const uint32_t* word0, int64_t n, float p, float scale, const float* source,
                                         float* out) {
  dropout_from_words_impl(word0, n, p, scale, source, out);
}
SVP_MULTIVERSION void dropout_from_words(const uint32_t* word0, int64_t n, float p, double scale,
                                         const double* source, double* out) {
  dropout_from_words_impl(word0, n, p, scale, source, out);
}

}  // namespace

void implicit_normals(uint64_t proj_seed, uint64_t first, int64_t n, float std, float* out) {
  const RoundKeys keys = round_keys(proj_seed);
  alignas(64) uint32_t word0[kChunk], word1[kChunk];
  for (int64_t i = 0; i < n; i += kChunk) {
    const int64_t count = std::min(kChunk, n - i);
    philox_words(keys, first + i, whole_blocks(count), word0, word1);
    normals_from_words(word0, word1, count, std, out + i);
  }
}

void implicit_normals(uint64_t proj_seed, uint64_t first, int64_t n, float std, double* out) {
  alignas(64) float values[kChunk];
  for (int64_t i = 0; i < n; i += kChunk) {
    const int64_t count = std::min(kChunk, n - i);
    implicit_normals(proj_seed, first + i, count, std, values);
    std::copy(values, values + count, out + i);
  }
}

template <typename T>
void dropout_run_impl(uint64_t seed, uint64_t first, int64_t n, float p, T scale, const T* source, T* out) {
  const RoundKeys keys = round_keys(seed);
  alignas(64) uint32_t word0[kChunk];
  for (int64_t i = 0; i < n; i += kChunk) {
    const int64_t count = std::min(kChunk, n - i);
    philox_words(keys, first + i, whole_blocks(count), word0, nullptr);
    dropout_from_words(word0, count, p, scale, source + i, out + i);
  }
}

void dropout_run(uint64_t seed, uint64_t first, int64_t n, float p, float scale, const float* source, float* out) {
  dropout_run_impl(seed, first, n, p, scale, source, out);
}
void dropout_run(uint64_t seed, uint64_t first, int64_t n, float p, double scale, const double* source,
                 double* out) {
  dropout_run_impl(seed, first, n, p, scale, source, out);
}

}  // namespace svp::cpu

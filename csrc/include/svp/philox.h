// Philox4x32-10 and the word-to-value conversions of docs/design.md §3, shared by every C++/CUDA backend.
//
// Header-only, no torch header: compiles with any C++17 host compiler and with nvcc (the functions are
// __host__ __device__ there). Counter (lo32(n), hi32(n), 0, 0), key (lo32(seed), hi32(seed)), 10 rounds.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SVP_HD __host__ __device__ __forceinline__
#else
#define SVP_HD inline
#endif

namespace svp {

struct PhiloxWords {
  uint32_t w0, w1, w2, w3;
};

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;  // multiplies counter word 0
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;  // multiplies counter word 2
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // key increment, word 0
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // key increment, word 1

SVP_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(product >> 32);
  lo = static_cast<uint32_t>(product);
}

// The four raw words for element offset n under `seed`.
SVP_HD PhiloxWords philox4x32_10(uint64_t seed, uint64_t n) {
  uint32_t c0 = static_cast<uint32_t>(n), c1 = static_cast<uint32_t>(n >> 32), c2 = 0u, c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kPhiloxM0, c0, hi0, lo0);
    mulhilo32(kPhiloxM1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return PhiloxWords{c0, c1, c2, c3};
}

// u24(x) = (x >> 8) * 2^-24: exact in float32, in [0, 1).
SVP_HD float u24(uint32_t word) { return static_cast<float>(word >> 8) * (1.0f / 16777216.0f); }

// Dropout on R: element offset n is kept iff u24(word0) >= p (p = 0 keeps everything).
SVP_HD bool keep(uint64_t seed, uint64_t n, float p) { return u24(philox4x32_10(seed, n).w0) >= p; }

// Implicit R: sqrt(-2 ln u1) * cos(2 pi u2) * std, u1 = ((w0 >> 8) + 1) 2^-24 in (0, 1], u2 = u24(w1).
// Computed in float32 for every dtype, so every backend agrees up to the rounding of log/cos.
SVP_HD float implicit_normal(uint64_t proj_seed, uint64_t n, float std) {
  const PhiloxWords w = philox4x32_10(proj_seed, n);
  const float u1 = static_cast<float>((w.w0 >> 8) + 1u) * (1.0f / 16777216.0f);
  const float u2 = u24(w.w1);
  constexpr float kTwoPi = 6.28318530717958647692f;
#if defined(__CUDA_ARCH__)
  const float radius = sqrtf(-2.0f * logf(u1));
  const float angle = cosf(kTwoPi * u2);
#else
  const float radius = std::sqrt(-2.0f * std::log(u1));
  const float angle = std::cos(kTwoPi * u2);
#endif
  return radius * angle * std;
}

}  // namespace svp

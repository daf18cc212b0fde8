// Portable SIMD for the CPU kernels: 32-byte GCC/Clang vectors, and function multi-versioning.
//
// The build uses no -march flag. Instead, the few hot loops are marked SVP_MULTIVERSION: GCC compiles
// them for baseline x86-64, x86-64-v3 (AVX2 + FMA) and x86-64-v4 (AVX-512) and picks one when the library
// loads. Vec<T> arithmetic lowers to whatever the selected target offers (two SSE halves on baseline).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SVP_X86_MULTIVERSION 1
#define SVP_MULTIVERSION __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define SVP_X86_MULTIVERSION 0
#define SVP_MULTIVERSION
#endif

#define SVP_ALWAYS_INLINE inline __attribute__((always_inline))

namespace svp::cpu {

template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(32)));
};

template <typename T>
using Vec = typename VecOf<T>::type;

template <typename T>
constexpr int kLanes = 32 / sizeof(T);

// 64-byte vectors: one AVX-512 register (for kernels that run them only where has_32_vector_registers()).
template <typename T>
struct WideVecOf;
template <>
struct WideVecOf<float> {
  typedef float type __attribute__((vector_size(64)));
};
template <>
struct WideVecOf<double> {
  typedef double type __attribute__((vector_size(64)));
};

template <typename T>
using WideVec = typename WideVecOf<T>::type;

// Whether 32-byte vectors get 32 registers (AVX-512, where the x86-64-v4 clone runs) rather than 16,
// so that micro-kernels can hold larger register blocks.
inline bool has_32_vector_registers() {
#if SVP_X86_MULTIVERSION
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
  return avx512;
#else
  return false;
#endif
}

template <typename T, typename V = Vec<T>>
SVP_ALWAYS_INLINE V load_vec(const T* source) {
  V value;
  std::memcpy(&value, source, sizeof(value));
  return value;
}

template <typename T, typename V>
SVP_ALWAYS_INLINE void store_vec(T* destination, const V& value) {
  std::memcpy(destination, &value, sizeof(value));
}

// Lanes summed in index order, so the result does not depend on the instruction set.
template <typename T>
SVP_ALWAYS_INLINE T horizontal_sum(const Vec<T>& value) {
  T sum = T(0);
  for (int lane = 0; lane < kLanes<T>; ++lane) sum += value[lane];
  return sum;
}

}  // namespace svp::cpu

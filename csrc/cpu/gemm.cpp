// Register-blocked micro-kernels behind csrc/cpu/gemm.h, multi-versioned for x86-64 (csrc/cpu/simd.h).
#include "cpu/gemm.h"

#include "cpu/simd.h"

namespace svp::cpu {
namespace {

constexpr int kRowBlock = 4;  // output rows per micro-kernel call (twice that for gemm_nn with 32 registers)

// ---- out += x · yᵀ -----------------------------------------------------------------------------------

// An RB × CB block: RB·CB vector accumulators over j, each reduced lane by lane, then the scalar tail of j.
template <typename T, int RB, int CB>
SVP_ALWAYS_INLINE void nt_block(const T* x, int64_t ldx, const T* y, int64_t ldy, int64_t width, T* out,
                                int64_t ldo) {
  constexpr int L = kLanes<T>;
  Vec<T> acc[RB][CB];
  for (int r = 0; r < RB; ++r)
    for (int k = 0; k < CB; ++k) acc[r][k] = Vec<T>{};
  int64_t j = 0;
  for (; j + L <= width; j += L) {
    Vec<T> y_chunk[CB];
    for (int k = 0; k < CB; ++k) y_chunk[k] = load_vec(y + k * ldy + j);
    for (int r = 0; r < RB; ++r) {
      const Vec<T> x_chunk = load_vec(x + r * ldx + j);
      for (int k = 0; k < CB; ++k) acc[r][k] += x_chunk * y_chunk[k];
    }
  }
  for (int r = 0; r < RB; ++r) {
    for (int k = 0; k < CB; ++k) {
      T sum = horizontal_sum<T>(acc[r][k]);
      for (int64_t jj = j; jj < width; ++jj) sum += x[r * ldx + jj] * y[k * ldy + jj];
      out[r * ldo + k] += sum;
    }
  }
}

template <typename T, int RB, int CB>
SVP_ALWAYS_INLINE void nt_rows(const T* x, int64_t ldx, const T* y, int64_t ldy, int64_t cols, int64_t width, T* out,
                               int64_t ldo) {
  int64_t c = 0;
  for (; c + CB <= cols; c += CB) nt_block<T, RB, CB>(x, ldx, y + c * ldy, ldy, width, out + c, ldo);
  if constexpr (CB > 2) {
    for (; c + 2 <= cols; c += 2) nt_block<T, RB, 2>(x, ldx, y + c * ldy, ldy, width, out + c, ldo);
  }
  for (; c < cols; ++c) nt_block<T, RB, 1>(x, ldx, y + c * ldy, ldy, width, out + c, ldo);
}

template <typename T, int CB>
SVP_ALWAYS_INLINE void gemm_nt_blocks(const T* x, int64_t ldx, int64_t rows, const T* y, int64_t ldy, int64_t cols,
                                      int64_t width, T* out, int64_t ldo) {
  int64_t r = 0;
  for (; r + kRowBlock <= rows; r += kRowBlock) {
    nt_rows<T, kRowBlock, CB>(x + r * ldx, ldx, y, ldy, cols, width, out + r * ldo, ldo);
  }
  for (; r < rows; ++r) nt_rows<T, 1, CB>(x + r * ldx, ldx, y, ldy, cols, width, out + r * ldo, ldo);
}

// 4 × 4 blocks (16 accumulators + 5 operands) pay off only with 32 vector registers; 4 × 2 blocks avoid
// spills elsewhere. Each output element is computed identically either way.
template <typename T>
SVP_ALWAYS_INLINE void gemm_nt_impl(const T* x, int64_t ldx, int64_t rows, const T* y, int64_t ldy, int64_t cols,
                                    int64_t width, T* out, int64_t ldo) {
  if (has_32_vector_registers()) {
    gemm_nt_blocks<T, 4>(x, ldx, rows, y, ldy, cols, width, out, ldo);
  } else {
    gemm_nt_blocks<T, 2>(x, ldx, rows, y, ldy, cols, width, out, ldo);
  }
}

// ---- out (+)= a · m ----------------------------------------------------------------------------------

// Element (r, i) of a, and the offset of row r: a is rows × inner with row stride lda, or, when AT (a
// transposed: gemm_tn), inner × rows with row stride lda.
template <bool AT, typename T>
SVP_ALWAYS_INLINE T a_element(const T* a, int64_t lda, int r, int64_t i) {
  return AT ? a[i * lda + r] : a[r * lda + i];
}
template <bool AT>
SVP_ALWAYS_INLINE int64_t a_row(int64_t lda, int64_t r) {
  return AT ? r : r * lda;
}

// RB rows × JB vectors (of type V) of output columns, summed over the inner index in increasing order. The
// vector width changes which columns share a register, never the order of any element's sum.
template <bool AT, typename T, int RB, int JB, typename V = Vec<T>>
SVP_ALWAYS_INLINE void nn_block(const T* a, int64_t lda, const T* m, int64_t ldm, int64_t inner, T* out, int64_t ldo,
                                bool accumulate) {
  constexpr int L = sizeof(V) / sizeof(T);
  V acc[RB][JB];
  for (int r = 0; r < RB; ++r)
    for (int k = 0; k < JB; ++k) acc[r][k] = accumulate ? load_vec<T, V>(out + r * ldo + k * L) : V{};
  for (int64_t i = 0; i < inner; ++i) {
    V m_chunk[JB];
    for (int k = 0; k < JB; ++k) m_chunk[k] = load_vec<T, V>(m + i * ldm + k * L);
    for (int r = 0; r < RB; ++r) {
      const T a_value = a_element<AT>(a, lda, r, i);
      for (int k = 0; k < JB; ++k) acc[r][k] += a_value * m_chunk[k];
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int k = 0; k < JB; ++k) store_vec(out + r * ldo + k * L, acc[r][k]);
}

// Wide: 64-byte vectors first (AVX-512 registers), then 32-byte ones, then single columns. Over a long inner
// index, passes of three registers (RB · 3 accumulators) load each row block of a once per 48 float columns
// instead of 32; over a short one (the backward at C = 10: inner = C) their extra accumulators cost more in
// setup and stores than they save.
constexpr int64_t kLongInner = 64;

template <bool AT, typename T, int RB, bool Wide>
SVP_ALWAYS_INLINE void nn_rows(const T* a, int64_t lda, const T* m, int64_t ldm, int64_t inner, int64_t width, T* out,
                               int64_t ldo, bool accumulate) {
  constexpr int64_t L = kLanes<T>;
  int64_t j = 0;
  if constexpr (Wide) {
    constexpr int64_t W = 2 * L;
    if (inner >= kLongInner) {
      for (; j + 3 * W <= width; j += 3 * W) {
        nn_block<AT, T, RB, 3, WideVec<T>>(a, lda, m + j, ldm, inner, out + j, ldo, accumulate);
      }
    }
    for (; j + 2 * W <= width; j += 2 * W) {
      nn_block<AT, T, RB, 2, WideVec<T>>(a, lda, m + j, ldm, inner, out + j, ldo, accumulate);
    }
    for (; j + W <= width; j += W) {
      nn_block<AT, T, RB, 1, WideVec<T>>(a, lda, m + j, ldm, inner, out + j, ldo, accumulate);
    }
  }
  for (; j + 2 * L <= width; j += 2 * L) nn_block<AT, T, RB, 2>(a, lda, m + j, ldm, inner, out + j, ldo, accumulate);
  for (; j + L <= width; j += L) nn_block<AT, T, RB, 1>(a, lda, m + j, ldm, inner, out + j, ldo, accumulate);
  for (; j < width; ++j) {
    for (int r = 0; r < RB; ++r) {
      T sum = accumulate ? out[r * ldo + j] : T(0);
      for (int64_t i = 0; i < inner; ++i) sum += a_element<AT>(a, lda, r, i) * m[i * ldm + j];
      out[r * ldo + j] = sum;
    }
  }
}

template <bool AT, typename T, int RB, bool Wide>
SVP_ALWAYS_INLINE void gemm_nn_blocks(const T* a, int64_t lda, int64_t rows, const T* m, int64_t ldm, int64_t inner,
                                      int64_t width, T* out, int64_t ldo, bool accumulate) {
  int64_t r = 0;
  for (; r + RB <= rows; r += RB) {
    nn_rows<AT, T, RB, Wide>(a + a_row<AT>(lda, r), lda, m, ldm, inner, width, out + r * ldo, ldo, accumulate);
  }
  if constexpr (RB > kRowBlock) {
    for (; r + kRowBlock <= rows; r += kRowBlock) {
      nn_rows<AT, T, kRowBlock, Wide>(a + a_row<AT>(lda, r), lda, m, ldm, inner, width, out + r * ldo, ldo,
                                      accumulate);
    }
  }
  for (; r < rows; ++r) {
    nn_rows<AT, T, 1, Wide>(a + a_row<AT>(lda, r), lda, m, ldm, inner, width, out + r * ldo, ldo, accumulate);
  }
}

// 8 rows × 2 AVX-512 registers (16 accumulators) with 32 vector registers, 4 × 2 32-byte vectors otherwise;
// identical sums either way.
template <bool AT, typename T>
SVP_ALWAYS_INLINE void gemm_nn_impl(const T* a, int64_t lda, int64_t rows, const T* m, int64_t ldm, int64_t inner,
                                    int64_t width, T* out, int64_t ldo, bool accumulate) {
  if (has_32_vector_registers()) {
    gemm_nn_blocks<AT, T, 2 * kRowBlock, true>(a, lda, rows, m, ldm, inner, width, out, ldo, accumulate);
  } else {
    gemm_nn_blocks<AT, T, kRowBlock, false>(a, lda, rows, m, ldm, inner, width, out, ldo, accumulate);
  }
}

}  // namespace

SVP_MULTIVERSION void gemm_nt_accumulate(const float* x, int64_t ldx, int64_t rows, const float* y, int64_t ldy,
                                         int64_t cols, int64_t width, float* out, int64_t ldo) {
  gemm_nt_impl(x, ldx, rows, y, ldy, cols, width, out, ldo);
}
SVP_MULTIVERSION void gemm_nt_accumulate(const double* x, int64_t ldx, int64_t rows, const double* y, int64_t ldy,
                                         int64_t cols, int64_t width, double* out, int64_t ldo) {
  gemm_nt_impl(x, ldx, rows, y, ldy, cols, width, out, ldo);
}

SVP_MULTIVERSION void gemm_nn(const float* a, int64_t lda, int64_t rows, const float* m, int64_t ldm, int64_t inner,
                              int64_t width, float* out, int64_t ldo, bool accumulate) {
  gemm_nn_impl<false>(a, lda, rows, m, ldm, inner, width, out, ldo, accumulate);
}
SVP_MULTIVERSION void gemm_nn(const double* a, int64_t lda, int64_t rows, const double* m, int64_t ldm,
                              int64_t inner, int64_t width, double* out, int64_t ldo, bool accumulate) {
  gemm_nn_impl<false>(a, lda, rows, m, ldm, inner, width, out, ldo, accumulate);
}

SVP_MULTIVERSION void gemm_tn(const double* a, int64_t lda, int64_t rows, const double* m, int64_t ldm,
                              int64_t inner, int64_t width, double* out, int64_t ldo, bool accumulate) {
  gemm_nn_impl<true>(a, lda, rows, m, ldm, inner, width, out, ldo, accumulate);
}

}  // namespace svp::cpu

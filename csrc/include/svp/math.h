// The per-element and per-row math of docs/design.md §2, shared by the CPU and CUDA kernels.
//
// Header-only, no torch header; every function is __host__ __device__ under nvcc (SVP_HD). T is the
// accumulation dtype (float or double); rows are contiguous arrays of n values.
#pragma once

#include <math.h>

#include <cstdint>

#include "svp/philox.h"

namespace svp {

// ε of â_b = v_b / max(‖v_b‖, ε).
constexpr double kNormEps = 1e-12;

SVP_HD float sqrt_of(float x) { return sqrtf(x); }
SVP_HD double sqrt_of(double x) { return sqrt(x); }
SVP_HD float exp_of(float x) { return expf(x); }
SVP_HD double exp_of(double x) { return exp(x); }
SVP_HD float log_of(float x) { return logf(x); }
SVP_HD double log_of(double x) { return log(x); }

// 1 / (1 − p), computed once in double and rounded to T (the reference's scalar tensor).
template <typename T>
SVP_HD T dropout_scale(double p) {
  return static_cast<T>(1.0 / (1.0 - p));
}

// R̃[c, j] from R[c, j] and Philox word0 of the dropout seed at offset c·D + j: R · (1/q if kept else 0).
// Multiplying (rather than selecting) keeps the reference's R ⊙ M / q bit for bit, NaN·0 included.
template <typename T>
SVP_HD T dropped_value(T r, uint32_t dropout_word0, float p, T scale) {
  return r * (u24(dropout_word0) >= p ? scale : T(0));
}

// The feature-space identity costs B·(C+C')² against B²·(C+C') for batch-space Grams.
SVP_HD bool feature_space_is_cheaper(int64_t batch, int64_t features, int64_t prev_features) {
  return features + prev_features < batch;
}

// Cross-entropy of one row: returns logsumexp(v) − v[y] and writes grad = (softmax(v) − onehot(y)) · grad_scale.
// A target outside [0, n) is never read through: the row's loss and every gradient element are NaN.
template <typename T>
SVP_HD T cross_entropy_row(const T* v, int64_t n, int64_t y, T grad_scale, T* grad) {
  if (y < 0 || y >= n) {
    for (int64_t c = 0; c < n; ++c) grad[c] = static_cast<T>(NAN);
    return static_cast<T>(NAN);
  }
  T row_max = v[0];
  for (int64_t c = 1; c < n; ++c) row_max = v[c] > row_max ? v[c] : row_max;
  T exp_sum = T(0);
  for (int64_t c = 0; c < n; ++c) {
    grad[c] = exp_of(v[c] - row_max);
    exp_sum += grad[c];
  }
  for (int64_t c = 0; c < n; ++c) grad[c] = (grad[c] / exp_sum - (c == y ? T(1) : T(0))) * grad_scale;
  return row_max + log_of(exp_sum) - v[y];
}

// The accumulator of long sums in the epilogue (row means, square sums and dot products along a row, the
// alignment's sum of squares): double for float and double data alike. Summed element by element in
// float32, a row's error grows with its length (1e-6 relative at 4096 wide, far above torch's cascaded
// sums); in double it stays below float32 rounding at every width the kernels see, and double data take
// exactly the operations they took before.
using WideSum = double;

// u / d rounded to T, given inverse = 1 / d. double divides (the operations double data always took); float
// multiplies by the double reciprocal: within two double ulps of the quotient, so its float32 rounding is the
// quotient's except within that distance of a float32 rounding boundary, at a fraction of a division's cost.
template <typename T>
SVP_HD T divided(WideSum u, WideSum d, WideSum inverse);
template <>
SVP_HD double divided<double>(WideSum u, WideSum d, WideSum) {
  return u / d;
}
template <>
SVP_HD float divided<float>(WideSum u, WideSum, WideSum inverse) {
  return static_cast<float>(u * inverse);
}

// Σ_{c < n} term(c) in WideSum, in an order fixed by n: double data in one chain, as always; float data in
// four interleaved chains (c mod 4, summed pairwise at the end), whose double adds the CPU overlaps.
template <typename T, typename Term>
SVP_HD WideSum row_sum(int64_t n, Term term) {
  if constexpr (sizeof(T) == sizeof(double)) {
    WideSum sum = 0.0;
    for (int64_t c = 0; c < n; ++c) sum += term(c);
    return sum;
  } else {
    WideSum sums[4] = {0.0, 0.0, 0.0, 0.0};
    int64_t c = 0;
    for (; c + 4 <= n; c += 4) {
      for (int lane = 0; lane < 4; ++lane) sums[lane] += term(c + lane);
    }
    for (; c < n; ++c) sums[0] += term(c);
    return (sums[0] + sums[1]) + (sums[2] + sums[3]);
  }
}

// â = u / max(‖u‖, ε) with u = v (minus its mean when `center`); writes â (rounded to T) and returns ‖u‖.
// The mean, u and ‖u‖ are taken in WideSum.
template <typename T>
SVP_HD T normalize_row(const T* v, int64_t n, bool center, T* normalized) {
  WideSum row_mean = 0.0;
  if (center) row_mean = row_sum<T>(n, [&](int64_t c) { return static_cast<WideSum>(v[c]); }) / static_cast<WideSum>(n);
  const WideSum square_sum = row_sum<T>(n, [&](int64_t c) {
    const WideSum u = static_cast<WideSum>(v[c]) - row_mean;
    return u * u;
  });
  const WideSum norm = sqrt_of(square_sum);
  const WideSum denominator = norm > kNormEps ? norm : kNormEps, inverse = 1.0 / denominator;
  for (int64_t c = 0; c < n; ++c) normalized[c] = divided<T>(static_cast<WideSum>(v[c]) - row_mean, denominator, inverse);
  return static_cast<T>(norm);
}

// In place: grad = dL/dâ becomes dL/dv through normalize_row (â and the norm it returned):
// (g − â(â·g)) / ‖u‖ when ‖u‖ > ε, else g / ε; minus its row mean when `center`. â·g, each element and
// the row mean are taken in WideSum.
template <typename T>
SVP_HD void normalize_row_backward(const T* normalized, T norm, int64_t n, bool center, T* grad) {
  if (norm > static_cast<T>(kNormEps)) {
    const WideSum projection = row_sum<T>(
        n, [&](int64_t c) { return static_cast<WideSum>(normalized[c]) * static_cast<WideSum>(grad[c]); });
    const WideSum wide_norm = norm, inverse = 1.0 / wide_norm;
    for (int64_t c = 0; c < n; ++c) {
      grad[c] = divided<T>(static_cast<WideSum>(grad[c]) - static_cast<WideSum>(normalized[c]) * projection, wide_norm,
                           inverse);
    }
  } else {
    for (int64_t c = 0; c < n; ++c) grad[c] /= static_cast<T>(kNormEps);
  }
  if (center) {
    const WideSum grad_mean =
        row_sum<T>(n, [&](int64_t c) { return static_cast<WideSum>(grad[c]); }) / static_cast<WideSum>(n);
    for (int64_t c = 0; c < n; ++c) grad[c] = static_cast<T>(static_cast<WideSum>(grad[c]) - grad_mean);
  }
}

}  // namespace svp

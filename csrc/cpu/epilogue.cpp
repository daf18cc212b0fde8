// CPU kernels of the loss epilogue (docs/design.md §2) on v (B, C): cross-entropy, the alignment term and
// g_v = dloss/dv in one call. "cosine_gram": FA = ‖â âᵀ − b̂ b̂ᵀ‖²_F with O(B·C + B·C' + C²) scratch, never B×B,
// by the feature-space identity when C + C' < B, else kGramTile × kGramTile tiles of batch-space Grams.
// "bhattacharyya": BD(v_b, v_prev_b) per row, in the cross-entropy's row pass. Every sum runs in an order fixed
// by the shapes, so results never depend on the thread count.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu/gemm.h"
#include "cpu/memory.h"
#include "cpu/ops.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"
#include "epilogue_arguments.h"
#include "svp/math.h"

namespace svp::cpu {
namespace epilogue_detail {

constexpr int64_t kGramTile = 64;     // batch-space tiles of S(v) − S(v_prev)

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
T sum_in_order(const std::vector<T>& values) {
  T sum = T(0);
  for (const T value : values) sum += value;
  return sum;
}

// out (rows × cols, leading dimension ldo) += x · yᵀ over `width`, the long dot products of the batch-space
// Δ tiles and the cosine Gram (C + C' or C). float: slices of kDotStep terms are summed by gemm_nt_accumulate
// and the slices added in WideSum, so a long width does not add in one float32 chain; double: one pass.
constexpr int64_t kDotStep = 256;

template <typename T>
void gram_accumulate(const T* x, int64_t ldx, int64_t rows, const T* y, int64_t ldy, int64_t cols, int64_t width,
                     T* out, int64_t ldo) {
  if constexpr (std::is_same_v<T, double>) {
    gemm_nt_accumulate(x, ldx, rows, y, ldy, cols, width, out, ldo);
  } else {
    std::vector<WideSum> wide(rows * cols, 0.0);
    std::vector<T> slice(rows * cols);
    for (int64_t k0 = 0; k0 < width; k0 += kDotStep) {
      std::fill(slice.begin(), slice.end(), T(0));
      gemm_nt_accumulate(x + k0, ldx, rows, y + k0, ldy, cols, std::min(kDotStep, width - k0), slice.data(), cols);
      for (int64_t e = 0; e < rows * cols; ++e) wide[e] += slice[e];
    }
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) out[i * ldo + j] += static_cast<T>(wide[i * cols + j]);
  }
}

// ---- Cross-entropy -----------------------------------------------------------------------------------

using Floats = Vec<float>;
typedef int32_t Ints __attribute__((vector_size(32)));
constexpr int64_t kFloatLanes = kLanes<float>;

// e^x on 8 lanes for x ≤ 0 (softmax arguments), within 2 ulp of expf: x = n·ln 2 + r with |r| ≤ ln 2 / 2
// (ln 2 in two parts), e^r by its degree-7 Taylor-like polynomial (the Cephes expf coefficients), 2^n
// through the exponent bits. Arguments below ln(FLT_MIN) give FLT_MIN-sized values; NaN stays NaN.
SVP_ALWAYS_INLINE Floats exp_nonpositive(Floats x) {
  const Floats lowest = Floats{} - 87.3365447504f;  // ln(FLT_MIN): 2^n stays a normal float
  x = x < lowest ? lowest : x;
  const Floats scaled = x * 1.44269504088896341f - 0.5f;  // n = round(x / ln 2) = ceil(scaled) for x ≤ 0
  Ints n = __builtin_convertvector(scaled, Ints);         // truncation toward zero = ceil for negatives
  const Floats nf = __builtin_convertvector(n, Floats);
  Floats r = x - nf * 0.693359375f;
  r = r - nf * -2.12194440e-4f;
  const Floats z = r * r;
  Floats poly = Floats{} + 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const Floats e_r = poly * z + r + 1.0f;
  const Ints power_bits = (n + 127) << 23;  // 2^n: n in [−126, 0]
  return e_r * (Floats)power_bits;  // a vector cast keeps the bits
}

// cross_entropy_row (svp/math.h) for float rows, 8 columns at a time: the row max, e^(v − max) and its sum,
// then grad = e^(v − max) · (grad_scale / sum) − grad_scale at the target. The tail columns use std::exp.
SVP_MULTIVERSION float cross_entropy_row_vectorized(const float* v, int64_t n, int64_t y, float grad_scale,
                                                    float* grad) {
  if (y < 0 || y >= n) {
    for (int64_t c = 0; c < n; ++c) grad[c] = NAN;
    return NAN;
  }
  const int64_t body = n - n % kFloatLanes;
  float row_max = v[0];
  if (body > 0) {
    Floats lane_max = load_vec<float>(v);
    for (int64_t c = kFloatLanes; c < body; c += kFloatLanes) {
      const Floats x = load_vec<float>(v + c);
      lane_max = x > lane_max ? x : lane_max;
    }
    for (int lane = 0; lane < kFloatLanes; ++lane) row_max = lane_max[lane] > row_max ? lane_max[lane] : row_max;
  }
  for (int64_t c = body; c < n; ++c) row_max = v[c] > row_max ? v[c] : row_max;
  Floats lane_sum{};
  for (int64_t c = 0; c < body; c += kFloatLanes) {
    const Floats e = exp_nonpositive(load_vec<float>(v + c) - row_max);
    store_vec(grad + c, e);
    lane_sum += e;
  }
  float exp_sum = horizontal_sum<float>(lane_sum);
  for (int64_t c = body; c < n; ++c) {
    grad[c] = std::exp(v[c] - row_max);
    exp_sum += grad[c];
  }
  const float factor = grad_scale / exp_sum;
  for (int64_t c = 0; c < n; ++c) grad[c] *= factor;
  grad[y] -= grad_scale;
  return row_max + std::log(exp_sum) - v[y];
}

// Rows [begin, end) of the cross-entropy: row_losses[b] = logsumexp(v_b) − v_{b,y_b}, grad_b = (softmax(v_b) −
// onehot(y_b)) · grad_scale.
template <typename T>
void cross_entropy_rows(const T* v, const int64_t* target, int64_t begin, int64_t end, int64_t features,
                        T grad_scale, T* grad, T* row_losses) {
  for (int64_t b = begin; b < end; ++b) {
    if constexpr (std::is_same_v<T, float>) {
      row_losses[b] = cross_entropy_row_vectorized(v + b * features, features, target[b], grad_scale,
                                                   grad + b * features);
    } else {
      row_losses[b] = cross_entropy_row(v + b * features, features, target[b], grad_scale, grad + b * features);
    }
  }
}

// mean_b [logsumexp(v_b) − v_{b,y_b}]; writes grad = (softmax(v) − onehot(y)) / B.
template <typename T>
T cross_entropy(const T* v, const int64_t* target, int64_t batch, int64_t features, T* grad) {
  std::vector<T> row_losses(batch);
  const T grad_scale = T(1) / static_cast<T>(batch);
  at::parallel_for(0, batch, row_grain(features), [&](int64_t begin, int64_t end) {
    cross_entropy_rows(v, target, begin, end, features, grad_scale, grad, row_losses.data());
  });
  return sum_in_order(row_losses) / static_cast<T>(batch);
}

// ---- The Bhattacharyya term ----------------------------------------------------------------------------
//
// BD(v_b, v_prev_b) = −log Σ_c sqrt(softmax(v_b)_c softmax(v_prev_b)_c), in log space and exact (no clamp):
// with a = v − max v, b = v_prev − max v_prev (rounded to T), t = ½(a + b) and d = max t (WideSum),
//     BD = ½(log Σ e^a + log Σ e^b) − d − log Σ e^(t − d)   = −logsumexp(½(log_softmax(v) + log_softmax(v_prev))),
// every exponent ≤ 0 and each sum ≥ 1, so nothing overflows, underflows to a zero sum or cancels but the final
// difference; ∂BD/∂v = ½(softmax(v) − r), r = e^(t − d) / Σ e^(t − d). The exponentials are taken in T, the
// sums, logs and the gradient's difference in WideSum. v_prev may hold −inf (a class of probability 0).

// e^x in place for x ≤ 0 (−inf and NaN allowed): float data 8 lanes at a time (exp_nonpositive, within 2 ulp of
// expf; below ln(FLT_MIN) it gives FLT_MIN-sized values instead of 0), the tail and double data via std::exp.
SVP_MULTIVERSION void exp_nonpositive_in_place(float* x, int64_t n) {
  const int64_t body = n - n % kFloatLanes;
  for (int64_t i = 0; i < body; i += kFloatLanes) store_vec(x + i, exp_nonpositive(load_vec<float>(x + i)));
  for (int64_t i = body; i < n; ++i) x[i] = std::exp(x[i]);
}

void exp_nonpositive_in_place(double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i]);
}

constexpr int64_t kDistanceRows = 64;  // rows per block of the exponentials' scratch

// Rows [begin, end) of v and v_prev (B × n): distances[b] = BD(v_b, v_prev_b) and grad_b += coef·(softmax(v_b) −
// r_b) (coef = λ/2, over B for the batch mean).
template <typename T>
void bhattacharyya_rows(const T* v, const T* v_prev, int64_t begin, int64_t end, int64_t n, WideSum coef, T* grad,
                        WideSum* distances) {
  std::vector<T> exps(3 * kDistanceRows * n);  // e^a, e^b and e^(t − d) of a block of rows, side by side
  std::vector<WideSum> shifts(kDistanceRows);   // d of each row
  for (int64_t first = begin; first < end; first += kDistanceRows) {
    const int64_t rows = std::min(kDistanceRows, end - first);
    // Stage 1: the exponents a, b and t − d of every row of the block.
    for (int64_t i = 0; i < rows; ++i) {
      const T* v_row = v + (first + i) * n;
      const T* prev_row = v_prev + (first + i) * n;
      T* a = exps.data() + 3 * i * n;
      T* b = a + n;
      T* x = b + n;
      T max_v = v_row[0], max_p = prev_row[0];
      for (int64_t c = 1; c < n; ++c) {
        max_v = v_row[c] > max_v ? v_row[c] : max_v;
        max_p = prev_row[c] > max_p ? prev_row[c] : max_p;
      }
      WideSum d = -INFINITY;
      for (int64_t c = 0; c < n; ++c) {
        a[c] = v_row[c] - max_v;
        b[c] = prev_row[c] - max_p;
        const WideSum t = 0.5 * (static_cast<WideSum>(a[c]) + static_cast<WideSum>(b[c]));
        d = t > d ? t : d;
      }
      for (int64_t c = 0; c < n; ++c) {
        x[c] = static_cast<T>(0.5 * (static_cast<WideSum>(a[c]) + static_cast<WideSum>(b[c])) - d);
      }
      shifts[i] = d;
    }
    // Stage 2: the exponentials of the whole block.
    exp_nonpositive_in_place(exps.data(), 3 * rows * n);
    // Stage 3: the sums, the distance and the gradient of every row.
    for (int64_t i = 0; i < rows; ++i) {
      const T* e_a = exps.data() + 3 * i * n;
      const T* e_b = e_a + n;
      const T* e_x = e_b + n;
      const WideSum sum_a = row_sum<T>(n, [&](int64_t c) { return static_cast<WideSum>(e_a[c]); });
      const WideSum sum_b = row_sum<T>(n, [&](int64_t c) { return static_cast<WideSum>(e_b[c]); });
      const WideSum sum_x = row_sum<T>(n, [&](int64_t c) { return static_cast<WideSum>(e_x[c]); });
      distances[first + i] = 0.5 * (std::log(sum_a) + std::log(sum_b)) - shifts[i] - std::log(sum_x);
      T* grad_row = grad + (first + i) * n;
      for (int64_t c = 0; c < n; ++c) {
        const WideSum difference = static_cast<WideSum>(e_a[c]) / sum_a - static_cast<WideSum>(e_x[c]) / sum_x;
        grad_row[c] = static_cast<T>(static_cast<WideSum>(grad_row[c]) + coef * difference);
      }
    }
  }
}

// (CE, A) of "bhattacharyya" in one pass over the rows of v and v_prev (B × n): CE as cross_entropy (0 without a
// target, grad then left as it is), A = Σ_b BD(v_b, v_prev_b) (/ B when mean) in WideSum, and grad +=
// λ·∂A/∂v. v_prev may hold −inf.
template <typename T>
std::pair<T, T> cross_entropy_and_bhattacharyya(const T* v, const int64_t* target, const T* v_prev, int64_t batch,
                                                int64_t n, double alignment_weight, bool mean, T* grad) {
  std::vector<T> row_losses(target != nullptr ? batch : 0);
  std::vector<WideSum> distances(batch);
  const T grad_scale = T(1) / static_cast<T>(batch);
  const WideSum coef = alignment_weight * 0.5 / (mean ? static_cast<WideSum>(batch) : 1.0);
  at::parallel_for(0, batch, row_grain(4 * n), [&](int64_t begin, int64_t end) {
    if (target != nullptr) cross_entropy_rows(v, target, begin, end, n, grad_scale, grad, row_losses.data());
    bhattacharyya_rows(v, v_prev, begin, end, n, coef, grad, distances.data());
  });
  const T ce = target != nullptr ? sum_in_order(row_losses) / static_cast<T>(batch) : T(0);
  const WideSum total = sum_in_order(distances);
  return {ce, static_cast<T>(mean ? total / static_cast<WideSum>(batch) : total)};
}

// ---- Normalisation -----------------------------------------------------------------------------------

// out (B × n, leading dimension ldo) = â, the rows of v normalised; norms[b] = ‖u_b‖ (skipped if null).
template <typename T>
void normalize_rows(const T* v, int64_t batch, int64_t n, bool center, T* out, int64_t ldo, T* norms) {
  at::parallel_for(0, batch, row_grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const T norm = normalize_row(v + b * n, n, center, out + b * ldo);
      if (norms != nullptr) norms[b] = norm;
    }
  });
}

// ---- Alignment ---------------------------------------------------------------------------------------
// Both paths take P = [â | b̂] (B × W), the normalised rows side by side, each block zero-padded to a
// multiple of kPad columns (â in columns [0, Cp), b̂ in [Cp, Cp + C'p)), so that every product runs in
// whole vectors; zero columns add exact zeros. They return FA with grad_a = ∂FA/∂â / 4 = â(âᵀâ) − b̂(b̂ᵀâ)
// written into grad_a (B × Cp, zero-filled; its padding columns stay zero).

constexpr int64_t kPad = 16;  // one 64-byte vector of floats, two of doubles

int64_t padded(int64_t n) { return ceil_div(n, kPad) * kPad; }

// Feature space, O(B·W·C) time: G = Pᵀ P[:, :Cp] = [âᵀâ ; b̂ᵀâ] (W × Cp) and H = b̂ᵀb̂ (C'p × C'p) hold the
// three Grams, so FA = ‖âᵀâ‖² − 2‖b̂ᵀâ‖² + ‖b̂ᵀb̂‖² (may round to a tiny negative; kept) and
// grad_a = P · [âᵀâ ; −b̂ᵀâ]. Everything after the normalisation runs in WideSum: FA cancels when v and
// v_prev are aligned (FA ≪ ‖âᵀâ‖²), and so do â(âᵀâ) and b̂(b̂ᵀâ); float32 Grams would lose the leading
// digits there (products of floats are exact in double, so G is exact to double rounding).
template <typename T>
T feature_space_alignment(const T* joined, int64_t batch, int64_t Cp, int64_t Cp_prev, T* grad_a) {
  const int64_t W = Cp + Cp_prev;
  // Stage 1: P in WideSum (float data are widened once, double data used in place).
  ThreadScratch<struct WidenedP, WideSum> widened(std::is_same_v<T, WideSum> ? 0 : batch * W);
  const WideSum* wide = nullptr;
  if constexpr (std::is_same_v<T, WideSum>) {
    wide = joined;
  } else {
    WideSum* wide_copy = widened.data();
    at::parallel_for(0, batch, row_grain(W), [&](int64_t begin, int64_t end) {
      std::copy(joined + begin * W, joined + end * W, wide_copy + begin * W);
    });
    wide = wide_copy;
  }

  // Stage 2: G = Pᵀ P[:, :Cp] and H = b̂ᵀ b̂ through gemm_tn (outer products over B read straight from the
  // rows of P, no horizontal sum per entry), each entry summed over b in increasing order. Tasks own blocks
  // of kPad rows of [G ; H]. âᵀâ and H are symmetric: a block of their rows starting at r is computed from
  // column r on, and the entries left of it are copied from their mirror images, which are bit for bit the
  // same sums (products commute).
  std::vector<WideSum> gram(W * Cp), prev_gram(Cp_prev * Cp_prev);
  const int64_t gram_grain = grain_for(kPad * batch * Cp, kMinTaskProducts);  // blocks of kPad rows
  at::parallel_for(0, (W + Cp_prev) / kPad, gram_grain, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t row = block * kPad;
      if (row < W) {
        const int64_t first = row < Cp ? row : 0;  // âᵀâ rows: the upper triangle of blocks only
        gemm_tn(wide + row, W, kPad, wide + first, W, batch, Cp - first, gram.data() + row * Cp + first, Cp,
                /*accumulate=*/false);
      } else {
        const int64_t i = row - W;
        gemm_tn(wide + Cp + i, W, kPad, wide + Cp + i, W, batch, Cp_prev - i, prev_gram.data() + i * Cp_prev + i,
                Cp_prev, /*accumulate=*/false);
      }
    }
  });
  const auto mirror_lower_blocks = [](WideSum* square, int64_t n) {
    for (int64_t i = kPad; i < n; ++i)
      for (int64_t j = 0; j < i / kPad * kPad; ++j) square[i * n + j] = square[j * n + i];
  };
  mirror_lower_blocks(gram.data(), Cp);  // the first Cp rows of G are âᵀâ (Cp × Cp, row stride Cp)
  mirror_lower_blocks(prev_gram.data(), Cp_prev);

  // Stage 3: FA from the Grams, and M = [âᵀâ ; −b̂ᵀâ] (W × Cp).
  WideSum feature_alignment = 0.0, cross_alignment = 0.0, prev_alignment = 0.0;
  ThreadScratch<struct GradientMap, WideSum> gradient_scratch(W * Cp);  // the streamed operand of stage 4
  WideSum* gradient_map = gradient_scratch.data();
  for (int64_t i = 0; i < W; ++i) {
    for (int64_t j = 0; j < Cp; ++j) {
      const WideSum value = gram[i * Cp + j];
      (i < Cp ? feature_alignment : cross_alignment) += value * value;
      gradient_map[i * Cp + j] = i < Cp ? value : -value;
    }
  }
  for (const WideSum value : prev_gram) prev_alignment += value * value;

  // Stage 4: grad_a = P · M, by blocks of rows, in WideSum and rounded once.
  at::parallel_for(0, batch, grain_for(W * Cp, kMinTaskProducts), [&](int64_t begin, int64_t end) {
    std::vector<WideSum> product((end - begin) * Cp);
    gemm_nn(wide + begin * W, W, end - begin, gradient_map, Cp, W, Cp, product.data(), Cp,
            /*accumulate=*/false);
    for (int64_t e = 0; e < (end - begin) * Cp; ++e) grad_a[begin * Cp + e] = static_cast<T>(product[e]);
  });
  return static_cast<T>(feature_alignment - 2.0 * cross_alignment + prev_alignment);
}

// Batch space, O(B²·W) time: Δ = â âᵀ − b̂ b̂ᵀ = P Qᵀ with Q = [â | −b̂], one kGramTile² tile at a time:
// FA = Σ Δ², grad_a_I = Σ_J Δ_IJ â_J. Each task owns a block of rows I (and of grad_a).
template <typename T>
T batch_space_alignment(const T* joined, int64_t batch, int64_t Cp, int64_t Cp_prev, T* grad_a) {
  const int64_t W = Cp + Cp_prev;
  std::vector<T> signed_joined(joined, joined + batch * W);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t i = Cp; i < W; ++i) signed_joined[b * W + i] = -signed_joined[b * W + i];

  const int64_t blocks = ceil_div(batch, kGramTile);
  std::vector<WideSum> block_alignment(blocks, 0.0);
  const int64_t block_grain = grain_for(2 * kGramTile * batch * W, kMinTaskProducts);
  at::parallel_for(0, blocks, block_grain, [&](int64_t begin, int64_t end) {
    std::vector<T> difference(kGramTile * kGramTile);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t i0 = block * kGramTile, rows = std::min(kGramTile, batch - i0);
      for (int64_t j0 = 0; j0 < batch; j0 += kGramTile) {
        const int64_t cols = std::min(kGramTile, batch - j0);
        std::fill(difference.begin(), difference.end(), T(0));
        gram_accumulate(joined + i0 * W, W, rows, signed_joined.data() + j0 * W, W, cols, W, difference.data(),
                        kGramTile);
        for (int64_t i = 0; i < rows; ++i) {
          for (int64_t j = 0; j < cols; ++j) {
            const WideSum delta = difference[i * kGramTile + j];
            block_alignment[block] += delta * delta;
          }
        }
        gemm_nn(difference.data(), kGramTile, rows, joined + j0 * W, W, cols, Cp, grad_a + i0 * Cp, Cp,
                /*accumulate=*/true);
      }
    }
  });
  return static_cast<T>(sum_in_order(block_alignment));
}

// ---- The epilogue ------------------------------------------------------------------------------------

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_epilogue(const at::Tensor& v,
                                                                        const std::optional<at::Tensor>& target,
                                                                        const std::optional<at::Tensor>& v_prev,
                                                                        double alignment_weight, bool mean,
                                                                        bool center, bool bhattacharyya) {
  const int64_t batch = v.size(0), C = v.size(1);
  const T* v_data = v.data_ptr<T>();
  const T lambda = static_cast<T>(alignment_weight);
  at::Tensor grad_v = at::zeros({batch, C}, v.options());
  T* grad_v_data = grad_v.data_ptr<T>();
  const auto scalar = [&](T value) { return at::scalar_tensor(value, v.options()); };

  if (bhattacharyya && v_prev.has_value()) {  // CE, BD and their gradients in one row pass
    const auto [ce, alignment] = cross_entropy_and_bhattacharyya(
        v_data, target.has_value() ? target->data_ptr<int64_t>() : nullptr, v_prev->data_ptr<T>(), batch, C,
        alignment_weight, mean, grad_v_data);
    return {scalar(ce + lambda * alignment), scalar(ce), scalar(alignment), grad_v};
  }

  // Cross-entropy and its gradient (softmax − onehot) / B, written into g_v.
  T ce = T(0);
  if (target.has_value()) ce = cross_entropy(v_data, target->data_ptr<int64_t>(), batch, C, grad_v_data);

  // Alignment FA (/ B² when mean) and λ · its gradient through the row normalisation, added to g_v.
  T alignment = T(0);
  if (v_prev.has_value()) {
    const int64_t C_prev = v_prev->size(1), Cp = padded(C), Cp_prev = padded(C_prev), W = Cp + Cp_prev;
    // P = [â | b̂] (zero padding columns) and grad_a (zero-filled), in blocks reused from call to call.
    ThreadScratch<struct JoinedRows, T> joined_scratch(batch * W);
    ThreadScratch<struct AlignmentGradient, T> grad_a_scratch(batch * Cp);
    T* joined = joined_scratch.data();
    T* grad_a = grad_a_scratch.data();
    at::parallel_for(0, batch, row_grain(W + Cp), [&](int64_t begin, int64_t end) {
      std::fill(joined + begin * W, joined + end * W, T(0));
      std::fill(grad_a + begin * Cp, grad_a + end * Cp, T(0));
    });
    std::vector<T> norms(batch);
    normalize_rows(v_data, batch, C, center, joined, W, norms.data());
    normalize_rows(v_prev->data_ptr<T>(), batch, C_prev, center, joined + Cp, W, static_cast<T*>(nullptr));
    const T raw_alignment = feature_space_is_cheaper(batch, C, C_prev)
                                ? feature_space_alignment(joined, batch, Cp, Cp_prev, grad_a)
                                : batch_space_alignment(joined, batch, Cp, Cp_prev, grad_a);
    const T reduction = mean ? T(1) / (static_cast<T>(batch) * static_cast<T>(batch)) : T(1);
    alignment = raw_alignment * reduction;
    const T grad_a_scale = T(4) * reduction;
    at::parallel_for(0, batch, row_grain(Cp), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        T* grad_row = grad_a + row * Cp;
        for (int64_t c = 0; c < C; ++c) grad_row[c] *= grad_a_scale;
        normalize_row_backward(joined + row * W, norms[row], C, center, grad_row);
        for (int64_t c = 0; c < C; ++c) grad_v_data[row * C + c] += lambda * grad_row[c];
      }
    });
  }

  return {scalar(ce + lambda * alignment), scalar(ce), scalar(alignment), grad_v};
}

at::Tensor normalized_rows_tensor(const at::Tensor& v, bool center) {
  at::Tensor normalized = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "svp_kernels::cosine_gram", [&] {
    normalize_rows(v.data_ptr<scalar_t>(), v.size(0), v.size(1), center, normalized.data_ptr<scalar_t>(), v.size(1),
                   static_cast<scalar_t*>(nullptr));
  });
  return normalized;
}

// v in the accumulation dtype (float64 stays, other floats become float32), contiguous.
at::Tensor to_accumulation(const at::Tensor& v, const char* name) {
  TORCH_CHECK(v.device().is_cpu(), "svp_kernels: ", name, " must be a CPU tensor");
  TORCH_CHECK(at::isFloatingType(v.scalar_type()), "svp_kernels: ", name, " must be floating point, got ",
              v.scalar_type());
  TORCH_CHECK(v.dim() == 2 && v.size(0) >= 1 && v.size(1) >= 1, "svp_kernels: ", name,
              " must be (B, C) with B, C >= 1, got ", v.sizes());
  return v.to(v.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
}

}  // namespace epilogue_detail

using namespace epilogue_detail;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> loss_epilogue(
    const at::Tensor& v, const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& v_prev,
    double alignment_weight, bool mean, bool center, c10::string_view alignment) {
  const at::Tensor values = to_accumulation(v, "v");
  const int64_t batch = values.size(0);
  const bool bhattacharyya = bhattacharyya_alignment(alignment);
  std::optional<at::Tensor> target_checked;
  if (target.has_value()) {
    TORCH_CHECK(target->device().is_cpu() && target->scalar_type() == at::kLong,
                "svp_kernels: target must be a CPU int64 tensor, got ", target->scalar_type());
    TORCH_CHECK(target->dim() == 1 && target->size(0) == batch, "svp_kernels: target must be (B,) = (", batch,
                ",), got ", target->sizes());
    target_checked = target->contiguous();  // a value outside [0, C) gives that row NaN (cross_entropy_row)
  }
  std::optional<at::Tensor> previous;
  if (v_prev.has_value()) {
    previous = to_accumulation(*v_prev, "v_prev").to(values.scalar_type());
    TORCH_CHECK(previous->size(0) == batch, "svp_kernels: v_prev must have B = ", batch, " rows, got ",
                previous->size(0));
  }
  if (bhattacharyya) check_bhattacharyya_arguments(values.size(1), previous ? previous->size(1) : -1, center);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "svp_kernels::loss_epilogue", [&] {
    result = run_epilogue<scalar_t>(values, target_checked, previous, alignment_weight, mean, center, bhattacharyya);
  });
  return result;
}

at::Tensor cosine_gram(const at::Tensor& v, bool center) {
  const at::Tensor normalized = normalized_rows_tensor(to_accumulation(v, "v"), center);
  if (normalized.scalar_type() == at::kDouble) return at::mm(normalized, normalized.t());
  // float32: S = â âᵀ with the Grams' sliced dot products (gram_accumulate), by blocks of rows.
  const int64_t batch = normalized.size(0), C = normalized.size(1);
  at::Tensor gram = at::zeros({batch, batch}, normalized.options());
  const float* rows = normalized.data_ptr<float>();
  float* out = gram.data_ptr<float>();
  at::parallel_for(0, batch, grain_for(batch * C, kMinTaskProducts), [&](int64_t begin, int64_t end) {
    gram_accumulate(rows + begin * C, C, end - begin, rows, C, batch, C, out + begin * batch, batch);
  });
  return gram;
}

}  // namespace svp::cpu

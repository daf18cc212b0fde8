// CPU kernels of the similarity-matching losses (svp_kernels/backends/predsim_fused.py):
//
// - dropout_mask_apply: the learnable-head dropout gradient dW = (g_vᵀ h) ⊙ M / (1 − p). The product g_vᵀ h
//   is a plain GEMM (ATen's); this pass applies the mask of docs/design.md §3 in place, regenerating word0
//   of Philox4x32-10 at offset n = c·D + j for each element, so neither M nor W̃ is ever stored.
// - similarity_loss: scale · Σ_ij (S(x)_ij − T_ij)² and its gradient in one call (two GEMMs and three row loops),
//   so a small call is not a chain of a dozen tensor ops. Row means, norms and Σ are accumulated in double.
// - softmax_cross_entropy: mean_b CE of the decoder logits and (softmax − onehot) · scale, one row loop.
// - channel_std: each channel's mean and unbiased std over H·W (reduce="std"), one read of the input;
//   channel_std_backward: its gradient (x − mean) · g / ((L − 1) std), one pass.
//
// Rows are split across threads; every sum runs in an order fixed by the shapes (never the thread count).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu/ops.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"
#include "svp/math.h"
#include "svp/philox.h"

namespace svp::cpu {
namespace predsim_detail {

template <typename T>
SVP_ALWAYS_INLINE void mask_row_impl(T* row, int64_t width, uint64_t base, uint64_t seed, float p, T scale) {
  for (int64_t j = 0; j < width; ++j) row[j] = dropped_value(row[j], philox4x32_10(seed, base + j).w0, p, scale);
}

SVP_MULTIVERSION void mask_row(float* row, int64_t width, uint64_t base, uint64_t seed, float p, float scale) {
  mask_row_impl(row, width, base, seed, p, scale);
}
SVP_MULTIVERSION void mask_row(double* row, int64_t width, uint64_t base, uint64_t seed, float p, double scale) {
  mask_row_impl(row, width, base, seed, p, scale);
}

constexpr double kAddEps = 1e-8;   // local-loss: u / (1e-8 + ‖u‖)
constexpr double kMaxEps = 1e-12;  // SVP: u / max(‖u‖, 1e-12)

// Σ_j x_j (or Σ_j (x_j − shift)² with kSquares) in double: 16 partial sums in double lanes, added in a
// fixed order.
template <bool kSquares, typename T>
SVP_ALWAYS_INLINE double row_sum_impl(const T* x, int64_t width, double shift = 0.0) {
  using Wide = WideVec<double>;  // 8 doubles
  Wide first = {}, second = {};
  int64_t j = 0;
  for (; j + 16 <= width; j += 16) {
    Wide low, high;
    if constexpr (std::is_same_v<T, float>) {
      low = __builtin_convertvector(load_vec<float>(x + j), Wide);
      high = __builtin_convertvector(load_vec<float>(x + j + 8), Wide);
    } else {
      low = load_vec<double, Wide>(x + j);
      high = load_vec<double, Wide>(x + j + 8);
    }
    if constexpr (kSquares) {
      low -= shift;
      high -= shift;
      first += low * low;
      second += high * high;
    } else {
      first += low;
      second += high;
    }
  }
  first += second;
  double sum = 0.0;
  for (int lane = 0; lane < 8; ++lane) sum += first[lane];
  for (; j < width; ++j) {
    const double value = kSquares ? static_cast<double>(x[j]) - shift : static_cast<double>(x[j]);
    sum += kSquares ? value * value : value;
  }
  return sum;
}
SVP_MULTIVERSION double row_sum(const float* x, int64_t width) { return row_sum_impl<false>(x, width); }
SVP_MULTIVERSION double row_sum(const double* x, int64_t width) { return row_sum_impl<false>(x, width); }
SVP_MULTIVERSION double row_square_sum(const float* x, int64_t width, double shift = 0.0) {
  return row_sum_impl<true>(x, width, shift);
}
SVP_MULTIVERSION double row_square_sum(const double* x, int64_t width, double shift = 0.0) {
  return row_sum_impl<true>(x, width, shift);
}

// The rows' statistics: u (B, K) = x − rowmean(x) (x itself without centring) and, per row, the scale
// r = 1/(‖u‖ + 1e-8) ("add") or 1/max(‖u‖, 1e-12) ("max") and the norm's slope 1/‖u‖ (0 where the
// normalisation has no gradient through the norm).
struct RowScales {
  std::vector<double> scale, slope;
};

template <typename T>
at::Tensor centred_rows(const at::Tensor& x, bool center, bool additive, RowScales& rows) {
  const int64_t batch = x.size(0), width = x.size(1);
  at::Tensor u = center ? at::empty_like(x) : x;
  rows.scale.assign(batch, 0.0);
  rows.slope.assign(batch, 0.0);
  const T* in = x.data_ptr<T>();
  T* out = u.data_ptr<T>();
  at::parallel_for(0, batch, row_grain(width), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* row = in + i * width;
      T* centred = out + i * width;
      if (center) {
        const T mean = static_cast<T>(row_sum(row, width) / static_cast<double>(width));
        for (int64_t j = 0; j < width; ++j) centred[j] = row[j] - mean;
      }
      const double norm = std::sqrt(row_square_sum(centred, width));
      rows.scale[i] = additive ? 1.0 / (norm + kAddEps) : 1.0 / std::max(norm, kMaxEps);
      rows.slope[i] = (additive ? norm > 0.0 : norm > kMaxEps) ? 1.0 / norm : 0.0;
    }
  });
  return u;
}

SVP_ALWAYS_INLINE double clamp_unit(double s) { return std::min(1.0, std::max(-1.0, s)); }

// difference[j] = clamp(r_i G_ij r_j) − T_ij for one row i; T_ij = clamp(r'_i G'_ij r'_j) of the target's Gram
// row, or `same` / `other` where labels[j] equals / differs from label. Elementwise: the compiler vectorises it.
template <typename T>
SVP_ALWAYS_INLINE void difference_row_impl(const T* gram_row, const double* scale, double row_scale,
                                           const T* target_gram_row, const double* target_scale,
                                           double target_row_scale, const int64_t* labels, int64_t label,
                                           double same, double other, int64_t batch, double* difference) {
  if (target_gram_row != nullptr) {
    for (int64_t j = 0; j < batch; ++j) {
      difference[j] = clamp_unit(static_cast<double>(gram_row[j]) * row_scale * scale[j]) -
                      clamp_unit(static_cast<double>(target_gram_row[j]) * target_row_scale * target_scale[j]);
    }
  } else {
    for (int64_t j = 0; j < batch; ++j) {
      difference[j] = clamp_unit(static_cast<double>(gram_row[j]) * row_scale * scale[j]) -
                      (labels[j] == label ? same : other);
    }
  }
}
SVP_MULTIVERSION void difference_row(const float* gram_row, const double* scale, double row_scale,
                                     const float* target_gram_row, const double* target_scale,
                                     double target_row_scale, const int64_t* labels, int64_t label, double same,
                                     double other, int64_t batch, double* difference) {
  difference_row_impl(gram_row, scale, row_scale, target_gram_row, target_scale, target_row_scale, labels, label,
                      same, other, batch, difference);
}
SVP_MULTIVERSION void difference_row(const double* gram_row, const double* scale, double row_scale,
                                     const double* target_gram_row, const double* target_scale,
                                     double target_row_scale, const int64_t* labels, int64_t label, double same,
                                     double other, int64_t batch, double* difference) {
  difference_row_impl(gram_row, scale, row_scale, target_gram_row, target_scale, target_row_scale, labels, label,
                      same, other, batch, difference);
}

// values[j] ← row_factor · values[j] · scale[j] (the mixing row r_i E_ij r_j), also written to out in T.
template <typename T>
SVP_ALWAYS_INLINE void mixing_row_apply(double* values, const double* scale, double row_factor, int64_t batch,
                                        T* out) {
  for (int64_t j = 0; j < batch; ++j) {
    values[j] = row_factor * values[j] * scale[j];
    out[j] = static_cast<T>(values[j]);
  }
}

// Σ_j a_j b_j in double, four interleaved partial sums.
template <typename T>
SVP_ALWAYS_INLINE double row_dot(const double* a, const T* b, int64_t width) {
  double partial[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t j = 0;
  for (; j + 4 <= width; j += 4) {
    for (int k = 0; k < 4; ++k) partial[k] += a[j + k] * static_cast<double>(b[j + k]);
  }
  for (; j < width; ++j) partial[0] += a[j] * static_cast<double>(b[j]);
  return (partial[0] + partial[1]) + (partial[2] + partial[3]);
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> similarity_loss_impl(const at::Tensor& x, const std::optional<at::Tensor>& target,
                                                        const std::optional<at::Tensor>& labels, double same,
                                                        double other, bool center, bool additive,
                                                        double value_scale, double grad_scale, bool need_grad) {
  const int64_t batch = x.size(0);
  RowScales rows, target_rows;
  const at::Tensor u = centred_rows<T>(x, center, additive, rows);
  const at::Tensor gram = at::mm(u, u.t());
  at::Tensor target_gram;
  if (target.has_value()) {
    const at::Tensor target_u = centred_rows<T>(*target, center, additive, target_rows);
    target_gram = at::mm(target_u, target_u.t());
  }
  const T* g = gram.data_ptr<T>();
  const T* tg = target.has_value() ? target_gram.data_ptr<T>() : nullptr;
  const int64_t* y = labels.has_value() ? labels->data_ptr<int64_t>() : nullptr;
  at::Tensor mixing = need_grad ? at::empty_like(gram) : at::Tensor();
  T* m = need_grad ? mixing.data_ptr<T>() : nullptr;
  std::vector<double> row_totals(batch, 0.0);
  const double factor = 4.0 * grad_scale;
  // Row i of S − T, S_ij = clamp(r_i G_ij r_j), T_ij from the target's Gram or the labels. The mixing
  // matrix F_ij = 4·scale·r_i (S − T)_ij r_j − δ_ij κ_i gives dL/du = F u (straight-through clamp).
  at::parallel_for(0, batch, row_grain(batch), [&](int64_t begin, int64_t end) {
    std::vector<double> difference(batch);
    for (int64_t i = begin; i < end; ++i) {
      const double ri = rows.scale[i];
      const T* gram_row = g + i * batch;
      difference_row(gram_row, rows.scale.data(), ri, tg != nullptr ? tg + i * batch : nullptr,
                     target_rows.scale.data(), tg != nullptr ? target_rows.scale[i] : 0.0, y, y != nullptr ? y[i] : 0,
                     same, other, batch, difference.data());
      row_totals[i] = row_square_sum(difference.data(), batch);
      if (m == nullptr) continue;
      T* mixing_row = m + i * batch;
      mixing_row_apply(difference.data(), rows.scale.data(), factor * ri, batch, mixing_row);
      const double kappa = row_dot(difference.data(), gram_row, batch) * rows.slope[i] * ri;
      mixing_row[i] = static_cast<T>(difference[i] - kappa);
    }
  });
  double total = 0.0;
  for (const double row_total : row_totals) total += row_total;
  at::Tensor grad = need_grad ? at::mm(mixing, u) : at::empty({0}, x.options());
  if (need_grad && center) {  // d/dx of the centring: remove each row's mean
    const int64_t width = grad.size(1);
    T* out = grad.data_ptr<T>();
    at::parallel_for(0, batch, row_grain(width), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        T* row = out + i * width;
        const T mean = static_cast<T>(row_sum(row, width) / static_cast<double>(width));
        for (int64_t j = 0; j < width; ++j) row[j] -= mean;
      }
    });
  }
  return {at::scalar_tensor(value_scale * total, x.options()), grad};
}

}  // namespace predsim_detail

std::tuple<at::Tensor, at::Tensor> similarity_loss(const at::Tensor& x, const std::optional<at::Tensor>& target,
                                                   const std::optional<at::Tensor>& labels, double same,
                                                   double other, bool center, bool additive, double value_scale,
                                                   double grad_scale, bool need_grad) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.size(0) >= 1 && x.size(1) >= 1,
              "svp_kernels: x must be a non-empty (B, K) CPU tensor, got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "svp_kernels: x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(target.has_value() != labels.has_value(), "svp_kernels: pass exactly one of target and labels");
  if (target.has_value()) {
    TORCH_CHECK(target->device().is_cpu() && target->dim() == 2 && target->size(0) == x.size(0) &&
                    target->size(1) >= 1 && target->scalar_type() == x.scalar_type(),
                "svp_kernels: target must be a (B, K') CPU tensor of x's dtype, got ", target->sizes());
  } else {
    TORCH_CHECK(labels->device().is_cpu() && labels->dim() == 1 && labels->size(0) == x.size(0) &&
                    labels->scalar_type() == at::kLong,
                "svp_kernels: labels must be a (B,) int64 CPU tensor, got ", labels->sizes());
  }
  const at::Tensor rows = x.contiguous();
  const std::optional<at::Tensor> target_rows =
      target.has_value() ? std::optional<at::Tensor>(target->contiguous()) : std::nullopt;
  const std::optional<at::Tensor> label_rows =
      labels.has_value() ? std::optional<at::Tensor>(labels->contiguous()) : std::nullopt;
  if (rows.scalar_type() == at::kFloat) {
    return predsim_detail::similarity_loss_impl<float>(rows, target_rows, label_rows, same, other, center, additive,
                                                       value_scale, grad_scale, need_grad);
  }
  return predsim_detail::similarity_loss_impl<double>(rows, target_rows, label_rows, same, other, center, additive,
                                                      value_scale, grad_scale, need_grad);
}

std::tuple<at::Tensor, at::Tensor> channel_std(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.size(0) >= 1 && x.size(1) >= 1 && x.size(2) >= 2,
              "svp_kernels: x must be a (B, Ch, L) CPU tensor with L >= 2, got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "svp_kernels: x must be float32 or float64, got ", x.scalar_type());
  const at::Tensor in = x.contiguous();
  const int64_t rows = in.size(0) * in.size(1), length = in.size(2);
  at::Tensor mean = at::empty({in.size(0), in.size(1)}, in.options());
  at::Tensor std = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "svp_kernels::channel_std", [&] {
    const scalar_t* data = in.data_ptr<scalar_t>();
    scalar_t* means = mean.data_ptr<scalar_t>();
    scalar_t* stds = std.data_ptr<scalar_t>();
    // Two passes over each channel's L values (the second from cache): the mean, then Σ (x − mean)².
    at::parallel_for(0, rows, row_grain(length), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* values = data + row * length;
        const double row_mean = predsim_detail::row_sum(values, length) / static_cast<double>(length);
        const double squares = predsim_detail::row_square_sum(values, length, row_mean);
        means[row] = static_cast<scalar_t>(row_mean);
        stds[row] = static_cast<scalar_t>(std::sqrt(squares / static_cast<double>(length - 1)));
      }
    });
  });
  return {mean, std};
}

at::Tensor channel_std_backward(const at::Tensor& grad_std, const at::Tensor& x, const at::Tensor& mean,
                                const at::Tensor& std) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.size(2) >= 2,
              "svp_kernels: x must be a (B, Ch, L) CPU tensor with L >= 2, got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "svp_kernels: x must be float32 or float64, got ", x.scalar_type());
  for (const at::Tensor* statistic : {&grad_std, &mean, &std}) {
    TORCH_CHECK(statistic->device().is_cpu() && statistic->sizes() == x.sizes().slice(0, 2) &&
                    statistic->scalar_type() == x.scalar_type(),
                "svp_kernels: grad_std, mean and std must be (B, Ch) CPU tensors of x's dtype, got ",
                statistic->sizes());
  }
  const at::Tensor in = x.contiguous(), g = grad_std.contiguous(), m = mean.contiguous(), s = std.contiguous();
  const int64_t rows = in.size(0) * in.size(1), length = in.size(2);
  at::Tensor grad = at::empty_like(in);
  AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "svp_kernels::channel_std_backward", [&] {
    const scalar_t* data = in.data_ptr<scalar_t>();
    const scalar_t* grads = g.data_ptr<scalar_t>();
    const scalar_t* means = m.data_ptr<scalar_t>();
    const scalar_t* stds = s.data_ptr<scalar_t>();
    scalar_t* out = grad.data_ptr<scalar_t>();
    // dstd/dx_l = (x_l − mean) / ((L − 1) std); 0 for a constant channel (std = 0), as torch's std gives.
    at::parallel_for(0, rows, row_grain(length), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t factor =
            stds[row] > 0 ? grads[row] / (stds[row] * static_cast<scalar_t>(length - 1)) : scalar_t(0);
        const scalar_t* values = data + row * length;
        scalar_t* row_grad = out + row * length;
        for (int64_t l = 0; l < length; ++l) row_grad[l] = (values[l] - means[row]) * factor;
      }
    });
  });
  return grad;
}

std::tuple<at::Tensor, at::Tensor> softmax_cross_entropy(const at::Tensor& logits, const at::Tensor& labels,
                                                         double grad_scale, bool need_grad) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.size(0) >= 1 && logits.size(1) >= 1,
              "svp_kernels: logits must be a non-empty (B, C) CPU tensor, got ", logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble,
              "svp_kernels: logits must be float32 or float64, got ", logits.scalar_type());
  TORCH_CHECK(labels.device().is_cpu() && labels.dim() == 1 && labels.size(0) == logits.size(0) &&
                  labels.scalar_type() == at::kLong,
              "svp_kernels: labels must be a (B,) int64 CPU tensor, got ", labels.sizes());
  const at::Tensor v = logits.contiguous();
  const at::Tensor y = labels.contiguous();
  const int64_t batch = v.size(0), classes = v.size(1);
  at::Tensor grad = need_grad ? at::empty({batch, classes}, v.options()) : at::empty({0}, v.options());
  at::Tensor ce;
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "svp_kernels::softmax_cross_entropy", [&] {
    const scalar_t* in = v.data_ptr<scalar_t>();
    const int64_t* target = y.data_ptr<int64_t>();
    scalar_t* out = need_grad ? grad.data_ptr<scalar_t>() : nullptr;
    std::vector<double> row_losses(batch);
    at::parallel_for(0, batch, row_grain(classes), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(need_grad ? 0 : classes);  // the softmax row when no gradient is kept
      for (int64_t b = begin; b < end; ++b) {
        scalar_t* row_grad = need_grad ? out + b * classes : scratch.data();
        row_losses[b] = static_cast<double>(cross_entropy_row(in + b * classes, classes, target[b],
                                                              static_cast<scalar_t>(grad_scale), row_grad));
      }
    });
    double total = 0.0;
    for (const double loss : row_losses) total += loss;
    ce = at::scalar_tensor(total / static_cast<double>(batch), v.options());
  });
  return {ce, grad};
}

at::Tensor dropout_mask_apply(const at::Tensor& x, double p, const at::Tensor& seed_tensor) {
  TORCH_CHECK(x.device().is_cpu(), "svp_kernels: x must be a CPU tensor");
  TORCH_CHECK(x.dim() == 2, "svp_kernels: x must be (C, D), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "svp_kernels: x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(p >= 0.0 && p < 1.0, "svp_kernels: p must be in [0, 1), got ", p);
  const int64_t seed = read_seed(seed_tensor);
  TORCH_CHECK(seed >= 0, "svp_kernels: seed must be non-negative");
  at::Tensor out = x.contiguous().clone();
  if (p == 0.0) return out;
  const int64_t rows = out.size(0), cols = out.size(1);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "svp_kernels::dropout_mask_apply", [&] {
    scalar_t* data = out.data_ptr<scalar_t>();
    const scalar_t scale = dropout_scale<scalar_t>(p);
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, cols));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        predsim_detail::mask_row(data + c * cols, cols, static_cast<uint64_t>(c) * static_cast<uint64_t>(cols),
                                 static_cast<uint64_t>(seed), static_cast<float>(p), scale);
      }
    });
  });
  return out;
}

}  // namespace svp::cpu

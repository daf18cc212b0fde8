// The CPU implementations of the svp_kernels ops (schemas in csrc/bindings.cpp, docs/backends.md).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <tuple>

namespace svp::cpu {

// v (B, C) = h R̃ᵀ in the accumulation dtype; R̃ = R ⊙ M / (1 − p) generated tile by tile.
// seed: the dropout seed, a 0-dim int64 CPU tensor in [0, 2**63).
at::Tensor projection_forward(const at::Tensor& h, const std::optional<at::Tensor>& weight, int64_t out_features,
                              int64_t proj_seed, double proj_std, double p, const at::Tensor& seed);

// dh (B, D) = grad_v R̃ in `dtype`, regenerating the tiles of R̃; with grad_scale (a 0-dim tensor of grad_v's
// dtype): (grad_scale · grad_v) R̃, the product formed first.
at::Tensor projection_backward(const at::Tensor& grad_v, const std::optional<at::Tensor>& weight,
                               int64_t in_features, int64_t proj_seed, double proj_std, double p,
                               const at::Tensor& seed, at::ScalarType dtype,
                               const std::optional<at::Tensor>& grad_scale = std::nullopt);

// R̃ (C, D) = R ⊙ M / (1 − p) in `dtype` (float32/float64), written out: the transient operand of the GEMM
// projection path (csrc/projection_gemm.cpp). Element for element the values the tiles of projection_forward and
// projection_backward generate, so the same bits.
at::Tensor dropped_projection(const std::optional<at::Tensor>& weight, int64_t out_features, int64_t in_features,
                              int64_t proj_seed, double proj_std, double p, const at::Tensor& seed,
                              at::ScalarType dtype);

// (loss, ce, alignment, g_v): CE(v, y) + λ·A and g_v = dloss/dv; A = ‖S(v) − S(v_prev)‖²_F (/ B² when mean) for
// alignment "cosine_gram", Σ_b BD(v_b, v_prev_b) (/ B when mean) for "bhattacharyya" (v_prev (B, C), no center).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> loss_epilogue(
    const at::Tensor& v, const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& v_prev,
    double alignment_weight, bool mean, bool center, c10::string_view alignment = "cosine_gram");

// S (B, B) = â âᵀ.
at::Tensor cosine_gram(const at::Tensor& v, bool center);

// x ⊙ M / (1 − p) for x (C, D), M the dropout mask of docs/design.md §3 (offset c·D + j), regenerated.
// seed: the dropout seed, a 0-dim int64 CPU tensor, as for the projection.
at::Tensor dropout_mask_apply(const at::Tensor& x, double p, const at::Tensor& seed);

// (value_scale · Σ_ij (S(x)_ij − T_ij)² as a 0-dim tensor of x's dtype (Σ accumulated in double),
// d(grad_scale · Σ)/dx (B, K) or an empty tensor). S: the clamped cosine similarity of x's rows (centred when
// `center`; û = u/(‖u‖ + 1e-8) when `additive`, else u/max(‖u‖, 1e-12)); T: the same of target (B, K'), or
// `same` / `other` where labels agree / differ.
std::tuple<at::Tensor, at::Tensor> similarity_loss(const at::Tensor& x, const std::optional<at::Tensor>& target,
                                                   const std::optional<at::Tensor>& labels, double same,
                                                   double other, bool center, bool additive, double value_scale,
                                                   double grad_scale, bool need_grad);

// (mean_b CE(logits_b, y_b) as a 0-dim tensor of logits' dtype, (softmax − onehot) · grad_scale or an empty
// tensor). A label outside [0, C) makes its row's loss and gradient NaN (never read out of bounds).
std::tuple<at::Tensor, at::Tensor> softmax_cross_entropy(const at::Tensor& logits, const at::Tensor& labels,
                                                         double grad_scale, bool need_grad);

// (mean, std) (B, Ch) of x (B, Ch, L): each channel's mean and unbiased standard deviation over its L ≥ 2
// values, accumulated in double.
std::tuple<at::Tensor, at::Tensor> channel_std(const at::Tensor& x);

// dL/dx (B, Ch, L) = (x − mean) · grad_std / ((L − 1) std) per channel (0 where std = 0).
at::Tensor channel_std_backward(const at::Tensor& grad_std, const at::Tensor& x, const at::Tensor& mean,
                                const at::Tensor& std);

// The value of a dropout seed tensor (0-dim int64 on the CPU), read once on the host.
int64_t read_seed(const at::Tensor& seed);

}  // namespace svp::cpu

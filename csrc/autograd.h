// The eager autograd nodes of fused_local_loss and dropout_projection over the registered ops
// (csrc/autograd.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace svp::nodes {

// (loss, ce, alignment, v) of fused_local_loss on validated arguments (docs/backends.md): v = h R̃ᵀ (or v = h
// when `identity`) through projection_forward (projection_forward_gemm when `gemm`), the rest through
// loss_epilogue, under one autograd node whose backward is dh = grad_loss · g_v R̃ (through the same path).
// loss is differentiable w.r.t. h; ce, alignment and v are not. alignment: loss_epilogue's ("cosine_gram" or
// "bhattacharyya").
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_local_loss(
    const at::Tensor& h, const std::optional<at::Tensor>& weight, int64_t out_features, int64_t proj_seed,
    double proj_std, double p, const at::Tensor& seed, const std::optional<at::Tensor>& target,
    const std::optional<at::Tensor>& v_prev, double alignment_weight, bool mean, bool center, bool identity,
    bool gemm = false, const std::string& alignment = "cosine_gram");

// v = h R̃ᵀ through projection_forward (projection_forward_gemm when `gemm`) under one autograd node whose
// backward is dh = grad_v R̃ (the mask regenerated from `seed`), on validated arguments.
at::Tensor dropout_projection(const at::Tensor& h, const std::optional<at::Tensor>& weight, int64_t out_features,
                              int64_t proj_seed, double proj_std, double p, const at::Tensor& seed, bool gemm = false);

}  // namespace svp::nodes

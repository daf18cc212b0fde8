// The eager autograd nodes of fused_local_loss and dropout_projection for the compiled backends (cpu, cuda):
// one C++ node each over the registered ops, in place of the Python autograd.Function that the triton
// backend uses (docs/backends.md, "gradient interface"). Same ops, same arguments and the same arithmetic,
// so the same bits; what it saves is the Python work of a custom Function and its backward, which cold
// caches make cost tens of microseconds per call.
#include "autograd.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>

namespace svp::nodes {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::ScalarType accumulation_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

// The ops through the dispatcher, so that the kernel of the tensors' device runs (csrc/bindings.cpp); `gemm`
// picks the GEMM projection path (csrc/projection_gemm.cpp), whose ops have the same schemas.
at::Tensor projection_forward(const at::Tensor& h, const std::optional<at::Tensor>& weight, int64_t out_features,
                              int64_t proj_seed, double proj_std, double p, const at::Tensor& seed, bool gemm) {
  using Signature = at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, int64_t, int64_t, double, double,
                               const at::Tensor&);
  static const auto fused =
      c10::Dispatcher::singleton().findSchemaOrThrow("svp_kernels::projection_forward", "").typed<Signature>();
  static const auto through_gemm =
      c10::Dispatcher::singleton().findSchemaOrThrow("svp_kernels::projection_forward_gemm", "").typed<Signature>();
  return (gemm ? through_gemm : fused).call(h, weight, out_features, proj_seed, proj_std, p, seed);
}

at::Tensor projection_backward(const at::Tensor& grad_v, const std::optional<at::Tensor>& weight,
                               int64_t in_features, int64_t proj_seed, double proj_std, double p,
                               const at::Tensor& seed, at::ScalarType dtype, bool gemm,
                               const std::optional<at::Tensor>& grad_scale = std::nullopt) {
  using Signature = at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, int64_t, int64_t, double, double,
                               const at::Tensor&, at::ScalarType, const std::optional<at::Tensor>&);
  static const auto fused =
      c10::Dispatcher::singleton().findSchemaOrThrow("svp_kernels::projection_backward", "").typed<Signature>();
  static const auto through_gemm =
      c10::Dispatcher::singleton().findSchemaOrThrow("svp_kernels::projection_backward_gemm", "").typed<Signature>();
  return (gemm ? through_gemm : fused).call(grad_v, weight, in_features, proj_seed, proj_std, p, seed, dtype,
                                           grad_scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> loss_epilogue(const at::Tensor& v,
                                                                         const std::optional<at::Tensor>& target,
                                                                         const std::optional<at::Tensor>& v_prev,
                                                                         double alignment_weight, bool mean,
                                                                         bool center, c10::string_view alignment) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("svp_kernels::loss_epilogue", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double, bool,
              bool, c10::string_view)>();
  return op.call(v, target, v_prev, alignment_weight, mean, center, alignment);
}

// What Python's once_differentiable does: a backward run with create_graph returns its gradients through a
// node that raises if they are differentiated again (the kernels have no second derivative), instead of
// gradients without history, whose second-order terms would silently be missing.
variable_list once_differentiable(const variable_list& incoming, variable_list gradients) {
  if (!at::GradMode::is_enabled()) return gradients;
  bool requires_grad = false;
  for (const at::Tensor& grad : incoming) requires_grad = requires_grad || (grad.defined() && grad.requires_grad());
  if (!requires_grad) return gradients;
  for (at::Tensor& gradient : gradients) {
    if (gradient.defined()) gradient = gradient.detach().requires_grad_(true);
  }
  torch::autograd::DelayedError error(
      "trying to differentiate twice a function that was marked with @once_differentiable",
      static_cast<int64_t>(gradients.size()));
  return error.apply(std::move(gradients));
}

}  // namespace

// Saves g_v (B, C), the dense R (or nothing) and the seed tensor; the backward is dh = grad_loss · g_v R̃,
// the mask regenerated from the seed (identity: dh = grad_loss · g_v in h's dtype). Outside the anonymous
// namespace so that its node reads "torch::autograd::CppNode<svp::nodes::FusedLocalLoss>" (and likewise
// DropoutProjection's).
class FusedLocalLoss : public torch::autograd::Function<FusedLocalLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& h, const std::optional<at::Tensor>& weight,
                               int64_t out_features, int64_t proj_seed, double proj_std, double p,
                               const at::Tensor& seed, const std::optional<at::Tensor>& target,
                               const std::optional<at::Tensor>& v_prev, double alignment_weight, bool mean,
                               bool center, bool identity, bool gemm, const std::string& alignment_kind) {
    // An output must not be the input itself: detach gives v its own tensor when h is already float32/64.
    const at::Tensor v = identity ? h.to(accumulation_dtype(h.scalar_type())).detach()
                                  : projection_forward(h, weight, out_features, proj_seed, proj_std, p, seed, gemm);
    auto [loss, ce, alignment, grad_v] = loss_epilogue(v, target, v_prev, alignment_weight, mean, center,
                                                       alignment_kind);
    ctx->save_for_backward({grad_v, weight.value_or(at::Tensor()), seed});
    ctx->saved_data["in_features"] = h.size(1);
    ctx->saved_data["proj_seed"] = proj_seed;
    ctx->saved_data["proj_std"] = proj_std;
    ctx->saved_data["p"] = p;
    ctx->saved_data["dtype"] = static_cast<int64_t>(h.scalar_type());
    ctx->saved_data["identity"] = identity;
    ctx->saved_data["gemm"] = gemm;
    ctx->mark_non_differentiable({ce, alignment, v});
    // ce, alignment and v get no gradient: without this the engine would fill three zero tensors (three
    // kernel launches on CUDA) for the backward to ignore (tests/test_launch_budget.py).
    ctx->set_materialize_grads(false);
    return {loss, ce, alignment, v};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // as the gradient interface: no graph of its own
    variable_list grad_inputs(15);  // one per argument of forward; only h has a gradient
    if (!grads[0].defined()) return grad_inputs;  // no gradient reached the loss: none for h either
    const variable_list saved = ctx->get_saved_variables();
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt());
    if (ctx->saved_data["identity"].toBool()) {
      grad_inputs[0] = (grads[0] * saved[0]).to(dtype);
    } else {
      // dh = (grad_loss · g_v) R̃: the op multiplies grad_loss in (the CUDA kernel as it reads g_v: no launch
      // of its own), the same product as grads[0] * saved[0].
      const std::optional<at::Tensor> weight =
          saved[1].defined() ? std::optional<at::Tensor>(saved[1]) : std::nullopt;
      grad_inputs[0] = projection_backward(saved[0], weight, ctx->saved_data["in_features"].toInt(),
                                           ctx->saved_data["proj_seed"].toInt(),
                                           ctx->saved_data["proj_std"].toDouble(), ctx->saved_data["p"].toDouble(),
                                           saved[2], dtype, ctx->saved_data["gemm"].toBool(), grads[0]);
    }
    return once_differentiable(grads, std::move(grad_inputs));
  }
};

// Saves the dense R (or nothing) and the seed tensor; the backward is dh = grad_v R̃, the mask regenerated.
class DropoutProjection : public torch::autograd::Function<DropoutProjection> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& h, const std::optional<at::Tensor>& weight,
                               int64_t out_features, int64_t proj_seed, double proj_std, double p,
                               const at::Tensor& seed, bool gemm) {
    ctx->save_for_backward({weight.value_or(at::Tensor()), seed});
    ctx->saved_data["in_features"] = h.size(1);
    ctx->saved_data["proj_seed"] = proj_seed;
    ctx->saved_data["proj_std"] = proj_std;
    ctx->saved_data["p"] = p;
    ctx->saved_data["dtype"] = static_cast<int64_t>(h.scalar_type());
    ctx->saved_data["gemm"] = gemm;
    return {projection_forward(h, weight, out_features, proj_seed, proj_std, p, seed, gemm)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const variable_list saved = ctx->get_saved_variables();
    const std::optional<at::Tensor> weight = saved[0].defined() ? std::optional<at::Tensor>(saved[0]) : std::nullopt;
    variable_list grad_inputs(8);  // one per argument of forward; only h has a gradient
    grad_inputs[0] = projection_backward(grads[0].contiguous(), weight, ctx->saved_data["in_features"].toInt(),
                                         ctx->saved_data["proj_seed"].toInt(), ctx->saved_data["proj_std"].toDouble(),
                                         ctx->saved_data["p"].toDouble(), saved[1],
                                         static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt()),
                                         ctx->saved_data["gemm"].toBool());
    return once_differentiable(grads, std::move(grad_inputs));
  }
};

at::Tensor dropout_projection(const at::Tensor& h, const std::optional<at::Tensor>& weight, int64_t out_features,
                              int64_t proj_seed, double proj_std, double p, const at::Tensor& seed, bool gemm) {
  return DropoutProjection::apply(h, weight, out_features, proj_seed, proj_std, p, seed, gemm)[0];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_local_loss(
    const at::Tensor& h, const std::optional<at::Tensor>& weight, int64_t out_features, int64_t proj_seed,
    double proj_std, double p, const at::Tensor& seed, const std::optional<at::Tensor>& target,
    const std::optional<at::Tensor>& v_prev, double alignment_weight, bool mean, bool center, bool identity,
    bool gemm, const std::string& alignment) {
  const variable_list out = FusedLocalLoss::apply(h, weight, out_features, proj_seed, proj_std, p, seed, target,
                                                  v_prev, alignment_weight, mean, center, identity, gemm, alignment);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace svp::nodes

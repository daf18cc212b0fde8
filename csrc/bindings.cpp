// Op registration: the four svp_kernels schemas (docs/backends.md), their CPU implementations, and the
// pybind11 module svp_kernels._C (the eager nodes of csrc/autograd.cpp, test helpers). CUDA implementations
// register in csrc/bindings_cuda.cpp.
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <utility>

#include "autograd.h"
#include "cpu/ops.h"
#include "svp/philox.h"
#if defined(SVP_WITH_CUDA)
#include <string>
#include <utility>

#include "bindings_cuda.h"
#endif

namespace {

// (n, 4) int64 tensor of the raw Philox4x32-10 words of offsets start, ..., start + n − 1 under `seed`.
at::Tensor philox_words(int64_t seed, int64_t n, int64_t start) {
  TORCH_CHECK(seed >= 0 && start >= 0 && n >= 0, "philox_words: seed, n and start must be non-negative");
  at::Tensor words = at::empty({n, 4}, at::kLong);
  int64_t* out = words.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    const svp::PhiloxWords w = svp::philox4x32_10(static_cast<uint64_t>(seed), static_cast<uint64_t>(start + i));
    out[4 * i + 0] = w.w0;
    out[4 * i + 1] = w.w1;
    out[4 * i + 2] = w.w2;
    out[4 * i + 3] = w.w3;
  }
  return words;
}

// (min, max) of a non-empty 1-D int64 CPU tensor, in one pass: the API's range check of targets.
std::pair<int64_t, int64_t> index_bounds(const at::Tensor& index) {
  TORCH_CHECK(index.device().is_cpu() && index.scalar_type() == at::kLong && index.dim() == 1 && index.numel() > 0,
              "index_bounds: expected a non-empty 1-D int64 CPU tensor");
  const at::Tensor values = index.contiguous();
  const int64_t* data = values.data_ptr<int64_t>();
  int64_t low = data[0], high = data[0];
  for (int64_t i = 1; i < values.numel(); ++i) {
    low = std::min(low, data[i]);
    high = std::max(high, data[i]);
  }
  return {low, high};
}

bool has_cuda() {
#if defined(SVP_WITH_CUDA)
  return true;
#else
  return false;
#endif
}

#if defined(SVP_WITH_CUDA)
// The fields of svp_cuda::LaunchPlan by name, for the testing hook below.
constexpr std::pair<const char*, int64_t svp_cuda::LaunchPlan::*> kLaunchPlanFields[] = {
    {"forward_panels_per_split", &svp_cuda::LaunchPlan::forward_panels_per_split},
    {"forward_btiles_per_block", &svp_cuda::LaunchPlan::forward_btiles_per_block},
    {"backward_btiles_per_block", &svp_cuda::LaunchPlan::backward_btiles_per_block},
    {"gram_splits", &svp_cuda::LaunchPlan::gram_splits},
    {"batch_splits", &svp_cuda::LaunchPlan::batch_splits},
    {"epilogue_feature", &svp_cuda::LaunchPlan::epilogue_feature},
};

// The CUDA ops' process-wide launch plan as {field: value}.
pybind11::dict cuda_launch_plan() {
  const svp_cuda::LaunchPlan plan = svp_cuda_adapter::launch_plan();
  pybind11::dict fields;
  for (const auto& [name, member] : kLaunchPlanFields) fields[name] = plan.*member;
  return fields;
}

// Sets it from {field: value}; the fields not given take the heuristic. ValueError for an unknown field.
void set_cuda_launch_plan(const pybind11::dict& fields) {
  svp_cuda::LaunchPlan plan;
  for (const auto& item : fields) {
    const std::string key = pybind11::cast<std::string>(item.first);
    bool known = false;
    for (const auto& [name, member] : kLaunchPlanFields) {
      if (key == name) {
        plan.*member = pybind11::cast<int64_t>(item.second);
        known = true;
      }
    }
    if (!known) throw pybind11::value_error("_set_cuda_launch_plan: unknown LaunchPlan field '" + key + "'");
  }
  svp_cuda_adapter::set_launch_plan(plan);
}
#endif

}  // namespace

TORCH_LIBRARY(svp_kernels, m) {
  m.def(
      "projection_forward(Tensor h, Tensor? weight, int out_features, int proj_seed, float proj_std, float p, "
      "Tensor seed) -> Tensor v");
  m.def(
      "projection_backward(Tensor grad_v, Tensor? weight, int in_features, int proj_seed, float proj_std, "
      "float p, Tensor seed, ScalarType dtype, Tensor? grad_scale=None) -> Tensor dh");
  m.def(
      "loss_epilogue(Tensor v, Tensor? target, Tensor? v_prev, float alignment_weight, bool mean, bool center, "
      "str alignment=\"cosine_gram\") -> (Tensor loss, Tensor ce, Tensor alignment, Tensor g_v)");
  m.def("cosine_gram(Tensor v, bool center) -> Tensor");
  // The GEMM projection path (csrc/projection_gemm.cpp): R̃ written out once, then the device's GEMM.
  m.def(
      "dropped_projection(Tensor? weight, int out_features, int in_features, int proj_seed, float proj_std, "
      "float p, Tensor seed, ScalarType dtype) -> Tensor");
  m.def(
      "projection_forward_gemm(Tensor h, Tensor? weight, int out_features, int proj_seed, float proj_std, float p, "
      "Tensor seed) -> Tensor v");
  m.def(
      "projection_backward_gemm(Tensor grad_v, Tensor? weight, int in_features, int proj_seed, float proj_std, "
      "float p, Tensor seed, ScalarType dtype, Tensor? grad_scale=None) -> Tensor dh");
}

TORCH_LIBRARY_IMPL(svp_kernels, CPU, m) {
  m.impl("projection_forward", &svp::cpu::projection_forward);
  m.impl("projection_backward", &svp::cpu::projection_backward);
  m.impl("loss_epilogue", &svp::cpu::loss_epilogue);
  m.impl("cosine_gram", &svp::cpu::cosine_gram);
  m.impl("dropped_projection", &svp::cpu::dropped_projection);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "svp_kernels compiled ops (registered under torch.ops.svp_kernels) and test helpers";
  module.def("philox_words", &philox_words, "(n, 4) int64 Philox4x32-10 words of offsets start..start+n-1",
             pybind11::arg("seed"), pybind11::arg("n"), pybind11::arg("start") = 0);
  module.def("has_cuda", &has_cuda, "Whether the CUDA kernels were compiled in");
  module.def("index_bounds", &index_bounds, "(min, max) of a non-empty 1-D int64 CPU tensor", pybind11::arg("index"));
  module.def("fused_local_loss", &svp::nodes::fused_local_loss,
             "(loss, ce, alignment, v) of fused_local_loss on validated arguments, under one C++ autograd node",
             pybind11::arg("h"), pybind11::arg("weight"), pybind11::arg("out_features"), pybind11::arg("proj_seed"),
             pybind11::arg("proj_std"), pybind11::arg("p"), pybind11::arg("seed"), pybind11::arg("target"),
             pybind11::arg("v_prev"), pybind11::arg("alignment_weight"), pybind11::arg("mean"),
             pybind11::arg("center"), pybind11::arg("identity"), pybind11::arg("gemm") = false,
             pybind11::arg("alignment") = "cosine_gram");
  module.def("dropout_projection", &svp::nodes::dropout_projection,
             "v = h R̃ᵀ of dropout_projection on validated arguments, under one C++ autograd node",
             pybind11::arg("h"), pybind11::arg("weight"), pybind11::arg("out_features"), pybind11::arg("proj_seed"),
             pybind11::arg("proj_std"), pybind11::arg("p"), pybind11::arg("seed"), pybind11::arg("gemm") = false);
#if defined(SVP_WITH_CUDA)
  // Testing and diagnostic hook (docs/backends.md); use svp_kernels.backends.cuda.launch_plan, which
  // validates the values and restores the previous plan.
  module.def("_cuda_launch_plan", &cuda_launch_plan, "The CUDA ops' launch plan (svp_cuda::LaunchPlan) as a dict");
  module.def("_set_cuda_launch_plan", &set_cuda_launch_plan,
             "Set the CUDA ops' launch plan from a dict of LaunchPlan fields (the others: the heuristic)",
             pybind11::arg("fields"));
#endif
}

// The similarity-matching losses (csrc/cpu/predsim.cpp): the learnable-head dropout gradient x ⊙ M / (1 − p)
// with M regenerated, the similarity loss with its gradient, the decoder's softmax cross-entropy, and the
// per-channel std of reduce="std".
TORCH_LIBRARY_FRAGMENT(svp_kernels, m) {
  m.def("dropout_mask_apply(Tensor x, float p, Tensor seed) -> Tensor");
  m.def(
      "similarity_loss(Tensor x, Tensor? target, Tensor? labels, float same, float other, bool center, "
      "bool additive, float value_scale, float grad_scale, bool need_grad) -> (Tensor value, Tensor grad)");
  m.def("softmax_cross_entropy(Tensor logits, Tensor labels, float grad_scale, bool need_grad) -> (Tensor, Tensor)");
  m.def("channel_std(Tensor x) -> (Tensor mean, Tensor std)");
  m.def("channel_std_backward(Tensor grad_std, Tensor x, Tensor mean, Tensor std) -> Tensor");
}

TORCH_LIBRARY_IMPL(svp_kernels, CPU, m) {
  m.impl("dropout_mask_apply", &svp::cpu::dropout_mask_apply);
  m.impl("similarity_loss", &svp::cpu::similarity_loss);
  m.impl("softmax_cross_entropy", &svp::cpu::softmax_cross_entropy);
  m.impl("channel_std", &svp::cpu::channel_std);
  m.impl("channel_std_backward", &svp::cpu::channel_std_backward);
}

// The GEMM projection path (docs/design.md §2, docs/backends.md "projection paths"): v = h R̃ᵀ and dh = grad_v R̃
// through the device's GEMM (cuBLAS on CUDA, ATen's on the CPU) on a transient R̃ (C, D) that one
// svp_kernels::dropped_projection call writes (a Philox kernel on CUDA, the CPU kernels' row generator on the
// CPU): the same mask bits and the same implicit-R values as the fused kernels, so the same R̃ element for
// element in float32/float64. Written once against ATen, for every device: registered below for CPU and CUDA.
//
// Memory: one transient R̃ of C·D elements of h's dtype per call (forward and backward each write their own; none
// is kept in between), the size of R itself. A dense R with p = 0 is R̃: no copy then.
//
// Numerics: float32/float64 multiply in their own precision — float32 in IEEE float32 (TF32 switched off around
// the call when torch allows it for cuBLAS), so the result is what torch's own float32 matmul gives, which meets
// the suite's element-wise accuracy rule by construction. bfloat16/float16 run on the tensor cores: R̃ is
// rounded to h's dtype (values of R̃ that the fused kernels keep in float32: the dropout scale and an implicit R),
// v accumulates and returns in float32 (mm's out_dtype); the backward rounds grad_v to h's dtype before the GEMM
// and dh is rounded once from cuBLAS's float32 accumulator.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>

namespace svp::gemm {
namespace {

bool is_half(at::ScalarType dtype) { return dtype == at::kBFloat16 || dtype == at::kHalf; }

// R̃ (C, D) in `dtype` through the op of the tensors' device.
at::Tensor dropped_projection(const std::optional<at::Tensor>& weight, int64_t out_features, int64_t in_features,
                              int64_t proj_seed, double proj_std, double p, const at::Tensor& seed,
                              at::ScalarType dtype) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("svp_kernels::dropped_projection", "")
                             .typed<at::Tensor(const std::optional<at::Tensor>&, int64_t, int64_t, int64_t, double,
                                               double, const at::Tensor&, at::ScalarType)>();
  return op.call(weight, out_features, in_features, proj_seed, proj_std, p, seed, dtype);
}

// The R̃ the GEMM reads: a dense R with p = 0 as it is (in `dtype`), otherwise written by dropped_projection.
at::Tensor r_tilde(const std::optional<at::Tensor>& weight, int64_t out_features, int64_t in_features,
                   int64_t proj_seed, double proj_std, double p, const at::Tensor& seed, at::ScalarType dtype) {
  if (weight.has_value() && weight->defined() && p == 0.0) {
    TORCH_CHECK(weight->dim() == 2 && weight->size(0) == out_features && weight->size(1) == in_features,
                "svp_kernels gemm projection: weight must be (", out_features, ", ", in_features, "), got ",
                weight->sizes());
    return weight->to(dtype);
  }
  return dropped_projection(weight, out_features, in_features, proj_seed, proj_std, p, seed, dtype);
}

// IEEE float32 for the GEMMs of this path on CUDA: TF32 off while it runs, restored after (torch's switch is
// process-wide; another thread's float32 matmul during the call also runs in IEEE float32).
class IeeeFloat32 {
 public:
  explicit IeeeFloat32(const at::Tensor& operand)
      : active_(operand.is_cuda() && operand.scalar_type() == at::kFloat && at::globalContext().allowTF32CuBLAS()) {
    if (active_) at::globalContext().setAllowTF32CuBLAS(false);
  }
  ~IeeeFloat32() {
    if (active_) at::globalContext().setAllowTF32CuBLAS(true);
  }
  IeeeFloat32(const IeeeFloat32&) = delete;
  IeeeFloat32& operator=(const IeeeFloat32&) = delete;

 private:
  bool active_;
};

// v (B, C) = h R̃ᵀ in the accumulation dtype (float32 for bfloat16/float16 h, h's dtype otherwise).
at::Tensor projection_forward_gemm(const at::Tensor& h, const std::optional<at::Tensor>& weight, int64_t out_features,
                                   int64_t proj_seed, double proj_std, double p, const at::Tensor& seed) {
  TORCH_CHECK(h.dim() == 2, "svp_kernels projection_forward_gemm: h must be (B, D), got ", h.sizes());
  const at::Tensor r = r_tilde(weight, out_features, h.size(1), proj_seed, proj_std, p, seed, h.scalar_type());
  const IeeeFloat32 ieee(h);
  return is_half(h.scalar_type()) ? at::mm(h, r.t(), at::kFloat) : at::mm(h, r.t());
}

// dh (B, D) = (grad_scale ·) grad_v R̃ in `dtype` (h's dtype); grad_v (B, C) is in the accumulation dtype.
at::Tensor projection_backward_gemm(const at::Tensor& grad_v, const std::optional<at::Tensor>& weight,
                                    int64_t in_features, int64_t proj_seed, double proj_std, double p,
                                    const at::Tensor& seed, at::ScalarType dtype,
                                    const std::optional<at::Tensor>& grad_scale) {
  TORCH_CHECK(grad_v.dim() == 2, "svp_kernels projection_backward_gemm: grad_v must be (B, C), got ",
              grad_v.sizes());
  const at::Tensor r = r_tilde(weight, grad_v.size(1), in_features, proj_seed, proj_std, p, seed, dtype);
  const at::Tensor grad = (grad_scale.has_value() ? *grad_scale * grad_v : grad_v).to(dtype);
  const IeeeFloat32 ieee(grad);
  return at::mm(grad, r);
}

}  // namespace
}  // namespace svp::gemm

// Same schemas as projection_forward / projection_backward (csrc/bindings.cpp defines all of them).
TORCH_LIBRARY_IMPL(svp_kernels, CPU, m) {
  m.impl("projection_forward_gemm", &svp::gemm::projection_forward_gemm);
  m.impl("projection_backward_gemm", &svp::gemm::projection_backward_gemm);
}

TORCH_LIBRARY_IMPL(svp_kernels, CUDA, m) {
  m.impl("projection_forward_gemm", &svp::gemm::projection_forward_gemm);
  m.impl("projection_backward_gemm", &svp::gemm::projection_backward_gemm);
}

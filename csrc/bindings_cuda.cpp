// CUDA implementations of the svp_kernels ops (schemas: csrc/bindings.cpp, docs/backends.md).
//
// A thin adapter: check and normalise the tensors, allocate outputs and scratch with torch's caching
// allocator, call the framework-free launchers of csrc/cuda/svp_cuda.h on the current stream, and turn a
// cudaError_t into a torch error naming the kernel. Every op launches with the process-wide LaunchPlan held
// here (the heuristic unless a test or a diagnosis sets it through svp_kernels._C._set_cuda_launch_plan); the
// workspace query and the launch of one call get the same copy. Compiled only on CUDA builds (setup.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>
#include <utility>

#include "bindings_cuda.h"
#include "cuda/svp_cuda.h"
#include "epilogue_arguments.h"

namespace svp_cuda_adapter {
namespace {

std::mutex launch_plan_mutex;
svp_cuda::LaunchPlan launch_plan_value;  // guarded by launch_plan_mutex

}  // namespace

svp_cuda::LaunchPlan launch_plan() {
  const std::lock_guard<std::mutex> lock(launch_plan_mutex);
  return launch_plan_value;
}

void set_launch_plan(const svp_cuda::LaunchPlan& plan) {
  const std::lock_guard<std::mutex> lock(launch_plan_mutex);
  launch_plan_value = plan;
}

}  // namespace svp_cuda_adapter

namespace {

void check_cuda(cudaError_t status, const char* kernel) {
  if (status != cudaSuccess) {
    TORCH_CHECK(false, "svp_kernels cuda ", kernel, ": ", cudaGetErrorString(status));
  }
}

svp_cuda::DType kernel_dtype(at::ScalarType type, const char* op, const char* what) {
  switch (type) {
    case at::kFloat:
      return svp_cuda::DType::kFloat32;
    case at::kDouble:
      return svp_cuda::DType::kFloat64;
    case at::kBFloat16:
      return svp_cuda::DType::kBFloat16;
    case at::kHalf:
      return svp_cuda::DType::kFloat16;
    default:
      TORCH_CHECK(false, "svp_kernels cuda ", op, ": ", what, " must be float32, float64, bfloat16 or float16, got ",
                  type);
  }
  return svp_cuda::DType::kFloat32;  // unreachable: TORCH_CHECK(false) throws
}

// float64 accumulates in float64, every other dtype in float32.
at::ScalarType accumulation_type(at::ScalarType type) { return type == at::kDouble ? at::kDouble : at::kFloat; }

void check_on_device(const at::Tensor& tensor, const at::Tensor& reference, const char* op, const char* what) {
  TORCH_CHECK(tensor.device() == reference.device(), "svp_kernels cuda ", op, ": ", what, " is on ", tensor.device(),
              " but the other inputs are on ", reference.device());
}

// A contiguous (C, D) weight in `dtype` on `like`'s device, or an undefined tensor for the implicit R.
at::Tensor dense_weight(const std::optional<at::Tensor>& weight, const at::Tensor& like, at::ScalarType dtype,
                        int64_t out_features, int64_t in_features, const char* op) {
  if (!weight.has_value() || !weight->defined()) return at::Tensor();
  check_on_device(*weight, like, op, "weight");
  TORCH_CHECK(weight->dim() == 2 && weight->size(0) == out_features && weight->size(1) == in_features,
              "svp_kernels cuda ", op, ": weight must be (", out_features, ", ", in_features, "), got ",
              weight->sizes());
  return weight->to(dtype).contiguous();
}

uint64_t seed_value(int64_t seed, const char* op, const char* what) {
  TORCH_CHECK(seed >= 0, "svp_kernels cuda ", op, ": ", what, " must be in [0, 2**63), got ", seed);
  return static_cast<uint64_t>(seed);
}

// The dropout seed: a 0-dim int64 tensor on the op's device. Only its pointer reaches the kernels, which read
// the value themselves: no copy to the host, so a captured graph replays with the seed's current value.
const int64_t* seed_pointer(const at::Tensor& seed, const at::Tensor& like, const char* op) {
  check_on_device(seed, like, op, "seed");
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.dim() == 0, "svp_kernels cuda ", op,
              ": seed must be a 0-dim int64 tensor, got ", seed.scalar_type(), " of shape ", seed.sizes());
  return seed.data_ptr<int64_t>();
}

// `count` zeroed arrival counters for the launchers that reduce across blocks inside a kernel (svp_cuda.h,
// projection_forward): the kernels leave them zero, so each (device, stream) keeps one buffer for the process,
// zeroed once when it is made or grown. One per stream, because launches on two streams may run at once.
unsigned* arrival_counters(const at::Tensor& like, int64_t count) {
  if (count <= 0) return nullptr;
  static std::mutex mutex;
  static std::map<std::pair<int64_t, cudaStream_t>, at::Tensor> buffers;  // guarded by mutex
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& buffer = buffers[{like.device().index(), stream}];
  if (!buffer.defined() || buffer.numel() < count) {
    const int64_t size = std::max<int64_t>({count, 2 * (buffer.defined() ? buffer.numel() : 0), 1024});
    buffer = at::zeros({size}, like.options().dtype(at::kInt));  // on the current stream, before the kernel
  }
  return reinterpret_cast<unsigned*>(buffer.data_ptr<int32_t>());
}

// Scratch of `bytes` bytes from the caching allocator (an undefined tensor for zero bytes).
at::Tensor workspace_like(const at::Tensor& like, size_t bytes) {
  if (bytes == 0) return at::Tensor();
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

void* data_or_null(const at::Tensor& tensor) { return tensor.defined() ? tensor.data_ptr() : nullptr; }

// ---------------------------------------------------------------------------------------------------------

at::Tensor projection_forward_cuda(const at::Tensor& h, const std::optional<at::Tensor>& weight, int64_t out_features,
                                   int64_t proj_seed, double proj_std, double p, const at::Tensor& seed) {
  constexpr const char* op = "projection_forward";
  TORCH_CHECK(h.is_cuda() && h.dim() == 2, "svp_kernels cuda ", op, ": h must be a (B, D) CUDA tensor, got ",
              h.sizes(), " on ", h.device());
  TORCH_CHECK(out_features >= 0, "svp_kernels cuda ", op, ": out_features must be >= 0, got ", out_features);
  TORCH_CHECK(p >= 0.0 && p < 1.0, "svp_kernels cuda ", op, ": p must be in [0, 1), got ", p);
  const c10::cuda::CUDAGuard device_guard(h.device());
  const svp_cuda::DType dtype = kernel_dtype(h.scalar_type(), op, "h");
  const at::Tensor h_c = h.contiguous();
  const int64_t B = h_c.size(0), D = h_c.size(1), C = out_features;
  const at::Tensor w = dense_weight(weight, h_c, h_c.scalar_type(), C, D, op);
  const int64_t* seed_ptr = seed_pointer(seed, h_c, op);
  at::Tensor v = at::empty({B, C}, h_c.options().dtype(accumulation_type(h_c.scalar_type())));
  if (B == 0 || C == 0) return v;

  const svp_cuda::LaunchPlan plan = svp_cuda_adapter::launch_plan();
  size_t bytes = 0;
  check_cuda(svp_cuda::projection_forward_workspace_bytes(B, C, D, dtype, &bytes, plan), op);
  const at::Tensor workspace = workspace_like(h_c, bytes);
  int64_t counter_count = 0;
  check_cuda(svp_cuda::projection_forward_counters(B, C, D, dtype, &counter_count, plan), op);
  check_cuda(svp_cuda::projection_forward(h_c.data_ptr(), data_or_null(w), v.data_ptr(), B, C, D,
                                          seed_value(proj_seed, op, "proj_seed"), static_cast<float>(proj_std), p,
                                          seed_ptr, dtype, data_or_null(workspace), bytes, plan,
                                          c10::cuda::getCurrentCUDAStream().stream(),
                                          arrival_counters(h_c, counter_count), counter_count),
             op);
  return v;
}

at::Tensor projection_backward_cuda(const at::Tensor& grad_v, const std::optional<at::Tensor>& weight,
                                    int64_t in_features, int64_t proj_seed, double proj_std, double p,
                                    const at::Tensor& seed, at::ScalarType dtype,
                                    const std::optional<at::Tensor>& grad_scale) {
  constexpr const char* op = "projection_backward";
  TORCH_CHECK(grad_v.is_cuda() && grad_v.dim() == 2, "svp_kernels cuda ", op,
              ": grad_v must be a (B, C) CUDA tensor, got ", grad_v.sizes(), " on ", grad_v.device());
  TORCH_CHECK(in_features >= 0, "svp_kernels cuda ", op, ": in_features must be >= 0, got ", in_features);
  TORCH_CHECK(p >= 0.0 && p < 1.0, "svp_kernels cuda ", op, ": p must be in [0, 1), got ", p);
  const c10::cuda::CUDAGuard device_guard(grad_v.device());
  const svp_cuda::DType kernel_type = kernel_dtype(dtype, op, "dtype");
  // The kernels read grad_v in the accumulation dtype of h's dtype.
  const at::Tensor grad_c = grad_v.to(accumulation_type(dtype)).contiguous();
  const int64_t B = grad_c.size(0), C = grad_c.size(1), D = in_features;
  const at::Tensor w = dense_weight(weight, grad_c, dtype, C, D, op);
  const int64_t* seed_ptr = seed_pointer(seed, grad_c, op);
  // The incoming gradient's scale: read by the kernel on the device (no host copy), in grad_v's dtype.
  at::Tensor scale;
  if (grad_scale.has_value() && grad_scale->defined()) {
    check_on_device(*grad_scale, grad_c, op, "grad_scale");
    TORCH_CHECK(grad_scale->dim() == 0, "svp_kernels cuda ", op, ": grad_scale must be 0-dim, got ",
                grad_scale->sizes());
    scale = grad_scale->to(grad_c.scalar_type());
  }
  at::Tensor dh = at::empty({B, D}, grad_c.options().dtype(dtype));
  if (B == 0 || D == 0) return dh;

  check_cuda(svp_cuda::projection_backward(grad_c.data_ptr(), data_or_null(w), dh.data_ptr(), B, C, D,
                                           seed_value(proj_seed, op, "proj_seed"), static_cast<float>(proj_std), p,
                                           seed_ptr, kernel_type, svp_cuda_adapter::launch_plan(),
                                           c10::cuda::getCurrentCUDAStream().stream(), data_or_null(scale)),
             op);
  return dh;
}

at::Tensor dropped_projection_cuda(const std::optional<at::Tensor>& weight, int64_t out_features, int64_t in_features,
                                   int64_t proj_seed, double proj_std, double p, const at::Tensor& seed,
                                   at::ScalarType dtype) {
  constexpr const char* op = "dropped_projection";
  TORCH_CHECK(seed.is_cuda(), "svp_kernels cuda ", op, ": seed must be a CUDA tensor, got one on ", seed.device());
  TORCH_CHECK(out_features >= 0 && in_features >= 0, "svp_kernels cuda ", op,
              ": out_features and in_features must be >= 0, got ", out_features, ", ", in_features);
  TORCH_CHECK(p >= 0.0 && p < 1.0, "svp_kernels cuda ", op, ": p must be in [0, 1), got ", p);
  const c10::cuda::CUDAGuard device_guard(seed.device());
  const svp_cuda::DType kernel_type = kernel_dtype(dtype, op, "dtype");
  const at::Tensor w = dense_weight(weight, seed, dtype, out_features, in_features, op);
  const int64_t* seed_ptr = seed_pointer(seed, seed, op);
  at::Tensor out = at::empty({out_features, in_features}, seed.options().dtype(dtype));
  check_cuda(svp_cuda::dropped_projection(data_or_null(w), out.data_ptr(), out_features, in_features,
                                          seed_value(proj_seed, op, "proj_seed"), static_cast<float>(proj_std), p,
                                          seed_ptr, kernel_type, c10::cuda::getCurrentCUDAStream().stream()),
             op);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> loss_epilogue_cuda(
    const at::Tensor& v, const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& v_prev,
    double alignment_weight, bool mean, bool center, c10::string_view alignment_name) {
  constexpr const char* op = "loss_epilogue";
  const bool bhattacharyya = svp::bhattacharyya_alignment(alignment_name);
  const svp_cuda::Alignment alignment_kind =
      bhattacharyya ? svp_cuda::Alignment::kBhattacharyya : svp_cuda::Alignment::kCosineGram;
  TORCH_CHECK(v.is_cuda() && v.dim() == 2, "svp_kernels cuda ", op, ": v must be a (B, C) CUDA tensor, got ",
              v.sizes(), " on ", v.device());
  TORCH_CHECK(v.size(0) >= 1, "svp_kernels cuda ", op, ": the batch is empty (v has 0 rows)");
  const c10::cuda::CUDAGuard device_guard(v.device());
  const svp_cuda::DType dtype = kernel_dtype(v.scalar_type(), op, "v");
  const at::Tensor v_c = v.contiguous();
  const int64_t B = v_c.size(0), C = v_c.size(1);

  at::Tensor target_c;
  if (target.has_value() && target->defined()) {
    check_on_device(*target, v_c, op, "target");
    TORCH_CHECK(target->dim() == 1 && target->size(0) == B, "svp_kernels cuda ", op, ": target must be (", B,
                ",), got ", target->sizes());
    target_c = target->to(at::kLong).contiguous();
  }
  at::Tensor v_prev_c;
  int64_t Cp = 0;
  if (v_prev.has_value() && v_prev->defined()) {
    check_on_device(*v_prev, v_c, op, "v_prev");
    TORCH_CHECK(v_prev->dim() == 2 && v_prev->size(0) == B, "svp_kernels cuda ", op, ": v_prev must be (", B,
                ", C'), got ", v_prev->sizes());
    v_prev_c = v_prev->to(v_c.scalar_type()).contiguous();
    Cp = v_prev_c.size(1);
  }
  if (bhattacharyya) svp::check_bhattacharyya_arguments(C, v_prev_c.defined() ? Cp : -1, center);

  const at::TensorOptions acc_options = v_c.options().dtype(accumulation_type(v_c.scalar_type()));
  at::Tensor loss = at::empty({}, acc_options);
  at::Tensor ce = at::empty({}, acc_options);
  at::Tensor alignment = at::empty({}, acc_options);
  at::Tensor g_v = at::empty({B, C}, acc_options);

  const svp_cuda::LaunchPlan plan = svp_cuda_adapter::launch_plan();
  size_t bytes = 0;
  check_cuda(svp_cuda::loss_epilogue_workspace_bytes(B, C, Cp, v_prev_c.defined(), dtype, &bytes, plan, alignment_kind),
             op);
  const at::Tensor workspace = workspace_like(v_c, bytes);
  check_cuda(svp_cuda::loss_epilogue(v_c.data_ptr(),
                                     target_c.defined() ? target_c.data_ptr<int64_t>() : nullptr,
                                     data_or_null(v_prev_c), loss.data_ptr(), ce.data_ptr(), alignment.data_ptr(),
                                     g_v.data_ptr(), B, C, Cp, alignment_weight, mean, center, dtype,
                                     data_or_null(workspace), bytes, plan, c10::cuda::getCurrentCUDAStream().stream(),
                                     alignment_kind),
             op);
  return std::make_tuple(loss, ce, alignment, g_v);
}

at::Tensor cosine_gram_cuda(const at::Tensor& v, bool center) {
  constexpr const char* op = "cosine_gram";
  TORCH_CHECK(v.is_cuda() && v.dim() == 2, "svp_kernels cuda ", op, ": v must be a (B, C) CUDA tensor, got ",
              v.sizes(), " on ", v.device());
  const c10::cuda::CUDAGuard device_guard(v.device());
  const svp_cuda::DType dtype = kernel_dtype(v.scalar_type(), op, "v");
  const at::Tensor v_c = v.contiguous();
  const int64_t B = v_c.size(0), C = v_c.size(1);
  at::Tensor S = at::empty({B, B}, v_c.options().dtype(accumulation_type(v_c.scalar_type())));
  if (B == 0) return S;

  size_t bytes = 0;
  check_cuda(svp_cuda::cosine_gram_workspace_bytes(B, C, dtype, &bytes), op);
  const at::Tensor workspace = workspace_like(v_c, bytes);
  check_cuda(svp_cuda::cosine_gram(v_c.data_ptr(), S.data_ptr(), B, C, center, dtype, data_or_null(workspace), bytes,
                                   c10::cuda::getCurrentCUDAStream().stream()),
             op);
  return S;
}

}  // namespace

TORCH_LIBRARY_IMPL(svp_kernels, CUDA, m) {
  m.impl("projection_forward", &projection_forward_cuda);
  m.impl("projection_backward", &projection_backward_cuda);
  m.impl("loss_epilogue", &loss_epilogue_cuda);
  m.impl("cosine_gram", &cosine_gram_cuda);
  m.impl("dropped_projection", &dropped_projection_cuda);
}

// CPU kernel of the learnable-head dropout gradient: dW = (g_vᵀ h) ⊙ M / (1 − p).
//
// The product g_vᵀ h is a plain GEMM (ATen's); this pass applies the mask of docs/design.md §3 in place,
// regenerating word0 of Philox4x32-10 at offset n = c·D + j for each element, so neither M nor the dropped
// weight W̃ is ever stored. Rows are split across threads; each element is independent.
#include <ATen/Parallel.h>

#include "cpu/ops.h"
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

}  // namespace predsim_detail

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

// CPU kernels of the loss epilogue (docs/design.md §2) on v (B, C): cross-entropy, the alignment
// FA = ‖â âᵀ − b̂ b̂ᵀ‖²_F and g_v = dloss/dv in one call, with O(B·C + B·C' + C²) scratch, never B×B.
// FA takes the feature-space identity when C + C' < B, else kGramTile × kGramTile tiles of batch-space
// Grams. Every sum runs in an order fixed by the shapes, so results never depend on the thread count.
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/gemm.h"
#include "cpu/ops.h"
#include "svp/math.h"

namespace svp::cpu {
namespace epilogue_detail {

constexpr int64_t kRowGrain = 256;    // rows per parallel_for grain in row-wise stages
constexpr int64_t kGramRowGrain = 4;  // rows of the feature-space Gram per grain
constexpr int64_t kGramTile = 64;     // batch-space tiles of S(v) − S(v_prev)
constexpr int64_t kTransposeRows = 32;

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

// mean_b [logsumexp(v_b) − v_{b,y_b}]; writes grad = (softmax(v) − onehot(y)) / B.
template <typename T>
T cross_entropy(const T* v, const int64_t* target, int64_t batch, int64_t features, T* grad) {
  std::vector<T> row_losses(batch);
  const T grad_scale = T(1) / static_cast<T>(batch);
  at::parallel_for(0, batch, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      row_losses[b] = cross_entropy_row(v + b * features, features, target[b], grad_scale, grad + b * features);
    }
  });
  return sum_in_order(row_losses) / static_cast<T>(batch);
}

// ---- Normalisation -----------------------------------------------------------------------------------

// out (B × n, leading dimension ldo) = â, the rows of v normalised; norms[b] = ‖u_b‖ (skipped if null).
template <typename T>
void normalize_rows(const T* v, int64_t batch, int64_t n, bool center, T* out, int64_t ldo, T* norms) {
  at::parallel_for(0, batch, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const T norm = normalize_row(v + b * n, n, center, out + b * ldo);
      if (norms != nullptr) norms[b] = norm;
    }
  });
}

// ---- Alignment ---------------------------------------------------------------------------------------
// Both paths take P = [â | b̂] (B × W, W = C + C'), the normalised rows side by side, and return FA with
// grad_a = ∂FA/∂â / 4 = â(âᵀâ) − b̂(b̂ᵀâ) written into grad_a (B × C, zero-filled).

// Feature space, O(B·W²) time: G = PᵀP = [[âᵀâ, âᵀb̂], [b̂ᵀâ, b̂ᵀb̂]] holds all three Grams, so
// FA = ‖âᵀâ‖² − 2‖b̂ᵀâ‖² + ‖b̂ᵀb̂‖² (may round to a tiny negative; kept) and grad_a = P · [âᵀâ ; −b̂ᵀâ].
template <typename T>
T feature_space_alignment(const T* joined, int64_t batch, int64_t C, int64_t C_prev, T* grad_a) {
  const int64_t W = C + C_prev;
  // Stage 1: Pᵀ (W × B) in WideSum, so that each Gram entry is a dot product of two contiguous rows. Blocks
  // of kTransposeRows rows of P keep the reads in L1 while each row of Pᵀ is written contiguously.
  // G is formed and kept in WideSum: FA = ‖âᵀâ‖² − 2‖b̂ᵀâ‖² + ‖b̂ᵀb̂‖² cancels when v and v_prev are aligned
  // (FA ≪ ‖âᵀâ‖²), and a float32 G would lose FA's leading digits there (products of floats are exact
  // in double, so G is exact to double rounding).
  std::vector<WideSum> transposed(W * batch);
  for (int64_t b0 = 0; b0 < batch; b0 += kTransposeRows) {
    const int64_t b1 = std::min(batch, b0 + kTransposeRows);
    for (int64_t i = 0; i < W; ++i)
      for (int64_t b = b0; b < b1; ++b) transposed[i * batch + b] = joined[b * W + i];
  }

  // Stage 2: G = Pᵀ (Pᵀ)ᵀ; tasks own blocks of rows of G, each entry summed over all of B. G is symmetric:
  // a block of rows [begin, end) computes columns [0, end) only, and the upper triangle is mirrored.
  std::vector<WideSum> gram(W * W, 0.0);
  if constexpr (std::is_same_v<T, double>) {
    at::parallel_for(0, W, kGramRowGrain, [&](int64_t begin, int64_t end) {
      gemm_nt_accumulate(transposed.data() + begin * batch, batch, end - begin, transposed.data(), batch, end, batch,
                         gram.data() + begin * W, W);
    });
  } else {
    // float data: G = Pᵀ · P as outer products over B (gemm_nn: no horizontal sum per entry), in double.
    const std::vector<WideSum> joined_wide(joined, joined + batch * W);
    at::parallel_for(0, W, kGramRowGrain, [&](int64_t begin, int64_t end) {
      gemm_nn(transposed.data() + begin * batch, batch, end - begin, joined_wide.data(), W, batch, end,
              gram.data() + begin * W, W, /*accumulate=*/false);
    });
  }
  for (int64_t i = 0; i < W; ++i)
    for (int64_t j = i + 1; j < W; ++j) gram[i * W + j] = gram[j * W + i];

  // Stage 3: FA from the blocks of G, and M = [âᵀâ ; −b̂ᵀâ] (W × C), the first C columns of G.
  WideSum feature_alignment = 0.0, cross_alignment = 0.0, prev_alignment = 0.0;
  std::vector<WideSum> gradient_map(W * C);
  for (int64_t i = 0; i < W; ++i) {
    for (int64_t j = 0; j < W; ++j) {
      const WideSum value = gram[i * W + j];
      if (i < C && j < C) feature_alignment += value * value;
      if (i >= C && j < C) cross_alignment += value * value;
      if (i >= C && j >= C) prev_alignment += value * value;
    }
    for (int64_t j = 0; j < C; ++j) gradient_map[i * C + j] = i < C ? gram[i * W + j] : -gram[i * W + j];
  }

  // Stage 4: grad_a = P · M, by blocks of rows, in WideSum too (â(âᵀâ) and b̂(b̂ᵀâ) cancel likewise).
  at::parallel_for(0, batch, kRowGrain, [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<T, double>) {
      gemm_nn(joined + begin * W, W, end - begin, gradient_map.data(), C, W, C, grad_a + begin * C, C,
              /*accumulate=*/false);
    } else {
      const std::vector<WideSum> rows(joined + begin * W, joined + end * W);
      std::vector<WideSum> product((end - begin) * C);
      gemm_nn(rows.data(), W, end - begin, gradient_map.data(), C, W, C, product.data(), C, /*accumulate=*/false);
      for (int64_t e = 0; e < (end - begin) * C; ++e) grad_a[begin * C + e] = static_cast<T>(product[e]);
    }
  });
  return static_cast<T>(feature_alignment - 2.0 * cross_alignment + prev_alignment);
}

// Batch space, O(B²·W) time: Δ = â âᵀ − b̂ b̂ᵀ = P Qᵀ with Q = [â | −b̂], one kGramTile² tile at a time:
// FA = Σ Δ², grad_a_I = Σ_J Δ_IJ â_J. Each task owns a block of rows I (and of grad_a).
template <typename T>
T batch_space_alignment(const T* joined, int64_t batch, int64_t C, int64_t C_prev, T* grad_a) {
  const int64_t W = C + C_prev;
  std::vector<T> signed_joined(joined, joined + batch * W);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t i = C; i < W; ++i) signed_joined[b * W + i] = -signed_joined[b * W + i];

  const int64_t blocks = ceil_div(batch, kGramTile);
  std::vector<WideSum> block_alignment(blocks, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
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
        gemm_nn(difference.data(), kGramTile, rows, joined + j0 * W, W, cols, C, grad_a + i0 * C, C,
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
                                                                        bool center) {
  const int64_t batch = v.size(0), C = v.size(1);
  const T* v_data = v.data_ptr<T>();
  const T lambda = static_cast<T>(alignment_weight);
  at::Tensor grad_v = at::zeros({batch, C}, v.options());
  T* grad_v_data = grad_v.data_ptr<T>();

  // Cross-entropy and its gradient (softmax − onehot) / B, written into g_v.
  T ce = T(0);
  if (target.has_value()) ce = cross_entropy(v_data, target->data_ptr<int64_t>(), batch, C, grad_v_data);

  // Alignment FA (/ B² when mean) and λ · its gradient through the row normalisation, added to g_v.
  T alignment = T(0);
  if (v_prev.has_value()) {
    const int64_t C_prev = v_prev->size(1), W = C + C_prev;
    std::vector<T> joined(batch * W), norms(batch), grad_a(batch * C, T(0));
    normalize_rows(v_data, batch, C, center, joined.data(), W, norms.data());
    normalize_rows(v_prev->data_ptr<T>(), batch, C_prev, center, joined.data() + C, W, static_cast<T*>(nullptr));
    const T raw_alignment = feature_space_is_cheaper(batch, C, C_prev)
                                ? feature_space_alignment(joined.data(), batch, C, C_prev, grad_a.data())
                                : batch_space_alignment(joined.data(), batch, C, C_prev, grad_a.data());
    const T reduction = mean ? T(1) / (static_cast<T>(batch) * static_cast<T>(batch)) : T(1);
    alignment = raw_alignment * reduction;
    const T grad_a_scale = T(4) * reduction;
    at::parallel_for(0, batch, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        T* grad_row = grad_a.data() + row * C;
        for (int64_t c = 0; c < C; ++c) grad_row[c] *= grad_a_scale;
        normalize_row_backward(joined.data() + row * W, norms[row], C, center, grad_row);
        for (int64_t c = 0; c < C; ++c) grad_v_data[row * C + c] += lambda * grad_row[c];
      }
    });
  }

  const auto scalar = [&](T value) { return at::scalar_tensor(value, v.options()); };
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
    double alignment_weight, bool mean, bool center) {
  const at::Tensor values = to_accumulation(v, "v");
  const int64_t batch = values.size(0);
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
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "svp_kernels::loss_epilogue", [&] {
    result = run_epilogue<scalar_t>(values, target_checked, previous, alignment_weight, mean, center);
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
  at::parallel_for(0, batch, kGramRowGrain, [&](int64_t begin, int64_t end) {
    gram_accumulate(rows + begin * C, C, end - begin, rows, C, batch, C, out + begin * batch, batch);
  });
  return gram;
}

}  // namespace svp::cpu

// The `alignment` argument of svp_kernels::loss_epilogue (schema: csrc/bindings.cpp; docs/design.md §2), read
// the same way by the CPU (csrc/cpu/epilogue.cpp) and CUDA (csrc/bindings_cuda.cpp) implementations.
#pragma once

#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cstdint>

namespace svp {

// true for "bhattacharyya", false for "cosine_gram" (the default); a ValueError naming the argument otherwise.
inline bool bhattacharyya_alignment(c10::string_view alignment) {
  const bool bhattacharyya = alignment == "bhattacharyya";
  TORCH_CHECK_VALUE(bhattacharyya || alignment == "cosine_gram",
                    "svp_kernels loss_epilogue: alignment must be 'cosine_gram' or 'bhattacharyya', got '", alignment,
                    "'");
  return bhattacharyya;
}

// What the Bhattacharyya term asks of the other arguments: v_prev (when given) (B, C) like v, and no centring
// (softmax does not change when a row's mean is subtracted). C_prev < 0: no v_prev.
inline void check_bhattacharyya_arguments(int64_t C, int64_t C_prev, bool center) {
  TORCH_CHECK_VALUE(!center, "svp_kernels loss_epilogue: center=True has no meaning with alignment='bhattacharyya'");
  TORCH_CHECK_VALUE(C_prev < 0 || C_prev == C, "svp_kernels loss_epilogue: alignment='bhattacharyya' needs v_prev "
                    "(B, C) like v, got C' = ", C_prev, " and C = ", C);
}

}  // namespace svp

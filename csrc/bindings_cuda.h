// The launch plan of the CUDA adapter (csrc/bindings_cuda.cpp), for the testing hook that csrc/bindings.cpp
// exposes to Python. Only on CUDA builds (SVP_WITH_CUDA).
#pragma once

#include "cuda/svp_cuda.h"

namespace svp_cuda_adapter {

// The plan every CUDA op of this process launches with; a default LaunchPlan (the heuristic) until set.
// Process-wide and thread-safe: the CUDA backward runs on autograd's device thread.
svp_cuda::LaunchPlan launch_plan();
void set_launch_plan(const svp_cuda::LaunchPlan& plan);

}  // namespace svp_cuda_adapter

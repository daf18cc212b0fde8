// Grains for at::parallel_for: how much work a task needs before it is worth a thread of its own.
//
// Waking a second thread and joining it costs a few microseconds, more than a small pass takes alone, so
// every split asks for a minimum of work per task and small problems run on the calling thread. Only the
// split depends on these numbers, never a value: every kernel's sums run in an order fixed by the shapes.
#pragma once

#include <algorithm>
#include <cstdint>

namespace svp::cpu {

constexpr int64_t kMinTaskElements = 16384;  // row-wise passes: elements read or written per task
constexpr int64_t kMinTaskProducts = 1 << 18;  // products: multiply-adds per task

// Items per task when each item costs `work` units and a task needs at least `minimum` of them.
inline int64_t grain_for(int64_t work, int64_t minimum) {
  return std::max<int64_t>(1, minimum / std::max<int64_t>(1, work));
}

// Rows per task of a row-wise pass over rows of `width` elements.
inline int64_t row_grain(int64_t width) { return grain_for(width, kMinTaskElements); }

}  // namespace svp::cpu

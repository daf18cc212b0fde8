// CPU kernels of the dropout projection (docs/design.md §2): v = h R̃ᵀ and dh = grad_v R̃.
//
// R̃ = R ⊙ M / (1 − p) never exists in memory. Both directions walk D in tiles of `width` columns; a task
// generates the C × width block of R̃ it needs (Philox mask, implicit R) into a scratch buffer that stays in
// cache and multiplies it with its rows of h (forward) or grad_v (backward) (csrc/cpu/gemm.h).
// Forward partial sums are kept per fixed group of tiles and reduced in group order, so v depends on
// (B, C, D, dtype) only, never on the number of threads; backward tasks write disjoint blocks of dh.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "cpu/gemm.h"
#include "cpu/memory.h"
#include "cpu/ops.h"
#include "cpu/parallel.h"
#include "cpu/random_rows.h"
#include "cpu/simd.h"
#include "svp/math.h"
#include "svp/philox.h"

namespace svp::cpu {
namespace projection_detail {

// ---- Tiling (a function of the shapes only) ----------------------------------------------------------

constexpr int64_t kTileBytes = 128 * 1024;  // one C × width block of R̃ stays in L2
constexpr int64_t kTileAlign = 64;           // tile widths are whole numbers of SIMD vectors
constexpr int64_t kMaxTileWidth = 2048;
constexpr int64_t kMaxGroups = 64;                    // forward partial v buffers ...
constexpr int64_t kPartialBytes = 8 * 1024 * 1024;   // ... and their total size
constexpr int64_t kMaxRowBlocks = 64;
constexpr int64_t kMinTaskRows = 16;  // rows per task at least (one micro-kernel pass over a tile)
constexpr int64_t kRowAlign = 4;      // task rows are whole micro-kernel blocks (csrc/cpu/gemm.cpp)
// Generating one element of R̃ (a Philox call, plus the Gaussian of an implicit R) costs about as much as
// this many multiply-adds of one row against it (≈ 5 cycles against 32 float multiply-adds per cycle).
constexpr int64_t kGenerationCost = 160;
constexpr int64_t kTransposedMinClasses = 24;  // forward through a transposed tile from 3 vectors of classes on

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

struct TilePlan {
  int64_t width;  // columns of D per tile (the last one may be narrower)
  int64_t count;
};

TilePlan plan_tiles(int64_t out_features, int64_t in_features, int64_t element_size) {
  const int64_t fitting = kTileBytes / (out_features * element_size) / kTileAlign * kTileAlign;
  const int64_t max_width = std::clamp(fitting, kTileAlign, kMaxTileWidth);
  const int64_t count = ceil_div(in_features, max_width);
  const int64_t width = round_up(ceil_div(in_features, count), kTileAlign);  // balanced tiles
  return {width, ceil_div(in_features, width)};
}

// Rows per task. Every (row block, column block) task generates its own tiles of R̃, so splitting the batch
// repeats the generation; the split minimises (rounds of tasks over the threads) × (a task's generation +
// multiply-adds), per element of its tiles. (Row blocking changes no arithmetic, so it may depend on the
// thread count.)
int64_t rows_per_task(int64_t batch, int64_t column_tasks, int64_t generation_cost) {
  const int64_t threads = at::get_num_threads();
  const int64_t max_blocks = std::clamp<int64_t>(batch / kMinTaskRows, 1, kMaxRowBlocks);
  int64_t best_blocks = 1, best_cost = INT64_MAX;
  for (int64_t blocks = 1; blocks <= max_blocks; ++blocks) {
    const int64_t rounds = ceil_div(blocks * column_tasks, threads);
    const int64_t cost = rounds * (generation_cost + ceil_div(batch, blocks));
    if (cost < best_cost) best_blocks = blocks, best_cost = cost;
  }
  return round_up(ceil_div(batch, best_blocks), kRowAlign);
}

// Forward reduction groups: consecutive tiles summing into one partial (B, C) buffer.
int64_t forward_groups(int64_t batch, int64_t out_features, int64_t tiles, int64_t element_size) {
  const int64_t affordable = kPartialBytes / (batch * out_features * element_size);
  return std::max<int64_t>(1, std::min({tiles, kMaxGroups, affordable}));
}

// ---- R̃ tiles -----------------------------------------------------------------------------------------

template <typename T>
struct DroppedProjection {
  const T* weight;  // R (C, D) row-major, or nullptr for the implicit R of (proj_seed, proj_std)
  int64_t out_features, in_features;
  uint64_t proj_seed;
  float proj_std;
  float p;
  uint64_t seed;
  T scale;  // 1 / (1 − p)

  // A dense R with p = 0 is R̃ itself: kernels read it in place.
  bool needs_tile() const { return weight == nullptr || p > 0; }
  // Cost of generating one tile element, in multiply-adds (kGenerationCost per Philox-derived quantity).
  int64_t generation_cost() const { return kGenerationCost * ((weight == nullptr ? 2 : 0) + (p > 0 ? 1 : 0)); }
};

// tile[c·width + jj] = R̃[c, j0 + jj] for c < C, jj < width; Philox offsets n = c·D + j are 64-bit.
// Row by row: the implicit R (when there is no weight), then the dropout mask, both vectorised
// (csrc/cpu/random_rows.h).
template <typename T>
void fill_tile(const DroppedProjection<T>& R, int64_t j0, int64_t width, T* tile) {
  for (int64_t c = 0; c < R.out_features; ++c) {
    T* row = tile + c * width;
    const uint64_t base = static_cast<uint64_t>(c) * static_cast<uint64_t>(R.in_features) + j0;
    const T* source = row;
    if (R.weight != nullptr) {
      source = R.weight + c * R.in_features + j0;
    } else {
      implicit_normals(R.proj_seed, base, width, R.proj_std, row);
    }
    if (R.p > 0) dropout_run(R.seed, base, width, R.p, R.scale, source, row);
  }
}

// ---- Drivers -----------------------------------------------------------------------------------------

// The R̃ tile for columns [j0, j0 + width): the dense R itself when p = 0, else generated into `scratch`.
template <typename T>
std::pair<const T*, int64_t> tile_for(const DroppedProjection<T>& R, int64_t j0, int64_t width, T* scratch) {
  if (!R.needs_tile()) return {R.weight + j0, R.in_features};
  fill_tile(R, j0, width, scratch);
  return {scratch, width};
}

// out (width × ldo) = tileᵀ for the C × width tile (leading dimension ldt); columns C..ldo of out untouched.
// In 16 × 16 blocks, so that the lines read and the lines written both stay in L1.
template <typename T>
void transpose_tile(const T* tile, int64_t ldt, int64_t C, int64_t width, T* out, int64_t ldo) {
  constexpr int64_t kBlock = 16;
  for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
    const int64_t c1 = std::min(C, c0 + kBlock);
    for (int64_t j0 = 0; j0 < width; j0 += kBlock) {
      const int64_t j1 = std::min(width, j0 + kBlock);
      for (int64_t jj = j0; jj < j1; ++jj)
        for (int64_t c = c0; c < c1; ++c) out[jj * ldo + c] = tile[c * ldt + jj];
    }
  }
}


// v (B, C) = h R̃ᵀ. Below kTransposedMinClasses classes, dot products of rows of h with rows of the tile
// (gemm_nt_accumulate). From there on, the tile is transposed (width × C, C padded to whole vectors) and
// h · tileᵀ runs as gemm_nn: each accumulator then sums a whole tile in registers, with no horizontal sum
// per (row, class) and tile, which would cost as much as the multiplies at C = 100.
template <typename T>
void run_forward(const T* h, int64_t batch, const DroppedProjection<T>& R, T* v) {
  const int64_t C = R.out_features, D = R.in_features;
  const TilePlan tiles = plan_tiles(C, D, sizeof(T));
  const int64_t groups = forward_groups(batch, C, tiles.count, sizeof(T));
  const int64_t task_rows = rows_per_task(batch, groups, R.generation_cost());
  const int64_t row_tasks = ceil_div(batch, task_rows);
  const bool transposed = C >= kTransposedMinClasses;
  // Leading dimension of the transposed tile and the partial sums: whole 64-byte lines, so that no vector
  // load of the micro-kernel straddles two cache lines.
  const int64_t ldp = transposed ? round_up(C, 2 * kLanes<T>) : C;
  const bool direct = groups == 1 && !transposed;                // stage 1 writes v itself
  // Kept from call to call (ThreadScratch; about kPartialBytes at most): a fresh buffer of this size would
  // be mapped and page-faulted in on every call.
  ThreadScratch<struct ForwardPartials, T> partials(direct ? 0 : groups * batch * ldp);
  T* partial_v = direct ? v : partials.data();

  // Stage 1: each (row block, group) task sums its group's tiles into its block of partial_v[group].
  at::parallel_for(0, row_tasks * groups, 1, [&](int64_t begin, int64_t end) {
    // Tile rows start on 64-byte lines (widths are multiples of kTileAlign); columns C..ldp of the
    // transposed tile stay zero.
    const AlignedBuffer<T> scratch_buffer(R.needs_tile() ? C * tiles.width : 0);
    const AlignedBuffer<T> transposed_buffer(transposed ? tiles.width * ldp : 0);
    T* scratch = scratch_buffer.data();
    T* transposed_tile = transposed_buffer.data();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row0 = task / groups * task_rows, rows = std::min(task_rows, batch - row0);
      const int64_t group = task % groups;
      T* out = partial_v + (group * batch + row0) * ldp;
      std::fill(out, out + rows * ldp, T(0));
      for (int64_t t = group * tiles.count / groups; t < (group + 1) * tiles.count / groups; ++t) {
        const int64_t j0 = t * tiles.width, width = std::min(tiles.width, D - j0);
        const auto [tile, ldt] = tile_for(R, j0, width, scratch);
        if (transposed) {
          transpose_tile(tile, ldt, C, width, transposed_tile, ldp);
          gemm_nn(h + row0 * D + j0, D, rows, transposed_tile, ldp, width, ldp, out, ldp,
                  /*accumulate=*/true);
        } else {
          gemm_nt_accumulate(h + row0 * D + j0, D, rows, tile, ldt, C, width, out, C);
        }
      }
    }
  });
  if (direct) return;

  // Stage 2: v = Σ_group partial_v[group], in group order.
  at::parallel_for(0, batch, row_grain(C * groups), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      T* v_row = v + b * C;
      std::copy(partial_v + b * ldp, partial_v + b * ldp + C, v_row);
      for (int64_t group = 1; group < groups; ++group) {
        const T* partial = partial_v + (group * batch + b) * ldp;
        for (int64_t c = 0; c < C; ++c) v_row[c] += partial[c];
      }
    }
  });
}

// dh (B, D) = grad_v R̃: one task per (row block, tile), each writing its own block of dh. Every element
// of dh sums over the C classes alone, so the tiles may be re-cut freely: into a multiple of the thread
// count (at least one per thread when R̃ is generated, before the batch is split, which would generate
// each tile once per row block), so that every thread gets as many tiles.
template <typename T>
void run_backward(const T* grad_v, int64_t batch, const DroppedProjection<T>& R, T* dh) {
  const int64_t C = R.out_features, D = R.in_features;
  TilePlan tiles = plan_tiles(C, D, sizeof(T));
  const int64_t threads = at::get_num_threads();
  const int64_t wanted = round_up(std::max(tiles.count, R.needs_tile() ? threads : int64_t(1)), threads);
  if (wanted != tiles.count && wanted <= ceil_div(D, kLanes<T> * 2)) {
    tiles.width = round_up(ceil_div(D, wanted), kLanes<T> * 2);  // whole 64-byte vectors
    tiles.count = ceil_div(D, tiles.width);
  }
  const int64_t task_rows = rows_per_task(batch, tiles.count, R.generation_cost());
  const int64_t row_tasks = ceil_div(batch, task_rows);
  at::parallel_for(0, row_tasks * tiles.count, 1, [&](int64_t begin, int64_t end) {
    const AlignedBuffer<T> scratch_buffer(R.needs_tile() ? C * tiles.width : 0);  // rows on 64-byte lines
    T* scratch = scratch_buffer.data();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row0 = task / tiles.count * task_rows, rows = std::min(task_rows, batch - row0);
      const int64_t j0 = task % tiles.count * tiles.width, width = std::min(tiles.width, D - j0);
      const auto [tile, ldt] = tile_for(R, j0, width, scratch);
      gemm_nn(grad_v + row0 * C, C, rows, tile, ldt, C, width, dh + row0 * D + j0, D, /*accumulate=*/false);
    }
  });
}

at::ScalarType accumulation_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

void check_projection_args(const std::optional<at::Tensor>& weight, int64_t out_features, int64_t in_features,
                           at::ScalarType dtype, int64_t proj_seed, double p, int64_t seed) {
  TORCH_CHECK(out_features >= 1 && in_features >= 1, "svp_kernels: projection sizes must be positive, got C=",
              out_features, ", D=", in_features);
  TORCH_CHECK(p >= 0.0 && p < 1.0, "svp_kernels: p must be in [0, 1), got ", p);
  TORCH_CHECK(proj_seed >= 0 && seed >= 0, "svp_kernels: seeds must be in [0, 2**63)");
  if (weight.has_value()) {
    const at::Tensor& w = *weight;
    TORCH_CHECK(w.device().is_cpu(), "svp_kernels: weight must be a CPU tensor");
    TORCH_CHECK(w.scalar_type() == dtype, "svp_kernels: weight must have dtype ", dtype, ", got ", w.scalar_type());
    TORCH_CHECK(w.dim() == 2 && w.size(0) == out_features && w.size(1) == in_features,
                "svp_kernels: weight must be (C, D) = (", out_features, ", ", in_features, "), got ", w.sizes());
  }
}

template <typename T>
DroppedProjection<T> make_projection(const std::optional<at::Tensor>& weight, int64_t out_features,
                                     int64_t in_features, int64_t proj_seed, double proj_std, double p,
                                     int64_t seed) {
  return DroppedProjection<T>{weight.has_value() ? weight->data_ptr<T>() : nullptr,
                              out_features,
                              in_features,
                              static_cast<uint64_t>(proj_seed),
                              static_cast<float>(proj_std),
                              static_cast<float>(p),
                              static_cast<uint64_t>(seed),
                              dropout_scale<T>(p)};
}

}  // namespace projection_detail

using namespace projection_detail;

// The dropout seed of the ops: a 0-dim int64 CPU tensor, read once on the host (docs/backends.md).
int64_t read_seed(const at::Tensor& seed) {
  TORCH_CHECK(seed.device().is_cpu() && seed.scalar_type() == at::kLong && seed.dim() == 0,
              "svp_kernels: seed must be a 0-dim int64 CPU tensor, got ", seed.scalar_type(), " of shape ",
              seed.sizes(), " on ", seed.device());
  return *seed.data_ptr<int64_t>();
}

at::Tensor projection_forward(const at::Tensor& h, const std::optional<at::Tensor>& weight, int64_t out_features,
                              int64_t proj_seed, double proj_std, double p, const at::Tensor& seed_tensor) {
  const int64_t seed = read_seed(seed_tensor);
  TORCH_CHECK(h.device().is_cpu(), "svp_kernels: projection_forward on CPU needs a CPU h");
  TORCH_CHECK(h.scalar_type() == at::kFloat || h.scalar_type() == at::kDouble,
              "svp_kernels: the CPU kernels take float32 or float64 h, got ", h.scalar_type());
  TORCH_CHECK(h.dim() == 2 && h.size(0) >= 1, "svp_kernels: h must be (B, D) with B >= 1, got ", h.sizes());
  check_projection_args(weight, out_features, h.size(1), h.scalar_type(), proj_seed, p, seed);
  const at::Tensor h_contiguous = h.contiguous();
  const std::optional<at::Tensor> weight_contiguous =
      weight.has_value() ? std::optional<at::Tensor>(weight->contiguous()) : std::nullopt;
  at::Tensor v = at::empty({h.size(0), out_features}, h.options().dtype(accumulation_dtype(h.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "svp_kernels::projection_forward", [&] {
    const auto R = make_projection<scalar_t>(weight_contiguous, out_features, h.size(1), proj_seed, proj_std, p, seed);
    run_forward(h_contiguous.data_ptr<scalar_t>(), h.size(0), R, v.data_ptr<scalar_t>());
  });
  return v;
}

at::Tensor projection_backward(const at::Tensor& grad_v, const std::optional<at::Tensor>& weight,
                               int64_t in_features, int64_t proj_seed, double proj_std, double p,
                               const at::Tensor& seed_tensor, at::ScalarType dtype) {
  const int64_t seed = read_seed(seed_tensor);
  TORCH_CHECK(grad_v.device().is_cpu(), "svp_kernels: projection_backward on CPU needs a CPU grad_v");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "svp_kernels: the CPU kernels produce float32 or float64 dh, got ", dtype);
  TORCH_CHECK(grad_v.scalar_type() == accumulation_dtype(dtype), "svp_kernels: grad_v must have dtype ",
              accumulation_dtype(dtype), " for dh of dtype ", dtype, ", got ", grad_v.scalar_type());
  TORCH_CHECK(grad_v.dim() == 2 && grad_v.size(0) >= 1, "svp_kernels: grad_v must be (B, C), got ", grad_v.sizes());
  check_projection_args(weight, grad_v.size(1), in_features, dtype, proj_seed, p, seed);
  const at::Tensor grad_contiguous = grad_v.contiguous();
  const std::optional<at::Tensor> weight_contiguous =
      weight.has_value() ? std::optional<at::Tensor>(weight->contiguous()) : std::nullopt;
  at::Tensor dh = at::empty({grad_v.size(0), in_features}, grad_v.options().dtype(dtype));
  advise_huge_pages(dh.data_ptr(), dh.nbytes());  // before the first write: see csrc/cpu/memory.h
  AT_DISPATCH_FLOATING_TYPES(dtype, "svp_kernels::projection_backward", [&] {
    const auto R =
        make_projection<scalar_t>(weight_contiguous, grad_v.size(1), in_features, proj_seed, proj_std, p, seed);
    run_backward(grad_contiguous.data_ptr<scalar_t>(), grad_v.size(0), R, dh.data_ptr<scalar_t>());
  });
  return dh;
}

}  // namespace svp::cpu

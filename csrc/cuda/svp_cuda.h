// Public launchers of the svp_kernels CUDA kernels (docs/design.md §2, docs/backends.md).
//
// Framework-free: raw device pointers, int64 sizes, a cudaStream_t, a cudaError_t back. No torch header
// here or in any csrc/cuda file; csrc/bindings_cuda.cpp adapts these to the torch ops. Every tensor is
// contiguous row-major. "Acc" below is the accumulation type: double for DType::kFloat64, float otherwise.
//
// Scratch memory: each op that needs it has a *_workspace_bytes() query; the caller allocates that many
// bytes (the torch adapter uses the caching allocator), passes the pointer and the size, and the launcher
// checks the size. The plan behind the size depends only on the arguments, the LaunchPlan and the current
// device, so the query and the launch must get the same LaunchPlan and run with the same current device.
//
// Determinism: every reduction runs in a fixed order (no float atomics), so repeated calls on the same
// device give bit-identical results.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace svp_cuda {

// Element type of h / weight / v / v_prev / dh. Accumulation: float64 -> double, the others -> float.
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// How the launchers split their work. A default-constructed LaunchPlan is the heuristic everywhere: each
// launcher chooses from the shapes and the SM count. A field set forces that one choice (clamped to what
// the shape and the grid limits allow), so tests and tools can drive every code path (split-K, regenerated
// R̃ panels, both alignment forms, split Grams) on small shapes; every plan gives the same result up to the
// order of the sums. All fields are int64_t, so the layout is trivial (tools/emulate_cuda mirrors it with
// ctypes). A *_workspace_bytes() query sizes the scratch for the plan it gets: pass the query and its
// launch the same LaunchPlan.
struct LaunchPlan {
  // projection_forward: R̃ panels (of D columns) per split of the D reduction; more than there are panels
  // means no split. <= 0: the heuristic.
  int64_t forward_panels_per_split = 0;
  // projection_forward: batch tiles per block (at least what the grid limit needs). <= 0: the heuristic.
  int64_t forward_btiles_per_block = 0;
  // projection_backward: batch tiles per block (at least what the grid limit needs). <= 0: the heuristic.
  int64_t backward_btiles_per_block = 0;
  // loss_epilogue in feature space: splits of the B-long reduction of the Gram ZᵀZ. <= 0: the heuristic.
  int64_t gram_splits = 0;
  // loss_epilogue in batch space: splits of the column tiles (at most their number). <= 0: the heuristic.
  int64_t batch_splits = 0;
  // loss_epilogue with v_prev: 1 feature space, 0 batch space, -1 the heuristic (feature iff C + C' < B).
  int64_t epilogue_feature = -1;
};

// ---------------------------------------------------------------------------------------------------------
// Projection forward: v (B, C) = h R̃ᵀ, R̃[c, j] = R[c, j] · keep(seed, c·D + j) / (1 − p).
//   h:      (B, D) of dtype.
//   weight: (C, D) of dtype, or nullptr for the implicit R of (proj_seed, proj_std) (docs/design.md §3).
//   v:      (B, C) of Acc (output).
// seed:   the dropout seed, one int64 in [0, 2**63) in device memory, read by the kernels (never on the host,
//         so a captured CUDA graph uses the value the seed holds at replay); may be nullptr when p == 0.
// p in [0, 1); p == 0 disables the mask. The mask and an implicit R are generated in registers.
cudaError_t projection_forward_workspace_bytes(int64_t B, int64_t C, int64_t D, DType dtype, size_t* bytes,
                                              const LaunchPlan& launch_plan);
// Split-K: with `counters` (at least projection_forward_counters() of them, all zero) the kernel's last split
// block per output region sums the partials itself, in split order, and leaves the counters zero again — one
// launch; without them (nullptr, or too few) a second kernel sums them in the same order: the same bits. The
// counters must not be shared with a launch running concurrently (e.g. on another stream).
cudaError_t projection_forward_counters(int64_t B, int64_t C, int64_t D, DType dtype, int64_t* count,
                                       const LaunchPlan& launch_plan);
cudaError_t projection_forward(const void* h, const void* weight, void* v, int64_t B, int64_t C, int64_t D,
                               uint64_t proj_seed, float proj_std, double p, const int64_t* seed, DType dtype,
                               void* workspace, size_t workspace_bytes, const LaunchPlan& launch_plan,
                               cudaStream_t stream, unsigned* counters = nullptr, int64_t counter_count = 0);

// Projection backward: dh (B, D) = (grad_scale ·) grad_v R̃, regenerating the mask (and an implicit R); seed
// as above.
//   grad_v: (B, C) of Acc.   weight: (C, D) of dtype or nullptr.   dh: (B, D) of dtype (output).
//   grad_scale: one Acc in device memory (the incoming gradient of a loss), read by the kernel and multiplied
//   into each element of grad_v as it is read (grad_scale · g, the product torch would form); nullptr: 1.
// Needs no workspace.
cudaError_t projection_backward(const void* grad_v, const void* weight, void* dh, int64_t B, int64_t C,
                                int64_t D, uint64_t proj_seed, float proj_std, double p, const int64_t* seed,
                                DType dtype, const LaunchPlan& launch_plan, cudaStream_t stream,
                                const void* grad_scale = nullptr);

// R̃ (C, D) of dtype written out, for the GEMM projection path (csrc/projection_gemm.cpp): element (c, j) is the
// R̃[c, j] the two kernels above generate (in Acc), rounded to dtype: the same bits for float32/float64, one
// rounding more for bfloat16/float16. weight and seed as above. One kernel, no workspace.
cudaError_t dropped_projection(const void* weight, void* out, int64_t C, int64_t D, uint64_t proj_seed,
                               float proj_std, double p, const int64_t* seed, DType dtype, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------------
// The alignment term of the loss epilogue (docs/design.md §2).
enum class Alignment : int { kCosineGram = 0, kBhattacharyya = 1 };

// Loss epilogue on the (B, C) projection:
//   loss = CE(v, target) + λ·FA,  FA = ‖S(v) − S(v_prev)‖²_F (/ B² when `mean`),  g_v = dloss/dv.
// With Alignment::kBhattacharyya the term is Σ_b BD(v_b, v_prev_b) (/ B when `mean`) instead, BD the Bhattacharyya
// distance of the rows' softmax distributions: v_prev must be (B, C) (Cp == C), center false, and v_prev may
// hold −inf; it takes two launches (the row kernel and the scalars) and no Gram.
//   v:      (B, C) of dtype.          target: (B,) int64 in [0, C), or nullptr (CE = 0).
//   v_prev: (B, Cp) of dtype, or nullptr (FA = 0; Cp is then ignored).
//   loss, ce, alignment: one Acc each (outputs).   g_v: (B, C) of Acc (output).
// FA and its gradient use the feature-space identity when C + Cp < B, else flash-style batch-space tiles;
// no B×B matrix is ever stored. B must be >= 1. A row whose target is outside [0, C) is not read at its
// target: its CE term and its row of g_v are NaN, so loss and ce are NaN.
cudaError_t loss_epilogue_workspace_bytes(int64_t B, int64_t C, int64_t Cp, bool has_v_prev, DType dtype,
                                          size_t* bytes, const LaunchPlan& launch_plan,
                                          Alignment alignment = Alignment::kCosineGram);
cudaError_t loss_epilogue(const void* v, const int64_t* target, const void* v_prev, void* loss, void* ce,
                          void* alignment, void* g_v, int64_t B, int64_t C, int64_t Cp, double alignment_weight,
                          bool mean, bool center, DType dtype, void* workspace, size_t workspace_bytes,
                          const LaunchPlan& launch_plan, cudaStream_t stream,
                          Alignment alignment_kind = Alignment::kCosineGram);

// ---------------------------------------------------------------------------------------------------------
// Cosine Gram (inspection op): S (B, B) of Acc = â âᵀ, â = rows of v (centred when `center`) / max(‖·‖, ε).
// Its launch depends on the shapes only (no LaunchPlan).
cudaError_t cosine_gram_workspace_bytes(int64_t B, int64_t C, DType dtype, size_t* bytes);
cudaError_t cosine_gram(const void* v, void* S, int64_t B, int64_t C, bool center, DType dtype, void* workspace,
                        size_t workspace_bytes, cudaStream_t stream);

}  // namespace svp_cuda

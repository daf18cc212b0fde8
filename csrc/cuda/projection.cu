// Projection kernels: v = h R̃ᵀ (forward) and dh = grad_v R̃ (backward), docs/design.md §2–3.
//
// R̃[c, j] = R[c, j] · keep(seed, c·D + j) / (1 − p) never exists in global memory. Both directions are
// register-tiled GEMMs whose R̃ operand is a shared-memory "panel" generated in place from Philox (the mask,
// and R itself when it is implicit) or from the dense weight, and reused for as many rows of the batch as
// the block owns:
//
//   forward   M = B, N = C, K = D   grid (D splits, C tiles, B ranges); panel = R̃ᵀ[KP columns of D, BN classes]
//             partial sums -> workspace [splits, B, C] -> the last split block of each region (arrival counters)
//             sums them in split order; without counters reduce_splits_kernel does, in the same order.
//   backward  M = B, N = D, K = C   grid (D tiles, B ranges); panel = R̃[KP classes, BN columns of D];
//             the block owns its D columns outright, loops over C and writes dh in h's dtype.
//
// The panel is generated once per block when its K extent fits (forward: the split is one panel deep;
// backward: C <= KP) and the block then streams its batch tiles past it; otherwise it is regenerated per
// batch tile. No float atomics anywhere: every output element has exactly one writer.
#include <cuda_runtime.h>

#include "common.cuh"
#include "svp/math.h"
#include "svp/philox.h"
#include "svp_cuda.h"

namespace svp_cuda {
namespace detail {
namespace {

// ---------------------------------------------------------------------------------------------------------
// Tile shapes. A block of NT = (BM/TM)·(BN/TN) = 256 threads computes a BM×BN tile; thread (ty, tx) owns the
// TM×TN outputs at rows ty + i·NTY, columns tx + j·NTX (interleaved, so that shared-memory reads along N
// are consecutive across the warp and the global stores are coalesced). Per K step of BK the block stages
// an A tile As[BK][BM+1] (k-major, padded by one so the transposing writes hit 32 distinct banks) and reads
// the R̃ panel Ps[KP][BN+1]. KP (panel depth) is a power of two and a multiple of BK.
template <int BM_, int BN_, int BK_, int TM_, int TN_, int KP_>
struct Tile {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, TM = TM_, TN = TN_, KP = KP_;
  static constexpr int NTX = BN / TN, NTY = BM / TM, NT = NTX * NTY;
  static constexpr int A_LD = BM + 1, P_LD = BN + 1;
  static_assert(BN % TN == 0 && BM % TM == 0, "tile must divide evenly");
  static_assert(NT == 256, "kernels are written for 256 threads");
  static_assert(KP % BK == 0 && (KP & (KP - 1)) == 0, "panel depth: power of two, whole K steps");
  static_assert((BN & (BN - 1)) == 0, "BN: power of two");
  template <typename Acc>
  static constexpr size_t smem_bytes() {
    return (static_cast<size_t>(BK) * A_LD + static_cast<size_t>(KP) * P_LD) * sizeof(Acc);
  }
};

// Forward tiles, picked by C (the GEMM's N): the batch is the long side (BM = 128); BN is the smallest power
// of two covering C up to 64, so few FMAs go to padding. Panel depth KP: 256 columns of D when BN <= 32,
// 128 when BN = 64 (~33 KiB of float panel). Dynamic shared memory (float / double accumulation):
// 33.1 / 66.3 KiB, 49.1 / 98.3 KiB, 48.6 / 97.3 KiB — under the 99 KiB opt-in limit of sm_86/sm_89 and far
// under sm_80's 163 KiB and sm_90's 227 KiB; float tiles fit 4 blocks (1024 threads) on an H100 SM.
using ForwardTile16 = Tile<128, 16, 32, 4, 2, 256>;
using ForwardTile32 = Tile<128, 32, 32, 4, 4, 256>;
using ForwardTile64 = Tile<128, 64, 32, 8, 4, 128>;
// Backward: N = D is the long side. 128 batch rows × 64 columns of D per tile, 8×4 outputs per thread; the
// panel holds up to KP = 128 classes, enough for the whole C in the common case (then generated once).
using BackwardTile = Tile<128, 64, 32, 8, 4, 128>;

// ---------------------------------------------------------------------------------------------------------
// R̃[c, j] at flat offset n = c·D + j (docs/design.md §3), in the accumulation type.
template <typename T, typename Acc>
struct DroppedProjection {
  const T* weight;     // (C, D) or nullptr: implicit R of (proj_seed, proj_std)
  uint64_t proj_seed;
  const int64_t* seed_ptr;  // the dropout seed, one int64 in device memory (read by with_seed, never on the host)
  uint64_t seed;            // *seed_ptr once with_seed() has read it
  float proj_std;
  float p;             // keep iff u24(word0) >= p, compared in float32 as the reference does
  Acc scale;           // 1 / (1 − p) rounded to Acc once (svp::dropout_scale)
  bool dropout;        // p > 0

  // A copy holding the dropout seed read from device memory: every kernel calls it once, at its start, so a
  // captured CUDA graph reads the seed tensor's value at replay time.
  __device__ __forceinline__ DroppedProjection with_seed() const {
    DroppedProjection loaded = *this;
    loaded.seed = dropout ? static_cast<uint64_t>(*seed_ptr) : 0;
    return loaded;
  }

  __device__ __forceinline__ Acc operator()(uint64_t n) const {
    if (weight != nullptr) {
      const Acc r = to_acc<Acc>(weight[n]);
      if (!dropout) return r;
      // r · (scale or 0): the reference's R ⊙ M / q bit for bit, NaN·0 included.
      return svp::dropped_value<Acc>(r, svp::philox4x32_10(seed, n).w0, p, scale);
    }
    if (dropout && !(svp::u24(svp::philox4x32_10(seed, n).w0) >= p)) {
      return Acc(0);  // implicit R is finite, so r·0 == 0: skip generating it
    }
    const Acc r = static_cast<Acc>(svp::implicit_normal(proj_seed, n, proj_std));
    return dropout ? r * scale : r;
  }
};

// ---------------------------------------------------------------------------------------------------------
// Stage helpers.

// As[k][m] = X[(r0 + m)·K + k0 + k] for the BM×BK tile of a row-major (M, K) matrix; zero outside it.
// With vec_ok (X 16-byte aligned and K a multiple of the vector width) each thread moves 16 bytes per load;
// consecutive threads take consecutive vectors of a row, so a warp reads whole 128-byte lines. kScaled:
// scale · X instead (the backward's incoming gradient, applied as grad_v is staged).
template <class Cfg, bool kScaled = false, typename T, typename Acc>
__device__ __forceinline__ void load_rows_tile(Acc* As, const T* X, int64_t M, int64_t K, int64_t r0, int64_t k0,
                                               bool vec_ok, Acc scale = Acc(1)) {
  const auto scaled = [scale](Acc value) { return kScaled ? scale * value : value; };
  constexpr int kVec = Unpack16<T, Acc>::kCount;
  static_assert(kVec * sizeof(T) == 16, "one vector is 16 bytes");
  static_assert(Cfg::BK % kVec == 0, "BK must hold whole 16-byte vectors");
  if (vec_ok) {
    constexpr int kVecPerRow = Cfg::BK / kVec;
    constexpr int kVectors = Cfg::BM * kVecPerRow;
    constexpr int kIters = (kVectors + Cfg::NT - 1) / Cfg::NT;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int e = static_cast<int>(threadIdx.x) + it * Cfg::NT;
      if (kVectors % Cfg::NT != 0 && e >= kVectors) break;
      const int m = e / kVecPerRow;
      const int k = (e % kVecPerRow) * kVec;
      const int64_t row = r0 + m;
      const int64_t col = k0 + k;
      if (row < M && col + kVec <= K) {
        const uint4 raw = __ldg(reinterpret_cast<const uint4*>(X + row * K + col));
        const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
        for (int i = 0; i < kVec; ++i) As[(k + i) * Cfg::A_LD + m] = scaled(Unpack16<T, Acc>::get(words, i));
      } else {
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          As[(k + i) * Cfg::A_LD + m] = (row < M && col + i < K) ? scaled(to_acc<Acc>(X[row * K + col + i])) : Acc(0);
        }
      }
    }
  } else {
    constexpr int kElems = Cfg::BM * Cfg::BK;
    constexpr int kIters = kElems / Cfg::NT;
    static_assert(kElems % Cfg::NT == 0, "A tile must split evenly over the block");
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int e = static_cast<int>(threadIdx.x) + it * Cfg::NT;
      const int m = e / Cfg::BK;
      const int k = e % Cfg::BK;
      const int64_t row = r0 + m;
      const int64_t col = k0 + k;
      As[k * Cfg::A_LD + m] = (row < M && col < K) ? scaled(to_acc<Acc>(X[row * K + col])) : Acc(0);
    }
  }
}

// Forward panel: Ps[k][n] = R̃[c0 + n, d0 + k] for k < KP, n < BN; zero outside (C, D).
// Consecutive threads walk along a row of R (consecutive offsets): coalesced weight reads.
template <class Cfg, typename T, typename Acc>
__device__ __forceinline__ void fill_forward_panel(Acc* Ps, const DroppedProjection<T, Acc>& r_tilde, int64_t C,
                                                   int64_t D, int64_t c0, int64_t d0) {
  constexpr int kElems = Cfg::KP * Cfg::BN;
#pragma unroll 1
  for (int e = threadIdx.x; e < kElems; e += Cfg::NT) {
    const int k = e % Cfg::KP;
    const int n = e / Cfg::KP;
    const int64_t c = c0 + n;
    const int64_t j = d0 + k;
    Acc value = Acc(0);
    if (c < C && j < D) value = r_tilde(static_cast<uint64_t>(c) * static_cast<uint64_t>(D) + static_cast<uint64_t>(j));
    Ps[k * Cfg::P_LD + n] = value;
  }
}

// Backward panel: Ps[k][n] = R̃[c0 + k, j0 + n] for k < KP, n < BN; zero outside (C, D).
template <class Cfg, typename T, typename Acc>
__device__ __forceinline__ void fill_backward_panel(Acc* Ps, const DroppedProjection<T, Acc>& r_tilde, int64_t C,
                                                    int64_t D, int64_t c0, int64_t j0) {
  constexpr int kElems = Cfg::KP * Cfg::BN;
#pragma unroll 1
  for (int e = threadIdx.x; e < kElems; e += Cfg::NT) {
    const int n = e % Cfg::BN;
    const int k = e / Cfg::BN;
    const int64_t c = c0 + k;
    const int64_t j = j0 + n;
    Acc value = Acc(0);
    if (c < C && j < D) value = r_tilde(static_cast<uint64_t>(c) * static_cast<uint64_t>(D) + static_cast<uint64_t>(j));
    Ps[k * Cfg::P_LD + n] = value;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Forward: partial v over one D split for a range of batch tiles.

template <typename T, typename Acc>
struct ForwardParams {
  const T* h;            // (B, D)
  Acc* out;              // v (B, C) when splits == 1, else the workspace [splits, B, C]
  Acc* v;                // (B, C): written by the last split block of each region when counters != nullptr
  unsigned* counters;    // one per (class tile, batch range), zero on entry and exit; nullptr: no reduction here
  DroppedProjection<T, Acc> r_tilde;
  int64_t B, C, D;
  int64_t d_per_split;   // columns of D per split: a multiple of KP
  int64_t btiles_per_block;
  bool h_vec;            // 16-byte loads of h are legal
};

// Two blocks per SM (≤ 128 registers): without the hint ptxas gave the float16 64-wide tile 128 registers and
// a 4-byte spill, and the double one 170 registers (one block per SM); with it no variant spills
// (tools/static_sm90.py, bench/results/sm90-static.csv).
// The forward's stage 5 for block (split, class tile, batch range): once every split of the region has written
// its partial (workspace parts [splits, B, C]; per_block batch tiles per block), the last to arrive sums them
// in split order into v. Not inlined:
// the main loop's registers are dead by then, and inlined it made ptxas spill the 64-wide float16 tile.
template <class Cfg, typename Acc>
__device__ __noinline__ void reduce_region_if_last(const Acc* parts, Acc* v, unsigned* counters, int64_t B,
                                                   int64_t C, int64_t per_block) {
  const int64_t region = static_cast<int64_t>(blockIdx.y) * gridDim.z + blockIdx.z;
  if (!last_to_arrive(counters + region, gridDim.x)) return;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.z) * per_block * Cfg::BM;
  const int64_t row_end = B < row_begin + per_block * Cfg::BM ? B : row_begin + per_block * Cfg::BM;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * Cfg::BN;
  const int64_t plane = B * C;
  for (int64_t e = threadIdx.x; e < (row_end - row_begin) * Cfg::BN; e += Cfg::NT) {
    const int64_t b = row_begin + e / Cfg::BN, c = c0 + e % Cfg::BN;
    if (c >= C) continue;
    Acc sum = __ldcg(parts + b * C + c);
    for (int64_t s = 1; s < static_cast<int64_t>(gridDim.x); ++s) sum += __ldcg(parts + s * plane + b * C + c);
    v[b * C + c] = sum;
  }
}

template <class Cfg, typename T, typename Acc>
__global__ void __launch_bounds__(Cfg::NT, 2) projection_forward_kernel(const ForwardParams<T, Acc> P) {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  Acc* As = reinterpret_cast<Acc*>(shared_raw);  // [BK][BM+1]  tile of h, k-major
  Acc* Ps = As + Cfg::BK * Cfg::A_LD;             // [KP][BN+1]  panel of R̃ᵀ

  const int tx = static_cast<int>(threadIdx.x) % Cfg::NTX;
  const int ty = static_cast<int>(threadIdx.x) / Cfg::NTX;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * Cfg::BN;
  const int64_t d_begin = static_cast<int64_t>(blockIdx.x) * P.d_per_split;
  const int64_t d_end = P.D < d_begin + P.d_per_split ? P.D : d_begin + P.d_per_split;
  const int64_t tiles_b = (P.B + Cfg::BM - 1) / Cfg::BM;
  const int64_t bt_begin = static_cast<int64_t>(blockIdx.z) * P.btiles_per_block;
  const int64_t bt_end = tiles_b < bt_begin + P.btiles_per_block ? tiles_b : bt_begin + P.btiles_per_block;
  // One panel covers the whole split: generate it once, stream every batch tile past it.
  const bool panel_resident = d_end - d_begin <= Cfg::KP;
  const DroppedProjection<T, Acc> r_tilde = P.r_tilde.with_seed();
  Acc* out = P.out + static_cast<int64_t>(blockIdx.x) * P.B * P.C;

  for (int64_t bt = bt_begin; bt < bt_end; ++bt) {
    const int64_t b0 = bt * Cfg::BM;
    Acc acc[Cfg::TM][Cfg::TN];
#pragma unroll
    for (int i = 0; i < Cfg::TM; ++i) {
#pragma unroll
      for (int j = 0; j < Cfg::TN; ++j) acc[i][j] = Acc(0);
    }

    for (int64_t chunk = d_begin; chunk < d_end; chunk += Cfg::KP) {
      // Stage 1: the R̃ panel for columns [chunk, chunk + KP) and classes [c0, c0 + BN). The previous
      // reader of Ps finished at the trailing __syncthreads of the last K step.
      if (!panel_resident || bt == bt_begin) fill_forward_panel<Cfg>(Ps, r_tilde, P.C, P.D, c0, chunk);
      const int64_t chunk_end = d_end < chunk + Cfg::KP ? d_end : chunk + Cfg::KP;
      for (int64_t k0 = chunk; k0 < chunk_end; k0 += Cfg::BK) {
        // Stage 2: stage the h tile (rows b0.., columns k0..k0+BK), then wait for it and the panel.
        load_rows_tile<Cfg>(As, P.h, P.B, P.D, b0, k0, P.h_vec);
        __syncthreads();
        // Stage 3: register-tiled FMAs against the panel rows of this K step.
        register_tile_multiply<Cfg::TM, Cfg::TN, Cfg::BK, Cfg::NTX, Cfg::NTY, Cfg::A_LD, Cfg::P_LD>(
            acc, As, Ps + (k0 - chunk) * Cfg::P_LD, tx, ty);
        __syncthreads();
      }
    }

    // Stage 4: this split's partial of v; consecutive threads write consecutive classes.
#pragma unroll
    for (int i = 0; i < Cfg::TM; ++i) {
      const int64_t b = b0 + ty + i * Cfg::NTY;
      if (b >= P.B) continue;
#pragma unroll
      for (int j = 0; j < Cfg::TN; ++j) {
        const int64_t c = c0 + tx + j * Cfg::NTX;
        if (c < P.C) out[b * P.C + c] = acc[i][j];
      }
    }
  }

  // Stage 5 (split-K, counters given): the last split block of this region (class tile × batch range) sums
  // the region's partials in split order 0, 1, … into v — reduce_splits_kernel's order, so the same bits.
  if (P.counters != nullptr) reduce_region_if_last<Cfg>(P.out, P.v, P.counters, P.B, P.C, P.btiles_per_block);
}

// v[i] = Σ_s parts[s][i], s = 0, 1, ... in order: the deterministic split-K reduction.
template <typename Acc>
__global__ void __launch_bounds__(256) reduce_splits_kernel(const Acc* __restrict__ parts, Acc* __restrict__ v,
                                                            int64_t count, int64_t splits) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    Acc sum = parts[i];
    for (int64_t s = 1; s < splits; ++s) sum += parts[s * count + i];
    v[i] = sum;
  }
}

// ---------------------------------------------------------------------------------------------------------
// R̃ written out (the GEMM projection path): out[n] = R̃ at flat offset n = c·D + j, rounded to T. The values the
// panels of the kernels above hold (in Acc), so float32/float64 R̃ are the same bits.
constexpr int kDroppedThreads = 256;

template <typename T, typename Acc>
__global__ void __launch_bounds__(kDroppedThreads) dropped_projection_kernel(const DroppedProjection<T, Acc> R,
                                                                             T* __restrict__ out, int64_t count) {
  const DroppedProjection<T, Acc> r_tilde = R.with_seed();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kDroppedThreads;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * kDroppedThreads + threadIdx.x; n < count; n += stride) {
    out[n] = convert<T>(r_tilde(static_cast<uint64_t>(n)));
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward: dh for BN columns of D and a range of batch tiles.

template <typename T, typename Acc>
struct BackwardParams {
  const Acc* grad_v;     // (B, C)
  const Acc* grad_scale;  // one Acc in device memory multiplying grad_v, or nullptr (1)
  T* dh;                 // (B, D)
  DroppedProjection<T, Acc> r_tilde;
  int64_t B, C, D;
  int64_t btiles_per_block;
  bool grad_vec;         // 16-byte loads of grad_v are legal
};

template <class Cfg, typename T, typename Acc>
__global__ void __launch_bounds__(Cfg::NT) projection_backward_kernel(const BackwardParams<T, Acc> P) {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  Acc* As = reinterpret_cast<Acc*>(shared_raw);  // [BK][BM+1]  tile of grad_v, k-major
  Acc* Ps = As + Cfg::BK * Cfg::A_LD;             // [KP][BN+1]  panel of R̃ (classes × columns of D)

  const int tx = static_cast<int>(threadIdx.x) % Cfg::NTX;
  const int ty = static_cast<int>(threadIdx.x) / Cfg::NTX;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * Cfg::BN;
  const int64_t tiles_b = (P.B + Cfg::BM - 1) / Cfg::BM;
  const int64_t bt_begin = static_cast<int64_t>(blockIdx.y) * P.btiles_per_block;
  const int64_t bt_end = tiles_b < bt_begin + P.btiles_per_block ? tiles_b : bt_begin + P.btiles_per_block;
  const bool panel_resident = P.C <= Cfg::KP;  // the whole of R̃[:, j0:j0+BN] fits: generate it once
  const DroppedProjection<T, Acc> r_tilde = P.r_tilde.with_seed();
  const Acc grad_scale = P.grad_scale != nullptr ? *P.grad_scale : Acc(1);  // x · 1 == x: the same bits

  for (int64_t bt = bt_begin; bt < bt_end; ++bt) {
    const int64_t b0 = bt * Cfg::BM;
    Acc acc[Cfg::TM][Cfg::TN];
#pragma unroll
    for (int i = 0; i < Cfg::TM; ++i) {
#pragma unroll
      for (int j = 0; j < Cfg::TN; ++j) acc[i][j] = Acc(0);
    }

    for (int64_t chunk = 0; chunk < P.C; chunk += Cfg::KP) {
      // Stage 1: R̃ rows [chunk, chunk + KP), columns [j0, j0 + BN) (previous readers are past the trailing
      // __syncthreads of the last K step).
      if (!panel_resident || bt == bt_begin) fill_backward_panel<Cfg>(Ps, r_tilde, P.C, P.D, chunk, j0);
      const int64_t chunk_end = P.C < chunk + Cfg::KP ? P.C : chunk + Cfg::KP;
      for (int64_t k0 = chunk; k0 < chunk_end; k0 += Cfg::BK) {
        // Stage 2: the grad_v tile (rows b0.., classes k0..k0+BK).
        load_rows_tile<Cfg, true>(As, P.grad_v, P.B, P.C, b0, k0, P.grad_vec, grad_scale);
        __syncthreads();
        // Stage 3: FMAs over the step's classes rounded up to 8 (at C = 10: 16 of the 32).
        const int k_eighths = static_cast<int>(((chunk_end - k0 < Cfg::BK ? chunk_end - k0 : Cfg::BK) + 7) / 8);
        register_tile_multiply<Cfg::TM, Cfg::TN, Cfg::BK, Cfg::NTX, Cfg::NTY, Cfg::A_LD, Cfg::P_LD>(
            acc, As, Ps + (k0 - chunk) * Cfg::P_LD, tx, ty, k_eighths);
        __syncthreads();
      }
    }

    // Stage 4: dh in h's dtype (rounded once, from the accumulator); coalesced along D.
#pragma unroll
    for (int i = 0; i < Cfg::TM; ++i) {
      const int64_t b = b0 + ty + i * Cfg::NTY;
      if (b >= P.B) continue;
#pragma unroll
      for (int j = 0; j < Cfg::TN; ++j) {
        const int64_t col = j0 + tx + j * Cfg::NTX;
        if (col < P.D) P.dh[b * P.D + col] = convert<T>(acc[i][j]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Host-side plans. Both the workspace query and the launch call these, so they agree by construction.

constexpr int64_t kMaxGridYZ = 65535;
// Split-K partial sums up to this size stay in L2 (a third of an H100's 50 MB): no cap on their traffic.
constexpr size_t kL2PartialBytes = size_t(16) << 20;

struct ForwardPlan {
  int tile_n = 64;            // which ForwardTile: 16, 32 or 64
  int64_t splits_d = 1;       // grid.x
  int64_t d_per_split = 0;    // multiple of KP
  int64_t tiles_c = 1;        // grid.y
  int64_t splits_b = 1;       // grid.z
  int64_t btiles_per_block = 1;
  size_t workspace_bytes = 0;  // [splits_d, B, C] of Acc when splits_d > 1
  int64_t counters = 0;        // arrival counters of the in-kernel split-K reduction: one per grid (y, z)
};

template <class Cfg>
ForwardPlan plan_forward_with(int64_t B, int64_t C, int64_t D, size_t elem, size_t acc, int sms,
                              const LaunchPlan& launch_plan) {
  ForwardPlan plan;
  plan.tile_n = Cfg::BN;
  const int64_t tiles_b = ceil_div(B, Cfg::BM);
  plan.tiles_c = ceil_div(C, Cfg::BN);
  const int64_t panels = max64(1, ceil_div(D, Cfg::KP));
  // Enough blocks for ~4 per SM: the tail of the last wave then costs little.
  const int64_t target_blocks = 4 * static_cast<int64_t>(sms);
  const int64_t splits_for_parallelism = ceil_div(target_blocks, tiles_b * plan.tiles_c);
  // One panel per split lets a block generate R̃ once for all its batch tiles, but every split adds a (B, C)
  // partial that is written and read back: the splits parallelism asks for are capped so that this traffic
  // stays under 1/4 of reading h (2·splits·C·acc <= D·elem / 4 bytes per row of h), or within
  // kL2PartialBytes, where it never leaves L2 (bench/NOTES.md, "weak points" 1).
  const int64_t splits_for_traffic =
      max64(max64(1, static_cast<int64_t>(D * elem) / static_cast<int64_t>(8 * C * acc)),
            static_cast<int64_t>(kL2PartialBytes) / static_cast<int64_t>(2 * B * C * acc));
  int64_t splits = max64(1, min64(panels, min64(splits_for_parallelism, splits_for_traffic)));
  int64_t panels_per_split = ceil_div(panels, splits);
  if (launch_plan.forward_panels_per_split > 0) {
    panels_per_split = min64(launch_plan.forward_panels_per_split, panels);
  }
  plan.d_per_split = panels_per_split * Cfg::KP;
  plan.splits_d = ceil_div(panels, panels_per_split);
  if (panels_per_split == 1) {
    // Resident panel: split the batch only as far as parallelism needs; each block streams its tiles.
    const int64_t want = min64(tiles_b, max64(1, ceil_div(target_blocks, plan.splits_d * plan.tiles_c)));
    plan.btiles_per_block = max64(ceil_div(tiles_b, want), ceil_div(tiles_b, kMaxGridYZ));
  } else {
    // The panel is regenerated per batch tile anyway: one tile per block (grid.z permitting).
    plan.btiles_per_block = max64(1, ceil_div(tiles_b, kMaxGridYZ));
  }
  if (launch_plan.forward_btiles_per_block > 0) {
    plan.btiles_per_block = max64(launch_plan.forward_btiles_per_block, ceil_div(tiles_b, kMaxGridYZ));
  }
  plan.splits_b = ceil_div(tiles_b, plan.btiles_per_block);
  plan.workspace_bytes = plan.splits_d > 1 ? static_cast<size_t>(plan.splits_d * B * C) * acc : 0;
  plan.counters = plan.splits_d > 1 ? plan.tiles_c * plan.splits_b : 0;
  return plan;
}

ForwardPlan plan_forward(int64_t B, int64_t C, int64_t D, DType dtype, int sms, const LaunchPlan& launch_plan) {
  const size_t elem = element_size(dtype);
  const size_t acc = acc_size(dtype);
  if (C <= 16) return plan_forward_with<ForwardTile16>(B, C, D, elem, acc, sms, launch_plan);
  if (C <= 32) return plan_forward_with<ForwardTile32>(B, C, D, elem, acc, sms, launch_plan);
  return plan_forward_with<ForwardTile64>(B, C, D, elem, acc, sms, launch_plan);
}

bool valid_dtype(DType dtype) {
  return dtype == DType::kFloat32 || dtype == DType::kFloat64 || dtype == DType::kBFloat16 ||
         dtype == DType::kFloat16;
}

template <typename T, typename Acc>
DroppedProjection<T, Acc> make_r_tilde(const void* weight, uint64_t proj_seed, float proj_std, double p,
                                       const int64_t* seed) {
  DroppedProjection<T, Acc> r;
  r.weight = static_cast<const T*>(weight);
  r.proj_seed = proj_seed;
  r.seed_ptr = seed;
  r.seed = 0;
  r.proj_std = proj_std;
  r.p = static_cast<float>(p);
  r.scale = p > 0.0 ? svp::dropout_scale<Acc>(p) : Acc(1);
  r.dropout = p > 0.0;
  return r;
}

template <class Cfg, typename T>
cudaError_t launch_forward(const ForwardPlan& plan, const void* h, const void* weight, void* v, int64_t B,
                           int64_t C, int64_t D, uint64_t proj_seed, float proj_std, double p, const int64_t* seed,
                           void* workspace, unsigned* counters, int sms, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  ForwardParams<T, Acc> params;
  params.h = static_cast<const T*>(h);
  params.out = plan.splits_d > 1 ? static_cast<Acc*>(workspace) : static_cast<Acc*>(v);
  params.v = static_cast<Acc*>(v);
  params.counters = plan.splits_d > 1 ? counters : nullptr;
  params.r_tilde = make_r_tilde<T, Acc>(weight, proj_seed, proj_std, p, seed);
  params.B = B;
  params.C = C;
  params.D = D;
  params.d_per_split = plan.d_per_split;
  params.btiles_per_block = plan.btiles_per_block;
  params.h_vec = aligned16(h) && D % (16 / static_cast<int64_t>(sizeof(T))) == 0;

  const size_t smem = Cfg::template smem_bytes<Acc>();
  constexpr auto kernel = projection_forward_kernel<Cfg, T, Acc>;
  SVP_CUDA_TRY(allow_shared_memory<kernel>(smem));
  const dim3 grid(static_cast<unsigned>(plan.splits_d), static_cast<unsigned>(plan.tiles_c),
                  static_cast<unsigned>(plan.splits_b));
  kernel<<<grid, Cfg::NT, smem, stream>>>(params);
  SVP_CUDA_CHECK_LAUNCH();

  if (plan.splits_d > 1 && counters == nullptr) {  // with counters the kernel reduced the splits itself
    const int64_t count = B * C;
    const int64_t blocks = max64(1, min64(ceil_div(count, 256), 8 * static_cast<int64_t>(sms)));
    reduce_splits_kernel<Acc><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
        static_cast<const Acc*>(workspace), static_cast<Acc*>(v), count, plan.splits_d);
    SVP_CUDA_CHECK_LAUNCH();
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t forward_typed(const ForwardPlan& plan, const void* h, const void* weight, void* v, int64_t B, int64_t C,
                          int64_t D, uint64_t proj_seed, float proj_std, double p, const int64_t* seed, void* workspace,
                          unsigned* counters, int sms, cudaStream_t stream) {
  switch (plan.tile_n) {
    case 16:
      return launch_forward<ForwardTile16, T>(plan, h, weight, v, B, C, D, proj_seed, proj_std, p, seed, workspace,
                                              counters, sms, stream);
    case 32:
      return launch_forward<ForwardTile32, T>(plan, h, weight, v, B, C, D, proj_seed, proj_std, p, seed, workspace,
                                              counters, sms, stream);
    default:
      return launch_forward<ForwardTile64, T>(plan, h, weight, v, B, C, D, proj_seed, proj_std, p, seed, workspace,
                                              counters, sms, stream);
  }
}

template <typename T>
cudaError_t backward_typed(const void* grad_v, const void* grad_scale, const void* weight, void* dh, int64_t B,
                           int64_t C, int64_t D, uint64_t proj_seed, float proj_std, double p, const int64_t* seed,
                           int sms, const LaunchPlan& launch_plan, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  using Cfg = BackwardTile;
  BackwardParams<T, Acc> params;
  params.grad_v = static_cast<const Acc*>(grad_v);
  params.grad_scale = static_cast<const Acc*>(grad_scale);
  params.dh = static_cast<T*>(dh);
  params.r_tilde = make_r_tilde<T, Acc>(weight, proj_seed, proj_std, p, seed);
  params.B = B;
  params.C = C;
  params.D = D;
  params.grad_vec = aligned16(grad_v) && C % (16 / static_cast<int64_t>(sizeof(Acc))) == 0;

  const int64_t tiles_d = ceil_div(D, Cfg::BN);
  const int64_t tiles_b = ceil_div(B, Cfg::BM);
  int64_t btiles_per_block;
  if (C <= Cfg::KP) {
    // Resident panel: split the batch only as far as ~4 blocks per SM need.
    const int64_t want = min64(tiles_b, max64(1, ceil_div(4 * static_cast<int64_t>(sms), tiles_d)));
    btiles_per_block = max64(ceil_div(tiles_b, want), ceil_div(tiles_b, kMaxGridYZ));
  } else {
    btiles_per_block = max64(1, ceil_div(tiles_b, kMaxGridYZ));
  }
  if (launch_plan.backward_btiles_per_block > 0) {
    btiles_per_block = max64(launch_plan.backward_btiles_per_block, ceil_div(tiles_b, kMaxGridYZ));
  }
  params.btiles_per_block = btiles_per_block;
  const int64_t splits_b = ceil_div(tiles_b, btiles_per_block);
  if (tiles_d > 0x7fffffffLL) return cudaErrorInvalidConfiguration;

  const size_t smem = Cfg::template smem_bytes<Acc>();
  constexpr auto kernel = projection_backward_kernel<Cfg, T, Acc>;
  SVP_CUDA_TRY(allow_shared_memory<kernel>(smem));
  const dim3 grid(static_cast<unsigned>(tiles_d), static_cast<unsigned>(splits_b), 1);
  kernel<<<grid, Cfg::NT, smem, stream>>>(params);
  SVP_CUDA_CHECK_LAUNCH();
  return cudaSuccess;
}

template <typename T>
cudaError_t dropped_typed(const void* weight, void* out, int64_t C, int64_t D, uint64_t proj_seed, float proj_std,
                          double p, const int64_t* seed, int sms, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  const int64_t count = C * D;
  // Enough blocks to fill the device ~8 deep, each thread then walks the rest with a grid stride.
  const int64_t blocks = max64(1, min64(ceil_div(count, kDroppedThreads), 8 * static_cast<int64_t>(sms)));
  dropped_projection_kernel<T, Acc><<<static_cast<unsigned>(blocks), kDroppedThreads, 0, stream>>>(
      make_r_tilde<T, Acc>(weight, proj_seed, proj_std, p, seed), static_cast<T*>(out), count);
  SVP_CUDA_CHECK_LAUNCH();
  return cudaSuccess;
}

}  // namespace
}  // namespace detail

// ---------------------------------------------------------------------------------------------------------
// Public launchers (svp_cuda.h).

cudaError_t dropped_projection(const void* weight, void* out, int64_t C, int64_t D, uint64_t proj_seed,
                               float proj_std, double p, const int64_t* seed, DType dtype, cudaStream_t stream) {
  using namespace detail;
  if (!valid_dtype(dtype) || C < 0 || D < 0 || !(p >= 0.0 && p < 1.0)) return cudaErrorInvalidValue;
  if (p > 0.0 && seed == nullptr) return cudaErrorInvalidValue;
  if (C == 0 || D == 0) return cudaSuccess;
  if (out == nullptr) return cudaErrorInvalidValue;
  int sms = 1;
  SVP_CUDA_TRY(current_sm_count(&sms));
  switch (dtype) {
    case DType::kFloat32:
      return dropped_typed<float>(weight, out, C, D, proj_seed, proj_std, p, seed, sms, stream);
    case DType::kFloat64:
      return dropped_typed<double>(weight, out, C, D, proj_seed, proj_std, p, seed, sms, stream);
    case DType::kBFloat16:
      return dropped_typed<__nv_bfloat16>(weight, out, C, D, proj_seed, proj_std, p, seed, sms, stream);
    case DType::kFloat16:
      return dropped_typed<__half>(weight, out, C, D, proj_seed, proj_std, p, seed, sms, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t projection_forward_workspace_bytes(int64_t B, int64_t C, int64_t D, DType dtype, size_t* bytes,
                                              const LaunchPlan& launch_plan) {
  using namespace detail;
  if (bytes == nullptr || !valid_dtype(dtype) || B < 0 || C < 0 || D < 0) return cudaErrorInvalidValue;
  *bytes = 0;
  if (B == 0 || C == 0) return cudaSuccess;
  int sms = 1;
  SVP_CUDA_TRY(current_sm_count(&sms));
  *bytes = plan_forward(B, C, D, dtype, sms, launch_plan).workspace_bytes;
  return cudaSuccess;
}

cudaError_t projection_forward_counters(int64_t B, int64_t C, int64_t D, DType dtype, int64_t* count,
                                       const LaunchPlan& launch_plan) {
  using namespace detail;
  if (count == nullptr || !valid_dtype(dtype) || B < 0 || C < 0 || D < 0) return cudaErrorInvalidValue;
  *count = 0;
  if (B == 0 || C == 0) return cudaSuccess;
  int sms = 1;
  SVP_CUDA_TRY(current_sm_count(&sms));
  *count = plan_forward(B, C, D, dtype, sms, launch_plan).counters;
  return cudaSuccess;
}

cudaError_t projection_forward(const void* h, const void* weight, void* v, int64_t B, int64_t C, int64_t D,
                               uint64_t proj_seed, float proj_std, double p, const int64_t* seed, DType dtype,
                               void* workspace, size_t workspace_bytes, const LaunchPlan& launch_plan,
                               cudaStream_t stream, unsigned* counters, int64_t counter_count) {
  using namespace detail;
  if (!valid_dtype(dtype) || B < 0 || C < 0 || D < 0 || !(p >= 0.0 && p < 1.0)) return cudaErrorInvalidValue;
  if (p > 0.0 && seed == nullptr) return cudaErrorInvalidValue;
  if (B == 0 || C == 0) return cudaSuccess;
  if (v == nullptr || (D > 0 && h == nullptr)) return cudaErrorInvalidValue;
  int sms = 1;
  SVP_CUDA_TRY(current_sm_count(&sms));
  const ForwardPlan plan = plan_forward(B, C, D, dtype, sms, launch_plan);
  if (workspace_bytes < plan.workspace_bytes || (plan.workspace_bytes > 0 && workspace == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (plan.splits_d > 0x7fffffffLL || plan.tiles_c > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  if (counter_count < plan.counters) counters = nullptr;  // too few (or none): the reduction kernel instead
  switch (dtype) {
    case DType::kFloat32:
      return forward_typed<float>(plan, h, weight, v, B, C, D, proj_seed, proj_std, p, seed, workspace, counters, sms,
                                  stream);
    case DType::kFloat64:
      return forward_typed<double>(plan, h, weight, v, B, C, D, proj_seed, proj_std, p, seed, workspace, counters,
                                   sms, stream);
    case DType::kBFloat16:
      return forward_typed<__nv_bfloat16>(plan, h, weight, v, B, C, D, proj_seed, proj_std, p, seed, workspace,
                                          counters, sms, stream);
    case DType::kFloat16:
      return forward_typed<__half>(plan, h, weight, v, B, C, D, proj_seed, proj_std, p, seed, workspace, counters,
                                   sms, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t projection_backward(const void* grad_v, const void* weight, void* dh, int64_t B, int64_t C, int64_t D,
                                uint64_t proj_seed, float proj_std, double p, const int64_t* seed, DType dtype,
                                const LaunchPlan& launch_plan, cudaStream_t stream, const void* grad_scale) {
  using namespace detail;
  if (!valid_dtype(dtype) || B < 0 || C < 0 || D < 0 || !(p >= 0.0 && p < 1.0)) return cudaErrorInvalidValue;
  if (p > 0.0 && seed == nullptr) return cudaErrorInvalidValue;
  if (B == 0 || D == 0) return cudaSuccess;
  if (dh == nullptr || (C > 0 && grad_v == nullptr)) return cudaErrorInvalidValue;
  int sms = 1;
  SVP_CUDA_TRY(current_sm_count(&sms));
  switch (dtype) {
    case DType::kFloat32:
      return backward_typed<float>(grad_v, grad_scale, weight, dh, B, C, D, proj_seed, proj_std, p, seed, sms,
                                   launch_plan, stream);
    case DType::kFloat64:
      return backward_typed<double>(grad_v, grad_scale, weight, dh, B, C, D, proj_seed, proj_std, p, seed, sms,
                                    launch_plan, stream);
    case DType::kBFloat16:
      return backward_typed<__nv_bfloat16>(grad_v, grad_scale, weight, dh, B, C, D, proj_seed, proj_std, p, seed,
                                           sms, launch_plan, stream);
    case DType::kFloat16:
      return backward_typed<__half>(grad_v, grad_scale, weight, dh, B, C, D, proj_seed, proj_std, p, seed, sms,
                                    launch_plan, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace svp_cuda

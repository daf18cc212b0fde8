// Loss epilogue and cosine Gram on the (B, C) projection, docs/design.md §2.
//
//   loss = CE(v, y) + λ·FA,   FA = ‖â âᵀ − b̂ b̂ᵀ‖²_F (/ B² when mean),   g_v = dloss/dv.
//
// Everything is phrased on Z = [â | b̂] (B, C + C'), the row-normalised v and v_prev side by side, and the
// sign vector s (+1 on the C columns of â, −1 on the C' columns of b̂):
//
//   feature space (C + C' < B):  G = ZᵀZ ((C+C')², never B²);   FA = Σ_mn s_m s_n G_mn²
//                                ∂FA/∂â = 4 Z diag(s) G[:, :C]          (= 4(â âᵀâ − b̂ b̂ᵀâ))
//                                G, FA and P = Z diag(s) G[:, :C] in WideSum (double) for float data too:
//                                FA ≪ ‖âᵀâ‖² when v ≈ v_prev, and P likewise cancels, so float32 Grams
//                                would lose the leading digits (bench/NOTES.md, "CUDA feature-space accuracy")
//   batch space (otherwise):     tiles of Δ = Z diag(s) Zᵀ (= â âᵀ − b̂ b̂ᵀ), flash-style: each 32×32 tile
//                                is computed, used for FA += ΣΔ² and ∂FA/∂â += 4 Δ â, and dropped.
//
// Alignment "bhattacharyya" (v_prev (B, C)): no Z and no Gram. rows_kernel adds, per row, BD(v_b, v_prev_b)
// and λ·∂BD/∂v_b to the CE terms (bhattacharyya_row_warp); finalize sums the rows' distances. 2 launches.
//
// Pipeline (one stream, each stage a kernel; all reductions in a fixed order, no float atomics):
//   1. rows_kernel            warp per row: CE row term + (softmax − onehot)/B into g_v, â and b̂ into Z;
//                             zeroes the arrival counters of stage 2
//   2. feature: Gram (split over B; the last split block of each output tile sums the tile's partials in
//               split order and writes its FA partial)
//      batch:   batch_alignment_kernel (FA partials, P split over column tiles)
//   3. alignment_grad_kernel  warp per row: (feature space: its row of P = Z diag(s) G first) through the row
//                             normalisation, g_v += λ·(…); its block 0 first runs stage 4, whose inputs
//                             earlier launches wrote
//   4. finalize               one block: ce, alignment, loss (its own kernel when there is no v_prev)
// Launches: 3 with v_prev (either space), 2 without (bench/NOTES.md, "weak points" 4).
#include <cuda_runtime.h>

#include <type_traits>

#include "common.cuh"
#include "svp/math.h"
#include "svp_cuda.h"

namespace svp_cuda {
namespace detail {
namespace {

using svp::WideSum;

// Whether the backward through the normalisation divides by ‖u‖ (double data, bit for bit as before) or
// multiplies by its double reciprocal (float data, rounded to float afterwards; see svp::divided).
template <typename Acc>
constexpr bool kDividesByNorm = sizeof(Acc) == sizeof(double);

// The dot products of Δ (K = C + C') and of the cosine Gram (K = C): float accumulators hold one K step
// (32 terms) and are folded into WideSum after each step (KFold::step), so a long K adds in double rather
// than in one float32 chain per thread; double accumulators run the K loop unchanged. (ZᵀZ accumulates in
// WideSum throughout: small_gemm_kernel's kGram.)
template <typename Acc>
struct KFold {
  template <int M, int N>
  __device__ __forceinline__ static void step(Acc (&partial)[M][N], WideSum (&wide)[M][N]) {
#pragma unroll
    for (int i = 0; i < M; ++i) {
#pragma unroll
      for (int j = 0; j < N; ++j) {
        wide[i][j] += static_cast<WideSum>(partial[i][j]);
        partial[i][j] = Acc(0);
      }
    }
  }
  template <int M, int N>
  __device__ __forceinline__ static void finish(const WideSum (&wide)[M][N], Acc (&acc)[M][N]) {
#pragma unroll
    for (int i = 0; i < M; ++i) {
#pragma unroll
      for (int j = 0; j < N; ++j) acc[i][j] = static_cast<Acc>(wide[i][j]);
    }
  }
};
template <>
struct KFold<double> {
  template <int M, int N>
  __device__ __forceinline__ static void step(double (&)[M][N], WideSum (&)[M][N]) {}
  template <int M, int N>
  __device__ __forceinline__ static void finish(const WideSum (&)[M][N], double (&)[M][N]) {}
};

constexpr int kThreads = 256;                       // every kernel here: 8 warps
constexpr int kRowsPerBlock = kThreads / kWarpSize;  // row kernels: one warp per row
constexpr int64_t kMaxGridX = 0x7fffffffLL;
constexpr int64_t kMaxGridYZ = 65535;
constexpr int64_t kNoNegation = 0x7fffffffffffffffLL;

// ---------------------------------------------------------------------------------------------------------
// Stage 1: per-row CE and normalisation.

template <typename T, typename Acc>
struct RowParams {
  const T* v;              // (B, C)
  const int64_t* target;   // (B,) or nullptr
  const T* v_prev;         // (B, Cp) or nullptr
  int64_t B, C, Cp;
  bool center;
  Acc* g_v;                // (B, C): the CE gradient (zeros without target); nullptr: not wanted
  Acc* ce_rows;            // (B,): logsumexp(v_b) − v_b[y_b]; nullptr without target
  Acc* Z;                  // (B, z_ld): â in columns [0, C), b̂ in [C, C + Cp); nullptr: not wanted
  int64_t z_ld;
  Acc* norms;              // (B,): ‖v_b (centred)‖, for the backward through the normalisation
  unsigned* counters;      // (counter_count,): zeroed here for the later stages' arrival counts; may be nullptr
  int64_t counter_count;
  WideSum bd_coef;         // λ/2, over B for the batch mean: g_v += bd_coef · (softmax(v) − r)
  Acc* distances;          // (B,): BD(v_b, v_prev_b) when bhattacharyya
};

// â = u / max(‖u‖, ε), u = row (minus its mean when `center`), into out[0, n) when out != nullptr.
// Returns ‖u‖ (identical in every lane). Two passes over the row keep ‖u‖ free of cancellation. The mean, u
// and ‖u‖ are taken in WideSum (double, svp/math.h): each lane's strided float32 chain would otherwise carry
// n/32 terms (1024 at n = 32768). The row is read twice or three times from memory either way, and float64
// runs at half the float32 rate on H100/H200, so the wide arithmetic hides behind the loads.
template <typename T, typename Acc>
__device__ Acc normalize_row_warp(const T* row, int64_t n, bool center, Acc* out, int lane) {
  WideSum mean = 0.0;
  if (center && n > 0) {
    WideSum sum = 0.0;
    for (int64_t c = lane; c < n; c += kWarpSize) sum += static_cast<WideSum>(to_acc<Acc>(row[c]));
    mean = warp_sum(sum) / static_cast<WideSum>(n);
  }
  WideSum square_sum = 0.0;
  for (int64_t c = lane; c < n; c += kWarpSize) {
    const WideSum u = static_cast<WideSum>(to_acc<Acc>(row[c])) - mean;
    square_sum += u * u;
  }
  const WideSum norm = acc_sqrt(warp_sum(square_sum));
  const WideSum denominator = norm > kNormEps ? norm : kNormEps, inverse = 1.0 / denominator;
  if (out != nullptr) {
    for (int64_t c = lane; c < n; c += kWarpSize) {
      out[c] = svp::divided<Acc>(static_cast<WideSum>(to_acc<Acc>(row[c])) - mean, denominator, inverse);
    }
  }
  return static_cast<Acc>(norm);
}

// The Bhattacharyya distance of one row of v and v_prev (n values each), by a warp (docs/design.md §2): with
// a = v − max v and b = v_prev − max v_prev (Acc), t = ½(a + b) and d = max t (WideSum),
//   BD = ½(log Σ e^a + log Σ e^b) − d − log Σ e^(t − d)   (= −logsumexp(½(log_softmax(v) + log_softmax(v_prev))))
// into *distance (lane 0), and grad[c] += coef · (softmax(v)_c − r_c), r = e^(t − d) / Σ e^(t − d), when grad is
// not null. The exponentials in Acc; t, d, the sums, the logs and the gradient's difference in WideSum. Every
// exponent is ≤ 0 and every sum ≥ 1: exact, no clamp; v_prev may hold −inf (a class of probability 0).
template <typename T, typename Acc>
__device__ void bhattacharyya_row_warp(const T* row, const T* prev, int64_t n, WideSum coef, Acc* grad,
                                       Acc* distance, int lane) {
  Acc max_v = static_cast<Acc>(-INFINITY), max_p = static_cast<Acc>(-INFINITY);
  for (int64_t c = lane; c < n; c += kWarpSize) {
    max_v = fmax(max_v, to_acc<Acc>(row[c]));
    max_p = fmax(max_p, to_acc<Acc>(prev[c]));
  }
  max_v = warp_max(max_v);
  max_p = warp_max(max_p);
  auto a_of = [&](int64_t c) { return to_acc<Acc>(row[c]) - max_v; };
  auto b_of = [&](int64_t c) { return to_acc<Acc>(prev[c]) - max_p; };
  auto t_of = [&](int64_t c) { return 0.5 * (static_cast<WideSum>(a_of(c)) + static_cast<WideSum>(b_of(c))); };
  WideSum d = -INFINITY;
  for (int64_t c = lane; c < n; c += kWarpSize) d = fmax(d, t_of(c));
  d = warp_max(d);
  WideSum sum_a = 0.0, sum_b = 0.0, sum_x = 0.0;
  for (int64_t c = lane; c < n; c += kWarpSize) {
    sum_a += static_cast<WideSum>(acc_exp(a_of(c)));
    sum_b += static_cast<WideSum>(acc_exp(b_of(c)));
    sum_x += static_cast<WideSum>(acc_exp(static_cast<Acc>(t_of(c) - d)));
  }
  sum_a = warp_sum(sum_a);
  sum_b = warp_sum(sum_b);
  sum_x = warp_sum(sum_x);
  if (lane == 0) *distance = static_cast<Acc>(0.5 * (acc_log(sum_a) + acc_log(sum_b)) - d - acc_log(sum_x));
  if (grad != nullptr) {
    // The reciprocals once per row by the inline intrinsic (a double division is a subroutine call, whose
    // saved registers would spill here).
    const WideSum inv_a = __drcp_rn(sum_a), inv_x = __drcp_rn(sum_x);
    for (int64_t c = lane; c < n; c += kWarpSize) {
      const WideSum difference = static_cast<WideSum>(acc_exp(a_of(c))) * inv_a -
                                 static_cast<WideSum>(acc_exp(static_cast<Acc>(t_of(c) - d))) * inv_x;
      grad[c] = static_cast<Acc>(static_cast<WideSum>(grad[c]) + coef * difference);
    }
  }
}

// kBhattacharyya: v_prev (B, C) feeds the Bhattacharyya term and nothing is normalised (Z == nullptr). A template
// argument, not a runtime flag, so that the cosine-Gram instantiation keeps its own registers (no spills).
template <typename T, typename Acc, bool kBhattacharyya>
__global__ void __launch_bounds__(kThreads) rows_kernel(const RowParams<T, Acc> P) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kRowsPerBlock;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < P.counter_count; i += stride) {
    P.counters[i] = 0u;
  }
  for (int64_t b = warp; b < P.B; b += warps) {  // warp-uniform loop: shuffles stay converged
    const T* row = P.v + b * P.C;

    // Cross-entropy: logsumexp(v_b) − v_b[y] and g_v = (softmax − onehot) / B.
    if (P.target != nullptr) {
      Acc row_max = static_cast<Acc>(-INFINITY);
      for (int64_t c = lane; c < P.C; c += kWarpSize) row_max = fmax(row_max, to_acc<Acc>(row[c]));
      row_max = warp_max(row_max);
      Acc exp_sum = Acc(0);
      for (int64_t c = lane; c < P.C; c += kWarpSize) exp_sum += acc_exp(to_acc<Acc>(row[c]) - row_max);
      exp_sum = warp_sum(exp_sum);
      const int64_t y = P.target[b];
      // A target outside [0, C) is never read through: the row's loss and gradient are NaN (the API checks
      // the range on the host only on request, to keep CUDA calls free of a synchronisation).
      const bool y_valid = y >= 0 && y < P.C;
      if (lane == 0) {
        const Acc v_y = y_valid ? to_acc<Acc>(row[y]) : static_cast<Acc>(NAN);
        P.ce_rows[b] = row_max + acc_log(exp_sum) - v_y;
      }
      if (P.g_v != nullptr) {
        const Acc grad_scale = y_valid ? Acc(1) / static_cast<Acc>(P.B) : static_cast<Acc>(NAN);
        for (int64_t c = lane; c < P.C; c += kWarpSize) {
          const Acc softmax = acc_exp(to_acc<Acc>(row[c]) - row_max) / exp_sum;
          P.g_v[b * P.C + c] = (softmax - (c == y ? Acc(1) : Acc(0))) * grad_scale;
        }
      }
    } else if (P.g_v != nullptr) {
      for (int64_t c = lane; c < P.C; c += kWarpSize) P.g_v[b * P.C + c] = Acc(0);
    }

    // The Bhattacharyya term: BD_b and its gradient, added to the CE's (each lane adds to the classes it wrote).
    if constexpr (kBhattacharyya) {
      bhattacharyya_row_warp<T, Acc>(row, P.v_prev + b * P.C, P.C, P.bd_coef,
                                     P.g_v != nullptr ? P.g_v + b * P.C : nullptr, P.distances + b, lane);
    } else if (P.Z != nullptr) {  // â_b into Z[b, 0:C), b̂_b into Z[b, C:C+Cp)
      const Acc norm = normalize_row_warp<T, Acc>(row, P.C, P.center, P.Z + b * P.z_ld, lane);
      if (lane == 0 && P.norms != nullptr) P.norms[b] = norm;
      if (P.v_prev != nullptr) {
        normalize_row_warp<T, Acc>(P.v_prev + b * P.Cp, P.Cp, P.center, P.Z + b * P.z_ld + P.C, lane);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// A small register-tiled GEMM for the Grams: out[split][m][n] = Σ_{k in split} A(m, k) · B(k, n).
// Operands are strided views of Z or G; kFastK says which index is contiguous in memory, so the tile loads
// put consecutive threads on consecutive addresses. Tiles are k-major in shared memory with one element of
// padding: the transposing writes land in 32 distinct banks, the reads are broadcasts / consecutive.

template <int BM_, int BN_, int BK_, int TM_, int TN_>
struct GemmTile {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, TM = TM_, TN = TN_;
  static constexpr int NTX = BN / TN, NTY = BM / TM, NT = NTX * NTY;
  static constexpr int A_LD = BM + 1, B_LD = BN + 1;
  static_assert(NT == kThreads, "GEMM tiles are written for 256 threads");
  static_assert((BM * BK) % NT == 0 && (BN * BK) % NT == 0, "tiles must split evenly over the block");
};
// Gram ZᵀZ: (C+C') is small, K = B is long: 32×32 output tiles, split over B across blocks.
using GramTile = GemmTile<32, 32, 32, 2, 2>;
// cosine_gram S = Z Zᵀ: B × B output.
using CosineTile = GemmTile<64, 64, 32, 4, 4>;

// element(outer, k) = x[outer·stride_outer + k·stride_k], negated for k >= negate_from.
template <typename Acc, bool kFastK_>
struct Operand {
  static constexpr bool kFastK = kFastK_;
  const Acc* x;
  int64_t stride_outer;
  int64_t stride_k;
  int64_t negate_from;
  __device__ __forceinline__ Acc operator()(int64_t outer, int64_t k) const {
    const Acc value = x[outer * stride_outer + k * stride_k];
    return k >= negate_from ? -value : value;
  }
};

// tile[k][o] = op(o0 + o, k0 + k) for o < OUTER, k < BK; zero outside [0, outer_size) × [k0, k_end).
template <int OUTER, int LD, int BK, int NT, typename Acc, class Op>
__device__ __forceinline__ void load_operand_tile(Acc* tile, const Op& op, int64_t o0, int64_t outer_size,
                                                  int64_t k0, int64_t k_end) {
  constexpr int kIters = OUTER * BK / NT;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int e = static_cast<int>(threadIdx.x) + it * NT;
    const int k = Op::kFastK ? e % BK : e / OUTER;
    const int o = Op::kFastK ? e / BK : e % OUTER;
    const int64_t outer = o0 + o;
    const int64_t kk = k0 + k;
    tile[k * LD + o] = (outer < outer_size && kk < k_end) ? op(outer, kk) : Acc(0);
  }
}

// The Gram's tail (stage 2, feature space): once every split of an output tile has written its partial, the
// last to arrive sums them in split order into slot 0 (G) and writes the tile's FA partial Σ s_m s_n G_mn²
// (s = +1 on the first C of the C + C' features, −1 after) to fa_parts[tile], all in WideSum. counters: one
// per output tile, zero on entry (rows_kernel zeroes them), zero again on exit.
struct GramTail {
  unsigned* counters = nullptr;
  WideSum* fa_parts = nullptr;
  int64_t C = 0;
};

// What small_gemm_kernel accumulates in and writes: Acc, or WideSum for the Gram ZᵀZ (kGram), whose float
// products are exact in double and whose sums over B cancel in FA.
template <typename Acc, bool kGram>
using GemmSum = std::conditional_t<kGram, WideSum, Acc>;

template <class Cfg, typename Acc, class AOp, class BOp, bool kGram = false>
__global__ void __launch_bounds__(Cfg::NT) small_gemm_kernel(const AOp a_op, const BOp b_op,
                                                             GemmSum<Acc, kGram>* out, int64_t ld,
                                                             int64_t split_stride, int64_t M, int64_t N, int64_t K,
                                                             int64_t k_per_split, const GramTail tail) {
  using Sum = GemmSum<Acc, kGram>;
  __shared__ Acc As[Cfg::BK * Cfg::A_LD];
  __shared__ Acc Bs[Cfg::BK * Cfg::B_LD];
  const int tx = static_cast<int>(threadIdx.x) % Cfg::NTX;
  const int ty = static_cast<int>(threadIdx.x) / Cfg::NTX;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * Cfg::BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * Cfg::BN;
  const int64_t split = blockIdx.z;
  const int64_t k_begin = split * k_per_split;
  const int64_t k_end = K < k_begin + k_per_split ? K : k_begin + k_per_split;

  Sum acc[Cfg::TM][Cfg::TN];
  WideSum wide[Cfg::TM][Cfg::TN];
#pragma unroll
  for (int i = 0; i < Cfg::TM; ++i) {
#pragma unroll
    for (int j = 0; j < Cfg::TN; ++j) acc[i][j] = Sum(0), wide[i][j] = 0.0;
  }
  for (int64_t k0 = k_begin; k0 < k_end; k0 += Cfg::BK) {
    // Stage 1: both operand tiles of this K step.
    load_operand_tile<Cfg::BM, Cfg::A_LD, Cfg::BK, Cfg::NT>(As, a_op, m0, M, k0, k_end);
    load_operand_tile<Cfg::BN, Cfg::B_LD, Cfg::BK, Cfg::NT>(Bs, b_op, n0, N, k0, k_end);
    __syncthreads();
    // Stage 2: register-tiled FMAs (float into float: folded into WideSum per step; the Gram: in WideSum).
    register_tile_multiply<Cfg::TM, Cfg::TN, Cfg::BK, Cfg::NTX, Cfg::NTY, Cfg::A_LD, Cfg::B_LD>(acc, As, Bs, tx, ty);
    KFold<Sum>::step(acc, wide);
    __syncthreads();
  }
  KFold<Sum>::finish(wide, acc);
  // Stage 3: this split's tile.
  Sum* slot = out + split * split_stride;
#pragma unroll
  for (int i = 0; i < Cfg::TM; ++i) {
    const int64_t m = m0 + ty + i * Cfg::NTY;
    if (m >= M) continue;
#pragma unroll
    for (int j = 0; j < Cfg::TN; ++j) {
      const int64_t n = n0 + tx + j * Cfg::NTX;
      if (n < N) slot[m * ld + n] = acc[i][j];
    }
  }
  if constexpr (kGram) {
    // Stage 4 (the Gram): G = Σ_splits partials for this tile, its FA partial.
    __shared__ WideSum scratch[kWarpSize];
    const int64_t tile = static_cast<int64_t>(blockIdx.x) * gridDim.y + blockIdx.y;
    if (gridDim.z > 1) {
      if (!last_to_arrive(tail.counters + tile, gridDim.z)) return;
    } else {
      __syncthreads();  // the tile this block's threads just wrote
    }
    WideSum local = 0.0;
    for (int e = static_cast<int>(threadIdx.x); e < Cfg::BM * Cfg::BN; e += Cfg::NT) {
      const int64_t m = m0 + e / Cfg::BN, n = n0 + e % Cfg::BN;
      if (m >= M || n >= N) continue;
      WideSum g = __ldcg(out + m * ld + n);
      for (int64_t s = 1; s < static_cast<int64_t>(gridDim.z); ++s) g += __ldcg(out + s * split_stride + m * ld + n);
      out[m * ld + n] = g;
      local += (m < tail.C) == (n < tail.C) ? g * g : -(g * g);
    }
    const WideSum total = block_sum(local, scratch);
    if (threadIdx.x == 0) tail.fa_parts[tile] = total;
  }
}

template <class Cfg, typename Acc, class AOp, class BOp, bool kGram = false>
cudaError_t launch_small_gemm(const AOp& a_op, const BOp& b_op, GemmSum<Acc, kGram>* out, int64_t ld,
                              int64_t split_stride, int64_t M, int64_t N, int64_t K, int64_t k_per_split,
                              int64_t splits, cudaStream_t stream, const GramTail& tail = GramTail{}) {
  const int64_t tiles_m = ceil_div(M, Cfg::BM);
  const int64_t tiles_n = ceil_div(N, Cfg::BN);
  if (tiles_m == 0 || tiles_n == 0 || splits == 0) return cudaSuccess;  // empty output
  if (tiles_m > kMaxGridX || tiles_n > kMaxGridYZ || splits > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(tiles_m), static_cast<unsigned>(tiles_n), static_cast<unsigned>(splits));
  small_gemm_kernel<Cfg, Acc, AOp, BOp, kGram><<<grid, Cfg::NT, 0, stream>>>(a_op, b_op, out, ld, split_stride, M,
                                                                             N, K, k_per_split, tail);
  SVP_CUDA_CHECK_LAUNCH();
  return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------------------
// Stage 2, batch space (flash-style). Block (row tile I, split s) walks the column tiles J of its split:
//   Δ_IJ = Z_I diag(s) Z_Jᵀ              (32×32, K = C + C', in registers, then shared memory)
//   FA_partial += Σ Δ_IJ²
//   P[s][I, :] += Δ_IJ Z_J[:, :C]       (accumulated in the block's own rows of P: one writer, no race)
// Δ never leaves the SM; P is (splits, B, C).
constexpr int kBatchTile = 32;  // rows and columns of a Δ tile; 256 threads hold 2×2 of it each
constexpr int kBatchK = 32;     // K step over the C + C' features
constexpr int kBatchClasses = 64;  // classes per step of the P update; 256 threads hold 8 rows × 1 class

template <typename Acc>
__global__ void __launch_bounds__(kThreads) batch_alignment_kernel(const Acc* __restrict__ Z, int64_t B, int64_t C,
                                                                   int64_t Ctot, int64_t tiles_per_split,
                                                                   Acc* __restrict__ P, Acc* __restrict__ fa_parts) {
  __shared__ Acc Zi[kBatchK * (kBatchTile + 1)];             // [k][row of I]
  __shared__ Acc Zj[kBatchK * (kBatchTile + 1)];             // [k][row of J], times s_k
  __shared__ Acc Delta[kBatchTile * (kBatchTile + 1)];       // [row of I][row of J]
  __shared__ Acc Aj[kBatchTile * kBatchClasses];             // [row of J][class]
  __shared__ Acc scratch[kWarpSize];
  constexpr int kLd = kBatchTile + 1;

  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % 16;  // Δ tile: columns tx, tx + 16
  const int ty = tid / 16;  //         rows    ty, ty + 16
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kBatchTile;
  const int64_t split = blockIdx.y;
  const int64_t tiles = (B + kBatchTile - 1) / kBatchTile;
  const int64_t jt_begin = split * tiles_per_split;
  const int64_t jt_end = tiles < jt_begin + tiles_per_split ? tiles : jt_begin + tiles_per_split;
  Acc* P_split = P + split * B * C;
  Acc fa_local = Acc(0);

  for (int64_t jt = jt_begin; jt < jt_end; ++jt) {
    const int64_t j0 = jt * kBatchTile;

    // Stage A: Δ_IJ = Σ_k Z[i, k] s_k Z[j, k], K-stepped through shared memory (zero-filled outside B).
    Acc delta[2][2] = {{Acc(0), Acc(0)}, {Acc(0), Acc(0)}};
    WideSum wide_delta[2][2] = {{0.0, 0.0}, {0.0, 0.0}};
    for (int64_t k0 = 0; k0 < Ctot; k0 += kBatchK) {
#pragma unroll
      for (int it = 0; it < kBatchK * kBatchTile / kThreads; ++it) {
        const int e = tid + it * kThreads;
        const int k = e % kBatchK;  // consecutive threads along a row of Z: coalesced
        const int r = e / kBatchK;
        const int64_t kk = k0 + k;
        const bool k_ok = kk < Ctot;
        Zi[k * kLd + r] = (k_ok && i0 + r < B) ? Z[(i0 + r) * Ctot + kk] : Acc(0);
        const Acc zj = (k_ok && j0 + r < B) ? Z[(j0 + r) * Ctot + kk] : Acc(0);
        Zj[k * kLd + r] = kk < C ? zj : -zj;
      }
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kBatchK; ++k) {
        const Acc a0 = Zi[k * kLd + ty], a1 = Zi[k * kLd + ty + 16];
        const Acc b0 = Zj[k * kLd + tx], b1 = Zj[k * kLd + tx + 16];
        delta[0][0] += a0 * b0;
        delta[0][1] += a0 * b1;
        delta[1][0] += a1 * b0;
        delta[1][1] += a1 * b1;
      }
      KFold<Acc>::step(delta, wide_delta);
      __syncthreads();
    }
    KFold<Acc>::finish(wide_delta, delta);

    // Stage B: FA partial and Δ into shared memory (rows/columns outside B are exactly zero).
#pragma unroll
    for (int a = 0; a < 2; ++a) {
#pragma unroll
      for (int b = 0; b < 2; ++b) {
        fa_local += delta[a][b] * delta[a][b];
        Delta[(ty + 16 * a) * kLd + tx + 16 * b] = delta[a][b];
      }
    }
    __syncthreads();

    // Stage C: P[I, c] += Σ_j Δ[i, j] â_j[c], 64 classes at a time. Thread owns class `col` of rows
    // row_group + 4q; Δ reads are warp broadcasts, Aj reads consecutive.
    const int col = tid % kBatchClasses;
    const int row_group = tid / kBatchClasses;
    for (int64_t c0 = 0; c0 < C; c0 += kBatchClasses) {
#pragma unroll
      for (int it = 0; it < kBatchTile * kBatchClasses / kThreads; ++it) {
        const int e = tid + it * kThreads;
        const int cc = e % kBatchClasses;
        const int jj = e / kBatchClasses;
        Aj[jj * kBatchClasses + cc] =
            (j0 + jj < B && c0 + cc < C) ? Z[(j0 + jj) * Ctot + c0 + cc] : Acc(0);
      }
      __syncthreads();
#pragma unroll
      for (int q = 0; q < kBatchTile / 4; ++q) {
        const int r = row_group + 4 * q;
        Acc sum = Acc(0);
#pragma unroll
        for (int jj = 0; jj < kBatchTile; ++jj) sum += Delta[r * kLd + jj] * Aj[jj * kBatchClasses + col];
        const int64_t row = i0 + r;
        const int64_t c = c0 + col;
        if (row < B && c < C) {
          Acc* slot = P_split + row * C + c;
          *slot = jt == jt_begin ? sum : *slot + sum;  // this thread is the element's only writer
        }
      }
      __syncthreads();  // Aj is rewritten next step, Delta next column tile
    }
  }

  const Acc total = block_sum(fa_local, scratch);
  if (tid == 0) fa_parts[static_cast<int64_t>(blockIdx.x) * gridDim.y + split] = total;
}

// ---------------------------------------------------------------------------------------------------------
// Stage 4: the scalars, each a fixed-order block reduction (one block of kThreads threads).
template <typename Acc>
struct FinalizeArgs {
  const Acc* ce_rows;   // (B,) or nullptr
  int64_t B;
  const Acc* fa_parts;  // (fa_count,) or nullptr: batch space
  const WideSum* wide_fa_parts;  // (fa_count,) or nullptr: feature space (the Gram's tail), summed in WideSum
  int64_t fa_count;
  bool per_row;         // fa_parts are the B rows' Bhattacharyya distances: the mean divides by B, not B²
  bool mean;
  Acc weight;
  Acc* loss;
  Acc* ce;
  Acc* alignment;
};

template <typename Acc>
__device__ __forceinline__ void finalize_block(const FinalizeArgs<Acc>& F) {
  __shared__ Acc scratch[kWarpSize];
  Acc ce_sum = Acc(0);
  if (F.ce_rows != nullptr) {
    for (int64_t b = threadIdx.x; b < F.B; b += blockDim.x) ce_sum += F.ce_rows[b];
  }
  ce_sum = block_sum(ce_sum, scratch);
  Acc fa_sum = Acc(0);
  if (F.fa_parts != nullptr) {
    for (int64_t e = threadIdx.x; e < F.fa_count; e += blockDim.x) fa_sum += F.fa_parts[e];
  }
  fa_sum = block_sum(fa_sum, scratch);
  // Feature space: the FA partials are WideSum (for double data the same arithmetic as the Acc sum above).
  __shared__ WideSum wide_scratch[kWarpSize];
  WideSum wide_fa_sum = 0.0;
  if (F.wide_fa_parts != nullptr) {
    for (int64_t e = threadIdx.x; e < F.fa_count; e += blockDim.x) wide_fa_sum += F.wide_fa_parts[e];
    wide_fa_sum = block_sum(wide_fa_sum, wide_scratch);
  }
  if (threadIdx.x == 0) {
    const Acc ce_value = F.ce_rows != nullptr ? ce_sum / static_cast<Acc>(F.B) : Acc(0);
    const WideSum wide_fa_value =
        F.mean ? wide_fa_sum / (static_cast<WideSum>(F.B) * static_cast<WideSum>(F.B)) : wide_fa_sum;
    const Acc fa_value = F.wide_fa_parts != nullptr ? static_cast<Acc>(wide_fa_value)
                         : !F.mean                  ? fa_sum
                         : F.per_row                ? fa_sum / static_cast<Acc>(F.B)
                                                    : fa_sum / (static_cast<Acc>(F.B) * static_cast<Acc>(F.B));
    *F.ce = ce_value;
    *F.alignment = fa_value;
    *F.loss = ce_value + F.weight * fa_value;
  }
}

template <typename Acc>
__global__ void __launch_bounds__(kThreads) finalize_kernel(const FinalizeArgs<Acc> F) {
  finalize_block(F);
}

// ---------------------------------------------------------------------------------------------------------
// Stage 3: g_v[b] += λ · J_normᵀ (grad_scale · Σ_s P[s][b]),  J_normᵀ g = (g − â(â·g)) / ‖u‖ (or g / ε),
// minus its row mean when `center`.
//
// Feature space (gram != nullptr) computes its row of P here first: P[b][c] = Σ_k Z[b, k] s_k G[k, c] in
// WideSum (G is WideSum; â(âᵀâ) and b̂(b̂ᵀâ) cancel as FA does), rounded once; each lane writes and reads back
// only its own classes.
template <typename Acc>
__device__ __forceinline__ Acc signed_gram_row_product(const Acc* __restrict__ z_row,
                                                       const WideSum* __restrict__ gram, int64_t Ctot, int64_t C,
                                                       int64_t c) {
  WideSum sum = 0.0;
  for (int64_t k = 0; k < Ctot; ++k) {
    const WideSum g = gram[k * Ctot + c];
    sum += static_cast<WideSum>(z_row[k]) * (k < C ? g : -g);
  }
  return static_cast<Acc>(sum);
}

template <typename Acc>
__global__ void __launch_bounds__(kThreads) alignment_grad_kernel(Acc* __restrict__ P, int64_t splits,
                                                                  const WideSum* __restrict__ gram,
                                                                  const Acc* __restrict__ Z, int64_t z_ld,
                                                                  const Acc* __restrict__ norms,
                                                                  Acc* __restrict__ g_v, int64_t B, int64_t C,
                                                                  Acc grad_scale, Acc weight, bool center,
                                                                  const FinalizeArgs<Acc> finalize) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kRowsPerBlock;
  const int64_t plane = B * C;
  // Stage 4 here, in block 0, first: ce_rows and the FA partials come from earlier launches (and nothing of
  // the row loop below is live yet, which keeps the double kernel from spilling).
  if (blockIdx.x == 0) finalize_block(finalize);
  for (int64_t b = warp; b < B; b += warps) {
    const Acc* a_hat = Z + b * z_ld;
    Acc* p_row = P + b * C;
    if (gram != nullptr) {
      for (int64_t c = lane; c < C; c += kWarpSize) p_row[c] = signed_gram_row_product(a_hat, gram, z_ld, C, c);
    }
    // dL/dâ_b[c] = grad_scale · Σ_s P[s][b][c] (split order fixed).
    auto grad_a_hat = [&](int64_t c) {
      Acc sum = p_row[c];
      for (int64_t s = 1; s < splits; ++s) sum += p_row[s * plane + c];
      return grad_scale * sum;
    };
    // â·g, each element through the normalisation and their row mean in WideSum, as in normalize_row_warp.
    WideSum projection = 0.0;
    for (int64_t c = lane; c < C; c += kWarpSize) {
      projection += static_cast<WideSum>(a_hat[c]) * static_cast<WideSum>(grad_a_hat(c));
    }
    projection = warp_sum(projection);
    const Acc norm = norms[b];
    const bool regular = norm > static_cast<Acc>(kNormEps);
    const WideSum wide_norm = norm, inverse = 1.0 / wide_norm;
    // double data divide (as they always did); float data multiply by the reciprocal (svp::divided).
    auto grad_v_row = [&](int64_t c) -> WideSum {
      const WideSum g = grad_a_hat(c);
      if (!regular) return g / kNormEps;
      const WideSum through = g - static_cast<WideSum>(a_hat[c]) * projection;
      return kDividesByNorm<Acc> ? through / wide_norm : through * inverse;
    };
    WideSum mean = 0.0;
    if (center && C > 0) {
      WideSum sum = 0.0;
      for (int64_t c = lane; c < C; c += kWarpSize) sum += grad_v_row(c);
      mean = warp_sum(sum) / static_cast<WideSum>(C);
    }
    for (int64_t c = lane; c < C; c += kWarpSize) g_v[b * C + c] += weight * static_cast<Acc>(grad_v_row(c) - mean);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Host side: the plan (shared by the workspace query and the launch) and the workspace layout.

struct EpiloguePlan {
  bool has_target = false;
  bool alignment = false;      // v_prev given, cosine-Gram term
  bool bhattacharyya = false;  // v_prev given, Bhattacharyya term (in the row kernel: no Z, no Gram)
  bool feature_space = false;
  int64_t Ctot = 0;            // C + C'
  int64_t gram_splits = 1;     // feature: split of K = B for ZᵀZ
  int64_t gram_rows_per_split = 0;
  int64_t gram_tiles = 0;      // feature: output tiles of ZᵀZ (one FA partial and one arrival counter each)
  int64_t batch_tiles = 0;     // batch: ceil(B / 32)
  int64_t batch_splits = 1;    // batch: column-tile splits (grid.y)
  int64_t batch_tiles_per_split = 1;
  int64_t p_splits = 1;        // slots of P
  int64_t fa_count = 0;        // FA partials
  int64_t row_blocks = 1;
};

EpiloguePlan plan_epilogue(int64_t B, int64_t C, int64_t Cp, bool has_target, bool has_v_prev, int sms,
                           const LaunchPlan& launch_plan, Alignment alignment) {
  EpiloguePlan plan;
  plan.has_target = has_target;
  plan.bhattacharyya = has_v_prev && alignment == Alignment::kBhattacharyya;
  plan.alignment = has_v_prev && !plan.bhattacharyya;
  plan.row_blocks = max64(1, min64(ceil_div(B, kRowsPerBlock), 16 * static_cast<int64_t>(sms)));
  if (!plan.alignment) return plan;
  const int64_t target_blocks = 4 * static_cast<int64_t>(sms);
  plan.Ctot = C + Cp;
  // Cost of the two forms: B·(C+C')² (feature) vs B²·(C+C') (batch), i.e. feature iff C + C' < B.
  plan.feature_space = plan.Ctot < B;
  if (launch_plan.epilogue_feature >= 0) plan.feature_space = launch_plan.epilogue_feature > 0;
  if (plan.feature_space) {
    // ZᵀZ has few output tiles and a long K = B: split K so that ~4 blocks per SM run, each at least 256
    // rows deep; the last split block of each tile sums the partial Grams in split order.
    const int64_t tiles = ceil_div(plan.Ctot, GramTile::BM) * ceil_div(plan.Ctot, GramTile::BN);
    int64_t splits = max64(1, min64(ceil_div(target_blocks, tiles), ceil_div(B, 256)));
    if (launch_plan.gram_splits > 0) splits = launch_plan.gram_splits;
    plan.gram_rows_per_split = round_up(ceil_div(B, splits), GramTile::BK);
    plan.gram_splits = min64(ceil_div(B, plan.gram_rows_per_split), kMaxGridYZ);
    plan.gram_rows_per_split = max64(plan.gram_rows_per_split, round_up(ceil_div(B, plan.gram_splits), GramTile::BK));
    plan.gram_tiles = tiles;
    plan.p_splits = 1;
    plan.fa_count = tiles;
  } else {
    // Row tiles give B/32 blocks; split the column tiles (at most 16 ways, each split one slot of P) until
    // ~4 blocks per SM run.
    plan.batch_tiles = ceil_div(B, kBatchTile);
    int64_t splits =
        max64(1, min64(min64(ceil_div(target_blocks, plan.batch_tiles), plan.batch_tiles), int64_t(16)));
    if (launch_plan.batch_splits > 0) splits = min64(launch_plan.batch_splits, plan.batch_tiles);
    plan.batch_tiles_per_split = ceil_div(plan.batch_tiles, splits);
    plan.batch_splits = ceil_div(plan.batch_tiles, plan.batch_tiles_per_split);
    plan.p_splits = plan.batch_splits;
    plan.fa_count = plan.batch_tiles * plan.batch_splits;
  }
  return plan;
}

template <typename Acc>
struct EpilogueWorkspace {
  Acc* ce_rows = nullptr;      // (B,)
  Acc* distances = nullptr;    // (B,): the rows' Bhattacharyya distances
  Acc* Z = nullptr;            // (B, Ctot)
  Acc* norms = nullptr;        // (B,)
  WideSum* gram = nullptr;     // (gram_splits, Ctot, Ctot)
  Acc* P = nullptr;            // (p_splits, B, C)
  Acc* fa_parts = nullptr;     // batch space: (fa_count,)
  WideSum* wide_fa_parts = nullptr;  // feature space: (fa_count,)
  unsigned* counters = nullptr;  // (gram_tiles,): arrivals of the Gram's split blocks per output tile
  size_t bytes = 0;
};

template <typename Acc>
EpilogueWorkspace<Acc> carve_epilogue(void* base, const EpiloguePlan& plan, int64_t B, int64_t C) {
  WorkspaceCarver carver(base);
  EpilogueWorkspace<Acc> w;
  if (plan.has_target) w.ce_rows = carver.take<Acc>(B);
  if (plan.bhattacharyya) w.distances = carver.take<Acc>(B);
  if (plan.alignment) {
    w.Z = carver.take<Acc>(B * plan.Ctot);
    w.norms = carver.take<Acc>(B);
    if (plan.feature_space) w.gram = carver.take<WideSum>(plan.gram_splits * plan.Ctot * plan.Ctot);
    w.P = carver.take<Acc>(plan.p_splits * B * C);
    if (plan.feature_space) {
      w.wide_fa_parts = carver.take<WideSum>(plan.fa_count);
    } else {
      w.fa_parts = carver.take<Acc>(plan.fa_count);
    }
    if (plan.feature_space) w.counters = carver.take<unsigned>(plan.gram_tiles);
  }
  w.bytes = carver.bytes();
  return w;
}

template <typename T>
cudaError_t epilogue_typed(const EpiloguePlan& plan, const void* v, const int64_t* target, const void* v_prev,
                           void* loss, void* ce, void* alignment, void* g_v, int64_t B, int64_t C, int64_t Cp,
                           double alignment_weight, bool mean, bool center, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  const EpilogueWorkspace<Acc> w = carve_epilogue<Acc>(workspace, plan, B, C);
  if (workspace_bytes < w.bytes || (w.bytes > 0 && workspace == nullptr)) return cudaErrorInvalidValue;
  Acc* grad = static_cast<Acc*>(g_v);

  // Stage 1: CE rows, g_v = CE gradient (or zeros), Z = [â | b̂], norms.
  RowParams<T, Acc> rows;
  rows.v = static_cast<const T*>(v);
  rows.target = target;
  rows.v_prev = plan.alignment || plan.bhattacharyya ? static_cast<const T*>(v_prev) : nullptr;
  rows.B = B;
  rows.C = C;
  rows.Cp = Cp;
  rows.center = center;
  rows.g_v = grad;
  rows.ce_rows = target != nullptr ? w.ce_rows : nullptr;
  rows.Z = w.Z;
  rows.z_ld = plan.Ctot;
  rows.norms = w.norms;
  rows.counters = w.counters;
  rows.counter_count = w.counters != nullptr ? plan.gram_tiles : 0;
  rows.bd_coef = alignment_weight * 0.5 / (mean ? static_cast<WideSum>(B) : 1.0);
  rows.distances = w.distances;
  if (plan.bhattacharyya) {
    rows_kernel<T, Acc, true><<<static_cast<unsigned>(plan.row_blocks), kThreads, 0, stream>>>(rows);
  } else {
    rows_kernel<T, Acc, false><<<static_cast<unsigned>(plan.row_blocks), kThreads, 0, stream>>>(rows);
  }
  SVP_CUDA_CHECK_LAUNCH();

  const Acc weight = static_cast<Acc>(alignment_weight);
  FinalizeArgs<Acc> finalize;
  finalize.ce_rows = rows.ce_rows;
  finalize.B = B;
  finalize.fa_parts = plan.bhattacharyya ? w.distances : w.fa_parts;
  finalize.wide_fa_parts = w.wide_fa_parts;
  finalize.fa_count = plan.alignment ? plan.fa_count : plan.bhattacharyya ? B : 0;
  finalize.per_row = plan.bhattacharyya;
  finalize.mean = mean;
  finalize.weight = weight;
  finalize.loss = static_cast<Acc*>(loss);
  finalize.ce = static_cast<Acc*>(ce);
  finalize.alignment = static_cast<Acc*>(alignment);
  if (plan.alignment) {
    const int64_t Ctot = plan.Ctot;
    if (plan.feature_space) {
      // Stage 2a: partial Grams ZᵀZ over row splits of Z: A(m, k) = Z[k, m], B(k, n) = Z[k, n].
      // The last split block of each tile: G = Σ partials (slot 0) and the tile's FA partial.
      const Operand<Acc, false> z_columns{w.Z, 1, Ctot, kNoNegation};
      GramTail tail;
      tail.counters = w.counters;
      tail.fa_parts = w.wide_fa_parts;
      tail.C = C;
      SVP_CUDA_TRY((launch_small_gemm<GramTile, Acc, Operand<Acc, false>, Operand<Acc, false>, true>(
          z_columns, z_columns, w.gram, Ctot, Ctot * Ctot, Ctot, Ctot, B, plan.gram_rows_per_split, plan.gram_splits,
          stream, tail)));
      // P = Z diag(s) G[:, :C] row by row in alignment_grad_kernel (stage 3).
    } else {
      // Stage 2: flash-style batch-space tiles.
      if (plan.batch_tiles > kMaxGridX || plan.batch_splits > kMaxGridYZ) return cudaErrorInvalidConfiguration;
      const dim3 grid(static_cast<unsigned>(plan.batch_tiles), static_cast<unsigned>(plan.batch_splits), 1);
      batch_alignment_kernel<Acc><<<grid, kThreads, 0, stream>>>(w.Z, B, C, Ctot, plan.batch_tiles_per_split, w.P,
                                                                   w.fa_parts);
      SVP_CUDA_CHECK_LAUNCH();
    }
    // Stage 3: through the row normalisation into g_v.
    const Acc grad_scale = mean ? static_cast<Acc>(4.0 / (static_cast<double>(B) * static_cast<double>(B)))
                                : static_cast<Acc>(4);
    alignment_grad_kernel<Acc><<<static_cast<unsigned>(plan.row_blocks), kThreads, 0, stream>>>(
        w.P, plan.p_splits, plan.feature_space ? w.gram : nullptr, w.Z, Ctot, w.norms, grad, B, C, grad_scale,
        weight, center, finalize);
    SVP_CUDA_CHECK_LAUNCH();
    return cudaSuccess;  // Stage 4 runs in alignment_grad_kernel's block 0
  }

  // Stage 4: ce, alignment, loss.
  finalize_kernel<Acc><<<1, kThreads, 0, stream>>>(finalize);
  SVP_CUDA_CHECK_LAUNCH();
  return cudaSuccess;
}

template <typename T>
cudaError_t cosine_gram_typed(const void* v, void* S, int64_t B, int64_t C, bool center, void* workspace,
                              size_t workspace_bytes, int sms, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  WorkspaceCarver carver(workspace);
  Acc* Z = carver.take<Acc>(B * C);
  if (workspace_bytes < carver.bytes() || (carver.bytes() > 0 && workspace == nullptr)) return cudaErrorInvalidValue;

  // Stage 1: â into Z.
  RowParams<T, Acc> rows;
  rows.v = static_cast<const T*>(v);
  rows.target = nullptr;
  rows.v_prev = nullptr;
  rows.B = B;
  rows.C = C;
  rows.Cp = 0;
  rows.center = center;
  rows.g_v = nullptr;
  rows.ce_rows = nullptr;
  rows.Z = Z;
  rows.z_ld = C;
  rows.norms = nullptr;
  rows.counters = nullptr;
  rows.counter_count = 0;
  rows.bd_coef = 0.0;
  rows.distances = nullptr;
  const int64_t row_blocks = max64(1, min64(ceil_div(B, kRowsPerBlock), 16 * static_cast<int64_t>(sms)));
  rows_kernel<T, Acc, false><<<static_cast<unsigned>(row_blocks), kThreads, 0, stream>>>(rows);
  SVP_CUDA_CHECK_LAUNCH();

  // Stage 2: S = Z Zᵀ: A(m, k) = Z[m, k], B(k, n) = Z[n, k].
  const Operand<Acc, true> z_rows{Z, C, 1, kNoNegation};
  return launch_small_gemm<CosineTile, Acc>(z_rows, z_rows, static_cast<Acc*>(S), B, 0, B, B, C, max64(C, 1), 1,
                                            stream);
}

bool valid_dtype(DType dtype) {
  return dtype == DType::kFloat32 || dtype == DType::kFloat64 || dtype == DType::kBFloat16 ||
         dtype == DType::kFloat16;
}

// A known alignment; the Bhattacharyya term compares rows of v and v_prev over the same C classes.
bool valid_alignment(Alignment alignment, bool has_v_prev, int64_t C, int64_t Cp) {
  if (alignment == Alignment::kCosineGram) return true;
  return alignment == Alignment::kBhattacharyya && (!has_v_prev || Cp == C);
}

size_t cosine_gram_bytes(int64_t B, int64_t C, DType dtype) {
  WorkspaceCarver carver(nullptr);
  if (dtype == DType::kFloat64) {
    carver.take<double>(B * C);
  } else {
    carver.take<float>(B * C);
  }
  return carver.bytes();
}

}  // namespace
}  // namespace detail

// ---------------------------------------------------------------------------------------------------------
// Public launchers (svp_cuda.h).

cudaError_t loss_epilogue_workspace_bytes(int64_t B, int64_t C, int64_t Cp, bool has_v_prev, DType dtype,
                                          size_t* bytes, const LaunchPlan& launch_plan, Alignment alignment) {
  using namespace detail;
  if (bytes == nullptr || !valid_dtype(dtype) || B < 1 || C < 0 || (has_v_prev && Cp < 0) ||
      !valid_alignment(alignment, has_v_prev, C, Cp)) {
    return cudaErrorInvalidValue;
  }
  int sms = 1;
  SVP_CUDA_TRY(current_sm_count(&sms));
  // The target never changes the size beyond the (B,) CE rows: size for the larger case.
  const EpiloguePlan plan = plan_epilogue(B, C, has_v_prev ? Cp : 0, true, has_v_prev, sms, launch_plan, alignment);
  *bytes = dtype == DType::kFloat64 ? carve_epilogue<double>(nullptr, plan, B, C).bytes
                                    : carve_epilogue<float>(nullptr, plan, B, C).bytes;
  return cudaSuccess;
}

cudaError_t loss_epilogue(const void* v, const int64_t* target, const void* v_prev, void* loss, void* ce,
                          void* alignment, void* g_v, int64_t B, int64_t C, int64_t Cp, double alignment_weight,
                          bool mean, bool center, DType dtype, void* workspace, size_t workspace_bytes,
                          const LaunchPlan& launch_plan, cudaStream_t stream, Alignment alignment_kind) {
  using namespace detail;
  const bool has_v_prev = v_prev != nullptr;
  if (!valid_dtype(dtype) || B < 1 || C < 0 || (has_v_prev && Cp < 0) ||
      !valid_alignment(alignment_kind, has_v_prev, C, Cp) ||
      (alignment_kind == Alignment::kBhattacharyya && center)) {
    return cudaErrorInvalidValue;
  }
  if (v == nullptr || loss == nullptr || ce == nullptr || alignment == nullptr || g_v == nullptr) {
    return cudaErrorInvalidValue;
  }
  int sms = 1;
  SVP_CUDA_TRY(current_sm_count(&sms));
  // Plan with has_target = true so the layout matches loss_epilogue_workspace_bytes; without a target the
  // CE rows are simply not used.
  EpiloguePlan plan = plan_epilogue(B, C, has_v_prev ? Cp : 0, true, has_v_prev, sms, launch_plan, alignment_kind);
  switch (dtype) {
    case DType::kFloat32:
      return epilogue_typed<float>(plan, v, target, v_prev, loss, ce, alignment, g_v, B, C, Cp, alignment_weight,
                                   mean, center, workspace, workspace_bytes, stream);
    case DType::kFloat64:
      return epilogue_typed<double>(plan, v, target, v_prev, loss, ce, alignment, g_v, B, C, Cp, alignment_weight,
                                    mean, center, workspace, workspace_bytes, stream);
    case DType::kBFloat16:
      return epilogue_typed<__nv_bfloat16>(plan, v, target, v_prev, loss, ce, alignment, g_v, B, C, Cp,
                                           alignment_weight, mean, center, workspace, workspace_bytes, stream);
    case DType::kFloat16:
      return epilogue_typed<__half>(plan, v, target, v_prev, loss, ce, alignment, g_v, B, C, Cp, alignment_weight,
                                    mean, center, workspace, workspace_bytes, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t cosine_gram_workspace_bytes(int64_t B, int64_t C, DType dtype, size_t* bytes) {
  using namespace detail;
  if (bytes == nullptr || !valid_dtype(dtype) || B < 0 || C < 0) return cudaErrorInvalidValue;
  *bytes = cosine_gram_bytes(B, C, dtype);
  return cudaSuccess;
}

cudaError_t cosine_gram(const void* v, void* S, int64_t B, int64_t C, bool center, DType dtype, void* workspace,
                        size_t workspace_bytes, cudaStream_t stream) {
  using namespace detail;
  if (!valid_dtype(dtype) || B < 0 || C < 0) return cudaErrorInvalidValue;
  if (B == 0) return cudaSuccess;
  if (v == nullptr || S == nullptr) return cudaErrorInvalidValue;
  int sms = 1;
  SVP_CUDA_TRY(current_sm_count(&sms));
  switch (dtype) {
    case DType::kFloat32:
      return cosine_gram_typed<float>(v, S, B, C, center, workspace, workspace_bytes, sms, stream);
    case DType::kFloat64:
      return cosine_gram_typed<double>(v, S, B, C, center, workspace, workspace_bytes, sms, stream);
    case DType::kBFloat16:
      return cosine_gram_typed<__nv_bfloat16>(v, S, B, C, center, workspace, workspace_bytes, sms, stream);
    case DType::kFloat16:
      return cosine_gram_typed<__half>(v, S, B, C, center, workspace, workspace_bytes, sms, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace svp_cuda

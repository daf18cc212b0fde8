// Small device helpers shared by the svp_kernels CUDA kernels: dtype conversions, deterministic warp/block
// reductions, launch/error plumbing, the current device's SM count. No torch header.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <cstdint>

#include "svp_cuda.h"

// Return the error of a CUDA runtime call (or of the launch just made) to the caller.
#define SVP_CUDA_TRY(expr)                       \
  do {                                           \
    const cudaError_t svp_status_ = (expr);      \
    if (svp_status_ != cudaSuccess) return svp_status_; \
  } while (0)

#define SVP_CUDA_CHECK_LAUNCH() SVP_CUDA_TRY(cudaGetLastError())

namespace svp_cuda {
namespace detail {

constexpr unsigned kFullWarp = 0xffffffffu;
constexpr int kWarpSize = 32;

// ε of â_b = v_b / max(‖v_b‖, ε) (docs/design.md §2).
constexpr double kNormEps = 1e-12;

// Accumulation type of an element type: double for double, float for everything else.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// ---- conversions (round to nearest even, as torch's .to()) -------------------------------------------
template <typename To>
__device__ __forceinline__ To convert(float x);
template <typename To>
__device__ __forceinline__ To convert(double x);

template <>
__device__ __forceinline__ float convert<float>(float x) { return x; }
template <>
__device__ __forceinline__ double convert<double>(float x) { return static_cast<double>(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 convert<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half convert<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ double convert<double>(double x) { return x; }
template <>
__device__ __forceinline__ float convert<float>(double x) { return static_cast<float>(x); }

// Element -> accumulation type.
template <typename Acc>
__device__ __forceinline__ Acc to_acc(float x) { return static_cast<Acc>(x); }
template <typename Acc>
__device__ __forceinline__ Acc to_acc(double x) { return static_cast<Acc>(x); }
template <typename Acc>
__device__ __forceinline__ Acc to_acc(__nv_bfloat16 x) { return static_cast<Acc>(__bfloat162float(x)); }
template <typename Acc>
__device__ __forceinline__ Acc to_acc(__half x) { return static_cast<Acc>(__half2float(x)); }

// Element i of the 16 bytes `raw` (little-endian, as loaded by one uint4 load) in the accumulation type.
// Bit arithmetic on the four words, so the vector stays in registers (no local-memory round trip).
template <typename T, typename Acc>
struct Unpack16;
template <typename Acc>
struct Unpack16<float, Acc> {
  static constexpr int kCount = 4;
  __device__ __forceinline__ static Acc get(const uint32_t (&w)[4], int i) {
    return static_cast<Acc>(__uint_as_float(w[i]));
  }
};
template <typename Acc>
struct Unpack16<double, Acc> {
  static constexpr int kCount = 2;
  __device__ __forceinline__ static Acc get(const uint32_t (&w)[4], int i) {
    return static_cast<Acc>(__hiloint2double(static_cast<int>(w[2 * i + 1]), static_cast<int>(w[2 * i])));
  }
};
template <typename Acc>
struct Unpack16<__nv_bfloat16, Acc> {
  static constexpr int kCount = 8;
  __device__ __forceinline__ static Acc get(const uint32_t (&w)[4], int i) {
    const uint32_t bits = (w[i / 2] >> (16 * (i % 2))) & 0xffffu;
    return static_cast<Acc>(__uint_as_float(bits << 16));  // bfloat16 -> float is exact: the high half
  }
};
template <typename Acc>
struct Unpack16<__half, Acc> {
  static constexpr int kCount = 8;
  __device__ __forceinline__ static Acc get(const uint32_t (&w)[4], int i) {
    const unsigned short bits = static_cast<unsigned short>((w[i / 2] >> (16 * (i % 2))) & 0xffffu);
    return static_cast<Acc>(__half2float(__ushort_as_half(bits)));
  }
};

// ---- math in the accumulation type -----------------------------------------------------------------
__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }
__device__ __forceinline__ float acc_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double acc_sqrt(double x) { return sqrt(x); }

// ---- deterministic reductions --------------------------------------------------------------------------
// Butterfly (xor) reductions: IEEE + and max are commutative, so every lane ends with the same bits and
// the order is fixed by the code, never by timing.
template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullWarp, x, offset);
  return x;
}

template <typename Acc>
__device__ __forceinline__ Acc warp_max(Acc x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) x = fmax(x, __shfl_xor_sync(kFullWarp, x, offset));
  return x;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `scratch` holds at least 32 Acc. Safe to call repeatedly: it synchronises before reusing scratch.
template <typename Acc>
__device__ Acc block_sum(Acc x, Acc* scratch) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  x = warp_sum(x);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  Acc total = lane < warps ? scratch[lane] : Acc(0);
  total = warp_sum(total);
  return total;
}

// ---- arrival counting ----------------------------------------------------------------------------------
// Whether this block is the last of `blocks` to arrive at `*counter` (every thread of the block gets the
// answer); the last one resets the counter to zero, so a counter that starts at zero ends at zero. Call once
// this block's results are written: a true answer means every block's writes are visible (read them past L1,
// which is not coherent: __ldcg). Which block is last varies from run to run; what it does must not depend on it.
__device__ __forceinline__ bool last_to_arrive(unsigned* counter, unsigned blocks) {
  __shared__ bool last;
  __threadfence();  // this block's writes, device-wide, before its arrival is counted
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atomicAdd(counter, 1u) + 1u == blocks;
    if (last) atomicExch(counter, 0u);
  }
  __syncthreads();
  if (last) __threadfence();
  return last;
}

// ---- register-tiled multiply ---------------------------------------------------------------------------
// acc[i][j] += Σ_kk A[kk][ty+i·NTY]·B[kk][tx+j·NTX] over kk < 8·k_eighths (the whole BK by default, in order);
// bank-conflict free: A reads broadcast, B reads consecutive. A K step whose last rows are zero padding
// (k_eighths < BK/8) skips them in whole groups of 8: the skipped terms would add 0·0. The operands are
// widened to the accumulator's type first (float tiles into double accumulators: exact products).
template <int TM, int TN, int BK, int NTX, int NTY, int A_LD, int B_LD, typename Acc, typename T>
__device__ __forceinline__ void register_tile_multiply(Acc (&acc)[TM][TN], const T* A, const T* B, int tx, int ty,
                                                       int k_eighths = BK / 8) {
  static_assert(BK % 8 == 0, "K steps are whole groups of 8");
#pragma unroll
  for (int k8 = 0; k8 < BK / 8; ++k8) {
    if (k8 >= k_eighths) break;
#pragma unroll
    for (int kk = 8 * k8; kk < 8 * k8 + 8; ++kk) {
      Acc a[TM];
      Acc b[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = static_cast<Acc>(A[kk * A_LD + ty + i * NTY]);
#pragma unroll
      for (int j = 0; j < TN; ++j) b[j] = static_cast<Acc>(B[kk * B_LD + tx + j * NTX]);
#pragma unroll
      for (int i = 0; i < TM; ++i) {
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] += a[i] * b[j];
      }
    }
  }
}

// ---- host helpers -------------------------------------------------------------------------------------
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// The current device and its number of SMs; the count is read from the runtime once per device and cached
// (bench/NOTES.md, "weak points" 3).
inline cudaError_t current_sm_count(int* sms) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices];  // 0 until read
  int device = 0;
  SVP_CUDA_TRY(cudaGetDevice(&device));
  const bool cacheable = device >= 0 && device < kMaxDevices;
  if (cacheable) {
    const int known = cached[device].load(std::memory_order_relaxed);
    if (known > 0) {
      *sms = known;
      return cudaSuccess;
    }
  }
  SVP_CUDA_TRY(cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device));
  if (*sms < 1) *sms = 1;
  if (cacheable) cached[device].store(*sms, std::memory_order_relaxed);
  return cudaSuccess;
}

// Lets kKernel launch with `bytes` of dynamic shared memory, which above 48 KB needs an opt-in (sm_80: up to
// 163 KB, sm_90: 227 KB). The attribute is set once per device: `bytes` is the same at every launch of a
// kernel (its tile's size), and the runtime call would otherwise cost every launch.
template <auto kKernel>
cudaError_t allow_shared_memory(size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  static std::atomic<uint64_t> raised{0};  // bit d: raised on device d
  int device = 0;
  SVP_CUDA_TRY(cudaGetDevice(&device));
  const uint64_t bit = device >= 0 && device < 64 ? uint64_t(1) << device : 0;
  if (bit != 0 && (raised.load(std::memory_order_acquire) & bit) != 0) return cudaSuccess;
  SVP_CUDA_TRY(cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  raised.fetch_or(bit, std::memory_order_acq_rel);
  return cudaSuccess;
}

inline bool aligned16(const void* pointer) { return (reinterpret_cast<uintptr_t>(pointer) & 15u) == 0; }

inline size_t acc_size(DType dtype) { return dtype == DType::kFloat64 ? sizeof(double) : sizeof(float); }

inline size_t element_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat64: return 8;
    case DType::kFloat32: return 4;
    default: return 2;
  }
}

// Bump allocator over the caller's workspace: 256-byte aligned slices, in a fixed order, so that a size
// query (base == nullptr) and a launch compute the same layout.
class WorkspaceCarver {
 public:
  explicit WorkspaceCarver(void* base) : base_(static_cast<unsigned char*>(base)) {}
  template <typename U>
  U* take(int64_t count) {
    const size_t start = offset_;
    offset_ += static_cast<size_t>(round_up(static_cast<int64_t>(count * sizeof(U)), 256));
    return base_ == nullptr ? nullptr : reinterpret_cast<U*>(base_ + start);
  }
  size_t bytes() const { return offset_; }

 private:
  unsigned char* base_;
  size_t offset_ = 0;
};

}  // namespace detail
}  // namespace svp_cuda

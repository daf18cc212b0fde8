// A tiny CUDA execution emulator for the svp_kernels kernels on the CPU (test tool, not a product).
//
// tools/emulate_cuda/run_emulation.py rewrites csrc/cuda/*.cu for a host compiler (kernel launches become
// svp_emu::launcher(...)(...), __shared__ becomes static, dynamic shared memory a buffer) and force-includes
// this header. Each thread of a block is a fiber (ucontext); the scheduler runs every fiber until it blocks
// at __syncthreads() or at a warp shuffle, and releases a barrier only when every live participant has
// arrived, so a missing barrier shows up as wrong results (fibers run whole phases one after another).
// Blocks run one at a time; dynamic shared memory is poisoned with NaN bytes before each block.
// Violations (shuffles with exited lanes, __syncthreads after some threads exited, deadlocks) abort.
#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>  // the global-namespace math overloads device code sees under nvcc
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace svp_emu {

enum class FiberState { kRunnable, kBlockBarrier, kWarpBarrier, kDone };

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  FiberState state = FiberState::kRunnable;
};

inline dim3 g_thread_idx, g_block_idx, g_block_dim, g_grid_dim;
inline ucontext_t g_scheduler;
inline std::vector<Fiber> g_fibers;
inline int g_current = 0;
inline std::function<void()> g_body;
inline std::vector<unsigned char> g_dynamic_shared;
inline unsigned char g_warp_exchange[32][32][16];
inline bool g_reverse_order = false;  // run fibers in reverse order (env SVP_EMU_REVERSE=1)
inline uint64_t g_blocks_run = 0;     // blocks run by all launches (read and reset by emu_take_blocks_run)
inline uint64_t g_launches_run = 0;   // kernel launches (read and reset by emu_take_launches_run)

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "svp_emu: %s (block %u,%u,%u thread %d)\n", what, g_block_idx.x, g_block_idx.y,
               g_block_idx.z, g_current);
  std::abort();
}

inline void fiber_entry() {
  g_body();
  g_fibers[g_current].state = FiberState::kDone;
  swapcontext(&g_fibers[g_current].context, &g_scheduler);
}

inline void block_until_released(FiberState state) {
  g_fibers[g_current].state = state;
  swapcontext(&g_fibers[g_current].context, &g_scheduler);
}

inline void set_thread_index(int t) {
  g_current = t;
  g_thread_idx.x = t % g_block_dim.x;
  g_thread_idx.y = (t / g_block_dim.x) % g_block_dim.y;
  g_thread_idx.z = t / (g_block_dim.x * g_block_dim.y);
}

inline void run_block(int threads) {
  constexpr size_t kStack = 256 * 1024;
  if (static_cast<int>(g_fibers.size()) < threads) g_fibers.resize(threads);
  for (int t = 0; t < threads; ++t) {
    Fiber& fiber = g_fibers[t];
    if (fiber.stack.size() < kStack) fiber.stack.resize(kStack);
    getcontext(&fiber.context);
    fiber.context.uc_stack.ss_sp = fiber.stack.data();
    fiber.context.uc_stack.ss_size = fiber.stack.size();
    fiber.context.uc_link = nullptr;
    makecontext(&fiber.context, fiber_entry, 0);
    fiber.state = FiberState::kRunnable;
  }
  std::memset(g_dynamic_shared.data(), 0xff, g_dynamic_shared.size());  // NaN for float and double
  const int warps = (threads + 31) / 32;
  for (;;) {
    for (int i = 0; i < threads; ++i) {
      const int t = g_reverse_order ? threads - 1 - i : i;
      if (g_fibers[t].state != FiberState::kRunnable) continue;
      set_thread_index(t);
      swapcontext(&g_scheduler, &g_fibers[t].context);
    }
    // Everyone is blocked or done. Release complete warp barriers first, then a complete block barrier.
    bool released = false, all_done = true, all_at_block = true;
    for (int w = 0; w < warps; ++w) {
      int waiting = 0, done = 0, lanes = 0;
      for (int t = w * 32; t < threads && t < (w + 1) * 32; ++t, ++lanes) {
        waiting += g_fibers[t].state == FiberState::kWarpBarrier;
        done += g_fibers[t].state == FiberState::kDone;
      }
      if (waiting > 0 && waiting + done == lanes) {
        if (done > 0) fail("warp shuffle with exited lanes");
        if (lanes != 32) fail("warp shuffle in a partial warp");
        for (int t = w * 32; t < (w + 1) * 32; ++t) g_fibers[t].state = FiberState::kRunnable;
        released = true;
      }
    }
    if (released) continue;
    int at_block = 0, done = 0;
    for (int t = 0; t < threads; ++t) {
      all_done &= g_fibers[t].state == FiberState::kDone;
      at_block += g_fibers[t].state == FiberState::kBlockBarrier;
      done += g_fibers[t].state == FiberState::kDone;
      all_at_block &= g_fibers[t].state == FiberState::kBlockBarrier;
    }
    if (all_done) return;
    if (at_block > 0 && at_block + done == threads) {
      if (done > 0) fail("__syncthreads() after some threads of the block exited");
      for (int t = 0; t < threads; ++t) g_fibers[t].state = FiberState::kRunnable;
      continue;
    }
    fail("deadlock: threads wait at different barriers");
  }
}

template <typename... KernelArgs, typename... Args>
void run_kernel(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t shared_bytes, Args&&... args) {
  std::tuple<std::decay_t<KernelArgs>...> params(std::forward<Args>(args)...);
  g_body = [&]() { std::apply(kernel, params); };
  g_grid_dim = grid;
  g_block_dim = block;
  g_dynamic_shared.assign(shared_bytes + 16, 0);
  const char* reverse = std::getenv("SVP_EMU_REVERSE");
  g_reverse_order = reverse != nullptr && reverse[0] == '1';
  const int threads = static_cast<int>(block.x * block.y * block.z);
  if (threads <= 0 || threads > 1024) fail("bad block size");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) fail("bad grid size");
  g_blocks_run += static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  ++g_launches_run;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        g_block_idx = dim3(x, y, z);
        run_block(threads);
      }
    }
  }
}

// kernel<<<grid, block, shared, stream>>>(args) is rewritten to launcher(kernel, grid, block, shared, stream)(args).
template <typename... KernelArgs>
auto launcher(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t shared_bytes = 0,
              cudaStream_t stream = nullptr) {
  (void)stream;
  return [=](auto&&... args) { run_kernel(kernel, grid, block, shared_bytes, std::forward<decltype(args)>(args)...); };
}

inline unsigned char* dynamic_shared() { return g_dynamic_shared.data(); }

}  // namespace svp_emu

// ---- CUDA built-ins on the emulator -------------------------------------------------------------------
#ifndef __noinline__
#define __noinline__ __attribute__((noinline))  // cuda_runtime.h defines it for nvcc only
#endif
#define threadIdx (svp_emu::g_thread_idx)
#define blockIdx (svp_emu::g_block_idx)
#define blockDim (svp_emu::g_block_dim)
#define gridDim (svp_emu::g_grid_dim)

inline void __syncthreads() { svp_emu::block_until_released(svp_emu::FiberState::kBlockBarrier); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  static_assert(sizeof(T) <= 16, "shuffle of a large type");
  if (mask != 0xffffffffu) svp_emu::fail("partial-mask shuffle");
  const int lane = svp_emu::g_current % 32, warp = svp_emu::g_current / 32;
  std::memcpy(svp_emu::g_warp_exchange[warp][lane], &value, sizeof(T));
  svp_emu::block_until_released(svp_emu::FiberState::kWarpBarrier);
  T result;
  std::memcpy(&result, svp_emu::g_warp_exchange[warp][(lane ^ lane_mask) & 31], sizeof(T));
  svp_emu::block_until_released(svp_emu::FiberState::kWarpBarrier);  // the buffer is reused next shuffle
  return result;
}

// Blocks run one at a time, so device-wide atomics and fences need nothing more than the plain operation.
inline unsigned atomicAdd(unsigned* address, unsigned value) {
  const unsigned old = *address;
  *address = old + value;
  return old;
}
inline unsigned atomicExch(unsigned* address, unsigned value) {
  const unsigned old = *address;
  *address = value;
  return old;
}
inline void __threadfence() {}
inline double __drcp_rn(double x) { return 1.0 / x; }  // the correctly rounded reciprocal
template <typename T>
T __ldcg(const T* pointer) {
  return *pointer;
}

inline uint4 __ldg(const uint4* pointer) {
  if ((reinterpret_cast<uintptr_t>(pointer) & 15u) != 0) svp_emu::fail("misaligned 16-byte load");
  return *pointer;
}
inline float __uint_as_float(unsigned int bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}
inline double __hiloint2double(int hi, int lo) {
  const uint64_t bits = (static_cast<uint64_t>(static_cast<uint32_t>(hi)) << 32) | static_cast<uint32_t>(lo);
  double value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// cuda_runtime.h defines the templated overload only for nvcc.
template <class T>
cudaError_t cudaFuncSetAttribute(T* entry, cudaFuncAttribute attribute, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(entry), attribute, value);
}

// C entry points over the svp_cuda launchers for the CPU emulation (ctypes), plus the few CUDA runtime
// calls the launchers make, answered on the host. The launchers that plan take a svp_cuda::LaunchPlan
// (run_emulation.py mirrors it as a ctypes.Structure).
#include <cstdlib>

#include "svp_cuda.h"

extern "C" {

cudaError_t cudaGetLastError(void) { return cudaSuccess; }
// The SM count the plans see (SVP_EMU_SMS, default 4). Each distinct count is a device of its own, numbered in
// the order first seen, so the launchers' per-device caches see a new device when the count changes.
static int emulated_sms() {
  const char* env = std::getenv("SVP_EMU_SMS");
  return env != nullptr ? std::atoi(env) : 4;
}
static int device_counts[64];
static int devices_seen = 0;
cudaError_t cudaGetDevice(int* device) {
  const int sms = emulated_sms();
  for (*device = 0; *device < devices_seen && device_counts[*device] != sms; ++*device) {
  }
  if (*device == devices_seen) {
    if (devices_seen == 64) return cudaErrorInvalidDevice;
    device_counts[devices_seen++] = sms;
  }
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device) {
  if (attribute != cudaDevAttrMultiProcessorCount || device < 0 || device >= devices_seen) {
    return cudaErrorInvalidValue;
  }
  *value = device_counts[device];
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void* function, cudaFuncAttribute attribute, int value) {
  (void)function;
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize || value > 227 * 1024) return cudaErrorInvalidValue;
  return cudaSuccess;
}
const char* cudaGetErrorString(cudaError_t error) { return error == cudaSuccess ? "no error" : "emulated error"; }

// The heuristic plan (a default-constructed LaunchPlan), for the ctypes mirror to check its layout against.
void emu_default_launch_plan(svp_cuda::LaunchPlan* plan) { *plan = svp_cuda::LaunchPlan{}; }
// Thread blocks the emulated launches have run since the last call (then reset to zero).
uint64_t emu_take_blocks_run(void) {
  const uint64_t blocks = svp_emu::g_blocks_run;
  svp_emu::g_blocks_run = 0;
  return blocks;
}

// Kernel launches since the last call (then reset to zero).
uint64_t emu_take_launches_run(void) {
  const uint64_t launches = svp_emu::g_launches_run;
  svp_emu::g_launches_run = 0;
  return launches;
}

int emu_dropped_projection(const void* weight, void* out, int64_t C, int64_t D, uint64_t proj_seed, float proj_std,
                           double p, const int64_t* seed, int dtype) {
  return svp_cuda::dropped_projection(weight, out, C, D, proj_seed, proj_std, p, seed,
                                      static_cast<svp_cuda::DType>(dtype), nullptr);
}

int emu_projection_forward_workspace_bytes(int64_t B, int64_t C, int64_t D, int dtype, size_t* bytes,
                                           const svp_cuda::LaunchPlan* plan) {
  return svp_cuda::projection_forward_workspace_bytes(B, C, D, static_cast<svp_cuda::DType>(dtype), bytes, *plan);
}
int emu_projection_forward_counters(int64_t B, int64_t C, int64_t D, int dtype, int64_t* count,
                                    const svp_cuda::LaunchPlan* plan) {
  return svp_cuda::projection_forward_counters(B, C, D, static_cast<svp_cuda::DType>(dtype), count, *plan);
}
int emu_projection_forward(const void* h, const void* weight, void* v, int64_t B, int64_t C, int64_t D,
                           uint64_t proj_seed, float proj_std, double p, const int64_t* seed, int dtype,
                           void* workspace, size_t workspace_bytes, const svp_cuda::LaunchPlan* plan,
                           unsigned* counters, int64_t counter_count) {
  return svp_cuda::projection_forward(h, weight, v, B, C, D, proj_seed, proj_std, p, seed,
                                      static_cast<svp_cuda::DType>(dtype), workspace, workspace_bytes, *plan, nullptr,
                                      counters, counter_count);
}
int emu_projection_backward(const void* grad_v, const void* weight, void* dh, int64_t B, int64_t C, int64_t D,
                            uint64_t proj_seed, float proj_std, double p, const int64_t* seed, int dtype,
                            const svp_cuda::LaunchPlan* plan, const void* grad_scale) {
  return svp_cuda::projection_backward(grad_v, weight, dh, B, C, D, proj_seed, proj_std, p, seed,
                                       static_cast<svp_cuda::DType>(dtype), *plan, nullptr, grad_scale);
}
int emu_loss_epilogue_workspace_bytes(int64_t B, int64_t C, int64_t Cp, bool has_v_prev, int dtype, size_t* bytes,
                                      const svp_cuda::LaunchPlan* plan, int alignment) {
  return svp_cuda::loss_epilogue_workspace_bytes(B, C, Cp, has_v_prev, static_cast<svp_cuda::DType>(dtype), bytes,
                                                 *plan, static_cast<svp_cuda::Alignment>(alignment));
}
int emu_loss_epilogue(const void* v, const int64_t* target, const void* v_prev, void* loss, void* ce, void* alignment,
                      void* g_v, int64_t B, int64_t C, int64_t Cp, double alignment_weight, bool mean, bool center,
                      int dtype, void* workspace, size_t workspace_bytes, const svp_cuda::LaunchPlan* plan,
                      int alignment_kind) {
  return svp_cuda::loss_epilogue(v, target, v_prev, loss, ce, alignment, g_v, B, C, Cp, alignment_weight, mean,
                                 center, static_cast<svp_cuda::DType>(dtype), workspace, workspace_bytes, *plan,
                                 nullptr, static_cast<svp_cuda::Alignment>(alignment_kind));
}
int emu_cosine_gram_workspace_bytes(int64_t B, int64_t C, int dtype, size_t* bytes) {
  return svp_cuda::cosine_gram_workspace_bytes(B, C, static_cast<svp_cuda::DType>(dtype), bytes);
}
int emu_cosine_gram(const void* v, void* S, int64_t B, int64_t C, bool center, int dtype, void* workspace,
                    size_t workspace_bytes) {
  return svp_cuda::cosine_gram(v, S, B, C, center, static_cast<svp_cuda::DType>(dtype), workspace, workspace_bytes,
                               nullptr);
}

}  // extern "C"

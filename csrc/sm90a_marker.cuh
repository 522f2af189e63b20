// Whether the device code the runtime loaded for the current GPU is the sm_90a pass, asked without a copy.
//
// The Hopper kernels hold real wgmma / setmaxnreg instructions only in the sm_90a pass of the build; a build for
// plain sm_90 (no "a") compiles them as traps (gemm_sm90_launch.cuh). So before picking them the launchers ask which
// pass the runtime loaded. That question must be legal wherever a GEMM is: in particular as the first GEMM of a
// process inside a CUDA-graph capture in the global mode, which refuses a synchronous copy (reading a __device__
// flag back with cudaMemcpyFromSymbol would invalidate such a capture).
//
// So the answer is carried by a kernel property the runtime reports without touching a stream: the launch bound
// of a marker kernel, kSm90aMarkerThreads in the sm_90a pass and kOtherMarkerThreads in every other pass.
// cudaFuncGetAttributes reports it as maxThreadsPerBlock for the copy loaded on the current device. (Not a
// __shared__ array's size: on sm_90 the compiled size also counts a reserved 1 KB, so the number the runtime
// reports would need a second guess.) The marker is never launched. tests/csrc/test_sm90a_marker.py reads the
// compiled bound per architecture from the cubins (EIATTR_MAX_THREADS).
#pragma once

#include <cuda_runtime.h>

#include "ptx.cuh"  // DITQ_SM90A: 1 only in the sm_90a device pass

namespace ditq::gemm::sm90 {

constexpr int kSm90aMarkerThreads = 96;
constexpr int kOtherMarkerThreads = 32;

namespace {

// Only the device passes read a launch bound, so the host pass's value (DITQ_SM90A is 0 there) does not matter.
__global__ void __launch_bounds__(DITQ_SM90A ? kSm90aMarkerThreads : kOtherMarkerThreads)
    sm90a_marker_kernel(int* out) {
  (void)out;
}

}  // namespace

// 1: the loaded code is the sm_90a pass; 0: another pass; -1: the runtime could not say (its error is cleared).
inline int loaded_code_is_sm90a() {
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, sm90a_marker_kernel) != cudaSuccess) {
    const cudaError_t e = cudaGetLastError();  // not left for the next launch to report as its own
    // No image of this build for the current GPU: a definite no. Anything else is not an answer.
    return e == cudaErrorNoKernelImageForDevice || e == cudaErrorInvalidDeviceFunction ? 0 : -1;
  }
  return attr.maxThreadsPerBlock == kSm90aMarkerThreads ? 1 : 0;
}

}  // namespace ditq::gemm::sm90

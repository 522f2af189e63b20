// Real CUDA launcher of the activation quantization (csrc/quantize_act.cuh). Torch-free: nvcc compiles it in
// seconds (torch's headers cost ~65 s per architecture; they live in bindings.cpp only).
#include <cuda_runtime.h>

#include "launch.h"
#include "quantize_act.cuh"

namespace ditq {

const char* quantize_act_cuda(const QuantizeActArgs& args, void* stream) {
  cudaGetLastError();  // an earlier, unrelated error must not be reported as ours
  qact::dispatch(args, [stream](const char*, auto kernel, dim3 grid, dim3 block, auto... a) {
    kernel<<<grid, block, 0, static_cast<cudaStream_t>(stream)>>>(a...);
  });
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace ditq

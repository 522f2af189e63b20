// Real CUDA launcher of the fused LayerNorm + modulation + quantization (csrc/norm_quantize.cuh). Torch-free:
// nvcc compiles it in seconds (torch's headers live in bindings.cpp only).
#include <cuda_runtime.h>

#include "launch.h"
#include "norm_quantize.cuh"

namespace ditq {

const char* norm_quantize_cuda(const NormQuantizeArgs& args, void* stream) {
  cudaGetLastError();  // an earlier, unrelated error must not be reported as ours
  normq::dispatch(args, [stream](const char*, auto kernel, dim3 grid, dim3 block, auto... a) {
    kernel<<<grid, block, 0, static_cast<cudaStream_t>(stream)>>>(a...);
  });
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace ditq

// Real CUDA launchers of the int8 GEMMs (csrc/gemm.cuh), plain epilogue; torch-free so that nvcc compiles this
// file in seconds (torch's headers cost ~65 s per architecture; they live in bindings.cpp only). The fused-
// epilogue launchers are gemm_fused.cu.
#include "gemm_launch.cuh"

namespace ditq {

const char* gemm_w8a8_cuda(const GemmArgs& args, void* stream) {
  return gemm::dispatch_tile<gemm::W8, gemm::PlainEpilogue>(args.params, args.tile, stream);
}

const char* gemm_w4a8_cuda(const GemmArgs& args, void* stream) {
  return gemm::dispatch_w4<gemm::PlainEpilogue>(args, stream);
}

}  // namespace ditq

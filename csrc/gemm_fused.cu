// Real CUDA launchers of the int8 GEMMs with the fused epilogue (gemm.cuh's FusedEpilogue: GELU, gate, residual,
// int8 output), ditq_C::gemm_w8a8_fused / gemm_w4a8_fused. A translation unit of its own: the plain kernels
// (gemm.cu) compile exactly as before, and each file's kernels can be disassembled alone.
#include "gemm_launch.cuh"

namespace ditq {

const char* gemm_w8a8_fused_cuda(const GemmArgs& args, void* stream) {
  return gemm::dispatch_tile<gemm::W8, gemm::FusedEpilogue>(args.params, args.tile, stream);
}

const char* gemm_w4a8_fused_cuda(const GemmArgs& args, void* stream) {
  return gemm::dispatch_w4<gemm::FusedEpilogue>(args, stream);
}

}  // namespace ditq

// Real CUDA launchers of the Hopper int8 GEMMs with the fused epilogue (gemm.cuh's FusedEpilogue: GELU, gate,
// residual, int8 output) for an int8 `a`: ditq_C::gemm_w8a8_fused / gemm_w4a8_fused on an sm_90 GPU. A
// translation unit of its own, as gemm_fused.cu is for the mma.sync kernels: the plain Hopper kernels
// (gemm_sm90.cu) compile exactly as before, and each file's kernels can be disassembled alone.
#include "gemm_sm90_launch.cuh"

namespace ditq {

const char* gemm_w8a8_sm90_fused_cuda(const GemmArgs& args, void* stream) {
  return gemm::sm90::dispatch_w8<gemm::FusedEpilogue>(args.params, args.tile, stream);
}

const char* gemm_w4a8_sm90_fused_cuda(const GemmArgs& args, void* stream) {
  return gemm::sm90::dispatch_w4<gemm::FusedEpilogue>(args, stream);
}

}  // namespace ditq

// The int8 GEMMs with the fused epilogue (gemm.cuh's FusedEpilogue) under the SIMT emulator: backend
// "cuda-emulated" of ditq_C::gemm_w8a8_fused / gemm_w4a8_fused. Torch-free.
#include "emulated_gemm.h"

namespace ditq {

void gemm_w8a8_fused_emulated(const GemmArgs& args) {
  gemm::dispatch_tile<gemm::W8, gemm::FusedEpilogue>(args.params, args.tile);
}

void gemm_w4a8_fused_emulated(const GemmArgs& args) { gemm::dispatch_w4<gemm::FusedEpilogue>(args); }

}  // namespace ditq

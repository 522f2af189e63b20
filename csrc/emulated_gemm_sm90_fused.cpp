// The Hopper int8 GEMMs with the fused epilogue (gemm.cuh's FusedEpilogue) under the SIMT emulator: what
// ditq_C::gemm_w8a8_fused / gemm_w4a8_fused run for an int8 `a` under emulator_options(arch="sm_90a").
// Torch-free; a translation unit of its own (the emulated kernels are the slow part of the build: this one
// compiles alongside the others).
#include "emulated_gemm_sm90.h"

namespace ditq {

void gemm_w8a8_sm90_fused_emulated(const GemmArgs& args) {
  gemm::sm90::dispatch_w8<gemm::FusedEpilogue>(args.params, args.tile);
}

void gemm_w4a8_sm90_fused_emulated(const GemmArgs& args) {
  gemm::sm90::dispatch_w4<gemm::FusedEpilogue>(args);
}

}  // namespace ditq

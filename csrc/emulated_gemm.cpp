// The int8 GEMMs (csrc/gemm.cuh) compiled by the host compiler and run by the SIMT emulator (csrc/emu/):
// backend "cuda-emulated", plain epilogue. Same source and tile table as the real kernels (csrc/gemm.cu);
// torch-free. The fused-epilogue entry points are emulated_gemm_fused.cpp.
#include "emulated_gemm.h"

namespace ditq {

void gemm_w8a8_emulated(const GemmArgs& args) {
  gemm::dispatch_tile<gemm::W8, gemm::PlainEpilogue>(args.params, args.tile);
}

void gemm_w4a8_emulated(const GemmArgs& args) { gemm::dispatch_w4<gemm::PlainEpilogue>(args); }

}  // namespace ditq

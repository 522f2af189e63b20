// The int8 GEMMs (csrc/gemm.cuh) compiled by the host compiler and run by the SIMT emulator (csrc/emu/):
// backend "cuda-emulated", plain epilogue. Same source and tile table as the real kernels (csrc/gemm.cu);
// torch-free. The fused-epilogue entry points are emulated_gemm_fused.cpp (mma.sync) and
// emulated_gemm_sm90_fused.cpp (Hopper).
#include "emulated_gemm.h"
#include "emulated_gemm_sm90.h"

namespace ditq {

void gemm_w8a8_emulated(const GemmArgs& args) {
  gemm::dispatch_tile<gemm::W8, gemm::PlainEpilogue>(args.params, args.tile);
}

void gemm_w4a8_emulated(const GemmArgs& args) { gemm::dispatch_w4<gemm::PlainEpilogue>(args); }

// ---- Hopper kernels (csrc/gemm_sm90.cuh, emulated_gemm_sm90.h): picked when emulator_options(arch="sm_90a") ----

int emulated_gemm_arch() { return emu::global_options().arch == emu::Arch::Sm90a ? 90 : 80; }

void gemm_w8a8_sm90_emulated(const GemmArgs& args) {
  gemm::sm90::dispatch_w8<gemm::PlainEpilogue>(args.params, args.tile);
}

void gemm_w4a8_sm90_emulated(const GemmArgs& args) { gemm::sm90::dispatch_w4<gemm::PlainEpilogue>(args); }

}  // namespace ditq

// The real CUDA launch of the Hopper int8 GEMMs (csrc/gemm_sm90.cuh) for one epilogue policy: the kernel entry
// points, the TMA maps + dynamic shared memory opt-in + launch, and the switches over the Hopper tile lists and
// the W4 group sizes. Included by gemm_sm90.cu (PlainEpilogue) and gemm_sm90_fused.cu (FusedEpilogue): two
// translation units, so each compiles (and the SASS tests disassemble) one policy's kernels, as gemm_launch.cuh
// does for the mma.sync kernels.
//
// Compiled for every architecture of the build; only the sm_90a pass holds the real instructions (an sm_80 pass
// compiles the kernels as traps, and the binding never launches them on anything but an sm_90 GPU with sm_90a
// code: gemm_sm90_available).
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "configs/kernel_families.h"
#include "gemm_sm90.cuh"
#include "gemm_sm90_host.h"

namespace ditq::gemm::sm90 {

template <class T, class Epi>
__global__ void __launch_bounds__(T::THREADS, 1) gemm_w8a8_sm90_kernel(const __grid_constant__ Sm90Params P) {
#if defined(__CUDA_ARCH__) && !DITQ_SM90A
  __trap();  // an sm_80 (or plain sm_90) pass: never launched there (gemm_sm90_available), and not worth compiling
#else
  DITQ_DYNAMIC_SHARED(uint8_t, smem);
  gemm_w8a8_sm90_body<T, Epi>(P, smem);
#endif
}

template <class T, int G, class Epi>
__global__ void __launch_bounds__(T::THREADS, 1) gemm_w4a8_sm90_kernel(const __grid_constant__ Sm90Params P) {
#if defined(__CUDA_ARCH__) && !DITQ_SM90A
  __trap();
#else
  DITQ_DYNAMIC_SHARED(uint8_t, smem);
  gemm_w4a8_sm90_body<T, G, Epi>(P, smem);
#endif
}

// Integer group scales (p.w_qscale): a kernel of its own name, so that the SASS reports tell the two apart.
template <class T, int G, class Epi>
__global__ void __launch_bounds__(T::THREADS, 1) gemm_w4a8i_sm90_kernel(const __grid_constant__ Sm90Params P) {
#if defined(__CUDA_ARCH__) && !DITQ_SM90A
  __trap();
#else
  DITQ_DYNAMIC_SHARED(uint8_t, smem);
  gemm_w4a8_sm90_body<T, G, Epi, true>(P, smem);
#endif
}

template <class T, class Kernel>
const char* launch(Kernel kernel, const GemmParams& p, bool w4, void* stream) {
  static thread_local std::string error;  // the returned message outlives this call (launchers return char*)
  cudaGetLastError();  // an earlier, unrelated error must not be reported as ours (cudaGetLastError below)
  Sm90Params P;
  P.p = p;
  if (!make_maps<T>(P, w4, &error)) return error.c_str();
  const int bytes = sm90_smem_bytes(T::BM, T::BN, T::STAGES, w4);
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e != cudaSuccess) return cudaGetErrorString(e);
  const dim3 grid(static_cast<unsigned>(launch_ctas<T>(p)));  // 1-D: work_unit maps a CTA to its tile and split
  kernel<<<grid, T::THREADS, bytes, static_cast<cudaStream_t>(stream)>>>(P);
  e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

template <class Epi>
const char* dispatch_w8(const GemmParams& p, int tile, void* stream) {
  switch (tile) {
#define DITQ_CASE(ID, BM, BN, ST, C)                                                                        \
  case ID:                                                                                                   \
    return launch<Sm90Tile<BM, BN, ST, C>>(&gemm_w8a8_sm90_kernel<Sm90Tile<BM, BN, ST, C>, Epi>, p, false, \
                                           stream);
    DITQ_GEMM_SM90_W8_TILES(DITQ_CASE)
#undef DITQ_CASE
  }
  return "ditq: unknown Hopper W8A8 tile id";
}

template <int G, class Epi>
const char* dispatch_w4_tile(const GemmParams& p, int tile, void* stream) {
  switch (tile) {
#define DITQ_CASE(ID, BM, BN, ST, C)                                                                          \
  case ID:                                                                                                     \
    return p.w_qscale ? launch<Sm90Tile<BM, BN, ST, C>>(&gemm_w4a8i_sm90_kernel<Sm90Tile<BM, BN, ST, C>, G, Epi>, \
                                                        p, true, stream)                                          \
                      : launch<Sm90Tile<BM, BN, ST, C>>(&gemm_w4a8_sm90_kernel<Sm90Tile<BM, BN, ST, C>, G, Epi>,  \
                                                        p, true, stream);
    DITQ_GEMM_SM90_W4_TILES(DITQ_CASE)
#undef DITQ_CASE
  }
  return "ditq: unknown Hopper W4A8 tile id";
}

template <class Epi>
const char* dispatch_w4(const GemmArgs& args, void* stream) {
  switch (args.group_size) {
#define DITQ_GROUP_CASE(G) \
  case G:                  \
    return dispatch_w4_tile<G, Epi>(args.params, args.tile, stream);
    DITQ_W4_GROUP_SIZES(DITQ_GROUP_CASE)
#undef DITQ_GROUP_CASE
  }
  return "ditq: W4A8 group size not built (configs/kernel_families.h)";
}

}  // namespace ditq::gemm::sm90

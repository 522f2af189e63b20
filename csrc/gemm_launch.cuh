// The real CUDA launch of the int8 GEMMs (csrc/gemm.cuh) for one epilogue policy: the kernel entry point, its
// dynamic shared memory opt-in, and the switches over the tile table and the W4 group sizes. Included by
// gemm.cu (PlainEpilogue) and gemm_fused.cu (FusedEpilogue): two translation units, so each compiles (and the
// SASS tests disassemble) one policy's kernels.
#pragma once

#include <cuda_runtime.h>

#include "gemm.cuh"
#include "configs/kernel_families.h"
#include "gemm.h"

namespace ditq::gemm {

template <class T, class WOp, class Epi, class AT = int8_t>
__global__ void __launch_bounds__(T::THREADS) gemm_kernel(GemmParams p) {
  extern __shared__ __align__(128) uint8_t smem[];
  gemm_body<T, WOp, Epi, AT>(p, smem);
}

template <class T, class WOp, class Epi, class AT = int8_t>
const char* launch(const GemmParams& p, void* stream) {
  constexpr int smem = smem_bytes<T, WOp>();
  auto* kernel = &gemm_kernel<T, WOp, Epi, AT>;
  cudaGetLastError();  // an earlier, unrelated error must not be reported as ours (cudaGetLastError below)
  if (smem > 48 * 1024) {  // above 48 KB a kernel must opt in to dynamic shared memory
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return cudaGetErrorString(e);
  }
  const dim3 grid((p.N + T::BN - 1) / T::BN, (p.M + T::BM - 1) / T::BM, p.splits);
  kernel<<<grid, T::THREADS, smem, static_cast<cudaStream_t>(stream)>>>(p);
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

template <class WOp, class Epi>
const char* dispatch_tile(const GemmParams& p, int tile, void* stream) {
  switch (tile) {
#define DITQ_CASE(ID, BM, BN, BK, WM, WN, ST) \
    case ID: return launch<Tile<BM, BN, BK, WM, WN, ST>, WOp, Epi>(p, stream);
    DITQ_GEMM_TILES(DITQ_CASE)
#undef DITQ_CASE
  }
  return "ditq: unknown GEMM tile id";
}

template <class Epi>
const char* dispatch_w4(const GemmArgs& args, void* stream) {
  switch (args.group_size) {
#define DITQ_GROUP_CASE(G) \
    case G: return dispatch_tile<W4<G>, Epi>(args.params, args.tile, stream);
    DITQ_W4_GROUP_SIZES(DITQ_GROUP_CASE)
#undef DITQ_GROUP_CASE
  }
  return "ditq: W4A8 group size not built (configs/kernel_families.h)";
}

}  // namespace ditq::gemm

// Real CUDA launchers of the Hopper int8 GEMMs (csrc/gemm_sm90.cuh), torch-free like gemm.cu. Compiled for
// every architecture of the build; only the sm_90a pass holds the real instructions (an sm_80 pass compiles
// the kernels as traps, and the binding never launches them on anything but an sm_90 GPU).
#include <cuda_runtime.h>

#include <atomic>
#include <string>

#include "gemm_sm90.cuh"
#include "gemm_sm90_host.h"

namespace ditq::gemm::sm90 {
namespace {

// 1 in the sm_90a device code, 0 in any other pass (an sm_90 build without the "a" has no wgmma / setmaxnreg:
// its Hopper kernels are traps). The copy the runtime loads is the one for the current GPU.
__device__ const int kHasSm90aCode = DITQ_SM90A;

template <class T>
__global__ void __launch_bounds__(T::THREADS, 1) gemm_w8a8_sm90_kernel(const __grid_constant__ Sm90Params P) {
#if defined(__CUDA_ARCH__) && !DITQ_SM90A
  __trap();  // an sm_80 (or plain sm_90) pass: never launched there (gemm_sm90_available), and not worth compiling
#else
  DITQ_DYNAMIC_SHARED(uint8_t, smem);
  gemm_w8a8_sm90_body<T>(P, smem);
#endif
}

template <class T, int G>
__global__ void __launch_bounds__(T::THREADS, 1) gemm_w4a8_sm90_kernel(const __grid_constant__ Sm90Params P) {
#if defined(__CUDA_ARCH__) && !DITQ_SM90A
  __trap();
#else
  DITQ_DYNAMIC_SHARED(uint8_t, smem);
  gemm_w4a8_sm90_body<T, G>(P, smem);
#endif
}

template <class T, class Kernel>
const char* launch(Kernel kernel, const GemmParams& p, bool w4, void* stream) {
  static thread_local std::string error;  // the returned message outlives this call (launchers return char*)
  Sm90Params P;
  P.p = p;
  if (!make_maps<T>(P, w4, &error)) return error.c_str();
  const int bytes = sm90_smem_bytes(T::BM, T::BN, T::STAGES, w4);
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e != cudaSuccess) return cudaGetErrorString(e);
  const dim3 grid((p.N + T::BN - 1) / T::BN, (p.M + T::BM - 1) / T::BM, p.splits);  // z: split-K
  kernel<<<grid, T::THREADS, bytes, static_cast<cudaStream_t>(stream)>>>(P);
  e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

template <int G>
const char* dispatch_w4(const GemmParams& p, int tile, void* stream) {
  switch (tile) {
#define DITQ_CASE(ID, BM, BN, ST, C) \
    case ID: return launch<Sm90Tile<BM, BN, ST, C>>(&gemm_w4a8_sm90_kernel<Sm90Tile<BM, BN, ST, C>, G>, p, true, stream);
    DITQ_GEMM_SM90_W4_TILES(DITQ_CASE)
#undef DITQ_CASE
  }
  return "ditq: unknown Hopper W4A8 tile id";
}

}  // namespace
}  // namespace ditq::gemm::sm90

namespace ditq {

bool gemm_sm90_available() {
  // Asked once per device (a device-to-host copy; every GEMM call asks): 0 unknown, 1 no, 2 yes.
  static std::atomic<int> known[64];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return false;
  int k = known[dev].load(std::memory_order_relaxed);
  if (k == 0) {
    int v = 0;
    k = cudaMemcpyFromSymbol(&v, gemm::sm90::kHasSm90aCode, sizeof(v)) == cudaSuccess && v == 1 ? 2 : 1;
    known[dev].store(k, std::memory_order_relaxed);
  }
  return k == 2;
}

const char* gemm_w8a8_sm90_cuda(const GemmArgs& args, void* stream) {
  using namespace gemm::sm90;
  switch (args.tile) {
#define DITQ_CASE(ID, BM, BN, ST, C) \
    case ID: return launch<Sm90Tile<BM, BN, ST, C>>(&gemm_w8a8_sm90_kernel<Sm90Tile<BM, BN, ST, C>>, args.params, false, stream);
    DITQ_GEMM_SM90_W8_TILES(DITQ_CASE)
#undef DITQ_CASE
  }
  return "ditq: unknown Hopper W8A8 tile id";
}

const char* gemm_w4a8_sm90_cuda(const GemmArgs& args, void* stream) {
  switch (args.group_size) {
#define DITQ_GROUP_CASE(G) \
    case G: return gemm::sm90::dispatch_w4<G>(args.params, args.tile, stream);
    DITQ_W4_GROUP_SIZES(DITQ_GROUP_CASE)
#undef DITQ_GROUP_CASE
  }
  return "ditq: W4A8 group size not built (configs/kernel_families.h)";
}

}  // namespace ditq

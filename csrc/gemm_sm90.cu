// Real CUDA launchers of the Hopper int8 GEMMs (csrc/gemm_sm90.cuh), plain epilogue; torch-free like gemm.cu.
// The kernels, the launch and the tile switches are gemm_sm90_launch.cuh (shared with the fused-epilogue
// launchers, gemm_sm90_fused.cu). Only the sm_90a pass holds the real instructions.
#include "gemm_sm90_launch.cuh"

#include <atomic>

namespace ditq::gemm::sm90 {
namespace {

// 1 in the sm_90a device code, 0 in any other pass (an sm_90 build without the "a" has no wgmma / setmaxnreg:
// its Hopper kernels are traps). The copy the runtime loads is the one for the current GPU.
__device__ const int kHasSm90aCode = DITQ_SM90A;

}  // namespace
}  // namespace ditq::gemm::sm90

namespace ditq {

bool gemm_sm90_available() {
  // Asked once per device (a device-to-host copy; every GEMM call asks): 0 unknown, 1 no, 2 yes. Only an answer
  // is cached. The copy is synchronous on the legacy stream, which a CUDA-graph capture in the global mode
  // refuses (and a pending error fails it too): such a failure answers "no" for this call only, and its error
  // is cleared so that the GEMM launch that follows does not report it as its own.
  static std::atomic<int> known[64];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return false;
  int k = known[dev].load(std::memory_order_relaxed);
  if (k == 0) {
    int v = 0;
    if (cudaMemcpyFromSymbol(&v, gemm::sm90::kHasSm90aCode, sizeof(v)) != cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    k = v == 1 ? 2 : 1;
    known[dev].store(k, std::memory_order_relaxed);
  }
  return k == 2;
}

const char* gemm_w8a8_sm90_cuda(const GemmArgs& args, void* stream) {
  return gemm::sm90::dispatch_w8<gemm::PlainEpilogue>(args.params, args.tile, stream);
}

const char* gemm_w4a8_sm90_cuda(const GemmArgs& args, void* stream) {
  return gemm::sm90::dispatch_w4<gemm::PlainEpilogue>(args, stream);
}

}  // namespace ditq

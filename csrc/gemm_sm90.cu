// Real CUDA launchers of the Hopper int8 GEMMs (csrc/gemm_sm90.cuh), plain epilogue; torch-free like gemm.cu.
// The kernels, the launch and the tile switches are gemm_sm90_launch.cuh (shared with the fused-epilogue
// launchers, gemm_sm90_fused.cu). Only the sm_90a pass holds the real instructions.
#include "gemm_sm90_launch.cuh"

#include <atomic>

#include "sm90a_marker.cuh"

namespace ditq {

bool gemm_sm90_available() {
  // Asked once per device (every GEMM call asks): 0 unknown, 1 no, 2 yes. Only an answer is cached. The question
  // reads a kernel attribute, never a stream (sm90a_marker.cuh), so it is legal inside a CUDA-graph capture in
  // any mode, the first GEMM of a process included.
  static std::atomic<int> known[64];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) {
    cudaGetLastError();
    return false;
  }
  int k = known[dev].load(std::memory_order_relaxed);
  if (k == 0) {
    const int v = gemm::sm90::loaded_code_is_sm90a();
    if (v < 0) return false;
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

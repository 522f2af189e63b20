// The int8 GEMMs (csrc/gemm.cuh) compiled by the host compiler and run by the SIMT emulator (csrc/emu/):
// backend "cuda-emulated". Same source and tile table as the real kernels (csrc/gemm.cu); torch-free.
#include <stdexcept>

#include "gemm.cuh"
#include "configs/kernel_families.h"
#include "gemm.h"

namespace ditq::gemm {
namespace {

template <class T, class WOp>
void gemm_kernel(GemmParams p) {
  DITQ_DYNAMIC_SHARED(uint8_t, smem);
  gemm_body<T, WOp>(p, smem);
}

template <class T, class WOp>
void emulate(const GemmParams& p) {
  const dim3 grid((p.N + T::BN - 1) / T::BN, (p.M + T::BM - 1) / T::BM, p.splits);
  ditq::emu::launch(grid, dim3(T::THREADS), smem_bytes<T, WOp>(), &gemm_kernel<T, WOp>, p);
}

template <class WOp>
void dispatch_tile(const GemmParams& p, int tile) {
  switch (tile) {
#define DITQ_CASE(ID, BM, BN, BK, WM, WN, ST) \
    case ID: return emulate<Tile<BM, BN, BK, WM, WN, ST>, WOp>(p);
    DITQ_GEMM_TILES(DITQ_CASE)
#undef DITQ_CASE
  }
  throw std::invalid_argument("ditq: unknown GEMM tile id " + std::to_string(tile));
}

}  // namespace

void emulate_w8a8(const GemmParams& p, int tile) { dispatch_tile<W8>(p, tile); }

void emulate_w4a8(const GemmParams& p, int group_size, int tile) {
  switch (group_size) {
#define DITQ_GROUP_CASE(G) \
    case G: return dispatch_tile<W4<G>>(p, tile);
    DITQ_W4_GROUP_SIZES(DITQ_GROUP_CASE)
#undef DITQ_GROUP_CASE
  }
  throw std::invalid_argument("ditq: W4A8 group size " + std::to_string(group_size) +
                              " not built (configs/kernel_families.h)");
}

}  // namespace ditq::gemm

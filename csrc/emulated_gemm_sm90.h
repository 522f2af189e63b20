// The Hopper int8 GEMMs (csrc/gemm_sm90.cuh) under the SIMT emulator for one epilogue policy: the kernel entries,
// the TMA maps (the emulator's decoded maps), every global buffer with its exact extent, and the switches over
// the Hopper tile lists and the W4 group sizes. Included by emulated_gemm.cpp (PlainEpilogue) and
// emulated_gemm_sm90_fused.cpp (FusedEpilogue): a translation unit per policy, as for the mma.sync kernels
// (emulated_gemm.h). Picked when emulator_options(arch="sm_90a").
#pragma once

#include <stdexcept>
#include <string>
#include <type_traits>

#include "emulated_gemm.h"
#include "gemm_sm90_host.h"

namespace ditq::gemm::sm90 {

template <class T, class Epi>
void w8_kernel(Sm90Params P) {
  DITQ_DYNAMIC_SHARED(uint8_t, smem);
  gemm_w8a8_sm90_body<T, Epi>(P, smem);
}

template <class T, int G, class Epi, bool INT_SCALES>
void w4_kernel(Sm90Params P) {
  DITQ_DYNAMIC_SHARED(uint8_t, smem);
  gemm_w4a8_sm90_body<T, G, Epi, INT_SCALES>(P, smem);
}

// The buffers are the mma.sync kernels' list (gemm::buffers: a, scales, w, bias, out, for the fused policy
// gate / residual / out_scale with an int8 out, and with split-K the counters and the workspace, BM x BN words
// per tile and split as the Hopper reduction indexes it). buffers() sizes the last two from its grid argument's
// x * y tiles: here the split tiles alone, the extent the Hopper kernels may touch. The weight buffer is what the
// TMA map covers: a box past N or K is zero-filled, never read.
template <class T, class WOp, class Epi, class Kernel>
void emulate(Kernel kernel, const GemmParams& p) {
  constexpr bool w4 = WOp::kGrouped;
  Sm90Params P{};
  P.p = p;
  std::string error;
  if (!make_maps<T>(P, w4, &error)) throw std::invalid_argument("ditq: " + error);
  const dim3 grid(static_cast<unsigned>(launch_ctas<T>(p)));  // 1-D: work_unit maps a CTA to its tile and split
  const std::string fused = std::is_same_v<Epi, FusedEpilogue> ? "_fused" : "";
  const std::string name = (w4 ? std::string(p.w_qscale ? "gemm_w4a8i_sm90" : "gemm_w4a8_sm90") + fused + "<G=" + std::to_string(WOp::kGroup) + ", "
                               : "gemm_w8a8_sm90" + fused + "<") +
                           "BM=" + std::to_string(T::BM) + ", BN=" + std::to_string(T::BN) + ">";
  emu::launch_checked(grid, dim3(T::THREADS), sm90_smem_bytes(T::BM, T::BN, T::STAGES, w4), emu::global_options(),
                      name.c_str(), buffers<T, WOp, Epi>(p, dim3(static_cast<unsigned>(split_tiles<T>(p)))),
                      kernel, P);
}

template <class Epi>
void dispatch_w8(const GemmParams& p, int tile) {
  switch (tile) {
#define DITQ_CASE(ID, BM, BN, ST, C) \
    case ID: return emulate<Sm90Tile<BM, BN, ST, C>, W8, Epi>(&w8_kernel<Sm90Tile<BM, BN, ST, C>, Epi>, p);
    DITQ_GEMM_SM90_W8_TILES(DITQ_CASE)
#undef DITQ_CASE
  }
  throw std::invalid_argument("ditq: unknown Hopper W8A8 tile " + std::to_string(tile));
}

template <int G, class Epi>
void dispatch_w4_tile(const GemmParams& p, int tile) {
  switch (tile) {
#define DITQ_CASE(ID, BM, BN, ST, C) \
    case ID:                                                                                                 \
      return p.w_qscale                                                                                      \
                 ? emulate<Sm90Tile<BM, BN, ST, C>, W4<G>, Epi>(&w4_kernel<Sm90Tile<BM, BN, ST, C>, G, Epi, true>, p) \
                 : emulate<Sm90Tile<BM, BN, ST, C>, W4<G>, Epi>(&w4_kernel<Sm90Tile<BM, BN, ST, C>, G, Epi, false>, p);
    DITQ_GEMM_SM90_W4_TILES(DITQ_CASE)
#undef DITQ_CASE
  }
  throw std::invalid_argument("ditq: unknown Hopper W4A8 tile " + std::to_string(tile));
}

template <class Epi>
void dispatch_w4(const GemmArgs& args) {
  switch (args.group_size) {
#define DITQ_GROUP_CASE(G) \
    case G: return dispatch_w4_tile<G, Epi>(args.params, args.tile);
    DITQ_W4_GROUP_SIZES(DITQ_GROUP_CASE)
#undef DITQ_GROUP_CASE
  }
  throw std::invalid_argument("ditq: W4A8 group size " + std::to_string(args.group_size) +
                              " not built (configs/kernel_families.h)");
}

}  // namespace ditq::gemm::sm90

// Host side of the Hopper GEMMs shared by the real launcher (gemm_sm90.cu) and the emulated one
// (emulated_gemm.cpp): the two TMA maps of a problem, built by csrc/tma.h (the driver's encoder on the device
// build, the emulator's decoded map on the host build).
#pragma once

#include <cstdint>
#include <string>

#include "gemm_sm90.cuh"
#include "tma.h"

namespace ditq::gemm::sm90 {

// A: int8 [M, K] (rows K bytes apart), box 128 k x BM rows, 128-byte swizzle.
// W8: int8 [N, K], box 128 k x BN rows, 128-byte swizzle. W4: uint8 [N, K / 2], box 64 bytes x BN rows, 64-byte
// swizzle. The binding has checked what TMA needs (16-byte aligned bases, K % 16 == 0 so that row strides are
// multiples of 16 bytes; configs/gemm_tiles_sm90.h sm90_accepts), so a failure here is a bug, reported as such.
template <class T>
bool make_maps(Sm90Params& P, bool w4, std::string* error) {
  const GemmParams& p = P.p;
  const uint64_t K = static_cast<uint64_t>(p.K), M = static_cast<uint64_t>(p.M), N = static_cast<uint64_t>(p.N);
  if (!ptx::make_tma_map_2d(&P.a_map, p.a, K, M, K, T::BK, T::BM, ptx::TmaSwizzle::B128, error)) return false;
  if (w4) return ptx::make_tma_map_2d(&P.w_map, p.w, K / 2, N, K / 2, T::BK / 2, T::BN, ptx::TmaSwizzle::B64, error);
  return ptx::make_tma_map_2d(&P.w_map, p.w, K, N, K, T::BK, T::BN, ptx::TmaSwizzle::B128, error);
}

// Output tiles of a problem, and the CTAs of its launch (a 1-D grid, gemm_sm90.cuh work_unit): p.dp_tiles
// whole tiles, then p.splits CTAs per remaining tile; every tile whole when p.splits == 1. Split tiles: what the
// counters and the workspace cover.
template <class T>
int64_t output_tiles(const GemmParams& p) {
  return static_cast<int64_t>((p.M + T::BM - 1) / T::BM) * ((p.N + T::BN - 1) / T::BN);
}
template <class T>
int64_t launch_ctas(const GemmParams& p) {
  const int64_t tiles = output_tiles<T>(p);
  return p.splits > 1 ? sm90_ctas(tiles, {p.dp_tiles, p.splits}) : tiles;
}
template <class T>
int64_t split_tiles(const GemmParams& p) {
  return p.splits > 1 ? output_tiles<T>(p) - p.dp_tiles : 0;
}

}  // namespace ditq::gemm::sm90

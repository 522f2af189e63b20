// Tile configurations of the CUDA int8 GEMMs (csrc/gemm.cuh), as data.
//
// A kernel's tile is a template argument (the fragment counts and the smem layout must be compile-time), so
// the table is a constexpr header rather than JSON: every tile listed in DITQ_GEMM_TILES is instantiated
// once per operand kind, and the launchers (csrc/gemm.cu, csrc/emulated_gemm.cpp) dispatch on its id with a
// switch generated from the same list, so a tile can never be picked without having been compiled.
//
// Columns: id, BM, BN, BK (k per main-loop iteration, in int8 elements: a W4 tile row is BK / 2 bytes),
//          WARPS_M, WARPS_N (warp grid; warp tile = BM / WARPS_M x BN / WARPS_N, multiples of 16 x 16),
//          STAGES (cp.async pipeline depth).
// Shared memory per CTA = STAGES * (BM * BK + BN * BK / (W4 ? 2 : 1)) bytes.
#pragma once

#define DITQ_GEMM_TILES(X)                                                                                  \
  /* memory-bound small M: one m16 row of MMAs, a deep pipeline of long K slices to keep loads in flight */ \
  X(0, 16, 64, 128, 1, 2, 4)                                                                                \
  /* mid M */                                                                                               \
  X(1, 64, 64, 64, 2, 2, 4)                                                                                 \
  /* large M: 256 threads, 64x32 warp tiles (16 MMAs per k32 step per warp) */                              \
  X(2, 128, 128, 64, 2, 4, 3)

namespace ditq::gemm {

// Which tile runs a problem: the first rule of the GPU's architecture whose max_m >= M (-1 = any M).
// Both architectures run mma.sync today; the sm90 rows are where Hopper's wgmma kernels will slot in (they
// would get tile ids of their own, in a separate list, dispatched by the sm90 launcher).
struct TileRule {
  int arch_min;  // compute capability * 10: rules apply to GPUs with cc >= arch_min (the sm90 rows first)
  int max_m;     // inclusive upper bound of the M bucket, -1 = no bound
  int w8_tile;
  int w4_tile;
};

constexpr TileRule kTileRules[] = {
    {90, 16, 0, 0},  {90, 64, 1, 1},  {90, -1, 2, 2},
    {80, 16, 0, 0},  {80, 64, 1, 1},  {80, -1, 2, 2},
};

constexpr int pick_tile(int arch, int m, bool w4) {
  for (const TileRule& r : kTileRules)
    if (arch >= r.arch_min && (r.max_m < 0 || m <= r.max_m)) return w4 ? r.w4_tile : r.w8_tile;
  return -1;  // older than sm_80: no int8 mma.sync m16n8k32
}

// The one tile the fused GEMMs with a float A (quantized on load) are compiled for: the smallest-M bucket's
// (their caller is adaLN's GEMM, one row per image). The launcher uses it at any M (correct everywhere, only
// slower at large M, where no caller passes a float A); it never takes the Hopper path.
constexpr int float_a_tile(bool w4) { return pick_tile(80, 1, w4); }

}  // namespace ditq::gemm

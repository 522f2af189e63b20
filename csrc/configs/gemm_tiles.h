// Tile configurations of the CUDA int8 GEMMs (csrc/gemm.cuh), as data.
//
// A kernel's tile is a template argument (the fragment counts and the smem layout must be compile-time), so
// the table is a constexpr header rather than JSON: every tile listed in DITQ_GEMM_TILES is instantiated
// once per operand kind, and the launchers (csrc/gemm_launch.cuh, csrc/emulated_gemm.h) dispatch on its id with a
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
// On Hopper the wgmma kernels have their own table (configs/gemm_tiles_sm90.h); the arch-90 rows here serve the
// buckets that table hands over (-1) and GPUs running a build without sm_90a code.
// The same rule caps the automatic split-K count (auto_splits, csrc/gemm_tiles.cpp): max_splits, as data like
// kSm90TileRules' column, for a GPU's timings to set (benchmarks/tune_tiles.py times caps on the buckets it
// tunes and proposes the column). Why a cap: every split adds a BM x BN partial (4-byte words: int32 for W8,
// fp32 for W4) that its CTA writes to the workspace and the tile's last CTA reads back and reduces alone, a cost
// that grows with the count and does not shrink with K, so past some count (small K, large tiles) more splits
// time worse, not better. kMaxSplits everywhere until a measurement says otherwise.
constexpr int kMaxSplits = 16;

struct TileRule {
  int arch_min;    // compute capability * 10: rules apply to GPUs with cc >= arch_min (the sm90 rows first)
  int max_m;       // inclusive upper bound of the M bucket, -1 = no bound
  int w8_tile;
  int w4_tile;
  int max_splits;  // cap on the automatic split count (>= 1; 1: the bucket never splits)
};

constexpr TileRule kTileRules[] = {
    {90, 16, 0, 0, 16},  {90, 64, 1, 1, 16},  {90, -1, 2, 2, 16},
    {80, 16, 0, 0, 16},  {80, 64, 1, 1, 16},  {80, -1, 2, 2, 16},
};

// The rule that picks a problem's tile, or nullptr (older than sm_80: no int8 mma.sync m16n8k32).
constexpr const TileRule* tile_rule(int arch, int m) {
  for (const TileRule& r : kTileRules)
    if (arch >= r.arch_min && (r.max_m < 0 || m <= r.max_m)) return &r;
  return nullptr;
}

constexpr int pick_tile(int arch, int m, bool w4) {
  const TileRule* r = tile_rule(arch, m);
  return r == nullptr ? -1 : (w4 ? r->w4_tile : r->w8_tile);
}
// The automatic split count's cap for a problem (its rule's max_splits); kMaxSplits where no rule applies (a
// forced tile on a GPU the table has no rows for: nothing else to go by).
constexpr int max_splits(int arch, int m) {
  const TileRule* r = tile_rule(arch, m);
  return r == nullptr ? kMaxSplits : r->max_splits;
}

// Every rule's cap in [1, 1024] (1024: a sane bound on CTAs per tile, far above any useful count), and every
// architecture's rows end with one that takes any M (-1), so that a GPU the table covers always gets a tile.
constexpr bool tile_rules_valid() {
  for (const TileRule& r : kTileRules) {
    if (r.max_splits < 1 || r.max_splits > 1024) return false;
    if (tile_rule(r.arch_min, 1 << 30) == nullptr || tile_rule(r.arch_min, 1 << 30)->max_m != -1) return false;
  }
  return true;
}
static_assert(tile_rules_valid(), "kTileRules: max_splits in [1, 1024], each arch's last rule takes any M (-1)");
static_assert(max_splits(90, 512) == kMaxSplits && max_splits(80, 1) == kMaxSplits &&
                  max_splits(75, 1) == kMaxSplits && pick_tile(75, 1, false) == -1,
              "the shipped rules: every cap kMaxSplits (no rule before sm_80)");

// The one tile the fused GEMMs with a float A (quantized on load) are compiled for: the smallest-M bucket's
// (their caller is adaLN's GEMM, one row per image). The launcher uses it at any M (correct everywhere, only
// slower at large M, where no caller passes a float A); it never takes the Hopper path. Its split cap comes
// from the same rule as its tile.
constexpr int kFloatAArch = 80, kFloatAM = 1;
constexpr int float_a_tile(bool w4) { return pick_tile(kFloatAArch, kFloatAM, w4); }
constexpr int float_a_max_splits() { return max_splits(kFloatAArch, kFloatAM); }

}  // namespace ditq::gemm

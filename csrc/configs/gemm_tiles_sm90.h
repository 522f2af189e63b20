// Tile configurations of the Hopper int8 GEMMs (csrc/gemm_sm90.cuh: TMA + wgmma, warp-specialized), as data.
//
// Like configs/gemm_tiles.h, each list entry is instantiated once (per group size for W4) and the launchers
// (csrc/gemm_sm90_launch.cuh, csrc/emulated_gemm_sm90.h) switch on its id, generated from the same list. The ids live
// in their own range: a `tile` argument of kSm90TileBase + i names entry i of the family's list (W8 or W4),
// ids below kSm90TileBase name the mma.sync table of configs/gemm_tiles.h. BK is 128 for every entry (four
// k32 wgmma steps per stage; an A / activation tile row is then exactly one 128-byte swizzle row).
//
// W8A8 columns: id, BM, BN, STAGES, CONSUMERS (warpgroups; each owns BM / CONSUMERS = 64 rows x BN columns,
//               one wgmma m64nBNk32 per k32 step). Block = 128 * (1 + CONSUMERS) threads (one producer
//               warpgroup). Shared memory = STAGES * (BM + BN) * 128 bytes + barriers.
// W4A8 columns: id, BM, BN, STAGES, CONSUMERS. The product is computed transposed (Y^T = W A^T): each consumer
//               warpgroup owns 64 output channels (wgmma's M, weights from registers) x BM activation rows
//               (wgmma's N, from shared memory), so BN = 64 * CONSUMERS. Shared memory = STAGES * (BM * 128 +
//               BN * 64) bytes + barriers.
// Register budget: a W8 consumer holds BN / 2 int32 accumulators; a W4 consumer 2 x BM / 2 int32 (two group
// partials ping-ponged) + BM / 2 fp32 sums. The producer warpgroup gives registers back with setmaxnreg.
#pragma once

#include <cstdint>

#define DITQ_GEMM_SM90_W8_TILES(X)                                                  \
  /* small M: one consumer warpgroup, 64 x 128, a deep ring for the weight stream */ \
  X(0, 64, 128, 6, 1)                                                               \
  /* mid / large M: two consumer warpgroups, 128 x 128 (N = 1152 is 9 tiles) */     \
  X(1, 128, 128, 5, 2)                                                              \
  /* large M and N: 128 x 256, 64 x 256 per warpgroup (128 accumulators each) */    \
  X(2, 128, 256, 4, 2)

#define DITQ_GEMM_SM90_W4_TILES(X)                                              \
  /* M <= 16: wgmma N = 16, 64 channels per CTA (N = 1152 gives 18 CTAs) */     \
  X(0, 16, 64, 8, 1)                                                            \
  /* M <= 64 */                                                                 \
  X(1, 64, 64, 6, 1)                                                            \
  /* large M: 128 activation rows x 128 channels, two consumer warpgroups */    \
  X(2, 128, 128, 5, 2)

namespace ditq::gemm {

constexpr int kSm90TileBase = 100;  // tile ids >= this name the Hopper tables above
constexpr int kSm90BK = 128;

// Which Hopper tile runs a problem of M rows: the first rule with max_m >= M (-1 = any M). An entry of -1 for
// a family hands that bucket to the mma.sync kernels (e.g. when the sm_80 path would serve a memory-bound
// bucket better). The Hopper kernels split K too (sm90_auto_schedule below picks which tiles and how), at most
// max_splits ways in the bucket: a cap on the automatic count, as data, for a GPU's timings to set
// (benchmarks/tune_tiles.py times the tail counts and proposes this column). kSm90MaxSplits everywhere until a
// measurement says otherwise.
constexpr int kSm90MaxSplits = 16;  // each split adds a BM x BN partial that the tile's last CTA reads back

struct Sm90TileRule {
  int max_m;
  int w8_tile;     // index into DITQ_GEMM_SM90_W8_TILES, or -1
  int w4_tile;     // index into DITQ_GEMM_SM90_W4_TILES, or -1
  int max_splits;  // cap on the automatic split count (>= 1; 1: the bucket never splits)
};

constexpr Sm90TileRule kSm90TileRules[] = {
    {16, 0, 0, 16},
    {64, 0, 1, 16},
    {4096, 1, 2, 16},
    {-1, 2, 2, 16},
};

constexpr const Sm90TileRule& sm90_rule(int m) {
  for (const Sm90TileRule& r : kSm90TileRules)
    if (r.max_m < 0 || m <= r.max_m) return r;
  return kSm90TileRules[sizeof(kSm90TileRules) / sizeof(kSm90TileRules[0]) - 1];  // the last rule is -1
}
constexpr int pick_sm90_tile(int m, bool w4) { return w4 ? sm90_rule(m).w4_tile : sm90_rule(m).w8_tile; }
// The automatic split count's cap for a problem of M rows (its bucket's max_splits).
constexpr int sm90_max_splits(int m) { return sm90_rule(m).max_splits; }

constexpr bool sm90_rules_valid() {
  for (const Sm90TileRule& r : kSm90TileRules)
    if (r.max_splits < 1 || r.max_splits > 1024) return false;
  return kSm90TileRules[sizeof(kSm90TileRules) / sizeof(kSm90TileRules[0]) - 1].max_m == -1;
}
static_assert(sm90_rules_valid(), "kSm90TileRules: max_splits in [1, 1024], the last rule takes any M (-1)");

#define DITQ_SM90_COUNT(...) +1
constexpr int kSm90W8TileCount = 0 DITQ_GEMM_SM90_W8_TILES(DITQ_SM90_COUNT);
constexpr int kSm90W4TileCount = 0 DITQ_GEMM_SM90_W4_TILES(DITQ_SM90_COUNT);
#undef DITQ_SM90_COUNT

// {BM, BN, BK, STAGES, CONSUMERS, THREADS, smem bytes} of Hopper tile `i` (W8 or W4 list); false if no such tile.
constexpr int sm90_barrier_bytes(int stages) { return 2 * 8 * stages; }
constexpr int sm90_smem_bytes(int bm, int bn, int stages, bool w4) {
  // Tiles first (DITQ_DYNAMIC_SHARED is 1024-byte aligned, where the 128-byte swizzle's pattern starts; every
  // stage's tiles are multiples of 1024 bytes), then the full / empty mbarriers.
  return stages * (bm * kSm90BK + bn * (w4 ? kSm90BK / 2 : kSm90BK)) + sm90_barrier_bytes(stages);
}

// Split-K (gemm_sm90.cuh): split z of `splits` sums whole k units: BK = 128 k for W8, max(G, BK) for W4 (a
// group never straddles two splits), so at most this many splits.
constexpr int sm90_k_units(int group_size, int64_t K) {
  const int64_t unit = group_size > kSm90BK ? group_size : kSm90BK;
  return static_cast<int>((K + unit - 1) / unit);
}

// The automatic schedule of a Hopper launch of `tiles` output tiles on `sm_count` SMs: the first dp_tiles tiles
// run whole (one CTA each), the other tiles are each split `splits` ways over K (gemm_sm90.cuh, Split-K and the
// schedule).
// A Hopper CTA takes a whole SM (one per SM: __launch_bounds__(THREADS, 1), and setmaxnreg hands the consumers
// the register file), so the grid runs in waves of sm_count CTAs, and a last wave of R < sm_count tiles leaves
// SMs idle for a whole tile time (M = 512, N = 4608 on 128 x 128 tiles: 144 tiles = 132 + 12, two tile times for
// 1.09 waves of work).
// Rule: W = tiles / sm_count full waves run whole; the R = tiles - W * sm_count tail tiles are split
// S = min(sm_count / R, k units, max_splits) ways, so the tail is one wave of 1 / S of a tile's work (time ~ W +
// 1 / S instead of W + 1). Only the tail, because splitting the full waves too (uniform split-K) adds waves (144
// x 2 = 288 CTAs = 2.2 waves) and a reduction per tile for nothing. Split only when S >= 2 (R > sm_count / 2
// leaves no room for two slices of each tail tile: no split). W = 0 is the uniform split of a grid under one
// wave: the largest count whose tiles * S CTAs still fit in one wave (36 tiles x 4 = 144 CTAs would be two waves
// of a quarter of K each, ~ 2 / 4, where 3 splits is one wave of a third, ~ 1 / 3). The reduction's cost is not
// modelled here: every slice stores BM x BN words (in parallel), and the last CTA of a tile reads S x BM x BN
// words back alone (S x 64 KB on 128 x 128 tiles), a cost that grows with S and does not shrink with K. At
// K = 1152 (fc1: S = 9, each slice one k unit) that read is of the order of a slice's main loop or more, so a
// smaller S may time better there; the same holds for the uniform split under a wave. That is what max_splits
// (the M bucket's column of kSm90TileRules, default kSm90MaxSplits) is for: benchmarks/tune_tiles.py times the
// tail counts on a GPU (sm90_forced_schedule) and proposes the column; benchmarks/static_report.py's roofline
// charges the read-back.
struct Sm90Schedule {
  int64_t dp_tiles;  // whole tiles, first in launch order
  int splits;        // slices of each of the other tiles (1: no split, dp_tiles = tiles)
};
constexpr Sm90Schedule sm90_auto_schedule(int64_t tiles, int units, int sm_count, int max_splits = kSm90MaxSplits) {
  if (tiles <= 0 || sm_count <= 0) return {tiles, 1};
  const int64_t tail = tiles % sm_count;
  if (tail == 0) return {tiles, 1};
  int64_t s = sm_count / tail;
  if (s > max_splits) s = max_splits;
  if (s > units) s = units;
  if (s < 2) return {tiles, 1};
  return {tiles - tail, static_cast<int>(s)};
}
// A forced split count (the ops' splits >= 1: tests, benchmarks/tune_tiles.py): the tiles of the last wave are
// split `splits` ways and the full waves before it run whole, as the automatic schedule does, with S chosen by
// the caller. The last wave is its 1 .. sm_count tiles (a whole wave when tiles is a multiple of sm_count, so a
// forced count always splits something): under one wave, and at exactly one, every tile is split (uniform
// split-K); past a wave, the tail. The caller checks splits against the k units.
constexpr Sm90Schedule sm90_forced_schedule(int64_t tiles, int splits, int sm_count) {
  if (tiles <= 0 || sm_count <= 0 || splits <= 1) return {tiles, 1};
  const int64_t last = tiles - (tiles - 1) / sm_count * sm_count;
  return {tiles - last, splits};
}
// The CTAs of a schedule: the whole tiles, then `splits` per remaining tile.
constexpr int64_t sm90_ctas(int64_t tiles, Sm90Schedule s) { return s.dp_tiles + (tiles - s.dp_tiles) * s.splits; }
// The split tiles: what the counters (one each) and the workspace (BM x BN words per tile and split) cover.
constexpr int64_t sm90_split_tiles(int64_t tiles, Sm90Schedule s) { return s.splits > 1 ? tiles - s.dp_tiles : 0; }

constexpr bool sm90_schedule_is(Sm90Schedule s, int64_t dp_tiles, int splits) {
  return s.dp_tiles == dp_tiles && s.splits == splits;
}
static_assert(sm90_schedule_is(sm90_auto_schedule(36, 9, 132), 0, 3), "under a wave: uniform split, one wave");
static_assert(sm90_schedule_is(sm90_auto_schedule(144, 9, 132), 132, 9), "132 whole + 12 tails x 9 (the k units)");
static_assert(sm90_schedule_is(sm90_auto_schedule(108, 9, 132), 108, 1), "108 > 132 / 2: no room to split");
static_assert(sm90_schedule_is(sm90_auto_schedule(264, 36, 132), 264, 1), "whole waves: no split");
static_assert(sm90_schedule_is(sm90_auto_schedule(200, 36, 132), 200, 1), "a tail of 68: S would be 1");
static_assert(sm90_schedule_is(sm90_auto_schedule(9, 36, 132), 0, 14) &&
              sm90_schedule_is(sm90_auto_schedule(9, 2, 132), 0, 2) &&
              sm90_schedule_is(sm90_auto_schedule(4, 1, 132), 4, 1), "at most the k units, at least 2");
static_assert(sm90_schedule_is(sm90_auto_schedule(134, 9, 132), 132, 9) &&
              sm90_schedule_is(sm90_auto_schedule(6, 4, 4), 4, 2), "tails: at most the k units; S = SMs / R");
static_assert(sm90_schedule_is(sm90_auto_schedule(1, 99, 132), 0, kSm90MaxSplits), "at most kSm90MaxSplits");
static_assert(sm90_schedule_is(sm90_auto_schedule(144, 9, 132, 3), 132, 3) &&
              sm90_schedule_is(sm90_auto_schedule(36, 9, 132, 2), 0, 2) &&
              sm90_schedule_is(sm90_auto_schedule(144, 9, 132, 1), 144, 1), "capped: at most max_splits");
static_assert(sm90_schedule_is(sm90_forced_schedule(144, 4, 132), 132, 4) &&
              sm90_schedule_is(sm90_forced_schedule(36, 4, 132), 0, 4) &&
              sm90_schedule_is(sm90_forced_schedule(132, 2, 132), 0, 2) &&
              sm90_schedule_is(sm90_forced_schedule(264, 2, 132), 132, 2) &&
              sm90_schedule_is(sm90_forced_schedule(200, 2, 132), 132, 2) &&
              sm90_schedule_is(sm90_forced_schedule(144, 1, 132), 144, 1), "forced: the last wave, S ways");
static_assert(sm90_max_splits(512) == kSm90MaxSplits && sm90_max_splits(1 << 30) == kSm90MaxSplits &&
              pick_sm90_tile(16, false) == 0 && pick_sm90_tile(512, true) == 2, "the shipped rules");
static_assert(sm90_ctas(144, {132, 9}) == 240 && sm90_split_tiles(144, {132, 9}) == 12 &&
              sm90_split_tiles(144, {144, 1}) == 0 && sm90_ctas(36, {0, 3}) == 108, "CTA and split tile counts");

// Whether the Hopper kernels can take a problem; when not, the mma.sync kernels (which also run on sm_90) do.
// TMA needs 16-byte aligned global bases and row strides that are multiples of 16 bytes: K bytes for A and
// W8 rows, K / 2 for W4 rows.
constexpr bool sm90_accepts(int64_t K, bool w4, uintptr_t a, uintptr_t w) {
  return K > 0 && a % 16 == 0 && w % 16 == 0 && K % 16 == 0 && (!w4 || (K / 2) % 16 == 0);
}

inline bool sm90_tile_shape(int i, bool w4, int (&out)[7]) {
  int k = 0;
#define DITQ_SM90_SHAPE(ID, BM, BN, ST, C)                                                       \
  if (ID == i) {                                                                                 \
    const int v[7] = {BM, BN, kSm90BK, ST, C, 128 * (1 + (C)), sm90_smem_bytes(BM, BN, ST, w4)}; \
    for (k = 0; k < 7; ++k) out[k] = v[k];                                                       \
    return true;                                                                                 \
  }
  if (w4) {
    DITQ_GEMM_SM90_W4_TILES(DITQ_SM90_SHAPE)
  } else {
    DITQ_GEMM_SM90_W8_TILES(DITQ_SM90_SHAPE)
  }
#undef DITQ_SM90_SHAPE
  return false;
}

}  // namespace ditq::gemm

// Host-side facts about the GEMM tile table (configs/gemm_tiles.h), torch-free and built in every
// configuration (with or without CUDA): tile shapes, shared memory, split-K decisions.
#include <stdexcept>

#include "configs/gemm_tiles.h"
#include "gemm.h"

namespace ditq::gemm {

namespace {
struct Shape {
  int bm, bn, bk, warps_m, warps_n, stages;
};
constexpr Shape kShapes[] = {
#define DITQ_SHAPE(ID, BM, BN, BK, WM, WN, ST) {BM, BN, BK, WM, WN, ST},
    DITQ_GEMM_TILES(DITQ_SHAPE)
#undef DITQ_SHAPE
};
constexpr int kCount = sizeof(kShapes) / sizeof(kShapes[0]);

const Shape& shape(int tile) {
  if (tile < 0 || tile >= kCount) throw std::invalid_argument("ditq: unknown GEMM tile id");
  return kShapes[tile];
}
}  // namespace

int tile_count() { return kCount; }

void tile_shape(int tile, int (&out)[7]) {
  const Shape& s = shape(tile);
  const int v[7] = {s.bm, s.bn, s.bk, s.warps_m, s.warps_n, s.stages, 32 * s.warps_m * s.warps_n};
  for (int i = 0; i < 7; ++i) out[i] = v[i];
}

int tile_smem_bytes(int tile, int group_size) {
  const Shape& s = shape(tile);
  return s.stages * (s.bm * s.bk + s.bn * (group_size > 0 ? s.bk / 2 : s.bk));
}

int k_units(int tile, int group_size, int K) {
  const Shape& s = shape(tile);
  const int unit = group_size > s.bk ? group_size : s.bk;  // a W4 group never straddles two splits
  return (K + unit - 1) / unit;
}

int auto_splits(int tile, int group_size, int M, int N, int K, int sm_count, int max_splits) {
  if (max_splits < 1) throw std::invalid_argument("ditq: a split-K cap (max_splits) must be >= 1");
  const Shape& s = shape(tile);
  const long ctas = static_cast<long>((M + s.bm - 1) / s.bm) * ((N + s.bn - 1) / s.bn);
  const long want = (2L * sm_count + ctas - 1) / ctas;  // two waves' worth of CTAs
  long splits = want < max_splits ? want : max_splits;
  const int units = k_units(tile, group_size, K);
  if (splits > units) splits = units;
  return splits < 1 ? 1 : static_cast<int>(splits);
}

}  // namespace ditq::gemm

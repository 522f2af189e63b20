// The fused GEMMs with a float A (gemm_fused_float_a.cu) under the SIMT emulator: backend "cuda-emulated" of
// ditq_C::gemm_w8a8_fused / gemm_w4a8_fused called with an fp32 / fp16 / bf16 `a`. The same single tile, weight
// kinds and A types as the real build. Torch-free.
#include "emulated_gemm.h"

namespace ditq {
namespace {

template <class WOp>
void emulate_float_a(const GemmArgs& args) {
  constexpr int kTile = gemm::float_a_tile(WOp::kGrouped);
  using T = typename gemm::TileById<kTile>::type;
  if (args.tile != kTile)
    throw std::invalid_argument("ditq: the float-A fused GEMMs are built for one tile only (float_a_tile)");
  switch (args.a_dtype) {
    case DType::kF32: return gemm::emulate<T, WOp, gemm::FusedEpilogue, float>(args.params);
    case DType::kF16: return gemm::emulate<T, WOp, gemm::FusedEpilogue, __half>(args.params);
    case DType::kBF16: return gemm::emulate<T, WOp, gemm::FusedEpilogue, __nv_bfloat16>(args.params);
  }
  throw std::invalid_argument("ditq: unknown float A dtype");
}

}  // namespace

void gemm_fused_float_a_emulated(const GemmArgs& args) {
  if (args.group_size == 0) return emulate_float_a<gemm::W8>(args);
  switch (args.group_size) {
#define DITQ_GROUP_CASE(G) \
    case G: return emulate_float_a<gemm::W4<G>>(args);
    DITQ_W4_GROUP_SIZES(DITQ_GROUP_CASE)
#undef DITQ_GROUP_CASE
  }
  throw std::invalid_argument("ditq: W4A8 group size " + std::to_string(args.group_size) +
                              " not built (configs/kernel_families.h)");
}

}  // namespace ditq

// Real CUDA launchers of the fused GEMMs with a float A (fp32 / fp16 / bf16, static a_scale): gemm.cuh's
// FloatATileLoader quantizes A as it loads it, so adaLN's GEMM on silu(emb) is one launch instead of
// quantize_act + the int8 GEMM. A translation unit of its own (the SASS tests disassemble it alone), compiled
// for one tile only (float_a_tile: the smallest-M bucket's), W8 and every W4 group size, three A types.
#include "gemm_launch.cuh"

namespace ditq {
namespace {

template <class WOp>
const char* launch_float_a(const GemmArgs& args, void* stream) {
  constexpr int kTile = gemm::float_a_tile(WOp::kGrouped);
  using T = typename gemm::TileById<kTile>::type;
  if (args.tile != kTile) return "ditq: the float-A fused GEMMs are built for one tile only (float_a_tile)";
  switch (args.a_dtype) {
    case DType::kF32: return gemm::launch<T, WOp, gemm::FusedEpilogue, float>(args.params, stream);
    case DType::kF16: return gemm::launch<T, WOp, gemm::FusedEpilogue, __half>(args.params, stream);
    case DType::kBF16: return gemm::launch<T, WOp, gemm::FusedEpilogue, __nv_bfloat16>(args.params, stream);
  }
  return "ditq: unknown float A dtype";
}

}  // namespace

const char* gemm_fused_float_a_cuda(const GemmArgs& args, void* stream) {
  if (args.group_size == 0) return launch_float_a<gemm::W8>(args, stream);
  switch (args.group_size) {
#define DITQ_GROUP_CASE(G) \
    case G: return launch_float_a<gemm::W4<G>>(args, stream);
    DITQ_W4_GROUP_SIZES(DITQ_GROUP_CASE)
#undef DITQ_GROUP_CASE
  }
  return "ditq: W4A8 group size not built (configs/kernel_families.h)";
}

}  // namespace ditq

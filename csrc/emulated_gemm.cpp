// The int8 GEMMs (csrc/gemm.cuh) compiled by the host compiler and run by the SIMT emulator (csrc/emu/):
// backend "cuda-emulated", plain epilogue. Same source and tile table as the real kernels (csrc/gemm.cu);
// torch-free. The fused-epilogue entry points are emulated_gemm_fused.cpp.
#include "emulated_gemm.h"
#include "gemm_sm90_host.h"

namespace ditq {

void gemm_w8a8_emulated(const GemmArgs& args) {
  gemm::dispatch_tile<gemm::W8, gemm::PlainEpilogue>(args.params, args.tile);
}

void gemm_w4a8_emulated(const GemmArgs& args) { gemm::dispatch_w4<gemm::PlainEpilogue>(args); }

}  // namespace ditq

// ---- Hopper kernels (csrc/gemm_sm90.cuh): picked when emulator_options(arch="sm_90a") --------------------------
namespace ditq::gemm::sm90 {
namespace {

template <class T>
void w8_kernel(Sm90Params P) {
  DITQ_DYNAMIC_SHARED(uint8_t, smem);
  gemm_w8a8_sm90_body<T>(P, smem);
}

template <class T, int G>
void w4_kernel(Sm90Params P) {
  DITQ_DYNAMIC_SHARED(uint8_t, smem);
  gemm_w4a8_sm90_body<T, G>(P, smem);
}

// The maps (emulated: the emulator's decoded TMA maps) and every global buffer with its exact extent. The
// weight buffer is what the TMA map covers: a box past N or K is zero-filled, never read.
template <class T, class Kernel>
void emulate(Kernel kernel, const GemmParams& p, int group) {
  using emu::Access;
  const bool w4 = group > 0;
  Sm90Params P{};
  P.p = p;
  std::string error;
  if (!make_maps<T>(P, w4, &error)) throw std::invalid_argument("ditq: " + error);
  const size_t M = static_cast<size_t>(p.M), N = static_cast<size_t>(p.N), K = static_cast<size_t>(p.K);
  const size_t out_bytes = p.out_dtype == DType::kF32 ? 4 : 2;
  std::vector<emu::GlobalBuffer> buffers = {
      {p.a, M * K, "a", Access::ReadOnly},
      {p.a_scale, (p.a_scale_per_token ? M : 1) * 4, "a_scale", Access::ReadOnly},
      {p.w, N * (w4 ? K / 2 : K), "w", Access::ReadOnly},
      {p.w_scale, (w4 ? K / group * N : N) * 4, "w_scale", Access::ReadOnly},
      {p.bias, p.bias ? N * 4 : 0, "bias", Access::ReadOnly},
      {p.out, M * N * out_bytes, "out", Access::Output}};
  const dim3 grid((p.N + T::BN - 1) / T::BN, (p.M + T::BM - 1) / T::BM, p.splits);  // z: split-K
  if (p.splits > 1) {  // as the mma.sync launcher registers them (emulated_gemm.h)
    const size_t tiles = static_cast<size_t>(grid.x) * grid.y;
    buffers.push_back({p.counters, tiles * 4, "counters", Access::ReadWrite});  // zeroed by the binding
    buffers.push_back({p.workspace, static_cast<size_t>(p.splits) * tiles * T::BM * T::BN * 4, "workspace",
                       Access::Output});  // a split reads only partials stored in this launch
  }
  const std::string name = std::string(w4 ? "gemm_w4a8_sm90<G=" + std::to_string(group) + ", " : "gemm_w8a8_sm90<") +
                           "BM=" + std::to_string(T::BM) + ", BN=" + std::to_string(T::BN) + ">";
  emu::launch_checked(grid, dim3(T::THREADS), sm90_smem_bytes(T::BM, T::BN, T::STAGES, w4), emu::global_options(),
                      name.c_str(), buffers, kernel, P);
}

template <int G>
void dispatch_w4(const GemmParams& p, int tile) {
  switch (tile) {
#define DITQ_CASE(ID, BM, BN, ST, C) \
    case ID: return emulate<Sm90Tile<BM, BN, ST, C>>(&w4_kernel<Sm90Tile<BM, BN, ST, C>, G>, p, G);
    DITQ_GEMM_SM90_W4_TILES(DITQ_CASE)
#undef DITQ_CASE
  }
  throw std::invalid_argument("ditq: unknown Hopper W4A8 tile " + std::to_string(tile));
}

}  // namespace
}  // namespace ditq::gemm::sm90

namespace ditq {

int emulated_gemm_arch() { return emu::global_options().arch == emu::Arch::Sm90a ? 90 : 80; }

void gemm_w8a8_sm90_emulated(const GemmArgs& args) {
  using namespace gemm::sm90;
  switch (args.tile) {
#define DITQ_CASE(ID, BM, BN, ST, C) \
    case ID: return emulate<Sm90Tile<BM, BN, ST, C>>(&w8_kernel<Sm90Tile<BM, BN, ST, C>>, args.params, 0);
    DITQ_GEMM_SM90_W8_TILES(DITQ_CASE)
#undef DITQ_CASE
  }
  throw std::invalid_argument("ditq: unknown Hopper W8A8 tile " + std::to_string(args.tile));
}

void gemm_w4a8_sm90_emulated(const GemmArgs& args) {
  switch (args.group_size) {
#define DITQ_GROUP_CASE(G) \
    case G: return gemm::sm90::dispatch_w4<G>(args.params, args.tile);
    DITQ_W4_GROUP_SIZES(DITQ_GROUP_CASE)
#undef DITQ_GROUP_CASE
  }
  throw std::invalid_argument("ditq: W4A8 group size " + std::to_string(args.group_size) +
                              " not built (configs/kernel_families.h)");
}

}  // namespace ditq

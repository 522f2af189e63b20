// The int8 GEMMs (csrc/gemm.cuh) under the SIMT emulator for one epilogue policy: the kernel entry, the global
// buffers it may touch (with exact extents, for the global-memory checker) and the switches over the tile
// table and the W4 group sizes. Included by emulated_gemm.cpp (PlainEpilogue) and emulated_gemm_fused.cpp
// (FusedEpilogue): two translation units, and tests/csrc/gemm_probe.cpp builds the plain one alone.
#pragma once

#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "gemm.cuh"
#include "configs/kernel_families.h"
#include "gemm.h"

namespace ditq::gemm {

template <class T, class WOp, class Epi, class AT = int8_t>
void gemm_kernel(GemmParams p) {
  DITQ_DYNAMIC_SHARED(uint8_t, smem);
  gemm_body<T, WOp, Epi, AT>(p, smem);
}

// Every global buffer the kernel may touch, with its exact extent, for the emulator's global-memory checker:
// a read one row past A, a scale index past N or a store past the output tile is reported, not absorbed by
// whatever lies next to the buffer.
template <class T, class WOp, class Epi, class AT = int8_t>
std::vector<emu::GlobalBuffer> buffers(const GemmParams& p, const dim3& grid) {
  using emu::Access;
  constexpr bool kFused = std::is_same_v<Epi, FusedEpilogue>;
  const size_t M = static_cast<size_t>(p.M), N = static_cast<size_t>(p.N), K = static_cast<size_t>(p.K);
  const auto bytes_of = [](DType t) -> size_t { return t == DType::kF32 ? 4 : 2; };
  const size_t out_bytes = kFused && p.fused.out_scale ? 1 : bytes_of(p.out_dtype);
  const size_t groups = WOp::kGrouped ? K / WOp::kGroup * N : 0;
  const size_t w_scales = WOp::kGrouped && !p.w_qscale ? groups : N;  // integer group scales: [N] channel scales
  const size_t tiles = static_cast<size_t>(grid.x) * grid.y;
  std::vector<emu::GlobalBuffer> b = {
      {p.a, M * K * sizeof(AT), "a", Access::ReadOnly},  // a float A: its M * K elements, not M * K bytes
      {p.a_scale, (p.a_scale_per_token ? M : 1) * 4, "a_scale", Access::ReadOnly},
      {p.w, N * static_cast<size_t>(WOp::row_len(p.K)), "w", Access::ReadOnly},
      {p.w_scale, w_scales * 4, "w_scale", Access::ReadOnly},
      {p.w_qscale, p.w_qscale ? groups * 4 : 0, "w_qscale", Access::ReadOnly},
      {p.bias, p.bias ? N * 4 : 0, "bias", Access::ReadOnly},
      {p.out, M * N * out_bytes, "out", Access::Output}};
  if (kFused) {  // only the fused kernels may read these: a plain kernel touching them is reported
    const GemmParams::Fused& f = p.fused;
    const size_t gate_rows = f.gate ? M / static_cast<size_t>(f.rows_per_gate) : 0;
    b.push_back({f.gate, gate_rows * N * 4, "gate", Access::ReadOnly});
    b.push_back({f.residual, f.residual ? M * N * bytes_of(f.residual_dtype) : 0, "residual", Access::ReadOnly});
    b.push_back({f.out_scale, f.out_scale ? 4u : 0u, "out_scale", Access::ReadOnly});
  }
  if (p.splits > 1) {
    b.push_back({p.counters, tiles * 4, "counters", Access::ReadWrite});  // zeroed by the launcher
    b.push_back({p.workspace, static_cast<size_t>(p.splits) * tiles * T::BM * T::BN * 4, "workspace",
                 Access::Output});  // a split reads only partials stored in this launch
  }
  return b;
}

// ", A=bf16" in a float-A kernel's name (the emulator's reports), nothing for int8 A.
template <class AT>
const char* a_name() {
  if constexpr (std::is_same_v<AT, float>) return ", A=f32";
  else if constexpr (std::is_same_v<AT, __half>) return ", A=f16";
  else if constexpr (std::is_same_v<AT, __nv_bfloat16>) return ", A=bf16";
  else return "";
}

template <class T, class WOp, class Epi, class AT = int8_t>
void emulate(const GemmParams& p) {
  const dim3 grid((p.N + T::BN - 1) / T::BN, (p.M + T::BM - 1) / T::BM, p.splits);
  const char* fused = std::is_same_v<Epi, FusedEpilogue> ? "_fused" : "";
  const std::string name = (WOp::kGrouped ? "gemm_w4a8" + std::string(fused) + "<G=" +
                                                std::to_string(WOp::kGroup) + ", "
                                          : "gemm_w8a8" + std::string(fused) + "<") +
                           "BM=" + std::to_string(T::BM) + ", BN=" + std::to_string(T::BN) +
                           ", BK=" + std::to_string(T::BK) + a_name<AT>() + ">";
  emu::launch_checked(grid, dim3(T::THREADS), smem_bytes<T, WOp>(), emu::global_options(), name.c_str(),
                      buffers<T, WOp, Epi, AT>(p, grid), &gemm_kernel<T, WOp, Epi, AT>, p);
}

template <class WOp, class Epi>
void dispatch_tile(const GemmParams& p, int tile) {
  switch (tile) {
#define DITQ_CASE(ID, BM, BN, BK, WM, WN, ST) \
    case ID: return emulate<Tile<BM, BN, BK, WM, WN, ST>, WOp, Epi>(p);
    DITQ_GEMM_TILES(DITQ_CASE)
#undef DITQ_CASE
  }
  throw std::invalid_argument("ditq: unknown GEMM tile id " + std::to_string(tile));
}

template <class Epi>
void dispatch_w4(const GemmArgs& args) {
  const int group_size = args.group_size;
  switch (group_size) {
#define DITQ_GROUP_CASE(G) \
    case G: return dispatch_tile<W4<G>, Epi>(args.params, args.tile);
    DITQ_W4_GROUP_SIZES(DITQ_GROUP_CASE)
#undef DITQ_GROUP_CASE
  }
  throw std::invalid_argument("ditq: W4A8 group size " + std::to_string(group_size) +
                              " not built (configs/kernel_families.h)");
}

}  // namespace ditq::gemm

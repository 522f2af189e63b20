// Test-only probe of the Hopper GEMMs' split-K (tests/csrc/test_gemm_sm90_splitk_mutants.py): one W8A8 tile and
// one W4A8 tile (G = 256) under the emulator, with the caller's schedule (dp_tiles whole tiles first), workspace
// and counters (the split tiles' only) and every global buffer registered with the global-memory checker. Built against csrc/ or a mutated copy (emu_probe.build_mutant).
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>
#include "gemm_sm90_host.h"
using namespace ditq;
using namespace ditq::gemm;
using namespace ditq::gemm::sm90;
using T8 = Sm90Tile<64, 128, 6, 1>;
using T4 = Sm90Tile<64, 64, 6, 1>;
template <class T> void w8k(Sm90Params P) { DITQ_DYNAMIC_SHARED(uint8_t, smem); gemm_w8a8_sm90_body<T>(P, smem); }
template <class T, int G> void w4k(Sm90Params P) { DITQ_DYNAMIC_SHARED(uint8_t, smem); gemm_w4a8_sm90_body<T, G>(P, smem); }
template <class T, class Kernel>
void go(Kernel kernel, bool w4, const GemmParams& p, const emu::Options& o) {
  Sm90Params P{};
  P.p = p;
  std::string e;
  if (!make_maps<T>(P, w4, &e)) throw std::runtime_error(e);
  const dim3 grid(static_cast<unsigned>(launch_ctas<T>(p)));  // whole tiles, then the split tiles' CTAs
  const size_t M = p.M, N = p.N, K = p.K, tiles = static_cast<size_t>(split_tiles<T>(p));
  using emu::Access;
  const std::vector<emu::GlobalBuffer> bufs = {
      {p.a, M * K, "a", Access::ReadOnly}, {p.a_scale, M * 4, "a_scale", Access::ReadOnly},
      {p.w, N * (w4 ? K / 2 : K), "w", Access::ReadOnly}, {p.w_scale, (w4 ? K / 256 * N : N) * 4, "w_scale", Access::ReadOnly},
      {p.out, M * N * 4, "out", Access::Output}, {p.counters, tiles * 4, "counters", Access::ReadWrite},
      {p.workspace, p.splits * tiles * T::BM * T::BN * 4, "workspace", Access::Output}};
  emu::launch_checked(grid, dim3(T::THREADS), sm90_smem_bytes(T::BM, T::BN, T::STAGES, w4), o, "probe", bufs, kernel, P);
}
extern "C" int run(int w4, int splits, int dp_tiles, int M, int N, int K, const void* a, const float* sa, const void* w,
                   const float* sw, float* out, int* counters, uint32_t* workspace, int landing, char* err, int errlen) {
  GemmParams p{};
  p.a = a; p.a_scale = sa; p.a_scale_per_token = 1; p.w = w; p.w_scale = sw;
  p.out = out; p.out_dtype = DType::kF32; p.M = M; p.N = N; p.K = K;
  p.splits = splits; p.dp_tiles = dp_tiles; p.counters = counters; p.workspace = workspace;
  emu::Options o;
  o.race_check = true;
  o.order = emu::Order::Random;
  o.seed = 3;
  o.async_landing = landing ? emu::AsyncLanding::Wait : emu::AsyncLanding::Issue;
  try {
    if (w4) go<T4>(&w4k<T4, 256>, true, p, o);
    else go<T8>(&w8k<T8>, false, p, o);
  } catch (const std::exception& ex) {
    std::strncpy(err, ex.what(), errlen - 1);
    return 1;
  }
  return 0;
}

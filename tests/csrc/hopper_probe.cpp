// Test-only Hopper kernels for the SIMT emulator (mbarrier, TMA, wgmma), built by tests/csrc/hopper_probe.py
// with g++ into a small shared library (no torch) and called through ctypes:
//   * probes exposing one mechanism with caller-chosen inputs (a TMA box, one wgmma from a caller-built
//     shared-memory image), for the tests to compare with Python models written from the ISA;
//   * an int8 GEMM tile (TMA -> 128B-swizzled stages -> wgmma, warp-specialised, mbarrier ring), exact
//     against torch in the tests;
//   * deliberately broken variants of those kernels, each with a `// @<name>` marker on the line the
//     emulator's report must name, beside the correct twin (which must pass).
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "ptx.cuh"
#include "tma.h"

using namespace ditq;

namespace {

// ---- TMA box probe -----------------------------------------------------------------------------------------
// Thread 0 loads one box; everyone waits; the block copies the raw shared bytes (swizzled) out.
DITQ_GLOBAL void tma_box_kernel(const __grid_constant__ ptx::TmaMap map, int c0, int c1, int bytes, int dst_offset,
                                uint8_t* out) {
  DITQ_DYNAMIC_SHARED(uint8_t, dyn);
  uint8_t* smem = dyn + dst_offset;
  DITQ_SHARED(uint64_t, bar, 1);
  const int t = static_cast<int>(threadIdx.x);
  if (t == 0) {
    ptx::mbarrier_init(&bar[0], 1);
    ptx::fence_mbarrier_init();
  }
  __syncthreads();
  if (t == 0) {
    ptx::prefetch_tma_map(&map);
    ptx::mbarrier_arrive_expect_tx(&bar[0], static_cast<uint32_t>(bytes));
    ptx::tma_load_2d(smem, &map, c0, c1, &bar[0]);  // @tma_box
  }
  ptx::mbarrier_wait_parity(&bar[0], 0);
  for (int i = t; i < bytes; i += static_cast<int>(blockDim.x)) ptx::st_global(out + i, ptx::ld_shared(smem + i));
}

// ---- one wgmma from a caller-built shared-memory image -------------------------------------------------------
// The block (one warpgroup) copies `image` into shared memory, fences, and runs one wgmma m64nNk32 (ss or rs)
// with the caller's descriptors (start offsets relative to the dynamic shared base) onto c_init; d out.
struct WgmmaArgs {
  const uint8_t* image;
  int image_bytes;
  uint32_t a_off, a_lbo, a_sbo, b_off, b_lbo, b_sbo;
  int a_swz, b_swz, rs, accumulate;
  const uint32_t* a_regs;  // [128][4]
  const int32_t* c_init;   // [128][N/2]
  int32_t* d;              // [128][N/2]
};

template <int N>
DITQ_GLOBAL void wgmma_one_kernel(WgmmaArgs args) {
  DITQ_DYNAMIC_SHARED(uint8_t, smem);
  const int t = static_cast<int>(threadIdx.x);
  for (int i = t; i < args.image_bytes; i += 128) ptx::st_shared(smem + i, args.image[i]);
  ptx::fence_proxy_async_shared();  // generic writes -> async-proxy (wgmma) reads
  __syncthreads();
  int32_t d[N / 2];
  for (int i = 0; i < N / 2; ++i) d[i] = args.c_init[t * (N / 2) + i];
  const uint64_t db = ptx::wgmma_smem_desc(smem + args.b_off, static_cast<ptx::WgmmaSwizzle>(args.b_swz), args.b_lbo,
                                           args.b_sbo);
  ptx::wgmma_fence();
  if (args.rs) {
    const uint32_t a[4] = {args.a_regs[4 * t], args.a_regs[4 * t + 1], args.a_regs[4 * t + 2], args.a_regs[4 * t + 3]};
    ptx::wgmma_m64k32_s8_rs<N>(d, a, db, args.accumulate != 0);
  } else {
    const uint64_t da = ptx::wgmma_smem_desc(smem + args.a_off, static_cast<ptx::WgmmaSwizzle>(args.a_swz),
                                             args.a_lbo, args.a_sbo);
    ptx::wgmma_m64k32_s8_ss<N>(d, da, db, args.accumulate != 0);
  }
  ptx::wgmma_commit_group();
  ptx::wgmma_wait_group<0>();
  for (int i = 0; i < N / 2; ++i) args.d[t * (N / 2) + i] = d[i];
}

// ---- the int8 GEMM tile: D[64 x N] = A[64 x K] B[N x K]^T, warp-specialised --------------------------------
// Warpgroup 0 consumes (wgmma), warpgroup 1 produces (thread 128 issues the TMA loads). K tiles of 128 bytes
// (one 128B-swizzle row) in a ring of kStages stages, each: A box 128 x 64 (8 KB, 1024-aligned) then B box
// 128 x N. full[s] completes when a stage's bytes landed (1 arrival + tx), empty[s] when the 128 consumers
// have released it. Rows/columns past the tensors and K past its end are zero-filled by the TMA.
// The Bug parameter plants one mistake (the correct kernel is Bug::None).
enum class Bug : int {
  None,
  NoFinalWait,      // the last k tile's wgmmas are never waited for before the accumulators are read
  WrongParity,      // the consumer waits on full[s] with the wrong parity
  ExpectTooMany,    // expect_tx counts one byte more than the stage's boxes
  ExpectTooFew,     // expect_tx counts the A box only
  NoMbarInitFence,  // no fence_mbarrier_init after the inits
  SkipWgmma,        // one consumer thread skips a wgmma
  NoWgmmaFence,     // no wgmma_fence before the first wgmma
  TouchAccum,       // a thread zeroes an accumulator between issue and wait
  UseBeforeInit,    // the producer uses full[0] before the init is visible (no __syncthreads)
  EarlyRelease,     // the consumer releases the stage (arrive on empty) before its wgmmas are retired
};
constexpr int kStages = 2;
constexpr int kKTile = 128;

struct GemmArgs {
  const int8_t* a;  // [m_real][k] (row stride k_pad bytes)
  const int8_t* b;  // [n_real][k]
  int m_real, n_real, k, k_pad;
  int32_t* out;     // [64][N]
  int rs;           // 1: A from registers (loaded from global by the consumers), B through TMA
};

template <int N, Bug kBug>
DITQ_GLOBAL void gemm_tile_kernel(const __grid_constant__ ptx::TmaMap map_a, const __grid_constant__ ptx::TmaMap map_b,
                                  GemmArgs args) {
  DITQ_DYNAMIC_SHARED(uint8_t, smem);
  DITQ_SHARED(uint64_t, full, kStages);
  DITQ_SHARED(uint64_t, empty, kStages);
  constexpr int kABytes = kKTile * 64, kBBytes = kKTile * N;
  constexpr int kStageBytes = (kABytes + kBBytes + 1023) / 1024 * 1024;
  const int t = static_cast<int>(threadIdx.x);
  const int k_tiles = (args.k + kKTile - 1) / kKTile;
  if (t == 0) {
    for (int s = 0; s < kStages; ++s) {
      ptx::mbarrier_init(&full[s], 1);  // @init_full
      ptx::mbarrier_init(&empty[s], 128);
    }
    if (kBug != Bug::NoMbarInitFence) ptx::fence_mbarrier_init();
  }
  if (kBug == Bug::UseBeforeInit && t == 128) ptx::mbarrier_arrive(&full[0]);  // @use_before_init
  __syncthreads();
  if (t >= 128) {  // ---- producer warpgroup ----
    ptx::setmaxnreg_dec<40>();
    if (t != 128) return;
    const uint32_t tx = static_cast<uint32_t>((args.rs ? 0 : kABytes) + kBBytes);
    for (int kt = 0; kt < k_tiles; ++kt) {
      const int s = kt % kStages;
      const uint32_t phase = static_cast<uint32_t>(kt / kStages) & 1u;
      ptx::mbarrier_wait_parity(&empty[s], phase ^ 1u);  // a fresh barrier passes parity 1: stages start empty
      const uint32_t bytes = kBug == Bug::ExpectTooMany ? tx + 1 : kBug == Bug::ExpectTooFew ? kABytes : tx;
      ptx::mbarrier_arrive_expect_tx(&full[s], bytes);  // @expect_tx
      uint8_t* stage = smem + s * kStageBytes;
      if (!args.rs) ptx::tma_load_2d(stage, &map_a, kt * kKTile, 0, &full[s]);  // @tma_a
      ptx::tma_load_2d(stage + kABytes, &map_b, kt * kKTile, 0, &full[s]);    // @tma_b
    }
    return;
  }
  // ---- consumer warpgroup ----
  ptx::setmaxnreg_inc<232>();
  int32_t d[N / 2];
  for (int i = 0; i < N / 2; ++i) d[i] = 0;
  const int w = t / 32, g = (t % 32) / 4, t4 = t % 4;
  if (kBug != Bug::NoWgmmaFence) ptx::wgmma_fence();
  for (int kt = 0; kt < k_tiles; ++kt) {
    const int s = kt % kStages;
    const uint32_t phase = static_cast<uint32_t>(kt / kStages) & 1u;
    ptx::mbarrier_wait_parity(&full[s], kBug == Bug::WrongParity ? phase ^ 1u : phase);  // @wait_full
    uint8_t* stage = smem + s * kStageBytes;
    if (kt > 0 && kBug != Bug::NoWgmmaFence) ptx::wgmma_fence();
    for (int kk = 0; kk < kKTile / 32; ++kk) {
      const bool acc = kt > 0 || kk > 0;
      // K-major, 128B swizzle: rows of 128 bytes, 8-row groups 1024 bytes apart (SBO); the k32 step is a
      // 32-byte offset of the start address within the row (the swizzle uses the absolute address).
      const uint64_t db = ptx::wgmma_smem_desc(stage + kABytes + 32 * kk, ptx::WgmmaSwizzle::B128, 16, 1024);
      if (kBug == Bug::SkipWgmma && t == 77 && kt == 0 && kk == 1) continue;
      if (!args.rs) {
        const uint64_t da = ptx::wgmma_smem_desc(stage + 32 * kk, ptx::WgmmaSwizzle::B128, 16, 1024);
        ptx::wgmma_m64k32_s8_ss<N>(d, da, db, acc);  // @wgmma_ss
      } else {
        // Register A (the ISA's layout): a_j at row 16w + g + 8 ((j >> 2) & 1), col 4t + (j & 3) + 16 (j >> 3).
        uint32_t a[4] = {0, 0, 0, 0};
        for (int j = 0; j < 16; ++j) {
          const int row = 16 * w + g + 8 * ((j >> 2) & 1), col = kt * kKTile + 32 * kk + 4 * t4 + (j & 3) + 16 * (j >> 3);
          const int8_t v = row < args.m_real && col < args.k ? ptx::ld_global(&args.a[row * args.k_pad + col]) : 0;
          a[j / 4] |= static_cast<uint32_t>(static_cast<uint8_t>(v)) << (8 * (j % 4));
        }
        ptx::wgmma_m64k32_s8_rs<N>(d, a, db, acc);  // @wgmma_rs
      }
      if (kBug == Bug::TouchAccum && t == 5 && kt == 0 && kk == 0) d[1] = 0;  // @touch_accum
    }
    ptx::wgmma_commit_group();
    if (kBug == Bug::EarlyRelease) ptx::mbarrier_arrive(&empty[s]);
    if (kBug != Bug::NoFinalWait || kt + 1 < k_tiles) ptx::wgmma_wait_group<0>();  // @wait_group
    ptx::wgmma_fence_operands(d);
    if (kBug != Bug::EarlyRelease) ptx::mbarrier_arrive(&empty[s]);
  }
  // Accumulator d[i]: row 16w + g + 8 ((i >> 1) & 1), col 8 (i >> 2) + 2t + (i & 1).
  for (int i = 0; i < N / 2; ++i) {
    const int row = 16 * w + g + 8 * ((i >> 1) & 1), col = 8 * (i >> 2) + 2 * t4 + (i & 1);
    ptx::st_global(&args.out[row * N + col], d[i]);  // @read_accum
  }
}

// ---- generic writes read by wgmma: the async-proxy fence -------------------------------------------------------
// The warpgroup stores A and B (64 x 32 and 8 x 32, no swizzle) with st.shared, then one wgmma reads them.
template <bool kFence>
DITQ_GLOBAL void proxy_fence_kernel(const int8_t* a, const int8_t* b, int32_t* out) {
  DITQ_DYNAMIC_SHARED(uint8_t, smem);
  const int t = static_cast<int>(threadIdx.x);
  // Core-matrix layout (no swizzle): row r, byte c of a K-major operand at (r % 8) * 16 + (r / 8) * SBO + c % 16
  // + (c / 16) * LBO, with LBO = 128 (the two K halves) and SBO = 256 (8-row groups).
  for (int i = t; i < 64 * 32; i += 128) {
    const int r = i / 32, c = i % 32;
    ptx::st_shared(smem + (r % 8) * 16 + (r / 8) * 256 + c % 16 + (c / 16) * 128, static_cast<uint8_t>(a[i]));
  }
  for (int i = t; i < 8 * 32; i += 128) {
    const int r = i / 32, c = i % 32;
    ptx::st_shared(smem + 4096 + (r % 8) * 16 + c % 16 + (c / 16) * 128, static_cast<uint8_t>(b[i]));  // @generic_store
  }
  if (kFence) ptx::fence_proxy_async_shared();
  __syncthreads();
  int32_t d[4];
  const uint64_t da = ptx::wgmma_smem_desc(smem, ptx::WgmmaSwizzle::None, 128, 256);
  const uint64_t db = ptx::wgmma_smem_desc(smem + 4096, ptx::WgmmaSwizzle::None, 128, 256);
  ptx::wgmma_fence();
  ptx::wgmma_m64k32_s8_ss<8>(d, da, db, false);  // @fence_wgmma
  ptx::wgmma_commit_group();
  ptx::wgmma_wait_group<0>();
  for (int i = 0; i < 4; ++i) out[t * 4 + i] = d[i];
}

// A warpgroup whose threads ask setmaxnreg for different counts.
template <bool kBug>
DITQ_GLOBAL void setmaxnreg_kernel(int* out) {
  const int t = static_cast<int>(threadIdx.x);
  if (kBug && t == 3) ptx::setmaxnreg_inc<240>();  // @setmaxnreg_a
  else ptx::setmaxnreg_inc<232>();                 // @setmaxnreg_b
  out[t] = t;
}

// ---- an mbarrier ring with generic consumers -----------------------------------------------------------------
// 3 stages of one 64-byte x 16-row box (no swizzle); thread 32 produces `tiles` tiles, warp 0 consumes them
// with ld.shared after spinning on try_wait, and releases each stage (empty: 32 arrivals). 8 tiles take each
// barrier through phases 0, 1, 0. Bug 1: the producer waits on empty with the parity of the phase instead
// of its complement, so its first wait is for a release that never comes. Bug 2: the consumers release a
// stage before reading it.
template <int kBug>
DITQ_GLOBAL void ring_kernel(const __grid_constant__ ptx::TmaMap map, int tiles, uint8_t* out) {
  DITQ_DYNAMIC_SHARED(uint8_t, smem);
  DITQ_SHARED(uint64_t, full, 3);
  DITQ_SHARED(uint64_t, empty, 3);
  const int t = static_cast<int>(threadIdx.x);
  if (t == 0) {
    for (int s = 0; s < 3; ++s) {
      ptx::mbarrier_init(&full[s], 1);
      ptx::mbarrier_init(&empty[s], 32);  // @ring_init_empty
    }
    ptx::fence_mbarrier_init();
  }
  __syncthreads();
  if (t == 32) {
    for (int i = 0; i < tiles; ++i) {
      const int s = i % 3;
      const uint32_t ph = static_cast<uint32_t>(i / 3) & 1u;
      ptx::mbarrier_wait_parity(&empty[s], kBug == 1 ? ph : ph ^ 1u);  // @ring_wait_empty
      ptx::mbarrier_arrive_expect_tx(&full[s], 1024);
      ptx::tma_load_2d(smem + 1024 * s, &map, 0, 16 * i, &full[s]);  // @ring_tma
    }
  } else if (t < 32) {
    for (int i = 0; i < tiles; ++i) {
      const int s = i % 3;
      const uint32_t ph = static_cast<uint32_t>(i / 3) & 1u;
      while (!ptx::mbarrier_try_wait_parity(&full[s], ph)) {  // @ring_spin
      }
      if (kBug == 2) ptx::mbarrier_arrive(&empty[s]);
      for (int j = t; j < 1024; j += 32) {
        const uint8_t v = ptx::ld_shared(smem + 1024 * s + j);  // @ring_read
        ptx::st_global(out + 1024 * i + j, v);
      }
      if (kBug != 2) ptx::mbarrier_arrive(&empty[s]);
    }
  }
}

// ---- misuse of mbarriers and TMA, one per mode ----------------------------------------------------------------
// 1: re-init of a barrier whose phase is in progress; 2: more arrivals than the count in one phase (the
// phase still waiting for transaction bytes); 3: a TMA load nobody waits for (the block exits with it in
// flight); 4: prefetch of a map never built; 5: an expect_tx past the tx-count's 2^20 - 1.
DITQ_GLOBAL void misuse_kernel(const __grid_constant__ ptx::TmaMap map, int mode) {
  DITQ_DYNAMIC_SHARED(uint8_t, smem);
  DITQ_SHARED(uint64_t, bar, 1);
  const int t = static_cast<int>(threadIdx.x);
  if (t == 0) {
    ptx::mbarrier_init(&bar[0], 2);
    ptx::fence_mbarrier_init();
  }
  __syncthreads();
  if (mode == 1 && t == 0) {
    ptx::mbarrier_arrive(&bar[0]);
    ptx::mbarrier_init(&bar[0], 2);  // @misuse_reinit
  }
  // (An arrival after the phase completed counts toward the next phase: the extra one must come while the
  // phase still waits for bytes.)
  if (mode == 2 && t == 0) ptx::mbarrier_arrive_expect_tx(&bar[0], 1024);
  if (mode == 2 && (t == 1 || t == 2)) ptx::mbarrier_arrive(&bar[0]);  // @misuse_extra_arrive
  if (mode == 3 && t == 0) {
    ptx::mbarrier_arrive_expect_tx(&bar[0], 1024);
    ptx::tma_load_2d(smem, &map, 0, 0, &bar[0]);  // @misuse_unwaited_tma
  }
  if (mode == 5 && t == 0) ptx::mbarrier_arrive_expect_tx(&bar[0], 1u << 20);  // @misuse_tx_overflow
  if (mode == 4 && t == 0) {
    const ptx::TmaMap unbuilt{};
    ptx::prefetch_tma_map(&unbuilt);  // @misuse_unbuilt_map
  }
}

// ---- runners -----------------------------------------------------------------------------------------------
emu::Options options(int order, unsigned long long seed, int landing, int race_check) {
  emu::Options o;
  o.order = static_cast<emu::Order>(order);
  o.seed = seed;
  o.async_landing = static_cast<emu::AsyncLanding>(landing);
  o.arch = emu::Arch::Sm90a;
  o.race_check = race_check != 0;
  return o;
}

void copy_out(const std::string& s, char* buf, int len) {
  if (buf && len > 0) std::snprintf(buf, static_cast<size_t>(len), "%s", s.c_str());
}

// Runs f(); 0 if it ran, 1 on an emulator report (kind, message), 2 on any other exception (message).
template <class F>
int guarded(F&& f, char* kind, int kind_len, char* msg, int msg_len) {
  try {
    f();
    return 0;
  } catch (const emu::Error& e) {
    copy_out(e.kind(), kind, kind_len);
    copy_out(e.what(), msg, msg_len);
    return 1;
  } catch (const std::exception& e) {
    copy_out(e.what(), msg, msg_len);
    return 2;
  }
}

template <int N, Bug kBug>
void run_gemm(const emu::Options& o, const int8_t* a, const int8_t* b, int m_real, int n_real, int k, int k_pad,
              int rs, int32_t* out) {
  alignas(64) ptx::TmaMap map_a, map_b;
  std::string err;
  if (!ptx::make_tma_map_2d(&map_a, a, static_cast<uint64_t>(k), static_cast<uint64_t>(m_real),
                            static_cast<uint64_t>(k_pad), kKTile, 64, ptx::TmaSwizzle::B128, &err) ||
      !ptx::make_tma_map_2d(&map_b, b, static_cast<uint64_t>(k), static_cast<uint64_t>(n_real),
                            static_cast<uint64_t>(k_pad), kKTile, N, ptx::TmaSwizzle::B128, &err))
    throw std::invalid_argument(err);
  constexpr int kStageBytes = (kKTile * 64 + kKTile * N + 1023) / 1024 * 1024;
  const GemmArgs args{a, b, m_real, n_real, k, k_pad, out, rs};
  const std::vector<emu::GlobalBuffer> bufs = {
      {a, static_cast<size_t>(m_real) * k_pad, "a", emu::Access::ReadOnly},
      {b, static_cast<size_t>(n_real) * k_pad, "b", emu::Access::ReadOnly},
      {out, sizeof(int32_t) * 64 * N, "out", emu::Access::Output}};
  emu::launch_checked(dim3(1), dim3(256), kStages * kStageBytes, o, "gemm_tile", bufs, gemm_tile_kernel<N, kBug>,
                      map_a, map_b, args);
}

// The correct kernel at every N the tests use; the broken ones at N = 64 only (each instantiation costs
// compile time in every test run).
template <Bug kBug>
void gemm_n(int n, const emu::Options& o, const int8_t* a, const int8_t* b, int m_real, int n_real, int k,
            int k_pad, int rs, int32_t* out) {
  if constexpr (kBug != Bug::None) {
    if (n != 64) throw std::invalid_argument("gemm probe: the broken variants are built for N = 64 only");
    return run_gemm<64, kBug>(o, a, b, m_real, n_real, k, k_pad, rs, out);
  }
  switch (n) {
    case 8: return run_gemm<8, kBug>(o, a, b, m_real, n_real, k, k_pad, rs, out);
    case 24: return run_gemm<24, kBug>(o, a, b, m_real, n_real, k, k_pad, rs, out);
    case 64: return run_gemm<64, kBug>(o, a, b, m_real, n_real, k, k_pad, rs, out);
    case 128: return run_gemm<128, kBug>(o, a, b, m_real, n_real, k, k_pad, rs, out);
    case 256: return run_gemm<256, kBug>(o, a, b, m_real, n_real, k, k_pad, rs, out);
    default: throw std::invalid_argument("gemm probe: N must be 8, 24, 64, 128 or 256");
  }
}

}  // namespace

// Built with -fvisibility=hidden (hopper_probe.py): the emulator's inline functions and their static state
// (emu::S(), SH(), HS()...) bind inside this library even when a process has also loaded ditq._C, which
// carries its own copies of them (possibly from other sources: a stale build would otherwise interpose them).
// Only the probe entry points below are exported.
#pragma GCC visibility push(default)
extern "C" {

// One TMA box (1-byte elements) of g [outer][stride] into shared memory, read back raw into out.
int probe_tma(const uint8_t* g, unsigned long long inner, unsigned long long outer, unsigned long long stride,
              unsigned box_inner, unsigned box_outer, int swizzle, int c0, int c1, int dst_offset, int order,
              unsigned long long seed, int landing, uint8_t* out, char* kind, int kind_len, char* msg, int msg_len) {
  return guarded(
      [&] {
        alignas(64) ptx::TmaMap map;
        std::string err;
        if (!ptx::make_tma_map_2d(&map, g, inner, outer, stride, box_inner, box_outer,
                                  static_cast<ptx::TmaSwizzle>(swizzle), &err))
          throw std::invalid_argument(err);
        const int bytes = static_cast<int>(box_inner * box_outer);
        const std::vector<emu::GlobalBuffer> bufs = {
            {g, static_cast<size_t>((outer - 1) * stride + inner), "g", emu::Access::ReadOnly},
            {out, static_cast<size_t>(bytes), "out", emu::Access::Output}};
        emu::launch_checked(dim3(1), dim3(128), static_cast<size_t>(bytes + dst_offset),
                            options(order, seed, landing, 1), "tma_box", bufs, tma_box_kernel, map, c0, c1, bytes,
                            dst_offset, out);
      },
      kind, kind_len, msg, msg_len);
}

// make_tma_map_2d's argument checks alone: 1 and the message if it refuses.
int probe_tma_map_check(unsigned long long base_offset, unsigned long long inner, unsigned long long outer,
                        unsigned long long stride, unsigned box_inner, unsigned box_outer, int swizzle, char* msg,
                        int msg_len) {
  alignas(64) static uint8_t buf[64];
  alignas(64) ptx::TmaMap map;
  std::string err;
  const bool ok = ptx::make_tma_map_2d(&map, buf + base_offset, inner, outer, stride, box_inner, box_outer,
                                       static_cast<ptx::TmaSwizzle>(swizzle), &err);
  copy_out(err, msg, msg_len);
  return ok ? 0 : 1;
}

int probe_wgmma(int n, const uint8_t* image, int image_bytes, const unsigned* a_desc, const unsigned* b_desc, int rs,
                const uint32_t* a_regs, int accumulate, const int32_t* c_init, int32_t* d, int order, int landing,
                char* kind, int kind_len, char* msg, int msg_len) {
  // a_desc / b_desc: {offset, lbo, sbo, swizzle}
  const WgmmaArgs args{image, image_bytes, a_desc[0], a_desc[1], a_desc[2], b_desc[0], b_desc[1], b_desc[2],
                       static_cast<int>(a_desc[3]), static_cast<int>(b_desc[3]), rs, accumulate, a_regs, c_init, d};
  return guarded(
      [&] {
        const emu::Options o = options(order, 0, landing, 1);
        const size_t smem = static_cast<size_t>(image_bytes);
        switch (n) {
          case 8: return emu::launch(dim3(1), dim3(128), smem, o, wgmma_one_kernel<8>, args);
          case 16: return emu::launch(dim3(1), dim3(128), smem, o, wgmma_one_kernel<16>, args);
          case 24: return emu::launch(dim3(1), dim3(128), smem, o, wgmma_one_kernel<24>, args);
          case 32: return emu::launch(dim3(1), dim3(128), smem, o, wgmma_one_kernel<32>, args);
          case 48: return emu::launch(dim3(1), dim3(128), smem, o, wgmma_one_kernel<48>, args);
          case 64: return emu::launch(dim3(1), dim3(128), smem, o, wgmma_one_kernel<64>, args);
          case 128: return emu::launch(dim3(1), dim3(128), smem, o, wgmma_one_kernel<128>, args);
          case 256: return emu::launch(dim3(1), dim3(128), smem, o, wgmma_one_kernel<256>, args);
          default: throw std::invalid_argument("wgmma probe: unsupported N");
        }
      },
      kind, kind_len, msg, msg_len);
}

// The GEMM tile, correct (bug 0) or with one planted bug (Bug's order).
int probe_gemm(int bug, int n, const int8_t* a, const int8_t* b, int m_real, int n_real, int k, int k_pad, int rs,
               int32_t* out, int order, unsigned long long seed, int landing, int race_check, char* kind, int kind_len,
               char* msg, int msg_len) {
  return guarded(
      [&] {
        const emu::Options o = options(order, seed, landing, race_check);
        switch (static_cast<Bug>(bug)) {
          case Bug::None: return gemm_n<Bug::None>(n, o, a, b, m_real, n_real, k, k_pad, rs, out);
          case Bug::NoFinalWait: return gemm_n<Bug::NoFinalWait>(n, o, a, b, m_real, n_real, k, k_pad, rs, out);
          case Bug::WrongParity: return gemm_n<Bug::WrongParity>(n, o, a, b, m_real, n_real, k, k_pad, rs, out);
          case Bug::ExpectTooMany: return gemm_n<Bug::ExpectTooMany>(n, o, a, b, m_real, n_real, k, k_pad, rs, out);
          case Bug::ExpectTooFew: return gemm_n<Bug::ExpectTooFew>(n, o, a, b, m_real, n_real, k, k_pad, rs, out);
          case Bug::NoMbarInitFence:
            return gemm_n<Bug::NoMbarInitFence>(n, o, a, b, m_real, n_real, k, k_pad, rs, out);
          case Bug::SkipWgmma: return gemm_n<Bug::SkipWgmma>(n, o, a, b, m_real, n_real, k, k_pad, rs, out);
          case Bug::NoWgmmaFence: return gemm_n<Bug::NoWgmmaFence>(n, o, a, b, m_real, n_real, k, k_pad, rs, out);
          case Bug::TouchAccum: return gemm_n<Bug::TouchAccum>(n, o, a, b, m_real, n_real, k, k_pad, rs, out);
          case Bug::UseBeforeInit: return gemm_n<Bug::UseBeforeInit>(n, o, a, b, m_real, n_real, k, k_pad, rs, out);
          case Bug::EarlyRelease: return gemm_n<Bug::EarlyRelease>(n, o, a, b, m_real, n_real, k, k_pad, rs, out);
        }
        throw std::invalid_argument("gemm probe: unknown bug");
      },
      kind, kind_len, msg, msg_len);
}

int probe_proxy_fence(int fence, const int8_t* a, const int8_t* b, int32_t* out, char* kind, int kind_len, char* msg,
                      int msg_len) {
  return guarded(
      [&] {
        emu::Options o = options(0, 0, 1, 1);
        if (fence) emu::launch(dim3(1), dim3(128), 8192, o, proxy_fence_kernel<true>, a, b, out);
        else emu::launch(dim3(1), dim3(128), 8192, o, proxy_fence_kernel<false>, a, b, out);
      },
      kind, kind_len, msg, msg_len);
}

int probe_setmaxnreg(int bug, int* out, char* kind, int kind_len, char* msg, int msg_len) {
  return guarded(
      [&] {
        emu::Options o = options(0, 0, 1, 1);
        if (bug) emu::launch(dim3(1), dim3(128), 0, o, setmaxnreg_kernel<true>, out);
        else emu::launch(dim3(1), dim3(128), 0, o, setmaxnreg_kernel<false>, out);
      },
      kind, kind_len, msg, msg_len);
}

// The ring: g is [rows][64] bytes; out gets tiles x 16 rows (zero past `rows`).
int probe_ring(int bug, const uint8_t* g, int rows, int tiles, uint8_t* out, int order, unsigned long long seed,
               int landing, char* kind, int kind_len, char* msg, int msg_len) {
  return guarded(
      [&] {
        alignas(64) ptx::TmaMap map;
        std::string err;
        if (!ptx::make_tma_map_2d(&map, g, 64, static_cast<uint64_t>(rows), 64, 64, 16, ptx::TmaSwizzle::None, &err))
          throw std::invalid_argument(err);
        const std::vector<emu::GlobalBuffer> bufs = {
            {g, static_cast<size_t>(rows) * 64, "g", emu::Access::ReadOnly},
            {out, static_cast<size_t>(tiles) * 1024, "out", emu::Access::Output}};
        const emu::Options o = options(order, seed, landing, 1);
        if (bug == 1) emu::launch_checked(dim3(1), dim3(64), 3072, o, "ring", bufs, ring_kernel<1>, map, tiles, out);
        else if (bug == 2) emu::launch_checked(dim3(1), dim3(64), 3072, o, "ring", bufs, ring_kernel<2>, map, tiles, out);
        else emu::launch_checked(dim3(1), dim3(64), 3072, o, "ring", bufs, ring_kernel<0>, map, tiles, out);
      },
      kind, kind_len, msg, msg_len);
}

int probe_misuse(int mode, const uint8_t* g, char* kind, int kind_len, char* msg, int msg_len) {
  return guarded(
      [&] {
        alignas(64) ptx::TmaMap map;
        std::string err;
        if (!ptx::make_tma_map_2d(&map, g, 64, 16, 64, 64, 16, ptx::TmaSwizzle::None, &err))
          throw std::invalid_argument(err);
        const std::vector<emu::GlobalBuffer> bufs = {{g, 1024, "g", emu::Access::ReadOnly}};
        emu::launch_checked(dim3(1), dim3(64), 1024, options(0, 0, 1, 1), "misuse", bufs, misuse_kernel, map, mode);
      },
      kind, kind_len, msg, msg_len);
}

}  // extern "C"
#pragma GCC visibility pop

// Hopper (sm_90a) int8 GEMMs: TMA loads into a shared-memory ring, warp-specialized, wgmma s8 x s8 -> s32.
// Same contract, weight layouts and epilogue as the mma.sync kernels of gemm.cuh (read its header first):
//
//   y[m, n] = s_a[m] * s_w[n] * sum_k a[m, k] w[n, k] + b[n]                       (W8A8)
//   y[m, n] = s_a[m] * sum_g s_w[g, n] * sum_{k in g} a[m, k] w[n, k] + b[n]       (W4A8, group size G)
//   y[m, n] = s_a[m] * s_w[n] * sum_k a[m, k] (q[k / G, n] w[n, k]) + b[n]           (W4A8, integer group scales)
//
// As in gemm.cuh there is no assembly here (every instruction is a ptx:: call), so the emulator runs this
// source too (csrc/emulated_gemm.cpp under emulator_options(arch="sm_90a")).
//
// ---- Block: one producer warpgroup + CONSUMERS consumer warpgroups (configs/gemm_tiles_sm90.h) -------------
// Thread 0 of the producer warpgroup issues every TMA load; the rest of that warpgroup gives its registers
// away (setmaxnreg) and returns. Consumers wait for a stage to be full, issue its wgmmas, and hand the stage
// back once the wgmmas that read it have completed. No __syncthreads after the barrier init: the stages are
// ordered by mbarriers alone (a split CTA's reduction adds two block barriers after the main loop: Split-K).
//
// ---- The ring: STAGES x (activation tile, weight tile), full[STAGES] and empty[STAGES] mbarriers -------------
// full[s]:  count 1. The producer arrives with expect_tx(tile bytes); the TMA loads complete_tx the same
//           bytes (a box past the matrix edge is zero-filled and still counts its full size), so the phase
//           completes when both tiles have landed. Consumers wait on parity (kt / STAGES) & 1 (kt: the CTA's
//           local k tile index, 0 for its first tile: see Split-K and the schedule).
// empty[s]: count 128 * CONSUMERS: every consumer thread arrives once its wgmmas reading stage s are retired
//           (wgmma_wait_group). The producer waits on parity ((kt / STAGES) & 1) ^ 1 before refilling stage
//           s: for the first round that is the phase "before" the barrier's first, complete at once.
// Zero fill past M, N and K means no masking anywhere in the main loop: zeros add nothing to the sums.
//
// ---- Shared-memory layouts (what TMA writes and what wgmma / ldmatrix read must agree) ---------------------
// 128-byte rows (BK = 128 int8) with the 128-byte swizzle: row r of a tile starts at 128 r and its 16-byte
// chunk c sits at chunk c ^ (r % 8). wgmma descriptor for such a K-major tile: SBO = 1024 (8 rows), LBO
// unused; the k32 step ks starts at byte 32 ks of row 0: the hardware applies the swizzle to the final
// address bits, which is why every tile starts on a 1024-byte boundary.
// W4 weight tiles have 64-byte rows (BK / 2 bytes) with the 64-byte swizzle: chunk c of row r sits at chunk
// c ^ ((r / 2) % 4) of that row (address bits 4-5 XOR bits 7-8): 8 rows read by one ldmatrix matrix fall in
// 8 distinct 16-byte bank groups.
//
// ---- W8A8 (ss): D[BM x BN] = A * W^T ------------------------------------------------------------------------
// Consumer warpgroup c owns rows 64c..64c+63 of the tile: per k32 step one wgmma m64nBNk32 with A and W both
// read from shared memory by descriptors. Per stage: fence, 4 wgmmas, commit, wait_group<1> (the stage just
// issued stays in flight while the previous one is known complete), then the previous stage is released.
// int32 over all of K, as in gemm.cuh (kMaxK keeps it exact).
//
// ---- W4A8 (rs), transposed: D^T[BN x BM] = W * A^T ----------------------------------------------------------
// wgmma's A operand can come from registers, its B only from shared memory; int4 weights must be unpacked
// before a tensor core sees them. So the weights are the A operand (64 output channels per consumer
// warpgroup = wgmma's M), unpacked in registers, and the activation tile is the B operand (BM activation
// rows = wgmma's N, 16..128: a small M costs a small N instead of a mostly empty 64-row M).
// The register A fragment of one warp (rows 16w..16w+15 of the 64) is mma.m16n8k32's A fragment: lane (g, t)
// holds k 4t..4t+3 and 16+4t..16+4t+3 of rows g and g + 8. In the split-nibble layout (gemm.cuh) bytes
// 4t..4t+3 of a row's 16-byte k32 chunk hold exactly those k: low nibbles k 4t.., high nibbles k 16+4t...
// ldmatrix gives lane (g, t) bytes 4t..4t+3 of row g of each 8 x 16 B matrix, so one ldmatrix.x4 over
// (rows 0-7, 8-15) x (two k32 chunks) yields two k32 steps of A, unpacked with two masks per word:
//     a[0] = (r0 << 4) & 0xF0F0F0F0 (row g, k 4t..)      a[2] = r0 & 0xF0F0F0F0 (row g, k 16+4t..)
//     a[1] = (r1 << 4) & 0xF0F0F0F0 (row g + 8, k 4t..)  a[3] = r1 & 0xF0F0F0F0 (row g + 8, k 16+4t..)
// Each int8 is 16 w; the 1/16 is folded into the fp32 group scale (exact: a power of two).
//
// Group rescale, pipelined within a stage: a group's int32 partial (|.| <= 127 * 128 * G < 2^24, exact in
// fp32) is folded into the fp32 sums with one fma per element once the group's wgmmas have completed.
// wgmmas are committed in units of min(G, 64) k (one or two k32 steps); after committing a unit,
// wait_group<1> proves the previous one complete. When G < BK a stage holds 2 or 4 groups: two accumulator
// sets alternate by group parity (static: the unit index), so group j + 1's wgmmas run while group j's
// partial (the other set) is folded. The stage's last unit ends a group (when G <= BK, or every G / BK stages
// otherwise); there the consumer drains (wait_group<0>), folds and releases the stage. Why drain rather than
// keep that unit in flight into the next stage: ptxas cannot follow a wgmma group across the loop's back edge,
// and a fold (a non-wgmma read of accumulators) after it makes it serialize every wgmma of the kernel (C7514;
// measured: a DEPBAR 0x0 after each IGMMA). One drain per stage (per group when G > BK) is the price; the
// other consumer warpgroup of the 2-warpgroup tile keeps the tensor cores busy meanwhile. A stage that does
// not end a group (G > BK) is released one unit later, like W8A8's. A unit never writes the A registers of
// the unit in flight (each k32 step of a stage has its own, and a stage has at least two units): a wgmma's
// registers must not change until it completes.
//
// ---- Split-K and the schedule -----------------------------------------------------------------------------------
// A Hopper CTA takes a whole SM, so a grid runs in waves of SM-count CTAs. At batch 1 a DiT layer has too few
// output tiles (M = 512, N = 1152: 36 tiles of 128 x 128 on 132 SMs), or a last wave with most SMs idle (N = 4608:
// 144 tiles = one wave + 12, two tile times for 1.09 waves of work). Schedule: the grid is 1-D; the first
// p.dp_tiles CTAs run one output tile each over all of K, and every remaining tile is split into p.splits CTAs
// over K (work_unit below). dp_tiles = 0 is the uniform split-K of every tile (a grid under one wave, split
// automatically or by a forced count), splits = 1 no split; a forced count past one wave splits the last wave's
// tiles (sm90_forced_schedule); the automatic schedule (configs/gemm_tiles_sm90.h sm90_auto_schedule)
// runs the full waves whole and splits only the last wave's tiles, so the tail is one short wave (144 tiles:
// 132 whole + 12 x 9 slices of one k unit each, ~ 1 + 1 / 9 tile times instead of 2). A whole tile's CTA runs
// exactly the unsplit kernel: it never touches the counters or the workspace, which cover the split tiles alone.
// A split CTA sums whole units of k tiles, as gemm.cuh does (units of BK = 128 k for W8;
// for W4 max(G, BK) k, so a group never straddles two splits and every split's last stage ends a group): CTA z
// walks k tiles kt0 .. kt0 + KT - 1 (k_range). Producer and consumers index the ring by the local tile index
// 0 .. KT - 1, so stages and mbarrier parities restart at every split exactly as for a whole-K CTA; only the
// producer's TMA coordinates add kt0, and W4 counts its groups from the split's first one (a row offset of the
// scales), so the consumers' main loops are the unsplit ones (no extra work per k tile).
// After the main loop each consumer thread stores its accumulators (W8: BN / 2 int32; W4: BM / 2 fp32 sums of
// whole groups) to the workspace and fences; the last CTA of the output tile to arrive (an atomic counter per
// tile, reset to zero by that CTA) reloads every split's partial, adds them in split order 0..S-1 and runs the
// epilogue once. W8 partials are int32: identical bits for every split count; W4 partials are added in a fixed
// order: fixed bits for a given count. The reduction is gemm.cuh's reduce_splits on a flat accumulator array
// (reduce_splits_flat below; the binding sizes workspace and counters for the split tiles of the schedule).
// The count needs two block-wide barriers, and the producer warpgroup returns early in the unsplit kernel
// (after setmaxnreg). A __syncthreads waiting on exited threads is undefined (the emulator reports it), so
// in a split CTA the producer warpgroup stays alive: its idle threads go straight to the reduction's barriers,
// its issuing thread after its last TMA load, and thread 0 (that issuing thread, which holds no accumulators)
// does the atomic count. That keeps every barrier a plain __syncthreads; a named barrier over the consumers
// alone (bar.sync id, 128 * CONSUMERS) would need a new ptx.cuh instruction with an emulated twin, for two
// barriers per CTA. The flag the count hands the block goes through the ring's first word: by the first
// barrier every TMA load has landed (consumers waited on every full phase) and every wgmma / ldmatrix reading
// the ring has retired.
//
// ---- Epilogue -------------------------------------------------------------------------------------------------
// A policy, as in gemm.cuh (template parameter Epi of both bodies): PlainEpilogue (gemm_w8a8 / gemm_w4a8: cast
// and store) or FusedEpilogue (gemm_*_fused with an int8 a: GELU, gate, residual, int8 output for the next
// layer). Constructed once per consumer thread after the main loop (FusedEpilogue reads out_scale there), it
// gets y = acc * scale (+ bias) as column pairs (n, n + 1) of row m with n even: exactly what
// the mma.sync kernels hand it; the plain policy is store_pair itself, so the plain kernels compile as before.
// The accumulator fragment of wgmma m64nN is mma.m16n8's C fragment repeated N / 8 times per warp: d[i] is
// row 16w + g + 8 ((i >> 1) & 1), column 8 (i >> 2) + 2t + (i & 1). W8A8 hands column pairs over directly.
// W4A8's tile is transposed (row = channel n, column = activation row m), so a lane's pair is two rows of y:
// one shuffle with the lane holding the neighbouring channel makes column pairs again, before the policy sees
// them (its gate / residual / int8 stores then run on column pairs of one row, as on the mma.sync path). (A
// transpose through shared memory would give full-row stores; it needs a warpgroup-wide named barrier, which
// ptx.cuh does not have yet.)
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "gemm.cuh"
#include "configs/gemm_tiles_sm90.h"

namespace ditq::gemm::sm90 {

// Everything a Hopper kernel reads: TMA maps first (64-byte aligned CUtensorMaps, read by the TMA unit from
// the kernel's parameter space: the kernel takes this struct as a `const __grid_constant__`).
struct Sm90Params {
  ptx::TmaMap a_map;  // int8 [M, K], box 128 x BM, 128-byte swizzle
  ptx::TmaMap w_map;  // W8: int8 [N, K], box 128 x BN, 128-byte swizzle; W4: uint8 [N, K / 2], box 64 x BN, 64 B
  GemmParams p;
};

template <int BM_, int BN_, int STAGES_, int CONSUMERS_>
struct Sm90Tile {
  static constexpr int BM = BM_, BN = BN_, BK = kSm90BK, STAGES = STAGES_, CONSUMERS = CONSUMERS_;
  static constexpr int THREADS = 128 * (1 + CONSUMERS);
  static_assert(STAGES >= 2, "a ring needs two stages");
};

// Registers per thread after setmaxnreg: the producer warpgroup keeps 40 (one thread issues TMA), consumers
// take 232: (40 + 2 * 232) * 128 = 64512 <= 65536 registers of an SM, with two consumer warpgroups.
constexpr int kProducerRegs = 40, kConsumerRegs = 232;

template <class T, bool W4>
struct Ring {
  static constexpr int A_STAGE = T::BM * T::BK;                  // activation tile bytes
  static constexpr int W_STAGE = T::BN * (W4 ? T::BK / 2 : T::BK);  // weight tile bytes
  static constexpr uint32_t TX = A_STAGE + W_STAGE;              // bytes a full phase receives
  static_assert(A_STAGE % 1024 == 0 && W_STAGE % 1024 == 0, "tiles must keep the 1024-byte swizzle alignment");
  uint8_t* a;
  uint8_t* w;
  uint64_t* full;
  uint64_t* empty;
  DITQ_DEVICE explicit Ring(uint8_t* smem)
      : a(smem), w(smem + T::STAGES * A_STAGE),
        full(reinterpret_cast<uint64_t*>(smem + T::STAGES * (A_STAGE + W_STAGE))), empty(full + T::STAGES) {}
  DITQ_DEVICE uint8_t* a_stage(int s) const { return a + s * A_STAGE; }
  DITQ_DEVICE uint8_t* w_stage(int s) const { return w + s * W_STAGE; }
};
static_assert(sm90_smem_bytes(64, 128, 2, false) == 2 * (64 + 128) * 128 + 32, "smem formula and Ring agree");

// The producer warpgroup: gives its registers to the consumers, then thread 0 issues every TMA load (two boxes
// per stage, both completing on the stage's full barrier) of the CTA's k tiles kt0..kt0 + KT - 1. Stages and
// parities follow the local index kt, as the consumers' do. Returns for every producer thread.
template <class T, bool W4>
DITQ_DEVICE void produce(const Sm90Params& P, const Ring<T, W4>& ring, int m0, int n0, int kt0, int KT) {
  ptx::setmaxnreg_dec<kProducerRegs>();
  if (threadIdx.x != 0) return;
  for (int kt = 0; kt < KT; ++kt) {
    const int s = kt % T::STAGES;
    const uint32_t round = static_cast<uint32_t>(kt / T::STAGES);
    ptx::mbarrier_wait_parity(ring.empty + s, (round & 1u) ^ 1u);  // round 0: passes at once
    ptx::mbarrier_arrive_expect_tx(ring.full + s, Ring<T, W4>::TX);
    ptx::tma_load_2d(ring.a_stage(s), &P.a_map, (kt0 + kt) * T::BK, m0, ring.full + s);
    ptx::tma_load_2d(ring.w_stage(s), &P.w_map, (kt0 + kt) * (W4 ? T::BK / 2 : T::BK), n0, ring.full + s);
  }
}

template <class T, bool W4>
DITQ_DEVICE void init_barriers(const Sm90Params& P, const Ring<T, W4>& ring) {
  if (threadIdx.x == 0) {
    ptx::prefetch_tma_map(&P.a_map);
    ptx::prefetch_tma_map(&P.w_map);
#pragma unroll 1
    for (int s = 0; s < T::STAGES; ++s) {
      ptx::mbarrier_init(ring.full + s, 1);
      ptx::mbarrier_init(ring.empty + s, 128 * T::CONSUMERS);
    }
    ptx::fence_mbarrier_init();
  }
  __syncthreads();  // every thread sees initialized mbarriers; the main loop has no other block barrier (a
                    // split CTA's reduction adds two, last_split's)
}

// Descriptor of a K-major, 128-byte-swizzled operand tile whose rows are 128 bytes, at k32 step ks.
DITQ_DEVICE uint64_t desc_sw128(const uint8_t* tile, int ks) {
  return ptx::wgmma_smem_desc(tile + 32 * ks, ptx::WgmmaSwizzle::B128, 16, 1024);
}

// ---- Work units: which output tile, which k range (Split-K and the schedule, at the top of the file) --------------
// A 1-D grid of p.dp_tiles + (tiles - p.dp_tiles) * p.splits CTAs (tiles = output tiles of BM x BN, numbered
// with n fastest within m, so that CTAs launched together share rows of A in L2). CTA b < dp_tiles runs tile b
// whole; the others run split z of the split tiles dp_tiles.., split-major (every split tile's first slice,
// then every second one: a tile's slices are spread over the wave, not bunched). With splits == 1 every CTA is
// whole whatever dp_tiles is; dp_tiles == 0 is the uniform split-K of every tile. `tile` indexes the counters
// and the workspace, which cover the split tiles only: a whole tile never touches them.
struct WorkUnit {
  int m0, n0;  // the output tile's first row and column
  int tile;    // split tiles only: the tile's index among them (counters, workspace)
  int z;       // split index 0 .. splits - 1 (0 for a whole tile)
  bool split;  // part of a split tile: store the partial, count, the last CTA reduces
};
template <class T>
DITQ_DEVICE WorkUnit work_unit(const GemmParams& p) {
  const int tiles_n = (p.N + T::BN - 1) / T::BN;
  const int b = static_cast<int>(blockIdx.x);
  WorkUnit u{0, 0, 0, 0, false};
  int tile = b;
  if (p.splits > 1 && b >= p.dp_tiles) {
    const int split_tiles = tiles_n * ((p.M + T::BM - 1) / T::BM) - p.dp_tiles;
    const int q = b - p.dp_tiles;
    u.z = q / split_tiles;
    u.tile = q - u.z * split_tiles;
    u.split = true;
    tile = p.dp_tiles + u.tile;
  }
  const int tm = tile / tiles_n;
  u.m0 = tm * T::BM;
  u.n0 = (tile - tm * tiles_n) * T::BN;
  return u;
}

// This CTA's k tiles [kt0, kt0 + count): split z of `splits` over whole units of UNIT_TILES k tiles, as gemm.cuh's
// gemm_body (a W4 group never straddles two splits). A whole tile (splits 1): [0, KT).
struct KRange {
  int kt0, count;
};
template <int UNIT_TILES>
DITQ_DEVICE KRange k_range(int K, int z, int splits) {
  const int KT = (K + kSm90BK - 1) / kSm90BK;  // the last k tile may be partial (zero-filled by TMA)
  const int units = (KT + UNIT_TILES - 1) / UNIT_TILES;
  const int kt0 = (z * units / splits) * UNIT_TILES, end = ((z + 1) * units / splits) * UNIT_TILES;
  return {kt0, (end < KT ? end : KT) - kt0};
}

// Workspace word of element e of split zz's partial, for consumer thread ct (0 .. 128 * CONSUMERS - 1) of split
// tile `tile`: consecutive threads store consecutive words. E words per thread, so a tile holds
// E * 128 * CONSUMERS = BM * BN words; the workspace is splits x split tiles of them (the binding sizes it).
template <class T, int E>
DITQ_DEVICE int64_t split_word(const GemmParams& p, int tile, int zz, int e, int ct) {
  const int64_t tiles = static_cast<int64_t>((p.M + T::BM - 1) / T::BM) * ((p.N + T::BN - 1) / T::BN) - p.dp_tiles;
  return ((zz * tiles + tile) * E + e) * (128 * T::CONSUMERS) + ct;
}

// Every thread of the block, once every consumer has stored its partial and fenced: thread 0 (the producer's
// issuing thread) counts the CTA in; true in every thread of the last CTA of the output tile to arrive. The
// flag goes through the first word of the ring: by the first barrier every TMA load has landed (consumers
// waited on every full phase) and every wgmma / ldmatrix reading the ring has retired.
DITQ_DEVICE bool last_split(const GemmParams& p, int tile, uint8_t* smem) {
  __syncthreads();  // every consumer's partial stored and fenced
  int* flag = reinterpret_cast<int*>(smem);
  if (threadIdx.x == 0) {
    const int last = ptx::atomic_add_gpu(p.counters + tile, 1) == p.splits - 1;
    if (last) ptx::st_global(p.counters + tile, 0);  // leave the counters zeroed for the next launch
    ptx::st_shared(flag, last);
  }
  __syncthreads();
  return ptx::ld_shared(flag) != 0;
}

// A consumer thread's part of the reduction: store its E partial sums (int32 for W8, fp32 for W4), then, in the
// last CTA, replace them with the sum of every split's partial in split order 0..S-1 (so the float result never
// depends on which CTA arrives last; int32 sums wrap as the wgmma accumulates). False: not the last CTA.
// gemm.cuh's reduce_splits with a flat accumulator array and the split loop outside: one split's E loads are
// independent, so they are all in flight at once instead of S dependent loads per element.
template <class T, int E, class V>
DITQ_DEVICE bool reduce_splits_flat(const GemmParams& p, const WorkUnit& u, V (&v)[E], int ct, uint8_t* smem) {
#pragma unroll
  for (int e = 0; e < E; ++e) {
    uint32_t b;
    std::memcpy(&b, &v[e], 4);
    ptx::st_global(p.workspace + split_word<T, E>(p, u.tile, u.z, e, ct), b);
  }
  ptx::fence_gpu();  // release: the partial is visible before this CTA is counted
  if (!last_split(p, u.tile, smem)) return false;
  ptx::fence_gpu();  // acquire: the other CTAs' partials
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const uint32_t b = ptx::ld_cg(p.workspace + split_word<T, E>(p, u.tile, 0, e, ct));
    std::memcpy(&v[e], &b, 4);
  }
#pragma unroll 1  // S is small and runtime
  for (int zz = 1; zz < p.splits; ++zz) {
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const uint32_t b = ptx::ld_cg(p.workspace + split_word<T, E>(p, u.tile, zz, e, ct));
      if constexpr (std::is_same_v<V, float>) {
        float f;
        std::memcpy(&f, &b, 4);
        v[e] = __fadd_rn(v[e], f);
      } else {
        v[e] = static_cast<int32_t>(static_cast<uint32_t>(v[e]) + b);
      }
    }
  }
  return true;
}

// ---- W8A8 -----------------------------------------------------------------------------------------------------
template <class T, class Epi = PlainEpilogue>
DITQ_DEVICE void gemm_w8a8_sm90_body(const Sm90Params& P, uint8_t* smem) {
  static_assert(T::BM == 64 * T::CONSUMERS, "W8A8: each consumer warpgroup owns 64 rows of the tile");
  static_assert(T::BN % 16 == 0 && T::BN >= 16 && T::BN <= 256, "W8A8: BN is wgmma's N (16..256, step 16)");
  const GemmParams& p = P.p;
  const Ring<T, false> ring(smem);
  const WorkUnit u = work_unit<T>(p);
  const int m0 = u.m0, n0 = u.n0;
  const KRange kr = k_range<1>(p.K, u.z, u.split ? p.splits : 1);  // k tiles kt0.. of this split (all K: whole)
  const int KT = kr.count;
  init_barriers<T, false>(P, ring);
  const int wg = static_cast<int>(threadIdx.x) / 128;
  if (wg == 0) {
    produce<T, false>(P, ring, m0, n0, kr.kt0, KT);
    if (u.split) last_split(p, u.tile, smem);  // the reduction's block barriers count every thread
    return;
  }
  ptx::setmaxnreg_inc<kConsumerRegs>();

  const int cw = wg - 1;  // consumer warpgroup: rows 64 cw.. of the tile
  int32_t acc[T::BN / 2];
#pragma unroll
  for (int i = 0; i < T::BN / 2; ++i) acc[i] = 0;  // defined values (the first wgmma does not read them)
  for (int kt = 0; kt < KT; ++kt) {
    const int s = kt % T::STAGES;
    ptx::mbarrier_wait_parity(ring.full + s, static_cast<uint32_t>(kt / T::STAGES) & 1u);
    const uint8_t* a_tile = ring.a_stage(s) + cw * 64 * T::BK;
    const uint8_t* w_tile = ring.w_stage(s);
    ptx::wgmma_fence_operands(acc);
    ptx::wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < T::BK / 32; ++ks)
      ptx::wgmma_m64k32_s8_ss<T::BN>(acc, desc_sw128(a_tile, ks), desc_sw128(w_tile, ks), kt > 0 || ks > 0);
    ptx::wgmma_commit_group();
    ptx::wgmma_wait_group<1>();  // stage kt's wgmmas stay in flight; stage kt - 1's are complete
    ptx::wgmma_fence_operands(acc);
    if (kt > 0) ptx::mbarrier_arrive(ring.empty + (kt - 1) % T::STAGES);
  }
  ptx::wgmma_wait_group<0>();
  ptx::wgmma_fence_operands(acc);
  if (u.split && !reduce_splits_flat<T, T::BN / 2>(p, u, acc, static_cast<int>(threadIdx.x) - 128, smem)) return;

  // Epilogue: d[i] = row 16w + g + 8 ((i >> 1) & 1), column 8 (i >> 2) + 2t + (i & 1) of this warpgroup's 64.
  const Epi epi(p);
  const int lane = static_cast<int>(threadIdx.x) & 31, w = (static_cast<int>(threadIdx.x) >> 5) & 3;
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int m = m0 + cw * 64 + 16 * w + g + 8 * h;
    if (m >= p.M) continue;
    const float sa = ptx::ld_global(p.a_scale + (p.a_scale_per_token ? m : 0));
#pragma unroll
    for (int j = 0; j < T::BN / 8; ++j) {
      const int n = n0 + 8 * j + 2 * t;
      if (n >= p.N) continue;
      float y[2];
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int nn = n + c < p.N ? n + c : p.N - 1;  // clamp the loads; the policy stores n + c < N only
        y[c] = scale_bias(p, __int2float_rn(acc[4 * j + 2 * h + c]), column_scale<W8>(p, sa, nn), nn);
      }
      epi.store(p, m, n, y);
    }
  }
}

// ---- W4A8 -----------------------------------------------------------------------------------------------------
// Byte offset of 16-byte chunk `chunk` of row `row` in a 64-byte-row tile written by TMA with the 64-byte
// swizzle (address bits 4-5 ^= bits 7-8; the tile starts on a 1024-byte boundary).
DITQ_DEVICE int sw64_offset(int row, int chunk) { return row * 64 + ((chunk ^ ((row >> 1) & 3)) << 4); }

// The W4A8 epilogue, transposed: element i of a lane's accumulators is channel 16w + g + 8 ((i >> 1) & 1),
// activation row 8 (i >> 2) + 2t + (i & 1). A lane holds channel n for rows r, r + 1; lane ^ 4 holds channel n ^ 1
// for the same rows. One shuffle per pair turns that into column pairs of y: the even-g lane stores (n, n + 1) of
// row r, the odd-g lane (n - 1, n) of row r + 1, through the epilogue policy (plain: store_pair, half the stores,
// 4 or 8 bytes wide). value(i, s_a, n) is element i's y before the policy (scale and bias applied).
template <class T, class Epi, class Value>
DITQ_DEVICE void store_w4_tile(const GemmParams& p, int m0, int ch0, int ch1, int lane, Value value) {
  const Epi epi(p);
  const int g = lane >> 2, t = lane & 3;
  const bool odd = (g & 1) != 0;
#pragma unroll
  for (int j = 0; j < T::BM / 8; ++j) {
    const int r = m0 + 8 * j + 2 * t;
    float sa[2];
#pragma unroll
    for (int c = 0; c < 2; ++c) {  // clamped: rows past M are computed (never stored) so the shuffle is uniform
      const int m = r + c < p.M ? r + c : p.M - 1;
      sa[c] = ptx::ld_global(p.a_scale + (p.a_scale_per_token ? m : 0));
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int n = h ? ch1 : ch0;
      const int nn = n < p.N ? n : p.N - 1;  // clamp the loads; the store below checks the columns
      float y[2];
#pragma unroll
      for (int c = 0; c < 2; ++c) y[c] = value(4 * j + 2 * h + c, sa[c], nn);
      const float other = ptx::shfl_xor(odd ? y[0] : y[1], 4);  // every lane: a warp collective
      const int m = odd ? r + 1 : r;
      const int n_pair = odd ? n - 1 : n;  // n = n0 + 64cw + 16w + g (+ 8) has g's parity: n_pair is even, aligned
      float pair[2] = {odd ? other : y[0], odd ? y[1] : other};  // the fused policy works on it in place
      if (m < p.M && n_pair < p.N) epi.store(p, m, n_pair, pair);
    }
  }
}

// ---- W4A8 with integer group scales --------------------------------------------------------------------------
// Two-level scales (progressive group quantization, as in QServe): w_scale[n] is a float scale per output channel
// and w_qscale[g, n] a small integer q in [1, 16] per group, so the weight is s_w[n] * q[g, n] * w[n, k]. The
// products q * w (|q * w| <= 128) are int8, so the unpack below writes them straight into the A fragment and one
// int32 accumulator runs over all of K, as in W8A8: no per-group fold (one int->float conversion and one fma per
// accumulator element and group, 2 x BM / 2 instructions per lane and group), no drain of the wgmma pipeline at a
// group's end, int32 split-K partials (the same bits for every split count), and W8A8's epilogue: the result is
// gemm_w8a8 of the int8 weights q * w with the channel scales, bit for bit.
//
// The unpack of four nibbles (one byte each after masking) into four int8 q * w, in three instructions:
//     u     = (r ^ 0x88888888) & 0x0F0F0F0F     bytes u = w + 8 in [0, 15] (two's complement nibble ^ 8)
//     biased = u * q + (128 - 8 q) * 0x01010101  bytes q * w + 128 in [0, 248]: every byte's sum stays below
//                                                256 (q <= 16), so the 32-bit multiply-add has no carry between
//                                                bytes
//     a     = biased ^ 0x80808080               bytes q * w + 128 - 128 (mod 256) = q * w as int8
// The high nibbles take one more instruction (a shift). The zero-filled rows and k past N and K unpack to
// u = 8, i.e. w = 0, whatever q is (q = 0 is passed for them: no scale read past the matrix).
DITQ_DEVICE uint32_t scaled_nibbles(uint32_t nibbles, uint32_t q, uint32_t bias) {
  return (((nibbles ^ 0x88888888u) & 0x0F0F0F0Fu) * q + bias) ^ 0x80808080u;
}
DITQ_DEVICE uint32_t nibble_bias(uint32_t q) { return 0x80808080u - q * 0x08080808u; }  // (128 - 8 q) per byte

// The main loop with integer group scales: units of 64 k (two k32 steps, one ldmatrix.x4), each committed as
// one wgmma group and kept in flight while the next unit is built (wait_group<1>), so a stage is released one
// unit after its last, as W8A8 does. q for the groups of the next stage is loaded while this one runs (its
// latency would otherwise stall the unpack that needs it). k_start: the split's first k (a group boundary, as
// for float scales: the binding's split counts are the same for both).
template <class T, int G>
DITQ_DEVICE void w4_int_scales_mainloop(const GemmParams& p, const Ring<T, true>& ring, int KT, int k_start,
                                        int ch0, int ch1, int ld_row, int ld_half, int32_t (&acc)[T::BM / 2]) {
  constexpr int BK = T::BK, BM = T::BM, KSTEPS = BK / 32, UNITS = BK / 64;
  constexpr int GROUPS = G < BK ? BK / G : 1;    // groups one stage touches (a stage never straddles two when G > BK)
  constexpr int STEPS_PER_GROUP = G < BK ? G / 32 : KSTEPS;
  static_assert(UNITS >= 2, "a unit must not reuse the A registers of the unit in flight");
  const int kgroups = p.K / G;
  auto load_q = [&](uint32_t (&q)[GROUPS][2], int kt) {
#pragma unroll
    for (int j = 0; j < GROUPS; ++j) {
      const int grp = (k_start + kt * BK + j * (G < BK ? G : BK)) / G;
      const int32_t* row = p.w_qscale + static_cast<int64_t>(grp) * p.N;
      const bool in = kt < KT && grp < kgroups;
      q[j][0] = in && ch0 < p.N ? static_cast<uint32_t>(ptx::ld_global(row + ch0)) : 0u;
      q[j][1] = in && ch1 < p.N ? static_cast<uint32_t>(ptx::ld_global(row + ch1)) : 0u;
    }
  };
#pragma unroll
  for (int i = 0; i < BM / 2; ++i) acc[i] = 0;
  uint32_t q_next[GROUPS][2];
  load_q(q_next, 0);
  uint32_t af[KSTEPS][4];
  int pending_stage = -1;
  for (int kt = 0; kt < KT; ++kt) {
    uint32_t q[GROUPS][2], bias[GROUPS][2];
#pragma unroll
    for (int j = 0; j < GROUPS; ++j) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        q[j][h] = q_next[j][h];
        bias[j][h] = nibble_bias(q[j][h]);
      }
    }
    load_q(q_next, kt + 1);
    const int s = kt % T::STAGES;
    ptx::mbarrier_wait_parity(ring.full + s, static_cast<uint32_t>(kt / T::STAGES) & 1u);
    const uint8_t* a_tile = ring.a_stage(s);
    const uint8_t* w_tile = ring.w_stage(s);
#pragma unroll
    for (int j = 0; j < UNITS; ++j) {
      uint32_t r[4];
      ptx::ldmatrix_x4(r, w_tile + sw64_offset(ld_row, 2 * j + ld_half));
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int ks = 2 * j + c, grp = ks / STEPS_PER_GROUP;
        uint32_t(&a)[4] = af[ks];
        // rows g (channel ch0) and g + 8 (ch1): low nibbles k 4t.., high nibbles k 16 + 4t.. (the top of the file)
        a[0] = scaled_nibbles(r[2 * c], q[grp][0], bias[grp][0]);
        a[1] = scaled_nibbles(r[2 * c + 1], q[grp][1], bias[grp][1]);
        a[2] = scaled_nibbles(r[2 * c] >> 4, q[grp][0], bias[grp][0]);
        a[3] = scaled_nibbles(r[2 * c + 1] >> 4, q[grp][1], bias[grp][1]);
      }
      ptx::wgmma_fence_operands(acc);
      ptx::wgmma_fence();  // the A registers were just written
#pragma unroll
      for (int c = 0; c < 2; ++c)
        ptx::wgmma_m64k32_s8_rs<BM>(acc, af[2 * j + c], desc_sw128(a_tile, 2 * j + c), kt > 0 || j > 0 || c > 0);
      ptx::wgmma_commit_group();
      ptx::wgmma_wait_group<1>();  // this unit stays in flight; the previous one (this stage's or the last
                                   // stage's last) is complete
      ptx::wgmma_fence_operands(acc);
      if (j == 0 && pending_stage >= 0) {
        ptx::mbarrier_arrive(ring.empty + pending_stage);
        pending_stage = -1;
      }
      if (j == UNITS - 1) pending_stage = s;
    }
  }
  ptx::wgmma_wait_group<0>();  // the last stage needs no release: the producer has issued every load
  ptx::wgmma_fence_operands(acc);
}

template <class T, int G, class Epi = PlainEpilogue, bool INT_SCALES = false>
DITQ_DEVICE void gemm_w4a8_sm90_body(const Sm90Params& P, uint8_t* smem) {
  static_assert(is_w4_group_size(G), "W4A8 group sizes are listed in configs/kernel_families.h");
  constexpr int BK = T::BK, BM = T::BM, KSTEPS = BK / 32;
  constexpr int UNIT_K = G < 64 ? G : 64;             // k per wgmma commit group
  constexpr int UNITS = BK / UNIT_K;                   // per stage: 2 or 4
  constexpr int STEPS_PER_UNIT = UNIT_K / 32;
  static_assert(UNITS >= 2, "a unit must not reuse the A registers of the unit in flight");
  static_assert(G >= BK || BK % G == 0, "groups tile a stage");
  static_assert(BM == 8 || BM == 16 || BM == 24 || (BM % 16 == 0 && BM >= 32 && BM <= 256), "BM is wgmma's N");
  static_assert(T::BN == 64 * T::CONSUMERS, "W4A8: each consumer warpgroup owns 64 output channels");

  const GemmParams& p = P.p;
  const Ring<T, true> ring(smem);
  const WorkUnit u = work_unit<T>(p);
  const int m0 = u.m0, n0 = u.n0;
  const KRange kr = k_range<(G > BK ? G / BK : 1)>(p.K, u.z, u.split ? p.splits : 1);  // whole groups per split
  const int KT = kr.count;
  init_barriers<T, true>(P, ring);
  const int wg = static_cast<int>(threadIdx.x) / 128;
  if (wg == 0) {
    produce<T, true>(P, ring, m0, n0, kr.kt0, KT);
    if (u.split) last_split(p, u.tile, smem);  // the reduction's block barriers count every thread
    return;
  }
  ptx::setmaxnreg_inc<kConsumerRegs>();

  const int cw = wg - 1;
  const int lane = static_cast<int>(threadIdx.x) & 31, w = (static_cast<int>(threadIdx.x) >> 5) & 3;
  const int g = lane >> 2;
  // This lane's two output channels (rows of the transposed tile) and its ldmatrix row: lanes 0-15 address
  // rows 16w + (lane & 15) of this warpgroup's 64 (matrices rows 0-7 and 8-15), lanes 16-31 the same rows in
  // the next k32 chunk.
  const int ch0 = n0 + cw * 64 + 16 * w + g, ch1 = ch0 + 8;
  const int ld_row = cw * 64 + 16 * w + (lane & 15);
  const int ld_half = lane >> 4;

  if constexpr (INT_SCALES) {  // one int32 sum of q * w over all of K: W8A8's reduction and epilogue
    int32_t acc[BM / 2];
    w4_int_scales_mainloop<T, G>(p, ring, KT, kr.kt0 * BK, ch0, ch1, ld_row, ld_half, acc);
    if (u.split && !reduce_splits_flat<T, BM / 2>(p, u, acc, static_cast<int>(threadIdx.x) - 128, smem)) return;
    store_w4_tile<T, Epi>(p, m0, ch0, ch1, lane, [&](int i, float sa, int nn) {
      return scale_bias(p, __int2float_rn(acc[i]), column_scale<W8>(p, sa, nn), nn);
    });
  } else {  // float group scales: a partial per group, folded into fp32 sums
    // The split starts on a group boundary (whole units), so the main loop counts k and groups from the split's
    // start, exactly as the unsplit kernel does from 0, and the split's first group row of scales is the base.
    const int group0 = kr.kt0 * BK / G;
    const int ngroups = p.K / G - group0;  // K % G == 0 (checked by the binding)
    const float* const w_scale = p.w_scale + static_cast<int64_t>(group0) * p.N;
    constexpr int SETS = G < BK ? 2 : 1;  // ping-pong only where a stage holds several groups (see the top)
    int32_t acc[SETS][BM / 2];            // group partials of 16 w
    float facc[BM / 2];
#pragma unroll
    for (int i = 0; i < BM / 2; ++i) {
#pragma unroll
      for (int q = 0; q < SETS; ++q) acc[q][i] = 0;
      facc[i] = 0.0f;
    }
    // facc += float(partial) * s_w[grp, n] / 16 for this lane's two channels; past N the partial is 0 (zero-
    // filled rows) and no scale is read; groups past K (the zero-filled tail of the last stage) are skipped.
    auto fold = [&](const int32_t(&part)[BM / 2], int grp) {
      if (grp >= ngroups) return;
      const float* srow = w_scale + static_cast<int64_t>(grp) * p.N;
      const float s0 = ch0 < p.N ? __fmul_rn(ptx::ld_global(srow + ch0), 0.0625f) : 0.0f;  // exact: 2^-4
      const float s1 = ch1 < p.N ? __fmul_rn(ptx::ld_global(srow + ch1), 0.0625f) : 0.0f;
#pragma unroll
      for (int i = 0; i < BM / 2; ++i)
        facc[i] = __fmaf_rn(__int2float_rn(part[i]), ((i >> 1) & 1) ? s1 : s0, facc[i]);
    };

    uint32_t af[KSTEPS][4];  // one register A fragment per k32 step of a stage (see the top of the file)
    int pending_stage = -1;  // a stage whose last unit was left in flight: released once that unit completes

    for (int kt = 0; kt < KT; ++kt) {
      const int s = kt % T::STAGES;
      ptx::mbarrier_wait_parity(ring.full + s, static_cast<uint32_t>(kt / T::STAGES) & 1u);
      const uint8_t* a_tile = ring.a_stage(s);
      const uint8_t* w_tile = ring.w_stage(s);
      const int k0 = kt * BK;  // from the split's first k (a group boundary): see w_scale above
#pragma unroll
      for (int j = 0; j < UNITS; ++j) {
        // Everything about a unit's group is static: a stage starts on a group boundary when G <= BK, and
        // when G > BK whether it does is the one runtime fact (k0 % G).
        const int set = G < BK ? (j * UNIT_K / G) & 1 : 0;
        const unsigned uk0 = static_cast<unsigned>(k0);
        const bool group_start = G <= BK ? (j * UNIT_K) % G == 0 : j == 0 && uk0 % G == 0;
        const bool group_end = G <= BK ? ((j + 1) * UNIT_K) % G == 0 : j == UNITS - 1 && (uk0 + BK) % G == 0;
        // A fragments of this unit's k32 steps (ldmatrix.x4 = two steps; x2 = one).
        if constexpr (STEPS_PER_UNIT == 2) {
          uint32_t r[4];
          ptx::ldmatrix_x4(r, w_tile + sw64_offset(ld_row, 2 * j + ld_half));
#pragma unroll
          for (int q = 0; q < 2; ++q) {
            uint32_t(&a)[4] = af[2 * j + q];
            a[0] = (r[2 * q] << 4) & 0xF0F0F0F0u;
            a[1] = (r[2 * q + 1] << 4) & 0xF0F0F0F0u;
            a[2] = r[2 * q] & 0xF0F0F0F0u;
            a[3] = r[2 * q + 1] & 0xF0F0F0F0u;
          }
        } else {
          uint32_t r[2];
          ptx::ldmatrix_x2(r, w_tile + sw64_offset(ld_row, j));  // lanes 16-31's addresses are unused
          uint32_t(&a)[4] = af[j];
          a[0] = (r[0] << 4) & 0xF0F0F0F0u;
          a[1] = (r[1] << 4) & 0xF0F0F0F0u;
          a[2] = r[0] & 0xF0F0F0F0u;
          a[3] = r[1] & 0xF0F0F0F0u;
        }
        ptx::wgmma_fence_operands(acc[set]);
        ptx::wgmma_fence();  // the A registers were just written
#pragma unroll
        for (int q = 0; q < STEPS_PER_UNIT; ++q) {
          const int ks = j * STEPS_PER_UNIT + q;
          ptx::wgmma_m64k32_s8_rs<BM>(acc[set], af[ks], desc_sw128(a_tile, ks), !(group_start && q == 0));
        }
        ptx::wgmma_commit_group();
        const bool drain = j == UNITS - 1 && group_end;
        // The stage ends a group: drain, so that nothing stays in flight across the loop's back edge whose
        // accumulators a non-wgmma instruction reads (see the top of the file). Otherwise keep this unit in
        // flight: the previous unit is then complete.
        if (drain) ptx::wgmma_wait_group<0>();
        else ptx::wgmma_wait_group<1>();
        if constexpr (SETS == 2) {
          if (j > 0 && (j * UNIT_K) % G == 0) {  // the previous unit, of this stage, ended a group
            ptx::wgmma_fence_operands(acc[set ^ 1]);
            fold(acc[set ^ 1], (k0 + j * UNIT_K) / G - 1);
          }
        }
        if (drain) {
          ptx::wgmma_fence_operands(acc[set]);
          fold(acc[set], (k0 + j * UNIT_K) / G);
          if (pending_stage >= 0) ptx::mbarrier_arrive(ring.empty + pending_stage);
          ptx::mbarrier_arrive(ring.empty + s);
          pending_stage = -1;
        } else {
          if (j == 0 && pending_stage >= 0) {  // the previous stage's last unit is complete
            ptx::mbarrier_arrive(ring.empty + pending_stage);
            pending_stage = -1;
          }
          if (j == UNITS - 1) pending_stage = s;
        }
      }
    }
    ptx::wgmma_wait_group<0>();  // nothing is in flight here (a split's last stage ends a group: K % G == 0)
    if (u.split && !reduce_splits_flat<T, BM / 2>(p, u, facc, static_cast<int>(threadIdx.x) - 128, smem)) return;

    store_w4_tile<T, Epi>(p, m0, ch0, ch1, lane,
                          [&](int i, float sa, int nn) { return scale_bias(p, facc[i], sa, nn); });
  }
}

}  // namespace ditq::gemm::sm90

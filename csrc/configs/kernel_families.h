// What each CUDA kernel family accepts, written once. Everything that depends on it is generated from here:
// the W4 instantiations and the launch switches (csrc/gemm_launch.cuh, csrc/emulated_gemm.h), the binding's checks
// (csrc/gemm_bindings.h) and the description torch.ops.ditq_C.kernel_families() returns (csrc/families.cpp),
// which the Python runtime reads instead of keeping its own copy.
//
// Adding a W4 group size is one entry in DITQ_W4_GROUP_SIZES; the static_asserts below reject one the
// kernel cannot run exactly.
#pragma once

#include <cstdint>

#include "configs/gemm_tiles.h"

// W4A8 group sizes (k per scale). Each must be a multiple of the mma k (32), and its int32 partial sum must
// convert to float exactly (checked below).
#define DITQ_W4_GROUP_SIZES(X) X(32) X(64) X(128) X(256)

namespace ditq {

// ---- activation quantization (csrc/quantize_act.cuh) -------------------------------------------------------
// Any K: rows whose bytes are a multiple of 16 take the vector path, others the scalar one. Indices are int.
constexpr int kQuantizeActKMultiple = 1;
constexpr int64_t kQuantizeActMaxK = 2147483647;

// ---- fused LayerNorm + modulation + quantization (csrc/norm_quantize.cuh) -----------------------------------
// Any K (vector path when rows are 16-byte multiples, as quantize_act); the mean divides by K as a float,
// exact up to 2^24.
constexpr int kNormQuantizeKMultiple = 1;
constexpr int64_t kNormQuantizeMaxK = int64_t{1} << 24;

}  // namespace ditq

namespace ditq::gemm {

// ---- the int8 GEMMs (csrc/gemm.cuh) ------------------------------------------------------------------------
// The tile loaders copy rows in 16-byte cp.async pieces, and int8 rows are K bytes: K must be a multiple of 16.
constexpr int kKMultiple = 16;
// W8A8 keeps one int32 accumulator over all of K: |sum| <= 127 * 128 * K must stay below 2^31. That alone
// would allow any K < 2^17 (|a * w| <= 128 * 128 even with a = -128); 32768 is the project-wide bound
// (ditq.quant.reference.MAX_K, the Triton kernels' MAX_K), kept with 4x headroom, not where exactness ends
// (FLUX.2-dev's widest input is K = 24576).
constexpr int kMaxK = 32768;
static_assert(int64_t{127} * 128 * kMaxK < (int64_t{1} << 31), "W8A8: an int32 sum over K could overflow");

// Layout names and their version: bump the version when the bytes a kernel reads for a name change, so a
// weight file prepared for the old kernels is rejected instead of misread.
constexpr const char* kW8Layout = "int8_nk_row_major";
constexpr const char* kW4Layout = "int4_split_nibble_k32";
constexpr int kLayoutVersion = 1;

// The oldest architecture any tile rule accepts (mma.sync m16n8k32 s8 needs sm_80).
constexpr int min_arch() {
  int a = kTileRules[0].arch_min;
  for (const TileRule& r : kTileRules) a = r.arch_min < a ? r.arch_min : a;
  return a;
}

// W4A8: the per-group int32 partial of 16 * w (the mma runs on nibbles in the high half of a byte) is at most
// 127 * 128 * G in magnitude; the kernel converts it to float once per group, exact only below 2^24.
#define DITQ_CHECK_W4_GROUP(G)                                                                     \
  static_assert((G) % 32 == 0 && (G) >= 32, "W4A8 group size " #G ": not a multiple of mma k 32"); \
  static_assert(int64_t{127} * 128 * (G) < (int64_t{1} << 24),                                     \
                "W4A8 group size " #G ": its int32 partial is not exact in fp32 (127*128*G >= 2^24)");
DITQ_W4_GROUP_SIZES(DITQ_CHECK_W4_GROUP)
#undef DITQ_CHECK_W4_GROUP

// W4A8 with integer group scales (the Hopper kernels, gemm_sm90.cuh): q in [1, kMaxIntGroupScale] per group and
// channel. q * w must be an int8 (|q * w| <= 16 * 8 = 128 with w = -8: -128 is the one int8 of that magnitude) and
// the unpack's bytes u * q + 128 - 8 q (u = w + 8 in [0, 15]) must stay in [0, 255] so that one 32-bit multiply-add
// does four of them without a carry: 15 q + 128 - 8 q = 128 + 7 q <= 255 and 128 - 8 q >= 0, i.e. q <= 16. The
// sum over K is W8A8's: |a * q * w| <= 127 * 128 per term (kMaxK's bound holds).
constexpr int kMaxIntGroupScale = 16;
static_assert(7 * kMaxIntGroupScale + 128 <= 255 && 128 - 8 * kMaxIntGroupScale >= 0,
              "integer group scales: the unpack's bytes would carry");

#define DITQ_W4_GROUP_ENTRY(G) G,
constexpr int kW4GroupSizes[] = {DITQ_W4_GROUP_SIZES(DITQ_W4_GROUP_ENTRY)};
#undef DITQ_W4_GROUP_ENTRY
constexpr int kW4GroupCount = sizeof(kW4GroupSizes) / sizeof(kW4GroupSizes[0]);

constexpr bool is_w4_group_size(int64_t g) {
  for (int s : kW4GroupSizes)
    if (s == g) return true;
  return false;
}

}  // namespace ditq::gemm

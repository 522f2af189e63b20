// W8A8 and W4A8 (group-wise) GEMMs on the int8 tensor cores: mma.sync m16n8k32 s8 x s8 -> s32.
//
//   y[m, n] = s_a[m] * s_w[n] * sum_k a[m, k] w[n, k] + b[n]                       (W8A8)
//   y[m, n] = s_a[m] * sum_g s_w[g, n] * sum_{k in g} a[m, k] w[n, k] + b[n]       (W4A8, group size G)
//
// One template, two weight operands (W8, W4<G>) plugged into the same main loop and epilogue. No inline
// assembly here: every PTX instruction comes from ptx.cuh, so this file compiles with nvcc (real kernels,
// csrc/gemm.cu) and with g++ (the SIMT emulator, csrc/emulated_gemm.cpp) from one source.
//
// ---- Data layout ------------------------------------------------------------------------------------------
// a       int8 [M, K] row-major (the activation quantizer's output). K % kKMultiple == 0 (16) and 16-byte
//         aligned rows (configs/kernel_families.h).
//         The fused kernels also take a float A (fp32 / fp16 / bf16 [M, K], same rules) with a static a_scale
//         and quantize it as they load it (FloatATileLoader).
// W8      int8 [N, K] row-major: the canonical layout as it is. An mma B operand is "col" (k contiguous per n),
//         and that is exactly a row of W, so ldmatrix reads fragments straight from a row-major smem tile.
// W4      uint8 [N, K / 2], *split-nibble* order within every 32-k chunk (ditq/backends/cuda_layout.py):
//         byte p (0..15) of chunk c holds k = 32c + p in its low nibble and k = 32c + p + 16 in its high
//         nibble. Why: the m16n8k32 B fragment of lane (g, t) is register 0 = k 4t..4t+3 and register 1 =
//         k 16+4t..16+4t+3 of column n = g. ldmatrix hands lane (g, t) bytes 4t..4t+3 of row g of an 8 x 16 B
//         matrix, i.e. 4 bytes whose low nibbles are register 0's k and whose high nibbles are register 1's.
//         So one ldmatrix.x4 = 4 n8 x k32 fragments, and unpacking is two masks per 32-bit word:
//             hi = w & 0xF0F0F0F0          -> four int8 equal to 16 * w[16+4t+j]
//             lo = (w << 4) & 0xF0F0F0F0   -> four int8 equal to 16 * w[4t+j]
//         A nibble in the high half of a byte *is* the int8 16 * w (two's complement), so there is no sign
//         extension: the mma runs on 16 * w and the 1/16 is folded into the group scale (exact: power of 2).
// scales  W8: float32 [N]. W4: float32 [K / G, N] (canonical, group-major).
//
// ---- Shared memory ----------------------------------------------------------------------------------------
// STAGES ring buffers of an A tile [BM][BK] and a W tile [BN][BK or BK/2] bytes, filled by 16-byte cp.async
// (zero-filled past M, N, K: zeros add nothing to the sums, so no masking is needed in the main loop).
// Rows are XOR-swizzled in 16-byte chunks (swizzle()) so that the 8 row addresses of one ldmatrix matrix
// (8 rows, same logical chunk) fall into 8 different bank groups.
//
// ---- Warp tiling ------------------------------------------------------------------------------------------
// WARPS_M x WARPS_N warps, each owns a (BM / WARPS_M) x (BN / WARPS_N) output tile = MI x NI mma tiles of
// 16 x 8. Per k32 step a warp issues MI ldmatrix.x4 for A (one 16x32 fragment each), NI/2 (W8) or NI/4 (W4)
// ldmatrix.x4 for W, and MI * NI mma.
//
// ---- Accumulation and its int32 bounds --------------------------------------------------------------------
// W8A8: one int32 accumulator over all of K: |sum| <= 127 * 128 * kMaxK < 2^31 (static_assert; K <= kMaxK, checked
//       by the op). The epilogue converts once.
// W4A8: per-group int32 partial of 16 * w: |partial| <= 127 * 128 * G < 2^24 (static_assert per G), so its
//       conversion to float is exact; at each group end it is folded into an fp32 accumulator with one fma,
//       acc = fma(float(partial), s_w[g, n] / 16, acc), and reset. (Integer group scales would save that
//       fma but add a rounding at quantization time; the per-group fma is MI * NI * 4 FFMA per group per
//       warp, against MI * NI * G / 32 mma: small at G >= 64.)
// Epilogue: fp32 with explicit rounding (__fmaf_rn / __fmul_rn, never left to contraction), so the emulated and
// real kernels agree bit for bit; then an explicit round-to-nearest-even cast to the output type.
//
// ---- Split-K (small M) -------------------------------------------------------------------------------------
// At M <= 64 a DiT layer has too few output tiles to fill a GPU (N = 1152 / BN = 64 is 18 CTAs on 132 SMs),
// and the weight stream is the limit. gridDim.z splits K into whole units (BK, or G when G > BK); each CTA
// stores its partial tile (int32 for W8, fp32 for W4) to a workspace and the last CTA of the tile to arrive
// (fence + atomic counter) adds the partials in split order and runs the epilogue. W8 partials are int32, so
// the result is identical for every split count; W4 partials are fp32 sums of whole groups, added in a
// fixed order, so a given split count always gives the same bits. The binding picks the count (gemm.h).
//
// ---- Hopper -----------------------------------------------------------------------------------------------
// This is the sm_80 mma.sync path, which also runs on sm_90 (below Hopper's int8 peak). A wgmma kernel
// would reuse the operand policies' global->smem loaders and the epilogue (store_tile) and replace
// mainloop_step; configs/gemm_tiles.h keeps separate sm90 rules for it to claim.
#pragma once

#include <cstdint>
#include <cstring>
#include <cmath>
#include <type_traits>

#include "epilogue.cuh"
#include "ptx.cuh"
#include "configs/gemm_tiles.h"
#include "configs/kernel_families.h"
#include "gemm.h"

namespace ditq::gemm {

// GemmParams: launch.h (shared with the launchers and the binding).

// Explicit fp32 rounding (__fmul_rn, __fmaf_rn, __int2float_rn) and the output casts (ptx::f32_to_bf16_bits,
// f32_to_f16_bits) are the same calls in both builds: CUDA's intrinsics on the device, the emulator's twins
// (emu/emu.h) on the host. Nothing in this file is compiled for one build only.
DITQ_DEVICE uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

struct alignas(8) F32x2 {  // an 8-byte store of two floats (float2 is not defined in the host build)
  float x, y;
};

// ---- tiles --------------------------------------------------------------------------------------------------
template <int BM_, int BN_, int BK_, int WARPS_M_, int WARPS_N_, int STAGES_>
struct Tile {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, STAGES = STAGES_;
  static constexpr int THREADS = 32 * WARPS_M * WARPS_N;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;  // warp tile
  static constexpr int MI = WM / 16, NI = WN / 8, KSTEPS = BK / 32;
  static_assert(BM % (16 * WARPS_M) == 0 && BN % (16 * WARPS_N) == 0, "warp tile must be a multiple of 16x16");
  static_assert(BK % 32 == 0 && BK >= 32, "BK must be a multiple of the mma k (32)");
  static_assert(STAGES >= 2, "a pipeline needs two stages at least");
};

// The Tile of a table id, at compile time (for instantiations of one tile only: float_a_tile()).
template <int ID>
struct TileById;
#define DITQ_TILE_BY_ID(ID, BM, BN, BK, WM, WN, ST) \
  template <>                                      \
  struct TileById<ID> {                            \
    using type = Tile<BM, BN, BK, WM, WN, ST>;     \
  };
DITQ_GEMM_TILES(DITQ_TILE_BY_ID)
#undef DITQ_TILE_BY_ID

// Byte offset of 16-byte chunk `chunk` of row `row` in a [rows][ROW_BYTES] smem tile. Chunks are XORed with
// a row-dependent key so that 8 consecutive rows' copies of one logical chunk occupy 8 distinct 16-byte bank
// groups (a 128-byte bank line holds 128 / ROW_BYTES rows when rows are short, hence the row / R).
template <int ROW_BYTES>
DITQ_DEVICE int swizzle(int row, int chunk) {
  constexpr int C = ROW_BYTES / 16;                            // chunks per row
  constexpr int R = ROW_BYTES >= 128 ? 1 : 128 / ROW_BYTES;    // rows per 128-byte bank line
  constexpr int KEYS = C < 8 ? C : 8;
  return row * ROW_BYTES + ((chunk ^ ((row / R) % KEYS)) << 4);
}

// Copies [ROWS][ROW_BYTES] tiles (rows r0.. of an `nrows` x `row_len`-byte matrix, byte columns advancing
// by ROW_BYTES per k tile) into swizzled smem, one 16-byte cp.async per chunk; chunks outside the matrix
// zero-fill. Each thread's chunks, their smem offsets and row pointers are fixed for the whole K loop, so
// they are computed once here and a k tile costs one compare and one add per chunk.
template <int ROWS, int ROW_BYTES, int THREADS>
struct TileLoader {
  static constexpr int C = ROW_BYTES / 16, CHUNKS = ROWS * C;
  static constexpr int PER_THREAD = (CHUNKS + THREADS - 1) / THREADS;
  const uint8_t* base;  // a valid address for predicated-off copies (they still carry one)
  const uint8_t* src[PER_THREAD];
  int dst[PER_THREAD];
  int col[PER_THREAD];  // byte column of the chunk in tile 0; 1 << 30 when the row is out of range
  int row_len;

  DITQ_DEVICE TileLoader(const uint8_t* g, int r0, int nrows, int row_len_, int tid)
      : base(g), row_len(row_len_) {
#pragma unroll
    for (int j = 0; j < PER_THREAD; ++j) {
      const unsigned i = static_cast<unsigned>(j * THREADS + tid);  // unsigned: / and % are shifts
      const int row = static_cast<int>(i / C), chunk = static_cast<int>(i % C);
      const bool ok = (CHUNKS % THREADS == 0 || i < static_cast<unsigned>(CHUNKS)) && r0 + row < nrows;
      src[j] = ok ? g + static_cast<int64_t>(r0 + row) * row_len_ + chunk * 16 : g;
      dst[j] = swizzle<ROW_BYTES>(row, chunk);
      col[j] = ok ? chunk * 16 : (1 << 30);  // rows past the matrix never pass the column test
    }
  }

  DITQ_DEVICE void load(uint8_t* smem, int kt) const {
#pragma unroll
    for (int j = 0; j < PER_THREAD; ++j) {
      if (CHUNKS % THREADS == 0 || j * THREADS + static_cast<int>(threadIdx.x) < CHUNKS) {
        const int off = kt * ROW_BYTES;
        const bool in = col[j] + off < row_len;
        ptx::cp_async_16(smem + dst[j], in ? src[j] + off : base, in);
      }
    }
  }
};

// ---- float A, quantized as it is loaded (the fused GEMMs with a static a_scale) -----------------------------
// A is fp32 / fp16 / bf16 [M, K] (AT = float, __half, __nv_bfloat16; AT = int8_t is the int8 path above). The
// tile in smem is the same int8 [BM][BK] tile TileLoader fills: every 16-byte chunk (16 k of one row) is read
// as its 16 float elements with 16-byte global loads (4 for fp32, 2 for 16-bit types), converted to fp32
// exactly, quantized with epi::quantize_int8 (the helper quantize_act's static path uses, with the same
// inv = 1 / s by IEEE division, so q equals quantize_act's bit for bit) and written with one 16-byte st.shared
// into the swizzled slot cp.async would have filled. Bounds: K % 16 == 0, so a chunk lies wholly inside K or
// wholly past it, and rows past M or chunks past K store zeros without reading anything.
//
// The store is synchronous, not a cp.async, and the pipeline's barriers already make it race-free: the
// main loop's issue(kt + STAGES - 1) writes stage (kt - 1) % STAGES, which every warp finished reading (its
// ldmatrix of tile kt - 1) before the __syncthreads that precedes that issue; the tile is read at iteration
// kt + STAGES - 1, after that iteration's __syncthreads, which also publishes these plain stores (the
// prologue's stores precede the first one). The W tile's cp.async groups are unchanged; the A chunks are
// simply not in them.
template <class AT>
constexpr bool kIntA = std::is_same_v<AT, int8_t>;

// Element e (0..15) of a chunk's 16 elements, held as the 4 * sizeof(AT) words of its 16-byte loads, as fp32
// (exact: every fp16 / bf16 value is an fp32 value).
template <class AT>
DITQ_DEVICE float chunk_elem_f32(const uint32_t* w, int e) {
  if constexpr (std::is_same_v<AT, float>) {
    float f;
    std::memcpy(&f, &w[e], 4);  // a register reinterpretation
    return f;
  } else {
    const uint16_t b = static_cast<uint16_t>(w[e >> 1] >> (16 * (e & 1)));  // little-endian: even e low half
    if constexpr (std::is_same_v<AT, __nv_bfloat16>) return epi::bf16_bits_to_f32(b);
    else return epi::f16_bits_to_f32(b);
  }
}

template <int ROWS, int BK, int THREADS, class AT>
struct FloatATileLoader {
  static_assert(sizeof(AT) == 4 || sizeof(AT) == 2, "float A is fp32, fp16 or bf16");
  static constexpr int C = BK / 16, CHUNKS = ROWS * C;
  static constexpr int PER_THREAD = (CHUNKS + THREADS - 1) / THREADS;
  static constexpr int LOADS = static_cast<int>(sizeof(AT));  // 16-byte loads per chunk of 16 elements
  static constexpr int PER_LOAD = 16 / static_cast<int>(sizeof(AT));
  const AT* src[PER_THREAD];  // the chunk's first element in k tile 0
  int dst[PER_THREAD];
  int col[PER_THREAD];  // element column of the chunk in tile 0; 1 << 30 when the row is out of range
  int K;
  float inv;  // 1 / a_scale[0]

  DITQ_DEVICE FloatATileLoader(const AT* g, int r0, int nrows, int K_, int tid, const float* a_scale) : K(K_) {
    inv = __fdiv_rn(1.0f, ptx::ld_global(a_scale));  // in the body: see FusedEpilogue's constructor
#pragma unroll
    for (int j = 0; j < PER_THREAD; ++j) {
      const unsigned i = static_cast<unsigned>(j * THREADS + tid);
      const int row = static_cast<int>(i / C), chunk = static_cast<int>(i % C);
      const bool ok = r0 + row < nrows && (CHUNKS % THREADS == 0 || i < static_cast<unsigned>(CHUNKS));
      src[j] = ok ? g + static_cast<int64_t>(r0 + row) * K_ + chunk * 16 : g;
      dst[j] = swizzle<BK>(row, chunk);
      col[j] = ok ? chunk * 16 : (1 << 30);
    }
  }

  DITQ_DEVICE void load(uint8_t* smem, int kt) const {
#pragma unroll
    for (int j = 0; j < PER_THREAD; ++j) {
      if (CHUNKS % THREADS == 0 || j * THREADS + static_cast<int>(threadIdx.x) < CHUNKS) {
        const int off = kt * BK;
        uint32_t q[4] = {0, 0, 0, 0};
        if (col[j] + off < K) {
          uint32_t w[4 * LOADS];
#pragma unroll
          for (int l = 0; l < LOADS; ++l) {
            const uint4 v = ptx::ld_global_16(src[j] + off + l * PER_LOAD);
            std::memcpy(&w[4 * l], &v, 16);
          }
#pragma unroll
          for (int e = 0; e < 16; ++e) {
            const uint8_t b = static_cast<uint8_t>(epi::quantize_int8(chunk_elem_f32<AT>(w, e), inv));
            q[e >> 2] |= static_cast<uint32_t>(b) << (8 * (e & 3));  // byte e of the chunk = k column e
          }
        }
        uint4 v;
        std::memcpy(&v, q, 16);
        ptx::st_shared(reinterpret_cast<uint4*>(smem + dst[j]), v);
      }
    }
  }
};

// ---- weight operands ---------------------------------------------------------------------------------------
// Each policy says how many bytes a W tile row has, how to turn smem into B fragments for one k32 step, and
// whether the int32 accumulator is folded into fp32 per group (W4) or once at the end (W8).

struct W8 {
  static constexpr bool kGrouped = false;
  static constexpr int kGroup = 0;  // one scale per channel: no group boundaries
  template <int BK> static constexpr int row_bytes() { return BK; }
  static constexpr int row_len(int K) { return K; }

  // B fragments of NI n8 tiles for k32 step ks. ldmatrix.x4 matrices: (n8 tile 2p, k 0-15), (2p, k 16-31),
  // (2p+1, k 0-15), (2p+1, k 16-31); lane l addresses matrix l / 8, row l % 8.
  template <class T>
  DITQ_DEVICE static void load_b(uint32_t (&b)[T::NI][2], const uint8_t* ws, int wn0, int ks, int lane) {
    static_assert(T::NI % 2 == 0, "W8 loads n8 tiles in pairs");
#pragma unroll
    for (int p = 0; p < T::NI / 2; ++p) {
      const int row = wn0 + (2 * p + (lane >> 4)) * 8 + (lane & 7);
      const int chunk = 2 * ks + ((lane >> 3) & 1);
      uint32_t r[4];
      ptx::ldmatrix_x4(r, ws + swizzle<T::BK>(row, chunk));
      b[2 * p][0] = r[0];
      b[2 * p][1] = r[1];
      b[2 * p + 1][0] = r[2];
      b[2 * p + 1][1] = r[3];
    }
  }
};

template <int G>
struct W4 {
  static_assert(is_w4_group_size(G), "W4A8 group sizes are listed in configs/kernel_families.h");
  static constexpr bool kGrouped = true;
  static constexpr int kGroup = G;
  template <int BK> static constexpr int row_bytes() { return BK / 2; }
  static constexpr int row_len(int K) { return K / 2; }

  // One 16-byte smem chunk per n row holds a whole k32 step (split-nibble order, see the top of the file).
  // ldmatrix.x4 matrices = n8 tiles 4q..4q+3 of that chunk, lane l addressing row l of the 32 (x2: 16).
  template <class T>
  DITQ_DEVICE static void load_b(uint32_t (&b)[T::NI][2], const uint8_t* ws, int wn0, int ks, int lane) {
    static_assert(T::NI % 2 == 0, "W4 loads n8 tiles in pairs or quads");
    constexpr int RB = T::BK / 2;
#pragma unroll
    for (int q = 0; q < T::NI / 4; ++q) {
      uint32_t r[4];
      ptx::ldmatrix_x4(r, ws + swizzle<RB>(wn0 + 32 * q + lane, ks));
#pragma unroll
      for (int j = 0; j < 4; ++j) unpack(b[4 * q + j], r[j]);
    }
    if constexpr (T::NI % 4 != 0) {
      uint32_t r[2];
      ptx::ldmatrix_x2(r, ws + swizzle<RB>(wn0 + (T::NI - 2) * 8 + (lane & 15), ks));
      unpack(b[T::NI - 2], r[0]);
      unpack(b[T::NI - 1], r[1]);
    }
  }

  // 8 nibbles -> 8 int8 (x16), no sign extension: see the top of the file.
  DITQ_DEVICE static void unpack(uint32_t (&b)[2], uint32_t w) {
    b[0] = (w << 4) & 0xF0F0F0F0u;
    b[1] = w & 0xF0F0F0F0u;
  }
};

// ---- epilogue pieces: y = acc * scale [+ bias] in fp32, then cast and store ----------------------------------
// One small function per step, so that later steps (an activation, quantization for the next layer) slot in
// between without touching the main loop. Every rounding is explicit (see the top of the file).

// The scale of output column n: W8 s_a * s_w[n], the product rounded first as in the reference; W4 s_a alone
// (its s_w was folded in per group).
template <class WOp>
DITQ_DEVICE float column_scale(const GemmParams& p, float sa, int n) {
  if constexpr (WOp::kGrouped) return sa;
  else return __fmul_rn(sa, ptx::ld_global(p.w_scale + n));
}

// v * s + bias[n] with one rounding (fma), or v * s without a bias.
DITQ_DEVICE float scale_bias(const GemmParams& p, float v, float s, int n) {
  return p.bias ? __fmaf_rn(v, s, ptx::ld_global(p.bias + n)) : __fmul_rn(v, s);
}

// Casts y (columns n, n + 1 of row m; n < N) to out_dtype and stores it: one 8- or 4-byte store when both
// columns exist and N is even (then the pair is aligned), else one element at a time.
DITQ_DEVICE void store_pair(const GemmParams& p, int m, int n, const float (&y)[2]) {
  const int64_t o = static_cast<int64_t>(m) * p.N + n;
  const bool both = n + 1 < p.N, paired = both && p.N % 2 == 0;
  if (p.out_dtype == DType::kF32) {
    float* out = static_cast<float*>(p.out) + o;
    if (paired) {
      ptx::st_global(reinterpret_cast<F32x2*>(out), F32x2{y[0], y[1]});
    } else {
      ptx::st_global(out, y[0]);
      if (both) ptx::st_global(out + 1, y[1]);
    }
    return;
  }
  const bool bf16 = p.out_dtype == DType::kBF16;
  const uint16_t b0 = bf16 ? ptx::f32_to_bf16_bits(y[0]) : ptx::f32_to_f16_bits(y[0]);
  const uint16_t b1 = bf16 ? ptx::f32_to_bf16_bits(y[1]) : ptx::f32_to_f16_bits(y[1]);
  uint16_t* out = static_cast<uint16_t*>(p.out) + o;
  if (paired) {
    ptx::st_global(reinterpret_cast<uint32_t*>(out), static_cast<uint32_t>(b0) | (static_cast<uint32_t>(b1) << 16));
  } else {
    ptx::st_global(out, b0);
    if (both) ptx::st_global(out + 1, b1);
  }
}

// ---- epilogue policies: what happens to y = acc * scale (+ bias) -------------------------------------------
// A template parameter of gemm_body, so the plain GEMM compiles to exactly the code it had before the fused
// pieces existed, and the fused kernels are separate instantiations (gemm_*_fused).

// Plain: cast and store.
struct PlainEpilogue {
  DITQ_DEVICE explicit PlainEpilogue(const GemmParams&) {}
  DITQ_DEVICE void store(const GemmParams& p, int m, int n, float (&y)[2]) const { store_pair(p, m, n, y); }
};

// Fused (p.fused): GELU, gate, residual, then int8 for the next layer or the float output, in that order
// (the op contract). The pieces are chosen per launch by uniform branches: one instantiation covers every
// combination (16 per kernel would multiply the build for the few instructions an untaken branch costs).
// Loads and stores of the column pair (n, n + 1) follow store_pair: one 8- / 4- / 2-byte access when both
// columns exist and N is even (the pair is then aligned: the binding gives 16-byte aligned buffers), else
// one element at a time.
struct FusedEpilogue {
  float inv;  // 1 / out_scale (IEEE division, once per thread), as quantize_act's static path

  // (in the body, not a mem-initializer: nvcc's host pass keeps initializers of device constructors, where
  // the device intrinsics are not declared)
  DITQ_DEVICE explicit FusedEpilogue(const GemmParams& p) {
    inv = p.fused.out_scale ? __fdiv_rn(1.0f, ptx::ld_global(p.fused.out_scale)) : 0.0f;
  }

  DITQ_DEVICE void store(const GemmParams& p, int m, int n, float (&y)[2]) const {
    const GemmParams::Fused& f = p.fused;
    const bool both = n + 1 < p.N, paired = both && p.N % 2 == 0;
    if (f.gelu) {
      y[0] = epi::gelu_tanh(y[0]);
      y[1] = epi::gelu_tanh(y[1]);
    }
    if (f.gate) {  // adaLN's per-sample gate, broadcast over the sample's rows_per_gate tokens
      const float* g = f.gate + static_cast<int64_t>(m / f.rows_per_gate) * p.N + n;
      float g0, g1 = 0.0f;
      if (paired) {
        const F32x2 v = ptx::ld_global(reinterpret_cast<const F32x2*>(g));
        g0 = v.x;
        g1 = v.y;
      } else {
        g0 = ptx::ld_global(g);
        if (both) g1 = ptx::ld_global(g + 1);
      }
      y[0] = __fmul_rn(y[0], g0);
      y[1] = __fmul_rn(y[1], g1);
    }
    if (f.residual) {
      const int64_t o = static_cast<int64_t>(m) * p.N + n;
      float r0, r1 = 0.0f;
      if (f.residual_dtype == DType::kF32) {
        const float* r = static_cast<const float*>(f.residual) + o;
        if (paired) {
          const F32x2 v = ptx::ld_global(reinterpret_cast<const F32x2*>(r));
          r0 = v.x;
          r1 = v.y;
        } else {
          r0 = ptx::ld_global(r);
          if (both) r1 = ptx::ld_global(r + 1);
        }
      } else {
        const uint16_t* r = static_cast<const uint16_t*>(f.residual) + o;
        uint16_t b0, b1 = 0;
        if (paired) {
          const uint32_t v = ptx::ld_global(reinterpret_cast<const uint32_t*>(r));
          b0 = static_cast<uint16_t>(v & 0xFFFFu);
          b1 = static_cast<uint16_t>(v >> 16);
        } else {
          b0 = ptx::ld_global(r);
          if (both) b1 = ptx::ld_global(r + 1);
        }
        r0 = epi::bits16_to_f32(b0, f.residual_dtype);
        r1 = epi::bits16_to_f32(b1, f.residual_dtype);
      }
      y[0] = __fadd_rn(y[0], r0);
      y[1] = __fadd_rn(y[1], r1);
    }
    if (!f.out_scale) {
      store_pair(p, m, n, y);
      return;
    }
    const int8_t q0 = epi::quantize_int8(y[0], inv), q1 = epi::quantize_int8(y[1], inv);
    int8_t* out = static_cast<int8_t*>(p.out) + static_cast<int64_t>(m) * p.N + n;
    if (paired) {  // little-endian: column n in the low byte
      const uint16_t lo = static_cast<uint8_t>(q0), hi = static_cast<uint8_t>(q1);
      ptx::st_global(reinterpret_cast<uint16_t*>(out), static_cast<uint16_t>(lo | (hi << 8)));
    } else {
      ptx::st_global(out, q0);
      if (both) ptx::st_global(out + 1, q1);
    }
  }
};

// ---- the kernel body -----------------------------------------------------------------------------------------
// Grid: x = N tiles, y = M tiles (consecutive CTAs share the A tile and walk the weights: at small M all CTAs
// of a wave read one A tile from L2). Block: T::THREADS. Dynamic smem: smem_bytes<T, WOp>().
template <class T, class WOp>
constexpr int smem_bytes() {
  return T::STAGES * (T::BM * T::BK + T::BN * WOp::template row_bytes<T::BK>());
}

// Split-K: store this CTA's partial; the last CTA of the output tile to arrive sums all partials in split
// order (so the float result never depends on arrival order) into acc / facc and returns true.
// Workspace index ((z * tiles + tile) * E + e) * THREADS + tid: consecutive threads, consecutive words.
template <class T, class WOp, class Acc, class FAcc>
DITQ_DEVICE bool reduce_splits(const GemmParams& p, Acc& acc, FAcc& facc, uint8_t* smem) {
  constexpr int MI = T::MI, NI = T::NI, E = MI * NI * 4;
  const int tid = static_cast<int>(threadIdx.x);
  const int z = static_cast<int>(blockIdx.z), S = p.splits;
  const int64_t tiles = static_cast<int64_t>(gridDim.x) * gridDim.y;
  const int64_t tile = static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
  auto word = [&](int zz, int e) { return ((zz * tiles + tile) * E + e) * T::THREADS + tid; };
  auto bits_of = [&](int e) -> uint32_t {
    const int i = e / (NI * 4), j = (e / 4) % NI, r = e % 4;
    if constexpr (WOp::kGrouped) return f32_bits(facc[i][j][r]);
    else return static_cast<uint32_t>(acc[i][j][r]);
  };
#pragma unroll
  for (int e = 0; e < E; ++e) ptx::st_global(p.workspace + word(z, e), bits_of(e));
  ptx::fence_gpu();  // release: the partial is visible before this CTA is counted
  __syncthreads();   // every thread's partial stored (and every warp done with the pipeline's smem)
  int* flag = reinterpret_cast<int*>(smem);
  if (tid == 0) {
    const int arrived = ptx::atomic_add_gpu(p.counters + tile, 1);
    const int last = arrived == S - 1;
    if (last) ptx::st_global(p.counters + tile, 0);  // leave the counters zeroed for the next launch
    ptx::st_shared(flag, last);
  }
  __syncthreads();
  if (!ptx::ld_shared(flag)) return false;
  ptx::fence_gpu();  // acquire: the other CTAs' partials
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const int i = e / (NI * 4), j = (e / 4) % NI, r = e % 4;
    if constexpr (WOp::kGrouped) {
      float v = 0.0f;
#pragma unroll 1  // S is small and runtime: unrolling it only multiplies compile time and code size
      for (int zz = 0; zz < S; ++zz) {
        const uint32_t b = ptx::ld_cg(p.workspace + word(zz, e));
        float f;
        std::memcpy(&f, &b, 4);
        v = zz == 0 ? f : v + f;  // fp32 adds in split order: fixed, whoever arrives last
      }
      facc[i][j][r] = v;
    } else {
      uint32_t v = 0;  // int32 sums: exact and order-free (wrapping adds, as the mma accumulates)
#pragma unroll 1
      for (int zz = 0; zz < S; ++zz) v += ptx::ld_cg(p.workspace + word(zz, e));
      acc[i][j][r] = static_cast<int32_t>(v);
    }
  }
  return true;
}

// AT: A's element type. int8_t: the quantized A, copied by cp.async; float / __half / __nv_bfloat16: a float A
// with a static a_scale, quantized as it is loaded (FloatATileLoader; fused kernels only).
template <class T, class WOp, class Epi = PlainEpilogue, class AT = int8_t>
DITQ_DEVICE void gemm_body(const GemmParams& p, uint8_t* smem) {
  constexpr int A_RB = T::BK, W_RB = WOp::template row_bytes<T::BK>();
  constexpr int A_STAGE = T::BM * A_RB, W_STAGE = T::BN * W_RB;
  constexpr int MI = T::MI, NI = T::NI;

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;  // mma fragment coordinates (row group, thread in group)
  const int wm0 = (warp / T::WARPS_N) * T::WM;  // warp tile origin inside the CTA tile
  const int wn0 = (warp % T::WARPS_N) * T::WN;
  const int m0 = static_cast<int>(blockIdx.y) * T::BM;
  const int n0 = static_cast<int>(blockIdx.x) * T::BN;
  const int M = p.M, N = p.N, K = p.K;
  // This CTA's k tiles [kt0, kt1): split blockIdx.z of p.splits over whole k units (see gemm.h).
  constexpr int UNIT_TILES = WOp::kGroup > T::BK ? WOp::kGroup / T::BK : 1;
  const int KT = (K + T::BK - 1) / T::BK;  // k tiles; the last may be partial (zero-filled)
  const int units = (KT + UNIT_TILES - 1) / UNIT_TILES;
  const int z = static_cast<int>(blockIdx.z);
  const int kt0 = (z * units / p.splits) * UNIT_TILES;
  const int kt1_units = ((z + 1) * units / p.splits) * UNIT_TILES;
  const int kt1 = kt1_units < KT ? kt1_units : KT;

  uint8_t* const a_smem = smem;
  uint8_t* const w_smem = smem + T::STAGES * A_STAGE;
  const uint8_t* const w_g = static_cast<const uint8_t*>(p.w);
  const int w_len = WOp::row_len(K);

  const auto a_loader = [&] {
    if constexpr (kIntA<AT>) {
      return TileLoader<T::BM, A_RB, T::THREADS>(static_cast<const uint8_t*>(p.a), m0, M, K, tid);
    } else {
      return FloatATileLoader<T::BM, T::BK, T::THREADS, AT>(static_cast<const AT*>(p.a), m0, M, K, tid, p.a_scale);
    }
  }();
  const TileLoader<T::BN, W_RB, T::THREADS> w_loader(w_g, n0, N, w_len, tid);
  // Tile kt into its stage: W by cp.async, A by cp.async too (int8) or by quantizing stores (float A: see
  // FloatATileLoader for why they need no barrier of their own). Always commits a group (maybe empty).
  auto issue = [&](int kt) {
    if (kt < kt1) {
      const int s = (kt - kt0) % T::STAGES;
      a_loader.load(a_smem + s * A_STAGE, kt);
      w_loader.load(w_smem + s * W_STAGE, kt);
    }
    ptx::cp_async_commit();
  };

  int32_t acc[MI][NI][4];   // W8: the result; W4: the current group's partial (of 16 * w)
  float facc[WOp::kGrouped ? MI : 1][WOp::kGrouped ? NI : 1][4];  // W4: sum over finished groups
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < NI; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;
  if constexpr (WOp::kGrouped) {
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
      for (int j = 0; j < NI; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) facc[i][j][r] = 0.0f;
  }

  // Fold the group's int32 partial into facc: facc += float(partial) * s_w[grp, n] / 16, then reset.
  // A lane's columns are n = 2t, 2t + 1 of each n8 tile; columns past N read no scale (their partial is 0).
  auto fold_group = [&](int grp) {
    if constexpr (WOp::kGrouped) {
      const float* srow = p.w_scale + static_cast<int64_t>(grp) * N;
#pragma unroll
      for (int j = 0; j < NI; ++j) {
        const int n = n0 + wn0 + j * 8 + 2 * t;
        const float s0 = n < N ? __fmul_rn(ptx::ld_global(srow + n), 0.0625f) : 0.0f;  // exact: a power of 2
        const float s1 = n + 1 < N ? __fmul_rn(ptx::ld_global(srow + n + 1), 0.0625f) : 0.0f;
#pragma unroll
        for (int i = 0; i < MI; ++i) {
          facc[i][j][0] = __fmaf_rn(__int2float_rn(acc[i][j][0]), s0, facc[i][j][0]);
          facc[i][j][1] = __fmaf_rn(__int2float_rn(acc[i][j][1]), s1, facc[i][j][1]);
          facc[i][j][2] = __fmaf_rn(__int2float_rn(acc[i][j][2]), s0, facc[i][j][2]);
          facc[i][j][3] = __fmaf_rn(__int2float_rn(acc[i][j][3]), s1, facc[i][j][3]);
#pragma unroll
          for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;
        }
      }
    }
  };

  // Prologue: STAGES - 1 tiles in flight.
#pragma unroll
  for (int s = 0; s < T::STAGES - 1; ++s) issue(kt0 + s);

  for (int kt = kt0; kt < kt1; ++kt) {
    // Tile kt has landed once at most STAGES - 2 newer groups are pending; the barrier then (a) publishes
    // every thread's copies of tile kt and (b) proves every warp finished reading stage (kt - 1) % STAGES,
    // which the issue below overwrites with tile kt + STAGES - 1.
    ptx::cp_async_wait<T::STAGES - 2>();
    __syncthreads();
    issue(kt + T::STAGES - 1);

    const int s = (kt - kt0) % T::STAGES;
    const uint8_t* as = a_smem + s * A_STAGE;
    const uint8_t* ws = w_smem + s * W_STAGE;
#pragma unroll
    for (int ks = 0; ks < T::KSTEPS; ++ks) {
      // A: ldmatrix.x4 matrices (rows 0-7, k 0-15), (rows 8-15, k 0-15), (rows 0-7, k 16-31),
      // (rows 8-15, k 16-31) = registers a0-3, a4-7, a8-11, a12-15 of the m16n8k32 A fragment; lane l
      // addresses row l % 16 of the 16, k half l / 16.
      uint32_t af[MI][4];
#pragma unroll
      for (int i = 0; i < MI; ++i)
        ptx::ldmatrix_x4(af[i], as + swizzle<A_RB>(wm0 + i * 16 + (lane & 15), 2 * ks + (lane >> 4)));
      uint32_t bf[NI][2];
      WOp::template load_b<T>(bf, ws, wn0, ks, lane);
#pragma unroll
      for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j) ptx::mma_m16n8k32_s8(acc[i][j], af[i], bf[j], acc[i][j]);

      if constexpr (WOp::kGrouped) {
        constexpr int G = WOp::kGroup;
        if constexpr (G <= T::BK) {  // groups end inside the tile, at compile-time k steps
          if (((ks + 1) * 32) % G == 0) {
            const int grp = (kt * T::BK + ks * 32) / G;
            if (grp * G < K) fold_group(grp);  // past K (zero-filled tail) the partial is 0: skip
          }
        } else if (ks == T::KSTEPS - 1) {  // a group spans G / BK tiles; K % G == 0 so the last tile ends one
          if (((kt + 1) * T::BK) % G == 0) fold_group((kt * T::BK) / G);
        }
      }
    }
  }
  ptx::cp_async_wait<0>();  // only empty groups remain; leave nothing in flight at exit

  if (p.splits > 1 && !reduce_splits<T, WOp>(p, acc, facc, smem)) return;  // not the last split: done

  // ---- epilogue: scale, bias, then the policy's pieces and store. Lane owns rows g, g + 8 and columns 2t,
  // 2t + 1 of each mma tile.
  const Epi epilogue(p);
#pragma unroll
  for (int i = 0; i < MI; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = m0 + wm0 + i * 16 + g + 8 * h;
      if (m >= M) continue;
      const float sa = ptx::ld_global(p.a_scale + (p.a_scale_per_token ? m : 0));
#pragma unroll
      for (int j = 0; j < NI; ++j) {
        const int n = n0 + wn0 + j * 8 + 2 * t;
        if (n >= N) continue;
        float y[2];
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int nn = n + c < N ? n + c : N - 1;  // clamp the loads; store_pair stores column n + c < N only
          float v;
          if constexpr (WOp::kGrouped) v = facc[i][j][2 * h + c];
          else v = __int2float_rn(acc[i][j][2 * h + c]);
          y[c] = scale_bias(p, v, column_scale<WOp>(p, sa, nn), nn);
        }
        epilogue.store(p, m, n, y);
      }
    }
  }
}

}  // namespace ditq::gemm

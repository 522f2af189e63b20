// Torch-free entry points of the CUDA int8 GEMMs (csrc/gemm.cuh): the real kernels (csrc/gemm.cu, nvcc) and
// the same kernels run by the host SIMT emulator (csrc/emulated_gemm.cpp, g++). bindings.cpp is the only
// caller; it validates every argument before calling (these functions trust their inputs).
#pragma once

#include <cstdint>

namespace ditq::gemm {

enum OutKind : int { kOutF32 = 0, kOutF16 = 1, kOutBF16 = 2 };

// Everything a launch needs; plain pointers, no torch.
struct GemmParams {
  const int8_t* a;          // [M, K] row-major, 16-byte aligned, K % kKMultiple == 0
  const float* a_scale;     // [1] (static) or [M] (per token)
  int a_scale_per_token;    // 0 / 1
  const void* w;            // int8 [N, K] (W8) or split-nibble uint8 [N, K / 2] (W4), 16-byte aligned
  const float* w_scale;     // [N] (W8) or [K / G, N] (W4)
  const float* bias;        // [N] float32 or nullptr
  void* out;                // [M, N] of out_kind, contiguous
  int out_kind;
  int M, N, K;
  // Split-K (gridDim.z = splits): each CTA sums a contiguous range of k units (units: BK, or G when G > BK,
  // so a W4 group never straddles two splits). With splits > 1 every CTA stores its partial tile (int32 for
  // W8, fp32 for W4) to `workspace` and the last CTA of each output tile to arrive (atomic `counters`, zeroed
  // before the launch, left zeroed after it) adds the partials in split order 0..S-1 and runs the epilogue:
  // the result does not depend on which CTA finishes last. Sizes: split_workspace_words / counter count.
  int splits;
  int* counters;        // [tiles_m * tiles_n], zero
  uint32_t* workspace;  // [splits * tiles_m * BM * tiles_n * BN] 32-bit words
};

// Tiles compiled in (configs/gemm_tiles.h): count, and {BM, BN, BK, WARPS_M, WARPS_N, STAGES, THREADS}.
int tile_count();
void tile_shape(int tile, int (&shape)[7]);
// Dynamic shared memory of a tile for W8 (group_size == 0) or W4 weights.
int tile_smem_bytes(int tile, int group_size);

// Split-K: the number of k units a problem has for a tile (>= 1), and the split count used when the caller
// asks for the automatic one: enough CTAs to cover `sm_count` SMs twice, at most 16, at least one unit each.
int k_units(int tile, int group_size, int K);
int auto_splits(int tile, int group_size, int M, int N, int K, int sm_count);

// Real kernels: nullptr on success, else the CUDA error string. `stream` is a cudaStream_t.
// group_size: one of DITQ_W4_GROUP_SIZES (configs/kernel_families.h); tile: an id from the table.
const char* launch_w8a8(const GemmParams& p, int tile, void* stream);
const char* launch_w4a8(const GemmParams& p, int group_size, int tile, void* stream);

// Host emulation (options: see emu/); throws std::runtime_error on a detected race or deadlock.
void emulate_w8a8(const GemmParams& p, int tile);
void emulate_w4a8(const GemmParams& p, int group_size, int tile);

}  // namespace ditq::gemm

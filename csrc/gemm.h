// Torch-free entry points of the CUDA int8 GEMMs (csrc/gemm.cuh): the real kernels (csrc/gemm.cu, nvcc) and
// the same kernels run by the host SIMT emulator (csrc/emulated_gemm.cpp, g++). bindings.cpp is the only
// caller; it validates every argument before calling (these functions trust their inputs).
#pragma once

#include <cstdint>

namespace ditq::gemm {

struct GemmParams;

// Tiles compiled in (configs/gemm_tiles.h): count, and {BM, BN, BK, WARPS_M, WARPS_N, STAGES, THREADS}.
int tile_count();
void tile_shape(int tile, int (&shape)[7]);
// Dynamic shared memory of a tile for W8 (group_size == 0) or W4 weights.
int tile_smem_bytes(int tile, int group_size);

// Real kernels: nullptr on success, else the CUDA error string. `stream` is a cudaStream_t.
// group_size: 32, 64, 128 or 256; tile: an id from the table.
const char* launch_w8a8(const GemmParams& p, int tile, void* stream);
const char* launch_w4a8(const GemmParams& p, int group_size, int tile, void* stream);

// Host emulation (options: see emu/); throws std::runtime_error on a detected race or deadlock.
void emulate_w8a8(const GemmParams& p, int tile);
void emulate_w4a8(const GemmParams& p, int group_size, int tile);

}  // namespace ditq::gemm

// Host-side facts about the CUDA int8 GEMMs' tile table (csrc/gemm_tiles.cpp), torch-free: tile shapes,
// shared memory, split-K decisions. The launchers themselves (gemm_w8a8_cuda / _emulated, ...) and their
// GemmParams are declared in launch.h with every other family's.
#pragma once

#include <cstdint>

#include "launch.h"

namespace ditq::gemm {

// Tiles compiled in (configs/gemm_tiles.h): count, and {BM, BN, BK, WARPS_M, WARPS_N, STAGES, THREADS}.
int tile_count();
void tile_shape(int tile, int (&shape)[7]);
// Dynamic shared memory of a tile for W8 (group_size == 0) or W4 weights.
int tile_smem_bytes(int tile, int group_size);

// Split-K: the number of k units a problem has for a tile (>= 1), and the split count used when the caller
// asks for the automatic one: enough CTAs to cover `sm_count` SMs twice, at most `max_splits` (the cap of the
// configs/gemm_tiles.h rule that picked the tile: max_splits(arch, M), float_a_max_splits() for the float-A
// kernels; >= 1, else std::invalid_argument), at least one k unit each.
int k_units(int tile, int group_size, int K);
int auto_splits(int tile, int group_size, int M, int N, int K, int sm_count, int max_splits);

}  // namespace ditq::gemm

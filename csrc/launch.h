// Torch-free launchers of ditq's CUDA kernels: the only interface between bindings.cpp (torch) and the
// kernels. Plain pointers and sizes; no torch, no CUDA headers, so the binding and the kernels compile apart.
//
// Every kernel family has two entry points taking the same argument struct:
//   const char* <family>_cuda(const Args&, void* stream)  real kernels (csrc/<family>.cu, nvcc; only in a
//                                                        DITQ_WITH_CUDA build): nullptr on success, else the
//                                                        CUDA error string; `stream` is a cudaStream_t.
//   void <family>_emulated(const Args&)                  the same kernel source under the host SIMT emulator
//                                                        (csrc/emulated.cpp, g++): throws std::runtime_error
//                                                        (ditq::emu::Error) on a detected kernel bug.
// The launchers trust their arguments: bindings.cpp validates everything before calling them.
//
// Adding a family: declare its Args and the two functions here (in a marked section), define them in
// <family>.cu and emulated.cpp (or emulated_<family>.cpp), register the op in bindings.cpp (or a header it
// includes, like gemm_bindings.h).
#pragma once

#include <cstdint>
#include <string>

namespace ditq {

// The float types of kernel inputs and outputs (one enum for every family).
enum class DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// ---- activation quantization (csrc/quantize_act.cuh) -------------------------------------------------------
struct QuantizeActArgs {
  const void* x;             // [M, K] contiguous, of `dtype`
  DType dtype;
  int64_t M, K;              // M < 2^31, K < 2^31 (the kernel takes both as int)
  const float* static_scale; // [1], or nullptr for dynamic per-row scales
  int8_t* q;                 // [M, K] out
  float* scales;             // [M] out (dynamic only)
};
const char* quantize_act_cuda(const QuantizeActArgs& args, void* stream);
void quantize_act_emulated(const QuantizeActArgs& args);

// ---- LayerNorm (no affine) + adaLN modulation + int8 quantization (csrc/norm_quantize.cuh) ----------------
struct NormQuantizeArgs {
  const void* x;             // [M, K] contiguous (M = B * S), of `dtype`
  DType dtype;
  int64_t M, K;              // M < 2^31, K < 2^31
  int64_t S;                 // rows per image: row m takes shift / scale row m / S
  const float* shift;        // [B, K] float32, or nullptr (then scale is nullptr too: no modulation)
  const float* scale;        // [B, K] float32, or nullptr
  float eps;
  const float* static_scale; // [1], or nullptr for dynamic per-row scales
  int8_t* q;                 // [M, K] out
  float* scales;             // [M] out (dynamic only)
};
const char* norm_quantize_cuda(const NormQuantizeArgs& args, void* stream);
void norm_quantize_emulated(const NormQuantizeArgs& args);

// ---- the emulator's knobs (csrc/emu/core.h Options), set from Python -------------------------------------
// order: 0 forward, 1 reverse, 2 random(seed); cp_async: 0 at issue, 1 at wait_group, 2 at the next barrier.
void emulator_set_options(int order, uint64_t seed, int cp_async, bool race_check);
void emulator_get_options(int& order, uint64_t& seed, int& cp_async, bool& race_check);
// The global-memory checker (Options::mem_check, on by default): bounds, read-only and unwritten-read checks
// of every global access against the buffers the launcher registered.
void emulator_set_mem_check(bool on);
bool emulator_get_mem_check();
// Hopper: arch 0 sm_80 / 1 sm_90a (which kernels the emulated launchers pick); async_landing 0 at issue /
// 1 lazily (TMA bytes at the first wait on their mbarrier, wgmma results at the retiring wait_group).
void emulator_set_hopper(int arch, int async_landing);
void emulator_get_hopper(int& arch, int& async_landing);

// ---- what each family accepts (configs/kernel_families.h) as a JSON object: csrc/families.cpp ---------------
std::string kernel_families_json();

// ---- int8 GEMMs (csrc/gemm.cuh; tile table and split-K helpers in csrc/gemm.h) -------------------------------
namespace gemm {
// Everything the kernel reads; passed to it by value. Plain pointers, no torch.
struct GemmParams {
  const void* a;            // int8 [M, K] row-major, 16-byte aligned, K % kKMultiple == 0; the fused kernels'
                            // float-A instantiations: fp32 / fp16 / bf16 [M, K] (GemmArgs::a_float)
  const float* a_scale;     // [1] (static) or [M] (per token)
  int a_scale_per_token;    // 0 / 1
  const void* w;            // int8 [N, K] (W8) or split-nibble uint8 [N, K / 2] (W4), 16-byte aligned
  const float* w_scale;     // [N] (W8) or [K / G, N] (W4); W4 with integer group scales: [N]
  const int32_t* w_qscale;  // W4 with integer group scales (two-level): [K / G, N] q in [1, 16]; else nullptr
  const float* bias;        // [N] float32 or nullptr
  void* out;                // [M, N] of out_dtype, contiguous
  DType out_dtype;
  int M, N, K;
  // Split-K (gridDim.z = splits): each CTA sums a contiguous range of k units (units: BK, or G when G > BK,
  // so a W4 group never straddles two splits). With splits > 1 every CTA stores its partial tile (int32 for
  // W8, fp32 for W4) to `workspace` and the last CTA of each output tile to arrive (atomic `counters`, zeroed
  // before the launch, left zeroed after it) adds the partials in split order 0..S-1 and runs the epilogue:
  // the result does not depend on which CTA finishes last.
  int splits;
  int* counters;        // [tiles_m * tiles_n], zero (Hopper: [split tiles])
  uint32_t* workspace;  // [splits * tiles_m * BM * tiles_n * BN] 32-bit words (Hopper: splits * split tiles tiles)
  // Hopper kernels only (gemm_sm90.cuh; the mma.sync kernels never read it): the first dp_tiles output tiles run
  // whole, one CTA each, and only the remaining ones are split `splits` ways ("data-parallel + split tail").
  // 0 (the value-initialized default): every tile split, the uniform split-K above.
  int dp_tiles;
  // The fused epilogue (gemm_*_fused: the FusedEpilogue instantiations read these; the plain kernels never
  // do). After y = acc * scale (+ bias), in this order: GELU (tanh), y *= gate[m / rows_per_gate, n],
  // y += residual[m, n], then either int8 = quantize(y, 1 / out_scale[0]) into `out` or y in out_dtype.
  struct Fused {
    int gelu;                 // 0 / 1
    const float* gate;        // [M / rows_per_gate, N] or nullptr
    int rows_per_gate;        // >= 1
    const void* residual;     // [M, N] of residual_dtype, or nullptr
    DType residual_dtype;
    const float* out_scale;   // [1]: the output is int8 [M, N]; nullptr: out_dtype
  } fused;
};
}  // namespace gemm

// The launch: the kernel's parameters plus what picks the instantiation.
struct GemmArgs {
  gemm::GemmParams params;
  int group_size;  // W4A8: one of DITQ_W4_GROUP_SIZES (configs/kernel_families.h); W8A8: 0
  int tile;        // an id of configs/gemm_tiles.h
  // Fused GEMMs only: A is float of a_dtype (not int8), quantized on load with the static a_scale[0]; these
  // instantiations exist for the tile float_a_tile() alone (gemm_fused_float_a_*).
  bool a_float = false;
  DType a_dtype = DType::kF32;
};
const char* gemm_w8a8_cuda(const GemmArgs& args, void* stream);
void gemm_w8a8_emulated(const GemmArgs& args);
const char* gemm_w4a8_cuda(const GemmArgs& args, void* stream);
void gemm_w4a8_emulated(const GemmArgs& args);
// The same GEMMs with the fused epilogue (params.fused): separate instantiations, so the plain ones above
// are compiled exactly as before.
const char* gemm_w8a8_fused_cuda(const GemmArgs& args, void* stream);
void gemm_w8a8_fused_emulated(const GemmArgs& args);
const char* gemm_w4a8_fused_cuda(const GemmArgs& args, void* stream);
void gemm_w4a8_fused_emulated(const GemmArgs& args);
// The fused GEMMs with a float A (args.a_float; W8 when args.group_size == 0, else W4): csrc/gemm_fused_float_a.cu
// and csrc/emulated_gemm_fused_float_a.cpp, a translation unit each.
const char* gemm_fused_float_a_cuda(const GemmArgs& args, void* stream);
void gemm_fused_float_a_emulated(const GemmArgs& args);

// ---- Hopper int8 GEMMs (csrc/gemm_sm90.cuh, TMA + wgmma): GemmArgs.tile is an index into the sm90 lists of
// configs/gemm_tiles_sm90.h (the binding strips kSm90TileBase). Split-K as above (gridDim.z = params.splits;
// workspace of BM x BN words per output tile and split, units of max(G, 128) k).
const char* gemm_w8a8_sm90_cuda(const GemmArgs& args, void* stream);
void gemm_w8a8_sm90_emulated(const GemmArgs& args);
const char* gemm_w4a8_sm90_cuda(const GemmArgs& args, void* stream);
void gemm_w4a8_sm90_emulated(const GemmArgs& args);
// The Hopper GEMMs with the fused epilogue (params.fused; int8 A only): csrc/gemm_sm90_fused.cu and
// csrc/emulated_gemm_sm90_fused.cpp, a translation unit each, so the plain Hopper kernels compile as before.
const char* gemm_w8a8_sm90_fused_cuda(const GemmArgs& args, void* stream);
void gemm_w8a8_sm90_fused_emulated(const GemmArgs& args);
const char* gemm_w4a8_sm90_fused_cuda(const GemmArgs& args, void* stream);
void gemm_w4a8_sm90_fused_emulated(const GemmArgs& args);
// Whether the current GPU runs the Hopper kernels: this build loaded sm_90a code for it (a plain sm_90 build
// has none). Real build only.
bool gemm_sm90_available();
// The architecture the emulated launch picks kernels for: 90 under emulator_options(arch="sm_90a"), else 80.
int emulated_gemm_arch();

}  // namespace ditq

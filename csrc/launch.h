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
// <family>.cu and emulated.cpp (or a file of its own), register the op in bindings.cpp.
#pragma once

#include <cstdint>
#include <string>

namespace ditq {

enum class DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// ---- activation quantization (csrc/quantize_act.cuh) -------------------------------------------------------
struct QuantizeActArgs {
  const void* x;             // [M, K] contiguous, of `dtype`
  DType dtype;
  int64_t M, K;              // M < 2^31 * 4, K < 2^31
  const float* static_scale; // [1], or nullptr for dynamic per-row scales
  int8_t* q;                 // [M, K] out
  float* scales;             // [M] out (dynamic only)
};
const char* quantize_act_cuda(const QuantizeActArgs& args, void* stream);
void quantize_act_emulated(const QuantizeActArgs& args);

// ---- the emulator's knobs (csrc/emu/core.h Options), set from Python -------------------------------------
// order: 0 forward, 1 reverse, 2 random(seed); cp_async: 0 at issue, 1 at wait_group, 2 at the next barrier.
void emulator_set_options(int order, uint64_t seed, int cp_async, bool race_check);
void emulator_get_options(int& order, uint64_t& seed, int& cp_async, bool& race_check);
// The global-memory checker (Options::mem_check, on by default): bounds, read-only and unwritten-read checks
// of every global access against the buffers the launcher registered.
void emulator_set_mem_check(bool on);
bool emulator_get_mem_check();

// ---- what each family accepts (configs/kernel_families.h) as a JSON object: csrc/families.cpp ---------------
std::string kernel_families_json();

// ---- GEMMs: declared in csrc/gemm.h ----------------------------------------------------------------------------

}  // namespace ditq

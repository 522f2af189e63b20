// The CUDA kernels compiled by the host compiler and run by the SIMT emulator (backend "cuda-emulated").
// Same sources as the nvcc build (csrc/*.cuh): ptx.cuh swaps each PTX instruction for its emulated twin.
// Torch-free (bindings.cpp calls these through launch.h): the emulator's macros (threadIdx, __syncthreads,
// min/max) must never meet torch's headers.
#include "launch.h"
#include "quantize_act.cuh"

namespace ditq {

void quantize_act_emulated(const QuantizeActArgs& args) {
  qact::dispatch(args, [](auto kernel, dim3 grid, dim3 block, auto... a) {
    emu::launch(grid, block, 0, emu::global_options(), kernel, a...);
  });
}

void emulator_set_options(int order, uint64_t seed, int cp_async, bool race_check) {
  emu::Options& o = emu::global_options();
  o.order = static_cast<emu::Order>(order);
  o.seed = seed;
  o.cp_async = static_cast<emu::CpAsync>(cp_async);
  o.race_check = race_check;
}

void emulator_get_options(int& order, uint64_t& seed, int& cp_async, bool& race_check) {
  const emu::Options& o = emu::global_options();
  order = static_cast<int>(o.order);
  seed = o.seed;
  cp_async = static_cast<int>(o.cp_async);
  race_check = o.race_check;
}

void emulator_set_mem_check(bool on) { emu::global_options().mem_check = on; }
bool emulator_get_mem_check() { return emu::global_options().mem_check; }

}  // namespace ditq

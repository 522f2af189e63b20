// The CUDA kernels compiled by the host compiler and run by the SIMT emulator (backend "cuda-emulated").
// Same sources as the nvcc build (csrc/*.cuh): ptx.cuh swaps each PTX instruction for its emulated twin.
// Torch-free (bindings.cpp calls these through launch.h): the emulator's macros (threadIdx, __syncthreads,
// min/max) must never meet torch's headers.
#include <vector>

#include "launch.h"
#include "quantize_act.cuh"

namespace ditq {

void quantize_act_emulated(const QuantizeActArgs& args) {
  // The buffers with their exact extents, for the global-memory checker (emu/global.h).
  using emu::Access;
  const size_t elems = static_cast<size_t>(args.M) * static_cast<size_t>(args.K);
  const size_t x_bytes = elems * (args.dtype == DType::kF32 ? 4 : 2);
  const std::vector<emu::GlobalBuffer> bufs = {
      {args.x, x_bytes, "x", Access::ReadOnly},
      {args.static_scale, args.static_scale ? 4u : 0u, "static_scale", Access::ReadOnly},
      {args.q, elems, "q", Access::Output},
      {args.scales, args.scales ? static_cast<size_t>(args.M) * 4 : 0, "scales", Access::Output}};
  qact::dispatch(args, [&](const char* name, auto kernel, dim3 grid, dim3 block, auto... a) {
    emu::launch_checked(grid, block, 0, emu::global_options(), name, bufs, kernel, a...);
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

void emulator_set_hopper(int arch, int async_landing) {
  emu::global_options().arch = static_cast<emu::Arch>(arch);
  emu::global_options().async_landing = static_cast<emu::AsyncLanding>(async_landing);
}

void emulator_get_hopper(int& arch, int& async_landing) {
  arch = static_cast<int>(emu::global_options().arch);
  async_landing = static_cast<int>(emu::global_options().async_landing);
}
bool emulator_get_mem_check() { return emu::global_options().mem_check; }

}  // namespace ditq

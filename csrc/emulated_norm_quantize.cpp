// The fused LayerNorm + modulation + quantization (csrc/norm_quantize.cuh) compiled by the host compiler and
// run by the SIMT emulator: backend "cuda-emulated". Torch-free (bindings go through launch.h).
#include <vector>

#include "launch.h"
#include "norm_quantize.cuh"

namespace ditq {

void norm_quantize_emulated(const NormQuantizeArgs& args) {
  // The buffers with their exact extents, for the global-memory checker (emu/global.h).
  using emu::Access;
  const size_t elems = static_cast<size_t>(args.M) * static_cast<size_t>(args.K);
  const size_t x_bytes = elems * (args.dtype == DType::kF32 ? 4 : 2);
  const size_t mod_bytes = args.shift ? static_cast<size_t>(args.M / args.S) * static_cast<size_t>(args.K) * 4 : 0;
  const std::vector<emu::GlobalBuffer> bufs = {
      {args.x, x_bytes, "x", Access::ReadOnly},
      {args.shift, mod_bytes, "shift", Access::ReadOnly},
      {args.scale, mod_bytes, "scale", Access::ReadOnly},
      {args.static_scale, args.static_scale ? 4u : 0u, "static_scale", Access::ReadOnly},
      {args.q, elems, "q", Access::Output},
      {args.scales, args.scales ? static_cast<size_t>(args.M) * 4 : 0, "scales", Access::Output}};
  normq::dispatch(args, [&](const char* name, auto kernel, dim3 grid, dim3 block, auto... a) {
    emu::launch_checked(grid, block, 0, emu::global_options(), name, bufs, kernel, a...);
  });
}

}  // namespace ditq

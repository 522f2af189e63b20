// torch.ops.ditq_C.kernel_families(): what each kernel family of this build accepts, as JSON, generated from
// configs/kernel_families.h and configs/gemm_tiles.h so the Python runtime never keeps a copy of those facts.
// Torch-free and built in every configuration.
#include <string>

#include "configs/kernel_families.h"
#include "launch.h"

namespace ditq {
namespace {

// The SM architectures the real kernels were compiled for: setup.py passes DITQ_CUDA_ARCHS (e.g. 80,90) from
// TORCH_CUDA_ARCH_LIST; a build without nvcc has none.
std::string built_archs() {
  std::string out = "[";
#if DITQ_WITH_CUDA && defined(DITQ_CUDA_ARCHS)
  constexpr int archs[] = {DITQ_CUDA_ARCHS};
  for (int a : archs) out += (out.size() > 1 ? ", " : "") + std::to_string(a);
#endif
  return out + "]";
}

std::string gemm_family(int bits, const char* layout, const std::string& archs) {
  std::string groups = "null";
  if (bits == 4) {
    groups = "[";
    for (int g : gemm::kW4GroupSizes) groups += (groups.size() > 1 ? ", " : "") + std::to_string(g);
    groups += "]";
  }
  return "{\"weight_bits\": " + std::to_string(bits) + ", \"group_sizes\": " + groups +
         ", \"k_multiple\": " + std::to_string(gemm::kKMultiple) + ", \"max_k\": " + std::to_string(gemm::kMaxK) +
         ", \"layout\": \"" + layout + "\", \"layout_version\": " + std::to_string(gemm::kLayoutVersion) +
         ", \"min_arch\": " + std::to_string(gemm::min_arch()) + ", \"built_archs\": " + archs +
         ", \"emulated\": true}";
}

}  // namespace

std::string kernel_families_json() {
  const std::string archs = built_archs();
  return "{\"quantize_act\": {\"k_multiple\": " + std::to_string(kQuantizeActKMultiple) +
         ", \"max_k\": " + std::to_string(kQuantizeActMaxK) + ", \"built_archs\": " + archs +
         ", \"emulated\": true}, \"gemm_w8a8\": " + gemm_family(8, gemm::kW8Layout, archs) +
         ", \"gemm_w4a8\": " + gemm_family(4, gemm::kW4Layout, archs) +
         // integer group scales (two-level): the Hopper kernels only (gemm_sm90.cuh), emulated under sm_90a
         ", \"gemm_w4a8i\": " + gemm_family(4, gemm::kW4Layout, archs).insert(1, "\"max_int_group_scale\": " +
         std::to_string(gemm::kMaxIntGroupScale) + ", \"archs_needed\": [90], ") +
         ", \"norm_quantize\": {\"k_multiple\": " + std::to_string(kNormQuantizeKMultiple) +
         ", \"max_k\": " + std::to_string(kNormQuantizeMaxK) + ", \"built_archs\": " + archs +
         ", \"emulated\": true}}";
}

}  // namespace ditq

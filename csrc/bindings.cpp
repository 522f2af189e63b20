// ditq._C: the torch bindings of the CUDA kernels. THE ONLY FILE THAT INCLUDES TORCH HEADERS (they cost ~65 s
// of compile time per translation unit on our machines; the kernels live in torch-free .cu / .cpp files
// behind csrc/launch.h).
//
// Ops (namespace ditq_C), with the schemas of ditq/ops.py minus the trailing `backend` argument:
//   quantize_act(Tensor x, Tensor? scale) -> (Tensor, Tensor)
//     dispatch key CUDA: the real kernel on the current stream (DITQ_WITH_CUDA builds only);
//     dispatch key CPU:  the same kernel under the host SIMT emulator (backend "cuda-emulated").
//   emulator_set_options(int order, int seed, int cp_async, bool race_check) -> ()
//   emulator_get_options() -> int[]      [order, seed, cp_async, race_check]
//   emulator_set_mem_check(bool on) -> ()  the global-memory checker (on by default)
//   emulator_get_mem_check() -> bool
//   emulator_set_hopper(int arch, int async_landing) -> ()   arch 0 sm_80 / 1 sm_90a; landing 0 issue / 1 wait
//   emulator_get_hopper() -> int[]       [arch, async_landing]
//   kernel_families() -> str             JSON: what each kernel family accepts (configs/kernel_families.h)
//   built_with_cuda() -> bool
// Every input is validated here with TORCH_CHECK before any launch: these ops are callable directly, not only
// through ditq.ops, and the kernels trust their arguments.
#include <torch/extension.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "configs/kernel_families.h"
#include "launch.h"

#if DITQ_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace ditq::binding {

inline const char* backend_name(bool emulated) { return emulated ? "cuda-emulated" : "cuda"; }

inline void check_device(const char* op, const at::Tensor& x, bool emulated) {
  if (emulated) {
    TORCH_CHECK_VALUE(x.device().is_cpu(), op, " (cuda-emulated) runs on CPU tensors; x is on ", x.device());
  } else {
    TORCH_CHECK_VALUE(x.device().is_cuda(), op, " (cuda) runs on CUDA tensors; x is on ", x.device());
  }
}

// ---- quantize_act --------------------------------------------------------------------------------------------
inline DType float_dtype(const char* op, const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return DType::kF32;
    case at::kHalf: return DType::kF16;
    case at::kBFloat16: return DType::kBF16;
    default: TORCH_CHECK_TYPE(false, op, ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
}

template <bool EMULATED>
std::tuple<at::Tensor, at::Tensor> quantize_act(const at::Tensor& x, const std::optional<at::Tensor>& scale) {
  const char* op = "quantize_act";
  check_device(op, x, EMULATED);
  const DType dt = float_dtype(op, x);
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D [M, K] (tokens x features), got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.is_contiguous(), op, ": x must be contiguous (call .contiguous() first)");
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK_VALUE(k <= kQuantizeActMaxK && m <= std::numeric_limits<int32_t>::max(), op, ": x of shape ",
                    x.sizes(), " is too large (M must be below 2^31, K at most ", kQuantizeActMaxK, ")");
  if (scale) {
    TORCH_CHECK_VALUE(scale->device() == x.device(), op, ": scale is on ", scale->device(),
                      " but x is on ", x.device(), ": move both to one device");
    TORCH_CHECK_TYPE(scale->scalar_type() == at::kFloat, op, ": a static scale must be float32, got ",
                     scale->scalar_type());
    TORCH_CHECK_VALUE(scale->dim() == 1 && scale->size(0) == 1, op, ": a static scale must have shape [1], got ",
                      scale->sizes());
  }
#if DITQ_WITH_CUDA
  std::optional<c10::cuda::CUDAGuard> guard;
  if (!EMULATED) guard.emplace(x.device());
#endif
  at::Tensor q = at::empty({m, k}, x.options().dtype(at::kChar));
  at::Tensor s = scale ? scale->contiguous().clone() : at::empty({m}, x.options().dtype(at::kFloat));
  if (m == 0 || k == 0) {  // nothing to launch; an empty row has absmax 0, so scale 1 (the reference's rule)
    if (!scale) s.fill_(1.0f);
    return {q, s};
  }
  QuantizeActArgs a{x.data_ptr(), dt, m, k, scale ? s.data_ptr<float>() : nullptr, q.data_ptr<int8_t>(),
                    scale ? nullptr : s.data_ptr<float>()};
  if (EMULATED) {
    // Poison: -128 is never a quantizer output and -1 never a scale (scales are positive, or NaN for a row
    // holding NaN / inf, so a NaN fill could not show that row's scale unwritten): an element the kernel fails
    // to write shows up in an exact comparison.
    q.fill_(-128);
    if (!scale) s.fill_(-1.0f);
    quantize_act_emulated(a);
    return {q, s};
  }
#if DITQ_WITH_CUDA
  const char* err = quantize_act_cuda(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, op, ": CUDA kernel launch failed: ", err ? err : "");
  return {q, s};
#else
  TORCH_CHECK(false, op, ": this ditq._C was built without CUDA");
#endif
}

// ---- emulator knobs --------------------------------------------------------------------------------------------
inline void set_options(int64_t order, int64_t seed, int64_t cp_async, bool race_check) {
  TORCH_CHECK_VALUE(order >= 0 && order <= 2, "emulator order must be 0 (forward), 1 (reverse) or 2 (random)");
  TORCH_CHECK_VALUE(cp_async >= 0 && cp_async <= 2,
                    "emulator cp_async must be 0 (land at issue), 1 (at wait_group) or 2 (at the next barrier)");
  TORCH_CHECK_VALUE(seed >= 0, "emulator seed must be >= 0");
  emulator_set_options(static_cast<int>(order), static_cast<uint64_t>(seed), static_cast<int>(cp_async),
                       race_check);
}

inline std::vector<int64_t> get_options() {
  int order, cp_async;
  uint64_t seed;
  bool race_check;
  emulator_get_options(order, seed, cp_async, race_check);
  return {order, static_cast<int64_t>(seed), cp_async, race_check ? 1 : 0};
}

inline void set_mem_check(bool on) { emulator_set_mem_check(on); }

inline void set_hopper(int64_t arch, int64_t async_landing) {
  TORCH_CHECK_VALUE(arch == 0 || arch == 1, "emulator arch must be 0 (sm_80) or 1 (sm_90a)");
  TORCH_CHECK_VALUE(async_landing == 0 || async_landing == 1,
                    "emulator async_landing must be 0 (at issue) or 1 (at the wait)");
  emulator_set_hopper(static_cast<int>(arch), static_cast<int>(async_landing));
}

inline std::vector<int64_t> get_hopper() {
  int arch, landing;
  emulator_get_hopper(arch, landing);
  return {arch, landing};
}
inline bool get_mem_check() { return emulator_get_mem_check(); }
inline std::string kernel_families() { return kernel_families_json(); }

inline bool built_with_cuda() { return DITQ_WITH_CUDA != 0; }

}  // namespace ditq::binding

TORCH_LIBRARY(ditq_C, m) {
  m.def("quantize_act(Tensor x, Tensor? scale) -> (Tensor, Tensor)");
  m.def("emulator_set_options(int order, int seed, int cp_async, bool race_check) -> ()",
        &ditq::binding::set_options);
  m.def("emulator_get_options() -> int[]", &ditq::binding::get_options);
  m.def("emulator_set_mem_check(bool on) -> ()", &ditq::binding::set_mem_check);
  m.def("emulator_get_mem_check() -> bool", &ditq::binding::get_mem_check);
  m.def("emulator_set_hopper(int arch, int async_landing) -> ()", &ditq::binding::set_hopper);
  m.def("emulator_get_hopper() -> int[]", &ditq::binding::get_hopper);
  m.def("kernel_families() -> str", &ditq::binding::kernel_families);
  m.def("built_with_cuda() -> bool", &ditq::binding::built_with_cuda);
  // ---- more kernel families: m.def their schemas here (or in a TORCH_LIBRARY_FRAGMENT of their header) ----
}

TORCH_LIBRARY_IMPL(ditq_C, CPU, m) {
  m.impl("quantize_act", &ditq::binding::quantize_act<true>);
  // ---- more kernel families: their emulated implementations ----
}

#if DITQ_WITH_CUDA
TORCH_LIBRARY_IMPL(ditq_C, CUDA, m) {
  m.impl("quantize_act", &ditq::binding::quantize_act<false>);
  // ---- more kernel families: their CUDA implementations ----
}
#endif

// ---- more kernel families: headers with their checks and registrations (included here, compiled once) ----
#include "gemm_bindings.h"  // the int8 GEMMs (ditq_C::gemm_*: schemas, checks, CPU + CUDA impls)
#include "norm_quantize_bindings.h"  // ditq_C::norm_modulate_quantize (fused LayerNorm + modulate + quantize)

// A Python module, so that `import ditq._C` loads the library and runs the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "ditq CUDA kernels and their host emulation (torch.ops.ditq_C)"; }

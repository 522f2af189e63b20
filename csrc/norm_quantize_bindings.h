// Torch binding of the fused LayerNorm + adaLN modulation + int8 quantization (csrc/norm_quantize.cuh) as
// ditq_C::norm_modulate_quantize(x, shift, scale, eps, act_scale) -> (q, scales), the contract of
// torch.ops.ditq.norm_modulate_quantize (ditq/ops.py). Included by bindings.cpp only (torch's headers). Every
// argument is checked here before a launch: the op is callable directly, and the kernel trusts its arguments.
#pragma once

#include <torch/extension.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "binding_messages.h"
#include "configs/kernel_families.h"
#include "launch.h"

#if DITQ_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace ditq::norm_binding {

template <bool EMULATED>
std::tuple<at::Tensor, at::Tensor> norm_modulate_quantize(const at::Tensor& x, const std::optional<at::Tensor>& shift,
                                                          const std::optional<at::Tensor>& scale, double eps,
                                                          const std::optional<at::Tensor>& act_scale) {
  const char* op = "norm_modulate_quantize";
  if (EMULATED) {
    TORCH_CHECK_VALUE(x.device().is_cpu(), op, " (cuda-emulated) runs on CPU tensors; x is on ", x.device());
  } else {
    TORCH_CHECK_VALUE(x.device().is_cuda(), op, " (cuda) runs on CUDA tensors; x is on ", x.device());
  }
  // The texts follow ditq/ops.py's check_norm_modulate_quantize (one message per mistake on every backend).
  namespace msg = ditq::binding_messages;
  msg::check_float(op, "x", x);
  const DType dt = x.scalar_type() == at::kFloat ? DType::kF32 : x.scalar_type() == at::kHalf ? DType::kF16
                                                                                              : DType::kBF16;
  TORCH_CHECK_VALUE(x.dim() == 3, op, ": x must be 3-D, got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.is_contiguous(), op, ": x must be contiguous (call .contiguous() first)");
  const int64_t b = x.size(0), s = x.size(1), k = x.size(2), m = b * s;
  TORCH_CHECK_VALUE(k <= kNormQuantizeMaxK && m <= std::numeric_limits<int32_t>::max(), op, ": x of shape ",
                    x.sizes(), " is too large (B * S must be below 2^31, K at most ", kNormQuantizeMaxK, ")");
  TORCH_CHECK_VALUE(shift.has_value() == scale.has_value(), op,
                    ": shift and scale come together: give both (adaLN modulation) or neither");
  for (const auto* t : {&shift, &scale}) {
    if (!t->has_value()) continue;
    const char* name = t == &shift ? "shift" : "scale";
    msg::check_float(op, name, **t);
    TORCH_CHECK_VALUE((*t)->dim() == 2 && (*t)->size(0) == b && (*t)->size(1) == k, op, ": ", name,
                      " must be [B, K] = [", b, ", ", k, "], got ", (*t)->sizes());
  }
  // what the kernel adds (the reference rounds eps to fp32 too): an eps that rounds to 0 would divide by 0
  const float eps32 = static_cast<float>(eps);
  TORCH_CHECK_VALUE(std::isfinite(eps32) && eps32 > 0.0f, op, ": eps must be a positive finite float (in "
                    "float32), got ", eps);
  if (act_scale) {
    TORCH_CHECK_TYPE(act_scale->scalar_type() == at::kFloat, op, ": act_scale must be float32; got ",
                     msg::dtype_name(act_scale->scalar_type()));
    TORCH_CHECK_VALUE(act_scale->dim() == 1 && act_scale->size(0) == 1, op,
                      ": a static scale must be float32 [1], got shape ", act_scale->sizes());
  }
  if (shift) msg::check_same_device(op, "shift", *shift, x.device());
  if (scale) msg::check_same_device(op, "scale", *scale, x.device());
  if (act_scale) msg::check_same_device(op, "act_scale", *act_scale, x.device());
#if DITQ_WITH_CUDA
  std::optional<c10::cuda::CUDAGuard> guard;
  if (!EMULATED) guard.emplace(x.device());
#endif
  at::Tensor q = at::empty({m, k}, x.options().dtype(at::kChar));
  at::Tensor sc = act_scale ? act_scale->contiguous().clone() : at::empty({m}, x.options().dtype(at::kFloat));
  if (m == 0 || k == 0) {  // nothing to launch; an empty row gets scale 1, as in quantize_act
    if (!act_scale) sc.fill_(1.0f);
    return {q, sc};
  }
  // The kernel reads shift / scale as contiguous fp32 (exact for fp16 / bf16; [B, K] is small next to x), from
  // 16-byte aligned rows when K allows (a fresh allocation is aligned).
  at::Tensor shift32, scale32;
  if (shift) {
    shift32 = shift->to(at::kFloat).contiguous();
    scale32 = scale->to(at::kFloat).contiguous();
    if (reinterpret_cast<uintptr_t>(shift32.data_ptr()) % 16) shift32 = shift32.clone();
    if (reinterpret_cast<uintptr_t>(scale32.data_ptr()) % 16) scale32 = scale32.clone();
  }
  NormQuantizeArgs a{x.data_ptr(), dt, m, k, s,
                     shift ? shift32.data_ptr<float>() : nullptr, shift ? scale32.data_ptr<float>() : nullptr,
                     eps32, act_scale ? sc.data_ptr<float>() : nullptr, q.data_ptr<int8_t>(),
                     act_scale ? nullptr : sc.data_ptr<float>()};
  if (EMULATED) {
    // Poison: -128 is never a quantizer output and -1 never a scale (positive, or NaN for a non-finite row).
    q.fill_(-128);
    if (!act_scale) sc.fill_(-1.0f);
    norm_quantize_emulated(a);
    return {q, sc};
  }
#if DITQ_WITH_CUDA
  const char* err = norm_quantize_cuda(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, op, ": CUDA kernel launch failed: ", err ? err : "");
  return {q, sc};
#else
  TORCH_CHECK(false, op, ": this ditq._C was built without CUDA");
#endif
}

}  // namespace ditq::norm_binding

TORCH_LIBRARY_FRAGMENT(ditq_C, m) {
  m.def("norm_modulate_quantize(Tensor x, Tensor? shift, Tensor? scale, float eps, Tensor? act_scale) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ditq_C, CPU, m) {
  m.impl("norm_modulate_quantize", &ditq::norm_binding::norm_modulate_quantize<true>);
}

#if DITQ_WITH_CUDA
TORCH_LIBRARY_IMPL(ditq_C, CUDA, m) {
  m.impl("norm_modulate_quantize", &ditq::norm_binding::norm_modulate_quantize<false>);
}
#endif

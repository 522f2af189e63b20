// Error texts the C++ bindings share with ditq/ops.py's checks, so that a bad argument reads the same on
// every backend: dtype names as Python writes them, and the device-mismatch sentence.
#pragma once

#include <torch/extension.h>

#include <string>

namespace ditq::binding_messages {

// torch.float32 -> "float32", as ditq.ops writes dtypes.
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kDouble: return "float64";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kShort: return "int16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kBool: return "bool";
    default: return c10::toString(t);
  }
}

inline bool is_float_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

// "<name> must be float16, bfloat16, float32; got int32" (TypeError), unless t is one of them.
inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(is_float_dtype(t.scalar_type()), op, ": ", name, " must be float16, bfloat16, float32; got ",
                   dtype_name(t.scalar_type()));
}

// A float `a` of the fused GEMMs with per-token scales (ValueError), ditq.ops.float_a_needs_static_scale's words:
// the kernel quantizes a as it loads it, with one static scale.
inline void check_float_a_static_scale(const char* op, const at::Tensor& a_scale) {
  TORCH_CHECK_VALUE(a_scale.dim() == 1 && a_scale.size(0) == 1, op, ": a float activation needs a static a_scale, "
                    "float32 [1] (the fused GEMM quantizes it as it loads it), got shape (", a_scale.size(0),
                    ",): quantize it with quantize_act for per-token scales");
}

// "<name> is on meta but the activations are on cpu: move all inputs of a ditq op to one device" (ValueError).
inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Device& dev) {
  TORCH_CHECK_VALUE(t.device() == dev, op, ": ", name, " is on ", t.device(), " but the activations are on ", dev,
                    ": move all inputs of a ditq op to one device");
}

}  // namespace ditq::binding_messages

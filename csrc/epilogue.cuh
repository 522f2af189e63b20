// Element-wise pieces shared by the kernels' epilogues: int8 quantization with a known reciprocal scale (the
// activation quantizer, the fused norm, the GEMMs' quantize-for-the-next-layer output), GELU (tanh
// approximation), and exact loads of fp16 / bf16 bits as fp32. One definition each, included by every kernel
// that uses it, so that "quantized like quantize_act" is the same code, not a copy.
//
// Every rounding is explicit (__fmul_rn, __fadd_rn, __fdiv_rn, __float2int_rn): nvcc may otherwise contract a
// product into a following add, and the host emulator (emu/emu.h) reproduces each of these exactly. The one
// function that is not bit-identical between the two builds is expf (CUDA's libdevice expf, <= 2 ulp, vs the
// host libm's): GELU's result may differ in its last bit between `cuda` and `cuda-emulated`.
#pragma once

#include <cmath>
#include <cstdint>

#include "launch.h"
#include "ptx.cuh"

namespace ditq::epi {

constexpr float kQmax = 127.0f;

// q = clamp(rint(x * inv), -127, 127): fp32 multiply, round half to even (cvt.rni), NaN -> 0 (cvt.rni of NaN),
// +-inf and anything past +-127 -> +-127. `inv` is 1 / scale as an IEEE division (the reference's
// torch.reciprocal), computed once by the caller.
DITQ_DEVICE int8_t quantize_int8(float x, float inv) {
  const int q = __float2int_rn(__fmul_rn(x, inv));
  return static_cast<int8_t>(q < -127 ? -127 : (q > 127 ? 127 : q));
}

// GELU, tanh approximation (diffusers' GELU(approximate="tanh")):
//     gelu(y) = 0.5 * y * (1 + tanh(u)),   u = sqrt(2/pi) * (y + 0.044715 * y^3)
// evaluated through the identity 0.5 * (1 + tanh(u)) = 1 / (1 + exp(-2u)):
//     gelu(y) = y / (1 + exp(-2u))
// Why this form: it needs one expf and one IEEE division, both available identically named in both builds
// (there is no tanhf both builds round alike), and it has no cancellation: where tanh(u) is close to -1 (y
// below about -4) the literal form's 1 + tanh(u) is a difference of nearly equal numbers and keeps only a
// few correct bits, while exp(-2u) is accurate there. Limits: u -> +inf gives exp = 0 and y (y = +inf stays
// +inf); u -> -inf gives exp = +inf and y / inf = -0; y = -inf gives -inf / inf = NaN, as the literal form's
// -inf * 0 does; NaN stays NaN. y^3 may overflow to +-inf for |y| > 7e12: the limits above apply unchanged.
DITQ_DEVICE float gelu_tanh(float y) {
  const float y3 = __fmul_rn(__fmul_rn(y, y), y);
  const float u = __fmul_rn(0.7978845608028654f, __fadd_rn(y, __fmul_rn(0.044715f, y3)));
  return __fdiv_rn(y, __fadd_rn(1.0f, expf(__fmul_rn(-2.0f, u))));
}

// 16-bit float bits -> fp32, exactly (every fp16 / bf16 value is an fp32 value).
DITQ_DEVICE float bf16_bits_to_f32(uint16_t b) { return __bfloat162float(__ushort_as_bfloat16(b)); }
DITQ_DEVICE float f16_bits_to_f32(uint16_t b) { return __half2float(__ushort_as_half(b)); }
DITQ_DEVICE float bits16_to_f32(uint16_t b, DType t) {
  return t == DType::kBF16 ? bf16_bits_to_f32(b) : f16_bits_to_f32(b);
}

}  // namespace ditq::epi

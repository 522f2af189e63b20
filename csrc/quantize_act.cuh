// Activation quantization: float [M, K] (fp32 / fp16 / bf16) -> int8 [M, K], with one static scale or one
// dynamic scale per row (token). Bit-exact with ditq/quant/reference.py:
//
//   s   = absmax / 127  (IEEE fp32 division; all-zero row -> s = 1)     dynamic: absmax of the row
//   inv = 1 / s         (IEEE fp32 division)                            static:  s = scale[0]
//   q   = clamp(rint(x * inv), -127, 127)   (fp32 multiply, round half to even)
//
// Non-finite values: q of NaN is 0, of +-inf +-127 (static scale, elementwise). With a dynamic scale a row
// holding any NaN or +-inf gets scale NaN and q all 0, so every GEMM output of that row is NaN (NaN * anything)
// rather than a silently finite number; the absmax is NaN-propagating, which fmaxf alone is not.
//
// Every rounding is spelled out (__fdiv_rn, __fmul_rn, __float2int_rn) so nvcc cannot contract or
// approximate it (plain `/` is IEEE only without --use_fast_math, and a*b may be fused into a later add),
// and the host emulator reproduces each one exactly. absmax itself is exact (max of |x|, x widened exactly).
//
// ---- Work split ------------------------------------------------------------------------------------------
// One warp per row, kWarps rows per block. A row is the unit of the reduction, so the absmax needs only a
// 5-step butterfly of shfl.sync.bfly (no shared memory, no __syncthreads), and a block with rows past M simply
// loses whole warps (uniform early return: no barrier follows). Our rows are 1152..32768 elements: 36..1024
// per lane, enough independent 16-byte loads per lane to hide latency at the M of a DiT (>= 256 rows).
// The dynamic path reads the row twice (absmax, then quantize); the second read hits L1/L2 (a row is
// <= 128 KB), which is cheaper than holding up to 1024 values per lane in registers.
//
// ---- Memory access -----------------------------------------------------------------------------------------
// kVec: each lane loads 16 bytes at a time (LDG.E.128: 4 fp32 or 8 fp16/bf16) and stores 4 or 8 int8 at a
// time; lanes of a warp touch 512 consecutive bytes per step (fully coalesced). It needs the row start
// 16-byte aligned: x 16-byte aligned and K * sizeof(T) % 16 == 0 (then q rows are aligned to the store width
// too). Otherwise (odd K...) the scalar path does one element per lane per step, still coalesced.
#pragma once

#include <cstdint>
#include <cstring>
#include <cmath>
#include <string>

#include "launch.h"
#include "epilogue.cuh"
#include "ptx.cuh"

#if !DITQ_EMULATED
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace ditq::qact {

constexpr int kWarps = 4;  // rows per block
using epi::kQmax;

DITQ_DEVICE float to_float(float v) { return v; }
DITQ_DEVICE float to_float(__half v) { return __half2float(v); }
DITQ_DEVICE float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

constexpr float kFloatMax = 3.40282346638528859812e+38f;

// The scale of a non-finite row: the quiet NaN torch produces (0x7fc00000), so the bits match a reference.
DITQ_DEVICE float nan_f32() { return __uint_as_float(0x7fc00000u); }

// |x| for the row absmax, with NaN (which fmaxf would drop) and +-inf both mapped to +inf, which fmaxf keeps:
// the row's max is then inf exactly when the row holds a non-finite value.
DITQ_DEVICE float abs_or_inf(float x) {
  const float a = fabsf(x);
  return a <= kFloatMax ? a : __uint_as_float(0x7f800000u);
}

// q = clamp(rint(x * inv), -127, 127), NaN -> 0, +-inf -> +-127: epilogue.cuh, shared with the GEMMs' int8
// output and the fused norm.
using epi::quantize_int8;

// 16 bytes = kVec elements of T.
template <class T>
struct Vec {
  static constexpr int N = 16 / sizeof(T);
  T e[N];
  DITQ_DEVICE static Vec load(const T* p) {
    const uint4 u = ptx::ld_global_16(p);
    Vec v;
    std::memcpy(v.e, &u, 16);  // a register reinterpretation: no memory traffic on the GPU
    return v;
  }
};

// The int8 results of one 16-byte input vector, stored with one 4- or 8-byte store.
template <int N>
struct Packed;
template <>
struct Packed<4> {
  using type = uint32_t;
};
template <>
struct Packed<8> {
  using type = uint2;
};

template <class T, bool kVec, bool kDynamic>
DITQ_GLOBAL void quantize_act_kernel(const T* __restrict__ x, const float* __restrict__ static_scale,
                                     int8_t* __restrict__ q, float* __restrict__ scales, int M, int K) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int row = static_cast<int>(blockIdx.x) * kWarps + static_cast<int>(threadIdx.x) / 32;
  if (row >= M) return;  // the whole warp: its row does not exist
  const T* xr = x + static_cast<size_t>(row) * K;
  int8_t* qr = q + static_cast<size_t>(row) * K;
  constexpr int N = Vec<T>::N;

  float inv;
  if constexpr (kDynamic) {
    float amax = 0.0f;
    if constexpr (kVec) {
      for (int v = lane; v < K / N; v += 32) {
        const Vec<T> x16 = Vec<T>::load(xr + v * N);
#pragma unroll
        for (int j = 0; j < N; ++j) amax = fmaxf(amax, abs_or_inf(to_float(x16.e[j])));
      }
    } else {
      for (int k = lane; k < K; k += 32) amax = fmaxf(amax, abs_or_inf(to_float(ptx::ld_global(xr + k))));
    }
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) amax = fmaxf(amax, ptx::shfl_xor(amax, m));  // every lane: the row max
    // A row holding NaN or +-inf (amax = inf): scale NaN, and inv = 0 makes every q 0 (x * 0 is 0 for finite
    // x and NaN for the rest, which __float2int_rn turns into 0): the GEMM's output row is then NaN.
    const bool finite = amax <= kFloatMax;
    const float s = !finite ? nan_f32() : (amax > 0.0f ? __fdiv_rn(amax, kQmax) : 1.0f);
    if (lane == 0) ptx::st_global(scales + row, s);
    inv = finite ? __fdiv_rn(1.0f, s) : 0.0f;
  } else {
    inv = __fdiv_rn(1.0f, ptx::ld_global(static_scale));
  }

  if constexpr (kVec) {
    using P = typename Packed<N>::type;
    for (int v = lane; v < K / N; v += 32) {
      const Vec<T> x16 = Vec<T>::load(xr + v * N);
      int8_t out[N];
#pragma unroll
      for (int j = 0; j < N; ++j) out[j] = quantize_int8(to_float(x16.e[j]), inv);
      P p;
      std::memcpy(&p, out, N);
      ptx::st_global(reinterpret_cast<P*>(qr + v * N), p);
    }
  } else {
    for (int k = lane; k < K; k += 32)
      ptx::st_global(qr + k, quantize_int8(to_float(ptx::ld_global(xr + k)), inv));
  }
}

// Picks the instantiation for `a` and calls launch(name, kernel, grid, block, args...): the real launch
// (<<<>>>) in quantize_act.cu, the emulated one in emulated.cpp (the name is for the emulator's reports).
template <class T, class Launch>
void dispatch_typed(const QuantizeActArgs& a, const char* type, Launch&& launch) {
  const bool vec = reinterpret_cast<uintptr_t>(a.x) % 16 == 0 && reinterpret_cast<uintptr_t>(a.q) % 16 == 0 &&
                   (a.K * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  const dim3 grid(static_cast<unsigned>((a.M + kWarps - 1) / kWarps)), block(32 * kWarps);
  const T* x = static_cast<const T*>(a.x);
  const int M = static_cast<int>(a.M), K = static_cast<int>(a.K);
  const bool dyn = a.static_scale == nullptr;
  const std::string name = std::string("quantize_act<") + type + (vec ? ", vec" : ", scalar") +
                           (dyn ? ", dynamic>" : ", static>");
  auto go = [&](auto kernel) { launch(name.c_str(), kernel, grid, block, x, a.static_scale, a.q, a.scales, M, K); };
  if (vec && dyn) go(&quantize_act_kernel<T, true, true>);
  if (vec && !dyn) go(&quantize_act_kernel<T, true, false>);
  if (!vec && dyn) go(&quantize_act_kernel<T, false, true>);
  if (!vec && !dyn) go(&quantize_act_kernel<T, false, false>);
}

template <class Launch>
void dispatch(const QuantizeActArgs& a, Launch&& launch) {
  if (a.M == 0) return;
  switch (a.dtype) {
    case DType::kF32: return dispatch_typed<float>(a, "f32", launch);
    case DType::kF16: return dispatch_typed<__half>(a, "f16", launch);
    case DType::kBF16: return dispatch_typed<__nv_bfloat16>(a, "bf16", launch);
  }
}

}  // namespace ditq::qact

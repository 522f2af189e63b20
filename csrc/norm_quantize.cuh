// LayerNorm (no affine) + adaLN modulation + int8 quantization of a DiT block's activations, one row kernel:
// x float [B * S, K] (fp32 / fp16 / bf16) -> q int8 [B * S, K] (+ per-row scales), the contract of
// ditq.quant.reference.norm_modulate_quantize, all in fp32, in this order:
//
//   mean = sum(x) / K                                  two passes, biased variance
//   var  = sum((x - mean) * (x - mean)) / K
//   rstd = 1 / sqrt(var + eps)                         IEEE sqrt and division (eps rounded to fp32 by the binding)
//   y    = (x - mean) * rstd
//   y    = y * (1 + scale[b]) + shift[b]               a multiply, then an add (no fma); b = row / S
//   q    = quantize(y) exactly as quantize_act (static scale, or dynamic absmax / 127 per row)
//
// Every rounding is explicit (__fadd_rn, __fmul_rn, __fdiv_rn; sqrtf is IEEE sqrt.rn on the device without
// --use_fast_math and libm's correctly rounded sqrtf on the host), so the emulated and the real kernel agree
// bit for bit. The only freedom the contract leaves is the summation order of the two row sums: here each lane
// adds its elements in index order and a 5-step butterfly adds the 32 lane sums (fp32 addition is commutative,
// so every lane ends with the same bits). torch sums in another order, so y may differ from the reference in
// its last bits on general data; rows whose sums are exact in any order (integer-valued x whose row sum is a
// multiple of K, for instance) agree bit for bit.
//
// Non-finite rows: a NaN or +-inf in x makes the mean NaN and every y NaN, so a static scale gives q = 0 and a
// dynamic one scale NaN and q = 0 (quantize_act's rule); the GEMM's output row is then NaN. A row of huge
// finite values whose variance overflows gets rstd = 0 and y = shift, as the reference.
//
// ---- Work split and memory access --------------------------------------------------------------------------
// As quantize_act: one warp per row, kWarps rows per block, no shared memory, no __syncthreads (a block with
// rows past M loses whole warps). The row is read three times (sum, squared deviations, quantize) and four
// with a dynamic scale (its absmax first); a DiT row (K <= 16384) is at most 64 KB, so the passes after the
// first hit L1 / L2.
// kVec: 16-byte loads of x (LDG.E.128) and of shift / scale (fp32, one or two 16-byte loads per x vector), 4-
// or 8-byte stores of q; needs 16-byte aligned rows (the binding checks the pointers, dispatch the row size).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include "epilogue.cuh"
#include "launch.h"
#include "ptx.cuh"
#include "quantize_act.cuh"

namespace ditq::normq {

constexpr int kWarps = 4;  // rows per block

using qact::Packed;
using qact::to_float;
using qact::Vec;

// x[e .. e + N) of a row as fp32 (kVec: one 16-byte load), and the matching N floats of a [K] fp32 row.
template <class T, int N>
DITQ_DEVICE void load_x(const T* xr, int e, float (&v)[N]) {
  const Vec<T> x16 = Vec<T>::load(xr + e);
#pragma unroll
  for (int j = 0; j < N; ++j) v[j] = to_float(x16.e[j]);
}

template <int N>
DITQ_DEVICE void load_f32(const float* r, int e, float (&v)[N]) {
#pragma unroll
  for (int h = 0; h < N / 4; ++h) {
    const uint4 u = ptx::ld_global_16(r + e + 4 * h);
    std::memcpy(v + 4 * h, &u, 16);
  }
}

DITQ_DEVICE float warp_sum(float v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v = __fadd_rn(v, ptx::shfl_xor(v, m));
  return v;
}

// y of one element: centred, normalized, modulated (when shift / scale are given).
DITQ_DEVICE float normalize(float x, float mean, float rstd, bool modulate, float sh, float sc) {
  const float y = __fmul_rn(__fadd_rn(x, -mean), rstd);
  return modulate ? __fadd_rn(__fmul_rn(y, __fadd_rn(1.0f, sc)), sh) : y;
}

template <class T, bool kVec, bool kDynamic>
DITQ_GLOBAL void norm_quantize_kernel(const T* __restrict__ x, const float* __restrict__ shift,
                                      const float* __restrict__ scale, float eps,
                                      const float* __restrict__ static_scale, int8_t* __restrict__ q,
                                      float* __restrict__ scales, int M, int K, int S) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int row = static_cast<int>(blockIdx.x) * kWarps + static_cast<int>(threadIdx.x) / 32;
  if (row >= M) return;  // the whole warp: its row does not exist
  const T* xr = x + static_cast<size_t>(row) * K;
  int8_t* qr = q + static_cast<size_t>(row) * K;
  const bool modulate = shift != nullptr;
  const size_t mod_row = static_cast<size_t>(row / S) * K;
  const float* shr = modulate ? shift + mod_row : nullptr;
  const float* scr = modulate ? scale + mod_row : nullptr;
  constexpr int N = kVec ? Vec<T>::N : 1;
  const int steps = K / N;  // kVec: vectors of N elements; else elements (N = 1)

  // Calls f(e, xv) for this lane's elements in index order, xv = x[e .. e + N) as fp32.
  auto each = [&](auto&& f) {
    for (int v = lane; v < steps; v += 32) {
      float xv[N];
      if constexpr (kVec) load_x<T, N>(xr, v * N, xv);
      else xv[0] = to_float(ptx::ld_global(xr + v));
      f(v * N, xv);
    }
  };
  // The modulation of elements [e, e + N): shift and scale rows (zeros, unused, without modulation).
  auto mod = [&](int e, float (&sh)[N], float (&sc)[N]) {
    if (!modulate) return;
    if constexpr (kVec) {
      load_f32<N>(shr, e, sh);
      load_f32<N>(scr, e, sc);
    } else {
      sh[0] = ptx::ld_global(shr + e);
      sc[0] = ptx::ld_global(scr + e);
    }
  };

  float sum = 0.0f;
  each([&](int, const float (&xv)[N]) {
#pragma unroll
    for (int j = 0; j < N; ++j) sum = __fadd_rn(sum, xv[j]);
  });
  const float mean = __fdiv_rn(warp_sum(sum), static_cast<float>(K));  // K <= 2^24: exact as a float

  float ss = 0.0f;
  each([&](int, const float (&xv)[N]) {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float d = __fadd_rn(xv[j], -mean);
      ss = __fadd_rn(ss, __fmul_rn(d, d));
    }
  });
  const float var = __fdiv_rn(warp_sum(ss), static_cast<float>(K));
  const float rstd = __fdiv_rn(1.0f, sqrtf(__fadd_rn(var, eps)));

  float inv;
  if constexpr (kDynamic) {
    float amax = 0.0f;
    each([&](int e, const float (&xv)[N]) {
      float sh[N] = {}, sc[N] = {};
      mod(e, sh, sc);
#pragma unroll
      for (int j = 0; j < N; ++j) amax = fmaxf(amax, qact::abs_or_inf(normalize(xv[j], mean, rstd, modulate,
                                                                                   sh[j], sc[j])));
    });
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) amax = fmaxf(amax, ptx::shfl_xor(amax, m));
    // quantize_act's dynamic rule: a row holding NaN / inf gets scale NaN and q = 0 (inv = 0)
    const bool finite = amax <= qact::kFloatMax;
    const float s = !finite ? qact::nan_f32() : (amax > 0.0f ? __fdiv_rn(amax, epi::kQmax) : 1.0f);
    if (lane == 0) ptx::st_global(scales + row, s);
    inv = finite ? __fdiv_rn(1.0f, s) : 0.0f;
  } else {
    inv = __fdiv_rn(1.0f, ptx::ld_global(static_scale));
  }

  each([&](int e, const float (&xv)[N]) {
    float sh[N] = {}, sc[N] = {};
    mod(e, sh, sc);
    int8_t out[N];
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = epi::quantize_int8(normalize(xv[j], mean, rstd, modulate, sh[j], sc[j]),
                                                            inv);
    if constexpr (kVec) {
      typename Packed<N>::type p;
      std::memcpy(&p, out, N);
      ptx::st_global(reinterpret_cast<typename Packed<N>::type*>(qr + e), p);
    } else {
      ptx::st_global(qr + e, out[0]);
    }
  });
}

// Picks the instantiation and calls launch(name, kernel, grid, block, args...): the real launch in
// norm_quantize.cu, the emulated one in emulated_norm_quantize.cpp.
template <class T, class Launch>
void dispatch_typed(const NormQuantizeArgs& a, const char* type, Launch&& launch) {
  // 16-byte rows of x, q, shift and scale: K * sizeof(T) % 16 == 0 makes K * 4 (fp32 rows) a multiple of 16
  // too; the bases must be 16-byte aligned
  const auto al = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  const bool vec = al(a.x) && al(a.q) && (a.shift == nullptr || (al(a.shift) && al(a.scale))) &&
                   (a.K * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  const dim3 grid(static_cast<unsigned>((a.M + kWarps - 1) / kWarps)), block(32 * kWarps);
  const T* x = static_cast<const T*>(a.x);
  const int M = static_cast<int>(a.M), K = static_cast<int>(a.K), S = static_cast<int>(a.S);
  const bool dyn = a.static_scale == nullptr;
  const std::string name = std::string("norm_quantize<") + type + (vec ? ", vec" : ", scalar") +
                           (dyn ? ", dynamic>" : ", static>");
  auto go = [&](auto kernel) {
    launch(name.c_str(), kernel, grid, block, x, a.shift, a.scale, a.eps, a.static_scale, a.q, a.scales, M, K, S);
  };
  if (vec && dyn) go(&norm_quantize_kernel<T, true, true>);
  if (vec && !dyn) go(&norm_quantize_kernel<T, true, false>);
  if (!vec && dyn) go(&norm_quantize_kernel<T, false, true>);
  if (!vec && !dyn) go(&norm_quantize_kernel<T, false, false>);
}

template <class Launch>
void dispatch(const NormQuantizeArgs& a, Launch&& launch) {
  if (a.M == 0 || a.K == 0) return;
  switch (a.dtype) {
    case DType::kF32: return dispatch_typed<float>(a, "f32", launch);
    case DType::kF16: return dispatch_typed<__half>(a, "f16", launch);
    case DType::kBF16: return dispatch_typed<__nv_bfloat16>(a, "bf16", launch);
  }
}

}  // namespace ditq::normq

// The host SIMT emulator: the CUDA built-ins a kernel uses, and emu::launch / emu::launch_checked (the
// latter registers the launch's global buffers for the global-memory checker, emu/global.h). Included by
// csrc/ptx.cuh when the compiler is not nvcc; a kernel never includes it directly. Host-only. Guide:
// csrc/README.md.
#pragma once

#include <cmath>
#include <climits>

#include "core.h"
#include "cp_async.h"
#include "global.h"
#include "hopper.h"
#include "shared.h"
#include "warp.h"

// ---- thread and block indices ------------------------------------------------------------------------------
#define threadIdx (::ditq::emu::S().cur->tid)
#define blockIdx (::ditq::emu::S().block_idx)
#define blockDim (static_cast<const dim3&>(::ditq::emu::S().block_dim))
#define gridDim (static_cast<const dim3&>(::ditq::emu::S().grid_dim))

// A kernel parameter the kernel takes the address of (a TMA map): every fiber gets its own copy of the
// arguments, so the qualifier has nothing to do here.
#define __grid_constant__

#define __syncthreads() ::ditq::emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::ditq::emu::syncwarp(__FILE__, __LINE__)

// ---- float intrinsics with explicit rounding ---------------------------------------------------------------
// x86-64 computes fp32 in SSE with round-to-nearest-even and no extra precision: +, *, / are the IEEE
// operations, std::fma is the fused one. So each intrinsic below is bit-identical to the GPU's.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __int2float_rn(int v) { return static_cast<float>(v); }
// cvt.rni.s32.f32: round half to even; NaN -> 0; out of range saturates.
inline int __float2int_rn(float x) {
  if (std::isnan(x)) return 0;
  if (x >= 2147483648.0f) return INT_MAX;
  if (x < -2147483648.0f) return INT_MIN;
  return static_cast<int>(std::nearbyint(x));  // the default rounding mode: to nearest, ties to even
}
inline float __int_as_float(int v) {
  float f;
  std::memcpy(&f, &v, 4);
  return f;
}
inline int __float_as_int(float f) {
  int v;
  std::memcpy(&v, &f, 4);
  return v;
}
inline unsigned __float_as_uint(float f) {
  unsigned v;
  std::memcpy(&v, &f, 4);
  return v;
}
inline float __uint_as_float(unsigned v) {
  float f;
  std::memcpy(&f, &v, 4);
  return f;
}

// ---- fp16 / bf16 as bits (kernels load them as raw 16-bit words and convert exactly) -----------------------
struct __half {
  uint16_t x;
};
struct __nv_bfloat16 {
  uint16_t x;
};
inline __half __ushort_as_half(unsigned short u) { return {u}; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return {u}; }
inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float(static_cast<unsigned>(h.x) << 16); }
// Exact: every fp16 value is an fp32 value.
inline float __half2float(__half h) {
  const unsigned sign = (h.x & 0x8000u) << 16, exp = (h.x >> 10) & 0x1fu, man = h.x & 0x3ffu;
  if (exp == 0x1f) return __uint_as_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp != 0) return __uint_as_float(sign | ((exp + 112u) << 23) | (man << 13));
  const float mag = std::ldexp(static_cast<float>(man), -24);  // subnormal (or zero): man * 2^-24, exact
  return sign ? -mag : mag;
}

inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }
// float -> bf16, round to nearest even (cvt.rn.bf16.f32); NaN -> the canonical 0x7fff.
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const unsigned u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {0x7fff};
  return {static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}
// float -> fp16, round to nearest even (cvt.rn.f16.f32), subnormals and overflow to inf included;
// NaN -> the canonical 0x7fff.
inline __half __float2half_rn(float f) {
  const unsigned u = __float_as_uint(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return {0x7fff};
  if (a >= 0x477ff000u) return {static_cast<uint16_t>(sign | 0x7c00u)};  // >= 65520 rounds to inf
  if (a >= 0x38800000u) {                                                 // a normal half
    const unsigned r = a - 0x38000000u;                                   // rebias 127 -> 15
    return {static_cast<uint16_t>(sign | ((r + 0xfffu + ((r >> 13) & 1u)) >> 13))};
  }
  // A subnormal half counts units of 2^-24: scaling by 2^24 is exact, nearbyint rounds half to even.
  const float units = std::nearbyint(__uint_as_float(a) * 16777216.0f);
  return {static_cast<uint16_t>(sign | static_cast<unsigned>(units))};
}

// ---- integer helpers CUDA provides as device functions -----------------------------------------------------
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }

namespace ditq::emu {

// Launch `kernel(args...)` with the global buffers `globals` registered for the global-memory checker
// (Options::mem_check, emu/global.h) under the name `name` (reports say "block (x,y,z) of kernel <name>").
// Register every buffer the kernel may touch, with its exact extent: anything else it touches is reported.
template <class Kernel, class... Args>
void launch_checked(dim3 grid, dim3 block, size_t dynamic_smem, const Options& opt, const char* name,
                    const std::vector<GlobalBuffer>& globals, Kernel kernel, Args... args) {
  const uint64_t nthreads = uint64_t{block.x} * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024 || block.z > 64)
    throw std::invalid_argument("ditq emulator: a block must have 1..1024 threads (z <= 64), got " +
                                std::to_string(block.x) + "x" + std::to_string(block.y) + "x" +
                                std::to_string(block.z));
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
    throw std::invalid_argument("ditq emulator: bad grid " + std::to_string(grid.x) + "x" + std::to_string(grid.y) +
                                "x" + std::to_string(grid.z));
  State& s = S();
  std::lock_guard<std::mutex> lock(s.launch_mutex);
  if (s.threads.size() < nthreads) {
    s.threads.resize(nthreads);
    // resize moves the Thread objects, but an initialised fiber keeps a pointer to its
    // Thread (fiber_main's `t`): a launch with more threads than any before it crashed. Re-create every fiber
    // on its existing stack.
    for (Thread& t : s.threads) t.fiber_ready = false;
  }
  s.opt = opt;
  s.kernel = name ? name : "";
  global_begin_launch(globals, name, opt.mem_check && !globals.empty());
  struct EndLaunch {  // whatever way the launch ends, the next one starts with no buffers and no name
    ~EndLaunch() {
      global_end_launch();
      S().kernel.clear();
    }
  } end_launch;
  s.block_dim = block;
  s.grid_dim = grid;
  s.nthreads = static_cast<int>(nthreads);
  set_dynamic_shared_bytes(dynamic_smem);
  auto call = [&]() { kernel(args...); };
  s.job = [](void* f) { (*static_cast<decltype(call)*>(f))(); };
  s.job_arg = &call;
  s.failed = false;
  std::mt19937_64 rng(opt.seed);  // a seed names one schedule: a failure reproduces
  try {
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          s.block_idx = {x, y, z};
          run_block(rng);
          if (s.failed) {
            s.failed = false;
            throw Error(s.fail_kind, s.fail_msg);
          }
        }
  } catch (...) {
    // The block's fibers were abandoned mid-kernel: re-create them at the next launch, drop their copies.
    s.cur = nullptr;
    cp_async_end_block();
    hopper_clear_marks();
    for (Thread& t : s.threads) {
      t.fiber_ready = false;
      t.state = Run::Idle;
    }
    throw;
  }
}

// Unchecked global memory (the buffers' extents are unknown): test probes of other mechanisms.
template <class Kernel, class... Args>
void launch(dim3 grid, dim3 block, size_t dynamic_smem, const Options& opt, Kernel kernel, Args... args) {
  launch_checked(grid, block, dynamic_smem, opt, nullptr, {}, kernel, args...);
}

// The same, with the process-wide options (ditq.emulator.emulator_options).
template <class Kernel, class... Args>
void launch(dim3 grid, dim3 block, size_t dynamic_smem, Kernel kernel, Args... args) {
  launch(grid, block, dynamic_smem, global_options(), kernel, args...);
}

}  // namespace ditq::emu

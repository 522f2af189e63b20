// Every PTX instruction the kernels use, one per function, each beside its emulated twin.
//
// Kernels (csrc/*.cuh) contain no inline assembly: they call ditq::ptx::*. The same kernel source compiles
//   * with nvcc (csrc/*.cu): the real instruction (`asm volatile`), for sm_80 and newer;
//   * with g++ (csrc/emulated.cpp, DITQ_EMULATED = 1): the twin, which runs the instruction's semantics in the
//     host SIMT emulator (csrc/emu/), checks addresses, alignment and races, and knows the source line of the
//     call (the DITQ_LOC default arguments, present only in the emulated build).
// What the emulator cannot check here: wrong asm constraints or a missing "memory" clobber in the device
// halves below, and a misreading of the ISA shared by both halves (the fragment layouts are tested against a
// table transcribed from the ISA: tests/csrc/test_fragment_layouts.py). So each device half is one
// instruction, written once, read carefully.
#pragma once

#include <cstdint>
#include <cstring>

// ---- build flavour -----------------------------------------------------------------------------------------
#if defined(__CUDACC__)
#define DITQ_EMULATED 0
#define DITQ_DEVICE __device__ __forceinline__
#define DITQ_GLOBAL __global__
#define DITQ_HOST_DEVICE __host__ __device__ __forceinline__
#define DITQ_LOC
#define DITQ_LOC0
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "ditq's CUDA kernels need sm_80 or newer (cp.async, mma.sync m16n8k32 s8)"
#endif
#else
#define DITQ_EMULATED 1
#define DITQ_DEVICE inline
#define DITQ_GLOBAL inline
#define DITQ_HOST_DEVICE inline
// The caller's source location, for the emulator's reports.
#define DITQ_LOC , const char *ditq_file_ = __builtin_FILE(), int ditq_line_ = __builtin_LINE()
#define DITQ_LOC0 const char *ditq_file_ = __builtin_FILE(), int ditq_line_ = __builtin_LINE()
#include "emu/emu.h"
#endif

// ---- shared memory declarations ----------------------------------------------------------------------------
// DITQ_SHARED(T, name, N): a block-wide array `T name[N]` (__shared__). In the emulator it is poisoned at
// every block and its accesses through ptx::ld_shared / st_shared / cp_async_16 / ldmatrix are checked.
// DITQ_DYNAMIC_SHARED(T, name): `T* name` to the block's dynamic shared memory (the launch's smem bytes),
// 128-byte aligned, poisoned at every block in the emulator.
// Plain `__shared__` is deliberately not provided by the emulator: a declaration it cannot see would be
// neither poisoned nor checked.
#if DITQ_EMULATED
#define DITQ_SHARED(T, name, N) T(&name)[N] = ::ditq::emu::shared_array<T, N>(__FILE__, __LINE__)
#define DITQ_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::ditq::emu::dynamic_shared())
#else
#define DITQ_SHARED(T, name, N) __shared__ __align__(16) T name[N]
#define DITQ_DYNAMIC_SHARED(T, name)                               \
  extern __shared__ __align__(128) unsigned char ditq_dyn_smem_[]; \
  T* name = reinterpret_cast<T*>(ditq_dyn_smem_)
#endif

namespace ditq::ptx {

#if DITQ_EMULATED
namespace detail {
inline int me() { return ::ditq::emu::S().cur->linear; }
}  // namespace detail
#endif

// ---- mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32: D = A·B + C ------------------------------------------
// Fragments (g = lane >> 2, t = lane % 4, four int8 per register, low byte first):
//   A a0..a15: row g for i < 4 or 8 <= i < 12, else g + 8; col 4t + (i & 3), + 16 for i >= 8
//   B b0..b7:  k 4t + (i & 3), + 16 for i >= 4; n g
//   C/D c0..c3: row g for i < 2, else g + 8; col 2t + (i & 1). s32 wraps (no .satfinite).
DITQ_DEVICE void mma_m16n8k32_s8(int32_t (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                 const int32_t (&c)[4] DITQ_LOC) {
#if DITQ_EMULATED
  ::ditq::emu::mma_s8(d, a, b, c, ditq_file_, ditq_line_);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(c[0]), "r"(c[1]), "r"(c[2]),
        "r"(c[3]));
#endif
}

// ---- ldmatrix.sync.aligned.m8n8.x{4,2}.shared.b16 --------------------------------------------------------
// Lanes 8j..8j+7 pass the (16-byte aligned) addresses of the 8 rows of matrix j; lane l receives in r[j]
// bytes [4 (l % 4), +4) of row l / 4 of matrix j. For .x2 only lanes 0-15's addresses are used. (The
// emulator also models .trans, tested against the ISA table; add its wrapper here when a kernel needs it.)
#if !DITQ_EMULATED
DITQ_DEVICE uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
#endif

DITQ_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row DITQ_LOC) {
#if DITQ_EMULATED
  ::ditq::emu::ldmatrix(r, 4, false, smem_row, ditq_file_, ditq_line_);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem_row)));
#endif
}

DITQ_DEVICE void ldmatrix_x2(uint32_t (&r)[2], const void* smem_row DITQ_LOC) {
#if DITQ_EMULATED
  ::ditq::emu::ldmatrix(r, 2, false, smem_row, ditq_file_, ditq_line_);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(smem_row)));
#endif
}

// ---- cp.async.cg.shared.global 16 B; commit_group; wait_group N ---------------------------------------------
// pred = false copies nothing and zero-fills the 16 bytes (src-size 0): the way to load past a matrix edge.
// Both addresses must be 16-byte aligned. The data may land any time until a wait_group retires its group.
DITQ_DEVICE void cp_async_16(void* smem, const void* gmem, bool pred DITQ_LOC) {
#if DITQ_EMULATED
  ::ditq::emu::cp_async_issue(smem, gmem, pred, ditq_file_, ditq_line_);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(pred ? 16 : 0)
               : "memory");
#endif
}

DITQ_DEVICE void cp_async_commit() {
#if DITQ_EMULATED
  ::ditq::emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Every committed group but the newest N is complete (visible to this thread; to others after a barrier).
template <int N>
DITQ_DEVICE void cp_async_wait(DITQ_LOC0) {
  static_assert(N >= 0, "cp.async.wait_group takes a non-negative count");
#if DITQ_EMULATED
  ::ditq::emu::cp_async_wait(N, ditq_file_, ditq_line_);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// ---- shfl.sync.bfly.b32, full mask --------------------------------------------------------
DITQ_DEVICE uint32_t shfl_xor(uint32_t v, int lane_mask DITQ_LOC) {
#if DITQ_EMULATED
  return ::ditq::emu::shfl_bfly(v, lane_mask, ditq_file_, ditq_line_);
#else
  uint32_t r;
  asm volatile("shfl.sync.bfly.b32 %0, %1, %2, 0x1f, 0xffffffff;\n" : "=r"(r) : "r"(v), "r"(lane_mask));
  return r;
#endif
}
DITQ_DEVICE float shfl_xor(float v, int lane_mask DITQ_LOC) {
#if DITQ_EMULATED
  return __uint_as_float(shfl_xor(__float_as_uint(v), lane_mask, ditq_file_, ditq_line_));
#else
  return __uint_as_float(shfl_xor(__float_as_uint(v), lane_mask));
#endif
}

// ---- ld.shared / st.shared (checked in the emulator: address, alignment, races) -----------------------------
template <class T>
DITQ_DEVICE T ld_shared(const T* p DITQ_LOC) {
#if DITQ_EMULATED
  ::ditq::emu::shared_access(p, sizeof(T), alignof(T), false, detail::me(), "ld_shared", ditq_file_, ditq_line_);
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
#else
  return *p;
#endif
}

template <class T>
DITQ_DEVICE void st_shared(T* p, const T& v DITQ_LOC) {
#if DITQ_EMULATED
  ::ditq::emu::shared_access(p, sizeof(T), alignof(T), true, detail::me(), "st_shared", ditq_file_, ditq_line_);
  std::memcpy(p, &v, sizeof(T));
#else
  *p = v;
#endif
}

// ---- global loads and stores (checked in the emulator: registered extents, read-only, unwritten reads) ------
// Kernels access global memory only through these (C++ has no hook for a plain `*p`, so a plain dereference
// is invisible to the global-memory checker). Device halves are plain C++ accesses: nvcc picks LDG / STG of
// the type's width, as for `*p`.
template <class T>
DITQ_DEVICE T ld_global(const T* p DITQ_LOC) {
#if DITQ_EMULATED
  ::ditq::emu::global_access(p, sizeof(T), false, "ld_global", ditq_file_, ditq_line_);
  ::ditq::emu::check_align(p, alignof(T), detail::me(), "ld_global", "global", ditq_file_, ditq_line_);
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
#else
  return *p;
#endif
}

template <class T>
DITQ_DEVICE void st_global(T* p, const T& v DITQ_LOC) {
#if DITQ_EMULATED
  ::ditq::emu::global_access(p, sizeof(T), true, "st_global", ditq_file_, ditq_line_);
  ::ditq::emu::check_align(p, alignof(T), detail::me(), "st_global", "global", ditq_file_, ditq_line_);
  std::memcpy(p, &v, sizeof(T));
#else
  *p = v;
#endif
}

// ---- ld.global.nc.v4 (16-byte read-only load; the emulator checks the alignment the GPU requires) ----------
DITQ_DEVICE uint4 ld_global_16(const void* p DITQ_LOC) {
#if DITQ_EMULATED
  ::ditq::emu::global_access(p, 16, false, "ld_global_16", ditq_file_, ditq_line_);
  ::ditq::emu::check_align(p, 16, detail::me(), "ld_global_16", "global", ditq_file_, ditq_line_);
  uint4 v;
  std::memcpy(&v, p, 16);
  return v;
#else
  return __ldg(static_cast<const uint4*>(p));
#endif
}

// ---- inter-CTA communication (split-K): fence.acq_rel.gpu, atom.add.gpu, ld.global.cg ----------------------
// The emulator runs blocks one after another, so these are plain memory operations there (bounds-checked);
// what they order between concurrently running CTAs is beyond what it can check.
DITQ_DEVICE void fence_gpu() {
#if !DITQ_EMULATED
  __threadfence();
#endif
}

DITQ_DEVICE int atomic_add_gpu(int* p, int v DITQ_LOC) {
#if DITQ_EMULATED
  ::ditq::emu::global_access(p, sizeof(int), false, "atom.add", ditq_file_, ditq_line_);
  ::ditq::emu::global_access(p, sizeof(int), true, "atom.add", ditq_file_, ditq_line_);
  const int old = *p;
  *p = old + v;
  return old;
#else
  return atomicAdd(p, v);
#endif
}

DITQ_DEVICE uint32_t ld_cg(const uint32_t* p DITQ_LOC) {
#if DITQ_EMULATED
  ::ditq::emu::global_access(p, sizeof(uint32_t), false, "ld.global.cg", ditq_file_, ditq_line_);
  return *p;
#else
  return __ldcg(p);
#endif
}

// ---- float -> bf16 / fp16 bits, round to nearest even (cvt.rn.bf16.f32 / cvt.rn.f16.f32) ---------------------
// The one conversion both builds use: the CUDA intrinsic on the device (F2FP.BF16[.F32].PACK_AB /
// F2FP[.F16.F32].PACK_AB in SASS, checked by tests/csrc/test_gemm_sass.py) and the emulator's twin of the
// same intrinsic (emu/emu.h, checked bit for bit against torch's RNE casts). No #if here: a rounding
// decided differently in a device-only branch is what the emulator could never see.
DITQ_DEVICE uint16_t f32_to_bf16_bits(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
DITQ_DEVICE uint16_t f32_to_f16_bits(float f) { return __half_as_ushort(__float2half_rn(f)); }

}  // namespace ditq::ptx

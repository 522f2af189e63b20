// Every PTX instruction the kernels use, one per function, each beside its emulated twin.
//
// Kernels (csrc/*.cuh) contain no inline assembly: they call ditq::ptx::*. The same kernel source compiles
//   * with nvcc (csrc/*.cu): the real instruction (`asm volatile`), for sm_80 and newer;
//   * with g++ (csrc/emulated*.cpp, DITQ_EMULATED = 1): the twin, which runs the instruction's semantics in the
//     host SIMT emulator (csrc/emu/), checks addresses, alignment and races, and knows the source line of the
//     call (the DITQ_LOC default arguments, present only in the emulated build).
// What the emulator cannot check here: wrong asm constraints or a missing "memory" clobber in the device
// halves below, and a misreading of the ISA shared by both halves (the fragment layouts are tested against a
// table transcribed from the ISA: tests/csrc/test_fragment_layouts.py). So each device half is one
// instruction, written once, read carefully.
#pragma once

#include <cstdint>
#include <cstring>

// ---- Hopper enums shared by both builds (the emulator's TMA map and descriptors use them) ------------------
namespace ditq::ptx {
// Shared-memory swizzle of a TMA box (CUtensorMapSwizzle NONE / 32B / 64B / 128B): the 16-byte chunk index
// (address bits 4..) has its low b bits XORed with address bits [7, 7 + b), b = 1, 2, 3.
enum class TmaSwizzle : int { None = 0, B32 = 1, B64 = 2, B128 = 3 };
// The same patterns as a wgmma shared-memory descriptor's layout type.
enum class WgmmaSwizzle : int { None = 0, B32 = 1, B64 = 2, B128 = 3 };
}  // namespace ditq::ptx

// ---- build flavour -----------------------------------------------------------------------------------------
#if defined(__CUDACC__)
#define DITQ_EMULATED 0
#define DITQ_DEVICE __device__ __forceinline__
#define DITQ_GLOBAL __global__
#define DITQ_HOST_DEVICE __host__ __device__ __forceinline__
#define DITQ_LOC
#define DITQ_LOC0
#include <cuda.h>  // CUtensorMap (a type only: nothing links -lcuda)
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
// 1024-byte aligned (what a 128-byte-swizzled TMA / wgmma tile needs), poisoned at every block in the
// emulator.
// Plain `__shared__` is deliberately not provided by the emulator: a declaration it cannot see would be
// neither poisoned nor checked.
#if DITQ_EMULATED
#define DITQ_SHARED(T, name, N) T(&name)[N] = ::ditq::emu::shared_array<T, N>(__FILE__, __LINE__)
#define DITQ_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::ditq::emu::dynamic_shared())
#else
#define DITQ_SHARED(T, name, N) __shared__ __align__(16) T name[N]
#define DITQ_DYNAMIC_SHARED(T, name)                                \
  extern __shared__ __align__(1024) unsigned char ditq_dyn_smem_[]; \
  T* name = reinterpret_cast<T*>(ditq_dyn_smem_)
#endif

#if !DITQ_EMULATED
#include "ptx_wgmma.cuh"  // the generated wgmma asm, one statement per N (device build only)
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

// ---- inter-CTA communication (split-K): membar.gl, atom.add.gpu, ld.global.cg ------------------------------
// __threadfence() compiles to membar.gl, which on sm_70 and newer is fence.sc.gpu: stronger than the
// fence.acq_rel.gpu the last-CTA handshake needs.
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

// =============================================================================================================
// ---- Hopper (sm_90a): mbarrier, TMA, async-proxy fences, wgmma, setmaxnreg ------------------------------------
// =============================================================================================================
// Device halves are the real instructions, compiled only where they exist: mbarrier / cp.async.bulk.tensor /
// fence.proxy.async need sm_90, wgmma / setmaxnreg need sm_90a (the arch-specific feature set). In the other
// device passes of a multi-arch build (sm_80) each function is a `trap`: a Hopper kernel launched on an older
// GPU stops with an illegal-instruction error instead of computing garbage. (The launchers pick the Hopper
// kernels only on sm_90 devices, or in the emulator under emulator_options(arch="sm_90a").)
#if !DITQ_EMULATED
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define DITQ_SM90 1
#else
#define DITQ_SM90 0
#endif
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define DITQ_SM90A 1
#else
#define DITQ_SM90A 0
#endif
#define DITQ_NOT_HERE() asm volatile("trap;\n")  // built for an arch without this instruction
#endif

// ---- mbarrier (a uint64_t in shared memory: phase bit, pending arrivals, pending transaction bytes) ---------
// A phase completes when its pending arrival count and its transaction count both reach zero; the barrier then
// flips its phase bit and re-arms with the init count. try_wait_parity(p) is true once the phase with parity p
// has completed (phase 0 is the first after init). expect_tx adds bytes the phase must also receive (from
// cp.async.bulk / TMA complete_tx) before it can complete.
DITQ_DEVICE void mbarrier_init(uint64_t* bar, uint32_t arrive_count DITQ_LOC) {
#if DITQ_EMULATED
  ::ditq::emu::mbar_init(bar, arrive_count, ditq_file_, ditq_line_);
#elif DITQ_SM90
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(arrive_count) : "memory");
#else
  DITQ_NOT_HERE();
#endif
}

// Makes the mbarrier inits visible to the async proxy (TMA) and to other threads: between the init by one
// thread and any use (typically followed by __syncthreads).
DITQ_DEVICE void fence_mbarrier_init(DITQ_LOC0) {
#if DITQ_EMULATED
  ::ditq::emu::mbar_fence_init(ditq_file_, ditq_line_);
#elif DITQ_SM90
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#else
  DITQ_NOT_HERE();
#endif
}

DITQ_DEVICE void mbarrier_arrive(uint64_t* bar DITQ_LOC) {
#if DITQ_EMULATED
  ::ditq::emu::mbar_arrive(bar, 0, false, ditq_file_, ditq_line_);
#elif DITQ_SM90
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(smem_addr(bar)) : "memory");
#else
  DITQ_NOT_HERE();
#endif
}

// One arrival, and the current phase expects tx_bytes more transaction bytes (the TMA loads it waits for).
DITQ_DEVICE void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t tx_bytes DITQ_LOC) {
#if DITQ_EMULATED
  ::ditq::emu::mbar_arrive(bar, tx_bytes, true, ditq_file_, ditq_line_);
#elif DITQ_SM90
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(tx_bytes)
               : "memory");
#else
  DITQ_NOT_HERE();
#endif
}

DITQ_DEVICE bool mbarrier_try_wait_parity(uint64_t* bar, uint32_t phase_parity DITQ_LOC) {
#if DITQ_EMULATED
  return ::ditq::emu::mbar_try_wait(bar, phase_parity, ditq_file_, ditq_line_);
#elif DITQ_SM90
  uint32_t done;
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.b32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(smem_addr(bar)), "r"(phase_parity)
      : "memory");
  return done != 0;
#else
  DITQ_NOT_HERE();
  return false;
#endif
}

// Blocks until the phase with parity phase_parity has completed. (try_wait itself suspends the thread for a
// hardware-dependent time, so the loop does not spin hot.) In the emulator the thread blocks on the barrier;
// a barrier that can never complete is reported as a deadlock with its expected and received bytes/arrivals.
DITQ_DEVICE void mbarrier_wait_parity(uint64_t* bar, uint32_t phase_parity DITQ_LOC) {
#if DITQ_EMULATED
  ::ditq::emu::mbar_wait(bar, phase_parity, ditq_file_, ditq_line_);
#else
  while (!mbarrier_try_wait_parity(bar, phase_parity)) {
  }
#endif
}

// fence.proxy.async.shared::cta: orders this thread's generic-proxy shared-memory accesses (st.shared) before
// its later async-proxy ones (wgmma operand reads, TMA). Needed after writing a wgmma operand with st.shared.
DITQ_DEVICE void fence_proxy_async_shared(DITQ_LOC0) {
#if DITQ_EMULATED
  ::ditq::emu::fence_proxy_async(ditq_file_, ditq_line_);
#elif DITQ_SM90
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#else
  DITQ_NOT_HERE();
#endif
}

// ---- TMA: cp.async.bulk.tensor.2d global -> shared, completing on an mbarrier --------------------------------
// TmaMap: the 128-byte CUtensorMap on the device (pass it to the kernel as `const __grid_constant__ TmaMap`,
// and give the instruction its address: a param-space / generic address of the grid constant); the emulator's
// own decoded description on the host build. Built on the host by make_tma_map_2d (csrc/tma.h).
#if DITQ_EMULATED
using TmaMap = ::ditq::emu::TmaMap;
#else
using TmaMap = CUtensorMap;
#endif

// Loads the box whose first element is (inner_coord, outer_coord) into smem_dst (128-byte aligned; 1024 for
// the 128-byte swizzle so that the pattern starts at the tile), laid out as box_outer rows of box_inner bytes
// in the map's swizzle. Elements outside the tensor are zero-filled (never read). The bytes count as
// transaction bytes on `bar` (a complete_tx: the phase's expect_tx must include them).
DITQ_DEVICE void tma_load_2d(void* smem_dst, const TmaMap* map, int32_t inner_coord, int32_t outer_coord,
                             uint64_t* bar DITQ_LOC) {
#if DITQ_EMULATED
  ::ditq::emu::tma_load_2d(smem_dst, map, inner_coord, outer_coord, bar, ditq_file_, ditq_line_);
#elif DITQ_SM90
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n" ::
          "r"(smem_addr(smem_dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_addr(bar)), "r"(inner_coord), "r"(outer_coord)
      : "memory");
#else
  DITQ_NOT_HERE();
#endif
}

DITQ_DEVICE void prefetch_tma_map(const TmaMap* map DITQ_LOC) {
#if DITQ_EMULATED
  ::ditq::emu::tma_check_map(map, "prefetch.tensormap", ditq_file_, ditq_line_);
#elif DITQ_SM90
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
#else
  DITQ_NOT_HERE();
#endif
}

// ---- wgmma (warpgroup: 4 consecutive warps, warp index % 4 == 0 first; all 128 threads execute each) -------
// wgmma.fence: before the first wgmma, and between a register write (accumulators, register A) and a wgmma
// that reads it. commit_group closes the wgmmas issued since the last commit into a group; wait_group<N>
// returns once all but the newest N groups are complete: only then may their accumulators be read or
// written, and their shared-memory operands overwritten.
DITQ_DEVICE void wgmma_fence(DITQ_LOC0) {
#if DITQ_EMULATED
  ::ditq::emu::wgmma_fence(ditq_file_, ditq_line_);
#elif DITQ_SM90A
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#else
  DITQ_NOT_HERE();
#endif
}

DITQ_DEVICE void wgmma_commit_group(DITQ_LOC0) {
#if DITQ_EMULATED
  ::ditq::emu::wgmma_commit(ditq_file_, ditq_line_);
#elif DITQ_SM90A
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#else
  DITQ_NOT_HERE();
#endif
}

template <int N>
DITQ_DEVICE void wgmma_wait_group(DITQ_LOC0) {
  static_assert(N >= 0 && N <= 7, "wgmma.wait_group takes 0..7");
#if DITQ_EMULATED
  ::ditq::emu::wgmma_wait(N, ditq_file_, ditq_line_);
#elif DITQ_SM90A
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#else
  DITQ_NOT_HERE();
#endif
}

// Keeps the compiler from moving accesses to the accumulators across a wgmma_wait_group / wgmma_fence (the
// asm of those has no register operands): call it on the accumulators right after the wait and before the
// fence, as CUTLASS's warpgroup_fence_operand does. No code; a no-op in the emulator.
template <int R>
DITQ_DEVICE void wgmma_fence_operands(int32_t (&d)[R]) {
#if !DITQ_EMULATED
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+r"(d[i])::"memory");
#else
  (void)d;
#endif
}

// Shared-memory matrix descriptor (the ISA's "matrix descriptor", 64 bits):
//   bits  0-13  start address >> 4 (shared window address)   bits 16-29  leading-dimension byte offset >> 4
//   bits 32-45  stride-dimension byte offset >> 4            bits 49-51  base offset (0: patterns start
//   1024-aligned)                                             bits 62-63  swizzle: 0 none, 1 128B, 2 64B, 3 32B
// For K-major operands: a "core matrix" is 8 rows x 16 bytes. Without swizzle, core matrices are 128
// contiguous bytes; LBO = distance between the two K-adjacent core matrices of one k32 step, SBO = distance
// between core matrices 8 rows apart. With a swizzle the rows are (swizzle width) bytes long, LBO is unused
// (K of one wgmma fits in a row) and SBO = distance between 8-row groups (8 x width for a dense tile).
DITQ_HOST_DEVICE uint64_t wgmma_encode_desc(uint32_t smem_address, WgmmaSwizzle swz, uint32_t lbo_bytes,
                                            uint32_t sbo_bytes) {
  const uint64_t layout = swz == WgmmaSwizzle::B128 ? 1 : swz == WgmmaSwizzle::B64 ? 2 : swz == WgmmaSwizzle::B32 ? 3 : 0;
  return (uint64_t{(smem_address >> 4) & 0x3FFFu}) | (uint64_t{(lbo_bytes >> 4) & 0x3FFFu} << 16) |
         (uint64_t{(sbo_bytes >> 4) & 0x3FFFu} << 32) | (layout << 62);
}

DITQ_DEVICE uint64_t wgmma_smem_desc(const void* smem, WgmmaSwizzle swz, uint32_t lbo_bytes, uint32_t sbo_bytes
                                         DITQ_LOC) {
#if DITQ_EMULATED
  return wgmma_encode_desc(::ditq::emu::shared_window_address(smem, "wgmma descriptor", ditq_file_, ditq_line_),
                           swz, lbo_bytes, sbo_bytes);
#else
  return wgmma_encode_desc(smem_addr(smem), swz, lbo_bytes, sbo_bytes);
#endif
}

// wgmma.mma_async.sync.aligned.m64nNk32.s32.s8.s8: D[64 x N] s32 (+)= A[64 x 32] s8 * B[32 x N] s8 (B given
// as N x 32, K-major, like mma's .col). accumulate = false: D = A*B (the old D is not read). s32 wraps.
// Accumulator fragment (warp w = warp index % 4 within the warpgroup, g = lane >> 2, t = lane % 4):
//   d[i], i < N/2: row 16w + g + 8 ((i >> 1) & 1), col 8 (i >> 2) + 2t + (i & 1)
// Register A (rs), per warp the 16 rows 16w.. like mma.m16n8k32's A: a_j (byte j of a[j / 4]), j < 16:
//   row 16w + g + 8 ((j >> 2) & 1), col 4t + (j & 3) + 16 (j >> 3)
template <int N>
DITQ_DEVICE void wgmma_m64k32_s8_ss(int32_t (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, bool accumulate
                                        DITQ_LOC) {
  static_assert(N == 8 || N == 16 || N == 24 || (N % 16 == 0 && N >= 32 && N <= 256),
                "wgmma .s8 shapes: m64nNk32, N in 8, 16, 24, 32, 48, ..., 256");
#if DITQ_EMULATED
  ::ditq::emu::wgmma_s8(N, d, desc_a, nullptr, desc_b, accumulate, ditq_file_, ditq_line_);
#elif DITQ_SM90A
  detail::WgmmaS8<N>::ss(d, desc_a, desc_b, accumulate ? 1u : 0u);
#else
  DITQ_NOT_HERE();
#endif
}

template <int N>
DITQ_DEVICE void wgmma_m64k32_s8_rs(int32_t (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b, bool accumulate
                                        DITQ_LOC) {
  static_assert(N == 8 || N == 16 || N == 24 || (N % 16 == 0 && N >= 32 && N <= 256),
                "wgmma .s8 shapes: m64nNk32, N in 8, 16, 24, 32, 48, ..., 256");
#if DITQ_EMULATED
  ::ditq::emu::wgmma_s8(N, d, 0, a, desc_b, accumulate, ditq_file_, ditq_line_);
#elif DITQ_SM90A
  detail::WgmmaS8<N>::rs(d, a, desc_b, accumulate ? 1u : 0u);
#else
  DITQ_NOT_HERE();
#endif
}

// setmaxnreg.{inc,dec}.sync.aligned.u32 R: warpgroup-wide register reallocation (producer warpgroups give
// registers to consumer ones). R in 24..256, a multiple of 8. All threads of the warpgroup execute it.
template <int R>
DITQ_DEVICE void setmaxnreg_inc(DITQ_LOC0) {
  static_assert(R >= 24 && R <= 256 && R % 8 == 0, "setmaxnreg takes 24..256 in steps of 8");
#if DITQ_EMULATED
  ::ditq::emu::setmaxnreg(true, R, ditq_file_, ditq_line_);
#elif DITQ_SM90A
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(R));
#else
  DITQ_NOT_HERE();
#endif
}

template <int R>
DITQ_DEVICE void setmaxnreg_dec(DITQ_LOC0) {
  static_assert(R >= 24 && R <= 256 && R % 8 == 0, "setmaxnreg takes 24..256 in steps of 8");
#if DITQ_EMULATED
  ::ditq::emu::setmaxnreg(false, R, ditq_file_, ditq_line_);
#elif DITQ_SM90A
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(R));
#else
  DITQ_NOT_HERE();
#endif
}

}  // namespace ditq::ptx

// Shared memory in the emulator: static (DITQ_SHARED) and dynamic (DITQ_DYNAMIC_SHARED) storage, poisoned at
// every block; address checks; and the shared-memory race checker. Host-only.
//
// ---- What is checked, and when -----------------------------------------------------------------------------
// Every shared access that goes through ditq::ptx (ld_shared / st_shared, cp_async_16, ldmatrix) is checked
// to lie inside the block's shared memory and to be aligned. Plain C++ dereferences of shared pointers are
// not seen (C++ has no hook for them): kernels route shared accesses through ptx:: so that they are.
//
// ---- The race checker (Options::race_check) ----------------------------------------------------------------
// Shadow state per shared byte: its last writer (thread, barrier epoch, warp-sync count, source line) and its
// readers since then. The epoch advances at each __syncthreads (and each block); the warp-sync count of a
// warp advances at each of its collectives (shfl, ldmatrix, mma, syncwarp), which order the lanes of that warp.
// An access conflicts with an earlier one by another thread when neither is a read-read pair and no barrier
// (same epoch) -- nor, for two lanes of one warp, a warp collective -- lies between them. Reported with both
// threads and both source lines, whatever order the fibers ran in: a missing __syncthreads is caught in the
// forward order too, where the data happens to be right.
// A byte that an unretired cp.async will write is "in flight": any access to it (even by the issuing thread)
// is reported, so a cp.async.wait_group that waits for one group too few is caught in every cp.async mode.
// Hopper (emu/hopper.h) adds: bytes a TMA load writes are in flight until the mbarrier phase its bytes
// complete on has completed; bytes an unretired wgmma reads (its shared-memory operands) may not be written;
// bytes written by the async proxy (TMA) are ordered by the mbarrier, not by __syncthreads, so the barrier
// race check skips them; and each generic write remembers its thread's fence.proxy.async count, so that a
// wgmma reading it can tell whether the writer fenced.
#pragma once

#include <cstdlib>

#include "core.h"

namespace ditq::emu {

constexpr size_t kStaticSharedBytes = 48 * 1024;   // CUDA's limit for statically declared shared memory
constexpr size_t kMaxSharedBytes = 227 * 1024;     // the largest opt-in dynamic shared memory (sm_90)
constexpr uint8_t kPoison = 0xFF;                  // NaN as fp32 / fp16 / bf16, -1 as an integer

struct Shadow {
  uint64_t w_epoch = 0, w_sync = 0, r_epoch = 0, r_sync = 0;
  const char* w_file = nullptr;
  const char* r_file = nullptr;
  const char* p_file = nullptr;
  const char* a_file = nullptr;
  int32_t w_tid = -1, r_tid = -1, r_warp = -1, p_tid = -1;
  int32_t w_line = 0, r_line = 0, p_line = 0;
  uint32_t w_fence = 0;   // the writer's fence.proxy.async count when it wrote
  int32_t r_first = -1;   // the first reader of this epoch (kept when r_tid becomes kManyReaders) ...
  uint32_t r_arr = 0;     // ... and its mbarrier-arrive count when it read
  int32_t a_tid = -1, a_line = 0;  // an in-flight wgmma reading this byte (issued by a_tid's warpgroup)
  uint16_t a_count = 0;   // how many unretired wgmmas read it
  uint8_t p_kind = 0;     // what p_tid's in-flight write is: kFlightCpAsync or kFlightTma
};
constexpr int32_t kManyReaders = -2;
constexpr int32_t kAsyncWriter = -3;  // w_tid of bytes last written by a TMA load
constexpr uint8_t kFlightCpAsync = 0, kFlightTma = 1;

struct Region {
  const char* name;
  uint8_t* base = nullptr;
  size_t size = 0;
  std::vector<Shadow> shadow;
};

struct Decl {
  size_t offset, bytes;
  int line;
};

struct SharedState {
  Region stat{"static", nullptr, 0, {}}, dyn{"dynamic", nullptr, 0, {}};
  std::vector<Decl> decls;
  uint64_t warp_sync[32] = {};  // per warp of the block: its collective count (monotonic across blocks)
  uint64_t block_epoch = 0;     // the epoch the current block started in: older shadow writes are stale
  uint32_t proxy_fences[1024] = {};  // per thread of the block: its fence.proxy.async count
  uint32_t arrivals[1024] = {};      // per thread of the block: its mbarrier arrive count
  SharedState() {
    // 1024-aligned like the device's dynamic shared memory: a kernel that aligns a swizzled tile by its
    // pointer gets the same offsets here.
    stat.base = static_cast<uint8_t*>(std::aligned_alloc(1024, kStaticSharedBytes));
    dyn.base = static_cast<uint8_t*>(std::aligned_alloc(1024, kMaxSharedBytes));
  }
};

inline SharedState& SH() {
  static SharedState s;
  return s;
}

inline void set_dynamic_shared_bytes(size_t bytes) {
  if (bytes > kMaxSharedBytes)
    throw std::invalid_argument("ditq emulator: " + std::to_string(bytes) + " bytes of dynamic shared memory "
                                "exceed the 227 KB a block can have");
  SH().dyn.size = bytes;
}

inline void shared_begin_block() {
  SharedState& sh = SH();
  sh.decls.clear();
  sh.stat.size = 0;
  sh.block_epoch = S().epoch;
  std::memset(sh.proxy_fences, 0, sizeof(sh.proxy_fences));
  std::memset(sh.arrivals, 0, sizeof(sh.arrivals));
  std::memset(sh.dyn.base, kPoison, sh.dyn.size);
  if (S().opt.race_check && sh.dyn.shadow.size() < sh.dyn.size) sh.dyn.shadow.resize(sh.dyn.size);
}

inline uint8_t* dynamic_shared() { return SH().dyn.base; }

// DITQ_SHARED(T, name, N): the i-th declaration a thread executes in a block names the block's i-th static
// array; the first thread to get there allocates and poisons it.
template <class T, size_t N>
inline auto shared_array(const char* file, int line) -> T (&)[N] {
  SharedState& sh = SH();
  Thread& t = *S().cur;
  const size_t bytes = sizeof(T) * N;
  const size_t i = static_cast<size_t>(t.shared_decl++);
  if (i < sh.decls.size()) {
    if (sh.decls[i].bytes != bytes || sh.decls[i].line != line)
      fail("config", thread_desc(t.linear) + " declares shared memory at " + where(file, line) +
                         " where other threads declared it at line " + std::to_string(sh.decls[i].line) +
                         ": every thread must execute the same DITQ_SHARED declarations in the same order");
    return *reinterpret_cast<T(*)[N]>(sh.stat.base + sh.decls[i].offset);
  }
  const size_t align = alignof(T) > 16 ? alignof(T) : 16;
  const size_t off = (sh.stat.size + align - 1) / align * align;
  if (off + bytes > kStaticSharedBytes)
    fail("config", "static shared memory declared at " + where(file, line) + " exceeds 48 KB");
  std::memset(sh.stat.base + off, kPoison, bytes);
  sh.stat.size = off + bytes;
  if (S().opt.race_check && sh.stat.shadow.size() < sh.stat.size) sh.stat.shadow.resize(kStaticSharedBytes);
  sh.decls.push_back({off, bytes, line});
  return *reinterpret_cast<T(*)[N]>(sh.stat.base + off);
}

inline std::string shared_desc(const Region& r, size_t off) {
  return std::string(r.name) + " shared byte " + std::to_string(off);
}

inline std::string hex(const void* p) {
  std::ostringstream o;
  o << p;
  return o.str();
}

// The region holding [p, p + n), or a report. `what` names the access ("ld_shared", "cp.async"...).
inline Region& locate(const void* p, size_t n, int tid, const char* what, const char* file, int line) {
  SharedState& sh = SH();
  const uint8_t* b = static_cast<const uint8_t*>(p);
  for (Region* r : {&sh.stat, &sh.dyn}) {
    if (b >= r->base && b < r->base + (r == &sh.dyn ? kMaxSharedBytes : kStaticSharedBytes)) {
      const size_t off = static_cast<size_t>(b - r->base);
      if (off + n > r->size)
        fail("shared-address",
             thread_desc(tid) + ": " + what + " of " + std::to_string(n) + " bytes at " + where(file, line) +
                 " touches " + r->name + " shared bytes [" + std::to_string(off) + ", " + std::to_string(off + n) +
                 ") but the block has " + std::to_string(r->size) + " " + r->name + " shared bytes");
      return *r;
    }
  }
  fail("shared-address", thread_desc(tid) + ": " + what + " at " + where(file, line) + " uses address " + hex(p) +
                             ", which is not in shared memory");
}

inline void check_align(const void* p, size_t align, int tid, const char* what, const char* space,
                        const char* file, int line) {
  if (reinterpret_cast<uintptr_t>(p) % align != 0)
    fail("misaligned", thread_desc(tid) + ": " + what + " at " + where(file, line) + " needs a " +
                           std::to_string(align) + "-byte aligned " + space + " address, got " + hex(p));
}

inline uint64_t warp_sync_count(int tid) { return SH().warp_sync[tid / 32]; }

// Did an access by `tid` now happen-after an earlier one by `other` (epoch e, warp-sync count sync)?
inline bool ordered(int tid, int other, uint64_t e, uint64_t sync) {
  if (other == tid || e != S().epoch) return true;
  return other / 32 == tid / 32 && warp_sync_count(tid) != sync;
}

[[noreturn]] inline void race(const char* kind_now, int tid, const char* what, const char* file, int line,
                              const char* kind_then, int other, const char* ofile, int oline, const Region& r,
                              size_t off) {
  const std::string other_desc = other == kManyReaders ? std::string("other threads") : thread_desc(other);
  fail("race", thread_desc(tid) + " " + kind_now + " " + shared_desc(r, off) + " (" + what + " at " +
                   where(file, line) + ") that " + other_desc + " " + kind_then + " at " +
                   where(ofile, oline) + " with no __syncthreads between them");
}

// Race and in-flight checks for an access of n bytes at p (already located), then record it.
inline void shadow_access(Region& r, const void* p, size_t n, bool write, int tid, const char* what,
                          const char* file, int line) {
  if (!S().opt.race_check) return;
  const size_t off0 = static_cast<size_t>(static_cast<const uint8_t*>(p) - r.base);
  const uint64_t e = S().epoch, sync = warp_sync_count(tid);
  for (size_t i = 0; i < n; ++i) {
    Shadow& sd = r.shadow[off0 + i];
    if (sd.p_tid >= 0 && sd.p_kind == kFlightCpAsync)
      fail("cp-async-in-flight",
           thread_desc(tid) + " " + (write ? "writes " : "reads ") + shared_desc(r, off0 + i) + " (" + what +
               " at " + where(file, line) + ") while the cp.async that " + thread_desc(sd.p_tid) + " issued at " +
               where(sd.p_file, sd.p_line) + " to it is still in flight (not retired by cp_async_wait)");
    if (sd.p_tid >= 0)
      fail("tma-in-flight",
           thread_desc(tid) + " " + (write ? "writes " : "reads ") + shared_desc(r, off0 + i) + " (" + what +
               " at " + where(file, line) + ") while the TMA load that " + thread_desc(sd.p_tid) + " issued at " +
               where(sd.p_file, sd.p_line) + " to it is in flight (the mbarrier phase its bytes complete on has "
               "not completed: a wait with the wrong parity, or an expect_tx that does not cover it)");
    if (write && sd.a_count > 0)
      fail("race", thread_desc(tid) + " writes " + shared_desc(r, off0 + i) + " (" + what + " at " +
                       where(file, line) + ") that the wgmma issued at " + where(sd.a_file, sd.a_line) + " by " +
                       thread_desc(sd.a_tid) + "'s warpgroup still reads (not retired by wgmma_wait_group)");
    if (sd.w_tid >= 0 && !ordered(tid, sd.w_tid, sd.w_epoch, sd.w_sync))
      race(write ? "writes" : "reads", tid, what, file, line, "wrote", sd.w_tid, sd.w_file, sd.w_line, r, off0 + i);
    if (write) {
      if (sd.r_tid != -1 && sd.r_epoch == e) {
        const bool same_warp_synced = sd.r_warp == tid / 32 && warp_sync_count(tid) != sd.r_sync;
        if (sd.r_tid == kManyReaders ? !same_warp_synced : !ordered(tid, sd.r_tid, sd.r_epoch, sd.r_sync))
          race("writes", tid, what, file, line, "read", sd.r_tid, sd.r_file, sd.r_line, r, off0 + i);
      }
      sd.w_tid = tid;
      sd.w_epoch = e;
      sd.w_sync = sync;
      sd.w_file = file;
      sd.w_line = line;
      sd.w_fence = SH().proxy_fences[tid];
      sd.r_tid = -1;
    } else if (sd.r_tid == -1 || sd.r_epoch != e) {
      sd.r_tid = tid;
      sd.r_warp = tid / 32;
      sd.r_epoch = e;
      sd.r_sync = sync;
      sd.r_file = file;
      sd.r_line = line;
      sd.r_first = tid;
      sd.r_arr = SH().arrivals[tid];
    } else if (sd.r_tid != tid) {
      sd.r_tid = kManyReaders;  // keeps the first reader's line for the report
      if (sd.r_warp != tid / 32) sd.r_warp = -1;
      sd.r_sync = sync;
    }
  }
}

// The whole check of one shared access by thread `tid`.
inline void shared_access(const void* p, size_t n, size_t align, bool write, int tid, const char* what,
                          const char* file, int line) {
  ++S().actions;
  Region& r = locate(p, n, tid, what, file, line);
  check_align(p, align, tid, what, "shared", file, line);
  shadow_access(r, p, n, write, tid, what, file, line);
}

inline void set_in_flight(const void* p, size_t n, int tid, const char* file, int line,
                          uint8_t kind = kFlightCpAsync) {
  if (!S().opt.race_check) return;
  Region& r = locate(p, n, tid, kind == kFlightTma ? "TMA load" : "cp.async", file, line);
  const size_t off0 = static_cast<size_t>(static_cast<const uint8_t*>(p) - r.base);
  for (size_t i = 0; i < n; ++i) {
    Shadow& sd = r.shadow[off0 + i];
    sd.p_tid = tid;
    sd.p_kind = kind;
    sd.p_file = file;
    sd.p_line = line;
  }
}

inline void clear_in_flight(const void* p, size_t n) {
  if (!S().opt.race_check) return;
  SharedState& sh = SH();
  const uint8_t* b = static_cast<const uint8_t*>(p);
  Region& r = (b >= sh.dyn.base && b < sh.dyn.base + kMaxSharedBytes) ? sh.dyn : sh.stat;
  const size_t off0 = static_cast<size_t>(b - r.base);
  for (size_t i = 0; i < n; ++i) r.shadow[off0 + i].p_tid = -1;
}

}  // namespace ditq::emu

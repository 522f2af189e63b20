// Hopper in the emulator: mbarrier, TMA (cp.async.bulk.tensor.2d), fence.proxy.async, wgmma (s8), setmaxnreg.
// Host-only; included by emu.h (which ptx.cuh includes after declaring ptx::TmaSwizzle / WgmmaSwizzle).
//
// ---- Shared-memory addresses --------------------------------------------------------------------------------
// wgmma descriptors carry 14 bits of (shared window address >> 4), and both the TMA and the wgmma swizzles
// are functions of that absolute address. The emulator's window: dynamic shared byte i is address i (the
// dynamic shared memory starts 1024-aligned, as on the device), static shared byte i is address S + i with
// S = the dynamic size rounded up to 1024.
//
// ---- mbarrier ----------------------------------------------------------------------------------------------
// State per barrier (keyed by its address; reset at every block): the init count, pending arrivals,
// transaction count (expect_tx adds, landed TMA bytes subtract; signed, as a copy may land before the
// expect_tx), and the number of completed phases (its low bit is the hardware's phase bit). A phase
// completes when pending arrivals and the transaction count are both zero: the barrier re-arms and wakes its
// waiters. try_wait.parity(p) is true iff the current (incomplete) phase's parity differs from p -- exactly
// the hardware rule, so a wait for parity 1 on a fresh barrier passes at once (the idiom for "empty" barriers)
// and a consumer waiting with the wrong parity on a "full" barrier passes too early: it then reads bytes still
// in flight or never written, which the race checker reports. A wait that can never be satisfied blocks the
// thread (mbarrier_wait_parity) or keeps it spinning (a try_wait loop: each failed try_wait yields, and a
// round of nothing but failed try_waits is no progress); when no thread can make progress, in-flight TMA
// bytes are landed first, and if that does not help the deadlock report names each barrier waited on, its
// phase, and its expected vs received arrivals and bytes.
// Use before init, re-init of a barrier with a phase in progress, more arrivals than the count, and a TMA
// completing on a barrier whose init was not followed by fence.mbarrier_init are reported ("mbarrier").
//
// ---- TMA ---------------------------------------------------------------------------------------------------
// tma_load_2d reads the box's in-bounds elements at issue through the global-memory checker (the inputs do
// not change during a launch; out-of-bounds elements are zero-filled and never read) and lands them in shared
// memory in the map's swizzle at issue (AsyncLanding::Issue) or, lazily, when a thread first waits on (or
// try_waits) the barrier, or when nothing else can run (AsyncLanding::Wait). Landing subtracts the box's bytes
// from the barrier's transaction count. The destination is in flight (race checker) from issue until the
// phase those bytes landed on completes: an expect_tx that is too small completes a phase early, the rest of
// the bytes count toward the next phase, and a consumer reading them is reported; one that is too large never
// completes (deadlock report with the byte counts). A TMA load may not overwrite bytes an unretired wgmma
// reads, nor bytes whose first generic reader in this barrier interval has not arrived on an mbarrier since.
//
// ---- wgmma -------------------------------------------------------------------------------------------------
// wgmma.mma_async is a warpgroup collective (128 threads, warps 4k..4k+3, same call site): the last thread to
// arrive reads both operands (shared memory through the descriptors, decoded bit for bit: start, LBO, SBO,
// base offset, swizzle; register A from the ISA's fragment layout) and computes every thread's new
// accumulators at once. What it computes is kept aside per thread and per accumulator array; the registers
// themselves receive the values at issue (AsyncLanding::Issue) or a poison at issue and the values at the
// wgmma.wait_group that retires the last pending wgmma on them (Wait). Chained wgmmas accumulate in order
// from the kept values. Checked: a thread writing its accumulators between issue and the retiring wait (the
// registers no longer hold what the emulator left there), a wgmma with no wgmma.fence before it in the
// thread, or one accumulating into registers the thread changed since the last landing with no wgmma.fence
// since ("wgmma-fence"); shared operand bytes in flight (TMA / cp.async), never written in this block
// ("shared-unwritten"), or written by a thread through the generic proxy with no fence.proxy.async by that
// thread after the write ("proxy-fence"); writes to operand bytes before the retiring wait ("race"); and a
// thread exiting with wgmmas not retired ("wgmma-pending"), or with TMA loads never completed
// ("tma-pending").
#pragma once

#include <map>

#include "core.h"
#include "global.h"
#include "shared.h"
#include "warp.h"

namespace ditq::emu {

// ---- the tensor map ----------------------------------------------------------------------------------------
// What cuTensorMapEncodeTiled encodes, decoded (1-byte elements, 2-D). Same size and alignment as
// CUtensorMap, so a kernel parameter has the same footprint on both sides. Built by ptx::make_tma_map_2d.
struct alignas(64) TmaMap {
  uint64_t magic;  // kTmaMagic once built: anything else is a map that was never built
  const uint8_t* base;
  uint64_t inner, outer, stride;  // elements per row, rows, bytes between rows
  uint32_t box_inner, box_outer;
  int swizzle;  // ptx::TmaSwizzle
  uint8_t pad_[128 - 52];
};
static_assert(sizeof(TmaMap) == 128, "TmaMap mirrors CUtensorMap's 128 bytes");
constexpr uint64_t kTmaMagic = 0x646974712d746d61ull;  // "ditq-tma"

// The XOR swizzles shared by TMA and wgmma (bits = 1, 2, 3 for 32B, 64B, 128B): the 16-byte chunk index
// (address bits 4..) has its low `bits` bits XORed with address bits [7, 7 + bits).
inline uint32_t swizzle_address(uint32_t a, int bits) {
  return bits == 0 ? a : a ^ (((a >> 7) & ((1u << bits) - 1)) << 4);
}

constexpr int32_t kWgmmaPoison = static_cast<int32_t>(0x80BADBAD);  // accumulators while a wgmma is in flight

// ---- state -------------------------------------------------------------------------------------------------
struct Mbar {
  uint32_t count = 0, pending = 0, completed = 0;  // init count, arrivals still expected, phases completed
  int64_t tx = 0;                                  // transaction bytes still expected (may dip below 0)
  int64_t expected = 0, received = 0;              // this phase's expect_tx total and landed bytes (reports)
  bool fenced = false;                             // fence.mbarrier_init by the initialising thread since
  int init_tid = 0;
  uint64_t init_epoch = 0;
  const char* init_file = "";
  int init_line = 0;
};

struct TmaCopy {
  uint64_t* bar;
  uint8_t* dst;  // shared memory (the box, already swizzled, lands as `data` at dst)
  std::vector<uint8_t> data;
  int tid;
  const char* file;
  int line;
  bool landed = false;
  uint32_t phase = 0;  // the barrier phase (completed count) its bytes counted toward
};

// One accumulator array of one thread: what the emulator keeps for it between issue and landing.
struct AccState {
  int32_t* d;
  int n;
  std::vector<int32_t> value;  // the result of the newest wgmma on it (landed or not)
  std::vector<int32_t> left;   // what the emulator last put in the registers (poison or values)
  int pending = 0;             // wgmmas on it not yet retired
  uint32_t fence_at_land = 0;  // the thread's wgmma.fence count when the values last landed
  const char* file = "";       // the newest wgmma on it
  int line = 0;
};

struct WgOp {  // one wgmma, shared by the warpgroup: the operand bytes it reads until retired
  std::vector<uint8_t*> bytes;
  bool reads_cleared = false;
  int refs = 0;  // threads that have not retired it yet
};

struct WgPending {
  int op;   // index into HopperState::ops
  int acc;  // index into the thread's accs
};

struct HopperThread {
  std::vector<AccState> accs;
  std::vector<WgPending> open;
  std::deque<std::vector<WgPending>> groups;
  uint32_t fences = 0;  // wgmma.fence count
};

struct WgSlot {  // a warpgroup collective in progress
  int arrived = 0;
  const char* what = "";
  const char* file = "";
  int line = 0;
  int n = 0;
  uint64_t desc_a = 0, desc_b = 0;
  bool rs = false;
  bool accumulate[128];
  int32_t* d[128];
  uint32_t a[128][4];
  int reg[128];  // setmaxnreg: the count, with the direction in the sign
};

struct HopperState {
  std::map<uintptr_t, Mbar> bars;
  std::vector<TmaCopy> copies;  // this block's TMA loads not yet completed (landed and phase done)
  std::vector<WgOp> ops;
  std::vector<HopperThread> th;
  WgSlot wg[8];                 // at most 1024 threads = 8 warpgroups
  bool used = false;
};

inline HopperState& HS() {
  static HopperState h;
  return h;
}

// ---- shared window addresses ------------------------------------------------------------------------------
inline uint32_t static_window_base() { return static_cast<uint32_t>((SH().dyn.size + 1023) / 1024 * 1024); }

inline uint32_t shared_window_address(const void* p, const char* what, const char* file, int line) {
  const int tid = S().cur ? S().cur->linear : 0;
  Region& r = locate(p, 1, tid, what, file, line);
  const size_t off = static_cast<size_t>(static_cast<const uint8_t*>(p) - r.base);
  const uint64_t a = (&r == &SH().dyn ? 0 : static_window_base()) + off;
  if (a >= (1u << 18))
    fail("config", thread_desc(tid) + ": " + what + " at " + where(file, line) + ": shared window address " +
                       std::to_string(a) + " does not fit the 18 bits a descriptor holds");
  return static_cast<uint32_t>(a);
}

// The host byte at window address a, with the n bytes from it inside one region; else a report.
inline uint8_t* window_byte(uint32_t a, size_t n, int tid, const char* what, const char* file, int line) {
  SharedState& sh = SH();
  const uint32_t sb = static_window_base();
  if (a + n <= sh.dyn.size) return sh.dyn.base + a;
  if (a >= sb && a - sb + n <= sh.stat.size) return sh.stat.base + (a - sb);
  fail("shared-address", thread_desc(tid) + ": " + what + " at " + where(file, line) + " reads shared window bytes [" +
                             std::to_string(a) + ", " + std::to_string(a + n) + "), outside the block's " +
                             std::to_string(sh.dyn.size) + " dynamic and " + std::to_string(sh.stat.size) +
                             " static shared bytes (a wrong descriptor start, LBO or SBO?)");
}

inline Shadow* shadow_of(uint8_t* b) {
  if (!S().opt.race_check) return nullptr;
  SharedState& sh = SH();
  Region& r = (b >= sh.dyn.base && b < sh.dyn.base + kMaxSharedBytes) ? sh.dyn : sh.stat;
  return &r.shadow[static_cast<size_t>(b - r.base)];
}

// ---- block begin / end (called by the scheduler) -----------------------------------------------------------
inline void hopper_begin_block() {
  HopperState& h = HS();
  h.bars.clear();
  h.copies.clear();
  h.ops.clear();
  h.used = false;
  const int n = S().nthreads;
  if (static_cast<int>(h.th.size()) < n) h.th.resize(n);
  for (int i = 0; i < n; ++i) h.th[i] = HopperThread{};
  for (WgSlot& w : h.wg) w.arrived = 0;
}

// Drops every in-flight mark the block left in the shadow memory (after a failed launch, or at block end).
inline void hopper_clear_marks() {
  HopperState& h = HS();
  if (S().opt.race_check) {
    for (TmaCopy& c : h.copies) clear_in_flight(c.dst, c.data.size());
    for (WgOp& op : h.ops)
      if (!op.reads_cleared)
        for (uint8_t* b : op.bytes)
          for (int i = 0; i < 16; ++i) {
            Shadow* sd = shadow_of(b + i);
            if (sd && sd->a_count > 0) --sd->a_count;
          }
  }
  for (WgOp& op : h.ops) op.reads_cleared = true;
  h.copies.clear();
}

// End of a block that ran to completion: async work it left behind is a bug.
inline void hopper_end_block() {
  HopperState& h = HS();
  if (!h.used) return;
  const int n = S().nthreads;
  for (int i = 0; i < n; ++i) {
    const HopperThread& t = h.th[i];
    const WgPending* p = !t.open.empty() ? &t.open.front() : nullptr;
    for (const auto& g : t.groups)
      if (!p && !g.empty()) p = &g.front();
    if (p) {
      const AccState& a = t.accs[p->acc];
      hopper_clear_marks();
      fail("wgmma-pending", thread_desc(i) + " returned with the wgmma issued at " + where(a.file, a.line) +
                                " not retired" + (t.open.empty() ? "" : " (not even committed)") +
                                ": its accumulators never received its result (a missing wgmma_commit_group / "
                                "wgmma_wait_group)");
    }
  }
  for (const TmaCopy& c : h.copies) {
    const std::string msg = "the TMA load issued at " + where(c.file, c.line) + " by " + thread_desc(c.tid) +
                            (c.landed ? " landed, but the mbarrier phase it counted toward never completed"
                                      : " never landed: no thread waited on its mbarrier") +
                            " before the block exited";
    hopper_clear_marks();
    fail("tma-pending", msg);
  }
  hopper_clear_marks();
}

// ---- mbarrier ----------------------------------------------------------------------------------------------
inline std::string bar_name(const uint64_t* bar) {
  const SharedState& sh = SH();
  const uint8_t* b = reinterpret_cast<const uint8_t*>(bar);
  const bool dyn = b >= sh.dyn.base && b < sh.dyn.base + kMaxSharedBytes;
  const size_t off = static_cast<size_t>(b - (dyn ? sh.dyn.base : sh.stat.base));
  return std::string("mbarrier at ") + (dyn ? "dynamic" : "static") + " shared byte " + std::to_string(off);
}

inline std::string bar_state(const uint64_t* bar, const Mbar& m) {
  return bar_name(bar) + " (initialised at " + where(m.init_file, m.init_line) + " with count " +
         std::to_string(m.count) + "; phase " + std::to_string(m.completed) + " (parity " +
         std::to_string(m.completed & 1) + ") in progress: " + std::to_string(m.count - m.pending) + " of " +
         std::to_string(m.count) + " arrivals, expect_tx " + std::to_string(m.expected) + " bytes, received " +
         std::to_string(m.received) + " bytes)";
}

inline Mbar& mbar_get(uint64_t* bar, const char* what, const char* file, int line) {
  State& s = S();
  const int tid = s.cur->linear;
  Region& r = locate(bar, 8, tid, what, file, line);
  (void)r;
  check_align(bar, 8, tid, what, "shared", file, line);
  HopperState& h = HS();
  auto it = h.bars.find(reinterpret_cast<uintptr_t>(bar));
  if (it == h.bars.end())
    fail("mbarrier", thread_desc(tid) + ": " + what + " at " + where(file, line) + " on " + bar_name(bar) +
                         ", which no mbarrier_init has initialised in this block");
  Mbar& m = it->second;
  if (m.init_tid != tid && m.init_epoch == s.epoch)
    fail("mbarrier", thread_desc(tid) + ": " + what + " at " + where(file, line) + " on " + bar_name(bar) +
                         " that " + thread_desc(m.init_tid) + " initialised at " + where(m.init_file, m.init_line) +
                         " with no __syncthreads between: the init is not yet visible to this thread");
  return m;
}

inline void mbar_init(uint64_t* bar, uint32_t count, const char* file, int line) {
  State& s = S();
  const int tid = s.cur->linear;
  HS().used = true;
  ++S().actions;
  Region& r = locate(bar, 8, tid, "mbarrier.init", file, line);
  check_align(bar, 8, tid, "mbarrier.init", "shared", file, line);
  shadow_access(r, bar, 8, true, tid, "mbarrier.init", file, line);
  if (count == 0 || count >= (1u << 20))
    fail("mbarrier", thread_desc(tid) + ": mbarrier.init at " + where(file, line) + " with count " +
                         std::to_string(count) + " (the ISA allows 1 .. 2^20 - 1)");
  HopperState& h = HS();
  auto it = h.bars.find(reinterpret_cast<uintptr_t>(bar));
  if (it != h.bars.end()) {
    const Mbar& m = it->second;
    if (m.pending != m.count || m.tx != 0)
      fail("mbarrier", thread_desc(tid) + ": mbarrier.init at " + where(file, line) + " re-initialises " +
                           bar_state(bar, m) + " while a phase is in progress");
    for (const TmaCopy& c : h.copies)
      if (c.bar == bar)
        fail("mbarrier", thread_desc(tid) + ": mbarrier.init at " + where(file, line) + " re-initialises " +
                             bar_name(bar) + " while the TMA load issued at " + where(c.file, c.line) +
                             " still counts on it");
  }
  Mbar m;
  m.count = m.pending = count;
  m.init_tid = tid;
  m.init_epoch = s.epoch;
  m.init_file = file;
  m.init_line = line;
  std::memset(bar, 0, 8);  // the word now holds barrier state: its poison is gone, as on the GPU
  h.bars[reinterpret_cast<uintptr_t>(bar)] = m;
}

inline void mbar_fence_init(const char*, int) {
  const int tid = S().cur->linear;
  HS().used = true;
  ++S().actions;
  for (auto& kv : HS().bars)
    if (kv.second.init_tid == tid) kv.second.fenced = true;
}

inline void wake_waiters(const uint64_t* bar);

// The phase completes if nothing more is expected: re-arm, end the in-flight state of the copies that
// counted toward it, wake the waiters.
inline void mbar_maybe_complete(uint64_t* bar, Mbar& m) {
  if (m.pending != 0 || m.tx != 0) return;
  HopperState& h = HS();
  const uint32_t done = m.completed;
  ++m.completed;
  m.pending = m.count;
  m.expected = m.received = 0;
  for (size_t i = 0; i < h.copies.size();) {
    TmaCopy& c = h.copies[i];
    if (c.bar == bar && c.landed && c.phase == done) {
      clear_in_flight(c.dst, c.data.size());
      h.copies.erase(h.copies.begin() + static_cast<long>(i));
    } else {
      ++i;
    }
  }
  wake_waiters(bar);
}

inline void mbar_arrive(uint64_t* bar, uint32_t tx, bool expect, const char* file, int line) {
  HS().used = true;
  ++S().actions;
  Mbar& m = mbar_get(bar, expect ? "mbarrier.arrive.expect_tx" : "mbarrier.arrive", file, line);
  if (m.pending == 0)
    fail("mbarrier", thread_desc(S().cur->linear) + ": mbarrier.arrive at " + where(file, line) + " on " +
                         bar_state(bar, m) + ": more arrivals than the init count in one phase");
  if (expect) {
    // PTX ISA, mbarrier contents: the tx-count lives in [-(2^20 - 1), 2^20 - 1] (a 21-bit signed field of the
    // 64-bit object). Beyond it the GPU's count wraps and the phase completes early or never, so it is reported
    // here instead of being emulated with a wider integer.
    constexpr int64_t kTxMax = (int64_t{1} << 20) - 1;
    if (static_cast<int64_t>(tx) > kTxMax || m.tx + static_cast<int64_t>(tx) > kTxMax)
      fail("mbarrier", thread_desc(S().cur->linear) + ": mbarrier.arrive.expect_tx at " + where(file, line) + " on " +
                           bar_state(bar, m) + " expects " + std::to_string(tx) + " more transaction bytes: the "
                           "tx-count would reach " + std::to_string(m.tx + static_cast<int64_t>(tx)) +
                           ", past the ISA's 2^20 - 1");
    m.tx += tx;
    m.expected += tx;
  }
  --m.pending;
  ++SH().arrivals[S().cur->linear];
  mbar_maybe_complete(bar, m);
}

// An async-proxy write (a TMA load, at issue and when it lands) of [dst, dst + n): it must not overlap bytes
// another async copy is about to write, nor bytes an unretired wgmma reads. Its ordering against generic
// readers of the previous contents goes through mbarriers, which the barrier-epoch race check does not see;
// what is checked: the first reader of each byte in this barrier interval must have arrived on some mbarrier
// since its read (a stage released before it was read is reported when the producer refills it before the
// reader's next arrival: partial, schedule-dependent).
inline void async_write_check(uint8_t* dst, size_t n, int tid, const char* what, const char* file, int line,
                              bool landing = false) {
  if (!S().opt.race_check) return;
  for (size_t i = 0; i < n; ++i) {
    Shadow& sd = *shadow_of(dst + i);
    SharedState& sh = SH();
    const bool dyn = dst >= sh.dyn.base && dst < sh.dyn.base + kMaxSharedBytes;
    auto byte = [&] {
      return std::string(dyn ? "dynamic" : "static") + " shared byte " +
             std::to_string(static_cast<size_t>(dst + i - (dyn ? sh.dyn.base : sh.stat.base)));
    };
    if (!landing && sd.p_tid >= 0)
      fail(sd.p_kind == kFlightTma ? "tma-in-flight" : "cp-async-in-flight",
           std::string(what) + " issued at " + where(file, line) + " by " + thread_desc(tid) + " writes " + byte() +
               " while the " + (sd.p_kind == kFlightTma ? "TMA load" : "cp.async") + " that " +
               thread_desc(sd.p_tid) + " issued at " + where(sd.p_file, sd.p_line) + " to it is still in flight");
    if (sd.r_tid != -1 && sd.r_epoch == S().epoch && sd.r_first >= 0 && sd.r_first != tid &&
        SH().arrivals[sd.r_first] <= sd.r_arr)
      fail("race", std::string(what) + " issued at " + where(file, line) + " by " + thread_desc(tid) +
                       (landing ? " lands in " : " writes ") + byte() + ", which " + thread_desc(sd.r_first) +
                       " read at " + where(sd.r_file, sd.r_line) + " and has not released since (no mbarrier "
                       "arrive by it after the read: a stage released before it was read?)");
    if (sd.a_count > 0)
      fail("race", std::string(what) + " issued at " + where(file, line) + " by " + thread_desc(tid) +
                       (landing ? " lands in " : " writes ") + byte() + ", which the wgmma issued at " +
                       where(sd.a_file, sd.a_line) + " by " + thread_desc(sd.a_tid) +
                       "'s warpgroup still reads (not retired by wgmma_wait_group)");
  }
}

// Lands one TMA copy: bytes into shared memory, complete_tx on its barrier.
inline void tma_land(TmaCopy& c) {
  if (c.landed) return;
  async_write_check(c.dst, c.data.size(), c.tid, "the TMA load", c.file, c.line, true);
  std::memcpy(c.dst, c.data.data(), c.data.size());
  c.landed = true;
  if (S().opt.race_check)
    for (size_t i = 0; i < c.data.size(); ++i) {
      Shadow* sd = shadow_of(c.dst + i);
      sd->w_tid = kAsyncWriter;
      sd->w_epoch = S().epoch;
      sd->w_file = c.file;
      sd->w_line = c.line;
      sd->r_tid = -1;
    }
  Mbar& m = HS().bars[reinterpret_cast<uintptr_t>(c.bar)];
  c.phase = m.completed;
  m.tx -= static_cast<int64_t>(c.data.size());
  m.received += static_cast<int64_t>(c.data.size());
  mbar_maybe_complete(c.bar, m);
}

// Lands every not-yet-landed copy on `bar` (all barriers if null), in issue order. True if any landed.
inline bool tma_land_pending(const uint64_t* bar) {
  HopperState& h = HS();
  bool any = false;
  for (size_t i = 0; i < h.copies.size(); ++i) {  // tma_land may erase completed copies: index, re-check
    if (h.copies[i].landed || (bar && h.copies[i].bar != bar)) continue;
    const size_t before = h.copies.size();
    tma_land(h.copies[i]);
    any = true;
    if (h.copies.size() != before) i = static_cast<size_t>(-1);  // restart: erased entries shift the rest
  }
  return any;
}

// What each thread blocked on (or spinning on) an mbarrier waits for.
struct MbarWait {
  const uint64_t* bar = nullptr;
  uint32_t parity = 0;
};
inline std::vector<MbarWait>& mbar_waits() {
  static std::vector<MbarWait> w(1024);
  return w;
}

inline bool mbar_phase_done(const Mbar& m, uint32_t parity) { return (m.completed & 1u) != (parity & 1u); }

inline bool mbar_try_wait(uint64_t* bar, uint32_t parity, const char* file, int line) {
  HS().used = true;  // (no action: a try_wait that lands nothing and fails changes nothing -- not progress)
  mbar_get(bar, "mbarrier.try_wait", file, line);
  if (S().opt.async_landing == AsyncLanding::Wait && tma_land_pending(bar)) ++S().actions;
  if (mbar_phase_done(HS().bars[reinterpret_cast<uintptr_t>(bar)], parity)) return true;
  // A kernel spinning on try_wait must let the others run; if all it does is spin, the scheduler reports a
  // deadlock listing it as waiting here.
  Thread& t = *S().cur;
  mbar_waits()[t.linear] = {bar, parity};
  t.waiting = Wait::Mbarrier;
  t.wait_what = "mbarrier_try_wait_parity (spinning)";
  t.wait_file = file;
  t.wait_line = line;
  yield_here(true);
  t.waiting = Wait::None;
  return false;
}

inline void wake_waiters(const uint64_t* bar) {
  State& s = S();
  for (int i = 0; i < s.nthreads; ++i)
    if (s.threads[i].waiting == Wait::Mbarrier && mbar_waits()[i].bar == bar) release(s.threads[i]);
}

inline void mbar_wait(uint64_t* bar, uint32_t parity, const char* file, int line) {
  HS().used = true;
  ++S().actions;
  mbar_get(bar, "mbarrier.try_wait (wait loop)", file, line);
  const int tid = S().cur->linear;
  for (;;) {
    if (S().opt.async_landing == AsyncLanding::Wait) tma_land_pending(bar);
    if (mbar_phase_done(HS().bars[reinterpret_cast<uintptr_t>(bar)], parity)) return;
    mbar_waits()[tid] = {bar, parity};
    block_here(Wait::Mbarrier, "mbarrier_wait_parity", file, line);
  }
}

// For the deadlock report: what a thread blocked on an mbarrier waits for.
inline std::string mbar_wait_detail(int tid) {
  const MbarWait& w = mbar_waits()[tid];
  auto it = HS().bars.find(reinterpret_cast<uintptr_t>(w.bar));
  if (it == HS().bars.end()) return "";
  return " for parity " + std::to_string(w.parity) + " of " + bar_state(w.bar, it->second);
}

// No thread can run: in-flight TMA bytes land (the hardware completes them eventually). True if that may
// have unblocked someone.
inline bool hopper_drain() { return tma_land_pending(nullptr); }

inline void fence_proxy_async(const char*, int) {
  HS().used = true;
  ++S().actions;
  ++SH().proxy_fences[S().cur->linear];
}

// ---- TMA ---------------------------------------------------------------------------------------------------
inline void tma_check_map(const TmaMap* map, const char* what, const char* file, int line) {
  if (map == nullptr || map->magic != kTmaMagic)
    fail("config", thread_desc(S().cur->linear) + ": " + what + " at " + where(file, line) +
                       " uses a TMA map that make_tma_map_2d never built");
}

inline void tma_load_2d(void* smem_dst, const TmaMap* map, int32_t c0, int32_t c1, uint64_t* bar, const char* file,
                        int line) {
  State& s = S();
  const int tid = s.cur->linear;
  HopperState& h = HS();
  h.used = true;
  ++S().actions;
  tma_check_map(map, "cp.async.bulk.tensor", file, line);
  Mbar& m = mbar_get(bar, "cp.async.bulk.tensor (its mbarrier)", file, line);
  if (!m.fenced)
    fail("mbarrier", thread_desc(tid) + ": the TMA load at " + where(file, line) + " completes on " + bar_name(bar) +
                         " whose init at " + where(m.init_file, m.init_line) + " was not followed by "
                         "fence_mbarrier_init in " + thread_desc(m.init_tid) +
                         ": the async proxy may not see the initialised barrier");
  const int bits = map->swizzle;  // TmaSwizzle None/B32/B64/B128 = 0..3 = the XOR width in bits
  const uint32_t span = bits ? (16u << bits) : 0;
  const size_t bytes = size_t{map->box_inner} * map->box_outer;
  const size_t align = bits ? 8 * span : 128;  // a swizzled box must start at its pattern's origin
  uint8_t* dst = static_cast<uint8_t*>(smem_dst);
  Region& r = locate(dst, bytes, tid, "cp.async.bulk.tensor", file, line);
  const uint32_t win = shared_window_address(dst, "cp.async.bulk.tensor", file, line);
  if (win % align != 0)
    fail("misaligned", thread_desc(tid) + ": cp.async.bulk.tensor at " + where(file, line) + " needs a " +
                           std::to_string(align) + "-byte aligned shared destination" +
                           (bits ? " (its swizzle is a function of the absolute address)" : "") + ", got window address " +
                           std::to_string(win));
  (void)r;
  async_write_check(dst, bytes, tid, "the TMA load", file, line);
  TmaCopy c;
  c.bar = bar;
  c.dst = dst;
  c.tid = tid;
  c.file = file;
  c.line = line;
  c.data.assign(bytes, 0);  // out-of-bounds elements stay zero
  for (uint32_t row = 0; row < map->box_outer; ++row) {
    const int64_t y = int64_t{c1} + row;
    if (y < 0 || y >= static_cast<int64_t>(map->outer)) continue;
    // the in-bounds run of this row: [x0, x1)
    const int64_t x0 = std::max<int64_t>(c0, 0);
    const int64_t x1 = std::min<int64_t>(int64_t{c0} + map->box_inner, static_cast<int64_t>(map->inner));
    if (x1 <= x0) continue;
    const uint8_t* src = map->base + static_cast<uint64_t>(y) * map->stride + static_cast<uint64_t>(x0);
    global_access(src, static_cast<size_t>(x1 - x0), false, "cp.async.bulk.tensor", file, line);
    for (int64_t x = x0; x < x1; ++x) {
      const uint32_t lin = win + row * map->box_inner + static_cast<uint32_t>(x - c0);
      c.data[swizzle_address(lin, bits) - win] = src[x - x0];
    }
  }
  set_in_flight(dst, bytes, tid, file, line, kFlightTma);
  h.copies.push_back(std::move(c));
  if (s.opt.async_landing == AsyncLanding::Issue) tma_land(h.copies.back());
  else wake_waiters(bar);  // a thread already blocked on the barrier lands it when it next looks
}

// ---- warpgroup collectives ---------------------------------------------------------------------------------
inline WgSlot& wg_arrive(const char* what, const char* file, int line) {
  State& s = S();
  Thread& t = *s.cur;
  const int g = t.linear / 128;
  if ((g + 1) * 128 > s.nthreads)
    fail("partial-warp", thread_desc(t.linear) + " executes " + what + " at " + where(file, line) + " in warpgroup " +
                             std::to_string(g) + ", which has only " + std::to_string(s.nthreads - 128 * g) +
                             " threads: a warpgroup instruction needs all 128 (4 full warps)");
  WgSlot& w = HS().wg[g];
  if (w.arrived == 0) {
    w.what = what;
    w.file = file;
    w.line = line;
  } else if (w.line != line || std::strcmp(w.what, what) != 0 || std::strcmp(w.file, file) != 0) {
    fail("divergent-collective", thread_desc(t.linear) + " (warpgroup " + std::to_string(g) + ") is at " + what +
                                     " (" + where(file, line) + ") while other threads of its warpgroup wait at " +
                                     w.what + " (" + where(w.file, w.line) +
                                     "): all 128 threads must execute the same warpgroup instruction");
  }
  return w;
}

template <class Compute>
inline void wg_complete(WgSlot& w, Compute&& compute) {
  State& s = S();
  Thread& t = *s.cur;
  if (++w.arrived < 128) {
    block_here(Wait::Collective, w.what, w.file, w.line);
    return;
  }
  compute(w);
  w.arrived = 0;
  const int base = (t.linear / 128) * 128;
  for (int wi = 0; wi < 4; ++wi) ++SH().warp_sync[base / 32 + wi];  // orders each warp's lanes, like a warp collective
  for (int l = 0; l < 128; ++l)
    if (s.threads[base + l].waiting == Wait::Collective) release(s.threads[base + l]);
}

inline void setmaxnreg(bool inc, int regs, const char* file, int line) {
  HS().used = true;
  ++S().actions;
  WgSlot& w = wg_arrive(inc ? "setmaxnreg.inc" : "setmaxnreg.dec", file, line);
  const int l = S().cur->linear % 128;
  w.reg[l] = inc ? regs : -regs;
  wg_complete(w, [&](WgSlot& w) {
    for (int i = 1; i < 128; ++i)
      if (w.reg[i] != w.reg[0])
        fail("divergent-collective", "setmaxnreg at " + where(file, line) + ": the threads of a warpgroup ask for "
                                     "different register counts (" + std::to_string(std::abs(w.reg[0])) + " and " +
                                     std::to_string(std::abs(w.reg[i])) + "): it must be warpgroup-uniform");
  });
}

// ---- wgmma -------------------------------------------------------------------------------------------------
inline void wgmma_fence(const char*, int) {
  HS().used = true;
  ++S().actions;
  ++HS().th[S().cur->linear].fences;
}

inline void wgmma_commit(const char*, int) {
  HS().used = true;
  ++S().actions;
  HopperThread& t = HS().th[S().cur->linear];
  t.groups.push_back(std::move(t.open));
  t.open.clear();
}

// Retires one pending wgmma of thread `tid`.
inline void wgmma_retire(int tid, const WgPending& p, const char* file, int line) {
  HopperState& h = HS();
  HopperThread& t = h.th[tid];
  AccState& a = t.accs[p.acc];
  for (int i = 0; i < a.n; ++i)
    if (a.d[i] != a.left[i])
      fail("wgmma-accumulator",
           thread_desc(tid) + " changed accumulator register d[" + std::to_string(i) + "] of the wgmma issued at " +
               where(a.file, a.line) + " before the wgmma_wait_group at " + where(file, line) +
               " that retires it: the registers belong to the wgmma until then");
  // The operand reads are over for everyone once every thread of the warpgroup has retired the wgmma: a
  // write ordered after only some threads' waits (a stage released before the wait) still races with it.
  WgOp& op = h.ops[p.op];
  if (--op.refs == 0 && !op.reads_cleared) {
    op.reads_cleared = true;
    if (S().opt.race_check)
      for (uint8_t* b : op.bytes)
        for (int i = 0; i < 16; ++i) {
          Shadow* sd = shadow_of(b + i);
          if (sd->a_count > 0) --sd->a_count;
        }
    std::vector<uint8_t*>().swap(op.bytes);
  }
  if (--a.pending == 0) {
    for (int i = 0; i < a.n; ++i) a.d[i] = a.value[i];
    a.left = a.value;
    a.fence_at_land = t.fences;
  }
}

inline void wgmma_wait(int n, const char* file, int line) {
  HS().used = true;
  ++S().actions;
  const int tid = S().cur->linear;
  yield_here();  // let the other threads run up to here: async work overlapping them shows
  HopperThread& t = HS().th[tid];
  while (static_cast<int>(t.groups.size()) > n) {
    for (const WgPending& p : t.groups.front()) wgmma_retire(tid, p, file, line);
    t.groups.pop_front();
  }
}

// Decodes a shared-memory matrix descriptor and returns the host address of every 16-byte chunk of a
// K-major operand of `rows` rows x 32 bytes: chunks[r * 2 + c] is row r, bytes [16c, 16c + 16).
inline void decode_operand(uint64_t desc, int rows, const char* which, int tid, const char* file, int line,
                           std::vector<uint8_t*>& chunks) {
  auto bad = [&](const std::string& why) {
    fail("wgmma-descriptor", thread_desc(tid) + ": the wgmma at " + where(file, line) + ": descriptor of " + which +
                                 " (0x" + [&] {
                                   char buf[20];
                                   std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(desc));
                                   return std::string(buf);
                                 }() + ") " + why);
  };
  const uint64_t reserved = desc & ~((0x3FFFull) | (0x3FFFull << 16) | (0x3FFFull << 32) | (7ull << 49) | (3ull << 62));
  if (reserved) bad("has bits set outside its fields (start, LBO, SBO, base offset, layout): not a descriptor?");
  const uint32_t start = static_cast<uint32_t>(desc & 0x3FFF) << 4;
  const uint32_t lbo = static_cast<uint32_t>((desc >> 16) & 0x3FFF) << 4;
  const uint32_t sbo = static_cast<uint32_t>((desc >> 32) & 0x3FFF) << 4;
  const uint32_t base_offset = static_cast<uint32_t>((desc >> 49) & 7);
  const int layout = static_cast<int>(desc >> 62);
  const int bits = layout == 1 ? 3 : layout == 2 ? 2 : layout == 3 ? 1 : 0;  // 128B, 64B, 32B, none
  if (base_offset != 0) bad("has a nonzero base offset, which the emulator does not model");
  const uint32_t width = bits ? (16u << bits) : 0;  // bytes per swizzled row
  if (bits && ((start >> 7) & ((1u << bits) - 1)) != 0)
    fail("misaligned", thread_desc(tid) + ": the wgmma at " + where(file, line) + ": the " +
                           std::to_string(width) + "-byte-swizzled " + which + " starts at shared window address " +
                           std::to_string(start) + ", whose swizzle-pattern bits [7, " + std::to_string(7 + bits) +
                           ") are not zero: the swizzle is a function of the absolute address, so the tile must "
                           "start " + std::to_string(8 * width) + "-byte aligned (plus its K offset within a row)");
  chunks.resize(static_cast<size_t>(rows) * 2);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < 2; ++c) {
      uint32_t lin;
      if (bits == 0) lin = start + (r % 8) * 16 + (r / 8) * sbo + c * lbo;  // 8x16-byte core matrices
      else lin = start + (r % 8) * width + (r / 8) * sbo + c * 16;          // rows of `width` bytes
      const uint32_t a = swizzle_address(lin, bits);
      if (a % 16 != 0) bad("does not address 16-byte aligned chunks");
      chunks[static_cast<size_t>(r) * 2 + c] = window_byte(a, 16, tid, "wgmma operand read", file, line);
    }
}

// Every check on a shared operand byte an async-proxy wgmma reads.
inline void check_operand_chunk(uint8_t* b, int tid, const char* which, const char* file, int line) {
  if (!S().opt.race_check) return;
  for (int i = 0; i < 16; ++i) {
    Shadow& sd = *shadow_of(b + i);
    auto head = [&] {
      SharedState& sh = SH();
      const bool dyn = b >= sh.dyn.base && b < sh.dyn.base + kMaxSharedBytes;
      return "the wgmma at " + where(file, line) + " (warpgroup of " + thread_desc(tid) + ") reads " +
             (dyn ? "dynamic" : "static") + " shared byte " +
             std::to_string(static_cast<size_t>(b + i - (dyn ? sh.dyn.base : sh.stat.base))) + " of " + which;
    };
    if (sd.p_tid >= 0)
      fail(sd.p_kind == kFlightTma ? "tma-in-flight" : "cp-async-in-flight",
           head() + " while the " + (sd.p_kind == kFlightTma ? "TMA load" : "cp.async") + " that " +
               thread_desc(sd.p_tid) + " issued at " + where(sd.p_file, sd.p_line) +
               " to it is in flight (its mbarrier phase / cp.async group is not complete: a wrong wait parity, "
               "an expect_tx that does not cover it, or a missing wait)");
    if (sd.w_epoch < SH().block_epoch)
      fail("shared-unwritten", head() + ", which nothing has written in this block (read before its TMA load was "
                                        "issued or waited for?)");
    if (sd.w_tid >= 0 && SH().proxy_fences[sd.w_tid] <= sd.w_fence)
      fail("proxy-fence", head() + ", which " + thread_desc(sd.w_tid) + " wrote with a generic-proxy store at " +
                              where(sd.w_file, sd.w_line) + " and did not follow with fence_proxy_async_shared: "
                              "the wgmma (async proxy) may not see the write");
    if (sd.w_tid >= 0 && sd.w_epoch == S().epoch && sd.w_tid / 128 != tid / 128)
      fail("race", head() + ", which " + thread_desc(sd.w_tid) + " of another warpgroup wrote at " +
                       where(sd.w_file, sd.w_line) + " with no __syncthreads between");
  }
}

inline void wgmma_s8(int n, int32_t* d, uint64_t desc_a, const uint32_t* a_regs, uint64_t desc_b, bool accumulate,
                     const char* file, int line) {
  State& s = S();
  HopperState& h = HS();
  h.used = true;
  ++S().actions;
  const int tid = s.cur->linear;
  WgSlot& w = wg_arrive(a_regs ? "wgmma.mma_async.s8 (register A)" : "wgmma.mma_async.s8", file, line);
  const int l = tid % 128;
  if (w.arrived == 0) {
    w.n = n;
    w.rs = a_regs != nullptr;
    w.desc_a = desc_a;
    w.desc_b = desc_b;
  } else if (w.n != n || w.desc_b != desc_b || (!w.rs && w.desc_a != desc_a)) {
    fail("divergent-collective", thread_desc(tid) + ": the wgmma at " + where(file, line) +
                                     " gets a different shape or descriptor than the rest of its warpgroup: the "
                                     "descriptors and N must be warpgroup-uniform");
  }
  w.d[l] = d;
  w.accumulate[l] = accumulate;
  if (a_regs)
    for (int i = 0; i < 4; ++i) w.a[l][i] = a_regs[i];
  wg_complete(w, [&](WgSlot& w) {
    const int base = (tid / 128) * 128;
    // Operands. A[64][32], B[n][32] (K-major: B's row j is column j of the math B).
    int8_t A[64][32], B[256][32];
    std::vector<uint8_t*> ca, cb;
    WgOp op;
    decode_operand(w.desc_b, w.n, "B", base, file, line, cb);
    for (int r = 0; r < w.n; ++r)
      for (int c = 0; c < 2; ++c) {
        uint8_t* p = cb[static_cast<size_t>(r) * 2 + c];
        check_operand_chunk(p, base, "B", file, line);
        std::memcpy(&B[r][16 * c], p, 16);
        op.bytes.push_back(p);
      }
    if (!w.rs) {
      decode_operand(w.desc_a, 64, "A", base, file, line, ca);
      for (int r = 0; r < 64; ++r)
        for (int c = 0; c < 2; ++c) {
          uint8_t* p = ca[static_cast<size_t>(r) * 2 + c];
          check_operand_chunk(p, base, "A", file, line);
          std::memcpy(&A[r][16 * c], p, 16);
          op.bytes.push_back(p);
        }
    } else {
      // Register A: thread 32w + 4g + t holds a_j (byte j % 4 of a[j / 4]) at row 16w + g + 8 ((j >> 2) & 1),
      // col 4t + (j & 3) + 16 (j >> 3).
      for (int lt = 0; lt < 128; ++lt) {
        const int wi = lt / 32, g = (lt % 32) / 4, t4 = lt % 4;
        for (int j = 0; j < 16; ++j)
          A[16 * wi + g + 8 * ((j >> 2) & 1)][4 * t4 + (j & 3) + 16 * (j >> 3)] =
              static_cast<int8_t>((w.a[lt][j / 4] >> (8 * (j % 4))) & 0xff);
      }
    }
    if (s.opt.race_check)
      for (uint8_t* p : op.bytes)
        for (int i = 0; i < 16; ++i) {
          Shadow* sd = shadow_of(p + i);
          ++sd->a_count;
          sd->a_tid = base;
          sd->a_file = file;
          sd->a_line = line;
        }
    op.refs = 128;
    h.ops.push_back(std::move(op));
    const int op_index = static_cast<int>(h.ops.size()) - 1;
    // Accumulators: d[i] of thread 32w + 4g + t is row 16w + g + 8 ((i >> 1) & 1), col 8 (i >> 2) + 2t + (i & 1).
    for (int lt = 0; lt < 128; ++lt) {
      const int th = base + lt;
      HopperThread& t = h.th[th];
      if (t.fences == 0)
        fail("wgmma-fence", thread_desc(th) + " issues the wgmma at " + where(file, line) +
                                " with no wgmma_fence before it (required before a thread's first wgmma)");
      int ai = -1;
      for (size_t k = 0; k < t.accs.size(); ++k)
        if (t.accs[k].d == w.d[lt] && t.accs[k].n == w.n / 2) ai = static_cast<int>(k);
      if (ai < 0) {
        AccState a;
        a.d = w.d[lt];
        a.n = w.n / 2;
        a.fence_at_land = 0;
        t.accs.push_back(a);
        ai = static_cast<int>(t.accs.size()) - 1;
      }
      AccState& a = t.accs[ai];
      const bool fresh = a.value.empty();
      std::vector<int32_t> base_val(a.n, 0);
      if (a.pending > 0)
        for (int i = 0; i < a.n; ++i)
          if (a.d[i] != a.left[i])
            fail("wgmma-accumulator", thread_desc(th) + " changed accumulator register d[" + std::to_string(i) +
                                          "] of the wgmma issued at " + where(a.file, a.line) +
                                          " while it is in flight (before the wgmma_wait_group that retires it); "
                                          "seen at the wgmma at " + where(file, line));
      if (w.accumulate[lt]) {
        if (a.pending > 0) {
          base_val = a.value;  // chained: accumulate onto the newest wgmma's result, in order
        } else {
          for (int i = 0; i < a.n; ++i) base_val[i] = a.d[i];
          if (!fresh && t.fences == a.fence_at_land)
            for (int i = 0; i < a.n; ++i)
              if (a.d[i] != a.left[i])
                fail("wgmma-fence", thread_desc(th) + " changed accumulator register d[" + std::to_string(i) +
                                        "] after the wgmma issued at " + where(a.file, a.line) +
                                        " landed, and issues the wgmma at " + where(file, line) +
                                        " accumulating into it with no wgmma_fence between");
        }
      }
      const int wi = lt / 32, g = (lt % 32) / 4, t4 = lt % 4;
      a.value.assign(a.n, 0);
      for (int i = 0; i < a.n; ++i) {
        const int row = 16 * wi + g + 8 * ((i >> 1) & 1), col = 8 * (i >> 2) + 2 * t4 + (i & 1);
        uint32_t acc = static_cast<uint32_t>(base_val[i]);  // s32 wraps: accumulate in uint32
        for (int k = 0; k < 32; ++k) acc += static_cast<uint32_t>(int32_t{A[row][k]} * int32_t{B[col][k]});
        a.value[i] = static_cast<int32_t>(acc);
      }
      a.left.assign(a.n, kWgmmaPoison);
      if (s.opt.async_landing == AsyncLanding::Issue) a.left = a.value;
      for (int i = 0; i < a.n; ++i) a.d[i] = a.left[i];
      ++a.pending;
      a.file = file;
      a.line = line;
      t.open.push_back({op_index, ai});
    }
  });
}

}  // namespace ditq::emu

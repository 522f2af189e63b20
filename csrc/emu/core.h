// The SIMT emulator's core: CUDA threads as cooperative fibers, blocks one after another, __syncthreads,
// error reports, knobs, and the launch. Host-only (g++); see csrc/README.md for how to use it.
//
// ---- Fibers -----------------------------------------------------------------------------------------------
// Each CUDA thread of a block runs on its own stack (a "fiber"). Fibers are created once with makecontext and
// entered once with swapcontext; after that every switch is _setjmp/_longjmp, which saves a few registers and
// makes no system call (swapcontext saves the signal mask with a syscall per switch: 4-30x slower).
// A fiber runs until it blocks (a block barrier or a warp collective) or returns; the scheduler (the
// launching OS thread, on its own stack) then resumes the next runnable fiber in the configured order. There
// is no preemption: the interleavings explored are the orders in which blocked fibers are resumed, which is
// exactly where correct kernels must not care and racy kernels do.
// _longjmp across stacks is what glibc's fortified longjmp (__longjmp_chk) rejects: compile with
// -U_FORTIFY_SOURCE (setup.py does).
//
// ---- Errors -----------------------------------------------------------------------------------------------
// A kernel error (deadlock, race, bad shared address...) must not unwind through a fiber's stack: C++
// exceptions cannot cross the stack switch. So fail() records the report and jumps back to the scheduler,
// which abandons every fiber of the launch (their stacks are re-initialised at the next launch) and throws
// ditq::emu::Error from the launching context; torch turns it into a Python RuntimeError.
#pragma once

#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <mutex>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "types.h"

namespace ditq::emu {

// ---- knobs ------------------------------------------------------------------------------------------------
enum class Order : int { Forward = 0, Reverse = 1, Random = 2 };
// When cp.async data lands in shared memory: at issue (eager), when a cp.async.wait_group retires its group
// (lazy, the latest a correct kernel may see it), or at the first block barrier after issue if that comes
// before the retiring wait.
enum class CpAsync : int { Issue = 0, Wait = 1, Barrier = 2 };

// Which kernels the launchers pick (emulated GEMM launchers read it): the sm_80 mma.sync kernels, or the
// sm_90a wgmma / TMA / mbarrier ones.
enum class Arch : int { Sm80 = 0, Sm90a = 1 };
// When Hopper async work lands: TMA bytes in shared memory (and their complete_tx on the mbarrier), wgmma
// results in the accumulators. Issue: at once. Wait (lazy): TMA bytes when a thread first waits on (or
// try_waits) the barrier they complete on, wgmma results at the wgmma.wait_group that retires their group --
// the latest a correct kernel may see them.
enum class AsyncLanding : int { Issue = 0, Wait = 1 };

struct Options {
  Order order = Order::Forward;
  uint64_t seed = 0;
  CpAsync cp_async = CpAsync::Wait;
  Arch arch = Arch::Sm80;
  AsyncLanding async_landing = AsyncLanding::Wait;
  bool race_check = false;  // shadow-memory race checker (and in-flight cp.async checks): on in the tests
  bool mem_check = true;    // global-memory checker (emu/global.h): bounds, read-only, unwritten reads
};

// The process-wide options the emulated launchers use (set from Python: ditq.emulator.emulator_options).
inline Options& global_options() {
  static Options o;
  return o;
}

// ---- errors -----------------------------------------------------------------------------------------------
// kind: "deadlock", "divergent-barrier", "divergent-collective", "partial-warp", "shared-address",
// "shared-unwritten", "misaligned", "race", "cp-async-in-flight", "global-address", "global-read-only",
// "global-unwritten", "kernel-exception", "config"; Hopper (emu/hopper.h): "mbarrier", "tma-in-flight",
// "tma-pending", "proxy-fence", "wgmma-fence", "wgmma-pending", "wgmma-accumulator", "wgmma-descriptor".
class Error : public std::runtime_error {
 public:
  Error(std::string kind, const std::string& what) : std::runtime_error(what), kind_(std::move(kind)) {}
  const std::string& kind() const { return kind_; }

 private:
  std::string kind_;
};

// Source locations reach the emulator through default arguments (__builtin_FILE / __builtin_LINE are
// evaluated at the call site); only the file's base name is printed.
inline const char* base_name(const char* file) {
  const char* s = std::strrchr(file, '/');
  return s ? s + 1 : file;
}
inline std::string where(const char* file, int line) {
  return std::string(base_name(file)) + ":" + std::to_string(line);
}

// ---- per-thread and per-block state ------------------------------------------------------------------------
enum class Run : int { Idle, Runnable, Blocked, Exited };
enum class Wait : int { None, Barrier, Collective, Mbarrier };

struct CpCopy {
  uint8_t* dst;
  uint8_t data[16];
  const char* file;
  int line;
  bool landed;
};

struct Thread {
  jmp_buf jb;
  Run state = Run::Idle;
  bool fiber_ready = false;  // its fiber sits in fiber_main's idle loop, ready for a job
  void* stack = nullptr;
  ucontext_t uc;
  uint3 tid{0, 0, 0};
  int linear = 0, warp = 0, lane = 0;
  Wait waiting = Wait::None;
  bool spinning = false;  // yielded from a try_wait that failed: no progress until someone else moves
  const char* wait_file = "";
  int wait_line = 0;
  const char* wait_what = "";
  int shared_decl = 0;                         // index of its next DITQ_SHARED declaration
  std::vector<CpCopy> open_group;              // cp.async issued since the last commit
  std::deque<std::vector<CpCopy>> groups;      // committed, not yet retired by a wait_group
};

struct State {
  std::mutex launch_mutex;  // one emulated launch at a time: the state below is global
  std::vector<Thread> threads;
  Thread* cur = nullptr;    // the running fiber (threadIdx reads it)
  Thread* init_thread = nullptr;
  jmp_buf sched_jb;
  Options opt;
  uint3 block_idx{0, 0, 0};
  dim3 block_dim, grid_dim;
  int nthreads = 0;
  // block barrier
  int bar_arrived = 0;
  const char* bar_file = "";
  int bar_line = 0;
  int exited = 0;
  uint64_t epoch = 1;       // advanced at each block start and barrier: the race checker's clock
  // the job every fiber of the current block runs
  void (*job)(void*) = nullptr;
  void* job_arg = nullptr;
  // a failure inside a fiber, reported from the scheduler
  bool failed = false;
  std::string fail_kind, fail_msg;
  std::string kernel;  // the kernel's name, when the launcher gave one (launch_checked): for reports
  uint64_t actions = 0;  // bumped by every memory access, barrier and async operation: tells a thread that
                         // only spun on a failed try_wait (no progress) from one that did something
};

inline State& S() {
  static State s;
  return s;
}

inline std::string thread_name(const uint3& t) {
  return "(" + std::to_string(t.x) + "," + std::to_string(t.y) + "," + std::to_string(t.z) + ")";
}
inline uint3 tid_of(int linear) {
  const dim3& b = S().block_dim;
  return {static_cast<unsigned>(linear % b.x), static_cast<unsigned>(linear / b.x % b.y),
          static_cast<unsigned>(linear / (b.x * b.y))};
}
inline std::string block_name() {
  const std::string& k = S().kernel;
  return "block " + thread_name(S().block_idx) + (k.empty() ? "" : " of kernel " + k);
}
inline std::string thread_desc(int linear) { return "thread " + thread_name(tid_of(linear)); }

// Report an error found inside a kernel. From a fiber: record, jump to the scheduler (never unwind).
[[noreturn]] inline void fail(const std::string& kind, const std::string& msg) {
  State& s = S();
  std::string full = "ditq emulator [" + kind + "] in " + block_name() + ": " + msg;
  if (s.cur == nullptr) throw Error(kind, full);
  s.failed = true;
  s.fail_kind = kind;
  s.fail_msg = full;
  _longjmp(s.sched_jb, 1);
}

// ---- fibers -----------------------------------------------------------------------------------------------
constexpr size_t kStackBytes = 256 * 1024;  // reserved, not committed: pages are touched only when used

// Runs in the fiber. Resumed with a job: run it, mark the thread exited, go back to idle.
inline void fiber_main() {
  State& s = S();
  Thread* const t = s.init_thread;
  for (;;) {
    if (!_setjmp(t->jb)) _longjmp(s.sched_jb, 1);  // idle: hand control back until given a job
    const char* err = nullptr;
    std::string err_text;
    try {
      s.job(s.job_arg);
    } catch (const std::exception& e) {  // never let an exception unwind across the fiber boundary
      err_text = e.what();
      err = "kernel-exception";
    }
    if (err) fail(err, "thread " + thread_name(t->tid) + " threw: " + err_text);
    t->state = Run::Exited;
    t->waiting = Wait::None;
    ++s.exited;
  }
}

inline void init_fiber(Thread& t) {
  State& s = S();
  if (!t.stack) {
    const long page = sysconf(_SC_PAGESIZE);
    void* mem = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) throw Error("config", "ditq emulator: cannot map a fiber stack");
    mprotect(mem, page, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting memory
    t.stack = mem;
  }
  const long page = sysconf(_SC_PAGESIZE);
  getcontext(&t.uc);
  t.uc.uc_stack.ss_sp = static_cast<char*>(t.stack) + page;
  t.uc.uc_stack.ss_size = kStackBytes;
  t.uc.uc_link = nullptr;
  makecontext(&t.uc, fiber_main, 0);
  s.init_thread = &t;
  ucontext_t here;
  if (!_setjmp(s.sched_jb)) swapcontext(&here, &t.uc);  // the fiber _longjmps back once it is idle
  t.fiber_ready = true;
}

// Scheduler side: run fiber t until it blocks, returns or fails.
__attribute__((noinline)) inline void resume(Thread& t) {
  State& s = S();
  s.cur = &t;
  if (!_setjmp(s.sched_jb)) _longjmp(t.jb, 1);
  s.cur = nullptr;
}

// Fiber side: block until someone makes this thread runnable again.
inline void block_here(Wait why, const char* what, const char* file, int line) {
  State& s = S();
  Thread& t = *s.cur;
  t.state = Run::Blocked;
  t.waiting = why;
  t.wait_what = what;
  t.wait_file = file;
  t.wait_line = line;
  if (!_setjmp(t.jb)) _longjmp(s.sched_jb, 1);
  t.waiting = Wait::None;
}

// Fiber side: let the other runnable threads run first (a scheduling point that is not a wait): at
// try_wait (a kernel may spin on it) and wgmma.wait_group (where a warpgroup's async work meets the rest).
// A spinning yield (a failed try_wait) is not progress: a round in which every runnable thread only spins
// is a deadlock (reported with the spin's what / line, set by the caller).
inline void yield_here(bool spinning = false) {
  State& s = S();
  Thread& t = *s.cur;
  t.state = Run::Runnable;
  t.spinning = spinning;
  if (!_setjmp(t.jb)) _longjmp(s.sched_jb, 1);
  t.spinning = false;
}

inline void release(Thread& t) {
  t.state = Run::Runnable;
}

// "threads 0-31, 64" (linear ids) for reports.
inline std::string id_ranges(const std::vector<int>& ids) {
  std::string out;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (!out.empty()) out += ", ";
    out += std::to_string(ids[i]);
    if (j > i) out += "-" + std::to_string(ids[j]);
    i = j + 1;
  }
  return out;
}

// Hooks implemented by shared.h / cp_async.h / warp.h / hopper.h.
inline void hopper_begin_block();
inline void hopper_end_block();
inline void hopper_clear_marks();
inline bool hopper_drain();
inline std::string mbar_wait_detail(int tid);
inline void shared_begin_block();
inline void cp_async_land_all_at_barrier();
inline void cp_async_end_block();
inline void warps_begin_block();

// ---- __syncthreads ----------------------------------------------------------------------------------------
// Every thread of the block must reach the same barrier: threads at two different __syncthreads, or some
// threads returned while others wait, is reported (CUDA calls both undefined; on a GPU they hang or pass by
// luck depending on the architecture).
inline void syncthreads(const char* file, int line) {
  State& s = S();
  ++s.actions;
  Thread& t = *s.cur;
  if (s.bar_arrived == 0) {
    s.bar_file = file;
    s.bar_line = line;
  } else if (s.bar_line != line || std::strcmp(s.bar_file, file) != 0) {
    fail("divergent-barrier", thread_desc(t.linear) + " reached __syncthreads at " + where(file, line) +
                                  " while other threads wait at __syncthreads at " + where(s.bar_file, s.bar_line) +
                                  ": all threads of a block must meet at the same barrier");
  }
  if (++s.bar_arrived < s.nthreads) {
    block_here(Wait::Barrier, "__syncthreads", file, line);
    return;
  }
  // Last to arrive: open the barrier.
  s.bar_arrived = 0;
  if (s.opt.cp_async == CpAsync::Barrier) cp_async_land_all_at_barrier();
  ++s.epoch;
  for (int i = 0; i < s.nthreads; ++i)
    if (s.threads[i].waiting == Wait::Barrier) release(s.threads[i]);
}

inline void deadlock_report() {
  State& s = S();
  struct Site {
    std::string what;
    std::vector<int> ids;
  };
  std::vector<Site> sites;
  std::vector<int> exited;
  for (int i = 0; i < s.nthreads; ++i) {
    const Thread& t = s.threads[i];
    if (t.state == Run::Exited) {
      exited.push_back(i);
      continue;
    }
    std::string w = std::string(t.wait_what) + " at " + where(t.wait_file, t.wait_line);
    if (t.waiting == Wait::Collective) w += " (warp " + std::to_string(t.warp) + ")";
    if (t.waiting == Wait::Mbarrier) w += mbar_wait_detail(i);
    auto it = std::find_if(sites.begin(), sites.end(), [&](const Site& x) { return x.what == w; });
    if (it == sites.end()) sites.push_back({w, {i}});
    else it->ids.push_back(i);
  }
  std::string msg = "no thread can make progress (linear thread ids): ";
  for (size_t i = 0; i < sites.size(); ++i)
    msg += (i ? "; " : "") + std::string("threads ") + id_ranges(sites[i].ids) + " wait at " + sites[i].what;
  if (!exited.empty())
    msg += "; threads " + id_ranges(exited) + " have returned (a thread that returns never reaches a later "
           "barrier or collective)";
  s.cur = nullptr;
  fail("deadlock", msg);
}

// Runs all threads of the current block to completion.
inline void run_block(std::mt19937_64& rng) {
  State& s = S();
  const int n = s.nthreads;
  s.bar_arrived = 0;
  s.exited = 0;
  ++s.epoch;
  shared_begin_block();
  warps_begin_block();
  hopper_begin_block();
  for (int i = 0; i < n; ++i) {
    Thread& t = s.threads[i];
    if (!t.fiber_ready) init_fiber(t);
    t.tid = tid_of(i);
    t.linear = i;
    t.warp = i / 32;
    t.lane = i % 32;
    t.waiting = Wait::None;
    t.spinning = false;
    t.shared_decl = 0;
    t.open_group.clear();
    t.groups.clear();
    t.state = Run::Runnable;
  }
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = s.opt.order == Order::Reverse ? n - 1 - i : i;
  while (s.exited < n) {
    if (s.opt.order == Order::Random) std::shuffle(order.begin(), order.end(), rng);
    bool progressed = false;
    for (int i : order) {
      Thread& t = s.threads[i];
      if (t.state != Run::Runnable) continue;
      const uint64_t actions = s.actions;
      resume(t);
      if (s.failed) return;
      if (!t.spinning || s.actions != actions) progressed = true;
    }
    if (!progressed) {
      if (hopper_drain()) continue;  // in-flight TMA bytes land when nothing else can run
      deadlock_report();             // throws from the scheduler's context
    }
  }
  hopper_end_block();
  if (s.failed) return;
  cp_async_end_block();
}

// Launch `kernel(args...)` on grid x block threads with `dynamic_smem` bytes of dynamic shared memory.
// Throws ditq::emu::Error (kernel errors) or std::invalid_argument (bad configuration).
template <class Kernel, class... Args>
void launch(dim3 grid, dim3 block, size_t dynamic_smem, const Options& opt, Kernel kernel, Args... args);

}  // namespace ditq::emu

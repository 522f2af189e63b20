// cp.async (16-byte global -> shared copies) in the emulator: per-thread commit groups, wait_group, and the
// three landing modes of Options::cp_async. Host-only.
//
// A copy reads global memory when it is issued (the kernel's inputs do not change during a launch) and
// writes shared memory when it lands: at issue, at the wait_group that retires its group, or at the first
// __syncthreads after issue if that is earlier (CpAsync). Until its group is retired the destination is
// "in flight" for the race checker. A retired copy counts as a write by the issuing thread at the retiring
// wait: other threads may read it only after a __syncthreads, as on the GPU.
#pragma once

#include "global.h"
#include "shared.h"

namespace ditq::emu {

inline void land(CpCopy& c) {
  if (!c.landed) std::memcpy(c.dst, c.data, 16);
  c.landed = true;
}

inline void cp_async_issue(void* smem, const void* gmem, bool pred, const char* file, int line) {
  State& s = S();
  Thread& t = *s.cur;
  shared_access(smem, 16, 16, true, t.linear, "cp.async", file, line);  // a write that may race
  CpCopy c;
  c.dst = static_cast<uint8_t*>(smem);
  c.file = file;
  c.line = line;
  c.landed = false;
  if (pred) {
    global_access(gmem, 16, false, "cp.async", file, line);  // before the copy: never read past a buffer
    check_align(gmem, 16, t.linear, "cp.async", "global", file, line);
    std::memcpy(c.data, gmem, 16);
  } else {
    std::memset(c.data, 0, 16);  // src-size 0: the 16 bytes are zero-filled, global is not read
  }
  set_in_flight(smem, 16, t.linear, file, line);
  if (s.opt.cp_async == CpAsync::Issue) land(c);
  t.open_group.push_back(c);
}

inline void cp_async_commit() {
  Thread& t = *S().cur;
  t.groups.push_back(std::move(t.open_group));  // an empty group is legal (and common in pipelines)
  t.open_group.clear();
}

// cp.async.wait_group n: every committed group but the newest n is complete.
inline void cp_async_wait(int n, const char* file, int line) {
  Thread& t = *S().cur;
  while (static_cast<int>(t.groups.size()) > n) {
    for (CpCopy& c : t.groups.front()) {
      land(c);
      clear_in_flight(c.dst, 16);
      shadow_access(locate(c.dst, 16, t.linear, "cp.async", file, line), c.dst, 16, true, t.linear,
                    "cp.async landing", c.file, c.line);
    }
    t.groups.pop_front();
  }
}

// CpAsync::Barrier: everything issued so far in the block lands at this barrier (still in flight).
inline void cp_async_land_all_at_barrier() {
  State& s = S();
  for (int i = 0; i < s.nthreads; ++i) {
    Thread& t = s.threads[i];
    for (CpCopy& c : t.open_group) land(c);
    for (auto& g : t.groups)
      for (CpCopy& c : g) land(c);
  }
}

// Copies never waited for are dropped with the block (harmless on a GPU: the data is never read).
inline void cp_async_end_block() {
  State& s = S();
  for (int i = 0; i < s.nthreads; ++i) {
    Thread& t = s.threads[i];
    for (CpCopy& c : t.open_group) clear_in_flight(c.dst, 16);
    for (auto& g : t.groups)
      for (CpCopy& c : g) clear_in_flight(c.dst, 16);
    t.open_group.clear();
    t.groups.clear();
  }
}

}  // namespace ditq::emu

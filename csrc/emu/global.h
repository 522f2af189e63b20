// Global memory in the emulator: the CPU twin of compute-sanitizer's memcheck. Host-only.
//
// A launcher registers every global buffer it passes to a kernel (emu::launch_checked: pointer, extent in
// bytes, name, access). Every global access that goes through ditq::ptx (ld_global / st_global,
// ld_global_16, cp_async_16, ld_cg, atomic_add_gpu) is then checked, when Options::mem_check is on, for:
//   * global-address:   bytes outside every registered buffer (one row past A, a scale index past N...).
//                       On a GPU such a read returns a neighbour's bytes or faults; here the access is
//                       reported before it is made.
//   * global-read-only: a write to a buffer registered as an input.
//   * global-unwritten: a read of a byte of an output buffer that no thread has written in this launch
//                       (a split-K reduction reading a partial that was never stored, say). Outputs carry
//                       a written-byte map; an in/out buffer whose contents are valid at launch (zeroed
//                       counters) is registered as ReadWrite and has none.
// Reported as ditq::emu::Error with the kernel's name, the block, the thread, the source line and the
// buffer. A launch that registers no buffers (emu::launch) is not checked: the checker cannot tell a
// buffer's extent from a pointer. Plain C++ dereferences of global pointers are not seen either, so kernels
// access global memory through ptx:: only.
#pragma once

#include <string>
#include <vector>

#include "core.h"
#include "shared.h"

namespace ditq::emu {

enum class Access : int {
  ReadOnly,   // a kernel input
  Output,     // written by the kernel; its bytes are unwritten (unreadable) until a thread writes them
  ReadWrite,  // in/out, valid at launch (e.g. counters zeroed by the launcher)
};

// One buffer a launcher passes to a kernel.
struct GlobalBuffer {
  const void* ptr;
  size_t bytes;
  const char* name;
  Access access;
};

struct GlobalState {
  struct Buf {
    const uint8_t* base;
    size_t bytes;
    std::string name;
    Access access;
    std::vector<uint8_t> written;  // Output only: 1 per byte written in this launch
  };
  std::vector<Buf> bufs;
  std::string kernel;  // the launch's kernel name, for reports
  bool active = false;
  size_t last = 0;     // the buffer of the previous access: consecutive accesses mostly hit the same one
};

inline GlobalState& GL() {
  static GlobalState g;
  return g;
}

inline const char* access_name(Access a) {
  return a == Access::ReadOnly ? "read-only input" : (a == Access::Output ? "output" : "read-write buffer");
}

// Called by launch_checked under the launch mutex.
inline void global_begin_launch(const std::vector<GlobalBuffer>& bufs, const char* kernel, bool on) {
  GlobalState& g = GL();
  g.bufs.clear();
  g.kernel = kernel ? kernel : "";
  g.active = on;
  g.last = 0;
  if (!on) return;
  for (const GlobalBuffer& b : bufs) {
    if (b.ptr == nullptr || b.bytes == 0) continue;  // an absent optional input (no bias): never read
    GlobalState::Buf x{static_cast<const uint8_t*>(b.ptr), b.bytes, b.name, b.access, {}};
    if (b.access == Access::Output) x.written.assign(b.bytes, 0);
    g.bufs.push_back(std::move(x));
  }
}

inline void global_end_launch() {
  GlobalState& g = GL();
  g.active = false;
  g.bufs.clear();
  g.kernel.clear();
}

// "a ([0, 4096) bytes)" or the nearest buffer to an address outside all of them.
inline std::string nearest_buffer(const uint8_t* b) {
  const GlobalState& g = GL();
  std::string best;
  uint64_t dist = UINT64_MAX;
  for (const auto& x : g.bufs) {
    const uint8_t* end = x.base + x.bytes;
    uint64_t d;
    std::string rel;
    if (b >= end) {
      d = static_cast<uint64_t>(b - end);
      rel = std::to_string(d) + " bytes past the end of";
    } else {
      d = static_cast<uint64_t>(x.base - b);
      rel = std::to_string(d) + " bytes before the start of";
    }
    if (d < dist) {
      dist = d;
      best = rel + " `" + x.name + "` (" + std::to_string(x.bytes) + " bytes, " + access_name(x.access) + ")";
    }
  }
  return best.empty() ? "no buffer is registered" : best;
}

// The whole check of one global access of n bytes at p by the running thread. `what` names the instruction.
inline void global_access(const void* p, size_t n, bool write, const char* what, const char* file, int line) {
  ++S().actions;
  GlobalState& g = GL();
  if (!g.active) return;
  const uint8_t* b = static_cast<const uint8_t*>(p);
  const int tid = S().cur != nullptr ? S().cur->linear : 0;
  GlobalState::Buf* hit = nullptr;
  if (g.last < g.bufs.size() && b >= g.bufs[g.last].base && b < g.bufs[g.last].base + g.bufs[g.last].bytes) {
    hit = &g.bufs[g.last];
  } else {
    for (size_t i = 0; i < g.bufs.size(); ++i)
      if (b >= g.bufs[i].base && b < g.bufs[i].base + g.bufs[i].bytes) {
        hit = &g.bufs[i];
        g.last = i;
        break;
      }
  }
  // The report's head, built only on failure: this runs on every global access.
  auto head = [&] {
    return thread_desc(tid) + ": " + what + " (" + (write ? "write" : "read") + " of " + std::to_string(n) +
           " bytes) at " + where(file, line);
  };
  if (hit == nullptr)
    fail("global-address", head() + " uses address " + hex(p) + ", " + nearest_buffer(b));
  const size_t off = static_cast<size_t>(b - hit->base);
  if (off + n > hit->bytes)
    fail("global-address", head() + " touches bytes [" + std::to_string(off) + ", " + std::to_string(off + n) +
                               ") of `" + hit->name + "`, which has " + std::to_string(hit->bytes) + " bytes");
  if (write && hit->access == Access::ReadOnly)
    fail("global-read-only", head() + " writes bytes [" + std::to_string(off) + ", " + std::to_string(off + n) +
                                 ") of `" + hit->name + "`, a read-only input");
  if (hit->access != Access::Output) return;
  uint8_t* w = hit->written.data() + off;
  if (write) {
    std::memset(w, 1, n);
    return;
  }
  for (size_t i = 0; i < n; ++i)
    if (!w[i])
      fail("global-unwritten", head() + " reads byte " + std::to_string(off + i) + " of output `" + hit->name +
                                   "`, which no thread has written in this launch");
}

}  // namespace ditq::emu

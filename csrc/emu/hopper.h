// Hopper in the emulator: mbarrier, TMA (cp.async.bulk.tensor), the async-proxy fence, wgmma, setmaxnreg.
// Host-only; included by emu.h. (Work in progress: the twins below are stubs that report "not emulated".)
#pragma once

#include "core.h"
#include "global.h"
#include "shared.h"
#include "warp.h"

namespace ditq::ptx {
enum class TmaSwizzle : int;
}

namespace ditq::emu {

// The emulator's tensor map: what cuTensorMapEncodeTiled encodes, decoded (int8/uint8 elements, 2-D).
// Same size and alignment as CUtensorMap, so a kernel parameter has the same footprint on both sides.
struct alignas(64) TmaMap {
  uint64_t magic;  // kTmaMagic once built by make_tma_map_2d: anything else is an unbuilt map
  const uint8_t* base;
  uint64_t inner, outer, stride;  // elements, rows, bytes between rows
  uint32_t box_inner, box_outer;
  int swizzle;  // ptx::TmaSwizzle
  uint8_t pad_[128 - 52];
};
static_assert(sizeof(TmaMap) == 128, "TmaMap mirrors CUtensorMap's 128 bytes");
constexpr uint64_t kTmaMagic = 0x646974712d746d61ull;  // "ditq-tma"

[[noreturn]] inline void not_emulated(const char* what, const char* file, int line) {
  fail("config", std::string(what) + " at " + where(file, line) + " is not emulated yet");
}

inline uint32_t shared_window_address(const void* p, const char* what, const char* file, int line) {
  not_emulated(what, file, line);
}
inline void mbar_init(uint64_t*, uint32_t, const char* file, int line) { not_emulated("mbarrier.init", file, line); }
inline void mbar_fence_init(const char* file, int line) { not_emulated("fence.mbarrier_init", file, line); }
inline void mbar_arrive(uint64_t*, uint32_t, bool, const char* file, int line) {
  not_emulated("mbarrier.arrive", file, line);
}
inline bool mbar_try_wait(uint64_t*, uint32_t, const char* file, int line) {
  not_emulated("mbarrier.try_wait", file, line);
}
inline void mbar_wait(uint64_t*, uint32_t, const char* file, int line) { not_emulated("mbarrier.wait", file, line); }
inline void fence_proxy_async(const char* file, int line) { not_emulated("fence.proxy.async", file, line); }
inline void tma_load_2d(void*, const TmaMap*, int32_t, int32_t, uint64_t*, const char* file, int line) {
  not_emulated("cp.async.bulk.tensor", file, line);
}
inline void tma_check_map(const TmaMap*, const char* what, const char* file, int line) {
  not_emulated(what, file, line);
}
inline void wgmma_fence(const char* file, int line) { not_emulated("wgmma.fence", file, line); }
inline void wgmma_commit(const char* file, int line) { not_emulated("wgmma.commit_group", file, line); }
inline void wgmma_wait(int, const char* file, int line) { not_emulated("wgmma.wait_group", file, line); }
inline void wgmma_s8(int, int32_t*, uint64_t, const uint32_t*, uint64_t, bool, const char* file, int line) {
  not_emulated("wgmma.mma_async", file, line);
}
inline void setmaxnreg(bool, int, const char* file, int line) { not_emulated("setmaxnreg", file, line); }

}  // namespace ditq::emu

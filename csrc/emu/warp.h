// Warp collectives in the emulator: shfl.sync, ldmatrix, mma.sync, bar.warp.sync. Host-only.
//
// A collective is a warp barrier: each lane stores its operands and blocks; the last lane to arrive computes
// all 32 lanes' results at once -- from the PTX ISA's fragment layouts (the formulas are tested
// against a table transcribed from the ISA in tests/csrc/test_fragment_layouts.py) -- and releases the warp.
// All lanes of a warp must meet at the same collective (same instruction, same source line); a lane that has
// returned never arrives, which the scheduler reports as a deadlock naming the waiting lanes and the line.
// Every collective here is full-mask (all 32 lanes): a block whose size is not a multiple of 32 has a partial
// last warp, which is reported if it executes one.
#pragma once

#include "shared.h"

namespace ditq::emu {

struct WarpSlot {
  int arrived = 0;
  const char* what = "";
  const char* file = "";
  int line = 0;
  uint32_t in[32][10];
  uint32_t out[32][4];
  const void* ptr[32];
};

struct Warps {
  WarpSlot w[32];  // at most 1024 threads per block
};

inline Warps& WP() {
  static Warps w;
  return w;
}

inline void warps_begin_block() {
  for (WarpSlot& w : WP().w) w.arrived = 0;
}

// Arrival, part 1: checks; returns the warp's slot for the lane to store its operands in.
inline WarpSlot& arrive(const char* what, const char* file, int line) {
  State& s = S();
  ++s.actions;
  Thread& t = *s.cur;
  if ((t.warp + 1) * 32 > s.nthreads)
    fail("partial-warp", thread_desc(t.linear) + " executes " + what + " at " + where(file, line) + " in warp " +
                             std::to_string(t.warp) + ", which has only " + std::to_string(s.nthreads - 32 * t.warp) +
                             " threads (block size not a multiple of 32): a full-mask collective needs 32 lanes");
  WarpSlot& w = WP().w[t.warp];
  if (w.arrived == 0) {
    w.what = what;
    w.file = file;
    w.line = line;
  } else if (w.line != line || std::strcmp(w.what, what) != 0 || std::strcmp(w.file, file) != 0) {
    fail("divergent-collective", "lane " + std::to_string(t.lane) + " of warp " + std::to_string(t.warp) +
                                     " (" + thread_desc(t.linear) + ") is at " + what + " (" + where(file, line) +
                                     ") while other lanes of its warp wait at " + w.what + " (" +
                                     where(w.file, w.line) + "): all 32 lanes must meet at the same collective");
  }
  return w;
}

// Arrival, part 2: block until the warp is complete; the last lane runs `compute(slot)` for everyone.
template <class Compute>
inline void complete(WarpSlot& w, Compute&& compute) {
  State& s = S();
  Thread& t = *s.cur;
  if (++w.arrived < 32) {
    block_here(Wait::Collective, w.what, w.file, w.line);
    return;
  }
  compute(w);
  w.arrived = 0;
  ++SH().warp_sync[t.warp];  // orders the lanes of this warp for the race checker
  const int base = t.warp * 32;
  for (int l = 0; l < 32; ++l)
    if (s.threads[base + l].waiting == Wait::Collective) release(s.threads[base + l]);
}

// ---- shfl.sync.bfly.b32 (full mask, c = 0x1f) --------------------------------------------------------------
inline uint32_t shfl_bfly(uint32_t v, int lane_mask, const char* file, int line) {
  Thread& t = *S().cur;
  WarpSlot& w = arrive("shfl.sync.bfly", file, line);
  w.in[t.lane][0] = v;
  w.in[t.lane][1] = static_cast<uint32_t>(lane_mask);
  complete(w, [](WarpSlot& w) {
    for (int l = 0; l < 32; ++l) {
      const uint32_t j = static_cast<uint32_t>(l) ^ w.in[l][1];
      w.out[l][0] = j < 32 ? w.in[j][0] : w.in[l][0];  // a source lane past 31 returns the lane's own value
    }
  });
  return w.out[t.lane][0];
}

inline void syncwarp(const char* file, int line) {
  WarpSlot& w = arrive("__syncwarp", file, line);
  complete(w, [](WarpSlot&) {});
}

// ---- ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16 -------------------------------------------------
// Matrix j (8 rows of 16 bytes) takes its row addresses from lanes 8j..8j+7. Without .trans, lane l receives
// in register j the 4 bytes [4 (l % 4), +4) of row l / 4 of matrix j (two b16 elements, row l/4, columns
// 2 (l%4), 2 (l%4) + 1). With .trans it receives elements (row 2 (l%4), column l/4) and (row 2 (l%4) + 1,
// column l/4): the fragment of the transposed matrix.
inline void ldmatrix(uint32_t* r, int count, bool trans, const void* row, const char* file, int line) {
  Thread& t = *S().cur;
  WarpSlot& w = arrive(trans ? (count == 4 ? "ldmatrix.x4.trans" : count == 2 ? "ldmatrix.x2.trans"
                                                                               : "ldmatrix.x1.trans")
                             : (count == 4 ? "ldmatrix.x4" : count == 2 ? "ldmatrix.x2" : "ldmatrix.x1"),
                       file, line);
  w.ptr[t.lane] = row;
  w.in[t.lane][0] = static_cast<uint32_t>(count) | (trans ? 0x100u : 0u);
  const int base = t.warp * 32;
  complete(w, [&](WarpSlot& w) {
    const int cnt = static_cast<int>(w.in[0][0] & 0xff);
    const bool tr = (w.in[0][0] & 0x100u) != 0;
    for (int l = 0; l < 8 * cnt; ++l)  // only these lanes' addresses are used
      shared_access(w.ptr[l], 16, 16, false, base + l, w.what, w.file, w.line);
    for (int l = 0; l < 32; ++l) {
      for (int j = 0; j < cnt; ++j) {
        if (!tr) {
          std::memcpy(&w.out[l][j], static_cast<const uint8_t*>(w.ptr[8 * j + l / 4]) + 4 * (l % 4), 4);
        } else {
          uint16_t lo, hi;
          std::memcpy(&lo, static_cast<const uint8_t*>(w.ptr[8 * j + 2 * (l % 4)]) + 2 * (l / 4), 2);
          std::memcpy(&hi, static_cast<const uint8_t*>(w.ptr[8 * j + 2 * (l % 4) + 1]) + 2 * (l / 4), 2);
          w.out[l][j] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
        }
      }
    }
  });
  for (int j = 0; j < count; ++j) r[j] = w.out[t.lane][j];
}

// ---- mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 -------------------------------------------------------
// g = lane >> 2, t = lane % 4; four int8 per register, low byte first.
//   A 16x32 (row):  a_i, i < 16: row g if i < 4 or 8 <= i < 12, else g + 8; col 4t + (i & 3), + 16 if i >= 8
//   B 32x8 (col):   b_i, i < 8:  k 4t + (i & 3), + 16 if i >= 4; n = g
//   C, D 16x8 s32:  c_i, i < 4:  row g if i < 2, else g + 8; col 2t + (i & 1)
// The s32 accumulation wraps modulo 2^32 (no .satfinite), so it is done in uint32.
inline void mma_s8(int32_t* d, const uint32_t* a, const uint32_t* b, const int32_t* c, const char* file, int line) {
  Thread& t = *S().cur;
  WarpSlot& w = arrive("mma.m16n8k32.s8", file, line);
  uint32_t* in = w.in[t.lane];
  for (int i = 0; i < 4; ++i) in[i] = a[i];
  in[4] = b[0];
  in[5] = b[1];
  for (int i = 0; i < 4; ++i) in[6 + i] = static_cast<uint32_t>(c[i]);
  complete(w, [](WarpSlot& w) {
    int32_t A[16][32], B[32][8];
    uint32_t C[16][8];
    for (int l = 0; l < 32; ++l) {
      const int g = l >> 2, tg = l & 3;
      for (int i = 0; i < 16; ++i) {
        const int8_t v = static_cast<int8_t>((w.in[l][i / 4] >> (8 * (i % 4))) & 0xff);
        const int row = (i < 4 || (i >= 8 && i < 12)) ? g : g + 8;
        const int col = 4 * tg + (i & 3) + (i >= 8 ? 16 : 0);
        A[row][col] = v;
      }
      for (int i = 0; i < 8; ++i) {
        const int8_t v = static_cast<int8_t>((w.in[l][4 + i / 4] >> (8 * (i % 4))) & 0xff);
        B[4 * tg + (i & 3) + (i >= 4 ? 16 : 0)][g] = v;
      }
      for (int i = 0; i < 4; ++i) C[i < 2 ? g : g + 8][2 * tg + (i & 1)] = w.in[l][6 + i];
    }
    for (int l = 0; l < 32; ++l) {
      const int g = l >> 2, tg = l & 3;
      for (int i = 0; i < 4; ++i) {
        const int row = i < 2 ? g : g + 8, col = 2 * tg + (i & 1);
        uint32_t acc = C[row][col];
        for (int k = 0; k < 32; ++k) acc += static_cast<uint32_t>(A[row][k] * B[k][col]);
        w.out[l][i] = acc;
      }
    }
  });
  for (int i = 0; i < 4; ++i) d[i] = static_cast<int32_t>(w.out[t.lane][i]);
}

}  // namespace ditq::emu

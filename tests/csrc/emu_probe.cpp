// Test-only kernels for the SIMT emulator, built by tests/csrc/emu_probe.py with g++ into a small shared
// library (no torch) and called through ctypes:
//   * probes that expose one warp collective (mma, ldmatrix) with per-lane inputs and outputs, so the tests
//     can check the emulator against fragment tables transcribed from the PTX ISA;
//   * deliberately broken kernels, each with a `// @<name>` marker on the line the emulator must report,
//     and correct twins (the same kernel with the bug fixed) that must pass.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "ptx.cuh"

using namespace ditq;

namespace {

constexpr int kN = 64;  // threads of the broken kernels' blocks (two warps)

// ---- probes ------------------------------------------------------------------------------------------------
DITQ_GLOBAL void mma_probe(const uint32_t* a, const uint32_t* b, const int32_t* c, int32_t* d) {
  const int l = static_cast<int>(threadIdx.x);
  const uint32_t ar[4] = {a[4 * l], a[4 * l + 1], a[4 * l + 2], a[4 * l + 3]};
  const uint32_t br[2] = {b[2 * l], b[2 * l + 1]};
  const int32_t cr[4] = {c[4 * l], c[4 * l + 1], c[4 * l + 2], c[4 * l + 3]};
  int32_t dr[4];
  ptx::mma_m16n8k32_s8(dr, ar, br, cr);
  for (int i = 0; i < 4; ++i) d[4 * l + i] = dr[i];
}

// smem <- bytes[0, nbytes) (one thread), barrier, then every lane: ldmatrix from smem + offsets[lane].
DITQ_GLOBAL void ldmatrix_probe(const uint8_t* bytes, int nbytes, const int* offsets, int count, int trans,
                                uint32_t* out) {
  DITQ_DYNAMIC_SHARED(uint8_t, smem);
  const int l = static_cast<int>(threadIdx.x);
  if (l == 0)
    for (int i = 0; i < nbytes; ++i) ptx::st_shared(smem + i, bytes[i]);
  __syncthreads();
  uint32_t r[4] = {0, 0, 0, 0};
  const uint8_t* row = smem + offsets[l];
  if (trans) {  // no kernel uses .trans, so ptx.cuh has no wrapper: call the emulator's model directly
    emu::ldmatrix(r, count, true, row, __FILE__, __LINE__);
  } else if (count == 4) {
    uint32_t (&x)[4] = r;
    ptx::ldmatrix_x4(x, row);
  } else {
    uint32_t x[2];
    ptx::ldmatrix_x2(x, row);
    r[0] = x[0];
    r[1] = x[1];
  }
  for (int j = 0; j < 4; ++j) out[4 * l + j] = r[j];
}

// ---- a missing __syncthreads ---------------------------------------------------------------------------------
// Block sum: every thread stores its value, thread 0 adds them up. Without the barrier thread 0 may read
// slots not yet written (in forward order it runs first and sees the poison).
template <bool kBarrier>
DITQ_GLOBAL void block_sum(const int* in, int* out) {
  DITQ_SHARED(int, vals, kN);
  const int t = static_cast<int>(threadIdx.x);
  ptx::st_shared(&vals[t], in[t]);  // @missing_sync_write
  if (kBarrier) __syncthreads();
  if (t == 0) {
    int s = 0;
    for (int i = 0; i < kN; ++i) s += ptx::ld_shared(&vals[i]);  // @missing_sync_read
    *out = s;
  }
}

// ---- cp.async: waiting for one group too few ------------------------------------------------------------------
// Two 16-byte chunks per thread in two commit groups; the block then reads the second chunk. Correct:
// wait_group 0 (both groups). Broken: wait_group 1, which only guarantees the first group.
template <int kWait>
DITQ_GLOBAL void two_stage(const uint8_t* in, uint8_t* out) {
  DITQ_DYNAMIC_SHARED(uint8_t, smem);
  const int t = static_cast<int>(threadIdx.x);
  ptx::cp_async_16(smem + 16 * t, in + 16 * t, true);
  ptx::cp_async_commit();
  ptx::cp_async_16(smem + 16 * (kN + t), in + 16 * (kN + t), true);
  ptx::cp_async_commit();
  ptx::cp_async_wait<kWait>();
  __syncthreads();
  const int src = (t + 1) % kN;  // another thread's chunk: its landing must be complete and published
  const uint4 v = ptx::ld_shared(reinterpret_cast<const uint4*>(smem + 16 * (kN + src)));  // @early_wait_read
  std::memcpy(out + 16 * t, &v, 16);
}

// ---- a lane returns before a warp collective ------------------------------------------------------------------
template <bool kBug>
DITQ_GLOBAL void early_return(const float* in, float* out) {
  const int t = static_cast<int>(threadIdx.x);
  float v = in[t];
  if (kBug && t == 37) return;
  v += ptx::shfl_xor(v, 1);  // @early_return_shfl
  out[t] = v;
}

// ---- shared-memory races without a missing-barrier story --------------------------------------------------------
// Every thread writes one shared word (write-write race), or thread t writes a word thread t+1 read in the same
// barrier interval (read-write race). Fixed twins give each thread its own word / put a barrier between.
template <bool kBug>
DITQ_GLOBAL void write_write(int* out) {
  DITQ_SHARED(int, word, kN);
  const int t = static_cast<int>(threadIdx.x);
  ptx::st_shared(&word[kBug ? 0 : t], t);  // @ww_write
  __syncthreads();
  out[t] = ptx::ld_shared(&word[t]);
}

template <bool kBug>
DITQ_GLOBAL void read_write(int* out) {
  DITQ_SHARED(int, word, kN);
  const int t = static_cast<int>(threadIdx.x);
  ptx::st_shared(&word[t], t);
  __syncthreads();
  const int v = ptx::ld_shared(&word[(t + 1) % kN]);  // @rw_read
  if (!kBug) __syncthreads();
  ptx::st_shared(&word[t], v + 1);  // @rw_write
  out[t] = v;
}

// Lanes of one warp exchange through shared memory ordered by a warp collective: no race (no false positive).
DITQ_GLOBAL void warp_ordered(int* out) {
  DITQ_SHARED(int, word, kN);
  const int t = static_cast<int>(threadIdx.x);
  ptx::st_shared(&word[t], t * 3);
  __syncwarp();
  out[t] = ptx::ld_shared(&word[(t & ~31) | ((t + 1) & 31)]);
}

// ---- more reports ----------------------------------------------------------------------------------------------
DITQ_GLOBAL void divergent_barrier(int* out) {
  const int t = static_cast<int>(threadIdx.x);
  if (t < 16) {
    __syncthreads();  // @div_bar_a
  } else {
    __syncthreads();  // @div_bar_b
  }
  out[t] = t;
}

DITQ_GLOBAL void divergent_collective(float* out) {
  const int t = static_cast<int>(threadIdx.x);
  float v = static_cast<float>(t);
  if (t % 2) v = ptx::shfl_xor(v, 2);  // @div_coll_a
  else v = ptx::shfl_xor(v, 4);        // @div_coll_b
  out[t] = v;
}

DITQ_GLOBAL void out_of_range(int* out) {
  DITQ_SHARED(int, word, kN);
  const int t = static_cast<int>(threadIdx.x);
  ptx::st_shared(&word[t + 1], t);  // @oob_write
  out[t] = t;
}

DITQ_GLOBAL void misaligned_cp_async(const uint8_t* in) {
  DITQ_DYNAMIC_SHARED(uint8_t, smem);
  const int t = static_cast<int>(threadIdx.x);
  ptx::cp_async_16(smem + 16 * t + 8, in + 16 * t, true);  // @misaligned_cp
  ptx::cp_async_commit();
  ptx::cp_async_wait<0>();
}

DITQ_GLOBAL void partial_warp(float* out) {
  const int t = static_cast<int>(threadIdx.x);
  out[t] = ptx::shfl_xor(static_cast<float>(t), 1);  // @partial_shfl
}

// ---- global memory (Options::mem_check; the launch registers its buffers) --------------------------------------
// out[t] = in[t] + 1 for every thread, with one planted bug each: a read or a write one element past the
// buffer (thread 63), a write into the read-only input, a read of an output element nobody wrote, a
// cp.async one chunk past the input.
enum class GBug : int { None, OobRead, OobWrite, ReadOnlyWrite, UnwrittenRead, CpAsyncOob };

template <GBug kBug>
DITQ_GLOBAL void global_probe(const int* in, int* out, const uint8_t* bytes) {
  DITQ_DYNAMIC_SHARED(uint8_t, smem);
  const int t = static_cast<int>(threadIdx.x);
  const int v = ptx::ld_global(&in[kBug == GBug::OobRead ? t + 1 : t]);  // @g_oob_read
  if (kBug == GBug::ReadOnlyWrite && t == 5) ptx::st_global(const_cast<int*>(&in[t]), v);  // @g_ro_write
  if (kBug != GBug::UnwrittenRead || t % 2 == 0)
    ptx::st_global(&out[kBug == GBug::OobWrite ? t + 1 : t], v + 1);  // @g_oob_write
  const int chunk = kBug == GBug::CpAsyncOob ? t + 1 : t;
  ptx::cp_async_16(smem + 16 * t, bytes + 16 * chunk, true);  // @g_cp_oob
  ptx::cp_async_commit();
  ptx::cp_async_wait<0>();
  __syncthreads();  // every thread's out element stored
  if (t == 0) {
    int s = 0;
    for (int i = 0; i < kN; ++i) s += ptx::ld_global(&out[i]);  // @g_unwritten
    ptx::st_global(&out[0], s);
  }
}

// Padded past kN, so that the global probes' one-past accesses land in unregistered bytes (not in the next
// array, nor outside the process).
int in_i[kN + 16];
float in_f[kN];
uint8_t in_b[16 * 2 * kN];
int out_i[kN + 16];
float out_f[kN];
uint8_t out_b[16 * kN];

// Runs a named kernel. Returns 0 if it ran and its result is right, 3 if it ran and the result is wrong.
int run_named(const std::string& name, const emu::Options& o) {
  const dim3 g(1), b(kN);
  for (int i = 0; i < kN; ++i) {
    in_i[i] = 3 * i + 1;
    in_f[i] = static_cast<float>(i) + 0.5f;
  }
  for (int i = 0; i < 16 * 2 * kN; ++i) in_b[i] = static_cast<uint8_t>(i * 7 + 1);
  auto sum_ok = [] {
    int s = 0;
    for (int i = 0; i < kN; ++i) s += in_i[i];
    return out_i[0] == s;
  };
  auto two_stage_ok = [] {
    for (int t = 0; t < kN; ++t)
      if (std::memcmp(out_b + 16 * t, in_b + 16 * (kN + (t + 1) % kN), 16) != 0) return false;
    return true;
  };
  if (name == "block_sum_ok") return emu::launch(g, b, 0, o, block_sum<true>, in_i, out_i), sum_ok() ? 0 : 3;
  if (name == "block_sum_missing_sync")
    return emu::launch(g, b, 0, o, block_sum<false>, in_i, out_i), sum_ok() ? 0 : 3;
  if (name == "two_stage_ok") return emu::launch(g, b, 32 * kN, o, two_stage<0>, in_b, out_b), two_stage_ok() ? 0 : 3;
  if (name == "two_stage_early_wait")
    return emu::launch(g, b, 32 * kN, o, two_stage<1>, in_b, out_b), two_stage_ok() ? 0 : 3;
  if (name == "early_return_ok") return emu::launch(g, b, 0, o, early_return<false>, in_f, out_f), 0;
  if (name == "early_return") return emu::launch(g, b, 0, o, early_return<true>, in_f, out_f), 0;
  if (name == "write_write_ok") return emu::launch(g, b, 0, o, write_write<false>, out_i), 0;
  if (name == "write_write") return emu::launch(g, b, 0, o, write_write<true>, out_i), 0;
  if (name == "read_write_ok") return emu::launch(g, b, 0, o, read_write<false>, out_i), 0;
  if (name == "read_write") return emu::launch(g, b, 0, o, read_write<true>, out_i), 0;
  if (name == "warp_ordered") return emu::launch(g, b, 0, o, warp_ordered, out_i), 0;
  if (name == "divergent_barrier") return emu::launch(g, b, 0, o, divergent_barrier, out_i), 0;
  if (name == "divergent_collective") return emu::launch(g, b, 0, o, divergent_collective, out_f), 0;
  if (name == "out_of_range") return emu::launch(g, b, 0, o, out_of_range, out_i), 0;
  if (name == "misaligned_cp_async") return emu::launch(g, b, 32 * kN, o, misaligned_cp_async, in_b), 0;
  if (name == "partial_warp") return emu::launch(g, dim3(48), 0, o, partial_warp, out_f), 0;
  // Global-memory probes: buffers registered with their exact extents (in: kN ints, out: kN ints,
  // bytes: 16 * kN bytes of the 32 * kN array).
  auto global = [&](auto kernel) {
    const std::vector<emu::GlobalBuffer> bufs = {
        {in_i, sizeof(int) * kN, "in", emu::Access::ReadOnly},
        {out_i, sizeof(int) * kN, "out", emu::Access::Output},
        {in_b, 16 * kN, "bytes", emu::Access::ReadOnly}};
    emu::launch_checked(g, b, 16 * kN, o, "global_probe", bufs, kernel, in_i, out_i, in_b);
    int s = 0;
    for (int i = 0; i < kN; ++i) s += in_i[i] + 1;
    return out_i[0] == s ? 0 : 3;
  };
  if (name == "global_ok") return global(global_probe<GBug::None>);
  if (name == "global_oob_read") return global(global_probe<GBug::OobRead>);
  if (name == "global_oob_write") return global(global_probe<GBug::OobWrite>);
  if (name == "global_read_only_write") return global(global_probe<GBug::ReadOnlyWrite>);
  if (name == "global_unwritten_read") return global(global_probe<GBug::UnwrittenRead>);
  if (name == "global_cp_async_oob") return global(global_probe<GBug::CpAsyncOob>);
  throw std::invalid_argument("no probe kernel named " + name);
}

void copy_out(const std::string& s, char* buf, int len) {
  std::snprintf(buf, static_cast<size_t>(len), "%s", s.c_str());
}

}  // namespace

extern "C" {

// 0: ran, result right; 3: ran, result wrong; 1: the emulator reported an error (kind, message filled in);
// 2: another exception (message filled in).
int probe_run(const char* name, int order, unsigned long long seed, int cp_async, int race_check, int mem_check,
              char* kind, int kind_len, char* msg, int msg_len) {
  emu::Options o;
  o.order = static_cast<emu::Order>(order);
  o.seed = seed;
  o.cp_async = static_cast<emu::CpAsync>(cp_async);
  o.race_check = race_check != 0;
  o.mem_check = mem_check != 0;
  try {
    return run_named(name, o);
  } catch (const emu::Error& e) {
    copy_out(e.kind(), kind, kind_len);
    copy_out(e.what(), msg, msg_len);
    return 1;
  } catch (const std::exception& e) {
    copy_out(e.what(), msg, msg_len);
    return 2;
  }
}

// One mma.m16n8k32 by a 32-thread block: a [32][4], b [32][2], c [32][4] registers per lane -> d [32][4].
int probe_mma(const uint32_t* a, const uint32_t* b, const int32_t* c, int32_t* d) {
  emu::Options o;
  o.race_check = true;
  emu::launch(dim3(1), dim3(32), 0, o, mma_probe, a, b, c, d);
  return 0;
}

// One ldmatrix (count 2 or 4, trans 0/1) by a 32-thread block over `nbytes` of shared memory; offsets [32]
// are each lane's row address relative to the shared base; out [32][4].
int probe_ldmatrix(const uint8_t* bytes, int nbytes, const int* offsets, int count, int trans, uint32_t* out,
                   char* msg, int msg_len) {
  emu::Options o;
  o.race_check = true;
  try {
    emu::launch(dim3(1), dim3(32), static_cast<size_t>(nbytes), o, ldmatrix_probe, bytes, nbytes, offsets, count,
                trans, out);
  } catch (const std::exception& e) {
    copy_out(e.what(), msg, msg_len);
    return 1;
  }
  return 0;
}

// The emulator's float conversions, element-wise: fp16/bf16 bits of each float, the floats back, and
// __float2int_rn.
int probe_convert(const float* in, int n, uint16_t* h, uint16_t* b, float* h_back, float* b_back, int* rint) {
  for (int i = 0; i < n; ++i) {
    h[i] = __half_as_ushort(__float2half_rn(in[i]));
    b[i] = __bfloat16_as_ushort(__float2bfloat16_rn(in[i]));
    h_back[i] = __half2float(__ushort_as_half(h[i]));
    b_back[i] = __bfloat162float(__ushort_as_bfloat16(b[i]));
    rint[i] = __float2int_rn(in[i]);
  }
  return 0;
}

// fp32 -> bf16 / fp16 bits, element-wise: mode 0 / 3 the kernels' conversions (ptx::f32_to_bf16_bits,
// f32_to_f16_bits); the others deliberately broken twins for the rounding tests to reject: 1 bf16 ties away
// from zero, 2 bf16 `u += 0x7fff` (ties toward zero), 4 fp16 ties away from zero.
int probe_cast(const float* in, int n, int mode, uint16_t* out) {
  for (int i = 0; i < n; ++i) {
    const float f = in[i];
    uint32_t u;
    std::memcpy(&u, &f, 4);
    switch (mode) {
      case 0: out[i] = ptx::f32_to_bf16_bits(f); break;
      case 1: out[i] = static_cast<uint16_t>((u + 0x8000u) >> 16); break;
      case 2: out[i] = static_cast<uint16_t>((u + 0x7fffu) >> 16); break;
      case 3: out[i] = ptx::f32_to_f16_bits(f); break;
      default: {  // fp16 ties away: round |f| to a multiple of its fp16 ulp with floor(x / ulp + 0.5)
        const double x = std::fabs(static_cast<double>(f));
        const int e = x > 0 ? std::max(static_cast<int>(std::floor(std::log2(x))), -14) : -14;
        const double ulp = std::ldexp(1.0, e - 10), r = std::floor(x / ulp + 0.5) * ulp;
        const float v = static_cast<float>(std::signbit(f) ? -r : r);
        out[i] = r >= 65520.0 ? static_cast<uint16_t>(std::signbit(f) ? 0xfc00u : 0x7c00u) : ptx::f32_to_f16_bits(v);
      }
    }
  }
  return 0;
}

}  // extern "C"

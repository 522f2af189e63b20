// Compile-only probe of ptx.cuh's Hopper device halves, for tests/csrc/test_ptx_hopper_sass.py: nvcc builds it
// for sm_90a (every instruction must appear in the SASS under its expected opcode) and for sm_80 (it must
// still compile: there each Hopper instruction is a trap). Never launched.
#include "ptx.cuh"
#include "tma.h"

using namespace ditq;

// A warp-specialised TMA -> wgmma tile: every Hopper instruction of ptx.cuh once, the accumulators untouched
// between issue and wait (so ptxas inserts no waits of its own).
template <int N>
__global__ void __launch_bounds__(256, 1)
    hopper_probe(const __grid_constant__ ptx::TmaMap map_a, const __grid_constant__ ptx::TmaMap map_b, int k_tiles,
                 int32_t* out) {
  DITQ_DYNAMIC_SHARED(uint8_t, smem);
  DITQ_SHARED(uint64_t, full, 1);
  DITQ_SHARED(uint64_t, empty, 1);
  const int t = static_cast<int>(threadIdx.x);
  if (t == 0) {
    ptx::mbarrier_init(&full[0], 1);
    ptx::mbarrier_init(&empty[0], 128);
    ptx::fence_mbarrier_init();
  }
  __syncthreads();
  if (t >= 128) {
    ptx::setmaxnreg_dec<40>();
    if (t == 128) {
      ptx::prefetch_tma_map(&map_a);
      ptx::prefetch_tma_map(&map_b);
      for (int kt = 0; kt < k_tiles; ++kt) {
        ptx::mbarrier_wait_parity(&empty[0], (kt & 1) ^ 1);
        ptx::mbarrier_arrive_expect_tx(&full[0], 128 * (64 + N));
        ptx::tma_load_2d(smem, &map_a, kt * 128, 0, &full[0]);
        ptx::tma_load_2d(smem + 8192, &map_b, kt * 128, 0, &full[0]);
      }
    }
    return;
  }
  ptx::setmaxnreg_inc<232>();
  int32_t d[N / 2];
  for (int i = 0; i < N / 2; ++i) d[i] = 0;
  for (int kt = 0; kt < k_tiles; ++kt) {
    ptx::mbarrier_wait_parity(&full[0], kt & 1);
    ptx::fence_proxy_async_shared();
    ptx::wgmma_fence_operands(d);
    ptx::wgmma_fence();
    for (int ks = 0; ks < 4; ++ks) {
      const uint64_t da = ptx::wgmma_smem_desc(smem + 32 * ks, ptx::WgmmaSwizzle::B128, 16, 1024);
      const uint64_t db = ptx::wgmma_smem_desc(smem + 8192 + 32 * ks, ptx::WgmmaSwizzle::B128, 16, 1024);
      ptx::wgmma_m64k32_s8_ss<N>(d, da, db, true);
    }
    ptx::wgmma_commit_group();
    ptx::wgmma_wait_group<0>();
    ptx::wgmma_fence_operands(d);
    ptx::mbarrier_arrive(&empty[0]);
  }
  for (int i = 0; i < N / 2; ++i) out[t * (N / 2) + i] = d[i];
}

// Register A: one rs wgmma per N, a try_wait outside a loop.
template <int N>
__global__ void __launch_bounds__(128, 1) hopper_probe_rs(const uint32_t* a_in, int32_t* out) {
  DITQ_DYNAMIC_SHARED(uint8_t, smem);
  DITQ_SHARED(uint64_t, bar, 1);
  const int t = static_cast<int>(threadIdx.x);
  if (t == 0) ptx::mbarrier_init(&bar[0], 128);
  __syncthreads();
  const uint32_t a[4] = {a_in[4 * t], a_in[4 * t + 1], a_in[4 * t + 2], a_in[4 * t + 3]};
  int32_t d[N / 2];
  ptx::wgmma_fence();
  ptx::wgmma_m64k32_s8_rs<N>(d, a, ptx::wgmma_smem_desc(smem, ptx::WgmmaSwizzle::None, 128, 256), false);
  ptx::wgmma_commit_group();
  ptx::wgmma_wait_group<0>();
  ptx::wgmma_fence_operands(d);
  ptx::mbarrier_arrive(&bar[0]);
  out[t] = ptx::mbarrier_try_wait_parity(&bar[0], 0) ? d[0] : d[N / 2 - 1];
}

template __global__ void hopper_probe<8>(const __grid_constant__ ptx::TmaMap, const __grid_constant__ ptx::TmaMap, int,
                                           int32_t*);
template __global__ void hopper_probe<24>(const __grid_constant__ ptx::TmaMap, const __grid_constant__ ptx::TmaMap, int,
                                           int32_t*);
template __global__ void hopper_probe<64>(const __grid_constant__ ptx::TmaMap, const __grid_constant__ ptx::TmaMap, int,
                                           int32_t*);
template __global__ void hopper_probe<256>(const __grid_constant__ ptx::TmaMap, const __grid_constant__ ptx::TmaMap, int,
                                           int32_t*);
template __global__ void hopper_probe_rs<16>(const uint32_t*, int32_t*);
template __global__ void hopper_probe_rs<128>(const uint32_t*, int32_t*);

// The host half of tma.h must compile in an nvcc translation unit too.
bool build_map(ptx::TmaMap* m, const void* p, std::string* e) {
  return ptx::make_tma_map_2d(m, p, 256, 64, 256, 128, 64, ptx::TmaSwizzle::B128, e);
}

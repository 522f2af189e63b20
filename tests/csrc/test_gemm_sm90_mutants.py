"""Planted bugs in the Hopper GEMMs (csrc/gemm_sm90.cuh) that the emulator must catch: a copy of csrc/ with one
edit, a small probe library (g++, no torch) running one W8A8 and two W4A8 (G = 32; float and integer group
scales) kernels through more k tiles than the ring has stages, each with the plain and the fused epilogue (gate per
3 rows + fp32 residual), against the unmutated build.

| planted bug                                                   | caught by                                   |
| W8A8 releases the stage its in-flight wgmmas still read       | `race`: the refill's TMA vs the pending wgmma |
| W4A8 waits for one wgmma group too few before folding         | wrong results (lazy wgmma landing)          |
| the producer expects fewer bytes than its two TMA boxes bring | `deadlock` naming the waiting mbarrier      |
| W8A8 stores y itself, bypassing the epilogue policy           | wrong results of the fused kernel (the plain |
|                                                               | one is unchanged by it)                     |
| W4A8 hands the policy its unshuffled pair (two rows of y)     | wrong results of the fused kernel           |
| W4A8 with integer scales waits for one wgmma group too few    | `race`: the stage it then releases is       |
| (two units in flight)                                         | refilled while a wgmma still reads it       |
| W4A8 with integer scales reads q of the stage it runs, not of | wrong results                               |
| the next one, into its prefetch                               |                                             |

The probe's third kernel (``w4 = 2``) is the W4A8 one with integer group scales (q in [1, 16], ``p.w_qscale``).
"""
import ctypes
import os
import shutil
import subprocess

import pytest
import torch

from ditq.testing import random_int8

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSRC = os.path.join(ROOT, "csrc")

PROBE = r"""
#include <cstring>
#include <stdexcept>
#include <string>
#include "gemm_sm90_host.h"
using namespace ditq;
using namespace ditq::gemm;
using namespace ditq::gemm::sm90;
using T8 = Sm90Tile<64, 128, 6, 1>;
using T4 = Sm90Tile<64, 64, 6, 1>;
template <class T, class E> void w8k(Sm90Params P) { DITQ_DYNAMIC_SHARED(uint8_t, smem); gemm_w8a8_sm90_body<T, E>(P, smem); }
template <class T, int G, class E, bool I> void w4k(Sm90Params P) { DITQ_DYNAMIC_SHARED(uint8_t, smem); gemm_w4a8_sm90_body<T, G, E, I>(P, smem); }
extern "C" int run(int w4, int fused, int M, int N, int K, const void* a, const float* sa, const void* w,
                   const float* sw, const int* qs, const float* gate, const float* residual, float* out, int landing,
                   char* err, int errlen) {
  GemmParams p{};
  p.a = static_cast<const int8_t*>(a); p.a_scale = sa; p.a_scale_per_token = 1; p.w = w; p.w_scale = sw;
  p.w_qscale = w4 == 2 ? qs : nullptr;
  p.out = out; p.out_dtype = DType::kF32; p.M = M; p.N = N; p.K = K; p.splits = 1;
  p.fused.rows_per_gate = 1;
  if (fused) {
    p.fused.gate = gate; p.fused.rows_per_gate = 3; p.fused.residual = residual; p.fused.residual_dtype = DType::kF32;
  }
  emu::Options o;
  o.race_check = true;
  o.order = emu::Order::Random;
  o.seed = 1;
  o.async_landing = landing ? emu::AsyncLanding::Wait : emu::AsyncLanding::Issue;
  try {
    Sm90Params P{};
    P.p = p;
    std::string e;
    if (w4) {
      if (!make_maps<T4>(P, true, &e)) throw std::runtime_error(e);
      emu::launch(dim3(static_cast<unsigned>(launch_ctas<T4>(p))),
                  dim3(T4::THREADS), sm90_smem_bytes(64, 64, 6, true), o,
                  w4 == 2 ? (fused ? &w4k<T4, 32, FusedEpilogue, true> : &w4k<T4, 32, PlainEpilogue, true>)
                          : (fused ? &w4k<T4, 32, FusedEpilogue, false> : &w4k<T4, 32, PlainEpilogue, false>), P);
    } else {
      if (!make_maps<T8>(P, false, &e)) throw std::runtime_error(e);
      emu::launch(dim3(static_cast<unsigned>(launch_ctas<T8>(p))),
                  dim3(T8::THREADS), sm90_smem_bytes(64, 128, 6, false), o,
                  fused ? &w8k<T8, FusedEpilogue> : &w8k<T8, PlainEpilogue>, P);
    }
  } catch (const std::exception& ex) {
    std::strncpy(err, ex.what(), errlen - 1);
    return 1;
  }
  return 0;
}
"""

# name -> (original text, mutated text, W4 kernel?, fused epilogue?): the run that must catch it
MUTANTS = {
    "early_release": ("if (kt > 0) ptx::mbarrier_arrive(ring.empty + (kt - 1) % T::STAGES);",
                      "ptx::mbarrier_arrive(ring.empty + kt % T::STAGES);", 0, 0),
    "fold_in_flight": ("else ptx::wgmma_wait_group<1>();", "else ptx::wgmma_wait_group<2>();", 1, 0),
    "short_expect_tx": ("ptx::mbarrier_arrive_expect_tx(ring.full + s, Ring<T, W4>::TX);",
                        "ptx::mbarrier_arrive_expect_tx(ring.full + s, Ring<T, W4>::TX - 16);", 0, 0),
    "w8_bypasses_policy": ("epi.store(p, m, n, y);", "store_pair(p, m, n, y);", 0, 1),
    "w4_unshuffled_pair": ("epi.store(p, m, n_pair, pair);", "epi.store(p, m, n_pair, y);", 1, 1),
    # integer group scales (w4 = 2): a unit's A registers rewritten while the same registers' wgmma of the
    # previous stage is still in flight; q for the stage being run instead of the next one
    "int_unit_in_flight": ("ptx::wgmma_wait_group<1>();  // this unit stays in flight",
                           "ptx::wgmma_wait_group<2>();  // this unit stays in flight", 2, 0),
    "int_q_not_prefetched": ("load_q(q_next, kt + 1);", "load_q(q_next, kt);", 2, 0),
}


def _build(tmp, mutant):
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no host C++ compiler ({cxx})")
    src = tmp / (mutant or "clean")
    shutil.copytree(CSRC, src)
    if mutant:
        old, new = MUTANTS[mutant][:2]
        text = (src / "gemm_sm90.cuh").read_text()
        assert text.count(old) == 1, f"{old!r} is not (once) in csrc/gemm_sm90.cuh: update the mutant"
        (src / "gemm_sm90.cuh").write_text(text.replace(old, new))
    (src / "probe.cpp").write_text(PROBE)
    lib = str(src / "probe.so")
    r = subprocess.run([cxx, "-O1", "-std=c++17", "-U_FORTIFY_SOURCE", "-Wno-unknown-pragmas", "-w", "-shared", "-fPIC",
                        "-I", str(src), str(src / "probe.cpp"), "-o", lib], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    return ctypes.CDLL(lib)


def _inputs(w4):
    g = torch.Generator().manual_seed(7 + w4)
    m, n, k = (33, 70, 7 * 128) if not w4 else (33, 70, 7 * 128 - 32)  # 7 k tiles through a 6-stage ring
    a = random_int8(m, k, generator=g)
    sa = torch.rand(m, generator=g) * 0.01 + 1e-3
    if w4:
        w = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
        # float group scales [K / 32, N]; with integer ones (w4 = 2) the channel scales [N]
        sw = (torch.rand(k // 32, n, generator=g) if w4 == 1 else torch.rand(n, generator=g)) * 0.01 + 1e-4
    else:
        w = random_int8(n, k, generator=g)
        sw = torch.rand(n, generator=g) * 0.01 + 1e-4
    gate = torch.randn(m // 3, n, generator=g) * 2  # one gate row per 3 rows (M = 33)
    residual = torch.randn(m, n, generator=g) * 3
    qs = torch.randint(1, 17, (k // 32, n), generator=g, dtype=torch.int32)  # integer group scales (w4 = 2)
    return m, n, k, a, sa.float(), w, sw.float().contiguous(), qs, gate, residual


def _run(lib, w4, fused, landing):
    m, n, k, a, sa, w, sw, qs, gate, residual = _inputs(w4)
    out = torch.full((m, n), float("nan"))
    err = ctypes.create_string_buffer(2000)
    ptr = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
    rc = lib.run(w4, fused, m, n, k, ptr(a), ptr(sa), ptr(w), ptr(sw), ptr(qs), ptr(gate), ptr(residual), ptr(out),
                 landing, err, 2000)
    return out, (err.value.decode() if rc else None)


RUNS = [(w4, fused, landing) for w4 in (0, 1, 2) for fused in (0, 1) for landing in (0, 1)]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    lib = _build(tmp_path_factory.mktemp("sm90_clean"), None)
    return {run: _run(lib, *run) for run in RUNS}


def test_clean_build_runs(clean):
    for (w4, fused, landing), (out, err) in clean.items():
        assert err is None, err
        assert not torch.isnan(out).any()
    for w4 in (0, 1, 2):  # the fused probe applies its pieces: its results are not the plain ones
        assert not torch.equal(clean[(w4, 1, 0)][0], clean[(w4, 0, 0)][0])


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_mutant_is_caught(clean, mutant, tmp_path):
    lib = _build(tmp_path, mutant)
    w4, fused = MUTANTS[mutant][2:]
    caught = []
    for landing in (0, 1):
        out, err = _run(lib, w4, fused, landing)
        caught.append(err or (None if torch.equal(out, clean[(w4, fused, landing)][0]) else "wrong results"))
    print(f"\n{mutant}: issue-landing {caught[0]!s:.300}\n{mutant}: lazy-landing {caught[1]!s:.300}")
    assert any(caught), f"{mutant}: not caught in either landing mode"
    if mutant == "early_release":
        assert any(c and "[race]" in c and "gemm_sm90.cuh" in c for c in caught), caught
    if mutant == "int_unit_in_flight":
        assert any(c and "[race]" in c and "wgmma" in c for c in caught), caught
    if mutant == "short_expect_tx":
        assert any(c and "[deadlock]" in c for c in caught), caught

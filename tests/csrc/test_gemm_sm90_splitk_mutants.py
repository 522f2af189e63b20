"""Split-K of the Hopper GEMMs (csrc/gemm_sm90.cuh) under the emulator with the launch's workspace and counters in
the test's hands: a probe library (g++, no torch) runs one W8A8 (8 k tiles in 3 splits, the last tile partial)
and one W4A8 kernel (G = 256: 4 groups of two k tiles in 3 splits), workspace poisoned, counters zeroed; the
counters must be zero again after the launch. The split tail (W8 on 2 x 2 tiles: the first whole, the other
three split 3 ways, counters and workspace for those three only) is the same code with dp_tiles > 0. Then
planted bugs (a copy of csrc/ with one edit each, emu_probe.build_mutant) against the unmutated build:

| planted bug                                                    | caught by                                        |
| the first CTA to arrive reduces, not the last                  | `global-unwritten`: partials not yet stored      |
| the last CTA does not reset its tile's counter                 | counters non-zero after the launch               |
| no block barrier before the count (flag written into the ring) | the flag store vs the ring's TMA bytes in flight |
|                                                                | (`tma-in-flight`) or its pending wgmma reads     |
|                                                                | (`proxy-fence`, `race`)                          |
| W4 splits in single k tiles (a group straddles two splits)     | a deadlock, an emulator error or wrong results   |
| split tail: a tail CTA's tile not offset by the whole tiles    | wrong results (a tail tile never written)        |
| split tail: whole tiles count and reduce as split tiles        | wrong results / counters / emulator error        |

Not catchable here: the fences around the count (__threadfence: membar.gl, i.e. fence.sc.gpu). The emulator runs
blocks one after another, so every partial is stored long before the last CTA reads it (ptx.cuh, inter-CTA
communication)."""
import ctypes
import importlib.util
import os

import pytest
import torch

from ditq.testing import random_int8

pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("emu_probe", os.path.join(HERE, "emu_probe.py"))
emu_probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(emu_probe)

PROBE = os.path.join(HERE, "gemm_sm90_splitk_probe.cpp")
# W8's 33 x 70 problem on 64 x 128 tiles is one tile; the tail schedule needs several: 2 x 2 tiles (M = 70,
# N = 200 below), the first whole, the other 3 split 3 ways.
TAIL_SCHEDULE = (3, 1)  # splits, dp_tiles

MUTANTS = {
    "first_arrival_reduces": ("p.counters + tile, 1) == p.splits - 1;", "p.counters + tile, 1) == 0;"),
    "counter_not_reset": ("if (last) ptx::st_global(p.counters + tile, 0);", ""),
    "no_barrier_before_count": ("__syncthreads();  // every consumer's partial stored and fenced", ""),
    "w4_splits_in_k_tiles": ("k_range<(G > BK ? G / BK : 1)>(p.K, u.z", "k_range<1>(p.K, u.z"),
    # the split tail (dp_tiles whole tiles first): a tail CTA's tile not offset by the whole tiles, so it
    # recomputes a slice of a whole tile; whole tiles taking part in the count and reduction (as split 0 of the
    # first split tile)
    "tail_tile_not_offset": ("tile = p.dp_tiles + u.tile;", "tile = u.tile;"),
    "whole_tiles_count": ("WorkUnit u{0, 0, 0, 0, false};", "WorkUnit u{0, 0, 0, 0, p.splits > 1};"),
}
TAIL = ("tail_tile_not_offset", "whole_tiles_count")


def _lib(name, edits):
    lib = ctypes.CDLL(emu_probe.build_mutant(f"sm90_splitk_{name}", edits, PROBE))
    lib.run.restype = ctypes.c_int
    return lib


def _inputs(w4, tail=False):
    g = torch.Generator().manual_seed(40 + w4)
    m, n, k = (70 if tail else 33, 200 if tail else 70, 7 * 128 + 16) if not w4 else (33, 70, 1024)
    a = random_int8(m, k, generator=g)
    sa = (torch.rand(m, generator=g) * 0.01 + 1e-3).float()
    if w4:
        w = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
        sw = (torch.rand(k // 256, n, generator=g) * 0.01 + 1e-4).float()
    else:
        w = random_int8(n, k, generator=g)
        sw = (torch.rand(n, generator=g) * 0.01 + 1e-4).float()
    return m, n, k, a, sa, w, sw


def _run(lib, w4, landing, splits=3, dp_tiles=0, tail=False):
    """(out, counters after, error or None) of one launch: the first dp_tiles tiles whole, the others split;
    `tail`: W8's 2 x 2-tile problem."""
    m, n, k, a, sa, w, sw = _inputs(w4, tail)
    tiles = ((n + (63 if w4 else 127)) // (64 if w4 else 128)) * ((m + 63) // 64) - dp_tiles  # split tiles
    out = torch.full((m, n), float("nan"))
    counters = torch.zeros(tiles, dtype=torch.int32)
    workspace = torch.full((splits * tiles * 64 * (64 if w4 else 128),), -1, dtype=torch.int32)
    err = ctypes.create_string_buffer(4000)
    ptr = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
    rc = lib.run(w4, splits, dp_tiles, m, n, k, ptr(a), ptr(sa), ptr(w), ptr(sw), ptr(out), ptr(counters),
                 ptr(workspace), landing, err, 4000)
    return out, counters, (err.value.decode() if rc else None)


@pytest.fixture(scope="module")
def clean():
    lib = _lib("clean", [])
    runs = {(w4, landing, s): _run(lib, w4, landing, s) for w4 in (0, 1) for landing in (0, 1) for s in (1, 3)}
    for landing in (0, 1):
        runs[(0, landing, "tail")] = _run(lib, 0, landing, *TAIL_SCHEDULE, tail=True)
        runs[(0, landing, "tail unsplit")] = _run(lib, 0, landing, 1, tail=True)
    return runs


def test_clean_build_splits_and_counters(clean):
    for (w4, landing, s), (out, counters, err) in clean.items():
        assert err is None, err
        assert not torch.isnan(out).any()
        assert not counters.any(), f"w4={w4} splits={s}: counters left {counters.tolist()}"
        if s == "tail unsplit":  # the reference of "tail"
            continue
        if s == "tail":  # the split tiles' counters only; int32 partials: the unsplit bits
            assert counters.numel() == 3 and torch.equal(out, clean[(0, landing, "tail unsplit")][0])
        elif w4 == 0:  # int32 partials: the split result is the unsplit one, bit for bit
            assert torch.equal(out, clean[(0, landing, 1)][0])
        else:  # fp32 partials: rounding of the split sums only
            torch.testing.assert_close(out, clean[(1, landing, 1)][0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_splitk_mutant_is_caught(clean, mutant):
    lib = _lib(mutant, [("gemm_sm90.cuh", *MUTANTS[mutant])])
    w4 = 1 if mutant.startswith("w4") else 0
    key = "tail" if mutant in TAIL else 3
    caught = []
    for landing in (0, 1):
        out, counters, err = _run(lib, w4, landing, *(TAIL_SCHEDULE if key == "tail" else (3,)), tail=key == "tail")
        if err is None and counters.any():
            err = f"counters left {counters.tolist()}"
        caught.append(err or (None if torch.equal(out, clean[(w4, landing, key)][0]) else "wrong results"))
    print(f"\n{mutant}: issue-landing {caught[0]!s:.300}\n{mutant}: lazy-landing {caught[1]!s:.300}")
    assert any(caught), f"{mutant}: not caught in either landing mode"
    expect = {"first_arrival_reduces": ("[global-unwritten]",), "counter_not_reset": ("counters left",),
              "no_barrier_before_count": ("[tma-in-flight]", "[proxy-fence]", "[race]")}.get(mutant, ())
    if expect:
        assert any(c and any(e in c for e in expect) for c in caught), caught

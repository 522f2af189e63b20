"""The mma.sync GEMMs' split-K cap (csrc/configs/gemm_tiles.h: kTileRules' max_splits, csrc/gemm_tiles.cpp
auto_splits): the cap bounds the automatic count and nothing else, the build's caps are the header's, bad caps
are refused, and a capped count computes the exact product (cuda-emulated, output poisoned by the binding)."""
import os
import re

import pytest
import torch

from ditq import backends
from ditq.format import WeightFormat
from ditq.quant import reference as ref
from ditq.testing import assert_gemm_w4a8, assert_gemm_w8a8, random_int4, random_int8

BACKEND = "cuda-emulated"
_reason = backends.unavailable_reason(BACKEND, "cpu")
if _reason is None and not hasattr(torch.ops.ditq_C, "gemm_auto_splits"):
    _reason = "this build of ditq._C has no gemm_auto_splits"
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"backend {BACKEND!r} unavailable: {_reason}")

HEADER = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc",
                      "configs", "gemm_tiles.h")


def _rules():
    """kTileRules rows (arch_min, max_m, w8, w4, max_splits), parsed from the header."""
    body = open(HEADER).read().split("kTileRules[] = {", 1)[1].split("};", 1)[0]
    return [tuple(int(v) for v in r) for r in re.findall(r"\{\s*(\d+),\s*(-?\d+),\s*(\d+),\s*(\d+),\s*(\d+)\s*\}",
                                                         body)]


def _auto(tile, group, m, n, k, sms=132, cap=-1):
    return torch.ops.ditq_C.gemm_auto_splits(tile, group, m, n, k, sms, 90, cap)


def _uncapped(tile, group, m, n, k, sms=132):
    """auto_splits' rule with no cap: two waves' worth of CTAs, at most the k units, at least 1."""
    bm, bn, bk = torch.ops.ditq_C.gemm_tile_info(tile)[:3]
    ctas = -(-m // bm) * -(-n // bn)
    return max(1, min(-(-2 * sms // ctas), -(-k // max(group, bk))))


def test_cap_bounds_the_automatic_count():
    """Made-up problems whose uncapped count is large (a few CTAs, long K): a cap c gives min(uncapped, c), the
    rule's cap (max_splits < 0) the shipped count, at most 16; K's units still bound it."""
    cases = [(t, g, m, n, k) for t in range(torch.ops.ditq_C.gemm_tile_count())
             for g, m, n, k in ((0, 1, 130, 4608), (256, 3, 65, 4608), (32, 70, 129, 1024), (0, 1, 9, 80))]
    seen_cut = False
    for tile, group, m, n, k in cases:
        free = _uncapped(tile, group, m, n, k)
        rule = torch.ops.ditq_C.gemm_max_splits(90, m)
        assert _auto(tile, group, m, n, k) == min(free, rule, 16), (tile, group, m, n, k)
        for cap in (1, 2, 3, 8, 16, 1024):
            got = _auto(tile, group, m, n, k, cap=cap)
            assert got == min(free, cap), (tile, group, m, n, k, cap)
            seen_cut |= free > cap
    assert seen_cut, "no case's uncapped count exceeded a cap: the test checks nothing"
    assert _auto(0, 0, 1, 130, 4608) == 16 and _auto(0, 0, 1, 130, 4608, cap=5) == 5  # 3 CTAs, 36 units
    assert _auto(2, 0, 8192, 4608, 4608, cap=8) == 1  # 2304 tiles: past two waves, no split whatever the cap


def test_the_build_caps_are_the_headers():
    rules = _rules()
    assert rules and all(1 <= r[4] <= 1024 for r in rules)
    for arch in (80, 86, 89, 90, 100):
        for m in (1, 16, 17, 64, 65, 512, 1 << 20):
            want = next(r[4] for r in rules if arch >= r[0] and (r[1] < 0 or m <= r[1]))
            assert torch.ops.ditq_C.gemm_max_splits(arch, m) == want, (arch, m)
    assert torch.ops.ditq_C.gemm_max_splits(75, 16) == 16  # no rule before sm_80: the default, kMaxSplits


@pytest.mark.parametrize("args,match", [((0, 0, 4, 64, 128, 132, 90, 0), "max_splits"),
                                        ((0, 0, 4, 64, 128, 132, 90, 1025), "max_splits"),
                                        ((99, 0, 4, 64, 128, 132, 90, -1), "tile"),
                                        ((0, 0, 0, 64, 128, 132, 90, -1), "M in"),
                                        ((0, 0, 4, 64, 128, 0, 90, -1), "sm_count")],
                         ids=["cap-0", "cap-1025", "tile-99", "m-0", "sms-0"])
def test_bad_arguments_rejected(args, match):
    with pytest.raises(ValueError, match=match):
        torch.ops.ditq_C.gemm_auto_splits(*args)


def _prepared(bits, w, scales, group=None):
    be = backends.get_backend(BACKEND, "cpu")
    if bits == 8:
        return be.prepare_weight(WeightFormat(8), w, scales)
    return be.prepare_weight(WeightFormat(4, group), ref.pack_int4(w), scales)


@pytest.mark.parametrize("bits,group", [(8, None), (4, 64)], ids=["w8", "w4-g64"])
def test_capped_count_is_exact(bits, group):
    """The count a cap of 2 gives on the smallest tile (M = 1, N = 33, K = 320: 3 k units of 128, so the
    uncapped count is 3), forced through the op: exact, and for W8 (int32 partials) equal to the unsplit bits."""
    from ditq.emulator import emulator_options

    m, n, k, tile = 1, 33, 320, 0
    g = torch.Generator().manual_seed(7 + bits)
    a = random_int8(m, k, generator=g)
    a_scale = (torch.rand(1, generator=g) * 0.02 + 1e-3).float()
    bias = (torch.randn(n, generator=g) * 4).float()
    if bits == 8:
        w = random_int8(n, k, low=-128, generator=g)
        scales = (torch.rand(n, generator=g) * 0.01 + 1e-4).float()
    else:
        w = random_int4(n, k, generator=g)
        scales = (torch.rand(k // group, n, generator=g) * 0.05 + 1e-4).float()
    pw, ps = _prepared(bits, w, scales, group)
    assert _auto(tile, group or 0, m, n, k) == 3
    capped = _auto(tile, group or 0, m, n, k, cap=2)
    assert capped == 2

    def run(splits):
        with emulator_options(race_check=True):
            if bits == 8:
                return torch.ops.ditq_C.gemm_w8a8(a, a_scale, pw, ps, bias, torch.float32, tile, splits)
            return torch.ops.ditq_C.gemm_w4a8(a, a_scale, pw, ps, bias, group, torch.float32, tile, splits)
    y = run(capped)
    if bits == 8:
        assert_gemm_w8a8(y, a, a_scale, w, scales, bias, what="W8A8 capped split")
        assert torch.equal(y, run(1))
    else:
        assert_gemm_w4a8(y, a, a_scale, w, scales, group, bias, what="W4A8 g64 capped split")

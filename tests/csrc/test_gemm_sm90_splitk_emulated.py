"""Split-K of the Hopper GEMMs (csrc/gemm_sm90.cuh: gridDim.z splits the k tiles into whole units, the last CTA
of an output tile adds the partials in split order) run by the SIMT emulator on CPU tensors (backend
"cuda-emulated"), every Hopper tile, W8 and every W4 group size, splits 1, 2, 3, 4 and automatic, at ragged
shapes: M = 1 or not a multiple of the tile, odd N, K a multiple of the group but (for G < 128) not of the 128-k
stage, so the last split ends in a zero-filled partial tile. The binding poisons the output (NaN) and the
workspace (-1) first. W8 partials are int32: every split count gives the bits of the unsplit kernel. W4
partials are fp32 sums of whole groups added in a fixed order: exact to the reference's tolerance, and two runs
of one split count give the same bits. Counters left zeroed and planted reduction bugs:
test_gemm_sm90_splitk_mutants.py."""
import pytest
import torch

from ditq import backends
from ditq.backends import cuda_backend
from ditq.format import WeightFormat
from ditq.quant import reference as ref
from ditq.testing import assert_gemm_w4a8, assert_gemm_w8a8
# the unsplit Hopper tests' setup: backend, skip reason, tile ids read from the build, emulator options, inputs
from test_gemm_sm90_emulated import BACKEND, BASE, W4_TILES, W8_TILES, _inputs, _opts, pytestmark  # noqa: F401

SPLITS = (1, 2, 3, 4, None)  # None: automatic (the op's choice for the forced tile)


def _w8a8(a, sa, w, sw, b, tile=None, splits=None, dtype=torch.float32):
    pw, ps = backends.get_backend(BACKEND, "cpu").prepare_weight(WeightFormat(8), w, sw)
    with cuda_backend.gemm_tile(tile, splits):
        return torch.ops.ditq.gemm_w8a8(a, sa, pw, ps, b, dtype, BACKEND)


def _w4a8(a, sa, q, ss, b, group, tile=None, splits=None, dtype=torch.float32):
    pw, ps = backends.get_backend(BACKEND, "cpu").prepare_weight(WeightFormat(4, group), ref.pack_int4(q), ss)
    with cuda_backend.gemm_tile(tile, splits):
        return torch.ops.ditq.gemm_w4a8(a, sa, pw, ps, b, group, dtype, BACKEND)


def _bits(y):
    return y.view(torch.int32) if y.dtype == torch.float32 else y.view(torch.int16)


# K = 400: 3 full k tiles and one of 16 k (4 units of 128); a second row tile on the 128-row tiles.
W8_SHAPES = {BASE: (1, 9, 400), BASE + 1: (130, 131, 400), BASE + 2: (70, 257, 400)}


@pytest.mark.parametrize("tile", W8_TILES)
def test_w8a8_splits_bit_identical(tile):
    m, n, k = W8_SHAPES[tile]
    a, sa, w, sw, b = _inputs(m, n, k, seed=tile)
    with _opts():
        ys = {s: _w8a8(a, sa, w, sw, b, tile, s) for s in SPLITS}
    assert_gemm_w8a8(ys[1], a, sa, w, sw, b, what=f"Hopper W8A8 tile {tile} {(m, n, k)} unsplit")
    for s, y in ys.items():
        assert torch.equal(_bits(y), _bits(ys[1])), f"tile {tile}: splits={s} differs from the unsplit kernel"


# K a multiple of G but (G < 128) not of 128; G = 256: units of two k tiles (3 units), so splits = 4 is refused.
W4_SHAPES = {32: (1, 9, 416), 64: (33, 67, 448), 128: (18, 33, 512), 256: (5, 7, 768)}
W4_SPLITS = {32: SPLITS, 64: SPLITS, 128: SPLITS, 256: (1, 2, 3, None)}


@pytest.mark.parametrize("tile", W4_TILES)
@pytest.mark.parametrize("group", sorted(W4_SHAPES))
def test_w4a8_splits_exact_and_repeatable(tile, group):
    m, n, k = W4_SHAPES[group]
    a, sa, q, ss, b = _inputs(m, n, k, w4_group=group, seed=group + tile)
    dtype = (torch.float32, torch.bfloat16, torch.float16)[(tile + group // 32) % 3]
    with _opts():
        for s in W4_SPLITS[group]:
            y = _w4a8(a, sa, q, ss, b, group, tile, s, dtype)
            assert y.dtype == dtype and y.shape == (m, n)
            assert_gemm_w4a8(y, a, sa, q, ss, group, b, what=f"Hopper W4A8 g{group} tile {tile} splits={s}")
            if s == 3:  # one split count twice: the partials are added in a fixed order
                assert torch.equal(_bits(_w4a8(a, sa, q, ss, b, group, tile, s, dtype)), _bits(y))


ORDERS = (("forward", 0), ("reverse", 0), ("random", 1), ("random", 2))


@pytest.mark.parametrize("order,seed", ORDERS)
@pytest.mark.parametrize("landing", ("issue", "wait"))
def test_splitk_orders_and_landing(order, seed, landing):
    """Every fiber order and landing time with the race checker on: the reduction's barriers (the producer
    warpgroup takes part), the flag through the ring's first word after the last wgmma / TMA, the partials.
    9 k tiles in 3 splits of 3 tiles through the 6-stage ring; W4 G = 256 over 2 splits of 2 groups."""
    a, sa, w, sw, b = _inputs(19, 21, 1136, seed=21)
    a4, sa4, q, ss, b4 = _inputs(19, 21, 1024, w4_group=256, seed=22)
    with _opts(order=order, seed=seed, async_landing=landing):
        y8 = _w8a8(a, sa, w, sw, b, BASE, 3)
        y4 = _w4a8(a4, sa4, q, ss, b4, 256, BASE + 1, 2)
    assert_gemm_w8a8(y8, a, sa, w, sw, b)
    assert_gemm_w4a8(y4, a4, sa4, q, ss, 256, b4)


def test_splitk_automatic():
    """arch="sm_90a", nothing forced: the op picks the Hopper tile and, one CTA of tiles on 132 SMs, splits K
    (sm90_auto_schedule: under a wave, as many splits as fit one wave, at most the k units: here 4)."""
    a, sa, w, sw, b = _inputs(1, 9, 400, seed=31)
    a4, sa4, q, ss, b4 = _inputs(5, 7, 512, w4_group=64, seed=32)
    with _opts(arch="sm_90a"):
        y8 = _w8a8(a, sa, w, sw, b, dtype=torch.bfloat16)
        y4 = _w4a8(a4, sa4, q, ss, b4, 64, dtype=torch.bfloat16)
        y8_1 = _w8a8(a, sa, w, sw, b, BASE, 1, dtype=torch.bfloat16)
    assert_gemm_w8a8(y8, a, sa, w, sw, b)
    assert_gemm_w4a8(y4, a4, sa4, q, ss, 64, b4)
    assert torch.equal(_bits(y8), _bits(y8_1))


def fused_inputs(m, n, k, group, seed, gate_rows):
    """_inputs, the weights prepared for the fused ops (W8, or W4 of ``group``), a gate [gate_rows, n] and an fp32
    residual [m, n]."""
    a, sa, w, sw, b = _inputs(m, n, k, w4_group=group, seed=seed)
    fmt = WeightFormat(8) if group is None else WeightFormat(4, group)
    pw, ps = backends.get_backend(BACKEND, "cpu").prepare_weight(fmt, w if group is None else ref.pack_int4(w), sw)
    g = torch.Generator().manual_seed(seed + 1)
    return a, sa, w, sw, b, pw, ps, torch.randn(gate_rows, n, generator=g), torch.randn(m, n, generator=g)


@pytest.mark.parametrize("group", (None, 64))
def test_splitk_fused_epilogue(group):
    """The fused epilogue (gate, fp32 residual) runs on the reduced sums, in the last CTA: equal bit for bit to
    the plain split GEMM of the same count followed by the same fp32 multiply and add in torch."""
    m, n, k = 18, 33, 448
    a, sa, w, sw, b, pw, ps, gate, residual = fused_inputs(m, n, k, group, seed=41, gate_rows=1)
    tile = BASE + 1
    with _opts():
        if group is None:
            y = _w8a8(a, sa, w, sw, b, tile, 3)
            f = torch.ops.ditq_C.gemm_w8a8_fused(a, sa, pw, ps, b, False, gate, residual, m, None, torch.float32,
                                                 tile, 3)
        else:
            y = _w4a8(a, sa, w, sw, b, group, tile, 3)
            f = torch.ops.ditq_C.gemm_w4a8_fused(a, sa, pw, ps, b, group, False, gate, residual, m, None,
                                                 torch.float32, tile, 3)
    assert torch.equal(_bits(f), _bits(y * gate + residual)), f"group {group}: fused split-K epilogue"


def test_splitk_binding_checks():
    """More splits than k units is refused with the unit count (no silent clamp), the same for W8 and W4."""
    a, sa, w, sw, b = _inputs(4, 8, 400, seed=1)
    with pytest.raises(ValueError, match=r"split-K count must be in \[1, 4\]"):
        _w8a8(a, sa, w, sw, b, BASE, 5)
    with pytest.raises(ValueError, match=r"split-K count must be in \[1, 4\]"):
        _w8a8(a, sa, w, sw, b, BASE, 0)
    a4, sa4, q, ss, b4 = _inputs(4, 8, 768, w4_group=256, seed=2)
    with pytest.raises(ValueError, match=r"split-K count must be in \[1, 3\]"):
        _w4a8(a4, sa4, q, ss, b4, 256, BASE + 1, 4)

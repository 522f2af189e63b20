"""The automatic schedule of the Hopper GEMMs (configs/gemm_tiles_sm90.h sm90_auto_schedule; csrc/gemm_sm90.cuh,
Split-K and the schedule): full waves of output tiles run whole, the tiles of the last, partial wave are split
over K. Run by the SIMT emulator (backend "cuda-emulated", arch="sm_90a") with a small simulated SM count
(emulator_options(sm_count=...)): a GPU's 132 SMs would need 133 tiles or more, minutes of emulation, where 6 SMs
and 8 tiles give the same schedule shape (6 whole + 2 tails x 3). Ragged shapes (M and N not multiples of the
128 x 128 tile, K a multiple of the group but not of 128), output poisoned (NaN) and workspace poisoned (-1) by
the binding, the global-memory checker on: the counters and workspace are allocated for the split tiles alone,
so a whole tile touching them, or a split tile indexing them by its tile number, is reported. W8 partials are
int32: bit-identical to the unsplit kernel; W4: exact to the reference's tolerance, identical across two runs,
and the whole tiles bit-identical to the unsplit kernel. Planted mapping bugs: test_gemm_sm90_splitk_mutants.py.
The real schedule (132 SMs, M = 512, N = 4608: 240 CTAs, ~6 s with the race checker off) is the last test here,
and on a GPU in test_gemm_sm90_tailsplit_cuda.py."""
import pytest
import torch

from ditq.testing import assert_gemm_w4a8, assert_gemm_w8a8
# the Hopper split-K tests' helpers (which take the unsplit Hopper tests' setup: backend, tile ids, inputs)
from test_gemm_sm90_splitk_emulated import BASE, _bits, _inputs, _opts, _w4a8, _w8a8, fused_inputs
from test_gemm_sm90_splitk_emulated import pytestmark  # noqa: F401

# 250 rows (2 row tiles of 128, the second partial) x 500 columns (4 column tiles) = 8 tiles on 6 SMs: one wave
# of 6 whole tiles and a tail of 2, split min(6 // 2, k units) = 3 ways at K = 400 (4 units of 128).
M, N, SMS = 250, 500, 6
W8_TILE, W4_TILE = BASE + 1, BASE + 2  # the 128 x 128 tiles (the table's choice at M = 250)


def _schedule(tiles, units, sms):
    """(dp_tiles, splits) of the build's sm90_auto_schedule."""
    return tuple(torch.ops.ditq_C.gemm_sm90_schedule(tiles, units, sms))


def test_schedule_of_the_build():
    """The documented cases (static_asserts in configs/gemm_tiles_sm90.h) through the op, and the ones below."""
    assert _schedule(144, 9, 132) == (132, 9)  # DiT-XL/2 fc1 at batch 1: 132 whole + 12 tails x 9
    assert _schedule(36, 9, 132) == (0, 3)  # under a wave: uniform split, as before
    assert _schedule(108, 9, 132) == (108, 1) and _schedule(264, 36, 132) == (264, 1)
    assert _schedule(8, 4, SMS) == (6, 3) and _schedule(2 * 3, 4, 4) == (4, 2)
    # the cap of M's bucket (kSm90TileRules' max_splits: 16 everywhere as shipped), and forced counts: the
    # last wave's tiles split S ways, the full waves before it whole (under one wave, and at one, every tile)
    op = torch.ops.ditq_C.gemm_sm90_schedule
    assert [torch.ops.ditq_C.gemm_sm90_max_splits(m) for m in (1, 16, 17, 512, 4097, 1 << 40)] == [16] * 6
    assert tuple(op(1, 99, 132, 512)) == (0, 16) and tuple(op(144, 9, 132, 512)) == (132, 9)
    assert [tuple(op(t, 9, 132, -1, s)) for t, s in ((144, 4), (36, 4), (132, 2), (264, 2), (144, 1))] == \
        [(132, 4), (0, 4), (0, 2), (132, 2), (144, 1)]
    with pytest.raises(ValueError, match=r"forced split count must be in \[1, 9\] .*got 10"):
        op(144, 9, 132, -1, 10)


def _tail_rows_cols(tile_m, tile_n, sms=SMS, m=M, n=N):
    """Boolean [m, n] mask of the elements in the tail tiles (tile index >= the whole tiles, n fastest)."""
    tn = -(-n // tile_n)
    tiles = -(-m // tile_m) * tn
    whole = tiles - tiles % sms
    idx = (torch.arange(m)[:, None] // tile_m) * tn + torch.arange(n)[None, :] // tile_n
    return idx >= whole


def test_w8a8_tail_split_bit_identical():
    a, sa, w, sw, b = _inputs(M, N, 400, seed=51)
    with _opts(arch="sm_90a", sm_count=SMS):
        y = _w8a8(a, sa, w, sw, b, dtype=torch.bfloat16)  # tile and schedule automatic: 6 whole + 2 x 3
        y_forced = _w8a8(a, sa, w, sw, b, W8_TILE, None, dtype=torch.bfloat16)  # the tile forced, splits auto
        y1 = _w8a8(a, sa, w, sw, b, W8_TILE, 1, dtype=torch.bfloat16)
    assert_gemm_w8a8(y1, a, sa, w, sw, b, what="Hopper W8A8 128x128 unsplit")
    assert torch.equal(_bits(y), _bits(y1)), "tail-split schedule differs from the unsplit kernel"
    assert torch.equal(_bits(y_forced), _bits(y1))


def test_forced_count_splits_the_tail():
    """A forced count past one wave splits the last wave's tiles only (the tuner's tail count): 8 tiles on 6 SMs
    forced to 2 and 4 slices run 6 whole tiles + 2 x S (12 / 14 CTAs: the binding sizes counters and workspace for
    the 2 tail tiles, and the checker reports a whole tile touching them), bit for bit the unsplit kernel; W4:
    the whole tiles' bits are the unsplit kernel's, the tail's are not (its fp32 partials were split)."""
    a, sa, w, sw, b = _inputs(M, N, 512, seed=55)
    a4, sa4, q, ss, b4 = _inputs(M, N, 512, w4_group=128, seed=56)
    tail = _tail_rows_cols(128, 128)
    with _opts(arch="sm_90a", sm_count=SMS):
        y1 = _w8a8(a, sa, w, sw, b, W8_TILE, 1)
        ys = [_w8a8(a, sa, w, sw, b, W8_TILE, s) for s in (2, 4)]
        z1 = _w4a8(a4, sa4, q, ss, b4, 128, W4_TILE, 1)
        z4 = _w4a8(a4, sa4, q, ss, b4, 128, W4_TILE, 4)
    assert_gemm_w8a8(y1, a, sa, w, sw, b, what="Hopper W8A8 128x128 unsplit")
    assert all(torch.equal(_bits(y), _bits(y1)) for y in ys), "a forced tail split differs from the unsplit kernel"
    assert_gemm_w4a8(z4, a4, sa4, q, ss, 128, b4, what="Hopper W4A8 forced tail x 4")
    assert torch.equal(_bits(z4)[~tail], _bits(z1)[~tail]), "a forced count split a tile of the full wave"
    assert not torch.equal(_bits(z4)[tail], _bits(z1)[tail]), "the tail tiles were not split"


@pytest.mark.parametrize("group", (64, 128))
def test_w4a8_tail_split_exact_and_repeatable(group):
    k = 448 if group == 64 else 512  # 4 units of 128 k (the last one partial at G = 64)
    a, sa, q, ss, b = _inputs(M, N, k, w4_group=group, seed=52 + group)
    with _opts(arch="sm_90a", sm_count=SMS):
        y = _w4a8(a, sa, q, ss, b, group)
        again = _w4a8(a, sa, q, ss, b, group)
        y1 = _w4a8(a, sa, q, ss, b, group, W4_TILE, 1)
    assert_gemm_w4a8(y, a, sa, q, ss, group, b, what=f"Hopper W4A8 g{group} tail split")
    assert torch.equal(_bits(y), _bits(again)), "the tail's partials are added in a fixed order"
    tail = _tail_rows_cols(128, 128)
    # whole tiles run the unsplit kernel: its bits; the tail's fp32 partials round differently somewhere (they
    # are split: this is what shows the schedule ran)
    assert torch.equal(_bits(y)[~tail], _bits(y1)[~tail]), "whole tiles differ from the unsplit kernel"
    assert not torch.equal(_bits(y)[tail], _bits(y1)[tail]), "the tail tiles were not split"


@pytest.mark.parametrize("group", (None, 64))
def test_tail_split_fused_epilogue(group):
    """Gate + fp32 residual on a tail-split launch: the plain tail-split GEMM followed by the same fp32 ops, bit
    for bit; int8 out (W8): the unsplit fused kernel's bytes (int32 partials: the same sums)."""
    a, sa, w, sw, b, pw, ps, gate, residual = fused_inputs(M, N, 448, group, seed=61, gate_rows=2)
    out_scale = torch.tensor([0.05])
    tile = W8_TILE if group is None else W4_TILE
    with _opts(arch="sm_90a", sm_count=SMS):
        if group is None:
            y = _w8a8(a, sa, w, sw, b)
            f = torch.ops.ditq_C.gemm_w8a8_fused(a, sa, pw, ps, b, False, gate, residual, M // 2, None,
                                                 torch.float32, -1, -1)
            q = torch.ops.ditq_C.gemm_w8a8_fused(a, sa, pw, ps, b, True, gate, None, M // 2, out_scale,
                                                 torch.float32, -1, -1)
            q1 = torch.ops.ditq_C.gemm_w8a8_fused(a, sa, pw, ps, b, True, gate, None, M // 2, out_scale,
                                                  torch.float32, tile, 1)
            assert q.dtype == torch.int8 and torch.equal(q, q1), "int8-out fused tail split != unsplit"
        else:
            y = _w4a8(a, sa, w, sw, b, group)
            f = torch.ops.ditq_C.gemm_w4a8_fused(a, sa, pw, ps, b, group, False, gate, residual, M // 2, None,
                                                 torch.float32, -1, -1)
    expect = y * gate.repeat_interleave(M // 2, 0) + residual
    assert torch.equal(_bits(f), _bits(expect)), f"group {group}: fused epilogue on the tail-split launch"


ORDERS = (("forward", 0), ("reverse", 0), ("random", 1), ("random", 2))


@pytest.mark.parametrize("order,seed", ORDERS)
@pytest.mark.parametrize("landing", ("issue", "wait"))
def test_tail_split_orders_and_landing(order, seed, landing):
    """Every fiber order and landing time with the race checker on, 2 x 2 tiles on 3 SMs = 3 whole + 1 tail x 3
    slices: W8 on the 64 x 128 tile, 3 k tiles per slice through the 6-stage ring (K = 1136); W4 G = 256 on the
    64 x 64 tile, one group per slice (K = 768)."""
    a, sa, w, sw, b = _inputs(70, 131, 1136, seed=71)
    a4, sa4, q, ss, b4 = _inputs(70, 100, 768, w4_group=256, seed=72)
    with _opts(order=order, seed=seed, async_landing=landing, arch="sm_90a", sm_count=3):
        y8 = _w8a8(a, sa, w, sw, b, BASE, None)
        y4 = _w4a8(a4, sa4, q, ss, b4, 256, BASE + 1, None)
    assert_gemm_w8a8(y8, a, sa, w, sw, b)
    assert_gemm_w4a8(y4, a4, sa4, q, ss, 256, b4)


def test_sm_count_option_checked():
    from ditq.emulator import emulator_options, get_emulator_options
    with pytest.raises(ValueError, match="sm_count"):
        with emulator_options(sm_count=0):
            pass
    with emulator_options(sm_count=5):
        assert get_emulator_options().sm_count == 5
    assert get_emulator_options().sm_count == 132


def test_dit_fc1_batch1_schedule():
    """DiT-XL/2 fc1 at batch 1 with guidance (M = 512, N = 4608, K = 1152) as on an H100 / H200 (132 SMs):
    144 tiles of 128 x 128 = 132 whole + 12 tails x 9 slices; bit-identical to the unsplit kernel."""
    from ditq.emulator import emulator_options
    a, sa, w, sw, b = _inputs(512, 4608, 1152, seed=81)
    with emulator_options(arch="sm_90a", race_check=False):
        y = _w8a8(a, sa, w, sw, b, dtype=torch.bfloat16)
        y1 = _w8a8(a, sa, w, sw, b, W8_TILE, 1, dtype=torch.bfloat16)
    assert torch.equal(_bits(y), _bits(y1))
    assert_gemm_w8a8(y, a, sa, w, sw, b)

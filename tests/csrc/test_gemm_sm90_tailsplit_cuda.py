"""The Hopper GEMMs' automatic schedule on a real sm_90 GPU (configs/gemm_tiles_sm90.h sm90_auto_schedule): DiT-XL/2
fc1 at batch 1 with guidance (M = 512, N = 4608, K = 1152) is 144 tiles of 128 x 128, on 132 SMs one wave of 132
whole tiles and 12 tails split 9 ways, where the tails' slices and the whole tiles really run at once. W8: bit
for bit the unsplit kernel; W4: exact and repeatable; both equal to the emulator scheduling for the GPU's SM
count (at K = 256, 2 slices per tail tile: the emulator's share of the GPU run stays a few seconds). Skipped
without an sm_90 GPU and a build with sm_90a code; benchmarks/gpu_suite.sh runs them (pytest -m cuda)."""
import pytest
import torch

from ditq.testing import assert_gemm_w4a8, assert_gemm_w8a8
# the unsplit Hopper GPU tests' inputs and runner (the hopper_pair fixture, which skips without an sm_90 GPU and
# both CUDA backends: conftest.py)
from test_gemm_sm90_cuda import BASE, _inputs, _run, pytestmark  # noqa: F401

M, N, K = 512, 4608, 1152


def _emulated(cb, *args):
    from ditq.emulator import emulator_options
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    with emulator_options(arch="sm_90a", sm_count=sms, race_check=False):  # the GPU's schedule
        return _run(cb, "cuda-emulated", "cpu", *args)


def test_schedule_on_this_gpu(hopper_pair):
    """What the tests below run: on an H100 / H200 (132 SMs) 132 whole tiles + 12 tails x 9 slices."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    dp, s = torch.ops.ditq_C.gemm_sm90_schedule(4 * 36, K // 128, sms)
    if sms == 132:
        assert (dp, s) == (132, 9)
    else:
        print(f"\n{sms} SMs: {dp} whole tiles, {144 - dp} split {s} ways")


@pytest.mark.parametrize("group", (None, 64))
def test_tail_split_on_gpu(hopper_pair, group):
    """fc1 itself (12 tails x 9 slices on 132 SMs): W8 the unsplit kernel's bits, W4 exact and repeatable."""
    cb = hopper_pair
    a, sa, w, sw, b = _inputs(M, N, K, group, seed=91)
    y = _run(cb, "cuda", "cuda", a, sa, w, sw, b, group, torch.bfloat16, None, None)  # tile and schedule auto
    again = _run(cb, "cuda", "cuda", a, sa, w, sw, b, group, torch.bfloat16, None, None)
    assert torch.equal(y.view(torch.int16), again.view(torch.int16)), f"group {group}: not repeatable"
    if group is None:
        y1 = _run(cb, "cuda", "cuda", a, sa, w, sw, b, None, torch.bfloat16, BASE + 1, 1)
        assert torch.equal(y.view(torch.int16), y1.view(torch.int16)), "tail split != unsplit kernel"
        assert_gemm_w8a8(y, a, sa, w, sw, b, what="sm_90 W8A8 fc1 tail split")
    else:
        assert_gemm_w4a8(y, a, sa, w, sw, group, b, what=f"sm_90 W4A8 g{group} fc1 tail split")


@pytest.mark.parametrize("group", (None, 64))
def test_tail_split_on_gpu_equals_emulator(hopper_pair, group):
    """The same 144 tiles at K = 256 (2 k units: 12 tails x 2 slices), so that the emulator, scheduling for
    this GPU's SM count, runs them in seconds: bit for bit the GPU's output."""
    cb = hopper_pair
    a, sa, w, sw, b = _inputs(M, N, 256, group, seed=92)
    y = _run(cb, "cuda", "cuda", a, sa, w, sw, b, group, torch.float32, None, None)
    ye = _emulated(cb, a, sa, w, sw, b, group, torch.float32, None, None)
    assert torch.equal(y.view(torch.int32), ye.view(torch.int32)), f"group {group}: GPU != emulator"


@pytest.mark.parametrize("group", (None, 64))
def test_forced_tail_counts_on_gpu(hopper_pair, group):
    """The tuner's tail counts (a forced count splits the last wave only): fc1 with its 12 tails forced to 2, 3
    and 4 slices: W8 the unsplit kernel's bits, W4 exact and repeatable; at K = 256 (2 k units) the forced
    tail x 2 equals the emulator's, scheduling for this GPU's SM count."""
    cb = hopper_pair
    tile = BASE + (1 if group is None else 2)  # 128 x 128, the table's choice at M = 512
    a, sa, w, sw, b = _inputs(M, N, K, group, seed=93)
    y1 = _run(cb, "cuda", "cuda", a, sa, w, sw, b, group, torch.bfloat16, tile, 1)
    for s in (2, 3, 4):
        y = _run(cb, "cuda", "cuda", a, sa, w, sw, b, group, torch.bfloat16, tile, s)
        if group is None:
            assert torch.equal(y.view(torch.int16), y1.view(torch.int16)), f"forced tail x {s} != unsplit"
        else:
            assert_gemm_w4a8(y, a, sa, w, sw, group, b, what=f"sm_90 W4A8 g{group} fc1 forced tail x {s}")
            again = _run(cb, "cuda", "cuda", a, sa, w, sw, b, group, torch.bfloat16, tile, s)
            assert torch.equal(y.view(torch.int16), again.view(torch.int16)), f"tail x {s}: not repeatable"
    a, sa, w, sw, b = _inputs(M, N, 256, group, seed=94)
    y = _run(cb, "cuda", "cuda", a, sa, w, sw, b, group, torch.float32, tile, 2)
    ye = _emulated(cb, a, sa, w, sw, b, group, torch.float32, tile, 2)
    assert torch.equal(y.view(torch.int32), ye.view(torch.int32)), f"group {group}: forced tail GPU != emulator"

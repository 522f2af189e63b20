"""Split-K of the Hopper GEMMs (csrc/gemm_sm90.cuh) on a real sm_90 GPU, where the split CTAs of a tile really
run at once and the fences and the atomic count matter: exact against the integer reference, W8 bit for bit
equal to the unsplit kernel for every split count, W4 repeatable for one count, and equal to the emulator bit
for bit. Includes DiT-XL/2's batch-1 shapes (M = 512), where the automatic choice splits K. Skipped without an
sm_90 GPU and a build with sm_90a code; benchmarks/gpu_suite.sh runs them (pytest -m cuda)."""
import pytest
import torch

from ditq.testing import assert_gemm_w4a8, assert_gemm_w8a8
# the unsplit Hopper GPU tests' inputs and runner (the hopper_pair fixture: conftest.py)
from test_gemm_sm90_cuda import BASE, _inputs, pytestmark  # noqa: F401
from test_gemm_sm90_cuda import _run as run_sm90


def _run(cb, backend, device, a, sa, w, sw, b, group, tile, splits, dtype=torch.float32):
    return run_sm90(cb, backend, device, a, sa, w, sw, b, group, dtype, tile, splits)


def _emulated(cb, *args):
    from ditq.emulator import emulator_options
    with emulator_options(arch="sm_90a"):
        return _run(cb, "cuda-emulated", "cpu", *args)


@pytest.mark.parametrize("tile", (BASE, BASE + 1, BASE + 2))
def test_w8a8_sm90_splits_on_gpu(hopper_pair, tile):
    for m, n, k in ((1, 9, 400), (512, 1152, 1152), (512, 1152, 4608)):
        a, sa, w, sw, b = _inputs(m, n, k, None, seed=m + tile)
        y1 = _run(hopper_pair, "cuda", "cuda", a, sa, w, sw, b, None, tile, 1)
        assert_gemm_w8a8(y1, a, sa, w, sw, b, what=f"sm_90 W8A8 tile {tile} {(m, n, k)}")
        for s in (2, 3, 4, 16, None):
            if s == 16 and k < 16 * 128:
                continue
            y = _run(hopper_pair, "cuda", "cuda", a, sa, w, sw, b, None, tile, s)
            assert torch.equal(y.view(torch.int32), y1.view(torch.int32)), f"tile {tile} {(m, n, k)} splits={s}"
    a, sa, w, sw, b = _inputs(33, 67, 400, None, seed=tile)
    for s in (3, None):
        y = _run(hopper_pair, "cuda", "cuda", a, sa, w, sw, b, None, tile, s)
        ye = _emulated(hopper_pair, a, sa, w, sw, b, None, tile, s)
        assert torch.equal(y.view(torch.int32), ye.view(torch.int32)), f"tile {tile} splits={s}: GPU != emulator"


@pytest.mark.parametrize("tile", (BASE, BASE + 1, BASE + 2))
@pytest.mark.parametrize("group", (32, 64, 128, 256))
def test_w4a8_sm90_splits_on_gpu(hopper_pair, tile, group):
    for m, n, k in ((1, 9, 1024), (512, 1152, 1152 if group != 256 else 1280), (512, 1152, 4608)):
        a, sa, q, ss, b = _inputs(m, n, k, group, seed=m + group + tile)
        for s in (1, 3, None):
            y = _run(hopper_pair, "cuda", "cuda", a, sa, q, ss, b, group, tile, s, torch.bfloat16)
            assert_gemm_w4a8(y, a, sa, q, ss, group, b, what=f"sm_90 W4A8 g{group} tile {tile} {(m, n, k)} s={s}")
            again = _run(hopper_pair, "cuda", "cuda", a, sa, q, ss, b, group, tile, s, torch.bfloat16)
            assert torch.equal(y.view(torch.int16), again.view(torch.int16)), f"splits={s} is not repeatable"
    a, sa, q, ss, b = _inputs(33, 67, 1024, group, seed=group + tile)
    y = _run(hopper_pair, "cuda", "cuda", a, sa, q, ss, b, group, tile, 3)
    ye = _emulated(hopper_pair, a, sa, q, ss, b, group, tile, 3)
    assert torch.equal(y.view(torch.int32), ye.view(torch.int32)), f"g{group} tile {tile}: GPU != emulator"

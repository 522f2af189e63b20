"""The Hopper GEMMs (csrc/gemm_sm90.cu) on a real sm_90 GPU: exact against the integer reference at ragged
shapes, every Hopper tile and W4 group size, and bit for bit equal to the same kernels run by the emulator.
Skipped without an sm_90 GPU and a build with sm_90a code; benchmarks/gpu_suite.sh runs them (pytest -m cuda)."""
import subprocess
import sys

import pytest
import torch

from ditq import backends
from ditq.format import WeightFormat
from ditq.quant import reference as ref
from ditq.testing import assert_gemm_w4a8, assert_gemm_w8a8, random_int4, random_int8

pytestmark = pytest.mark.cuda
BASE = 100  # kSm90TileBase, csrc/configs/gemm_tiles_sm90.h
W8_TILES = (100, 101, 102)
W4_TILES = (100, 101, 102)
GROUPS = (32, 64, 128, 256)


def _inputs(m, n, k, group, seed):
    g = torch.Generator().manual_seed(seed)
    a = random_int8(m, k, generator=g)
    sa = (torch.rand(m, generator=g) * 0.02 + 1e-3).float()
    b = (torch.randn(n, generator=g) * 4).float()
    if group is None:
        return a, sa, random_int8(n, k, low=-128, generator=g), (torch.rand(n, generator=g) * 0.01).float(), b
    return a, sa, random_int4(n, k, generator=g), (torch.rand(k // group, n, generator=g) * 0.05).float(), b


def _run(cb, backend, device, a, sa, w, sw, b, group, dtype, tile, splits=None):
    be = backends.get_backend(backend, device)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    with cb.gemm_tile(tile, splits):
        if device == "cuda":  # a NaN block of the output's size for the op's allocation to get back
            torch.full((a.shape[0], w.shape[0]), float("nan"), dtype=dtype, device="cuda")
        if group is None:
            pw, ps = be.prepare_weight(WeightFormat(8), w, sw)
            return torch.ops.ditq.gemm_w8a8(to(a), to(sa), to(pw), to(ps), to(b), dtype, backend).cpu()
        pw, ps = be.prepare_weight(WeightFormat(4, group), ref.pack_int4(w), sw)
        return torch.ops.ditq.gemm_w4a8(to(a), to(sa), to(pw), to(ps), to(b), group, dtype, backend).cpu()


@pytest.mark.parametrize("tile", W8_TILES)
@pytest.mark.parametrize("shape", ((1, 9, 80), (70, 131, 1040), (300, 1152, 1152)))
def test_w8a8_sm90_exact_and_equal_to_emulator(hopper_pair, tile, shape):
    m, n, k = shape
    a, sa, w, sw, b = _inputs(m, n, k, None, seed=m + tile)
    for dtype in (torch.float32, torch.bfloat16):
        y = _run(hopper_pair, "cuda", "cuda", a, sa, w, sw, b, None, dtype, tile)
        assert_gemm_w8a8(y, a, sa, w, sw, b, what=f"sm_90 W8A8 tile {tile} {shape} {dtype}")
        if m * n * k <= 70 * 131 * 1040:  # the emulator is slow
            from ditq.emulator import emulator_options
            with emulator_options(arch="sm_90a"):
                ye = _run(hopper_pair, "cuda-emulated", "cpu", a, sa, w, sw, b, None, dtype, tile)
            assert torch.equal(y.view(torch.int8), ye.view(torch.int8)), "GPU and emulator differ"


@pytest.mark.parametrize("tile", W4_TILES)
@pytest.mark.parametrize("group", GROUPS)
def test_w4a8_sm90_exact_and_equal_to_emulator(hopper_pair, tile, group):
    k = {32: 96, 64: 320, 128: 1152, 256: 1280}[group]
    for m, n in ((1, 9), (33, 67), (200, 1152)):
        a, sa, q, ss, b = _inputs(m, n, k, group, seed=m + group + tile)
        y = _run(hopper_pair, "cuda", "cuda", a, sa, q, ss, b, group, torch.bfloat16, tile)
        assert_gemm_w4a8(y, a, sa, q, ss, group, b, what=f"sm_90 W4A8 g{group} tile {tile} {(m, n, k)}")
        if m * n <= 33 * 67:
            from ditq.emulator import emulator_options
            with emulator_options(arch="sm_90a"):
                ye = _run(hopper_pair, "cuda-emulated", "cpu", a, sa, q, ss, b, group, torch.bfloat16, tile)
            assert torch.equal(y.view(torch.int16), ye.view(torch.int16)), "GPU and emulator differ"


@pytest.mark.parametrize("group", GROUPS)
def test_w4a8i_sm90_equal_to_emulator_and_to_w8a8(hopper_pair, group):
    """W4A8 with integer group scales (ditq_C::gemm_w4a8i) on the GPU: bit for bit the emulator's result and the
    Hopper W8A8 kernel's on the expanded weight q * w (one int32 sum over K in both), and exact against the integer
    reference; every tile, forced split counts included (int32 partials: the same bits)."""
    from test_gemm_sm90_int_scales_emulated import _inputs as int_inputs, _packed

    from ditq.emulator import emulator_options
    k = {32: 96, 64: 320, 128: 1152, 256: 1280}[group]
    for tile in W4_TILES:
        for m, n in ((1, 9), (33, 67), (512, 1152)):
            a, sa, w, qs, sc, b = int_inputs(m, n, k, group, seed=m + group + tile)
            pw = _packed(w, group)
            cuda = [t.cuda() for t in (a, sa, pw, qs, sc, b)]
            torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")  # for the allocator to hand back
            y = torch.ops.ditq_C.gemm_w4a8i(*cuda, group, torch.bfloat16, tile, -1).cpu()
            wq = ref.expand_int_group_scales(w, qs, group)
            what = f"sm_90 W4A8 integer scales g{group} tile {tile} {(m, n, k)}"
            assert_gemm_w8a8(y, a, sa, wq, sc, b, what=what)
            y8 = torch.ops.ditq_C.gemm_w8a8(*[t.cuda() for t in (a, sa, wq, sc, b)], torch.bfloat16, BASE, -1).cpu()
            assert torch.equal(y.view(torch.int16), y8.view(torch.int16)), f"{what}: differs from W8A8 on q * w"
            ys = torch.ops.ditq_C.gemm_w4a8i(*cuda, group, torch.bfloat16, tile, 2 if k >= 2 * max(group, 128) else 1)
            assert torch.equal(y.view(torch.int16), ys.cpu().view(torch.int16)), f"{what}: split count changed bits"
            if m * n <= 33 * 67:
                with emulator_options(arch="sm_90a"):
                    ye = torch.ops.ditq_C.gemm_w4a8i(a, sa, pw, qs, sc, b, group, torch.bfloat16, tile, -1)
                assert torch.equal(y.view(torch.int16), ye.view(torch.int16)), f"{what}: GPU and emulator differ"


def test_automatic_choice_runs_on_sm90(hopper_pair):
    """No tile forced: the binding's own choice on sm_90 (the Hopper kernels) is exact at a DiT-like shape."""
    assert torch.ops.ditq_C.gemm_sm90_available(), "the runtime did not load this build's sm_90a code"
    a, sa, w, sw, b = _inputs(512, 1152, 1152, None, seed=3)
    y = _run(hopper_pair, "cuda", "cuda", a, sa, w, sw, b, None, torch.bfloat16, None)
    assert_gemm_w8a8(y, a, sa, w, sw, b)
    a, sa, q, ss, b = _inputs(512, 1152, 1152, 128, seed=4)
    y = _run(hopper_pair, "cuda", "cuda", a, sa, q, ss, b, 128, torch.bfloat16, None)
    assert_gemm_w4a8(y, a, sa, q, ss, 128, b)


# Run in a fresh interpreter: no ditq GEMM has run in it yet, so the sm_90a probe is asked inside the capture.
FIRST_GEMM_CAPTURED = r"""
import torch
from ditq import backends
from ditq.format import WeightFormat
from ditq.testing import assert_gemm_w8a8, random_int8

g = torch.Generator().manual_seed(5)
m, n, k = 512, 1152, 1152
a = random_int8(m, k, generator=g)
sa = (torch.rand(m, generator=g) * 0.02 + 1e-3).float()
w = random_int8(n, k, low=-128, generator=g)
sw = (torch.rand(n, generator=g) * 0.01).float()
b = (torch.randn(n, generator=g) * 4).float()
pw, ps = backends.get_backend("cuda", "cuda").prepare_weight(WeightFormat(8), w, sw)
args = [t.cuda() for t in (a, sa, pw, ps, b)]
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):  # capture_error_mode "global": synchronous calls from any thread are refused
    y = torch.ops.ditq_C.gemm_w8a8(*args, torch.bfloat16)
y.fill_(float("nan"))
graph.replay()
torch.cuda.synchronize()
assert torch.ops.ditq_C.gemm_sm90_available(), "the probe answered no inside the capture"
assert_gemm_w8a8(y.cpu(), a, sa, w, sw, b, what="the process's first GEMM, captured")
print("captured")
"""


def test_first_gemm_of_a_process_inside_a_cuda_graph_capture(hopper_pair):
    """The sm_90a probe is stream-free (csrc/sm90a_marker.cuh): a capture that holds the process's first GEMM is
    not invalidated, and the Hopper kernels still run in it."""
    r = subprocess.run([sys.executable, "-c", FIRST_GEMM_CAPTURED], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "captured" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]

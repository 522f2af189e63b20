"""The real CUDA GEMMs with a fused epilogue on a GPU (backend "cuda": ditq_C::gemm_w8a8_fused /
gemm_w4a8_fused), equal bit for bit to the same kernels run by the SIMT emulator on the same inputs (GELU's
expf excepted: within the contract's tolerance). Skipped without a GPU; benchmarks/gpu_suite.sh runs them
(pytest -m cuda)."""
import pytest
import torch

from ditq import backends
from ditq.format import WeightFormat
from ditq.quant import reference as ref
from ditq.testing import random_int4, random_int8

pytestmark = pytest.mark.cuda


def _problem(m, n, k, group, seed):
    g = torch.Generator().manual_seed(seed)
    a = random_int8(m, k, generator=g)
    sa = (torch.rand(m, generator=g) * 0.02 + 1e-3).float()
    b = (torch.randn(n, generator=g) * 4).float()
    be = backends.get_backend("cuda-emulated", "cpu")
    if group is None:
        w, ws = be.prepare_weight(WeightFormat(8), random_int8(n, k, low=-128, generator=g),
                                  (torch.rand(n, generator=g) * 0.01 + 1e-4).float())
    else:
        w, ws = be.prepare_weight(WeightFormat(4, group), ref.pack_int4(random_int4(n, k, generator=g)),
                                  (torch.rand(k // group, n, generator=g) * 0.05 + 1e-4).float())
    gate = torch.randn(m // 2, n, generator=g) * 2
    residual = torch.randn(m, n, generator=g) * 3
    return a, sa, w, ws, b, gate, residual


def _fused(dev, group, args, gelu, gate, residual, out_scale, out_dtype, tile, splits):
    a, sa, w, ws, b = (t.to(dev) for t in args)
    to = lambda t: None if t is None else t.to(dev)  # noqa: E731
    res = None if residual is None else residual.to(out_dtype)
    if dev == "cuda":  # poison the allocation the op gets back: an element never written stays NaN / -1
        torch.full((a.shape[0], gate.shape[1]), -1, dtype=torch.int8 if out_scale is not None else out_dtype,
                   device="cuda")
    if group is None:
        y = torch.ops.ditq_C.gemm_w8a8_fused(a, sa, w, ws, b, gelu, to(gate), to(res), 2, to(out_scale), out_dtype,
                                             tile, splits)
    else:
        y = torch.ops.ditq_C.gemm_w4a8_fused(a, sa, w, ws, b, group, gelu, to(gate), to(res), 2, to(out_scale),
                                             out_dtype, tile, splits)
    return y.cpu()


@pytest.mark.parametrize("group", (None, 32, 128), ids=("w8", "w4g32", "w4g128"))
@pytest.mark.parametrize("tile", (0, 1, 2))
def test_fused_gemm_equals_the_emulated_kernel(cuda_pair, group, tile):
    a, sa, w, ws, b, gate, residual = _problem(34, 70, 384, group, seed=tile + (group or 0))
    scale = torch.tensor([0.05])
    for splits in (1, -1):
        for out_dtype, g, r, s in ((torch.bfloat16, gate, residual, None), (torch.float16, gate, residual, scale),
                                   (torch.float32, None, residual, None), (torch.float32, gate, None, scale)):
            args = (a, sa, w, ws, b)
            got = _fused("cuda", group, args, False, g, r, s, out_dtype, tile, splits)
            want = _fused("cpu", group, args, False, g, r, s, out_dtype, tile, splits)
            assert torch.equal(got, want), f"tile {tile} splits {splits} {out_dtype} int8={s is not None}"


@pytest.mark.parametrize("group", (None, 64), ids=("w8", "w4g64"))
def test_fused_gelu_within_the_contract(cuda_pair, group):
    a, sa, w, ws, b, gate, residual = _problem(16, 40, 256, group, seed=5)
    sa = sa * 20
    args = (a, sa, w, ws, b)
    got = _fused("cuda", group, args, True, None, None, None, torch.float32, -1, 1)
    want = _fused("cpu", group, args, True, None, None, None, torch.float32, -1, 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-30)


# ---- the Hopper kernels with the fused epilogue (csrc/gemm_sm90_fused.cu), on an sm_90 GPU ---------------------

SM90_BASE = 100  # kSm90TileBase, csrc/configs/gemm_tiles_sm90.h
SM90_K = {None: 400, 32: 416, 64: 448, 128: 384, 256: 512}  # K % G == 0, and not a multiple of 128 below G = 128


def _sm90_tiles(w4):
    out = []
    while True:
        try:
            torch.ops.ditq_C.gemm_sm90_tile_info(SM90_BASE + len(out), w4)
        except (RuntimeError, ValueError):
            return [SM90_BASE + i for i in range(len(out))]
        out.append(SM90_BASE + len(out))


@pytest.mark.parametrize("group", (None, 32, 64, 128, 256), ids=("w8", "w4g32", "w4g64", "w4g128", "w4g256"))
def test_sm90_fused_gemm_equals_the_emulated_kernel(hopper_pair, group):
    """Every Hopper tile, every piece but GELU: the real kernel's bits are the emulated Hopper kernel's (odd N,
    M = 34 with a gate per 2 rows, K not a multiple of the 128-k stage below G = 128); the automatic choice on
    this GPU is the forced Hopper tile of its M bucket."""
    scale = torch.tensor([0.05])
    for tile in _sm90_tiles(group is not None):
        a, sa, w, ws, b, gate, residual = _problem(34, 71, SM90_K[group], group, seed=tile + (group or 0))
        args = (a, sa, w, ws, b)
        for out_dtype, g, r, s in ((torch.bfloat16, gate, residual, None), (torch.float16, gate, residual, scale),
                                   (torch.float32, None, residual, None), (torch.float32, gate, None, scale),
                                   (torch.bfloat16, None, None, None)):
            got = _fused("cuda", group, args, False, g, r, s, out_dtype, tile, -1)
            want = _fused("cpu", group, args, False, g, r, s, out_dtype, tile, -1)
            assert torch.equal(got, want), f"Hopper tile {tile} {out_dtype} int8={s is not None}"
    a, sa, w, ws, b, gate, residual = _problem(34, 71, SM90_K[group], group, seed=99)
    args = (a, sa, w, ws, b)
    auto = _fused("cuda", group, args, False, gate, residual, scale, torch.float32, -1, -1)
    forced = _fused("cuda", group, args, False, gate, residual, scale, torch.float32, SM90_BASE + (0 if group is None
                                                                                                    else 1), -1)
    assert torch.equal(auto, forced), "M = 34: the automatic choice is Hopper tile 0 (W8) / 1 (W4)"


@pytest.mark.parametrize("group", (None, 64), ids=("w8", "w4g64"))
def test_sm90_fused_gelu_within_the_contract(hopper_pair, group):
    a, sa, w, ws, b, gate, residual = _problem(16, 40, 256, group, seed=5)
    args = (a, sa * 20, w, ws, b)
    for tile in _sm90_tiles(group is not None):
        got = _fused("cuda", group, args, True, None, None, None, torch.float32, tile, -1)
        want = _fused("cpu", group, args, True, None, None, None, torch.float32, tile, -1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-30)

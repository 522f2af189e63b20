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


@pytest.fixture(scope="module")
def cb():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    for name, dev in (("cuda", "cuda"), ("cuda-emulated", "cpu")):
        why = backends.unavailable_reason(name, dev)
        if why is not None:
            pytest.skip(f"backend {name!r} unavailable on {dev}: {why}")
    from ditq.backends import cuda_backend
    return cuda_backend


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
def test_fused_gemm_equals_the_emulated_kernel(cb, group, tile):
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
def test_fused_gelu_within_the_contract(cb, group):
    a, sa, w, ws, b, gate, residual = _problem(16, 40, 256, group, seed=5)
    sa = sa * 20
    args = (a, sa, w, ws, b)
    got = _fused("cuda", group, args, True, None, None, None, torch.float32, -1, 1)
    want = _fused("cpu", group, args, True, None, None, None, torch.float32, -1, 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-30)

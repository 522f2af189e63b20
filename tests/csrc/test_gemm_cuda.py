"""The real CUDA GEMMs (backend "cuda") on a GPU: exact against the integer reference, and bit for bit equal
to the same kernels run by the SIMT emulator (backend "cuda-emulated") on the same inputs. Skipped without a
GPU; benchmarks/gpu_suite.sh runs them (pytest -m cuda)."""
import pytest
import torch

from ditq import backends
from ditq.format import WeightFormat
from ditq.quant import reference as ref
from ditq.testing import assert_gemm_w4a8, assert_gemm_w8a8, random_int4, random_int8

pytestmark = pytest.mark.cuda


def _poisoned_alloc(m, n, dtype):
    # Leave a NaN block of the output's size in the caching allocator: the op's torch.empty gets it back, so
    # an element the kernel never writes stays NaN and fails the check.
    torch.full((m, n), float("nan"), dtype=dtype, device="cuda")


def _inputs(m, n, k, group, seed, per_token=True, bias=True):
    g = torch.Generator().manual_seed(seed)
    a = random_int8(m, k, generator=g)
    sa = (torch.rand(m if per_token else 1, generator=g) * 0.02 + 1e-3).float()
    b = (torch.randn(n, generator=g) * 4).float() if bias else None
    if group is None:
        return a, sa, random_int8(n, k, low=-128, generator=g), (torch.rand(n, generator=g) * 0.01).float(), b
    return a, sa, random_int4(n, k, generator=g), (torch.rand(k // group, n, generator=g) * 0.05).float(), b


def _run(cb, backend, device, a, sa, w, sw, b, group, dtype, tile, splits=None):
    be = backends.get_backend(backend, device)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    with cb.gemm_tile(tile, splits):
        if group is None:
            pw, ps = be.prepare_weight(WeightFormat(8), w, sw)
            if device == "cuda":
                _poisoned_alloc(a.shape[0], w.shape[0], dtype)
            return torch.ops.ditq.gemm_w8a8(to(a), to(sa), to(pw), to(ps), to(b), dtype, backend).cpu()
        pw, ps = be.prepare_weight(WeightFormat(4, group), ref.pack_int4(w), sw)
        if device == "cuda":
            _poisoned_alloc(a.shape[0], w.shape[0], dtype)
        return torch.ops.ditq.gemm_w4a8(to(a), to(sa), to(pw), to(ps), to(b), group, dtype, backend).cpu()


CASES = [(None, (1, 9, 80)), (None, (70, 130, 176)), (None, (300, 1152, 1152)),
         (32, (1, 9, 96)), (64, (33, 17, 192)), (128, (64, 1152, 1152)), (128, (257, 4608, 1152)),
         (256, (5, 7, 512))]


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("group,shape", CASES)
def test_cuda_matches_reference_and_emulator(cuda_pair, group, shape, dtype):
    m, n, k = shape
    for tile in range(cuda_pair.gemm_tile_count()):
        bk = torch.ops.ditq_C.gemm_tile_info(tile)[2]
        units = -(-k // max(bk, group or 0))  # split-K counts allowed: 1..units
        a, sa, w, sw, b = _inputs(m, n, k, group, seed=m + n + k + tile, per_token=tile != 1, bias=tile != 2)
        for splits in sorted({1, min(3, units), None}, key=str):
            y = _run(cuda_pair, "cuda", "cuda", a, sa, w, sw, b, group, dtype, tile, splits)
            what = f"cuda tile {tile} splits {splits} group {group} {shape} {dtype}"
            if group is None:
                assert_gemm_w8a8(y, a, sa, w, sw, b, what=what)
            else:
                assert_gemm_w4a8(y, a, sa, w, sw, group, b, what=what)
            if splits is not None and m * n * k <= 2 ** 22:
                y_emu = _run(cuda_pair, "cuda-emulated", "cpu", a, sa, w, sw, b, group, dtype, tile, splits)
                assert torch.equal(y.view(torch.uint8), y_emu.view(torch.uint8)), f"{what}: real != emulated"


def test_cuda_uses_current_stream(cuda_pair):
    a, sa, w, sw, b = _inputs(64, 256, 512, None, seed=9)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        y = _run(cuda_pair, "cuda", "cuda", a, sa, w, sw, b, None, torch.float32, None)
    assert_gemm_w8a8(y, a, sa, w, sw, b)

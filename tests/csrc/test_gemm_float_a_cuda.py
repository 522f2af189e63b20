"""The real CUDA fused GEMMs with a float A (csrc/gemm_fused_float_a.cu) on a GPU: bit for bit equal to the
same kernels under the SIMT emulator on the same inputs, and to quantize_act + the int8 fused kernel on the GPU.
Skipped without a GPU; benchmarks/gpu_suite.sh runs them (pytest -m cuda). GELU is left out of the emulator
comparison (its expf may differ in the last bit between libdevice and the host libm: epilogue.cuh)."""
import pytest
import torch

from ditq import backends
from ditq.format import WeightFormat
from ditq.quant import reference as ref
from ditq.testing import random_int4, random_int8

pytestmark = pytest.mark.cuda

SCALE = 0.0625


def _inputs(m, n, k, group, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 30 * SCALE
    ties = (torch.randint(-90, 90, (m, k), generator=g).float() + 0.5) * SCALE
    x = torch.where(torch.rand(m, k, generator=g) < 0.4, ties, x)
    x = torch.where(torch.rand(m, k, generator=g) < 0.05, x * 50, x)
    x.view(-1)[torch.randperm(m * k, generator=g)[:3]] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    bias = torch.randn(n, generator=g) * 4
    gate, res = torch.randn(1, n, generator=g) * 2, torch.randn(m, n, generator=g) * 3
    if group is None:
        w, sw = random_int8(n, k, low=-128, generator=g), torch.rand(n, generator=g) * 0.01 + 1e-4
        fmt = WeightFormat(8)
    else:
        w, sw = ref.pack_int4(random_int4(n, k, generator=g)), torch.rand(k // group, n, generator=g) * 0.05 + 1e-4
        fmt = WeightFormat(4, group)
    return x.to(dtype), bias, gate, res, fmt, w, sw


def _call(backend, device, group, a, a_s, w, ws, bias, pieces):
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    gelu, gate, res, rpg, out_scale, out_dtype = pieces
    p = (gelu, to(gate), to(res), rpg, to(out_scale), out_dtype, backend)
    if group is None:
        return torch.ops.ditq.gemm_w8a8_fused(to(a), to(a_s), to(w), to(ws), to(bias), *p).cpu()
    return torch.ops.ditq.gemm_w4a8_fused(to(a), to(a_s), to(w), to(ws), to(bias), group, *p).cpu()


@pytest.mark.parametrize("a_dtype", (torch.float32, torch.bfloat16, torch.float16), ids=("f32", "bf16", "f16"))
@pytest.mark.parametrize("group", (None, 32, 128), ids=("w8", "w4g32", "w4g128"))
def test_real_kernel_equals_the_emulator(cuda_pair, group, a_dtype):
    from ditq.backends import cuda_backend
    k = 384 if group == 128 else 208 if group is None else 160
    for m, n, splits in ((1, 1153, 1), (3, 17, 2), (70, 130, 1)):  # splits pinned: the SM counts may differ
        x, bias, gate, res, fmt, w, sw = _inputs(m, n, k, group, a_dtype, seed=m + k)
        a_s = torch.tensor([SCALE])
        for pieces in ((False, None, None, 1, None, torch.bfloat16),
                       (False, gate, res.bfloat16(), m, None, torch.bfloat16),
                       (False, gate, None, m, torch.tensor([0.05]), torch.float32)):
            got = {}
            for backend, device in (("cuda", "cuda"), ("cuda-emulated", "cpu")):
                pw, ps = backends.get_backend(backend, device).prepare_weight(fmt, w, sw)
                with cuda_backend.gemm_tile(None, splits):
                    got[backend] = _call(backend, device, group, x, a_s, pw, ps, bias, pieces)
                    if backend == "cuda" and m <= 16:  # and quantize_act + the int8 fused kernel, same tile
                        q, s = torch.ops.ditq.quantize_act(x.cuda(), a_s.cuda(), "cuda")
                        want = _call("cuda", "cuda", group, q, s, pw, ps, bias, pieces)
                        assert torch.equal(got["cuda"], want), f"M={m} vs quantize_act + int8"
            assert torch.equal(got["cuda"], got["cuda-emulated"]), f"M={m} N={n} pieces {pieces[4] is not None}"

"""The Triton fused GEMMs given a float A with a static scale (``A_FLOAT``): they quantize each A tile as they
load it, and must equal ``quantize_act`` followed by the same fused GEMM on int8 A bit for bit, every epilogue
piece included (GELU too: both sides run the same kernel's epilogue on the same integers).

Inputs hold what decides quantize_act's rounding: values at exact .5 ties of x / s (half to even, not away
from zero), values past the int8 range (clamped to +-127), NaN (-> 0) and +-inf (-> +-127). Shapes are
ragged: M = 1 and 3, N odd, K a multiple of the group but not of the step, so the masked K tail (W8A8) and
the short last pack block (W4A8 at G = 32) load float lanes with ``other=0.0``, which the poison fixture of
conftest.py would otherwise fill with NaN. Outputs are poisoned before each call.
"""
import zlib

import pytest
import torch

from ditq import testing
from ditq.kernels import w4a8, w8a8
from ditq.kernels.quantize_act import quantize_act
from ditq.quant import reference as ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

W8_CFG = {False: dict(BM=16, BN=16, BK=32, GROUP_M=2, SWAP_AB=False, USE_TMA=False, num_warps=1, num_stages=1),
          True: dict(BM=16, BN=32, BK=32, GROUP_M=2, SWAP_AB=True, USE_TMA=False, num_warps=1, num_stages=1)}


def _w4_cfg(swap):
    return dict(BM=16, BN=16, BK=64, GROUP_M=2, SWAP_AB=swap, UNPACK_ASM=False, num_warps=4, num_stages=2)


# (kernel, group size, K): K not a multiple of the step (W8A8 BK = 32; W4A8 G = 32: an odd number of groups)
KERNELS = [("w8a8", None, 80), ("w4a8", 32, 96), ("w4a8", 128, 384)]
# (name, gelu, gate, residual, int8 out): adaLN's plain linear, the gated residual, fc1 feeding a static fc2
COMBOS = [("plain", False, False, False, False), ("gate-residual", False, True, True, False),
          ("gelu-quant", True, False, False, True)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SCALE = 0.03125  # a power of two: (j + 0.5) * SCALE is an exact tie of x / s in every input dtype


def _float_a(m, k, dtype, gen):
    """Random values, exact ties of x / s, values beyond +-127 s, and NaN / +-inf, shuffled over [M, K]."""
    x = torch.randn(m, k, generator=gen) * 40 * SCALE
    ties = (torch.randint(-100, 100, (m, k), generator=gen).float() + 0.5) * SCALE
    x = torch.where(torch.rand(m, k, generator=gen) < 0.4, ties, x)
    x = torch.where(torch.rand(m, k, generator=gen) < 0.05, x * 50, x)  # saturate
    flat = x.reshape(-1)
    idx = torch.randperm(flat.numel(), generator=gen)[:6]
    flat[idx] = torch.tensor([float("nan"), float("nan"), float("inf"), float("-inf"), float("inf"), 0.0])
    return x.to(dtype)


def _run(kernel, group, a, a_s, w, w_s, b, gelu, gate, res, rows, out_scale, out_dtype, swap):
    m, n = a.shape[0], w_s.shape[-1]
    if out_scale is not None:
        out = torch.full((m, n), -128, dtype=torch.int8, device=DEVICE)  # a value the int8 tail never writes
    else:
        out = torch.full((m, n), float("nan"), dtype=out_dtype, device=DEVICE)
    if kernel == "w8a8":
        y = w8a8.gemm_w8a8_fused(a, a_s, w, w_s, b, gelu, gate, res, rows, out_scale, out_dtype, out=out,
                                 config=W8_CFG[swap])
    else:
        y = w4a8.gemm_w4a8_fused(a, a_s, w, w_s, b, group, gelu, gate, res, rows, out_scale, out_dtype, out=out,
                                 config=_w4_cfg(swap))
    assert y is out
    return y.cpu()


@pytest.mark.gpu  # also run on the GPU by benchmarks/gpu_suite.sh: code paths the GPU tables do not pick
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("combo", COMBOS, ids=[c[0] for c in COMBOS])
@pytest.mark.parametrize("kernel, group, k", KERNELS, ids=("w8a8", "w4a8-g32", "w4a8-g128"))
def test_float_a_equals_quantize_act_then_the_int8_fused_gemm(kernel, group, k, combo, dtype):
    name, gelu, gated, with_residual, quant = combo
    in_dtype = DTYPES[dtype]
    # M = 1 (adaLN at batch 1) on the swapped tile, M = 3 on the plain one; N odd
    for m, n, swap in ((1, 17, True), (3, 19, False)):
        gen = torch.Generator().manual_seed(zlib.crc32(f"{kernel}{group}{name}{dtype}{m}".encode()))
        x = _float_a(m, k, in_dtype, gen)
        a_s = torch.tensor([SCALE])
        b = torch.randn(n, generator=gen)
        if kernel == "w8a8":
            w = testing.random_int8(n, k, generator=gen)
            w_s = torch.rand(n, generator=gen) / 100 + 1e-3
        else:
            w = w4a8.pack_weight(ref.pack_int4(testing.random_int4(n, k, generator=gen)), group)
            w_s = torch.rand(k // group, n, generator=gen) / 20 + 1e-3
        gate = (torch.randn(1, n, generator=gen) * 2).to(torch.bfloat16) if gated else None
        out_dtype = torch.float32 if quant else in_dtype
        res = torch.randn(m, n, generator=gen).to(out_dtype) if with_residual else None
        rows = m if gated else 1
        out_scale = torch.tensor([0.05]) if quant else None
        dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731

        q, _ = quantize_act(dev(x), dev(a_s))
        q = q.cpu()
        # the inputs really exercise the contract: NaN -> 0, inf -> 127, and ties that half-to-even decides
        v = x.float() * (1 / SCALE)
        assert int(q.abs().max()) == 127 and bool(q[v.isnan()].eq(0).all())
        finite = v.abs() < 127
        assert bool((q[finite].float() != torch.floor(v[finite] + 0.5)).any()), "no tie rounded to even"

        args = (dev(a_s), dev(w), dev(w_s), dev(b), gelu, dev(gate), dev(res), rows, dev(out_scale), out_dtype,
                swap)
        y = _run(kernel, group, dev(x), *args)
        y_int8 = _run(kernel, group, dev(q), *args)
        assert y.dtype == y_int8.dtype
        assert torch.equal(y, y_int8), f"{name} M={m}: float A differs from quantize_act + int8 A"
        if out_scale is None:
            assert bool(y.isfinite().all())
        else:
            assert int(y.ne(0).sum()) > m * n // 2, "a test on (nearly) zeros"
        if DEVICE == "cpu" and not gelu:  # and the reference (quantize_act first, then the fused maths)
            wq = w if kernel == "w8a8" else ref.unpack_int4(w4a8.unpack_weight(w, group))
            pieces = (gelu, gate, res, rows, out_scale, out_dtype)
            if kernel == "w8a8":
                y_ref = ref.gemm_w8a8_fused(x, a_s, wq, w_s, b, *pieces)
            else:
                y_ref = ref.gemm_w4a8_fused(x, a_s, wq, w_s, group, b, *pieces)
            assert torch.equal(y, y_ref)


@pytest.mark.parametrize("kernel", ("w8a8", "w4a8"))
def test_float_a_with_per_token_scales_is_refused(kernel):
    m, n, k = 3, 17, 64
    x = torch.randn(m, k, device=DEVICE)
    if kernel == "w8a8":
        w, w_s = testing.random_int8(n, k).to(DEVICE), torch.rand(n, device=DEVICE)
        call = lambda s: w8a8.gemm_w8a8_fused(x, s, w, w_s, None, False, None, None, 1, None,  # noqa: E731
                                              torch.float32)
    else:
        w = w4a8.pack_weight(ref.pack_int4(testing.random_int4(n, k)), 32).to(DEVICE)
        w_s = torch.rand(k // 32, n, device=DEVICE)
        call = lambda s: w4a8.gemm_w4a8_fused(x, s, w, w_s, None, 32, False, None, None, 1, None,  # noqa: E731
                                              torch.float32)
    with pytest.raises(ValueError, match=r"a float activation needs a static a_scale, float32 \[1\].*got shape "
                                         r"\(3,\): quantize it with quantize_act"):
        call(torch.rand(m, device=DEVICE))
    with pytest.raises(TypeError, match="a must be int8, float16, bfloat16, float32, got float64"):
        call_x = x.double()
        if kernel == "w8a8":
            w8a8.gemm_w8a8_fused(call_x, torch.ones(1, device=DEVICE), w, w_s, None, False, None, None, 1, None,
                                 torch.float32)
        else:
            w4a8.gemm_w4a8_fused(call_x, torch.ones(1, device=DEVICE), w, w_s, None, 32, False, None, None, 1,
                                 None, torch.float32)
    # the plain GEMMs still take int8 only
    with pytest.raises(TypeError, match="a must be int8, got float32"):
        if kernel == "w8a8":
            w8a8.gemm_w8a8(x, torch.ones(1, device=DEVICE), w, w_s, None, torch.float32)
        else:
            w4a8.gemm_w4a8(x, torch.ones(1, device=DEVICE), w, w_s, None, 32, torch.float32)

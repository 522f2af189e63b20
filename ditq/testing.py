"""Checks shared by every kernel test: results against the exact integer reference.

Integer accumulation is exact, so a kernel may differ from the float64 value of the product only by the
rounding of its fp32 epilogue (a few ulps of the magnitude of the terms summed) and the final cast to the
output dtype (half an ulp of that dtype). Anything more is a bug, so the tolerance is built from those
two terms, never a loose constant.
"""
from __future__ import annotations

import torch

from .quant import reference as ref

_EPS = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
# Half the spacing of the output dtype's subnormals: the absolute rounding error of a tiny result
# (fp16 outputs below 6.1e-5 are subnormal and round to multiples of 2**-24, not relative to their size).
_HALF_SUBNORMAL = {torch.float32: 2.0 ** -150, torch.bfloat16: 2.0 ** -134, torch.float16: 2.0 ** -25}


def assert_matches_exact(out: torch.Tensor, exact: torch.Tensor, magnitude: torch.Tensor, fp32_ops: int,
                         what: str = "kernel") -> None:
    """``out`` must equal float64 ``exact`` up to ``fp32_ops`` fp32 roundings of ``magnitude`` plus the
    output dtype's rounding. NaN (an unwritten, poisoned element) always fails."""
    out64 = out.detach().cpu().double()
    exact, magnitude = exact.cpu(), magnitude.cpu()
    assert out64.shape == exact.shape, f"{what}: shape {tuple(out64.shape)} != {tuple(exact.shape)}"
    bad = ~torch.isfinite(out64)
    assert not bad.any(), f"{what}: {int(bad.sum())} non-finite outputs, first at {bad.nonzero()[0].tolist()}"
    tol = (fp32_ops * _EPS[torch.float32] * magnitude + _EPS[out.dtype] * exact.abs()
           + _HALF_SUBNORMAL[out.dtype] + 1e-30)
    err = (out64 - exact).abs()
    worst = int(torch.argmax(err / tol))
    assert bool((err <= tol).all()), (
        f"{what}: {int((err > tol).sum())} outputs off the exact reference; worst at flat index {worst}: "
        f"got {out64.flatten()[worst].item()!r}, exact {exact.flatten()[worst].item()!r}, "
        f"tolerance {tol.flatten()[worst].item():.3g}")


def assert_gemm_w8a8(out, a, a_scale, w, w_scale, bias=None, what="W8A8 GEMM"):
    exact, mag = ref.gemm_w8a8_exact(a.cpu(), a_scale.cpu(), w.cpu(), w_scale.cpu(),
                                     None if bias is None else bias.cpu())
    assert_matches_exact(out, exact, mag, fp32_ops=4, what=what)


def assert_gemm_w4a8(out, a, a_scale, w_q, w_scales, group_size, bias=None, what="W4A8 GEMM"):
    """``w_q``: the unpacked int4 values, int8 [N, K]; ``w_scales``: canonical [K // G, N]."""
    exact, mag = ref.gemm_w4a8_exact(a.cpu(), a_scale.cpu(), w_q.cpu(), w_scales.cpu(), group_size,
                                     None if bias is None else bias.cpu())
    assert_matches_exact(out, exact, mag, fp32_ops=4 + 2 * (a.shape[1] // group_size), what=what)


def random_int8(*shape, low=-127, high=127, generator=None) -> torch.Tensor:
    """Fresh random int8 values covering both ends of the range (never zeros)."""
    return torch.randint(low, high + 1, shape, dtype=torch.int8, generator=generator)


def random_int4(*shape, generator=None) -> torch.Tensor:
    """Random int4 values in [-8, 7] as int8, both ends included."""
    return torch.randint(-8, 8, shape, dtype=torch.int8, generator=generator)


def random_w4a8_case(m: int, n: int, k: int, group_size: int, seed: int):
    """A W4A8 GEMM's operands on the CPU: ``(a, w_q, w_scales, a_scale, bias)``, a int8 [M, K] over the whole
    range, w_q int4 values as int8 [N, K] (pack them with ``ditq.quant.reference.pack_int4``), group scales
    [K // G, N], per-row activation scales [M] and a float32 bias [N], all fresh random values from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    a = random_int8(m, k, generator=g)
    w_q = random_int4(n, k, generator=g)
    w_scales = torch.rand(k // group_size, n, generator=g) * 0.02 + 1e-4
    a_scale = torch.rand(m, generator=g) * 0.05 + 1e-3
    bias = torch.randn(n, generator=g) * 4
    return a, w_q, w_scales, a_scale, bias


def assert_gemm_fused(out, a, a_scale, w, w_scale, group_size=None, bias=None, gelu=False, gate=None,
                      residual=None, rows_per_gate=1, what="fused GEMM"):
    """A fused GEMM's float output (no ``out_scale``) against the float64 composition of the exact GEMM and the
    epilogue pieces (:func:`ditq.quant.reference.gemm_epilogue_exact`). ``a``: int8 (quantize a float input with
    ``quantize_act`` first); ``w``: int8 [N, K] for W8A8 (``group_size`` None) or the unpacked int4 values for
    W4A8. Tolerance: the plain GEMM's fp32 roundings (as :func:`assert_gemm_w8a8` / :func:`assert_gemm_w4a8`)
    plus four for the pieces (GELU, gate, residual: each rounding within an ulp of the magnitude the float64
    twin tracks)."""
    a, a_scale, w, w_scale = a.cpu(), a_scale.cpu(), w.cpu(), w_scale.cpu()
    bias = None if bias is None else bias.cpu()
    if group_size is None:
        exact, mag = ref.gemm_w8a8_exact(a, a_scale, w, w_scale, bias)
        fp32_ops = 4
    else:
        exact, mag = ref.gemm_w4a8_exact(a, a_scale, w, w_scale, group_size, bias)
        fp32_ops = 4 + 2 * (a.shape[1] // group_size)
    exact, mag = ref.gemm_epilogue_exact(exact, mag, gelu, None if gate is None else gate.cpu(),
                                         None if residual is None else residual.cpu(), rows_per_gate)
    assert_matches_exact(out, exact, mag, fp32_ops=fp32_ops + 4, what=what)

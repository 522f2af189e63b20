"""The fp8 row-wise peer both benchmarks measure, written plainly: what torchao's
``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`` computes, for machines without torchao.

Weights: float8 e4m3 with one fp32 scale per output channel; activations: quantized per row (per token) on every
call; one ``torch._scaled_mm`` with the bias and the input's dtype as output, fast accumulation on a GPU (torchao's
inference default). Import this module only after ``common.select_device`` (it imports torch, and torch may import
triton, which reads TRITON_INTERPRET once).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

FP8_MAX = 448.0  # largest finite float8 e4m3fn


def quantize(x: torch.Tensor):
    """(e4m3 [..., K], fp32 [..., 1]) with x ~= q * scale row by row: amax per row, floored at 1e-12 so that a zero
    row divides by something; scale = amax / 448. Plain torch ops: torch.compile fuses them into one pass."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


class Unavailable(ValueError):
    """This torch build or device cannot run the fp8 row-wise product (a peer that cannot run, not a failure)."""


def unsupported_reason(device, n: int, k: int, product: bool = True) -> Optional[str]:
    """Why torch._scaled_mm with row-wise scales cannot take an [M, K] x [K, N] product here, or None.
    ``product=False``: the same question for the activation quantization pass alone, which runs no _scaled_mm."""
    if not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no float8_e4m3fn / _scaled_mm"
    if torch.device(device).type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            return f"fp8 e4m3 matmuls need compute capability >= 8.9 (this GPU: {cap[0]}.{cap[1]})"
    if k % 16 or n % 16:
        return f"torch._scaled_mm needs K and N multiples of 16 (K = {k}, N = {n})"
    return _rowwise_refusal(str(torch.device(device))) if product else None


@functools.lru_cache(maxsize=None)
def _rowwise_refusal(device: str) -> Optional[str]:
    """One 16 x 16 x 16 row-wise product on ``device``, once: some builds' _scaled_mm takes only tensor-wide
    scales there (torch 2.11's CPU kernel asserts "only supports per-tensor scaling for CPU backend")."""
    q, scale = quantize(torch.ones(16, 16, device=device))
    try:
        matmul(q, scale, q.t(), scale.t(), None, torch.bfloat16)
    except RuntimeError as e:
        return f"torch {torch.__version__}'s _scaled_mm refused row-wise scales on {device}: " \
               f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__}"
    return None


def matmul(q, scale, weight_t, weight_scale, bias, out_dtype):
    """q [M, K] e4m3 row-major, scale [M, 1]; weight_t [K, N] column-major (an [N, K] tensor's .t()),
    weight_scale [1, N]; bias [N] in out_dtype or None."""
    return torch._scaled_mm(q, weight_t, scale_a=scale, scale_b=weight_scale, bias=bias, out_dtype=out_dtype,
                            use_fast_accum=q.is_cuda)


class Fp8RowwiseLinear(torch.nn.Module):
    """Stands in for an nn.Linear; CUDA-graph capturable (no host syncs) and traceable by torch.compile."""

    def __init__(self, lin: torch.nn.Linear):
        super().__init__()
        why = unsupported_reason(lin.weight.device, lin.out_features, lin.in_features)
        if why:
            raise Unavailable(why)
        self.in_features, self.out_features = lin.in_features, lin.out_features
        w, s = quantize(lin.weight.detach())
        self.register_buffer("weight", w)  # [N, K] e4m3, row-major: .t() is the column-major mat2 cuBLAS wants
        self.register_buffer("weight_scale", s.t().contiguous())  # [1, N] fp32
        self.register_buffer("bias", None if lin.bias is None else lin.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        q, s = quantize(x.reshape(-1, shape[-1]))
        bias = None if self.bias is None else self.bias.to(x.dtype)
        out = matmul(q, s, self.weight.t(), self.weight_scale, bias, x.dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 row-wise"

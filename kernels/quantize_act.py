"""Activation quantization: float16 / bfloat16 / float32 ``[M, K]`` -> int8 ``[M, K]`` in one pass.

* static: one calibrated float32 scale ``[1]`` (BRIEF §1, first-step calibration);
* dynamic per token: ``s[m] = absmax(x[m, :]) / 127`` (1 for an all-zero row), returned as float32 ``[M]``.

Bit-exact against ``ditq.quant.reference`` (same q, same scales), which fixes the rounding:
``s = absmax / 127`` and ``inv = 1 / s`` as IEEE divisions, ``q = clamp(rint(x * inv), -127, 127)``, rint
rounding half to even. How each step is made exact in both execution modes:

* division: ``tl.math.div_rn`` is ``div.rn.f32`` when compiled and ``np.divide`` (IEEE) under the
  interpreter. Plain ``/`` would compile to the approximate ``div.full.f32``.
* rint: compiled, ``libdevice.rint`` (``cvt.rni.f32.f32``, half to even). The interpreter cannot run
  libdevice (``extern_elementwise`` is not implemented there), so it uses the classic magic-number
  rounding ``(y + 1.5 * 2**23) - 1.5 * 2**23``: for ``|y| <= 2**22`` the sum's ulp is 1, so the fp32 add
  itself rounds ``y`` to an integer, half to even, and the subtraction is exact. NumPy does fp32 adds
  without extended precision, so this is exact there. We clamp to [-127, 127] *before* rounding, which
  keeps ``|y|`` small and equals clamping after (rint is monotone and the bounds are integers).
  ``INTERPRET`` is a constexpr, so each mode compiles only its own branch.

One program per row: the whole row (``BLOCK_K = next_power_of_2(K)``) is loaded into registers once, its
absmax reduced, and the same registers quantized and stored, so x is read exactly once from memory.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .interpret import check_device, interpreting

try:  # the CUDA libdevice wrappers; only used when compiling for a GPU
    from triton.language.extra.cuda import libdevice
except ImportError:  # pragma: no cover - very old triton
    from triton.language.extra import libdevice

QMAX = 127
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_BLOCK_K = 16384  # a row lives in registers: 16384 fp32 over 16 warps is 32 per thread


@triton.jit
def _round_half_even(y, INTERPRET: tl.constexpr):
    if INTERPRET:
        return (y + 12582912.0) - 12582912.0  # 1.5 * 2**23, see the module docstring
    else:
        return libdevice.rint(y)


@triton.jit
def quantize_act_kernel(x_ptr, q_ptr, s_ptr, static_scale_ptr, K,
                        PER_TOKEN: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: M * K may exceed 2**31 at large batches
    offs = tl.arange(0, BLOCK_K)
    mask = offs < K
    x = tl.load(x_ptr + row * K + offs, mask=mask, other=0.0).to(tl.float32)
    if PER_TOKEN:
        absmax = tl.max(tl.abs(x), axis=0)
        s = tl.where(absmax > 0, tl.math.div_rn(absmax, 127.0), 1.0)
        tl.store(s_ptr + row, s)
    else:
        s = tl.load(static_scale_ptr)
    inv = tl.math.div_rn(tl.full([], 1.0, tl.float32), s)
    y = tl.minimum(tl.maximum(x * inv, -127.0), 127.0)
    q = _round_half_even(y, INTERPRET)
    tl.store(q_ptr + row * K + offs, q.to(tl.int8), mask=mask)


def _num_warps(block_k: int) -> int:
    return max(1, min(16, block_k // 256))  # ~8 fp32 per thread per 256-wide slice: no spills at 16384


def quantize_act(x: torch.Tensor, scale: Optional[torch.Tensor] = None,
                 out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` [M, K] to int8. ``scale``: float32 [1] static scale, or None for per-token scales.

    Returns ``(q, scales)``: q int8 [M, K] (written into ``out`` if given), scales float32 [1] (a copy of
    ``scale``) or [M].
    """
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be a float16, bfloat16 or float32 tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be [M, K], got shape {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError("x must be contiguous (call .contiguous() first)")
    m, k = x.shape
    if k > MAX_BLOCK_K:
        raise ValueError(f"K = {k} exceeds {MAX_BLOCK_K}: a row must fit in one program's registers")
    if scale is not None:
        if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or scale.shape != (1,):
            raise ValueError("a static scale must be a float32 tensor of shape [1]")
        if scale.device != x.device:
            raise ValueError(f"scale is on {scale.device} but x is on {x.device}")
    check_device(x)
    if out is None:
        out = torch.empty((m, k), dtype=torch.int8, device=x.device)
    elif out.dtype != torch.int8 or out.shape != (m, k) or not out.is_contiguous() or out.device != x.device:
        raise ValueError(f"out must be a contiguous int8 [{m}, {k}] tensor on {x.device}")
    scales = torch.empty((m,), dtype=torch.float32, device=x.device) if scale is None else scale.clone()
    if m == 0 or k == 0:
        if scale is None:
            scales.fill_(1.0)
        return out, scales
    block_k = triton.next_power_of_2(k)
    quantize_act_kernel[(m,)](x, out, scales, scales if scale is None else scale, k,
                              PER_TOKEN=scale is None, BLOCK_K=block_k, INTERPRET=interpreting(),
                              num_warps=_num_warps(block_k))
    return out, scales


def reference(x: torch.Tensor, scale: Optional[torch.Tensor] = None):
    """The maths this kernel reproduces bit for bit (``ditq.quant.reference``)."""
    from ditq.quant import reference as ref

    if scale is None:
        return ref.quantize_per_token(x)
    return ref.quantize_with_scale(x, scale, ref.INT8_QMAX), scale.clone()


def aot_job(params: dict, cc: int, in_dtype: str = "bf16", per_token: bool = True) -> dict:
    """Arguments of ``aot.compile_kernel`` for this kernel with ``params = {"BLOCK_K": ..}`` as the
    launcher runs it on a GPU of compute capability ``cc`` (16-byte aligned rows: K % 16 == 0)."""
    block_k = params["BLOCK_K"]
    sig = {"x_ptr": f"*{in_dtype}", "q_ptr": "*i8", "s_ptr": "*fp32", "static_scale_ptr": "*fp32", "K": "i32"}
    return dict(fn=quantize_act_kernel, signature=sig,
                constexprs=dict(PER_TOKEN=per_token, BLOCK_K=block_k, INTERPRET=False), cc=cc,
                num_warps=params.get("num_warps", _num_warps(block_k)), num_stages=1,
                aligned=["x_ptr", "q_ptr", "s_ptr", "static_scale_ptr", "K"])

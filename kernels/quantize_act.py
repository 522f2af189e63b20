"""Activation quantization: float16 / bfloat16 / float32 ``[M, K]`` -> int8 ``[M, K]`` in one pass.

* static: one calibrated float32 scale ``[1]`` (first-step calibration), returned as a copy;
* dynamic per token: ``s[m] = absmax(x[m, :]) / 127`` (1 for an all-zero row), returned as float32 ``[M]``.

Bit-exact against ``ditq.quant.reference`` (same q, same scales) on finite input, which fixes the rounding:
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

NaN and inf, the contract every backend follows bit for bit:

* static: elementwise, NaN -> 0, +inf -> 127, -inf -> -127 (``x * inv`` NaN is zeroed before the clamp:
  PTX ``max.f32`` returns the non-NaN operand, so a NaN would otherwise become -127 on a GPU);
* per token: the row absmax propagates NaN: a row holding any NaN or +-inf gets scale NaN and q all 0 (the
  GEMM then makes that output row NaN instead of a plausible wrong number); an all-zero row keeps scale 1.
  Non-finiteness is counted explicitly rather than left to ``tl.max``'s NaN handling, which differs
  between the compiled reduction and NumPy's.

One program per row: the whole row (``BLOCK_K = next_power_of_2(K)``) is loaded into registers once, its
absmax reduced, and the same registers quantized and stored, so x is read exactly once from memory.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import checks, config_table
from .interpret import check_device, interpreting, on_input_device

try:  # the CUDA libdevice wrappers; only used when compiling for a GPU
    from triton.language.extra.cuda import libdevice
except ImportError:  # pragma: no cover - very old triton
    from triton.language.extra import libdevice

MAX_BLOCK_K = 32768  # a row lives in registers: 32768 fp32 over 16 warps is 64 per thread (the GEMMs' MAX_K)
K_MULTIPLE = 1  # any K: the row tail is masked (K % 16 == 0, as every GEMM needs, gives wider loads)


@triton.jit
def _round_half_even(y, INTERPRET: tl.constexpr):
    if INTERPRET:
        return (y + 12582912.0) - 12582912.0  # 1.5 * 2**23, see the module docstring
    else:
        return libdevice.rint(y)


@triton.jit
def quantize_row(x, s_ptr, static_scale_ptr, row, PER_TOKEN: tl.constexpr, INTERPRET: tl.constexpr):
    """int8 values of one fp32 row ``x`` (lanes past K must hold 0: they take part in the absmax, and 0 leaves
    it unchanged and is finite), with the NaN / inf contract of the module docstring. Per token, stores the
    row's scale at ``s_ptr + row``; static, reads the scale from ``static_scale_ptr``. Any row kernel that
    ends in int8 activations quantizes through this one function."""
    if PER_TOKEN:
        ax = tl.abs(x)
        finite = ax < float("inf")  # false exactly for NaN and +-inf
        n_bad = tl.sum(tl.where(finite, 0, 1), axis=0)
        absmax = tl.max(tl.where(finite, ax, 0.0), axis=0)
        s = tl.where(absmax > 0, tl.math.div_rn(absmax, 127.0), 1.0)
        s = tl.where(n_bad > 0, float("nan"), s)  # inv = NaN below: the whole row quantizes to 0
        tl.store(s_ptr + row, s)
    else:
        s = tl.load(static_scale_ptr)
    return quantize_scaled(x, inverse_scale(s), INTERPRET)


@triton.jit
def inverse_scale(s):
    """``1 / s`` as an IEEE division (plain ``/`` would compile to the approximate ``div.full.f32``)."""
    return tl.math.div_rn(tl.full([], 1.0, tl.float32), s)


@triton.jit
def quantize_scaled(x, inv, INTERPRET: tl.constexpr):
    """int8 ``clamp(rint(x * inv), -127, 127)`` of fp32 ``x`` with ``inv`` from :func:`inverse_scale`, NaN -> 0:
    the core of :func:`quantize_row`, shared with the GEMMs that quantize a float A tile as they load it
    (``A_FLOAT``; they compute ``inv`` once per program, outside their K loop)."""
    y = x * inv
    y = tl.where(y == y, y, 0.0)  # NaN -> 0 before the clamp (PTX max.f32 would turn it into -127)
    y = tl.minimum(tl.maximum(y, -127.0), 127.0)  # +-inf clamp to +-127 like any large value
    return _round_half_even(y, INTERPRET).to(tl.int8)


@triton.jit
def quantize_act_kernel(x_ptr, static_scale_ptr, q_ptr, s_ptr, K,
                        PER_TOKEN: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: M * K may exceed 2**31 at large batches
    offs = tl.arange(0, BLOCK_K)
    mask = offs < K
    # other=0.0: quantize_row reduces over every lane of the block, the padding past K included
    x = tl.load(x_ptr + row * K + offs, mask=mask, other=0.0).to(tl.float32)
    q = quantize_row(x, s_ptr, static_scale_ptr, row, PER_TOKEN, INTERPRET)
    tl.store(q_ptr + row * K + offs, q, mask=mask)


def _num_warps(block_k: int) -> int:
    return max(1, min(16, block_k // 256))  # ~8 fp32 per thread per 256-wide slice: no spills at 16384


def describe() -> Dict:
    """What this kernel takes. It has no tile table (one program per row, the same code for every GPU), so it
    runs on every architecture the kernel tables in ``configs/`` cover, and under the interpreter."""
    archs = config_table.table_archs()
    return {"k_multiple": K_MULTIPLE, "max_k": MAX_BLOCK_K, "archs": config_table.gpu_ccs(archs),
            "interpreter": "interpreter" in archs}


@on_input_device
def quantize_act(x: torch.Tensor, scale: Optional[torch.Tensor] = None,
                 out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` [M, K] to int8. ``scale``: float32 [1] static scale, or None for per-token scales.

    Returns ``(q, scales)``: q int8 [M, K] (written into ``out`` if given), scales float32 [1] (a copy of
    ``scale``) or [M]. Bad input raises ValueError / TypeError.
    """
    checks.tensor("x", x, checks.FLOAT_DTYPES, dim=2)
    m, k = x.shape
    if k > MAX_BLOCK_K:
        raise ValueError(f"K = {k} exceeds {MAX_BLOCK_K}: a row must fit in one program's registers")
    if scale is not None:
        checks.tensor("static scale", scale, (torch.float32,), shape=(1,))
    checks.same_device("x", x, out=out, **{"static scale": scale})
    check_device(x)
    if out is None:
        out = torch.empty((m, k), dtype=torch.int8, device=x.device)
    else:
        checks.tensor("out", out, (torch.int8,), shape=(m, k), labels=("M", "K"))
    scales = torch.empty((m,), dtype=torch.float32, device=x.device) if scale is None else scale.clone()
    if m == 0 or k == 0:
        if scale is None:
            scales.fill_(1.0)
        return out, scales
    block_k = triton.next_power_of_2(k)
    quantize_act_kernel[(m,)](x, scales if scale is None else scale, out, scales, k,
                              PER_TOKEN=scale is None, BLOCK_K=block_k, INTERPRET=interpreting(),
                              num_warps=_num_warps(block_k))
    return out, scales


def aot_job(config: Dict, cc: int, *, in_dtype: str = "bf16", per_token: bool = True) -> Dict:
    """Arguments of ``aot.compile_kernel`` for this kernel with ``config = {"BLOCK_K": ..}`` as the
    launcher runs it on a GPU of compute capability ``cc`` (16-byte aligned rows: K % 16 == 0)."""
    block_k = config["BLOCK_K"]
    sig = {"x_ptr": f"*{in_dtype}", "static_scale_ptr": "*fp32", "q_ptr": "*i8", "s_ptr": "*fp32", "K": "i32"}
    return dict(fn=quantize_act_kernel, signature=sig,
                constexprs=dict(PER_TOKEN=per_token, BLOCK_K=block_k, INTERPRET=False), cc=cc,
                num_warps=config.get("num_warps", _num_warps(block_k)), num_stages=1,
                aligned=["x_ptr", "static_scale_ptr", "q_ptr", "s_ptr", "K"])

"""LayerNorm + adaLN modulation + int8 quantization of a DiT block's activations, fused into one row kernel.

In a DiT block every quantized linear is fed by ``LayerNorm -> x * (1 + scale) + shift`` (adaLN-Zero's
modulation, one shift/scale vector per image) and then an int8 quantizer. Done separately that is a 16-bit
write and re-read of the whole activation plus a second launch; here one program per row reads ``x`` once
and writes the int8 activations the next GEMM consumes (and, for dynamic quantization, their per-token
scales).

``norm_modulate_quantize(x, shift, scale, eps, act_scale) -> (q, s)``, for ``x`` [B, S, K] (row m = b*S + s):

* all arithmetic in fp32, in this order: ``mean = sum(x) / K``; ``var = sum((x - mean)**2) / K`` (two
  passes, biased); ``y = (x - mean) * (1 / sqrt(var + eps))``; ``y = y * (1 + scale[b])``; ``y = y + shift[b]``
  (skipped when shift and scale are None: a plain LayerNorm without affine weight, as DiT's norms are);
* then quantized exactly like :mod:`quantize_act`: static ``q = clamp(rint(y * (1/s)), -127, 127)`` with
  NaN -> 0 and +-inf -> +-127; dynamic ``s = absmax_row(y) / 127`` (1 for an all-zero row, NaN and q = 0 for
  a row holding any non-finite y).

:func:`reference` is the same maths in plain torch; it defines the result. The kernel differs from it only
in the summation order of the two row sums (a tree here, torch's own order there), so ``y`` can differ in
its last bits and a q whose ``y * (1/s)`` lies on a rounding tie can differ by one; on rows whose sums are
exact in any order (integer-valued inputs, for instance) the two agree bit for bit. (The reference takes
its square root in float64: torch's float32 sqrt on CPU is not correctly rounded, see :func:`reference`.)

How each step is made the same IEEE operation in both execution modes (compiled and interpreted):

* ``/`` would compile to the approximate ``div.full.f32`` and ``rsqrt`` to ``rsqrt.approx``: the kernel uses
  ``tl.math.div_rn`` and ``tl.math.sqrt_rn`` (``div.rn.f32``, ``sqrt.rn.f32``; NumPy's IEEE ops when
  interpreted) and forms ``1 / sqrt(var + eps)`` from them, as the reference does.
* No fused multiply-add anywhere: compiled, a plain product followed by an add becomes one ``fma`` (LLVM
  contracts it, Triton enabling fp fusion by default, and ptxas would too): a single rounding, which
  neither torch's eager ops nor NumPy do. The products that feed an add, ``d * d`` in the variance sum and
  ``y * (1 + scale)`` before ``+ shift``, are therefore ``mul.rn.f32``, and the modulation's add
  ``add.rn.f32``: instructions with an explicit rounding mode are never contracted. They are
  one-instruction inline assembly (see :func:`_mul_rn` for why not libdevice), with plain NumPy fp32 ops,
  which never fuse, as their interpreter twin. That assembly is checked in the PTX and SASS ahead of time
  (tests/kernels/test_aot_norm_quantize.py) but has not yet run on a GPU.
* rint: as in :mod:`quantize_act` (``cvt.rni`` compiled, the magic-number add interpreted).

Masked lanes past K are loaded as 0 but would hold ``-mean`` after centring, so the centred row ``d`` is
zeroed there explicitly; with shift and scale also loaded as 0, ``y`` is then exactly 0 on those lanes,
which leaves the absmax and the non-finite count unchanged.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import checks, config_table
from .interpret import check_device, interpreting, on_input_device
from .quantize_act import quantize_row

MAX_BLOCK_K = 16384  # a row lives in registers: 16384 fp32 over 16 warps is 32 per thread
K_MULTIPLE = 1  # any K: the row tail is masked (K % 16 == 0, which DiT widths are, gives wider loads: Triton
# specialises an integer argument only by divisibility by 16, so K % 8 == 0 alone gives the loads nothing)
QMAX = 127


@triton.jit
def _mul_rn(a, b, INTERPRET: tl.constexpr):
    """fp32 ``a * b`` rounded once, never contracted into an fma with the add that follows.

    Compiled: one ``mul.rn.f32`` (an explicit rounding mode forbids contraction). Not libdevice's
    ``mul_rn``: Triton builds libdevice with flush-to-zero on, so it becomes ``mul.rn.ftz.f32``, which turns
    subnormal products into 0 where torch and NumPy keep them. Inline assembly does not run under the
    interpreter; there the plain NumPy fp32 product is the same IEEE operation (NumPy never fuses)."""
    if INTERPRET:
        return a * b
    else:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)


@triton.jit
def _add_rn(a, b, INTERPRET: tl.constexpr):
    """fp32 ``a + b`` as ``add.rn.f32`` (not libdevice's ``add_rn``: flush-to-zero, see :func:`_mul_rn`)."""
    if INTERPRET:
        return a + b
    else:
        return tl.inline_asm_elementwise("add.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)


@triton.jit
def norm_quantize_kernel(x_ptr, shift_ptr, scale_ptr, static_scale_ptr, q_ptr, s_ptr, S, K, eps,
                         MODULATE: tl.constexpr, PER_TOKEN: tl.constexpr, BLOCK_K: tl.constexpr,
                         INTERPRET: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: M * K may exceed 2**31 at large batches
    offs = tl.arange(0, BLOCK_K)
    mask = offs < K
    # K * 1.0, not K.to(): Triton passes an integer argument equal to 1 as a constexpr, which has no .to();
    # exact either way (K <= 16384)
    kf = K * 1.0
    # other=0.0: the padding lanes then add nothing to the first sum
    x = tl.load(x_ptr + row * K + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.math.div_rn(tl.sum(x, axis=0), kf)
    d = tl.where(mask, x - mean, 0.0)  # padding lanes would hold -mean: zero them for the variance sum
    var = tl.math.div_rn(tl.sum(_mul_rn(d, d, INTERPRET), axis=0), kf)
    rstd = tl.math.div_rn(tl.full([], 1.0, tl.float32), tl.math.sqrt_rn(var + eps))
    y = d * rstd
    if MODULATE:
        img = row // S
        # other=0.0 for both: y stays 0 on the padding lanes (see the module docstring)
        sc = tl.load(scale_ptr + img * K + offs, mask=mask, other=0.0).to(tl.float32)
        sh = tl.load(shift_ptr + img * K + offs, mask=mask, other=0.0).to(tl.float32)
        y = _add_rn(_mul_rn(y, 1.0 + sc, INTERPRET), sh, INTERPRET)
    # y is 0 on the padding lanes (d is, and shift / scale load 0 there) unless rstd is NaN, which only a
    # non-finite real lane or a row sum overflowing fp32 causes (and then every real lane's y is NaN too, so
    # the row's scale is NaN either way): quantize_row may reduce over them
    q = quantize_row(y, s_ptr, static_scale_ptr, row, PER_TOKEN, INTERPRET)
    tl.store(q_ptr + row * K + offs, q, mask=mask)


def _num_warps(block_k: int) -> int:
    return max(1, min(16, block_k // 256))  # ~8 fp32 per thread per 256-wide slice: no spills at 16384


def describe() -> Dict:
    """What this kernel takes. Like ``quantize_act`` it has no tile table (one program per row, the same code
    for every GPU), so it runs on every architecture the tables in ``configs/`` cover, and interpreted."""
    archs = config_table.table_archs()
    return {"k_multiple": K_MULTIPLE, "max_k": MAX_BLOCK_K, "archs": config_table.gpu_ccs(archs),
            "interpreter": "interpreter" in archs}


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__}")
    e32 = torch.tensor(float(eps), dtype=torch.float32).item()  # what the kernel adds: eps rounded to fp32
    if not (math.isfinite(e32) and e32 > 0):
        raise ValueError(f"eps must be finite and positive in float32, got {eps!r}")
    return e32


def _check_args(x, shift, scale, eps, act_scale):
    checks.tensor("x", x, checks.FLOAT_DTYPES, dim=3)
    b, _, k = x.shape
    if k > MAX_BLOCK_K:
        raise ValueError(f"K = {k} exceeds {MAX_BLOCK_K}: a row must fit in one program's registers")
    if (shift is None) != (scale is None):
        raise ValueError("shift and scale must both be given (adaLN modulation) or both be None (plain LayerNorm)")
    for name, t in (("shift", shift), ("scale", scale)):  # any float dtype, each its own: loaded as float32
        if t is not None:
            checks.tensor(name, t, checks.FLOAT_DTYPES, shape=(b, k), labels=("B", "K"))
    if act_scale is not None:
        checks.tensor("act_scale", act_scale, (torch.float32,), shape=(1,))
    eps = _check_eps(eps)
    checks.same_device("x", x, shift=shift, scale=scale, act_scale=act_scale)
    return eps


@on_input_device
def norm_modulate_quantize(x: torch.Tensor, shift: Optional[torch.Tensor], scale: Optional[torch.Tensor],
                           eps: float, act_scale: Optional[torch.Tensor], *,
                           out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm (no affine weight) of ``x`` [B, S, K] over K, adaLN modulation ``y * (1 + scale[b]) +
    shift[b]`` (``shift``, ``scale`` [B, K], any float dtype, or both None), int8 quantization.

    ``act_scale``: float32 [1] static scale, or None for per-token scales. Returns ``(q, s)``: q int8
    [B*S, K] (written into ``out`` if given), s float32 [1] (a copy of ``act_scale``) or [B*S]. The maths
    is :func:`reference`'s (see the module docstring). Bad input raises ValueError / TypeError.
    """
    eps = _check_args(x, shift, scale, eps, act_scale)
    checks.same_device("x", x, out=out)
    check_device(x)
    b, seq, k = x.shape
    m = b * seq
    if out is None:
        out = torch.empty((m, k), dtype=torch.int8, device=x.device)
    else:
        checks.tensor("out", out, (torch.int8,), shape=(m, k), labels=("B*S", "K"))
    s = torch.empty((m,), dtype=torch.float32, device=x.device) if act_scale is None else act_scale.clone()
    if m == 0 or k == 0:  # K = 0: an empty row, like an all-zero one, gets scale 1 (as quantize_act)
        if act_scale is None:
            s.fill_(1.0)
        return out, s
    block_k = triton.next_power_of_2(k)
    modulate = shift is not None
    norm_quantize_kernel[(m,)](x, shift if modulate else x, scale if modulate else x,
                               s if act_scale is None else act_scale, out, s, seq, k, eps,
                               MODULATE=modulate, PER_TOKEN=act_scale is None, BLOCK_K=block_k,
                               INTERPRET=interpreting(), num_warps=_num_warps(block_k))
    return out, s


def reference(x: torch.Tensor, shift: Optional[torch.Tensor], scale: Optional[torch.Tensor], eps: float,
              act_scale: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The contract in plain torch (fp32, eager ops: no fma). Returns ``(q, s, v)`` like the launcher plus
    ``v = y * (1/s)``, the value each q rounds, [B*S, K] fp32 (NaN where y is: tests use it to find ties)."""
    eps = _check_args(x, shift, scale, eps, act_scale)
    b, seq, k = x.shape
    xf = x.float().reshape(b * seq, k)
    if b * seq == 0 or k == 0:
        s = torch.ones(b * seq, device=x.device) if act_scale is None else act_scale.clone()
        return torch.empty((b * seq, k), dtype=torch.int8, device=x.device), s, xf.clone()
    eps_t = torch.tensor(eps, dtype=torch.float32, device=x.device)
    mean = xf.sum(dim=1, keepdim=True) / k
    d = xf - mean
    var = (d * d).sum(dim=1, keepdim=True) / k
    # sqrt in float64, rounded once to float32: torch's own float32 sqrt on CPU is not correctly rounded
    # (torch 2.14: 1 ulp off for ~17% of random inputs), whereas sqrt.rn.f32 and NumPy's are; a float64
    # sqrt rounded to float32 is the correctly rounded float32 sqrt (53 >= 2 * 24 + 2 bits: no double rounding)
    y = d * (1.0 / torch.sqrt((var + eps_t).double()).float())
    if shift is not None:
        per_row = torch.arange(b * seq, device=x.device) // seq
        y = y * (1.0 + scale.float()[per_row])
        y = y + shift.float()[per_row]
    if act_scale is None:
        absmax = y.abs().amax(dim=1)  # NaN-propagating; inf stays inf
        s = torch.where(absmax > 0, absmax / QMAX, torch.ones_like(absmax))
        s = torch.where(torch.isfinite(absmax), s, torch.full_like(s, float("nan")))
        inv = (1.0 / s)[:, None]
    else:
        s = act_scale.clone()
        inv = 1.0 / act_scale
    v = y * inv
    q = torch.clamp(torch.round(torch.nan_to_num(v, nan=0.0)), -QMAX, QMAX).to(torch.int8)
    return q, s, v


def aot_job(config: Dict, cc: int, *, in_dtype: str = "bf16", mod_dtype: Optional[str] = "bf16",
            per_token: bool = True) -> Dict:
    """Arguments of ``aot.compile_kernel`` for this kernel with ``config = {"BLOCK_K": ..}`` as the launcher
    runs it on a GPU of compute capability ``cc``, with 16-byte aligned rows (K % 16 == 0, as DiT widths are).
    ``mod_dtype`` None: no modulation (plain LayerNorm)."""
    block_k = config["BLOCK_K"]
    mod = mod_dtype or in_dtype
    sig = {"x_ptr": f"*{in_dtype}", "shift_ptr": f"*{mod}", "scale_ptr": f"*{mod}", "static_scale_ptr": "*fp32",
           "q_ptr": "*i8", "s_ptr": "*fp32", "S": "i32", "K": "i32", "eps": "fp32"}
    return dict(fn=norm_quantize_kernel, signature=sig,
                constexprs=dict(MODULATE=mod_dtype is not None, PER_TOKEN=per_token, BLOCK_K=block_k,
                                INTERPRET=False),
                cc=cc, num_warps=config.get("num_warps", _num_warps(block_k)), num_stages=1,
                aligned=["x_ptr", "shift_ptr", "scale_ptr", "static_scale_ptr", "q_ptr", "s_ptr", "K"])

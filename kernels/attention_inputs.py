"""From the fused q/k/v GEMM's output to SDPA's inputs in one pass: q/k RMSNorm, rotary embedding, streams
concatenated along the sequence, heads moved in front.

In a FLUX / SD3 block each stream's q/k/v GEMM writes ``[B * S, 3 * H * D]`` (column blocks q | k | v, each
head-major). Between it and the attention, diffusers runs a view per head, four RMSNorms (each about ten
elementwise passes), a concatenation per tensor and the rotary embedding (another ten): each pass a read and a
write of the whole activation. Here one program per token (per block of up to 4096 / D heads of it) reads the
token's q, k and v once and writes them where SDPA reads them, ``[B, H, S1 + S2, D]``; the launcher runs the
kernel once per stream, each writing its own range of the sequence.

``attention_inputs(first, second, batch, heads, first_q_norm, first_k_norm, second_q_norm, second_k_norm, eps,
rope_cos, rope_sin) -> (q, k, v)``: ``ditq.quant.reference.attention_inputs`` is the contract (diffusers'
``RMSNorm`` and ``apply_rotary_emb``, op for op). Per element of q / k, in fp32:

* RMSNorm (when the stream's weight is given): ``r = 1 / sqrt(sum(x * x) / D + eps)``; ``y = x * r``; with a
  16-bit weight (the activations' dtype) ``y`` is rounded to that dtype, multiplied by the weight and rounded
  again (the product of two 16-bit values is exact in fp32, so this is torch's 16-bit multiply); with a float32
  weight ``y = y * w`` in fp32.
* rotary embedding: ``out[2i] = y[2i] * cos[2i] - y[2i+1] * sin[2i]``, ``out[2i+1] = y[2i+1] * cos[2i+1] +
  y[2i] * sin[2i+1]``: two rounded products and a rounded add, as torch's eager ops.
* one rounding to the activations' dtype at the end; v is copied bit for bit.

The kernel differs from the reference only in the summation order of ``sum(x * x)`` (a tree here, torch's own
order there), so ``r`` can differ in its last bit and the outputs by one unit in the last place of a 16-bit
dtype; where the sum is exact in any order (inputs with few significant bits) the two agree bit for bit.

Exact rounding points, compiled and interpreted alike: ``/`` and ``sqrt`` are ``div_rn`` / ``sqrt_rn`` (not the
approximate ``div.full`` / ``rsqrt.approx``; torch's float32 ``rsqrt`` on the CPU is exactly this
``1 / sqrt`` with both steps correctly rounded). The products that feed an add (``x * x`` into the sum, the
rotary products) are ``mul.rn.f32`` and the rotary add ``add.rn.f32`` (norm_quantize's helpers: an explicit
rounding mode is never contracted into an fma, which torch's eager ops never form). Casts to bfloat16 go
through ``cast_rn`` (the interpreter truncates otherwise).

Layout: a block of heads is loaded as a [BLOCK_H, D / 2, 2] tile, so the rotary pair (2i, 2i + 1) is one row
and ``tl.split`` hands the kernel both halves without a second load; lanes past D (a D that is not a power of
two) and heads past H are masked and loaded as 0, adding nothing to a head's sum of squares.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import checks
from .attention_inputs_checks import MAX_HEAD_DIM, check_args
from .interpret import cast_rn, check_device, interpreting
from .norm_quantize import _add_rn, _mul_rn

__all__ = ["attention_inputs", "MAX_HEAD_DIM"]


@triton.jit
def _norm_rope(x, w_ptr, cos, sin, pair, mask, D, eps, NORM: tl.constexpr, W16: tl.constexpr,
               ROPE: tl.constexpr, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """q or k of a block of heads, fp32 [BLOCK_H, HALF, 2] -> RMSNorm per head (NORM) -> rotary embedding
    (ROPE), still fp32."""
    y = x
    if NORM:
        ss = tl.sum(tl.sum(_mul_rn(x, x, INTERPRET), axis=2), axis=1)  # [BLOCK_H]: one sum of squares per head
        r = tl.math.div_rn(tl.full([], 1.0, tl.float32), tl.math.sqrt_rn(tl.math.div_rn(ss, D * 1.0) + eps))
        y = x * r[:, None, None]  # followed by a cast or a multiply, never an add: nothing to contract
        w = tl.load(w_ptr + pair, mask=mask, other=0.0).to(tl.float32)  # [1, HALF, 2]: every head's weight
        if W16:  # to(weight dtype) * weight: both 16-bit, their product exact in fp32, rounded once
            y = cast_rn(cast_rn(y, DTYPE, INTERPRET).to(tl.float32) * w, DTYPE, INTERPRET).to(tl.float32)
        else:
            y = y * w
    if ROPE:
        ye, yo = tl.split(y)  # the pairs (2i, 2i + 1), [BLOCK_H, HALF] each
        ce, co = tl.split(cos)
        se, so = tl.split(sin)
        # diffusers: x * cos + stack(-x_imag, x_real) * sin. (-a) * b == -(a * b), and IEEE defines p - q as
        # p + (-q), signed zeros included: a plain subtraction, which cannot be contracted into an fma since
        # both operands come from mul.rn (Triton's unary minus is 0 - x, which would turn -0 into +0)
        oe = _mul_rn(ye, ce, INTERPRET) - _mul_rn(yo, se, INTERPRET)
        oo = _add_rn(_mul_rn(yo, co, INTERPRET), _mul_rn(ye, so, INTERPRET), INTERPRET)
        y = tl.join(oe, oo)
    return y


@triton.jit
def attention_inputs_kernel(x_ptr, qn_ptr, kn_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr,
                            S, S_OFF, S_TOTAL, H, D, eps,
                            Q_NORM: tl.constexpr, K_NORM: tl.constexpr, Q_W16: tl.constexpr, K_W16: tl.constexpr,
                            ROPE: tl.constexpr, BLOCK_H: tl.constexpr, HALF: tl.constexpr, DTYPE: tl.constexpr,
                            INTERPRET: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # token of this stream, b * S + s; int64: B * S * 3HD may pass 2**31
    b = row // S
    t = S_OFF + row % S  # position in the concatenated sequence
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None, None]  # [BLOCK_H, 1, 1]
    pair = tl.arange(0, HALF)[None, :, None] * 2 + tl.arange(0, 2)[None, None, :]  # [1, HALF, 2]: offset in a head
    dmask = pair < D
    mask = (heads < H) & dmask
    src = x_ptr + row * (3 * H * D) + heads * D + pair  # q; k and v follow H * D columns apart
    dst = ((b * H + heads) * S_TOTAL + t) * D + pair
    cos = tl.zeros([1, HALF, 2], dtype=tl.float32)
    sin = tl.zeros([1, HALF, 2], dtype=tl.float32)
    if ROPE:  # one position: the same cos / sin for every head
        cos = tl.load(cos_ptr + t * D + pair, mask=dmask, other=0.0)
        sin = tl.load(sin_ptr + t * D + pair, mask=dmask, other=0.0)
    # other=0.0: padding lanes add nothing to a head's sum of squares (and are never stored)
    q = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    q = _norm_rope(q, qn_ptr, cos, sin, pair, dmask, D, eps, Q_NORM, Q_W16, ROPE, DTYPE, INTERPRET)
    tl.store(q_ptr + dst, cast_rn(q, DTYPE, INTERPRET), mask=mask)
    k = tl.load(src + H * D, mask=mask, other=0.0).to(tl.float32)
    k = _norm_rope(k, kn_ptr, cos, sin, pair, dmask, D, eps, K_NORM, K_W16, ROPE, DTYPE, INTERPRET)
    tl.store(k_ptr + dst, cast_rn(k, DTYPE, INTERPRET), mask=mask)
    v = tl.load(src + 2 * H * D, mask=mask)  # copied as it is: no float round trip
    tl.store(v_ptr + dst, v, mask=mask)


# One program holds a block of heads of one token: up to 4096 values per tensor (FLUX's 24 x 128 heads in one
# block of 32, 4 warps: 32 fp32 per thread per tensor)
MAX_BLOCK = 4096


def launch_config(heads: int, d: int) -> Tuple[int, int, int]:
    """(BLOCK_H, HALF, num_warps) for ``heads`` heads of size ``d``."""
    half = max(1, triton.next_power_of_2(d) // 2)
    block_h = min(triton.next_power_of_2(heads), max(1, MAX_BLOCK // (2 * half)))
    return block_h, half, max(1, min(4, block_h * half // 256))


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def attention_inputs(first: torch.Tensor, second: Optional[torch.Tensor], batch: int, heads: int,
                     first_q_norm: Optional[torch.Tensor], first_k_norm: Optional[torch.Tensor],
                     second_q_norm: Optional[torch.Tensor], second_k_norm: Optional[torch.Tensor], eps: float,
                     rope_cos: Optional[torch.Tensor], rope_sin: Optional[torch.Tensor], *,
                     out: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [batch, heads, S1 + S2, D] in ``first``'s dtype, from the fused q/k/v outputs ``first``
    [batch * S1, 3 * heads * D] and optionally ``second`` [batch * S2, 3 * heads * D] (placed after ``first``):
    each stream's q / k RMSNorm (weights [D], the activations' dtype or float32; None: no norm), then the
    rotary embedding (``rope_cos`` / ``rope_sin`` float32 [S1 + S2, D], or both None). See the module docstring.
    ``out``: three tensors to write q, k, v into. Bad input raises ValueError / TypeError."""
    s1, s2, d, eps = check_args(first, second, batch, heads, first_q_norm, first_k_norm, second_q_norm,
                                second_k_norm, eps, rope_cos, rope_sin)
    check_device(first)
    total = s1 + s2
    if out is None:
        q, k, v = (torch.empty((batch, heads, total, d), dtype=first.dtype, device=first.device) for _ in range(3))
    else:
        q, k, v = (checks.tensor(f"out[{i}]", t, (first.dtype,), shape=(batch, heads, total, d),
                                 labels=("batch", "heads", "S1 + S2", "D")) for i, t in enumerate(out))
        checks.same_device("first", first, q=q, k=k, v=v)
    block_h, half, num_warps = launch_config(heads, d)
    rope = rope_cos is not None
    for x, qn, kn, s, off in ((first, first_q_norm, first_k_norm, s1, 0),
                              (second, second_q_norm, second_k_norm, s2, s1)):
        if x is None or s == 0:
            continue
        attention_inputs_kernel[(batch * s, triton.cdiv(heads, block_h))](
            x, x if qn is None else qn, x if kn is None else kn, rope_cos if rope else x, rope_sin if rope else x,
            q, k, v, s, off, total, heads, d, eps,
            Q_NORM=qn is not None, K_NORM=kn is not None,
            Q_W16=qn is not None and qn.dtype != torch.float32, K_W16=kn is not None and kn.dtype != torch.float32,
            ROPE=rope, BLOCK_H=block_h, HALF=half, DTYPE=_TL_DTYPES[first.dtype], INTERPRET=interpreting(),
            num_warps=num_warps)
    return q, k, v

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

* RMSNorm (when the stream's weight is given): ``r = 1 / sqrt(sum(x * x) / D + eps)``; ``y = x * r``; then,
  diffusers' ``RMSNorm`` (SD3.5's): with a 16-bit weight (the activations' dtype) ``y`` is rounded to that dtype,
  multiplied by the weight and rounded again (the product of two 16-bit values is exact in fp32, so this is
  torch's 16-bit multiply), with a float32 weight ``y = y * w`` in fp32, not rounded; ``torch.nn.RMSNorm``
  (``torch_norm``, FLUX's attention): ``y * w`` in fp32, rounded once to the activations' dtype (torch's fused
  ``rms_norm``, checked bit for bit on the CPU).
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

from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import checks
from .attention_inputs_checks import MAX_HEAD_DIM, check_args
from .interpret import cast_rn, check_device, interpreting, on_input_device
from .norm_quantize import _add_rn, _mul_rn

__all__ = ["attention_inputs", "MAX_HEAD_DIM"]


# Where the RMSNorm's output is rounded to the activations' dtype (the constexpr ROUND):
ROUND_NONE = tl.constexpr(0)  # diffusers' RMSNorm with a float32 weight: float32 on into the rope
ROUND_AFTER = tl.constexpr(1)  # torch.nn.RMSNorm: x * r * w in float32, rounded once
ROUND_BOTH = tl.constexpr(2)  # diffusers' RMSNorm with a 16-bit weight: x * r rounded, * w, rounded again


def _rounding(weight: Optional[torch.Tensor], torch_norm: bool) -> int:
    if weight is None:
        return 0
    if torch_norm:
        return ROUND_AFTER.value
    return ROUND_BOTH.value if weight.dtype != torch.float32 else ROUND_NONE.value


@triton.jit
def _norm_rope(x, w_ptr, cos, sin, offs, mask, D, eps, NORM: tl.constexpr, ROUND: tl.constexpr,
               ROPE: tl.constexpr, BLOCK_H: tl.constexpr, HALF: tl.constexpr, DTYPE: tl.constexpr,
               INTERPRET: tl.constexpr):
    """q or k of a block of heads, fp32 [BLOCK_H, 2 * HALF] -> RMSNorm per head (NORM) -> rotary embedding
    (ROPE), still fp32."""
    y = x
    if NORM:
        ss = tl.sum(_mul_rn(x, x, INTERPRET), axis=1)  # [BLOCK_H]: one sum of squares per head
        r = tl.math.div_rn(tl.full([], 1.0, tl.float32), tl.math.sqrt_rn(tl.math.div_rn(ss, D * 1.0) + eps))
        y = x * r[:, None]  # followed by a cast or a multiply, never an add: nothing to contract
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [1, 2 * HALF]: every head's weight
        if ROUND == ROUND_BOTH:  # diffusers, 16-bit weight: to(weight dtype) * weight (exact in fp32), rounded
            y = cast_rn(y, DTYPE, INTERPRET).to(tl.float32)
        y = y * w
        if ROUND != ROUND_NONE:  # the norm's output in the activations' dtype
            y = cast_rn(y, DTYPE, INTERPRET).to(tl.float32)
    if ROPE:
        ye, yo = tl.split(tl.reshape(y, [BLOCK_H, HALF, 2]))  # the pairs (2i, 2i + 1), [BLOCK_H, HALF] each
        ce, co = tl.split(tl.reshape(cos, [1, HALF, 2]))
        se, so = tl.split(tl.reshape(sin, [1, HALF, 2]))
        # diffusers: x * cos + stack(-x_imag, x_real) * sin. (-a) * b == -(a * b), and IEEE defines p - q as
        # p + (-q), signed zeros included: a plain subtraction, which cannot be contracted into an fma since
        # both operands come from mul.rn (Triton's unary minus is 0 - x, which would turn -0 into +0)
        oe = _mul_rn(ye, ce, INTERPRET) - _mul_rn(yo, se, INTERPRET)
        oo = _add_rn(_mul_rn(yo, co, INTERPRET), _mul_rn(ye, so, INTERPRET), INTERPRET)
        y = tl.reshape(tl.join(oe, oo), [BLOCK_H, 2 * HALF])
    return y


@triton.jit
def attention_inputs_kernel(x_ptr, qn_ptr, kn_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr,
                            S, S_OFF, S_TOTAL, H, D, eps,
                            Q_NORM: tl.constexpr, K_NORM: tl.constexpr, Q_ROUND: tl.constexpr, K_ROUND: tl.constexpr,
                            ROPE: tl.constexpr, BLOCK_H: tl.constexpr, HALF: tl.constexpr, INTERPRET: tl.constexpr):
    DTYPE = q_ptr.dtype.element_ty  # the activations' dtype (q, k, v and x share it)
    row = tl.program_id(0).to(tl.int64)  # token of this stream, b * S + s; int64: B * S * 3HD may pass 2**31
    b = row // S
    t = S_OFF + row % S  # position in the concatenated sequence
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]  # [BLOCK_H, 1]
    # [1, 2 * HALF]: offsets in a head, contiguous, so each thread loads 16 bytes at a time
    offs = tl.arange(0, 2 * HALF)[None, :]
    dmask = offs < D
    mask = (heads < H) & dmask
    src = x_ptr + row * (3 * H * D) + heads * D + offs  # q; k and v follow H * D columns apart
    dst = ((b * H + heads) * S_TOTAL + t) * D + offs
    cos = tl.zeros([1, 2 * HALF], dtype=tl.float32)
    sin = tl.zeros([1, 2 * HALF], dtype=tl.float32)
    if ROPE:  # one position: the same cos / sin for every head
        cos = tl.load(cos_ptr + t * D + offs, mask=dmask, other=0.0)
        sin = tl.load(sin_ptr + t * D + offs, mask=dmask, other=0.0)
    # other=0.0: padding lanes add nothing to a head's sum of squares (and are never stored)
    q = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    q = _norm_rope(q, qn_ptr, cos, sin, offs, dmask, D, eps, Q_NORM, Q_ROUND, ROPE, BLOCK_H, HALF, DTYPE, INTERPRET)
    tl.store(q_ptr + dst, cast_rn(q, DTYPE, INTERPRET), mask=mask)
    k = tl.load(src + H * D, mask=mask, other=0.0).to(tl.float32)
    k = _norm_rope(k, kn_ptr, cos, sin, offs, dmask, D, eps, K_NORM, K_ROUND, ROPE, BLOCK_H, HALF, DTYPE, INTERPRET)
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


@on_input_device
def attention_inputs(first: torch.Tensor, second: Optional[torch.Tensor], batch: int, heads: int,
                     first_q_norm: Optional[torch.Tensor], first_k_norm: Optional[torch.Tensor],
                     second_q_norm: Optional[torch.Tensor], second_k_norm: Optional[torch.Tensor], eps: float,
                     rope_cos: Optional[torch.Tensor], rope_sin: Optional[torch.Tensor], torch_norm: bool = False,
                     *,
                     out: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [batch, heads, S1 + S2, D] in ``first``'s dtype, from the fused q/k/v outputs ``first``
    [batch * S1, 3 * heads * D] and optionally ``second`` [batch * S2, 3 * heads * D] (placed after ``first``):
    each stream's q / k RMSNorm (weights [D], the activations' dtype or float32; None: no norm), then the
    rotary embedding (``rope_cos`` / ``rope_sin`` float32 [S1 + S2, D], or both None). ``torch_norm``: the norms
    are ``torch.nn.RMSNorm`` (FLUX's), not diffusers' ``RMSNorm``. See the module docstring.
    ``out``: three tensors to write q, k, v into. Bad input raises ValueError / TypeError."""
    s1, s2, d, eps = check_args(first, second, batch, heads, first_q_norm, first_k_norm, second_q_norm,
                                second_k_norm, eps, rope_cos, rope_sin, torch_norm)
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
            Q_ROUND=_rounding(qn, torch_norm), K_ROUND=_rounding(kn, torch_norm),
            ROPE=rope, BLOCK_H=block_h, HALF=half, INTERPRET=interpreting(),
            num_warps=num_warps)
    return q, k, v


def aot_job(cc: int, *, dtype: str = "bf16", heads: int = 24, d: int = 128, norm_dtype: Optional[str] = "bf16",
            rounding: int = 1, rope: bool = True, ones: Tuple[str, ...] = ()) -> Dict:
    """Arguments of ``aot.compile_kernel`` for this kernel as the launcher runs it on a GPU of compute capability
    ``cc`` (default: FLUX.1's attention, 24 heads x 128 in bfloat16, torch.nn.RMSNorm on q and k, rope).
    ``norm_dtype`` None: no norm; ``rounding``: the ROUND constexpr; ``ones``: integer arguments passed as 1
    (Triton's JIT makes an integer argument equal to 1 a constexpr: one token per image, one head)."""
    block_h, half, num_warps = launch_config(heads, d)
    norm = norm_dtype or dtype
    sig = {"x_ptr": f"*{dtype}", "qn_ptr": f"*{norm}", "kn_ptr": f"*{norm}", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
           "q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "S": "i32", "S_OFF": "i32",
           "S_TOTAL": "i32", "H": "i32", "D": "i32", "eps": "fp32"}
    constexprs = dict(Q_NORM=norm_dtype is not None, K_NORM=norm_dtype is not None, Q_ROUND=rounding,
                      K_ROUND=rounding, ROPE=rope, BLOCK_H=block_h, HALF=half, INTERPRET=False)
    for name in ones:
        del sig[name]
        constexprs[name] = 1
    # 16-byte aligned rows as torch allocates them; D a multiple of 16 (DiT head sizes are)
    aligned = [n for n in sig if n.endswith("_ptr")] + (["D"] if "D" in sig and d % 16 == 0 else [])
    return dict(fn=attention_inputs_kernel, signature=sig, constexprs=constexprs, cc=cc, num_warps=num_warps,
                num_stages=1, aligned=aligned)

"""Reference maths in plain torch: what every kernel is tested against.

Conventions every backend follows exactly, so that results can be compared bit for bit:

* Symmetric scales: ``s = absmax / qmax`` (IEEE fp32 division); an all-zero slice gets ``s = 1``.
* Quantize: ``q = clamp(rint(x_fp32 * inv_s), -qmax, qmax)`` with ``inv_s = 1 / s`` (IEEE fp32 division)
  and ``rint`` rounding half to even. Multiplying by a correctly rounded reciprocal (not dividing) is what
  a GPU does fast, and every backend can reproduce it exactly.
* int8 range is ``[-127, 127]`` (−128 kept out so negation is safe); int4 is ``[-7, 7]`` from the quantizer,
  ``[-8, 7]`` accepted everywhere downstream.
* GEMMs accumulate in int32 (exact: |a| ≤ 127, |w| ≤ 128, K ≤ 32768 ⇒ |Σ| < 2^31) and apply an fp32
  epilogue; the float64 twins below define the tolerance (``ditq.testing``). 32768 is the K every backend
  takes and is tested to, with headroom: the int32 sums alone would stay exact to K < 2^17.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..format import MAX_INT_GROUP_SCALE

INT8_QMAX = 127
INT4_QMAX = 7
# The K every GEMM takes: 127 * 128 * 32768 < 2^31 with 4x headroom (exact to K < 2^17). The widest input in
# the families ditq serves is FLUX.2-dev's single-block output projection, K = 6144 + 18432 = 24576.
MAX_K = 32768


def _check_float(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{what} must be a floating-point tensor, got {got}")


def symmetric_scale(absmax: torch.Tensor, qmax: int) -> torch.Tensor:
    """fp32 scale ``absmax / qmax``; 1.0 where absmax is 0 (the slice quantizes to zeros either way)."""
    absmax = absmax.float()
    return torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))


def quantize_with_scale(x: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """int8 tensor ``clamp(rint(x * (1/scale)), -qmax, qmax)``; ``scale`` broadcasts against ``x``.

    Non-finite values: NaN quantizes to 0 and +-inf saturates to +-qmax (as does any product beyond the range).
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        _check_float(x, "x")
    v = x.float() * torch.reciprocal(scale.float())
    return torch.clamp(torch.round(v.nan_to_num_(nan=0.0)), -qmax, qmax).to(torch.int8)


# ---- activations -------------------------------------------------------------------------------------

def quantize_per_tensor(x: torch.Tensor, qmax: int = INT8_QMAX):
    """One scale for the whole tensor (a calibrated static activation scale). Returns (q, scale[1])."""
    _check_float(x, "x")
    s = symmetric_scale(x.detach().abs().amax().reshape(1), qmax)
    return quantize_with_scale(x, s, qmax), s


def quantize_per_token(x: torch.Tensor, qmax: int = INT8_QMAX):
    """One scale per row of a [M, K] tensor (dynamic activation quantization). Returns (q, scale[M]).

    A row holding any NaN or inf gets scale NaN and q = 0, so whatever it feeds comes out NaN: a non-finite
    activation stays visible instead of being crushed into range (every backend does the same).
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():  # inline: the reference backend's hot path
        _check_float(x, "x")
    if x.dim() != 2:
        raise ValueError(f"per-token quantization takes a [M, K] tensor, got shape {tuple(x.shape)}")
    if x.shape[1] == 0:  # no features: an empty row, like an all-zero one, gets scale 1
        return torch.empty_like(x, dtype=torch.int8), torch.ones(x.shape[0], device=x.device)
    absmax = x.detach().abs().amax(dim=1).float()  # NaN-propagating
    # symmetric_scale's rule (absmax / qmax, 1 for an all-zero row), written out, and NaN for a non-finite row
    s = torch.where(absmax > 0, absmax / qmax, 1.0)
    s = torch.where(torch.isfinite(absmax), s, float("nan"))
    return quantize_with_scale(x, s[:, None], qmax), s


def norm_modulate_quantize(x: torch.Tensor, shift: Optional[torch.Tensor], scale: Optional[torch.Tensor],
                           eps: float, act_scale: Optional[torch.Tensor], qmax: int = INT8_QMAX):
    """LayerNorm (no affine) of each row of a [B, S, K] tensor, adaLN modulation ``y * (1 + scale[b]) + shift[b]``
    ([B, K] each, or both None), and int8 quantization for the next GEMM, all in fp32: what a DiT block computes
    before its q/k/v and MLP GEMMs, as one pass. Returns (q int8 [B * S, K], scales float32 [1] or [B * S]).

    The order of operations is the contract the fused kernels follow: two-pass mean and biased variance,
    ``(x - mean) * (1 / sqrt(var + eps))`` with IEEE sqrt and division, then a multiply and an add (no fma).
    eps is rounded to float32 first, as the kernels receive it."""
    _check_float(x, "x")
    if x.dim() != 3:
        raise ValueError(f"x must be [B, S, K], got shape {tuple(x.shape)}")
    k = x.shape[-1]
    x32 = x.float()
    mean = x32.sum(-1, keepdim=True) / k
    centered = x32 - mean
    var = (centered * centered).sum(-1, keepdim=True) / k
    eps = torch.tensor(eps, dtype=torch.float32, device=x.device)
    # torch's float32 sqrt on the CPU is not always correctly rounded (off by an ulp for ~17% of inputs, torch
    # 2.14): take it in float64 and round once, which is the correctly rounded float32 sqrt the kernels compute.
    y = centered * (1.0 / torch.sqrt((var + eps).double()).float())
    if scale is not None:
        y = y * (1.0 + scale.float()[:, None, :])
        y = y + shift.float()[:, None, :]
    y = y.reshape(-1, k)
    if act_scale is None:
        return quantize_per_token(y, qmax)
    return quantize_with_scale(y, act_scale, qmax), act_scale.clone()


def quantize_per_channel(w: torch.Tensor, qmax: int = INT8_QMAX):
    """[N, K] weight, one scale per output channel (row). Returns (q int8 [N, K], scale fp32 [N])."""
    _check_float(w, "weight")
    if w.dim() != 2:
        raise ValueError(f"weight must be [N, K], got shape {tuple(w.shape)}")
    s = symmetric_scale(w.detach().abs().amax(dim=1), qmax)
    return quantize_with_scale(w, s[:, None], qmax), s


def quantize_groupwise(w: torch.Tensor, group_size: int, qmax: int = INT4_QMAX, int_scales: bool = False):
    """[N, K] weight in groups of ``group_size`` along K.

    Returns (q int8 [N, K] with values in [-qmax, qmax], scales fp32 [K // group_size, N]), the scales
    group-major as in the canonical format (``ditq.format``). ``int_scales``: integer group scales (two-level):
    each group's absmax / qmax moved to the nearest ``q * c`` of its channel's base (:func:`int_scale_base`), q in
    [1, 16], so that ``scales = q * c`` exactly.
    """
    _check_float(w, "weight")
    if w.dim() != 2:
        raise ValueError(f"weight must be [N, K], got shape {tuple(w.shape)}")
    n, k = w.shape
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group_size {group_size} does not divide K = {k}")
    wg = w.detach().float().reshape(n, k // group_size, group_size)
    ga = wg.abs().amax(dim=2)
    s = symmetric_scale(ga, qmax)  # [N, G]
    if int_scales:
        s = snap_to_int_scales(s, int_scale_base(ga.amax(dim=1)))
    q = quantize_with_scale(wg, s[:, :, None], qmax).reshape(n, k)
    return q, s.t().contiguous()


def dequantize_per_channel(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def dequantize_groupwise(q: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of :func:`quantize_groupwise` up to rounding: fp32 [N, K]."""
    n, k = q.shape
    return (q.float().reshape(n, k // group_size, group_size) * scales.t().float()[:, :, None]).reshape(n, k)


def int_scale_base(absmax: torch.Tensor) -> torch.Tensor:
    """The per-channel base ``c`` of integer group scales for rows of largest magnitude ``absmax`` (float [N]):
    ``absmax / (INT4_QMAX * 16)``, so that the row's largest group gets ``q = 16``, rounded *up* to 19 significant
    bits, so that every product ``q * c`` (q <= 16: 5 bits) is exact in float32 (24 bits) and a checkpoint's
    scales give back q and c exactly (``ditq.format.WeightFormat.int_group_scales``)."""
    c = symmetric_scale(absmax.float(), INT4_QMAX * MAX_INT_GROUP_SCALE)
    bits = c.view(torch.int32)
    return ((bits + 31) & ~31).view(torch.float32)  # positive normal floats: the carry rounds the mantissa up


def snap_to_int_scales(s: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Group scales ``s`` [N, G] moved to the integer grid of ``base`` [N]: ``clamp(round(s / c), 1, 16) * c``."""
    q = torch.round(s / base[:, None]).clamp_(1, MAX_INT_GROUP_SCALE)
    return q * base[:, None]


def expand_int_group_scales(q: torch.Tensor, qscale: torch.Tensor, group_size: int) -> torch.Tensor:
    """Int4 values with integer group scales (two-level scales) as the int8 weight they stand for.

    ``q``: int8 [N, K] in [-8, 7]; ``qscale``: integer [K // group_size, N] in [1, :data:`MAX_INT_GROUP_SCALE`].
    Returns int8 [N, K] ``q[n, k] * qscale[k // group_size, n]``: with the per-channel float scale s[n], a W4A8
    GEMM with integer group scales computes exactly ``gemm_w8a8`` of this weight with scale s (one int32 sum over K),
    which is the contract the Hopper kernels (``ditq_C::gemm_w4a8i``) meet bit for bit."""
    n, k = q.shape
    if k % group_size or tuple(qscale.shape) != (k // group_size, n):
        raise ValueError(f"qscale must be [K // group_size, N] = [{k // group_size}, {n}], got {tuple(qscale.shape)}")
    if qscale.numel() and (int(qscale.min()) < 1 or int(qscale.max()) > MAX_INT_GROUP_SCALE):
        raise ValueError(f"integer group scales must lie in [1, {MAX_INT_GROUP_SCALE}]")
    per_k = qscale.t().to(torch.int16).repeat_interleave(group_size, dim=1)  # [N, K]
    return (q.to(torch.int16) * per_k).to(torch.int8)


# ---- int4 packing (canonical: low nibble = even k) ---------------------------------------------------

def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] with values in [-8, 7] -> uint8 [N, K // 2], element 2j in the low nibble of byte j."""
    if q.dtype != torch.int8:
        raise TypeError(f"pack_int4 takes int8 values, got {q.dtype}")
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even K, got {q.shape[-1]}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError("pack_int4 values must lie in [-8, 7]")
    u = q.to(torch.int16) & 0xF  # two's-complement nibble
    return (u[..., 0::2] | (u[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K // 2] -> int8 [N, K] in [-8, 7] (inverse of :func:`pack_int4`)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 takes uint8, got {packed.dtype}")
    p = packed.to(torch.int16)
    lo, hi = p & 0xF, (p >> 4) & 0xF
    both = torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    return (both - ((both & 0x8) << 1)).to(torch.int8)  # sign-extend: 8..15 -> -8..-1


# ---- exact integer GEMMs -----------------------------------------------------------------------------

def int_matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ w.T`` for int8 a [M, K] and int8 w [N, K], as int64.

    Computed in float64, which is exact here and runs on BLAS (int64 matmul does not, and was the demo's
    bottleneck on CPU): every product and partial sum is an integer below 2^31 (|a| <= 127, |w| <= 128,
    K <= MAX_K), far inside the 2^53 that float64 represents exactly, in whatever order the BLAS adds them."""
    return (a.to(torch.float64) @ w.to(torch.float64).t()).to(torch.int64)


def _act_scale_column(a_scale: torch.Tensor, m: int) -> torch.Tensor:
    a_scale = a_scale.reshape(-1)
    if a_scale.numel() not in (1, m):
        raise ValueError(f"activation scale must have 1 or M = {m} elements, got {a_scale.numel()}")
    return a_scale.reshape(-1, 1)


# Longest K whose int8 dot products float32 sums exactly: |partial sums| <= K * 128 * 128 <= 2^24.
_EXACT_F32_K = 1024


def gemm_w8a8(a, a_scale, w, w_scale, bias: Optional[torch.Tensor] = None, out_dtype=torch.float32):
    """``y = (a_scale[m] * w_scale[n]) * Σ_k a[m,k] w[n,k] + bias[n]``: int32 sums, fp32 epilogue.

    The sums come from float32 matmuls over slices of at most K = 1024, each exact (every product and partial
    sum is an integer of magnitude at most 1024 * 128 * 128 = 2^24, which float32 holds exactly), added up as
    int32 (exact: at most MAX_K * 127 * 128 < 2^31). Twice as fast on the CPU as one float64 matmul over the
    whole row, and the same integers."""
    k = a.shape[1]
    a32, w32 = a.to(torch.float32), w.to(torch.float32)
    if k <= _EXACT_F32_K:
        acc = a32 @ w32.t()
    else:
        acc = (a32[:, :_EXACT_F32_K] @ w32[:, :_EXACT_F32_K].t()).to(torch.int32)
        for k0 in range(_EXACT_F32_K, k, _EXACT_F32_K):
            acc += (a32[:, k0:k0 + _EXACT_F32_K] @ w32[:, k0:k0 + _EXACT_F32_K].t()).to(torch.int32)
        acc = acc.float()
    a_col = a_scale.float().reshape(-1, 1)  # _act_scale_column inline: the reference backend's hot path
    if a_col.shape[0] not in (1, a.shape[0]):
        raise ValueError(f"activation scale must have 1 or M = {a.shape[0]} elements, got {a_col.shape[0]}")
    y = acc * (a_col * w_scale.float().reshape(1, -1))
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def group_partials(a: torch.Tensor, w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Exact per-group int sums ``P[g, m, n] = Σ_{k in group g} a[m,k] w[n,k]`` as int64."""
    m, k = a.shape
    n = w.shape[0]
    ag = a.to(torch.float64).reshape(m, k // group_size, group_size).permute(1, 0, 2)
    wg = w.to(torch.float64).reshape(n, k // group_size, group_size).permute(1, 2, 0)
    return torch.bmm(ag, wg).to(torch.int64)  # exact in float64, as in int_matmul


# Rows of A per block of gemm_w4a8's partials: [G, rows, N] float32 of at most 2^22 elements (16 MB), so the
# blocks come from reused heap memory instead of fresh pages on every call (the demo's W4A8 rows spent more
# time in page faults than in arithmetic).
_W4_BLOCK_ELEMENTS = 1 << 22


def gemm_w4a8(a, a_scale, w_q, w_scales, group_size: int, bias=None, out_dtype=torch.float32):
    """Group-wise W4A8 with unpacked int4 values ``w_q`` (int8 [N, K]) and scales [K // G, N]:
    ``y = a_scale[m] * Σ_g w_scales[g, n] * P[g, m, n] + bias[n]`` — per-group int32 partials rescaled into
    an fp32 accumulator group by group (the "fused dequantization").

    The partials come from a float32 batched matmul, which is exact here: every product and partial sum of a
    group is an integer of magnitude at most group_size * 128 * 8 <= 2^24 (int4 weights, |w| <= 8, and any
    canonical group size, up to MAX_GROUP_SIZE = 2^14), so float32 holds each exactly in whatever order the BLAS adds
    them, and P[g] is the int32 partial converted to float32 as the kernels convert it."""
    a_col = a_scale.float().reshape(-1, 1)  # _act_scale_column inline: the reference backend's hot path
    if a_col.shape[0] not in (1, a.shape[0]):
        raise ValueError(f"activation scale must have 1 or M = {a.shape[0]} elements, got {a_col.shape[0]}")
    m, k = a.shape
    n, groups = w_q.shape[0], k // group_size
    wg = w_q.to(torch.float32).reshape(n, groups, group_size).permute(1, 2, 0)  # [G, group, N]
    scales = w_scales.float()
    acc = torch.empty((m, n), dtype=torch.float32, device=a.device)  # the torch backend also runs on GPUs
    rows = max(1, _W4_BLOCK_ELEMENTS // max(1, groups * n))
    for r0 in range(0, m, rows):
        rows_a = a[r0:r0 + rows]
        ag = rows_a.to(torch.float32).reshape(rows_a.shape[0], groups, group_size).permute(1, 0, 2)  # [G, rows, group]
        p = torch.bmm(ag, wg)
        block = p[0] * scales[0] if groups else torch.zeros((rows_a.shape[0], n), device=a.device)
        for g in range(1, groups):  # in group order, as the kernels fold them: fp32 addition is not associative
            block += p[g] * scales[g]
        acc[r0:r0 + rows] = block
    y = acc * a_col
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def gemm_w4a8_exact(a, a_scale, w_q, w_scales, group_size: int, bias=None):
    """float64 value of the W4A8 product and the magnitude ``Σ |terms|`` that bounds fp32 rounding."""
    p = group_partials(a, w_q, group_size).double()
    s = w_scales.double()[:, None, :]
    a_s = _act_scale_column(a_scale.double(), a.shape[0])
    y = (p * s).sum(0) * a_s
    mag = (p * s).abs().sum(0) * a_s.abs()
    if bias is not None:
        y = y + bias.double()
        mag = mag + bias.double().abs()
    return y, mag


def gemm_w8a8_exact(a, a_scale, w, w_scale, bias=None):
    """float64 value of the W8A8 product and its magnitude (for tolerances)."""
    acc = int_matmul(a, w).double()
    scale = _act_scale_column(a_scale.double(), a.shape[0]) * w_scale.double().reshape(1, -1)
    y = acc * scale
    mag = y.abs()
    if bias is not None:
        y = y + bias.double()
        mag = mag + bias.double().abs()
    return y, mag


# ---- fused GEMM epilogues ------------------------------------------------------------------------------
# What a GEMM can do to its fp32 output y = acc * a_scale * w_scale (+ bias) before storing it, instead of a
# separate elementwise pass: GELU (a DiT MLP's fc1), adaLN-Zero's gate and the residual add (attention's
# output projection and fc2), and int8 quantization for the next GEMM (fc1 feeding a static fc2).

GELU_TANH_BETA = 0.7978845608028654  # sqrt(2 / pi), rounded to fp32 where it is used
GELU_TANH_KAPPA = 0.044715


def gelu_tanh(y: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation in fp32, in the order every kernel follows:
    ``0.5 * y * (1 + tanh(0.7978845608028654 * (y + 0.044715 * (y * y * y))))`` (products left to right).
    As diffusers' ``GELU(approximate="tanh")``; only tanh's last bits differ between math libraries."""
    y = y.float()
    inner = (y + (y * y * y) * GELU_TANH_KAPPA) * GELU_TANH_BETA
    return (y * 0.5) * (torch.tanh(inner) + 1.0)


def gemm_epilogue(y: torch.Tensor, gelu: bool = False, gate: Optional[torch.Tensor] = None,
                  residual: Optional[torch.Tensor] = None, rows_per_gate: int = 1,
                  out_scale: Optional[torch.Tensor] = None, out_dtype=torch.float32) -> torch.Tensor:
    """The fused epilogue's steps after the scale and bias, on the fp32 GEMM output ``y`` [M, N], in fp32 and
    in this order: GELU-tanh (``gelu``); ``y * gate[m // rows_per_gate, n]`` (``gate`` [M // rows_per_gate, N]:
    adaLN's per-sample gate broadcast over the sample's rows); ``y + residual[m, n]`` (``residual`` [M, N]);
    then either int8 quantization with the static scale ``out_scale`` (float32 [1]: exactly
    :func:`quantize_with_scale`, i.e. ``quantize_act``'s static contract; ``out_dtype`` is then ignored) or a
    cast to ``out_dtype``. With no piece it is the plain GEMM's cast."""
    if gelu:
        y = gelu_tanh(y)
    if gate is not None:
        m, n = y.shape
        y = (y.reshape(m // rows_per_gate, rows_per_gate, n) * gate.float()[:, None, :]).reshape(m, n)
    if residual is not None:
        y = y + residual.float()
    if out_scale is not None:
        return quantize_with_scale(y, out_scale, INT8_QMAX)
    return y.to(out_dtype)


def gemm_w8a8_fused(a, a_scale, w, w_scale, bias=None, gelu: bool = False, gate=None, residual=None,
                    rows_per_gate: int = 1, out_scale=None, out_dtype=torch.float32):
    """:func:`gemm_w8a8` (its fp32 result, before the cast) followed by :func:`gemm_epilogue`. A float ``a``
    (with a static ``a_scale`` [1]) is first quantized exactly as ``quantize_act`` does: that is the contract of
    the fused kernels that quantize A as they load it."""
    if a.is_floating_point():
        a = quantize_with_scale(a, a_scale, INT8_QMAX)
    y = gemm_w8a8(a, a_scale, w, w_scale, bias, torch.float32)
    return gemm_epilogue(y, gelu, gate, residual, rows_per_gate, out_scale, out_dtype)


def gemm_w4a8_fused(a, a_scale, w_q, w_scales, group_size: int, bias=None, gelu: bool = False, gate=None,
                    residual=None, rows_per_gate: int = 1, out_scale=None, out_dtype=torch.float32):
    """:func:`gemm_w4a8` (unpacked int4 values ``w_q``, its fp32 result) followed by :func:`gemm_epilogue`; a
    float ``a`` is quantized first, as in :func:`gemm_w8a8_fused`."""
    if a.is_floating_point():
        a = quantize_with_scale(a, a_scale, INT8_QMAX)
    y = gemm_w4a8(a, a_scale, w_q, w_scales, group_size, bias, torch.float32)
    return gemm_epilogue(y, gelu, gate, residual, rows_per_gate, out_scale, out_dtype)


def gemm_epilogue_exact(y: torch.Tensor, magnitude: torch.Tensor, gelu: bool = False, gate=None, residual=None,
                        rows_per_gate: int = 1):
    """float64 twin of :func:`gemm_epilogue` (before the output cast or quantization) for tolerances.

    ``y`` / ``magnitude``: a GEMM's float64 value and magnitude (:func:`gemm_w8a8_exact`). Returns the value
    after the pieces and a magnitude ``mag`` such that an fp32 computation of the same steps is within a few
    ``2**-24 * mag`` of it: GELU's slope is at most 1.13, so the incoming error grows by that much, and its own
    roundings (tanh's last bits included) are each within an ulp of ``|y|`` (``1 + tanh`` is only absolutely
    accurate: this term is what a GELU near zero output needs); a product scales the incoming error by
    ``|gate|``; each operation adds the rounding of its result."""
    y, mag = y.double(), magnitude.double()
    if gelu:
        g = 0.5 * y * (1.0 + torch.tanh(GELU_TANH_BETA * (y + GELU_TANH_KAPPA * y ** 3)))
        mag = 1.13 * mag + y.abs() + g.abs()
        y = g
    if gate is not None:
        gt = gate.double().repeat_interleave(rows_per_gate, dim=0)
        y = y * gt
        mag = mag * gt.abs() + y.abs()
    if residual is not None:
        y = y + residual.double()
        mag = mag + residual.double().abs() + y.abs()
    return y, mag


# ---- attention inputs: q/k RMSNorm, rotary embedding, streams concatenated ----------------------------

def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """diffusers' ``RMSNorm.forward`` (its non-NPU path), op for op, over the last dimension: the variance as
    ``x.to(float32).pow(2).mean(-1)`` (a float32 sum, then a division), ``x * rsqrt(variance + eps)`` in float32,
    then ``to(weight dtype)`` when the weight is float16 / bfloat16 and ``* weight``; with no weight,
    ``to(x's dtype)``. (On the CPU torch's float32 ``rsqrt`` is ``1 / sqrt`` with both steps correctly rounded,
    which is what the Triton kernel computes.)"""
    input_dtype = x.dtype
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    if weight is None:
        return x.to(input_dtype)
    if weight.dtype in (torch.float16, torch.bfloat16):
        x = x.to(weight.dtype)
    return x * weight


def rotary_embedding(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' ``apply_rotary_emb(x, (cos, sin), use_real=True, use_real_unbind_dim=-1, sequence_dim=1)`` for
    x [B, S, H, D] and cos / sin [S, D]: interleaved pairs (2i, 2i + 1) rotated as
    ``x * cos + (-x[2i + 1], x[2i]) * sin`` in float32 (two rounded products and a rounded add), then x's dtype."""
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


def attention_inputs(first: torch.Tensor, second: Optional[torch.Tensor], batch: int, heads: int,
                     first_q_norm: Optional[torch.Tensor], first_k_norm: Optional[torch.Tensor],
                     second_q_norm: Optional[torch.Tensor], second_k_norm: Optional[torch.Tensor], eps: float,
                     rope_cos: Optional[torch.Tensor], rope_sin: Optional[torch.Tensor], torch_norm: bool = False):
    """SDPA's q, k, v [batch, heads, S1 + S2, D] (``first``'s dtype, contiguous) from one or two streams' fused
    q/k/v GEMM outputs ``[batch * S, 3 * heads * D]`` (column blocks q | k | v, head-major): what diffusers' FLUX
    attention processor computes between its projections and its attention, in its order: each stream's q / k
    through its RMSNorm (:func:`rms_norm`, diffusers' ``RMSNorm`` as SD3.5 has it, or with ``torch_norm``
    ``torch.nn.RMSNorm`` as FLUX's attention has it: ``torch.nn.functional.rms_norm``, whose output is ``x * r * w``
    in float32 rounded once to x's dtype; a None weight: no norm), the streams concatenated along the sequence
    (``first`` first), the rotary embedding (:func:`rotary_embedding`) when ``rope_cos`` / ``rope_sin`` [S1 + S2, D]
    are given; v unchanged. The arguments are not checked here (``ditq.ops.check_attention_inputs`` does)."""
    d = first.shape[1] // (3 * heads)
    if torch_norm:
        def norm(t, w, eps):
            return torch.nn.functional.rms_norm(t, (d,), w, eps)
    else:
        norm = rms_norm
    outs = [], [], []
    for x, norms in ((first, (first_q_norm, first_k_norm)), (second, (second_q_norm, second_k_norm))):
        if x is None:
            continue
        # [B, S, H, D] views, as diffusers' processor (S spelled out: a stream may hold no token)
        q, k, v = x.view(batch, x.shape[0] // batch, 3, heads, d).unbind(2)
        for i, (t, w) in enumerate(((q, norms[0]), (k, norms[1]), (v, None))):
            outs[i].append(t if w is None else norm(t, w, eps))
    q, k, v = (torch.cat(o, dim=1) if len(o) > 1 else o[0] for o in outs)
    if rope_cos is not None:
        q, k = rotary_embedding(q, rope_cos, rope_sin), rotary_embedding(k, rope_cos, rope_sin)
    # a float32 norm weight leaves float32 q / k (diffusers would pass them on so): one rounding to the input dtype
    return tuple(t.to(first.dtype).transpose(1, 2).contiguous() for t in (q, k, v))


# ---- error metric -------------------------------------------------------------------------------------

def sqnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(‖ref‖² / ‖ref − x‖²)``; +inf when equal."""
    if not isinstance(ref, torch.Tensor) or not isinstance(x, torch.Tensor):
        raise TypeError(f"sqnr takes two tensors, got {type(ref).__name__} and {type(x).__name__}")
    if ref.shape != x.shape:
        raise ValueError(f"sqnr needs tensors of one shape, got {tuple(ref.shape)} and {tuple(x.shape)}")
    ref64, x64 = ref.detach().double(), x.detach().double()
    noise = (ref64 - x64).pow(2).sum().item()
    signal = ref64.pow(2).sum().item()
    if noise == 0:
        return float("inf")
    if signal == 0:
        return float("-inf")
    import math
    return 10.0 * math.log10(signal / noise)

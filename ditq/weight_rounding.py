"""How a float weight becomes integers and scales: the kernels and the format do not change, only the choice.

``QuantConfig.weight_method`` picks one of:

* ``"rtn"`` (the default, and what every checkpoint without the field used): each group's scale is its absmax / qmax
  and every weight rounds to the nearest level (:func:`ditq.quant.reference.quantize_groupwise` /
  ``quantize_per_channel``).
* ``"mse"``: per group (per output channel for 8-bit), the scale is ``r x absmax / qmax`` for the shrink ``r`` on
  :data:`MSE_SHRINKS` (1.0 included) with the least squared weight error, then round to nearest. Clipping the
  group's largest weight buys a finer step for all the others; with 7 levels a side the finer step often wins. ``r =
  1`` is a candidate and ties keep the larger clip, so the weight error never exceeds round-to-nearest's.
* ``"gptq"``: error-compensating rounding (Frantar et al., GPTQ, 2022) against the layer's input second moment
  ``H = X^T X`` accumulated during calibration: columns are quantized left to right and each column's rounding error
  is spread over the columns not yet quantized, weighted by ``H^-1``, so the *output* error ``||X W^T - X Wq^T||``
  is what is minimized, not the weight error (a GPTQ weight can have a lower weight SQNR than round-to-nearest and a
  higher output SQNR). Damping adds :data:`GPTQ_DAMP` x mean(diag H) to the diagonal; columns run in their natural
  order (no act-order), so a group's scale is fixed from the already-updated weights when its first column is
  reached and the groups stay the contiguous K-ranges the format stores. A group's scale comes from the same shrink
  search as ``"mse"`` on those updated weights (``scale_search="mse"``; ``"absmax"`` is the plain algorithm).
  Input channels that never carried signal (``H[c, c] = 0``) are rounded to nearest and pass no error on.

Cost of ``"gptq"``: ``H`` is ``K x K`` float32 per quantized layer, kept from the first calibration call to the
layer's swap: ``4 K^2`` bytes each (K = 1152: 5.3 MB; DiT-XL/2's MLP down projection K = 4608: 85 MB; all 28
blocks' linears of DiT-XL/2: about 3.2 GB), on the device the activations ran on. The rounding itself is
``O(N K^2)`` per layer plus one ``K x K`` Cholesky; that is why it is opt-in.

Integer group scales (``WeightFormat(..., group_scales="int")``, :mod:`ditq.format`): every method keeps its
rounding and picks each group's scale on the channel's integer grid ``q * c`` (q in [1, 16], ``c`` from the row's
absmax: :func:`ditq.quant.reference.int_scale_base`): ``"rtn"`` the grid point nearest absmax / qmax, ``"mse"`` the
one of the 16 with the least squared error, ``"gptq"`` either, on the updated weights. The group holding the row's
largest weight keeps ``q = 16`` under every method, which is what lets a checkpoint's scales give back ``q`` and
``c`` exactly.

Every function returns the *unpacked* integers (int8 ``[N, K]``, values within ``[-qmax, qmax]``) and the scales in
the canonical layout of :mod:`ditq.format` (``[N]`` per channel, ``[K // group_size, N]`` group-wise);
:func:`quantize_weight` packs them.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .format import WeightFormat
from .quant import reference as ref

WEIGHT_METHODS = ("rtn", "mse", "gptq")
# Shrinks of a group's absmax tried by "mse", largest first: 1.00 down to 0.50 in steps of 0.01. Below 0.5 a clip of
# an int4 group throws away more than the finer step recovers on any weight distribution we measured.
MSE_SHRINKS = [round(1.0 - 0.01 * i, 2) for i in range(51)]
GPTQ_DAMP = 0.01   # fraction of mean(diag H) added to the diagonal (the GPTQ paper's default)
GPTQ_BLOCK = 128   # columns updated together before the trailing columns get the block's accumulated error


def _group_size(fmt: WeightFormat, k: int) -> int:
    return k if fmt.group_size is None else fmt.group_size


def _to_canonical_scales(s: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """[N, G] scales -> the canonical layout ([N] per channel, [G, N] group-wise)."""
    return s[:, 0].contiguous() if fmt.group_size is None else s.t().contiguous()


def mse_scales(wg: torch.Tensor, qmax: int, shrinks=None) -> torch.Tensor:
    """float32 [..., G] scales of ``wg`` [..., G, g] (groups along the last dim): per group, the shrink of its
    absmax with the least squared rounding error (ties: the larger clip, so never worse than absmax)."""
    shrinks = MSE_SHRINKS if shrinks is None else shrinks
    w = wg.float()
    absmax = w.abs().amax(dim=-1)
    best_s = ref.symmetric_scale(absmax, qmax)
    best_err = _group_err(w, best_s, qmax)
    for r in shrinks:
        if r >= 1.0:
            continue
        s = ref.symmetric_scale(absmax * r, qmax)
        err = _group_err(w, s, qmax)
        better = err < best_err
        best_s = torch.where(better, s, best_s)
        best_err = torch.where(better, err, best_err)
    return best_s


def int_mse_scales(wg: torch.Tensor, qmax: int, base: torch.Tensor, pinned: torch.Tensor) -> torch.Tensor:
    """float32 [N, G] scales on the integer grid ``q * base[n]`` (q in [1, 16]) of ``wg`` [N, G, g]: per group the q
    with the least squared rounding error (ties: the larger q), ``q = 16`` where ``pinned`` [N, G] is True."""
    w = wg.float()
    best_s = base[:, None].expand(w.shape[:2]) * ref.MAX_INT_GROUP_SCALE
    best_err = _group_err(w, best_s, qmax)
    for q in range(ref.MAX_INT_GROUP_SCALE - 1, 0, -1):
        s = (base * q)[:, None].expand(w.shape[:2])
        err = _group_err(w, s, qmax)
        better = (err < best_err) & ~pinned
        best_s = torch.where(better, s, best_s)
        best_err = torch.where(better, err, best_err)
    return best_s.contiguous()


def _int_grid(w: torch.Tensor, group_size: int):
    """(base [N], pinned [N, G]) of integer group scales for a float [N, K] weight: the channel bases and, per
    row, the group holding its largest magnitude (which keeps q = 16)."""
    n, k = w.shape
    ga = w.detach().float().abs().reshape(n, k // group_size, group_size).amax(dim=2)
    pinned = torch.zeros_like(ga, dtype=torch.bool)
    pinned[torch.arange(n, device=w.device), ga.argmax(dim=1)] = True
    return ref.int_scale_base(ga.amax(dim=1)), pinned


def _group_err(w: torch.Tensor, s: torch.Tensor, qmax: int) -> torch.Tensor:
    """Squared rounding error per group: the reference quantizer's arithmetic (multiply by the fp32 reciprocal,
    round half to even, clamp) without its int8 cast and NaN handling (weights are checked finite first)."""
    s = s[..., None]
    q = torch.round(w * torch.reciprocal(s)).clamp_(-qmax, qmax)
    return (q.mul_(s).sub_(w)).square_().sum(-1)


def round_weight(w: torch.Tensor, fmt: WeightFormat, method: str = "rtn",
                 hessian: Optional[torch.Tensor] = None, scale_search: str = "mse") -> Tuple[torch.Tensor,
                                                                                             torch.Tensor]:
    """(int8 [N, K] integers, canonical scales) of a float [N, K] weight under ``method`` (see the module doc).

    ``hessian``: float [K, K], the sum of ``x x^T`` over the layer's calibration inputs; required by ``"gptq"``.
    """
    if method not in WEIGHT_METHODS:
        raise ValueError(f"unknown weight_method {method!r}; choose one of {WEIGHT_METHODS}")
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() != 2:
        raise TypeError(f"weight must be a floating-point [N, K] tensor, got "
                        f"{w.dtype if isinstance(w, torch.Tensor) else type(w).__name__}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight holds NaN or inf values; cannot quantize")
    n, k = w.shape
    fmt.check_in_features(k)
    int_scales = fmt.group_scales == "int"
    if method == "rtn":
        if fmt.bits == 8:
            return ref.quantize_per_channel(w)
        return ref.quantize_groupwise(w, fmt.group_size, int_scales=int_scales)
    g = _group_size(fmt, k)
    grid = _int_grid(w, g) if int_scales else None
    if method == "mse":
        wg = w.detach().float().reshape(n, k // g, g)
        s = int_mse_scales(wg, fmt.qmax, *grid) if int_scales else mse_scales(wg, fmt.qmax)
        q = ref.quantize_with_scale(wg, s[:, :, None], fmt.qmax).reshape(n, k)
        return q, _to_canonical_scales(s, fmt)
    if hessian is None:
        raise ValueError("weight_method 'gptq' needs the layer's input Hessian X^T X (collected in calibration)")
    if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (k, k):
        raise ValueError(f"hessian must be a [{k}, {k}] tensor for K = {k}, got "
                         f"{tuple(hessian.shape) if isinstance(hessian, torch.Tensor) else type(hessian).__name__}")
    if scale_search not in ("mse", "absmax"):
        raise ValueError(f"scale_search must be 'mse' or 'absmax', got {scale_search!r}")
    return gptq(w, hessian, g, fmt.qmax, fmt, scale_search, grid)


def _inverse_hessian_factor(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of the damped ``H^-1``: row i from the diagonal on is what column i's error
    propagates with (the GPTQ paper's formulation). Damping grows tenfold until the factorization succeeds."""
    k = h.shape[0]
    mean_diag = float(torch.diagonal(h).mean())
    damp = GPTQ_DAMP * (mean_diag if mean_diag > 0 else 1.0)
    eye = torch.eye(k, dtype=h.dtype, device=h.device)
    for _ in range(6):
        try:
            lower = torch.linalg.cholesky(h + damp * eye)
            hinv = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(hinv, upper=True)
        except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
            damp *= 10
    raise ValueError("the layer's input Hessian is not positive definite even with heavy damping")


def gptq(w: torch.Tensor, hessian: torch.Tensor, group_size: int, qmax: int, fmt: WeightFormat,
         scale_search: str = "mse", grid=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """GPTQ of a float [N, K] weight in groups of ``group_size`` along K (``group_size = K``: one scale per row).
    ``grid``: (base [N], pinned [N, G]) of integer group scales (:func:`_int_grid`), or None for float scales.

    Computed in float64 on the CPU (exact enough that the result does not depend on the BLAS's summation order at
    the sizes tested) and float32 on a GPU."""
    n, k = w.shape
    dtype = torch.float64 if w.device.type == "cpu" else torch.float32
    W = w.detach().to(dtype).clone()
    H = hessian.detach().to(device=w.device, dtype=dtype).clone()
    H = (H + H.t()) / 2  # accumulated in float32 by pieces: make it exactly symmetric
    dead = torch.diagonal(H) <= 0
    if bool(dead.any()):
        # No signal reached these inputs: their column rounds to nearest and, with a zero row and column in H but a
        # unit diagonal, passes no error on (H^-1 keeps them decoupled from the rest).
        H[dead, :] = 0
        H[:, dead] = 0
        H[dead, dead] = 1
    U = _inverse_hessian_factor(H)
    # Blocks hold whole groups, so a group's scale is taken from weights that already carry every earlier column's
    # error (the lazy batch update of the later blocks happens after each block).
    block = group_size if group_size >= GPTQ_BLOCK else GPTQ_BLOCK
    groups = k // group_size
    Q = torch.empty(n, k, dtype=torch.int8, device=w.device)
    S = torch.empty(n, groups, dtype=torch.float32, device=w.device)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        W1 = W[:, b0:b1].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[b0:b1, b0:b1]
        s = None
        for i in range(b1 - b0):
            col = b0 + i
            if col % group_size == 0:
                grp = W1[:, i:i + group_size].float()
                if grid is not None:  # integer group scales: the channel's grid, its pinned group at q = 16
                    base, pinned = grid
                    pin = pinned[:, col // group_size, None]
                    if scale_search == "mse":
                        s = int_mse_scales(grp[:, None, :], qmax, base, pin)[:, 0]
                    else:
                        s = ref.snap_to_int_scales(ref.symmetric_scale(grp.abs().amax(dim=1), qmax)[:, None],
                                                   base)[:, 0]
                        s = torch.where(pin[:, 0], base * ref.MAX_INT_GROUP_SCALE, s)
                elif scale_search == "mse":
                    s = mse_scales(grp[:, None, :], qmax)[:, 0]
                else:
                    s = ref.symmetric_scale(grp.abs().amax(dim=1), qmax)
                S[:, col // group_size] = s
            x = W1[:, i]
            q = ref.quantize_with_scale(x, s, qmax)
            Q[:, col] = q
            err = (x - q.to(dtype) * s.to(dtype)) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, b1:] -= E1 @ U[b0:b1, b1:]
    return Q, _to_canonical_scales(S, fmt)


def quantize_weight(w: torch.Tensor, fmt: WeightFormat, method: str = "rtn",
                    hessian: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Canonical packed (qweight, scales) of a float [N, K] weight: :func:`round_weight`, int4 packed."""
    q, s = round_weight(w, fmt, method, hessian)
    return (q, s) if fmt.bits == 8 else (ref.pack_int4(q), s)


def output_sqnr(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> Optional[float]:
    """Estimated SQNR (dB) of the layer's output ``X W^T`` over the calibration inputs when ``W`` becomes ``w_hat``:
    ``tr(W H W^T) / tr(dW H dW^T)`` with ``H = X^T X``, no second pass over the data."""
    h = hessian.detach().double().to(w.device)
    wd = w.detach().double()
    d = wd - w_hat.detach().double()
    signal = float(((wd @ h) * wd).sum())
    noise = float(((d @ h) * d).sum())
    if signal <= 0:
        return None
    return math.inf if noise <= 0 else 10 * math.log10(signal / noise)

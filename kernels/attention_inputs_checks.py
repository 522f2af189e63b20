"""Argument checks of ``attention_inputs`` (q/k RMSNorm + rotary embedding + stream concatenation).

Plain torch, no Triton: the torch backend's reference and the cuda-emulated binding validate with this same
function as the Triton launcher, so every backend refuses bad input with the same exception and the same words.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch

from . import checks

# A head's D values live in one program's registers (q, k and their rotary partners): far above any DiT's
# head size (64-256), far below what would spill.
MAX_HEAD_DIM = 1024


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def check_eps(eps) -> float:
    """eps as the kernels add it: rounded to float32 (torch adds a Python float to a float32 tensor the same way)."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__}")
    e32 = torch.tensor(float(eps), dtype=torch.float32).item()
    if not (math.isfinite(e32) and e32 > 0):
        raise ValueError(f"eps must be finite and positive in float32, got {eps!r}")
    return e32


def _stream(name: str, x, dtypes, batch: int, width: Optional[int]) -> int:
    """Rows per image of a stream's fused q/k/v output [batch * S, 3 * heads * D]."""
    checks.tensor(name, x, dtypes, dim=2)
    if width is not None and x.shape[1] != width:
        raise ValueError(f"{name} must be [batch * S, 3 * heads * D] = [*, {width}] like first, "
                         f"got shape {tuple(x.shape)}")
    if x.shape[0] % batch:
        raise ValueError(f"{name} has {x.shape[0]} rows, not a multiple of batch = {batch} "
                         f"(it must be [batch * S, 3 * heads * D])")
    return x.shape[0] // batch


def check_args(first, second, batch, heads, first_q_norm, first_k_norm, second_q_norm, second_k_norm, eps,
               rope_cos, rope_sin) -> Tuple[int, int, int, float]:
    """Validate the arguments of ``attention_inputs``; returns ``(S1, S2, D, eps as float32)`` (S2 = 0 without a
    second stream). Bad input raises ValueError / TypeError naming the argument."""
    batch = _positive_int("batch", batch)
    heads = _positive_int("heads", heads)
    s1 = _stream("first", first, checks.FLOAT_DTYPES, batch, None)
    if first.shape[1] % (3 * heads) or first.shape[1] == 0:
        raise ValueError(f"first must be [batch * S1, 3 * heads * D] with heads = {heads}: its {first.shape[1]} "
                         f"columns are not a positive multiple of {3 * heads}")
    d = first.shape[1] // (3 * heads)
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head dimension D = {d} exceeds {MAX_HEAD_DIM} (one head lives in one program's registers)")
    s2 = 0
    if second is not None:
        # the same dtype: the outputs hold both streams
        s2 = _stream("second", second, (first.dtype,), batch, first.shape[1])
    elif second_q_norm is not None or second_k_norm is not None:
        raise ValueError("second_q_norm / second_k_norm given without a second stream")
    # a norm's weight in the activations' dtype, or float32 (diffusers then normalizes in float32 throughout)
    w_dtypes = tuple(dict.fromkeys((first.dtype, torch.float32)))
    for name, w in (("first_q_norm", first_q_norm), ("first_k_norm", first_k_norm),
                    ("second_q_norm", second_q_norm), ("second_k_norm", second_k_norm)):
        if w is not None:
            checks.tensor(name, w, w_dtypes, shape=(d,), labels=("D",))
    eps = check_eps(eps)
    if (rope_cos is None) != (rope_sin is None):
        raise ValueError("rope_cos and rope_sin come together: give both (rotary embedding) or neither")
    if rope_cos is not None:
        if d % 2:
            raise ValueError(f"the rotary embedding rotates pairs (2i, 2i + 1): head dimension D = {d} must be even")
        for name, t in (("rope_cos", rope_cos), ("rope_sin", rope_sin)):
            checks.tensor(name, t, (torch.float32,), shape=(s1 + s2, d), labels=("S1 + S2", "D"))
    checks.same_device("first", first, second=second, first_q_norm=first_q_norm, first_k_norm=first_k_norm,
                       second_q_norm=second_q_norm, second_k_norm=second_k_norm, rope_cos=rope_cos,
                       rope_sin=rope_sin)
    return s1, s2, d, eps

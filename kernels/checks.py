"""Argument checks shared by the launchers.

On the runtime's hot path a launcher is the only validation a Triton kernel gets, and a Triton kernel given a
wrong dtype, a strided view or a short tensor does not fail: it reads whatever memory the pointer arithmetic
lands on. So every launcher refuses, with a ValueError / TypeError naming the argument, anything its kernel
cannot take. Plain torch, no ``ditq`` runtime import.
"""
from __future__ import annotations

from typing import Iterable, Optional, Tuple

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FUSED_A_DTYPES = (torch.int8,) + FLOAT_DTYPES  # the fused GEMMs' A: int8, or float quantized on load


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def tensor(name: str, t, dtypes: Tuple[torch.dtype, ...], shape: Optional[tuple] = None,
           dim: Optional[int] = None, labels: Optional[Tuple[str, ...]] = None) -> torch.Tensor:
    """``t`` must be a contiguous tensor of one of ``dtypes`` (TypeError otherwise) with exactly ``shape``
    (None entries match anything; ``labels`` names the dimensions in the message, e.g. ("N", "K")) or ``dim``
    dimensions (ValueError otherwise)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be {_dtype_names(dtypes)}, got {str(t.dtype).replace('torch.', '')}")
    want_dim = len(shape) if shape is not None else dim
    if want_dim is not None and t.dim() != want_dim:
        raise ValueError(f"{name} must have {want_dim} dimension(s), got shape {tuple(t.shape)}")
    if shape is not None and any(w is not None and w != s for w, s in zip(shape, t.shape)):
        spelled = "[" + ", ".join("*" if w is None else str(w) for w in shape) + "]"
        if labels:
            spelled = "[" + ", ".join(labels) + "] = " + spelled
        raise ValueError(f"{name} must be {_dtype_names(dtypes)} {spelled}, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        # the kernels index with the logical shape's row-major strides, so a view would be read wrongly
        raise ValueError(f"{name} must be contiguous (call .contiguous() first), got strides {t.stride()}")
    return t


def static_scale_for_float_a(a: torch.Tensor, a_scale: torch.Tensor) -> None:
    """A fused GEMM quantizes a float ``a`` as it loads it, tile by tile, so only with a static scale [1]
    (per-token scales need each whole row first). The words of ``ditq.ops.float_a_needs_static_scale``."""
    if a.dtype != torch.int8 and tuple(a_scale.shape) != (1,):
        raise ValueError(f"a float activation needs a static a_scale, float32 [1] (the fused GEMM quantizes it "
                         f"as it loads it), got shape {tuple(a_scale.shape)}: quantize it with quantize_act for "
                         f"per-token scales")


def same_device(ref_name: str, ref: torch.Tensor, **others) -> None:
    """Every non-None tensor in ``others`` must live on ``ref``'s device (a kernel takes one device)."""
    for name, t in others.items():
        if isinstance(t, torch.Tensor) and t.device != ref.device:  # non-tensors: refused by tensor()
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def out_dtype(dtype) -> torch.dtype:
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float16, bfloat16 or float32, got {dtype}")
    return dtype


def k_dim(k: int, multiple: int, max_k: Optional[int], why: str) -> None:
    if k % multiple:
        raise ValueError(f"K = {k} must be a multiple of {multiple}: {why}")
    if max_k is not None and k > max_k:
        raise ValueError(f"K = {k} exceeds {max_k}, the largest K ditq's int8 GEMMs take")


def config_keys(kernel: str, cfg, keys: Iterable[str]) -> dict:
    """A tile configuration must be a dict holding every key of the kernel's table entries."""
    if not isinstance(cfg, dict):
        raise TypeError(f"{kernel} config must be a dict, got {type(cfg).__name__}")
    missing = [k for k in keys if k not in cfg]
    if missing:
        raise ValueError(f"{kernel} config lacks {missing}: {cfg}")
    return dict(cfg)

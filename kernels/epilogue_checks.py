"""Argument checks of the fused GEMM epilogue's pieces (GELU, gate, residual, int8 output).

Plain torch, no Triton: the Triton launchers (through :mod:`.epilogue`) and the torch backend (``ditq.ops``, for
every backend's fused GEMM op) validate with this same function, so every backend refuses bad input with the same
exception and the same words.
"""
from __future__ import annotations

import torch

from .checks import FLOAT_DTYPES, _dtype_names


def check_args(device: torch.device, m: int, n: int, gelu, gate, residual, rows_per_gate, out_scale,
               out_dtype) -> None:
    """Refuse epilogue arguments the kernels cannot take:
    gelu a bool; rows_per_gate an int >= 1 dividing M when a gate is given; gate float [M // rows_per_gate, N]
    and residual ``out_dtype`` [M, N], contiguous; out_scale float32 [1], positive and finite when its value
    can be read without a device synchronization (a CPU tensor); everything on ``device``."""
    if type(gelu) is not bool:
        raise TypeError(f"gelu must be a bool, got {type(gelu).__name__}")
    if type(rows_per_gate) is not int or rows_per_gate < 1:
        raise ValueError(f"rows_per_gate must be an int >= 1, got {rows_per_gate!r}")
    if gate is not None:
        if not isinstance(gate, torch.Tensor) or gate.dtype not in FLOAT_DTYPES:
            raise _bad_tensor("gate", gate, FLOAT_DTYPES)
        if m % rows_per_gate:
            raise ValueError(f"M = {m} must be a multiple of rows_per_gate = {rows_per_gate} (the rows of one "
                             f"gate row)")
        if gate.shape != (m // rows_per_gate, n):
            raise ValueError(f"gate must be [M // rows_per_gate, N] = [{m // rows_per_gate}, {n}], "
                             f"got {tuple(gate.shape)}")
        if not gate.is_contiguous():
            raise ValueError("gate must be contiguous (call .contiguous() first)")
    if residual is not None:
        if not isinstance(residual, torch.Tensor) or residual.dtype != out_dtype:
            raise _bad_tensor("residual", residual, (out_dtype,))
        if residual.shape != (m, n):
            raise ValueError(f"residual must be [M, N] = [{m}, {n}], got {tuple(residual.shape)}")
        if not residual.is_contiguous():
            raise ValueError("residual must be contiguous (call .contiguous() first)")
    if out_scale is not None:
        if not isinstance(out_scale, torch.Tensor) or out_scale.dtype != torch.float32:
            raise _bad_tensor("out_scale", out_scale, (torch.float32,))
        if out_scale.shape != (1,):
            raise ValueError(f"out_scale must be a static scale, float32 [1], got shape {tuple(out_scale.shape)}")
        if out_scale.device.type == "cpu" and not 0 < float(out_scale) < float("inf"):
            raise ValueError(f"out_scale must be positive and finite, got {float(out_scale)!r}")
    for name, t in (("gate", gate), ("residual", residual), ("out_scale", out_scale)):
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but the activations are on {device}: "
                             f"move all inputs of a ditq op to one device")


def _bad_tensor(name: str, t, dtypes) -> TypeError:
    if not isinstance(t, torch.Tensor):
        return TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    return TypeError(f"{name} must be {_dtype_names(dtypes)}; got {_dtype_names((t.dtype,))}")

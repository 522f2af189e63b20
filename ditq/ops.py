"""The seam between the runtime and the kernels: ``torch.ops.ditq.*`` custom ops.

Each op's schema is defined here once. Its last argument names the backend whose kernel runs it; the
registered implementation validates the inputs (one set of clear errors for every backend) and hands them
to that backend (:mod:`ditq.backends`). Fake implementations give shapes and dtypes, so ``torch.compile``
traces through the ops without running a kernel.

Contract (M tokens, K inputs, N outputs):

``quantize_act(x, scale, backend) -> (q, scales)``
    x: float16/bfloat16/float32 [M, K], contiguous. ``scale``: a float32 [1] static scale, or None for
    dynamic per-token scales. Returns q int8 [M, K] and the scales used, float32 [1] or [M].
``gemm_w8a8(a, a_scale, w, w_scale, bias, out_dtype, backend) -> y``
    a int8 [M, K]; a_scale float32 [1] or [M]; w int8 [N, K] in the backend's layout; w_scale float32 [N];
    bias float [N] or None. y [M, N] in out_dtype.
``gemm_w4a8(a, a_scale, w, w_scale, bias, group_size, out_dtype, backend) -> y``
    w uint8, two int4 per byte, in the backend's layout (``Backend.prepare_weight``); w_scale float32
    [K // group_size, N]; otherwise as gemm_w8a8.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import backends
from .format import SUPPORTED_GROUP_SIZES
from .quant.reference import MAX_K

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

SCHEMAS = {
    "quantize_act": "(Tensor x, Tensor? scale, str backend) -> (Tensor, Tensor)",
    "gemm_w8a8": "(Tensor a, Tensor a_scale, Tensor w, Tensor w_scale, Tensor? bias, ScalarType out_dtype, "
                 "str backend) -> Tensor",
    "gemm_w4a8": "(Tensor a, Tensor a_scale, Tensor w, Tensor w_scale, Tensor? bias, int group_size, "
                 "ScalarType out_dtype, str backend) -> Tensor",
}


# ---- validation: the same clear error whichever backend runs -----------------------------------------

def _expect(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_tensor(t, name: str, dtypes, dim: Optional[int] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must be {names}; got {str(t.dtype).replace('torch.', '')}")
    if dim is not None:
        _expect(t.dim() == dim, f"{name} must be {dim}-D, got shape {tuple(t.shape)}")


def _check_same_device(ref: torch.Tensor, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but the activations are on {ref.device}: "
                             f"move all inputs of a ditq op to one device")


def _check_act_scale(a_scale, m: int) -> None:
    _check_tensor(a_scale, "a_scale", (torch.float32,))
    _expect(a_scale.dim() == 1 and a_scale.numel() in (1, m),
            f"a_scale must be float32 [1] (static) or [M] = [{m}] (per token), got shape {tuple(a_scale.shape)}")


def _check_bias(bias, n: int) -> None:
    if bias is not None:
        _check_tensor(bias, "bias", _FLOAT_DTYPES)
        _expect(bias.shape == (n,), f"bias must have shape [N] = [{n}], got {tuple(bias.shape)}")


def _check_out_dtype(out_dtype) -> None:
    if out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}")


def check_quantize_act(x, scale) -> None:
    _check_tensor(x, "x", _FLOAT_DTYPES, dim=2)
    _expect(x.is_contiguous(), "x must be contiguous (call .contiguous() first)")
    if scale is not None:
        _check_tensor(scale, "scale", (torch.float32,))
        _expect(scale.shape == (1,), f"a static scale must be float32 [1], got shape {tuple(scale.shape)}")
        _check_same_device(x, scale=scale)


def check_gemm_w8a8(a, a_scale, w, w_scale, bias, out_dtype) -> None:
    _check_tensor(a, "a", (torch.int8,), dim=2)
    _check_tensor(w, "w", (torch.int8,), dim=2)
    m, k = a.shape
    n = w.shape[0]
    _expect(w.shape[1] == k, f"a is [M, K] = {tuple(a.shape)} but w is {tuple(w.shape)}: w must be [N, K]")
    _expect(k <= MAX_K, f"K = {k} exceeds {MAX_K}, beyond which int32 accumulation could overflow")
    _expect(a.is_contiguous() and w.is_contiguous(), "a and w must be contiguous")
    _check_act_scale(a_scale, m)
    _check_tensor(w_scale, "w_scale", (torch.float32,))
    _expect(w_scale.shape == (n,), f"w_scale must be float32 [N] = [{n}], got {tuple(w_scale.shape)}")
    _check_bias(bias, n)
    _check_out_dtype(out_dtype)
    _check_same_device(a, a_scale=a_scale, w=w, w_scale=w_scale, bias=bias)


def check_gemm_w4a8(a, a_scale, w, w_scale, bias, group_size, out_dtype) -> None:
    _check_tensor(a, "a", (torch.int8,), dim=2)
    _check_tensor(w, "w", (torch.uint8,))
    _check_tensor(w_scale, "w_scale", (torch.float32,), dim=2)
    m, k = a.shape
    _expect(group_size in SUPPORTED_GROUP_SIZES,
            f"group_size must be one of {SUPPORTED_GROUP_SIZES}, got {group_size}")
    _expect(k % group_size == 0, f"group_size {group_size} does not divide K = {k}")
    _expect(k <= MAX_K, f"K = {k} exceeds {MAX_K}, beyond which int32 accumulation could overflow")
    n = w_scale.shape[1]
    _expect(w_scale.shape[0] == k // group_size,
            f"w_scale must be [K // group_size, N] = [{k // group_size}, N], got {tuple(w_scale.shape)}")
    _expect(w.numel() * 2 == n * k, f"w holds {w.numel() * 2} int4 values but N * K = {n} * {k}")
    _expect(a.is_contiguous() and w.is_contiguous(), "a and w must be contiguous")
    _check_act_scale(a_scale, m)
    _check_bias(bias, n)
    _check_out_dtype(out_dtype)
    _check_same_device(a, a_scale=a_scale, w=w, w_scale=w_scale, bias=bias)


# ---- registration -------------------------------------------------------------------------------------

_lib = torch.library.Library("ditq", "DEF")
for _name, _schema in SCHEMAS.items():
    _lib.define(_name + _schema)


def _quantize_act(x, scale, backend: str):
    check_quantize_act(x, scale)
    return backends.get_backend(backend, x.device).quantize_act(x, scale)


def _gemm_w8a8(a, a_scale, w, w_scale, bias, out_dtype, backend: str):
    check_gemm_w8a8(a, a_scale, w, w_scale, bias, out_dtype)
    return backends.get_backend(backend, a.device).gemm_w8a8(a, a_scale, w, w_scale, bias, out_dtype)


def _gemm_w4a8(a, a_scale, w, w_scale, bias, group_size, out_dtype, backend: str):
    check_gemm_w4a8(a, a_scale, w, w_scale, bias, group_size, out_dtype)
    return backends.get_backend(backend, a.device).gemm_w4a8(a, a_scale, w, w_scale, bias, group_size,
                                                             out_dtype)


for _name, _fn in (("quantize_act", _quantize_act), ("gemm_w8a8", _gemm_w8a8), ("gemm_w4a8", _gemm_w4a8)):
    for _key in ("CPU", "CUDA"):
        _lib.impl(_name, _fn, _key)


@torch.library.register_fake("ditq::quantize_act")
def _quantize_act_fake(x, scale, backend):
    m = x.shape[0]
    return torch.empty_like(x, dtype=torch.int8), x.new_empty((1,) if scale is not None else (m,),
                                                               dtype=torch.float32)


@torch.library.register_fake("ditq::gemm_w8a8")
def _gemm_w8a8_fake(a, a_scale, w, w_scale, bias, out_dtype, backend):
    return a.new_empty((a.shape[0], w_scale.shape[0]), dtype=out_dtype)


@torch.library.register_fake("ditq::gemm_w4a8")
def _gemm_w4a8_fake(a, a_scale, w, w_scale, bias, group_size, out_dtype, backend):
    return a.new_empty((a.shape[0], w_scale.shape[1]), dtype=out_dtype)


quantize_act = torch.ops.ditq.quantize_act
gemm_w8a8 = torch.ops.ditq.gemm_w8a8
gemm_w4a8 = torch.ops.ditq.gemm_w4a8

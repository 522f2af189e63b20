"""What differs when Triton runs kernels through its NumPy interpreter (``TRITON_INTERPRET=1``).

Kernels take an ``INTERPRET`` constexpr (from :func:`interpreting`) and route the few operations whose
interpreter twin is missing or inexact through the helpers here; a constexpr ``if`` compiles only one branch,
so GPU code is unchanged.

* ``libdevice`` calls (``extern_elementwise``) are not implemented by the interpreter (triton 3.8).
* fp32 -> bf16 casts *truncate* under the interpreter (its ``_convert_float`` drops the low bits when no
  rounding mode is given), whereas compiled code rounds to nearest even (``cvt.rn.bf16.f32``). fp32 -> fp16
  goes through NumPy's ``astype`` and is correctly rounded.

Some interpreters cannot run our kernels at all: triton 3.6's turns a loop bound computed in the kernel into a
Python int with ``int(array)`` on a one-element array, which NumPy 2.4 refuses ("only 0-dimensional arrays can
be converted to Python scalars"); every GEMM's K loop has such a bound. :func:`interpreter_defect` finds that
out once, on a probe kernel with the same loop, and the launchers refuse CPU tensors with its reason instead of
failing inside a kernel.
"""
from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import torch
import triton
import triton.language as tl


@triton.jit
def _probe():
    pass


def interpreting() -> bool:
    """True when this process's ``@triton.jit`` kernels run through Triton's NumPy interpreter.

    Triton reads ``TRITON_INTERPRET`` when it decorates a kernel, i.e. when our kernel modules are
    imported, so what counts is how a kernel defined here was built, not the variable's value now."""
    return type(_probe).__name__ == "InterpretedFunction"


@triton.jit
def _loop_probe(out_ptr, n):
    count = 0
    for _ in range(0, n // 1):  # a bound computed in the kernel, as every GEMM's K loop has
        count += 1
    tl.store(out_ptr, count)


@functools.lru_cache(maxsize=None)
def interpreter_defect() -> Optional[str]:
    """None when the interpreter (if on) runs a kernel loop like our GEMMs'; else why it cannot, in one line."""
    if not interpreting():
        return None
    out = torch.full((1,), -1, dtype=torch.int32)
    try:
        _loop_probe[(1,)](out, 3)
        result = int(out.item())
    except Exception as e:  # the interpreter wraps what failed in its own error type
        return (f"Triton {triton.__version__}'s interpreter cannot run a kernel loop with NumPy {np.__version__} "
                f"({str(e).strip() or type(e).__name__}); run a Triton whose interpreter does (3.8 does) or "
                f"NumPy < 2.4")
    if result != 3:
        return f"Triton {triton.__version__}'s interpreter ran a 3-step kernel loop {result} times"
    return None


def check_device(t: torch.Tensor) -> None:
    """CPU tensors run only under an interpreter that can run our kernels; otherwise say what to change."""
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and interpreting():  # looked up at call time: tests patch it
        defect = interpreter_defect()
        if defect is not None:
            raise RuntimeError(defect)
        return
    raise RuntimeError(
        f"ditq's Triton kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter; got "
        f"{t.device} tensors with the interpreter off: set TRITON_INTERPRET=1 before importing triton or "
        f"diffusers, or move the tensors to a GPU")


def on_input_device(launcher):
    """Run ``launcher`` with its first argument's GPU as the current device.

    Triton launches a kernel on the *current* CUDA device and its current stream, whatever device the tensors
    live on; torch's own ops (and ditq's C++ ops, through a device guard) follow the tensors. Without this, a
    model on ``cuda:1`` while ``cuda:0`` is current (diffusers' ``device_map`` places pipelines so) would launch
    on the wrong GPU with pointers it cannot read. The check costs one ``current_device`` call when the devices
    already agree, the common case."""

    @functools.wraps(launcher)
    def launch(first, *args, **kwargs):
        if getattr(first, "is_cuda", False) and first.device.index not in (None, torch.cuda.current_device()):
            with torch.cuda.device(first.device.index):
                return launcher(first, *args, **kwargs)
        return launcher(first, *args, **kwargs)

    return launch


@triton.jit
def cast_rn(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 ``x`` cast to ``dtype`` rounding to nearest even, in both execution modes."""
    if INTERPRET and dtype == tl.bfloat16:
        # Round the fp32 bit pattern to its top 16 bits, ties to even: add 0x7FFF plus the lowest kept bit.
        # A NaN is first made the canonical quiet NaN: the addition would carry another payload into the
        # exponent or past the sign (0x7F800001 would become inf, 0x7FFFFFFF -0); the GPU's cvt gives NaN.
        bits = tl.where(x == x, x.to(tl.uint32, bitcast=True), 0x7FC00000)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)

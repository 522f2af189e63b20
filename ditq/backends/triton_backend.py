"""The ``triton`` backend: the Triton kernels of ``ditq.kernels`` on a CUDA GPU, or on CPU tensors under
Triton's interpreter (``TRITON_INTERPRET=1`` set before triton -- or diffusers, which imports it -- is
first imported: Triton reads the variable when it decorates a kernel).

Weights: 8-bit weights are used in the canonical layout as they are. 4-bit weights are repacked into the
W4A8 kernel's nibble order (``ditq.kernels.w4a8.pack_weight``) by :meth:`prepare_weight`, and back, exactly,
by :meth:`canonical_weight`. Integer group scales (``ditq.format``) go to the kernel as integers
(``ditq.format.int_scales_to_kernel``) where its description lists the GPU's architecture and the group size
(``int_scale_groups``) and under the interpreter; elsewhere the layer keeps the float scales q * c. The W4A8
kernel is imported lazily, so W8A8 keeps working if it is missing.

The kernels describe themselves (``ditq.kernels.describe()``: group sizes, K limits, layouts, architectures with a
tile table) and their launchers validate every input they are given: they are the one validation layer of this
backend, on a quantized layer's hot path and through the generic ``torch.ops.ditq.*`` ops alike.
"""
from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Optional

import torch

from ..format import int_scales_to_canonical, int_scales_to_kernel
from . import Backend, BackendUnavailableError, KernelFamily, register

_INTERPRETER_HINT = "set TRITON_INTERPRET=1 before importing triton or diffusers"


def _kernels(name: str):
    """``ditq.kernels.<name>``, imported on first use."""
    return importlib.import_module(f"ditq.kernels.{name}")


def _w4a8():
    try:
        return _kernels("w4a8")
    except ImportError as e:
        raise BackendUnavailableError(f"the triton backend's W4A8 kernel is not available here: {e}") from e


@lru_cache(maxsize=None)
def _kernel_ops():
    from ..ops import define_kernel_ops

    return define_kernel_ops("triton", {"quantize_act": _kernels("quantize_act").quantize_act,
                                        "gemm_w8a8": _kernels("w8a8").gemm_w8a8,
                                        "gemm_w4a8": _w4a8().gemm_w4a8,
                                        "norm_modulate_quantize": _kernels("norm_quantize").norm_modulate_quantize,
                                        "gemm_w8a8_fused": _kernels("w8a8").gemm_w8a8_fused,
                                        "gemm_w4a8_fused": _w4a8().gemm_w4a8_fused,
                                        "attention_inputs": _kernels("attention_inputs").attention_inputs}
                             )._replace(fused_gemm_float_a=True)  # the fused kernels' A_FLOAT: quantize on load


def _int_scale_kernels(device: torch.device, group_size: int) -> bool:
    """Whether integer group scales go to the W4A8 kernel as integers on ``device`` (the kernel then applies q while
    unpacking and keeps one int32 sum over K): where its description lists the GPU's architecture with this group
    size (``int_scale_groups``, from the SASS), and under the interpreter, which runs every path."""
    if device.type != "cuda":
        return True
    with torch.cuda.device(device):
        major, minor = torch.cuda.get_device_capability()
    return group_size in _w4a8().describe()["int_scale_groups"].get(10 * major + minor, ())


class TritonBackend(Backend):
    name = "triton"
    devices = ("cpu", "cuda")

    def unavailable_reason(self) -> Optional[str]:
        try:
            import triton  # noqa: F401

            interpret = _kernels("interpret")
        except ImportError as e:
            return f"triton is not installed or does not import ({type(e).__name__}: {e}); pip install triton"
        if not torch.cuda.is_available() and not interpret.interpreting():
            return f"there is no CUDA GPU and Triton's interpreter is off ({_INTERPRETER_HINT})"
        if not torch.cuda.is_available():
            return interpret.interpreter_defect()
        return None

    def unavailable_on(self, device: torch.device) -> Optional[str]:
        if device.type == "cpu":
            interpret = _kernels("interpret")
            if not interpret.interpreting():
                return f"CPU tensors run only under Triton's interpreter: {_INTERPRETER_HINT}"
            if interpret.interpreter_defect() is not None:
                return interpret.interpreter_defect()
        if device.type == "cuda" and not torch.cuda.is_available():
            return "no CUDA GPU is visible"
        return super().unavailable_on(device)

    def families(self):
        table = importlib.import_module("ditq.kernels").describe()
        return {name: KernelFamily.from_description(name, d) for name, d in table.items()}

    def kernel_ops(self):
        return _kernel_ops()

    # ---- weights ----------------------------------------------------------------------------------

    def prepare_weight(self, fmt, qweight: torch.Tensor, scales: torch.Tensor):
        if fmt.bits == 4:
            if fmt.group_scales == "int" and _int_scale_kernels(qweight.device, fmt.group_size):
                scales = int_scales_to_kernel(*fmt.int_group_scales(scales))
            return _w4a8().pack_weight(qweight, fmt.group_size), scales
        return qweight, scales

    def canonical_weight(self, fmt, qweight: torch.Tensor, scales: torch.Tensor):
        if fmt.bits == 4:
            if scales.dtype == torch.int32:  # integer group scales in the kernel's form
                scales = int_scales_to_canonical(scales)
            return _w4a8().unpack_weight(qweight, fmt.group_size), scales
        return qweight, scales

    # ---- ops --------------------------------------------------------------------------------------

    def quantize_act(self, x, scale):
        return _kernels("quantize_act").quantize_act(x, scale)

    def gemm_w8a8(self, a, a_scale, w, w_scale, bias, out_dtype):
        return _kernels("w8a8").gemm_w8a8(a, a_scale, w, w_scale, bias, out_dtype)

    def norm_modulate_quantize(self, x, shift, scale, eps, act_scale):
        return _kernels("norm_quantize").norm_modulate_quantize(x, shift, scale, eps, act_scale)

    def gemm_w4a8(self, a, a_scale, w, w_scale, bias, group_size, out_dtype):
        return _w4a8().gemm_w4a8(a, a_scale, w, w_scale, bias, group_size, out_dtype)

    def gemm_w8a8_fused(self, a, a_scale, w, w_scale, bias, gelu, gate, residual, rows_per_gate, out_scale,
                        out_dtype):
        return _kernels("w8a8").gemm_w8a8_fused(a, a_scale, w, w_scale, bias, gelu, gate, residual, rows_per_gate,
                                                out_scale, out_dtype)

    def gemm_w4a8_fused(self, a, a_scale, w, w_scale, bias, group_size, gelu, gate, residual, rows_per_gate,
                        out_scale, out_dtype):
        return _w4a8().gemm_w4a8_fused(a, a_scale, w, w_scale, bias, group_size, gelu, gate, residual,
                                       rows_per_gate, out_scale, out_dtype)


register(TritonBackend())

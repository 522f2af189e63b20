"""The ``torch`` backend: the reference maths of :mod:`ditq.quant`, on any device. It reads the canonical
weight layout as it is, so it is also what every other backend is checked against."""
from __future__ import annotations

from ..quant import reference as ref
from . import Backend, register


class TorchBackend(Backend):
    name = "torch"
    devices = ("cpu", "cuda")

    def quantize_act(self, x, scale):
        if scale is None:
            return ref.quantize_per_token(x)
        return ref.quantize_with_scale(x, scale, ref.INT8_QMAX), scale.clone()

    def gemm_w8a8(self, a, a_scale, w, w_scale, bias, out_dtype):
        return ref.gemm_w8a8(a, a_scale, w, w_scale, bias, out_dtype)

    def gemm_w4a8(self, a, a_scale, w, w_scale, bias, group_size, out_dtype):
        return ref.gemm_w4a8(a, a_scale, ref.unpack_int4(w), w_scale, group_size, bias, out_dtype)


register(TorchBackend())

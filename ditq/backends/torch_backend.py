"""The ``torch`` backend: the reference maths of :mod:`ditq.quant`, on any device. It reads the canonical
weight layout as it is, so it is also what every other backend is checked against. It runs any group size the
canonical format allows and any K up to the int32 bound."""
from __future__ import annotations

from functools import lru_cache

from ..ops import (check_attention_inputs, check_gemm_w4a8, check_gemm_w4a8_fused, check_gemm_w8a8,
                   check_gemm_w8a8_fused, check_norm_modulate_quantize, check_quantize_act, define_kernel_ops)
from ..quant import reference as ref
from . import Backend, KernelFamily, register


def _quantize_act(x, scale):
    check_quantize_act(x, scale)
    if scale is None:
        return ref.quantize_per_token(x)
    return ref.quantize_with_scale(x, scale, ref.INT8_QMAX), scale.clone()


def _gemm_w8a8(a, a_scale, w, w_scale, bias, out_dtype):
    check_gemm_w8a8(a, a_scale, w, w_scale, bias, out_dtype)
    return ref.gemm_w8a8(a, a_scale, w, w_scale, bias, out_dtype)


def _gemm_w4a8(a, a_scale, w, w_scale, bias, group_size, out_dtype):
    check_gemm_w4a8(a, a_scale, w, w_scale, bias, group_size, out_dtype)
    return ref.gemm_w4a8(a, a_scale, ref.unpack_int4(w), w_scale, group_size, bias, out_dtype)


def _norm_modulate_quantize(x, shift, scale, eps, act_scale):
    check_norm_modulate_quantize(x, shift, scale, eps, act_scale)
    return ref.norm_modulate_quantize(x, shift, scale, eps, act_scale)


def _gemm_w8a8_fused(a, a_scale, w, w_scale, bias, gelu, gate, residual, rows_per_gate, out_scale, out_dtype):
    check_gemm_w8a8_fused(a, a_scale, w, w_scale, bias, gelu, gate, residual, rows_per_gate, out_scale, out_dtype)
    return ref.gemm_w8a8_fused(a, a_scale, w, w_scale, bias, gelu, gate, residual, rows_per_gate, out_scale,
                               out_dtype)


def _gemm_w4a8_fused(a, a_scale, w, w_scale, bias, group_size, gelu, gate, residual, rows_per_gate, out_scale,
                     out_dtype):
    check_gemm_w4a8_fused(a, a_scale, w, w_scale, bias, group_size, gelu, gate, residual, rows_per_gate,
                          out_scale, out_dtype)
    return ref.gemm_w4a8_fused(a, a_scale, ref.unpack_int4(w), w_scale, group_size, bias, gelu, gate, residual,
                               rows_per_gate, out_scale, out_dtype)


def attention_inputs(first, second, batch, heads, first_q_norm, first_k_norm, second_q_norm, second_k_norm, eps,
                     rope_cos, rope_sin):
    """The reference, validated (also what cuda-emulated binds: there is no C++ kernel for this float op)."""
    check_attention_inputs(first, second, batch, heads, first_q_norm, first_k_norm, second_q_norm, second_k_norm,
                           eps, rope_cos, rope_sin)
    return ref.attention_inputs(first, second, batch, heads, first_q_norm, first_k_norm, second_q_norm,
                                second_k_norm, eps, rope_cos, rope_sin)


@lru_cache(maxsize=None)
def _kernel_ops():
    # the reference fused GEMMs quantize a float ``a`` with the reference quantize_act (ditq.ops's contract)
    return define_kernel_ops("torch", {"quantize_act": _quantize_act, "gemm_w8a8": _gemm_w8a8,
                                       "gemm_w4a8": _gemm_w4a8, "norm_modulate_quantize": _norm_modulate_quantize,
                                       "gemm_w8a8_fused": _gemm_w8a8_fused, "gemm_w4a8_fused": _gemm_w4a8_fused,
                                       "attention_inputs": attention_inputs}
                             )._replace(fused_gemm_float_a=True)


class TorchBackend(Backend):
    name = "torch"
    devices = ("cpu", "cuda")

    def families(self):
        from ..format import LAYOUT, LAYOUT_VERSION
        common = dict(k_multiple=1, max_k=ref.MAX_K, layout=LAYOUT, layout_version=LAYOUT_VERSION)
        return {"quantize_act": KernelFamily("quantize_act", k_multiple=1),
                "norm_quantize": KernelFamily("norm_quantize", k_multiple=1),
                "gemm_w8a8": KernelFamily("gemm_w8a8", weight_bits=8, **common),
                "gemm_w4a8": KernelFamily("gemm_w4a8", weight_bits=4, group_sizes=None, **common)}

    def kernel_ops(self):
        return _kernel_ops()

    def quantize_act(self, x, scale):
        return _quantize_act(x, scale)

    def gemm_w8a8(self, a, a_scale, w, w_scale, bias, out_dtype):
        return _gemm_w8a8(a, a_scale, w, w_scale, bias, out_dtype)

    def gemm_w4a8(self, a, a_scale, w, w_scale, bias, group_size, out_dtype):
        return _gemm_w4a8(a, a_scale, w, w_scale, bias, group_size, out_dtype)

    def norm_modulate_quantize(self, x, shift, scale, eps, act_scale):
        return _norm_modulate_quantize(x, shift, scale, eps, act_scale)

    def gemm_w8a8_fused(self, a, a_scale, w, w_scale, bias, gelu, gate, residual, rows_per_gate, out_scale,
                        out_dtype):
        return _gemm_w8a8_fused(a, a_scale, w, w_scale, bias, gelu, gate, residual, rows_per_gate, out_scale,
                                out_dtype)

    def gemm_w4a8_fused(self, a, a_scale, w, w_scale, bias, group_size, gelu, gate, residual, rows_per_gate,
                        out_scale, out_dtype):
        return _gemm_w4a8_fused(a, a_scale, w, w_scale, bias, group_size, gelu, gate, residual, rows_per_gate,
                                out_scale, out_dtype)


register(TorchBackend())

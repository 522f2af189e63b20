"""Reference quantization maths (plain torch). See :mod:`ditq.quant.reference`."""
from .reference import (  # noqa: F401
    INT4_QMAX, INT8_QMAX, MAX_K, dequantize_groupwise, dequantize_per_channel, gemm_w4a8, gemm_w4a8_exact,
    gemm_w8a8, gemm_w8a8_exact, group_partials, int_matmul, pack_int4, quantize_groupwise,
    quantize_per_channel, quantize_per_tensor, quantize_per_token, quantize_with_scale, sqnr,
    symmetric_scale, unpack_int4)

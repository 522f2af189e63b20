"""The fused GEMM ops given a float ``a`` with a static scale (the contract in ditq.ops): the torch backend
equals quantize_act followed by the int8 fused op bit for bit; a per-token scale is refused with the same words
on torch and triton; cuda-emulated's kernels quantize a float ``a`` on load as well; torch.compile traces the op
with a float ``a`` in one graph."""
import pytest
import torch

import ditq  # noqa: F401  (registers torch.ops.ditq)
from ditq import ops as ops_module
from ditq import backends, testing
from ditq.quant import reference as ref

SCALE = 0.0625  # a power of two: (j + 0.5) * SCALE is an exact tie of x / s in every float dtype
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EMULATED = backends.unavailable_reason("cuda-emulated", "cpu") is None


def _float_a(m, k, dtype, gen):
    """Random values, exact ties of x / s, values past +-127 s, NaN and +-inf."""
    x = torch.randn(m, k, generator=gen) * 30 * SCALE
    ties = (torch.randint(-90, 90, (m, k), generator=gen).float() + 0.5) * SCALE
    x = torch.where(torch.rand(m, k, generator=gen) < 0.4, ties, x)
    x = torch.where(torch.rand(m, k, generator=gen) < 0.05, x * 50, x)
    x.view(-1)[torch.randperm(m * k, generator=gen)[:4]] = torch.tensor([float("nan"), float("inf"),
                                                                         float("-inf"), float("nan")])
    return x.to(dtype)


def _weights(bits, group, n, k, gen):
    if bits == 8:
        return testing.random_int8(n, k, generator=gen), torch.rand(n, generator=gen) / 100 + 1e-3
    return (ref.pack_int4(testing.random_int4(n, k, generator=gen)),
            torch.rand(k // group, n, generator=gen) / 20 + 1e-3)


def _fused(bits, group, a, a_s, w, w_s, b, pieces, backend):
    if bits == 8:
        return torch.ops.ditq.gemm_w8a8_fused(a, a_s, w, w_s, b, *pieces, backend)
    return torch.ops.ditq.gemm_w4a8_fused(a, a_s, w, w_s, b, group, *pieces, backend)


# (name, gelu, gate, residual, int8 out)
COMBOS = [("plain", False, False, False, False), ("gate-residual", False, True, True, False),
          ("gelu-quant", True, False, False, True)]


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("combo", COMBOS, ids=[c[0] for c in COMBOS])
@pytest.mark.parametrize("bits, group", [(8, None), (4, 32), (4, 128)], ids=("w8a8", "w4a8-g32", "w4a8-g128"))
def test_torch_backend_float_a_is_quantize_act_then_the_int8_op(bits, group, combo, dtype):
    name, gelu, gated, with_residual, quant = combo
    k = 384 if group == 128 else 96
    for m, n in ((1, 17), (3, 19)):
        gen = torch.Generator().manual_seed(1000 * bits + 10 * m + len(name) + len(dtype))
        x, a_s = _float_a(m, k, DTYPES[dtype], gen), torch.tensor([SCALE])
        w, w_s = _weights(bits, group, n, k, gen)
        b = torch.randn(n, generator=gen)
        out_dtype = torch.float32 if quant else DTYPES[dtype]
        pieces = (gelu, torch.randn(1, n, generator=gen) if gated else None,
                  torch.randn(m, n, generator=gen).to(out_dtype) if with_residual else None, m if gated else 1,
                  torch.tensor([0.05]) if quant else None, out_dtype)
        q, s = torch.ops.ditq.quantize_act(x, a_s, "torch")
        assert q.abs().max() == 127 and q[x.isnan()].eq(0).all()
        y = _fused(bits, group, x, a_s, w, w_s, b, pieces, "torch")
        y_int8 = _fused(bits, group, q, s, w, w_s, b, pieces, "torch")
        assert y.dtype == y_int8.dtype and torch.equal(y, y_int8), f"{name} M={m}"
        assert y.ne(0).sum() > m * n // 2  # not a test on zeros
        # the kernel op the layers call, too
        ops = backends.get_backend("torch").kernel_ops()
        assert ops.fused_gemm_float_a
        fn = ops.gemm_w8a8_fused if bits == 8 else ops.gemm_w4a8_fused
        got = fn(x, a_s, w, w_s, b, *pieces) if bits == 8 else fn(x, a_s, w, w_s, b, group, *pieces)
        assert torch.equal(got, y)


@pytest.mark.parametrize("bits", (8, 4), ids=("w8a8", "w4a8"))
def test_float_a_with_per_token_scales_is_refused_alike_on_torch_and_triton(bits):
    m, n, k = 3, 17, 64
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(m, k, generator=gen)
    w, w_s = _weights(bits, 32, n, k, gen)
    errors = []
    for backend in ("torch", "triton"):
        wb = w
        if bits == 4:  # the backend's own weight layout
            wb, _ = backends.get_backend(backend).prepare_weight(_Fmt(bits), w, w_s)
        with pytest.raises(ValueError) as info:
            _fused(bits, 32, x, torch.rand(m, generator=gen), wb, w_s, None,
                   (False, None, None, 1, None, torch.float32), backend)
        errors.append(str(info.value))
        with pytest.raises(TypeError, match="a must be int8, float16, bfloat16, float32"):
            _fused(bits, 32, x.double(), torch.ones(1), wb, w_s, None, (False, None, None, 1, None, torch.float32),
                   backend)
    assert errors[0] == errors[1], errors
    assert "a float activation needs a static a_scale" in errors[0] and "quantize_act" in errors[0]


@pytest.mark.skipif(not EMULATED, reason="ditq._C is not built here")
@pytest.mark.parametrize("bits", (8, 4), ids=("w8a8", "w4a8"))
def test_cuda_emulated_computes_float_a_as_quantize_act_then_the_int8_op(bits):
    """The cuda backends' fused GEMMs quantize a float ``a`` on load too (tests/csrc/test_gemm_float_a_emulated.py
    covers the kernel): the generic op on cuda-emulated equals its quantize_act + int8 fused op bit for bit, and a
    per-token scale is refused in the words of ditq.ops."""
    be = backends.get_backend("cuda-emulated")
    ops = be.kernel_ops()
    assert ops.fused_gemm_float_a is True and ops.gemm_w8a8_fused is not None
    m, n, k = 2, 17, 64
    gen = torch.Generator().manual_seed(7)
    w, w_s = _weights(bits, 32, n, k, gen)
    w, w_s = be.prepare_weight(_Fmt(bits), w, w_s)
    x, a_s = _float_a(m, k, torch.bfloat16, gen), torch.tensor([SCALE])
    pieces = (True, None, None, 1, torch.tensor([0.05]), torch.float32)
    q, s = torch.ops.ditq.quantize_act(x, a_s, "cuda-emulated")
    got = _fused(bits, 32, x, a_s, w, w_s, None, pieces, "cuda-emulated")
    want = _fused(bits, 32, q, s, w, w_s, None, pieces, "cuda-emulated")
    assert got.dtype == torch.int8 and torch.equal(got, want) and got.ne(0).sum() > m * n // 2
    with pytest.raises(ValueError) as info:
        _fused(bits, 32, x, torch.full((m,), SCALE), w, w_s, None, pieces, "cuda-emulated")
    assert str(ops_module.float_a_needs_static_scale(torch.full((m,), SCALE))) in str(info.value)


def test_compiled_call_with_float_a_has_no_graph_break():
    gen = torch.Generator().manual_seed(3)
    m, n, k = 2, 17, 64
    x, a_s = _float_a(m, k, torch.bfloat16, gen), torch.tensor([SCALE])
    w, w_s = _weights(8, None, n, k, gen)
    w4, w4_s = _weights(4, 32, n, k, gen)
    gate = torch.randn(1, n, generator=gen)

    def block(x):
        h = torch.nn.functional.silu(x)  # adaLN's conditioning: silu(emb), then its linear on the float input
        y = torch.ops.ditq.gemm_w8a8_fused(h, a_s, w, w_s, None, False, gate, None, m, None, torch.bfloat16, "torch")
        z = torch.ops.ditq.gemm_w4a8_fused(h, a_s, w4, w4_s, None, 32, True, None, None, 1, None, torch.float32,
                                           "torch")
        return y, z

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")  # fullgraph: a break is an error
    for got, want in zip(compiled(x), block(x)):
        assert torch.equal(got, want)


class _Fmt:
    """The fields of a weight format that ``prepare_weight`` reads."""

    def __init__(self, bits):
        self.bits, self.group_size, self.group_scales = bits, 32, "float"

"""The ``triton`` backend through ``torch.ops.ditq.*``: availability, errors, agreement with ``torch``."""
import pytest
import torch

import ditq.ops  # noqa: F401  (registers torch.ops.ditq.*)
from ditq import backends
from ditq.backends import BackendUnavailableError
from ditq.format import WeightFormat
from ditq.kernels import interpret
from ditq.quant import reference as ref
from ditq.testing import assert_gemm_w4a8, assert_gemm_w8a8, random_int4, random_int8

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter (tests/conftest.py)
ops = torch.ops.ditq


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def interpreter_off(monkeypatch):
    monkeypatch.setattr(interpret, "interpreting", lambda: False)  # as if triton was imported without it


def test_available_here():
    assert backends.unavailable_reason("triton", DEVICE) is None
    assert "triton" in backends.available_backends(DEVICE)
    assert backends.get_backend("triton", DEVICE).name == "triton"


def test_cpu_tensors_with_the_interpreter_off_say_how_to_fix_it(interpreter_off):
    reason = backends.unavailable_reason("triton", "cpu")
    assert "set TRITON_INTERPRET=1 before importing triton or diffusers" in reason
    a = random_int8(2, 32)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1 before importing triton"):
        ops.gemm_w8a8(a, torch.ones(1), random_int8(3, 32), torch.ones(3), None, torch.float32, "triton")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        ops.quantize_act(torch.randn(2, 32), None, "triton")


@pytest.mark.parametrize("static", (False, True), ids=("per-token", "static"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
def test_quantize_act_equals_torch_backend(dtype, static):
    x = (torch.randn(7, 96, generator=_gen(1)) * 4).to(dtype).to(DEVICE)
    scale = torch.tensor([0.02], device=DEVICE) if static else None
    q, s = ops.quantize_act(x, scale, "triton")
    rq, rs = ops.quantize_act(x, scale, "torch")
    assert torch.equal(q, rq) and torch.equal(s, rs)


@pytest.mark.parametrize("per_token", (True, False), ids=("per-token", "static"))
@pytest.mark.parametrize("out_dtype", (torch.float32, torch.bfloat16))
def test_gemm_w8a8_agrees_with_torch_backend(out_dtype, per_token):
    g = _gen(2)
    m, n, k = 19, 23, 80
    a, w = random_int8(m, k, generator=g), random_int8(n, k, generator=g)
    a_scale = torch.rand(m if per_token else 1, generator=g) / 127 + 1e-3
    w_scale, bias = torch.rand(n, generator=g) / 127 + 1e-3, torch.randn(n, generator=g)
    args = [t.to(DEVICE) for t in (a, a_scale, w, w_scale, bias)]
    y = ops.gemm_w8a8(*args, out_dtype, "triton")
    y_ref = ops.gemm_w8a8(*args, out_dtype, "torch")
    assert y.dtype == out_dtype and y.shape == (m, n)
    assert_gemm_w8a8(y, a, a_scale, w, w_scale, bias)
    assert_gemm_w8a8(y_ref, a, a_scale, w, w_scale, bias, what="torch backend")


def test_gemm_w4a8_agrees_with_torch_backend():
    pytest.importorskip("ditq.kernels.w4a8")
    g, gs = _gen(3), 32
    m, n, k = 5, 21, 96
    fmt = WeightFormat(bits=4, group_size=gs)
    a, w_q = random_int8(m, k, generator=g), random_int4(n, k, generator=g)
    canonical = ref.pack_int4(w_q)
    a_scale, w_scale = torch.rand(m, generator=g) / 127 + 1e-3, torch.rand(k // gs, n, generator=g) / 7 + 1e-3
    bias = torch.randn(n, generator=g)
    tb = backends.get_backend("triton", DEVICE)
    w, s = tb.prepare_weight(fmt, canonical, w_scale)
    back, s_back = tb.canonical_weight(fmt, w, s)
    assert torch.equal(back, canonical) and torch.equal(s_back, w_scale)
    dev = [t.to(DEVICE) for t in (a, a_scale, w, s, bias)]
    y = ops.gemm_w4a8(*dev, gs, torch.bfloat16, "triton")
    assert_gemm_w4a8(y, a, a_scale, w_q, w_scale, gs, bias)
    y_ref = ops.gemm_w4a8(a, a_scale, canonical, w_scale, bias, gs, torch.bfloat16, "torch")
    assert_gemm_w4a8(y_ref, a, a_scale, w_q, w_scale, gs, bias, what="torch backend")


def test_w8_weights_keep_the_canonical_layout():
    fmt = WeightFormat(bits=8)
    q, s = random_int8(4, 32), torch.rand(4)
    tb = backends.get_backend("triton", DEVICE)
    assert tb.prepare_weight(fmt, q, s)[0] is q and tb.canonical_weight(fmt, q, s)[0] is q


def test_errors_through_the_op():
    g = _gen(4)
    a, w = random_int8(4, 32, generator=g).to(DEVICE), random_int8(6, 32, generator=g).to(DEVICE)
    sa, sw = torch.ones(4, device=DEVICE), torch.ones(6, device=DEVICE)
    f32 = torch.float32
    with pytest.raises(TypeError, match="a must be int8"):
        ops.gemm_w8a8(a.float(), sa, w, sw, None, f32, "triton")
    with pytest.raises(ValueError, match="contiguous"):
        ops.gemm_w8a8(a, sa, random_int8(32, 6).to(DEVICE).t(), sw, None, f32, "triton")
    with pytest.raises(ValueError, match=r"a_scale must be float32 \[1\]"):
        ops.gemm_w8a8(a, torch.ones(3, device=DEVICE), w, sw, None, f32, "triton")
    with pytest.raises(ValueError, match="w_scale must be float32 \\[N\\]"):
        ops.gemm_w8a8(a, sa, w, torch.ones(5, device=DEVICE), None, f32, "triton")
    with pytest.raises(ValueError, match="multiple of 16"):  # the kernel's own rule, past the op's checks
        ops.gemm_w8a8(a[:, :24].contiguous(), sa, w[:, :24].contiguous(), sw, None, f32, "triton")
    with pytest.raises(TypeError, match="x must be float16, bfloat16, float32"):
        ops.quantize_act(a, None, "triton")
    with pytest.raises(ValueError, match="x must be contiguous"):
        ops.quantize_act(torch.randn(32, 4, device=DEVICE).t(), None, "triton")
    with pytest.raises(ValueError, match="static scale must be float32 \\[1\\]"):
        ops.quantize_act(torch.randn(4, 32, device=DEVICE), torch.ones(2, device=DEVICE), "triton")
    w4 = torch.zeros(6, 16, dtype=torch.uint8, device=DEVICE)
    with pytest.raises(ValueError, match="group_size 64 does not divide K = 32"):
        ops.gemm_w4a8(a, sa, w4, torch.ones(1, 6, device=DEVICE), None, 64, f32, "triton")
    with pytest.raises(ValueError, match="w_scale must be \\[K // group_size, N\\]"):
        ops.gemm_w4a8(a, sa, w4, torch.ones(2, 6, device=DEVICE), None, 32, f32, "triton")

"""QuantLinear.forward_fused given the float input and the layer's static scale: on every backend it equals
quantize_act followed by forward_fused on int8, bit for bit (every backend hands the float input to the fused GEMM,
which quantizes it on load)."""
import pytest
import torch
from torch import nn

from ditq import QuantConfig, backends
from ditq.nn import QuantLinear

BACKENDS = [b for b in ("torch", "triton", "cuda-emulated") if backends.unavailable_reason(b, "cpu") is None]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("preset, group", [("w8a8", None), ("w4a8", 32)], ids=("w8a8", "w4a8-g32"))
def test_forward_fused_float_input_is_quantize_act_then_forward_fused(preset, group, backend):
    torch.manual_seed(11)
    k, n, m = 96, 19, 3
    lin = nn.Linear(k, n)
    cfg = QuantConfig.preset(preset, **({"group_size": group} if group else {}))
    layer = QuantLinear.from_linear(lin, cfg, act_scale=torch.tensor([0.03125]), backend=backend)
    kernels = layer._kernels
    assert kernels.fused_gemm_float_a  # every backend's fused GEMMs quantize a float input on load
    s = layer._buffers["act_scale"]
    x = torch.randn(m, k, dtype=torch.bfloat16) * 2
    x[0, :8] = (torch.arange(8) - 3.5) * 0.03125  # exact .5 ties of x / s
    x[1, 3], x[2, 5], x[2, 6] = float("nan"), float("inf"), float("-inf")
    gate, res = torch.randn(1, n), torch.randn(m, n, dtype=torch.bfloat16)
    for kw in (dict(), dict(gate=gate, residual=res, rows_per_gate=m), dict(gelu=True, out_scale=torch.tensor([0.05]))):
        q, qs = kernels.quantize_act(x, s)
        want = layer.forward_fused(q, qs, torch.bfloat16, **kw)
        got = layer.forward_fused(x, s, torch.bfloat16, **kw)
        assert got.dtype == want.dtype and torch.equal(got, want), kw
        assert got.ne(0).sum() > m * n // 2
    with pytest.raises(ValueError, match="a float activation needs a static a_scale"):
        layer.forward_fused(x, torch.full((m,), 0.03), torch.bfloat16)

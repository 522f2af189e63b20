"""QuantLinear: exact against the reference maths, shapes, dtypes, state dict, errors."""
import pytest
import torch
from torch import nn

import ditq
from ditq import QuantConfig
from ditq.nn import QuantLinear, dequantize_weight
from ditq.quant import reference as ref

CFGS = [QuantConfig.preset("w8a8"), QuantConfig.preset("w4a8", group_size=32),
        QuantConfig.preset("w8a8", act_scheme="dynamic"), QuantConfig.preset("w4a8", group_size=64,
                                                                              act_scheme="dynamic")]


def _linear(k=128, n=48, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias)


@pytest.mark.parametrize("cfg", CFGS, ids=lambda c: c.name)
def test_forward_is_the_integer_reference(cfg):
    lin = _linear()
    x = torch.randn(2, 5, 128)
    scale = ref.symmetric_scale(x.abs().amax().reshape(1), 127)
    q = QuantLinear.from_linear(lin, cfg, act_scale=scale, backend="torch")
    y = q(x)
    assert y.shape == (2, 5, 48) and y.dtype == x.dtype
    # Rebuild the expected output from the reference functions, independently of the op plumbing.
    x2 = x.reshape(-1, 128)
    if cfg.act_scheme == "static":
        a, sa = ref.quantize_with_scale(x2, scale, 127), scale
    else:
        a, sa = ref.quantize_per_token(x2)
    if cfg.weight_bits == 8:
        w, sw = ref.quantize_per_channel(lin.weight.detach())
        expect = ref.gemm_w8a8(a, sa, w, sw, lin.bias.detach())
    else:
        w, sw = ref.quantize_groupwise(lin.weight.detach(), cfg.group_size)
        expect = ref.gemm_w4a8(a, sa, w, sw, cfg.group_size, lin.bias.detach())
    assert torch.equal(y.reshape(-1, 48), expect)
    # and it is close to the float layer: 8-bit activations and weights give > 30 dB on Gaussian data.
    floor = 30 if cfg.weight_bits == 8 else 18
    assert ditq.sqnr(lin(x).detach(), y) > floor


def test_holds_no_float_weight_and_repr_shows_format():
    q = QuantLinear.from_linear(_linear(), CFGS[1], act_scale=torch.tensor([0.05]))
    assert not list(q.parameters())
    assert q.qweight.dtype == torch.uint8 and q.qweight.shape == (48, 64)
    r = repr(q)
    assert "w4" in r and "group_size=32" in r and "backend=torch" in r and "ditq-canonical" in r


def test_output_dtype_follows_input_and_scales_stay_fp32():
    q = QuantLinear.from_linear(_linear(), CFGS[0], act_scale=torch.tensor([0.05]))
    q = q.to(torch.bfloat16)
    assert q.scales.dtype == torch.float32 and q.act_scale.dtype == torch.float32
    assert q.bias.dtype == torch.bfloat16
    y = q(torch.randn(3, 128, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == (3, 48)


def test_state_dict_is_canonical_and_round_trips():
    cfg = CFGS[1]
    lin = _linear(bias=False)
    q = QuantLinear.from_linear(lin, cfg, act_scale=torch.tensor([0.03]))
    sd = q.state_dict()
    assert set(sd) == {"qweight", "scales", "act_scale"}
    w = dequantize_weight(sd["qweight"], sd["scales"], cfg.weight_format)
    assert ditq.sqnr(lin.weight.detach(), w) > 18
    empty = QuantLinear(128, 48, cfg.weight_format, bias=False, device="meta")
    empty.load_state_dict(sd, assign=True)
    x = torch.randn(4, 128)
    assert torch.equal(empty(x), q(x))


def test_errors():
    cfg = CFGS[0]
    with pytest.raises(TypeError, match="nn.Linear"):
        QuantLinear.from_linear(nn.Conv2d(3, 3, 1), cfg, act_scale=1.0)
    with pytest.raises(ValueError, match="needs a calibrated act_scale"):
        QuantLinear.from_linear(_linear(), cfg)
    with pytest.raises(ValueError, match="positive finite"):
        QuantLinear.from_linear(_linear(), cfg, act_scale=0.0)
    with pytest.raises(ValueError, match="does not divide"):
        QuantLinear.from_linear(nn.Linear(96, 8), QuantConfig(weight_bits=4, group_size=64), act_scale=1.0)
    bad = _linear()
    with torch.no_grad():
        bad.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        QuantLinear.from_linear(bad, cfg, act_scale=1.0)
    q = QuantLinear.from_linear(_linear(), cfg, act_scale=1.0)
    with pytest.raises(ValueError, match="features"):
        q(torch.randn(2, 64))
    with pytest.raises(TypeError, match="float16/bfloat16/float32"):
        q(torch.ones(2, 128, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="no weights yet"):
        QuantLinear(128, 48, cfg.weight_format, device="meta")(torch.randn(1, 128))
    with pytest.raises(ValueError, match="qweight must be"):
        q.load_canonical(torch.zeros(48, 64, dtype=torch.int8), torch.ones(48), torch.zeros(48), torch.ones(1))


@pytest.mark.parametrize("bits", [8, 4])
def test_from_linear_rounds_as_the_weight_method_says(bits):
    """"mse" and "gptq" round in from_linear itself (not only inside ditq.quantize): the canonical weights equal
    ditq.weight_rounding's for that method, and differ from round-to-nearest on Gaussian weights."""
    from ditq import weight_rounding

    lin = _linear(k=256, n=40, seed=3)
    x = torch.randn(300, 256) * torch.linspace(0.1, 3.0, 256)  # uneven channels: GPTQ has something to trade
    hessian = x.T @ x
    preset, group = ("w8a8", {}) if bits == 8 else ("w4a8", {"group_size": 64})
    fmt = QuantConfig.preset(preset, **group).weight_format
    rtn = QuantLinear.from_linear(lin, QuantConfig.preset(preset, **group), act_scale=0.05).canonical()
    for method, h in (("mse", None), ("gptq", hessian)):
        cfg = QuantConfig.preset(preset, weight_method=method, **group)
        got = QuantLinear.from_linear(lin, cfg, act_scale=0.05, hessian=h).canonical()
        want_q, want_s = weight_rounding.quantize_weight(lin.weight.detach(), fmt, method, h)
        assert torch.equal(got["qweight"], want_q) and torch.equal(got["scales"], want_s), method
        assert not torch.equal(got["qweight"], rtn["qweight"]), f"{method} gave round-to-nearest's integers"


def test_from_linear_gptq_without_hessian_is_a_clear_error():
    cfg = QuantConfig.preset("w4a8", group_size=32, weight_method="gptq")
    with pytest.raises(ValueError, match="hessian="):
        QuantLinear.from_linear(_linear(), cfg, act_scale=0.05)


def test_a_backend_that_cannot_run_here_leaves_the_layer_as_it_was():
    """set_backend refuses a backend this device cannot run before it changes anything: the layer keeps its
    backend, its request and its weights, and still computes the same output (it used to be left unusable)."""
    from ditq.backends import BackendUnavailableError

    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(64, 24)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(24, 64, generator=g) * 0.05)
    layer = QuantLinear.from_linear(lin, QuantConfig.preset("w8a8", backend="torch"), act_scale=torch.tensor([0.02]))
    x = torch.randn(5, 64, generator=g)
    y = layer(x)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    unavailable = [b for b in ("cuda", "triton") if ditq.backends.unavailable_reason(b, "cpu") is not None]
    assert unavailable, "every backend runs on this CPU: nothing to refuse"
    with pytest.raises(BackendUnavailableError):
        layer.set_backend(unavailable[0])
    assert (layer.backend, layer.backend_request) == ("torch", "torch")
    assert all(torch.equal(v, state[k]) for k, v in layer.state_dict().items())
    assert torch.equal(layer(x), y)

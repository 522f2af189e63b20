"""1x1 convolutions quantized as linears (ditq.pointwise): which convolutions qualify, the wrapper computing the
convolution on shared weights, quantize / save / load through it, and the model restored when quantization fails
or leaves a convolution in float."""
import copy
import json
import os

import pytest
import torch
from torch import nn

import ditq
from ditq import QuantConfig
from ditq.convert import QuantizeError, _output_tensor
from ditq.io import HEADER_NAME, CheckpointError
from ditq.nn import QuantLinear
from ditq.pointwise import PointwiseConv, is_pointwise, unwrap, wrap
from tiny_models import tiny_sana


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class GatedConvMLP(nn.Module):
    """Sana's MLP in miniature: 1x1 up, depthwise 3x3, gate, 1x1 down, all on [B, C, H, W]."""

    def __init__(self, c=64, hidden=128, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.up = nn.Conv2d(c, 2 * hidden, 1)
        self.depth = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.down = nn.Conv2d(hidden, c, 1, bias=False)

    def forward(self, x):
        h, g = self.depth(torch.nn.functional.silu(self.up(x))).chunk(2, dim=1)
        return self.down(h * torch.nn.functional.silu(g))


@pytest.mark.parametrize("conv, pointwise", [
    (nn.Conv2d(8, 16, 1), True),
    (nn.Conv2d(8, 16, (1, 1), bias=False), True),
    (nn.Conv2d(8, 16, 3, padding=1), False),
    (nn.Conv2d(8, 16, 1, stride=2), False),
    (nn.Conv2d(8, 16, 1, padding=1), False),
    (nn.Conv2d(8, 16, 1, groups=2), False),
    (nn.Conv2d(8, 16, 1, dilation=2), False),
    (nn.Conv1d(8, 16, 1), False),
    (nn.Linear(8, 16), False)])
def test_which_convolutions_are_linears(conv, pointwise):
    assert is_pointwise(conv) is pointwise


def test_the_wrapper_is_the_convolution_on_the_same_tensors():
    model = GatedConvMLP()
    up = model.up
    x = _randn(2, 64, 5, 7)
    expect = model(x)
    assert wrap(model) == ["up", "down"]  # the depthwise 3x3 is no linear
    assert isinstance(model.up, PointwiseConv) and isinstance(model.up.linear, nn.Linear)
    assert model.up.linear.weight.data_ptr() == up.weight.data_ptr()  # a view, nothing copied
    assert model.up.linear.bias is up.bias
    assert torch.allclose(model(x), expect, atol=1e-5, rtol=1e-5)
    assert torch.allclose(model(x.to(memory_format=torch.channels_last)), expect, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"takes \[B, C, H, W\] input"):
        model.up(x[0])
    unwrap(model, ["up", "down"])
    assert model.up is up and type(model.down) is nn.Conv2d


def test_quantized_convolutions():
    model = GatedConvMLP()
    ref = copy.deepcopy(model)
    x = _randn(2, 64, 6, 6, seed=1)
    report = ditq.quantize(model, QuantConfig.preset("w8a8", backend="torch", progress=False),
                           calib_fn=lambda m: m(x))
    assert [lr.name for lr in report.layers] == ["up.linear", "down.linear"]
    assert [(lr.in_features, lr.out_features) for lr in report.layers] == [(64, 256), (128, 64)]
    assert type(model.depth) is nn.Conv2d
    for wrapper in (model.up, model.down):
        assert isinstance(wrapper.linear, QuantLinear)
        assert "conv" not in wrapper.__dict__  # the float weight is not kept alive through the wrapper
    assert not any(p.numel() for p in model.up.parameters())  # only packed buffers left
    with torch.no_grad():
        assert ditq.sqnr(ref(x), model(x)) > 30
    fresh = _randn(2, 64, 6, 6, seed=2)
    with torch.no_grad():
        assert ditq.sqnr(ref(fresh), model(fresh)) > 25


def test_a_skipped_or_failed_convolution_is_put_back():
    model = GatedConvMLP()
    up, down = model.up, model.down
    x = _randn(2, 64, 4, 4)
    ditq.quantize(model, QuantConfig.preset("w8a8", backend="torch", progress=False, skip=["down*"]),
                  calib_fn=lambda m: m(x))
    assert model.down is down and isinstance(model.up.linear, QuantLinear)
    model = GatedConvMLP()
    up, down, state = model.up, model.down, copy.deepcopy(model.state_dict())

    def fails(m):
        raise RuntimeError("calibration data went missing")
    with pytest.raises(Exception, match="calibration data went missing"):
        ditq.quantize(model, QuantConfig.preset("w8a8", backend="torch", progress=False), calib_fn=fails)
    assert model.up is up and model.down is down
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(QuantizeError, match="no quantizable layer"):
        ditq.quantize(model, QuantConfig.preset("w8a8", backend="torch", progress=False, skip=["*"]),
                      calib_fn=lambda m: m(x))
    assert model.up is up and model.down is down


def test_sana_mlp_saved_and_loaded(tmp_path):
    model, inp = tiny_sana()
    ditq.quantize(model, QuantConfig.preset("w4a8", group_size=32, backend="torch", progress=False),
                  calib_fn=lambda m: m(**inp))
    convs = [f"transformer_blocks.{i}.ff.{c}" for i in range(2) for c in ("conv_inverted", "conv_point")]
    assert all(isinstance(model.get_submodule(c + ".linear"), QuantLinear) for c in convs)
    with torch.no_grad():
        expect = _output_tensor(model(**inp))
    ditq.save_quantized(model, str(tmp_path))
    header = json.loads((tmp_path / HEADER_NAME).read_text())
    assert header["pointwise_convs"] == convs and all(c + ".linear" in header["layers"] for c in convs)
    from diffusers import SanaTransformer2DModel
    for loaded in (ditq.load_quantized(str(tmp_path)), SanaTransformer2DModel.from_pretrained(str(tmp_path))):
        assert isinstance(loaded.transformer_blocks[0].ff.conv_point, PointwiseConv)
        with torch.no_grad():
            assert torch.equal(_output_tensor(loaded(**inp)), expect)
    header["pointwise_convs"] = ["transformer_blocks.0.ff.conv_depth"]  # a 3x3 depthwise convolution
    (tmp_path / HEADER_NAME).write_text(json.dumps(header))
    with pytest.raises(CheckpointError, match=r"field 'pointwise_convs': not a 1x1 convolution .*conv_depth"):
        ditq.load_quantized(str(tmp_path))
    header["pointwise_convs"] = "transformer_blocks.0.ff.conv_point"
    (tmp_path / HEADER_NAME).write_text(json.dumps(header))
    with pytest.raises(CheckpointError, match=r"field 'pointwise_convs' must be a list of module names"):
        ditq.load_quantized(str(tmp_path))
    assert os.path.isfile(tmp_path / HEADER_NAME)


def test_a_lora_on_a_quantized_convolution():
    """LoRA files name the convolution and hold its [r, K, 1, 1] / [N, r, 1, 1] weights; the branch runs on the
    channels-last rows like any other."""
    model = GatedConvMLP()
    x = _randn(2, 64, 5, 5, seed=3)
    ditq.quantize(model, QuantConfig.preset("w8a8", backend="torch", progress=False), calib_fn=lambda m: m(x))
    with torch.no_grad():
        before, up_before = model(x), model.up(x)
    a, b = _randn(4, 64, 1, 1, seed=4), _randn(256, 4, 1, 1, seed=5)
    assert ditq.load_lora(model, {"up.lora_A.weight": a, "up.lora_B.weight": b}) == {"up.linear": ["up"]}
    with torch.no_grad():
        # the branch: B (A x) per pixel, as the float convolutions compute it, added to `up`'s output
        delta = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, a), b)
        assert torch.allclose(model.up(x), up_before + delta, atol=1e-4, rtol=1e-5)
        assert not torch.equal(model(x), before)
    ditq.unload_lora(model)
    with torch.no_grad():
        assert torch.equal(model(x), before)

"""Fused transformer blocks (ditq.blocks): the norm emits the next GEMM's int8 input; outputs equal the unfused
quantized model, fewer ops run, and whatever the fused forward does not cover falls back to diffusers' own."""
import copy

import pytest
import torch

import ditq
from ditq import backends
from ditq.blocks import fuse_blocks, fused_block_class
from ditq.fuse import fuse_projections
from ditq.quant import reference as ref
from test_fuse import CountOps
from tiny_models import FAMILIES, dit_inputs, tiny_dit


def _model(family):
    if family == "dit":
        return tiny_dit(seed=0), dit_inputs(batch=2, seed=1)
    return FAMILIES[family]()


def _out(o):
    return o.sample if hasattr(o, "sample") else o[0]


def _quantized(family, preset="w8a8", backend="torch", **kw):
    model, inputs = _model(family)
    ditq.quantize(model, ditq.QuantConfig.preset(preset, backend=backend, progress=False, **kw),
                  calib_fn=lambda m: m(**inputs))
    fuse_projections(model)
    return model, inputs


def _ops(model, inputs):
    with torch.no_grad(), CountOps() as c:
        _out(model(**inputs))
    return sum(c.ops.values()), c.ops


@pytest.mark.parametrize("family", ["dit", "pixart"])
@pytest.mark.parametrize("preset", ["w8a8", "w4a8"])
def test_fused_blocks_equal_the_unfused_quantized_model(family, preset):
    kw = {"group_size": 32} if preset == "w4a8" else {}
    model, inputs = _quantized(family, preset, **kw)
    unfused = copy.deepcopy(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = fuse_blocks(model)
    assert report and all(why is None for why in report.values()), report
    assert all(type(model.get_submodule(n)) is fused_block_class() for n in report)
    assert model.state_dict().keys() == state.keys()  # checkpoints do not see the fusion
    with torch.no_grad():
        y_ref, y = _out(unfused(**inputs)), _out(model(**inputs))
    # the GEMMs are the same; the fused norm sums in its own order, which may move an int8 value at an exact
    # rounding tie by one step: the outputs agree far beyond the quantization error itself
    assert ditq.sqnr(y_ref, y) > 60
    n_ref, ops_ref = _ops(unfused, inputs)
    n, ops = _ops(model, inputs)
    blocks = len(report)
    assert ops["ditq::torch_norm_modulate_quantize"] == 2 * blocks
    assert ops.get("native_layer_norm", 0) == ops_ref.get("native_layer_norm", 0) - 2 * blocks
    assert n < n_ref
    print(f"{family} {preset}: ops {n_ref} -> {n}")


def test_norm_modulate_quantize_is_layernorm_modulate_quantize():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 96, generator=g) * 3 + 1
    shift, scale = torch.randn(2, 96, generator=g), torch.randn(2, 96, generator=g) * 0.2
    y = torch.nn.functional.layer_norm(x, (96,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    for act_scale in (None, torch.tensor([0.03])):
        q, s = torch.ops.ditq.norm_modulate_quantize(x, shift, scale, 1e-6, act_scale, "torch")
        q_ref, s_ref = (ref.quantize_per_token(y.reshape(-1, 96)) if act_scale is None else
                        (ref.quantize_with_scale(y.reshape(-1, 96), act_scale, 127), act_scale))
        assert (q.int() - q_ref.int()).abs().max() <= 1 and (q != q_ref).float().mean() < 1e-3
        torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)


def test_uncovered_calls_and_backends_fall_back():
    model, inputs = _quantized("dit")
    block = model.transformer_blocks[0]
    fuse_blocks(model)
    plain = super(type(block), block).forward
    x = torch.randn(2, 16, 64)
    mask = torch.zeros(2, 16)
    kwargs = dict(timestep=inputs["timestep"], class_labels=inputs["class_labels"])
    with torch.no_grad():  # an attention mask: the diffusers forward runs
        torch.testing.assert_close(block(x, attention_mask=mask, **kwargs), plain(x, attention_mask=mask, **kwargs),
                                   rtol=0, atol=0)
    if backends.unavailable_reason("cuda-emulated", "cpu") is None:
        with torch.no_grad():  # moved onto another backend: its fused norm kernel (csrc/norm_quantize.cuh) runs
            y = block(x, **kwargs)
            for layer in (block.attn1.to_qkv, block.ff.net[0].proj):
                layer.set_backend("cuda-emulated")
            assert ditq.sqnr(y, block(x, **kwargs)) > 60
        emulated, inputs = _quantized("dit", backend="cuda-emulated")
        unfused = copy.deepcopy(emulated)
        report = fuse_blocks(emulated)
        assert report and all(why is None for why in report.values()), report
        with torch.no_grad():
            assert ditq.sqnr(_out(unfused(**inputs)), _out(emulated(**inputs))) > 60


def test_timestep_grouped_scales_run_fused():
    base, inputs = _model("dit")
    outs = {}
    for fuse in (False, True):
        model = copy.deepcopy(base)

        def calib(m):
            for t in (999, 600, 300, 10):
                m(**{**inputs, "timestep": torch.full_like(inputs["timestep"], t)})
        report = ditq.quantize(model, ditq.QuantConfig.preset("w8a8", backend="torch", calibration="all-steps",
                                                              timestep_groups=2, fuse=fuse, progress=False),
                               calib_fn=calib)
        if fuse:
            assert all(why is None for why in report.fusion["blocks"].values()), report.fusion
        with torch.no_grad():
            outs[fuse] = [_out(model(**{**inputs, "timestep": torch.full_like(inputs["timestep"], t)}))
                          for t in (999, 10)]
    qkv = model.transformer_blocks[0].attn1.to_qkv
    assert qkv.act_scales.numel() == 2 and not torch.equal(qkv.act_scales[0], qkv.act_scales[1])
    for a, b in zip(outs[False], outs[True]):  # each step ran with its own group's scale, fused or not
        assert ditq.sqnr(a, b) > 60


def test_dynamic_activations_are_not_fused():
    model, _ = _quantized("dit", act_scheme="dynamic")
    assert all("static" in why for why in fuse_blocks(model).values())


@pytest.mark.slow
def test_fused_blocks_on_triton_use_its_fused_norm_kernel():
    if backends.unavailable_reason("triton", "cpu") is not None:
        pytest.skip(backends.unavailable_reason("triton", "cpu"))
    model, inputs = _quantized("dit", backend="triton")
    unfused = copy.deepcopy(model)
    assert all(why is None for why in fuse_blocks(model).values())
    with torch.no_grad():
        assert ditq.sqnr(_out(unfused(**inputs)), _out(model(**inputs))) > 60
    _, ops = _ops(model, inputs)
    assert ops["ditq::triton_norm_modulate_quantize"] == 4

"""Outlier smoothing (folded into adaLN / to_v) and timestep-grouped scales: exactness, save / load."""
import copy

import pytest
import torch

import ditq
from ditq import QuantConfig
from ditq.nn import QuantLinear
from ditq.smooth import factors, find_sites, smooth
from tiny_models import dit_inputs, tiny_dit, tiny_dit_pipeline


def _random_channel_ranges(t, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for site in find_sites(t):
        for c in site.consumers:
            k = t.get_submodule(c).in_features
            out[c] = torch.rand(k, generator=g) * 10 + 0.01
            out[c][3] = 300.0  # an outlier channel
    return out


def test_smoothing_leaves_the_float_output_unchanged():
    t = tiny_dit().double()  # float64: the reparametrization is exact up to rounding, so compare in fp64
    inp = dit_inputs()
    inp["hidden_states"] = inp["hidden_states"].double()
    with torch.no_grad():
        ref = t(**inp).sample
    sites = find_sites(t)
    assert sorted(s.name.split(".")[-1] for s in sites) == ["attn-in", "attn-in", "attn-out", "attn-out",
                                                           "mlp-in", "mlp-in"]
    w_before = t.transformer_blocks[0].attn1.to_q.weight.detach().clone()
    sm = smooth(t, _random_channel_ranges(t), alpha=0.5)
    assert len(sm.applied) == 6
    assert not torch.equal(t.transformer_blocks[0].attn1.to_q.weight, w_before)  # weights did change
    with torch.no_grad():
        out = t(**inp).sample
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-12
    sm.restore()
    assert torch.equal(t.transformer_blocks[0].attn1.to_q.weight, w_before)


def test_smoothing_fp32_output_unchanged_to_rounding_and_flattens_the_outlier_channel():
    t = tiny_dit()
    inp = dit_inputs()
    seen = {}
    name = "transformer_blocks.0.attn1.to_q"
    h = t.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.update(x=a[0].detach().clone()))
    with torch.no_grad():
        ref = t(**inp).sample
        x0 = seen["x"].abs().amax(dim=(0, 1))
        ranges = {c: x0 for c in ("transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_k",
                                  "transformer_blocks.0.attn1.to_v")}
        smooth(t, ranges, alpha=1.0, sites={"transformer_blocks.0.attn-in"})
        out = t(**inp).sample
        x1 = seen["x"].abs().amax(dim=(0, 1))
    h.remove()
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5  # fp32 rounding
    # alpha = 1 moves the whole range into the weights: every input channel's max becomes ~1
    assert float(x0.max() / x0.min()) > 2 and torch.allclose(x1, torch.ones_like(x1), rtol=1e-4)


def test_factors():
    s = factors(torch.tensor([4.0, 0.0, 9.0]), torch.tensor([1.0, 2.0, 0.0]), 0.5)
    assert s.tolist() == [2.0, 1.0, 1.0]  # zero ranges keep s = 1
    with pytest.raises(ValueError, match="alpha"):
        smooth(tiny_dit(), {}, alpha=0.0)


CAL = dict(class_labels=[1, 2, 3, 4], num_inference_steps=6, output_type="latent")


@pytest.fixture(scope="module")
def grouped():
    pipe = tiny_dit_pipeline()
    cfg = QuantConfig(calibration="all-steps", timestep_groups=3, act_estimator="auto", progress=False)
    report = ditq.quantize(pipe, cfg, calib_inputs=CAL)
    return pipe, report


def test_grouped_model_saves_and_loads_bit_exact(grouped, tmp_path):
    pipe, report = grouped
    t = pipe.transformer
    ditq.save_quantized(t, str(tmp_path / "q"))
    loaded = ditq.load_quantized(str(tmp_path / "q"))
    for ts in (999, 500, 20):
        inp = dit_inputs(t=ts)
        with torch.no_grad():
            a, b = t(**inp).sample, loaded(**inp).sample
        assert torch.equal(a, b)
        q1 = t.transformer_blocks[0].ff.net[2]
        q2 = loaded.transformer_blocks[0].ff.net[2]
        assert torch.equal(q1.act_scale, q2.act_scale)
    name = "transformer_blocks.0.ff.net.2"
    assert loaded.get_submodule(name).act_scales.tolist() == pytest.approx(report.layer(name).act_scales)


def test_grouped_scales_follow_the_timestep_and_survive_copies_and_casts(grouped):
    pipe, report = grouped
    t = copy.deepcopy(pipe.transformer)
    layer = t.transformer_blocks[1].ff.net[2]
    scales = layer.act_scales.clone()
    bounds = layer.timestep_bounds.tolist()
    got = []
    for ts in (999, int(bounds[-1]) + 1, int(bounds[0]) - 1, 0):
        with torch.no_grad():
            t(**dit_inputs(t=ts))
        got.append(float(layer.act_scale))
    assert got[0] == float(scales[-1]) and got[-1] == float(scales[0])  # noisiest / cleanest group
    assert got[1] == float(scales[-1]) and got[2] == float(scales[0])  # just inside the outer bounds
    # the copy's hook drives the copy's layers, not the original's
    orig = pipe.transformer.transformer_blocks[1].ff.net[2]
    before = float(orig.act_scale)
    with torch.no_grad():
        t(**dit_inputs(t=0 if before == float(scales[-1]) else 999))
    assert float(orig.act_scale) == before
    t.half()
    assert layer.act_scales.dtype == torch.float32 and layer.timestep_bounds.dtype == torch.float32
    assert isinstance(layer, QuantLinear)


def test_grouped_model_loads_through_diffusers_from_pretrained(grouped, tmp_path):
    from diffusers import DiTTransformer2DModel
    pipe, _ = grouped
    ditq.save_quantized(pipe.transformer, str(tmp_path / "q"))
    loaded = DiTTransformer2DModel.from_pretrained(str(tmp_path / "q"))
    layer = loaded.transformer_blocks[1].ff.net[2]
    assert layer.act_scales is not None
    for ts in (999, 0):
        inp = dit_inputs(t=ts)
        with torch.no_grad():
            assert torch.equal(pipe.transformer(**inp).sample, loaded(**inp).sample)

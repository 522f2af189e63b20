"""Pipelines with two transformers (Wan 2.2 A14B: a high-noise and a low-noise expert) and pipelines that call the
transformer twice per step (guidance as separate conditional and unconditional calls): calibration counts steps by
timestep, each expert is quantized on its own first step, and both are saved and loaded."""
import json
import os
import warnings

import pytest
import torch

import ditq
from ditq import QuantConfig, io
from ditq.calibrate import calibrate, pipeline_runs
from ditq.cli import main
from ditq.convert import UnquantizedComponentWarning, is_quantized, select_layers
from ditq.lora import loaded_adapters
from ditq.nn import QuantLinear
from tiny_models import tiny_dit_pipeline, tiny_wan_experts_pipeline

CALIB = dict(prompt=["a red fox", "a lighthouse"], num_inference_steps=4)
CROSS_ATTN_K = "blocks.0.attn2.to_k"  # reads the text features: its range differs between the two guidance calls


def _cfg(**kw):
    return QuantConfig.preset("w8a8", backend="torch", progress=False, **kw)


def _record(module, name):
    """(timestep, max |x|) of every finished call of ``module.get_submodule(name)``'s input, by a plain hook."""
    seen, t_now = [], []
    h1 = module.register_forward_pre_hook(lambda m, a, k: t_now.append(float(k["timestep"][0])), with_kwargs=True)
    h2 = module.get_submodule(name).register_forward_pre_hook(
        lambda m, a: seen.append((t_now[-1], float(a[0].abs().amax()))))
    return seen, (h1, h2)


def _first_t_below(pipe, boundary_ratio, steps):
    pipe.scheduler.set_timesteps(steps)
    bound = boundary_ratio * pipe.scheduler.config.num_train_timesteps
    return float(next(t for t in pipe.scheduler.timesteps if t < bound))


@pytest.mark.parametrize("component", ["transformer", "transformer_2"])
def test_first_step_is_both_guidance_calls_of_the_experts_first_step(component):
    pipe = tiny_wan_experts_pipeline()
    model = getattr(pipe, component)
    layers, _ = select_layers(model, _cfg())
    seen, hooks = _record(model, CROSS_ATTN_K)
    try:
        cal = calibrate(model, layers, pipeline_runs(pipe, CALIB), [0], progress=False, pipe=pipe)
    finally:
        for h in hooks:
            h.remove()
    # the run stopped as the expert's second step began: its first step's two calls ran, no third
    assert cal.calls_per_run == [2] and cal.steps_per_run == [1] and len(seen) == 2
    first_t = float(pipe.scheduler.timesteps[0]) if component == "transformer" else _first_t_below(pipe, 0.5, 4)
    assert seen[0][0] == seen[1][0] == first_t == cal.timesteps[0]
    cond, uncond = seen[0][1], seen[1][1]
    assert uncond > 1.5 * cond  # the unconditional call is the wider one here (tiny_models): recording only the
    assert cal.absmax[CROSS_ATTN_K] == {0: max(cond, uncond)}  # conditional call would clip it


def test_all_steps_counts_steps_not_calls():
    pipe = tiny_wan_experts_pipeline(boundary_ratio=0.0)  # the high-noise expert takes every step
    layers, _ = select_layers(pipe.transformer, _cfg())
    cal = calibrate(pipe.transformer, layers, pipeline_runs(pipe, dict(CALIB, num_inference_steps=3)), None,
                    progress=False, pipe=pipe)
    assert cal.calls_per_run == [6] and cal.steps_per_run == [3]
    assert set(cal.absmax[CROSS_ATTN_K]) == {0, 1, 2}
    assert sorted(cal.timesteps.values(), reverse=True) == [float(t) for t in pipe.scheduler.timesteps]
    chosen = calibrate(pipe.transformer, layers, pipeline_runs(pipe, dict(CALIB, num_inference_steps=3)), [1],
                       progress=False, pipe=pipe)
    assert chosen.calls_per_run == [4] and chosen.steps_per_run == [2]  # step 1's two calls, then stopped
    assert set(chosen.absmax[CROSS_ATTN_K]) == {1} and chosen.absmax[CROSS_ATTN_K][1] == cal.absmax[CROSS_ATTN_K][1]


def test_batched_guidance_is_still_one_call_per_step():
    pipe = tiny_dit_pipeline()
    layers, _ = select_layers(pipe.transformer, _cfg())
    runs = pipeline_runs(pipe, dict(class_labels=[1, 2], num_inference_steps=3))
    cal = calibrate(pipe.transformer, layers, runs, None, progress=False, pipe=pipe)
    assert cal.calls_per_run == cal.steps_per_run == [3]


def test_each_expert_quantized_in_turn():
    pipe = tiny_wan_experts_pipeline()
    with pytest.warns(UnquantizedComponentWarning, match=r"also holds transformer_2.*component='transformer_2'"):
        high = ditq.quantize(pipe, _cfg(), CALIB)
    assert is_quantized(pipe.transformer) and not is_quantized(pipe.transformer_2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnquantizedComponentWarning)  # nothing is left in full precision now
        low = ditq.quantize(pipe, _cfg(), CALIB, component="transformer_2")
    assert is_quantized(pipe.transformer_2)
    for report in (high, low):
        assert report.calibration["calls_per_run"] == [2] and report.calibration["steps_per_run"] == [1]
        assert report.layers and report.output_sqnr > 25
    # each expert's scales come from its own first step (the low-noise one never sees t = T)
    assert high.act_absmax_per_step != low.act_absmax_per_step
    out = pipe(**dict(CALIB, generator=torch.Generator().manual_seed(0)))
    assert torch.isfinite(out).all()


def test_component_errors(tmp_path):
    pipe = tiny_wan_experts_pipeline()
    with pytest.raises(ValueError, match="component must be one of 'transformer', 'transformer_2'"):
        ditq.quantize(pipe, _cfg(), CALIB, component="unet")
    with pytest.raises(ValueError, match="names a pipeline's transformer, but this is a WanTransformer3DModel"):
        ditq.quantize(pipe.transformer, _cfg(act_scheme="dynamic"), component="transformer_2")
    with pytest.raises(ValueError, match="DiTPipeline has no transformer_2 .it holds transformer: pass "
                                         "component='transformer'"):
        ditq.quantize(tiny_dit_pipeline(), _cfg(), dict(class_labels=[1]), component="transformer_2")
    low_only = tiny_wan_experts_pipeline(boundary_ratio=1.01)  # every step below the boundary: low-noise
    low_only.transformer = None  # a pipeline loaded with the low-noise expert alone
    with pytest.raises(ValueError, match="has no transformer .it holds transformer_2: pass component='transformer_2'"):
        ditq.quantize(low_only, _cfg(), CALIB)
    ditq.quantize(low_only, _cfg(), CALIB, component="transformer_2")
    ditq.save_quantized(low_only, str(tmp_path))  # the pipeline's one transformer, whatever its name
    assert os.path.isfile(tmp_path / "transformer_2" / io.HEADER_NAME)
    assert not os.path.exists(tmp_path / "transformer" / io.HEADER_NAME)
    assert not is_quantized(pipe.transformer) and not is_quantized(pipe.transformer_2)
    with pytest.raises(ValueError, match="not quantized"):
        ditq.save_quantized(pipe, "unused")


@pytest.fixture
def loadable(monkeypatch):
    """load_quantized imports pipeline classes from diffusers and ditq only; this test pipeline lives beside the
    tests (diffusers' own WanPipeline needs the transformers package)."""
    monkeypatch.setattr(io, "_IMPORTABLE_PACKAGES", io._IMPORTABLE_PACKAGES + ("tiny_models",))


def _sample(pipe):
    return pipe(**dict(CALIB, generator=torch.Generator().manual_seed(0)))


def test_both_experts_saved_and_loaded(tmp_path, loadable):
    pipe = tiny_wan_experts_pipeline()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnquantizedComponentWarning)
        ditq.quantize(pipe, _cfg(), CALIB)
    ditq.quantize(pipe, QuantConfig.preset("w4a8", group_size=32, backend="torch", progress=False), CALIB,
                  component="transformer_2")
    expect = _sample(pipe)
    ditq.save_quantized(pipe, str(tmp_path))
    for component in ("transformer", "transformer_2"):
        assert os.path.isfile(tmp_path / component / io.HEADER_NAME)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
    loaded = ditq.load_quantized(str(tmp_path), progress=False)
    bits = {c: {m.fmt.bits for m in getattr(loaded, c).modules() if isinstance(m, QuantLinear)}
            for c in ("transformer", "transformer_2")}
    assert bits == {"transformer": {8}, "transformer_2": {4}}
    assert torch.equal(_sample(loaded), expect)


def test_a_full_precision_expert_is_saved_by_diffusers(tmp_path, loadable):
    pipe = tiny_wan_experts_pipeline()
    low_weights = {k: v.clone() for k, v in pipe.transformer_2.state_dict().items()}
    both = tiny_wan_experts_pipeline()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnquantizedComponentWarning)
        for p in (pipe, both):
            ditq.quantize(p, _cfg(), CALIB)
    ditq.quantize(both, _cfg(), CALIB, component="transformer_2")
    ditq.save_quantized(both, str(tmp_path))
    ditq.save_quantized(pipe, str(tmp_path))  # over it: transformer_2 now in full precision
    assert not os.path.exists(tmp_path / "transformer_2" / io.HEADER_NAME)  # the earlier save's header is gone
    loaded = ditq.load_quantized(str(tmp_path), progress=False)
    assert is_quantized(loaded.transformer) and not is_quantized(loaded.transformer_2)
    state = loaded.transformer_2.state_dict()
    assert all(torch.equal(state[k], v) for k, v in low_weights.items())
    assert torch.equal(_sample(loaded), _sample(pipe))


def test_command_line_quantizes_both_experts(tmp_path, monkeypatch, capsys, loadable):
    pipe = tiny_wan_experts_pipeline()
    monkeypatch.setattr("ditq.cli.load_pipeline", lambda model, device="cpu": pipe)
    out = tmp_path / "q"
    code = main(["quantize", "wan-experts", "--preset", "w8a8", "--backend", "torch", "--calib-steps", "4",
                 "--calib-prompts", "a red fox", "--out", str(out), "--quiet"])
    stdout, stderr = capsys.readouterr()
    assert code == 0 and "UnquantizedComponentWarning" not in stderr and "transformer_2" not in stderr
    assert "bytes of transformer + transformer_2" in stdout
    for component, report in (("transformer", "ditq_report.json"), ("transformer_2", "ditq_report_transformer_2.json")):
        assert os.path.isfile(out / component / io.HEADER_NAME)
        assert json.loads((out / report).read_text())["calibration"]["steps_per_run"] == [1]
    code = main(["info", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0 and f"second transformer is quantized too: ditq info {out / 'transformer_2'}" in stdout
    code = main(["info", str(out / "transformer_2")])
    assert code == 0 and "WanTransformer3DModel in " in capsys.readouterr().out


def test_a_lora_per_expert():
    """Wan 2.2 LoRAs come as a pair (one file per expert) or as one file for both: ``component`` says which."""
    pipe = tiny_wan_experts_pipeline()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnquantizedComponentWarning)
        for component in ("transformer", "transformer_2"):
            ditq.quantize(pipe, _cfg(), CALIB, component=component)
    before = _sample(pipe)
    g = torch.Generator().manual_seed(3)
    layer = pipe.transformer_2.get_submodule("blocks.0.attn1.to_q")
    lora = {"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.randn(4, layer.in_features, generator=g),
            "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.randn(layer.out_features, 4, generator=g)}
    taken = ditq.load_lora(pipe, lora, adapter_name="low", component="transformer_2")
    assert list(taken) == ["blocks.0.attn1.to_q"]
    assert loaded_adapters(pipe, component="transformer_2") == {"low": 1.0}
    assert loaded_adapters(pipe) == {}  # the high-noise expert took nothing
    adapted = _sample(pipe)
    assert not torch.equal(adapted, before)
    ditq.set_lora_scale(pipe, 0.0, component="transformer_2")
    assert torch.equal(_sample(pipe), before)  # scale 0: bit for bit the model without it
    with pytest.raises(ValueError, match="LoRA adapters loaded"):
        ditq.save_quantized(pipe, "unused")  # the low-noise expert's adapter would be dropped
    ditq.unload_lora(pipe, component="transformer_2")
    assert loaded_adapters(pipe, component="transformer_2") == {}
    assert torch.equal(_sample(pipe), before)


def test_per_token_timesteps_are_read_as_the_steps_noise_level():
    """Wan 2.2 TI2V's image-to-video calls pass one timestep per token, the conditioning frame's tokens at 0: the
    step is the largest entry (the first one is 0 at every step), in calibration and in the grouped scales' hook."""
    from tiny_models import tiny_wan
    model, inp = tiny_wan()
    tokens = 2 * 4 * 4  # frames x (8 / 2) x (8 / 2) patches

    def at(t):
        ts = torch.full((1, tokens), float(t))
        ts[:, :16] = 0  # the first latent frame: the conditioning image
        return dict(inp, timestep=ts)

    layers, _ = select_layers(model, _cfg())
    steps = (999, 700, 400, 100)
    cal = calibrate(model, layers, [lambda: [model(**at(t)) for t in steps]], None, progress=False)
    assert cal.steps_per_run == [4] and cal.timesteps == dict(enumerate(map(float, steps)))
    first = calibrate(model, layers, [lambda: [model(**at(t)) for t in steps]], [0], progress=False)
    assert first.calls_per_run == [1] and first.steps_per_run == [1]  # stopped as step 1 began
    ditq.quantize(model, QuantConfig.preset("w8a8", backend="torch", progress=False, calibration="all-steps",
                                            timestep_groups=2),
                  calib_fn=lambda m: [m(**at(t)) for t in steps])
    grouped = [m for m in model.modules() if isinstance(m, QuantLinear) and hasattr(m, "act_scales")]
    assert grouped
    for t, group in ((999, -1), (100, 0)):  # ascending-timestep order: the noisiest group is the last
        with torch.no_grad():
            model(**at(t))
        assert all(torch.equal(m.act_scale.reshape(-1), m.act_scales[group].reshape(-1)) for m in grouped)

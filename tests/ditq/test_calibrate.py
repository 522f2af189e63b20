"""Calibration: which transformer calls are observed, early stopping, per-step records, errors."""
import pytest
import torch

from ditq.calibrate import CalibrationError, calibrate, pipeline_runs
from ditq.convert import select_layers
from ditq import QuantConfig
from tiny_models import tiny_dit_pipeline

STEPS = 4


@pytest.fixture(scope="module")
def pipe():
    return tiny_dit_pipeline()


def _count_calls(module):
    """The timesteps of the transformer's finished calls (a run stopped as step 1 starts never runs its forward)."""
    calls = []
    h = module.register_forward_hook(lambda m, a, k, o: calls.append(k["timestep"].clone()), with_kwargs=True)
    return calls, h


def _calibrate(pipe, steps, runs=1):
    layers, _ = select_layers(pipe.transformer, QuantConfig(default_skip=False))
    inputs = [dict(class_labels=[1, 2], num_inference_steps=STEPS, output_type="latent")] * runs
    calls, h = _count_calls(pipe.transformer)
    try:
        cal = calibrate(pipe.transformer, layers, pipeline_runs(pipe, inputs), steps, progress=False, pipe=pipe)
    finally:
        h.remove()
    return cal, calls


def test_first_step_runs_the_transformer_once_per_run(pipe):
    cal, calls = _calibrate(pipe, [0], runs=2)
    assert len(calls) == 2 and cal.calls_per_run == [1, 1]  # stopped after call 0, not STEPS calls
    assert all(int(t.max()) == int(pipe.scheduler.timesteps[0]) for t in calls)  # t = T, the noisiest
    assert all(set(r) == {0} for r in cal.absmax.values())
    assert len(cal.first_step_inputs) == 2
    assert not pipe.transformer._forward_hooks and not pipe.transformer._forward_pre_hooks


def test_all_steps_and_chosen_steps(pipe):
    cal, calls = _calibrate(pipe, None)
    assert len(calls) == STEPS and cal.calls_per_run == [STEPS]
    assert all(set(r) == set(range(STEPS)) for r in cal.absmax.values())
    cal2, calls2 = _calibrate(pipe, [1, 2])
    assert len(calls2) == 3  # stops after the last chosen step
    assert all(set(r) == {1, 2} for r in cal2.absmax.values())
    # the recorded range is the max of the chosen steps' ranges
    name = next(iter(cal.absmax))
    expect = max(cal.absmax[name][1], cal.absmax[name][2])
    assert cal2.scale(name).item() == pytest.approx(expect / 127, rel=1e-6)


def test_first_step_scale_is_the_absmax_of_the_first_call(pipe):
    layers, _ = select_layers(pipe.transformer, QuantConfig(default_skip=False))
    name, lin = "transformer_blocks.0.attn1.to_q", None
    seen = []
    lin = pipe.transformer.get_submodule(name)
    h = lin.register_forward_pre_hook(lambda m, a: seen.append(a[0].abs().max().item()))
    try:
        cal = calibrate(pipe.transformer, layers, pipeline_runs(pipe, dict(class_labels=[3], num_inference_steps=3)),
                        [0], progress=False)
    finally:
        h.remove()
    assert len(seen) == 1 and cal.absmax[name][0] == seen[0]
    assert cal.scale(name).dtype == torch.float32 and cal.scale(name).item() == pytest.approx(seen[0] / 127)


def test_hessian_is_the_sum_of_x_transpose_x_over_the_recorded_steps(pipe):
    layers, _ = select_layers(pipe.transformer, QuantConfig(default_skip=False))
    name = "transformer_blocks.1.ff.net.2"
    seen = []
    lin = pipe.transformer.get_submodule(name)
    h = lin.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1]).clone()))
    try:
        runs = pipeline_runs(pipe, [dict(class_labels=[3, 7], num_inference_steps=3)] * 2)
        cal = calibrate(pipe.transformer, layers, runs, [1, 2], progress=False, record_hessian=True)
    finally:
        h.remove()
    recorded = torch.cat([seen[i] for i in (1, 2, 4, 5)]).double()  # steps 1, 2 of both runs; not step 0
    assert cal.hessian_rows[name] == recorded.shape[0]
    expect = recorded.t() @ recorded
    assert cal.hessian[name].shape == (lin.in_features,) * 2
    assert torch.allclose(cal.hessian[name].double(), expect, rtol=1e-4, atol=1e-4 * float(expect.abs().max()))
    assert set(cal.hessian) == set(layers)
    no_h = calibrate(pipe.transformer, layers, runs, [0], progress=False)
    assert not no_h.hessian  # opt-in: K x K per layer is not kept unless asked for


def test_errors_leave_no_hooks(pipe):
    layers, _ = select_layers(pipe.transformer, QuantConfig(default_skip=False))
    with pytest.raises(CalibrationError, match="class_labels|failed"):
        calibrate(pipe.transformer, layers, pipeline_runs(pipe, dict(class_labels=[5000], num_inference_steps=2)),
                  [0], progress=False)
    assert not pipe.transformer._forward_hooks and not any(l._forward_pre_hooks for l in layers.values())
    with pytest.raises(CalibrationError, match=r"only 2 step\(s\) \(2 transformer call"):
        calibrate(pipe.transformer, layers, pipeline_runs(pipe, dict(class_labels=[1], num_inference_steps=2)),
                  [5], progress=False)
    with pytest.raises(CalibrationError, match="never called the transformer"):
        calibrate(pipe.transformer, layers, [lambda: None], [0], progress=False)
    with pytest.raises(CalibrationError, match="calib_inputs must be"):
        pipeline_runs(pipe, [])


# ---- range estimators on the recorded histograms -----------------------------------------------------------

def _heavy_tailed(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, 96, generator=g)
    x[:, 5] *= 40  # one outlier channel, as DiT activations have
    return x


def _true_mse(x, clip):
    s = clip / 127
    return float((x - torch.clamp(torch.round(x / s), -127, 127) * s).double().pow(2).sum())


def test_histogram_mse_estimate_matches_the_exact_error():
    from ditq.calibrate import histogram, quant_mse
    x = _heavy_tailed()
    h = histogram(x)
    assert int(h[0].sum()) == x.numel()
    assert float(h[2].sum()) == pytest.approx(float(x.double().pow(2).sum()), rel=1e-9)
    amax = float(x.abs().max())
    for ratio in (1.0, 0.6, 0.25, 0.05):
        assert quant_mse(h, ratio * amax) == pytest.approx(_true_mse(x, ratio * amax), rel=0.06)


def test_histogram_in_chunks_equals_one_pass(monkeypatch):
    """The histogram bins |x| a bounded slice at a time (its temporaries stay ~50 MB for any activation): the
    counts are the same, the float64 sums the same to rounding."""
    import ditq.calibrate as cb
    x = _heavy_tailed(2)[:1001, :95]  # a ragged element count (the last chunk is partial), not contiguous
    whole = cb.histogram(x)
    monkeypatch.setattr(cb, "HIST_CHUNK", 997)
    parts = cb.histogram(x)
    assert x.numel() > 3 * 997
    assert torch.equal(parts[0], whole[0])
    torch.testing.assert_close(parts[1:], whole[1:], rtol=1e-12, atol=0)


def test_release_freed_memory_is_safe_everywhere():
    from ditq.calibrate import release_freed_memory
    release_freed_memory("cpu")
    release_freed_memory(torch.device("meta"))  # nothing to trim off the CPU: a no-op, never an error


def test_mse_and_percentile_estimators():
    from ditq.calibrate import clip_value, histogram
    x = _heavy_tailed(1)
    h, amax = histogram(x), float(x.abs().max())
    assert clip_value(h, amax, "max") == amax
    c_mse = clip_value(h, amax, "mse")
    assert c_mse < amax and _true_mse(x, c_mse) < 0.9 * _true_mse(x, amax)  # clipping the tail pays here
    p = clip_value(h, amax, "percentile", 99.0)
    exact = float(x.abs().flatten().double().quantile(0.99))
    assert abs(p - exact) < 0.05 * exact  # within a bin (4.4 % wide)
    assert clip_value(h, amax, "percentile", 100.0) == pytest.approx(amax, rel=1e-6)
    # data with no tail: the MSE search keeps (almost) the whole range
    u = torch.rand(4096, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    assert clip_value(histogram(u), float(u.abs().max()), "mse") > 0.9 * float(u.abs().max())
    with pytest.raises(ValueError, match="unknown range estimator"):
        clip_value(h, amax, "minmax")


def test_calibrator_scale_per_estimator_and_steps(pipe):
    cal, _ = _calibrate(pipe, None)
    name = "transformer_blocks.0.ff.net.2"
    amax = max(cal.absmax[name].values())
    assert cal.scale(name).item() == pytest.approx(amax / 127, rel=1e-6)
    assert cal.scale(name, estimator="mse").item() <= cal.scale(name).item()
    assert cal.scale(name, steps=[0]).item() == pytest.approx(cal.absmax[name][0] / 127, rel=1e-6)
    assert set(cal.timesteps) == set(range(STEPS)) and cal.timesteps[0] > cal.timesteps[STEPS - 1]
    assert cal.channel_absmax[name].shape == (pipe.transformer.get_submodule(name).in_features,)
    assert float(cal.channel_absmax[name].max()) == pytest.approx(amax, rel=1e-6)


# ---- bad calibration data -------------------------------------------------------------------------------------

def test_non_finite_calibration_activations_raise_naming_layer_and_step():
    from torch import nn
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    layers = {"0": model[0], "1": model[1]}
    x = torch.randn(4, 8)
    x[1, 3] = float("nan")
    with pytest.raises(CalibrationError, match=r"layer '0' got 1 non-finite .* step 0"):
        calibrate(model, layers, [lambda: model(x)], [0], progress=False)
    assert not model._forward_pre_hooks and not model[0]._forward_pre_hooks
    # an inf produced inside the model is caught at the first layer that sees it, at the step it appears
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    with pytest.raises(CalibrationError, match=r"layer '1' got .* step 0"):
        calibrate(model, layers, [lambda: model(torch.ones(2, 8))], [0], progress=False)


def test_config_validates_calibration_fields():
    from ditq.config import QuantConfigError
    QuantConfig(act_estimator="mse", calibration="all-steps", timestep_groups=3, smooth_alpha=0.5,
                max_dynamic_layers=2)
    for kw, match in [(dict(act_estimator="minmax"), "act_estimator"), (dict(act_percentile=0), "act_percentile"),
                      (dict(timestep_groups=0), "timestep_groups"),
                      (dict(timestep_groups=2), "more than one calibration step"),
                      (dict(smooth_alpha=1.5), "smooth_alpha"), (dict(smooth_alpha=True), "smooth_alpha"),
                      (dict(max_dynamic_layers=-1), "max_dynamic_layers"),
                      (dict(act_scheme="dynamic", smooth_alpha=0.5), "smooth_alpha needs")]:
        with pytest.raises(QuantConfigError, match=match):
            QuantConfig(**kw)
    d = QuantConfig(act_estimator="auto", calibration="all-steps", timestep_groups=2).to_dict()
    assert QuantConfig.from_dict(d).timestep_groups == 2


# ---- timestep groups --------------------------------------------------------------------------------------------

def test_choose_groups_merges_adjacent_steps_with_similar_ranges():
    from ditq.timestep_groups import choose_groups, timestep_bounds
    absmax = {"a": {0: 8.0, 1: 7.5, 2: 2.0, 3: 2.1, 4: 0.5}, "b": {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}}
    assert choose_groups(absmax, range(5), 1) == [[0, 1, 2, 3, 4]]
    assert choose_groups(absmax, range(5), 3) == [[0, 1], [2, 3], [4]]
    assert choose_groups(absmax, range(5), 2) == [[0, 1], [2, 3, 4]]
    # equal ranges need no split, however many groups are allowed
    assert choose_groups({"b": absmax["b"]}, range(5), 4) == [[0, 1, 2, 3, 4]]
    ts = {0: 999.0, 1: 899.0, 2: 799.0, 3: 699.0, 4: 599.0}
    assert timestep_bounds([[0, 1], [2, 3], [4]], ts) == [649.0, 849.0]
    with pytest.raises(ValueError, match="no timestep was recorded"):
        timestep_bounds([[0], [1]], {0: 999.0})

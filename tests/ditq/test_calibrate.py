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
    calls = []
    h = module.register_forward_pre_hook(lambda m, a, k: calls.append(k["timestep"].clone()), with_kwargs=True)
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


def test_errors_leave_no_hooks(pipe):
    layers, _ = select_layers(pipe.transformer, QuantConfig(default_skip=False))
    with pytest.raises(CalibrationError, match="class_labels|failed"):
        calibrate(pipe.transformer, layers, pipeline_runs(pipe, dict(class_labels=[5000], num_inference_steps=2)),
                  [0], progress=False)
    assert not pipe.transformer._forward_hooks and not any(l._forward_pre_hooks for l in layers.values())
    with pytest.raises(CalibrationError, match="only 2 time"):
        calibrate(pipe.transformer, layers, pipeline_runs(pipe, dict(class_labels=[1], num_inference_steps=2)),
                  [5], progress=False)
    with pytest.raises(CalibrationError, match="never called the transformer"):
        calibrate(pipe.transformer, layers, [lambda: None], [0], progress=False)
    with pytest.raises(CalibrationError, match="calib_inputs must be"):
        pipeline_runs(pipe, [])

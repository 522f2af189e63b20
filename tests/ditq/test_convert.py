"""ditq.quantize: accuracy vs the maths, schemes, layer selection, the report, and failures that leave the model
as it was."""
import copy
import json
import math
import re
import warnings

import pytest
import torch
from torch import nn

import ditq
from ditq import QuantConfig
from ditq.calibrate import CalibrationError
from ditq.config import QuantConfigError
from ditq.convert import QuantizeError
from ditq.nn import QuantLinear
from tiny_models import dit_inputs, tiny_dit, tiny_dit_pipeline

CALIB = dict(class_labels=[1, 2, 3, 4], num_inference_steps=3, output_type="latent")


@pytest.fixture(scope="module")
def base_pipe():
    return tiny_dit_pipeline()


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same_state(module, state):
    now = module.state_dict()
    return set(now) == set(state) and all(torch.equal(now[k], state[k]) for k in state) and \
        not any(isinstance(m, QuantLinear) for m in module.modules()) and \
        getattr(module, "_ditq_config", None) is None


# Thresholds from the maths. nn.Linear weights are uniform on [-a, a]: symmetric quantization with
# step s = a / qmax has noise s²/12 against a signal a²/3, so SQNR = 10·log10(4·qmax²): 48.1 dB for int8
# (qmax 127) and 22.9 dB for int4 (qmax 7); a group's absmax is slightly below a, so measured values sit at or a
# little above the prediction. For the model output: a Gaussian-like activation quantized with its absmax (~4σ)
# gives 10·log10(12·127²/16) ≈ 40.8 dB per int8 tensor, so a W8A8 layer is ~38 dB and a W4A8 layer is bounded by
# its weights (~23 dB); noise from L = 14 quantized layers adds up to at most 10·log10(14) ≈ 11.5 dB, so the output
# must stay above ~25 dB (W8A8) and ~10 dB (W4A8). A wrong scale, layout or nibble order gives ~0 dB.
@pytest.mark.parametrize("preset, w_pred, out_floor", [("w8a8", 48.1, 25.0), ("w4a8", 22.9, 10.0)])
def test_pipeline_quantize_accuracy_and_report(base_pipe, preset, w_pred, out_floor):
    pipe = copy.deepcopy(base_pipe)
    cfg = QuantConfig.preset(preset, group_size=32, progress=False) if preset == "w4a8" else \
        QuantConfig.preset(preset, progress=False)
    report = ditq.quantize(pipe, cfg, calib_inputs=CALIB)
    t = pipe.transformer
    n_quant = sum(isinstance(m, QuantLinear) for m in t.modules())
    # 20 linears minus proj_out_1 / proj_out_2 and each block's timestep embedder (linear_1, linear_2)
    assert n_quant == len(report.layers) == 14
    assert set(report.skipped) == {"proj_out_1", "proj_out_2"} | {
        f"transformer_blocks.{b}.norm1.emb.timestep_embedder.linear_{i}" for b in (0, 1) for i in (1, 2)}
    assert all("default skip list" in why for why in report.skipped.values())
    for lr in report.layers:
        assert w_pred - 0.5 < lr.weight_sqnr < w_pred + 2.0, lr
        assert lr.act_sqnr > 25  # int8 of its own calibration data: ~35-45 dB
        assert lr.bytes_after < lr.bytes_before
    assert report.output_sqnr > out_floor
    # the output SQNR is what re-running the transformer on the first-step inputs gives
    assert report.calibration["calls_per_run"] == [1]
    assert report.bytes_after < report.bytes_before and report.compression > 1
    d = json.loads(report.to_json())
    assert d["layers"][0]["name"] == report.layers[0].name and d["output_sqnr"] == report.output_sqnr
    text = str(report)
    assert "proj_out_2" in text and re.search(r"model-output SQNR .*: \d+\.\d dB", text)
    assert set(report.act_absmax_per_step) == {lr.name for lr in report.layers}
    assert all(set(v) == {0} for v in report.act_absmax_per_step.values())


def test_static_vs_dynamic(base_pipe):
    reports = {}
    for scheme in ("static", "dynamic"):
        pipe = copy.deepcopy(base_pipe)
        cfg = QuantConfig.preset("w8a8", act_scheme=scheme, progress=False)
        reports[scheme] = ditq.quantize(pipe, cfg, calib_inputs=CALIB)
        q = pipe.transformer.transformer_blocks[0].attn1.to_q
        assert (q.act_scale is None) == (scheme == "dynamic")
    # per-token scales are never coarser than one scale for the whole tensor, so on the same data the
    # activation error can only be smaller on average.
    mean = {k: sum(lr.act_sqnr for lr in r.layers) / len(r.layers) for k, r in reports.items()}
    assert mean["dynamic"] > mean["static"]
    assert reports["dynamic"].calibration["mode"].startswith("none")


def test_dynamic_needs_no_calibration():
    t = tiny_dit()
    report = ditq.quantize(t, QuantConfig.preset("w8a8", act_scheme="dynamic", progress=False))
    assert report.output_sqnr is None and len(report.layers) == 14  # the timestep embedders stay float
    assert t(**dit_inputs()).sample.shape == (2, 8, 8, 8)


def test_module_with_calib_fn_and_skip_include():
    t = tiny_dit()
    inp = dit_inputs()
    cfg = QuantConfig.preset("w4a8", group_size=64, skip=["*attn1.to_k"], include=["transformer_blocks.*",
                                                                                 "proj_out_2"], progress=False)
    report = ditq.quantize(t, cfg, calib_fn=lambda m: m(**inp))
    names = {lr.name for lr in report.layers}
    assert "proj_out_2" in names  # include overrides the default skip list
    assert "proj_out_1" not in names and "not matched" in report.skipped["proj_out_1"]
    assert not any(n.endswith("to_k") for n in names) and "skip pattern" in report.skipped[
        "transformer_blocks.0.attn1.to_k"]
    # with include given, the default skip list does not apply: the embedders (K = 256, 64) are quantized too
    assert "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1" in names


def test_layers_that_do_not_fit_are_reported_and_warned_about():
    """A model mostly left in full precision must not pass silently: quantize warns (UnquantizedLayersWarning)
    with the count and the reasons, and the report lists them; layers the user chose to skip are no cause."""
    from ditq.report import UnquantizedLayersWarning

    t = tiny_dit(attention_head_dim=24)  # inner dim 96: groups of 64 do not divide K = 96
    with pytest.warns(UnquantizedLayersWarning, match=r"ditq.quantize: (\d+) of (\d+) linear layers could not be "
                                                      r"quantized .*group_size 64 does not divide K = 96") as rec:
        report = ditq.quantize(t, QuantConfig.preset("w4a8", group_size=64, act_scheme="dynamic", progress=False))
    # and says which group size would fit (the largest the kernels are built for that divides K)
    assert report.skipped["transformer_blocks.0.attn1.to_q"] == \
        "group_size 64 does not divide K = 96 (group_size 32 would)"
    assert "transformer_blocks.0.ff.net.2" in {lr.name for lr in report.layers}  # K = 384 fits
    unplanned = report.unplanned_skips
    assert "transformer_blocks.0.attn1.to_q" in unplanned and "proj_out_2" not in unplanned  # default skip list
    assert f"{len(unplanned)} of {len(unplanned) + len(report.layers)} linear layers" in str(rec[0].message)

    with warnings.catch_warnings():  # everything the config meant to quantize was: no warning
        warnings.simplefilter("error", UnquantizedLayersWarning)
        report = ditq.quantize(tiny_dit(), QuantConfig.preset("w8a8", act_scheme="dynamic", progress=False,
                                                              skip=["*to_k"]))
    assert report.unplanned_skips == {} and report.unplanned_summary() is None and report.skipped


def test_failures_leave_the_model_untouched(base_pipe, monkeypatch):
    pipe = copy.deepcopy(base_pipe)
    t = pipe.transformer
    state = _state(t)
    with pytest.raises(QuantConfigError):
        ditq.quantize(pipe, {"weight_bits": 4, "group_size": 100})
    with pytest.raises(CalibrationError):
        ditq.quantize(pipe, QuantConfig(progress=False), calib_inputs=dict(class_labels=[5000],
                                                                          num_inference_steps=2))
    assert _same_state(t, state) and not t._forward_hooks and not t._forward_pre_hooks
    with pytest.raises(QuantizeError, match="needs calibration data"):
        ditq.quantize(pipe, QuantConfig(progress=False))
    with pytest.raises(QuantConfigError, match="matches no nn.Linear"):
        ditq.quantize(pipe, QuantConfig(include=["nothing.*"], progress=False), calib_inputs=CALIB)
    # a failure in the middle of the swap restores every layer already swapped
    calls = {"n": 0}
    real = QuantLinear.from_linear.__func__

    def flaky(cls, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("injected failure")
        return real(cls, *a, **k)
    monkeypatch.setattr(QuantLinear, "from_linear", classmethod(flaky))
    with pytest.raises(QuantizeError, match="restored.*injected failure"):
        ditq.quantize(pipe, QuantConfig(progress=False), calib_inputs=CALIB)
    assert calls["n"] == 5
    assert _same_state(t, state)
    x = dit_inputs()
    assert torch.equal(t(**x).sample, base_pipe.transformer(**x).sample)


def test_quantizing_twice_and_nothing_to_quantize():
    t = tiny_dit()
    ditq.quantize(t, QuantConfig(act_scheme="dynamic", progress=False))
    with pytest.raises(QuantizeError, match="already quantized"):
        ditq.quantize(t, QuantConfig(act_scheme="dynamic", progress=False))
    with pytest.raises(QuantizeError, match="no quantizable layer"):
        ditq.quantize(nn.Sequential(nn.Conv2d(3, 3, 3)), QuantConfig(act_scheme="dynamic", progress=False))
    with pytest.raises(QuantizeError, match="no quantizable layer"):
        ditq.quantize(tiny_dit(), QuantConfig(act_scheme="dynamic", skip=["*"], progress=False))
    with pytest.raises(TypeError, match="pipeline with a .transformer or an nn.Module"):
        ditq.quantize(object(), QuantConfig())
    with pytest.raises(QuantizeError, match="not both"):
        ditq.quantize(tiny_dit(), QuantConfig(), calib_inputs={}, calib_fn=lambda m: None)
    with pytest.raises(QuantizeError, match="calib_fn=lambda"):
        ditq.quantize(tiny_dit(), QuantConfig(), calib_inputs={"x": 1})


_PEAK_SCRIPT = r"""
import gc, re, sys, torch, ditq
from torch import nn
def hwm():
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024
out = []
for _ in range(2):  # the first round also pays one-off lazy initialisation
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(16)])  # 64 MiB of fp32
    x = torch.randn(4, 1024)
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS counter to the current RSS
    before = hwm()
    ditq.quantize(model, ditq.QuantConfig.preset("w8a8", progress=False), calib_fn=lambda m: m(x))
    assert type(model[0]).__name__ == "QuantLinear"
    out.append((hwm() - before) / (64 * 2**20))
    del model
    gc.collect()
print(out[-1])
"""


def test_peak_memory_stays_near_the_model_size():
    """Layer-by-layer: the peak during quantize is the model plus its packed weights (int8 = 1/4 of fp32) and a
    one-layer transient (~3 fp32 copies of one weight), far below a second full copy (+100%, +125% with the
    packed weights). Measured as peak RSS in a fresh process; glibc's dynamic mmap threshold would keep freed
    4 MiB blocks resident and blur the count, so large blocks are forced to mmap (MALLOC_MMAP_THRESHOLD_)."""
    import os
    import subprocess
    import sys
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak-RSS counter")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    if res.returncode and "clear_refs" in res.stderr:
        pytest.skip("cannot reset the peak-RSS counter here")
    assert res.returncode == 0, res.stderr[-2000:]
    growth = float(res.stdout.strip().splitlines()[-1])
    assert growth < 0.75, f"peak grew by {growth:.2f}x the model's size during quantize"


def test_freed_memory_goes_back_to_the_os_and_no_original_outlives_quantize(monkeypatch):
    """On the CPU, glibc keeps freed heap pages unless asked (malloc_trim): at real size (DiT-XL/2 in float32,
    benchmarks/real_size.py) RSS peaked 3.1 GiB above the 2.8 GiB model during quantize, and stayed 2.3 GiB above
    the 0.9 GiB quantized model afterwards. quantize hands the pages back after calibration and after each
    layer's swap, and, last, once every original nn.Linear is unreferenced: by that call none may be alive, or
    its float weight would stay resident until quantize returns."""
    import weakref
    import ditq.convert as cv

    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(3)])
    originals = [weakref.ref(m) for m in model]
    x = torch.randn(5, 64)
    calls = []
    monkeypatch.setattr(cv, "release_freed_memory",
                        lambda device: calls.append((torch.device(device).type, sum(r() is not None
                                                                                    for r in originals))))
    report = ditq.quantize(model, QuantConfig.preset("w8a8", progress=False), calib_fn=lambda m: m(x))
    assert len(report.layers) == 3
    assert len(calls) == 1 + 3 + 1, calls  # after calibration, after each of the 3 swaps, at the end
    assert all(dev == "cpu" for dev, _ in calls)
    assert calls[0][1] == 3 and calls[-1] == ("cpu", 0), calls


# ---- what used to go wrong silently ----------------------------------------------------------------------------

def test_a_bare_linear_is_refused_clearly():
    lin = nn.Linear(32, 32)
    w = lin.weight.detach().clone()
    with pytest.raises(QuantizeError, match="bare nn.Linear cannot replace itself.*QuantLinear.from_linear"):
        ditq.quantize(lin, QuantConfig(act_scheme="dynamic", progress=False))
    assert not lin._modules and torch.equal(lin.weight, w)  # no child named "" registered


def test_a_linear_reused_under_two_names_is_quantized_once_and_shared():
    torch.manual_seed(0)
    s = nn.Sequential(nn.Linear(32, 32), nn.ReLU())
    s.extra = s[0]  # the same linear under a second name
    x = torch.randn(4, 32)
    report = ditq.quantize(s, QuantConfig(progress=False), calib_fn=lambda m: m.extra(m(x)))
    assert isinstance(s[0], QuantLinear) and s.extra is s[0]
    assert [lr.name for lr in report.layers] == ["0"] and report.layers[0].aliases == ["extra"]
    assert any("also reachable as extra" in p for p in report.calibration["policy"])
    assert "(also extra)" in str(report)
    # the calibration saw both uses: the scale covers the larger range of the two
    with torch.no_grad():
        second = torch.relu(s[0](x)) if False else None  # noqa: F841 (the layer is quantized now)
    assert report.layers[0].act_scale > 0
    # a skip pattern on either name keeps the shared linear in full precision
    s2 = nn.Sequential(nn.Linear(32, 32))
    s2.extra = s2[0]
    with pytest.raises(QuantizeError, match="no quantizable layer.*other name 'extra'"):
        ditq.quantize(s2, QuantConfig(act_scheme="dynamic", skip=["extra"], progress=False))


def test_an_all_zero_layer_warns_and_stays_in_full_precision():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()  # layer 1 sees only zeros
    x = torch.randn(3, 16)
    with pytest.warns(UserWarning) as rec:
        report = ditq.quantize(model, QuantConfig(progress=False), calib_fn=lambda m: m(x))
    messages = [str(w.message) for w in rec]
    assert any("layer '1' saw only zero activations" in m for m in messages), messages
    assert any("1 of 2 linear layers could not be quantized" in m for m in messages), messages  # the summary
    assert isinstance(model[0], QuantLinear) and isinstance(model[1], nn.Linear)
    assert "all calibration activations were zero" in report.skipped["1"]


# ---- estimators, groups, smoothing, dynamic budget -----------------------------------------------------------

ALL_STEPS = dict(class_labels=[1, 2, 3, 4], num_inference_steps=6, output_type="latent")


def test_estimators_are_reported_per_layer(base_pipe):
    for est in ("max", "mse", "percentile", "auto"):
        pipe = copy.deepcopy(base_pipe)
        cfg = QuantConfig(act_estimator=est, act_percentile=99.9, calibration="all-steps", progress=False)
        report = ditq.quantize(pipe, cfg, calib_inputs=ALL_STEPS)
        used = {lr.act_estimator for lr in report.layers}
        assert used <= {"max", "mse", "percentile"} and (used == {est} or est == "auto")
        assert all(lr.act_sqnr_trajectory > 20 for lr in report.layers)
        if est == "max":
            assert all(lr.act_scale == pytest.approx(max(report.act_absmax_per_step[lr.name].values()) / 127,
                                                     rel=1e-6) for lr in report.layers)
            traj_max = {lr.name: lr.act_sqnr_trajectory for lr in report.layers}
        if est == "auto":  # per layer the least estimated error of the three, so never below max's
            assert all(lr.act_sqnr_trajectory >= traj_max[lr.name] - 1e-9 for lr in report.layers)


def test_dynamic_budget_takes_the_worst_static_layers(base_pipe):
    pipe = copy.deepcopy(base_pipe)
    ref_report = ditq.quantize(copy.deepcopy(base_pipe), QuantConfig(calibration="all-steps", progress=False),
                               calib_inputs=ALL_STEPS)
    worst = sorted(ref_report.layers, key=lambda lr: lr.act_sqnr_trajectory)[:2]
    report = ditq.quantize(pipe, QuantConfig(calibration="all-steps", max_dynamic_layers=2, progress=False),
                           calib_inputs=ALL_STEPS)
    dyn = {lr.name for lr in report.layers if lr.format.endswith("-d")}
    assert dyn == {lr.name for lr in worst}
    assert all(pipe.transformer.get_submodule(n).act_scale is None for n in dyn)
    assert any("dynamic per-token (budget 2)" in p for p in report.calibration["policy"])


def _layer_io(transformer, name, **inputs):
    seen = {}
    layer = transformer.get_submodule(name)
    h = layer.register_forward_hook(lambda m, a, o: seen.update(x=a[0].detach().clone(), y=o.detach().clone()))
    try:
        with torch.no_grad():
            transformer(**inputs)
    finally:
        h.remove()
    return seen["x"], seen["y"]


def test_timestep_grouped_layer_equals_the_per_group_static_reference(base_pipe):
    from ditq.format import WeightFormat
    pipe = copy.deepcopy(base_pipe)
    cfg = QuantConfig.preset("w4a8", group_size=32, calibration="all-steps", timestep_groups=3, progress=False)
    report = ditq.quantize(pipe, cfg, calib_inputs=ALL_STEPS)
    groups = report.calibration["timestep_groups"]
    assert 1 < len(groups) <= 3 and sorted(s for g in groups for s in g["steps"]) == list(range(6))
    t = pipe.transformer
    name = "transformer_blocks.1.ff.net.2"
    lr = report.layer(name)
    assert len(lr.act_scales) == len(groups)
    q = t.get_submodule(name)
    for gi, g in enumerate(groups):  # groups in step order = descending timestep; act_scales ascend
        expect = lr.act_scales[len(groups) - 1 - gi]
        for ts in g["timesteps"]:
            inp = dit_inputs(batch=2, t=int(ts))
            x, y = _layer_io(t, name, **inp)
            assert float(q.act_scale) == expect
            twin = QuantLinear(q.in_features, q.out_features, WeightFormat(4, 32), backend=q.backend)
            can = q.canonical()
            twin.load_canonical(can["qweight"], can["scales"], can["bias"], torch.tensor([expect]))
            with torch.no_grad():
                assert torch.equal(twin(x), y)  # bit-exact: the grouped layer is the static layer of its group
    # the scales differ between groups (otherwise grouping would be pointless on this layer)
    assert len(set(lr.act_scales)) > 1


def test_smoothing_is_folded_and_kept_only_where_it_helps(base_pipe):
    pipe = copy.deepcopy(base_pipe)
    cfg = QuantConfig.preset("w8a8", calibration="all-steps", smooth_alpha=0.5, progress=False)
    report = ditq.quantize(pipe, cfg, calib_inputs=ALL_STEPS)
    sm = report.calibration["smoothing"]
    assert len(sm["sites"]) + len(sm["rejected"]) == 6  # 2 blocks x (attn-in, attn-out, mlp-in)
    for site, info in sm["sites"].items():
        assert info["noise_after"] < info["noise_before"]
        for c in info["consumers"]:
            assert report.layer(c).smoothed == site
    for info in sm["rejected"].values():
        assert info["noise_after"] >= info["noise_before"]


def test_a_failure_after_smoothing_restores_the_float_weights(base_pipe, monkeypatch):
    pipe = copy.deepcopy(base_pipe)
    state = _state(pipe.transformer)

    def boom(*a, **k):
        raise RuntimeError("injected")
    monkeypatch.setattr(QuantLinear, "from_linear", boom)
    with pytest.raises(QuantizeError, match="injected"):
        ditq.quantize(pipe, QuantConfig(calibration="all-steps", smooth_alpha=0.8, progress=False),
                      calib_inputs=ALL_STEPS)
    assert _same_state(pipe.transformer, state)

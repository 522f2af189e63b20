"""Weight rounding methods (rtn / mse / gptq): what each promises, the packed result's contract, quantize's use of
them and their round trip through a checkpoint."""
import json

import pytest
import torch

import ditq
from ditq import QuantConfig
from ditq import weight_rounding as wr
from ditq.convert import QuantizeError
from ditq.format import WeightFormat
from ditq.io import HEADER_NAME
from ditq.nn import QuantLinear, dequantize_weight
from ditq.quant import reference as ref
from tiny_models import dit_inputs, tiny_dit

# Ragged on purpose: odd N, K a multiple of every group size tested but not of a 128-wide tile.
N, K = 37, 192
FORMATS = [("w4g32", WeightFormat(4, 32)), ("w4g64", WeightFormat(4, 64)), ("w8", WeightFormat(8, None))]


def _heavy_tailed_weight(seed, n=N, k=K):
    g = torch.Generator().manual_seed(seed)
    # Student-t-like rows (a normal over a random per-element scale): a few large weights per group, where
    # clipping the absmax pays; a plain uniform weight would leave mse nothing to gain.
    return torch.randn(n, k, generator=g) * torch.rand(n, k, generator=g).pow(3).mul(3).add(0.2) * 0.02


def _correlated_inputs(seed, rows, k=K):
    """Rows from one fixed correlated distribution (the mixing matrix does not depend on ``seed``)."""
    mix = torch.randn(k, k, generator=torch.Generator().manual_seed(1000)) / k ** 0.5
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) @ mix + 0.2 * torch.randn(rows, k, generator=g)
    x[:, 5] *= 10  # one outlier channel, as activations of a DiT carry
    return x


def _dequant(q, s, fmt):
    return ref.dequantize_per_channel(q, s) if fmt.bits == 8 else ref.dequantize_groupwise(q, s, fmt.group_size)


@pytest.mark.parametrize("fid, fmt", FORMATS, ids=[f for f, _ in FORMATS])
@pytest.mark.parametrize("seed", [0, 1])
def test_mse_never_increases_the_weight_error_of_any_group(fid, fmt, seed):
    w = _heavy_tailed_weight(seed)
    g = fmt.group_size or K
    errs = {}
    for m in ("rtn", "mse"):
        q, s = wr.round_weight(w, fmt, m)
        errs[m] = (_dequant(q, s, fmt).double() - w.double()).pow(2).reshape(N, K // g, g).sum(-1)
    assert bool((errs["mse"] <= errs["rtn"] * (1 + 1e-6)).all())
    # and it does gain on heavy tails: much with 7 levels a side, a little with 127
    assert float(errs["mse"].sum()) < (0.95 if fmt.bits == 4 else 1.0) * float(errs["rtn"].sum())


def test_rtn_is_the_reference_quantizer_bit_for_bit():
    w = _heavy_tailed_weight(2)
    q, s = wr.round_weight(w, WeightFormat(4, 32), "rtn")
    q0, s0 = ref.quantize_groupwise(w, 32)
    assert torch.equal(q, q0) and torch.equal(s, s0)
    packed, _ = wr.quantize_weight(w, WeightFormat(4, 32))
    assert torch.equal(packed, ref.pack_int4(q0))


@pytest.mark.parametrize("fid, fmt", FORMATS, ids=[f for f, _ in FORMATS])
def test_gptq_lowers_the_layer_output_error(fid, fmt):
    w = _heavy_tailed_weight(3)
    x_cal, x_new = _correlated_inputs(4, 1024), _correlated_inputs(5, 1024)
    h = x_cal.t() @ x_cal
    err = {}
    for m in ("rtn", "gptq"):
        q, s = wr.round_weight(w, fmt, m, hessian=h)
        wq = _dequant(q, s, fmt)
        err[m] = [float((x @ (w - wq).t()).double().pow(2).sum()) for x in (x_cal, x_new)]
        if m == "gptq":
            assert wr.output_sqnr(w, wq, h) == pytest.approx(
                ref.sqnr(x_cal @ w.t(), x_cal @ wq.t()), abs=0.05)  # the estimate is the measured output SQNR
    # on the inputs it was fitted to, and on fresh inputs from the same distribution
    assert err["gptq"][0] < 0.7 * err["rtn"][0], err
    assert err["gptq"][1] < 0.8 * err["rtn"][1], err


@pytest.mark.parametrize("method", ["mse", "gptq"])
@pytest.mark.parametrize("fid, fmt", FORMATS, ids=[f for f, _ in FORMATS])
def test_packed_result_is_canonical_and_loads(method, fid, fmt):
    w = _heavy_tailed_weight(6) * 5
    x = _correlated_inputs(7, 512)
    h = x.t() @ x
    h[:, 11] = 0  # an input channel that never carried signal
    h[11, :] = 0
    qweight, scales = wr.quantize_weight(w, fmt, method, h)
    shapes = fmt.packed_shapes(N, K)
    assert tuple(qweight.shape) == shapes["qweight"] and tuple(scales.shape) == shapes["scales"]
    assert qweight.dtype == (torch.uint8 if fmt.bits == 4 else torch.int8) and scales.dtype == torch.float32
    q = ref.unpack_int4(qweight) if fmt.bits == 4 else qweight
    assert int(q.abs().max()) <= fmt.qmax and int(q.abs().max()) == fmt.qmax  # in range, and the range is used
    assert bool(torch.isfinite(scales).all()) and bool((scales > 0).all())
    layer = QuantLinear(K, N, fmt, bias=False, act_scheme="dynamic", backend="torch")
    layer.load_canonical(qweight, scales)
    a = torch.randn(3, K)
    expect = a @ dequantize_weight(qweight, scales, fmt).t()
    assert ref.sqnr(expect, layer(a)) > 30  # the layer computes with exactly these weights (int8 activations)


def test_bad_input():
    w = _heavy_tailed_weight(8)
    fmt = WeightFormat(4, 32)
    with pytest.raises(ValueError, match="unknown weight_method"):
        wr.round_weight(w, fmt, "awq")
    with pytest.raises(ValueError, match="needs the layer's input Hessian"):
        wr.round_weight(w, fmt, "gptq")
    with pytest.raises(ValueError, match=r"hessian must be a \[192, 192\]"):
        wr.round_weight(w, fmt, "gptq", hessian=torch.eye(64))
    with pytest.raises(ValueError, match="NaN or inf"):
        wr.round_weight(w.clone().fill_(float("nan")), fmt, "mse")
    with pytest.raises(TypeError, match=r"\[N, K\]"):
        wr.round_weight(w.to(torch.int8), fmt, "mse")


def _calib(inp):
    return lambda m: m(**inp)


@pytest.mark.parametrize("method", ["mse", "gptq"])
def test_quantize_reports_the_method_and_its_gain_and_round_trips(method, tmp_path):
    base = tiny_dit()
    inp = dit_inputs(batch=4)
    outs = {}
    reports = {}
    for m in ("rtn", method):
        t = tiny_dit()
        reports[m] = ditq.quantize(t, QuantConfig.preset("w4a8", group_size=32, weight_method=m, progress=False),
                                   calib_fn=_calib(inp))
        outs[m] = t
    rep = reports[method]
    assert all(lr.weight_method == method and lr.weight_sqnr_rtn is not None for lr in rep.layers)
    assert [lr.weight_sqnr_rtn for lr in rep.layers] == pytest.approx([lr.weight_sqnr for lr in reports["rtn"].layers])
    if method == "mse":
        assert all(lr.weight_sqnr >= lr.weight_sqnr_rtn - 1e-6 for lr in rep.layers)
        assert all(lr.layer_output_sqnr is None for lr in rep.layers)
    else:
        assert all(lr.layer_output_sqnr > lr.layer_output_sqnr_rtn for lr in rep.layers)
    assert rep.output_sqnr > reports["rtn"].output_sqnr
    assert f"weights: {method}: mean weight SQNR" in str(rep)
    # the model-output SQNR is measured on the inputs gptq fitted its weights to: the report says so
    assert ("in-sample for gptq" in str(rep)) == (method == "gptq")
    assert "in-sample" not in str(reports["rtn"])
    assert json.loads(rep.to_json())["layers"][0]["weight_method"] == method
    # the packed weights differ from round-to-nearest's, survive a checkpoint, and the config names the method
    t = outs[method]
    ditq.save_quantized(t, str(tmp_path))
    header = json.load(open(tmp_path / HEADER_NAME))
    assert header["quant_config"]["weight_method"] == method
    loaded = ditq.load_quantized(str(tmp_path))
    with torch.no_grad():
        assert torch.equal(loaded(**inp).sample, t(**inp).sample)
        assert not torch.equal(outs["rtn"](**inp).sample, t(**inp).sample)
    del base


def test_checkpoint_without_weight_method_loads_as_rtn(tmp_path):
    t = tiny_dit()
    inp = dit_inputs()
    ditq.quantize(t, QuantConfig.preset("w4a8", group_size=32, progress=False), calib_fn=_calib(inp))
    ditq.save_quantized(t, str(tmp_path))
    path = tmp_path / HEADER_NAME
    header = json.load(open(path))
    del header["quant_config"]["weight_method"]  # as written before the field existed
    json.dump(header, open(path, "w"))
    loaded = ditq.load_quantized(str(tmp_path))
    assert QuantConfig.from_dict(loaded._ditq_config).weight_method == "rtn"
    with torch.no_grad():
        assert torch.equal(loaded(**inp).sample, t(**inp).sample)


def test_gptq_needs_calibration_data():
    t = tiny_dit()
    with pytest.raises(QuantizeError, match="weight_method='gptq'.*calibration inputs"):
        ditq.quantize(t, QuantConfig.preset("w4a8", act_scheme="dynamic", weight_method="gptq", progress=False))
    assert not any(isinstance(m, QuantLinear) for m in t.modules())


def test_gptq_with_dynamic_activations_uses_the_calibration_inputs():
    t = tiny_dit()
    inp = dit_inputs(batch=4)
    rep = ditq.quantize(t, QuantConfig.preset("w4a8", group_size=32, act_scheme="dynamic", weight_method="gptq",
                                              progress=False), calib_fn=_calib(inp))
    assert all(lr.layer_output_sqnr > lr.layer_output_sqnr_rtn for lr in rep.layers)


def test_gptq_with_smoothing_runs_on_the_smoothed_layers():
    from tiny_models import tiny_dit_pipeline
    pipe = tiny_dit_pipeline()
    rep = ditq.quantize(pipe, QuantConfig.preset("w8a8", weight_method="gptq", calibration="all-steps",
                                                 smooth_alpha=0.5, progress=False),
                        calib_inputs=dict(class_labels=[1, 2, 3, 4], num_inference_steps=3, output_type="latent"))
    smoothed = [lr for lr in rep.layers if lr.smoothed]
    assert smoothed  # kept sites: these layers' Hessians come from the second (smoothed) calibration pass
    assert all(lr.layer_output_sqnr > lr.layer_output_sqnr_rtn for lr in rep.layers)
    assert rep.output_sqnr > 30

"""Integer group scales (``QuantConfig(group_scales="int")``, two-level scales): each int4 group's scale is an
integer multiple q in [1, 16] of a float scale per output channel, held in the same canonical tensors (the scales
are the exact products). Every rounding method keeps to that grid, checkpoints record it and refuse scales that
are not of that form, every backend runs the layers (float scales where the Hopper integer kernels do not run), and
the CUDA and Triton backends hand the kernels the integers (``ditq.format.int_scales_to_kernel``)."""
import pytest
import torch

import ditq
from ditq import QuantConfig, backends
from ditq.config import QuantConfigError
from ditq.format import FormatError, WeightFormat
from ditq.nn import QuantLinear
from ditq.quant import reference as ref
from tiny_models import dit_inputs, tiny_dit

EMULATED = backends.unavailable_reason("cuda-emulated", "cpu") is None
TRITON = backends.unavailable_reason("triton", "cpu") is None


def _cfg(**kw):
    return QuantConfig(weight_bits=4, group_size=32, group_scales="int", progress=False, **kw)


def test_config_and_format_fields():
    assert _cfg().weight_format == WeightFormat(4, 32, group_scales="int")
    assert _cfg().name == "w4g32a8-static-int-scales"
    with pytest.raises(QuantConfigError, match="integer group scales are for 4-bit"):
        QuantConfig(weight_bits=8, group_scales="int")
    with pytest.raises(QuantConfigError, match="group_scales must be one of"):
        QuantConfig(weight_bits=4, group_scales="int8")
    # float (the default) stays out of the dicts, so checkpoints of that kind read as before
    assert "group_scales" not in QuantConfig.preset("w4a8").to_dict()
    assert "group_scales" not in WeightFormat(4, 128).to_dict()
    assert QuantConfig.from_dict(_cfg().to_dict()) == _cfg()
    d = WeightFormat(4, 64, group_scales="int").to_dict()
    assert d["group_scales"] == "int" and WeightFormat.from_dict(d) == WeightFormat(4, 64, group_scales="int")


@pytest.mark.parametrize("method", ["rtn", "mse", "gptq"])
def test_every_rounding_method_keeps_to_the_grid(method):
    """scales = q * c exactly, q in [1, 16], the top group of every row at 16; the weight error stays near the
    float scales' (the same method)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 256, generator=g) * torch.rand(48, 256, generator=g) ** 3 * 2
    w[5] = 0  # an all-zero row
    x = torch.randn(300, 256, generator=g)
    fmt, ffmt = WeightFormat(4, 32, group_scales="int"), WeightFormat(4, 32)
    from ditq import weight_rounding as wr
    q, s = wr.round_weight(w, fmt, method, hessian=x.t() @ x)
    qs, c = fmt.int_group_scales(s)
    assert int(qs.min()) >= 1 and int(qs.max()) == 16 and bool((qs.amax(dim=0) == 16).all())
    assert torch.equal(qs.float() * c, s) and int(q.abs().max()) <= 7
    qf, sf = wr.round_weight(w, ffmt, method, hessian=x.t() @ x)
    err_int = ref.sqnr(w, ref.dequantize_groupwise(q, s, 32))
    err_float = ref.sqnr(w, ref.dequantize_groupwise(qf, sf, 32))
    assert err_float - 0.5 < err_int <= err_float + 0.5, (err_int, err_float)
    with pytest.raises(FormatError, match="not integer group scales"):
        fmt.int_group_scales(sf)  # float scales are not of that form


def test_int_scale_base_makes_products_exact():
    absmax = torch.rand(1000, generator=torch.Generator().manual_seed(1)) * 100 + 1e-6
    c = ref.int_scale_base(absmax)
    assert bool((c >= absmax / 112).all())  # rounded up: the top group still covers the row
    q = torch.arange(1, 17, dtype=torch.float32)[:, None]
    assert torch.equal((q * c).double(), q.double() * c.double())  # every q * c exact in fp32


def _linear(seed=0, n=40, k=192):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
    return lin, torch.randn(2, 7, k, generator=g)


def test_layer_runs_on_every_backend_like_the_reference():
    lin, x = _linear()
    cfg = _cfg(act_scheme="dynamic", backend="torch")
    ref_layer = QuantLinear.from_linear(lin, cfg)
    y_ref = ref_layer(x)
    w_hat = ref.dequantize_groupwise(ref.unpack_int4(ref_layer.canonical()["qweight"]),
                                     ref_layer.canonical()["scales"], 32)
    assert ref.sqnr(lin(x).detach(), y_ref) > 20 and ref.sqnr(lin.weight.detach(), w_hat) > 15
    names = [b for b in ("cuda-emulated",) if EMULATED]
    for name in names:
        from ditq.emulator import emulator_options
        for arch in ("sm_80", "sm_90a"):
            with emulator_options(arch=arch):
                layer = QuantLinear.from_linear(lin, cfg, backend=name)
                assert layer.scales.dtype == torch.int32 and layer.scales.shape == (192 // 32 + 1, 40)
                y = layer(x)
            torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
            assert torch.equal(layer.canonical()["scales"], ref_layer.canonical()["scales"])
    if TRITON:  # the interpreter runs the integer-scale Triton kernel, as an sm_90 GPU does
        layer = QuantLinear.from_linear(lin, cfg, backend="triton")
        assert layer.scales.dtype == torch.int32 and layer.scales.shape == (192 // 32 + 1, 40)
        torch.testing.assert_close(layer(x), y_ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(layer.canonical()["scales"], ref_layer.canonical()["scales"])
        assert torch.equal(layer.canonical()["qweight"], ref_layer.canonical()["qweight"])


def test_corrupted_scales_are_refused():
    lin, _ = _linear(1)
    layer = QuantLinear.from_linear(lin, _cfg(act_scheme="dynamic", backend="torch"))
    can = layer.canonical()
    bad = can["scales"].clone()
    bad[0, 0] = torch.nextafter(bad[0, 0], torch.tensor(1.0))  # one ulp: no longer q * c
    with pytest.raises(ValueError, match="not integer group scales"):
        layer.load_canonical(can["qweight"], bad, can["bias"])


def test_checkpoint_round_trip_and_fused_blocks(tmp_path):
    t = tiny_dit()
    inp = dit_inputs(seed=0)
    ditq.quantize(t, _cfg(backend="torch"), calib_fn=lambda m: m(**inp))
    with torch.no_grad():
        y = t(**inp).sample
    ditq.save_quantized(t, str(tmp_path))
    from ditq.io import read_header
    header = read_header(str(tmp_path))
    fmts = {tuple(sorted(spec["format"].items())) for spec in header["layers"].values()}
    assert all(dict(f)["group_scales"] == "int" for f in fmts)
    assert header["quant_config"]["group_scales"] == "int"
    loaded = ditq.load_quantized(str(tmp_path), backend="torch")
    with torch.no_grad():
        assert torch.equal(loaded(**inp).sample, y)
    if EMULATED:  # the fused blocks on the emulated Hopper kernels: the integer path end to end
        from ditq.emulator import emulator_options
        with emulator_options(arch="sm_90a", race_check=False):
            fused = ditq.load_quantized(str(tmp_path), backend="cuda-emulated")
            from ditq.blocks import fuse_blocks
            fuse_blocks(fused)
            assert all(m.scales.dtype == torch.int32 for m in fused.modules() if isinstance(m, QuantLinear))
            with torch.no_grad():
                y_fused = fused(**inp).sample
        assert ref.sqnr(y, y_fused) > 60
    if TRITON:  # the fused blocks on the interpreted Triton kernels (INT_SCALES), as an sm_90 GPU runs them
        from ditq.blocks import fuse_blocks
        fused = ditq.load_quantized(str(tmp_path), backend="triton")
        fuse_blocks(fused)
        assert all(m.scales.dtype == torch.int32 for m in fused.modules() if isinstance(m, QuantLinear))
        with torch.no_grad():
            assert ref.sqnr(y, fused(**inp).sample) > 60

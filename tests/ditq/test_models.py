"""The model families on CPU: DiT (pipeline), PixArt, SD3 and Flux (transformer level), on every
backend that runs on CPU here (others are skipped with the reason)."""
import copy

import pytest
import torch

import ditq
from ditq import QuantConfig
from ditq.backends import BACKEND_NAMES, unavailable_reason
from ditq.nn import QuantLinear
from tiny_models import FAMILIES as MODELS
from tiny_models import tiny_dit_pipeline

CPU_BACKENDS = [n for n in BACKEND_NAMES if n != "cuda"]


def _backend(name):
    why = unavailable_reason(name, "cpu")
    if why is not None:
        pytest.skip(f"backend {name!r} is not available on CPU: {why}")
    return name




def _out(o):
    return o.sample if hasattr(o, "sample") else o[0]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
# the SD3.5-like models are SD3 with q/k RMSNorms (SD3.5-medium's: and a second self-attention, linears of the
# same kinds): the same layers to quantize, so they are left out here (their fused projections and blocks are
# tested in test_fuse, test_blocks and test_blocks_joint)
@pytest.mark.parametrize("family", sorted(set(MODELS) - {"sd35", "sd35m"}))
@pytest.mark.parametrize("preset", ["w8a8", "w4a8"])
def test_transformer_families(family, preset, backend, tmp_path):
    backend = _backend(backend)
    model, inp = MODELS[family]()
    with torch.no_grad():
        ref = _out(model(**inp))
    cfg = QuantConfig.preset(preset, backend=backend, progress=False,
                             **({"group_size": 32} if preset == "w4a8" else {}))
    report = ditq.quantize(model, cfg, calib_fn=lambda m: m(**inp))
    assert report.backend == backend and len(report.layers) >= 8
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    with torch.no_grad():
        out = _out(model(**inp))
    # Same bounds as test_convert (per-layer int8 ~38 dB / int4 ~23 dB, at most ~13 dB lost over the layers);
    # the output here is the calibration input itself, so it is also the report's number.
    floor = 25.0 if preset == "w8a8" else 10.0
    assert ditq.sqnr(ref, out) > floor and report.output_sqnr == pytest.approx(ditq.sqnr(ref, out))
    ditq.save_quantized(model, str(tmp_path))
    loaded = ditq.load_quantized(str(tmp_path), backend=backend)
    with torch.no_grad():
        assert torch.equal(_out(loaded(**inp)), out)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dit_pipeline_end_to_end(backend, tmp_path):
    """The README's snippet on DiTPipeline: quantize with first-step calibration, generate, save, load."""
    backend = _backend(backend)
    pipe = tiny_dit_pipeline()
    ref_pipe = copy.deepcopy(pipe)
    cfg = QuantConfig(weight_bits=4, group_size=32, act_bits=8, act_scheme="static", calibration="first-step",
                      backend=backend, progress=False)
    report = ditq.quantize(pipe, cfg, calib_inputs=dict(class_labels=[1, 2, 3, 4], num_inference_steps=4))
    assert report.calibration["calls_per_run"] == [1]
    run = dict(class_labels=[5, 6], num_inference_steps=4, output_type="np")
    a = ref_pipe(**run, generator=torch.Generator().manual_seed(0)).images
    b = pipe(**run, generator=torch.Generator().manual_seed(0)).images
    assert ditq.sqnr(torch.from_numpy(a), torch.from_numpy(b)) > 10.0  # images after 4 steps + VAE decode
    ditq.save_quantized(pipe, str(tmp_path))
    loaded = ditq.load_quantized(str(tmp_path), backend=backend)
    c = loaded(**run, generator=torch.Generator().manual_seed(0)).images
    assert (b == c).all()

"""DiT families beyond the fused four (Wan, Qwen-Image, Sana, Chroma, FLUX.2, LTX-Video, CogVideoX, Lumina2,
AuraFlow, HunyuanVideo, Z-Image) through the generic path: quantize, run, save and load, and the default skip list
doing the same job in each (the output layer, the timestep MLP and the text projections stay in full precision,
whatever the model calls them)."""
import copy

import pytest
import torch

import ditq
from ditq import QuantConfig
from ditq.backends import BACKEND_NAMES, unavailable_reason
from ditq.convert import DEFAULT_SKIP, QuantizeError, _match, _output_tensor
from ditq.nn import QuantLinear
from ditq.timestep_groups import timestep_of
from tiny_models import MORE_FAMILIES, tiny_sd3

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # diffusers' FluxPosEmbed deprecation (Chroma)


def _out(o):
    return _output_tensor(o)


def _linear_call_order(model, inp):
    """Names of the model's nn.Linear layers in the order one forward runs them."""
    order = []
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: order.append(n))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad():
            model(**inp)
    finally:
        for h in hooks:
            h.remove()
    return order


@pytest.mark.parametrize("preset", ["w8a8", "w4a8"])
@pytest.mark.parametrize("family", sorted(MORE_FAMILIES))
def test_family_quantizes_runs_saves_and_loads(family, preset, tmp_path):
    model, inp = MORE_FAMILIES[family]()
    with torch.no_grad():
        ref = _out(model(**inp)).clone()
    last = _linear_call_order(model, inp)[-1]  # the output projection: it writes the prediction
    cfg = QuantConfig.preset(preset, backend="torch", progress=False,
                             **({"group_size": 32} if preset == "w4a8" else {}))
    report = ditq.quantize(model, cfg, calib_fn=lambda m: m(**inp))
    assert len(report.layers) >= 15
    assert isinstance(model.get_submodule(last), torch.nn.Linear), f"{last} (the output layer) was quantized"
    assert report.skipped[last].startswith("default skip list")
    with torch.no_grad():
        out = _out(model(**inp)).clone()
    floor = 30.0 if preset == "w8a8" else 15.0
    assert ditq.sqnr(ref, out) > floor and report.output_sqnr == pytest.approx(ditq.sqnr(ref, out))
    ditq.save_quantized(model, str(tmp_path))
    loaded = ditq.load_quantized(str(tmp_path), backend="torch")
    assert type(loaded) is type(model)
    with torch.no_grad():
        assert torch.equal(_out(loaded(**inp)), out)


# Per family, layers the default list keeps in full precision, and a fragment of the reason it gives: the
# names differ from family to family, the jobs do not.
KEPT = {
    "wan": {"condition_embedder.time_embedder.linear_1": "_keep_in_fp32_modules",
            "condition_embedder.text_embedder.linear_1": "pooled text-encoder", "proj_out": "output layer"},
    "cogvideox": {"time_embedding.linear_2": "inside a TimestepEmbedding", "patch_embed.text_proj": "text-encoder"},
    "auraflow": {"time_step_proj.linear_1": "inside a TimestepEmbedding", "context_embedder": "text-encoder"},
    "lumina2": {"norm_out.linear_1": "final adaLN", "norm_out.linear_2": "output layer itself",
                "time_caption_embed.caption_embedder.1": "text-encoder",
                "time_caption_embed.timestep_embedder.linear_1": "timestep embedding MLP"},
    "zimage": {"t_embedder.mlp.0": "inside a TimestepEmbedder", "all_final_layer.2-1.linear": "output layer",
               "all_final_layer.2-1.adaLN_modulation.1": "final adaLN", "cap_embedder.1": "text-encoder"},
    "hunyuanvideo": {"context_embedder.token_refiner.refiner_blocks.0.attn.to_q": "token refiner",
                     "time_text_embed.text_embedder.linear_1": "pooled text-encoder"},
    "qwenimage": {"txt_in": "text-encoder", "time_text_embed.timestep_embedder.linear_2": "timestep"},
    "sana": {"caption_projection.linear_1": "text-encoder"},
}


@pytest.mark.parametrize("family", sorted(KEPT))
def test_default_skip_list_keeps_each_family_s_output_timestep_and_text_layers(family):
    model, inp = MORE_FAMILIES[family]()
    layers, skipped = ditq.convert.select_layers(model, QuantConfig.preset("w8a8"))
    for name, why in KEPT[family].items():
        assert name not in layers and why in skipped[name], (name, skipped.get(name))
    # include overrides the default list, the model's own keep-in-float32 list and the class rule included
    layers, _ = ditq.convert.select_layers(model, QuantConfig.preset("w8a8", include=list(KEPT[family])))
    assert set(layers) == set(KEPT[family])


def test_text_embedder_patterns_match_whole_names_only():
    # fnmatch's "*" crosses dots: "*text_embedder*" also matched every layer under "context_embedder"
    assert _match("time_text_embed.text_embedder.linear_1", DEFAULT_SKIP) == "*.text_embedder*"
    assert _match("text_embedder.linear_1", DEFAULT_SKIP) == "text_embedder*"
    assert _match("context_embedder.token_refiner.refiner_blocks.0.attn.to_q", DEFAULT_SKIP) == "context_embedder.*"
    assert _match("blocks.0.context_embedder_proj", DEFAULT_SKIP) is None


def test_a_layer_the_model_reads_the_weight_of_fails_clearly_and_restores_the_model():
    """Wan's forward reads its time embedder's parameters' dtype; forced into int8 by ``include``, the check run
    fails, ``quantize`` says why and what to do, and the model is as it was."""
    model, inp = MORE_FAMILIES["wan"]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = _out(model(**inp)).clone()
    cfg = QuantConfig.preset("w8a8", backend="torch", progress=False, include=["*"])
    with pytest.raises(QuantizeError, match=r"StopIteration\).*`\.weight` or `parameters\(\)`.*skip=") as e:
        ditq.quantize(model, cfg, calib_fn=lambda m: m(**inp))
    assert isinstance(e.value.__cause__, StopIteration)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(_out(model(**inp)), ref)


def _at(inp, name, t):
    return {**inp, name: torch.tensor([t], dtype=inp[name].dtype)}


@pytest.mark.parametrize("family,name,ts", [
    ("zimage", "t", [0.0, 0.3, 0.6, 0.95]),    # Z-Image: ``t``, rising from noise (0) to clean (1)
    ("wan", "timestep", [999, 700, 400, 50]),   # diffusers' ``timestep``, falling
])
def test_timestep_groups_key_on_the_model_s_timestep_argument(family, name, ts):
    model, inp = MORE_FAMILIES[family]()
    cfg = QuantConfig.preset("w8a8", backend="torch", progress=False, calibration="all-steps", timestep_groups=2,
                             fuse=True)
    report = ditq.quantize(model, cfg, calib_fn=lambda m: [m(**_at(inp, name, t)) for t in ts])
    layers = model._ditq_grouped_layers
    assert layers
    bounds = layers[0].timestep_bounds
    assert bounds.numel() == 1 and min(ts) < float(bounds[0]) < max(ts)
    # the first step's (noisiest) scale sits where the first step's timestep falls, rising or falling
    first = int(torch.bucketize(torch.tensor([float(ts[0])]), bounds))
    grouped = [lr for lr in report.layers if lr.act_scales is not None]
    assert len(grouped) == len(layers)
    assert all(lr.act_scales[first] == pytest.approx(lr.act_scale, rel=1e-6) for lr in grouped)
    assert any(lr.act_scales[0] != pytest.approx(lr.act_scales[1], rel=1e-3) for lr in grouped)
    seen = set()
    for t in ts:  # the pre-hook picks each call's group from the argument, whatever the forward names it
        with torch.no_grad():
            model(**_at(inp, name, t))
        group = int(torch.bucketize(torch.tensor([float(t)]), bounds))
        assert all(torch.equal(layer.act_scale, layer.act_scales[group:group + 1]) for layer in layers)
        seen.add(group)
    assert seen == {0, 1}


def test_a_positional_timestep_is_read_by_its_name_in_the_forward():
    """SD3's forward takes (hidden_states, encoder_hidden_states, pooled_projections, timestep): a positional call
    must key the groups on its 4th argument (reading position 1 took the first text feature for a timestep)."""
    model, inp = tiny_sd3()
    args = [inp["hidden_states"], inp["encoder_hidden_states"], inp["pooled_projections"]]
    t = torch.tensor([600, 600])
    assert timestep_of(model, (*args, t), {}) is t
    assert timestep_of(model, tuple(args), {"timestep": t}) is t
    assert timestep_of(model, tuple(args), {}) is None
    assert timestep_of(torch.nn.Linear(2, 2), (torch.zeros(2),), {}) is None  # no timestep parameter at all
    ts = [999, 700, 400, 50]
    cfg = QuantConfig.preset("w8a8", backend="torch", progress=False, calibration="all-steps", timestep_groups=2)
    ditq.quantize(model, cfg, calib_fn=lambda m: [m(*args, torch.tensor([s, s])) for s in ts])
    bounds = model._ditq_grouped_layers[0].timestep_bounds
    assert 50 < float(bounds[0]) < 999


def test_output_tensor_of_list_predictions_weighs_every_image():
    a, b = torch.randn(4, 2, 3), torch.randn(4, 1, 5)

    class Out:
        sample = [a, b]

    assert torch.equal(_output_tensor(Out()), torch.cat([a.reshape(-1), b.reshape(-1)]))
    assert torch.equal(_output_tensor(([a, b],)), torch.cat([a.reshape(-1), b.reshape(-1)]))
    assert _output_tensor((a, b)) is a and _output_tensor({"x": b}) is b
    with pytest.raises(QuantizeError, match="cannot find a tensor"):
        _output_tensor(("text",))


@pytest.mark.parametrize("backend", [n for n in BACKEND_NAMES if n not in ("cuda", "torch")])
def test_a_video_family_on_every_cpu_backend(backend):
    """Wan (5-D video latents, cross-attention, the model's own keep-in-float32 list) on the kernel backends: the
    same integers as the torch reference backend."""
    why = unavailable_reason(backend, "cpu")
    if why is not None:
        pytest.skip(f"backend {backend!r} is not available on CPU: {why}")
    model, inp = MORE_FAMILIES["wan"]()
    outs = {}
    for b in ("torch", backend):
        m = copy.deepcopy(model)
        ditq.quantize(m, QuantConfig.preset("w4a8", backend=b, progress=False, group_size=32),
                      calib_fn=lambda mm: mm(**inp))
        with torch.no_grad():
            outs[b] = _out(m(**inp))
    assert ditq.sqnr(outs["torch"], outs[backend]) > 60.0

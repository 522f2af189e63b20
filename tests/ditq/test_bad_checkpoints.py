"""Checkpoints a hostile user can hand ditq: missing tensors, truncated or garbage files, headers with missing or
mistyped fields, class names outside diffusers / ditq, and torch_dtype on load. Every one must be refused with a
CheckpointError (a ValueError) naming the file and the field or tensor, through ditq.load_quantized and through
diffusers' from_pretrained."""
import json
import math
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import ditq
from ditq import QuantConfig
from ditq import io as dio
from ditq.io import HEADER_NAME, WEIGHTS_NAME, CheckpointError
from ditq.nn import QuantLinear
from tiny_models import dit_inputs, tiny_dit, tiny_dit_pipeline

LAYER = "transformer_blocks.0.attn1.to_q"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A quantized tiny DiT (static W4A8, groups of 32) saved once; each test copies it before damaging it."""
    t = tiny_dit()
    inp = dit_inputs()
    ditq.quantize(t, QuantConfig.preset("w4a8", group_size=32, progress=False), calib_fn=lambda m: m(**inp))
    path = str(tmp_path_factory.mktemp("bad") / "good")
    ditq.save_quantized(t, path)
    return path


@pytest.fixture
def ckpt(saved, tmp_path):
    path = str(tmp_path / "ckpt")
    shutil.copytree(saved, path)
    return path


def _rewrite_weights(path, edit):
    f = os.path.join(path, WEIGHTS_NAME)
    sd = load_file(f)
    edit(sd)
    save_file(sd, f, metadata={"format": "pt"})


def _edit_header(path, edit):
    """Apply ``edit`` to both copies of the header: ditq_quant.json (ditq.load_quantized) and config.json's
    quantization_config (diffusers' from_pretrained)."""
    h = os.path.join(path, HEADER_NAME)
    header = json.load(open(h))
    edit(header)
    json.dump(header, open(h, "w"))
    c = os.path.join(path, "config.json")
    config = json.load(open(c))
    edit(config["quantization_config"])
    json.dump(config, open(c, "w"))


def _from_pretrained(path, **kw):
    pytest.importorskip("accelerate", reason="diffusers loads quantized models only with accelerate")
    from diffusers import DiTTransformer2DModel
    return DiTTransformer2DModel.from_pretrained(path, **kw)


LOADERS = {"load_quantized": ditq.load_quantized, "from_pretrained": _from_pretrained}


# ---- missing tensors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize("tensor", ["act_scale", "qweight", "scales", "bias"])
def test_missing_layer_tensor_names_layer_and_tensor(ckpt, loader, tensor):
    _rewrite_weights(ckpt, lambda sd: sd.pop(f"{LAYER}.{tensor}"))
    with pytest.raises(CheckpointError) as e:
        LOADERS[loader](ckpt)
    msg = str(e.value)
    assert WEIGHTS_NAME in msg and repr(LAYER) in msg and repr(tensor) in msg, msg


def test_from_pretrained_missing_tensor_caught_after_loading_too(ckpt, monkeypatch):
    """If diffusers stops calling maybe_update_loaded_keys (where the file is checked up front), the check after
    loading still refuses a layer left with a placeholder tensor."""
    from diffusers.quantizers import auto
    from diffusers.quantizers.base import DiffusersQuantizer
    monkeypatch.setattr(auto.AUTO_QUANTIZER_MAPPING["ditq"], "maybe_update_loaded_keys",
                        DiffusersQuantizer.maybe_update_loaded_keys)
    _rewrite_weights(ckpt, lambda sd: sd.pop(f"{LAYER}.act_scale"))
    with pytest.raises(CheckpointError, match=rf"layer '{LAYER}' has no 'act_scale' tensor"):
        _from_pretrained(ckpt)


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_wrong_tensor_shape_or_dtype(ckpt, loader):
    _rewrite_weights(ckpt, lambda sd: sd.update({f"{LAYER}.scales": sd[f"{LAYER}.scales"][:1].clone()}))
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_NAME}: layer '{LAYER}' tensor 'scales' is F32 \[1, 64\]"):
        LOADERS[loader](ckpt)
    _rewrite_weights(ckpt, lambda sd: sd.update({f"{LAYER}.scales": torch.ones(2, 64, dtype=torch.float16)}))
    with pytest.raises(CheckpointError, match=rf"layer '{LAYER}' tensor 'scales' is F16 \[2, 64\]"):
        LOADERS[loader](ckpt)


def test_nan_scales_are_refused_on_load(ckpt):
    """Value checks live in QuantLinear.load_canonical; the loader turns them into a CheckpointError that names
    the weights file and the layer."""
    def poison(sd):
        sd[f"{LAYER}.scales"][0, 3] = math.nan
    _rewrite_weights(ckpt, poison)
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_NAME}: {LAYER}: .*scales"):
        ditq.load_quantized(ckpt)


# ---- corrupt files -------------------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [0.5, 0.999, 12, 3])
def test_truncated_weights_file(ckpt, keep):
    f = os.path.join(ckpt, WEIGHTS_NAME)
    data = open(f, "rb").read()
    n = int(len(data) * keep) if keep < 1 else keep
    open(f, "wb").write(data[:n])
    with pytest.raises(CheckpointError, match=f"{f} is corrupt"):
        dio.read_weights_index(f)
    with pytest.raises(CheckpointError, match=f"{f} is corrupt"):
        ditq.load_quantized(ckpt)


def test_appended_bytes_and_garbage(ckpt):
    f = os.path.join(ckpt, WEIGHTS_NAME)
    good = open(f, "rb").read()
    open(f, "ab").write(b"\0" * 8)
    with pytest.raises(CheckpointError, match=f"{f} is corrupt"):
        ditq.load_quantized(ckpt)
    open(f, "wb").write(b"this is not a safetensors file at all")
    with pytest.raises(CheckpointError, match=f"{f} is corrupt"):
        ditq.load_quantized(ckpt)
    open(f, "wb").write(good)
    assert dio.read_weights_index(f)[f"{LAYER}.qweight"] == ("U8", (64, 32), 64 * 32)
    os.remove(f)
    with pytest.raises(CheckpointError, match=f"{f} is missing"):
        ditq.load_quantized(ckpt)


@pytest.mark.parametrize("text", ["{not json", "", "\xff\xfe"])
def test_header_not_json_names_file(ckpt, text):
    h = os.path.join(ckpt, HEADER_NAME)
    open(h, "w", encoding="latin-1").write(text)
    with pytest.raises(CheckpointError, match=f"{h} is not readable JSON"):
        ditq.load_quantized(ckpt)


# ---- header fields -------------------------------------------------------------------------------------

def _set(path, value):
    def edit(header):
        d = header
        for k in path[:-1]:
            d = d[k]
        if value is _DEL:
            del d[path[-1]]
        else:
            d[path[-1]] = value
    return edit


class _Deleted:
    """Marks a header field to delete; a stable repr keeps the test ids equal across pytest-xdist workers."""

    def __repr__(self):
        return "<deleted>"


_DEL = _Deleted()
L = ("layers", LAYER)
BAD_FIELDS = [
    (("quant_config",), _DEL, "'quant_config' is missing"),
    (("quant_config",), "w4a8", "'quant_config' must be an object"),
    (("quant_config", "act_scheme"), "sometimes", "'quant_config': act_scheme must be one of"),
    (("model_class",), _DEL, "'model_class' is missing"),
    (("model_class",), 42, "'model_class' must be a dotted class name"),
    (("layers",), ["x"], "'layers' must be an object"),
    (L, "to_q", f"'layers.{LAYER}' must be an object"),
    (L + ("in_features",), _DEL, f"'layers.{LAYER}.in_features' is missing"),
    (L + ("in_features",), "64", f"'layers.{LAYER}.in_features' must be a positive int"),
    (L + ("out_features",), -1, f"'layers.{LAYER}.out_features' must be a positive int"),
    (L + ("bias",), "yes", f"'layers.{LAYER}.bias' must be true or false"),
    (L + ("bias_dtype",), "os", f"'layers.{LAYER}.bias_dtype' must be one of"),
    (L + ("format",), None, f"'layers.{LAYER}.format' must be an object"),
    (L + ("format", "bits"), "4", f"'layers.{LAYER}.format.bits' must be an int"),
    (L + ("format", "group_size"), 48, f"'layers.{LAYER}.format': group_size must be"),
    (L + ("format", "colour"), "red", f"'layers.{LAYER}.format': unknown weight-format fields"),
    (L + ("act_scheme",), "static-ish", f"'layers.{LAYER}.act_scheme' must be 'static' or 'dynamic'"),
    (L + ("act_scale",), None, f"'layers.{LAYER}.act_scale' must be a positive finite number"),
    (L + ("act_scale",), float("nan"), f"'layers.{LAYER}.act_scale' must be a positive finite number"),
    (L + ("act_scale",), -0.5, f"'layers.{LAYER}.act_scale' must be a positive finite number"),
    (("non_persistent_buffers",), {"pos_embed.pos_embed": "os"}, "'non_persistent_buffers.pos_embed.pos_embed'"),
    (("model_config",), "DiT", "'model_config' must be an object"),
    (("smoothed",), {"transformer_blocks.0.attn1.to_q": "site"}, "'smoothed' must be an object (layer -> [smoothing"),
]


# config.json's quantization_config carries no model_config (config.json itself is the model's config).
CASES = [(loader, *case) for case in BAD_FIELDS for loader in sorted(LOADERS)
         if not (loader == "from_pretrained" and case[0] == ("model_config",))]


@pytest.mark.parametrize("loader,path,value,needle", CASES,
                         ids=[f"{c[0]}-{'.'.join(c[1])}={c[2]!r}"[:70] for c in CASES])
def test_bad_header_field_names_file_and_field(ckpt, loader, path, value, needle):
    _edit_header(ckpt, _set(path, value))
    with pytest.raises(CheckpointError) as e:
        LOADERS[loader](ckpt)
    msg = str(e.value)
    where = HEADER_NAME if loader == "load_quantized" else "config.json"
    assert os.path.join(ckpt, where) in msg and needle in msg, msg
    assert "\n" not in msg


@pytest.fixture
def canary(tmp_path, monkeypatch):
    """An importable module that records being imported: a checkpoint naming it must not get it imported."""
    mod = tmp_path / "ditq_test_canary_mod.py"
    marker = tmp_path / "imported"
    mod.write_text(f"open({str(marker)!r}, 'w').write('x')\nclass Model:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield marker
    sys.modules.pop("ditq_test_canary_mod", None)


@pytest.mark.parametrize("name", ["ditq_test_canary_mod.Model", "diffusers_test_canary.Model", "os.system",
                                  "diffusers", "diffusers..DiTTransformer2DModel", "ditq.io.os"])
def test_model_class_outside_diffusers_is_never_imported(ckpt, canary, name):
    _edit_header(ckpt, _set(("model_class",), name))
    with pytest.raises(CheckpointError, match=rf"{HEADER_NAME}: field 'model_class'"):
        ditq.load_quantized(ckpt)
    assert not canary.exists() and "ditq_test_canary_mod" not in sys.modules


def test_model_class_not_a_model(ckpt):
    _edit_header(ckpt, _set(("model_class",), "ditq.QuantConfig"))
    with pytest.raises(CheckpointError, match="field 'model_class' names 'ditq.QuantConfig', which is not a Module"):
        ditq.load_quantized(ckpt)


@pytest.fixture(scope="module")
def saved_pipe(tmp_path_factory):
    pipe = tiny_dit_pipeline()
    ditq.quantize(pipe, QuantConfig.preset("w8a8", progress=False),
                  calib_inputs=dict(class_labels=[1, 2], num_inference_steps=2))
    path = str(tmp_path_factory.mktemp("pipe") / "pipe")
    ditq.save_quantized(pipe, path)
    return path


def test_pipeline_class_outside_diffusers_is_never_imported(saved_pipe, tmp_path, canary):
    path = str(tmp_path / "p")
    shutil.copytree(saved_pipe, path)
    _edit_header(os.path.join(path, "transformer"), _set(("pipeline_class",), "ditq_test_canary_mod.Model"))
    with pytest.raises(CheckpointError, match=r"transformer/ditq_quant.json: field 'pipeline_class' names "
                                              r"'ditq_test_canary_mod.Model', outside diffusers / ditq"):
        ditq.load_quantized(path)
    assert not canary.exists()


# ---- torch_dtype ---------------------------------------------------------------------------------------

def test_pipeline_torch_dtype_applies_to_the_transformer(saved_pipe):
    pipe = ditq.load_quantized(saved_pipe, torch_dtype=torch.bfloat16)
    t = pipe.transformer
    assert pipe.vae.dtype == torch.bfloat16
    q = t.transformer_blocks[0].attn1.to_q
    assert isinstance(q, QuantLinear)
    assert q.bias.dtype == torch.bfloat16 and q.scales.dtype == torch.float32 and q.act_scale.dtype == torch.float32
    assert t.proj_out_2.weight.dtype == torch.bfloat16  # a layer left unquantized follows the dtype
    assert t.pos_embed.pos_embed.dtype == torch.bfloat16
    images = pipe(class_labels=[3], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="pt").images
    assert images.dtype == torch.bfloat16 and bool(torch.isfinite(images.float()).all())


def test_transformer_torch_dtype_and_bad_kwargs(saved):
    t = ditq.load_quantized(saved, torch_dtype=torch.float16)
    assert t.proj_out_2.weight.dtype == torch.float16
    assert t.transformer_blocks[1].ff.net[2].scales.dtype == torch.float32
    with pytest.raises(TypeError, match="must be a floating torch.dtype"):
        ditq.load_quantized(saved, torch_dtype="bf16")
    with pytest.raises(TypeError, match=r"takes only torch_dtype .* got \['variant'\]"):
        ditq.load_quantized(saved, variant="fp16")

"""Save and load quantized transformers and pipelines.

On disk (a pipeline; a bare transformer is the ``transformer/`` folder alone)::

    path/model_index.json, scheduler/, vae/, ...   pipe.save_pretrained for everything but the transformer
    path/transformer/config.json                   the diffusers config + "quantization_config" (quant_method "ditq")
    path/transformer/diffusion_pytorch_model.safetensors
                                                   the transformer's state dict; QuantLinear tensors in the
                                                   *canonical* layout (ditq.format), never a backend's layout
    path/transformer/ditq_quant.json               the header: ditq version, layout name + version, QuantConfig,
                                                   per-layer formats and static activation scales, the model class
                                                   and config, the pipeline class

The file names are diffusers', so that after ``import ditq`` a checkpoint also loads through
``<ModelClass>.from_pretrained(path / "transformer")`` (see :mod:`ditq.diffusers_integration`).

Loading builds the model with every *parameter* on the meta device (``_params_on_meta``: buffers such as
positional embeddings are computed for real; no full-precision linear weight is ever filled), swaps in
:class:`ditq.nn.QuantLinear` placeholders from the header, then assigns the saved tensors. A checkpoint whose
layout version differs from this ditq's is refused with both versions named.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
from typing import Optional

import torch
from torch import nn

from .config import QuantConfig
from .convert import _target, is_quantized
from .format import LAYOUT, LAYOUT_VERSION, FormatError, WeightFormat
from .nn import QuantLinear

HEADER_NAME = "ditq_quant.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
QUANT_METHOD = "ditq"


class CheckpointError(ValueError):
    """A ditq checkpoint that this ditq cannot read (missing files, another layout version, ...)."""


def _qualname(obj_or_cls) -> str:
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    return f"{cls.__module__}.{cls.__qualname__}"


def _import(qualname: str):
    module, _, name = qualname.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise CheckpointError(f"cannot import {qualname!r} named by the checkpoint: {e}") from e


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def build_header(transformer: nn.Module) -> dict:
    """The JSON header describing a quantized transformer (see the module docstring)."""
    from . import __version__
    layers = {}
    for name, m in transformer.named_modules():
        if isinstance(m, QuantLinear):
            layers[name] = {"in_features": m.in_features, "out_features": m.out_features,
                            "bias": m.bias is not None,
                            "bias_dtype": _dtype_name(m.bias.dtype) if m.bias is not None else None,
                            "format": m.fmt.to_dict(), "act_scheme": m.act_scheme,
                            "act_scale": None if m.act_scale is None else float(m.act_scale)}
    persistent = set(transformer.state_dict().keys())
    non_persistent = {n: _dtype_name(b.dtype) for n, b in transformer.named_buffers()
                      if n not in persistent and b is not None}
    config = json.loads(transformer.to_json_string()) if hasattr(transformer, "to_json_string") else None
    return {"ditq_version": __version__, "layout": LAYOUT, "layout_version": LAYOUT_VERSION,
            "quant_config": transformer._ditq_config, "model_class": _qualname(transformer),
            "model_config": config, "non_persistent_buffers": non_persistent, "layers": layers}


def check_header(header: dict, where: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` unless this ditq can read a checkpoint with this header."""
    if not isinstance(header, dict) or "layout_version" not in header or "layers" not in header:
        raise CheckpointError(f"{where}: not a ditq checkpoint header (no layout_version / layers)")
    if header.get("layout") != LAYOUT or header.get("layout_version") != LAYOUT_VERSION:
        raise CheckpointError(
            f"{where} was written with weight layout {header.get('layout')!r} version "
            f"{header.get('layout_version')} (ditq {header.get('ditq_version')}), but this ditq reads layout "
            f"{LAYOUT!r} version {LAYOUT_VERSION}: re-quantize the model or install the ditq that wrote it")
    try:
        for spec in header["layers"].values():
            WeightFormat.from_dict(spec["format"])
        QuantConfig.from_dict(header["quant_config"])
    except (FormatError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{where}: invalid ditq header: {e}") from e


# ---- meta-device construction ------------------------------------------------------------------------

@contextlib.contextmanager
def _params_on_meta():
    """Every parameter registered inside goes to the meta device (buffers stay real): the model's
    full-precision weights are never allocated with values. (The same trick as accelerate's
    ``init_empty_weights(include_buffers=False)``, without depending on accelerate.)"""
    original = nn.Module.register_parameter

    def register_parameter(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def install_quant_linears(model: nn.Module, header: dict, backend: str) -> None:
    """Replace each linear named in ``header["layers"]`` by an empty meta-device QuantLinear."""
    for name, spec in header["layers"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"the checkpoint quantized {name!r}, which this {type(model).__name__} lacks")
        if not isinstance(old, nn.Linear) or (old.in_features, old.out_features) != \
                (spec["in_features"], spec["out_features"]):
            raise CheckpointError(f"{name}: the model has {old!r}, the checkpoint a "
                                  f"{spec['in_features']}->{spec['out_features']} linear")
        q = QuantLinear(spec["in_features"], spec["out_features"], WeightFormat.from_dict(spec["format"]),
                        bias=spec["bias"], act_scheme=spec["act_scheme"], backend=backend, device="meta",
                        bias_dtype=getattr(torch, spec["bias_dtype"] or "float32"))
        path, _, attr = name.rpartition(".")
        setattr(model.get_submodule(path) if path else model, attr, q)


def finish_load(model: nn.Module, header: dict, device) -> nn.Module:
    """After tensors are in place: move to ``device``, restore buffer dtypes, mark as quantized, eval mode."""
    model.to(device)
    buffers = dict(model.named_buffers())
    for name, dt in header.get("non_persistent_buffers", {}).items():
        b = buffers.get(name)
        if b is not None and b.dtype != getattr(torch, dt):
            path, _, attr = name.rpartition(".")
            (model.get_submodule(path) if path else model)._buffers[attr] = b.to(getattr(torch, dt))
    model._ditq_config = header["quant_config"]
    return model.eval()


# ---- save -----------------------------------------------------------------------------------------------

def _save_transformer(transformer: nn.Module, directory: str, pipeline_class: Optional[str] = None) -> None:
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    header = build_header(transformer)
    header["pipeline_class"] = pipeline_class
    state = {k: v.detach().contiguous().cpu() for k, v in transformer.state_dict().items()}
    save_file(state, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt", "ditq": "1"})
    config = dict(header["model_config"])
    config["quantization_config"] = {"quant_method": QUANT_METHOD,
                                     **{k: v for k, v in header.items() if k != "model_config"}}
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    with open(os.path.join(directory, HEADER_NAME), "w") as f:
        json.dump(header, f, indent=2)


def save_quantized(pipe_or_module, path: str) -> None:
    """Save a quantized diffusers pipeline (``path/transformer`` + ``save_pretrained`` for the rest) or a
    quantized diffusers model (``path`` itself). See the module docstring for the layout."""
    transformer, pipe = _target(pipe_or_module)
    if not is_quantized(transformer):
        raise ValueError(f"this {type(transformer).__name__} is not quantized: call ditq.quantize first")
    if not hasattr(transformer, "to_json_string") or not hasattr(type(transformer), "from_config"):
        raise TypeError(f"save_quantized needs a diffusers model (ModelMixin with a config) so it can rebuild it; "
                        f"{type(transformer).__name__} has none. Save its state_dict() (canonical layout) instead")
    os.makedirs(path, exist_ok=True)
    if pipe is None:
        _save_transformer(transformer, path)
        return
    # Everything but the transformer through diffusers: hide it for the call, then restore both the attribute
    # and the pipeline's config entry (setting None rewrites it), and name it in model_index.json.
    from diffusers.utils import logging as dlogging
    entry = pipe.config["transformer"]
    verbosity = dlogging.get_verbosity()
    setattr(pipe, "transformer", None)
    try:
        dlogging.set_verbosity_error()  # it would warn that the (hidden) transformer is not saved
        pipe.save_pretrained(path)
    finally:
        dlogging.set_verbosity(verbosity)
        setattr(pipe, "transformer", transformer)
        pipe.register_to_config(transformer=entry)
    index_path = os.path.join(path, "model_index.json")
    with open(index_path) as f:
        index = json.load(f)
    index["transformer"] = list(entry)
    with open(index_path, "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    _save_transformer(transformer, os.path.join(path, "transformer"), pipeline_class=_qualname(pipe))


# ---- load -----------------------------------------------------------------------------------------------

def read_header(directory: str) -> dict:
    p = os.path.join(directory, HEADER_NAME)
    if not os.path.isfile(p):
        raise CheckpointError(f"{directory} holds no {HEADER_NAME}: not a ditq checkpoint")
    with open(p) as f:
        header = json.load(f)
    check_header(header, where=p)
    return header


def _resolve_backend(header: dict, backend: Optional[str], device) -> str:
    from . import backends
    name = backend if backend is not None else header["quant_config"].get("backend", "auto")
    return backends.resolve(name, device)


def _read_tensors(path: str, device) -> dict:
    """Every tensor of a safetensors file on ``device``, each in its own 64-byte-aligned allocation: tensors that
    view a file buffer at an odd offset make some CPU kernels take another (differently rounding) code path, so
    a loaded model would not reproduce the saved one bit for bit. One tensor at a time is copied."""
    from safetensors import safe_open
    out = {}
    with safe_open(path, framework="pt", device="cpu") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            if device.type != "cpu":
                t = t.to(device)
            elif t.data_ptr() % 64:
                t = t.clone()
            out[k] = t
    return out


def load_transformer(directory: str, device="cpu", backend: Optional[str] = None) -> nn.Module:
    """Rebuild a quantized transformer from ``directory`` (a ditq ``transformer/`` folder)."""
    header = read_header(directory)
    device = torch.device(device)
    backend = _resolve_backend(header, backend, device)
    cls = _import(header["model_class"])
    config = dict(header["model_config"] or {})
    config.pop("quantization_config", None)
    with _params_on_meta():
        model = cls.from_config(config)
    install_quant_linears(model, header, backend)
    weights = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise CheckpointError(f"{directory} holds no {WEIGHTS_NAME}")
    state = _read_tensors(weights, device)
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{weights} does not match the {cls.__name__}: missing {result.missing_keys[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]}")
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise CheckpointError(f"parameters not in the checkpoint: {left[:5]}")
    return finish_load(model, header, device)


def load_quantized(path: str, device="cpu", backend: Optional[str] = None, **pipeline_kwargs):
    """Load what :func:`save_quantized` wrote: a pipeline (``path/model_index.json`` exists) or a transformer.

    ``device``: where the model goes; ``backend``: the kernel backend (default: the one the checkpoint's
    QuantConfig named, "auto" resolving on ``device``). ``pipeline_kwargs`` go to the pipeline's
    ``from_pretrained`` (e.g. ``torch_dtype``)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a directory")
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        return load_transformer(path, device, backend)
    tdir = os.path.join(path, "transformer")
    header = read_header(tdir)
    transformer = load_transformer(tdir, device, backend)
    pipe_cls = _import(header.get("pipeline_class") or "diffusers.DiffusionPipeline")
    pipe = pipe_cls.from_pretrained(path, transformer=transformer, **pipeline_kwargs)
    return pipe.to(device)

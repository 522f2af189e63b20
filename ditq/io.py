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
    path/transformer_2/...                         the same three files, where the pipeline holds a second
                                                   transformer (Wan 2.2 A14B) and it was quantized too

The file names are diffusers', so that after ``import ditq`` a checkpoint also loads through
``<ModelClass>.from_pretrained(path / "transformer")`` (see :mod:`ditq.diffusers_integration`).

Loading builds the model with every *parameter* on the meta device (``_params_on_meta``: buffers such as
positional embeddings are computed for real; no full-precision linear weight is ever filled), swaps in
:class:`ditq.nn.QuantLinear` placeholders from the header, then assigns the saved tensors. A checkpoint whose
layout version differs from this ditq's is refused with both versions named.

Everything read is checked before it is used, each failure a :class:`CheckpointError` (a ``ValueError``) naming
the file and the field or tensor: the header's fields and their types; the classes it names, which must lie in
``diffusers`` or ``ditq`` and are checked *before* anything is imported; the weights file's length against its
safetensors header (a file cut short), and every tensor each quantized layer needs, with its dtype and shape (a
missing ``act_scale`` would otherwise load as a placeholder). Tensor values (finite, positive scales) are
checked by :meth:`ditq.nn.QuantLinear.load_canonical` and reported here with the file's name.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import struct
from typing import Optional

import torch
from torch import nn

from .config import QuantConfig
from .convert import DENOISER_COMPONENTS, _target, denoisers, is_quantized
from .format import LAYOUT, LAYOUT_VERSION, FormatError, WeightFormat
from . import pointwise, timestep_groups
from .nn import QuantLinear

HEADER_NAME = "ditq_quant.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
QUANT_METHOD = "ditq"


class CheckpointError(ValueError):
    """A ditq checkpoint that this ditq cannot read: missing files or tensors, a corrupt file, a header field
    missing or of the wrong type, another layout version. The message names the file and the field or tensor."""


# Only classes from these packages are imported by name from a checkpoint: a header is data, and importing the
# module it names would run that module's code before anything was validated.
_IMPORTABLE_PACKAGES = ("diffusers", "ditq")
_FLOAT_DTYPES = ("float32", "float16", "bfloat16")


def _qualname(obj_or_cls) -> str:
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_qualname(qualname, where: str, field: str) -> None:
    """Refuse (without importing anything) a class name outside diffusers / ditq."""
    parts = qualname.split(".") if isinstance(qualname, str) else []
    if len(parts) < 2 or not all(p.isidentifier() for p in parts):
        raise CheckpointError(f"{where}: field {field!r} must be a dotted class name such as "
                              f"'diffusers.DiTTransformer2DModel', got {qualname!r}")
    if parts[0] not in _IMPORTABLE_PACKAGES:
        raise CheckpointError(f"{where}: field {field!r} names {qualname!r}, outside "
                              f"{' / '.join(_IMPORTABLE_PACKAGES)}: ditq imports no other module a checkpoint names")


def _import(qualname, where: str, field: str, base: Optional[type] = None):
    """The class a checkpoint names, imported only after :func:`_check_qualname` accepted the name."""
    _check_qualname(qualname, where, field)
    module, _, name = qualname.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise CheckpointError(f"{where}: field {field!r}: cannot import {qualname!r}: {e}") from e
    if not isinstance(obj, type) or (base is not None and not issubclass(obj, base)):
        raise CheckpointError(f"{where}: field {field!r} names {qualname!r}, which is not a "
                              f"{base.__name__ if base is not None else 'class'}")
    return obj


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
            layers[name].update(timestep_groups.header_entry(m) or {})  # per-timestep-group scales, if any
    persistent = set(transformer.state_dict().keys())
    non_persistent = {n: _dtype_name(b.dtype) for n, b in transformer.named_buffers()
                      if n not in persistent and b is not None}
    config = json.loads(transformer.to_json_string()) if hasattr(transformer, "to_json_string") else None
    return {"ditq_version": __version__, "layout": LAYOUT, "layout_version": LAYOUT_VERSION,
            "quant_config": transformer._ditq_config, "model_class": _qualname(transformer),
            "model_config": config, "non_persistent_buffers": non_persistent, "layers": layers,
            # the fused structure (ditq.fuse, ditq.blocks), rebuilt before the tensors are loaded
            "fused": getattr(transformer, "_ditq_fused", {}),
            "fused_blocks": bool(getattr(transformer, "_ditq_fused_blocks", False)),
            # the layers outlier smoothing rescaled (layer -> [sites]; ditq.smooth), {} when none
            "smoothed": getattr(transformer, "_ditq_smoothed", {}),
            # the 1x1 convolutions run as linears (ditq.pointwise), wrapped again before the layers are placed
            "pointwise_convs": pointwise.wrapped_names(transformer)}


# ---- header validation: every field is checked before any of it is used -----------------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _field(d: dict, key: str, where: str, field: str, ok, what: str, optional: bool = False):
    if key not in d:
        if optional:
            return None
        raise CheckpointError(f"{where}: field {field!r} is missing")
    v = d[key]
    if not ok(v):
        raise CheckpointError(f"{where}: field {field!r} must be {what}, got {v!r}")
    return v


def _check_layer(name, spec, where: str) -> None:
    f = f"layers.{name}"
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{where}: field 'layers' has a layer named {name!r} (a module path is needed)")
    if not isinstance(spec, dict):
        raise CheckpointError(f"{where}: field {f!r} must be an object, got {spec!r}")
    k = _field(spec, "in_features", where, f + ".in_features", lambda v: _is_int(v) and v > 0, "a positive int")
    n = _field(spec, "out_features", where, f + ".out_features", lambda v: _is_int(v) and v > 0, "a positive int")
    bias = _field(spec, "bias", where, f + ".bias", lambda v: isinstance(v, bool), "true or false")
    _field(spec, "bias_dtype", where, f + ".bias_dtype",
           lambda v: v is None or (bias and v in _FLOAT_DTYPES), f"one of {_FLOAT_DTYPES} (or null without a bias)",
           optional=True)
    fmt = _field(spec, "format", where, f + ".format", lambda v: isinstance(v, dict), "an object")
    _field(fmt, "bits", where, f + ".format.bits", _is_int, "an int")
    _field(fmt, "group_size", where, f + ".format.group_size", lambda v: v is None or _is_int(v), "an int or null",
           optional=True)
    try:
        WeightFormat.from_dict(fmt).packed_shapes(n, k)
    except (FormatError, TypeError) as e:
        raise CheckpointError(f"{where}: field {f + '.format'!r}: {e}") from e
    scheme = _field(spec, "act_scheme", where, f + ".act_scheme", lambda v: v in ("static", "dynamic"),
                    "'static' or 'dynamic'")
    if scheme == "static":
        _field(spec, "act_scale", where, f + ".act_scale",
               lambda v: _is_number(v) and math.isfinite(v) and v > 0, "a positive finite number (static scheme)")
    else:
        _field(spec, "act_scale", where, f + ".act_scale", lambda v: v is None, "null (dynamic scheme)",
               optional=True)


def check_header(header, where: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` naming ``where`` and the field unless this ditq can read a checkpoint
    with this header. Nothing is imported: class names are only checked to lie in diffusers or ditq."""
    if not isinstance(header, dict) or "layout_version" not in header or "layers" not in header:
        raise CheckpointError(f"{where}: not a ditq checkpoint header (no layout_version / layers)")
    if header.get("layout") != LAYOUT or header.get("layout_version") != LAYOUT_VERSION:
        raise CheckpointError(
            f"{where} was written with weight layout {header.get('layout')!r} version "
            f"{header.get('layout_version')} (ditq {header.get('ditq_version')}), but this ditq reads layout "
            f"{LAYOUT!r} version {LAYOUT_VERSION}: re-quantize the model or install the ditq that wrote it")
    layers = _field(header, "layers", where, "layers", lambda v: isinstance(v, dict), "an object (layer -> spec)")
    for name, spec in layers.items():
        _check_layer(name, spec, where)
    qc = _field(header, "quant_config", where, "quant_config", lambda v: isinstance(v, dict), "an object")
    try:
        QuantConfig.from_dict(qc)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: field 'quant_config': {e}") from e
    _check_qualname(_field(header, "model_class", where, "model_class", lambda v: True, ""), where, "model_class")
    pipeline_class = header.get("pipeline_class")
    if pipeline_class is not None:
        _check_qualname(pipeline_class, where, "pipeline_class")
    _field(header, "model_config", where, "model_config", lambda v: v is None or isinstance(v, dict),
           "an object", optional=True)
    fused = _field(header, "fused", where, "fused", lambda v: isinstance(v, dict) and all(
        isinstance(g, dict) and all(isinstance(f, str) and isinstance(m, list) and all(isinstance(x, str) for x in m)
                                    for f, m in g.items()) for g in v.values()),
        "an object (attention -> {fused layer -> [member layers]})", optional=True)
    _field(header, "fused_blocks", where, "fused_blocks", lambda v: isinstance(v, bool), "true or false",
           optional=True)
    _field(header, "smoothed", where, "smoothed", lambda v: isinstance(v, dict) and all(
        isinstance(x, list) and all(isinstance(site, str) for site in x) for x in v.values()),
           "an object (layer -> [smoothing sites])", optional=True)
    _field(header, "pointwise_convs", where, "pointwise_convs", lambda v: isinstance(v, list) and all(
        isinstance(x, str) for x in v), "a list of module names", optional=True)
    del fused
    buffers = _field(header, "non_persistent_buffers", where, "non_persistent_buffers",
                     lambda v: isinstance(v, dict), "an object (buffer -> dtype)", optional=True) or {}
    for name, dt in buffers.items():
        if not isinstance(dt, str) or not isinstance(getattr(torch, dt, None), torch.dtype):
            raise CheckpointError(f"{where}: field 'non_persistent_buffers.{name}' must be a torch dtype name "
                                  f"such as 'float32', got {dt!r}")


# ---- the weights file: header read with safetensors, sizes and the tensors each layer needs -----------------

_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def read_weights_index(path: str) -> dict:
    """name -> (safetensors dtype, shape, bytes) of every tensor in ``path``, from the file's header (no tensor
    is read). Raises :class:`CheckpointError` naming the file if it is missing, not a safetensors file, or not
    exactly as long as its header says (a file cut short by an interrupted copy or download)."""
    from safetensors import SafetensorError, safe_open
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: the checkpoint has no weights")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = {}
            for k in f.keys():
                s = f.get_slice(k)
                meta[k] = (s.get_dtype(), tuple(s.get_shape()))
        with open(path, "rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
    except (SafetensorError, OSError, ValueError, struct.error) as e:
        raise CheckpointError(f"{path} is corrupt (not a readable safetensors file): {_one_line(e)}") from e
    out = {}
    for k, (dt, shape) in meta.items():
        if dt not in _ST_ITEMSIZE:
            raise CheckpointError(f"{path}: tensor {k!r} has dtype {dt}, which ditq does not read")
        out[k] = (dt, shape, math.prod(shape) * _ST_ITEMSIZE[dt])
    data, size = sum(v[2] for v in out.values()), os.path.getsize(path)
    if 8 + header_len + data != size:
        raise CheckpointError(f"{path} is corrupt: its header describes {8 + header_len + data:,} bytes, the file "
                              f"has {size:,} (cut short or appended to)")
    return out


def layer_tensors(spec: dict) -> list:
    """The tensors a layer of the header stores (suffixes after ``<layer>.``)."""
    return ["qweight", "scales"] + (["bias"] if spec["bias"] else []) + \
        (["act_scale"] if spec["act_scheme"] == "static" else [])


def check_tensors(header: dict, tensors, where: str) -> None:
    """Raise :class:`CheckpointError` naming ``where``, the layer and the tensor unless every tensor the header's
    layers need is in ``tensors`` (names, or :func:`read_weights_index`'s dict, whose dtypes and shapes are
    then checked too). A missing act_scale would otherwise load as a placeholder and give NaN images."""
    shapes = tensors if isinstance(tensors, dict) else None
    for name, spec in header["layers"].items():
        expect = WeightFormat.from_dict(spec["format"]).packed_shapes(spec["out_features"], spec["in_features"])
        expect = {"qweight": ("I8" if spec["format"]["bits"] == 8 else "U8", tuple(expect["qweight"])),
                  "scales": ("F32", tuple(expect["scales"])), "act_scale": ("F32", (1,)),
                  "bias": (None, (spec["out_features"],))}
        for t in layer_tensors(spec):
            key = f"{name}.{t}"
            if key not in tensors:
                raise CheckpointError(f"{where}: layer {name!r} has no {t!r} tensor ({key} is missing): the "
                                      f"weights file is incomplete or not the one its header describes")
            if shapes is None:
                continue
            dt, shape = shapes[key][:2]
            want_dt, want_shape = expect[t]
            if (want_dt is not None and dt != want_dt) or tuple(shape) != want_shape:
                raise CheckpointError(f"{where}: layer {name!r} tensor {t!r} is {dt} {list(shape)}, the header's "
                                      f"{spec['in_features']}->{spec['out_features']} layer needs "
                                      f"{want_dt or 'float'} {list(want_shape)}")


def check_scale_values(header: dict, path: str) -> None:
    """Raise :class:`CheckpointError` naming ``path`` and the layer unless every layer's weight scales and static
    activation scale are positive and finite. Reads only those tensors (a few per mille of the file), so
    ``ditq info`` can say a checkpoint would sample NaN images without loading it."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name, spec in header["layers"].items():
                for t in ("scales", "act_scale"):
                    if t not in layer_tensors(spec):
                        continue
                    v = f.get_tensor(f"{name}.{t}").float()
                    bad = int((~torch.isfinite(v) | (v <= 0)).sum())
                    if bad:
                        raise CheckpointError(f"{path}: layer {name!r} tensor {t!r} holds {bad} of {v.numel()} "
                                              f"values that are not positive finite numbers (NaN, inf or <= 0)")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is corrupt (not a readable safetensors file): {_one_line(e)}") from e


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return "; ".join(lines) if lines else type(e).__name__


def check_path(path, what: str = "path") -> str:
    """``path`` (a str or ``os.PathLike``) as a str, or a TypeError / ValueError naming ``what``: a None or a number
    would otherwise fail inside ``os.path`` with a message that names neither the argument nor the function."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} must be a directory path (str or os.PathLike), got {type(path).__name__}")
    path = os.fsdecode(os.fspath(path))
    if not path:
        raise ValueError(f"{what} is an empty string: give a directory")
    return path


def check_device(device, what: str = "device") -> torch.device:
    """``device`` as a ``torch.device``, checked to exist on this machine before anything is read or built.

    A device string torch cannot parse, or a CUDA device on a machine without one (or past the visible GPUs), is
    a ValueError naming ``what``; torch itself would fail only at the first tensor copy, deep inside loading,
    with "Found no NVIDIA driver" or an invalid device ordinal. So is any other device type this machine lacks
    (``mps`` on Linux, ``xpu`` in a torch built without it: torch would fail late, each type its own way), asked
    through torch's module for that type (``torch.mps.is_available()``, ...). ``cpu`` and ``meta`` always exist;
    which backend can run on a device that exists is the backends' to say."""
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise TypeError(f"{what} must be a torch.device, a str such as 'cpu' or 'cuda:0', or a CUDA index, "
                        f"got {type(device).__name__}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"{what} {device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what} {str(dev)!r}: no CUDA GPU is visible here (torch.cuda.is_available() is "
                             f"False); use 'cpu'")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"{what} {str(dev)!r}: only {n} CUDA device(s) are visible (cuda:0 to cuda:{n - 1})")
    elif dev.type not in ("cpu", "meta"):
        module = getattr(torch, dev.type, None)  # torch.mps, torch.xpu, ... (a backend module for the type)
        if not _device_type_available(module):
            raise ValueError(f"{what} {str(dev)!r}: this machine has no {dev.type} device (torch.{dev.type}"
                             f"{'.is_available() is False' if module is not None else ' does not exist'}); "
                             f"use 'cpu'" + (" or 'cuda'" if torch.cuda.is_available() else ""))
        count = getattr(module, "device_count", None)
        n = count() if callable(count) else None
        if dev.index is not None and n is not None and dev.index >= n:
            raise ValueError(f"{what} {str(dev)!r}: only {n} {dev.type} device(s) are visible")
    return dev


def _device_type_available(module) -> bool:
    is_available = getattr(module, "is_available", None)
    if not callable(is_available):
        return False
    try:
        return bool(is_available())
    except Exception:  # a half-built device module: treat as absent rather than fail inside the check
        return False


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


def install_quant_linears(model: nn.Module, header: dict, backend: str, where: str = "checkpoint") -> None:
    """Give the model the fused structure the checkpoint was saved with (``ditq.fuse``), then replace each linear
    named in ``header["layers"]`` (a header :func:`check_header` accepted) by an empty meta-device QuantLinear."""
    from . import fuse
    try:
        for name in pointwise.wrap(model, header.get("pointwise_convs") or []):
            model.get_submodule(name).release()  # its linear is quantized: nothing to restore
    except ValueError as e:
        raise CheckpointError(f"{where}: field 'pointwise_convs': {e}") from e
    try:
        fuse.restructure(model, header.get("fused") or {})
    except ValueError as e:
        raise CheckpointError(f"{where}: field 'fused': {e}") from e
    for name, spec in header["layers"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{where}: the checkpoint quantized {name!r}, which this "
                                  f"{type(model).__name__} lacks") from None
        if not isinstance(old, nn.Linear) or (old.in_features, old.out_features) != \
                (spec["in_features"], spec["out_features"]):
            raise CheckpointError(f"{where}: layer {name!r}: the model has {old!r}, the checkpoint a "
                                  f"{spec['in_features']}->{spec['out_features']} linear")
        q = QuantLinear(spec["in_features"], spec["out_features"], WeightFormat.from_dict(spec["format"]),
                        bias=spec["bias"], act_scheme=spec["act_scheme"], backend=backend, device="meta",
                        bias_dtype=getattr(torch, spec.get("bias_dtype") or "float32"))
        path, _, attr = name.rpartition(".")
        setattr(model.get_submodule(path) if path else model, attr, q)


def finish_load(model: nn.Module, header: dict, device, where: str = "checkpoint") -> nn.Module:
    """After tensors are in place: move to ``device``, restore buffer dtypes, mark as quantized, eval mode."""
    model.to(device)
    buffers = dict(model.named_buffers())
    for name, dt in header.get("non_persistent_buffers", {}).items():
        b = buffers.get(name)
        if b is not None and b.dtype != getattr(torch, dt):
            path, _, attr = name.rpartition(".")
            (model.get_submodule(path) if path else model)._buffers[attr] = b.to(getattr(torch, dt))
    try:
        timestep_groups.restore(model, header)  # grouped scales live in the header; re-install their hook
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{where}: invalid timestep-grouped activation scales: {e}") from e
    restore_fusion(model, header)
    restore_quant_record(model, header)
    return model.eval()


def restore_quant_record(model: nn.Module, header: dict) -> None:
    """The model's record of how it was quantized: its QuantConfig, and the layers outlier smoothing rescaled
    (None for a checkpoint written before ditq recorded them: ditq.lora then counts every layer as smoothed)."""
    model._ditq_config = header["quant_config"]
    model._ditq_smoothed = header.get("smoothed")


def restore_fusion(model: nn.Module, header: dict) -> None:
    """Record the fused projections (already rebuilt by :func:`install_quant_linears`) and fuse the blocks again
    when the checkpoint's model ran them fused (``ditq.blocks``)."""
    model._ditq_fused = dict(header.get("fused") or {})
    if header.get("fused_blocks"):
        from .blocks import fuse_blocks
        fuse_blocks(model)
        model._ditq_fused_blocks = True


# ---- save -----------------------------------------------------------------------------------------------

def _save_transformer(transformer: nn.Module, directory: str, pipeline_class: Optional[str] = None) -> None:
    """Write the three files of a transformer checkpoint so that no interruption leaves a wrong one.

    The header (and config.json, which carries it for diffusers) describes the weights: an old header over new
    weights of the same shapes would load without complaint, with the old activation scales. So every file is
    first written beside its final name, then the old header and config are removed, the weights moved in, and
    the config and header moved in last (``os.replace``: atomic within a directory). Interrupted anywhere, the
    directory holds the old checkpoint, or no header (refused as "not a ditq checkpoint"), or the new one."""
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    header = build_header(transformer)
    header["pipeline_class"] = pipeline_class
    state = {k: v.detach().contiguous().cpu() for k, v in transformer.state_dict().items()}
    config = dict(header["model_config"])
    config["quantization_config"] = {"quant_method": QUANT_METHOD,
                                     **{k: v for k, v in header.items() if k != "model_config"}}
    final = {name: os.path.join(directory, name) for name in (WEIGHTS_NAME, CONFIG_NAME, HEADER_NAME)}
    staged = {name: os.path.join(directory, f".{name}.{os.getpid()}.partial") for name in final}
    try:
        save_file(state, staged[WEIGHTS_NAME], metadata={"format": "pt", "ditq": "1"})
        for name, obj, kw in ((CONFIG_NAME, config, dict(sort_keys=True)), (HEADER_NAME, header, {})):
            with open(staged[name], "w") as f:
                json.dump(obj, f, indent=2, **kw)
        for name in (HEADER_NAME, CONFIG_NAME):
            if os.path.lexists(final[name]):
                os.remove(final[name])
        for name in (WEIGHTS_NAME, CONFIG_NAME, HEADER_NAME):
            os.replace(staged[name], final[name])
    finally:
        for p in staged.values():
            if os.path.lexists(p):
                os.remove(p)


def save_quantized(pipe_or_module, path: str) -> None:
    """Save a quantized diffusers pipeline (``path/transformer`` + ``save_pretrained`` for the rest) or a
    quantized diffusers model (``path`` itself). See the module docstring for the layout.

    A pipeline's quantized transformers are each written as a ditq folder under their attribute's name
    (``transformer/``, and ``transformer_2/`` where Wan 2.2's second expert was quantized too); one left in full
    precision is saved by diffusers with the rest.

    ``path`` is a directory, created if missing; files an earlier save wrote there are overwritten. Raises
    ValueError for a model :func:`ditq.quantize` has not quantized (a pipeline none of whose transformers is) or
    one with run-time LoRA adapters loaded (:mod:`ditq.lora`: not part of a checkpoint, so refused rather than
    dropped), TypeError for one that is not a diffusers model (nothing to rebuild it from) or a ``path`` that is
    not a path, NotADirectoryError when ``path`` is a file, ValueError for a bare transformer saved over a
    pipeline checkpoint (which would still load as that pipeline)."""
    path = check_path(path)
    held = {} if isinstance(pipe_or_module, nn.Module) else denoisers(pipe_or_module)
    if held:  # a pipeline: every transformer it holds (Wan 2.2 may hold transformer_2 alone)
        pipe, transformer = pipe_or_module, next(iter(held.values()))
        quantized = {c: m for c, m in held.items() if is_quantized(m)}
    else:
        transformer, pipe = _target(pipe_or_module, "ditq.save_quantized")
        quantized = {"": transformer} if is_quantized(transformer) else {}
    if not quantized:
        raise ValueError(f"this {type(transformer).__name__} is not quantized: call ditq.quantize first")
    from .lora import loaded_adapters

    for module in quantized.values():
        adapters = loaded_adapters(module)
        if adapters:  # run-time state a checkpoint does not hold: refused rather than dropped without a word
            names = ", ".join(map(repr, adapters))
            raise ValueError(f"this {type(module).__name__} has LoRA adapters loaded ({names}); checkpoints hold "
                             f"the quantized model only: ditq.unload_lora(model), save, and load the adapters "
                             f"again after load_quantized (or merge the LoRA before quantizing)")
        if not hasattr(module, "to_json_string") or not hasattr(type(module), "from_config"):
            raise TypeError(f"save_quantized needs a diffusers model (ModelMixin with a config) so it can rebuild "
                            f"it; {type(module).__name__} has none. Save its state_dict() (canonical layout) "
                            f"instead")
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"save_quantized: {path} exists and is not a directory (a checkpoint is a "
                                 f"directory)")
    if pipe is None and os.path.isfile(os.path.join(path, "model_index.json")):
        # load_quantized would read this directory as the pipeline it holds and return its old transformer
        raise ValueError(f"save_quantized: {path} holds a pipeline checkpoint (model_index.json); save a bare "
                         f"transformer into a directory of its own")
    os.makedirs(path, exist_ok=True)
    if pipe is None:
        _save_transformer(transformer, path)
        return
    for component in DENOISER_COMPONENTS:
        stale = os.path.join(path, component, HEADER_NAME)
        if component not in quantized and os.path.isfile(stale):
            os.remove(stale)  # an earlier save's ditq header beside the full-precision weights diffusers writes now
    # Everything but the quantized transformers through diffusers: hide them for the call, then restore both the
    # attributes and the pipeline's config entries (setting None rewrites them), and name them in model_index.json.
    from diffusers.utils import logging as dlogging
    entries = {c: pipe.config[c] for c in quantized}
    verbosity = dlogging.get_verbosity()
    for component in quantized:
        setattr(pipe, component, None)
    try:
        dlogging.set_verbosity_error()  # it would warn that the (hidden) transformers are not saved
        pipe.save_pretrained(path)
    finally:
        dlogging.set_verbosity(verbosity)
        for component, module in quantized.items():
            setattr(pipe, component, module)
            pipe.register_to_config(**{component: entries[component]})
    index_path = os.path.join(path, "model_index.json")
    with open(index_path) as f:
        index = json.load(f)
    for component, entry in entries.items():
        index[component] = list(entry)
    with open(index_path, "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    for component, module in quantized.items():
        _save_transformer(module, os.path.join(path, component), pipeline_class=_qualname(pipe))


# ---- load -----------------------------------------------------------------------------------------------

def read_header(directory: str) -> dict:
    p = os.path.join(directory, HEADER_NAME)
    if not os.path.isfile(p):
        raise CheckpointError(f"{directory} holds no {HEADER_NAME}: not a ditq checkpoint")
    try:
        with open(p, encoding="utf-8") as f:
            header = json.load(f)
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{p} is not readable JSON: {_one_line(e)}") from e
    check_header(header, where=p)
    return header


def _check_backend_name(backend) -> None:
    from .backends import BACKEND_NAMES
    if backend is not None and (not isinstance(backend, str) or backend not in BACKEND_NAMES + ("auto",)):
        raise ValueError(f"backend must be None (the checkpoint's) or one of {', '.join(BACKEND_NAMES + ('auto',))}"
                         f", got {backend!r}")


def _resolve_backend(header: dict, backend: Optional[str], device) -> str:
    """The backend request the layers keep (``"auto"`` stays ``"auto"``: it is resolved again on every device a
    layer moves to), checked to run on ``device`` now so that a wrong choice fails before anything is built."""
    from . import backends
    name = backend if backend is not None else header["quant_config"].get("backend", "auto")
    try:
        backends.resolve(name, device)
    except backends.BackendUnavailableError as e:
        if backend is not None:
            raise
        # The name came from the checkpoint (quantized elsewhere, e.g. with backend="cuda" on a GPU): say so, and
        # how to run it here anyway, since the canonical weights load on every backend.
        raise backends.BackendUnavailableError(
            f"{e} (the checkpoint's QuantConfig names backend {name!r}: pass backend= to load_quantized to run it "
            f"on another)") from None
    return name


# Bytes of tensors copied out of one memory map of the weights file before it is closed and opened again: the
# pages read while copying count as resident until the map goes, so the window bounds that transient.
_MAP_WINDOW_BYTES = 256 << 20


def _read_tensors(path: str, device) -> dict:
    """Every tensor of a safetensors file on ``device``, each in its own allocation, one tensor at a time.

    On the CPU every tensor is copied out of the file's memory map: a tensor left as a view keeps the whole map
    alive after the file is closed, so every page it holds stays resident beside the copies (a loaded model took
    up to twice its checkpoint's size in RSS) and the model would change if the file were rewritten in place.
    The map is closed and reopened every ``_MAP_WINDOW_BYTES`` of tensors, so the file's pages read while copying
    do not pile up either. Own allocations are also 64-byte aligned: a view at an odd offset makes some CPU
    kernels take another (differently rounding) code path, so a loaded model would not reproduce the saved one
    bit for bit."""
    from safetensors import SafetensorError, safe_open
    out = {}
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            keys = list(f.keys())
        i = 0
        while i < len(keys):
            with safe_open(path, framework="pt", device="cpu") as f:
                window = 0
                while i < len(keys) and window < _MAP_WINDOW_BYTES:
                    t = f.get_tensor(keys[i])
                    window += t.numel() * t.element_size()
                    out[keys[i]] = t.to(device) if device.type != "cpu" else t.clone()
                    i += 1
                del t  # the last view of this map: it closes with the file
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is corrupt (not a readable safetensors file): {_one_line(e)}") from e
    return out


def _check_dtype(torch_dtype):
    if torch_dtype is None or (isinstance(torch_dtype, torch.dtype) and torch_dtype.is_floating_point):
        return torch_dtype
    raise TypeError(f"torch_dtype must be a floating torch.dtype such as torch.bfloat16, got {torch_dtype!r}")


def load_transformer(directory: str, device="cpu", backend: Optional[str] = None,
                     torch_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Rebuild a quantized transformer from ``directory`` (a ditq ``transformer/`` folder).

    ``torch_dtype``: the dtype of everything but the QuantLinear scales (which stay float32: the ops take them
    so); None keeps the dtypes as saved."""
    torch_dtype = _check_dtype(torch_dtype)
    directory = check_path(directory, "directory")
    device = check_device(device)
    _check_backend_name(backend)
    header = read_header(directory)
    where = os.path.join(directory, HEADER_NAME)
    cls = _import(header["model_class"], where, "model_class", base=nn.Module)
    if not hasattr(cls, "from_config"):
        raise CheckpointError(f"{where}: field 'model_class' names {cls.__name__}, not a diffusers model "
                              f"(no from_config)")
    config = header.get("model_config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: field 'model_config' must be the model's config object, got {config!r}")
    # The weights file is checked (length, the tensors each layer needs) before anything is built or read.
    weights = os.path.join(directory, WEIGHTS_NAME)
    check_tensors(header, read_weights_index(weights), weights)
    backend = _resolve_backend(header, backend, device)
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    try:
        with _params_on_meta():
            model = cls.from_config(config)
    except Exception as e:  # whatever the class raises on a bad config
        raise CheckpointError(f"{where}: field 'model_config' does not build a {cls.__name__}: "
                              f"{type(e).__name__}: {_one_line(e)}") from e
    install_quant_linears(model, header, backend, where)
    state = _read_tensors(weights, device)
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # "Error(s) in loading state_dict for X:" then one line per layer
        lines = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()] or [str(e)]
        raise CheckpointError(f"{weights}: {'; '.join(lines)}") from e
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{weights} does not match the {cls.__name__}: missing {result.missing_keys[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]}")
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise CheckpointError(f"{weights}: parameters not in the checkpoint: {left[:5]}")
    model = finish_load(model, header, device, where)
    return model if torch_dtype is None else _cast(model, torch_dtype)


def _cast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model``'s float values in ``dtype``, as diffusers' ``from_pretrained(torch_dtype=...)`` leaves them: the
    values its class keeps in float32 (``_keep_in_fp32_modules``, matched on the parts of a parameter's or
    buffer's dotted name, as diffusers matches them) stay float32; a QuantLinear's scales stay float32 whatever the dtype. ``nn.Module.to`` rather
    than diffusers' ``ModelMixin.to``, which warns on every dtype cast of a class that declares the list, even an
    empty one."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    nn.Module.to(model, dtype)
    if keep:
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point() and any(k in name.split(".") for k in keep):
                t.data = t.data.float()
    return model


def _transformer_dtype(torch_dtype):
    """The transformer's part of a pipeline ``torch_dtype`` (a dtype, or diffusers' per-component dict)."""
    if isinstance(torch_dtype, dict):
        return torch_dtype.get("transformer", torch_dtype.get("default"))
    return torch_dtype


def load_quantized(path: str, device="cpu", backend: Optional[str] = None, progress: bool = True,
                   **pipeline_kwargs):
    """Load what :func:`save_quantized` wrote: a pipeline (``path/model_index.json`` exists) or a transformer.

    ``device``: where the model goes; ``backend``: the kernel backend (default: the one the checkpoint's
    QuantConfig named, "auto" resolving on ``device``). ``progress``: False hides the progress bar diffusers
    shows while it loads a pipeline's components ("Loading pipeline components"), as ``QuantConfig.progress``
    does ditq's own bars; diffusers' global setting is restored afterwards, and the loaded pipeline's sampling
    bar stays as diffusers sets it (``pipe.set_progress_bar_config(disable=True)`` hides that one).
    ``pipeline_kwargs`` go to the pipeline's ``from_pretrained``; ``dtype`` (``torch_dtype`` in older diffusers;
    the only one a bare transformer takes) applies to the transformer too: its biases, norms and unquantized
    layers take that dtype, the quantized layers' scales stay float32. Without it a pipeline's other components
    load in the transformer's saved dtype (diffusers alone would make them float32 beside a bfloat16
    transformer).

    Everything is checked before the weights are read: a ``path`` that is not a ditq checkpoint or a corrupt one
    raises :class:`CheckpointError`, a ``device`` this machine lacks or an unknown ``backend`` name ValueError,
    a backend that cannot run on ``device`` :class:`ditq.backends.BackendUnavailableError`."""
    path = check_path(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a directory")
    check_device(device)
    _check_backend_name(backend)
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False, got {progress!r}")
    if pipeline_kwargs.get("dtype") is not None and pipeline_kwargs.get("torch_dtype") is not None:
        raise ValueError("give dtype or torch_dtype (its older name), not both")
    torch_dtype = pipeline_kwargs.get("dtype")
    torch_dtype = _transformer_dtype(pipeline_kwargs.get("torch_dtype") if torch_dtype is None else torch_dtype)
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        extra = sorted(set(pipeline_kwargs) - {"torch_dtype", "dtype"})
        if extra:
            raise TypeError(f"{path} holds a bare transformer: load_quantized takes only torch_dtype (or dtype, "
                            f"its newer name) besides device and backend for it, got {extra}")
        return load_transformer(path, device, backend, torch_dtype=torch_dtype)
    quantized = [c for c in DENOISER_COMPONENTS if os.path.isfile(os.path.join(path, c, HEADER_NAME))]
    tdir = os.path.join(path, quantized[0] if quantized else "transformer")
    header = read_header(tdir)  # none of them quantized: the error names transformer/
    pipe_cls = _import(header.get("pipeline_class") or "diffusers.DiffusionPipeline",
                       os.path.join(tdir, HEADER_NAME), "pipeline_class")
    if not hasattr(pipe_cls, "from_pretrained"):
        raise CheckpointError(f"{os.path.join(tdir, HEADER_NAME)}: field 'pipeline_class' names "
                              f"{pipe_cls.__name__}, not a diffusers pipeline (no from_pretrained)")
    modules = {c: load_transformer(os.path.join(path, c), device, backend, torch_dtype=torch_dtype)
               for c in quantized}
    if pipeline_kwargs.get("dtype") is None and pipeline_kwargs.get("torch_dtype") is None:
        # diffusers alone loads every component in float32, while the transformer keeps its saved dtype: a
        # pipeline saved in bfloat16 would come back mixed and fail at its first call (bf16 latents into an fp32
        # VAE). The rest of the pipeline takes the transformer's dtype instead, as it was saved.
        saved = _float_dtype(modules[quantized[0]])
        if saved is not None and saved != torch.float32:
            pipeline_kwargs = dict(pipeline_kwargs, **{_dtype_keyword(): saved})
    with _diffusers_progress_bars(progress):
        pipe = pipe_cls.from_pretrained(path, **modules, **pipeline_kwargs)
    return pipe.to(device)


def _dtype_keyword() -> str:
    """The name this diffusers' from_pretrained takes a dtype by: ``dtype`` in recent releases (which deprecate
    ``torch_dtype`` with a FutureWarning), ``torch_dtype`` before."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401  (present with ``dtype``)
    except ImportError:
        return "torch_dtype"
    return "dtype"


def _float_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The floating dtype most of the model's own float values have (QuantLinear's float32 scales aside: a model
    may also keep a few modules in float32, as diffusers' ``_keep_in_fp32_modules``); None if it has none."""
    count = {}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            continue
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            if t is not None and t.is_floating_point():
                count[t.dtype] = count.get(t.dtype, 0) + t.numel()
    return max(count, key=count.get) if count else None


@contextlib.contextmanager
def _diffusers_progress_bars(enabled: bool):
    """diffusers' own progress bars (a global switch of its logging module) off inside when ``enabled`` is False,
    then back as they were: a caller that turned them off keeps them off."""
    from diffusers.utils import logging as dlogging
    was_enabled = dlogging.is_progress_bar_enabled()
    if was_enabled and not enabled:
        dlogging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            dlogging.enable_progress_bar()

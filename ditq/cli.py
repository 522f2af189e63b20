"""The ``ditq`` command line (console script ``ditq = ditq.cli:main``; ``python -m ditq`` runs the same).

    ditq demo [--out DIR] [--steps N] [--samples-per-class N] [--backend B] [--settings w8a8 w8a8-best ...]
    ditq quantize MODEL --preset w4a8|w8a8 [--calibration first-step|all-steps] [--act-scheme static|dynamic]
                  [--backend B] --out DIR
    ditq generate DIR --class-labels 1 2 3 | --prompt "a cat" ... [--lora FILE [--lora-scale S]] [--steps N]
                  [--seed S] [--backend B] --out PNG
    ditq info DIR [--layers] [--json]
    ditq --version

MODEL is ``bundled`` (the digits DiT shipped with ditq), a local diffusers pipeline directory, or a Hugging Face
hub id (needs internet; loaded with ``DiffusionPipeline.from_pretrained``). Errors a user can fix (a missing
directory, a pipeline without a transformer, a bad class label, a device this machine lacks, a setting
``QuantConfig`` refuses, a corrupt checkpoint, ...) print one line on stderr and exit with 2, as argparse does for
a bad flag; anything else (a failure inside ditq) prints one line and exits with 1. ``--debug`` shows the
traceback instead. The work itself lives in the library (``ditq.quantize``, ``ditq.demo.run``); this module only
parses, loads and prints.

Checks made before any work is spent: every command with a ``--device`` checks it (a CUDA device needs a visible
GPU, ``mps``, ``xpu`` or any other type a device of that type here) and that ``--backend`` runs on it; ``quantize``
and ``demo`` check that ``--out`` can be a directory; ``generate`` checks its ``--out`` (an image extension Pillow
writes, an existing writable directory) before loading or sampling, and refuses to write images holding NaN / inf (a
corrupt checkpoint), and that a ``--lora`` file exists. Flags that would be ignored are refused
(``--calib-prompts`` / ``--prompt`` for a class-conditional model, ``--calib-labels`` / ``--class-labels`` for a
text-to-image one, ``generate --backend`` and ``--lora`` for a full-precision pipeline). ``info`` checks
the weights file against its header (length, each layer's tensors, finite scales) and reports a corrupt one as an
error. ``quantize`` prints one warning line on stderr, even with ``--quiet``, when layers it was meant to quantize
could not be (e.g. a group size that does not divide their K), and fails when none was.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import warnings
from typing import List, Optional

from .report import UnquantizedLayersWarning

# Transformer classes ditq's tests cover; other diffusers transformers are tried with a warning.
TESTED_TRANSFORMERS = ("DiTTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel",
                       "FluxTransformer2DModel")
BUNDLED = "bundled"
DEFAULT_PROMPTS = ("a photo of a cat", "a watercolor landscape with mountains", "a red sports car on a street",
                   "a bowl of fruit on a wooden table")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class CLIError(Exception):
    """A problem with the user's input: printed as one line, no traceback."""


# ---- loading ------------------------------------------------------------------------------------------

def _read_index(path: str) -> dict:
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        raise CLIError(f"{path} is not a diffusers pipeline directory (no model_index.json)")
    try:
        with open(index) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CLIError(f"{index} is not readable JSON: {e}")


def _check_transformer_entry(index: dict, where: str) -> None:
    entry = index.get("transformer")
    if not entry or not isinstance(entry, (list, tuple)) or entry[-1] is None:
        has_unet = bool(index.get("unet"))
        raise CLIError(f"{where} has no transformer component" + (" (it is a UNet pipeline)" if has_unet else "")
                       + ": ditq quantizes DiT-family (transformer) diffusion models")
    cls = entry[-1]
    if "Transformer" not in cls:
        raise CLIError(f"{where}: its transformer is a {cls}, not a DiT-family transformer model")
    if cls not in TESTED_TRANSFORMERS:
        print(f"ditq: warning: {cls} is not among the tested transformers ({', '.join(TESTED_TRANSFORMERS)}); "
              f"trying anyway", file=sys.stderr)


def _pipeline_class(index: dict):
    """The demo pipeline lives in ditq, not diffusers: diffusers cannot resolve its class name by itself."""
    if index.get("_class_name") == "PixelDiTPipeline":
        from .demo import PixelDiTPipeline
        return PixelDiTPipeline
    from diffusers import DiffusionPipeline
    return DiffusionPipeline


def load_pipeline(model: str, device: str = "cpu"):
    """``bundled``, a local pipeline directory or a hub id -> a full-precision diffusers pipeline."""
    if model == BUNDLED:
        from .demo import load_bundled_pipeline
        return load_bundled_pipeline(device=device)
    if os.path.isdir(model):
        index = _read_index(model)
        _check_transformer_entry(index, model)
        try:
            pipe = _pipeline_class(index).from_pretrained(model, local_files_only=True)
        except Exception as e:
            raise CLIError(f"cannot load the pipeline in {model}: {type(e).__name__}: {_first_line(e)}")
    elif _HUB_ID.match(model) and not os.path.exists(model):
        from diffusers import DiffusionPipeline
        try:
            pipe = DiffusionPipeline.from_pretrained(model)
        except Exception as e:
            raise CLIError(f"cannot load {model!r} from the Hugging Face hub: {type(e).__name__}: {_first_line(e)}")
    else:
        raise CLIError(f"no such model directory: {model} (give '{BUNDLED}', a diffusers pipeline directory or a "
                       f"hub id such as facebook/DiT-XL-2-256)")
    if getattr(pipe, "transformer", None) is None:
        raise CLIError(f"{model}: the pipeline has no transformer: ditq quantizes DiT-family diffusion models")
    return pipe.to(device)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _is_ditq_checkpoint(path: str) -> bool:
    from .io import HEADER_NAME
    return os.path.isfile(os.path.join(path, "transformer", HEADER_NAME)) or \
        os.path.isfile(os.path.join(path, HEADER_NAME))


def _header_dir(path: str) -> str:
    if not os.path.isdir(path):
        raise CLIError(f"no such directory: {path}")
    if not _is_ditq_checkpoint(path):
        raise CLIError(f"{path} is not a ditq checkpoint (no transformer/ditq_quant.json): "
                       f"write one with 'ditq quantize MODEL --out {path}'")
    from .io import HEADER_NAME
    sub = os.path.join(path, "transformer")
    return sub if os.path.isfile(os.path.join(sub, HEADER_NAME)) else path


def _calib_inputs(pipe, args) -> dict:
    """Calibration call arguments: class labels for class-conditional pipelines, prompts for text ones."""
    import inspect
    params = inspect.signature(pipe.__call__).parameters
    kw = dict(num_inference_steps=args.calib_steps)
    if "class_labels" in params:
        if args.calib_prompts is not None:
            raise CLIError(f"--calib-prompts: {type(pipe).__name__} is class-conditional (its calls take "
                           f"class_labels, not prompts); give --calib-labels instead")
        n = _num_classes(pipe)
        labels = args.calib_labels if args.calib_labels is not None else list(range(min(n or 8, 16)))
        _check_labels(labels, n)
        kw["class_labels"] = labels
    elif "prompt" in params:
        if args.calib_labels is not None:
            raise CLIError(f"--calib-labels: {type(pipe).__name__} is text-to-image (its calls take prompts, not "
                           f"class labels); give --calib-prompts instead")
        kw["prompt"] = list(args.calib_prompts or DEFAULT_PROMPTS)
    else:
        raise CLIError(f"{type(pipe).__name__} takes neither class_labels nor prompt: use the Python API "
                       f"(ditq.quantize(..., calib_fn=...)) to calibrate it")
    return kw


def _num_classes(pipe) -> Optional[int]:
    n = getattr(getattr(pipe.transformer, "config", None), "num_embeds_ada_norm", None)
    return int(n) if n else None


def _check_labels(labels: List[int], n: Optional[int]) -> None:
    if not labels:
        raise CLIError("give at least one class label")
    for c in labels:
        if c < 0 or (n is not None and c >= n):
            raise CLIError(f"class label {c} is out of range: this model has classes 0..{n - 1}"
                           if n is not None else f"class label {c} is negative")


# ---- checks made before any work ---------------------------------------------------------------------

def _check_device_and_backend(args) -> None:
    """A device this machine lacks, or a ``--backend`` that cannot run on the device, fails here: before a model
    is loaded or calibrated, not at the first tensor copy (torch's "Found no NVIDIA driver") or after minutes of
    work (``demo`` runs its fp32 row before the first quantized one)."""
    import torch
    from . import backends
    from .io import check_device
    device = getattr(args, "device", None)
    if device is not None:
        try:
            device = check_device(device, "--device")
        except (TypeError, ValueError) as e:
            raise CLIError(str(e)) from None
    backend = getattr(args, "backend", None)
    if backend in (None, "auto"):
        return
    if device is None:  # demo: the GPU when there is one (ditq.demo.run.default_device)
        device = torch.device("cuda" if torch.cuda.is_available() and backend not in ("torch", "cuda-emulated")
                              else "cpu")
    reason = backends.unavailable_reason(backend, device)
    if reason is not None:
        raise CLIError(f"--backend {backend} cannot run on {device}: {reason}; available there: "
                       f"{', '.join(backends.available_backends(device)) or 'none'}")


def _check_out_dir(path: str) -> None:
    """``--out`` of quantize / demo: a directory that exists or can be created, checked before the work."""
    if not path:
        raise CLIError("--out is empty: give a directory")
    if os.path.exists(path) and not os.path.isdir(path):
        raise CLIError(f"--out {path} exists and is not a directory")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):  # the nearest existing ancestor is where the directory gets created
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise CLIError(f"--out {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CLIError(f"--out {path}: directory {parent} is not writable")


# ---- commands -----------------------------------------------------------------------------------------

def cmd_demo(args) -> int:
    from .demo.run import run_demo
    _check_out_dir(args.out)
    run_demo(args.out, steps=args.steps, samples_per_class=args.samples_per_class, backend=args.backend,
             settings=args.settings, seed=args.seed, device=args.device, progress=not args.quiet)
    return 0


def cmd_quantize(args) -> int:
    import ditq
    _check_out_dir(args.out)
    if args.group_size is not None and args.preset == "w8a8":
        raise CLIError("--group-size applies to --preset w4a8: w8a8 weights have one scale per output channel")
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        raise CLIError(f"{args.out} exists and is not empty (pass --overwrite to write into it)")
    from .config import QuantConfigError
    try:
        cfg = ditq.QuantConfig.preset(args.preset, calibration=args.calibration, act_scheme=args.act_scheme,
                                      backend=args.backend, progress=not args.quiet,
                                      act_estimator=args.act_estimator, timestep_groups=args.timestep_groups,
                                      smooth_alpha=args.smooth_alpha, max_dynamic_layers=args.max_dynamic_layers,
                                      fuse=args.fuse, weight_method=args.weight_method,
                                      group_scales=args.group_scales,
                                      **({} if args.group_size is None else {"group_size": args.group_size}))
    except QuantConfigError as e:
        raise CLIError(_in_flags(str(e))) from None
    pipe = load_pipeline(args.model, device=args.device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=args.quiet)
    from .convert import UnquantizedComponentWarning, denoisers
    calib_inputs = _calib_inputs(pipe, args)
    reports = {}
    # "transformer", and Wan 2.2's "transformer_2" where the pipeline holds one (ditq.quantize names what else it got)
    for component in denoisers(pipe) or ["transformer"]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnquantizedLayersWarning)  # _warn_unquantized prints it as one line
            warnings.simplefilter("ignore", UnquantizedComponentWarning)  # the next turn of this loop quantizes it
            report = ditq.quantize(pipe, cfg, calib_inputs=calib_inputs, component=component)
        _warn_unquantized(report)
        if not report.layers:
            where = "" if component == "transformer" else f" of the {component}"
            raise CLIError(f"no layer{where} was quantized (see the warning above); nothing written")
        reports[component] = report
    ditq.save_quantized(pipe, args.out)
    written = []
    for component, report in reports.items():
        name = "ditq_report.json" if component == "transformer" else f"ditq_report_{component}.json"
        written.append(os.path.join(args.out, name))
        with open(written[-1], "w") as f:
            f.write(report.to_json())
        if not args.quiet:
            print(report if len(reports) == 1 else f"{component}:\n{report}")
    before = sum(r.bytes_before for r in reports.values())
    after = sum(r.bytes_after for r in reports.values())
    what = "transformer bytes" if len(reports) == 1 else f"bytes of {' + '.join(reports)}"
    print(f"wrote {args.out} ({before:,} -> {after:,} {what}, {before / after:.2f}x); "
          f"report in {', '.join(written)}")
    return 0


# The QuantConfig field each 'ditq quantize' flag sets: QuantConfig's messages name fields (as a Python user
# writes them), the command line's name the flags the user typed.
FLAG_OF_FIELD = {"weight_bits": "--preset", "group_size": "--group-size", "weight_method": "--weight-method",
                 "group_scales": "--group-scales",
                 "act_scheme": "--act-scheme", "calibration": "--calibration", "act_estimator": "--act-estimator",
                 "timestep_groups": "--timestep-groups", "smooth_alpha": "--smooth-alpha",
                 "max_dynamic_layers": "--max-dynamic-layers", "backend": "--backend", "fuse": "--fuse"}


def _in_flags(message: str) -> str:
    """A QuantConfigError message in the command line's terms: ``field='value'`` -> ``--flag value``, and a field
    name -> its flag where it is unambiguous (a name with an underscore anywhere, a one-word name such as
    ``calibration`` only as the message's subject, since the word also occurs as plain English). Choices only
    the Python API has are dropped: None for a number flag (leave the flag out instead), a list of steps."""
    for name, flag in FLAG_OF_FIELD.items():
        message = re.sub(rf"\b{name}='([^']*)'", rf"{flag} \1", message)
        message = re.sub(rf"\b{name}\b" if "_" in name else rf"^{name}\b", flag, message)
    message = message.replace("--calibration all-steps or a list of steps", "--calibration all-steps")
    return message.replace(" must be None (off) or ", " must be ")


# Skips the user asked for (or ditq's default skip list): listed in the report, not warned about.
def _warn_unquantized(report) -> None:
    """One stderr line, even with --quiet, when layers that were meant to be quantized could not be (a group size
    that does not divide K, a layer calibration never reached, ...): the checkpoint would otherwise silently be
    mostly full precision. (ditq.quantize's own UnquantizedLayersWarning says the same; the command line shows
    this line instead.)"""
    summary = report.unplanned_summary()
    if summary is not None:
        print(f"ditq quantize: warning: {summary}", file=sys.stderr)


# What 'ditq generate' writes: formats PIL saves an RGB / grey picture to without extra plugins.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def _check_out_image(path: str) -> None:
    """Refuse an --out that cannot be written before anything is loaded or sampled."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in IMAGE_EXTENSIONS:
        raise CLIError(f"--out {path}: give an image file name ending in one of {', '.join(IMAGE_EXTENSIONS)}")
    from PIL import Image
    Image.init()
    if Image.registered_extensions().get(ext) not in Image.SAVE:
        raise CLIError(f"--out {path}: this Pillow cannot write {ext} files; use .png")
    if os.path.isdir(path):
        raise CLIError(f"--out {path} is a directory; give an image file name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise CLIError(f"--out {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CLIError(f"--out {path}: directory {parent} is not writable")


def _check_finite_images(images) -> None:
    """A checkpoint with NaN / inf weights or scales samples NaN images, which would save as blank pictures."""
    import torch
    bad = int((~torch.isfinite(images)).sum())
    if bad:
        raise CLIError(f"the sampled images hold {bad:,} NaN / inf values of {images.numel():,}: the model's "
                       f"weights or scales are not finite (a corrupt checkpoint?); nothing written")


def cmd_generate(args) -> int:
    import torch

    _check_out_image(args.out)
    if not os.path.isdir(args.model) and args.model != BUNDLED:
        raise CLIError(f"no such directory: {args.model}")
    if args.lora is not None and not os.path.isfile(args.lora):
        raise CLIError(f"--lora {args.lora}: no such file")
    if args.lora is None and args.lora_scale is not None:
        raise CLIError("--lora-scale needs --lora")
    if args.lora_scale is not None and not math.isfinite(args.lora_scale):
        raise CLIError(f"--lora-scale must be a finite number, got {args.lora_scale}")
    if os.path.isdir(args.model) and _is_ditq_checkpoint(args.model):
        import ditq
        from .backends import BackendUnavailableError
        if not os.path.isfile(os.path.join(args.model, "model_index.json")):
            raise CLIError(f"{args.model} holds a quantized transformer without its pipeline (no "
                           f"model_index.json): generate needs a pipeline checkpoint, as 'ditq quantize' writes")
        try:
            pipe = ditq.load_quantized(args.model, device=args.device, backend=args.backend)
        except Exception as e:
            if not _is_user_error(e):
                raise  # a failure inside ditq: main reports it as one (exit 1), not as a bad checkpoint
            hint = " (pass --backend to run it on another)" if isinstance(e, BackendUnavailableError) and \
                args.backend is None else ""
            raise CLIError(f"cannot load {args.model}: {type(e).__name__}: {_first_line(e)}{hint}")
    else:
        for flag, value in (("--backend", args.backend), ("--lora", args.lora)):
            if value is not None:
                raise CLIError(f"{flag} {value}: {args.model} is a full-precision pipeline, not a ditq checkpoint; "
                               f"{flag} applies to a quantized one")
        pipe = load_pipeline(args.model, device=args.device)
    kw = _sampling_inputs(pipe, args)
    lora_scale = 1.0 if args.lora_scale is None else args.lora_scale
    if args.lora is not None:
        _load_lora(pipe, args.lora, lora_scale)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=args.quiet)
    gen = torch.Generator(args.device if args.device != "cuda" else "cuda").manual_seed(args.seed)
    kw.update(num_inference_steps=args.steps, generator=gen, output_type="pt")
    if args.guidance_scale is not None:
        kw["guidance_scale"] = args.guidance_scale
    images = pipe(**kw).images
    if not isinstance(images, torch.Tensor):
        raise CLIError(f"{type(pipe).__name__} returned {type(images).__name__} images for output_type='pt', "
                       f"not a tensor")
    images = images.float().cpu()
    _check_finite_images(images)
    _save_row(images, args.out)
    what = f"classes {args.class_labels}" if args.class_labels is not None else f"{len(args.prompt)} prompt(s)"
    lora = f", LoRA {os.path.basename(args.lora)} at scale {lora_scale:g}" if args.lora is not None else ""
    print(f"wrote {args.out}: {len(images)} image(s), {what}, {args.steps} steps, seed {args.seed}{lora}")
    return 0


def _sampling_inputs(pipe, args) -> dict:
    """The pipeline call's conditioning: class labels for a class-conditional pipeline, prompts for a text one.
    A named parameter, not **kwargs: PixArt's pipelines take **kwargs and would swallow class labels, then fail
    asking for a prompt (or, given a default one, sample it with the labels ignored)."""
    import inspect
    params = inspect.signature(pipe.__call__).parameters
    name = type(pipe).__name__
    if args.class_labels is not None:
        if "class_labels" not in params:
            hint = "; give --prompt instead" if "prompt" in params else ""
            raise CLIError(f"{name} does not take class labels{hint}")
        _check_labels(args.class_labels, _num_classes(pipe))
        return dict(class_labels=args.class_labels)
    if "prompt" not in params:
        hint = "; give --class-labels instead" if "class_labels" in params else ""
        raise CLIError(f"{name} does not take prompts{hint}")
    if any(not p.strip() for p in args.prompt):
        raise CLIError("--prompt: an empty prompt")
    return dict(prompt=list(args.prompt))


def _load_lora(pipe, path: str, scale: float) -> None:
    """A run-time LoRA adapter on the quantized transformer (ditq.load_lora); a file it refuses is the user's. The
    keys of other components (text encoders) are left out, said in one warning line on stderr."""
    import ditq
    from .lora import OtherComponentsWarning
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", OtherComponentsWarning)
            ditq.load_lora(pipe, path, scale=scale, other_components="skip")
    except (ValueError, TypeError, OSError) as e:
        raise CLIError(f"--lora {path}: {type(e).__name__}: {_first_line(e)}")
    for w in caught:
        if issubclass(w.category, OtherComponentsWarning):
            print(f"ditq generate: warning: {str(w.message).removeprefix('ditq.load_lora: ')}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _save_row(images, path: str, scale: int = 4) -> None:
    """images (N, C, H, W) in [0, 1] side by side, each scaled up ``scale`` times (nearest) when small."""
    import torch
    from PIL import Image
    row = torch.cat(list(images.clamp(0, 1)), dim=-1)  # C, H, N*W
    arr = (row * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    if images.shape[-1] < 128:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)


def info(path: str) -> dict:
    """What ``ditq info`` prints, as a dict: format, config, quantized layers, bytes. The weights file is checked
    (readable safetensors header, the length it states, every tensor each layer needs, positive finite scales;
    only the scales are read): a corrupt checkpoint raises :class:`ditq.io.CheckpointError` naming the file."""
    from .io import WEIGHTS_NAME, check_scale_values, check_tensors, read_header, read_weights_index
    hdir = _header_dir(path)
    header = read_header(hdir)
    weights = os.path.join(hdir, WEIGHTS_NAME)
    index = read_weights_index(weights)
    check_tensors(header, index, weights)
    check_scale_values(header, weights)
    sizes = {k: v[2] for k, v in index.items()}
    layers = []
    for name, spec in header["layers"].items():
        fmt = spec["format"]
        nbytes = sum(b for k, b in sizes.items() if k.startswith(name + "."))
        layers.append(dict(name=name, in_features=spec["in_features"], out_features=spec["out_features"],
                           bits=fmt.get("bits"), group_size=fmt.get("group_size"), act_scheme=spec["act_scheme"],
                           act_scale=spec.get("act_scale"), act_scales=spec.get("act_scales"),
                           timestep_bounds=spec.get("timestep_bounds"), bytes=nbytes))
    quant_bytes = sum(layer["bytes"] for layer in layers)
    total = sum(sizes.values())
    full_precision = sum(layer["in_features"] * layer["out_features"] * 2 + layer["out_features"] * 2
                         for layer in layers)
    return dict(path=path, ditq_version=header.get("ditq_version"), layout=header.get("layout"),
                layout_version=header.get("layout_version"), model_class=header.get("model_class"),
                pipeline_class=header.get("pipeline_class"), quant_config=header.get("quant_config"),
                layers=layers, quantized_layer_bytes=quant_bytes, quantized_layers_bf16_bytes=full_precision,
                other_bytes=total - quant_bytes, total_bytes=total)


def _policy(cfg: dict) -> List[str]:
    """The settings beyond format and calibration mode that shaped a checkpoint, where they differ from the
    defaults (the weight rounding, the range estimator, timestep groups, smoothing, per-token layers, fusion)."""
    out = []
    if cfg.get("weight_method", "rtn") != "rtn":
        out.append(f"weights rounded by {cfg['weight_method']}")
    if cfg.get("group_scales", "float") != "float":
        out.append(f"{cfg['group_scales']} group scales")
    if cfg.get("act_scheme") == "static" and cfg.get("act_estimator", "max") != "max":
        out.append(f"ranges by {cfg['act_estimator']}")
    if (cfg.get("timestep_groups") or 1) > 1:
        out.append(f"up to {cfg['timestep_groups']} timestep groups")
    if cfg.get("smooth_alpha") is not None:
        out.append(f"smoothing alpha {cfg['smooth_alpha']}")
    if cfg.get("max_dynamic_layers"):
        out.append(f"up to {cfg['max_dynamic_layers']} per-token layers")
    if cfg.get("fuse"):
        out.append("fused")
    return out


def _scale_text(layer: dict) -> str:
    if layer["act_scale"] is None:
        return "dynamic"
    if layer["act_scales"]:  # one static scale per timestep group: the range they span
        return f"{min(layer['act_scales']):.3g}-{max(layer['act_scales']):.3g}"
    return f"{layer['act_scale']:.3g}"


def cmd_info(args) -> int:
    d = info(args.dir)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    cfg = d["quant_config"] or {}
    group = cfg.get("group_size") or "per-channel"
    print(f"{d['path']}: ditq {d['ditq_version']} checkpoint, layout {d['layout']} v{d['layout_version']}")
    print(f"model: {d['model_class']}" + (f" in {d['pipeline_class']}" if d["pipeline_class"] else ""))
    print(f"config: {cfg.get('weight_bits')}-bit weights (group {group}), {cfg.get('act_bits')}-bit activations "
          f"({cfg.get('act_scheme')}), calibration {cfg.get('calibration')}, backend {cfg.get('backend')}"
          + "".join(f", {text}" for text in _policy(cfg)))
    if args.layers:
        width = max([len(layer["name"]) for layer in d["layers"]] + [5])
        scales = [_scale_text(layer) for layer in d["layers"]]
        sw = max([len(t) for t in scales] + [10])
        print(f"\n{'layer':<{width}}  {'K':>6} {'N':>6}  {'format':<10} {'act scale':>{sw}} {'bytes':>9}")
        for layer, scale in zip(d["layers"], scales):
            fmt = f"w{layer['bits']}" + (f"g{layer['group_size']}" if layer["group_size"] else "") + "a8"
            print(f"{layer['name']:<{width}}  {layer['in_features']:>6} {layer['out_features']:>6}  {fmt:<10} "
                  f"{scale:>{sw}} {layer['bytes']:>9}")
        print()
    n = len(d["layers"])
    print(f"quantized layers: {n}; their bytes {d['quantized_layer_bytes']:,} (bf16 would be "
          f"{d['quantized_layers_bf16_bytes']:,}); other tensors {d['other_bytes']:,}; "
          f"transformer total {d['total_bytes']:,} bytes")
    from .io import HEADER_NAME
    second = os.path.join(args.dir, "transformer_2")
    if os.path.isfile(os.path.join(second, HEADER_NAME)):  # Wan 2.2's low-noise expert, quantized too
        print(f"the pipeline's second transformer is quantized too: ditq info {second}")
    return 0


# ---- parser -------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from .config import ACT_ESTIMATORS, ACT_SCHEMES, CALIBRATION_MODES, PRESETS, WEIGHT_METHODS
    from .format import GROUP_SCALES, SUPPORTED_GROUP_SIZES
    backends = ("auto", "torch", "triton", "cuda", "cuda-emulated")

    p = argparse.ArgumentParser(prog="ditq", description="Post-training int8/int4 quantization of diffusion "
                                "transformers (DiT): quantize, inspect, generate, and a demo on a bundled model.")
    from . import __version__
    p.add_argument("--version", action="version", version=f"ditq {__version__}")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    from .demo.run import DEFAULT_SAMPLES_PER_CLASS, DEFAULT_SETTINGS, DEFAULT_STEPS, SETTINGS
    d = sub.add_parser("demo", help="quantize the bundled digits DiT several ways and compare the samples",
                       description="Samples the bundled digits DiT in full precision and in each chosen setting "
                       "(W8A8 / W4A8 with the paper's first-step calibration, all-steps calibration, ditq's static "
                       "policy, dynamic per-token scales) from the same seeds; prints a table and writes demo.png and "
                       "demo.json into --out. Without --settings it runs fp32, the paper's first-step W8A8 and W4A8 "
                       "and ditq's policy in both formats; --settings all adds all-steps max ranges and per-token "
                       "scales (all nine took 853 s of CPU time on a loaded 2-core CPU).")
    d.add_argument("--out", default="ditq-demo", help="output directory (default: ./ditq-demo)")
    d.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"sampling steps (default {DEFAULT_STEPS})")
    d.add_argument("--samples-per-class", type=int, default=DEFAULT_SAMPLES_PER_CLASS,
                   help=f"images per digit class and setting (default {DEFAULT_SAMPLES_PER_CLASS})")
    d.add_argument("--backend", default="auto", choices=backends, help="kernel backend (default auto: GPU kernels "
                   "when there is a GPU, else the torch reference)")
    d.add_argument("--settings", nargs="+", choices=list(SETTINGS) + ["all"], metavar="SETTING",
                   help=f"settings to run, from {', '.join(SETTINGS)}, or all (default "
                   f"{' '.join(DEFAULT_SETTINGS)}; fp32 always runs)")
    d.add_argument("--seed", type=int, default=0, help="seed of the sampling noise (default 0)")
    d.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)

    q = sub.add_parser("quantize", help="quantize a DiT-family pipeline and save it",
                       description="Calibrates activation scales (default: on the first sampling step only), "
                       "quantizes the transformer's linears (each of the two of a Wan 2.2 A14B pipeline, "
                       "calibrated on its own first step) and writes a ditq checkpoint directory.")
    q.add_argument("model", metavar="MODEL",
                   help=f"'{BUNDLED}', a local diffusers pipeline directory, or a hub id (needs internet)")
    q.add_argument("--preset", required=True, choices=sorted(PRESETS), help="w8a8 or w4a8 (int4, groups of 128)")
    q.add_argument("--calibration", default="first-step", choices=CALIBRATION_MODES,
                   help="which sampling steps set the activation scales (default first-step, as in the paper)")
    q.add_argument("--act-scheme", default="static", choices=ACT_SCHEMES,
                   help="static (calibrated) or dynamic (per token at run time) activation scales")
    q.add_argument("--group-size", type=int, default=None, choices=SUPPORTED_GROUP_SIZES,
                   help="int4 group size along K (default 128)")
    q.add_argument("--weight-method", default="rtn", choices=WEIGHT_METHODS,
                   help="how weights are rounded: rtn (absmax scales, round to nearest; default), mse (per-group "
                   "clip search) or gptq (error-compensating rounding on the calibration inputs)")
    q.add_argument("--group-scales", default="float", choices=GROUP_SCALES,
                   help="w4a8: float (a float scale per group; default) or int (an integer multiple in [1, 16] of a "
                   "float scale per output channel: Hopper GPUs then keep one int32 sum over K)")
    q.add_argument("--act-estimator", default="max", choices=ACT_ESTIMATORS,
                   help="range of a static scale: max |x| (default, the paper), percentile, mse, or auto per layer")
    q.add_argument("--timestep-groups", type=int, default=1, metavar="G",
                   help="one static scale per group of similar sampling steps (needs --calibration all-steps)")
    q.add_argument("--smooth-alpha", type=float, default=None, metavar="A",
                   help="SmoothQuant-style outlier migration of strength A in (0, 1], folded into the weights")
    q.add_argument("--max-dynamic-layers", type=int, default=0, metavar="N",
                   help="let the N layers a static scale fits worst use per-token scales (default 0)")
    q.add_argument("--fuse", action="store_true",
                   help="run q/k/v as one GEMM and fuse the block norms into the next GEMM's quantization")
    q.add_argument("--backend", default="auto", choices=backends, help="kernel backend (default auto)")
    q.add_argument("--calib-labels", type=int, nargs="+", default=None, metavar="C",
                   help="class labels for calibration (class-conditional models; default 0..min(classes,16)-1)")
    q.add_argument("--calib-prompts", nargs="+", default=None, metavar="PROMPT",
                   help="prompts for calibration (text-to-image models)")
    q.add_argument("--calib-steps", type=int, default=25,
                   help="num_inference_steps of each calibration run (default 25)")
    q.add_argument("--device", default="cpu", help="torch device (default cpu)")
    q.add_argument("--out", required=True, help="directory to write the checkpoint to")
    q.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    q.add_argument("--quiet", action="store_true", help="no progress bars or per-layer table")
    q.set_defaults(func=cmd_quantize)

    g = sub.add_parser("generate", help="sample images from a ditq checkpoint (or 'bundled')",
                       description="Loads a checkpoint written by 'ditq quantize' (or a full-precision pipeline "
                       "directory, or 'bundled') and writes one PNG with the images side by side.")
    g.add_argument("model", metavar="DIR", help="a checkpoint directory from 'ditq quantize', a full-precision "
                   "pipeline directory, or 'bundled'")
    cond = g.add_mutually_exclusive_group(required=True)
    cond.add_argument("--class-labels", type=int, nargs="+", metavar="C",
                      help="one image per label (class-conditional models: DiT)")
    cond.add_argument("--prompt", nargs="+", metavar="PROMPT",
                      help="one image per prompt (text-to-image models: PixArt, SD3, FLUX; needs their text encoders)")
    g.add_argument("--lora", metavar="FILE", help="a LoRA adapter (.safetensors, diffusers / peft or community keys) "
                   "run beside the quantized weights (ditq.load_lora)")
    g.add_argument("--lora-scale", type=float, default=None, metavar="S", help="the adapter's strength (default 1)")
    g.add_argument("--steps", type=int, default=25, help="sampling steps (default 25)")
    g.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    g.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (pipeline default)")
    g.add_argument("--backend", default=None, choices=backends, help="kernel backend (default: the checkpoint's)")
    g.add_argument("--device", default="cpu", help="torch device (default cpu)")
    g.add_argument("--out", required=True, help="image file to write (.png, .jpg, ...; its directory must exist)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="describe a ditq checkpoint: format, layers, bytes",
                       description="Reads a checkpoint's header, its tensor sizes and scales (the weights "
                       "themselves are not loaded) and reports a truncated or corrupt checkpoint as an error.")
    i.add_argument("dir", metavar="DIR", help="checkpoint directory")
    i.add_argument("--layers", action="store_true", help="list every quantized layer")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    i.set_defaults(func=cmd_info)
    return p


def _check_numbers(args) -> None:
    for name in ("steps", "samples_per_class", "calib_steps"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    g = getattr(args, "guidance_scale", None)
    if g is not None and not math.isfinite(g):
        raise CLIError(f"--guidance-scale must be a finite number, got {g}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command != "info":  # info reads files only: it never imports diffusers (seconds saved)
        if getattr(args, "quiet", False):
            # the hub's bars too (downloads), whose switch transformers' own loading bars ("Loading weights" of a
            # text encoder) copy when transformers is imported: diffusers' logging, just below, imports it
            from huggingface_hub.utils import disable_progress_bars
            disable_progress_bars()
        from diffusers.utils import logging as dlogging
        dlogging.disable_progress_bar()  # "Loading pipeline components" bars; ours and the sampling bars stay
    try:
        _check_numbers(args)
        _check_device_and_backend(args)
        return args.func(args)
    except KeyboardInterrupt:
        print("ditq: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # every failure is one line unless --debug; library errors already name the problem
        if args.debug:
            raise
        what = "" if isinstance(e, CLIError) else f"{type(e).__name__}: "
        if _is_user_error(e):
            print(f"ditq {args.command}: error: {what}{_first_line(e)}", file=sys.stderr)
            return 2
        print(f"ditq {args.command}: error: {what}{_first_line(e)} (unexpected: rerun with --debug for the "
              f"traceback)", file=sys.stderr)
        return 1


def _is_user_error(e: BaseException) -> bool:
    """What the user can fix: bad input (ValueError / TypeError: QuantConfig, checkpoints, devices, ops), the file
    system, a backend that cannot run here, calibration data that does not run, and the CLI's own checks."""
    user = (CLIError, ValueError, TypeError, OSError)
    try:
        from .backends import BackendUnavailableError
        from .calibrate import CalibrationError
        from .convert import QuantizeError
    except ImportError:  # the failure may be ditq's own import: then only the plain classes count
        return isinstance(e, user)
    return isinstance(e, user + (BackendUnavailableError, CalibrationError, QuantizeError))


if __name__ == "__main__":
    sys.exit(main())

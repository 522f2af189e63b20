"""``ditq.quantize``: calibrate, then swap a DiT's linears for packed :class:`ditq.nn.QuantLinear` layers.

Order of work, chosen so that a failure leaves the user's model exactly as it was:

1. validate the config, resolve the backend, pick the layers (nothing touched yet);
2. calibrate with hooks only (static scheme; the dynamic scheme needs no ranges, but the transformer's first-step
   inputs are still recorded so the report can measure it);
3. re-run the transformer in full precision on the recorded first-step inputs: reference outputs and per-layer
   activation SQNRs;
4. swap layer by layer: each ``nn.Linear`` is quantized on its own (a transient fp32 copy of one weight) and
   replaced; the originals are kept only until the last swap and the check run succeed, so the peak is the
   model plus its packed weights (at most ~1.5x a bf16 model for W8, not a second full copy). Any error
   restores every original layer. On the CPU the C heap's freed pages go back to the OS after calibration and
   after each layer (``calibrate.release_freed_memory``): glibc would otherwise keep every transient resident,
   and peak RSS would approach a second copy of the model after all (measured on DiT-XL/2 in float32:
   +3.1 GiB over a 2.8 GiB model without, +0.9 GiB with);
5. re-run the quantized transformer on the same inputs: model-output SQNR.

Which layers: every ``nn.Linear`` of the transformer (and every 1x1 convolution, run as a linear for the whole
quantization and left so where it is quantized: :mod:`ditq.pointwise`), minus the default list (``DEFAULT_SKIP``,
and the two rules below it), minus ``cfg.skip``; ``cfg.include`` restricts the candidates and overrides the default list. The
default list comes from quantizing one group of layers at a time in two tiny random ``DiTTransformer2DModel`` (2
blocks, 4x16 heads, 8x8x4 input; seeds 0 / 1; static scales calibrated at the first step, t = T, on 4 class
labels) and measuring the transformer's output SQNR vs full precision on fresh inputs at random timesteps, in dB,
seed 0 / seed 1 (``python3 benchmarks/skip_study.py`` prints this table):

==========================================  ===========  ===========  ==============  =============================
group (diffusers DiT names)                 W4A8 g32     W8A8         W8A8 per-token  DiT-XL/2 linear weights
==========================================  ===========  ===========  ==============  =============================
timestep embedders ``*timestep_embedder*``  34.8 / 43.6  34.7 / 47.5  63.2 / 65.8     6.3% (one embedder per block)
adaLN modulation ``*norm1.linear``          35.2 / 37.5  49.4 / 53.3  53.0 / 55.7     31.1%
attention q / k / v / out                   35.6 / 37.5  52.6 / 57.2  56.6 / 59.5     20.7%
MLP fc1 / fc2                               37.0 / 39.0  50.3 / 52.6  54.9 / 55.9     41.5%
final adaLN ``proj_out_1``                  29.7 / 32.2  44.9 / 47.2  47.4 / 49.1     0.4%
final projection ``proj_out_2``             23.8 / 23.7  38.7 / 39.6  42.6 / 42.9     <0.1%
all of them                                 22.4 / 22.4  32.9 / 37.8  40.7 / 41.6     100%
all but ``proj_out*``                       29.6 / 32.8  34.3 / 45.2  50.0 / 52.0     99.6%
==========================================  ===========  ===========  ==============  =============================

The two output layers alone cost more than any other group (proj_out_2 alone caps the output at ~24 dB in
W4A8) for 0.4% of the bytes: they write the prediction directly, with nothing after them to average errors
out. So ``proj_out*`` and ``norm_out.linear`` (the final adaLN of PixArt / SD3 / Flux, proj_out_1's analogue)
stay in full precision. The adaLN linears are *quantized* by default: they hurt no more than attention, and
they are a third of DiT-XL's linear weights, so skipping them would give up ~1/3 of the byte savings (add
``"*norm1.linear"`` to ``skip`` to keep them). The timestep embedders (``*timestep_embedder*``, and FLUX's
``*guidance_embedder*``: a two-layer MLP on the sinusoidal projection of t) stay in full precision. Scales
calibrated at one timestep fit them poorly, because the range of their second linear's input moves with t (with
seed 0 they cost as much in W8A8 as in W4A8, 34.7 dB, and 63.2 dB with per-token scales: the error is the static
range, not the weights);
and they run on one row per image, once per forward per distinct embedder
(DiT checkpoints converted from the original hold one embedder copied into every block), where int8 buys no
speed and costs an activation quantization per linear, i.e. two launches where the float GEMM needs one; what
they would save is 6.3% of DiT-XL/2's linear weight bytes (0.2% of FLUX.1-dev's). With them in float, a fused
DiT block launches 8 ditq ops in all (its embedder included), and the adaLN GEMM quantizes the float
conditioning as it loads it (``gemm_w8a8_fused`` with a float input). ``include=["*timestep_embedder*", ...]``
quantizes them anyway.
Not measured (random weights cannot show it) but kept in full precision: the projections of *text-encoder
features* (``caption_projection``, ``context_embedder``, ``text_embedder``, and their names in other families):
T5 / CLIP / LLM hidden states carry outliers in the hundreds that one static int8 scale cannot hold, and these
layers run once per prompt token, not on image tokens.

Other families name the same jobs differently (Z-Image's ``all_final_layer``, Lumina2's ``norm_out.linear_2``,
Qwen-Image's ``txt_in``, Wan's ``condition_embedder.time_embedder``); ``DEFAULT_SKIP`` lists their patterns, and two
rules catch what names cannot: linears inside a module of a class in ``DEFAULT_SKIP_CLASSES`` (the timestep MLPs)
and those under the model's own ``_keep_in_fp32_modules``. The tiny models of eleven such families in
``tests/ditq/test_more_families.py`` hold each family to it.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from . import backends
from . import timestep_groups as tgroups
from . import pointwise, weight_rounding
from .calibrate import (ESTIMATORS, CalibrationError, Calibrator, calibrate, hist_sqnr, pipeline_runs,
                        release_freed_memory)
from .config import QuantConfig, QuantConfigError
from .nn import QuantLinear, dequantize_weight
from .quant import reference as ref
from .report import LayerReport, QuantReport, UnquantizedLayersWarning

# pattern (fnmatch on the module name relative to the transformer) -> why it stays in full precision. fnmatch's
# "*" also matches dots, so a pattern that means one module name spells out its dot ("*.text_embedder*"): a bare
# "*text_embedder*" would also match "context_embedder.*".
_TEXT = "projects text-encoder features (T5 / LLM outliers do not fit one static int8 scale)"
_TIMESTEP_MLP = ("timestep embedding MLP: one row per image, once per forward (int8 saves no time, adds an activation "
                 "quantization per linear; see ditq.convert)")
DEFAULT_SKIP: Dict[str, str] = {
    "proj_out*": "output layer: writes the prediction directly (measured: the costliest layers, see ditq.convert)",
    "norm_out.linear*": "final adaLN feeding the output layer, or (Lumina2's linear_2) the output layer itself "
                        "(kept like DiT's proj_out_1 / proj_out_2)",
    "*final_layer*": "final adaLN and output layer (Z-Image, HiDream, Cosmos: DiT's proj_out_1 / proj_out_2 by "
                     "another name)",
    "*caption_projection*": _TEXT,
    "context_embedder": _TEXT,
    "context_embedder.*": "text-side input stage (HunyuanVideo's token refiner): " + _TEXT,
    "*caption_embedder*": _TEXT,
    "cap_embedder*": _TEXT,
    "txt_in": _TEXT,
    "*.text_proj": _TEXT,
    "text_embedder*": "projects pooled text-encoder features",
    "*.text_embedder*": "projects pooled text-encoder features",
    "*timestep_embedder*": _TIMESTEP_MLP,
    "*guidance_embedder*": "guidance embedding MLP (FLUX): one row per image, like the timestep embedder",
}

# Class names of modules whose linears stay in full precision wherever they sit, whatever a model calls them:
# diffusers' TimestepEmbedding (Wan's ``time_embedder``, CogVideoX's ``time_embedding``, AuraFlow's
# ``time_step_proj``, besides every ``*timestep_embedder*``) and the TimestepEmbedder of Z-Image and of the original
# DiT code. Some models also read these layers' ``weight.dtype`` in their own forward.
DEFAULT_SKIP_CLASSES: Dict[str, str] = {
    "TimestepEmbedding": _TIMESTEP_MLP,
    "TimestepEmbedder": _TIMESTEP_MLP,
}


class QuantizeError(RuntimeError):
    """``ditq.quantize`` refused or failed; the model was left as it was."""


# The pipeline attributes that hold a denoising transformer. Wan 2.2 A14B's pipelines hold two experts of the same
# architecture: ``transformer`` for the high-noise steps (t at or above the pipeline's boundary) and
# ``transformer_2`` for the rest; each is quantized, saved, loaded and given LoRAs on its own.
DENOISER_COMPONENTS = ("transformer", "transformer_2")


class UnquantizedComponentWarning(UserWarning):
    """``ditq.quantize`` quantized one transformer of a pipeline that holds another still in full precision."""


# ---- helpers ------------------------------------------------------------------------------------------

def _target(obj, what: str = "ditq.quantize", component: str = "transformer") -> Tuple[nn.Module, Optional[object]]:
    """(transformer, pipeline or None) of what a public function (``what``, for the error) was given: a module, or
    a pipeline's ``component`` (one of :data:`DENOISER_COMPONENTS`). A module ``torch.compile`` wrapped
    (``OptimizedModule``) stands for the module it compiled, whose layer names are the model's (the wrapper
    prefixes them with ``_orig_mod.``); the compiled code recompiles on its next call where what it traced
    changed."""
    if component not in DENOISER_COMPONENTS:
        raise ValueError(f"{what}: component must be one of {', '.join(map(repr, DENOISER_COMPONENTS))}, got "
                         f"{component!r}")
    if isinstance(obj, nn.Module):
        if component != "transformer":
            raise ValueError(f"{what}: component={component!r} names a pipeline's transformer, but this is a "
                             f"{type(obj).__name__} module: pass the pipeline, or the module itself without component")
        return _uncompiled(obj), None
    t = getattr(obj, component, None)
    if isinstance(t, nn.Module):
        return _uncompiled(t), obj
    others = [c for c in DENOISER_COMPONENTS if c != component and isinstance(getattr(obj, c, None), nn.Module)]
    if others:
        raise ValueError(f"{what}: this {type(obj).__name__} has no {component} (it holds {' and '.join(others)}: "
                         f"pass component={others[0]!r})")
    raise TypeError(f"{what} takes a diffusers pipeline with a .transformer or an nn.Module, got "
                    f"{type(obj).__name__}")


def denoisers(pipe) -> Dict[str, nn.Module]:
    """The pipeline's transformers by attribute name (:data:`DENOISER_COMPONENTS` it holds), in that order."""
    return {c: _uncompiled(m) for c in DENOISER_COMPONENTS if isinstance(m := getattr(pipe, c, None), nn.Module)}


def _uncompiled(module: nn.Module) -> nn.Module:
    from torch._dynamo.eval_frame import OptimizedModule

    while isinstance(module, OptimizedModule):
        module = module._orig_mod
    return module


def _match(name: str, patterns) -> Optional[str]:
    for p in patterns:
        if fnmatch.fnmatchcase(name, p):
            return p
    return None


def is_quantized(module: nn.Module) -> bool:
    return getattr(module, "_ditq_config", None) is not None or \
        any(isinstance(m, QuantLinear) for m in module.modules())


def module_bytes(module: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + [b for b in module.buffers() if b is not None]:
        if t.device.type == "meta" or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def linear_aliases(transformer: nn.Module) -> Dict[str, List[str]]:
    """first name -> every name of one nn.Linear reachable under several names (``s.b = s.a``); others absent."""
    names: Dict[int, List[str]] = {}
    for n, m in transformer.named_modules(remove_duplicate=False):
        if isinstance(m, nn.Linear) and n not in names.setdefault(id(m), []):
            names[id(m)].append(n)
    return {ns[0]: ns for ns in names.values() if len(ns) > 1}


def select_layers(transformer: nn.Module, cfg: QuantConfig) -> Tuple[Dict[str, nn.Linear], Dict[str, str]]:
    """(candidates name -> nn.Linear, skipped name -> reason) under ``cfg``'s rules.

    A linear reachable under several names is one candidate under its first name; it is quantized only if every
    one of its names passes the rules (a skip pattern on any name keeps it in full precision)."""
    fmt = cfg.weight_format
    cands, skipped = {}, {}
    linears = [(n, m) for n, m in transformer.named_modules() if isinstance(m, nn.Linear)]
    aliases = linear_aliases(transformer)
    kept = _kept_by_model(transformer) if cfg.default_skip and not cfg.include else {}
    for p in cfg.include:
        if not any(fnmatch.fnmatchcase(n, p) for n, _ in linears):
            raise QuantConfigError(f"include pattern {p!r} matches no nn.Linear of the "
                                   f"{type(transformer).__name__}")
    for name, lin in linears:
        why = None
        for alias in aliases.get(name, [name]):
            why = _skip_reason(alias, cfg, kept)
            if why:
                if alias != name:
                    why = f"{why} (for its other name {alias!r})"
                break
        if why:
            skipped[name] = why
            continue
        k = lin.in_features
        if fmt.group_size is not None and k % fmt.group_size:
            fits = sorted((g for g in backends.kernel_group_sizes() if k % g == 0), reverse=True)
            skipped[name] = f"group_size {fmt.group_size} does not divide K = {k}" + (
                f" (group_size {fits[0]} would)" if fits else "")
        elif k > ref.MAX_K:
            skipped[name] = f"K = {k} exceeds {ref.MAX_K}, the largest K ditq's int8 GEMMs take"
        elif lin.weight.device.type == "meta":
            skipped[name] = "weight is on the meta device (not loaded)"
        elif not lin.weight.is_floating_point():
            skipped[name] = f"weight dtype {lin.weight.dtype} is not floating point"
        elif not bool(torch.isfinite(lin.weight).all()):
            skipped[name] = "weight holds NaN or inf"
        else:
            cands[name] = lin
    return cands, skipped


def _skip_reason(name: str, cfg: QuantConfig, kept: Dict[str, str]) -> Optional[str]:
    p = _match(name, cfg.skip)
    if p:
        return f"skip pattern {p!r}"
    if cfg.include:
        if not _match(name, cfg.include):
            return "not matched by any include pattern"
    elif cfg.default_skip:
        p = _match(name, DEFAULT_SKIP)
        if p:
            return f"default skip list: {DEFAULT_SKIP[p]}"
        if name in kept:
            return f"default skip list: {kept[name]}"
    return None


def _kept_by_model(transformer: nn.Module) -> Dict[str, str]:
    """name -> reason for the linears the default list keeps by what they are rather than by their name: those
    inside a module of a class in ``DEFAULT_SKIP_CLASSES``, and those the model itself keeps in float32
    (diffusers' ``_keep_in_fp32_modules``: a name component equal to an entry, diffusers' own rule; its quantizers
    skip these modules too)."""
    fp32 = [m for m in (getattr(transformer, "_keep_in_fp32_modules", None) or []) if isinstance(m, str)]
    kept: Dict[str, str] = {}
    for name, mod in transformer.named_modules(remove_duplicate=False):
        if name in kept:
            continue
        cls = type(mod).__name__
        part = next((m for m in fp32 if m in name.split(".")), None)
        if part is not None:  # the model's own word first
            why = (f"the model keeps {part!r} in float32 (its _keep_in_fp32_modules; diffusers' own quantizers "
                   f"skip it too)")
        elif cls in DEFAULT_SKIP_CLASSES:
            why = f"inside a {cls}: {DEFAULT_SKIP_CLASSES[cls]}"
        else:
            continue
        for sub, child in mod.named_modules(prefix=name, remove_duplicate=False):
            if isinstance(child, nn.Linear):
                kept.setdefault(sub, why)
    return kept


def _output_tensor(out) -> torch.Tensor:
    """The prediction in a transformer's output: a tensor, ``.sample``, or the first entry of a tuple / dict. A
    prediction given as a list of tensors (Z-Image: one per image, sizes may differ) is their flattened
    concatenation, so the output SQNR weighs every image."""
    if torch.is_tensor(out):
        return out
    sample = getattr(out, "sample", None)
    if sample is not None:
        out = [sample]
    elif isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)) and out:
        first = out[0]
        if torch.is_tensor(first):
            return first
        if isinstance(first, (list, tuple)) and first and all(torch.is_tensor(t) for t in first):
            return torch.cat([t.reshape(-1) for t in first])
    raise QuantizeError(f"cannot find a tensor in the transformer's output ({type(out).__name__})")


def _rerun(transformer, inputs) -> List[torch.Tensor]:
    outs = []
    with torch.no_grad():
        for args, kwargs in inputs:
            outs.append(_output_tensor(transformer(*args, **kwargs)).detach().clone())
    return outs


class _ActErrors:
    """Hooks accumulating ‖x‖² and ‖x − Q(x)‖² of each layer's input under the scheme it will run."""

    def __init__(self, layers: Dict[str, nn.Linear], scales: Dict[str, Optional[torch.Tensor]], dynamic):
        self.signal = {n: 0.0 for n in layers}
        self.noise = {n: 0.0 for n in layers}
        dyn = (lambda n: dynamic) if isinstance(dynamic, bool) else (lambda n: n in dynamic)
        self.handles = [lin.register_forward_pre_hook(self._hook(n, scales.get(n), dyn(n)))
                        for n, lin in layers.items()]

    def _hook(self, name, scale, dynamic):
        def hook(module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            if dynamic:
                q, s = ref.quantize_per_token(x)
                xq = q.float() * s[:, None]
            else:
                s = scale.to(x.device)
                xq = ref.quantize_with_scale(x, s, ref.INT8_QMAX).float() * s
            self.signal[name] += float(x.double().pow(2).sum())
            self.noise[name] += float((x.double() - xq.double()).pow(2).sum())
        return hook

    def sqnr(self, name) -> Optional[float]:
        import math
        s, n = self.signal[name], self.noise[name]
        if s == 0 and n == 0:
            return None
        return math.inf if n == 0 else 10 * math.log10(s / n)

    def remove(self):
        for h in self.handles:
            h.remove()


def _weight_sqnr(w: torch.Tensor, can: dict, fmt, rows: int = 256) -> float:
    """SQNR of the packed weight vs the original, in row chunks so the transient stays a fraction of a layer."""
    import math
    signal = noise = 0.0
    for r0 in range(0, w.shape[0], rows):
        wq = dequantize_weight(can["qweight"][r0:r0 + rows], can["scales"][..., r0:r0 + rows], fmt).double()
        wc = w[r0:r0 + rows].double()
        signal += float(wc.pow(2).sum())
        noise += float((wc - wq).pow(2).sum())
    if noise == 0:
        return math.inf
    return -math.inf if signal == 0 else 10 * math.log10(signal / noise)


def _round(q: QuantLinear, lin: nn.Linear, fmt, method: str, hessian: Optional[torch.Tensor]) -> dict:
    """Replace ``q``'s round-to-nearest weights (from ``from_linear``) by ``method``'s; returns the report fields.

    With a Hessian (gptq) the layer-output SQNRs of both roundings are estimated from it: GPTQ trades weight error
    for output error, so the weight SQNR alone would not show what it gained."""
    w = lin.weight.detach()
    if method == "gptq" and hessian is None:
        raise QuantizeError("weight_method='gptq': no input Hessian was recorded for this layer (it did not run in "
                            "the calibration steps)")
    rtn = dequantize_weight(*q._canonical_weight(), fmt) if hessian is not None else None
    qweight, scales = weight_rounding.quantize_weight(w, fmt, method, hessian)
    q.load_canonical(qweight.to(q.qweight.device), scales.to(q.qweight.device),
                     None if lin.bias is None else lin.bias.detach().clone(), q.act_scale)
    if hessian is None:
        return {}
    new = dequantize_weight(qweight, scales, fmt)
    return {"layer_output_sqnr": weight_rounding.output_sqnr(w, new, hessian),
            "layer_output_sqnr_rtn": weight_rounding.output_sqnr(w, rtn, hessian)}


def _parent(root: nn.Module, name: str) -> Tuple[nn.Module, str]:
    if "." not in name:
        return root, name
    path, attr = name.rsplit(".", 1)
    return root.get_submodule(path), attr


def _sqnr_total(refs, outs) -> Tuple[Optional[float], List[float]]:
    if not refs:
        return None, []
    per = [ref.sqnr(r, o) for r, o in zip(refs, outs)]
    total = ref.sqnr(torch.cat([r.flatten().double() for r in refs]),
                     torch.cat([o.flatten().double() for o in outs]))
    return total, per


# ---- the entry point ----------------------------------------------------------------------------------

def quantize(pipe_or_module, cfg: QuantConfig, calib_inputs=None,
             calib_fn: Optional[Callable] = None, component: str = "transformer") -> QuantReport:
    """Quantize the transformer of a diffusers pipeline (``pipe.transformer``) or any ``nn.Module`` in place.

    Args:
        pipe_or_module: a pipeline with a ``.transformer``, or the module to quantize.
        cfg: a :class:`ditq.QuantConfig` (or its dict).
        calib_inputs: for a pipeline, its call's kwargs (``class_labels=..., num_inference_steps=...``) or a list
            of them, one calibration run each; a fixed generator is added when none is given.
        calib_fn: instead of ``calib_inputs``: ``calib_fn(pipe_or_module)`` runs the forwards of one calibration
            run (required for a bare module with the static scheme).
        component: which transformer of the pipeline: ``"transformer"``, or ``"transformer_2"`` (Wan 2.2 A14B's
            low-noise expert, which the pipeline calls below its boundary timestep). Each is calibrated on its
            own steps of the pipeline runs, its first one being the noisiest it sees; quantize one, then the
            other. A pipeline left with a full-precision second transformer gets an
            :class:`UnquantizedComponentWarning`.

    Returns a :class:`ditq.report.QuantReport`. Raises :class:`QuantizeError` / ``QuantConfigError`` /
    :class:`ditq.calibrate.CalibrationError` with the model untouched.
    """
    if isinstance(cfg, dict):
        cfg = QuantConfig.from_dict(cfg)
    transformer, pipe = _target(pipe_or_module, component=component)
    # 1x1 convolutions become linears for the whole run (ditq.pointwise); those not quantized are put back
    wrapped = [] if is_quantized(transformer) else pointwise.wrap(transformer)
    try:
        report = _quantize(pipe_or_module, transformer, pipe, cfg, calib_inputs, calib_fn)
    except BaseException:
        pointwise.unwrap(transformer, wrapped)
        raise
    kept = [n for n in wrapped if isinstance(transformer.get_submodule(n).linear, QuantLinear)]
    pointwise.unwrap(transformer, [n for n in wrapped if n not in kept])
    for name in kept:
        transformer.get_submodule(name).release()
    return report


def _quantize(pipe_or_module, transformer, pipe, cfg, calib_inputs, calib_fn) -> QuantReport:
    if not isinstance(cfg, QuantConfig):
        raise TypeError(f"cfg must be a ditq.QuantConfig, got {type(cfg).__name__}")
    if isinstance(transformer, nn.Linear):
        raise QuantizeError("ditq.quantize replaces the linears *inside* a module in place, and a bare nn.Linear "
                            "cannot replace itself: use ditq.nn.QuantLinear.from_linear(linear, cfg, act_scale), "
                            "or quantize a module that holds it (e.g. nn.Sequential(linear))")
    if is_quantized(transformer):
        raise QuantizeError(f"this {type(transformer).__name__} is already quantized by ditq; quantize the "
                            f"full-precision model (quantizing twice would compound the errors)")
    if calib_inputs is not None and calib_fn is not None:
        raise QuantizeError("give calib_inputs or calib_fn, not both")
    if calib_inputs is not None and pipe is None:
        raise QuantizeError("calib_inputs are pipeline call arguments; for a bare module pass "
                            "calib_fn=lambda m: m(...)")
    if calib_fn is not None and not callable(calib_fn):
        raise QuantizeError(f"calib_fn must be callable, got {type(calib_fn).__name__}")
    has_calib = calib_inputs is not None or calib_fn is not None
    if cfg.needs_calibration and not has_calib:
        raise QuantizeError("the static activation scheme needs calibration data: pass calib_inputs (pipeline) "
                            "or calib_fn, or use act_scheme='dynamic'")
    gptq = cfg.weight_method == "gptq"
    if gptq and not has_calib:
        raise QuantizeError("weight_method='gptq' rounds each weight against its layer's calibration inputs: pass "
                            "calib_inputs (pipeline) or calib_fn, or use weight_method='mse' or 'rtn'")

    first = next(iter(transformer.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    backend = backends.resolve(cfg.backend, device)

    layers, skipped = select_layers(transformer, cfg)
    if not layers:
        why = "; ".join(f"{n}: {r}" for n, r in list(skipped.items())[:8]) or "it has no nn.Linear"
        raise QuantizeError(f"no quantizable layer in the {type(transformer).__name__} ({why})")
    aliases = {n: a for n, a in linear_aliases(transformer).items() if n in layers}

    bytes_before = module_bytes(transformer)

    # 2. calibration (hooks only); smoothing, when asked for, changes float weights and is undone on any error
    cal = None
    runs = []
    smoothing = None
    plans: Dict[str, _Plan] = {}
    groups: List[Optional[List[int]]] = [None]
    bounds: List[float] = []
    rising = False
    policy: List[str] = []
    try:
        if has_calib:
            if calib_fn is not None:
                runs = [lambda: calib_fn(pipe_or_module)]
            else:
                runs = pipeline_runs(pipe, calib_inputs)
            steps = cfg.calibration_steps() if cfg.needs_calibration or gptq else [0]
            cal = calibrate(transformer, layers, runs, steps, record_ranges=cfg.needs_calibration,
                            progress=cfg.progress, pipe=pipe, record_hessian=gptq)
            release_freed_memory(device)  # the forwards' activations and the observers' temporaries
        if cfg.needs_calibration:
            for name in list(layers):
                rec = cal.absmax[name]
                if not rec:
                    skipped[name] = "never ran during calibration (no activation range)"
                    del layers[name]
                elif max(rec.values()) == 0:
                    # One scale for all-zero data is arbitrary (any value quantizes zeros exactly), and any
                    # non-zero input at run time would meet a scale calibrated on nothing: keep it in full precision.
                    warnings.warn(f"ditq: layer {name!r} saw only zero activations in calibration; it stays in full "
                                  f"precision (no range to calibrate)", stacklevel=3)
                    skipped[name] = "all calibration activations were zero (no range to calibrate)"
                    del layers[name]
            if not layers:
                raise CalibrationError("no candidate layer ran during calibration with a non-zero input; nothing "
                                       "to quantize")
            if cfg.smooth_alpha is not None:
                smoothing, cal = _smooth(transformer, layers, cal, runs, cfg, pipe, policy)
            if cfg.timestep_groups > 1:
                recorded = sorted(set().union(*(set(cal.absmax[n]) for n in layers)))
                groups = tgroups.choose_groups({n: cal.absmax[n] for n in layers}, recorded, cfg.timestep_groups)
                if len(groups) > 1:
                    bounds = tgroups.timestep_bounds(groups, cal.timesteps)
                    rising = tgroups.rising(groups, cal.timesteps)
                else:
                    groups = [None]
            for name in layers:
                plans[name] = _plan(cal, name, groups, cfg, rising)
            if cfg.max_dynamic_layers:
                worst = sorted(plans, key=lambda n: (plans[n].traj_sqnr if plans[n].traj_sqnr is not None
                                                     else math.inf))[: cfg.max_dynamic_layers]
                for n in worst:
                    plans[n].dynamic = True
                policy.append(f"dynamic per-token (budget {cfg.max_dynamic_layers}): " + ", ".join(
                    f"{n} (static estimate {plans[n].traj_sqnr:.1f} dB)" for n in worst))
    except BaseException:
        if smoothing is not None:
            smoothing.restore()
        raise
    scales: Dict[str, Optional[torch.Tensor]] = {n: p.scale for n, p in plans.items() if not p.dynamic}
    dynamic_layers = {n for n in layers if not cfg.needs_calibration or plans[n].dynamic}

    # 3. full-precision reference on the recorded first-step inputs
    inputs = cal.first_step_inputs if cal is not None else []
    act = _ActErrors(layers, scales, dynamic=dynamic_layers)
    try:
        refs = _rerun(transformer, inputs)
    except Exception as e:
        if smoothing is not None:
            smoothing.restore()
        raise QuantizeError(f"re-running the transformer on the recorded inputs failed: {e}") from e
    finally:
        act.remove()

    # 4. layer-by-layer swap, restorable
    from tqdm.auto import tqdm
    swapped: List[Tuple[nn.Module, str, nn.Linear]] = []
    reports: List[LayerReport] = []
    fmt = cfg.weight_format
    # Each layer is first rounded to nearest (the baseline the report quotes), then re-rounded by _round.
    rtn_cfg = dataclasses.replace(cfg, weight_method="rtn")
    dyn_cfg = dataclasses.replace(rtn_cfg, act_scheme="dynamic", timestep_groups=1, smooth_alpha=None,
                                  max_dynamic_layers=0)
    grouped: Dict[str, torch.Tensor] = {}
    checking = False
    try:
        for name, lin in tqdm(layers.items(), desc="ditq quantize", unit="layer", disable=not cfg.progress):
            dyn = name in dynamic_layers
            q = QuantLinear.from_linear(lin, dyn_cfg if dyn else rtn_cfg, scales.get(name), cfg.backend)
            w_rtn = _weight_sqnr(lin.weight.detach(), q.canonical(), fmt)
            w_sqnr, rounding = w_rtn, {}
            if cfg.weight_method != "rtn":
                rounding = _round(q, lin, fmt, cfg.weight_method, cal.hessian.pop(name, None) if gptq else None)
                w_sqnr = _weight_sqnr(lin.weight.detach(), q.canonical(), fmt)
            for alias in aliases.get(name, [name]):
                parent, attr = _parent(transformer, alias)
                setattr(parent, attr, q)
                swapped.append((parent, attr, lin))
            plan = plans.get(name)
            if plan is not None and plan.group_scales is not None and not dyn:
                grouped[name] = plan.group_scales
            s = scales.get(name)
            reports.append(LayerReport(
                name=name, in_features=lin.in_features, out_features=lin.out_features,
                format=("w8" if fmt.bits == 8 else f"w4g{fmt.group_size}") + f"a8-{'d' if dyn else 's'}",
                weight_sqnr=w_sqnr, act_sqnr=act.sqnr(name), act_scale=None if s is None else float(s),
                bytes_before=sum(p.numel() * p.element_size() for p in lin.parameters()),
                bytes_after=q.nbytes(),
                act_estimator=None if plan is None or dyn else plan.estimator,
                act_scales=None if name not in grouped else [float(v) for v in grouped[name]],
                act_sqnr_trajectory=None if plan is None or dyn else plan.traj_sqnr,
                smoothed=None if smoothing is None else smoothing.site_of(name),
                aliases=[a for a in aliases.get(name, [name]) if a != name],
                weight_method=cfg.weight_method, weight_sqnr_rtn=None if cfg.weight_method == "rtn" else w_rtn,
                **rounding))
            release_freed_memory(device)  # this layer's fp32 copies, before the next layer's packed weight lands
        tgroups.install(transformer, grouped, bounds)
        # 5. quantized outputs on the same inputs
        checking = True
        outs = _rerun(transformer, inputs)
    except BaseException as e:
        for parent, attr, lin in reversed(swapped):
            setattr(parent, attr, lin)
        _uninstall_groups(transformer)
        if smoothing is not None:
            smoothing.restore()
        if isinstance(e, Exception):
            what = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            if checking:
                raise QuantizeError(
                    f"quantization failed and the model was restored: running the transformer with its quantized "
                    f"layers failed ({what}). ditq layers hold packed integer buffers and no `weight` parameter: if "
                    f"the model's own code reads a quantized layer's `.weight` or `parameters()` (the traceback "
                    f"shows where), keep that layer in full precision with QuantConfig(skip=[...])") from e
            raise QuantizeError(f"quantization failed and the model was restored: {what}") from e
        raise
    # The originals are no longer needed (nothing can fail and restore them now): drop every reference to them
    # here, so that their memory is freed (and handed back to the OS) before quantize returns, not after.
    swapped.clear()
    layers = dict.fromkeys(layers)
    lin = None
    if cal is not None:
        cal.layers.clear()
    release_freed_memory(device)
    output_sqnr, per_run = _sqnr_total(refs, outs)
    transformer._ditq_config = cfg.to_dict()
    # the layers smoothing rescaled (consumers: input channels; producers: output rows), by site: what a checkpoint
    # records, so that a later change to them (a run-time LoRA, ditq.lora) knows their channels are not the float
    # model's
    transformer._ditq_smoothed = {}
    for site, info in (smoothing.applied.items() if smoothing is not None else ()):
        for layer in info["consumers"] + [info["producer"]]:  # to_v: a consumer of one site, the producer of one
            transformer._ditq_smoothed.setdefault(layer, []).append(site)
    fusion = _fuse(transformer) if cfg.fuse else {}

    cal_info = {"mode": cfg.calibration if cfg.needs_calibration else "none (dynamic scheme)",
                "runs": len(cal.calls_per_run) if cal else 0,
                "calls_per_run": list(cal.calls_per_run) if cal else [],
                "steps_per_run": list(cal.steps_per_run) if cal else []}
    if cfg.needs_calibration:
        cal_info["estimator"] = cfg.act_estimator
        if groups != [None]:
            cal_info["timestep_groups"] = [{"steps": g, "timesteps": [cal.timesteps.get(t) for t in g]}
                                           for g in groups]
            cal_info["timestep_bounds"] = bounds
        if smoothing is not None:
            cal_info["smoothing"] = {"alpha": cfg.smooth_alpha, "sites": dict(smoothing.applied),
                                     "rejected": dict(smoothing.rejected)}
        for name, lr in ((lr.name, lr) for lr in reports):
            if lr.aliases:
                policy.append(f"{name} is also reachable as {', '.join(lr.aliases)}: quantized once, the same "
                              f"QuantLinear is installed under every name")
        cal_info["policy"] = policy
    else:
        for lr in reports:
            if lr.aliases:
                cal_info.setdefault("policy", []).append(
                    f"{lr.name} is also reachable as {', '.join(lr.aliases)}: quantized once, shared")
    report = QuantReport(
        config=cfg.to_dict(), backend=backend, layers=reports, skipped=skipped, output_sqnr=output_sqnr,
        output_sqnr_per_run=per_run, bytes_before=bytes_before, bytes_after=module_bytes(transformer),
        calibration=cal_info,
        act_absmax_per_step={n: dict(sorted(r.items())) for n, r in (cal.absmax.items() if cal else [])
                             if n in layers}, fusion=fusion)
    summary = report.unplanned_summary()
    if summary is not None:  # the model would otherwise be silently mostly full precision
        warnings.warn(f"ditq.quantize: {summary} (report.unplanned_skips lists them)", UnquantizedLayersWarning,
                      stacklevel=3)  # the caller of ditq.quantize
    left = [c for c, m in (denoisers(pipe) if pipe is not None else {}).items() if not is_quantized(m)]
    if left:
        warnings.warn(f"ditq.quantize: this {type(pipe).__name__} also holds {' and '.join(left)}, still in full "
                      f"precision (the pipeline calls it at other steps): quantize it too with ditq.quantize(pipe, "
                      f"cfg, calib_inputs, component={left[0]!r})", UnquantizedComponentWarning, stacklevel=3)
    return report


def _fuse(transformer: nn.Module) -> dict:
    """QuantConfig(fuse=True): sibling projections as one GEMM, then fused norms where the blocks allow (the same
    integer GEMMs: the output SQNR measured above holds to fp32 rounding)."""
    from .blocks import fuse_blocks
    from .fuse import fuse_projections

    fused, left = fuse_projections(transformer)
    return {"projections": fused, "left": left, "blocks": fuse_blocks(transformer)}


# ---- the static-scale policy ------------------------------------------------------------------------------

@dataclasses.dataclass
class _Plan:
    scale: torch.Tensor                    # float32 [1]: the scale at the first (noisiest) step
    group_scales: Optional[torch.Tensor]   # float32 [G] in ascending-timestep order, or None (one scale)
    estimator: str
    traj_sqnr: Optional[float]             # estimated act SQNR over every recorded step with these scales
    dynamic: bool = False


def _plan(cal: Calibrator, name: str, groups: List[Optional[List[int]]], cfg: QuantConfig,
          rising: bool = False) -> _Plan:
    """The layer's static scale(s): per group of steps, the clip of the chosen estimator on the group's summed
    histogram. ``act_estimator="auto"`` tries every estimator and keeps the least total estimated error. The
    groups come in step order; the per-group scales are kept in ascending-timestep order (reversed, unless the
    model's timestep ``rising`` along the steps)."""
    from .calibrate import quant_mse
    ests = ESTIMATORS if cfg.act_estimator == "auto" else (cfg.act_estimator,)
    best = None
    for est in ests:
        clips = [cal.clip(name, g, est, cfg.act_percentile) for g in groups]
        noise = sum(quant_mse(cal.summed_hist(name, g), c or 0.0) for g, c in zip(groups, clips))
        if best is None or noise < best[1] * (1 - 1e-9):
            best = (est, noise, clips)
    est, noise, clips = best
    signal = float(cal.summed_hist(name)[2].sum())
    traj = None if signal == 0 else (math.inf if noise == 0 else 10 * math.log10(signal / noise))
    sc = ref.symmetric_scale(torch.tensor([c or 0.0 for c in clips], dtype=torch.float32), ref.INT8_QMAX)
    if len(groups) == 1:
        return _Plan(sc[:1].clone(), None, est, traj)
    first = next(i for i, g in enumerate(groups) if 0 in g) if any(0 in g for g in groups) else 0
    return _Plan(sc[first:first + 1].clone(), (sc if rising else sc.flip(0)).clone(), est, traj)


def _relative_noise(cal: Calibrator, name: str, lin: nn.Linear, fmt, method: str = "rtn") -> float:
    """Estimated noise-to-signal of a layer's output: activation (over the recorded steps, max clip) plus weight
    (rounded by ``method``; gptq's weight error is estimated with mse's, which needs no Hessian)."""
    a = hist_sqnr(cal.summed_hist(name), cal.clip(name))
    w = _weight_sqnr(lin.weight.detach(), dict(zip(("qweight", "scales"), weight_rounding.quantize_weight(
        lin.weight.detach(), fmt, "rtn" if method == "rtn" else "mse"))), fmt)
    return sum(10 ** (-v / 10) for v in (a, w) if v is not None and math.isfinite(v))


def _smooth(transformer, layers, cal, runs, cfg, pipe, policy):
    """Smooth every foldable site, record the activations again, keep a site only where the estimated output
    noise of its consumers (activation + weight quantization) went down. Returns (Smoothing, calibrator)."""
    from .smooth import smooth
    fmt, method = cfg.weight_format, cfg.weight_method
    before = {n: _relative_noise(cal, n, layers[n], fmt, method) for n in layers}
    sm = smooth(transformer, cal.channel_absmax, cfg.smooth_alpha, layers=set(layers))
    if not sm.applied:
        policy.append("smoothing: no foldable site in this model")
        return None, cal
    try:
        cal2 = calibrate(transformer, layers, runs, cfg.calibration_steps(), progress=cfg.progress, pipe=pipe,
                         record_hessian=method == "gptq")
        keep = []
        for site, info in list(sm.applied.items()):
            b = sum(before[c] for c in info["consumers"])
            a = sum(_relative_noise(cal2, c, layers[c], fmt, method) for c in info["consumers"])
            info["noise_before"], info["noise_after"] = b, a
            if a < b:
                keep.append(site)
        decided = dict(sm.applied)
        sm.restore()
        sm = smooth(transformer, cal.channel_absmax, cfg.smooth_alpha, layers=set(layers), sites=set(keep))
        for site, info in decided.items():
            (sm.applied if site in keep else sm.rejected)[site] = info
    except BaseException:
        sm.restore()
        raise
    # Sites are independent (each changes only its consumers' inputs), so the merged records are exact: the
    # consumers of a kept site from the second pass, everything else from the first.
    for site in keep:
        for c in sm.applied[site]["consumers"]:
            for attr in ("absmax", "hist") + (("hessian", "hessian_rows") if method == "gptq" else ()):
                getattr(cal, attr)[c] = getattr(cal2, attr)[c]
            cal.channel_absmax[c] = cal2.channel_absmax[c]
    policy.append(f"smoothing alpha {cfg.smooth_alpha}: kept {len(keep)} of {len(decided)} sites "
                  f"(kept where activation + weight noise of the consumers fell)")
    return sm, cal


def _uninstall_groups(transformer):
    layers = getattr(transformer, tgroups.HOOK_ATTR, None)
    if layers:
        setattr(transformer, tgroups.HOOK_ATTR, [])

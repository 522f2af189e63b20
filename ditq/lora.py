"""Run-time LoRA adapters on a quantized model: the packed integer GEMM plus a small float low-rank branch,

    y = W_q x + scale * B (A x),

loaded, re-scaled and removed without touching the packed weights (``load_lora`` / ``set_lora_scale`` /
``unload_lora``). peft cannot do this (it wraps only ``nn.Linear``), and merging an adapter before quantizing means
quantizing again from the float model for every adapter.

Where the branch lives. Each targeted layer gets a child module ``ditq_lora`` (:class:`LoraBranch`: one
:class:`LoraAdapter` per loaded adapter, by name) whose tensors are non-persistent buffers: they follow the layer
on ``.to(device / dtype)``, never enter a state dict, and a checkpoint never holds them (``save_quantized`` refuses
a model with adapters loaded rather than drop them silently). A :class:`ditq.nn.QuantLinear` adds the branch in its
``forward`` (one attribute test when no adapter is loaded); a float ``nn.Linear`` (layers ditq keeps in full
precision: ``proj_out``, ``context_embedder``, ...) gets it from a forward hook, so its class stays
``nn.Linear``. Both read the layer's float input, so the branch itself sees exact inputs whatever the activation
quantization does.

Each adapter stores ``A`` [r, K] and ``B`` [N, r] in the layer's compute dtype on its device, with the adapter's
``alpha / r`` folded into ``B`` in float32 before the cast (one rounding, as storing ``B`` alone), and the user's
scale as a float32 0-d buffer: ``set_lora_scale`` writes it in place, so a compiled model does not recompile for a
new value. The branch is ``addmm(y, (x @ A.T) * scale, B.T)``: two GEMMs, the add folded into the second one's
epilogue. An adapter with scale 0 is skipped altogether (bit for bit the model without it, and no cost).

Fused projections (:mod:`ditq.fuse`: one ``to_qkv`` QuantLinear for ``to_q`` / ``to_k`` / ``to_v``): an adapter
written for the members goes on the fused layer as one branch, ``A`` stacked along the rank and ``B``
block-diagonal (each member's ``B`` at its rows). One branch keeps one GEMM pair per adapter and layer and needs no
output slicing (per-slice branches would add a strided add per member); the zero blocks of ``B`` cost
``M * r * (N - N_member)`` multiply-adds, negligible beside the main GEMM's ``M * K * N``. Fusing projections that
already carry adapters stacks them the same way (:func:`carry_over`).

A 1x1 convolution ditq quantized as a linear (:mod:`ditq.pointwise`) takes the adapter its name is given in the
file, its ``[r, K, 1, 1]`` / ``[N, r, 1, 1]`` weights seen as ``[r, K]`` / ``[N, r]``.

Fused blocks (:mod:`ditq.blocks`, :mod:`ditq.blocks_joint`) stay fused with adapters loaded. Their GEMMs take
int8 activations straight from fused norms, so the float input a branch reads is built only for an adapted layer:
the modulated LayerNorm in torch, as diffusers' adaLN norm computes it, beside the fused norm that still feeds the
GEMM (a few elementwise ops over the block's input); other GEMM inputs (attention outputs, ``silu(temb)``, text
states) exist in float anyway. :meth:`ditq.nn.QuantLinear.forward_fused` (``lora_input``) adds the branch before
the epilogue; an adapted ``fc2`` (and FLUX's ``proj_out``) takes a float hidden state from the GEMM before it
instead of the int8 one that GEMM's epilogue would quantize.

Static activation scales were calibrated without the adapter. The branch reads the float input, but the layers
downstream of an adapted one see the adapted activations through the old scales; README ("LoRA.") gives what
that costs on the tiny test models against merging the adapter and quantizing again.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import re
import warnings
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .convert import _target
from .nn import QuantLinear
from .pointwise import LINEAR as POINTWISE_LINEAR
from .pointwise import PointwiseConv

BRANCH = "ditq_lora"  # the child module holding a layer's adapters
_KEY = re.compile(r"^(?P<path>.+)\.lora_(?P<ab>[AB])\.weight$")
_ALPHA = re.compile(r"^(?P<path>.+?)(\.lora_A)?\.alpha$")
_OTHER_COMPONENTS = ("text_encoder.", "text_encoder_2.", "text_encoder_3.", "unet.", "prior.")


class LoraAdapter(nn.Module):
    """One adapter on one layer: ``A`` [r, K] (``down``), ``B`` [N, r] with ``alpha / r`` folded in (``up``), and the
    user's scale (float32, 0-d; kept float32 through dtype casts so that a bfloat16 model does not round it)."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, scale: float):
        super().__init__()
        self.register_buffer("down", down, persistent=False)
        self.register_buffer("up", up, persistent=False)
        self.register_buffer("scale", torch.tensor(float(scale), dtype=torch.float32, device=down.device),
                             persistent=False)
        self.active = scale != 0

    def _apply(self, fn, recurse=True):
        scale = self._buffers.pop("scale")
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers["scale"] = scale.to(self.down.device)
        return self

    def extra_repr(self) -> str:
        return f"rank={self.down.shape[0]}, scale={float(self.scale):g}"


class LoraBranch(nn.ModuleDict):
    """A layer's adapters by name; ``forward(x, y)`` returns ``y`` plus every active adapter's branch on ``x``
    (computed in the adapters' dtype; added in ``y``'s, which may be wider: a fused block's fp32 GEMM output)."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not any(adapter.active for adapter in self.values()):  # scale 0: y as it was (no op at all)
            return y
        return self._add(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])).view(y.shape)

    def delta(self, x2d: torch.Tensor) -> torch.Tensor:
        """The active adapters' branches alone, summed: [M, N] in the adapters' dtype (at least one is active)."""
        return self._add(x2d, None)

    def _add(self, x2d: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
        """``out`` [M, N] (None: nothing yet) plus every active adapter's branch on ``x2d`` [M, K]: the scale on the
        [M, r] intermediate (the smallest tensor), the add in addmm's epilogue where the dtypes agree."""
        for adapter in self.values():
            if adapter.active:
                down, up = F.linear(x2d, adapter.down) * adapter.scale, adapter.up.t()
                out = down @ up if out is None else \
                    torch.addmm(out, down, up) if out.dtype == down.dtype else out + down @ up
        return out


def _linear_hook(module: nn.Module, args, output):
    """A float ``nn.Linear``'s branch (a forward hook: the layer keeps its class, and dynamo traces hooks)."""
    return module._modules[BRANCH](args[0], output)


# ---- public API ---------------------------------------------------------------------------------------------

def load_lora(model, lora, *, scale: float = 1.0, adapter_name: str = "default",
              other_components: str = "error", component: str = "transformer") -> Dict[str, List[str]]:
    """Load a LoRA adapter into a model quantized by :func:`ditq.quantize` (or loaded by ``load_quantized``), as a
    run-time float branch on each targeted layer: ``y = W_q x + scale * (alpha / r) * B (A x)``.

    ``model``: the quantized transformer, or a pipeline holding it (``pipe.transformer``; ``component=
    "transformer_2"``: Wan 2.2's low-noise expert, for the low-noise file of a LoRA made as a pair, or the same
    file loaded into each expert as diffusers' ``load_into_transformer_2`` does). ``lora``: a state dict
    or the path of a ``.safetensors`` file, in diffusers / peft keys (``<module path>.lora_A.weight`` /
    ``.lora_B.weight``, with or without the ``transformer.`` prefix, optional ``<module path>.alpha``; a file's
    diffusers LoRA metadata gives ``lora_alpha`` / ``alpha_pattern`` / ``use_rslora`` as diffusers reads them).
    Without an alpha the branch is ``B A`` as stored (alpha = r, diffusers' convention). With a pipeline whose class
    has diffusers' ``lora_state_dict`` (FLUX, SD3, ...), the state dict goes through it first, which converts
    kohya / xlabs / other community formats to diffusers keys (that step needs no peft).

    A LoRA file may also adapt other components of the pipeline (the text encoders: keys ``text_encoder.*``,
    kohya's ``lora_te*`` once converted). ditq adapts the transformer only: ``other_components="error"`` (the
    default) refuses such a file, ``"skip"`` loads its transformer part and warns (:class:`OtherComponentsWarning`)
    how many keys it left out (load those into the text encoder with diffusers, which needs peft).

    Several adapters may be loaded under different ``adapter_name`` s; their branches add up. Adapters written for
    ``to_q`` / ``to_k`` / ``to_v`` apply to fused projections (``to_qkv``). A float ``nn.Linear`` the quantizer
    kept (``proj_out``, ...) takes an adapter too.

    Raises ValueError, with the model left as it was, for: a model with no quantized layer (use diffusers' own
    loader), keys that name no linear layer (a few listed), keys that are not LoRA weights (DoRA, biases, norms),
    text-encoder keys (unless skipped), A without B, shapes that do not fit the layer (module and both shapes
    named), A and B of different ranks, non-finite values, layers outlier smoothing rescaled (``smooth_alpha``:
    their channels are not the float model's), an adapter name already loaded. Returns ``{layer path: [lora module
    paths]}``: which layer took which keys (a fused layer takes several)."""
    transformer, pipe = _target(model, "ditq.load_lora", component)
    if not any(isinstance(m, QuantLinear) for m in transformer.modules()):
        raise ValueError(f"this {type(transformer).__name__} has no ditq-quantized layer: ditq.load_lora adds "
                         f"adapters to quantized models. Load a LoRA into a float model with diffusers "
                         f"(pipe.load_lora_weights / model.load_lora_adapter; needs peft)")
    name = _check_name(adapter_name)
    if name in loaded_adapters(transformer):
        raise ValueError(f"an adapter named {name!r} is already loaded: unload_lora(model, {name!r}) first, or "
                         f"load this one under another adapter_name")
    scale = _check_scale(scale)
    if other_components not in ("error", "skip"):
        raise ValueError(f"other_components must be 'error' or 'skip', got {other_components!r}")
    state, metadata = _read(lora)
    state, alphas = _through_pipeline(pipe, state)
    plan = _plan(transformer, state, alphas, metadata, skip_other=other_components == "skip")
    _refuse_smoothed(transformer, plan)
    for path, (layer, pieces) in plan.items():
        down, up = _stack(layer.out_features, [p[1:] for p in pieces], _compute_dtype(layer, transformer),
                          _device(layer))
        _attach(layer, name, LoraAdapter(down, up, scale))
    _refresh(transformer)
    return {path: [p[0] for p in pieces] for path, (_, pieces) in plan.items()}


def set_lora_scale(model, scale: float, adapter_name: Optional[str] = None, component: str = "transformer") -> None:
    """Set the scale of the loaded adapter ``adapter_name`` (every adapter when None): the branch becomes
    ``scale * (alpha / r) * B (A x)``. Scale 0 switches the adapter off: skipped, bit for bit the model without it.
    A compiled model keeps its graph for a new nonzero scale (the scale is a buffer written in place); switching an
    adapter on or off recompiles. A captured CUDA graph replays what it captured: it sees a new scale (the same
    buffer) but not an adapter loaded, switched on or off, or unloaded after the capture (capture again)."""
    transformer, _ = _target(model, "ditq.set_lora_scale", component)
    scale = _check_scale(scale)
    names = _check_loaded(transformer, adapter_name)
    for _, branch in _branches(transformer):
        for n, adapter in branch.items():
            if n in names:
                adapter.scale.fill_(scale)
                adapter.active = scale != 0
    _refresh(transformer)


def unload_lora(model, adapter_name: Optional[str] = None, component: str = "transformer") -> None:
    """Remove the adapter ``adapter_name`` (every adapter when None; nothing loaded is then a no-op). The model
    then computes exactly what it computed before loading, bit for bit: the branches and hooks go, the packed
    weights were never touched."""
    transformer, _ = _target(model, "ditq.unload_lora", component)
    names = _check_loaded(transformer, adapter_name) if adapter_name is not None else None
    for layer, branch in _branches(transformer):
        for n in list(branch.keys()):
            if names is None or n in names:
                del branch[n]
        if not len(branch):
            del layer._modules[BRANCH]
            for key, hook in list(layer._forward_hooks.items()):
                if hook is _linear_hook:
                    del layer._forward_hooks[key]
    _refresh(transformer)


def loaded_adapters(model, component: str = "transformer") -> Dict[str, float]:
    """The adapters loaded in ``model`` (a transformer, or a pipeline's ``component``), name -> scale."""
    transformer, _ = _target(model, "ditq.lora.loaded_adapters", component)
    out = {}
    for _, branch in _branches(transformer):
        for n, adapter in branch.items():
            out.setdefault(n, float(adapter.scale))
    return out


def carry_over(members: List[QuantLinear], fused: QuantLinear) -> None:
    """Give ``fused`` (the output channels of ``members`` side by side, :func:`ditq.fuse.concat`) the members'
    adapters: per adapter, ``A`` stacked along the rank, ``B`` block-diagonal. The tensors are copied as they are
    (already in the compute dtype, alpha folded), so the fused branch adds the same terms."""
    names, offsets, n0 = [], [], 0
    for m in members:
        offsets.append(n0)
        n0 += m.out_features
        for n in (m._modules[BRANCH].keys() if BRANCH in m._modules else ()):
            if n not in names:
                names.append(n)
    for n in names:
        pieces, scale = [], None
        for m, off in zip(members, offsets):
            adapter = m._modules[BRANCH][n] if BRANCH in m._modules and n in m._modules[BRANCH] else None
            if adapter is not None:
                pieces.append((off, m.out_features, adapter.down, adapter.up))
                scale = float(adapter.scale)
        down, up = _stack(fused.out_features, pieces, pieces[0][2].dtype, pieces[0][2].device)
        _attach(fused, n, LoraAdapter(down, up, scale))
    if names:
        _refresh_layer(fused)


# ---- reading ------------------------------------------------------------------------------------------------

def _check_name(name) -> str:
    if not isinstance(name, str):
        raise TypeError(f"adapter_name must be a str, got {type(name).__name__}")
    # it names a child module: no dots, nothing nn.ModuleDict already has as an attribute
    if not name or "." in name or hasattr(LoraBranch, name):
        raise ValueError(f"adapter_name {name!r} cannot name an adapter (empty, has a '.', or is taken by "
                         f"nn.ModuleDict: {name!r}); pick a plain name such as 'style'")
    return name


def _check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def _check_loaded(transformer: nn.Module, adapter_name) -> set:
    loaded = loaded_adapters(transformer)
    if adapter_name is None:
        return set(loaded)
    if adapter_name not in loaded:
        raise ValueError(f"no adapter named {adapter_name!r} is loaded (loaded: "
                         f"{', '.join(map(repr, loaded)) or 'none'})")
    return {adapter_name}


def _read(lora) -> Tuple[Dict[str, torch.Tensor], Optional[dict]]:
    """(state dict, diffusers' LoRA metadata or None) of a state dict or a .safetensors path."""
    if isinstance(lora, (str, os.PathLike)):
        path = os.fspath(lora)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no LoRA file at {path}")
        if not path.endswith(".safetensors"):
            # pickled .bin / .pt files run code when loaded: only safetensors from a path
            raise ValueError(f"{path}: ditq.load_lora reads .safetensors files (or a state dict you loaded)")
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
        metadata = None
        if "lora_adapter_metadata" in header:  # diffusers' own (save_lora_weights / save_lora_adapter)
            try:
                metadata = json.loads(header["lora_adapter_metadata"])
            except ValueError as e:
                raise ValueError(f"{path}: its lora_adapter_metadata is not JSON ({e})") from None
        return load_file(path), metadata
    if isinstance(lora, dict):
        bad = [k for k, v in lora.items() if not isinstance(k, str) or not isinstance(v, (torch.Tensor, float, int))]
        if bad:
            raise TypeError(f"a LoRA state dict maps str keys to tensors; {len(bad)} entries do not, e.g. "
                            f"{bad[0]!r}")
        return dict(lora), None
    raise TypeError(f"lora must be a state dict or the path of a .safetensors file, got {type(lora).__name__}")


def _through_pipeline(pipe, state):
    """The pipeline's own ``lora_state_dict`` (diffusers' loader mixins) when it has one: it converts community
    formats to diffusers keys and pulls out the alphas. (state, alphas)."""
    loader = getattr(type(pipe), "lora_state_dict", None) if pipe is not None else None
    if loader is None:
        return state, {}
    import inspect

    takes_alphas = "return_alphas" in inspect.signature(loader).parameters
    out = loader(dict(state), return_alphas=True) if takes_alphas else loader(dict(state))
    if isinstance(out, tuple):
        state, alphas = out[0], out[1] or {}
    else:
        state, alphas = out, {}
    return dict(state), dict(alphas)


def _strip(key: str) -> str:
    return key[len("transformer."):] if key.startswith("transformer.") else key


def _pattern_value(patterns: dict, path: str, default):
    """peft's ``alpha_pattern`` / ``rank_pattern`` lookup: a pattern matches a module path it ends (on a '.')."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return default


class OtherComponentsWarning(UserWarning):
    """``load_lora(..., other_components="skip")`` left out the keys of components other than the transformer."""


def _parse(state, alphas, skip_other: bool = False):
    """{module path: {"A": .., "B": .., "alpha": ..}} of diffusers / peft keys, refusing what is not a LoRA pair."""
    modules, other, unsupported = {}, [], []
    for key, value in list(state.items()) + [(k, v) for k, v in alphas.items()]:
        if key.startswith(_OTHER_COMPONENTS):
            other.append(key)
            continue
        k = _strip(key)
        m = _KEY.match(k)
        if m:
            modules.setdefault(m["path"], {})[m["ab"]] = (key, value)
            continue
        m = _ALPHA.match(k)
        if m:
            modules.setdefault(m["path"], {})["alpha"] = (key, value)
            continue
        unsupported.append(key)
    if other and skip_other:
        parts = sorted({k.split(".", 1)[0] for k in other})
        warnings.warn(f"ditq.load_lora: {len(other)} keys of this LoRA adapt {', '.join(parts)}, not the transformer: "
                      f"left out (ditq adapts the transformer; load them into the text encoder with diffusers)",
                      OtherComponentsWarning, stacklevel=4)
    elif other:
        raise ValueError(f"this LoRA also adapts other components ({len(other)} keys, e.g. {other[0]!r}); "
                         f"ditq.load_lora adapts the transformer: drop those keys (pipe.lora_state_dict(path) "
                         f"gives the converted dict) and load the rest, the text encoder with diffusers; or pass "
                         f"other_components='skip'")
    if unsupported:
        raise ValueError(f"{len(unsupported)} keys are not LoRA weights ditq can apply (it takes "
                         f"'<module>.lora_A.weight' / '.lora_B.weight' pairs and optional '<module>.alpha'; "
                         f"DoRA magnitudes, LoRA biases and norm weights are not supported; a community format "
                         f"such as kohya's lora_down / lora_up: pass the pipeline, whose lora_state_dict converts "
                         f"it): {', '.join(map(repr, unsupported[:5]))}{' ...' if len(unsupported) > 5 else ''}")
    if not modules:
        raise ValueError("this state dict holds no LoRA weights ('<module>.lora_A.weight' / '.lora_B.weight')")
    for path, parts in modules.items():
        for have, lack in (("A", "B"), ("B", "A")):
            if lack not in parts:
                raise ValueError(f"{path}: " + (f"lora_{have} without lora_{lack}" if have in parts else
                                                "an alpha without lora_A / lora_B"))
    return modules


def _resolve(transformer: nn.Module, path: str):
    """(layer path, layer, row offset, rows) for a LoRA module path: the layer itself, or the fused projection
    (:mod:`ditq.fuse`) that holds it as a member; None when nothing matches; a str for a non-linear module."""
    from .fuse import ADDED_QKV, CROSS_KV, SELF_QKV

    try:
        m = transformer.get_submodule(path)
    except AttributeError:
        m = None
    if m is not None:
        if isinstance(m, (nn.Linear, QuantLinear)):
            return path, m, 0, m.out_features
        if isinstance(m, PointwiseConv):  # a 1x1 convolution ditq runs as a linear (ditq.pointwise)
            return f"{path}.{POINTWISE_LINEAR}", m.linear, 0, m.linear.out_features
        return f"{path} is a {type(m).__name__}, not a linear layer"
    parent_path, _, leaf = path.rpartition(".")
    try:
        parent = transformer.get_submodule(parent_path)
    except AttributeError:
        return None
    if getattr(parent, "fused_projections", False):
        for fused_name, members in {**SELF_QKV, **CROSS_KV, **ADDED_QKV}.items():
            fused = getattr(parent, fused_name, None)
            if leaf in members and isinstance(fused, (nn.Linear, QuantLinear)):
                # diffusers' fused processors split the fused output in equal parts (qkv.chunk(3)), so do we
                rows = fused.out_features // len(members)
                return f"{parent_path}.{fused_name}", fused, members.index(leaf) * rows, rows
    return None


def _plan(transformer, state, alphas, metadata, skip_other: bool = False):
    """{layer path: (layer, [(lora module path, row offset, rows, A fp32, B fp32 * alpha / r)])}, every check done."""
    modules = _parse(state, alphas, skip_other)
    meta = {}
    for k, v in (metadata or {}).items():  # pipeline saves prefix the component ("transformer.lora_alpha")
        if not k.startswith(_OTHER_COMPONENTS):
            meta[_strip(k)] = v
    if meta.get("use_dora"):
        raise ValueError("this LoRA is a DoRA adapter (use_dora in its metadata): ditq applies plain LoRA only")
    unknown, plan = [], {}
    for path, parts in modules.items():
        where = _resolve(transformer, path)
        if where is None:
            unknown.append(path)
            continue
        if isinstance(where, str):
            raise ValueError(f"the LoRA targets {where}")
        layer_path, layer, offset, rows = where
        (ka, a), (kb, b) = parts["A"], parts["B"]
        if layer_path == f"{path}.{POINTWISE_LINEAR}":  # a 1x1 convolution's LoRA: [r, K, 1, 1] and [N, r, 1, 1]
            a, b = (t.flatten(1) if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[2:] == (1, 1) else t
                    for t in (a, b))
        for key, t in ((ka, a), (kb, b)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 2:
                got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{key} must be a 2-D float tensor, got {got}")
        if a.shape[0] != b.shape[1]:
            raise ValueError(f"{path}: lora_A {list(a.shape)} and lora_B {list(b.shape)} have different ranks "
                             f"({a.shape[0]} vs {b.shape[1]})")
        own = (path, f"{path}.{POINTWISE_LINEAR}")  # the layer itself, not a slice of a fused one
        if a.shape[1] != layer.in_features or b.shape[0] != rows:
            raise ValueError(f"{path}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit the layer "
                             f"(A must be [r, {layer.in_features}], B [{rows}, r]"
                             f"{', a slice of the fused ' + layer_path if layer_path not in own else ''})")
        rank = a.shape[0]
        alpha = parts.get("alpha")
        if alpha is not None:
            alpha = float(alpha[1]) if not isinstance(alpha[1], torch.Tensor) or alpha[1].numel() == 1 else None
            if alpha is None:
                raise ValueError(f"{parts['alpha'][0]} must be one number")
        else:
            alpha = float(_pattern_value(meta.get("alpha_pattern"), path, meta.get("lora_alpha", rank)))
        ratio = alpha / (math.sqrt(rank) if meta.get("use_rslora") else rank)
        for key, t in ((ka, a), (kb, b)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{key} holds NaN or inf: refusing an adapter that would poison the outputs")
        if not math.isfinite(ratio):
            raise ValueError(f"{path}: alpha / r = {alpha} / {rank} is not finite")
        entry = plan.setdefault(layer_path, (layer, []))
        entry[1].append((path, offset, rows, a.detach().float(), b.detach().float() * ratio))
    if unknown:
        raise ValueError(f"{len(unknown)} LoRA modules name no layer of this {type(transformer).__name__}: "
                         f"{', '.join(map(repr, unknown[:5]))}{' ...' if len(unknown) > 5 else ''} (a LoRA for "
                         f"another model, or a community format: pass the pipeline, whose lora_state_dict "
                         f"converts it)")
    return plan


def _refuse_smoothed(transformer: nn.Module, plan) -> None:
    """Outlier smoothing (``QuantConfig(smooth_alpha=...)``, :mod:`ditq.smooth`) divided some layers' input
    channels (q / k / v, to_out, fc1) and the matching output rows of their producers (the adaLN linear, to_v) by
    factors the quantized model does not keep. A branch on such a layer would read (or write) rescaled channels and
    compute something else than the adapter: refused, naming the layers. A checkpoint that does not say which
    layers were smoothed (written before ditq recorded it) counts every layer as smoothed."""
    alpha = (getattr(transformer, "_ditq_config", None) or {}).get("smooth_alpha")
    if alpha is None:
        return
    smoothed = getattr(transformer, "_ditq_smoothed", None)
    if smoothed is not None:  # a fused projection (ditq.fuse) is smoothed when its members are
        smoothed = set(smoothed)
        for attn, fused in (getattr(transformer, "_ditq_fused", None) or {}).items():
            smoothed |= {f"{attn}.{name}" for name, members in fused.items()
                         if any(f"{attn}.{m}" in smoothed for m in members)}
    hit = sorted(piece[0] for path, (_, pieces) in plan.items() for piece in pieces  # the LoRA's module names
                 if smoothed is None or path in smoothed or piece[0] in smoothed)
    if hit:
        which = "" if smoothed is not None else " (this checkpoint does not record which layers: re-quantize it " \
                                                "with this ditq to load adapters on the others)"
        raise ValueError(f"this model was quantized with outlier smoothing (smooth_alpha={alpha}), which rescaled "
                         f"the channels of {len(hit)} layers this LoRA targets{which}: "
                         f"{', '.join(map(repr, hit[:4]))}{' ...' if len(hit) > 4 else ''}; a branch there would "
                         f"compute something else than the adapter. Quantize with smooth_alpha=None to run LoRAs on "
                         f"them, or merge the adapter into the float model before quantizing")


# ---- installing ---------------------------------------------------------------------------------------------

def _compute_dtype(layer: nn.Module, root: nn.Module) -> torch.dtype:
    """The dtype the layer computes in: a float linear's weight; a QuantLinear's bias (it follows the model's
    dtype), else the model's first float parameter."""
    if isinstance(layer, nn.Linear):
        return layer.weight.dtype
    if layer.bias is not None:
        return layer.bias.dtype
    return next((p.dtype for p in root.parameters() if p.is_floating_point()), torch.float32)


def _device(layer: nn.Module) -> torch.device:
    return layer.weight.device if isinstance(layer, nn.Linear) else layer.qweight.device


def _stack(out_features: int, pieces, dtype, device):
    """One (A, B) for all of a layer's pieces ``(row offset, rows, A, B)``: A stacked along the rank, each B at its
    rows (block-diagonal), built in float32 (exact for values already in a 16-bit dtype) and cast once."""
    rank = sum(a.shape[0] for _, _, a, _ in pieces)
    up = torch.zeros(out_features, rank, dtype=torch.float32, device=device)
    r0 = 0
    for off, rows, a, b in pieces:
        up[off:off + rows, r0:r0 + a.shape[0]] = b
        r0 += a.shape[0]
    down = torch.cat([a.to(device) for _, _, a, _ in pieces])
    return down.to(dtype=dtype), up.to(dtype=dtype)


def _attach(layer: nn.Module, name: str, adapter: LoraAdapter) -> None:
    branch = layer._modules.get(BRANCH)
    if branch is None:
        branch = LoraBranch()
        layer.add_module(BRANCH, branch)
        if not isinstance(layer, QuantLinear):
            layer.register_forward_hook(_linear_hook)
    branch[name] = adapter


def _branches(transformer: nn.Module):
    return [(m, m._modules[BRANCH]) for m in transformer.modules()
            if isinstance(m, (nn.Linear, QuantLinear)) and BRANCH in m._modules]


def _refresh_layer(layer: nn.Module) -> bool:
    branch = layer._modules.get(BRANCH)
    on = branch is not None and any(a.active for a in branch.values())
    if isinstance(layer, QuantLinear):
        if on:
            layer._lora_on = True
        else:
            layer.__dict__.pop("_lora_on", None)  # the class default (False) again
    return on


def _refresh(transformer: nn.Module) -> None:
    """Recompute every layer's on/off state from the loaded adapters, and a fused DiT's plan of which embedders
    are equal (:func:`ditq.blocks.replan`: an adapter on one of several equal embedders makes it differ)."""
    from .blocks import replan

    for m in transformer.modules():
        if isinstance(m, (nn.Linear, QuantLinear)):
            _refresh_layer(m)
    replan(transformer)

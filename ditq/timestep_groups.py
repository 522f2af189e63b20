"""Timestep-grouped static activation scales: one static scale per group of sampling steps, picked at run time.

Activation ranges move along the sampling trajectory (``benchmarks/PAPER_FIGURES.md``), so one static scale either
clips the steps with wide ranges or wastes int8 levels on the steps with narrow ones. Here the calibration steps
are split into G runs of *adjacent* steps with similar ranges (:func:`choose_groups`), each layer gets one static
scale per group, and each group is identified by the timesteps it covers: a group boundary lies halfway between the
timesteps of the last step of one group and the first of the next. The scales stay static (calibrated, frozen).

At run time a forward pre-hook on the transformer reads its timestep input (``timestep``, or what its forward
calls it: :data:`TIMESTEP_ARGS`; a device tensor in diffusers' pipelines), computes the group with
``torch.bucketize`` against the boundaries and copies each grouped layer's scale for that group into its
``act_scale`` buffer with ``index_select`` + ``copy_``: no host sync, no data-dependent Python branch, nothing
that breaks a graph; the integer kernels see an ordinary static scale. Keying on the timestep rather than on a
call counter means nothing has to be reset between pipeline calls, and a call with another number of inference
steps still gets the scale of the noise level it is at.

Per layer (a :class:`ditq.nn.QuantLinear`) the buffers ``act_scales`` (float32 [G], ascending timestep order) and
``timestep_bounds`` (float32 [G - 1], ascending) are added; the transformer keeps ``_ditq_grouped_layers``. A
checkpoint stores both per layer in its JSON header (:func:`header_entry`, :func:`restore`).
"""
from __future__ import annotations

import functools
import inspect
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

HOOK_ATTR = "_ditq_grouped_layers"


def choose_groups(absmax: Dict[str, Dict[int, float]], steps: Sequence[int], max_groups: int) -> List[List[int]]:
    """Split ``steps`` (sorted) into at most ``max_groups`` runs of adjacent steps.

    Cost of a run for one layer: sum over its steps of ``log2(run max / step max)²``: how far the run's shared range
    over-covers each step (one octave = one bit of int8 resolution lost). The split minimizing the cost summed
    over layers is found exactly by dynamic programming (O(G S²), S = steps). Layers whose range is 0 at a step
    are ignored there."""
    steps = sorted(steps)
    s = len(steps)
    g = max(1, min(max_groups, s))
    if g == 1:
        return [steps]
    logs = []
    for rec in absmax.values():
        row = [math.log2(rec[t]) if rec.get(t, 0) > 0 else None for t in steps]
        if any(v is not None for v in row):
            logs.append(row)

    def cost(i, j):  # steps[i:j]
        total = 0.0
        for row in logs:
            vals = [v for v in row[i:j] if v is not None]
            if vals:
                top = max(vals)
                total += sum((top - v) ** 2 for v in vals)
        return total

    c = [[cost(i, j) if j > i else 0.0 for j in range(s + 1)] for i in range(s + 1)]
    inf = float("inf")
    best = [[inf] * (s + 1) for _ in range(g + 1)]
    back = [[0] * (s + 1) for _ in range(g + 1)]
    best[0][0] = 0.0
    for k in range(1, g + 1):
        for j in range(1, s + 1):
            for i in range(k - 1, j):
                v = best[k - 1][i] + c[i][j]
                if v < best[k][j]:
                    best[k][j], back[k][j] = v, i
    k = min(range(1, g + 1), key=lambda kk: (best[kk][s], kk))  # fewest groups among equal costs
    groups, j = [], s
    while k > 0:
        i = back[k][j]
        groups.append(steps[i:j])
        j, k = i, k - 1
    return groups[::-1]


def timestep_bounds(groups: List[List[int]], timesteps: Dict[int, float]) -> List[float]:
    """Ascending boundaries between the groups' timestep ranges (halfway between neighbouring steps).

    ``groups`` are in step order (step 0 = the noisiest). Along them diffusers' timesteps descend (t = T first);
    some models' rise instead (Z-Image's ``t`` goes from 0 = noise to 1 = clean, :func:`rising`). Either way the
    boundaries come out ascending: timestep t lies in the ``bucketize(t, bounds)``-th group in ascending-timestep
    order, the order in which each layer keeps its per-group scales."""
    for grp in groups:
        for st in grp:
            if st not in timesteps:
                raise ValueError(f"no timestep was recorded for calibration step {st}: the transformer's forward "
                                 f"takes no timestep input ({' / '.join(TIMESTEP_ARGS)}), so scales cannot be "
                                 f"grouped by timestep")
    up = rising(groups, timesteps)
    bounds = []
    for a, b in zip(groups[:-1], groups[1:]):
        x, y = timesteps[a[-1]], timesteps[b[0]]
        if not (x < y if up else x > y):
            raise ValueError(f"timesteps must move one way along the calibration steps (all falling or all "
                             f"rising), got {timesteps[groups[0][-1]]} then {timesteps[groups[1][0]]}, later "
                             f"{x} then {y}")
        bounds.append((x + y) / 2)
    return sorted(bounds)


def rising(groups: List[List[int]], timesteps: Dict[int, float]) -> bool:
    """Whether the model's timestep grows along the sampling steps (between the first two groups)."""
    return timesteps[groups[1][0]] > timesteps[groups[0][-1]]


# What DiT-family forwards call their noise level: diffusers' ``timestep``, HiDream's ``timesteps``, Z-Image's ``t``.
TIMESTEP_ARGS = ("timestep", "timesteps", "t")


@functools.lru_cache(maxsize=None)
def _timestep_position(cls: type) -> Optional[Tuple[str, Optional[int]]]:
    """(name, positional index or None) of ``cls.forward``'s timestep parameter, or None if it has none."""
    try:
        params = list(inspect.signature(cls.forward).parameters.values())[1:]  # without self
    except (TypeError, ValueError):
        return ("timestep", 1)
    for name in TIMESTEP_ARGS:
        for i, p in enumerate(params):
            if p.name == name:
                positional = p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                return name, (i if positional else None)
    return None


def timestep_of(module: nn.Module, args, kwargs):
    """The timestep a call ``module(*args, **kwargs)`` passes (by keyword or by position, under the name its
    forward gives it: :data:`TIMESTEP_ARGS`), or None."""
    pos = _timestep_position(type(module))
    if pos is None:
        return None
    name, index = pos
    if name in kwargs:
        return kwargs[name]
    return args[index] if index is not None and index < len(args) else None


def noise_level(t) -> torch.Tensor:
    """The one number a call's timestep input stands for, as float32 [1] on its device: its largest entry. A batch
    of images shares one timestep; Wan 2.2 TI2V passes one per token ([B, tokens], ``expand_timesteps``), where an
    image-to-video call holds its conditioning frame's tokens at 0 and the others at the step's t, so the first
    entry would read 0 at every step. The max is that t; a reduction on the device (no host sync)."""
    return torch.as_tensor(t).reshape(1, -1).amax(dim=1).to(torch.float32)


def _pre_hook(module, args, kwargs):
    layers = getattr(module, HOOK_ATTR, None)
    if not layers:
        return
    t = timestep_of(module, args, kwargs)
    if t is None:
        raise RuntimeError("this transformer has timestep-grouped activation scales but was called without a "
                           "`timestep` input")
    bounds = layers[0].timestep_bounds
    t = noise_level(torch.as_tensor(t, device=bounds.device))
    idx = torch.bucketize(t, bounds)  # [1] int64 on the device: the group, in ascending-timestep order
    with torch.no_grad():
        for layer in layers:
            layer.act_scale.copy_(layer.act_scales.index_select(0, idx))


def install(transformer: nn.Module, layer_scales: Dict[str, torch.Tensor], bounds: Sequence[float]) -> None:
    """Give each named QuantLinear its per-group scales (float32 [G], ascending timestep order) and register the
    transformer's pre-hook (once). The layer's ``act_scale`` starts at its highest-timestep group's scale; the
    pre-hook sets the right one before every call."""
    if not layer_scales:
        return
    b = torch.tensor(list(bounds), dtype=torch.float32)
    layers = []
    for name, scales in layer_scales.items():
        layer = transformer.get_submodule(name)
        scales = torch.as_tensor(scales, dtype=torch.float32).reshape(-1)
        if scales.numel() != len(b) + 1 or not bool(torch.isfinite(scales).all()) or bool((scales <= 0).any()):
            raise ValueError(f"{name}: act_scales must be {len(b) + 1} positive finite numbers, got "
                             f"{scales.tolist()}")
        dev = layer.qweight.device
        layer.register_buffer("act_scales", scales.to(dev), persistent=False)
        layer.register_buffer("timestep_bounds", b.to(dev), persistent=False)
        with torch.no_grad():
            layer.act_scale.copy_(scales[-1:].to(dev))
        layers.append(layer)
    if getattr(transformer, HOOK_ATTR, None) is None:
        transformer.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    setattr(transformer, HOOK_ATTR, list(getattr(transformer, HOOK_ATTR, None) or []) + layers)


def header_entry(layer: nn.Module) -> Optional[dict]:
    """What a checkpoint header stores for a grouped layer (None for an ordinary one)."""
    if getattr(layer, "act_scales", None) is None:
        return None
    return {"act_scales": layer.act_scales.float().cpu().tolist(),
            "timestep_bounds": layer.timestep_bounds.float().cpu().tolist()}


def restore(model: nn.Module, header: dict) -> None:
    """Re-install the groups a checkpoint header names (after its tensors are loaded)."""
    scales, bounds = {}, None
    for name, spec in header.get("layers", {}).items():
        if spec.get("act_scales") is not None:
            scales[name] = torch.tensor(spec["act_scales"], dtype=torch.float32)
            bounds = spec["timestep_bounds"]
    if scales:
        install(model, scales, bounds)

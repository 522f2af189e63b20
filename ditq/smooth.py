"""Outlier smoothing (SmoothQuant-style channel balancing) folded into a DiT block's own weights.

A linear ``y = x W^T`` is unchanged if input channel c of ``x`` is divided by ``s_c`` and column c of ``W`` is
multiplied by it. Choosing ``s_c = max|x_c|^alpha / max|W[:, c]|^(1 - alpha)`` moves part of an activation outlier
channel's range into the weight, where per-output-channel (or per-group) weight scales absorb it, so one static
per-tensor int8 activation scale fits the remaining channels better. ``alpha`` is the migration strength.

The division by ``s`` must happen somewhere for free, or the float model changes. In diffusers' DiT blocks
(``BasicTransformerBlock`` with ``norm_type="ada_norm_zero"``) it folds into weights that exist already:

* **q / k / v** read ``LayerNorm(x) * (1 + scale_msa) + shift_msa`` (affine-free norm): dividing both
  ``(1 + scale_msa)`` and ``shift_msa`` by ``s`` is a change of the adaLN linear ``norm1.linear``'s rows:
  ``W_scale / s``, ``(b_scale + 1) / s - 1``, ``W_shift / s``, ``b_shift / s``. One ``s`` serves q, k and v (they
  read the same tensor), from the max of their weight columns.
* **MLP fc1** (``ff.net.0.proj``) the same with ``shift_mlp`` / ``scale_mlp`` (chunks 3 and 4 of the adaLN output).
* **attention out** (``attn1.to_out.0``) reads ``softmax(QK^T) V``: channel c of it is a convex mix of channel c
  of V, so dividing to_v's output row c (weight and bias) by ``s_c`` divides the attention output's channel c.
* **MLP fc2** reads ``GELU(fc1(x))``: GELU is not homogeneous, nothing folds, so fc2 is not smoothed (a runtime
  per-channel multiply would cost a pass over the hidden activation; not worth it here).

Smoothing changes only float weights before quantization; the integer kernels are untouched. It needs the
per-input-channel max |x| of calibration (``Calibrator.channel_absmax``), and the activations must be recorded
again afterwards (their ranges changed), which :func:`ditq.quantize` does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

# smoothing factors are clamped here: a channel that never fired (max 0) or a zero weight column keeps s = 1.
S_MIN, S_MAX = 1e-3, 1e3


@dataclass
class Site:
    """One place where an input-channel scaling folds into existing weights."""
    name: str                   # e.g. "transformer_blocks.0.attn-in"
    consumers: List[str]        # linears whose input is divided by s (their weight columns are multiplied)
    producer: str               # the linear whose rows absorb the division
    kind: str                   # "adaln" (shift/scale chunks of an adaLN linear) or "rows" (plain output rows)
    chunks: Tuple[int, int] = (0, 1)  # (shift chunk, scale chunk) of the adaLN output, for kind "adaln"


def find_sites(transformer: nn.Module) -> List[Site]:
    """The foldable smoothing sites of a diffusers DiT-style transformer (none for other architectures)."""
    sites = []
    for bname, block in transformer.named_modules():
        # vars(): the model itself also answers .norm_type (a deprecated config alias); only blocks hold it.
        if vars(block).get("norm_type") != "ada_norm_zero" or not hasattr(block, "norm1"):
            continue
        norm1, attn = block.norm1, getattr(block, "attn1", None)
        lin = getattr(norm1, "linear", None)
        norm = getattr(norm1, "norm", None)
        if not isinstance(lin, nn.Linear) or not isinstance(norm, nn.LayerNorm) or norm.elementwise_affine:
            continue
        if getattr(block, "pos_embed", None) is not None or attn is None:
            continue  # something sits between the modulate and the projections
        d = lin.out_features // 6
        names = {n: f"{bname}.attn1.{n}" for n in ("to_q", "to_k", "to_v")}
        if all(isinstance(getattr(attn, n, None), nn.Linear) and getattr(attn, n).in_features == d
               for n in names):
            sites.append(Site(f"{bname}.attn-in", list(names.values()), f"{bname}.norm1.linear", "adaln", (0, 1)))
        to_out = getattr(attn, "to_out", None)
        if isinstance(to_out, nn.ModuleList) and isinstance(to_out[0], nn.Linear) and \
                isinstance(getattr(attn, "to_v", None), nn.Linear) and attn.to_v.out_features == to_out[0].in_features \
                and getattr(attn, "norm_added_q", None) is None:
            sites.append(Site(f"{bname}.attn-out", [f"{bname}.attn1.to_out.0"], f"{bname}.attn1.to_v", "rows"))
        norm3 = getattr(block, "norm3", None)  # the MLP's norm in diffusers' ada_norm_zero blocks
        ff = getattr(block, "ff", None)
        fc1 = getattr(getattr(ff, "net", [None])[0], "proj", None) if ff is not None else None
        if isinstance(norm3, nn.LayerNorm) and not norm3.elementwise_affine and isinstance(fc1, nn.Linear) and \
                fc1.in_features == d and getattr(block, "attn2", None) is None:
            sites.append(Site(f"{bname}.mlp-in", [f"{bname}.ff.net.0.proj"], f"{bname}.norm1.linear", "adaln",
                              (3, 4)))
    return sites


def factors(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """float32 [K] ``s_c = max|x_c|^alpha / max|W_c|^(1 - alpha)``; 1 where either max is 0; clamped."""
    a = act_absmax.double()
    w = weight_absmax.double()
    s = a.pow(alpha) / w.pow(1 - alpha)
    s = torch.where((a > 0) & (w > 0) & torch.isfinite(s), s, torch.ones_like(s))
    return s.clamp(S_MIN, S_MAX).float()


class Smoothing:
    """Applies smoothing factors to a transformer's float weights; :meth:`restore` puts every touched tensor back."""

    def __init__(self, transformer: nn.Module):
        self.transformer = transformer
        self._saved: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.applied: Dict[str, dict] = {}   # site name -> what was done (consumers, producer, factor range)
        self.rejected: Dict[str, dict] = {}  # sites a policy tried and undid, with its reason's numbers

    def site_of(self, layer: str) -> Optional[str]:
        """The applied site whose consumer ``layer`` is, or None."""
        for site, info in self.applied.items():
            if layer in info["consumers"]:
                return site
        return None

    def _save(self, t: torch.Tensor) -> None:
        if id(t) not in self._saved:
            self._saved[id(t)] = (t, t.detach().clone())

    def apply(self, site: Site, s: torch.Tensor) -> None:
        get = self.transformer.get_submodule
        prod = get(site.producer)
        with torch.no_grad():
            for c in site.consumers:
                w = get(c).weight
                self._save(w)
                w.mul_(s.to(w.device, torch.float32)[None, :].to(w.dtype))
            self._save(prod.weight)
            if prod.bias is not None:
                self._save(prod.bias)
            sv = s.to(prod.weight.device, torch.float32)
            if site.kind == "rows":
                prod.weight.div_(sv[:, None].to(prod.weight.dtype))
                if prod.bias is not None:
                    prod.bias.div_(sv.to(prod.bias.dtype))
            else:
                d = len(s)
                sh, sc = site.chunks
                prod.weight[sh * d:(sh + 1) * d].div_(sv[:, None].to(prod.weight.dtype))
                prod.weight[sc * d:(sc + 1) * d].div_(sv[:, None].to(prod.weight.dtype))
                if prod.bias is not None:
                    b = prod.bias
                    b[sh * d:(sh + 1) * d].div_(sv.to(b.dtype))
                    # (1 + scale) / s = 1 + scale', so scale' = (scale + 1) / s - 1
                    b[sc * d:(sc + 1) * d].add_(1).div_(sv.to(b.dtype)).sub_(1)
        self.applied[site.name] = {"consumers": list(site.consumers), "producer": site.producer,
                                   "max_factor": float(s.max()), "min_factor": float(s.min())}

    def restore(self) -> None:
        with torch.no_grad():
            for t, saved in self._saved.values():
                t.copy_(saved)
        self._saved.clear()
        self.applied.clear()
        self.rejected.clear()


def smooth(transformer: nn.Module, channel_absmax: Dict[str, torch.Tensor], alpha: float,
           layers: Optional[set] = None, sites: Optional[set] = None) -> Smoothing:
    """Smooth every foldable site of ``transformer`` (only those named in ``sites`` if given) whose consumers are
    all in ``layers`` (default: any) and all have a recorded per-channel range. Returns the :class:`Smoothing`
    (its ``applied`` names the sites)."""
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 < alpha <= 1:
        raise ValueError(f"smoothing alpha must be in (0, 1], got {alpha!r}")
    sm = Smoothing(transformer)
    for site in find_sites(transformer):
        if sites is not None and site.name not in sites:
            continue
        if layers is not None and not all(c in layers for c in site.consumers):
            continue
        if not all(c in channel_absmax for c in site.consumers):
            continue
        act = torch.stack([channel_absmax[c].float() for c in site.consumers]).amax(0)
        w = torch.stack([transformer.get_submodule(c).weight.detach().abs().float().amax(0).cpu()
                         for c in site.consumers]).amax(0)
        sm.apply(site, factors(act, w, alpha))
    return sm

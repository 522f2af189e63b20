"""Sibling projections as one GEMM: q, k and v read the same tensor, so after quantization they run as one.

Three QuantLinears that read the same input with the same activation scale are one QuantLinear whose output
channels are the three concatenated: per output channel nothing changes (the same int8 weights, the same scales, the
same activation quantization), so the fused GEMM gives the same integers, one activation quantization and one launch
instead of three. The outputs are split as views by diffusers' own fused-projection code paths, which this module
switches on (the supported extension point; the unfused diffusers model stays the reference):

================================  ===============================  ===========================================
attention                          fused layers                      how diffusers runs them
================================  ===============================  ===========================================
``Attention`` + ``AttnProcessor2_0``    ``to_qkv`` (self), ``to_kv``     ``FusedAttnProcessor2_0``
  (DiT, PixArt)                          (cross: k and v of the context)
``Attention`` + ``JointAttnProcessor2_0``  ``to_qkv``, ``to_added_qkv``   ``FusedJointAttnProcessor2_0``
  (SD3)                                                                (with q/k norms, SD3.5:
                                                                       :func:`joint_qk_norm_processor`)
  without added projections          ``to_qkv``                        :func:`joint_qk_norm_processor`
  (SD3.5-medium's ``attn2``)
``FluxAttention``                  ``to_qkv``, ``to_added_qkv``      its ``fused_projections`` flag
================================  ===============================  ===========================================

Fusion needs the members to agree on everything but their weights: format, activation scheme and static scale (and
timestep-grouped scales), bias presence, backend request. Calibration gives siblings identical scales (they observe
the same tensor); a group that disagrees is left unfused and reported. Checkpoints record the fused groups
(``fused`` in the header) so that loading rebuilds the same structure (:func:`restructure`) before the tensors
arrive.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .nn import QuantLinear

# fused layer -> the members whose output channels it concatenates, in order
SELF_QKV = {"to_qkv": ("to_q", "to_k", "to_v")}
CROSS_KV = {"to_kv": ("to_k", "to_v")}
ADDED_QKV = {"to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}


def _plan(attn: nn.Module) -> Tuple[Optional[Dict[str, Tuple[str, ...]]], object]:
    """(groups to fuse, processor to set, or None where FluxAttention's flag is enough) for one attention, or
    (None, why it cannot be fused)."""
    from diffusers.models import attention_processor as ap

    if getattr(attn, "fused_projections", False):
        return None, "already fused"
    cls = type(attn).__name__
    if cls == "FluxAttention":
        groups = dict(SELF_QKV)
        if getattr(attn, "add_q_proj", None) is not None:
            groups.update(ADDED_QKV)
        return groups, None
    if not isinstance(attn, ap.Attention):
        return None, f"{cls} has no fused-projection path"
    proc = type(attn.processor)
    if proc is ap.AttnProcessor2_0:
        if attn.is_cross_attention:
            return dict(CROSS_KV), ap.FusedAttnProcessor2_0()
        return dict(SELF_QKV), ap.FusedAttnProcessor2_0()
    if proc is ap.JointAttnProcessor2_0:
        if getattr(attn, "add_q_proj", None) is None:  # SD3.5-medium's attn2: a self-attention, no context stream
            return dict(SELF_QKV), joint_qk_norm_processor()()
        if any(getattr(attn, n, None) is not None for n in QK_NORMS):
            return {**SELF_QKV, **ADDED_QKV}, joint_qk_norm_processor()()
        return {**SELF_QKV, **ADDED_QKV}, ap.FusedJointAttnProcessor2_0()
    return None, f"processor {proc.__name__} has no fused twin"


QK_NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")


@lru_cache(maxsize=None)
def joint_qk_norm_processor():
    """diffusers' ``FusedJointAttnProcessor2_0`` with the q/k norms ``JointAttnProcessor2_0`` applies (SD3.5's
    ``qk_norm="rms_norm"``): the fused twin skips them (diffusers 0.42), so switching to it would silently change
    the model. This is ``JointAttnProcessor2_0``'s computation, op for op, on the fused projections' outputs.

    It also runs a joint attention without a context stream (SD3.5-medium's ``attn2``: no added projections,
    called without ``encoder_hidden_states``), which the fused twin cannot (it reads the context's shape first):
    the image stream alone, its q/k norms, SDPA, ``to_out``; one tensor returned, as ``JointAttnProcessor2_0``
    does then."""
    import torch.nn.functional as F
    from diffusers.models.attention_processor import FusedJointAttnProcessor2_0

    class FusedJointQKNormAttnProcessor(FusedJointAttnProcessor2_0):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
            batch, seq = hidden_states.shape[:2]
            qkv = attn.to_qkv(hidden_states)
            head_dim = qkv.shape[-1] // 3 // attn.heads

            def heads(t):
                return t.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

            query, key, value = map(heads, qkv.chunk(3, dim=-1))
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            if encoder_hidden_states is None:
                out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
                out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
                return attn.to_out[1](attn.to_out[0](out))
            c_query, c_key, c_value = map(heads, attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1))
            if attn.norm_added_q is not None:
                c_query = attn.norm_added_q(c_query)
            if attn.norm_added_k is not None:
                c_key = attn.norm_added_k(c_key)
            query = torch.cat([query, c_query], dim=2)
            key = torch.cat([key, c_key], dim=2)
            value = torch.cat([value, c_value], dim=2)
            out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
            out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
            out, c_out = out[:, :seq], out[:, seq:]
            if not attn.context_pre_only:
                c_out = attn.to_add_out(c_out)
            return attn.to_out[1](attn.to_out[0](out)), c_out

    FusedJointQKNormAttnProcessor.__module__ = __name__
    return FusedJointQKNormAttnProcessor


def _mismatch(layers: List[nn.Module]) -> Optional[str]:
    if not all(isinstance(m, QuantLinear) for m in layers):
        return "not every member is quantized"
    first = layers[0]
    for m in layers[1:]:
        if (m.fmt, m.act_scheme, m.in_features, m.bias is None, m.backend_request) != \
                (first.fmt, first.act_scheme, first.in_features, first.bias is None, first.backend_request):
            return "members differ in format, activation scheme, bias or backend"
        for buf in ("act_scale", "act_scales", "timestep_bounds"):
            a, b = getattr(first, buf, None), getattr(m, buf, None)
            if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
                return f"members have different {buf}"
    return None


def concat(layers: List[QuantLinear]) -> QuantLinear:
    """One QuantLinear computing ``layers`` (same input, same activation quantization) side by side."""
    why = _mismatch(layers)
    if why is not None:
        raise ValueError(f"cannot fuse these layers: {why}")
    first = layers[0]
    cans = [m.canonical() for m in layers]
    qweight = torch.cat([c["qweight"] for c in cans], dim=0)
    scales = torch.cat([c["scales"] for c in cans], dim=0 if first.fmt.bits == 8 else 1)
    bias = torch.cat([c["bias"] for c in cans]) if first.bias is not None else None
    fused = QuantLinear(first.in_features, sum(m.out_features for m in layers), first.fmt, bias=bias is not None,
                        act_scheme=first.act_scheme, backend=first.backend_request, device=qweight.device,
                        bias_dtype=bias.dtype if bias is not None else torch.float32)
    fused.load_canonical(qweight, scales, bias, cans[0].get("act_scale"))
    for buf in ("act_scales", "timestep_bounds"):  # timestep-grouped scales (ditq.timestep_groups)
        if getattr(first, buf, None) is not None:
            fused.register_buffer(buf, getattr(first, buf).clone(), persistent=False)
    from .lora import carry_over  # run-time LoRA adapters on the members: stacked onto the fused layer

    carry_over(layers, fused)
    return fused


def _switch(attn: nn.Module, groups: Dict[str, Tuple[str, ...]], processor, make) -> None:
    """Install the fused layers (``make(fused_name, members)``), drop the members diffusers' fused path no longer
    calls, and turn that path on."""
    for fused_name, members in groups.items():
        setattr(attn, fused_name, make(fused_name, members))
    still_used = {"to_q"} if "to_kv" in groups else set()  # cross-attention keeps its own query projection
    for members in groups.values():
        for name in members:
            if name not in still_used:
                delattr(attn, name)
    attn.fused_projections = True
    if processor is not None:
        attn.set_processor(processor)


def fuse_projections(transformer: nn.Module) -> Tuple[Dict[str, Dict[str, List[str]]], Dict[str, str]]:
    """Fuse every attention's quantized sibling projections in place.

    Returns ``(fused, left)``: attention name -> {fused layer -> member names} (what a checkpoint records), and
    attention name -> why it was left as it was."""
    from . import timestep_groups

    fused, left = {}, {}
    for name, attn in list(transformer.named_modules()):
        if not hasattr(attn, "to_k") or not hasattr(attn, "to_v"):
            continue
        groups, processor = _plan(attn)
        if groups is None:
            left[name] = processor  # the reason
            continue
        built, why = {}, None
        for fused_name, members in groups.items():
            layers = [getattr(attn, m, None) for m in members]
            why = _mismatch(layers)
            if why is not None:
                break
            built[fused_name] = (concat(layers), layers)
        if why is not None:
            left[name] = why
            continue
        _switch(attn, groups, processor, lambda f, m: built[f][0])
        grouped = getattr(transformer, timestep_groups.HOOK_ATTR, None)
        if grouped:  # the timestep pre-hook now feeds the fused layers instead of the members
            gone = {id(m) for _, ls in built.values() for m in ls}
            kept = [m for m in grouped if id(m) not in gone]
            kept += [layer for layer, _ in built.values() if getattr(layer, "act_scales", None) is not None]
            setattr(transformer, timestep_groups.HOOK_ATTR, kept)
        fused[name] = {f: list(m) for f, m in groups.items()}
    transformer._ditq_fused = {**getattr(transformer, "_ditq_fused", {}), **fused}  # what a checkpoint records
    return fused, left


def restructure(model: nn.Module, fused: Dict[str, Dict[str, List[str]]]) -> None:
    """Give a freshly built (meta or empty) model the fused structure a checkpoint was saved with: a placeholder
    ``nn.Linear`` per fused layer, sized from its members, which the checkpoint's QuantLinears then replace."""
    for name, groups in fused.items():
        try:
            attn = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the checkpoint fused the projections of {name!r}, which this "
                             f"{type(model).__name__} lacks") from None
        planned, proc = _plan(attn)
        if planned is None or {f: list(m) for f, m in planned.items()} != groups:
            raise ValueError(f"{name}: the checkpoint fused {groups}, but this model's attention can fuse "
                             f"{planned if planned is not None else f'nothing ({proc})'}")

        def placeholder(fused_name, members, attn=attn):
            parts = [getattr(attn, m) for m in members]
            return nn.Linear(parts[0].in_features, sum(p.out_features for p in parts),
                             bias=parts[0].bias is not None, device="meta")

        _switch(attn, planned, proc, placeholder)

"""Fused transformer blocks: the int8 activations of q/k/v and of the MLP come straight out of the norm.

In diffusers' ``BasicTransformerBlock`` (DiT: ``ada_norm_zero``; PixArt: ``ada_norm_single``) every quantized
GEMM input is produced by LayerNorm -> adaLN modulate ``x * (1 + scale) + shift`` -> a 16-bit write -> a read by
the activation quantizer. With the static, calibrated scale of the next layer known ahead of time, one row pass
(``torch.ops.ditq.norm_modulate_quantize``) does all of it and hands the GEMM its int8 input directly.

``FusedBasicTransformerBlock`` (:func:`fused_block_class`) is that diffusers block with a ditq forward for the
configurations DiT and PixArt use: the same modules and weights (the block's class is swapped in place, so its
state dict and attributes are unchanged), the fused norm for the self-attention's fused ``to_qkv`` (see
:mod:`ditq.fuse`) and for the MLP's first linear, and otherwise what the diffusers block does, in the same order. Anything it does not cover -- an attention mask,
cross-attention kwargs, chunked feed-forward, a backend with no fused norm kernel (from the kernels' own
description) -- runs the wrapped diffusers block unchanged, so the diffusers model stays the reference.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .nn import QuantLinear

NORM_TYPES = ("ada_norm_zero", "ada_norm_single")


def _why_not(block: nn.Module) -> Optional[str]:
    """None when ``block`` can run fused, else why not."""
    from diffusers.models.activations import GELU
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    if type(block).__name__ != "BasicTransformerBlock" or block.norm_type not in NORM_TYPES:
        return f"{type(block).__name__} with norm {getattr(block, 'norm_type', '?')!r} has no fused implementation"
    attn = block.attn1
    if not isinstance(getattr(attn, "processor", None), FusedAttnProcessor2_0) or \
            not isinstance(getattr(attn, "to_qkv", None), QuantLinear):
        return "its self-attention's q/k/v are not fused into one quantized GEMM (ditq.fuse)"
    if block.only_cross_attention or block.pos_embed is not None or block.ff is None or \
            getattr(block, "fuser", None) is not None:
        return "it uses features the fused block does not implement (cross-attention only, positional embedding, "\
               "GLIGEN, no feed-forward)"
    if any(getattr(attn, a, None) is not None for a in ("spatial_norm", "group_norm", "norm_q", "norm_k")) or \
            attn.residual_connection or attn.rescale_output_factor != 1.0:
        return "its self-attention normalizes or rescales (not implemented fused)"
    net = block.ff.net
    act, fc1, fc2 = net[0], getattr(net[0], "proj", None), net[2] if len(net) == 3 else None
    if not isinstance(act, GELU) or not isinstance(fc1, QuantLinear) or not isinstance(fc2, QuantLinear):
        return "its feed-forward is not a quantized GELU MLP"
    norm1 = block.norm1.norm if block.norm_type == "ada_norm_zero" else block.norm1
    norm_mlp = block.norm3 if block.norm_type == "ada_norm_zero" else block.norm2
    for norm in (norm1, norm_mlp):
        if not isinstance(norm, nn.LayerNorm) or norm.elementwise_affine:
            return "its norms are not affine-free LayerNorms"
    for layer in (attn.to_qkv, fc1):
        # timestep-grouped layers qualify: the transformer's pre-hook writes the step's scale into act_scale
        # before the blocks run, and the fused forward reads act_scale at call time
        if layer.act_scheme != "static":
            return "the fused norm needs static scales (dynamic per-token scales are not fused yet)"
        kernels = layer._kernels
        if kernels is None or kernels.norm_modulate_quantize is None:
            return f"backend {layer.backend!r} has no fused norm kernel"
    return None


def _forward(b, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
             timestep=None, cross_attention_kwargs=None, class_labels=None, added_cond_kwargs=None):
    """The fused forward of a ``BasicTransformerBlock`` ``b`` that :func:`_why_not` accepted. The kernels are
    checked per call (two attribute reads) because a moved model may sit on a backend without the fused norm."""
    to_qkv, fc1 = b.attn1.to_qkv, b.ff.net[0].proj
    if attention_mask is not None or cross_attention_kwargs or b._chunk_size is not None or \
            to_qkv._kernels is None or to_qkv._kernels.norm_modulate_quantize is None or \
            fc1._kernels is None or fc1._kernels.norm_modulate_quantize is None:
        return super(type(b), b).forward(hidden_states, attention_mask, encoder_hidden_states,
                                          encoder_attention_mask, timestep, cross_attention_kwargs, class_labels,
                                          added_cond_kwargs)
    batch = hidden_states.shape[0]
    if b.norm_type == "ada_norm_zero":  # AdaLayerNormZero's conditioning, without its norm
        emb = b.norm1.linear(b.norm1.silu(b.norm1.emb(timestep, class_labels, hidden_dtype=hidden_states.dtype)))
        # [B, K] slices of one [B, 6K] row: contiguous copies (a few KB) so the kernels read plain rows
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (t.contiguous() for t in emb.chunk(6, dim=1))
        eps1, eps2 = b.norm1.norm.eps, b.norm3.eps
        gate_msa, gate_mlp = gate_msa.unsqueeze(1), gate_mlp.unsqueeze(1)
    else:  # ada_norm_single: the table plus the (already embedded) timestep
        mod = (b.scale_shift_table[None] + timestep.reshape(batch, 6, -1)).chunk(6, dim=1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        shift_msa, scale_msa, shift_mlp, scale_mlp = (t.squeeze(1).contiguous() for t in (shift_msa, scale_msa,
                                                                                             shift_mlp, scale_mlp))
        eps1, eps2 = b.norm1.eps, b.norm2.eps

    # self-attention: fused norm -> one q/k/v GEMM -> SDPA -> output projection
    attn = b.attn1
    q8, s8 = to_qkv._kernels.norm_modulate_quantize(hidden_states.contiguous(), shift_msa, scale_msa, eps1,
                                                     to_qkv.act_scale)
    qkv = to_qkv.forward_quantized(q8, s8, hidden_states.dtype, hidden_states.shape[:-1])
    q, k, v = (t.unflatten(-1, (attn.heads, -1)).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).flatten(2).to(q.dtype)))
    hidden_states = gate_msa * out + hidden_states

    if b.attn2 is not None:  # cross-attention (PixArt): unchanged, on the un-normalized states
        norm = b.norm2(hidden_states) if b.norm_type == "ada_norm_zero" else hidden_states
        hidden_states = b.attn2(norm, encoder_hidden_states=encoder_hidden_states,
                                attention_mask=encoder_attention_mask) + hidden_states

    # MLP: fused norm -> fc1 GEMM -> GELU -> fc2
    act, fc2 = b.ff.net[0], b.ff.net[2]
    q8, s8 = fc1._kernels.norm_modulate_quantize(hidden_states.contiguous(), shift_mlp, scale_mlp, eps2,
                                                 fc1.act_scale)
    h = fc2(b.ff.net[1](act.gelu(fc1.forward_quantized(q8, s8, hidden_states.dtype, hidden_states.shape[:-1]))))
    return gate_mlp * h + hidden_states


@lru_cache(maxsize=None)
def fused_block_class():
    """``BasicTransformerBlock`` with the fused forward: a fused block keeps every attribute and state-dict key of
    the diffusers block (its class is swapped in place), and its model code (e.g. DiT reading
    ``transformer_blocks[0].norm1.emb``) keeps working."""
    from diffusers.models.attention import BasicTransformerBlock

    return type("FusedBasicTransformerBlock", (BasicTransformerBlock,),
                {"forward": _forward, "__doc__": __doc__.split("\n\n")[0], "__module__": __name__})


def fuse_blocks(transformer: nn.Module) -> dict:
    """Replace every ``BasicTransformerBlock`` that can run fused by a :class:`FusedBasicTransformerBlock`.

    Returns block name -> None (fused) or why it was left as it was."""
    done = {}
    for name, module in list(transformer.named_modules()):
        if type(module).__name__ != "BasicTransformerBlock":
            continue
        why = _why_not(module)
        done[name] = why
        if why is None:
            module.__class__ = fused_block_class()
            transformer._ditq_fused_blocks = True  # what a checkpoint records
    return done

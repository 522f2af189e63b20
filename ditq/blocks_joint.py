"""Fused MM-DiT blocks -- FLUX (``FluxTransformerBlock``, ``FluxSingleTransformerBlock``) and SD3
(``JointTransformerBlock``): the same fusions as :mod:`ditq.blocks` in the layout where text and image tokens run
side by side.

Joint block, per stream (image, and text with its own weights): ``norm_modulate_quantize`` -> the stream's fused
q/k/v GEMM (``to_qkv`` / ``to_added_qkv``, :mod:`ditq.fuse`); one ``attention_inputs`` op from both GEMM outputs to
the attention's q, k, v (each stream's q/k RMSNorm, the streams concatenated, the rotary embedding: diffusers'
composition op for op, :mod:`ditq.ops`); diffusers' attention dispatch; the output projections ``to_out`` /
``to_add_out`` with adaLN gate and residual in their epilogue; the MLPs as in :mod:`ditq.blocks` (norm -> fc1 with
GELU, int8 out -> fc2 with gate and residual). SD3's joint block is the same with the image stream first in the
attention, no rotary embedding, q/k RMSNorms only where the model has them (SD3.5's ``qk_norm="rms_norm"``),
SDPA itself, and in its last block (``context_pre_only``) a text stream that only feeds k/v. SD3.5-medium's dual
attention blocks (diffusers' MMDiT-X: ``SD35AdaLayerNormZeroX`` gives nine adaLN vectors, ``attn2`` is a second
self-attention over the image stream alone) add, after attn's gated residual and as diffusers orders it: a fused
norm of the block's input with attn2's own shift / scale -> attn2's fused q/k/v GEMM -> ``attention_inputs`` on
that one stream (its q/k RMSNorms) -> SDPA -> attn2's ``to_out`` with its gate and the stream so far as residual
in the epilogue. A backend without ``attention_inputs`` (or q/k norms it does not take) runs diffusers' own norms,
concatenations and rotary embedding instead (SD3 then concatenates both streams' q/k/v in one op and permutes once
for SDPA; SD3.5 runs the diffusers forward).

Single block: its attention's q/k/v and ``proj_mlp`` read the same normalized input, so one
``norm_modulate_quantize`` feeds both GEMMs (when their calibrated scales agree, as they do: they observe the same
tensor). They stay two GEMMs rather than one concatenated GEMM: ``proj_mlp``'s epilogue applies GELU and writes
``proj_out``'s int8 input directly (static scales), the attention output is quantized with the same scale, and the
two int8 halves are concatenated for ``proj_out``, whose epilogue applies the gate and the residual. One GEMM over
[q | k | v | mlp] would instead write the 4D-wide MLP half in float and run GELU, the concatenation and the
quantization as three more passes over it.

Whatever these forwards do not cover (IP-adapter or other attention kwargs, training, a backend without the fused
norm) runs the diffusers forward.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch
from torch import nn

from .blocks import _lora_norm, _mlp, _norm_quantize, _quantize, quantizes_on_load
from .nn import QuantLinear

JOINT, SINGLE, SD3 = "FluxTransformerBlock", "FluxSingleTransformerBlock", "JointTransformerBlock"
KINDS = (JOINT, SINGLE, SD3)


def _plain_layernorm(norm) -> bool:
    return isinstance(norm, nn.LayerNorm) and not norm.elementwise_affine


def _mlp_why_not(ff) -> Optional[str]:
    from diffusers.models.activations import GELU

    net = getattr(ff, "net", None)
    if net is None or len(net) != 3 or not isinstance(net[0], GELU) or \
            not isinstance(net[0].proj, QuantLinear) or not isinstance(net[2], QuantLinear):
        return "its feed-forward is not a quantized GELU MLP"
    return None


def _attention_why_not(attn, joint: bool) -> Optional[str]:
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    if type(attn.processor) is not FluxAttnProcessor or not getattr(attn, "fused_projections", False):
        return "its attention's q/k/v are not fused into one quantized GEMM (ditq.fuse), or it has another processor"
    names = ("to_qkv", "to_out.0", "to_added_qkv", "to_add_out") if joint else ("to_qkv",)
    for name in names:
        if not isinstance(attn.get_submodule(name), QuantLinear):
            return f"its attention's {name} is not quantized"
    return None


def _nmq_why_not(layers) -> Optional[str]:
    for layer in layers:
        if layer._kernels is None or layer._kernels.norm_modulate_quantize is None:
            return f"backend {layer.backend!r} has no fused norm kernel"
    return None


def why_not(block: nn.Module) -> Optional[str]:
    """None when this FLUX block can run fused, else why not."""
    kind = type(block).__name__
    if kind == SINGLE:
        why = _attention_why_not(block.attn, joint=False)
        if why is None and not (isinstance(block.proj_mlp, QuantLinear) and isinstance(block.proj_out, QuantLinear)):
            why = "its proj_mlp / proj_out are not quantized"
        if why is None and not (isinstance(block.act_mlp, nn.GELU) and block.act_mlp.approximate == "tanh"):
            why = "its MLP activation is not GELU-tanh"
        if why is None and not _plain_layernorm(block.norm.norm):
            why = "its norm is not an affine-free LayerNorm"
        return why or _nmq_why_not([block.attn.to_qkv, block.proj_mlp])
    if kind == JOINT:
        why = _attention_why_not(block.attn, joint=True) or _mlp_why_not(block.ff) or _mlp_why_not(block.ff_context)
        if why is None and not all(_plain_layernorm(n) for n in (block.norm1.norm, block.norm1_context.norm,
                                                                    block.norm2, block.norm2_context)):
            why = "its norms are not affine-free LayerNorms"
        if why is None and (block.norm1.emb is not None or block.norm1_context.emb is not None):
            why = "its adaLN norms embed their own conditioning"
        return why or _nmq_why_not([block.attn.to_qkv, block.attn.to_added_qkv, block.ff.net[0].proj,
                                    block.ff_context.net[0].proj])
    if kind == SD3:
        return _sd3_why_not(block)
    return f"{kind} has no fused implementation"


def _qk_norms_why_not(attn, head_dim: int, what: str = "its attention's") -> Optional[str]:
    """None when the attention's q/k norms are what ``attention_inputs`` computes (each absent, or an RMSNorm over
    one head with a weight and no bias: all diffusers' ``RMSNorm``, as SD3.5 has, or all ``torch.nn.RMSNorm``, as
    FLUX's attention has, with one eps), else why not."""
    from diffusers.models.normalization import RMSNorm

    norms = [n for n in (getattr(attn, m, None) for m in QK_NORMS) if n is not None]
    for norm in norms:
        if type(norm) not in (RMSNorm, torch.nn.RMSNorm):
            return f"{what} q/k norm is a {type(norm).__name__}, not an RMSNorm (not implemented fused)"
        if norm.weight is None or getattr(norm, "bias", None) is not None or \
                tuple(norm.weight.shape) != (head_dim,):
            return (f"{what} q/k RMSNorm is not one weight per head dimension without bias (e.g. "
                    "rms_norm_across_heads; not implemented fused)")
    if len({type(n) for n in norms}) > 1 or len({n.eps for n in norms}) > 1 or \
            any(n.eps is None for n in norms):
        return f"{what} q/k RMSNorms differ in kind or eps, or have none (not implemented fused)"
    return None


def _sd3_why_not(block) -> Optional[str]:
    from diffusers.models.attention_processor import FusedJointAttnProcessor2_0

    from .fuse import joint_qk_norm_processor

    attn = block.attn
    if type(attn.processor) not in (FusedJointAttnProcessor2_0, joint_qk_norm_processor()):
        return "its attention's q/k/v are not fused into one quantized GEMM (ditq.fuse), or it has another processor"
    names = ("to_qkv", "to_added_qkv", "to_out.0") + (() if block.context_pre_only else ("to_add_out",))
    for name in names:
        if not isinstance(attn.get_submodule(name), QuantLinear):
            return f"its attention's {name} is not quantized"
    why = _qk_norms_why_not(attn, attn.to_qkv.out_features // 3 // attn.heads)
    if why is not None:
        return why
    attn2 = block.attn2 if block.use_dual_attention else None
    if attn2 is not None:  # SD3.5-medium (MMDiT-X): a second, image-only self-attention
        if type(attn2.processor) is not joint_qk_norm_processor() or not getattr(attn2, "fused_projections", False):
            return ("its dual attention's (attn2) q/k/v are not fused into one quantized GEMM (ditq.fuse), or it has "
                    "another processor")
        for name in ("to_qkv", "to_out.0"):
            if not isinstance(attn2.get_submodule(name), QuantLinear):
                return f"its dual attention's {name} is not quantized"
        why = _qk_norms_why_not(attn2, attn2.to_qkv.out_features // 3 // attn2.heads, "its dual attention's")
        if why is not None:
            return why
    norms = [block.norm1.norm, block.norm1_context.norm, block.norm2]
    mlps = [block.ff]
    if not block.context_pre_only:
        norms.append(block.norm2_context)
        mlps.append(block.ff_context)
    why = next((w for w in map(_mlp_why_not, mlps) if w is not None), None)
    if why is None and not all(map(_plain_layernorm, norms)):
        why = "its norms are not affine-free LayerNorms"
    if why is None and getattr(block.norm1, "emb", None) is not None:
        why = "its adaLN norm embeds its own conditioning"
    return why or _nmq_why_not([attn.to_qkv, attn.to_added_qkv] + ([attn2.to_qkv] if attn2 is not None else []) +
                               [ff.net[0].proj for ff in mlps])


def _mods(b, norms, temb: torch.Tensor, dim: int):
    """Each adaLN norm's ``linear(silu(temb))`` [B, parts * D] as its ``parts`` contiguous [B, D] vectors (one copy
    per norm; D = ``dim``). The norms of a block read the same ``silu(temb)``: it is computed once, and quantized once when their
    scales agree (``_ditq_shared_ada``, checked when fusing)."""
    silu = torch.nn.functional.silu(temb)
    if all(quantizes_on_load(n.linear) for n in norms):  # each adaLN GEMM quantizes silu(temb) as it loads it
        mods = [n.linear.forward_fused(silu, n.linear._buffers["act_scale"], temb.dtype, lora_input=silu)
                for n in norms]
    elif b._ditq_shared_ada:
        q, s = _quantize(norms[0].linear, silu)
        mods = [n.linear.forward_fused(q, s, temb.dtype, lora_input=silu) for n in norms]
    else:
        mods = [n.linear(silu) for n in norms]
    return [m.view(m.shape[0], -1, dim).transpose(0, 1).contiguous().unbind(0) for m in mods]


def _same_input_quantization(layers) -> bool:
    """Whether these layers, reading one tensor, quantize it identically (so one quantization serves all)."""
    first = layers[0]
    return all(isinstance(m, QuantLinear) for m in layers) and all(
        m.act_scheme == first.act_scheme and m.backend == first.backend and all(
            (getattr(first, n, None) is None) == (getattr(m, n, None) is None) and
            (getattr(m, n, None) is None or torch.equal(getattr(first, n), getattr(m, n)))
            for n in ("act_scale", "act_scales", "timestep_bounds")) for m in layers)


QK_NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")


def _joint_qkv(b, x: torch.Tensor, c: torch.Tensor, shift, scale, c_shift, c_scale):
    """A joint block's two fused q/k/v GEMMs, each fed by its stream's own modulated norm: image ``x`` through
    ``to_qkv``, text ``c`` through ``to_added_qkv``. Returns (image qkv, text qkv), [B * S, 3 * D] each."""
    attn, eps, c_eps = b.attn, b.norm1.norm.eps, b.norm1_context.norm.eps
    qkv = attn.to_qkv.forward_fused(*_norm_quantize(attn.to_qkv, x, shift, scale, eps), x.dtype,
                                    lora_input=_lora_norm(attn.to_qkv, x, shift, scale, eps))
    cqkv = attn.to_added_qkv.forward_fused(*_norm_quantize(attn.to_added_qkv, c, c_shift, c_scale, c_eps), x.dtype,
                                           lora_input=_lora_norm(attn.to_added_qkv, c, c_shift, c_scale, c_eps))
    return qkv, cqkv


def _attention_inputs(b, first_qkv: torch.Tensor, second_qkv: Optional[torch.Tensor], batch: int, heads: int,
                      first_norms, second_norms, rotary=None, attn2: bool = False):
    """``attention_inputs`` on two (or one) streams' fused q/k/v outputs -> q, k, v [B, H, S, Dh], or None where the
    block runs diffusers' ops instead: the backend has no such kernel, the q/k norms are not RMSNorms it takes
    (``b._ditq_qk`` is None, decided when fusing), or the rotary embedding is not FLUX's (cos, sin) pair.
    ``*_norms``: the stream's (q norm, k norm) module names on the attention; ``attn2``: the block's second
    attention (SD3.5-medium's dual attention, planned in ``b._ditq_qk2``) instead of ``b.attn``."""
    attn = b.attn2 if attn2 else b.attn
    op = attn.to_qkv._kernels.attention_inputs if attn.to_qkv._kernels is not None else None
    plan = getattr(b, "_ditq_qk2" if attn2 else "_ditq_qk", None)
    if op is None or plan is None:
        return None
    eps, torch_norm = plan
    cos = sin = None
    if rotary is not None:
        if not (isinstance(rotary, tuple) and len(rotary) == 2 and all(
                isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() == 2 for t in rotary)):
            return None
        cos, sin = rotary
        cos, sin = cos.to(first_qkv.device), sin.to(first_qkv.device)  # as apply_rotary_emb moves them

    def weight(name):
        norm = getattr(attn, name, None)
        return None if norm is None else norm.weight

    return op(first_qkv.view(-1, first_qkv.shape[-1]),
              None if second_qkv is None else second_qkv.view(-1, second_qkv.shape[-1]), batch, heads,
              *map(weight, first_norms), *(map(weight, second_norms) if second_qkv is not None else (None, None)),
              eps, cos, sin, torch_norm)


def _heads(attn, qkv: torch.Tensor, batch: int):
    """[B * S, 3 * H * Dh] -> q, k, v [B, S, H, Dh] (the layout diffusers' FLUX processor works in)."""
    return qkv.view(batch, -1, 3, attn.heads, attn.head_dim).unbind(2)


def _attend(attn, q, k, v, rotary):
    """diffusers' FLUX attention after the q/k norms: rotary embedding, its attention dispatch. Returns
    [B, S, H * Dh]."""
    from diffusers.models.embeddings import apply_rotary_emb

    if rotary is not None:
        q = apply_rotary_emb(q, rotary, sequence_dim=1)
        k = apply_rotary_emb(k, rotary, sequence_dim=1)
    return _dispatch(attn, q, k, v)


def _dispatch(attn, q, k, v):
    """diffusers' FLUX attention dispatch on q, k, v [B, S, H, Dh] (views of ``attention_inputs``' [B, H, S, Dh]
    are fine: its native backend permutes them back for SDPA). Returns [B, S, H * Dh]."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    proc = attn.processor
    out = dispatch_attention_fn(q, k, v, attn_mask=None, backend=proc._attention_backend,
                                parallel_config=proc._parallel_config)
    return out.flatten(2, 3)


def _covered(b, joint_attention_kwargs, layers) -> bool:
    return not joint_attention_kwargs and not b.training and \
        all(layer._kernels is not None and layer._kernels.norm_modulate_quantize is not None for layer in layers)


def _joint_forward(b, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                   joint_attention_kwargs=None):
    attn = b.attn
    if not _covered(b, joint_attention_kwargs, (attn.to_qkv, attn.to_added_qkv, b.ff.net[0].proj,
                                                 b.ff_context.net[0].proj)):
        return super(type(b), b).forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                                          joint_attention_kwargs)
    x, c = hidden_states.contiguous(), encoder_hidden_states.contiguous()
    (batch, seq, dim), text, dtype = x.shape, c.shape[1], x.dtype
    (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), \
        (c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp) = \
        _mods(b, (b.norm1, b.norm1_context), temb, x.shape[-1])

    qkv, cqkv = _joint_qkv(b, x, c, shift_msa, scale_msa, c_shift_msa, c_scale_msa)
    # text first, as diffusers' FLUX
    qkv_heads = _attention_inputs(b, cqkv, qkv, batch, attn.heads, ("norm_added_q", "norm_added_k"),
                                  ("norm_q", "norm_k"), image_rotary_emb)
    if qkv_heads is not None:
        o = _dispatch(attn, *(t.transpose(1, 2) for t in qkv_heads))
    else:
        (q, k, v), (cq, ck, cv) = _heads(attn, qkv, batch), _heads(attn, cqkv, batch)
        q = torch.cat([attn.norm_added_q(cq), attn.norm_q(q)], dim=1)
        k = torch.cat([attn.norm_added_k(ck), attn.norm_k(k)], dim=1)
        v = torch.cat([cv, v], dim=1)
        o = _attend(attn, q, k, v, image_rotary_emb)
    c_out, x_out = o.split_with_sizes([text, seq], dim=1)

    to_out, to_add_out = attn.to_out[0], attn.to_add_out
    x2d, c2d = x.view(batch * seq, dim), c.view(batch * text, -1)
    x_out, c_out = x_out.reshape(batch * seq, -1), c_out.reshape(batch * text, -1)
    h2d = to_out.forward_fused(*_quantize(to_out, x_out), dtype, gate=gate_msa, residual=x2d, rows_per_gate=seq,
                               lora_input=x_out)
    ch2d = to_add_out.forward_fused(*_quantize(to_add_out, c_out), dtype, gate=c_gate_msa, residual=c2d,
                                    rows_per_gate=text, lora_input=c_out)
    x = _mlp(b.ff, h2d.view(batch, seq, dim), shift_mlp, scale_mlp, b.norm2.eps, gate_mlp, h2d)
    c = _mlp(b.ff_context, ch2d.view(batch, text, -1), c_shift_mlp, c_scale_mlp, b.norm2_context.eps, c_gate_mlp,
             ch2d)
    c = c.view(batch, text, -1)
    if c.dtype == torch.float16:
        c = c.clip(-65504, 65504)
    return c, x.view(batch, seq, dim)


def _single_forward(b, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                    joint_attention_kwargs=None):
    attn = b.attn
    if not _covered(b, joint_attention_kwargs, (attn.to_qkv, b.proj_mlp)):
        return super(type(b), b).forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                                          joint_attention_kwargs)
    text = encoder_hidden_states.shape[1]
    x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    (batch, seq, dim), dtype = x.shape, x.dtype
    (shift, scale, gate), = _mods(b, (b.norm,), temb, dim)
    to_qkv, proj_mlp, proj_out = attn.to_qkv, b.proj_mlp, b.proj_out
    eps = b.norm.norm.eps
    q8, s8 = _norm_quantize(to_qkv, x, shift, scale, eps)
    if b._ditq_shared_input:  # proj_mlp quantizes the normalized input exactly as to_qkv does
        m8, ms8 = q8, s8
    else:
        m8, ms8 = _norm_quantize(proj_mlp, x, shift, scale, eps)
    xn = _lora_norm((to_qkv, proj_mlp), x, shift, scale, eps)
    qkv = to_qkv.forward_fused(q8, s8, dtype, lora_input=xn)
    qkv_heads = _attention_inputs(b, qkv, None, batch, attn.heads, ("norm_q", "norm_k"), None, image_rotary_emb)
    if qkv_heads is not None:
        o = _dispatch(attn, *(t.transpose(1, 2) for t in qkv_heads))
    else:
        q, k, v = _heads(attn, qkv, batch)
        o = _attend(attn, attn.norm_q(q), attn.norm_k(k), v, image_rotary_emb)
    o = o.reshape(batch * seq, dim)
    out_scale = proj_out._buffers["act_scale"]
    p = None
    if out_scale is not None and not proj_out._lora_on:  # static: both halves of proj_out's input come out int8
        a8, _ = proj_out._kernels.quantize_act(o.contiguous(), out_scale)
        p8 = torch.cat([a8, proj_mlp.forward_fused(m8, ms8, dtype, gelu=True, out_scale=out_scale, lora_input=xn)],
                       dim=1)
        ps = out_scale
    else:  # per-token scales span the whole concatenated row; a LoRA branch on proj_out reads it in float
        p = torch.cat([o, proj_mlp.forward_fused(m8, ms8, dtype, gelu=True, lora_input=xn)], dim=1)
        p8, ps = _quantize(proj_out, p)
    y = proj_out.forward_fused(p8, ps, dtype, gate=gate, residual=x.view(batch * seq, dim), rows_per_gate=seq,
                               lora_input=p)
    y = y.view(batch, seq, dim)
    if y.dtype == torch.float16:
        y = y.clip(-65504, 65504)
    return y[:, :text], y[:, text:]


def _sd3_forward(b, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs=None):
    """SD3's ``JointTransformerBlock``: as the FLUX joint block, with the sample stream first in the attention, no
    rotary embedding, q/k norms where the model has them (SD3.5), (last block, ``context_pre_only``) a context
    stream that only feeds k/v, and (SD3.5-medium's dual attention) a second attention over the image stream."""
    attn, attn2, pre_only = b.attn, b.attn2 if b.use_dual_attention else None, b.context_pre_only
    attns = (attn,) if attn2 is None else (attn, attn2)
    mlps = (b.ff,) if pre_only else (b.ff, b.ff_context)
    if b._chunk_size is not None or not _covered(b, joint_attention_kwargs, (attn.to_qkv, attn.to_added_qkv) +
                                                  tuple(a.to_qkv for a in attns[1:]) +
                                                  tuple(ff.net[0].proj for ff in mlps)) or \
            any(a.to_qkv._kernels.attention_inputs is None and  # no fused path applies q/k norms then
                any(getattr(a, n, None) is not None for n in QK_NORMS) for a in attns):
        return super(type(b), b).forward(hidden_states, encoder_hidden_states, temb, joint_attention_kwargs)
    x, c = hidden_states.contiguous(), encoder_hidden_states.contiguous()
    (batch, seq, dim), text, dtype = x.shape, c.shape[1], x.dtype
    mods, cmods = _mods(b, (b.norm1, b.norm1_context), temb, dim)
    # SD35AdaLayerNormZeroX (dual attention): 9 vectors, the last three attn2's (shift, scale, gate)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
    if pre_only:  # AdaLayerNormContinuous: (scale, shift)
        c_scale_msa, c_shift_msa = cmods
    else:
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = cmods

    qkv, cqkv = _joint_qkv(b, x, c, shift_msa, scale_msa, c_shift_msa, c_scale_msa)
    heads = attn.heads
    qkv_heads = _attention_inputs(b, qkv, cqkv, batch, heads, ("norm_q", "norm_k"), ("norm_added_q", "norm_added_k"))
    if qkv_heads is not None:
        q, k, v = qkv_heads
    else:  # both streams' q, k and v in one concatenation along the sequence, one permute to SDPA's layout
        qkv = torch.cat([qkv.view(batch, seq, 3, heads, -1), cqkv.view(batch, text, 3, heads, -1)], dim=1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    x_out, c_out = o.transpose(1, 2).reshape(batch, seq + text, -1).split_with_sizes([seq, text], dim=1)

    to_out = attn.to_out[0]
    x_out = x_out.reshape(batch * seq, -1)
    h2d = to_out.forward_fused(*_quantize(to_out, x_out), dtype, gate=gate_msa, residual=x.view(batch * seq, dim),
                               rows_per_gate=seq, lora_input=x_out)
    if attn2 is not None:  # diffusers adds attn2's gated output after attn's: its to_out takes h2d as residual
        h2d = _attn2(b, x, h2d, *mods[6:])
    x = _mlp(b.ff, h2d.view(batch, seq, dim), shift_mlp, scale_mlp, b.norm2.eps, gate_mlp, h2d).view(batch, seq, dim)
    if pre_only:
        return None, x
    c2d = c.view(batch * text, -1)
    c_out = c_out.reshape(batch * text, -1)
    ch2d = attn.to_add_out.forward_fused(*_quantize(attn.to_add_out, c_out), dtype, gate=c_gate_msa, residual=c2d,
                                         rows_per_gate=text, lora_input=c_out)
    c = _mlp(b.ff_context, ch2d.view(batch, text, -1), c_shift_mlp, c_scale_mlp, b.norm2_context.eps, c_gate_mlp,
             ch2d)
    return c.view(batch, text, -1), x


def _attn2(b, x: torch.Tensor, residual: torch.Tensor, shift, scale, gate) -> torch.Tensor:
    """SD3.5-medium's second attention (``attn2``: self-attention over the image stream ``x`` [B, S, D], q/k
    RMSNorms) gated and added to ``residual`` [B * S, D] (the stream after attn's residual add): the fused norm
    modulates ``norm1``'s LayerNorm of the same ``x`` with attn2's own shift / scale (diffusers'
    ``norm_hidden_states2``) -> attn2's fused q/k/v GEMM -> ``attention_inputs`` on one stream (or a view and one
    permute where the backend lacks it and attn2 has no q/k norm) -> SDPA -> ``to_out`` with gate and residual in
    its epilogue. [B * S, D]."""
    attn2 = b.attn2
    (batch, seq, dim), dtype = x.shape, x.dtype
    to_qkv, to_out = attn2.to_qkv, attn2.to_out[0]
    eps = b.norm1.norm.eps
    q8, s8 = _norm_quantize(to_qkv, x, shift, scale, eps)
    qkv = to_qkv.forward_fused(q8, s8, dtype, lora_input=_lora_norm(to_qkv, x, shift, scale, eps))
    qkv_heads = _attention_inputs(b, qkv, None, batch, attn2.heads, ("norm_q", "norm_k"), None, attn2=True)
    if qkv_heads is not None:
        q, k, v = qkv_heads
    else:
        q, k, v = qkv.view(batch, seq, 3, attn2.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    o = o.transpose(1, 2).reshape(batch * seq, -1)
    return to_out.forward_fused(*_quantize(to_out, o), dtype, gate=gate, residual=residual, rows_per_gate=seq,
                                lora_input=o)


@lru_cache(maxsize=None)
def fused_class(kind: str):
    """The diffusers FLUX block class ``kind`` with the fused forward (swapped in place: same modules, same state
    dict keys)."""
    from diffusers.models.attention import JointTransformerBlock
    from diffusers.models.transformers import transformer_flux as tf

    base = JointTransformerBlock if kind == SD3 else getattr(tf, kind)
    forward = {JOINT: _joint_forward, SINGLE: _single_forward, SD3: _sd3_forward}[kind]
    return type(f"Fused{kind}", (base,), {"forward": forward, "__module__": __name__,
                                          "__doc__": f"diffusers' {kind} with ditq's fused forward."})


def _qk_plan(attn):
    """attention_inputs' (eps, torch_norm) for ``attn`` (eps 1e-6 when there is no norm: unused then), or None where
    the q/k norms are not what it computes (FLUX then keeps diffusers' norms; SD3 refuses such a block)."""
    head_dim = attn.to_qkv.out_features // 3 // attn.heads
    norm = next((n for n in (getattr(attn, m, None) for m in QK_NORMS) if n is not None), None)
    return None if _qk_norms_why_not(attn, head_dim) is not None else \
        (1e-6 if norm is None else float(norm.eps), isinstance(norm, torch.nn.RMSNorm))


def fuse(block: nn.Module) -> Optional[str]:
    """Fuse one FLUX block in place; None, or why it was left as it was."""
    why = why_not(block)
    if why is not None:
        return why
    kind = type(block).__name__
    attn = block.attn
    block._ditq_qk = _qk_plan(attn)
    if kind == SD3 and block.use_dual_attention:  # SD3.5-medium's attn2: its own norms, its own plan
        block._ditq_qk2 = _qk_plan(block.attn2)
    if kind == SINGLE:
        block._ditq_shared_input = _same_input_quantization([block.attn.to_qkv, block.proj_mlp])
        norms = (block.norm,)
    else:  # both streams' adaLN norms (FLUX, SD3) read silu(temb)
        norms = (block.norm1, block.norm1_context)
    block._ditq_shared_ada = _same_input_quantization([n.linear for n in norms])
    block.__class__ = fused_class(kind)
    return None

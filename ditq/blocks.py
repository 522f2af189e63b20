"""Fused transformer blocks: each quantized GEMM gets its int8 input from the op before it and hands the block's
elementwise tail to its epilogue.

In diffusers' ``BasicTransformerBlock`` (DiT: ``ada_norm_zero``; PixArt: ``ada_norm_single``) a quantized GEMM's
input is produced by LayerNorm -> adaLN modulate ``x * (1 + scale) + shift`` -> a write -> a read by the activation
quantizer, and its output goes through GELU, the adaLN gate and the residual add as separate passes. The fused
block runs, per block (static or dynamic activation scales alike):

* ``norm_modulate_quantize`` (one row pass) -> the q/k/v GEMM (``to_qkv``, :mod:`ditq.fuse`) -> SDPA, with one
  view/permute in and one reshape out -> ``quantize_act`` -> ``to_out`` with gate and residual in its epilogue;
* (PixArt) cross-attention: ``to_q`` and the fused ``to_kv`` -> SDPA -> ``to_out`` with the residual fused;
* ``norm_modulate_quantize`` -> ``fc1`` with GELU-tanh in its epilogue, which also quantizes its output to int8
  with ``fc2``'s static scale (dynamic ``fc2``: a float output and a per-token ``quantize_act``) -> ``fc2`` with
  gate and residual fused.

The six adaLN vectors come out of one ``[B, 6, D] -> [6, B, D]`` copy, so each is a contiguous row block that the
kernels read as is. The epilogue computes ``y * gate + residual`` in fp32, as the diffusers block does for a float32
model: with the same integer GEMMs the fused block equals the unfused quantized block up to GELU's last bits and
the norm's summation order (which can move an int8 value at an exact rounding tie by one step).

``FusedBasicTransformerBlock`` (:func:`fused_block_class`) is the diffusers block with this forward: the same
modules and weights (the block's class is swapped in place, so its state dict and attributes are unchanged).
Anything it does not cover -- a self-attention mask (PixArt's text padding mask is covered), cross-attention kwargs, chunked feed-forward, training mode, a
backend with no fused norm kernel -- runs the diffusers block unchanged, so the diffusers model stays the reference.
A backend without the fused GEMM epilogue runs the plain GEMM and the same epilogue in torch
(:meth:`ditq.nn.QuantLinear.forward_fused`).

DiT's conditioning. Every DiT block has its own timestep + label embedder (``norm1.emb``) and adaLN linear, and the
model's final layer calls block 0's embedder again. The sinusoidal projection of the timestep is the same for all
of them, and DiT checkpoints converted from the original (one ``t_embedder`` / ``y_embedder``) hold the *same*
embedder in every block. A fused ``DiTTransformer2DModel`` therefore runs its own forward (bound on the instance;
its class and state dict stay diffusers'): the projection once, each distinct embedder once (equal embedders are
found when fusing, by their tensors), the final layer reusing block 0's conditioning. The embedders stay in float by
default (``ditq.convert.DEFAULT_SKIP``: one row per image); each block's adaLN GEMM then takes ``silu(emb)`` in float
and quantizes it as it loads it (:func:`quantizes_on_load`), so a block is 8 ditq launches in all: two fused norms,
the q/k/v, attention-output quantization, output, fc1 and fc2 GEMMs, and its adaLN GEMM. Where the adaLN GEMMs
cannot quantize on load (per-token scales, or a backend without ``KernelOps.fused_gemm_float_a``), each distinct
``silu(emb)`` is quantized once for the adaLN linears that share it. A model
whose embedders were quantized anyway (``include``) runs them as fused GEMMs: the projection quantized once for
every ``linear_1``, the label embedding added in ``linear_2``'s epilogue.
"""
from __future__ import annotations

import math
import types
from functools import lru_cache
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .nn import QuantLinear

NORM_TYPES = ("ada_norm_zero", "ada_norm_single")


def _attention_why_not(attn: nn.Module, fused_attr: str) -> Optional[str]:
    """None when the attention runs with ditq's plumbing: plain SDPA over quantized projections."""
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    if not isinstance(getattr(attn, "processor", None), FusedAttnProcessor2_0) or \
            not isinstance(getattr(attn, fused_attr, None), QuantLinear):
        return "its attention's projections are not fused into one quantized GEMM (ditq.fuse)"
    if any(getattr(attn, a, None) is not None for a in ("spatial_norm", "group_norm", "norm_q", "norm_k")) or \
            getattr(attn, "norm_cross", None) or attn.residual_connection or attn.rescale_output_factor != 1.0:
        return "its attention normalizes or rescales (not implemented fused)"
    if not isinstance(attn.to_out[0], QuantLinear) or (fused_attr == "to_kv" and not isinstance(attn.to_q,
                                                                                               QuantLinear)):
        return "its attention's projections are not all quantized"
    return None


def _why_not(block: nn.Module) -> Optional[str]:
    """None when ``block`` can run fused, else why not."""
    from diffusers.models.activations import GELU

    if type(block).__name__ != "BasicTransformerBlock" or block.norm_type not in NORM_TYPES:
        return f"{type(block).__name__} with norm {getattr(block, 'norm_type', '?')!r} has no fused implementation"
    if block.only_cross_attention or block.pos_embed is not None or block.ff is None or \
            getattr(block, "fuser", None) is not None:
        return "it uses features the fused block does not implement (cross-attention only, positional embedding, "\
               "GLIGEN, no feed-forward)"
    why = _attention_why_not(block.attn1, "to_qkv")
    if why is None and block.attn2 is not None:
        why = _attention_why_not(block.attn2, "to_kv")
        why = why and f"cross-attention: {why}"
    if why is not None:
        return why
    net = block.ff.net
    act, fc1, fc2 = net[0], getattr(net[0], "proj", None), net[2] if len(net) == 3 else None
    if not isinstance(act, GELU) or not isinstance(fc1, QuantLinear) or not isinstance(fc2, QuantLinear):
        return "its feed-forward is not a quantized GELU MLP"
    norm1 = block.norm1.norm if block.norm_type == "ada_norm_zero" else block.norm1
    norm_mlp = block.norm3 if block.norm_type == "ada_norm_zero" else block.norm2
    for norm in (norm1, norm_mlp):
        if not isinstance(norm, nn.LayerNorm) or norm.elementwise_affine:
            return "its norms are not affine-free LayerNorms"
    for layer in (block.attn1.to_qkv, fc1):
        # timestep-grouped layers qualify: the transformer's pre-hook writes the step's scale into act_scale
        # before the blocks run, and the fused forward reads act_scale at call time
        kernels = layer._kernels
        if kernels is None or kernels.norm_modulate_quantize is None:
            return f"backend {layer.backend!r} has no fused norm kernel"
    return None


# ---- the fused block ----------------------------------------------------------------------------------------

def _quantize(layer: QuantLinear, x2d: torch.Tensor):
    """``layer``'s activation quantization of a [M, K] tensor (its static scale, or per-token when dynamic)."""
    return layer._kernels.quantize_act(x2d.contiguous(), layer._buffers["act_scale"])


def _norm_quantize(layer: QuantLinear, x: torch.Tensor, shift, scale, eps: float):
    """``layer``'s int8 input straight from the modulated LayerNorm of ``x`` [B, S, D] (one row pass,
    ``norm_modulate_quantize``; its static scale, or per-token when dynamic)."""
    return layer._kernels.norm_modulate_quantize(x, shift, scale, eps, layer._buffers["act_scale"])


def _lora_norm(layers, x: torch.Tensor, shift, scale, eps: float) -> Optional[torch.Tensor]:
    """The float input a run-time LoRA branch (:mod:`ditq.lora`) on any of ``layers`` reads where a fused norm
    writes only int8: the modulated LayerNorm of ``x`` [B, S, D], as diffusers' adaLN norms compute it (shift /
    scale [B, D]). None, computing nothing, while none of them carries an adapter."""
    if not any(layer._lora_on for layer in (layers if isinstance(layers, tuple) else (layers,))):
        return None
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale[:, None]) + shift[:, None]


def quantizes_on_load(layer: nn.Module) -> bool:
    """Whether ``layer``'s fused GEMM takes its float input as it is and quantizes it while loading it (a static
    scale and a backend whose kernels do: ``KernelOps.fused_gemm_float_a``): one launch instead of quantize_act +
    GEMM, the same integers. The fused blocks use it for the adaLN linears, whose input is a few rows (one per
    image), so re-quantizing it in every output tile costs nothing."""
    kernels = getattr(layer, "_kernels", None)
    if not isinstance(layer, QuantLinear) or kernels is None or not kernels.fused_gemm_float_a:
        return False
    fused = kernels.gemm_w8a8_fused if layer.fmt.bits == 8 else kernels.gemm_w4a8_fused
    scale = layer._buffers.get("act_scale")
    return fused is not None and scale is not None and scale.numel() == 1


def _split_heads(t: torch.Tensor, batch: int, parts: int, heads: int):
    """[B * S, parts * heads * Dh] (projections side by side) -> ``parts`` views [B, heads, S, Dh] for SDPA: one
    view and one permute for all of them."""
    return t.view(batch, -1, parts, heads, t.shape[-1] // (parts * heads)).permute(2, 0, 3, 1, 4).unbind(0)


def _attention_out(attn, q, k, v, dtype, mask=None, **epilogue) -> torch.Tensor:
    """SDPA, heads merged back into [B * S, D] (a view of SDPA's [B, S, H, Dh] output where the kernel allocates it
    that way), the output projection with ``epilogue`` (gate / residual) fused."""
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    o = o.transpose(1, 2).reshape(-1, o.shape[1] * o.shape[3])
    to_out = attn.to_out[0]
    qo, so = _quantize(to_out, o)
    return to_out.forward_fused(qo, so, dtype, lora_input=o, **epilogue)


def _body(b, x: torch.Tensor, mod: torch.Tensor, eps1: float, eps2: float, encoder_hidden_states=None,
          encoder_attention_mask=None):
    """The fused block on hidden states ``x`` [B, S, D] given the adaLN vectors ``mod`` [B, 6, D] (shift, scale,
    gate of the attention, then of the MLP)."""
    batch, seq, dim = x.shape
    dtype = x.dtype
    x = x.contiguous()
    # [6, B, D] contiguous: every vector a plain [B, D] block, as the norm kernel (shift, scale) and the GEMM
    # epilogue (gate: [M // rows_per_gate, N] with rows_per_gate = S) read them
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.transpose(0, 1).contiguous().unbind(0)
    x2d = x.view(batch * seq, dim)

    attn, to_qkv = b.attn1, b.attn1.to_qkv
    q8, s8 = _norm_quantize(to_qkv, x, shift_msa, scale_msa, eps1)
    qkv = to_qkv.forward_fused(q8, s8, dtype, lora_input=_lora_norm(to_qkv, x, shift_msa, scale_msa, eps1))
    q, k, v = _split_heads(qkv, batch, 3, attn.heads)
    h2d = _attention_out(attn, q, k, v, dtype, gate=gate_msa, residual=x2d, rows_per_gate=seq)

    if b.attn2 is not None:  # PixArt's cross-attention, on the un-normalized states, residual fused
        attn = b.attn2
        qx, sx = _quantize(attn.to_q, h2d)
        enc = encoder_hidden_states
        enc2d = enc.reshape(-1, enc.shape[-1])
        kv = attn.to_kv.forward_fused(*_quantize(attn.to_kv, enc2d), dtype, lora_input=enc2d)
        q = attn.to_q.forward_fused(qx, sx, dtype, lora_input=h2d).view(batch, seq, attn.heads, -1).transpose(1, 2)
        k, v = _split_heads(kv, batch, 2, attn.heads)
        mask = encoder_attention_mask
        if mask is not None:  # the text padding mask (a bias), as diffusers' processor prepares it for SDPA
            mask = attn.prepare_attention_mask(mask, enc.shape[1], batch)
            mask = mask.view(batch, attn.heads, -1, mask.shape[-1])
        h2d = _attention_out(attn, q, k, v, dtype, mask, residual=h2d)

    return _mlp(b.ff, h2d.view(batch, seq, dim), shift_mlp, scale_mlp, eps2, gate_mlp, h2d).view(batch, seq, dim)


def _mlp(ff, x: torch.Tensor, shift, scale, eps: float, gate, residual: torch.Tensor) -> torch.Tensor:
    """A GELU MLP (diffusers' ``FeedForward``) on the modulated norm of ``x`` [B, S, D], gated, plus ``residual``
    [B * S, D]: norm -> fc1 with GELU in its epilogue, emitting fc2's int8 input when fc2's scale is static (a
    dynamic fc2, or one with a run-time LoRA adapter, which reads the float hidden state: a float output and
    ``quantize_act``) -> fc2 with gate and residual fused. [B * S, D]."""
    act, fc1, fc2 = ff.net[0], ff.net[0].proj, ff.net[2]
    dtype, seq = x.dtype, x.shape[1]
    q8, s8 = _norm_quantize(fc1, x, shift, scale, eps)
    xn = _lora_norm(fc1, x, shift, scale, eps)
    fc2_scale = fc2._buffers["act_scale"]
    hidden = None
    if act.approximate == "tanh" and fc2_scale is not None and not fc2._lora_on:  # fc1 emits fc2's int8 input
        q8, s8 = fc1.forward_fused(q8, s8, dtype, gelu=True, out_scale=fc2_scale, lora_input=xn), fc2_scale
    else:
        hidden = fc1.forward_fused(q8, s8, dtype, gelu=act.approximate == "tanh", lora_input=xn)
        if act.approximate != "tanh":
            hidden = F.gelu(hidden)
        q8, s8 = _quantize(fc2, hidden)
    return fc2.forward_fused(q8, s8, dtype, gate=gate, residual=residual, rows_per_gate=seq, lora_input=hidden)


def _runs_fused(b, attention_mask, encoder_attention_mask, cross_attention_kwargs) -> bool:
    """What the fused forward covers, checked per call (a moved model may sit on a backend without the fused
    norm; masks and chunking are per-call arguments)."""
    return attention_mask is None and (encoder_attention_mask is None or b.attn2 is not None) and \
        not cross_attention_kwargs and b._chunk_size is None and not b.training and \
        b.attn1.to_qkv._kernels is not None and b.attn1.to_qkv._kernels.norm_modulate_quantize is not None and \
        b.ff.net[0].proj._kernels is not None and b.ff.net[0].proj._kernels.norm_modulate_quantize is not None


def _forward(b, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
             timestep=None, cross_attention_kwargs=None, class_labels=None, added_cond_kwargs=None):
    """The fused forward of a ``BasicTransformerBlock`` ``b`` that :func:`_why_not` accepted (diffusers' signature)."""
    if not _runs_fused(b, attention_mask, encoder_attention_mask, cross_attention_kwargs):
        return super(type(b), b).forward(hidden_states, attention_mask, encoder_hidden_states,
                                          encoder_attention_mask, timestep, cross_attention_kwargs, class_labels,
                                          added_cond_kwargs)
    batch = hidden_states.shape[0]
    if b.norm_type == "ada_norm_zero":  # AdaLayerNormZero's conditioning, without its norm
        norm1 = b.norm1
        mod = norm1.linear(norm1.silu(norm1.emb(timestep, class_labels, hidden_dtype=hidden_states.dtype)))
        return _body(b, hidden_states, mod.view(batch, 6, -1), norm1.norm.eps, b.norm3.eps)
    # ada_norm_single: the table plus the (already embedded) timestep
    mod = b.scale_shift_table[None] + timestep.reshape(batch, 6, -1)
    return _body(b, hidden_states, mod, b.norm1.eps, b.norm2.eps, encoder_hidden_states, encoder_attention_mask)


@lru_cache(maxsize=None)
def fused_block_class():
    """``BasicTransformerBlock`` with the fused forward: a fused block keeps every attribute and state-dict key of
    the diffusers block (its class is swapped in place), and its model code (e.g. DiT reading
    ``transformer_blocks[0].norm1.emb``) keeps working."""
    from diffusers.models.attention import BasicTransformerBlock

    return type("FusedBasicTransformerBlock", (BasicTransformerBlock,),
                {"forward": _forward, "__doc__": __doc__.split("\n\n")[0], "__module__": __name__})


# ---- DiT: the conditioning computed once per forward --------------------------------------------------------

def _same_tensors(a: nn.Module, b: nn.Module) -> bool:
    """Whether two modules hold equal tensors (state dicts, non-persistent buffers such as a run-time LoRA's
    (:mod:`ditq.lora`), and timestep-grouped scales): equal embedders."""
    for sa, sb in ((a.state_dict(), b.state_dict()), (dict(a.named_buffers()), dict(b.named_buffers()))):
        if sa.keys() != sb.keys() or not all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa):
            return False
    for (na, ma), (nb, mb) in zip(a.named_modules(), b.named_modules()):
        for buf in ("act_scales", "timestep_bounds"):
            x, y = getattr(ma, buf, None), getattr(mb, buf, None)
            if (x is None) != (y is None) or (x is not None and not torch.equal(x, y)):
                return False
    return True


def _same_input_scales(layers: List[nn.Module]) -> bool:
    """Whether these layers (reading the same tensor) quantize it the same way, so one quantization serves all."""
    if not all(isinstance(m, QuantLinear) for m in layers):
        return False
    first = layers[0]

    def same(n, m):
        a, b = getattr(first, n, None), getattr(m, n, None)
        return (a is None) == (b is None) and (a is None or torch.equal(a, b))
    return all(m.act_scheme == first.act_scheme and m.backend == first.backend and
               all(same(n, m) for n in ("act_scale", "act_scales", "timestep_bounds")) for m in layers)


def _dit_plan(transformer: nn.Module) -> Optional[dict]:
    """How a fused DiT computes its conditioning (see the module docstring), or None when it cannot."""
    blocks = list(transformer.transformer_blocks)
    if not blocks or not all(type(b) is fused_block_class() and b.norm_type == "ada_norm_zero" for b in blocks):
        return None
    embs = [b.norm1.emb for b in blocks]
    if not all(type(e).__name__ == "CombinedTimestepLabelEmbeddings" for e in embs):
        return None
    proj = [(e.time_proj.num_channels, e.time_proj.flip_sin_to_cos, e.time_proj.downscale_freq_shift,
             e.time_proj.scale) for e in embs]
    if len(set(proj)) != 1 or proj[0][0] % 2:
        return None
    owners = []  # block -> the first block with an equal embedder: that one computes it
    for i, e in enumerate(embs):
        owners.append(next(j for j in range(i + 1) if j == i or (owners[j] == j and _same_tensors(embs[j], e))))
    distinct = sorted(set(owners))
    te = [embs[i].timestep_embedder for i in distinct]
    quantized_embedders = all(isinstance(t.linear_1, QuantLinear) and isinstance(t.linear_2, QuantLinear) and
                              isinstance(t.act, nn.SiLU) and t.cond_proj is None and t.post_act is None for t in te)
    return {"owners": owners,
            "quantized_embedders": quantized_embedders,
            # one quantization of the timestep projection for every linear_1, and of silu(emb) for every adaLN
            # linear sharing that embedder
            "shared_t_quant": quantized_embedders and _same_input_scales([t.linear_1 for t in te]),
            "shared_ada_quant": {o: _same_input_scales([blocks[i].norm1.linear for i in range(len(blocks))
                                                        if owners[i] == o]) for o in distinct}}


def _frequencies(time_proj: nn.Module, device) -> torch.Tensor:
    """get_timestep_embedding's frequency table, by its own expression (max_period 10000), in float32."""
    half = time_proj.num_channels // 2
    exponent = -math.log(10000) * torch.arange(start=0, end=half, dtype=torch.float32, device=device)
    return torch.exp(exponent / (half - time_proj.downscale_freq_shift))


def _timestep_proj(time_proj: nn.Module, timestep: torch.Tensor) -> torch.Tensor:
    """diffusers' ``get_timestep_embedding`` with its constant frequency table kept (``_ditq_freqs``, computed by
    diffusers' own expression) and ``flip_sin_to_cos`` as the concatenation order: the same values, 6 ops
    instead of 15 (integer timesteps; 5 instead of 14 for float ones)."""
    freqs = time_proj._ditq_freqs
    if freqs.dtype != torch.float32:  # a cast model (.half()) cast the table too: diffusers keeps it float32
        freqs = _frequencies(time_proj, freqs.device)
    arg = timestep.float()[:, None] * freqs
    if time_proj.scale != 1:
        arg = time_proj.scale * arg
    parts = (torch.cos(arg), torch.sin(arg)) if time_proj.flip_sin_to_cos else (torch.sin(arg), torch.cos(arg))
    return torch.cat(parts, dim=-1)


@lru_cache(maxsize=None)
def fused_timesteps_class():
    """diffusers' ``Timesteps`` computing :func:`_timestep_proj` (its class swapped in place; no state)."""
    from diffusers.models.embeddings import Timesteps

    return type("FusedTimesteps", (Timesteps,), {"forward": _timestep_proj, "__module__": __name__,
                                                 "__doc__": "diffusers' Timesteps with its frequency table kept."})


def fuse_timesteps(model: nn.Module) -> int:
    """Give every sinusoidal timestep projection (diffusers' ``Timesteps``, even width) of ``model`` its constant
    frequency table (a non-persistent buffer, computed on the model's device by diffusers' expression): the same
    values in 6 ops instead of 15 (integer timesteps). Returns how many it changed."""
    n = 0
    for module in model.modules():
        if type(module).__name__ == "Timesteps" and module.num_channels % 2 == 0:
            device = next((t.device for t in model.buffers() if t.device.type != "meta"), torch.device("cpu"))
            module.register_buffer("_ditq_freqs", _frequencies(module, device), persistent=False)
            module.__class__ = fused_timesteps_class()
            n += 1
    return n


def _dit_conditioning(self, timestep, class_labels, dtype):
    """silu(conditioning) per distinct embedder (the adaLN input), and block 0's conditioning."""
    plan, blocks = self._ditq_dit_plan, self.transformer_blocks
    t = blocks[0].norm1.emb.time_proj(timestep).to(dtype)
    shared_q = _quantize(blocks[0].norm1.emb.timestep_embedder.linear_1, t) if plan["shared_t_quant"] else None
    conds = {}
    for o in sorted(set(plan["owners"])):
        emb = blocks[o].norm1.emb
        labels = emb.class_embedder.embedding_table(class_labels)
        te = emb.timestep_embedder
        if plan["quantized_embedders"]:
            h = F.silu(te.linear_1.forward_fused(*(shared_q or _quantize(te.linear_1, t)), dtype, lora_input=t))
            conds[o] = te.linear_2.forward_fused(*_quantize(te.linear_2, h), dtype, residual=labels, lora_input=h)
        else:
            conds[o] = te(t) + labels
    return conds


def _dit_forward(self, hidden_states, timestep=None, class_labels=None, cross_attention_kwargs=None,
                 return_dict=True):
    """``DiTTransformer2DModel.forward`` for a fused DiT (bound on the instance by :func:`fuse_blocks`): the
    conditioning once per distinct embedder (see the module docstring), the fused blocks, diffusers' final layer."""
    blocks = self.transformer_blocks
    if cross_attention_kwargs or self.training or \
            not all(_runs_fused(b, None, None, None) for b in blocks):
        return type(self).forward(self, hidden_states, timestep, class_labels, cross_attention_kwargs, return_dict)
    plan = self._ditq_dit_plan
    hidden_states = self.pos_embed(hidden_states)
    dtype = hidden_states.dtype
    batch = hidden_states.shape[0]
    conds = _dit_conditioning(self, timestep, class_labels, dtype)
    silu = {o: F.silu(c) for o, c in conds.items()}
    owners = plan["owners"]
    on_load = [quantizes_on_load(b.norm1.linear) for b in blocks]
    # silu(emb) quantized once per distinct embedder for the adaLN linears that share it, unless each quantizes
    # it as it loads it (then the adaLN is one launch per block)
    ada_q = {o: _quantize(blocks[o].norm1.linear, s) for o, s in silu.items() if plan["shared_ada_quant"][o] and
             not all(ok for ok, ob in zip(on_load, owners) if ob == o)}
    for i, b in enumerate(blocks):
        o = owners[i]
        lin = b.norm1.linear
        if o in ada_q:
            mod = lin.forward_fused(*ada_q[o], dtype, lora_input=silu[o])
        elif on_load[i]:
            mod = lin.forward_fused(silu[o], lin._buffers["act_scale"], dtype, lora_input=silu[o])
        else:
            mod = lin(silu[o])
        hidden_states = _body(b, hidden_states, mod.view(batch, 6, -1), b.norm1.norm.eps, b.norm3.eps)

    # final layer, as diffusers' (block 0's conditioning, already computed)
    shift, scale = self.proj_out_1(silu[plan["owners"][0]]).chunk(2, dim=1)
    hidden_states = self.norm_out(hidden_states) * (1 + scale[:, None]) + shift[:, None]
    hidden_states = self.proj_out_2(hidden_states)
    height = width = int(hidden_states.shape[1] ** 0.5)
    hidden_states = hidden_states.reshape(shape=(-1, height, width, self.patch_size, self.patch_size,
                                                 self.out_channels))
    hidden_states = torch.einsum("nhwpqc->nchpwq", hidden_states)
    output = hidden_states.reshape(shape=(-1, self.out_channels, height * self.patch_size,
                                          width * self.patch_size))
    if not return_dict:
        return (output,)
    from diffusers.models.modeling_outputs import Transformer2DModelOutput
    return Transformer2DModelOutput(sample=output)


def replan(transformer: nn.Module, incompatible_keys=None) -> None:
    """Plan a fused DiT's conditioning again after its embedders changed in place (new weights from
    ``load_state_dict``, whose post-hook this is; a run-time LoRA loaded, rescaled or unloaded: :mod:`ditq.lora`):
    embedders that were equal may differ now, or the reverse. A no-op for any other model."""
    if "_ditq_dit_plan" in vars(transformer):
        _install_dit_forward(transformer)


def _install_dit_forward(transformer: nn.Module) -> bool:
    plan = _dit_plan(transformer)
    if plan is None or type(transformer.transformer_blocks[0].norm1.emb.time_proj) is not fused_timesteps_class():
        # (the shared projection runs through the fused Timesteps: fuse_timesteps)
        transformer.__dict__.pop("forward", None)  # diffusers' forward again
        return False
    transformer._ditq_dit_plan = plan
    transformer.forward = types.MethodType(_dit_forward, transformer)
    if not getattr(transformer, "_ditq_replans", False):
        transformer.register_load_state_dict_post_hook(replan)
        transformer._ditq_replans = True
    return True


def fuse_blocks(transformer: nn.Module) -> dict:
    """Replace every ``BasicTransformerBlock`` that can run fused by a :class:`FusedBasicTransformerBlock` (and the
    FLUX blocks by theirs, :mod:`ditq.blocks_joint`), and give a fused ``DiTTransformer2DModel`` its
    once-per-forward conditioning.

    Returns block name -> None (fused) or why it was left as it was."""
    from . import blocks_joint

    done = {}
    for name, module in list(transformer.named_modules()):
        kind = type(module).__name__
        if kind == "BasicTransformerBlock":
            why = _why_not(module)
            if why is None:
                module.__class__ = fused_block_class()
        elif kind in blocks_joint.KINDS:
            why = blocks_joint.fuse(module)
        else:
            continue
        done[name] = why
        if why is None:
            transformer._ditq_fused_blocks = True  # what a checkpoint records
    if getattr(transformer, "_ditq_fused_blocks", False):  # (again, for a model fused before: re-plans)
        fuse_timesteps(transformer)
        if type(transformer).__name__ == "DiTTransformer2DModel":
            _install_dit_forward(transformer)
    return done

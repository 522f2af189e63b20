"""``QuantLinear``: an ``nn.Linear`` replacement that holds only packed integer weights.

Buffers (no full-precision weight, ever):

* ``qweight``, ``scales``: the packed weight in the *backend's* layout (``Backend.prepare_weight`` of the
  canonical tensors of :mod:`ditq.format`), so the GEMM reads it as it is, every call;
* ``bias``: the original bias (float, follows the model's dtype) or None;
* ``act_scale``: float32 [1], the calibrated static activation scale (``act_scheme="static"``), else None.

The module's ``state_dict`` is always in the *canonical* layout (``_save_to_state_dict`` /
``_load_from_state_dict`` convert), so checkpoints never depend on the backend that ran. Forward:
reshape to [M, K] → ``torch.ops.ditq.quantize_act`` → ``gemm_w8a8`` / ``gemm_w4a8`` → output in the input's dtype
with the input's leading dims. This module knows no tile size: layouts are the backend's business.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import backends, ops  # noqa: F401  (ops registers torch.ops.ditq.*)
from .format import WeightFormat
from .quant import reference as ref

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_FP32_BUFFERS = ("scales", "act_scale")  # the op contract takes these as float32 whatever the model's dtype


class QuantLinear(nn.Module):
    """A linear layer with int8/int4 weights and int8 activations.

    Build one with :meth:`from_linear` (quantizes an ``nn.Linear``) or with the constructor on the ``meta``
    device followed by ``load_state_dict(..., assign=True)`` (checkpoint loading).
    """

    def __init__(self, in_features: int, out_features: int, fmt: WeightFormat, bias: bool = True,
                 act_scheme: str = "static", backend: str = "torch", device=None,
                 bias_dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(fmt, WeightFormat):
            raise TypeError(f"fmt must be a ditq.format.WeightFormat, got {type(fmt).__name__}")
        if act_scheme not in ("static", "dynamic"):
            raise ValueError(f"act_scheme must be 'static' or 'dynamic', got {act_scheme!r}")
        shapes = fmt.packed_shapes(out_features, in_features)  # raises if K does not fit the format
        self.in_features, self.out_features = in_features, out_features
        self.fmt, self.act_scheme = fmt, act_scheme
        self.backend = backends.resolve(backend, device if device is not None and
                                        torch.device(device).type != "meta" else None)
        qdtype = torch.int8 if fmt.bits == 8 else torch.uint8
        # Canonical-layout placeholders until weights arrive (load_state_dict / load_canonical).
        self.register_buffer("qweight", torch.zeros(shapes["qweight"], dtype=qdtype, device=device))
        self.register_buffer("scales", torch.ones(shapes["scales"], dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)
        self.register_buffer("act_scale", torch.ones(1, dtype=torch.float32, device=device)
                             if act_scheme == "static" else None)
        self._prepared = False  # True once qweight / scales hold the backend's layout

    # ---- construction ----------------------------------------------------------------------------------

    @classmethod
    def from_linear(cls, linear: nn.Linear, cfg, act_scale: Optional[torch.Tensor] = None,
                    backend: Optional[str] = None) -> "QuantLinear":
        """Quantize ``linear`` (left untouched) with ``cfg`` (a :class:`ditq.QuantConfig`).

        ``act_scale``: the calibrated static scale (float32 [1], or a float), required for ``act_scheme="static"``.
        ``backend``: overrides ``cfg.backend``; "auto" resolves on the weight's device.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear takes an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        if w.device.type == "meta":
            raise ValueError("cannot quantize a linear whose weight is on the meta device (no values)")
        if not w.is_floating_point():
            raise TypeError(f"linear weight must be floating point, got {w.dtype}")
        fmt = cfg.weight_format
        fmt.check_in_features(linear.in_features)
        if linear.in_features > ref.MAX_K:
            raise ValueError(f"in_features K = {linear.in_features} exceeds {ref.MAX_K}: int32 accumulation "
                             f"could overflow")
        if cfg.act_scheme == "static":
            if act_scale is None:
                raise ValueError("a static activation scheme needs a calibrated act_scale")
            act_scale = torch.as_tensor(act_scale, dtype=torch.float32).reshape(-1).to(w.device)
            if act_scale.numel() != 1 or not bool(torch.isfinite(act_scale).all()) or float(act_scale) <= 0:
                raise ValueError(f"act_scale must be one positive finite number, got {act_scale.tolist()}")
        qweight, scales = quantize_weight(w.detach(), fmt)
        layer = cls(linear.in_features, linear.out_features, fmt, bias=linear.bias is not None,
                    act_scheme=cfg.act_scheme, backend=backend or cfg.backend, device=w.device,
                    bias_dtype=linear.bias.dtype if linear.bias is not None else torch.float32)
        layer.load_canonical(qweight, scales,
                             None if linear.bias is None else linear.bias.detach().clone(), act_scale)
        return layer

    def load_canonical(self, qweight: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor] = None,
                       act_scale: Optional[torch.Tensor] = None) -> None:
        """Install canonical tensors (``ditq.format``), converting them to the backend's layout."""
        shapes = self.fmt.packed_shapes(self.out_features, self.in_features)
        qdtype = torch.int8 if self.fmt.bits == 8 else torch.uint8
        for name, t, dtype in (("qweight", qweight, qdtype), ("scales", scales, torch.float32)):
            if tuple(t.shape) != tuple(shapes[name]) or t.dtype != dtype:
                raise ValueError(f"{name} must be {dtype} {list(shapes[name])} for {self.fmt} with "
                                 f"K = {self.in_features}, N = {self.out_features}; got {t.dtype} {list(t.shape)}")
        if (bias is None) != (self.bias is None):
            raise ValueError("bias presence does not match the layer (built with bias="
                             f"{self.bias is not None})")
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias must be [{self.out_features}], got {list(bias.shape)}")
        if self.act_scheme == "static":
            if act_scale is None or act_scale.numel() != 1:
                raise ValueError("a static layer needs an act_scale of one element")
            self.act_scale = act_scale.detach().reshape(1).to(torch.float32).clone()
        be = backends.get_backend(self.backend, qweight.device)
        self.qweight, self.scales = be.prepare_weight(self.fmt, qweight.contiguous(), scales.contiguous())
        if bias is not None:
            self.bias = bias.detach()
        self._prepared = True

    def canonical(self) -> dict:
        """The canonical tensors (``ditq.format``) of this layer: what a checkpoint stores."""
        if self._prepared:
            qweight, scales = backends.get_backend(self.backend, self.qweight.device).canonical_weight(
                self.fmt, self.qweight, self.scales)
        else:
            qweight, scales = self.qweight, self.scales
        out = {"qweight": qweight, "scales": scales}
        if self.bias is not None:
            out["bias"] = self.bias
        if self.act_scale is not None:
            out["act_scale"] = self.act_scale
        return out

    # ---- state dict: always canonical --------------------------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name, t in self.canonical().items():
            destination[prefix + name] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        names = ["qweight", "scales"] + (["bias"] if self.bias is not None else []) + \
                (["act_scale"] if self.act_scale is not None else [])
        got = {}
        for n in names:
            if prefix + n in state_dict:
                got[n] = state_dict[prefix + n]
            else:
                missing_keys.append(prefix + n)
        for k in state_dict:
            if k.startswith(prefix) and "." not in k[len(prefix):] and k[len(prefix):] not in names:
                unexpected_keys.append(k)
        if len(got) != len(names):
            return
        # Canonical tensors arrive on the device they were loaded to; the layer takes that device.
        try:
            self.load_canonical(got["qweight"], got["scales"], got.get("bias"), got.get("act_scale"))
        except (ValueError, TypeError) as e:
            error_msgs.append(f"{prefix.rstrip('.')}: {e}")

    def _apply(self, fn, recurse=True):
        # Keep the scales float32 under model.half() / .to(bfloat16): the ops take float32 scales, and a
        # round trip through 16 bits would change results. Device moves still apply to them.
        kept = {n: self._buffers.pop(n) for n in _FP32_BUFFERS if self._buffers.get(n) is not None}
        try:
            super()._apply(fn, recurse)
        finally:
            dev = self.qweight.device
            for n, t in kept.items():
                self._buffers[n] = t.to(dev)
        return self

    # ---- forward -----------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._prepared:
            raise RuntimeError("QuantLinear has no weights yet: load a state dict or call load_canonical")
        if x.dtype not in _FLOATS:
            raise TypeError(f"QuantLinear takes float16/bfloat16/float32 input, got {x.dtype}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, the layer takes {self.in_features}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).contiguous()
        q, s = torch.ops.ditq.quantize_act(x2, self.act_scale, self.backend)
        if self.fmt.bits == 8:
            y = torch.ops.ditq.gemm_w8a8(q, s, self.qweight, self.scales, self.bias, x.dtype, self.backend)
        else:
            y = torch.ops.ditq.gemm_w4a8(q, s, self.qweight, self.scales, self.bias, self.fmt.group_size,
                                         x.dtype, self.backend)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        g = "per-channel" if self.fmt.group_size is None else f"group_size={self.fmt.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"w{self.fmt.bits} {g}, a8 {self.act_scheme}, layout={self.fmt.layout} "
                f"v{self.fmt.layout_version}, backend={self.backend}")

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._buffers.values() if t is not None)


def quantize_weight(w: torch.Tensor, fmt: WeightFormat):
    """Canonical (qweight, scales) of a float [N, K] weight in format ``fmt`` (``ditq.quant.reference``)."""
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight holds NaN or inf values; cannot quantize")
    if fmt.bits == 8:
        return ref.quantize_per_channel(w)
    q, s = ref.quantize_groupwise(w, fmt.group_size)
    return ref.pack_int4(q), s


def dequantize_weight(qweight: torch.Tensor, scales: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """fp32 [N, K] weight of canonical tensors: what the integer GEMM effectively multiplies by."""
    if fmt.bits == 8:
        return ref.dequantize_per_channel(qweight, scales)
    return ref.dequantize_groupwise(ref.unpack_int4(qweight), scales, fmt.group_size)

"""``QuantLinear``: an ``nn.Linear`` replacement that holds only packed integer weights.

Buffers (no full-precision weight, ever):

* ``qweight``, ``scales``: the packed weight in the layout of the backend the layer runs on
  (``Backend.prepare_weight`` of the canonical tensors of :mod:`ditq.format`), so the GEMM reads it as it is;
* ``bias``: the original bias (float, follows the model's dtype) or None;
* ``act_scale``: float32 [1], the calibrated static activation scale (``act_scheme="static"``), else None.

The backend is chosen once per layer and device, never per call: when weights arrive (``load_canonical``,
``load_state_dict``) and again whenever the module moves to another device (``.to()``, ``.cuda()``, ``.cpu()``),
the layer resolves the backend it was asked for (``backend_request``, e.g. ``"auto"``) on the new device, checks
that backend's kernels take this layer (their own description: group sizes, K limits), converts the weight to that
backend's layout and binds the backend's kernel ops (:class:`ditq.backends.KernelOps`). ``set_backend`` switches
explicitly. The forward then is: reshape to [M, K] -> quantize-act op -> GEMM op -> leading dims back, with the
inputs validated once, by the ops (in C++ for the CUDA kernels).

The module's ``state_dict`` is always in the *canonical* layout (``_save_to_state_dict`` /
``_load_from_state_dict`` convert), so checkpoints never depend on the backend that ran. Loaded values are checked
(finite positive scales, the exact shapes and dtypes of the format). ditq layers are for inference only: no gradient
flows through them.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import backends, ops, weight_rounding  # noqa: F401  (ops registers torch.ops.ditq.*)
from .format import WeightFormat
from .kernels.epilogue_checks import check_args as check_epilogue_args
from .quant import reference as ref

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
# The op contract takes these as float32 whatever the model's dtype; act_scales / timestep_bounds are the
# timestep-grouped scales ditq.timestep_groups adds (the group's scale is copied into act_scale per call).
_FP32_BUFFERS = ("scales", "act_scale", "act_scales", "timestep_bounds")


class QuantLinear(nn.Module):
    """A linear layer with int8/int4 weights and int8 activations.

    Build one with :meth:`from_linear` (quantizes an ``nn.Linear``) or with the constructor on the ``meta``
    device followed by ``load_state_dict(..., assign=True)`` (checkpoint loading).
    """

    # Class defaults, shadowed per instance once prepared: the forward reads them as plain attributes.
    _kernels: Optional[backends.KernelOps] = None  # the bound kernel ops; None = not runnable (see _not_ready)
    _not_ready = "QuantLinear has no weights yet: load a state dict or call load_canonical"
    _has_weights = False  # True once load_canonical installed real tensors (placeholders are never prepared)

    def __init__(self, in_features: int, out_features: int, fmt: WeightFormat, bias: bool = True,
                 act_scheme: str = "static", backend: str = "auto", device=None,
                 bias_dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(fmt, WeightFormat):
            raise TypeError(f"fmt must be a ditq.format.WeightFormat, got {type(fmt).__name__}")
        if act_scheme not in ("static", "dynamic"):
            raise ValueError(f"act_scheme must be 'static' or 'dynamic', got {act_scheme!r}")
        if backend != "auto" and backend not in backends.BACKEND_NAMES:
            raise backends.BackendUnavailableError(
                f"unknown backend {backend!r}; choose one of {', '.join(backends.BACKEND_NAMES + ('auto',))}")
        shapes = fmt.packed_shapes(out_features, in_features)  # raises if K does not fit the format
        self.in_features, self.out_features = in_features, out_features
        self.fmt, self.act_scheme = fmt, act_scheme
        self.backend_request = backend  # what was asked for ("auto" re-resolves on every device move)
        self.backend: Optional[str] = None  # the backend whose layout qweight/scales hold; None = canonical
        self._group_size = fmt.group_size if fmt.bits == 4 else None
        qdtype = torch.int8 if fmt.bits == 8 else torch.uint8
        # Canonical-layout placeholders until weights arrive (load_state_dict / load_canonical).
        self.register_buffer("qweight", torch.zeros(shapes["qweight"], dtype=qdtype, device=device))
        self.register_buffer("scales", torch.ones(shapes["scales"], dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)
        self.register_buffer("act_scale", torch.ones(1, dtype=torch.float32, device=device)
                             if act_scheme == "static" else None)

    # ---- construction ----------------------------------------------------------------------------------

    @classmethod
    def from_linear(cls, linear: nn.Linear, cfg, act_scale: Optional[torch.Tensor] = None,
                    backend: Optional[str] = None, hessian: Optional[torch.Tensor] = None) -> "QuantLinear":
        """Quantize ``linear`` (left untouched) with ``cfg`` (a :class:`ditq.QuantConfig`).

        ``act_scale``: the calibrated static scale (float32 [1], or a float), required for ``act_scheme="static"``.
        ``backend``: overrides ``cfg.backend``; "auto" resolves on the weight's device (and again after a move).
        The weights are rounded as ``cfg.weight_method`` says (:mod:`ditq.weight_rounding`): "rtn" and "mse" need
        nothing more; "gptq" rounds against the layer's inputs and needs ``hessian``, the float [K, K] sum of
        ``x x^T`` over its calibration inputs (:func:`ditq.quantize` collects it for every layer).
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
        if cfg.act_scheme == "static":
            if act_scale is None:
                raise ValueError("a static activation scheme needs a calibrated act_scale")
            act_scale = torch.as_tensor(act_scale, dtype=torch.float32).reshape(-1).to(w.device)
        layer = cls(linear.in_features, linear.out_features, fmt, bias=linear.bias is not None,
                    act_scheme=cfg.act_scheme, backend=backend or cfg.backend, device=w.device,
                    bias_dtype=linear.bias.dtype if linear.bias is not None else torch.float32)
        if cfg.weight_method == "gptq" and hessian is None:
            raise ValueError("weight_method='gptq' rounds each weight against the layer's inputs: pass "
                             "hessian= (the [K, K] sum of x x^T over its calibration inputs), use "
                             "ditq.quantize (which collects it), or weight_method='rtn' or 'mse'")
        qweight, scales = weight_rounding.quantize_weight(w.detach(), fmt, cfg.weight_method, hessian)
        layer.load_canonical(qweight, scales,
                             None if linear.bias is None else linear.bias.detach().clone(), act_scale)
        return layer

    def load_canonical(self, qweight: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor] = None,
                       act_scale: Optional[torch.Tensor] = None) -> None:
        """Install canonical tensors (``ditq.format``), checked, and prepare them for their device's backend."""
        shapes = self.fmt.packed_shapes(self.out_features, self.in_features)
        qdtype = torch.int8 if self.fmt.bits == 8 else torch.uint8
        for name, t, dtype in (("qweight", qweight, qdtype), ("scales", scales, torch.float32)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shapes[name]) or t.dtype != dtype:
                got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be {dtype} {list(shapes[name])} for {self.fmt} with "
                                 f"K = {self.in_features}, N = {self.out_features}; got {got}")
        _check_values("scales", scales, positive=True)
        if self.fmt.group_scales == "int":  # every scale an integer multiple (1..16) of its channel's base
            self.fmt.int_group_scales(scales)  # a FormatError (ValueError) names what is wrong
        if (bias is None) != (self.bias is None):
            raise ValueError("bias presence does not match the layer (built with bias="
                             f"{self.bias is not None})")
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or \
                    tuple(bias.shape) != (self.out_features,):
                got = f"{bias.dtype} {list(bias.shape)}" if isinstance(bias, torch.Tensor) else type(bias).__name__
                raise ValueError(f"bias must be a float [{self.out_features}] tensor, got {got}")
            _check_values("bias", bias, positive=False)
        if self.act_scheme == "static":
            if not isinstance(act_scale, torch.Tensor) or act_scale.numel() != 1 or not act_scale.is_floating_point():
                raise ValueError(f"a static layer needs a float act_scale of one element, got "
                                 f"{act_scale if not isinstance(act_scale, torch.Tensor) else act_scale.dtype}")
            _check_values("act_scale", act_scale, positive=True)
            self.act_scale = act_scale.detach().reshape(1).to(device=qweight.device, dtype=torch.float32).clone()
        if bias is not None:
            self.bias = bias.detach().to(qweight.device)
        self._has_weights = True
        self._install(qweight.contiguous(), scales.contiguous().to(qweight.device))

    def _install(self, qweight: torch.Tensor, scales: torch.Tensor) -> None:
        """Canonical weights in: resolve the backend on their device, convert to its layout, bind its ops."""
        self.__dict__.pop("_kernels", None)
        self.backend = None
        self.qweight, self.scales = qweight, scales
        device = qweight.device
        if device.type == "meta":
            self._not_ready = ("QuantLinear is on the meta device: it holds no values to compute with (load "
                               "weights with load_state_dict(..., assign=True), or build it on a real device)")
            return
        try:
            name = backends.resolve_for(self.backend_request, device, self.fmt, self.in_features)
        except backends.BackendUnavailableError as e:
            self._not_ready = f"QuantLinear cannot run on {device}: {e}"
            raise
        be = backends.get_backend(name, device)
        self.qweight, self.scales = be.prepare_weight(self.fmt, qweight, scales)
        self.backend = name
        self._kernels = be.kernel_ops()
        self.__dict__.pop("_not_ready", None)

    def set_backend(self, backend: str) -> "QuantLinear":
        """Run on ``backend`` from now on (``"auto"`` re-resolves on each device move): re-prepares the weight.
        A backend that cannot run on the layer's device raises BackendUnavailableError and leaves the layer as it
        was."""
        if backend != "auto" and backend not in backends.BACKEND_NAMES:
            raise backends.BackendUnavailableError(
                f"unknown backend {backend!r}; choose one of {', '.join(backends.BACKEND_NAMES + ('auto',))}")
        if self.qweight.device.type != "meta":  # a backend that cannot run here is refused before anything changes
            backends.resolve_for(backend, self.qweight.device, self.fmt, self.in_features)
        can = self._canonical_weight()
        self.backend_request = backend
        self._install(*can)
        return self

    def _canonical_weight(self):
        if self.backend is None:
            return self.qweight, self.scales
        return backends.get_backend(self.backend, self.qweight.device).canonical_weight(
            self.fmt, self.qweight, self.scales)

    def canonical(self) -> dict:
        """The canonical tensors (``ditq.format``) of this layer: what a checkpoint stores."""
        qweight, scales = self._canonical_weight()
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
        except (ValueError, TypeError, backends.BackendUnavailableError) as e:
            error_msgs.append(f"{prefix.rstrip('.')}: {e}")

    def _apply(self, fn, recurse=True):
        # Keep the scales float32 under model.half() / .to(bfloat16): the ops take float32 scales, and a
        # round trip through 16 bits would change results. Device moves still apply to them. A float64 cast
        # (.double()) leaves the bias in float32: the kernels compute in 16/32-bit floats.
        kept = {n: self._buffers.pop(n) for n in _FP32_BUFFERS if self._buffers.get(n) is not None}
        device = self.qweight.device
        try:
            super()._apply(fn, recurse)
        finally:
            dev = self.qweight.device
            for n, t in kept.items():
                self._buffers[n] = t.to(dev)
            if self.bias is not None and self.bias.dtype == torch.float64:
                self._buffers["bias"] = self.bias.float()
        # A move (or, for "auto", any conversion) may change the backend and its layout: resolve again.
        moved = self.qweight.device != device
        if self._has_weights and (moved or (self.backend_request == "auto" and self.qweight.device.type != "meta")):
            qweight, scales = self.qweight, self.scales
            if self.backend is not None:
                qweight, scales = backends.get_backend(self.backend).canonical_weight(self.fmt, qweight, scales)
            try:
                self._install(qweight, scales)
            except backends.BackendUnavailableError:
                pass  # the layer moved; forward says why it cannot run here (self._not_ready)
        return self

    # ---- forward -----------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = self._kernels
        if kernels is None:
            raise RuntimeError(self._not_ready)
        if x.dtype not in _FLOATS:
            raise TypeError(f"QuantLinear takes float16/bfloat16/float32 input, got {x.dtype}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, the layer takes {self.in_features}")
        if x.requires_grad and not self._warned_grad:
            _warn_inference_only(self)
        b = self._buffers
        x2d = x.reshape(-1, self.in_features).contiguous()
        q, s = kernels.quantize_act(x2d, b["act_scale"])
        if self._group_size is None:
            y = kernels.gemm_w8a8(q, s, b["qweight"], b["scales"], b["bias"], x.dtype)
        else:
            y = kernels.gemm_w4a8(q, s, b["qweight"], b["scales"], b["bias"], self._group_size, x.dtype)
        if self._lora_on:  # run-time LoRA adapters (ditq.lora): a float low-rank branch on the float input
            y = self._modules["ditq_lora"](x2d, y)
        return y.reshape(*x.shape[:-1], self.out_features)

    _warned_grad = False
    _lora_on = False  # True while an adapter with a nonzero scale is loaded (ditq.lora sets it per instance)

    def forward_fused(self, q: torch.Tensor, s: torch.Tensor, out_dtype: torch.dtype, *, gelu: bool = False,
                      gate: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                      rows_per_gate: int = 1, out_scale: Optional[torch.Tensor] = None,
                      lora_input: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The GEMM on activations already quantized with this layer's scheme (int8 [M, K] and their scales) with
        more of the block in its epilogue (``gemm_w8a8_fused`` in :mod:`ditq.ops`): GELU-tanh, adaLN's gate
        ``gate`` [M // rows_per_gate, N], a ``residual`` [M, N], and int8 output quantized with the next layer's
        static ``out_scale``. Returns [M, N] (int8 when ``out_scale`` is given).

        ``q`` may also be the float input ``x`` [M, K] (float16 / bfloat16 / float32, contiguous) with ``s`` this
        layer's static scale (``self._buffers["act_scale"]``, float32 [1]): where the backend's fused GEMMs
        quantize a float A as they load it (``KernelOps.fused_gemm_float_a``) it goes to them as it is, one op;
        elsewhere it is quantized with the backend's ``quantize_act`` first. Either way the result is that of
        ``quantize_act`` followed by this method on int8: the same integers, and bit for bit but for W4A8 on the
        CUDA kernels where the int8 call splits K (``ditq.ops``, float activations). A float input with
        per-token scales is a ValueError (``ditq.ops.float_a_needs_static_scale``).

        A backend without the fused kernels runs its plain GEMM in fp32 and the same epilogue in torch
        (``ditq.quant.reference.gemm_epilogue``, the contract), after the same argument checks: the same
        numbers up to GELU's last bits.

        ``lora_input``: the layer's float input (K last), read only while a run-time LoRA adapter is loaded
        (:mod:`ditq.lora`), whose branch ``d = scale * B (A x)`` needs it; callers pass what they hold anyway, or
        build it only when ``self._lora_on``. The branch joins before the epilogue, where ``forward`` followed by
        diffusers' elementwise tail adds it, and the fused kernel keeps what it can: with no epilogue, the GEMM
        then ``+ d``; without GELU, ``(y + d) * gate + residual = y * gate + (residual + d * gate)``, so ``d``
        goes into the residual the kernel adds; with GELU (nonlinear), the GEMM alone in fp32, ``+ d``, GELU-tanh
        in torch, then the rest of the epilogue (``out_scale``: the backend's ``quantize_act``). An adapted layer
        called without ``lora_input`` raises rather than drop its branch."""
        if type(gelu) is not bool:  # (the ops' schemas would take 1 for True: refused the same on every path)
            raise TypeError(f"gelu must be a bool, got {type(gelu).__name__}")
        if not self._lora_on:
            return self._gemm_fused(q, s, out_dtype, gelu, gate, residual, rows_per_gate, out_scale)
        if lora_input is None:
            raise RuntimeError(f"this {type(self).__name__} carries a run-time LoRA adapter (ditq.lora), whose "
                               f"branch needs the layer's float input: pass it as lora_input")
        # the fused kernels' refusals first, so that bad epilogue arguments get the same errors with a branch
        check_epilogue_args(q.device, q.shape[0], self.out_features, gelu, gate, residual, rows_per_gate, out_scale,
                            out_dtype)
        branch, x2d = self._modules["ditq_lora"], lora_input.reshape(-1, self.in_features)
        if not (gelu or gate is not None or residual is not None or out_scale is not None):
            return branch(x2d, self._gemm_fused(q, s, out_dtype, False, None, None, 1, None))
        if not gelu:
            n = self.out_features
            if gate is None:  # residual + d, the add in the branch's addmm
                residual = branch(x2d, residual) if residual is not None else branch.delta(x2d).to(out_dtype)
            else:  # residual + d * gate, gate row r scaling rows [r * rows_per_gate, (r + 1) * rows_per_gate)
                d, g = branch.delta(x2d).view(-1, rows_per_gate, n), gate[:, None]
                residual = (d * g if residual is None else
                            torch.addcmul(residual.view(-1, rows_per_gate, n), d, g)).view(-1, n).to(out_dtype)
            return self._gemm_fused(q, s, out_dtype, False, gate, residual, rows_per_gate, out_scale)
        y = F.gelu(branch(x2d, self._gemm_fused(q, s, torch.float32, False, None, None, 1, None)), approximate="tanh")
        if gate is not None or residual is not None:
            y = ref.gemm_epilogue(y, False, gate, residual, rows_per_gate, None, torch.float32)
        return self._kernels.quantize_act(y, out_scale)[0] if out_scale is not None else y.to(out_dtype)

    def _gemm_fused(self, q, s, out_dtype, gelu, gate, residual, rows_per_gate, out_scale) -> torch.Tensor:
        """:meth:`forward_fused` without the LoRA branch."""
        kernels = self._kernels
        if kernels is None:
            raise RuntimeError(self._not_ready)
        fused = kernels.gemm_w8a8_fused if self._group_size is None else kernels.gemm_w4a8_fused
        if q.dtype in _FLOATS and not (kernels.fused_gemm_float_a and fused is not None):
            # the fused kernels' refusals, before quantize_act could take a missing or per-token scale instead
            if not isinstance(s, torch.Tensor):
                raise TypeError(f"a float input needs this layer's static scale (float32 [1]), got {type(s).__name__}")
            if s.shape != (1,):
                raise ops.float_a_needs_static_scale(s)
            q, s = kernels.quantize_act(q, s)
        b = self._buffers
        if self._group_size is None:
            if kernels.gemm_w8a8_fused is not None:
                return kernels.gemm_w8a8_fused(q, s, b["qweight"], b["scales"], b["bias"], gelu, gate, residual,
                                               rows_per_gate, out_scale, out_dtype)
            y = kernels.gemm_w8a8(q, s, b["qweight"], b["scales"], b["bias"], torch.float32)
        else:
            if kernels.gemm_w4a8_fused is not None:
                return kernels.gemm_w4a8_fused(q, s, b["qweight"], b["scales"], b["bias"], self._group_size, gelu,
                                               gate, residual, rows_per_gate, out_scale, out_dtype)
            y = kernels.gemm_w4a8(q, s, b["qweight"], b["scales"], b["bias"], self._group_size, torch.float32)
        check_epilogue_args(q.device, y.shape[0], y.shape[1], gelu, gate, residual, rows_per_gate, out_scale, out_dtype)
        return ref.gemm_epilogue(y, gelu, gate, residual, rows_per_gate, out_scale, out_dtype)

    def extra_repr(self) -> str:
        g = "per-channel" if self.fmt.group_size is None else f"group_size={self.fmt.group_size}"
        g += ", integer group scales" if self.fmt.group_scales == "int" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"w{self.fmt.bits} {g}, a8 {self.act_scheme}, layout={self.fmt.layout} "
                f"v{self.fmt.layout_version}, backend={self.backend or self.backend_request}")

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._buffers.values() if t is not None)


def _warn_inference_only(layer: QuantLinear) -> None:
    layer._warned_grad = True
    warnings.warn("ditq layers are inference-only: no gradient flows through a QuantLinear (its weights are "
                  "packed integers). Run inference under torch.no_grad() or torch.inference_mode().",
                  UserWarning, stacklevel=3)


def _check_values(name: str, t: torch.Tensor, positive: bool) -> None:
    """Loaded values must be usable: finite, and positive for scales (a corrupted checkpoint fails here)."""
    if t.device.type == "meta":
        return
    what = "positive finite numbers" if positive else "finite"
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be {what} but holds NaN or inf (a corrupted checkpoint, or a failed "
                         f"calibration)")
    if positive and not bool((t > 0).all()):
        raise ValueError(f"{name} must be {what}, got a minimum of {float(t.min())}")


def dequantize_weight(qweight: torch.Tensor, scales: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """fp32 [N, K] weight of canonical tensors: what the integer GEMM effectively multiplies by."""
    if fmt.bits == 8:
        return ref.dequantize_per_channel(qweight, scales)
    return ref.dequantize_groupwise(ref.unpack_int4(qweight), scales, fmt.group_size)

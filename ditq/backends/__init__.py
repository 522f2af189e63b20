"""The backend registry: the one place where a kernel backend is chosen.

Backends and what runs them:

============== ===============================================================================================
``torch``      the reference maths (``ditq.quant``) in plain torch: runs everywhere, slow, exact.
``triton``     ``ditq.kernels`` Triton kernels on a CUDA GPU, or on CPU tensors under ``TRITON_INTERPRET=1``.
``cuda``       the CUDA C++ kernels of ``ditq._C`` on a CUDA GPU.
``cuda-emulated`` the same CUDA sources compiled by g++ and run on CPU tensors by the SIMT emulator.
``auto``       ``cuda`` where it is built and the tensors are on a GPU, else ``triton`` on a GPU, else ``torch``.
============== ===============================================================================================

A backend is a :class:`Backend` registered by its module; modules are imported lazily so that a missing
optional dependency only disables its backend, with the reason kept for the error message.

Each backend's kernels describe themselves (:class:`KernelFamily`: group sizes, K granularity and limit, weight
layout and version, architectures), read from the kernels' own source of truth (``ditq._C``'s exported table, the
Triton kernels' ``describe()``); everything above (config checks, layer construction, reports) reads that
description rather than restating it. A backend also hands out :class:`KernelOps`: the torch ops a quantized layer
calls directly on its hot path, each validating its own inputs once (in C++ for the CUDA kernels).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch

BACKEND_NAMES = ("torch", "triton", "cuda", "cuda-emulated")
_MODULES = {"torch": "torch_backend", "triton": "triton_backend", "cuda": "cuda_backend",
            "cuda-emulated": "cuda_backend"}


# What "auto" tries, in order, by device type: the fastest kernels first, the reference maths last.
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("torch",)}


class BackendUnavailableError(RuntimeError):
    """The backend asked for cannot run here; the message says why and what can."""


@dataclass(frozen=True)
class KernelFamily:
    """What one kernel family (e.g. a backend's W4A8 GEMM) accepts, as described by the kernels themselves.

    ``group_sizes``: the W4 group sizes it was built for (``None``: per-channel weights, or, for the reference
    maths, any group size the canonical format allows); ``k_multiple`` / ``max_k``: the K it takes;
    ``layout`` / ``layout_version``: the weight layout its kernels read; ``archs``: GPU architectures with code
    (compute capability x 10; empty where it runs only on the CPU).
    """

    name: str
    weight_bits: Optional[int] = None
    group_sizes: Optional[Tuple[int, ...]] = None
    k_multiple: int = 1
    max_k: Optional[int] = None
    layout: Optional[str] = None
    layout_version: Optional[int] = None
    archs: Tuple[int, ...] = ()

    @classmethod
    def from_description(cls, name: str, d: dict) -> "KernelFamily":
        """From a kernel-side description (a dict with the keys of this class; ``built_archs`` = ``archs``)."""
        groups = d.get("group_sizes")
        return cls(name=name, weight_bits=d.get("weight_bits"),
                   group_sizes=None if groups is None else tuple(int(g) for g in groups),
                   k_multiple=int(d.get("k_multiple") or 1), max_k=d.get("max_k"),
                   layout=d.get("layout"), layout_version=d.get("layout_version"),
                   archs=tuple(int(a) for a in d.get("archs", d.get("built_archs", ())) or ()))

    def refuses(self, in_features: int, group_size: Optional[int] = None) -> Optional[str]:
        """None when a layer with K = ``in_features`` (and this group size) can run, else why not."""
        if group_size is not None and self.group_sizes is not None and group_size not in self.group_sizes:
            return (f"its {self.name} kernels are built for group sizes {', '.join(map(str, self.group_sizes))}, "
                    f"not {group_size}")
        if in_features % self.k_multiple:
            return f"its {self.name} kernels need K to be a multiple of {self.k_multiple}, got K = {in_features}"
        if self.max_k is not None and in_features > self.max_k:
            return f"its {self.name} kernels take K <= {self.max_k}, got K = {in_features}"
        return None


class KernelOps(NamedTuple):
    """The ops a quantized layer calls, bound once per layer and device (see :meth:`Backend.kernel_ops`).

    ``quantize_act(x, scale) -> (q, scales)``, ``gemm_w8a8(a, a_scale, w, w_scale, bias, out_dtype)``,
    ``gemm_w4a8(a, a_scale, w, w_scale, bias, group_size, out_dtype)``: the contracts of :mod:`ditq.ops`, weights
    in this backend's layout. Each validates its inputs itself.
    """

    quantize_act: Callable
    gemm_w8a8: Callable
    gemm_w4a8: Callable
    # Fused producers (optional: a backend without one leaves it None and callers run the unfused ops)
    norm_modulate_quantize: Optional[Callable] = None
    # GEMMs with a fused epilogue (GELU, gate, residual, int8 output; the contract in :mod:`ditq.ops`)
    gemm_w8a8_fused: Optional[Callable] = None
    gemm_w4a8_fused: Optional[Callable] = None
    # Whether those fused GEMMs also take a float ``a`` with a static ``a_scale`` and quantize it as they load it
    # (the contract in :mod:`ditq.ops`); a backend whose kernels load A as int8 only leaves it False, and
    # callers then run ``quantize_act`` first.
    fused_gemm_float_a: bool = False
    # q/k RMSNorm + rotary embedding + stream concatenation from the fused q/k/v GEMM's output to SDPA's inputs
    # (a float op, the contract in :mod:`ditq.ops`): torch's reference maths, the Triton kernel on ``triton``
    # and, on a CUDA device, on ``cuda`` too (there is no CUDA C++ kernel for it; Triton comes with CUDA torch);
    # ``cuda-emulated`` runs the reference. None: the fused blocks run diffusers' own ops.
    attention_inputs: Optional[Callable] = None


class Backend:
    """What a kernel backend provides. Subclasses override the ops they implement.

    ``prepare_weight`` turns canonical packed weights (``ditq.format``) into the layout this backend's
    GEMMs read, and ``canonical_weight`` turns them back exactly, so checkpoints stay backend-free.
    """

    name: str = ""
    devices: Tuple[str, ...] = ("cpu",)

    def unavailable_reason(self) -> Optional[str]:
        """None when usable, else a sentence saying why not."""
        return None

    def unavailable_on(self, device: torch.device) -> Optional[str]:
        """None when this backend can run on tensors of ``device``, else why not (override for a hint)."""
        if device.type not in self.devices:
            return f"it runs on {' / '.join(self.devices)} tensors, not {device.type}"
        return None

    def families(self) -> Dict[str, KernelFamily]:
        """The kernel families' own descriptions, keyed ``quantize_act`` / ``gemm_w8a8`` / ``gemm_w4a8``."""
        return {}

    def gemm_family(self, bits: int) -> Optional[KernelFamily]:
        return self.families().get("gemm_w8a8" if bits == 8 else "gemm_w4a8")

    def refuses(self, fmt, in_features: int) -> Optional[str]:
        """None when this backend's kernels run weights of format ``fmt`` with K = ``in_features``, else why not."""
        fam = self.gemm_family(fmt.bits)
        if fam is None:
            return f"it has no W{fmt.bits}A8 GEMM"
        why = fam.refuses(in_features, fmt.group_size)
        if why is None:
            act = self.families().get("quantize_act")
            why = act.refuses(in_features) if act is not None else None
        return why

    def kernel_ops(self) -> KernelOps:
        """The validated torch ops of this backend (see :class:`KernelOps`)."""
        raise NotImplementedError(f"backend {self.name!r} exposes no kernel ops")

    def prepare_weight(self, fmt, qweight: torch.Tensor, scales: torch.Tensor):
        return qweight, scales

    def canonical_weight(self, fmt, qweight: torch.Tensor, scales: torch.Tensor):
        return qweight, scales

    # The kernels themselves, validating their inputs (the generic ``torch.ops.ditq.*`` ops call these).
    def quantize_act(self, x, scale):
        raise NotImplementedError(f"backend {self.name!r} has no activation-quantization kernel")

    def gemm_w8a8(self, a, a_scale, w, w_scale, bias, out_dtype):
        raise NotImplementedError(f"backend {self.name!r} has no W8A8 GEMM")

    def gemm_w4a8(self, a, a_scale, w, w_scale, bias, group_size, out_dtype):
        raise NotImplementedError(f"backend {self.name!r} has no W4A8 GEMM")

    def norm_modulate_quantize(self, x, shift, scale, eps, act_scale):
        raise NotImplementedError(f"backend {self.name!r} has no fused LayerNorm + modulate + quantize kernel")

    def gemm_w8a8_fused(self, a, a_scale, w, w_scale, bias, gelu, gate, residual, rows_per_gate, out_scale,
                        out_dtype):
        raise NotImplementedError(f"backend {self.name!r} has no W8A8 GEMM with a fused epilogue")

    def gemm_w4a8_fused(self, a, a_scale, w, w_scale, bias, group_size, gelu, gate, residual, rows_per_gate,
                        out_scale, out_dtype):
        raise NotImplementedError(f"backend {self.name!r} has no W4A8 GEMM with a fused epilogue")

    def attention_inputs(self, first, second, batch, heads, first_q_norm, first_k_norm, second_q_norm,
                         second_k_norm, eps, rope_cos, rope_sin):
        op = self.kernel_ops().attention_inputs
        if op is None:
            raise NotImplementedError(f"backend {self.name!r} has no fused attention-inputs kernel")
        return op(first, second, batch, heads, first_q_norm, first_k_norm, second_q_norm, second_k_norm, eps,
                  rope_cos, rope_sin)

    def __repr__(self):
        return f"<ditq backend {self.name}>"


_REGISTRY: Dict[str, Backend] = {}
_IMPORT_ERRORS: Dict[str, str] = {}


def register(backend: Backend) -> Backend:
    _REGISTRY[backend.name] = backend
    return backend


def _load(name: str) -> Optional[Backend]:
    if name not in _REGISTRY and name not in _IMPORT_ERRORS:
        try:
            importlib.import_module(f"{__name__}.{_MODULES[name]}")
        except ImportError as e:  # a missing optional dependency disables this backend only
            _IMPORT_ERRORS[name] = f"{type(e).__name__}: {e}"
        if name not in _REGISTRY and name not in _IMPORT_ERRORS:
            _IMPORT_ERRORS[name] = "this build of ditq does not include it"
    return _REGISTRY.get(name)


def unavailable_reason(name: str, device=None) -> Optional[str]:
    """None if backend ``name`` can run on ``device`` (a torch.device or str; None = anywhere)."""
    if name not in BACKEND_NAMES:
        raise BackendUnavailableError(f"unknown backend {name!r}; choose one of "
                                      f"{', '.join(BACKEND_NAMES + ('auto',))}")
    b = _load(name)
    if b is None:
        return _IMPORT_ERRORS[name]
    reason = b.unavailable_reason()
    if reason is None and device is not None:
        reason = b.unavailable_on(torch.device(device))
    return reason


def available_backends(device=None) -> Tuple[str, ...]:
    return tuple(n for n in BACKEND_NAMES if unavailable_reason(n, device) is None)


def resolve(name: str, device=None) -> str:
    """The concrete backend name for ``name`` (which may be ``"auto"``) on ``device``."""
    if name != "auto":
        reason = unavailable_reason(name, device)
        if reason is not None:
            where = f" on {torch.device(device).type}" if device is not None else ""
            raise BackendUnavailableError(
                f"backend {name!r} is not available{where}: {reason}. "
                f"Available{where}: {', '.join(available_backends(device)) or 'none'}")
        return name
    for candidate in _auto_candidates(device):
        if unavailable_reason(candidate, device) is None:
            return candidate
    raise BackendUnavailableError(f"no backend can run on {device}")  # torch runs everywhere: unreachable


def _auto_candidates(device) -> Tuple[str, ...]:
    return AUTO_ORDER.get(torch.device(device).type if device is not None else "cpu", ("torch",))


def get_backend(name: str, device=None) -> Backend:
    return _REGISTRY[resolve(name, device)]


def resolve_for(name: str, device, fmt, in_features: int) -> str:
    """The concrete backend for a layer of format ``fmt`` with K = ``in_features`` on ``device``.

    An explicit backend whose kernels cannot take the layer raises :class:`BackendUnavailableError` saying why
    (from the kernels' own description). ``"auto"`` takes the first backend of :data:`AUTO_ORDER` for the device
    (cuda, triton, then torch on a GPU) whose kernels take the layer.
    """
    if name != "auto":
        why = get_backend(name, device).refuses(fmt, in_features)
        if why is not None:
            raise BackendUnavailableError(f"backend {name!r} cannot run this layer: {why}")
        return name
    reasons = []
    for candidate in _auto_candidates(device):
        why = unavailable_reason(candidate, device)
        if why is None:
            why = _REGISTRY[candidate].refuses(fmt, in_features)
        if why is None:
            return candidate
        reasons.append(f"{candidate}: {why}")
    raise BackendUnavailableError(f"no backend can run this layer on {device}: " + "; ".join(reasons))


def describe() -> Dict[str, Dict[str, KernelFamily]]:
    """Every loadable backend's kernel families (a backend that cannot be loaded is left out)."""
    out = {}
    for name in BACKEND_NAMES:
        b = _load(name)
        if b is not None:
            try:
                out[name] = b.families()
            except Exception:  # noqa: BLE001 - a backend that cannot describe itself is left out of the table
                continue
    return out


def kernel_group_sizes() -> Tuple[int, ...]:
    """W4 group sizes some GPU kernel family (cuda or triton) is built for, from their descriptions."""
    sizes = set()
    for name, fams in describe().items():
        fam = fams.get("gemm_w4a8")
        if name != "torch" and fam is not None and fam.group_sizes:
            sizes.update(fam.group_sizes)
    return tuple(sorted(sizes))

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
"""
from __future__ import annotations

import importlib
from typing import Dict, Optional, Tuple

import torch

BACKEND_NAMES = ("torch", "triton", "cuda", "cuda-emulated")
_MODULES = {"torch": "torch_backend", "triton": "triton_backend", "cuda": "cuda_backend",
            "cuda-emulated": "cuda_backend"}


class BackendUnavailableError(RuntimeError):
    """The backend asked for cannot run here; the message says why and what can."""


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

    def prepare_weight(self, fmt, qweight: torch.Tensor, scales: torch.Tensor):
        return qweight, scales

    def canonical_weight(self, fmt, qweight: torch.Tensor, scales: torch.Tensor):
        return qweight, scales

    def quantize_act(self, x, scale):
        raise NotImplementedError(f"backend {self.name!r} has no activation-quantization kernel")

    def gemm_w8a8(self, a, a_scale, w, w_scale, bias, out_dtype):
        raise NotImplementedError(f"backend {self.name!r} has no W8A8 GEMM")

    def gemm_w4a8(self, a, a_scale, w, w_scale, bias, group_size, out_dtype):
        raise NotImplementedError(f"backend {self.name!r} has no W4A8 GEMM")

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
    on_gpu = device is not None and torch.device(device).type == "cuda"
    for candidate in (("cuda", "triton") if on_gpu else ()) + ("torch",):
        if unavailable_reason(candidate, device) is None:
            return candidate
    raise BackendUnavailableError(f"no backend can run on {device}")  # torch runs everywhere: unreachable


def get_backend(name: str, device=None) -> Backend:
    return _REGISTRY[resolve(name, device)]

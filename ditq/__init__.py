"""ditq: real-integer post-training quantization and inference for Diffusion Transformers.

The public API (``QuantConfig``, ``quantize``, ``save_quantized``, ``load_quantized``, ``sqnr``, ``QuantReport``,
and the run-time LoRA functions ``load_lora``, ``set_lora_scale``, ``unload_lora``) is imported on first use, so
that ``import ditq.kernels`` (the Triton kernels, which know nothing of the runtime) costs no more than the
kernels themselves: it registers the ``torch.ops.ditq`` ops and nothing else, and never imports diffusers.

ditq teaches diffusers to load its checkpoints (``<Model>.from_pretrained`` on a ditq directory): the registration
runs as soon as both ditq and diffusers are imported, in either order.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

from . import ops  # noqa: F401  (registers torch.ops.ditq.*)

__version__ = "0.1.0"

_API = {
    "QuantConfig": ".config",
    "QuantReport": ".report",
    "quantize": ".convert",
    "save_quantized": ".io",
    "load_quantized": ".io",
    "sqnr": ".quant.reference",
    "load_lora": ".lora",
    "unload_lora": ".lora",
    "set_lora_scale": ".lora",
}
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ditq' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))


def _register_with_diffusers() -> None:
    from .diffusers_integration import register

    register()


class _AfterDiffusersImport(importlib.abc.MetaPathFinder):
    """Runs the diffusers registration right after ``import diffusers`` finishes (a one-shot import hook)."""

    def find_spec(self, name, path=None, target=None):
        if name != "diffusers":
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the find_spec below from finding us again
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register_with_diffusers()

        spec.loader.exec_module = exec_then_register
        return spec


if "diffusers" in sys.modules:
    _register_with_diffusers()
elif importlib.util.find_spec("diffusers") is not None:
    sys.meta_path.insert(0, _AfterDiffusersImport())

"""ditq: real-integer post-training quantization and inference for Diffusion Transformers."""
from .quant.reference import sqnr  # noqa: F401
from . import ops  # noqa: F401  (registers torch.ops.ditq.*)

__version__ = "0.1.0"
__all__ = ["sqnr"]
from .config import QuantConfig  # noqa: F401,E402
from .report import QuantReport  # noqa: F401,E402
from .convert import quantize  # noqa: F401,E402

__all__ += ["QuantConfig", "QuantReport", "quantize"]
from .io import load_quantized, save_quantized  # noqa: F401,E402

__all__ += ["save_quantized", "load_quantized"]

# Lets <DiffusersModel>.from_pretrained read ditq checkpoints (ditq.diffusers_integration says what it relies on).
try:
    import diffusers as _diffusers  # noqa: F401,E402
except ImportError:  # diffusers is optional for the kernels alone
    pass
else:
    from .diffusers_integration import register as _register_with_diffusers  # noqa: E402
    _register_with_diffusers()

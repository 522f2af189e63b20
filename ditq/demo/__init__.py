"""A small trained class-conditional DiT shipped with ditq, so the quantizer can be tried with no download.

    from ditq.demo import load_bundled_pipeline
    pipe = load_bundled_pipeline()                      # PixelDiTPipeline, float32, CPU
    images = pipe([0, 1, 2], num_inference_steps=25, output_type="pt").images   # (3, 1, 16, 16) in [0, 1]

See MODEL_CARD.md beside this file for what the model is and how well it does; `ditq.demo.metrics` scores samples.
"""

from __future__ import annotations

import os

import torch

BUNDLED_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model")


def __getattr__(name: str):
    # The pipeline (and with it diffusers, seconds to import) loads on first use, so that `ditq --help` and
    # `ditq info`, which read only ditq.demo.run's setting names, do not pay for it.
    if name == "PixelDiTPipeline":
        from .pipeline import PixelDiTPipeline
        return PixelDiTPipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_bundled_pipeline(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> "PixelDiTPipeline":
    """The bundled digits DiT, read from the package directory only (never the network).

    Weights are stored in fp16; diffusers loads them as float32, and `dtype` casts afterwards (fp16 is slow on CPU).
    """
    from .pipeline import PixelDiTPipeline
    pipe = PixelDiTPipeline.from_pretrained(BUNDLED_MODEL_DIR, local_files_only=True)
    return pipe.to(device) if dtype == torch.float32 else pipe.to(device, dtype)


__all__ = ["BUNDLED_MODEL_DIR", "PixelDiTPipeline", "load_bundled_pipeline"]

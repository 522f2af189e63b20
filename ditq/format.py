"""The packed-weight format: one description shared by packing, kernels and save/load.

A quantized linear's weight is stored in a *canonical* layout that no kernel is tied to:

* 8-bit: ``qweight`` int8 ``[N, K]`` (row n = output channel n, contiguous along K);
  ``scales`` float32 ``[N]`` (one per output channel).
* 4-bit: ``qweight`` uint8 ``[N, K // 2]``: two signed nibbles per byte along K, element ``k = 2j`` in the
  *low* nibble of byte ``j`` and ``k = 2j + 1`` in the high one (two's complement, so every value in
  ``[-8, 7]`` is representable; our quantizer emits ``[-7, 7]``, kernels must accept ``-8`` too).
  ``scales`` float32 ``[K // group_size, N]``: group-major, so a kernel walking K reads one contiguous row of
  N scales per group.

A backend may want another memory layout (nibble order, fragment-ordered tiles); it derives it from the
canonical one when a model is built or loaded (``ditq.backends.Backend.prepare_weight``), so a checkpoint
is never tied to one backend. Checkpoints record ``LAYOUT`` and ``LAYOUT_VERSION``; loading another
version is refused.

The canonical layout takes any power-of-two group size (the reference maths runs them all); which group sizes a
GPU kernel runs is the kernel family's business, read from its own description (``ditq.backends``):
``SUPPORTED_GROUP_SIZES`` is derived from those descriptions, never restated here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

LAYOUT = "ditq-canonical"
LAYOUT_VERSION = 1
SUPPORTED_BITS = (4, 8)
MAX_GROUP_SIZE = 16384  # the K bound every GEMM shares (ditq.quant.reference.MAX_K)


def is_canonical_group_size(group_size) -> bool:
    """Groups the canonical layout can hold: a power of two from 2 (one packed byte) up to the largest K."""
    return (isinstance(group_size, int) and not isinstance(group_size, bool) and 2 <= group_size <= MAX_GROUP_SIZE
            and group_size & (group_size - 1) == 0)


def __getattr__(name: str):
    if name == "SUPPORTED_GROUP_SIZES":  # what the GPU kernels are built for, from their own descriptions
        from .backends import kernel_group_sizes
        return kernel_group_sizes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class FormatError(ValueError):
    """A weight format that ditq cannot pack, run or load."""


@dataclass(frozen=True)
class WeightFormat:
    bits: int
    group_size: Optional[int] = None  # None = one scale per output channel
    layout: str = LAYOUT
    layout_version: int = LAYOUT_VERSION

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise FormatError(f"weight bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        if self.group_size is not None and not is_canonical_group_size(self.group_size):
            raise FormatError(f"group_size must be None (per output channel) or a power of two from 2 to "
                              f"{MAX_GROUP_SIZE}, got {self.group_size!r}")
        if self.bits == 4 and self.group_size is None:
            raise FormatError("4-bit weights need a group size: channel-wise int4 loses too much to the outliers "
                              "inside each output channel")
        if self.bits == 8 and self.group_size is not None:
            raise FormatError("8-bit weights are stored with one scale per output channel; "
                              "set group_size=None")
        if self.layout != LAYOUT or self.layout_version != LAYOUT_VERSION:
            raise FormatError(
                f"weight layout {self.layout!r} version {self.layout_version} is not supported by this "
                f"ditq (it reads {LAYOUT!r} version {LAYOUT_VERSION}); re-quantize the model with this "
                f"version or install the ditq that wrote it")

    @property
    def qmax(self) -> int:
        """Largest magnitude the quantizer emits: symmetric range [-qmax, qmax]."""
        return 127 if self.bits == 8 else 7

    def check_in_features(self, in_features: int) -> None:
        """Raise unless a layer with this many inputs (K) can use this format."""
        if self.bits == 4 and in_features % self.group_size:
            raise FormatError(f"group_size {self.group_size} does not divide in_features K = {in_features}")

    def packed_shapes(self, out_features: int, in_features: int) -> dict:
        """Shapes of the canonical tensors of an [out_features, in_features] weight."""
        self.check_in_features(in_features)
        if self.bits == 8:
            return {"qweight": (out_features, in_features), "scales": (out_features,)}
        return {"qweight": (out_features, in_features // 2),
                "scales": (in_features // self.group_size, out_features)}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "WeightFormat":
        unknown = set(d) - {"bits", "group_size", "layout", "layout_version"}
        if unknown:
            raise FormatError(f"unknown weight-format fields {sorted(unknown)}")
        return cls(**d)

"""The packed-weight format: one description shared by packing, kernels and save/load.

A quantized linear's weight is stored in a *canonical* layout that no kernel is tied to:

* 8-bit: ``qweight`` int8 ``[N, K]`` (row n = output channel n, contiguous along K);
  ``scales`` float32 ``[N]`` (one per output channel).
* 4-bit: ``qweight`` uint8 ``[N, K // 2]``: two signed nibbles per byte along K, element ``k = 2j`` in the
  *low* nibble of byte ``j`` and ``k = 2j + 1`` in the high one (two's complement, so every value in
  ``[-8, 7]`` is representable; our quantizer emits ``[-7, 7]``, kernels must accept ``-8`` too).
  ``scales`` float32 ``[K // group_size, N]``: group-major, so a kernel walking K reads one contiguous row of
  N scales per group.

**Integer group scales** (``WeightFormat(4, G, group_scales="int")``, two-level scales as in QServe's
progressive quantization): the same tensors, but every column of ``scales`` is an integer multiple of one
per-channel float ``c[n]``: ``scales[g, n] = q[g, n] * c[n]`` exactly in float32, ``q`` in ``[1, 16]``, and the
group with the channel's largest scale has ``q = 16``, so ``c[n] = max_g scales[g, n] / 16`` and ``q`` are
recovered exactly (:meth:`WeightFormat.int_group_scales`). Such weights run on every kernel as float group scales;
the Hopper CUDA kernels and the Triton W4A8 kernel apply ``q`` to the int4 values before the tensor-core product
(``q * w`` is an int8) and keep one int32 sum over K, as W8A8 does (``csrc/gemm_sm90.cuh``, ``kernels/w4a8.py``),
given the scales in the form :func:`int_scales_to_kernel` makes. Checkpoints of the float kind carry no
``group_scales`` field, so every earlier reader reads them as before and refuses the integer kind.

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
# The largest canonical group: a partial of int4 weights over it, at most 127 * 8 * 16384 < 2^24, is exact in
# float32 (the reference backend sums groups that way); half of ditq.quant.reference.MAX_K.
MAX_GROUP_SIZE = 16384
GROUP_SCALES = ("float", "int")  # WeightFormat.group_scales: float32 per group, or integer multiples of a channel's
MAX_INT_GROUP_SCALE = 16  # the largest q (ditq.quant.reference and csrc/configs/kernel_families.h agree: tested)


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
    group_scales: str = "float"  # "int": integer multiples of a per-channel scale (see the module doc)

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
        if self.group_scales not in GROUP_SCALES:
            raise FormatError(f"group_scales must be one of {GROUP_SCALES}, got {self.group_scales!r}")
        if self.group_scales == "int" and self.bits != 4:
            raise FormatError("integer group scales are for 4-bit weights (8-bit weights have one float scale per "
                              "output channel)")
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

    def int_group_scales(self, scales):
        """(q int32 [K // G, N], c float32 [N]) of canonical integer group scales: ``scales = q * c`` exactly, q in
        [1, 16], c the channel's largest scale / 16. Raises FormatError when ``scales`` are not of that form (a
        corrupted checkpoint, or float scales given for an integer format)."""
        import torch

        if self.group_scales != "int":
            raise FormatError(f"{self} has float group scales")
        c = scales.amax(dim=0) / MAX_INT_GROUP_SCALE  # exact: a power of two
        q = torch.round(scales / c)
        if not bool(((q >= 1) & (q <= MAX_INT_GROUP_SCALE) & (q * c == scales)).all()):
            raise FormatError(f"scales are not integer group scales: each must be q * c[n] exactly, q an integer in "
                              f"[1, {MAX_INT_GROUP_SCALE}] and c[n] = (the channel's largest scale) / "
                              f"{MAX_INT_GROUP_SCALE}")
        return q.to(torch.int32), c.contiguous()

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.group_scales == "float":  # the field is new: float checkpoints stay readable by every ditq
            del d["group_scales"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "WeightFormat":
        unknown = set(d) - {"bits", "group_size", "layout", "layout_version", "group_scales"}
        if unknown:
            raise FormatError(f"unknown weight-format fields {sorted(unknown)}")
        return cls(**d)


def int_scales_to_kernel(q, c):
    """Integer group scales (q [K // G, N] in [1, 16], channel scales c float32 [N]: :meth:`WeightFormat.int_group_scales`)
    as the GEMM kernels take them in place of float scales (the CUDA backends' Hopper kernels and the Triton W4A8
    kernel alike): one int32 [K // G + 1, N] tensor, the q rows then c's float32 bits, so a layer's buffers and the
    ops' signatures stay those of float scales and a launcher tells the two apart by dtype."""
    import torch

    return torch.cat([q.to(torch.int32), c.float().reshape(1, -1).view(torch.int32)]).contiguous()


def int_scales_to_canonical(packed):
    """Inverse of :func:`int_scales_to_kernel`: the canonical float32 [K // G, N] scales q * c (exact products)."""
    import torch

    return (packed[:-1].float() * packed[-1:].view(torch.float32)).contiguous()

"""Weight layouts of the CUDA GEMMs (``csrc/gemm.cuh``), converted from and back to the canonical format.

Plain torch, so the layout maths is tested on any machine (``tests/csrc/test_gemm_layout.py``).

* **W8**: the canonical int8 ``[N, K]`` is already what the kernel reads (``ldmatrix`` of a row-major W tile
  gives the ``mma.m16n8k32`` B fragments directly), so it is kept as is; scales ``[N]`` as is.
* **W4**: uint8 ``[N, K // 2]`` in *split-nibble* order. Every 32-k chunk of a row is 16 bytes; byte ``p``
  (0..15) of chunk ``c`` holds ``k = 32c + p`` in its low nibble and ``k = 32c + p + 16`` in its high one
  (canonical: byte ``j`` holds ``k = 2j`` low, ``2j + 1`` high). Why: lane ``(g, t)`` of an m16n8k32 B
  fragment needs ``k = 4t..4t+3`` (register 0) and ``k = 16+4t..16+4t+3`` (register 1) of column ``g``;
  ``ldmatrix`` hands it bytes ``4t..4t+3`` of row ``g``: their low nibbles are register 0, their high nibbles
  register 1, and ``w & 0xF0F0F0F0`` / ``(w << 4) & 0xF0F0F0F0`` turn them into int8 ``16 * w`` with no sign
  extension. Scales stay canonical ``[K // G, N]`` (the kernel divides them by 16, exactly).
  K must be a multiple of 32, which every supported group size (32..256) guarantees.
  Integer group scales (``ditq.format``) go to the Hopper kernels as one int32 tensor
  (``ditq.format.int_scales_to_kernel``).
"""
from __future__ import annotations

import torch

CHUNK_K = 32  # k per mma step: the unit of the split-nibble permutation


def _check_w4(packed: torch.Tensor) -> None:
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise TypeError(f"4-bit weights must be uint8 [N, K // 2], got {packed.dtype} {tuple(packed.shape)}")
    if (packed.shape[1] * 2) % CHUNK_K:
        raise ValueError(f"the CUDA W4 layout needs K % {CHUNK_K} == 0, got K = {packed.shape[1] * 2}")


def w4_canonical_to_kernel(packed: torch.Tensor) -> torch.Tensor:
    """Canonical uint8 [N, K // 2] (byte j = k 2j low, 2j + 1 high) -> split-nibble uint8 [N, K // 2]."""
    _check_w4(packed)
    n, half = packed.shape
    p = packed.to(torch.int16)
    nib = torch.stack([p & 0xF, p >> 4], dim=-1).reshape(n, half * 2)  # raw 4-bit codes in k order
    nib = nib.reshape(n, -1, 2, 16)  # [n, chunk, k-half (k // 16 % 2), p]
    out = nib[:, :, 0, :] | (nib[:, :, 1, :] << 4)
    return out.reshape(n, half).to(torch.uint8).contiguous()


def w4_kernel_to_canonical(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`w4_canonical_to_kernel`, exactly."""
    _check_w4(packed)
    n, half = packed.shape
    p = packed.to(torch.int16).reshape(n, -1, 16)
    nib = torch.stack([p & 0xF, p >> 4], dim=2).reshape(n, half * 2)  # k order again
    nib = nib.reshape(n, half, 2)
    return (nib[..., 0] | (nib[..., 1] << 4)).to(torch.uint8).contiguous()


def prepare_weight(bits: int, qweight: torch.Tensor, scales: torch.Tensor):
    """Canonical (``ditq.format``) -> the tensors the CUDA GEMMs read."""
    if bits == 8:
        return qweight.contiguous(), scales.contiguous()
    if bits == 4:
        return w4_canonical_to_kernel(qweight), scales.contiguous()
    raise ValueError(f"the CUDA GEMMs take 4- or 8-bit weights, got {bits}")


def canonical_weight(bits: int, qweight: torch.Tensor, scales: torch.Tensor):
    """Inverse of :func:`prepare_weight`."""
    if bits == 8:
        return qweight, scales
    if bits == 4:
        return w4_kernel_to_canonical(qweight), scales
    raise ValueError(f"the CUDA GEMMs take 4- or 8-bit weights, got {bits}")

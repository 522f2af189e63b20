"""Deterministic split-K for the Triton GEMMs (W8A8 and W4A8): the count, the k ranges and the workspace.

Why: the GEMMs launch one program per output tile. DiT-XL/2 at batch 1 with guidance runs M = 512, and its
N = 1152 projections (attention out, MLP fc2) are 4 x 9 = 36 tiles of 128 x 128 on an H100 / H200's 132 SMs:
most of the GPU idles. Splitting K over ``S`` programs per tile fills it.

Design: two launches, not one.

1. The GEMM kernel with ``SPLIT_K`` on runs a grid ``(tiles, S)``: program ``(t, z)`` sums the k units
   ``[z * U // S, (z + 1) * U // S)`` of tile ``t`` (``U`` from the kernel's ``split_shape``: BK-wide steps for
   W8A8, whole pack blocks for W4A8, so a W4 group never straddles two splits and each partial carries the unsplit
   per-group scaling) and stores its raw accumulator to the workspace ``[S, M, N]`` (:func:`store_partial`):
   int32 for W8A8, fp32 (after the group scales) for W4A8. Nothing of the epilogue runs there.
2. A reduce kernel (one program per tile, the same BM x BN and orientation) adds the S partials in the fixed
   order 0, 1, ..., S - 1 (:func:`load_sum`) and hands the sum to the family's own epilogue function, the very
   code the unsplit kernel ends with (scale, bias, then ``epilogue.store_tile``'s GELU / gate / residual /
   int8 output): the epilogue runs exactly once per output element, on the full sum.

W8A8 partials are int32 and integer addition is associative, so a split result is bit-identical to the
unsplit one. W4A8 partials are fp32, added in split order: deterministic (the same bits on every run, whatever
order the programs ran in), within the reference's fp32 tolerance, but not the unsplit bits.

The alternative, one launch whose last-arriving program per tile reduces (an atomic counter per tile, as the
CUDA kernels do), saves a launch and the workspace round trip through L2, but its correctness rests on
acquire / release ordering that Triton's interpreter cannot exercise (it runs programs one after another), so
no CPU test could catch a missing fence. Two launches are race-free by construction and verifiable here; the
reduce reads S x BM x BN words per tile from L2, small next to the K loop it splits.

With ``SPLIT_K`` off (S = 1) the kernels compile exactly as before (every split branch is a ``tl.constexpr``)
and no workspace exists.

The count (:func:`auto_splits`) follows the CUDA backend's Hopper rule under one wave (``sm90_auto_schedule`` in
csrc/configs/gemm_tiles_sm90.h, which also splits the tiles of a last, partial wave; this one does not): no
split once the tiles fill a wave of SMs; below that, the largest count whose ``tiles * S`` programs still fit
one wave, at most the cap (the table entry's optional ``"max_splits"``, :data:`MAX_SPLITS` when absent)
and at most the k units. Not the
smallest count that reaches a wave: 36 tiles x 4 = 144 programs on 132 SMs are two waves of a quarter of K
each (time ~ 2 / 4), where 3 splits are one wave of a third (~ 1 / 3). The reduce launch is not modelled
here: at small M the GEMM is memory-bound and the workspace round trip ([S, M, N] written, then read by the
reduce) plus a second launch may cost more than the split gains. Hence the cap, per M bucket, as data: an
entry of ``kernels/configs/*.json`` may carry ``"max_splits": c`` (an int >= 1; 1 never splits), which
``benchmarks/tune_tiles.py --write-configs`` sets from timings (it times caps 1, 2, 4, 8 against the automatic
count) only where the cap beats the automatic count by a margin. Without a GPU (the interpreter) the
count is computed for :data:`INTERPRETER_SM_COUNT` SMs, as the CUDA emulator pretends, so CPU runs go through
the same rule and the split launches. The interpreter's tiles are small, though, so the tiny shapes of the
CPU tests split more often and further than a GPU's tiles would (4 tiles of K = 256 at BK = 32: 8 splits),
which costs interpreter time (every program has a fixed cost); ``splits=`` forces a count.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch
import triton
import triton.language as tl

MAX_SPLITS = 16  # the CUDA backend's cap (each split adds a BM x BN partial to write and read back)
INTERPRETER_SM_COUNT = 132  # an H100 SXM / H200, what the CUDA emulator pretends too


def auto_splits(tiles: int, units: int, sm_count: int, max_splits: Optional[int] = None) -> int:
    """The automatic split count of a launch of ``tiles`` output tiles whose K is ``units`` k units, on
    ``sm_count`` SMs, at most ``max_splits`` (the table entry's ``"max_splits"``; None: :data:`MAX_SPLITS`): the
    rule in the module docstring, the same as the CUDA backend's Hopper kernels' under one wave."""
    cap = MAX_SPLITS if max_splits is None else check_max_splits(max_splits)
    if tiles <= 0 or tiles >= sm_count:
        return 1
    return max(1, min(sm_count // tiles, cap, units))


def check_max_splits(value, where: str = "max_splits") -> int:
    """A split cap must be an int >= 1 (1: the bucket never splits); returns it, else raises ValueError /
    TypeError naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where} must be an int >= 1 (the most split-K programs per tile), got "
                        f"{type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{where} must be an int >= 1 (the most split-K programs per tile; 1 never splits), "
                         f"got {value}")
    return value


def sm_count(device) -> int:
    """The SMs of ``device`` (a CUDA device), or :data:`INTERPRETER_SM_COUNT` for the interpreter's CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return INTERPRETER_SM_COUNT
    return _cuda_sm_count(torch.cuda.current_device() if device.index is None else device.index)


@lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    # asked once per GPU, not on every launch: the launchers call sm_count on the hot path
    return torch.cuda.get_device_properties(index).multi_processor_count


def resolve(splits: Optional[int], tiles: int, units: int, elements: int, device, kernel: str,
            max_splits: Optional[int] = None) -> int:
    """The split count of a launch of ``tiles`` output tiles, ``units`` k units and ``elements`` = M * N outputs:
    :func:`auto_splits` (at most ``max_splits``, the tile entry's cap) when ``splits`` is None, else the
    forced count, an int in [1, units] (each split sums at least one whole k unit; the cap does not apply).
    A split launch needs M * N < 2**31 (the workspace's in-slice offsets are int32); the automatic count never
    splits such a grid (it is far more than a wave)."""
    if splits is None:
        return auto_splits(tiles, units, sm_count(device), max_splits)
    if isinstance(splits, bool) or not isinstance(splits, int):
        raise TypeError(f"{kernel}: splits must be an int or None (automatic), got {type(splits).__name__}")
    if not 1 <= splits <= max(units, 1):
        raise ValueError(f"{kernel}: split-K count must be in [1, {max(units, 1)}] (the k units of this tile "
                         f"and K), got {splits}")
    if splits > 1 and elements >= 2**31:
        raise ValueError(f"{kernel}: a split-K launch needs M * N < 2**31 outputs, got {elements}")
    return splits


def workspace(splits: int, m: int, n: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The partials' buffer [S, M, N]. Every element the reduce reads is written first by its split, so it is
    left uninitialised (tests replace this function to poison it)."""
    return torch.empty((splits, m, n), dtype=dtype, device=device)


@triton.jit
def k_range(units, S):
    """The k units ``[lo, hi)`` of this program's split (axis 1 of the grid): ``z * U // S`` to
    ``(z + 1) * U // S``, so S <= U splits are all non-empty and differ by at most one unit."""
    z = tl.program_id(1)
    return z * units // S, (z + 1) * units // S


@triton.jit
def _tile_offsets(offs_m, offs_n, M, N, SWAP_AB: tl.constexpr):
    """Offsets and mask of a [BM, BN] tile ([BN, BM] when swapped) in one [M, N] slice of the workspace. int32:
    :func:`resolve` refuses a split launch with M * N >= 2**31, and a tile of 64-bit offsets kept live across
    the reduce's loop costs a register per element more (the W8A8 128 x 128 reduce then spilled)."""
    if SWAP_AB:
        offs = offs_m[None, :] * N + offs_n[:, None]
        ok = (offs_m < M)[None, :] & (offs_n < N)[:, None]
    else:
        offs = offs_m[:, None] * N + offs_n[None, :]
        ok = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    return offs, ok


@triton.jit
def store_partial(acc, ws_ptr, offs_m, offs_n, M, N, SWAP_AB: tl.constexpr):
    """Store this split's raw accumulator (in the tile's orientation) to slice ``program_id(1)`` of the
    workspace [S, M, N]; rows / columns past M / N are dropped, as the output's store drops them."""
    offs, ok = _tile_offsets(offs_m, offs_n, M, N, SWAP_AB)
    tl.store(ws_ptr + tl.program_id(1).to(tl.int64) * M * N + offs, acc, mask=ok)


@triton.jit
def load_sum(ws_ptr, S, offs_m, offs_n, M, N, SWAP_AB: tl.constexpr):
    """The sum of the S partials of a tile, added in the fixed order 0, 1, ..., S - 1 (fp32 partials then give
    the same bits whichever program finished first). Lanes past M / N read 0 and are never stored. Only the
    slice's base pointer (a scalar, 64-bit: S * M * N may exceed 2**31) moves from split to split."""
    offs, ok = _tile_offsets(offs_m, offs_n, M, N, SWAP_AB)
    acc = tl.load(ws_ptr + offs, mask=ok, other=0)
    step = tl.cast(M, tl.int64) * N  # tl.cast: M = 1 arrives as a constexpr
    for z in range(1, S):
        acc += tl.load(ws_ptr + z * step + offs, mask=ok, other=0)
    return acc

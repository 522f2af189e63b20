"""The fused GEMM epilogue's pieces, shared by the W8A8 and W4A8 kernels.

After a GEMM kernel has its fp32 tile ``y = acc * a_scale * w_scale (+ bias)`` (its own step, unchanged), it
hands the tile to :func:`store_tile`, which applies what the ``tl.constexpr`` flags ask for, in the order of the
contract (``ditq.quant.reference.gemm_epilogue``), and stores it:

* ``HAS_GELU``: GELU's tanh approximation, :func:`gelu_tanh`;
* ``HAS_GATE``: ``y * gate[m // rows_per_gate, n]`` (adaLN-Zero's per-sample gate over that sample's rows);
* ``HAS_RESIDUAL``: ``y + residual[m, n]``;
* ``QUANT_OUT``: int8 output through ``quantize_act.quantize_row`` with a static scale (the one int8 tail of
  every kernel: ``clamp(rint(y * (1 / s)), -127, 127)``, NaN -> 0, +-inf -> +-127); otherwise a cast to the
  output's dtype rounding to nearest even (``interpret.cast_rn``).

A flag that is off compiles to nothing, so with every flag off this is exactly the plain GEMM's store.
The tile is ``[BM, BN]``, or ``[BN, BM]`` when the kernel swapped its operands (``SWAP_AB``).

Rounding, the same IEEE operations compiled and interpreted:

* No fused multiply-add: compiled, Triton lets LLVM contract a product followed by an add into one ``fma``
  (one rounding, which neither torch nor NumPy do). The adds that follow a product here (``y + 0.044715 * y^3``
  in GELU, ``tanh + 1``, ``+ residual`` after a gate or the scale) are ``add.rn.f32``, which is never
  contracted (``norm_quantize._add_rn``: inline PTX compiled, a plain NumPy add interpreted).
* tanh: libdevice's ``tanhf`` compiled (a couple of ulps). The interpreter cannot run libdevice, so there
  ``tanh(x) = 1 - 2 / (exp(2x) + 1)`` on ``x`` clamped to +-20 (|tanh| rounds to 1 in fp32 beyond ~9, and the
  clamp keeps ``exp`` finite); it is accurate to a few ulps *of 1*, which is what GELU needs: ``1 + tanh``
  is only absolutely accurate in fp32 whichever tanh is used. So the GELU path matches the reference to a
  tight tolerance (``ditq.quant.reference.gemm_epilogue_exact``), not bit for bit; everything else is exact.
  (Compiled, libdevice's tanhf is that same formula for |x| >= 0.6, on ``ex2.approx`` / ``rcp.approx``, and a
  polynomial below.)

Measured (AOT, triton 3.8, nothing run; tests/kernels/test_aot_epilogue.py checks one variant per kernel):
the tile table's entries for M = 16 and M = 4096, W4A8 at G = 128, bf16 output, N % 16 == 0. Registers /
total SASS instructions; the main loop keeps its tensor-core instructions and its length (within 4
instructions), nothing spills anywhere, and the gate / residual tiles are read with 16-byte loads
(``LDG.E.128``: 16 per thread at the 128x128 tiles).

  kernel arch  tile             plain     gelu      gelu+quant  gate+residual
  w8a8   sm80  16x64x128         56/464    56/688    56/856      56/552
  w8a8   sm80  128x128x128      168/968   168/2832  166/3408    174/1496
  w8a8   sm90  16x128x128 swap   42/536    42/1008   48/1264     46/712
  w8a8   sm90  128x128x128      146/800   162/2648  171/3272    179/1416
  w4a8   sm80  16x128x128        96/616    96/1072  108/1304     92/784
  w4a8   sm80  128x128x128      170/1352  171/3224  171/3848    182/1936
  w4a8   sm90  16x128x128 swap   92/704    89/1168   89/1408     92/864
  w4a8   sm90  128x128x128 swap 207/1344  207/3208  194/3840    214/1992

GELU costs ~30 instructions per element (tanh's two branches) after the loop. N not a multiple of 16 (no
DiT width) loses the 16-byte rows: the W8A8 sm90 128x128 gate + residual variant then reads them two bytes at a
time (128 ``LDG.E.U16``) and spills (255 registers, 62 spill instructions).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import triton
import triton.language as tl

from . import checks
from .epilogue_checks import check_args  # noqa: F401  (the launchers' check of the pieces' arguments)
from .interpret import cast_rn
from .norm_quantize import _add_rn
from .quantize_act import quantize_row

try:  # the CUDA libdevice wrappers; only used when compiling for a GPU
    from triton.language.extra.cuda import libdevice
except ImportError:  # pragma: no cover - very old triton
    from triton.language.extra import libdevice

GELU_TANH_BETA = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
GELU_TANH_KAPPA = tl.constexpr(0.044715)


@triton.jit
def tanh(x, INTERPRET: tl.constexpr):
    """fp32 tanh: libdevice compiled, ``1 - 2 / (exp(2x) + 1)`` interpreted (module docstring)."""
    if INTERPRET:
        xc = tl.minimum(tl.maximum(x, -20.0), 20.0)  # NaN stays NaN (NumPy's minimum / maximum propagate it)
        return 1.0 - 2.0 / (tl.exp(2.0 * xc) + 1.0)
    else:
        return libdevice.tanh(x)


@triton.jit
def gelu_tanh(y, INTERPRET: tl.constexpr):
    """``0.5 * y * (1 + tanh(sqrt(2/pi) * (y + 0.044715 * y^3)))``, the reference's order, no fma."""
    inner = _add_rn(y, (y * y * y) * GELU_TANH_KAPPA, INTERPRET) * GELU_TANH_BETA
    return (y * 0.5) * _add_rn(tanh(inner, INTERPRET), 1.0, INTERPRET)


@triton.jit
def store_tile(y, offs_m, offs_n, M, N, out_ptr, stride_om, gate_ptr, res_ptr, out_scale_ptr, rows_per_gate,
               HAS_GELU: tl.constexpr, HAS_GATE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
               QUANT_OUT: tl.constexpr, SWAP_AB: tl.constexpr, INTERPRET: tl.constexpr):
    """Apply the flagged pieces to the fp32 tile ``y`` and store it at ``out_ptr + m * stride_om + n`` for the
    rows ``offs_m`` < M and columns ``offs_n`` < N. gate is [M // rows_per_gate, N] and residual [M, N], both
    contiguous; out_scale a float32 [1].

    Everything per row or per column (bounds, int64 offsets, gate rows) is computed once on the vectors, then
    broadcast to the tile's orientation: [BM, BN], or [BN, BM] when the kernel computes the transposed tile
    (``SWAP_AB``). Written inline rather than through small helpers: the interpreter re-patches
    ``triton.language`` on every call of a jit function, a large share of an interpreted GEMM's time."""
    if HAS_GELU:
        y = gelu_tanh(y, INTERPRET)
    m_ok = offs_m < M
    n_ok = offs_n < N
    rows = offs_m.to(tl.int64)  # int64 offsets: M * N may exceed 2**31
    if HAS_GATE:
        g_rows = (offs_m // rows_per_gate).to(tl.int64)
    if SWAP_AB:
        ok = m_ok[None, :] & n_ok[:, None]
        row_off = rows[None, :]
        cols = offs_n[:, None]
        if HAS_GATE:
            g_off = g_rows[None, :] * N + cols
    else:
        ok = m_ok[:, None] & n_ok[None, :]
        row_off = rows[:, None]
        cols = offs_n[None, :]
        if HAS_GATE:
            g_off = g_rows[:, None] * N + cols
    if HAS_GATE:
        # other=0.0: lanes past M / N are never stored, but they must not read out of bounds
        g = tl.load(gate_ptr + g_off, mask=ok, other=0.0)
        y = y * g.to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row_off * N + cols, mask=ok, other=0.0)
        y = _add_rn(y, r.to(tl.float32), INTERPRET)  # not an fma with the gate's or the scale's product
    if QUANT_OUT:
        # the static branch of the one int8 tail: it reads the scale at out_scale_ptr (s_ptr and row unused)
        v = quantize_row(y, out_scale_ptr, out_scale_ptr, 0, False, INTERPRET)
    else:
        v = cast_rn(y, out_ptr.dtype.element_ty, INTERPRET)
    tl.store(out_ptr + row_off * stride_om + cols, v, mask=ok)


# ---- names of the pieces, for AOT jobs and reports --------------------------------------------------------

PIECES = {"gelu": "HAS_GELU", "gate": "HAS_GATE", "residual": "HAS_RESIDUAL", "quant": "QUANT_OUT"}


def flags(fused: str) -> Dict[str, bool]:
    """The constexpr flags of :func:`store_tile` for a ``"gelu+quant"``-style name ("" = none)."""
    names = [p for p in fused.split("+") if p]
    unknown = [p for p in names if p not in PIECES]
    if unknown:
        raise ValueError(f"unknown epilogue pieces {unknown}; choose from {list(PIECES)}")
    return {flag: name in names for name, flag in PIECES.items()}


def out_tensor(out: Optional[torch.Tensor], m: int, n: int, out_dtype, out_scale, device) -> torch.Tensor:
    """The output: int8 [M, N] with an out_scale, else out_dtype [M, N]; ``out`` (if given) checked for it."""
    dtype = torch.int8 if out_scale is not None else out_dtype
    if out is None:
        return torch.empty((m, n), dtype=dtype, device=device)
    return checks.tensor("out", out, (dtype,), shape=(m, n), labels=("M", "N"))

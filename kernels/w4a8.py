"""W4A8 group-wise GEMM: int8 activations x int4 weights (two per byte), fp32 group scales, fused dequantization.

    y[m, n] = a_scale[m] * sum_g w_scale[g, n] * P[g, m, n] + bias[n],   P[g] = sum_{k in g} a[m, k] w[n, k]

(the reference maths is ``ditq.quant.reference.gemm_w4a8``; tests/kernels/test_w4a8.py checks against it).
:func:`gemm_w4a8_fused` runs the same kernel with the pieces of :mod:`.epilogue` switched on (GELU, gate,
residual, int8 output), the store shared with the W8A8 kernel. With *integer group scales* (``INT_SCALES``, below)
the same kernel applies each group's integer scale q while unpacking and sums all of K in int32, as W8A8 does.

Design, and why
---------------
* **Per-group int32 partials, rescaled into an fp32 accumulator** (``acc += float(P_g) * s_g``, groups in
  order, exactly the reference's order), for float group scales: any checkpoint's scales, used exactly. An
  earlier SASS study scaled each group's int32 partial by an integer scale instead (``acc_i32 += P_g * q_g``):
  ~15% more main-loop instructions than the fp32 fold on cc 80, no gain on cc 90. Applying q to the weights
  while unpacking is what removes the fold: ``INT_SCALES`` below, for checkpoints with integer group scales.
  A group partial is at most 127 * 128 * 256 = 4,161,536 < 2^24 in magnitude,
  so its int32 -> fp32 conversion is exact; we never accumulate int32 across groups, so the int32 bound on
  K of a single accumulator (128 * 128 * K < 2^31) is not even needed here; the runtime's K <= 32768
  (``MAX_K``) is kept for every int8 GEMM alike.
* **The x16 nibble trick**: a nibble kept in the *high* half of a byte is an int8 equal to 16 * w.
  ``b & 0xF0`` is 16 * w_hi and ``b << 4`` (8-bit shift, the old high nibble falls off) is 16 * w_lo, so the
  int8 tensor-core dot runs on them with no sign extension. Every partial is then exactly 16 * P_g
  (|16 w| <= 128 fits int8 and 127 * 128 * 256 < 2^31), the fp32 accumulator is exactly 16x the
  reference's (scaling by a power of two commutes with rounding), and the 1/16 folds into the activation
  scale in the epilogue: ``acc * (a_scale * 0.0625)`` rounds to the same fp32 as the reference's
  ``acc_ref * a_scale``. No extra rounding anywhere.
* **Kernel layout: split nibbles per pack block** (``pack_weight``). The canonical format pairs k = 2j, 2j+1 in
  byte j, so unpacking it into K order needs an interleave (per-byte PRMTs in SASS). Instead the
  weights are repacked once at load time in blocks of ``PB = max(G, 64)`` k-elements: byte j of a block holds
  k = j (low nibble) and k = j + PB/2 (high nibble). The kernel never reorders anything: the low nibbles of
  a byte tile are the weights of one contiguous K range and the high nibbles of another, so the main loop
  does two dots, ``dot(W_lo, A[k_lo])`` and ``dot(W_hi, A[k_hi])``, each against a contiguous activation tile.
  For G >= 64 both halves lie in one group and chain into one int32 partial; for G = 32 (PB = 64) the low
  nibbles are group 2b and the high ones group 2b+1, each its own partial, so every dot has K >= 32 (the
  int8 MMA's K). When K / 32 is odd (G = 32 only) the last 32 k form a short block split the same way
  (k = j and j + 16); the kernel does it in one masked tail step.
* **Swapped operands (``SWAP_AB``)**, for Hopper and small M: compute the transposed tile ``acc^T[BN, BM] =
  W[BN, K] @ A^T`` with the unpacked weights as the *first* operand. wgmma may read its A operand from
  registers, and a small M becomes wgmma's N (``IGMMA.64xBMx32``). Group scales are then per *row* of the tile.
  Not swapped, the weights are the B operand and are staged through shared memory. Swapped does not remove
  every round trip: Triton 3.8 still moves the weight tile through shared memory once per step to reach the
  A-fragment layout (``STS.128`` then ``LDSM`` in the loop: the STS column of the table below, 5 against the
  plain kernel's 9 at 64x128).
* **Float A** (``A_FLOAT``, the fused GEMM given a float ``a`` and a static scale): each activation half-tile is
  loaded as float and quantized in registers with quantize_act's own rounding (``quantize_act.quantize_scaled``,
  ``1 / s`` computed once per program) before its dot. sm80 M <= 16 entry at G = 128, bf16 A: 106 registers
  (94 int8), loop 340 instructions (165), the same 16 IMMA, no spills (tests/kernels/test_aot_float_a.py).
* Pointer loads (not tensor descriptors): the weights must be unpacked in registers anyway, and on cc 80
  descriptors degrade to byte loads. Rows are 16-byte aligned (K % 32 == 0 => K/2 % 16 == 0) and
  Triton specialises the strides as multiples of 16, so loads are 128-bit. Out-of-range rows/columns are
  clamped (``% M``, ``% N``), not masked, so loads are unpredicated; only the store is masked.

Measured (AOT, triton 3.8, ptxas from triton's wheel, nothing run; ``benchmarks/static_report.py`` recomputes
them, ``tests/kernels/test_aot_w4a8.py`` compiles the same jobs)
-----------------------------------------------------------------------------------------------------------
Main loop = the instructions of the K loop's body (one pack block: BK = min(table BK, max(G, 64)) k);
"/MMA" = loop instructions per tensor-core instruction (an IGMMA.64xNx32 does N/8 times an IMMA's work).
PRMT, STS: inside the loop. Registers from ``cuobjdump -res-usage``; shared memory from the metadata.
No configuration below has LDL/STL or a stack; all global loads are 16 bytes (LDGSTS.E.BYPASS.128).

  arch  bucket    G    tile BMxBNxBK  warps/st  loop  MMA instr. (/MMA)        PRMT LOP3 STS  regs  smem
  sm90  M<=16    128   16x128x128     4/4       171   8 IGMMA.64x16x32  (21)     0   32    1   101  32 KB
  sm90  M<=16     32   16x128x64      4/4       191   4 IGMMA.64x16x32  (48)     0   16    4    92  20 KB
  sm90  M<=32    128   32x128x128     4/4       207   8 IGMMA.64x32x32  (26)     0   32    1   135  40 KB
  sm90  M<=64    128   64x128x128     4/4       275   8 IGMMA.64x64x32  (34)     0   32    1   210  56 KB
  sm90  M>64     128  128x128x128     8/3       242   4 IGMMA.64x128x32 (61)     0   16    0   208  64 KB
  sm90  M>64      32  128x128x64      8/3       363   2 IGMMA.64x128x32 (182)    0    8    1   254  36 KB
  sm80  M<=16    128   16x128x128     4/4       165  16 IMMA.16832      (10)     0   32    1    94  30 KB
  sm80  M<=64    128   64x128x128     4/4       336  64 IMMA.16832      (5.3)    0   32    1   220  48 KB
  sm80  M>64     128  128x128x128     8/3       338  64 IMMA.16832      (5.3)    0   32    0   228  48 KB
  sm80  M>64      32  128x128x64      8/3       537  32 IMMA.16832      (17)     0   64    0   255  32 KB

One dot per step (``ONE_DOT``) where a step spans its whole pack block (BK = PB: G = 64 and 128 at the shipped
BK) and both halves feed one partial (G >= 64; with integer scales every G): the activation tile of the step is
one contiguous [BM, BK] load and the two unpacked weight halves are concatenated along k (:func:`_cat_k`, a
relabelling of registers), so each step issues one chain of tensor-core instructions and, on cc 90, waits for
one wgmma group instead of two. Against two half-dots (G = 128): sm90 loop 200 -> 171 at M <= 16, 263 -> 242 at
M > 64 (5 STS -> 1, 2 WARPGROUP.ARRIVE/DEPBAR pairs -> 1); sm80 M > 64 519 -> 338 (129 LOP3 -> 32: ptxas no
longer unpacks the same words twice), registers 170 -> 228 (one CTA per SM either way). G = 32 with float scales
(two groups per block) and G = 256 (two steps per block) keep the two half-dots.

Designs compared (G = 128, BK = 128; measured with two half-dots per step, before ``ONE_DOT``):
* Swapped vs plain on cc 90. 16x128, 4 warps: plain cannot use wgmma at all (its M is 16 < 64) and falls
  back to mma.sync (16 IMMA, 162 instr.); swapped gets IGMMA.64x16x32. 64x128, 4 warps: swapped 302 instr.,
  5 STS, 194 regs, 64 KB vs plain 307 instr., 9 STS, 205 regs, 72 KB. 128x128, 8 warps: swapped 263 vs plain
  315 instr., 215 vs 236 regs. Swapped 128x256 spills (255 regs, 240 B stack): not shipped. => sm90: swapped.
* Swapped vs plain on cc 80 (mma.sync either way): plain 164 vs 173 instr. at 16x128, 337 vs 349 at 64x128,
  and at 128x128/8 warps swapped spills (12 LDL + 12 STL). => sm80: plain.
* Unpack, cc 90 swapped 16x128: int8 element ops (``b << 4``, ``b & 0xF0``) 390 instr., 112 PRMT, 80 LOP3;
  pure-Triton 32-bit words split by shifts + joins 278 instr., 48 PRMT; inline PTX on words (``pack=4``)
  200 instr., 0 PRMT. Tables ship ``UNPACK_ASM: true``; the interpreter (and ``UNPACK_ASM: false``) runs the 278 one.
* Note: on cc 80 Triton emits ``mma ... .satfinite`` (SASS ``IMMA...SAT``): saturation never triggers here,
  since a group partial is < 2^31 by the bound above.

Integer group scales (``INT_SCALES``; ``w_scale`` int32 [K // G + 1, N]: the q rows, then the channel scales c)
----------------------------------------------------------------------------------------------------------------
Two-level scales, as in QServe: ``w_scale[g, n] = q[g, n] * c[n]`` with q an integer in [1, 16]
(``ditq.format``). The unpack multiplies every nibble by its group's q on whole 32-bit words
(:func:`_scaled_nibbles`: the nibbles biased to ``u = w + 8``, then ``u * q + 128 - 8 q`` in each byte, which
never carries, then XOR 0x80: four int8 ``q * w`` per word in 3-4 instructions), so the int8 tiles hold q * w
(|q w| <= 128: no x16 trick here) and every dot chains into ONE int32 accumulator over all of K
(|sum| <= 128 * 128 * K < 2^31 for K <= MAX_K). No per-group partial, no int -> fp32 conversion, no fold; the
epilogue is W8A8's (``acc * (a_scale * c) + bias``), so the result is bit for bit the W8A8 kernel on the int8
weight q * w with channel scales c (tests/kernels/test_w4a8_int_scales.py), split-K partials are int32 and every
split count gives the unsplit bits. The same tile tables; the layouts of the weights are unchanged.

Measured (AOT, triton 3.8, nothing run; ``UNPACK_ASM`` on; loop = one pack block, i.e. 64 k at G <= 64, 128 k at
G = 128, 256 k at G = 256; tests/kernels/test_aot_w4a8.py):

  sm90 entry       G=32 loop (regs)   G=64          G=128         G=256        float scales, same entry
  M<=16  16x128    166 (64)           150 (66)      216 (96)      377 (100)    191 / 138 / 171 / 295
  M<=32  32x128    166 (80)           150 (80)      219 (122)     384 (122)    253 / 167 / 207 / 334
  M<=64  64x128    161 (153)          145 (130)     224 (162)     401 (162)    384 / 233 / 275 / 414
  M>64  128x128    114 (124)          105 (128)     152 (128)     259 (128)    363 / 213 / 242 / 332
                                                                               (regs 254 / 202 / 208 / 204)

So at the large-M tile (compute-bound: where the fold cost tensor-core time) the loop is 3.2x shorter at G = 32,
2x at G = 64, 1.3-1.6x at G >= 128, with 40-50% fewer registers, and no weight tile goes through shared memory
(0 STS); at M <= 32 at G >= 64 it is longer (a thread there holds only 16-32 accumulators, so the fold was cheap,
and those tiles stream weights from memory). Int8 ``tl.dot`` still waits for its wgmma every iteration (W8A8's
docstring), so the integer kernel's loop is bound the same way W8A8's is. On sm80 the 128 x 128 entry is shorter
too at G <= 128 (167 / 155 / 265 vs 537 / 252 / 338 at G = 32 / 64 / 128) but longer at G = 256 (630 vs 441): the
runtime hands the integers to the kernel where :data:`INT_SCALE_GROUPS` lists the architecture and group size
(and under the interpreter).

Split-K (:mod:`.split_k`): when the output tiles fill less than a wave of SMs, ``S`` programs per tile
(``SPLIT_K``, grid axis 1) each sum whole pack blocks -- whole groups, each rescaled by its own group scale
exactly as unsplit; for G = 32 the short tail block goes with the last split -- into an fp32 workspace, and
:func:`w4a8_reduce_kernel` adds the S partials in split order and runs the same epilogue (:func:`_epilogue`).
fp32 adds in a fixed order: deterministic, within the reference's fp32 tolerance, but not the unsplit bits.
S = 1 compiles exactly as without split-K. Measured (AOT, 128 x 128 entry, G = 128): sm90 split kernel 204
registers (208 unsplit), loop 240 (242), the same 4 IGMMA; sm80 242 (228), loop 326 (338), the same 64 IMMA,
48 KB shared; reduce 128 registers, 154-166 with gate + residual; nothing spills
(tests/kernels/test_aot_split_k.py). With integer group scales the partials are int32 (below).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import triton
import triton.language as tl

from . import checks, config_table, epilogue, quantize_act, split_k
from .interpret import check_device, interpreting, on_input_device

KERNEL_NAME = "w4a8"
# The group sizes this family runs: the launcher's check, the config picker (pack_block) and describe() all
# read this tuple, so adding a size is this one change plus its tests. Each must be a power of two >= 32
# (the int8 MMA's K: a G = 32 block holds two groups of one half-dot each).
GROUP_SIZES = (32, 64, 128, 256)
K_MULTIPLE = 32  # K is a multiple of the group, and every group a multiple of 32: K/2 bytes % 16 == 0
MAX_K = 32768  # the runtime's bound for every int8 GEMM (int32 sums; this kernel's per-group ones need less)
LAYOUT = "split_nibble_blocks"  # see pack_weight
LAYOUT_VERSION = 1
MIN_BK = 64  # two dots of K = 32 (the int8 MMA's K) per step
# Integer group scales (two-level: w = c[n] * q[g, n] * w4): the largest q. q * w must fit int8 (16 * -8 = -128),
# and _scaled_nibbles' per-byte bias 128 - 8 q must not go negative (it would borrow from the next byte): both
# hold up to q = 16 and no further. ditq.format's bound too (tested).
MAX_INT_GROUP_SCALE = 16
# Where layers hand this kernel integer group scales as integers, {compute capability x 10: group sizes} (the
# interpreter always does, to verify the path). From the SASS (top of the file): at the 128 x 128 entry, the
# compute-bound one, the integer kernel's loop is the shorter at every group size on sm90 and at G <= 128 on sm80
# (G = 256 there: 630 vs 441 instructions); at M <= 32 it is longer at G >= 64, where the tiles stream weights
# from memory anyway. The launcher itself runs either form anywhere.
INT_SCALE_GROUPS = {80: (32, 64, 128), 90: GROUP_SIZES}


def check_group_size(group_size) -> int:
    if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES} for the Triton W4A8 kernel, got {group_size!r}")
    return int(group_size)


def pack_block(group_size: int) -> int:
    """k-elements per split-nibble block: the group, but at least 64 so each half-block dot has K >= 32."""
    return max(check_group_size(group_size), 64)


# ---- layout: canonical <-> split-nibble blocks (plain torch, runs at model load) --------------------------

def _blocks(k: int, group_size: int):
    """(start, length) of each pack block along K: full blocks of PB, then one short tail (G = 32 only)."""
    pb = pack_block(group_size)
    out = [(s, pb) for s in range(0, k - k % pb, pb)]
    if k % pb:
        out.append((k - k % pb, k % pb))
    return out


def _check_canonical(qweight: torch.Tensor, group_size: int) -> int:
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise TypeError("packed int4 weights must be a uint8 [N, K // 2] tensor, got "
                        f"{getattr(qweight, 'dtype', type(qweight).__name__)} "
                        f"{tuple(getattr(qweight, 'shape', ()))}")
    k = qweight.shape[1] * 2
    pack_block(group_size)
    if not qweight.is_contiguous():
        raise ValueError("packed int4 weights must be contiguous (call .contiguous() first)")
    if k % group_size:
        raise ValueError(f"group_size {group_size} does not divide K = {k}")
    return k


def pack_weight(qweight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Canonical uint8 [N, K // 2] (byte j = k 2j low, 2j+1 high) -> this kernel's uint8 [N, K // 2]:
    in each block of ``pack_block(G)`` k (a short last block when K % PB != 0), byte j holds k = j in its low
    nibble and k = j + len/2 in its high one. A pure permutation of nibbles, so :func:`unpack_weight` inverts it."""
    k = _check_canonical(qweight, group_size)
    b = qweight.to(torch.int16)
    q = torch.stack([b & 0xF, b >> 4], dim=-1).reshape(qweight.shape[0], k)  # [N, K] nibbles, K order
    parts = []
    for start, length in _blocks(k, group_size):
        h = length // 2
        parts.append(q[:, start:start + h] | (q[:, start + h:start + length] << 4))
    return torch.cat(parts, dim=1).to(torch.uint8).contiguous()


def unpack_weight(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Exact inverse of :func:`pack_weight`: kernel layout -> canonical uint8 [N, K // 2]."""
    k = _check_canonical(w, group_size)
    b = w.to(torch.int16)
    cols = []
    for start, length in _blocks(k, group_size):
        h = length // 2
        blk = b[:, start // 2:start // 2 + h]
        cols += [blk & 0xF, (blk >> 4) & 0xF]  # k = start + [0, h), then start + h + [0, h)
    q = torch.cat(cols, dim=1)  # nibbles in K order, [N, K]
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8).contiguous()


# ---- the kernel -------------------------------------------------------------------------------------------

@triton.jit
def _dot(w, a, p, SWAP_AB: tl.constexpr):
    """p + the int32 product of a weight tile [BN, k] and an activation tile [BM, k], in the tile's orientation.
    Swapped: acc^T[BN, BM] = W @ A^T, weights first (A^T stays K-major, as 8-bit wgmma requires)."""
    if SWAP_AB:
        r = tl.dot(w, tl.trans(a), p, out_dtype=tl.int32)
    else:
        r = tl.dot(a, tl.trans(w), p, out_dtype=tl.int32)
    return r


@triton.jit
def _cat_k(lo, hi, BN: tl.constexpr, BK: tl.constexpr):
    """[BN, BK / 2] x 2 -> [BN, BK]: ``lo`` then ``hi`` along k."""
    return tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), (BN, BK))


@triton.jit
def _rescale(acc, p, s, SWAP_AB: tl.constexpr):
    """acc += float(p) * s[n]: s runs along N, the tile's rows when swapped, its columns otherwise.
    (One return per function: Triton's code generator does not end a function at a return inside an if.)"""
    if SWAP_AB:
        r = acc + p.to(tl.float32) * s[:, None]
    else:
        r = acc + p.to(tl.float32) * s[None, :]
    return r


F0 = tl.constexpr(-252645136)  # 0xF0F0F0F0 as int32: the high nibble of each of a word's four bytes
# The unpacks' inline PTX (UNPACK_ASM), as constants so that the tests run these very strings through a small
# evaluator of the instructions they use (tests/kernels/test_w4a8_int_scales.py::test_ptx_text_bit_logic).
# $0, $1: the low / high outputs; $2: a word of four packed bytes (pack=4 of uint8 for UNPACK_PTX; an int32 word
# for UNPACK_INT_PTX, whose $3, $4 / $5, $6 are the low / high nibbles' q and nibble_bias(q)).
UNPACK_PTX = tl.constexpr("{ .reg .b32 t; shl.b32 t, $2, 4; and.b32 $0, t, 0xF0F0F0F0; and.b32 $1, $2, 0xF0F0F0F0; }")
UNPACK_INT_PTX = tl.constexpr(
    "{ .reg .b32 t, h; "
    "lop3.b32 t, $2, 0x0F0F0F0F, 0x08080808, 0x6A; mad.lo.u32 t, t, $3, $4; xor.b32 $0, t, 0x80808080; "
    "shr.u32 h, $2, 4; "
    "lop3.b32 h, h, 0x0F0F0F0F, 0x08080808, 0x6A; mad.lo.u32 h, h, $5, $6; xor.b32 $1, h, 0x80808080; }")


@triton.jit
def _load_unpack(w_ptr, rn, stride_wn, byte0, HB: tl.constexpr, BN: tl.constexpr, UNPACK_ASM: tl.constexpr,
                 N_VALID: tl.constexpr = 0):
    """Load the weight bytes [BN, HB] of rows ``rn`` from byte ``byte0`` and unpack them into int8 tiles
    (16 * w_lo, 16 * w_hi): no sign extension (module docstring). Bytes at or past ``N_VALID`` (when > 0)
    read as 0 (the G = 32 tail).

    The bytes are read as 32-bit words ``x`` (rows are 16-byte aligned: K/2 % 16 == 0), because
    ``(x << 4) & 0xF0F0F0F0`` is 16 * w_lo and ``x & 0xF0F0F0F0`` is 16 * w_hi for all four bytes at once:
    the shift moves each byte's low nibble into its own high half, and what it pushes into the next byte's
    low half is masked off. (On int8 elements LLVM scalarises the 8-bit shift: 390 vs 278 main-loop
    instructions on cc 90, see the top of the file.)
    * UNPACK_ASM False, pure Triton (the interpreter's path): the words are split back into bytes with shifts and
      two ``tl.join`` s; ptxas turns that into byte permutes (PRMT).
    * UNPACK_ASM True: the same two operations in PTX, with ``pack=4`` handing the asm one 32-bit register per four
      int8 elements, so no split is needed at all. Bit logic tested against a Python emulation
      (tests/kernels/test_w4a8.py::test_unpack_asm_bit_logic); UNPROVEN ON A GPU until one runs the tests.
    """
    if UNPACK_ASM:
        offs_b = tl.max_contiguous(tl.multiple_of(tl.arange(0, HB), HB), HB)
        ptrs = w_ptr + rn[:, None] * stride_wn + (byte0 + offs_b)[None, :]
        if N_VALID > 0:
            wb = tl.load(ptrs, mask=(offs_b < N_VALID)[None, :], other=0)
        else:
            wb = tl.load(ptrs)
        lo, hi = tl.inline_asm_elementwise(
            asm=UNPACK_PTX, constraints="=r,=r,r", args=[wb], dtype=(tl.int8, tl.int8), is_pure=True, pack=4)
    else:
        x = _load_words(w_ptr, rn, stride_wn, byte0, HB, N_VALID)
        lo = _words_to_bytes((x << 4) & F0, BN, HB)
        hi = _words_to_bytes(x & F0, BN, HB)
    return lo, hi


@triton.jit
def _load_words(w_ptr, rn, stride_wn, byte0, HB: tl.constexpr, N_VALID: tl.constexpr):
    """The weight bytes [BN, HB] of rows ``rn`` from ``byte0`` as int32 words [BN, HB / 4] (rows are 16-byte
    aligned: K/2 % 16 == 0); words at or past byte ``N_VALID`` (when > 0) read as 0 (the G = 32 tail)."""
    HW: tl.constexpr = HB // 4
    offs_w = tl.max_contiguous(tl.multiple_of(tl.arange(0, HW), HW), HW)
    ptrs = w_ptr.to(tl.pointer_type(tl.int32)) + rn[:, None] * (stride_wn // 4) + (byte0 // 4 + offs_w)[None, :]
    if N_VALID > 0:
        x = tl.load(ptrs, mask=(offs_w < N_VALID // 4)[None, :], other=0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _words_to_bytes(x, BN: tl.constexpr, HB: tl.constexpr):
    """int32 [BN, HB/4] -> int8 [BN, HB], little-endian (byte i of word w is column 4w + i). join(u, v) puts
    u, v at a new last index 0, 1, so join(join(b0, b2), join(b1, b3))[.., i, j] = b(2i + j) -> flat 2i + j."""
    b0 = x.to(tl.int8)
    b1 = (x >> 8).to(tl.int8)
    b2 = (x >> 16).to(tl.int8)
    b3 = (x >> 24).to(tl.int8)
    return tl.reshape(tl.join(tl.join(b0, b2), tl.join(b1, b3)), (BN, HB))


X80 = tl.constexpr(-2139062144)  # 0x80808080 as int32: each byte's sign bit
M0F = tl.constexpr(252645135)    # 0x0F0F0F0F: the low nibble of each byte
X08 = tl.constexpr(134744072)    # 0x08080808: bit 3 of each low nibble


@triton.jit
def nibble_bias(q):
    """(128 - 8 q) in each byte of a word, for q <= 16: 0x80808080 - q * 0x08080808, no borrow between bytes since
    8 q <= 128. int32 arithmetic wraps (q = 16 gives 0), as the CUDA kernel's does."""
    return q * -X08 + X80  # tensor first: constexpr - tensor would stay a constexpr under the interpreter


@triton.jit
def _scaled_nibbles(u, q, bias):
    """Four biased nibbles ``u = w + 8`` (one per byte, in [0, 15]) times the integer group scale ``q`` in [1, 16]
    -> the int8 ``q * w`` in each byte: ``u * q + 128 - 8 q`` lies in [128 - 8 q, 128 + 7 q] within [0, 240], so
    no byte carries into the next; XOR 0x80 then subtracts the 128 back. ``q`` and ``bias`` are per row (N)."""
    return (u * q[:, None] + bias[:, None]) ^ X80


@triton.jit
def _load_unpack_int(w_ptr, rn, stride_wn, byte0, q_lo, q_hi, HB: tl.constexpr, BN: tl.constexpr,
                     UNPACK_ASM: tl.constexpr, N_VALID: tl.constexpr = 0):
    """The integer-scale twin of :func:`_load_unpack`: the weight bytes [BN, HB] of rows ``rn`` from ``byte0`` as
    two int8 tiles ``q_lo * w_lo`` and ``q_hi * w_hi`` (``q_*`` int32 [BN], the low and the high nibbles' group
    scales; no x16 here: ``16 q w`` would not fit int8). Read as 32-bit words; a nibble ``n`` is biased to
    ``u = n ^ 8 = w + 8`` (two's complement, 4 bits), then :func:`_scaled_nibbles`. Bytes at or past ``N_VALID``
    (when > 0) read as 0 (the G = 32 tail), so unpack to 0.
    * UNPACK_ASM False, pure Triton (the interpreter's path): ptxas gives each 4-weight word of low nibbles
      LOP3 (& 0x0F0F0F0F), LOP3 (^ 0x08080808), IMAD, LOP3 (^ 0x80808080), one SHF more for the high nibbles:
      a LOP3 takes one immediate, and ptxas does not keep the second constant in a register to fuse the two.
    * UNPACK_ASM True: the same arithmetic in PTX with ``lop3.b32`` naming both constants and the function
      ``(a & b) ^ c`` (LUT 0x6A), so ptxas keeps one constant in a register: 3 instructions per low word, 4 per
      high word (sm90, 16 x 128 entry at G = 128, two half-dots per step: loop 257 pure Triton, 226 with the PTX).
      On whole int32 words with ``pack=1``, so no assumption on how Triton packs elements into registers. The PTX
      text is run by the tests' evaluator against :func:`scaled_nibbles_emulated`; UNPROVEN ON A GPU until one
      runs the tests."""
    x = _load_words(w_ptr, rn, stride_wn, byte0, HB, N_VALID)
    if UNPACK_ASM:
        zeros = tl.zeros_like(x)  # the per-row scales broadcast to the word tile: inline asm takes equal shapes
        lo, hi = tl.inline_asm_elementwise(
            asm=UNPACK_INT_PTX, constraints="=r,=r,r,r,r,r,r",
            args=[x, zeros + q_lo[:, None], zeros + nibble_bias(q_lo)[:, None],
                  zeros + q_hi[:, None], zeros + nibble_bias(q_hi)[:, None]],
            dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
    else:
        lo = _scaled_nibbles((x & M0F) ^ X08, q_lo, nibble_bias(q_lo))
        hi = _scaled_nibbles(((x >> 4) & M0F) ^ X08, q_hi, nibble_bias(q_hi))
    return _words_to_bytes(lo, BN, HB), _words_to_bytes(hi, BN, HB)


def scaled_nibbles_emulated(words, q):
    """Python emulation, bit for bit, of :func:`_load_unpack_int`'s word arithmetic on uint32 words with one
    group scale ``q``: returns (lo, hi) words of int8 ``q * w`` bytes (tests check it against the definition)."""
    bias = (0x80808080 - q * 0x08080808) & 0xFFFFFFFF

    def scaled(u):
        return ((u * q + bias) & 0xFFFFFFFF) ^ 0x80808080

    words = [w & 0xFFFFFFFF for w in words]
    return ([scaled((w & 0x0F0F0F0F) ^ 0x08080808) for w in words],
            [scaled(((w >> 4) & 0x0F0F0F0F) ^ 0x08080808) for w in words])


def unpack_words_emulated(words):
    """Python emulation, bit for bit, of the PTX in :func:`_load_unpack` (UNPACK_ASM True) on uint32 words:
    returns (lo, hi) words. Used by the tests to check the asm's bit logic without a GPU."""
    words = [w & 0xFFFFFFFF for w in words]
    return ([((w << 4) & 0xFFFFFFFF) & 0xF0F0F0F0 for w in words], [w & 0xF0F0F0F0 for w in words])


@triton.jit
def w4a8_kernel(a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr, M, N, K,
                stride_am, stride_wn, stride_sg, stride_om, gate_ptr, res_ptr, out_scale_ptr, rows_per_gate,
                w_chan_ptr, PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP: tl.constexpr, PB: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                SWAP_AB: tl.constexpr, UNPACK_ASM: tl.constexpr, INTERPRET: tl.constexpr,
                HAS_GELU: tl.constexpr = False, HAS_GATE: tl.constexpr = False,
                HAS_RESIDUAL: tl.constexpr = False, QUANT_OUT: tl.constexpr = False, A_FLOAT: tl.constexpr = False,
                SPLIT_K: tl.constexpr = False, INT_SCALES: tl.constexpr = False):
    # Arguments in the launcher's (the runtime op's) order, as in w8a8_kernel; then the strides, the fused
    # epilogue's arguments (epilogue.store_tile; compiled out while its flags are off) and GROUP.
    # INT_SCALES: integer group scales. w_scale_ptr points to int32 q [K / G, N] in [1, 16] and w_chan_ptr to the
    # channel scales c float32 [N] (the weight is c[n] * q[g, n] * w[n, k]). The unpack writes q * w into the
    # int8 tiles (_load_unpack_int), so the whole K sums into ONE int32 accumulator, exactly as W8A8 on the
    # weight q * w: no per-group partial, no int -> float conversion, no fold in the loop; the epilogue is
    # W8A8's (acc * (a_scale * c) + bias). Split-K partials are then int32 too, so every split count gives the
    # unsplit bits. Off, nothing of it is compiled (w_chan_ptr is unused).
    # A_FLOAT: a_ptr points to float A with a static a_scale; every A tile is quantized in registers exactly as
    # quantize_act does before its dot (as in w8a8_kernel; compiled out when off).
    # SPLIT_K (split_k.py): grid axis 1 is the split; this program sums only its split's pack blocks (whole
    # groups, each scaled by its own group scale as unsplit) and stores the raw fp32 tile to out_ptr, the
    # workspace [S, M, N]; w4a8_reduce_kernel adds the splits in order and runs the epilogue. Off, nothing of
    # it is compiled.
    HB: tl.constexpr = BK // 2        # bytes of one row per step = k per half-dot
    HALF: tl.constexpr = PB // 2      # k distance between the low and the high nibble of a byte
    STEPS: tl.constexpr = PB // BK    # steps per pack block (static: unrolled)
    CHAIN: tl.constexpr = GROUP >= 64  # both nibbles of a byte in one group (G = 32: groups 2b, 2b+1)

    # grouped launch order (Triton matmul tutorial): GROUP_M row-tiles share each weight tile in L2
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BM)
    n_n = tl.cdiv(N, BN)
    per_group = GROUP_M * n_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    rm = offs_m % M  # clamped rows/columns: loads need no mask, the store drops them
    rn = offs_n % N
    offs_b = tl.max_contiguous(tl.multiple_of(tl.arange(0, HB), HB), HB)
    offs_k = tl.max_contiguous(tl.multiple_of(tl.arange(0, BK), BK), BK)
    a_rows = a_ptr + rm[:, None] * stride_am
    # One dot per step where the low and high nibbles of the step's bytes hold one contiguous k range (a step
    # spans its whole pack block: HALF == HB) and sum into one partial: the weight halves are concatenated
    # along k (:func:`_cat_k`) against one activation tile, so the loop waits for one wgmma chain, not two.
    ONE_DOT: tl.constexpr = (STEPS == 1) and (CHAIN or INT_SCALES)

    if SWAP_AB:
        acc = tl.zeros((BN, BM), dtype=tl.float32)
        zero = tl.zeros((BN, BM), dtype=tl.int32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        zero = tl.zeros((BM, BN), dtype=tl.int32)
    p = zero  # INT_SCALES: the one int32 accumulator of the whole K (acc stays unused)
    if A_FLOAT:
        inv = quantize_act.inverse_scale(tl.load(a_scale_ptr))  # the static scale, read once, outside the loop

    n_blocks = K // PB
    if SPLIT_K:  # k units = pack blocks, the G = 32 tail block (K % PB != 0) the last one
        blk_lo, blk_hi = split_k.k_range(tl.cdiv(K, PB), tl.num_programs(1))
        blk_end = tl.minimum(blk_hi, n_blocks)
    else:
        blk_lo = 0
        blk_end = n_blocks
    for blk in range(blk_lo, blk_end):
        if INT_SCALES:  # this block's group scales: one group (G >= 64), or groups 2 blk and 2 blk + 1 (G = 32)
            if CHAIN:
                q_lo = tl.load(w_scale_ptr + blk * stride_sg + rn)
                q_hi = q_lo
            else:
                q_lo = tl.load(w_scale_ptr + (2 * blk) * stride_sg + rn)
                q_hi = tl.load(w_scale_ptr + (2 * blk + 1) * stride_sg + rn)
        elif CHAIN:  # one group per block: a fresh int32 partial
            p = zero
        for st in tl.static_range(STEPS):
            k_lo = blk * PB + st * HB  # first k of this step's low nibbles; bytes start at k_lo - blk*HALF
            if ONE_DOT:  # the step's low and high nibbles cover one contiguous k range [k_lo, k_lo + BK)
                if A_FLOAT:
                    a = tl.load(a_rows + (k_lo + offs_k)[None, :]).to(tl.float32)
                    a = quantize_act.quantize_scaled(a, inv, INTERPRET)
                else:
                    a = tl.load(a_rows + (k_lo + offs_k)[None, :])
            elif A_FLOAT:
                a_lo = tl.load(a_rows + (k_lo + offs_b)[None, :]).to(tl.float32)
                a_hi = tl.load(a_rows + (k_lo + HALF + offs_b)[None, :]).to(tl.float32)
                a_lo = quantize_act.quantize_scaled(a_lo, inv, INTERPRET)
                a_hi = quantize_act.quantize_scaled(a_hi, inv, INTERPRET)
            else:
                a_lo = tl.load(a_rows + (k_lo + offs_b)[None, :])
                a_hi = tl.load(a_rows + (k_lo + HALF + offs_b)[None, :])
            if INT_SCALES:  # q * w in the tiles: every dot chains into the one int32 sum
                w_lo, w_hi = _load_unpack_int(w_ptr, rn, stride_wn, blk * HALF + st * HB, q_lo, q_hi, HB, BN,
                                              UNPACK_ASM)
            else:
                w_lo, w_hi = _load_unpack(w_ptr, rn, stride_wn, blk * HALF + st * HB, HB, BN, UNPACK_ASM)
            if ONE_DOT:
                p = _dot(_cat_k(w_lo, w_hi, BN, BK), a, p, SWAP_AB)
            elif CHAIN or INT_SCALES:  # both halves in this block's int32 partial (INT_SCALES: in the one sum)
                p = _dot(w_hi, a_hi, _dot(w_lo, a_lo, p, SWAP_AB), SWAP_AB)
            else:  # G = 32: low nibbles are group 2*blk, high nibbles group 2*blk + 1, in this order
                p_lo = _dot(w_lo, a_lo, zero, SWAP_AB)
                p_hi = _dot(w_hi, a_hi, zero, SWAP_AB)
                s_lo = tl.load(w_scale_ptr + (2 * blk) * stride_sg + rn)
                s_hi = tl.load(w_scale_ptr + (2 * blk + 1) * stride_sg + rn)
                acc = _rescale(acc, p_lo, s_lo, SWAP_AB)
                acc = _rescale(acc, p_hi, s_hi, SWAP_AB)
        if CHAIN and not INT_SCALES:
            acc = _rescale(acc, p, tl.load(w_scale_ptr + blk * stride_sg + rn), SWAP_AB)

    if GROUP == 32:
        has_tail = K % PB != 0
        if SPLIT_K:  # the tail block belongs to the split whose units reach the end
            has_tail = has_tail & (blk_hi > n_blocks)
        if has_tail:  # odd number of groups: the last 32 k are a short block (k = j and j + 16)
            k0 = n_blocks * PB
            valid = offs_b < 16
            if A_FLOAT:  # other=0.0 quantizes to 0, as the int8 path's other=0
                a_lo = tl.load(a_rows + (k0 + offs_b)[None, :], mask=valid[None, :], other=0.0).to(tl.float32)
                a_hi = tl.load(a_rows + (k0 + 16 + offs_b)[None, :], mask=valid[None, :], other=0.0).to(tl.float32)
                a_lo = quantize_act.quantize_scaled(a_lo, inv, INTERPRET)
                a_hi = quantize_act.quantize_scaled(a_hi, inv, INTERPRET)
            else:
                a_lo = tl.load(a_rows + (k0 + offs_b)[None, :], mask=valid[None, :], other=0)
                a_hi = tl.load(a_rows + (k0 + 16 + offs_b)[None, :], mask=valid[None, :], other=0)
            if INT_SCALES:  # the last group, K / 32 - 1
                q_t = tl.load(w_scale_ptr + (2 * n_blocks) * stride_sg + rn)
                w_lo, w_hi = _load_unpack_int(w_ptr, rn, stride_wn, n_blocks * HALF, q_t, q_t, HB, BN, UNPACK_ASM,
                                              16)
                p = _dot(w_hi, a_hi, _dot(w_lo, a_lo, p, SWAP_AB), SWAP_AB)
            else:
                w_lo, w_hi = _load_unpack(w_ptr, rn, stride_wn, n_blocks * HALF, HB, BN, UNPACK_ASM, 16)
                p = _dot(w_hi, a_hi, _dot(w_lo, a_lo, zero, SWAP_AB), SWAP_AB)  # one group: one partial
                acc = _rescale(acc, p, tl.load(w_scale_ptr + (2 * n_blocks) * stride_sg + rn), SWAP_AB)

    if INT_SCALES:
        acc = p  # int32: split partials stay exact, and the epilogue scales it as W8A8's does
    if SPLIT_K:
        split_k.store_partial(acc, out_ptr, offs_m, offs_n, M, N, SWAP_AB)
    else:
        _epilogue(acc, offs_m, offs_n, rm, rn, a_scale_ptr, bias_ptr, out_ptr, M, N, stride_om, gate_ptr, res_ptr,
                  out_scale_ptr, rows_per_gate, w_chan_ptr, PER_TOKEN, HAS_BIAS, SWAP_AB, INTERPRET, HAS_GELU,
                  HAS_GATE, HAS_RESIDUAL, QUANT_OUT, INT_SCALES)


@triton.jit
def _epilogue(acc, offs_m, offs_n, rm, rn, a_scale_ptr, bias_ptr, out_ptr, M, N, stride_om, gate_ptr, res_ptr,
              out_scale_ptr, rows_per_gate, w_chan_ptr, PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr,
              SWAP_AB: tl.constexpr, INTERPRET: tl.constexpr, HAS_GELU: tl.constexpr, HAS_GATE: tl.constexpr,
              HAS_RESIDUAL: tl.constexpr, QUANT_OUT: tl.constexpr, INT_SCALES: tl.constexpr = False):
    """The tile ``acc`` (the whole K sum) scaled, biased, through the fused pieces and stored: the end of the
    unsplit kernel and of the split-K reduce, one code path. Float scales: ``acc`` is fp32, 16x the reference's.
    INT_SCALES: ``acc`` is the int32 sum of a * (q * w), scaled as W8A8's epilogue scales its own (the same
    expression, so the same bits as w8a8 on the weight q * w with channel scales ``w_chan_ptr``). ``rm`` / ``rn``:
    the rows and columns clamped into range (``% M``, ``% N``), for unmasked loads."""
    # Float scales: acc is exactly 16x the reference's accumulator; fold the 1/16 into the activation scale.
    # Compiled, acc * a_s and + bias contract into one fma (as in w8a8's epilogue); interpreted, two roundings.
    if PER_TOKEN:
        a_s = tl.load(a_scale_ptr + rm)
    else:
        a_s = tl.load(a_scale_ptr + offs_m * 0)  # the static scale as a [BM] vector, as per token
    if INT_SCALES:
        c = tl.load(w_chan_ptr + rn)
        if SWAP_AB:
            y = acc.to(tl.float32) * (a_s[None, :] * c[:, None])
        else:
            y = acc.to(tl.float32) * (a_s[:, None] * c[None, :])
    else:
        a_s = a_s * 0.0625
        if SWAP_AB:
            y = acc * a_s[None, :]
        else:
            y = acc * a_s[:, None]
    if HAS_BIAS:
        b = tl.load(bias_ptr + rn).to(tl.float32)
        if SWAP_AB:
            y = y + b[:, None]
        else:
            y = y + b[None, :]
    # the fused pieces (none for the plain GEMM: then a rounding cast -- the interpreter would truncate to
    # bf16 -- and a masked store) and the store, shared with the W8A8 kernel
    epilogue.store_tile(y, offs_m, offs_n, M, N, out_ptr, stride_om, gate_ptr, res_ptr, out_scale_ptr,
                        rows_per_gate, HAS_GELU, HAS_GATE, HAS_RESIDUAL, QUANT_OUT, SWAP_AB, INTERPRET)


@triton.jit
def w4a8_reduce_kernel(ws_ptr, S, a_scale_ptr, bias_ptr, out_ptr, M, N, stride_om,
                       gate_ptr, res_ptr, out_scale_ptr, rows_per_gate, w_chan_ptr,
                       PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                       SWAP_AB: tl.constexpr, INTERPRET: tl.constexpr,
                       HAS_GELU: tl.constexpr = False, HAS_GATE: tl.constexpr = False,
                       HAS_RESIDUAL: tl.constexpr = False, QUANT_OUT: tl.constexpr = False,
                       INT_SCALES: tl.constexpr = False):
    """Split-K's second launch: one program per output tile adds the S partials of the workspace [S, M, N] in
    split order (fp32: deterministic; int32 with INT_SCALES: exact, the unsplit bits) and runs the same
    epilogue."""
    pid = tl.program_id(0)
    n_n = tl.cdiv(N, BN)
    offs_m = (pid // n_n) * BM + tl.arange(0, BM)
    offs_n = (pid % n_n) * BN + tl.arange(0, BN)
    acc = split_k.load_sum(ws_ptr, S, offs_m, offs_n, M, N, SWAP_AB)
    _epilogue(acc, offs_m, offs_n, offs_m % M, offs_n % N, a_scale_ptr, bias_ptr, out_ptr, M, N, stride_om, gate_ptr,
              res_ptr, out_scale_ptr, rows_per_gate, w_chan_ptr, PER_TOKEN, HAS_BIAS, SWAP_AB, INTERPRET, HAS_GELU,
              HAS_GATE, HAS_RESIDUAL, QUANT_OUT, INT_SCALES)


# ---- configuration and launcher ---------------------------------------------------------------------------

# Keys of a tile table entry (configs/w4a8_<arch>.json): tiles BM x BN (M and N extents, whatever SWAP_AB
# does), BK = k per step (two half-dots of BK/2), GROUP_M (launch grouping), SWAP_AB (weights as the dot's
# first operand), UNPACK_ASM (unpack with inline PTX; the interpreter always runs the pure-Triton twin),
# num_warps, num_stages. Optional: max_splits (the bucket's cap on the automatic split-K count, split_k.py);
# by_group ({"256": {"BN": 64}}: keys that replace the entry's at that group size, where a bigger pack block
# would spill: sm80 128x128 at G = 256 took 255 registers and 2 spill instructions, BN = 64 takes 163 and none).
CONFIG_KEYS = ("BM", "BN", "BK", "GROUP_M", "SWAP_AB", "UNPACK_ASM", "num_warps", "num_stages")


def kernel_config(m: int, device, group_size: int) -> Dict:
    """The tile table entry for this M on this device (``configs/w4a8_<arch>.json``), fitted to the group."""
    table = config_table.load_table(KERNEL_NAME, config_table.arch_for_device(device))
    return fit_config(config_table.params(config_table.pick(table, m)), group_size)


def fit_config(cfg: Dict, group_size: int) -> Dict:
    """A step never spans two pack blocks: BK = min(BK, PB) (PB = max(G, 64) is a power of two, so it divides)."""
    pb = pack_block(group_size)
    cfg = checks.config_keys(KERNEL_NAME, cfg, CONFIG_KEYS)
    cfg.update(cfg.pop("by_group", {}).get(str(group_size), {}))
    bk = cfg["BK"]
    if not isinstance(bk, int) or bk < MIN_BK or bk & (bk - 1):
        raise ValueError(f"w4a8 BK must be a power of two >= {MIN_BK}, got {bk!r}")
    cfg["BK"] = min(bk, pb)
    if "max_splits" in cfg:  # optional: the bucket's cap on the automatic split-K count (split_k.py)
        split_k.check_max_splits(cfg["max_splits"], "w4a8 max_splits")
    return cfg


def split_shape(cfg: Dict, m: int, n: int, k: int, group_size: int):
    """(output tiles, k units) of a launch with tile entry ``cfg``: what the split count is chosen from. A k
    unit is one pack block (``pack_block(G)`` k, whole groups; for G = 32 the short tail block counts as one),
    so a group never straddles two splits."""
    return triton.cdiv(m, cfg["BM"]) * triton.cdiv(n, cfg["BN"]), triton.cdiv(k, pack_block(group_size))


def auto_split_count(cfg: Dict, m: int, n: int, k: int, group_size: int, sm_count: int) -> int:
    """The split-K count the launcher picks for this shape, tile and group size on ``sm_count`` SMs."""
    return split_k.auto_splits(*split_shape(cfg, m, n, k, group_size), sm_count, cfg.get("max_splits"))


def describe() -> Dict:
    """What this kernel family takes, from the constants and tables the launcher itself reads."""
    archs = config_table.table_archs(KERNEL_NAME)
    return {"weight_bits": 4, "group_sizes": list(GROUP_SIZES), "k_multiple": K_MULTIPLE, "max_k": MAX_K,
            "layout": LAYOUT, "layout_version": LAYOUT_VERSION, "archs": config_table.gpu_ccs(archs),
            "interpreter": "interpreter" in archs, "max_int_group_scale": MAX_INT_GROUP_SCALE,
            "int_scale_groups": {cc: list(gs) for cc, gs in INT_SCALE_GROUPS.items()}}


def _check_gemm(a, a_scale, w, w_scale, bias, group_size, out_dtype, a_dtypes=(torch.int8,)):
    """The GEMM's own arguments; returns (M, N, K). The fused GEMM also takes a float ``a`` (``a_dtypes``).
    ``w_scale``: float32 [K // G, N], or integer group scales, int32 [K // G + 1, N] (:func:`split_int_scales`)."""
    pack_block(group_size)
    checks.tensor("a", a, a_dtypes, dim=2)
    m, k = a.shape
    if k % group_size:
        raise ValueError(f"group_size {group_size} does not divide K = {k}")
    checks.k_dim(k, K_MULTIPLE, MAX_K, "rows of packed weights must be 16-byte aligned")
    groups = k // group_size
    if isinstance(w_scale, torch.Tensor) and w_scale.dtype == torch.int32:
        if w_scale.dim() != 2 or w_scale.shape[0] != groups + 1:
            raise ValueError(f"int32 w_scale (integer group scales) must be [K // group_size + 1, N] = "
                             f"[{groups + 1}, N]: q rows, then the channel scales' float32 bits; got shape "
                             f"{tuple(w_scale.shape)}")
        checks.tensor("w_scale", w_scale, (torch.int32,), dim=2)
        _check_int_scales(w_scale, groups)
    else:  # float32 (int32 named too: the dtype error says what else it takes)
        if isinstance(w_scale, torch.Tensor) and w_scale.dtype != torch.float32:
            checks.tensor("w_scale", w_scale, (torch.float32, torch.int32))
        if isinstance(w_scale, torch.Tensor) and (w_scale.dim() != 2 or w_scale.shape[0] != groups):
            raise ValueError(f"w_scale must be [K // group_size, N] = [{groups}, N] float32 (group-major), "
                             f"got shape {tuple(w_scale.shape)}")
        checks.tensor("w_scale", w_scale, (torch.float32,), dim=2)
    n = w_scale.shape[1]
    # w's shape is checked against a and w_scale, never trusted: a misshaped weight would be read silently
    checks.tensor("w", w, (torch.uint8,), shape=(n, k // 2), labels=("N", "K / 2"))
    checks.tensor("a_scale", a_scale, (torch.float32,), dim=1)
    if a_scale.numel() not in (1, m):
        raise ValueError(f"a_scale must be float32 [1] or [M] = [{m}], got {tuple(a_scale.shape)}")
    if bias is not None:
        checks.tensor("bias", bias, checks.FLOAT_DTYPES, shape=(n,), labels=("N",))
    checks.out_dtype(out_dtype)
    checks.static_scale_for_float_a(a, a_scale)
    return m, n, k


def split_int_scales(w_scale: torch.Tensor):
    """Integer group scales as the launcher takes them, int32 [K // G + 1, N] (the q rows, then the channel scales'
    float32 bits: ``ditq.format.int_scales_to_kernel`` makes them) -> (q int32 [K // G, N], c float32
    [N]), views."""
    return w_scale[:-1], w_scale[-1].view(torch.float32)


def _check_int_scales(w_scale: torch.Tensor, groups: int) -> None:
    """q in range and c finite and positive, on CPU tensors (a GPU would pay a synchronization: there the values
    are the caller's contract, as float scales' are, and the CUDA binding checks the same way)."""
    if not w_scale.is_contiguous():
        raise ValueError("int32 w_scale (integer group scales) must be contiguous")
    if w_scale.device.type != "cpu" or w_scale.numel() == 0:
        return
    q, c = split_int_scales(w_scale)
    if groups and not bool(((q >= 1) & (q <= MAX_INT_GROUP_SCALE)).all()):
        raise ValueError(f"integer group scales q must lie in [1, {MAX_INT_GROUP_SCALE}] (q * w must fit int8), "
                         f"got [{int(q.min())}, {int(q.max())}]")
    if not bool((torch.isfinite(c) & (c > 0)).all()):
        raise ValueError("the channel scales of integer group scales (w_scale's last row, float32 bits) must be "
                         "finite and positive")


@on_input_device
def gemm_w4a8(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
              bias: Optional[torch.Tensor], group_size: int, out_dtype: torch.dtype,
              out: Optional[torch.Tensor] = None, config: Optional[Dict] = None,
              splits: Optional[int] = None) -> torch.Tensor:
    """``y = a_scale * sum_g w_scale[g] * (a @ w_g^T) + bias`` with ``w`` from :func:`pack_weight`.

    a int8 [M, K], a_scale float32 [1] or [M], w uint8 [N, K // 2] (this kernel's layout, 16-byte aligned),
    w_scale float32 [K // G, N] or, for integer group scales, int32 [K // G + 1, N] (:func:`split_int_scales`:
    the kernel then applies q while unpacking and sums the whole K in int32, ``INT_SCALES``), bias float16 /
    bfloat16 / float32 [N] or None; all contiguous, on one device;
    G in :data:`GROUP_SIZES`, K a multiple of G and at most :data:`MAX_K`. Anything else raises ValueError /
    TypeError. ``out``: optional [M, N] tensor of ``out_dtype`` to write (row stride free, unit column
    stride). ``config``: optional table entry overriding the tile table (tests, benchmarks). ``splits``: the
    split-K count, None = automatic (``split_k.auto_splits``, at most the entry's optional ``max_splits``), or
    forced in [1, cdiv(K, pack_block(G))] (tests, benchmarks); splits add fp32 partials in a fixed order, so a
    count always gives the same bits."""
    m, n, k = _check_gemm(a, a_scale, w, w_scale, bias, group_size, out_dtype)
    checks.same_device("a", a, a_scale=a_scale, w=w, w_scale=w_scale, bias=bias, out=out)
    check_device(a)
    if w.data_ptr() % 16:  # the unpack reads 32-bit words and the GPU path 16-byte vectors of each row
        raise ValueError("w must start 16-byte aligned (a fresh tensor or a row slice of one is)")
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    elif (not isinstance(out, torch.Tensor) or out.shape != (m, n) or out.dtype != out_dtype
          or out.stride(1) != 1 or out.stride(0) < n):
        raise ValueError(f"w4a8: out must be [M, N] = [{m}, {n}] {out_dtype} on {a.device} with unit column "
                         f"stride, got {tuple(out.shape)} {out.dtype} strides {out.stride()}")
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.copy_(torch.zeros_like(out) if bias is None else bias.to(out_dtype).expand(m, n))
    return _launch(a, a_scale, w, w_scale, bias, group_size, out, m, n, k, config, splits)


@on_input_device
def gemm_w4a8_fused(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                    bias: Optional[torch.Tensor], group_size: int, gelu: bool, gate: Optional[torch.Tensor],
                    residual: Optional[torch.Tensor], rows_per_gate: int, out_scale: Optional[torch.Tensor],
                    out_dtype: torch.dtype, out: Optional[torch.Tensor] = None,
                    config: Optional[Dict] = None, splits: Optional[int] = None) -> torch.Tensor:
    """:func:`gemm_w4a8` with the fused epilogue of :mod:`.epilogue` (the contract of
    ``ditq.quant.reference.gemm_epilogue``): ``gelu``, ``gate`` [M // rows_per_gate, N], ``residual`` [M, N]
    of ``out_dtype``, and ``out_scale`` float32 [1] for an int8 output (``out_dtype`` then names only the
    residual's dtype). ``a`` may also be float16 / bfloat16 / float32 with a static ``a_scale`` [1]: the kernel
    then quantizes it as it loads it, exactly as ``quantize_act`` (``A_FLOAT``). ``out``: optional contiguous
    [M, N] tensor to write. ``splits`` as in :func:`gemm_w4a8` (the epilogue runs once, on the whole sum). Bad
    input raises ValueError / TypeError."""
    m, n, k = _check_gemm(a, a_scale, w, w_scale, bias, group_size, out_dtype, checks.FUSED_A_DTYPES)
    epilogue.check_args(a.device, m, n, gelu, gate, residual, rows_per_gate, out_scale, out_dtype)
    checks.same_device("a", a, a_scale=a_scale, w=w, w_scale=w_scale, bias=bias, out=out)
    check_device(a)
    if w.data_ptr() % 16:
        raise ValueError("w must start 16-byte aligned (a fresh tensor or a row slice of one is)")
    out = epilogue.out_tensor(out, m, n, out_dtype, out_scale, a.device)
    if m == 0 or n == 0:
        return out
    # K = 0 runs the kernel too: no pack block, so the epilogue sees acc = 0
    return _launch(a, a_scale, w, w_scale, bias, group_size, out, m, n, k, config, splits, gelu, gate, residual,
                   rows_per_gate, out_scale)


def _launch(a, a_scale, w, w_scale, bias, group_size, out, m, n, k, config, splits=None, gelu=False, gate=None,
            residual=None, rows_per_gate=1, out_scale=None):
    cfg = fit_config(config, group_size) if config is not None else kernel_config(m, a.device, group_size)
    tiles, units = split_shape(cfg, m, n, k, group_size)
    s = split_k.resolve(splits, tiles, units, m * n, a.device, KERNEL_NAME, cfg.get("max_splits"))
    int_scales = w_scale.dtype == torch.int32
    chan = split_int_scales(w_scale)[1] if int_scales else w_scale  # w_scale: a placeholder, never read
    unused = w_scale  # a valid pointer for the arguments a constexpr flag switches off
    per_token = a_scale.numel() == m and m > 1  # M = 1: a [1] scale reads the same either way
    if s > 1:
        # the split launch stores raw partials (fp32; int32 with integer scales) with no epilogue (its flags
        # off, one compiled variant per tile), the reduce launch adds them in split order and runs the epilogue
        ws = split_k.workspace(s, m, n, torch.int32 if int_scales else torch.float32, a.device)
        w4a8_kernel[(tiles, s)](
            a, a_scale, w, w_scale, unused, ws, m, n, k, a.stride(0), w.stride(0), w_scale.stride(0), n,
            unused, unused, unused, 1, chan, PER_TOKEN=False, HAS_BIAS=False, GROUP=group_size,
            PB=pack_block(group_size), BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], GROUP_M=cfg["GROUP_M"],
            SWAP_AB=bool(cfg["SWAP_AB"]), UNPACK_ASM=bool(cfg["UNPACK_ASM"]) and not interpreting(),
            INTERPRET=interpreting(), A_FLOAT=a.dtype != torch.int8, SPLIT_K=True, INT_SCALES=int_scales,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        w4a8_reduce_kernel[(tiles,)](
            ws, s, a_scale, bias if bias is not None else unused, out, m, n, out.stride(0),
            gate if gate is not None else unused, residual if residual is not None else unused,
            out_scale if out_scale is not None else unused, rows_per_gate, chan, PER_TOKEN=per_token,
            HAS_BIAS=bias is not None, BM=cfg["BM"], BN=cfg["BN"], SWAP_AB=bool(cfg["SWAP_AB"]),
            INTERPRET=interpreting(), HAS_GELU=gelu, HAS_GATE=gate is not None, HAS_RESIDUAL=residual is not None,
            QUANT_OUT=out_scale is not None, INT_SCALES=int_scales, num_warps=cfg["num_warps"])
        return out
    grid = (tiles,)
    w4a8_kernel[grid](
        a, a_scale, w, w_scale, bias if bias is not None else unused, out, m, n, k,
        a.stride(0), w.stride(0), w_scale.stride(0), out.stride(0),
        gate if gate is not None else unused, residual if residual is not None else unused,
        out_scale if out_scale is not None else unused, rows_per_gate, chan,
        PER_TOKEN=per_token, HAS_BIAS=bias is not None, GROUP=group_size,
        PB=pack_block(group_size),
        BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], GROUP_M=cfg["GROUP_M"], SWAP_AB=bool(cfg["SWAP_AB"]),
        UNPACK_ASM=bool(cfg["UNPACK_ASM"]) and not interpreting(),  # no inline asm in the interpreter
        INTERPRET=interpreting(), HAS_GELU=gelu, HAS_GATE=gate is not None, HAS_RESIDUAL=residual is not None,
        QUANT_OUT=out_scale is not None, A_FLOAT=a.dtype != torch.int8, INT_SCALES=int_scales,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def aot_job(config: Dict, cc: int, *, group_size: int, out_dtype: str = "bf16", per_token: bool = True,
            bias: bool = True, aligned: bool = True, fused: str = "", a_float: str = "", split: bool = False,
            int_scales: bool = False) -> Dict:
    """Arguments of ``aot.compile_kernel`` for one table entry at group size ``group_size``, as the launcher
    would run it on a GPU of compute capability ``cc``: BK fitted to the group, and the alignment the launcher
    guarantees, pointers, K, N and every stride divisible by 16 (K % 32 == 0), M not (``aligned=False``
    drops those hints). ``fused``: the epilogue's pieces, "+"-separated names from ``epilogue.PIECES``
    (e.g. ``"gate+residual"``; "" = the plain GEMM), with a bf16 gate and a residual of the output dtype.
    ``a_float`` (e.g. ``"bf16"``): a float A of that type, quantized on load (``A_FLOAT``) with its static
    scale (a float A never has per-token scales). ``split``: the split-K launch (``SPLIT_K``: fp32 partials
    to the workspace, no epilogue, so no ``fused``; its reduce is :func:`reduce_aot_job`). ``int_scales``: integer
    group scales (``INT_SCALES``: int32 q, a float32 channel scale, int32 split partials)."""
    cfg = fit_config(config, group_size)
    if split and fused:
        raise ValueError("the split-K launch has no epilogue: its pieces belong to reduce_aot_job")
    flags = epilogue.flags(fused)
    out = ("*i32" if int_scales else "*fp32") if split else "*i8" if flags["QUANT_OUT"] else "*" + out_dtype
    ptr = {"a_ptr": f"*{a_float or 'i8'}", "a_scale_ptr": "*fp32", "w_ptr": "*u8",
           "w_scale_ptr": "*i32" if int_scales else "*fp32", "bias_ptr": "*fp32", "out_ptr": out}
    ints = ("M", "N", "K", "stride_am", "stride_wn", "stride_sg", "stride_om")
    fused_args = {"gate_ptr": "*bf16", "res_ptr": "*" + out_dtype, "out_scale_ptr": "*fp32", "rows_per_gate": "i32",
                  "w_chan_ptr": "*fp32"}
    constexprs = {"PER_TOKEN": per_token and not a_float and not split, "HAS_BIAS": bias and not split,
                  "GROUP": group_size, "PB": pack_block(group_size),
                  "BM": cfg["BM"], "BN": cfg["BN"], "BK": cfg["BK"], "GROUP_M": cfg["GROUP_M"],
                  "SWAP_AB": bool(cfg["SWAP_AB"]), "UNPACK_ASM": bool(cfg["UNPACK_ASM"]), "INTERPRET": False,
                  "A_FLOAT": bool(a_float), **flags}
    constexprs["SPLIT_K"] = split  # AOT compiles take every constexpr, defaults included
    constexprs["INT_SCALES"] = int_scales
    # w_chan_ptr: the last row of the int32 scales, 16-byte aligned only when N % 4 == 0, so never hinted
    hints = [n for n in (*ptr, *ints, "gate_ptr", "res_ptr", "out_scale_ptr") if n != "M"]
    return dict(fn=w4a8_kernel, signature={**ptr, **{n: "i32" for n in ints}, **fused_args}, constexprs=constexprs,
                cc=cc, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], aligned=hints if aligned else [])


def reduce_aot_job(config: Dict, cc: int, *, group_size: int, out_dtype: str = "bf16", per_token: bool = True,
                   bias: bool = True, fused: str = "", int_scales: bool = False) -> Dict:
    """Arguments of ``aot.compile_kernel`` for the split-K reduce launch of one table entry (its tile and
    orientation at ``group_size``), with the epilogue ``fused`` as in :func:`aot_job`, N and the output's row
    stride multiples of 16."""
    cfg = fit_config(config, group_size)
    flags = epilogue.flags(fused)
    sig = {"ws_ptr": "*i32" if int_scales else "*fp32", "S": "i32", "a_scale_ptr": "*fp32", "bias_ptr": "*fp32",
           "out_ptr": "*i8" if flags["QUANT_OUT"] else "*" + out_dtype, "M": "i32", "N": "i32", "stride_om": "i32",
           "gate_ptr": "*bf16", "res_ptr": "*" + out_dtype, "out_scale_ptr": "*fp32", "rows_per_gate": "i32",
           "w_chan_ptr": "*fp32"}
    constexprs = dict(PER_TOKEN=per_token, HAS_BIAS=bias, BM=cfg["BM"], BN=cfg["BN"], SWAP_AB=bool(cfg["SWAP_AB"]),
                      INTERPRET=False, **flags, INT_SCALES=int_scales)
    hints = [k for k in sig if k.endswith("_ptr") and k != "w_chan_ptr"] + ["N", "stride_om"]
    return dict(fn=w4a8_reduce_kernel, signature=sig, constexprs=constexprs, cc=cc, num_warps=cfg["num_warps"],
                num_stages=1, aligned=hints)

"""W4A8 group-wise GEMM: int8 activations x int4 weights (two per byte), fp32 group scales, fused dequantization.

    y[m, n] = a_scale[m] * sum_g w_scale[g, n] * P[g, m, n] + bias[n],   P[g] = sum_{k in g} a[m, k] w[n, k]

(BRIEF §2; the reference is ``ditq.quant.reference.gemm_w4a8``, checked by ``ditq.testing.assert_gemm_w4a8``).

Design, and why
---------------
* **Per-group int32 partials, rescaled into an fp32 accumulator** (``acc += float(P_g) * s_g``, groups in
  order, exactly the reference's order). BRIEF §4: on cc 80 float group scales cost ~15% fewer main-loop
  instructions than integer ones, and on cc 90 integer scales gain nothing in Triton because every int8
  ``tl.dot`` waits for its wgmma anyway. Float scales also keep the checkpoint's scales exact (no second
  rounding to an integer scale). A group partial is at most 127 * 128 * 256 = 4,161,536 < 2^24 in magnitude,
  so its int32 -> fp32 conversion is exact; we never accumulate int32 across groups, so the K <= 16384 bound
  of a single int32 accumulator is not even needed here (it would still hold: 127 * 128 * 16384 < 2^31).
* **The x16 nibble trick** (BRIEF §2): a nibble kept in the *high* half of a byte is an int8 equal to 16 * w.
  ``b & 0xF0`` is 16 * w_hi and ``b << 4`` (8-bit shift, the old high nibble falls off) is 16 * w_lo, so the
  int8 tensor-core dot runs on them with no sign extension. Every partial is then exactly 16 * P_g
  (|16 w| <= 128 fits int8 and 127 * 128 * 256 < 2^31), the fp32 accumulator is exactly 16x the
  reference's (scaling by a power of two commutes with rounding), and the 1/16 folds into the activation
  scale in the epilogue: ``acc * (a_scale * 0.0625)`` rounds to the same fp32 as the reference's
  ``acc_ref * a_scale``. No extra rounding anywhere.
* **Kernel layout: split nibbles per pack block** (``pack_weight``). The canonical format pairs k = 2j, 2j+1 in
  byte j, so unpacking it into K order needs an interleave (per-byte PRMTs in SASS, BRIEF §4). Instead the
  weights are repacked once at load time in blocks of ``PB = max(G, 64)`` k-elements: byte j of a block holds
  k = j (low nibble) and k = j + PB/2 (high nibble). The kernel never reorders anything: the low nibbles of
  a byte tile are the weights of one contiguous K range and the high nibbles of another, so the main loop
  does two dots, ``dot(W_lo, A[k_lo])`` and ``dot(W_hi, A[k_hi])``, each against a contiguous activation tile.
  For G >= 64 both halves lie in one group and chain into one int32 partial; for G = 32 (PB = 64) the low
  nibbles are group 2b and the high ones group 2b+1, each its own partial, so every dot has K >= 32 (the
  int8 MMA's K). When K / 32 is odd (G = 32 only) the last 32 k form a short block split the same way
  (k = j and j + 16); the kernel does it in one masked tail step.
* **Swapped operands (``SWAP``)**, for Hopper and small M: compute the transposed tile ``acc^T[BN, BM] =
  W[BN, K] @ A^T`` with the unpacked weights as the *first* operand. wgmma reads its A operand from
  registers, so the weights unpacked in registers feed it without a round trip through shared memory (no
  ``STS``), and a small M becomes wgmma's N (``IGMMA.64xBMx32``). Group scales are then per *row* of the tile.
  Not swapped, the weights are the B operand and are staged through shared memory.
* Pointer loads (not tensor descriptors): the weights must be unpacked in registers anyway, and on cc 80
  descriptors degrade to byte loads (BRIEF §4). Rows are 16-byte aligned (K % 32 == 0 => K/2 % 16 == 0) and
  Triton specialises the strides as multiples of 16, so loads are 128-bit. Out-of-range rows/columns are
  clamped (``% M``, ``% N``), not masked, so loads are unpredicated; only the store is masked.

Measured (AOT, triton 3.8, ptxas from triton's wheel, nothing run; ``pytest -s tests/kernels/test_aot_w4a8.py`` and ``benchmarks/static_report.py`` recompute them)
-----------------------------------------------------------------------------------------------------------
Main loop = the instructions of the K loop's body (one pack block: BK = min(table BK, max(G, 64)) k);
"/MMA" = loop instructions per tensor-core instruction (an IGMMA.64xNx32 does N/8 times an IMMA's work).
PRMT, STS: inside the loop. Registers from ``cuobjdump -res-usage``; shared memory from the metadata.
No configuration below has LDL/STL or a stack; all global loads are 16 bytes (LDGSTS.E.BYPASS.128).

  arch  bucket    G    tile BMxBNxBK  warps/st  loop  MMA instr. (/MMA)        PRMT LOP3 STS  regs  smem
  sm90  M<=16    128   16x128x128     4/4       200   8 IGMMA.64x16x32  (25)     0   32    5    92  40 KB
  sm90  M<=16     32   16x128x64      4/4       191   4 IGMMA.64x16x32  (48)     0   16    4    92  20 KB
  sm90  M<=32    128   32x128x128     4/4       239   8 IGMMA.64x32x32  (30)     0   32    5   120  48 KB
  sm90  M<=64    128   64x128x128     4/4       302   8 IGMMA.64x64x32  (38)     0   33    5   194  64 KB
  sm90  M>64     128  128x128x128     8/3       263   4 IGMMA.64x128x32 (66)     0   17    2   215  72 KB
  sm90  M>64      32  128x128x64      8/3       363   2 IGMMA.64x128x32 (182)    0    8    1   254  36 KB
  sm80  M<=16    128   16x128x128     4/4       164  16 IMMA.16832      (10)     0   32    1    96  30 KB
  sm80  M<=64    128   64x128x128     4/4       337  64 IMMA.16832      (5.3)    0   33    1   220  49 KB
  sm80  M>64     128  128x128x128     8/3       519  64 IMMA.16832      (8.1)    0  129    0   170  48 KB
  sm80  M>64      32  128x128x64      8/3       537  32 IMMA.16832      (17)     0   64    0   255  32 KB

Designs compared (G = 128, BK = 128):
* Swapped vs plain on cc 90. 16x128, 4 warps: plain cannot use wgmma at all (its M is 16 < 64) and falls
  back to mma.sync (16 IMMA, 162 instr.); swapped gets IGMMA.64x16x32. 64x128, 4 warps: swapped 302 instr.,
  5 STS, 194 regs, 64 KB vs plain 307 instr., 9 STS, 205 regs, 72 KB. 128x128, 8 warps: swapped 263 vs plain
  315 instr., 215 vs 236 regs. Swapped 128x256 spills (255 regs, 240 B stack): not shipped. => sm90: swapped.
* Swapped vs plain on cc 80 (mma.sync either way): plain 164 vs 173 instr. at 16x128, 337 vs 349 at 64x128,
  and at 128x128/8 warps swapped spills (12 LDL + 12 STL). => sm80: plain.
* Unpack, cc 90 swapped 16x128: int8 element ops (``b << 4``, ``b & 0xF0``) 390 instr., 112 PRMT, 80 LOP3;
  pure-Triton 32-bit words split by shifts + joins 278 instr., 48 PRMT; inline PTX on words (``pack=4``)
  200 instr., 0 PRMT. Tables ship ``ASM: true``; the interpreter (and ``ASM: false``) runs the 278 one.
* Note: on cc 80 Triton emits ``mma ... .satfinite`` (SASS ``IMMA...SAT``): saturation never triggers here,
  since a group partial is < 2^31 by the bound above.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import triton
import triton.language as tl

from ditq.format import SUPPORTED_GROUP_SIZES
from ditq.quant import reference as ref

from .interpret import cast_rn, interpreting

KERNEL_NAME = "w4a8"
MIN_BK = 64  # two dots of K = 32 (the int8 MMA's K) per step


def pack_block(group_size: int) -> int:
    """k-elements per split-nibble block: the group, but at least 64 so each half-block dot has K >= 32."""
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {SUPPORTED_GROUP_SIZES}, got {group_size!r}")
    return max(group_size, 64)


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
    if k % group_size:
        raise ValueError(f"group_size {group_size} does not divide K = {k}")
    return k


def pack_weight(qweight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Canonical uint8 [N, K // 2] (byte j = k 2j low, 2j+1 high) -> this kernel's uint8 [N, K // 2]:
    in each block of ``pack_block(G)`` k (a short last block when K % PB != 0), byte j holds k = j in its low
    nibble and k = j + len/2 in its high one. A pure permutation of nibbles, so :func:`unpack_weight` inverts it."""
    k = _check_canonical(qweight, group_size)
    q = ref.unpack_int4(qweight).to(torch.int16) & 0xF  # [N, K] two's-complement nibbles
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
def _dot(w, a, p, SWAP: tl.constexpr):
    """p + the int32 product of a weight tile [BN, k] and an activation tile [BM, k], in the tile's orientation.
    Swapped: acc^T[BN, BM] = W @ A^T, weights first (A^T stays K-major, as 8-bit wgmma requires)."""
    if SWAP:
        r = tl.dot(w, tl.trans(a), p, out_dtype=tl.int32)
    else:
        r = tl.dot(a, tl.trans(w), p, out_dtype=tl.int32)
    return r


@triton.jit
def _rescale(acc, p, s, SWAP: tl.constexpr):
    """acc += float(p) * s[n]: s runs along N, the tile's rows when swapped, its columns otherwise.
    (One return per function: Triton's code generator does not end a function at a return inside an if.)"""
    if SWAP:
        r = acc + p.to(tl.float32) * s[:, None]
    else:
        r = acc + p.to(tl.float32) * s[None, :]
    return r


F0 = tl.constexpr(-252645136)  # 0xF0F0F0F0 as int32: the high nibble of each of a word's four bytes


@triton.jit
def _load_unpack(w_ptr, rn, stride_wn, byte0, HB: tl.constexpr, BN: tl.constexpr, ASM: tl.constexpr,
                 N_VALID: tl.constexpr = 0):
    """Load the weight bytes [BN, HB] of rows ``rn`` from byte ``byte0`` and unpack them into int8 tiles
    (16 * w_lo, 16 * w_hi): no sign extension (module docstring). Bytes at or past ``N_VALID`` (when > 0)
    read as 0 (the G = 32 tail).

    The bytes are read as 32-bit words ``x`` (rows are 16-byte aligned: K/2 % 16 == 0), because
    ``(x << 4) & 0xF0F0F0F0`` is 16 * w_lo and ``x & 0xF0F0F0F0`` is 16 * w_hi for all four bytes at once:
    the shift moves each byte's low nibble into its own high half, and what it pushes into the next byte's
    low half is masked off. (On int8 elements LLVM scalarises the 8-bit shift: 390 vs 278 main-loop
    instructions on cc 90, see the top of the file.)
    * ASM False, pure Triton (the interpreter's path): the words are split back into bytes with shifts and
      two ``tl.join`` s; ptxas turns that into byte permutes (PRMT).
    * ASM True: the same two operations in PTX, with ``pack=4`` handing the asm one 32-bit register per four
      int8 elements, so no split is needed at all. Bit logic tested against a Python emulation
      (tests/kernels/test_w4a8.py::test_unpack_asm_bit_logic); UNPROVEN ON A GPU until one runs the tests.
    """
    if ASM:
        offs_b = tl.max_contiguous(tl.multiple_of(tl.arange(0, HB), HB), HB)
        ptrs = w_ptr + rn[:, None] * stride_wn + (byte0 + offs_b)[None, :]
        if N_VALID > 0:
            wb = tl.load(ptrs, mask=(offs_b < N_VALID)[None, :], other=0)
        else:
            wb = tl.load(ptrs)
        lo, hi = tl.inline_asm_elementwise(
            asm="{ .reg .b32 t; shl.b32 t, $2, 4; and.b32 $0, t, 0xF0F0F0F0; and.b32 $1, $2, 0xF0F0F0F0; }",
            constraints="=r,=r,r", args=[wb], dtype=(tl.int8, tl.int8), is_pure=True, pack=4)
    else:
        HW: tl.constexpr = HB // 4
        offs_w = tl.max_contiguous(tl.multiple_of(tl.arange(0, HW), HW), HW)
        ptrs = w_ptr.to(tl.pointer_type(tl.int32)) + rn[:, None] * (stride_wn // 4) + (byte0 // 4 + offs_w)[None, :]
        if N_VALID > 0:
            x = tl.load(ptrs, mask=(offs_w < N_VALID // 4)[None, :], other=0)
        else:
            x = tl.load(ptrs)
        lo = _words_to_bytes((x << 4) & F0, BN, HB)
        hi = _words_to_bytes(x & F0, BN, HB)
    return lo, hi


@triton.jit
def _words_to_bytes(x, BN: tl.constexpr, HB: tl.constexpr):
    """int32 [BN, HB/4] -> int8 [BN, HB], little-endian (byte i of word w is column 4w + i). join(u, v) puts
    u, v at a new last index 0, 1, so join(join(b0, b2), join(b1, b3))[.., i, j] = b(2i + j) -> flat 2i + j."""
    b0 = x.to(tl.int8)
    b1 = (x >> 8).to(tl.int8)
    b2 = (x >> 16).to(tl.int8)
    b3 = (x >> 24).to(tl.int8)
    return tl.reshape(tl.join(tl.join(b0, b2), tl.join(b1, b3)), (BN, HB))


def unpack_words_emulated(words):
    """Python emulation, bit for bit, of the PTX in :func:`_load_unpack` (ASM True) on uint32 words:
    returns (lo, hi) words. Used by the tests to check the asm's bit logic without a GPU."""
    words = [w & 0xFFFFFFFF for w in words]
    return ([((w << 4) & 0xFFFFFFFF) & 0xF0F0F0F0 for w in words], [w & 0xF0F0F0F0 for w in words])


@triton.jit
def w4a8_kernel(a_ptr, as_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, M, N, K,
                stride_am, stride_wn, stride_sg, stride_om,
                GROUP: tl.constexpr, PB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                BK: tl.constexpr, SWAP: tl.constexpr, PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr,
                GROUP_M: tl.constexpr, UNPACK_ASM: tl.constexpr = False, BF16_BY_HAND: tl.constexpr = False):
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
    a_rows = a_ptr + rm[:, None] * stride_am

    if SWAP:
        acc = tl.zeros((BN, BM), dtype=tl.float32)
        zero = tl.zeros((BN, BM), dtype=tl.int32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        zero = tl.zeros((BM, BN), dtype=tl.int32)
    p = zero

    n_blocks = K // PB
    for blk in range(0, n_blocks):
        if CHAIN:  # one group per block: a fresh int32 partial
            p = zero
        for st in tl.static_range(STEPS):
            k_lo = blk * PB + st * HB  # first k of this step's low nibbles; bytes start at k_lo - blk*HALF
            a_lo = tl.load(a_rows + (k_lo + offs_b)[None, :])
            a_hi = tl.load(a_rows + (k_lo + HALF + offs_b)[None, :])
            w_lo, w_hi = _load_unpack(w_ptr, rn, stride_wn, blk * HALF + st * HB, HB, BN, UNPACK_ASM)
            if CHAIN:  # both halves of the byte tile are in this block's group: one int32 partial
                p = _dot(w_hi, a_hi, _dot(w_lo, a_lo, p, SWAP), SWAP)
            else:  # G = 32: low nibbles are group 2*blk, high nibbles group 2*blk + 1, in this order
                p_lo = _dot(w_lo, a_lo, zero, SWAP)
                p_hi = _dot(w_hi, a_hi, zero, SWAP)
                s_lo = tl.load(s_ptr + (2 * blk) * stride_sg + rn)
                s_hi = tl.load(s_ptr + (2 * blk + 1) * stride_sg + rn)
                acc = _rescale(acc, p_lo, s_lo, SWAP)
                acc = _rescale(acc, p_hi, s_hi, SWAP)
        if CHAIN:
            acc = _rescale(acc, p, tl.load(s_ptr + blk * stride_sg + rn), SWAP)

    if GROUP == 32:
        if K % PB != 0:  # odd number of groups: the last 32 k are a short block (k = j and j + 16)
            k0 = n_blocks * PB
            valid = offs_b < 16
            a_lo = tl.load(a_rows + (k0 + offs_b)[None, :], mask=valid[None, :], other=0)
            a_hi = tl.load(a_rows + (k0 + 16 + offs_b)[None, :], mask=valid[None, :], other=0)
            w_lo, w_hi = _load_unpack(w_ptr, rn, stride_wn, n_blocks * HALF, HB, BN, UNPACK_ASM, 16)
            p = _dot(w_hi, a_hi, _dot(w_lo, a_lo, zero, SWAP), SWAP)  # one group: one partial
            acc = _rescale(acc, p, tl.load(s_ptr + (2 * n_blocks) * stride_sg + rn), SWAP)  # group K/32 - 1

    # epilogue: acc is exactly 16x the reference's accumulator; fold the 1/16 into the activation scale
    if PER_TOKEN:
        a_s = tl.load(as_ptr + rm) * 0.0625
    else:
        a_s = tl.load(as_ptr + offs_m * 0) * 0.0625
    if SWAP:
        y = acc * a_s[None, :]
    else:
        y = acc * a_s[:, None]
    if HAS_BIAS:
        b = tl.load(bias_ptr + rn).to(tl.float32)
        if SWAP:
            y = y + b[:, None]
        else:
            y = y + b[None, :]
    y = cast_rn(y, out_ptr.dtype.element_ty, BF16_BY_HAND)  # the interpreter truncates to bf16: round by hand
    if SWAP:
        ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
        mask = (offs_m[None, :] < M) & (offs_n[:, None] < N)
    else:
        ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(ptrs, y, mask=mask)


# ---- configuration and launcher ---------------------------------------------------------------------------

# table keys: tiles BM x BN (M and N extents, whatever SWAP does), BK = k per step (two half-dots of BK/2),
# SWAP (weights as the dot's first operand), GROUP_M (launch grouping), num_warps, num_stages; optional
# ASM (unpack with inline PTX; ignored by the interpreter, which runs the pure-Triton twin) and by_group
# ({"256": {"BN": 64}}: keys that replace the entry's at that group size, e.g. where a bigger pack block
# would spill: sm80 128x128 at G = 256 took 255 registers and 2 spill instructions, BN = 64 takes 163 and none).
CONFIG_KEYS = ("BM", "BN", "BK", "SWAP", "GROUP_M", "num_warps", "num_stages")


def config_for(m: int, device, group_size: int) -> Dict:
    """The tile table entry for this M on this device (``configs/w4a8_<arch>.json``), BK fitted to the group."""
    from . import config_table as ct

    cfg = ct.params(ct.pick(ct.load_table(KERNEL_NAME, ct.arch_for_device(device)), m))
    return fit_config(cfg, group_size)


def fit_config(cfg: Dict, group_size: int) -> Dict:
    """A step never spans two pack blocks: BK = min(BK, PB) (PB = max(G, 64) is a power of two, so it divides)."""
    missing = [k for k in CONFIG_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"w4a8 config lacks {missing}: {cfg}")
    cfg = dict(cfg)
    cfg.update(cfg.pop("by_group", {}).get(str(group_size), {}))
    bk = cfg["BK"]
    if bk < MIN_BK or bk & (bk - 1):
        raise ValueError(f"w4a8 BK must be a power of two >= {MIN_BK}, got {bk}")
    cfg["BK"] = min(bk, pack_block(group_size))
    return cfg


def gemm_w4a8(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
              bias: Optional[torch.Tensor], group_size: int, out_dtype: torch.dtype,
              out: Optional[torch.Tensor] = None, config: Optional[Dict] = None) -> torch.Tensor:
    """``y = a_scale * sum_g w_scale[g] * (a @ w_g^T) + bias`` with ``w`` from :func:`pack_weight`.

    Inputs are validated by ``ditq.ops`` (dtypes, shapes, devices); this checks what only the kernel needs.
    ``out``: optional [M, N] tensor of ``out_dtype`` to write (row stride free, unit column stride).
    ``config``: optional table entry overriding the tile table (tests, benchmarks)."""
    m, k = a.shape
    n = w_scale.shape[1]
    pb = pack_block(group_size)
    if k % group_size or w.numel() * 2 != n * k:
        raise ValueError(f"w4a8: K = {k}, N = {n}, group_size {group_size} do not fit w of {tuple(w.shape)}")
    if not (a.is_contiguous() and w.is_contiguous() and w_scale.is_contiguous()):
        raise ValueError("w4a8: a, w and w_scale must be contiguous")
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    elif out.shape != (m, n) or out.dtype != out_dtype or out.stride(1) != 1 or out.device != a.device:
        raise ValueError(f"w4a8: out must be [M, N] = [{m}, {n}] {out_dtype} on {a.device} with unit column "
                         f"stride, got {tuple(out.shape)} {out.dtype} strides {out.stride()}")
    if m == 0 or n == 0:
        return out
    cfg = fit_config(config, group_size) if config is not None else config_for(m, a.device, group_size)
    grid = (triton.cdiv(m, cfg["BM"]) * triton.cdiv(n, cfg["BN"]),)
    w4a8_kernel[grid](
        a, a_scale, w, w_scale, bias if bias is not None else w_scale, out, m, n, k,
        a.stride(0), k // 2, w_scale.stride(0), out.stride(0),
        GROUP=group_size, PB=pb, BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], SWAP=bool(cfg["SWAP"]),
        PER_TOKEN=a_scale.numel() == m and m > 1, HAS_BIAS=bias is not None, GROUP_M=cfg["GROUP_M"],
        UNPACK_ASM=bool(cfg.get("ASM", False)) and not interpreting(),  # no inline asm in the interpreter
        BF16_BY_HAND=interpreting(), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def aot_job(params: Dict, cc: int, group_size: int, out_dtype: str = "bf16", per_token: bool = True,
            bias: bool = True, aligned: bool = True) -> Dict:
    """Arguments of ``aot.compile_kernel`` for one table entry at group size ``group_size``, as the launcher
    would run it on a GPU of compute capability ``cc``: BK fitted to the group, and the alignment the launcher
    guarantees, pointers, K, N and every stride divisible by 16 (K % 32 == 0), M not (``aligned=False``
    drops those hints). ``params["ASM"]`` picks the inline-PTX unpack (default: the pure-Triton twin)."""
    cfg = fit_config(params, group_size)
    ptr = {"a_ptr": "*i8", "as_ptr": "*fp32", "w_ptr": "*u8", "s_ptr": "*fp32", "bias_ptr": "*fp32",
           "out_ptr": "*" + out_dtype}
    ints = ("M", "N", "K", "stride_am", "stride_wn", "stride_sg", "stride_om")
    constexprs = {"GROUP": group_size, "PB": pack_block(group_size), "BM": cfg["BM"], "BN": cfg["BN"],
                  "BK": cfg["BK"], "SWAP": bool(cfg["SWAP"]), "PER_TOKEN": per_token, "HAS_BIAS": bias,
                  "GROUP_M": cfg["GROUP_M"], "UNPACK_ASM": bool(cfg.get("ASM", False)), "BF16_BY_HAND": False}
    hints = [n for n in (*ptr, *ints) if n != "M"]
    return dict(fn=w4a8_kernel, signature={**ptr, **{n: "i32" for n in ints}}, constexprs=constexprs, cc=cc,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], aligned=hints if aligned else [])


def aot_source(cfg: Dict, group_size: int, out_dtype: str = "bf16", per_token: bool = True,
               has_bias: bool = True):
    """(ASTSource, options) of :func:`aot_job`'s compile, for an in-process ``triton.compile``. Kept for
    ``benchmarks/static_report.py``, whose ``compile_triton`` still has an ``aot_source`` path; prefer
    ``aot_job`` with ``aot.compile_many`` (a subprocess, so it also works under ``TRITON_INTERPRET=1``)."""
    job = aot_job(cfg, 0, group_size, out_dtype, per_token, has_bias)
    sig = {**job["signature"], **{c: "constexpr" for c in job["constexprs"]}}
    attrs = {(w4a8_kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in job["aligned"]}
    src = triton.compiler.ASTSource(fn=w4a8_kernel, signature=sig, constexprs=job["constexprs"], attrs=attrs)
    return src, {"num_warps": job["num_warps"], "num_stages": job["num_stages"]}


def reference(a, a_scale, w, w_scale, bias, group_size, out_dtype):
    """The same product through the reference maths, from this kernel's packed layout."""
    q = ref.unpack_int4(unpack_weight(w, group_size))
    return ref.gemm_w4a8(a, a_scale, q, w_scale, group_size, bias, out_dtype)

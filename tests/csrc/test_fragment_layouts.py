"""Fragment layouts of mma.m16n8k32 (.s8) and ldmatrix, as tables transcribed from the PTX ISA, checked
against themselves (every matrix element held by exactly one lane), against entries read off the ISA's
figures, and against the emulator's warp collectives (csrc/emu/warp.h) on random and structured inputs.
This table is written independently of the emulator's code: a misreading in one shows as a mismatch.

Source: PTX ISA, "Matrix Fragments for mma.m16n8k32" (integer .s8/.u8 types) and "Warp-level matrix load
instruction: ldmatrix". groupID = %laneid >> 2, threadID_in_group = %laneid % 4.
"""
import ctypes
import importlib.util
import os

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location("emu_probe", os.path.join(os.path.dirname(__file__), "emu_probe.py"))
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)


# ---- the ISA's formulas, as worded there -------------------------------------------------------------------
def isa_a(lane, i):
    """A (16x32, .row), a_i for i in 0..15 (4 per .b32 register, a0..a3 in register 0):
    row = groupID for a_i where i < 4 or 8 <= i < 12; groupID + 8 otherwise.
    col = threadID_in_group * 4 + (i & 0x3) for i < 8; threadID_in_group * 4 + (i & 0x3) + 16 for i >= 8."""
    g, t = lane >> 2, lane % 4
    row = g if (i < 4 or 8 <= i < 12) else g + 8
    col = t * 4 + (i & 0x3) + (16 if i >= 8 else 0)
    return row, col


def isa_b(lane, i):
    """B (32x8, .col), b_i for i in 0..7: row (k) = threadID_in_group * 4 + (i & 0x3) for i < 4,
    + 16 for i >= 4; col (n) = groupID."""
    g, t = lane >> 2, lane % 4
    return t * 4 + (i & 0x3) + (16 if i >= 4 else 0), g


def isa_c(lane, i):
    """C/D (16x8, .s32), c_i for i in 0..3: row = groupID for i < 2, groupID + 8 for i >= 2;
    col = threadID_in_group * 2 + (i & 0x1)."""
    g, t = lane >> 2, lane % 4
    return (g if i < 2 else g + 8), t * 2 + (i & 0x1)


# Entries read off the ISA figures (lane, element) -> (row, col), e.g. T0 holds a0..a3 = row 0, cols 0..3.
FIGURE_A = {(0, 0): (0, 0), (0, 3): (0, 3), (0, 4): (8, 0), (0, 8): (0, 16), (0, 12): (8, 16), (1, 0): (0, 4),
            (3, 15): (8, 31), (4, 0): (1, 0), (31, 7): (15, 31 - 16), (31, 11): (7, 31)}
FIGURE_B = {(0, 0): (0, 0), (0, 3): (3, 0), (0, 4): (16, 0), (1, 0): (4, 0), (3, 7): (31, 0), (4, 0): (0, 1),
            (31, 7): (31, 7)}
FIGURE_C = {(0, 0): (0, 0), (0, 1): (0, 1), (0, 2): (8, 0), (1, 0): (0, 2), (3, 3): (8, 7), (4, 0): (1, 0),
            (31, 3): (15, 7)}


@pytest.mark.parametrize("fn,count,shape,figure", [(isa_a, 16, (16, 32), FIGURE_A), (isa_b, 8, (32, 8), FIGURE_B),
                                                    (isa_c, 4, (16, 8), FIGURE_C)])
def test_table_covers_each_element_once_and_matches_the_figures(fn, count, shape, figure):
    seen = {}
    for lane in range(32):
        for i in range(count):
            rc = fn(lane, i)
            assert 0 <= rc[0] < shape[0] and 0 <= rc[1] < shape[1]
            assert rc not in seen, f"{rc} held by {seen[rc]} and {(lane, i)}"
            seen[rc] = (lane, i)
    assert len(seen) == shape[0] * shape[1]
    for (lane, i), rc in figure.items():
        assert fn(lane, i) == rc, f"lane {lane} element {i}: table {fn(lane, i)}, figure {rc}"


def _regs(values, fn, count):
    """Per-lane .b32 registers (4 int8 each, element 4r + j in byte j) holding matrix `values`."""
    regs = np.zeros((32, count // 4), dtype=np.uint32)
    for lane in range(32):
        for i in range(count):
            byte = int(values[fn(lane, i)]) & 0xFF
            regs[lane, i // 4] |= np.uint32(byte << (8 * (i % 4)))
    return regs


def _emulated_mma(A, B, C):
    a = np.ascontiguousarray(_regs(A, isa_a, 16))
    b = np.ascontiguousarray(_regs(B, isa_b, 8))
    c = np.zeros((32, 4), dtype=np.int32)
    for lane in range(32):
        for i in range(4):
            c[lane, i] = C[isa_c(lane, i)]
    d = np.full((32, 4), 0x7EADBEEF, dtype=np.int32)  # poison
    probe.load().probe_mma(a.ctypes.data, b.ctypes.data, c.ctypes.data, d.ctypes.data)
    D = np.zeros((16, 8), dtype=np.int64)
    for lane in range(32):
        for i in range(4):
            D[isa_c(lane, i)] = d[lane, i]
    return D


def _wrap32(x):
    return ((x + 2 ** 31) % 2 ** 32) - 2 ** 31


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_emulated_mma_matches_the_isa_table_on_random_inputs(seed):
    rng = np.random.default_rng(seed)
    A = rng.integers(-128, 128, (16, 32))
    B = rng.integers(-128, 128, (32, 8))
    C = rng.integers(-2 ** 31, 2 ** 31, (16, 8))
    assert (_emulated_mma(A, B, C) == _wrap32(A @ B + C)).all()


def test_emulated_mma_structured_inputs_locate_every_element():
    """A[r, k] = 1 only at k = (r + s) % 32, B[k, n] = k * 8 + n + 1: D[r, n] names exactly which A and B
    elements met, so a single misplaced register byte shows as a wrong, identifiable value."""
    for s in (0, 5, 17):
        A = np.zeros((16, 32), dtype=np.int64)
        for r in range(16):
            A[r, (r + s) % 32] = 1
        B = (np.arange(32)[:, None] * 8 + np.arange(8)[None, :] + 1) % 128
        C = np.arange(128).reshape(16, 8) * 1000
        assert (_emulated_mma(A, B, C) == A @ B + C).all()


def test_emulated_mma_s32_accumulation_wraps():
    A = np.full((16, 32), 127)
    B = np.full((32, 8), 127)
    C = np.full((16, 8), 2 ** 31 - 1)
    D = _emulated_mma(A, B, C)
    assert (D == _wrap32(A @ B + C)).all() and (D < 0).all()


# ---- ldmatrix ------------------------------------------------------------------------------------------------
def isa_ldmatrix(rows, lane, j, trans):
    """The ISA's ldmatrix fragment (.b16): matrix j's 8 rows come from the addresses of threads 8j..8j+7.
    Without .trans, thread `lane` holds elements (row lane / 4, cols 2 (lane % 4), +1) of matrix j in
    register j, the first in the low half; with .trans, elements (rows 2 (lane % 4), +1; col lane / 4).
    `rows[j][r]` is the 16-byte row r of matrix j (8 b16 elements)."""
    m = [np.frombuffer(bytes(rows[j][r]), dtype=np.uint16) for r in range(8)]
    if not trans:
        lo, hi = m[lane // 4][2 * (lane % 4)], m[lane // 4][2 * (lane % 4) + 1]
    else:
        lo, hi = m[2 * (lane % 4)][lane // 4], m[2 * (lane % 4) + 1][lane // 4]
    return int(lo) | (int(hi) << 16)


@pytest.mark.parametrize("count,trans", [(4, 0), (2, 0), (4, 1), (2, 1)])
def test_emulated_ldmatrix_matches_the_isa_table(count, trans):
    rng = np.random.default_rng(count * 10 + trans)
    nbytes = 64 * 16
    smem = rng.integers(0, 256, nbytes, dtype=np.uint8)
    slots = rng.permutation(64)[:32]  # lanes point at scattered, 16-byte aligned rows
    offsets = (slots * 16).astype(np.int32)
    if count == 2:
        offsets[16:] = 0  # not used by .x2
    out = np.full((32, 4), 0xDEADBEEF, dtype=np.uint32)
    msg = ctypes.create_string_buffer(1024)
    rc = probe.load().probe_ldmatrix(smem.ctypes.data, nbytes, offsets.ctypes.data, count, trans, out.ctypes.data,
                                     msg, 1024)
    assert rc == 0, msg.value.decode()
    rows = [[smem[offsets[8 * j + r]:offsets[8 * j + r] + 16] for r in range(8)] for j in range(count)]
    for lane in range(32):
        for j in range(count):
            assert out[lane, j] == isa_ldmatrix(rows, lane, j, trans), (lane, j)


def test_emulated_ldmatrix_rejects_a_misaligned_row():
    smem = np.arange(1024, dtype=np.uint8)
    offsets = (np.arange(32) * 16).astype(np.int32)
    offsets[5] += 4
    out = np.zeros((32, 4), dtype=np.uint32)
    msg = ctypes.create_string_buffer(1024)
    rc = probe.load().probe_ldmatrix(smem.ctypes.data, 1024, offsets.ctypes.data, 4, 0, out.ctypes.data, msg, 1024)
    assert rc == 1 and "[misaligned]" in msg.value.decode() and "thread (5,0,0)" in msg.value.decode()

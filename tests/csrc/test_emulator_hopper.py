"""The emulator's Hopper twins (csrc/emu/hopper.h) against models written from the PTX ISA:

* the wgmma register fragments (accumulator D of m64nNk32, register A of .s8) as worded in the ISA, a second
  transcription from CUTLASS's CuTe layouts (cute/atom/mma_traits_sm90_gmma.hpp, CLayout_64xN and
  ALayout_64x32), and the emulator's wgmma on random operands placed in shared memory through each
  descriptor layout (no swizzle with two LBO/SBO choices, 32/64/128-byte swizzles, K offsets inside a
  swizzled row);
* TMA 2-D boxes, partly out of bounds, in each swizzle mode, read back raw and compared with a Python model
  of the box and the swizzle, under every fiber order and landing mode;
* an int8 GEMM tile (TMA -> 128B-swizzled stages in a 2-stage mbarrier ring over 5 K tiles, i.e. several
  phases of each barrier -> wgmma ss, and the register-A rs variant) exact against an integer matmul at
  ragged shapes (M < 64, N_real < N, K not a multiple of the 128-byte K tile), every order x landing mode,
  race checker on.
The injected bugs are in test_emulator_hopper_catches.py.
"""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location("hopper_probe", os.path.join(os.path.dirname(__file__),
                                                                            "hopper_probe.py"))
hp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hp)

SCHEDULES = [("forward", 0), ("reverse", 0), ("random", 1), ("random", 2)]
LANDINGS = ["issue", "wait"]


# ---- the ISA's fragment formulas, as worded there (groupID = laneid >> 2, threadID_in_group = laneid % 4,
# warp = the warp's rank in the warpgroup) ---------------------------------------------------------------------
def isa_d(thread, i):
    """wgmma D (64 x N, .s32), d_i for i in 0..N/2-1:
    row = warp * 16 + groupID for d_i where i % 4 < 2, warp * 16 + groupID + 8 otherwise;
    col = threadID_in_group * 2 + (i & 0x1) + 8 * (i / 4) (integer division)."""
    warp, lane = thread // 32, thread % 32
    g, t = lane >> 2, lane % 4
    row = warp * 16 + g + (0 if i % 4 < 2 else 8)
    return row, t * 2 + (i & 0x1) + 8 * (i // 4)


def isa_a(thread, i):
    """wgmma A from registers (64 x 32, .s8), a_i for i in 0..15 (4 per .b32 register, a0..a3 in register 0):
    per warp like mma.m16n8k32's A, on rows warp * 16 ..:
    row = warp * 16 + groupID for a_i where i < 4 or 8 <= i < 12, + 8 otherwise;
    col = threadID_in_group * 4 + (i & 0x3) for i < 8, + 16 for i >= 8."""
    warp, lane = thread // 32, thread % 32
    g, t = lane >> 2, lane % 4
    row = warp * 16 + (g if (i < 4 or 8 <= i < 12) else g + 8)
    return row, t * 4 + (i & 0x3) + (16 if i >= 8 else 0)


def cute_d(thread, i):
    """CLayout_64xN = ((4,8,4),(2,2,N/8)) : ((128,1,16),(64,8,512)), column-major (m + 64 n)."""
    idx = (thread % 4) * 128 + (thread // 4 % 8) * 1 + (thread // 32) * 16 + (i % 2) * 64 + (i // 2 % 2) * 8 + (i // 4) * 512
    return idx % 64, idx // 64


def cute_a(thread, i):
    """ALayout_64x32 = ((4,8,4),(4,2,2)) : ((256,1,16),(64,8,1024)), column-major (m + 64 k)."""
    idx = (thread % 4) * 256 + (thread // 4 % 8) + (thread // 32) * 16 + (i % 4) * 64 + (i // 4 % 2) * 8 + (i // 8) * 1024
    return idx % 64, idx // 64


def test_isa_and_cute_transcriptions_agree_and_cover_each_element_once():
    for n in (8, 24, 256):
        seen = set()
        for thread in range(128):
            for i in range(n // 2):
                rc = isa_d(thread, i)
                assert rc == cute_d(thread, i), (n, thread, i)
                assert 0 <= rc[0] < 64 and 0 <= rc[1] < n and rc not in seen
                seen.add(rc)
        assert len(seen) == 64 * n
    seen = set()
    for thread in range(128):
        for i in range(16):
            rc = isa_a(thread, i)
            assert rc == cute_a(thread, i), (thread, i)
            assert rc not in seen
            seen.add(rc)
    assert len(seen) == 64 * 32
    # Entries read off the ISA's figures: T0 holds d0, d1 = (0, 0), (0, 1) and d2, d3 = (8, 0), (8, 1); T1 starts
    # at column 2; warp 1's T32 at row 16; d4 moves 8 columns right. A: T0's a4 is row 8, a8 is column 16.
    assert [isa_d(0, i) for i in range(5)] == [(0, 0), (0, 1), (8, 0), (8, 1), (0, 8)]
    assert isa_d(1, 0) == (0, 2) and isa_d(4, 0) == (1, 0) and isa_d(32, 0) == (16, 0) and isa_d(127, 3) == (63, 7)
    assert isa_a(0, 4) == (8, 0) and isa_a(0, 8) == (0, 16) and isa_a(3, 15) == (8, 31) and isa_a(96, 0) == (48, 0)


def test_emulator_formulas_in_ptx_cuh_match_the_isa():
    """ptx.cuh documents the fragments for kernel writers; the formulas there must be the ISA's."""
    with open(os.path.join(hp.CSRC, "ptx.cuh")) as f:
        text = f.read()
    assert "d[i], i < N/2: row 16w + g + 8 ((i >> 1) & 1), col 8 (i >> 2) + 2t + (i & 1)" in text
    assert "row 16w + g + 8 ((j >> 2) & 1), col 4t + (j & 3) + 16 (j >> 3)" in text
    for thread in range(128):
        w, g, t = thread // 32, thread % 32 // 4, thread % 4
        for i in range(32):
            assert isa_d(thread, i) == (16 * w + g + 8 * ((i >> 1) & 1), 8 * (i >> 2) + 2 * t + (i & 1))
        for j in range(16):
            assert isa_a(thread, j) == (16 * w + g + 8 * ((j >> 2) & 1), 4 * t + (j & 3) + 16 * (j >> 3))


# ---- shared-memory operand layouts (the ISA's canonical K-major layouts) ----------------------------------
def swizzle(addr, bits):
    """The 16-byte chunk index's low `bits` bits XOR the 128-byte row index's (absolute address)."""
    return addr ^ (((addr >> 7) & ((1 << bits) - 1)) << 4)


SWZ_BITS = {"none": 0, "32B": 1, "64B": 2, "128B": 3}


def place(image, mat, start, swz, lbo, sbo):
    """Writes K-major `mat` (rows x 32 int8) into `image` as a wgmma descriptor (start, swz, lbo, sbo) reads it:
    no swizzle: 8x16-byte core matrices, row r at (r % 8) * 16 + (r // 8) * SBO, K half h at + h * LBO;
    swizzled (width W = 32/64/128): row r at (r % 8) * W + (r // 8) * SBO, byte c at + c, then the XOR."""
    bits = SWZ_BITS[swz]
    width = 16 << bits
    for r in range(mat.shape[0]):
        for c in range(32):
            if bits == 0:
                a = start + (r % 8) * 16 + (r // 8) * sbo + (c % 16) + (c // 16) * lbo
            else:
                a = swizzle(start + (r % 8) * width + (r // 8) * sbo + c, bits)
            image[a] = mat[r, c].view(np.uint8)


# (swizzle, K offset inside the row, LBO, SBO) for A (64 rows at 0) and B (N rows at 16384); LBO None: all
# rows' first K half, then all rows' second half (LBO = rows x 16 bytes).
LAYOUTS = {
    "none_khalves_adjacent": ("none", 0, 128, 256),
    "none_khalves_apart": ("none", 0, None, 128),
    "32B": ("32B", 0, 16, 256),
    "64B_koffset32": ("64B", 32, 16, 512),
    "128B_koffset96": ("128B", 96, 16, 1024),
}


def run_wgmma(n, layout, rs, accumulate, seed, landing="wait", b_start_shift=0):
    rng = np.random.default_rng(seed)
    swz, koff, lbo, sbo = LAYOUTS[layout]
    A = rng.integers(-128, 128, (64, 32), dtype=np.int8)
    B = rng.integers(-128, 128, (n, 32), dtype=np.int8)
    C = rng.integers(-2**31, 2**31, (64, n), dtype=np.int64).astype(np.int32)
    image = rng.integers(0, 256, 16384 + 32768 + 1024, dtype=np.uint8)  # junk around the operands
    a_lbo, b_lbo = (64 * 16, n * 16) if lbo is None else (lbo, lbo)
    place(image, A, koff, swz, a_lbo, sbo)
    place(image, B, 16384 + koff, swz, b_lbo, sbo)
    a_desc = np.array([koff, a_lbo, sbo, SWZ_BITS[swz]], dtype=np.uint32)
    b_desc = np.array([16384 + koff + b_start_shift, b_lbo, sbo, SWZ_BITS[swz]], dtype=np.uint32)
    a_regs = np.zeros((128, 4), dtype=np.uint32)
    for th in range(128):
        for i in range(16):
            r, c = isa_a(th, i)
            a_regs[th, i // 4] |= np.uint32(int(A[r, c].view(np.uint8)) << (8 * (i % 4)))
    c_init = np.zeros((128, n // 2), dtype=np.int32)
    for th in range(128):
        for i in range(n // 2):
            c_init[th, i] = C[isa_d(th, i)]
    d = np.full((128, n // 2), -12345, dtype=np.int32)
    res = hp.call(hp.load().probe_wgmma, n, hp.ptr(image), image.size, hp.ptr(a_desc), hp.ptr(b_desc), int(rs),
                  hp.ptr(a_regs), int(accumulate), hp.ptr(c_init), hp.ptr(d), 2, hp.LANDING[landing])
    want = A.astype(np.int64) @ B.astype(np.int64).T + (C.astype(np.int64) if accumulate else 0)
    want = ((want + 2**31) % 2**32 - 2**31).astype(np.int32)  # s32 wraps
    got = np.zeros((64, n), dtype=np.int32)
    for th in range(128):
        for i in range(n // 2):
            got[isa_d(th, i)] = d[th, i]
    return res, got, want


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("rs", [0, 1], ids=["ss", "rs"])
def test_wgmma_fragments_and_descriptors_match_the_isa(layout, rs):
    for n, accumulate, landing in ((8, 1, "wait"), (24, 0, "issue"), (256, 1, "issue")):
        res, got, want = run_wgmma(n, layout, rs, accumulate, seed=n + rs, landing=landing)
        assert res.rc == 0, res
        np.testing.assert_array_equal(got, want, err_msg=f"N={n} {layout} rs={rs} accumulate={accumulate}")


def test_wgmma_swizzled_operand_must_start_at_its_pattern_origin():
    """The swizzle is a function of the absolute address: a 128B-swizzled tile moved by 128 bytes reads
    other bytes than the TMA wrote. Reported (misaligned), naming the wgmma's line."""
    res, _, _ = run_wgmma(8, "128B_koffset96", 0, 1, seed=0, b_start_shift=128)
    assert res.rc == 1 and res.kind == "misaligned", res
    assert "1024-byte aligned" in res.msg and "hopper_probe.cpp:" in res.msg, res.msg


def test_wgmma_descriptor_outside_shared_memory_is_reported():
    res, _, _ = run_wgmma(8, "none_khalves_apart", 0, 1, seed=0, b_start_shift=33792)  # B starts at the end of the 50176 shared bytes
    assert res.rc == 1 and res.kind == "shared-address", res


# ---- TMA ---------------------------------------------------------------------------------------------------
def tma_model(g, inner, outer, stride, box_inner, box_outer, swz, c0, c1):
    """The shared bytes of one box: element (row r, byte x) of the box is g[c1 + r, c0 + x] if inside the
    tensor, else 0; with a swizzle of span S (= box_inner), it lands at r * S + 16 * ((x // 16) ^ f(r)) + x % 16
    with f(r) = (r * S // 128) % (S // 16): rows share a 128-byte line when S < 128."""
    out = np.zeros(box_inner * box_outer, dtype=np.uint8)
    span = {"none": 0, "32B": 32, "64B": 64, "128B": 128}[swz]
    for r in range(box_outer):
        for x in range(box_inner):
            y, xx = c1 + r, c0 + x
            v = g[y * stride + xx] if (0 <= y < outer and 0 <= xx < inner) else 0
            if span == 0:
                off = r * box_inner + x
            else:
                f = (r * span // 128) % (span // 16)
                off = r * span + 16 * ((x // 16) ^ f) + x % 16
            out[off] = v
    return out


def run_tma(swz, box_inner, box_outer, c0, c1, order="forward", seed=0, landing="wait", inner=100, outer=37,
            stride=112, dst_offset=0):
    rng = np.random.default_rng(1)
    g = rng.integers(1, 256, (outer - 1) * stride + inner, dtype=np.uint8)  # no zeros: a zero-fill shows
    out = np.full(box_inner * box_outer, 0xEE, dtype=np.uint8)
    res = hp.call(hp.load().probe_tma, hp.ptr(g), inner, outer, stride, box_inner, box_outer, hp.SWIZZLES[swz], c0,
                  c1, dst_offset, hp.ORDERS[order], seed, hp.LANDING[landing], hp.ptr(out))
    return res, out, tma_model(g, inner, outer, stride, box_inner, box_outer, swz, c0, c1)


@pytest.mark.parametrize("swz,box_inner", [("none", 48), ("32B", 32), ("64B", 64), ("128B", 128)])
def test_tma_box_lands_swizzled_and_zero_filled(swz, box_inner):
    # inside; past the right and bottom edges; before the left and top edges (negative coordinates)
    for c0, c1 in ((16, 3), (80, 25), (-16, -5)):
        for order, seed in SCHEDULES:
            for landing in LANDINGS:
                res, got, want = run_tma(swz, box_inner, 24, c0, c1, order, seed, landing)
                assert res.rc == 0, res
                np.testing.assert_array_equal(got, want, err_msg=f"{swz} box at ({c0}, {c1}) {order} {landing}")
    assert (want == 0).any() and (want != 0).any()


@pytest.mark.parametrize("swz,box_inner,offset,align", [("none", 48, 64, 128), ("128B", 128, 512, 1024),
                                                         ("64B", 64, 256, 512), ("32B", 32, 128, 256)])
def test_tma_destination_alignment_is_checked(swz, box_inner, offset, align):
    """128 bytes for any box; a swizzled one must start at its pattern's origin (8 rows of the span)."""
    res, _, _ = run_tma(swz, box_inner, 8, 0, 0, dst_offset=offset)
    assert res.rc == 1 and res.kind == "misaligned", res
    assert f"needs a {align}-byte aligned shared destination" in res.msg and hp.where("tma_box") in res.msg, res.msg
    assert run_tma(swz, box_inner, 8, 0, 0, dst_offset=align)[0].rc == 0


def test_swizzle_model_matches_known_placements():
    """Spot checks of the Python model against the pattern as documented (CUTLASS Swizzle<B,4,3>): with the
    128-byte swizzle row r's chunk c sits at chunk c ^ (r % 8); with 64 bytes, rows pair up in 128-byte
    lines, so row 2's chunk 0 is chunk 1 of its row while rows 0 and 1 are unswizzled."""
    rows = np.tile(np.arange(128, dtype=np.uint8), 8)  # 8 rows of bytes 0..127
    out = tma_model(rows, 128, 8, 128, 128, 8, "128B", 0, 0)
    assert out[1 * 128 + 16] == 0 and out[1 * 128 + 0] == 16  # row 1: chunks 0 and 1 swap
    assert out[7 * 128 + 7 * 16] == 0                         # row 7: chunk 0 at chunk 7
    out = tma_model(rows[:512], 64, 8, 64, 64, 8, "64B", 0, 0)  # row r holds bytes 64 (r % 2) + 0..63
    assert out[0] == 0 and out[64] == 64 and out[2 * 64 + 16] == 0 and out[2 * 64] == 16


def test_tma_map_arguments_are_checked_like_the_driver():
    lib = hp.load()

    def refusal(base_offset=0, inner=100, outer=37, stride=112, box_inner=64, box_outer=24, swz="none"):
        import ctypes
        msg = ctypes.create_string_buffer(512)
        rc = lib.probe_tma_map_check(base_offset, inner, outer, stride, box_inner, box_outer, hp.SWIZZLES[swz],
                                     msg, 512)
        return msg.value.decode() if rc else None

    assert refusal() is None
    assert "16-byte aligned" in refusal(base_offset=8)
    assert "multiple of 16" in refusal(stride=104)
    assert "shorter than a row" in refusal(stride=96)
    assert "1..256" in refusal(box_outer=257)
    assert "multiple of 16 bytes" in refusal(box_inner=40)
    assert "at most 64 bytes" in refusal(box_inner=128, swz="64B")
    assert "fill the 128-byte span" in refusal(box_inner=64, swz="128B")  # the emulator's own restriction


def test_generated_wgmma_header_is_up_to_date():
    script = os.path.join(hp.CSRC, "gen_ptx_wgmma.py")
    assert subprocess.run([sys.executable, script, "--check"]).returncode == 0, \
        "csrc/ptx_wgmma.cuh differs from csrc/gen_ptx_wgmma.py's output: rerun the script"


# ---- the GEMM tile -----------------------------------------------------------------------------------------
def run_gemm(n, m_real, n_real, k, rs=0, bug="none", order="forward", seed=0, landing="wait", race_check=True,
             data_seed=0):
    rng = np.random.default_rng(data_seed)
    k_pad = (k + 15) // 16 * 16
    a = rng.integers(-128, 128, (m_real, k_pad), dtype=np.int8)
    b = rng.integers(-128, 128, (n_real, k_pad), dtype=np.int8)
    out = np.full((64, n), -7, dtype=np.int32)  # poisoned
    res = hp.call(hp.load().probe_gemm, hp.BUGS.index(bug), n, hp.ptr(a), hp.ptr(b), m_real, n_real, k, k_pad,
                  int(rs), hp.ptr(out), hp.ORDERS[order], seed, hp.LANDING[landing], int(race_check))
    want = np.zeros((64, n), dtype=np.int64)
    want[:m_real, :n_real] = a[:, :k].astype(np.int64) @ b[:, :k].astype(np.int64).T
    return res, out, want.astype(np.int32)


# (N, M real rows, N real rows, K): M = 1, odd N_real, K not a multiple of the 128-byte K tile (5 K tiles over
# a 2-stage ring: each barrier goes through phases 0, 1, 0).
GEMM_SHAPES = [(8, 1, 7, 544), (24, 50, 17, 160), (64, 64, 64, 96), (256, 33, 255, 288)]


@pytest.mark.parametrize("n,m_real,n_real,k", GEMM_SHAPES, ids=[f"N{s[0]}_M{s[1]}_n{s[2]}_K{s[3]}" for s in GEMM_SHAPES])
@pytest.mark.parametrize("rs", [0, 1], ids=["ss", "rs"])
def test_gemm_tile_is_exact_under_every_schedule_and_landing(n, m_real, n_real, k, rs):
    for order, seed in SCHEDULES if n < 256 else SCHEDULES[:2]:
        for landing in LANDINGS:
            res, out, want = run_gemm(n, m_real, n_real, k, rs, order=order, seed=seed, landing=landing,
                                      data_seed=seed + n)
            assert res.rc == 0, f"{order}/{seed}/{landing}: {res}"
            np.testing.assert_array_equal(out, want, err_msg=f"{order}/{seed}/{landing}")


# ---- an mbarrier ring with generic consumers spinning on try_wait ---------------------------------------------
def run_ring(bug, order="forward", seed=0, landing="wait", rows=117, tiles=8):
    rng = np.random.default_rng(seed)
    g = rng.integers(1, 256, (rows, 64), dtype=np.uint8)
    out = np.full((tiles * 16, 64), 0xEE, dtype=np.uint8)
    res = hp.call(hp.load().probe_ring, int(bug), hp.ptr(g), rows, tiles, hp.ptr(out), hp.ORDERS[order], seed,
                  hp.LANDING[landing])
    want = np.zeros_like(out)
    want[:rows] = g
    return res, out, want


def test_mbarrier_ring_passes_data_through_three_stages_and_several_phases():
    for order, seed in SCHEDULES:
        for landing in LANDINGS:
            res, out, want = run_ring(False, order, seed, landing)
            assert res.rc == 0, f"{order}/{seed}/{landing}: {res}"
            np.testing.assert_array_equal(out, want)


def test_mbarrier_ring_with_a_wrong_producer_parity_is_a_deadlock_naming_both_waits():
    """The spinning consumers are no progress: the report lists them at their try_wait and the producer at its
    wait, with the empty barrier's state (0 of 32 arrivals: nobody has consumed anything)."""
    for order, seed in SCHEDULES:
        for landing in LANDINGS:
            res, _, _ = run_ring(True, order, seed, landing)
            assert res.rc == 1 and res.kind == "deadlock", res
            assert "thread" in res.msg and hp.where("ring_wait_empty") in res.msg, res.msg
            assert "mbarrier_try_wait_parity (spinning) at " + hp.where("ring_spin") in res.msg, res.msg
            assert "initialised at " + hp.where("ring_init_empty") + " with count 32" in res.msg, res.msg
            assert "0 of 32 arrivals" in res.msg, res.msg


def test_mbarrier_ring_releasing_a_stage_before_reading_it_is_a_race():
    """The consumers arrive on `empty` before their ld.shared of the stage: the producer's next TMA load into it
    is reported at issue, naming the reader's line (the reader has not arrived on any mbarrier since)."""
    for order, seed in SCHEDULES:
        for landing in LANDINGS:
            res, _, _ = run_ring(2, order, seed, landing)
            assert res.rc == 1 and res.kind == "race", res
            assert hp.where("ring_tma") in res.msg and hp.where("ring_read") in res.msg, res.msg
            assert "has not released since" in res.msg, res.msg

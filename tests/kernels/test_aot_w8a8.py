"""Every shipped W8A8 tile configuration compiled ahead of time for cc 80 and cc 90, checked on the SASS
(ptxas decides spills, so the PTX is not enough), plus negative controls proving the checks can
fail. Compiles are slow on a loaded 2-core machine: everything is compiled once, in one subprocess."""
import re

import pytest

from ditq.kernels import aot, config_table, w8a8

JOBS = aot.shipped_jobs("w8a8")  # [(arch, entry, None, job)]: every entry of the sm80 / sm90 tables
SHIPPED = [(arch, entry) for arch, entry, _, _ in JOBS]
IDS = [f"{arch}-m{e['max_m']}" for arch, e in SHIPPED]
# Negative controls: no alignment hints (what the launcher's K % 16 rule prevents) on cc 90 and cc 80,
# and a 128x256x128 Hopper tile whose accumulator plus epilogue exceed 255 registers (with an fp32 output:
# since the store moved into kernels/epilogue.py, ptxas fits the bf16 store of this tile in 253 registers).
NAIVE = dict(BM=128, BN=128, BK=64, GROUP_M=8, SWAP_AB=False, USE_TMA=False, num_warps=4, num_stages=3)
BIG = dict(BM=128, BN=256, BK=128, GROUP_M=8, SWAP_AB=False, USE_TMA=True, num_warps=8, num_stages=3)


@pytest.fixture(scope="module")
def stats():
    jobs = [job for *_, job in JOBS]
    jobs += [w8a8.aot_job(NAIVE, 90, aligned=False), w8a8.aot_job(NAIVE, 80, aligned=False),
             w8a8.aot_job(BIG, 90, out_dtype="fp32")]
    compiled = aot.compile_many(jobs)
    s = [aot.sass_stats(c) for c in compiled]
    for (arch, e), st in zip(SHIPPED, s):  # shown with -s: the numbers the tables' comments quote
        print(f"w8a8 {arch} {config_table.params(e)}: {st.summary()} loop_ops={st.loop_ops}")
    return {"shipped": s[:len(SHIPPED)], "naive90": s[-3], "naive80": s[-2], "big90": s[-1],
            "compiled": compiled[:len(SHIPPED)]}


@pytest.mark.parametrize("i", range(len(SHIPPED)), ids=IDS)
def test_shipped_config_sass(stats, i):
    arch, entry = SHIPPED[i]
    s = stats["shipped"][i]
    assert s.spills == 0 and s.stack == 0 and s.local == 0, s.summary()
    assert s.registers <= 255, s.summary()
    assert s.byte_loads == 0, s.summary()
    if arch == "sm90":
        assert s.igmma > 0 and s.imma == 0, s.summary()  # wgmma, not the slower mma.sync path
        assert s.shared <= 227 * 1024, s.summary()
        if entry["USE_TMA"]:
            assert s.utmaldg > 0 and not s.ldgsts, s.summary()
    else:
        assert s.imma > 0 and s.igmma == 0, s.summary()
        assert s.shared <= 100 * 1024, s.summary()  # fits sm_86 / sm_89 too
        assert s.wide_loads > 0 and set(s.ldgsts) == {"LDGSTS.E.BYPASS.128"}, s.summary()
    # the tensor-core ops sit in the main loop, and the loop is short (no unpacking, no shared stores)
    loop = s.loop_ops
    assert loop.get("IGMMA" if arch == "sm90" else "IMMA", 0) > 0, loop
    assert loop.get("STS", 0) == 0 and loop.get("LDL", 0) == 0, loop
    assert s.loop_len < 200, s.summary()


def test_ptx_uses_integer_tensor_core_ops(stats):
    # triton emits .satfinite on the int32 mma.sync: saturation never triggers as |sum| < 2**31
    want = {"sm90": r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k32\.s32\.s8\.s8",
            "sm80": r"mma\.sync\.aligned\.m16n8k32\.row\.col(\.satfinite)?\.s32\.s8\.s8\.s32"}
    for (arch, _), c in zip(SHIPPED, stats["compiled"]):
        assert re.search(want[arch], c.ptx), f"{arch}: no int8 tensor-core instruction in the PTX"


def test_negative_control_unaligned_rows_give_byte_loads(stats):
    for key in ("naive90", "naive80"):
        s = stats[key]
        assert s.byte_loads > 0 and s.wide_loads == 0, s.summary()
    assert stats["naive90"].spills > 0 and stats["naive90"].stack > 0, stats["naive90"].summary()


def test_negative_control_big_tile_spills(stats):
    s = stats["big90"]
    assert s.spills > 0 or s.stack > 0, s.summary()

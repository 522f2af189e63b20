"""Every shipped W4A8 configuration compiled ahead of time for cc 80 and cc 90 (no GPU needed), checked on
the SASS (ptxas decides spills, not the PTX): integer tensor-core instructions (IMMA on sm_80,
Hopper's IGMMA on sm_90), no local memory (LDL/STL) and no stack, 16-byte global loads and no byte loads.

Compiled through ``aot.compile_many`` (one subprocess with TRITON_INTERPRET removed: conftest sets it for the
interpreter tests, and triton reads it at import) from ``w4a8.aot_job``, like W8A8. Each table entry is
compiled for G = 32 (two groups per pack block and the masked tail step) and G = 128 (one group per block),
plus the pure-Triton unpack twin of the first entry per architecture."""
import re

import pytest

from ditq.kernels import aot, config_table as ct, w4a8

GROUPS = (32, 128, 256)  # 256 has its own pack block and a by_group override on sm80
ARCH_CC = aot.ARCH_CC
LD128 = re.compile(r"\b(LDG\.E\.128|LDGSTS\.E\.BYPASS\.128|LDGSTS\.E\.128)\b")
LD_BYTES = re.compile(r"\bLDG(STS)?\.E\.(U8|S8)\b")


def _jobs():
    jobs = aot.shipped_jobs("w4a8", group_sizes=GROUPS)  # [(arch, entry, G, job)], as static_report compiles
    for arch in ARCH_CC:  # the pure-Triton twin of the unpack must compile cleanly too (first entry, G = 128)
        entry = dict(ct.load_table("w4a8", arch)[0], UNPACK_ASM=False)
        jobs.append((arch, entry, 128, w4a8.aot_job(ct.params(entry), ARCH_CC[arch], group_size=128)))
    return jobs


@pytest.fixture(scope="session")
def compiled():
    jobs = _jobs()
    built = aot.compile_many([job for *_, job in jobs])
    return [(arch, entry, g, c, aot.sass_stats(c)) for (arch, entry, g, _), c in zip(jobs, built)]


def _loads(s, pattern):
    return sum(v for op, v in {**s.ldg, **s.ldgsts}.items() if pattern.search(op))


@pytest.mark.slow
def test_every_shipped_config_compiles_clean(compiled):
    assert len(compiled) == len(_jobs())
    for arch, entry, g, c, s in compiled:
        what = f"{arch} G={g} {entry}: {s.summary()}"
        if arch == "sm90":
            # wgmma only exists with M = 64 per warpgroup: swapped tiles give it BN, plain ones BM
            assert s.igmma > 0, what
        else:
            assert s.imma > 0 and s.igmma == 0, what
        assert s.spills == 0 and s.stack == 0, what
        assert _loads(s, LD128) > 0 and _loads(s, LD_BYTES) == 0, what
        assert c.shared <= (227 if arch == "sm90" else 163) * 1024, what


# ---- integer group scales (INT_SCALES) ---------------------------------------------------------------------
INT_GROUPS = (32, 128)
FOLD_OPS = ("I2F", "I2FP", "FFMA")  # the float-scale kernel's per-group fold: int32 partial -> fp32, times s, add


@pytest.fixture(scope="session")
def compiled_int():
    """Both kinds of scales at every entry of both architectures at G = 32 and 128, and at the large-M entry at
    G = 256 (which sm80 layers do not get: INT_SCALE_GROUPS)."""
    jobs = []
    for arch in ARCH_CC:
        for kind in (True, False):
            jobs += [(arch, entry, g, kind, job) for _, entry, g, job in
                     aot.shipped_jobs("w4a8", archs=(arch,), group_sizes=INT_GROUPS, int_scales=kind)]
            jobs += [(arch, entry, g, kind, job) for _, entry, g, job in
                     aot.shipped_jobs("w4a8", archs=(arch,), group_sizes=(256,), m=1 << 20, int_scales=kind)]
    built = aot.compile_many([job for *_, job in jobs])
    return [(arch, entry, g, kind, c, aot.sass_stats(c)) for (arch, entry, g, kind, _), c in zip(jobs, built)]


@pytest.mark.slow
def test_int_scale_kernels_compile_clean_and_never_fold(compiled_int):
    """Integer group scales: tensor-core instructions, no spills, 16-byte loads, and no int -> float conversion or
    FFMA in the main loop (one int32 sum over K: the fold is gone)."""
    for arch, entry, g, kind, c, s in compiled_int:
        if not kind:
            continue
        what = f"{arch} G={g} {entry} int scales: {s.summary()} loop {s.loop_ops}"
        assert (s.igmma > 0) if arch == "sm90" else (s.imma > 0 and s.igmma == 0), what
        assert s.spills == 0 and s.stack == 0, what
        assert _loads(s, LD128) > 0 and _loads(s, LD_BYTES) == 0, what
        assert s.loop_len > 0 and not any(s.loop_ops.get(op, 0) for op in FOLD_OPS), what
        assert s.loop_ops.get("PRMT", 0) == 0, what  # the words become int8 tiles with no byte permutes


@pytest.mark.slow
def test_int_scale_groups_follow_the_sass(compiled_int):
    """w4a8.INT_SCALE_GROUPS, where the backend hands layers the integers, holds what the SASS says. Against the
    float-scale kernel of the same entry: at the large-M entry (the compute-bound one) the integer kernel's loop is
    the shorter exactly for the listed group sizes; at G = 32 it is the shorter at every entry; at 64+ rows it
    holds fewer registers (the fp32 sums beside the int32 partials are gone)."""
    by_key = {(arch, entry.get("max_m"), g, kind): s for arch, entry, g, kind, _, s in compiled_int}
    for (arch, max_m, g, kind), s in by_key.items():
        if not kind:
            continue
        f = by_key[(arch, max_m, g, False)]
        what = f"{arch} max_m={max_m} G={g}: int loop {s.loop_len} regs {s.registers}, float loop {f.loop_len} " \
               f"regs {f.registers}"
        if max_m is None:
            assert (s.loop_len < f.loop_len) == (g in w4a8.INT_SCALE_GROUPS[ARCH_CC[arch]]), what
        if g == 32:
            assert s.loop_len < f.loop_len, what
        if g != 256 and (max_m is None or max_m >= 64):
            assert s.registers < f.registers, what

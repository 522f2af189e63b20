"""The split-K launches (kernels/split_k.py) compiled ahead of time for cc 80 and cc 90, checked on the SASS.

For the tiles the tables give DiT-XL/2 at batch 1 (M = 512: the last entry of each table, 128 x 128; W4A8 at
G = 128), the split kernel (``SPLIT_K``: its k range, raw partials to the workspace, no epilogue) must keep the
unsplit main loop: the same tensor-core instructions, a loop of about the same length, no spills, 16-byte or TMA
loads. The reduce kernels (plain and with a fused gate + residual) must not spill either, and read the
workspace with 16-byte loads. Everything is compiled once, in one subprocess (``aot.compile_many``); the
unsplit jobs are the shipped ones test_aot_w8a8.py / test_aot_w4a8.py compile too (cached by Triton).
"""
import pytest

from ditq.kernels import aot, config_table as ct, w4a8, w8a8

G = 128


def _entry(kernel, arch):
    return ct.params(ct.load_table(kernel, arch)[-1])


def _jobs():
    """{(kernel, arch, what): job}, what in unsplit / split / reduce / reduce-gate-residual."""
    jobs = {}
    for arch, cc in aot.ARCH_CC.items():
        e8, e4 = _entry("w8a8", arch), _entry("w4a8", arch)
        jobs["w8a8", arch, "unsplit"] = w8a8.aot_job(e8, cc)
        jobs["w8a8", arch, "split"] = w8a8.aot_job(e8, cc, split=True)
        jobs["w8a8", arch, "reduce"] = w8a8.reduce_aot_job(e8, cc)
        jobs["w8a8", arch, "reduce-gate-residual"] = w8a8.reduce_aot_job(e8, cc, fused="gate+residual")
        jobs["w4a8", arch, "unsplit"] = w4a8.aot_job(e4, cc, group_size=G)
        jobs["w4a8", arch, "split"] = w4a8.aot_job(e4, cc, group_size=G, split=True)
        jobs["w4a8", arch, "reduce"] = w4a8.reduce_aot_job(e4, cc, group_size=G)
        jobs["w4a8", arch, "reduce-gate-residual"] = w4a8.reduce_aot_job(e4, cc, group_size=G, fused="gate+residual")
    return jobs


@pytest.fixture(scope="module")
def stats():
    jobs = _jobs()
    compiled = aot.compile_many(list(jobs.values()))
    out = {key: aot.sass_stats(c) for key, c in zip(jobs, compiled)}
    for key, s in out.items():  # shown with -s: the numbers the report quotes
        print("-".join(key), s.summary())
    return out


CASES = [(k, a) for k in ("w8a8", "w4a8") for a in aot.ARCH_CC]
IDS = [f"{k}-{a}" for k, a in CASES]


@pytest.mark.slow
@pytest.mark.parametrize("kernel,arch", CASES, ids=IDS)
def test_split_kernel_keeps_the_unsplit_main_loop(stats, kernel, arch):
    base, split = stats[kernel, arch, "unsplit"], stats[kernel, arch, "split"]
    what = f"unsplit {base.summary()}\nsplit {split.summary()}"
    assert split.spills == 0 and split.stack == 0 and split.local == 0, what
    mma = "IGMMA" if arch == "sm90" else "IMMA"
    assert split.loop_ops.get(mma, 0) == base.loop_ops.get(mma, 0) > 0, what
    assert (split.igmma > 0) == (arch == "sm90") and split.byte_loads == 0, what
    assert split.loop_len <= base.loop_len + 8, what  # the k range moves the bounds, not the body
    assert split.wide_loads > 0 and split.registers <= 255, what
    assert split.shared <= (227 if arch == "sm90" else 100) * 1024, what  # sm_86 / sm_89 have 100 KB


@pytest.mark.slow
@pytest.mark.parametrize("kernel,arch", CASES, ids=IDS)
def test_reduce_kernels_compile_clean(stats, kernel, arch):
    for what in ("reduce", "reduce-gate-residual"):
        s = stats[kernel, arch, what]
        assert s.spills == 0 and s.stack == 0 and s.local == 0, f"{what}: {s.summary()}"
        assert s.imma == 0 and s.igmma == 0 and s.byte_loads == 0, f"{what}: {s.summary()}"
        assert s.ldg.get("LDG.E.128", 0) > 0, f"{what}: the partials are read 16 bytes at a time: {s.summary()}"

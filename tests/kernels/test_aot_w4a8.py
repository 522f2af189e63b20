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

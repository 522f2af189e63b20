"""Every shipped W4A8 configuration compiled ahead of time for cc 80 and cc 90 (no GPU needed), checked on
the SASS (BRIEF §4: ptxas decides spills, not the PTX): integer tensor-core instructions (IMMA on sm_80,
Hopper's IGMMA on sm_90), no local memory (LDL/STL) and no stack, 16-byte global loads and no byte loads.

Compiles run in one subprocess per session with TRITON_INTERPRET removed (conftest sets it for the
interpreter tests, and triton reads it at import). Each table entry is compiled for G = 32 (two groups
per pack block and the masked tail step) and G = 128 (one group per block), plus the pure-Triton unpack
twin of the first entry per architecture."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from ditq.kernels import config_table as ct

GROUPS = (32, 128)

_SCRIPT = textwrap.dedent(r'''
    import json, os, re, subprocess, sys, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from ditq.kernels import config_table as ct, w4a8
    BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    jobs = json.loads(sys.argv[1])
    out = []
    for arch, entry, g in jobs:
        cc = {"sm80": 80, "sm90": 90}[arch]
        src, opts = w4a8.aot_source(ct.params(entry), g)
        k = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=opts)
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(k.asm["cubin"])
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", f.name], capture_output=True,
                              text=True, check=True).stdout
        res = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
        os.unlink(f.name)
        ins = [l.split("*/", 1)[1].split(";")[0].strip() for l in sass.splitlines()
               if re.match(r"\s*/\*[0-9a-f]{4,}\*/", l)]
        count = lambda pat: sum(1 for i in ins if re.search(pat, i))
        out.append(dict(arch=arch, entry=entry, group=g,
                        regs=int(re.search(r"REG:(\d+)", res).group(1)),
                        stack=int(re.search(r"STACK:(\d+)", res).group(1)), shared=k.metadata.shared,
                        imma=count(r"\bIMMA\.16832\.S8\.S8"), igmma=count(r"\bIGMMA\.64x\d+x32\.S8\.S8"),
                        ldl=count(r"\bLDL\b"), stl=count(r"\bSTL\b"),
                        ld128=count(r"\b(LDG\.E\.128|LDGSTS\.E\.BYPASS\.128|LDGSTS\.E\.128)\b"),
                        ld_bytes=count(r"\bLDG(STS)?\.E\.(U8|S8)\b")))
    print("RESULT" + json.dumps(out))
''')


def _jobs():
    jobs = []
    for arch in ("sm80", "sm90"):
        table = ct.load_table("w4a8", arch)
        for i, entry in enumerate(table):
            jobs += [(arch, entry, g) for g in GROUPS]
            if i == 0:  # the pure-Triton twin of the unpack must compile cleanly too
                jobs.append((arch, dict(entry, ASM=False), 128))
    return jobs


@pytest.fixture(scope="session")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(_jobs())], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


@pytest.mark.slow
def test_every_shipped_config_compiles_clean(compiled):
    assert len(compiled) == len(_jobs())
    for r in compiled:
        what = f"{r['arch']} G={r['group']} {r['entry']}: {r}"
        if r["arch"] == "sm90":
            # wgmma only exists with M = 64 per warpgroup: swapped tiles give it BN, plain ones BM
            assert r["igmma"] > 0, what
        else:
            assert r["imma"] > 0 and r["igmma"] == 0, what
        assert r["ldl"] == 0 and r["stl"] == 0 and r["stack"] == 0, what
        assert r["ld128"] > 0 and r["ld_bytes"] == 0, what
        assert r["shared"] <= (227 if r["arch"] == "sm90" else 163) * 1024, what

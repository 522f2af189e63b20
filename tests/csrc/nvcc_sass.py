"""Compile one CUDA source with nvcc and read its machine code back, for the SASS tests of tests/csrc.

No GPU is needed: nvcc (CUDA_HOME) compiles a cubin for the asked architecture and the cuobjdump that ships in
triton's wheel disassembles it. Without either tool the calling test is skipped, with the tool named.
"""
import os
import re
import subprocess
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Set, Tuple

import pytest

from ditq.kernels import aot

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")

# ptxas -v, per entry function: "... N bytes spill stores, M bytes spill loads\n ... Used R registers"
_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\S+)'.*?(\d+) bytes spill stores, (\d+) bytes spill loads"
                          r"\s*\n.*?Used (\d+) registers", re.S)


@dataclass
class Cubin:
    """What the tests read of one compiled source."""
    functions: Dict[str, List[tuple]]  # mangled name -> SASS instructions (aot.sass_functions)
    ptxas: Dict[str, Tuple[int, int]]  # mangled name -> (registers, spill bytes), from ptxas -v
    res_usage: str  # cuobjdump -res-usage (REG / STACK / SHARED / LOCAL per function)
    log: str  # nvcc's stderr (ptxas -v and its warnings)
    ptx: str = ""  # the PTX, when asked for
    serialized: Set[str] = field(default_factory=set)  # functions whose wgmma ptxas serialized (warning C7514)


def tools():
    """(nvcc, cuobjdump), or skip the calling test saying which is missing."""
    nvcc, cuobjdump = aot.nvcc_path(), aot.cuobjdump_path()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME): cannot compile csrc")
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (it ships in triton's wheel, or pip install nvidia-cuda-cuobjdump)")
    return nvcc, cuobjdump


def compile_cuda(source: str, arch: str, out_dir, include: str = CSRC, ptx: bool = False,
                 flags: Sequence[str] = ("--expt-relaxed-constexpr",)) -> Cubin:
    """Compile ``source`` (a path, or a file name in csrc/) for ``arch`` (e.g. "sm_90a") into ``out_dir`` at -O3
    with ptxas -v, headers from ``include``; ``ptx``: also emit the PTX. A compile error fails the test with
    nvcc's message."""
    nvcc, cuobjdump = tools()
    path = source if os.path.isabs(source) else os.path.join(CSRC, source)
    stem = os.path.join(str(out_dir), f"{os.path.basename(path)}_{arch}")
    common = [nvcc, f"-arch={arch}", "-O3", "-std=c++17", *flags, "-I", include, path]
    r = subprocess.run(common + ["-cubin", "-Xptxas", "-v", "-o", stem + ".cubin"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    text = ""
    if ptx:
        p = subprocess.run(common + ["-ptx", "-o", stem + ".ptx"], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-4000:]
        text = open(stem + ".ptx").read()

    def dump(what):
        return subprocess.run([cuobjdump, what, stem + ".cubin"], capture_output=True, text=True, check=True).stdout
    ptxas = {m.group(1): (int(m.group(4)), int(m.group(2)) + int(m.group(3))) for m in _PTXAS_ENTRY.finditer(r.stderr)}
    return Cubin(aot.sass_functions(dump("-sass")), ptxas, dump("-res-usage"), r.stderr, text,
                 set(re.findall(r"C7514\).*?in the function '(\S+)'", r.stderr)))


def count(instructions, opcode_re: str) -> int:
    """How many of ``instructions`` (strings "OPCODE operands") match ``opcode_re``."""
    return sum(1 for i in instructions if re.search(opcode_re, i))


def by_key(cubin: Cubin, key) -> Dict[object, List[str]]:
    """{key(mangled name): ["OPCODE operands", ...]} of every function, the instances a key merges joined."""
    out = {}
    for name, instrs in cubin.functions.items():
        out.setdefault(key(name), []).extend(f"{op} {operands}".rstrip() for _, op, operands in instrs)
    return out

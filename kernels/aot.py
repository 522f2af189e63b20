"""Ahead-of-time compilation of Triton kernels for a GPU we do not have, and what their SASS says.

No GPU runs our CI, but Triton compiles for any target, and the machine code shows what
decides a kernel's speed before it ever runs: tensor-core instructions (``IMMA`` = ``mma.sync``,
``IGMMA`` = Hopper ``wgmma``), register count and spills (``LDL``/``STL``, stack: ptxas decides those,
the PTX cannot show them), shared memory, and global load widths (16-byte ``LDG.E.128`` /
``LDGSTS...128``, TMA ``UTMALDG``, or slow byte loads ``LDG.E.U8``).

Usage::

    c = compile_kernel(w8a8.w8a8_kernel, signature={"a": "*i8", ..., "K": "i32"},
                       constexprs={"BM": 128, ...}, cc=90, num_warps=8, num_stages=3, aligned=("a", "K"))
    s = sass_stats(c)   # s.registers, s.spills, s.igmma, s.ldg, s.loop_ops ...

Compiles run in a subprocess: ``TRITON_INTERPRET=1`` (set by the tests) turns ``@triton.jit`` functions
into interpreter objects at import time, so the kernel's module is re-imported there with the variable
removed. A kernel is named by its module (or, for kernels defined in a file that is not importable, such
as a test, that file's path) and its name. Results are cached in-process and by Triton's own on-disk
cache, so asking twice is cheap; :func:`compile_many` compiles a list in one subprocess (one Triton import).

This module is the one SASS toolchain of the project: the AOT tests, the csrc SASS tests and
``benchmarks/static_report.py`` all use its tool finders (:func:`nvcc_path`, :func:`cuobjdump_path`), its
parsers (:func:`parse_sass`, :func:`sass_functions` for a listing holding several kernels, as nvcc builds,
:func:`parse_res_usage`), its definition of the main loop (:func:`main_loop`) and its list of what ships
(:func:`shipped_jobs`: every tile table entry as the kernel's ``aot_job`` describes its launch).

``aligned`` names the arguments to mark 16-byte divisible (``tt.divisibility = 16``), which is what
Triton's JIT infers at launch for 16-byte aligned pointers and integers divisible by 16. Leave an argument
out to model a launch where it is not.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

_CACHE: Dict[str, "Compiled"] = {}
_WORK_DIR = None


class AOTError(RuntimeError):
    """An ahead-of-time compile or SASS disassembly failed."""


@dataclasses.dataclass(frozen=True)
class Compiled:
    """One kernel compiled for one target: its PTX, the path of its cubin, and Triton's metadata."""
    name: str
    cc: int
    num_warps: int
    num_stages: int
    ptx: str
    cubin_path: str
    shared: int  # bytes of shared memory per CTA (Triton's metadata: dynamic shared memory)


@dataclasses.dataclass(frozen=True)
class SassStats:
    """What the SASS of a cubin says about the kernel (counts are static instruction counts)."""
    registers: int
    stack: int            # bytes of stack (local memory frame): > 0 usually means spills
    local: int            # bytes of local memory
    shared: int           # bytes of shared memory (static from cuobjdump + Triton's dynamic)
    spills: int           # LDL + STL instructions
    imma: int             # IMMA.* (mma.sync int8)
    igmma: int            # IGMMA.* (wgmma int8)
    ldg: Dict[str, int]   # global load opcodes with modifiers, e.g. {"LDG.E.128": 4, "LDG.E.U8": 64}
    ldgsts: Dict[str, int]  # async global->shared copies, e.g. {"LDGSTS.E.BYPASS.128": 16}
    utmaldg: int          # TMA loads
    sts: int              # STS.* (stores to shared memory)
    loop_len: int         # instructions in the main loop (0 if no loop holding MMAs was found)
    loop_ops: Dict[str, int]  # opcode (first dotted part) -> count inside the main loop
    total: int            # instructions in the kernel

    @property
    def wide_loads(self) -> int:
        """16-byte global loads: ``LDG.E.128``-style, 16-byte ``LDGSTS``, plus TMA loads."""
        return (sum(v for k, v in self.ldg.items() if k.endswith(".128"))
                + sum(v for k, v in self.ldgsts.items() if k.endswith(".128")) + self.utmaldg)

    @property
    def byte_loads(self) -> int:
        """Sub-word global loads (``LDG.E.U8`` / ``.S8`` / ``.U16`` / ``.S16``): the sign of unaligned rows."""
        return sum(v for k, v in self.ldg.items() if re.search(r"\.(U8|S8|U16|S16)$", k))

    def summary(self) -> str:
        return (f"regs={self.registers} stack={self.stack} spills={self.spills} smem={self.shared} "
                f"imma={self.imma} igmma={self.igmma} ldg={dict(self.ldg)} ldgsts={dict(self.ldgsts)} "
                f"utmaldg={self.utmaldg} sts={self.sts} loop={self.loop_len} total={self.total}")


def tools_dir() -> str:
    """Folder of the cuobjdump / nvdisasm / ptxas that ship inside triton's wheel."""
    import importlib.util

    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.origin:
        raise AOTError("triton is not installed")
    return os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin")


def _cuda_tool(name: str) -> Optional[str]:
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", name)):
            return os.path.join(home, "bin", name)
    return shutil.which(name)


def nvcc_path() -> Optional[str]:
    """Path of ``nvcc``: ``$CUDA_HOME/bin``, then ``/usr/local/cuda/bin``, then ``PATH``; None when absent.
    (Triton's wheel ships no nvcc; the csrc SASS tests need one to build ``csrc/*.cu`` for sm_80 / sm_90a.)"""
    return _cuda_tool("nvcc")


def cuobjdump_path() -> Optional[str]:
    """Path of ``cuobjdump``: the one in triton's wheel (:func:`tools_dir`, what :func:`sass_stats` runs) when
    triton is installed, so every SASS listing comes from the same tool; else ``$CUDA_HOME/bin``, then
    ``/usr/local/cuda/bin``, then ``PATH``; None when absent."""
    try:
        path = os.path.join(tools_dir(), "cuobjdump")
    except AOTError:
        path = None
    if path and os.path.exists(path):
        return path
    return _cuda_tool("cuobjdump")


def nvcc_version() -> Optional[str]:
    """``nvcc --version``'s release number ("12.8"), or None without nvcc."""
    path = nvcc_path()
    if path is None:
        return None
    m = re.search(r"release ([\d.]+)", subprocess.run([path, "--version"], capture_output=True, text=True).stdout)
    return m.group(1) if m else "?"


# ---- what ships: every table entry as a compile job ------------------------------------------------------

ARCH_CC = {"sm80": 80, "sm90": 90}


def shipped_jobs(kernel: str, archs: Sequence[str] = ("sm80", "sm90"), group_sizes: Optional[Sequence[int]] = None,
                 m: Optional[int] = None, fused: str = "", a_float: str = "",
                 int_scales: bool = False) -> List[Tuple[str, Dict, Optional[int], Dict]]:
    """``[(arch, table entry, group size or None, job)]`` for every shipped configuration of ``kernel``
    ("w8a8" or "w4a8"): each entry of ``configs/<kernel>_<arch>.json`` (only the one the launcher picks at
    ``m`` rows when given), at each group size (W4A8: default all it supports), as the kernel's own
    ``aot_job`` describes the launch. ``fused``: the GEMM with those fused epilogue pieces (``"gelu+quant"``,
    ``"gate+residual"``...: ``epilogue.PIECES``); "" = the plain GEMM. ``a_float`` (e.g. ``"bf16"``): the GEMM
    taking a float A of that type and quantizing it on load. ``int_scales``: W4A8 with integer group scales
    (``INT_SCALES``). The AOT tests and ``benchmarks/static_report.py`` compile this list."""
    import importlib

    from . import config_table

    mod = importlib.import_module(f"{__package__}.{kernel}")
    groups = [None] if not hasattr(mod, "GROUP_SIZES") else list(group_sizes or mod.GROUP_SIZES)
    out = []
    for arch in archs:
        table = config_table.load_table(kernel, arch)
        entries = table if m is None else [config_table.pick(table, m)]
        for entry in entries:
            for g in groups:
                kw = {} if g is None else {"group_size": g}
                if fused:
                    kw["fused"] = fused
                if a_float:
                    kw["a_float"] = a_float
                if int_scales:
                    kw["int_scales"] = True
                out.append((arch, entry, g, mod.aot_job(config_table.params(entry), ARCH_CC[arch], **kw)))
    return out


def _work_dir() -> str:
    global _WORK_DIR
    if _WORK_DIR is None:
        _WORK_DIR = tempfile.mkdtemp(prefix="ditq_aot_")
    return _WORK_DIR


def _kernel_ref(fn) -> Dict[str, str]:
    """How a subprocess finds ``fn``: module name, source file, and the kernel's name."""
    inner = getattr(fn, "fn", fn)  # JITFunction / InterpretedFunction wrap the Python function
    return {"module": inner.__module__, "file": os.path.abspath(inner.__code__.co_filename),
            "name": inner.__name__}


def _job(fn, signature, constexprs, cc, num_warps, num_stages, aligned) -> Dict:
    sig = dict(signature)
    for k in constexprs:
        sig[k] = "constexpr"
    return {"kernel": _kernel_ref(fn), "signature": sig, "constexprs": dict(constexprs), "cc": int(cc),
            "num_warps": int(num_warps), "num_stages": int(num_stages), "aligned": sorted(aligned)}


def compile_many(jobs: Sequence[Dict]) -> List[Compiled]:
    """Compile several jobs (dicts with the arguments of :func:`compile_kernel`) in one subprocess."""
    specs = [_job(j["fn"], j["signature"], j.get("constexprs", {}), j["cc"], j.get("num_warps", 4),
                  j.get("num_stages", 3), j.get("aligned", ())) for j in jobs]
    keys = [json.dumps(s, sort_keys=True) for s in specs]
    todo = [(k, s) for k, s in dict(zip(keys, specs)).items() if k not in _CACHE]
    if todo:
        out_dir = tempfile.mkdtemp(dir=_work_dir())
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        proc = subprocess.run([sys.executable, "-m", "ditq.kernels.aot", out_dir],
                              input=json.dumps([s for _, s in todo]), capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise AOTError(f"AOT compile failed:\n{proc.stderr[-4000:]}")
        results = json.loads(proc.stdout.strip().splitlines()[-1])
        for (key, spec), r in zip(todo, results):
            with open(r["ptx_path"]) as f:
                ptx = f.read()
            _CACHE[key] = Compiled(name=r["name"], cc=spec["cc"], num_warps=spec["num_warps"],
                                   num_stages=spec["num_stages"], ptx=ptx, cubin_path=r["cubin_path"],
                                   shared=r["shared"])
    return [_CACHE[k] for k in keys]


def compile_kernel(fn, signature: Dict[str, str], constexprs: Optional[Dict] = None, cc: int = 90,
                   num_warps: int = 4, num_stages: int = 3, aligned: Iterable[str] = ()) -> Compiled:
    """Compile a ``@triton.jit`` kernel for compute capability ``cc`` (80, 89, 90...) without a GPU.

    ``signature``: Triton type of every non-constexpr argument (``"*i8"``, ``"*bf16"``, ``"i32"``,
    ``"fp32"``, ``"tensordesc<i8[128, 128]>"``...); ``constexprs``: values of the constexpr arguments;
    ``aligned``: arguments known 16-byte divisible (see the module docstring).
    """
    return compile_many([dict(fn=fn, signature=signature, constexprs=constexprs or {}, cc=cc,
                              num_warps=num_warps, num_stages=num_stages, aligned=aligned)])[0]


# ---- SASS analysis -------------------------------------------------------------------------------------

_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_BRANCH_TARGET = re.compile(r"(0x[0-9a-f]+)\s*$")  # last operand: "0x1250", "!UP0, 0x1250", "UR4, 0x1250"
_FUNCTION = re.compile(r"^\s*Function : (\S+)", re.M)
_RES_FUNCTION = re.compile(r"^\s*Function (\S+):", re.M)
_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
MMA_OPCODES = ("IMMA", "IGMMA", "HMMA", "HGMMA", "QGMMA", "GMMA")


def disassemble(cubin_path: str) -> Tuple[str, str]:
    """(``cuobjdump -sass``, ``cuobjdump -res-usage``) of a cubin, with :func:`cuobjdump_path`'s tool."""
    tool = cuobjdump_path()
    if tool is None:
        raise AOTError("cuobjdump not found (it ships in triton's wheel, or pip install nvidia-cuda-cuobjdump)")
    out = []
    for flag in ("-sass", "-res-usage"):
        proc = subprocess.run([tool, flag, cubin_path], capture_output=True, text=True)
        if proc.returncode != 0:
            raise AOTError(f"cuobjdump {flag} {cubin_path} failed: {proc.stderr.strip()}")
        out.append(proc.stdout)
    return out[0], out[1]


def parse_sass(sass: str) -> List[tuple]:
    """[(address, opcode-with-modifiers, operands)] of every instruction in ``cuobjdump -sass`` text (the
    predicate guard, ``@!P0``, is dropped)."""
    return [(int(m.group(1), 16), m.group(3), m.group(4).strip()) for m in _INSTR.finditer(sass)]


def sass_functions(sass: str) -> Dict[str, List[tuple]]:
    """``{mangled kernel name: parse_sass(its instructions)}`` of a ``cuobjdump -sass`` listing holding several
    kernels (an nvcc-built cubin; a Triton cubin holds one)."""
    heads = list(_FUNCTION.finditer(sass))
    out: Dict[str, List[tuple]] = {}
    for head, nxt in zip(heads, heads[1:] + [None]):
        body = sass[head.end():nxt.start() if nxt is not None else len(sass)]
        out.setdefault(head.group(1), []).extend(parse_sass(body))
    return out


def parse_res_usage(text: str) -> Dict[str, Dict[str, int]]:
    """``{function: {"REG", "STACK", "SHARED", "LOCAL"}}`` from ``cuobjdump -res-usage``."""
    heads = list(_RES_FUNCTION.finditer(text))
    out = {}
    for head, nxt in zip(heads, heads[1:] + [None]):
        m = _RES.search(text, head.end(), nxt.start() if nxt is not None else len(text))
        if m:
            out[head.group(1)] = dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, m.groups())))
    return out


def is_mma(opcode: str) -> bool:
    return opcode.split(".")[0] in MMA_OPCODES


def main_loop(instrs) -> List[tuple]:
    """The instructions of the main loop: the smallest backward-branch range that holds a tensor-core
    instruction (a ``BRA`` to a lower address closes a loop; the range runs from its target to the branch).

    Smallest, because a range that merely contains the K loop is not it: out-of-line slow paths placed after
    the kernel's end (e.g. a TMA barrier retry) jump back into the loop and would otherwise swallow the
    epilogue, and an outer loop (split-K, persistent tiles) holds the K loop's MMAs plus its own overhead.
    Empty when no loop holds an MMA (a kernel without tensor cores has no main loop in this sense)."""
    best: List[tuple] = []
    for addr, op, operands in instrs:
        if op.split(".")[0] != "BRA":
            continue
        target = _BRANCH_TARGET.search(operands)
        if not target or int(target.group(1), 16) > addr:
            continue
        dest = int(target.group(1), 16)
        body = [ins for ins in instrs if dest <= ins[0] <= addr]
        if any(is_mma(op) for _, op, _ in body) and (not best or len(body) < len(best)):
            best = body
    return best


def sass_stats(compiled: Compiled) -> SassStats:
    """Disassemble ``compiled``'s cubin (triton's bundled cuobjdump) and count what matters."""
    sass, res_text = disassemble(compiled.cubin_path)
    res = list(parse_res_usage(res_text).values())
    if not res:
        raise AOTError(f"no resource usage line in cuobjdump -res-usage output:\n{res_text}")
    regs, stack, static_shared, local = (res[0][k] for k in ("REG", "STACK", "SHARED", "LOCAL"))
    instrs = parse_sass(sass)
    if not instrs:
        raise AOTError("no instructions found in cuobjdump -sass output")
    ops = collections.Counter(op for _, op, _ in instrs)

    def count(prefix):
        return sum(v for k, v in ops.items() if k == prefix or k.startswith(prefix + "."))

    loop = main_loop(instrs)
    return SassStats(
        registers=regs, stack=stack, local=local, shared=static_shared + compiled.shared,
        spills=count("LDL") + count("STL"), imma=count("IMMA"), igmma=count("IGMMA"),
        ldg={k: v for k, v in ops.items() if k == "LDG" or k.startswith("LDG.")},
        ldgsts={k: v for k, v in ops.items() if k.startswith("LDGSTS")},
        utmaldg=count("UTMALDG"), sts=count("STS"), loop_len=len(loop),
        loop_ops=dict(collections.Counter(op.split(".")[0] for _, op, _ in loop)), total=len(instrs))


# ---- the subprocess side -------------------------------------------------------------------------------

def _import_kernel(ref: Dict[str, str]):
    import importlib
    import importlib.util

    try:
        mod = importlib.import_module(ref["module"])
    except ImportError:
        spec = importlib.util.spec_from_file_location(f"_ditq_aot_{abs(hash(ref['file']))}", ref["file"])
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return getattr(mod, ref["name"])


def _worker(out_dir: str) -> None:
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "AOT compiles need the interpreter off"
    import triton
    from triton.backends.compiler import GPUTarget

    results = []
    for i, spec in enumerate(json.load(sys.stdin)):
        fn = _import_kernel(spec["kernel"])
        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in spec["aligned"]}
        src = triton.compiler.ASTSource(fn=fn, signature=spec["signature"], constexprs=spec["constexprs"],
                                        attrs=attrs)
        c = triton.compile(src, target=GPUTarget("cuda", spec["cc"], 32),
                           options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
        base = os.path.join(out_dir, f"{i}_{spec['kernel']['name']}_sm{spec['cc']}")
        with open(base + ".cubin", "wb") as f:
            f.write(c.asm["cubin"])
        with open(base + ".ptx", "w") as f:
            f.write(c.asm["ptx"])
        results.append({"name": c.metadata.name, "shared": int(c.metadata.shared),
                        "cubin_path": base + ".cubin", "ptx_path": base + ".ptx"})
    print(json.dumps(results))


if __name__ == "__main__":
    _worker(sys.argv[1])

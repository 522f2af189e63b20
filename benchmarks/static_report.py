"""What the compiled kernels look like, measured on a CPU: no GPU needed.

For every shipped kernel configuration:

* Triton: each entry of ``kernels/configs/<kernel>_<sm80|sm90>.json`` (W4A8: at each group size), compiled
  ahead of time for cc 80 / 90 through ``ditq.kernels.aot`` (``aot.shipped_jobs``: what the AOT tests compile);
* CUDA: the kernels in the extension's embedded cubins (``ditq/_C*.so``, sm_80 / sm_90a); when the extension is
  not built, the torch-free ``csrc/*.cu`` compiled here by nvcc (the same sources, the same flags' essentials);

it reports registers, stack, spill instructions, shared memory, the occupancy that follows (A100 limits for
sm_80 code, H100 for sm_90), tensor-core instruction counts and the main loop's instruction mix per MMA,
then, per DiT-XL/2 shape, a roofline bound with the tile each table picks. SASS parsing, the main-loop
definition and the tool finders are ``ditq.kernels.aot``'s, the same the tests use. What cannot be measured
here (no extension, no nvcc, a failed compile) becomes a row that says so, never a crash; the CI smoke test
fails on a Triton row that did not compile.

    python benchmarks/static_report.py            # full: every config, both architectures
    python benchmarks/static_report.py --short    # CI: sm_90, the configs picked at M = 4096, no nvcc
    python benchmarks/static_report.py --update-results   # also rewrite the table in benchmarks/RESULTS.md
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from ditq.kernels import aot, config_table, w4a8  # noqa: E402

REPO = common.REPO
CSRC = os.path.join(REPO, "csrc")
ARCH_GPU = {"sm80": "A100-SXM", "sm90": "H100-SXM"}
ARCH_CC = aot.ARCH_CC
NVCC_ARCH = {"sm80": "sm_80", "sm90": "sm_90a"}
ROOFLINE_M = (16, 512, 4096)  # batch-1 adaLN-scale, 1 image at 256 px with CFG, 8 images
W4_GROUP = 128  # the w4a8 preset's group size, used for the roofline's bytes
SHORT_M = 4096  # --short: only the configurations picked at this M (DiT-XL/2, 8 images at 256 px with CFG)
ADALN_M = 16  # the adaLN GEMMs' rows at the same batch (one per image and guidance branch)
LIMITS = {"regs_per_sm": 65536, "threads_per_sm": 2048, "ctas_per_sm": 32, "reg_alloc_unit": 256,
          "smem_reserved_per_cta": 1024}


# ---- tools --------------------------------------------------------------------------------------------

def _out(cmd: List[str], timeout: int = 600) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode:
        lines = (r.stderr or r.stdout or "").strip().splitlines()
        err = [ln for ln in lines if "error" in ln.lower()]  # the first error says more than the last line
        raise RuntimeError((err or lines or [f"{os.path.basename(cmd[0])} exited {r.returncode}"])[0].strip())
    return r.stdout


def demangle(names: List[str]) -> Dict[str, str]:
    if not names or not shutil.which("c++filt"):
        return {n: n for n in names}
    r = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    outs = r.stdout.splitlines()
    return dict(zip(names, outs)) if len(outs) == len(names) else {n: n for n in names}


# ---- SASS classes (parsing and the main loop are ditq.kernels.aot's) -----------------------------------

_CLASSES = [  # (class, opcode bases); first match wins
    ("mma", aot.MMA_OPCODES),
    ("local (spill)", ("LDL", "STL")),
    ("shared load", ("LDS", "LDSM")),
    ("shared store", ("STS", "STSM")),
    ("global load", ("LDG", "LDGSTS", "UTMALDG", "UBLKCP")),
    ("global store/atomic", ("STG", "UTMASTG", "RED", "ATOM", "ATOMG", "REDG")),
    ("conversion", ("I2F", "F2I", "F2F", "I2FP", "F2FP", "I2I", "FRND", "I2IP")),
    ("float", ("FFMA", "FMUL", "FADD", "FMNMX", "FSETP", "FSEL", "FCHK", "MUFU", "HFMA2", "HADD2", "HMUL2",
               "HMNMX2", "DFMA", "DADD", "DMUL", "FSWZADD")),
    ("int/bit", ("IADD3", "IADD", "IMAD", "IMUL", "LOP3", "LOP", "SHF", "SHL", "SHR", "PRMT", "LEA", "ISETP",
                 "IMNMX", "VIMNMX", "IABS", "SEL", "BFE", "BFI", "POPC", "FLO", "BMSK", "SGXT", "VIADD", "IDP",
                 "IDP4A", "BREV")),
    ("barrier/sync", ("BAR", "DEPBAR", "WARPGROUP", "SYNCS", "MEMBAR", "ARRIVES", "WARPSYNC", "ERRBAR",
                      "LDGDEPBAR", "FENCE", "CCTL")),
    ("move/special", ("MOV", "S2R", "S2UR", "CS2R", "R2UR", "LDC", "SHFL", "P2R", "R2P", "VOTE", "VOTEU",
                      "MOVM")),
    ("control", ("BRA", "EXIT", "BSSY", "BSYNC", "NOP", "CALL", "RET", "YIELD", "PLOP3", "JMP", "BRX",
                 "ELECT", "ACQBULK")),
]
CLASS_NAMES = [c for c, _ in _CLASSES] + ["uniform", "other"]
_BYTES = {"128": 16, "64": 8, "U8": 1, "S8": 1, "U16": 2, "S16": 2}


def classify(op: str) -> str:
    base = op.split(".")[0]
    for cls, bases in _CLASSES:
        if base in bases:
            return cls
    if base.startswith("U"):
        return "uniform"  # uniform-datapath scalar work (addresses, loop counters)
    return "other"


def load_width(op: str) -> Optional[int]:
    """Bytes per thread of a global load (TMA: the bulk copy, reported as 'tma')."""
    base = op.split(".")[0]
    if base not in ("LDG", "LDGSTS"):
        return None
    for tok in op.split(".")[1:]:
        if tok in _BYTES:
            return _BYTES[tok]
    return 4


def analyze_function(instrs: List[tuple]) -> Dict:
    """Counts over one function's ``aot.parse_sass`` instructions, and the mix of its ``aot.main_loop``."""
    ops = [op for _, op, _ in instrs]
    mma = Counter(o for o in ops if classify(o) == "mma")
    res = {"instructions": len(ops), "mma_instructions": dict(mma),
           "spill_instructions": sum(1 for o in ops if classify(o) == "local (spill)"),
           "global_load_widths": dict(Counter(str(load_width(o)) for o in ops if load_width(o) is not None)),
           "tma_loads": sum(1 for o in ops if o.startswith("UTMALDG")), "main_loop": None}
    loop = aot.main_loop(instrs)
    if loop:
        body = [op for _, op, _ in loop]
        cls = Counter(classify(o) for o in body)
        n_mma = cls.get("mma", 0)
        widths = Counter(load_width(o) for o in body if load_width(o) is not None)
        res["main_loop"] = {
            "start": hex(loop[0][0]), "end": hex(loop[-1][0]), "instructions": len(body), "mma": n_mma,
            "mma_kinds": dict(Counter(o for o in body if classify(o) == "mma")),
            "by_class": {c: cls.get(c, 0) for c in CLASS_NAMES if cls.get(c, 0)},
            "per_mma": {c: round(cls.get(c, 0) / n_mma, 2) for c in CLASS_NAMES if cls.get(c, 0)},
            "non_mma_per_mma": round((len(body) - n_mma) / n_mma, 2),
            "global_loads_by_bytes": {str(k): v for k, v in sorted(widths.items())},
            "tma_loads": sum(1 for o in body if o.startswith("UTMALDG")),
            "prmt": sum(1 for o in body if o.startswith("PRMT")),
            "wgmma_waits": sum(1 for o in body if o.startswith("WARPGROUP.DEPBAR")),
        }
    return res


def occupancy(regs: int, smem: int, threads: int, gpu: str) -> Dict:
    """CTAs and warps per SM from registers, shared memory and threads (what limits it, too)."""
    lim, d = LIMITS, common.DATASHEET[gpu]
    warps = max(1, math.ceil(threads / 32))
    per_warp = math.ceil(max(regs, 1) * 32 / lim["reg_alloc_unit"]) * lim["reg_alloc_unit"]
    smem_cta = smem + lim["smem_reserved_per_cta"]
    by = {"regs": (lim["regs_per_sm"] // per_warp) // warps, "threads": lim["threads_per_sm"] // (warps * 32),
          "smem": d["smem_per_sm"] // smem_cta if smem <= d["smem_per_cta"] else 0,
          "cta limit": lim["ctas_per_sm"]}
    ctas = min(by.values())
    return {"gpu": gpu, "ctas_per_sm": ctas, "warps_per_sm": ctas * warps,
            "limited_by": min(by, key=lambda k: (by[k], k != "cta limit"))}


# ---- cubin sources ------------------------------------------------------------------------------------

def analyze_cubin(path: str) -> Dict[str, Dict]:
    sass, res_text = aot.disassemble(path)
    res = aot.parse_res_usage(res_text)
    return {name: dict(analyze_function(ins), res=res.get(name, {})) for name, ins in aot.sass_functions(sass).items()}


def _cache_dir() -> str:
    d = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "ditq-static-report")
    os.makedirs(d, exist_ok=True)
    return d


def cuda_cubins(archs, compile_sources: bool = True) -> Tuple[Dict[str, List[str]], str]:
    """({arch: [cubin paths]}, where they came from). Raises RuntimeError with the reason when there are none."""
    tool = aot.cuobjdump_path()
    if tool is None:
        raise RuntimeError("cuobjdump not found (it ships in triton's wheel, or pip install nvidia-cuda-cuobjdump)")
    sos = sorted(glob.glob(os.path.join(REPO, "ditq", "_C*.so")))
    if sos:
        tmp = tempfile.mkdtemp(prefix="ditq_cubins_")
        subprocess.run([tool, "-xelf", "all", os.path.abspath(sos[0])], cwd=tmp, capture_output=True)
        found: Dict[str, List[str]] = {}
        for f in sorted(os.listdir(tmp)):  # one cubin per .cu file and architecture
            for arch in archs:
                if re.search(NVCC_ARCH[arch] + r"\b", f) and f.endswith(".cubin"):
                    found.setdefault(arch, []).append(os.path.join(tmp, f))
        if found:
            return found, f"embedded in {os.path.relpath(sos[0], REPO)}"
        why_so = f"{os.path.relpath(sos[0], REPO)} holds no sm_80/sm_90a cubin (a CPU-only build)"
    else:
        why_so = "ditq/_C*.so is not built"
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cu")))
    if not compile_sources:
        raise RuntimeError(f"{why_so}; --short does not compile csrc/*.cu (nvcc takes a minute here): run "
                           f"without --short, or build the extension")
    if not sources:
        raise RuntimeError(f"{why_so}, and csrc/ has no .cu file")
    cc = aot.nvcc_path()
    if cc is None:
        raise RuntimeError(f"{why_so}, and nvcc is not found to compile csrc/*.cu")
    # Cache by the sources' content: nvcc takes tens of seconds on a shared 2-core machine.
    h = hashlib.sha256()
    for p in sorted(glob.glob(os.path.join(CSRC, "**", "*"), recursive=True)):
        if os.path.isfile(p) and p.endswith((".cu", ".cuh", ".h")):
            h.update(p.encode() + open(p, "rb").read())
    found = {}
    for arch in archs:
        for src in sources:
            out = os.path.join(_cache_dir(), f"{os.path.basename(src)}.{h.hexdigest()[:16]}.{NVCC_ARCH[arch]}.cubin")
            if not os.path.exists(out):
                tmp = out + f".{os.getpid()}.tmp"
                try:
                    _out([cc, "-cubin", "-arch", NVCC_ARCH[arch], "-O3", "-std=c++17", "-lineinfo",
                          "--expt-relaxed-constexpr", "-DDITQ_WITH_CUDA=1", "-I", CSRC, src, "-o", tmp])
                except RuntimeError as e:
                    raise RuntimeError(f"{why_so}; compiling {os.path.relpath(src, REPO)} failed: {e}")
                os.replace(tmp, out)
            found.setdefault(arch, []).append(out)
    return found, f"{why_so}: compiled csrc/*.cu here with nvcc"


def cuda_tiles() -> Tuple[Dict[int, Tuple[int, ...]], List[Tuple[int, int, int, int, int]]]:
    """({tile id: (BM, BN, BK, WARPS_M, WARPS_N, STAGES)}, [(arch_min, max_m, w8 tile, w4 tile, max_splits)]) from
    csrc/configs/gemm_tiles.h: the mma.sync tiles, the rules that pick them and the cap on the automatic split
    count per rule."""
    path = os.path.join(CSRC, "configs", "gemm_tiles.h")
    if not os.path.exists(path):
        return {}, []
    text = open(path).read()
    tiles = {int(r[0]): tuple(int(v) for v in r[1:])
             for r in re.findall(r"X\((\d+),\s*(\d+),\s*(\d+),\s*(\d+),\s*(\d+),\s*(\d+),\s*(\d+)\)", text)}
    rules = [tuple(int(v) for v in r) for r in
             re.findall(r"\{\s*(\d+),\s*(-?\d+),\s*(\d+),\s*(\d+),\s*(\d+)\s*\}",
                        text.split("kTileRules[]", 1)[-1].split(";", 1)[0])]
    return tiles, rules


def header_int(header: str, name: str) -> int:
    """The value of ``constexpr int <name> = <value>;`` in csrc/configs/<header>: the table's constants are read
    from the one place the build reads them, never repeated here."""
    text = open(os.path.join(CSRC, "configs", header)).read()
    found = re.search(r"constexpr\s+int\s+" + re.escape(name) + r"\s*=\s*(\d+)\s*;", text)
    if not found:
        raise ValueError(f"csrc/configs/{header} defines no 'constexpr int {name} = ...;'")
    return int(found.group(1))


MMA_MAX_SPLITS = header_int("gemm_tiles.h", "kMaxSplits")  # the default cap


def mma_auto_splits(ctas: int, units: int, sms: int, max_splits: int = MMA_MAX_SPLITS) -> int:
    """The mma.sync kernels' automatic split count (csrc/gemm_tiles.cpp auto_splits) for a grid of ``ctas`` output
    tiles: two waves' worth of CTAs (ceil(2 x sms / ctas)), at most ``max_splits`` (the rule's column of
    kTileRules), at most the k units, at least 1. Every tile is split that many ways (a uniform split)."""
    return max(1, min(-(-2 * sms // max(ctas, 1)), max_splits, units))


def sm90_tiles() -> Tuple[Dict[str, List[Tuple[int, ...]]], List[Tuple[int, int, int, int]]]:
    """({"w8": [(BM, BN, STAGES, CONSUMERS)], "w4": [...]} in list order, [(max_m, w8 index, w4 index,
    max_splits)]) from csrc/configs/gemm_tiles_sm90.h: the Hopper tiles, the rules that pick them and the cap on
    the automatic split count per M bucket."""
    path = os.path.join(CSRC, "configs", "gemm_tiles_sm90.h")
    if not os.path.exists(path):
        return {"w8": [], "w4": []}, []
    text = open(path).read()
    w8_text, w4_text = text.split("#define DITQ_GEMM_SM90_W4_TILES", 1)
    entry = r"X\((\d+),\s*(\d+),\s*(\d+),\s*(\d+),\s*(\d+)\)"
    tiles = {name: [tuple(int(v) for v in r[1:]) for r in re.findall(entry, part.split("namespace", 1)[0])]
             for name, part in (("w8", w8_text.split("#define DITQ_GEMM_SM90_W8_TILES", 1)[-1]), ("w4", w4_text))}
    rules = [tuple(int(v) for v in r) for r in re.findall(r"\{\s*(-?\d+),\s*(-?\d+),\s*(-?\d+),\s*(\d+)\s*\}",
                                                        text.split("kSm90TileRules[]", 1)[-1].split(";", 1)[0])]
    return tiles, rules


SM90_MAX_SPLITS = header_int("gemm_tiles_sm90.h", "kSm90MaxSplits")  # the default cap


def sm90_auto_schedule(tiles: int, units: int, sms: int, max_splits: int = SM90_MAX_SPLITS) -> Tuple[int, int]:
    """(dp_tiles, splits): the Hopper kernels' automatic schedule (csrc/configs/gemm_tiles_sm90.h,
    sm90_auto_schedule): the full waves' tiles run whole, the R = tiles % sms tiles of the last wave are split
    S = min(sms // R, max_splits, k units) ways when S >= 2; no split otherwise. Under one wave (dp_tiles = 0)
    that is a uniform split of every tile. ``max_splits``: the M bucket's column of kSm90TileRules."""
    tail = tiles % sms if tiles > 0 and sms > 0 else 0
    s = min(sms // tail, max_splits, units) if tail else 1
    return (tiles - tail, s) if s >= 2 else (tiles, 1)


def sm90_forced_schedule(tiles: int, splits: int, sms: int) -> Tuple[int, int]:
    """(dp_tiles, splits) of a forced count (sm90_forced_schedule): the last wave's 1 .. sms tiles split
    ``splits`` ways, the full waves before it whole (under one wave, and at exactly one, every tile)."""
    if tiles <= 0 or sms <= 0 or splits <= 1:
        return tiles, 1
    return tiles - (tiles - (tiles - 1) // sms * sms), splits


def sm90_tile_times(tiles: int, dp_tiles: int, splits: int, sms: int) -> float:
    """How long a schedule runs, in the time of one whole tile, if every CTA takes its share of a tile's work
    (a whole tile 1, a slice 1 / splits) and the SMs take CTAs in launch order: whole tiles' waves, then the
    slices' waves. The reduction's round trip through the workspace is :func:`split_reduce_us`."""
    if splits <= 1:
        return float(math.ceil(tiles / sms))
    # whole tiles' waves (whole waves in the automatic schedule), then the slices' waves of 1 / splits each
    return math.ceil(dp_tiles / sms) + math.ceil((tiles - dp_tiles) * splits / sms) / splits


# The reductions' cost. A split tile's partials go through L2 (the workspace of a DiT shape is a few MB, far under
# H100's 50 MB), and one SM moves a tile's partials by itself, so the rate that counts is one SM's share of L2,
# not the chip's: an SM's L1 <-> L2 path moves about 64 B per clock (an assumption, not a measurement; the tail's
# few reducing SMs are far from the chip-wide L2 limit, about 5.5 TB/s measured on H100 PCIe, which caps the
# total). At the int8 datasheet clock (1979 TOP/s = 132 SMs x 8192 ops x 1.83 GHz) that is ~117 GB/s per SM.
SM_CLOCK_HZ = 1.83e9
L2_BYTES_PER_CLK_SM = 64
L2_BYTES_S = 5.5e12
PARTIAL_BYTES = 4  # int32 (W8) and fp32 (W4) partials alike


def split_reduce_us(kind: str, bm: int, bn: int, m: int, n: int, tiles: int, dp_tiles: int, splits: int,
                    sms: int) -> float:
    """Microseconds a split launch adds to its tiles' main loops: every slice stores its BM x BN partial, then

    * Hopper (``kind`` "cuda wgmma", one launch): the last CTA of each split tile reads all S partials back and
      adds them, alone, after its own slice: (1 + S) x BM x BN x 4 bytes serial on one SM, at the end of the
      tail wave (the reductions of the tiles split together run at once, on their own SMs); the partials are
      whole BM x BN tiles, rows past M too;
    * Triton (``kind`` "triton", two launches): the split programs store [S, M, N] (one BM x BN tile each, in
      parallel), then the reduce launch's programs (one per tile, in waves of SMs) read their S partials: the
      same (1 + S) x BM x BN x 4 bytes per SM (masked to M x N), with the reduce's waves; the launch itself is
      not counted (this
      report models no launch overhead; a second launch adds a few µs on a real GPU).

    Each at least the chip-wide L2 time of all the bytes ((1 + S) x the workspace's M x N x 4, Triton; the split
    tiles' share, Hopper). 0 for an unsplit launch."""
    if splits <= 1:
        return 0.0
    per_sm = L2_BYTES_PER_CLK_SM * SM_CLOCK_HZ
    tile_bytes = bm * bn * PARTIAL_BYTES  # Hopper: the whole tile's accumulators, rows past M included
    split_tiles = tiles - dp_tiles
    if kind == "triton":
        tile_bytes = min(bm, m) * min(bn, n) * PARTIAL_BYTES  # Triton's partials are masked to M x N
        waves = math.ceil(tiles / sms)  # the reduce launch: one program per tile
        total = (1 + splits) * m * n * PARTIAL_BYTES
        return max(tile_bytes / per_sm + waves * splits * tile_bytes / per_sm, total / L2_BYTES_S) * 1e6
    total = (1 + splits) * split_tiles * tile_bytes
    return max((1 + splits) * tile_bytes / per_sm, total / L2_BYTES_S) * 1e6


def _cuda_kernel_meta(demangled: str, tiles) -> Optional[Dict]:
    h = re.search(r"Sm90Tile<(\d+), ?(\d+), ?(\d+), ?(\d+)>(?:, ?(\d+))?", demangled)  # gemm_sm90.cuh
    if h:
        (bm, bn, st, c), g = (int(v) for v in h.groups()[:4]), h.group(5)
        w4 = "wgmma-w4a8i" if "gemm_w4a8i_sm90" in demangled else "wgmma-w4a8"  # i: integer group scales
        kernel = (f"{w4} g{g}" if g else "wgmma-w8a8") + (" +fused" if "FusedEpilogue" in demangled else "")
        return {"kernel": kernel, "tile": None, "BM": bm, "BN": bn, "BK": 128,
                "threads": 128 * (1 + c), "dyn_smem": st * (bm * 128 + bn * (64 if g else 128) + 16), "sm90": True,
                "config": f"sm90 {bm}x{bn}x128, {c} consumer warpgroup(s), {st} stages"}
    m = re.search(r"Tile<(\d+), ?(\d+), ?(\d+), ?(\d+), ?(\d+), ?(\d+)>", demangled)
    if not m:
        return None
    shape = tuple(int(v) for v in m.groups())
    g = re.search(r"W4<(\d+)>", demangled)
    tid = next((t for t, s in tiles.items() if s == shape), None)
    bm, bn, bk, wm, wn, st = shape
    group = int(g.group(1)) if g else None
    # Dynamic shared memory as gemm_tiles.h documents it: STAGES * (BM * BK + BN * BK / (W4 ? 2 : 1)).
    smem = st * (bm * bk + (bn * bk) // (2 if group else 1))
    kernel = f"w4a8 g{group}" if group else "w8a8"
    # gemm_kernel<Tile, WOp, Epilogue, A element>: the fused-epilogue instances, and those taking a float A
    if "FusedEpilogue" in demangled:
        kernel += " +fused"
    a_type = re.search(r"Epilogue, ?(float|__half|__nv_bfloat16)>", demangled)
    if a_type:
        kernel += " +float-A " + {"float": "fp32", "__half": "fp16", "__nv_bfloat16": "bf16"}[a_type.group(1)]
    return {"kernel": kernel, "tile": tid, "BM": bm, "BN": bn, "BK": bk,
            "threads": wm * wn * 32, "dyn_smem": smem,
            "config": f"tile {tid}: {bm}x{bn}x{bk}, warps {wm}x{wn}, {st} stages"}


def _short_name(demangled: str) -> str:
    """``void ditq::qact::k<float, true>(Params)`` -> ``qact::k<float, true>``."""
    name = demangled.split("(", 1)[0] if not demangled.startswith("void ") else demangled[5:].split("(", 1)[0]
    return name.replace("(anonymous namespace)::", "").replace("ditq::", "").strip()


def cuda_rows(archs, short: bool = False) -> Tuple[List[Dict], str]:
    try:
        cubins, source = cuda_cubins(archs, compile_sources=not short)
    except Exception as e:
        return [{"family": "cuda", "arch": a, "kernel": "all", "status": f"not built: {e}"} for a in archs], str(e)
    tiles, _ = cuda_tiles()
    rows = []
    for arch in archs:
        if arch not in cubins:
            rows.append({"family": "cuda", "arch": arch, "kernel": "all", "status": f"no {NVCC_ARCH[arch]} cubin"})
            continue
        try:
            funcs = {}
            for path in cubins[arch]:
                funcs.update(analyze_cubin(path))
        except Exception as e:
            rows.append({"family": "cuda", "arch": arch, "kernel": "all", "status": f"cuobjdump failed: {e}"})
            continue
        names = demangle(list(funcs))
        _, rules = cuda_tiles()
        rule = next((r for r in rules if r[0] <= ARCH_CC[arch] and (r[1] < 0 or SHORT_M <= r[1])), None)
        picked = set(rule[2:4]) if short and rule else set()  # the w8 and w4 tiles
        found = []
        for name, a in funcs.items():
            if "sm90a_marker_kernel" in names[name]:
                continue  # never launched: its launch bound only tells which pass was loaded (csrc/sm90a_marker.cuh)
            meta = _cuda_kernel_meta(names[name], tiles)
            if meta and meta.get("sm90") and (arch != "sm90" or short and meta["kernel"] not in (
                    "wgmma-w8a8", f"wgmma-w4a8 g{W4_GROUP}", f"wgmma-w4a8i g{W4_GROUP}")):
                continue  # the Hopper kernels are traps in the sm_80 pass; --short: every tile, w8a8 and one group
            if meta is None:  # not a GEMM tile (e.g. the activation quantizer): no tile, threads unknown
                if short and "bfloat16" not in names[name]:
                    continue  # --short: the bf16 instances only (what a bf16 DiT runs)
                meta = {"kernel": _short_name(names[name]), "config": "", "threads": None, "dyn_smem": 0}
            elif short and not meta.get("sm90") and (meta["tile"] not in picked or meta["kernel"] not in ("w8a8", f"w4a8 g{W4_GROUP}")):
                continue
            found.append((meta, a))
        for meta, a in sorted(found, key=lambda x: (x[0].get("tile") is None, x[0]["kernel"], x[0].get("tile") or 0)):
            smem = _static_smem(a["res"], arch) + meta.get("dyn_smem", 0)
            rows.append(_row("cuda", arch, meta, a, smem, meta.get("threads")))
    return rows, source


# ---- Triton -------------------------------------------------------------------------------------------

def _triton_meta(kernel: str, entry: Dict, group: Optional[int]) -> Dict:
    cfg = ", ".join(f"{k}={v}" for k, v in entry.items() if k != "max_m")
    return {"kernel": f"{kernel} g{group}" if group else kernel, "group_size": group,
            "config": f"M<={entry['max_m']}: {cfg}" if entry.get("max_m") else f"M>*: {cfg}",
            "BM": entry.get("BM"), "BN": entry.get("BN"), "BK": entry.get("BK"), "max_m": entry.get("max_m")}


def _compile_all(jobs: List[Dict]) -> List:
    """``aot.Compiled`` per job, or the exception that job's compile raised: one subprocess for all when every
    compile succeeds (one Triton import), else one per job to tell which failed."""
    try:
        return aot.compile_many(jobs)
    except aot.AOTError:
        out = []
        for job in jobs:
            try:
                out.append(aot.compile_many([job])[0])
            except aot.AOTError as e:
                out.append(e)
        return out


def triton_rows(archs, short: bool, groups) -> List[Dict]:
    """One row per shipped Triton configuration (``aot.shipped_jobs``; --short: the entries picked at
    M = SHORT_M, which DiT-XL/2 at batch 8 runs; tests/kernels check every entry)."""
    m = SHORT_M if short else None
    shipped = [(kernel, "", *job) for kernel in ("w8a8", "w4a8")
               for job in aot.shipped_jobs(kernel, archs, groups if kernel == "w4a8" else None, m=m)]
    # The fused-epilogue variants the fused blocks launch (fc1: GELU + int8 for fc2; to_out / fc2: gate +
    # residual), at the entries picked at SHORT_M only: enough to see that the pieces keep the plain main loop
    # (same tensor-core instructions, no spills, 16-byte loads) without compiling every entry three times.
    shipped += [(kernel, fused, *job) for fused in ("gelu+quant", "gate+residual") for kernel in ("w8a8", "w4a8")
                for job in aot.shipped_jobs(kernel, archs, groups if kernel == "w4a8" else None, m=SHORT_M,
                                            fused=fused)]
    # The adaLN GEMMs of the fused blocks take the float conditioning and quantize it as they load it, at the
    # entries picked at ADALN_M (bf16 A, no epilogue pieces)
    shipped += [(kernel, "float-A bf16", *job) for kernel in ("w8a8", "w4a8")
                for job in aot.shipped_jobs(kernel, archs, groups if kernel == "w4a8" else None, m=ADALN_M,
                                            a_float="bf16")]
    # W4A8 with integer group scales (INT_SCALES) where layers hand it the integers (w4a8.INT_SCALE_GROUPS)
    shipped += [("w4a8i", "", *job) for arch in archs
                for job in aot.shipped_jobs("w4a8", (arch,), [g for g in (groups or w4a8.GROUP_SIZES)
                                                              if g in w4a8.INT_SCALE_GROUPS.get(ARCH_CC[arch], ())],
                                            m=m, int_scales=True)]
    rows = []
    for (kernel, fused, arch, entry, group, job), c in zip(shipped, _compile_all([j[-1] for j in shipped])):
        meta = _triton_meta(kernel, entry, group)
        if fused:
            meta["kernel"] += f" +{fused}"
        try:
            if isinstance(c, Exception):
                raise c
            funcs = analyze_cubin(c.cubin_path)
            _, a = max(funcs.items(), key=lambda kv: kv[1]["instructions"])
            rows.append(_row("triton", arch, meta, a, max(c.shared, _static_smem(a["res"], arch)), c.num_warps * 32))
        except Exception as ex:
            first = str(ex).strip().splitlines()[-1][:160] if str(ex).strip() else ""
            rows.append(dict(family="triton", arch=arch, **meta, status=f"not compiled: {type(ex).__name__}: {first}"))
    return rows


def _static_smem(res: Dict, arch: str) -> int:
    """Static shared memory of a function. cuobjdump's SHARED for sm_90 code includes the 1 KB the system
    reserves per CTA (seen as 1024 on kernels declaring none), which occupancy() adds itself."""
    return max(0, res.get("SHARED", 0) - (1024 if arch == "sm90" else 0))


# ---- rows ---------------------------------------------------------------------------------------------

def _row(family: str, arch: str, meta: Dict, a: Dict, smem: int, threads: Optional[int]) -> Dict:
    res = a["res"]
    regs = res.get("REG", 0)
    occ = occupancy(regs, smem, threads, ARCH_GPU[arch]) if threads else {}
    loop = a["main_loop"] or {}
    widths = loop.get("global_loads_by_bytes", {})
    narrow = sum(v for k, v in widths.items() if int(k) < 4)  # byte/short loads: operands without alignment hints
    return dict(meta, family=family, arch=arch, status="ok", regs=regs, stack=res.get("STACK", 0),
                spills=a["spill_instructions"], smem_bytes=smem, threads=threads,
                ctas_per_sm=occ.get("ctas_per_sm"), warps_per_sm=occ.get("warps_per_sm"),
                occupancy_limited_by=occ.get("limited_by"), occupancy_gpu=occ.get("gpu"),
                mma=", ".join(f"{k} x{v}" for k, v in sorted(a["mma_instructions"].items())) or "none",
                mma_total=sum(a["mma_instructions"].values()),
                loop_instructions=loop.get("instructions"), loop_mma=loop.get("mma"),
                non_mma_per_mma=loop.get("non_mma_per_mma"), loop_per_mma=loop.get("per_mma"),
                loop_global_loads=widths, loop_byte_loads=narrow if loop else None,
                loop_tma_loads=loop.get("tma_loads"), loop_prmt=loop.get("prmt"),
                loop_wgmma_waits=loop.get("wgmma_waits"), function=a)


def roofline_rows(rows: List[Dict], short: bool) -> List[Dict]:
    """Per DiT-XL/2 shape and M: the bound of each kernel family at H100 ceilings with the tile it picks."""
    d = common.DATASHEET["H100-SXM"]
    from ditq.kernels import w4a8, w8a8

    tiles, rules = cuda_tiles()
    h_tiles, sm90_rules = sm90_tiles()
    ok = {(r["family"], r["kernel"], r.get("BM"), r.get("BN"), r.get("BK")): r
          for r in rows if r.get("status") == "ok" and r["arch"] == "sm90"}
    out = []
    shapes = common.DIT_SHAPES[:1] + common.DIT_SHAPES[2:4] if short else common.DIT_SHAPES
    for model, layer, n, k in shapes:
        for m in ROOFLINE_M:
            if layer == "adaLN" and m > 64:
                continue  # adaLN runs on one row per image (M = images x 2), never on tokens
            flops = 2.0 * m * n * k
            bf16_bytes = 2 * (m * k + n * k + m * n)
            bf16_us = common.roofline_s(flops, bf16_bytes, d["bf16_flops"], d["hbm_bytes_s"]) * 1e6
            out.append({"shape": f"{model} {layer}", "M": m, "N": n, "K": k, "impl": "bf16 (ideal)",
                        "tile": "", "gflop": flops / 1e9, "min_mb": bf16_bytes / 1e6, "tiled_mb": None,
                        "bound_us": bf16_us, "bound_by": _by(flops, bf16_bytes, d, "bf16_flops"),
                        "ideal_speedup_vs_bf16": 1.0})
            for impl, bits in (("w8a8", 8), (f"w4a8 g{W4_GROUP}", 4)):
                w_bytes = n * k * bits // 8 + (n * 4 if bits == 8 else (k // W4_GROUP) * n * 4)
                a_bytes, o_bytes = m * k + 4 * m, 2 * m * n
                min_bytes = a_bytes + w_bytes + o_bytes
                cands = []
                kern = "w8a8" if bits == 8 else "w4a8"
                if "sm90" in config_table.table_archs(kern):
                    e = config_table.params(config_table.pick(config_table.load_table(kern, "sm90"), m))
                    if bits == 4:
                        e = w4a8.fit_config(e, W4_GROUP)  # BK and by_group at this group size, as launched
                    # the launcher's automatic split-K count for this tile on the datasheet's SMs (split_k.py)
                    t_splits = (w8a8.auto_split_count(e, m, n, k, d["sms"]) if bits == 8
                                else w4a8.auto_split_count(e, m, n, k, W4_GROUP, d["sms"]))
                    cands.append(("triton", impl, e.get("BM"), e.get("BN"), e.get("BK"), t_splits))
                # sm_90 runs the Hopper (wgmma) tile its rules pick, split-K as the binding does; a rule of -1
                # hands the bucket to the mma.sync tiles, split-K as auto_splits does (every tile, at most the
                # rule's max_splits; its reduction is the Hopper one: the tile's last CTA reads the partials back)
                h_rule = next((r for r in sm90_rules if r[0] < 0 or m <= r[0]), None)
                h_index = None if h_rule is None else (h_rule[1] if bits == 8 else h_rule[2])
                family_tiles = h_tiles["w8" if bits == 8 else "w4"]
                if h_index is not None and 0 <= h_index < len(family_tiles):
                    bm, bn = family_tiles[h_index][:2]
                    units = math.ceil(k / (128 if bits == 8 else max(W4_GROUP, 128)))
                    cands.append(("cuda wgmma", impl, bm, bn, 128,
                                  sm90_auto_schedule(math.ceil(m / bm) * math.ceil(n / bn), units, d["sms"],
                                                     h_rule[3])))
                else:
                    rule = next((r for r in rules if r[0] <= 90 and (r[1] < 0 or m <= r[1])), None)
                    if rule and (rule[2] if bits == 8 else rule[3]) in tiles:
                        t = tiles[rule[2] if bits == 8 else rule[3]]
                        units = math.ceil(k / (t[2] if bits == 8 else max(W4_GROUP, t[2])))
                        cands.append(("cuda", impl, t[0], t[1], t[2],
                                      mma_auto_splits(math.ceil(m / t[0]) * math.ceil(n / t[1]), units, d["sms"],
                                                      rule[4])))
                ideal = common.roofline_s(flops, min_bytes, d["int8_ops"], d["hbm_bytes_s"]) * 1e6
                out.append({"shape": f"{model} {layer}", "M": m, "N": n, "K": k, "impl": f"{impl} (ideal)",
                            "tile": "", "gflop": flops / 1e9, "min_mb": min_bytes / 1e6, "tiled_mb": None,
                            "bound_us": ideal, "bound_by": _by(flops, min_bytes, d, "int8_ops"),
                            "ideal_speedup_vs_bf16": bf16_us / ideal})
                for fam, kname, bm, bn, bk, sched in cands:
                    if not bm or not bn:
                        continue
                    tm, tn = math.ceil(m / bm), math.ceil(n / bn)
                    n_tiles = tm * tn  # (not `tiles`: the mma.sync tile table, read again next M)
                    dp_tiles, splits = sched if isinstance(sched, tuple) else (0 if sched > 1 else n_tiles, sched)
                    tiled = a_bytes * tn + w_bytes * tm + o_bytes  # re-reads: A per N tile, W per M tile
                    b = schedule_bound(fam, flops, min_bytes, bm, bn, m, n, dp_tiles, splits, d, bits)
                    ctas = dp_tiles + (n_tiles - dp_tiles) * splits
                    split_text = ("" if splits <= 1 else f" split {splits}" if dp_tiles == 0
                                  else f" {dp_tiles} whole + {n_tiles - dp_tiles} split {splits}")
                    row = {"shape": f"{model} {layer}", "M": m, "N": n, "K": k, "impl": f"{fam} {impl}",
                           "tile": f"{bm}x{bn}x{bk}" + split_text, "gflop": flops / 1e9, "min_mb": min_bytes / 1e6,
                           "tiled_mb": tiled / 1e6, "bound_us": b["bound_us"], "bound_by": b["bound_by"],
                           "reduce_us": b["reduce_us"], "reread_bound_us": tiled / d["hbm_bytes_s"] * 1e6,
                           "ctas": ctas, "sm_utilization": b["util"], "ideal_speedup_vs_bf16": bf16_us / b["bound_us"]}
                    if fam == "cuda wgmma":
                        # the count this model would force on the last wave, the cap aside (what the GPU's
                        # timings, benchmarks/tune_tiles.py, settle)
                        units = math.ceil(k / (128 if bits == 8 else max(W4_GROUP, 128)))
                        row["model_tail_splits"] = model_best_splits(fam, flops, min_bytes, bm, bn, m, n, units, d,
                                                                     bits)
                    out.append(row)
    return out


def schedule_bound(kind: str, flops: float, min_bytes: float, bm: int, bn: int, m: int, n: int, dp_tiles: int,
                   splits: int, d: Dict, w_bits: int = 8) -> Dict:
    """The bound of one launch: max(FLOPs / (INT8 peak x SM use), minimal bytes / HBM, one SM's streaming) + the
    split reduction (:func:`split_reduce_us`, after the slices: it does not overlap them). SM use: a wave of CTAs
    covers at most every SM once (more resident CTAs hide latency, they add no peak); a split CTA does 1 / splits
    of its tile's work: the tiles' work over the SM time the schedule takes (:func:`sm90_tile_times`). One SM's
    streaming: a tile's operands (min(BM, M) activation rows and min(BN, N) weight rows of K, ``w_bits`` wide)
    pass through its SM's L2 port at the rate the reduction is charged at, over the same tile times: what keeps
    a launch of a few CTAs from being bounded by the whole chip's HBM bandwidth (and so flattered against its
    split form, which the reduction charge alone would do at small M)."""
    tiles = math.ceil(m / bm) * math.ceil(n / bn)
    if splits <= 1:
        dp_tiles = tiles
    times = sm90_tile_times(tiles, dp_tiles, splits, d["sms"])
    util = tiles / (times * d["sms"])
    k = flops / (2.0 * m * n) if m and n else 0.0
    stream = times * (min(bm, m) * k + min(bn, n) * k * w_bits / 8) / (L2_BYTES_PER_CLK_SM * SM_CLOCK_HZ)
    compute, memory = flops / (d["int8_ops"] * util), max(min_bytes / d["hbm_bytes_s"], stream)
    reduce_us = split_reduce_us(kind if kind == "triton" else "cuda wgmma", bm, bn, m, n, tiles, dp_tiles, splits,
                                d["sms"])
    return {"bound_us": max(compute, memory) * 1e6 + reduce_us, "util": util, "reduce_us": reduce_us,
            "bound_by": "compute" if compute >= memory else "memory"}


TAIL_SPLITS = (1, 2, 3, 4, 6, 9, 16)  # the tail counts the model compares (tune_tiles.py times 1..9 on a GPU)


def model_best_splits(kind: str, flops: float, min_bytes: float, bm: int, bn: int, m: int, n: int, units: int,
                      d: Dict, w_bits: int = 8) -> int:
    """The tail count of :data:`TAIL_SPLITS` (at most the k units) with the lowest :func:`schedule_bound` when
    forced (sm90_forced_schedule), 1 = no split."""
    tiles = math.ceil(m / bm) * math.ceil(n / bn)

    def bound(s):
        dp, sp = sm90_forced_schedule(tiles, s, d["sms"])
        return schedule_bound(kind, flops, min_bytes, bm, bn, m, n, dp, sp, d, w_bits)["bound_us"]
    return min((s for s in TAIL_SPLITS if s <= units), key=bound)


def _by(flops, nbytes, d, peak_key) -> str:
    return "compute" if flops / d[peak_key] >= nbytes / d["hbm_bytes_s"] else "memory"


# ---- transformer weight bytes -------------------------------------------------------------------------

WEIGHT_TARGETS = {8: 0.52, 4: 0.30}  # the project's targets: transformer weight bytes vs bf16


def weight_rows() -> List[Dict]:
    """Bytes of DiT-XL/2's transformer in bf16 and in each ditq format, counted on the meta device (no weights
    built): every nn.Linear outside ``ditq.convert.DEFAULT_SKIP`` becomes packed weights (``WeightFormat``'s
    canonical shapes) + fp32 scales + a static fp32 activation scale, its bias stays bf16; the rest stays bf16.
    A backend layout with padding would add to this; bench_model.py measures the built model on a GPU."""
    try:
        import fnmatch

        import torch
        from diffusers import DiTTransformer2DModel

        import bench_model
        from ditq.convert import DEFAULT_SKIP
        from ditq.format import WeightFormat
        from ditq.kernels import w4a8
    except Exception as e:
        return [{"model": "DiT-XL/2", "status": f"not available: {type(e).__name__}: {e}"}]
    rows = []
    for res, size in sorted(bench_model.SAMPLE_SIZE.items()):
        with torch.device("meta"):
            model = DiTTransformer2DModel(sample_size=size, **bench_model.XL).to(torch.bfloat16)
        tensors = {id(t): t for t in list(model.parameters()) + [b for b in model.buffers() if b is not None]}
        bf16 = sum(t.numel() * t.element_size() for t in tensors.values())
        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        # What no linear-layer format touches: diffusers' DiT has one class-label table per block.
        emb = sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
                  if isinstance(m, torch.nn.Embedding))
        rows.append({"model": "DiT-XL/2", "resolution": res, "format": "bf16", "status": "ok", "bytes": bf16,
                     "ratio_vs_bf16": 1.0, "quantized_linears": 0, "target": None, "embedding_bytes": emb,
                     "embedding_share": emb / bf16})
        for fmt in [WeightFormat(8)] + [WeightFormat(4, g) for g in w4a8.GROUP_SIZES]:
            total, count = bf16, 0
            for name, lin in linears:
                if any(fnmatch.fnmatchcase(name, p) for p in DEFAULT_SKIP) or \
                        (fmt.group_size and lin.in_features % fmt.group_size):
                    continue
                shapes = fmt.packed_shapes(lin.out_features, lin.in_features)
                packed = math.prod(shapes["qweight"]) + 4 * math.prod(shapes["scales"]) + 4
                total += packed - lin.weight.numel() * lin.weight.element_size()
                count += 1
            rows.append({"model": "DiT-XL/2", "resolution": res, "status": "ok", "bytes": total,
                         "format": "w8a8" if fmt.bits == 8 else f"w4a8 g{fmt.group_size}",
                         "ratio_vs_bf16": total / bf16, "quantized_linears": count,
                         "target": f"<= {WEIGHT_TARGETS[fmt.bits]}",
                         "meets_target": total / bf16 <= WEIGHT_TARGETS[fmt.bits]})
    return rows


# ---- report -------------------------------------------------------------------------------------------

KERNEL_COLS = ["family", "arch", "kernel", "config", "status", "regs", "stack", "spills", "smem_bytes",
               "ctas_per_sm", "warps_per_sm", "occupancy_limited_by", "mma", "loop_instructions", "loop_mma",
               "non_mma_per_mma", "loop_byte_loads", "loop_prmt", "loop_wgmma_waits"]
KERNEL_HEAD = ["family", "arch", "kernel", "config", "status", "regs", "stack", "spill instr", "smem B",
               "CTAs/SM", "warps/SM", "limited by", "tensor-core instr (whole kernel)", "loop instr", "loop MMA",
               "non-MMA/MMA", "1-2 B loads in loop", "PRMT in loop", "wgmma waits in loop"]
MIX_COLS = ["family", "arch", "kernel", "config"] + [c for c in CLASS_NAMES if c != "mma"] + ["loads"]
ROOF_COLS = ["shape", "M", "N", "K", "impl", "tile", "gflop", "min_mb", "tiled_mb", "ctas", "sm_utilization",
             "reduce_us", "bound_us", "bound_by", "model_tail_splits", "reread_bound_us", "ideal_speedup_vs_bf16"]
ROOF_HEAD = ["shape", "M", "N", "K", "impl", "tile", "GFLOP", "min MB", "MB incl. re-reads", "CTAs",
             "SM use (last wave)", "split reduce µs", "bound µs", "bound by", "model's tail S", "µs if no L2 reuse",
             "bound speedup vs bf16"]


def markdown(report: Dict) -> str:
    kr = [r for r in report["kernels"]]
    mix = []
    for r in kr:
        if r.get("status") == "ok" and r.get("loop_per_mma"):
            row = {c: r.get(c) for c in ("family", "arch", "kernel", "config")}
            row.update({c: r["loop_per_mma"].get(c, 0.0) for c in CLASS_NAMES if c != "mma"})
            row["loads"] = " ".join(f"{k}B:{v}" for k, v in r["loop_global_loads"].items()) + \
                (f" TMA:{r['loop_tma_loads']}" if r.get("loop_tma_loads") else "")
            mix.append(row)
    s = report["summary"]
    parts = [
        f"Generated by `{report['env']['command']}` on {report['env']['date']} (commit `{report['env']['commit']}`; "
        f"torch {report['env']['torch']}, triton {report['env']['triton']}, nvcc {report['nvcc'] or 'none'}"
        f"{'; uncommitted kernel sources: ' + ', '.join(report['uncommitted']) if report['uncommitted'] else ''}). "
        f"CUDA kernels: {report['cuda_source']}.",
        "",
        f"**Summary:** {s['kernels_ok']} compiled kernels analysed, {s['kernels_missing']} rows not built / not "
        f"shipped; spill instructions in {s['with_spills']} of them; byte-wise (1-2 B) global loads in the main loop "
        f"of {s['with_byte_loads']}; non-MMA instructions per MMA in the main loop: "
        + (", ".join(f"{k} {v}" for k, v in s["non_mma_per_mma"].items()) or "–") + ".",
        "",
        "### Kernels: resources, occupancy (sm_80 at A100 limits, sm_90 at H100), tensor cores, main loop",
        "",
        common.md_table(kr, KERNEL_COLS, KERNEL_HEAD),
        "",
        "### Main-loop instruction mix: instructions per MMA instruction, by class",
        "",
        "An `IGMMA.64xNx32` (Hopper wgmma) does 64·N·32 MACs per warpgroup, an `IMMA.16832` 16·8·32 per warp: "
        "compare mixes within one MMA kind.",
        "",
        common.md_table(mix, MIX_COLS) if mix else "_no kernel analysed yet_",
        "",
        f"### Roofline bound per DiT-XL/2 shape at H100 datasheet ceilings (INT8 "
        f"{common.DATASHEET['H100-SXM']['int8_ops'] / 1e12:.0f} TOP/s, BF16 "
        f"{common.DATASHEET['H100-SXM']['bf16_flops'] / 1e12:.0f} TFLOP/s, HBM "
        f"{common.DATASHEET['H100-SXM']['hbm_bytes_s'] / 1e12:.2f} TB/s)",
        "",
        "Minimal bytes: int8 activations + packed weights + scales + bf16 output, each read once. A tile row's "
        "bound is max(FLOPs / (INT8 peak x SM use), minimal bytes / HBM, one SM's streaming of its tiles' operands "
        "at its L2 rate below) + the split reduction, SM use = output "
        "tiles / (waves x 132 SMs) with the tile the table picks for M (sm_90 tables: the CUDA rows are the Hopper "
        "wgmma tiles with the binding's automatic split-K count, a split CTA doing its share of the tile; a bucket "
        "a Hopper rule hands over (-1) runs the mma.sync tile with auto_splits' count, every tile split, at most the "
        "rule's max_splits). Split "
        "reduction: each slice stores its BM x BN partial (4-byte words) and one SM per tile reads the S partials "
        "back (Hopper: the tile's last CTA, after its slice; Triton: the reduce launch, one program per tile), "
        f"(1 + S) x BM x BN x 4 bytes serial at one SM's L2 rate ({L2_BYTES_PER_CLK_SM} B/clock x "
        f"{SM_CLOCK_HZ / 1e9:.2f} GHz, an assumption), at least all the partial bytes at {L2_BYTES_S / 1e12:.1f} "
        "TB/s chip-wide; the Triton reduce's launch overhead is not counted. 'model's tail S': for a Hopper row, "
        "the split count forced on the last wave (1 2 3 4 6 9 16, at most the k units; 1 = none) that this model "
        "bounds lowest, which benchmarks/tune_tiles.py times on a GPU. 'incl. re-reads': "
        "activations once per N tile, weights once per M tile; '\u00b5s if no L2 reuse' moves those bytes "
        f"through HBM (the worst case: H100's 50 MB L2 holds most of them). W4 bytes at group size {W4_GROUP}. "
        "The Triton int8 dots wait on every wgmma (synchronous in triton 3.8): their compute bounds are "
        "optimistic.",
        "",
        common.md_table(report["roofline"], ROOF_COLS, ROOF_HEAD),
        "",
        "### Transformer weight bytes (DiT-XL/2 architecture, counted on the meta device)",
        "",
        "Quantized: every nn.Linear but ditq's default skip list (`proj_out*`), as packed weights + fp32 scales + "
        "a static activation scale; everything else bf16. Targets: W8A8 <= 0.52x, W4A8 <= 0.30x. "
        + "".join(f"nn.Embedding tables (a class-label table per block) stay bf16 at {r['resolution']} px: "
                  f"{r['embedding_bytes'] / 1e6:.1f} MB, {100 * r['embedding_share']:.1f}% of the bf16 bytes. "
                  for r in report["weights"][:1] if r.get("embedding_bytes") is not None),
        "",
        common.md_table(report["weights"], ["model", "resolution", "format", "status", "bytes", "ratio_vs_bf16",
                                            "quantized_linears", "target", "meets_target"]),
    ]
    return "\n".join(parts) + "\n"


def summarize(rows: List[Dict]) -> Dict:
    ok = [r for r in rows if r.get("status") == "ok"]
    worst: Dict[str, float] = {}
    for r in ok:
        if r.get("non_mma_per_mma") is not None:
            key = f"{r['family']} {r['kernel'].split()[0]} {r['arch']}"
            worst[key] = max(worst.get(key, 0.0), r["non_mma_per_mma"])
    return {"kernels_ok": len(ok), "kernels_missing": len(rows) - len(ok),
            "with_spills": sum(1 for r in ok if r["spills"]),
            "with_byte_loads": sum(1 for r in ok if r.get("loop_byte_loads")),
            "non_mma_per_mma": {k: f"<= {v}" for k, v in sorted(worst.items())}}


RESULTS_BEGIN = "<!-- static-report:begin (generated by benchmarks/static_report.py --update-results; do not edit) -->"
RESULTS_END = "<!-- static-report:end -->"


def update_results(md: str) -> str:
    path = os.path.join(common.HERE, "RESULTS.md")
    text = open(path).read() if os.path.exists(path) else ""
    block = f"{RESULTS_BEGIN}\n{md}{RESULTS_END}"
    if RESULTS_BEGIN in text and RESULTS_END in text:
        pre, rest = text.split(RESULTS_BEGIN, 1)
        text = pre + block + rest.split(RESULTS_END, 1)[1]
    else:
        text = text + ("\n" if text else "") + block + "\n"
    with open(path, "w") as f:
        f.write(text)
    return path


def uncommitted_sources() -> List[str]:
    """Kernel sources that differ from the commit the report names (the report reads the working tree)."""
    try:
        out = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--", "csrc", "kernels"],
                             capture_output=True, text=True, timeout=20).stdout
    except Exception:
        return []
    return sorted(line[3:] for line in out.splitlines() if line[3:].endswith((".cu", ".cuh", ".h", ".py", ".json")))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--short", action="store_true", help="CI subset: sm_90, group 128, the configs picked at M = 4096, "
                    "no nvcc compile (CUDA rows only from a built extension)")
    ap.add_argument("--arch", nargs="+", choices=sorted(ARCH_CC), help="architectures (default: both; --short: sm90)")
    ap.add_argument("--groups", type=int, nargs="+", help="W4A8 group sizes to compile (default: all; --short: 128)")
    ap.add_argument("--no-cuda", action="store_true", help="skip the CUDA cubins")
    ap.add_argument("--no-triton", action="store_true", help="skip the Triton AOT compiles")
    ap.add_argument("--out", help="output folder (default $OUT or benchmarks/out)")
    ap.add_argument("--update-results", action="store_true", help="rewrite the table in benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    archs = tuple(args.arch or (("sm90",) if args.short else ("sm80", "sm90")))
    rows: List[Dict] = []
    if not args.no_triton:
        groups = args.groups or ((W4_GROUP,) if args.short else None)  # None: every size w4a8 supports
        rows += triton_rows(archs, args.short, groups)
    cuda_source = "skipped (--no-cuda)"
    if not args.no_cuda:
        crow, cuda_source = cuda_rows(archs, args.short)
        rows += crow
    report = {"schema": "ditq.static_report/1", "short": args.short, "archs": list(archs),
              "env": common.environment(), "nvcc": aot.nvcc_version(), "uncommitted": uncommitted_sources(),
              "cuobjdump": aot.cuobjdump_path(), "cuda_source": cuda_source,
              "limits": dict(LIMITS, gpus={g: common.DATASHEET[g] for g in ARCH_GPU.values()}),
              "kernels": rows, "roofline": roofline_rows(rows, args.short), "weights": weight_rows(),
              "summary": summarize(rows)}
    md = markdown(report)
    d = common.out_dir(args.out)
    jpath = common.write_json(os.path.join(d, "static_report.json"), report)
    with open(os.path.join(d, "static_report.md"), "w") as f:
        f.write(md)
    if args.update_results:
        update_results(md)
    s = report["summary"]
    print(common.md_table(rows, KERNEL_COLS[:12] + ["non_mma_per_mma"], KERNEL_HEAD[:12] + ["non-MMA/MMA"]))
    print(f"\n{s['kernels_ok']} kernels analysed, {s['kernels_missing']} missing; spills in {s['with_spills']}; "
          f"byte loads in main loops: {s['with_byte_loads']}. Wrote {jpath} and static_report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The machine code of the CUDA GEMMs (csrc/gemm.cu; with the fused epilogue csrc/gemm_fused.cu), checked
without a GPU: compiled here by nvcc for sm_80 and sm_90a, disassembled with the cuobjdump that ships in
triton's wheel.

Every kernel (tile x weight kind) must use the int8 tensor cores (IMMA.16832.S8.S8), ldmatrix (LDSM) and
16-byte async copies (LDGSTS), with no local memory (LDL / STL, spills), and convert its bf16 / fp16 output
with exactly the round-to-nearest-even conversions (F2FP...PACK_AB without a rounding suffix): the device
half of a conversion is code the emulator never runs, so its rounding is checked here, by instruction name.
The fused-epilogue instantiations (FusedEpilogue: gemm_*_fused) pass the same checks, hold the pieces' own
instructions, and keep the plain kernel's main-loop tensor-core and memory instructions; their float-A variants
(gemm_fused_float_a.cu) keep the int8 twin's tensor-core work and read A with 16-byte loads. Registers, shared
memory, instruction counts and the main loop's instruction mix per mma are printed (`pytest -s`) and kept in
the test's user_properties."""
import collections
import os
import re
import shutil

import pytest
from nvcc_sass import compile_cuda

from ditq.kernels import aot

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSRC = os.path.join(ROOT, "csrc")
ARCHS = ("sm_80", "sm_90a")
# What nvcc emits for ptx::f32_to_bf16_bits / f32_to_f16_bits (cvt.rn.bf16.f32 / cvt.rn.f16.f32, paired into
# one packing conversion): the round-to-nearest-even forms. `_rz` would add `.RZ`, `_rd` `.RM`, `_ru` `.RP`.
RN_CONVERSIONS = {"sm_80": {"F2FP.BF16.PACK_AB", "F2FP.PACK_AB"},
                  "sm_90a": {"F2FP.BF16.F32.PACK_AB", "F2FP.F16.F32.PACK_AB"}}


def conversions(ins):
    """Counter of the float-to-float conversion opcodes (F2F, F2FP) of a kernel."""
    return collections.Counter(op for _, op, _ in ins if op.split(".")[0] in ("F2F", "F2FP"))


def tile_table():
    """{id: (BM, BN, BK, WARPS_M, WARPS_N, STAGES)} parsed from csrc/configs/gemm_tiles.h."""
    text = open(os.path.join(CSRC, "configs", "gemm_tiles.h")).read()
    rows = re.findall(r"^\s*X\((\d+),\s*(\d+),\s*(\d+),\s*(\d+),\s*(\d+),\s*(\d+),\s*(\d+)\)", text, re.M)
    return {int(r[0]): tuple(int(v) for v in r[1:]) for r in rows}


def w4_group_sizes():
    """The W4A8 group sizes of DITQ_W4_GROUP_SIZES in csrc/configs/kernel_families.h: every one is compiled."""
    text = open(os.path.join(CSRC, "configs", "kernel_families.h")).read()
    line = re.search(r"#define DITQ_W4_GROUP_SIZES\(X\)(.*)", text).group(1)
    return [int(g) for g in re.findall(r"X\((\d+)\)", line)]


def kernel_key(name):
    """(tile id, 'w8' | 'w4g<G>', 'plain' | 'fused') of a mangled gemm_kernel name."""
    m = re.search(r"TileILi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)EE", name)
    if not m or "gemm_kernel" not in name:
        return None
    shape = tuple(int(v) for v in m.groups())
    tile = {v: k for k, v in tile_table().items()}.get(shape)
    g = re.search(r"W4ILi(\d+)E", name)
    epi = "fused" if "FusedEpilogue" in name else "plain"
    assert epi == "fused" or "PlainEpilogue" in name, name
    return tile, ("w4g" + g.group(1)) if g else "w8", epi


def _compile(source, arch, tmp):
    """{mangled name: SASS instructions}, {mangled name: (registers, spill bytes)} of csrc/<source> for arch."""
    cubin = compile_cuda(source, arch, tmp)
    return cubin.functions, cubin.ptxas


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gemm_sass")
    return {arch: _compile("gemm.cu", arch, tmp) for arch in ARCHS}


@pytest.fixture(scope="module")
def compile_once(tmp_path_factory):
    """_compile with a per-module cache: the fused kernels are compiled once for both tests that read them."""
    tmp, cache = tmp_path_factory.mktemp("gemm_sass_once"), {}

    def get(source, arch):
        if (source, arch) not in cache:
            cache[(source, arch)] = _compile(source, arch, tmp)
        return cache[(source, arch)]
    return get


def _smem(tile, kind):
    bm, bn, bk, _, _, stages = tile_table()[tile]
    return stages * (bm * bk + bn * (bk if kind == "w8" else bk // 2))


def _check(arch, funcs, ptxas, epi, request, plain=None):
    """Every kernel of one epilogue policy: the checks of the module docstring; for the fused policy also its
    pieces' instructions and the plain kernel's main-loop tensor-core and memory work (``plain``: the plain
    kernels' (funcs, ptxas))."""
    plain_funcs, plain_ptxas = plain if plain is not None else (None, None)
    kernels = {kernel_key(n): n for n in funcs if kernel_key(n)}
    expected = {(t, k, epi) for t in tile_table() for k in ["w8"] + [f"w4g{g}" for g in w4_group_sizes()]}
    assert set(kernels) == expected, f"kernels compiled {sorted(kernels)} != table {sorted(expected)}"
    plain_kernels = {kernel_key(n)[:2]: n for n in (plain_funcs or {}) if kernel_key(n)}
    report = []
    for (tile, kind, _), name in sorted(kernels.items()):
        ins = funcs[name]
        ops = collections.Counter(op for _, op, _ in ins)
        what = f"{arch} tile {tile} {kind} {epi}"
        assert ops["IMMA.16832.S8.S8"] > 0, f"{what}: no int8 mma.sync (IMMA.16832.S8.S8)"
        assert any(o.startswith("LDSM") for o in ops), f"{what}: no ldmatrix (LDSM)"
        assert ops["LDGSTS.E.BYPASS.128"] > 0, f"{what}: no 16-byte cp.async (LDGSTS.E.BYPASS.128)"
        assert ops["LDL"] == 0 and ops["STL"] == 0, f"{what}: local memory (LDL {ops['LDL']}, STL {ops['STL']})"
        conv = conversions(ins)
        assert set(conv) == RN_CONVERSIONS[arch], f"{what}: output conversions {dict(conv)}, expected exactly " \
            f"the round-to-nearest-even {sorted(RN_CONVERSIONS[arch])}"
        regs, spill = ptxas[name]
        assert spill == 0, f"{what}: {spill} bytes of spills"
        loop = aot.main_loop(ins)  # the innermost backward branch holding an IMMA: the k loop
        lops = collections.Counter(op for _, op, _ in loop)
        imma = lops["IMMA.16832.S8.S8"]
        bm, bn, bk, wm, wn, _ = tile_table()[tile]
        # the whole k tile is unrolled: every warp issues (BM/WM/16)*(BN/WN/8)*(BK/32) mma per iteration
        assert imma == (bm // wm // 16) * (bn // wn // 8) * (bk // 32), f"{what}: {imma} IMMA in the main loop"
        row = dict(arch=arch, tile=tile, kind=kind, epi=epi, registers=regs, smem=_smem(tile, kind),
                   imma=ops["IMMA.16832.S8.S8"], ldsm=sum(v for o, v in ops.items() if o.startswith("LDSM")),
                   ldgsts=ops["LDGSTS.E.BYPASS.128"], loop_instructions=len(loop), loop_imma=imma,
                   per_mma=round(len(loop) / imma, 2), instructions=len(ins),
                   mix={o: v for o, v in lops.most_common(8)})
        if plain is not None:
            # the pieces are there (GELU's exp: MUFU.EX2; the int8 output's cvt.rni: F2I), and the main loop
            # keeps the plain kernel's tensor-core and memory work: the same IMMA, LDSM and LDGSTS per iteration
            # (its length is printed beside the plain one: ptxas may lay out the integer bookkeeping differently)
            assert ops["MUFU.EX2"] > 0, f"{what}: no MUFU.EX2 (GELU's expf)"
            assert any(o.startswith("F2I") for o in ops), f"{what}: no float -> int conversion (int8 output)"
            pname = plain_kernels[(tile, kind)]
            plain = collections.Counter(op for _, op, _ in aot.main_loop(plain_funcs[pname]))
            for op in [o for o in set(plain) | set(lops) if o.startswith(("IMMA", "LDSM", "LDGSTS"))]:
                assert lops[op] == plain[op], f"{what}: {lops[op]} {op} in the main loop, the plain kernel {plain[op]}"
            row.update(plain_registers=plain_ptxas[pname][0], plain_instructions=len(plain_funcs[pname]),
                       plain_loop_instructions=sum(plain.values()))
        report.append(row)
        request.node.user_properties.append((f"tile{tile}_{kind}_{epi}", row))
    print(f"\n{arch}: tile kind    epi    regs  smem  IMMA LDSM LDGSTS  instrs  loop/mma  (main-loop mix)")
    for r in report:
        print(f"{arch}: {r['tile']:>4} {r['kind']:<7} {r['epi']:<5} {r['registers']:>4} {r['smem']:>6} "
              f"{r['imma']:>4} {r['ldsm']:>4} {r['ldgsts']:>6} {r['instructions']:>6} {r['per_mma']:>8}  {r['mix']}")
        if "plain_registers" in r:
            print(f"{arch}: {'':>4} {'':<7} plain {r['plain_registers']:>4} {'':>6} {'':>4} {'':>4} {'':>6} "
                  f"{r['plain_instructions']:>6} {r['plain_loop_instructions'] / r['loop_imma']:>8.2f}")


@pytest.mark.parametrize("arch", ARCHS)
def test_gemm_sass(compiled, arch, request):
    funcs, ptxas = compiled[arch]
    _check(arch, funcs, ptxas, "plain", request)


# The fused-epilogue kernels (csrc/gemm_fused.cu): ~2.5x the plain kernels' code, so ~45 s of nvcc per
# architecture; sm_90a runs with the slow tests.
@pytest.mark.parametrize("arch", [ARCHS[0], pytest.param(ARCHS[1], marks=pytest.mark.slow)])
def test_gemm_fused_sass(compiled, compile_once, arch, request):
    funcs, ptxas = compile_once("gemm_fused.cu", arch)
    _check(arch, funcs, ptxas, "fused", request, plain=compiled[arch])


# The fused GEMMs with a float A (csrc/gemm_fused_float_a.cu: FloatATileLoader quantizes A as it loads it),
# compiled for one tile (float_a_tile: the smallest-M bucket's), W8 and every W4 group size, three A types.
A_TYPES = {"f32": "EfEEv", "f16": "E6__halfEEv", "bf16": "E13__nv_bfloat16EEv"}  # the mangled A type argument


def float_a_tile():
    """The tile the float-A kernels are built for: the first sm_80 rule's (csrc/configs/gemm_tiles.h
    float_a_tile = pick_tile(80, 1, w4); the rules give W8 and W4 the same tile at M = 1)."""
    text = open(os.path.join(CSRC, "configs", "gemm_tiles.h")).read()
    rules = re.findall(r"\{80, (-?\d+), (\d+), (\d+)[,}]", text)  # a row: arch, max_m, w8, w4[, max_splits]
    w8, w4 = int(rules[0][1]), int(rules[0][2])
    assert w8 == w4, "the float-A kernels assume one tile for W8 and W4"
    return w8


@pytest.mark.parametrize("arch", [ARCHS[0], pytest.param(ARCHS[1], marks=pytest.mark.slow)])
def test_gemm_fused_float_a_sass(compile_once, arch, request):
    """Every float-A kernel: the int8 tensor cores in its main loop (as many IMMA per iteration as its int8
    twin), no local memory or spills, A read with 16-byte global loads (LDG.E.128, never a byte load) and
    stored to shared memory 16 bytes at a time (STS.128), W still by cp.async (LDGSTS), and the quantizer's
    float -> int conversion (F2I). Registers and main-loop length are printed beside the int8 twin's."""
    funcs, ptxas = compile_once("gemm_fused_float_a.cu", arch)
    twins, twin_ptxas = compile_once("gemm_fused.cu", arch)  # the int8 fused kernels, for comparison
    tile = float_a_tile()
    kernels = {}
    for name in funcs:
        key = kernel_key(name)
        if key is None:
            continue
        a = [t for t, m in A_TYPES.items() if "FusedEpilogue" + m in name]
        assert key[0] == tile and key[2] == "fused" and len(a) == 1, name
        kernels[(key[1], a[0])] = name
    kinds = ["w8"] + [f"w4g{g}" for g in w4_group_sizes()]
    assert set(kernels) == {(k, a) for k in kinds for a in A_TYPES}, sorted(kernels)
    twin_names = {kernel_key(n)[1]: n for n in twins if kernel_key(n) and kernel_key(n)[0] == tile}
    bm, bn, bk, wm, wn, _ = tile_table()[tile]
    print(f"\n{arch}: float-A fused kernels, tile {tile}: kind a_type regs loop(IMMA) LDG.128 STS.128 | int8 twin "
          f"regs loop")
    for (kind, a_type), name in sorted(kernels.items()):
        ins = funcs[name]
        ops = collections.Counter(op for _, op, _ in ins)
        what = f"{arch} float-A {kind} {a_type}"
        loop = aot.main_loop(ins)
        lops = collections.Counter(op for _, op, _ in loop)
        imma = lops["IMMA.16832.S8.S8"]
        assert imma == (bm // wm // 16) * (bn // wn // 8) * (bk // 32), f"{what}: {imma} IMMA in the main loop"
        assert any(o.startswith("LDSM") for o in lops), f"{what}: no ldmatrix in the main loop"
        assert ops["LDL"] == 0 and ops["STL"] == 0, f"{what}: local memory (LDL {ops['LDL']}, STL {ops['STL']})"
        regs, spill = ptxas[name]
        assert spill == 0, f"{what}: {spill} bytes of spills"
        ldg128 = sum(v for o, v in lops.items() if o.startswith("LDG.E.128"))
        assert ldg128 > 0, f"{what}: A is not read with 16-byte loads (LDG.E.128) in the main loop"
        byte_loads = {o: v for o, v in ops.items() if o.startswith("LDG") and (".U8" in o or ".S8" in o)}
        assert not byte_loads, f"{what}: byte loads {byte_loads}"
        assert lops["STS.128"] > 0, f"{what}: A's int8 chunks are not stored 16 bytes at a time (STS.128)"
        assert lops["LDGSTS.E.BYPASS.128"] > 0, f"{what}: W is not loaded by cp.async in the main loop"
        assert any(o.startswith("F2I") for o in lops), f"{what}: no float -> int conversion in the main loop"
        row = dict(arch=arch, tile=tile, kind=kind, a_type=a_type, registers=regs, instructions=len(ins),
                   loop_instructions=len(loop), loop_imma=imma, loop_ldg128=ldg128, loop_sts128=lops["STS.128"])
        twin = ""
        if kind in twin_names:
            tl = aot.main_loop(twins[twin_names[kind]])
            row.update(twin_registers=twin_ptxas[twin_names[kind]][0], twin_loop_instructions=len(tl))
            twin = f"{row['twin_registers']:>4} {len(tl):>5}"
        request.node.user_properties.append((f"float_a_{kind}_{a_type}", row))
        print(f"{arch}: {kind:<7} {a_type:<5} {regs:>4} {len(loop):>5}({imma}) {ldg128:>6} {lops['STS.128']:>6} "
              f"| {twin}")


# The same check on a small kernel that calls the conversions from ptx.cuh, and on a copy of ptx.cuh whose
# bf16 conversion truncates (the bug a device-only `#if __CUDA_ARCH__` branch hid from the emulator): the
# check accepts the first and names the wrong instruction in the second.
CVT_PROBE = r"""
#include "ptx.cuh"
__global__ void cvt_probe(const float* x, uint32_t* y) {
  const int i = threadIdx.x;
  y[i] = ditq::ptx::f32_to_bf16_bits(x[2 * i]) | (uint32_t(ditq::ptx::f32_to_f16_bits(x[2 * i + 1])) << 16);
}
"""


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mutant", [None, ("__float2bfloat16_rn(f)", "__float2bfloat16_rz(f)"),
                                    ("__float2half_rn(f)", "__float2half_rd(f)")], ids=["ptx", "bf16_rz", "f16_rd"])
def test_conversion_check_names_the_rounding(arch, mutant, tmp_path):
    src = tmp_path / "csrc"
    shutil.copytree(CSRC, src)
    if mutant:
        text = (src / "ptx.cuh").read_text()
        assert text.count(mutant[0]) == 1, f"{mutant[0]} is not (once) in csrc/ptx.cuh: update the mutant"
        (src / "ptx.cuh").write_text(text.replace(*mutant))
    (tmp_path / "cvt_probe.cu").write_text(CVT_PROBE)
    (ins,) = compile_cuda(str(tmp_path / "cvt_probe.cu"), arch, tmp_path, include=str(src), flags=()).functions.values()
    conv = set(conversions(ins))
    if mutant is None:
        assert conv == RN_CONVERSIONS[arch], conv
    else:
        assert conv != RN_CONVERSIONS[arch] and any(o.endswith((".RZ", ".RM")) for o in conv), conv

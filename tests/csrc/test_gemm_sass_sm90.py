"""The machine code of the Hopper GEMMs (csrc/gemm_sm90.cu; with the fused epilogue csrc/gemm_sm90_fused.cu),
checked without a GPU: compiled here by nvcc for sm_90a and disassembled with the cuobjdump that ships in
triton's wheel.

Every kernel (Hopper tile x weight kind, every W4 group size) must use the int8 wgmma (IGMMA ... .S8.S8), TMA
(UTMALDG) and mbarriers (SYNCS), no local memory (LDL / STL, spills), and the round-to-nearest-even output
conversions. Its main loop (the innermost backward branch holding an IGMMA: the k loop) must keep a wgmma
group in flight across its wait (WARPGROUP.DEPBAR.LE gsb0, 0x1): W8A8 never drains (no 0x0 in the loop);
W4A8 drains once per stage at most, where a group ends and its partial is folded into the fp32 sums (see
csrc/gemm_sm90.cuh for why). ptxas must not serialize the wgmmas (its C7514 warning). The fused-epilogue
instantiations (FusedEpilogue) pass the same checks, hold the pieces' own instructions (GELU's MUFU.EX2, the int8
output's F2I), keep the plain kernel's main-loop wgmma, TMA, ldmatrix and wait work, and use no more registers
than a consumer warpgroup gets from setmaxnreg. The same kernels run every split-K count: the reduction (atomic
count, fences, block barriers) is compiled in, after the main loop, and the schedule's work-unit mapping (the
CTA's tile and split, from its 1-D block index: integer divisions) before it. Registers, shared memory and the
main loop's instructions per wgmma are printed (`pytest -s`) and kept in user_properties. The W4A8 kernels with
integer group scales (gemm_w4a8i_sm90_kernel) pass W8A8's wait rule (never a drain) and hold no fold in their
main loop (no I2F / FFMA): the group scale is applied to the weights before the wgmma."""
import collections
import os
import re

import pytest
from nvcc_sass import compile_cuda

from ditq.kernels import aot

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSRC = os.path.join(ROOT, "csrc")
RN_CONVERSIONS = {"F2FP.BF16.F32.PACK_AB", "F2FP.F16.F32.PACK_AB"}


def sm90_tables():
    """({id: (BM, BN, STAGES, CONSUMERS)} for W8, the same for W4) parsed from csrc/configs/gemm_tiles_sm90.h."""
    text = open(os.path.join(CSRC, "configs", "gemm_tiles_sm90.h")).read()
    out = []
    for kind in ("W8", "W4"):
        body = re.search(rf"#define DITQ_GEMM_SM90_{kind}_TILES\(X\)(.*?)\n\n", text, re.S).group(1)
        rows = re.findall(r"X\((\d+),\s*(\d+),\s*(\d+),\s*(\d+),\s*(\d+)\)", body)
        out.append({int(r[0]): tuple(int(v) for v in r[1:]) for r in rows})
    return out


def w4_group_sizes():
    text = open(os.path.join(CSRC, "configs", "kernel_families.h")).read()
    return [int(g) for g in re.findall(r"X\((\d+)\)", re.search(r"#define DITQ_W4_GROUP_SIZES\(X\)(.*)", text).group(1))]


def kernel_key(name):
    """('w8' | 'w4g<G>', (BM, BN, STAGES, CONSUMERS), 'plain' | 'fused') of a mangled Hopper kernel name, else
    None."""
    m = re.search(r"gemm_(w8a8|w4a8i?)_sm90_kernelINS\w*?Sm90TileILi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)EEE(?:Li(\d+)E)?", name)
    if not m:
        return None
    shape = tuple(int(v) for v in m.groups()[1:5])
    epi = "fused" if "FusedEpilogue" in name else "plain"
    assert epi == "fused" or "PlainEpilogue" in name, name
    kind = {"w8a8": "w8", "w4a8": "w4g", "w4a8i": "w4ig"}[m.group(1)]
    return (kind if kind == "w8" else f"{kind}{m.group(6)}"), shape, epi


def consumer_regs():
    """kConsumerRegs of csrc/gemm_sm90.cuh: the registers a consumer thread has after setmaxnreg."""
    text = open(os.path.join(CSRC, "gemm_sm90.cuh")).read()
    return int(re.search(r"kConsumerRegs = (\d+)", text).group(1))


def producer_regs():
    """kProducerRegs of csrc/gemm_sm90.cuh: the registers a producer thread keeps after setmaxnreg."""
    text = open(os.path.join(CSRC, "gemm_sm90.cuh")).read()
    return int(re.search(r"kProducerRegs = (\d+)", text).group(1))


SM_REGISTERS = 65536  # 32-bit registers per SM (sm_90)


def setmaxnreg_problems(ins, entry_regs, consumers, producer, consumer):
    """Why a warp-specialized kernel's register hand-over would fail on the GPU (empty: it will not).

    PTX ISA, setmaxnreg: registers move between warps through a per-CTA pool, filled by the launch's allocation
    (the entry register count ptxas reports x the block's threads); setmaxnreg.inc blocks until the pool can serve
    it. ptxas drops every setmaxnreg when it cannot tell the entry count (its C7508 note; __launch_bounds__(T, 1)
    pins it), leaving no USETMAXREG in the SASS. The emulator does not model registers at all, so a pool that
    cannot serve the consumers' increase (a kConsumerRegs / kProducerRegs / CONSUMERS change) would pass every
    CPU test and hang on the GPU, the consumers spinning in USETMAXREG.TRY_ALLOC.
    ``ins``: the kernel's (address, opcode, operands) list; one producer and ``consumers`` consumer warpgroups."""
    out = []
    threads = 128 * (1 + consumers)

    def counts(prefix):
        return [int(re.findall(r"0x([0-9a-f]+)", operands)[-1], 16) for _, op, operands in ins
                if op.startswith(prefix)]

    dealloc, alloc = counts("USETMAXREG.DEALLOC"), counts("USETMAXREG.TRY_ALLOC")
    if dealloc != [producer]:
        out.append(f"USETMAXREG.DEALLOC counts {dealloc}, expected one to kProducerRegs = {producer} (none: ptxas "
                   f"dropped setmaxnreg, C7508)")
    if alloc != [consumer]:
        out.append(f"USETMAXREG.TRY_ALLOC counts {alloc}, expected one to kConsumerRegs = {consumer}")
    if entry_regs * threads > SM_REGISTERS:
        out.append(f"{entry_regs} registers x {threads} threads = {entry_regs * threads} > {SM_REGISTERS}: the "
                   f"block cannot launch")
    need = 128 * (producer + consumers * consumer)
    if entry_regs * threads < need:
        out.append(f"the CTA's pool is {entry_regs} x {threads} = {entry_regs * threads} registers, the warpgroups "
                   f"ask for 128 x ({producer} + {consumers} x {consumer}) = {need}: setmaxnreg.inc never "
                   f"completes (a hang)")
    return out


def _compile(source, tmp):
    """({mangled name: SASS}, {mangled name: (registers, spill bytes)}, {names ptxas serialized}) of csrc/<source>."""
    cubin = compile_cuda(source, "sm_90a", tmp)
    return cubin.functions, cubin.ptxas, cubin.serialized


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return _compile("gemm_sm90.cu", tmp_path_factory.mktemp("gemm_sass_sm90"))


def _op(op, operands):
    """The whole opcode: aot's parser stops at the lowercase 'x' of a shape ('IGMMA.64' + 'x16x32.S8.S8 R24, ...')."""
    return op + operands.split()[0] if operands.startswith("x") else op


def _depbar(ops_with_operands):
    """Counter of the pending-group counts of the WARPGROUP.DEPBAR.LE gsb0 waits in an instruction list."""
    out = collections.Counter()
    for _, op, operands in ops_with_operands:
        if op.startswith("WARPGROUP.DEPBAR"):
            out[int(re.search(r"0x([0-9a-f]+)", operands).group(1), 16)] += 1
    return out


def _max_register(ins):
    """1 + the highest general register (R<n>) an instruction list names: what a thread must hold."""
    regs = [int(r) for _, _, operands in ins for r in re.findall(r"\bR(\d+)\b", operands)]
    return 1 + max(regs) if regs else 0


def test_gemm_sass_sm90(compiled, request):
    _check(compiled, "plain", request)


# The fused-epilogue kernels (csrc/gemm_sm90_fused.cu): another nvcc run of the same size as gemm_sm90.cu's, so
# with the slow tests.
@pytest.mark.slow
def test_gemm_fused_sass_sm90(compiled, tmp_path_factory, request):
    _check(_compile("gemm_sm90_fused.cu", tmp_path_factory.mktemp("gemm_sass_sm90_fused")), "fused", request,
           plain=compiled)


def _check(compiled, epi, request, plain=None):
    """Every Hopper kernel of one epilogue policy: the checks of the module docstring; for the fused policy also
    its pieces' instructions, the plain kernel's main-loop work and the setmaxnreg budget (``plain``: the plain
    kernels' compile)."""
    funcs, ptxas, serialized = compiled
    w8, w4 = sm90_tables()
    kernels = {kernel_key(n): n for n in funcs if kernel_key(n)}
    expected = {("w8", s, epi) for s in w8.values()} | \
               {(f"{w4k}{g}", s, epi) for s in w4.values() for g in w4_group_sizes() for w4k in ("w4g", "w4ig")}
    assert set(kernels) == expected, f"kernels compiled {sorted(kernels)} != tables {sorted(expected)}"
    plain_kernels = {kernel_key(n)[:2]: n for n in (plain[0] if plain else {}) if kernel_key(n)}
    report = []
    for (kind, shape, _), name in sorted(kernels.items()):
        ins = funcs[name]
        ops = collections.Counter(_op(op, operands) for _, op, operands in ins)
        bm, bn, stages, consumers = shape
        what = f"sm_90a {kind} {epi} {bm}x{bn} ({stages} stages, {consumers} consumer warpgroups)"
        igmma = {o: v for o, v in ops.items() if o.startswith("IGMMA")}
        # W8: one warpgroup's 64 x BN per wgmma; W4 (transposed): 64 channels x BM activation rows
        n = bn if kind == "w8" else bm
        assert set(igmma) <= {f"IGMMA.64x{n}x32.S8.S8"} and igmma, f"{what}: wgmma ops {igmma}"
        assert ops["UTMALDG.2D"] > 0, f"{what}: no TMA load (UTMALDG.2D): {sorted(o for o in ops if 'TMA' in o)}"
        assert any(o.startswith("SYNCS") for o in ops), f"{what}: no mbarrier instruction (SYNCS)"
        assert ops["LDL"] == 0 and ops["STL"] == 0, f"{what}: local memory (LDL {ops['LDL']}, STL {ops['STL']})"
        conv = {o for o in ops if o.split(".")[0] in ("F2F", "F2FP")}
        assert conv == RN_CONVERSIONS, f"{what}: output conversions {conv}, expected exactly {RN_CONVERSIONS}"
        regs, spill = ptxas[name]
        assert spill == 0, f"{what}: {spill} bytes of spills"
        assert name not in serialized, f"{what}: ptxas serialized the wgmmas (C7514)"
        loop = aot.main_loop(ins)
        lops = collections.Counter(_op(op, operands) for _, op, operands in loop)
        loop_igmma = sum(v for o, v in lops.items() if o.startswith("IGMMA"))
        assert loop_igmma == 4, f"{what}: {loop_igmma} wgmma in the main loop, expected 4 (BK = 128 per stage)"
        waits = _depbar(loop)
        assert waits[1] >= 1, f"{what}: the main loop never keeps a wgmma group in flight: waits {dict(waits)}"
        if kind.startswith("w4g"):
            assert waits[0] <= 1, f"{what}: the main loop drains more than once per stage: {dict(waits)}"
        else:  # W8A8 and W4A8 with integer group scales: one int32 sum over K, nothing to fold, never a drain
            assert waits[0] == 0, f"{what}: the main loop drains the wgmma pipeline (DEPBAR 0x0): {dict(waits)}"
        if kind.startswith("w4ig"):  # q * w is built before the wgmma: no int -> float conversion, no fma
            folds = {o: v for o, v in lops.items() if o.startswith(("I2F", "FFMA"))}
            assert not folds, f"{what}: the main loop folds partials ({folds}) although the group scales are integer"
        assert lops["LDSM.16.M88.4"] + lops["LDSM.16.M88.2"] == (0 if kind == "w8" else 4 if kind == "w4g32" else 2)
        # split-K (one kernel for every split count): the tile's atomic count and the gpu-scope fences are there,
        # after the main loop, never in it
        assert any(o.startswith("ATOMG") for o in ops) and any(o.startswith("MEMBAR") for o in ops), what
        assert not any(o.startswith(("ATOMG", "MEMBAR", "BAR.SYNC")) for o in lops), f"{what}: split-K in the loop"
        # the work-unit mapping (a CTA's tile and split: runtime integer divisions, MUFU.RCP) runs once, before
        assert not any(o.startswith("MUFU.RCP") for o in lops) and any(o.startswith("MUFU.RCP") for o in ops), what
        # ptxas reports the launch's allocation; a consumer runs with kConsumerRegs after setmaxnreg, and every
        # register the code names must fit in that
        max_reg = _max_register(ins)
        assert max_reg <= consumer_regs(), f"{what}: names R{max_reg - 1}, over setmaxnreg's {consumer_regs()}"
        # the hand-over itself: both setmaxnreg survive in the SASS and the CTA's pool can serve them
        problems = setmaxnreg_problems(ins, regs, consumers, producer_regs(), consumer_regs())
        assert not problems, f"{what}: " + "; ".join(problems)
        row = dict(kind=kind, epi=epi, BM=bm, BN=bn, stages=stages, consumers=consumers, registers=regs,
                   max_register=max_reg, instructions=len(ins),
                   smem=stages * (bm * 128 + bn * (128 if kind == "w8" else 64)) + 16 * stages,
                   loop_instructions=len(loop), loop_wgmma=loop_igmma, per_wgmma=round(len(loop) / loop_igmma, 2),
                   waits={f"0x{k}": v for k, v in sorted(waits.items())}, mix=dict(lops.most_common(8)))
        if plain is not None:
            # the pieces are there (GELU's exp: MUFU.EX2; the int8 output's cvt.rni: F2I), and the main loop keeps
            # the plain kernel's wgmma, TMA, ldmatrix and wait work (its length is printed beside the plain one)
            assert ops["MUFU.EX2"] > 0, f"{what}: no MUFU.EX2 (GELU's expf)"
            assert any(o.startswith("F2I") for o in ops), f"{what}: no float -> int conversion (int8 output)"
            pname = plain_kernels[(kind, shape)]
            ploop = aot.main_loop(plain[0][pname])
            pops = collections.Counter(_op(op, operands) for _, op, operands in ploop)
            for op in [o for o in set(pops) | set(lops) if o.startswith(("IGMMA", "UTMALDG", "LDSM", "SYNCS"))]:
                assert lops[op] == pops[op], f"{what}: {lops[op]} {op} in the main loop, the plain kernel {pops[op]}"
            assert waits == _depbar(ploop), f"{what}: main-loop waits {dict(waits)}, plain {dict(_depbar(ploop))}"
            row.update(plain_max_register=_max_register(plain[0][pname]), plain_instructions=len(plain[0][pname]),
                       plain_loop_instructions=len(ploop))
        report.append(row)
        request.node.user_properties.append((f"{kind}_{bm}x{bn}_{epi}", row))
    # what integer group scales are for: where the tile holds 64+ activation rows (the fold's cost grows with them),
    # the main loop without folds is shorter than the float-scale kernel's at every group size
    by = {(r["kind"], r["BM"], r["BN"]): r["loop_instructions"] for r in report}
    for (kind, bm, bn), n_int in by.items():
        if kind.startswith("w4ig") and bm >= 64:
            n_float = by[("w4g" + kind[4:], bm, bn)]
            assert n_int < n_float, f"sm_90a {kind} {epi} {bm}x{bn}: {n_int} loop instructions, float scales {n_float}"
    print("\nsm_90a: kind    epi    BMxBN    st  WG regs maxR   smem  instrs  loop  /wgmma  waits  (main-loop mix)")
    for r in report:
        print(f"sm_90a: {r['kind']:<7} {r['epi']:<5} {r['BM']:>3}x{r['BN']:<4} {r['stages']:>2} {r['consumers']:>3} "
              f"{r['registers']:>4} {r['max_register']:>4} {r['smem']:>6} {r['instructions']:>6} "
              f"{r['loop_instructions']:>5} {r['per_wgmma']:>7}  {r['waits']}  {r['mix']}")
        if "plain_max_register" in r:
            print(f"sm_90a: {'':<7} plain {'':>8} {'':>2} {'':>3} {'':>4} {r['plain_max_register']:>4} {'':>6} "
                  f"{r['plain_instructions']:>6} {r['plain_loop_instructions']:>5}")


# The register-pool rule above, on hand-made instruction lists (no nvcc): it passes the shapes the kernels have
# today and names each way the hand-over would fail on a GPU.
_USETMAXREG = [(0x100, "USETMAXREG.TRY_ALLOC.CTAPOOL", "UP0, 0xe8"), (0x900, "USETMAXREG.DEALLOC.CTAPOOL", "0x28")]


@pytest.mark.parametrize("entry_regs, consumers, expect", [
    (168, 2, ""),  # 2 consumer warpgroups: 168 x 384 = 64512 = 128 x (40 + 2 x 232), exactly
    (232, 1, ""),  # 1 consumer warpgroup: ptxas enters with 232
    (160, 2, "never completes"),  # a pool of 61440 cannot give two warpgroups 232
    (176, 2, "cannot launch"),  # 176 x 384 > 65536
    (168, 3, "cannot launch"),  # a third consumer warpgroup: 168 x 512 > 65536
])
def test_setmaxnreg_pool_rule(entry_regs, consumers, expect):
    problems = setmaxnreg_problems(_USETMAXREG, entry_regs, consumers, 40, 232)
    if not expect:
        assert problems == []
    else:
        assert any(expect in p for p in problems), problems


def test_setmaxnreg_rule_needs_both_instructions():
    assert any("C7508" in p for p in setmaxnreg_problems(_USETMAXREG[:1], 168, 2, 40, 232))
    assert any("TRY_ALLOC" in p for p in setmaxnreg_problems(_USETMAXREG[1:], 168, 2, 40, 232))
    assert any("TRY_ALLOC" in p for p in setmaxnreg_problems(_USETMAXREG, 168, 2, 40, 240))

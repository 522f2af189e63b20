"""The device halves of ptx.cuh's Hopper instructions, checked without a GPU: tests/csrc/hopper_sass_probe.cu
(a warp-specialised TMA -> wgmma tile and register-A wgmmas, every Hopper wrapper once) is compiled by nvcc for
sm_90a, where each wrapper must appear in the SASS under its own opcode, and for sm_80, where it must compile
to traps (the launchers never pick these kernels there). What the emulator cannot see of the asm (a wrong
instruction, a missing operand) shows here."""
import collections
import os
import re

import pytest
from nvcc_sass import compile_cuda

HERE = os.path.dirname(os.path.abspath(__file__))
PROBE = os.path.join(HERE, "hopper_sass_probe.cu")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hopper_sass")
    out = {}
    for arch in ("sm_90a", "sm_80"):
        cubin = compile_cuda(PROBE, arch, tmp)
        out[arch] = (cubin.functions, cubin.log)
    return out


def _instructions(ins):
    """(opcode, operands) with IGMMA's shape glued back on: aot's parser stops an opcode at the lowercase `x`
    of `IGMMA.64x128x32.S8.S8`."""
    out = []
    for _, op, args in ins:
        if args.startswith("x"):
            shape, _, args = args.partition(" ")
            op += shape
        out.append((op, args))
    return out


def _ops(funcs, pattern):
    names = [n for n in funcs if re.search(pattern, n)]
    assert len(names) == 1, f"{pattern}: {names}"
    return collections.Counter(op for op, _ in _instructions(funcs[names[0]]))


@pytest.mark.parametrize("n", [8, 24, 64, 256])
def test_sm90a_pipeline_instructions(compiled, n):
    funcs, stderr = compiled["sm_90a"]
    ops = _ops(funcs, rf"hopper_probeILi{n}E")
    expected = {
        f"IGMMA.64x{n}x32.S8.S8": "wgmma.mma_async m64n{N}k32 .s32.s8.s8",
        "UTMALDG.2D": "cp.async.bulk.tensor.2d (tma_load_2d)",
        "UTMACCTL.PF": "prefetch.tensormap",
        "SYNCS.EXCH.64": "mbarrier.init",
        "SYNCS.ARRIVE.TRANS64.A1T0": "mbarrier.arrive",
        "SYNCS.ARRIVE.TRANS64": "mbarrier.arrive.expect_tx",
        "SYNCS.PHASECHK.TRANS64.TRYWAIT": "mbarrier.try_wait.parity",
        "FENCE.VIEW.ASYNC.S": "fence.proxy.async.shared::cta",
        "WARPGROUP.ARRIVE": "wgmma.fence",
        "WARPGROUP.DEPBAR.LE": "wgmma.wait_group",
        "USETMAXREG.TRY_ALLOC.CTAPOOL": "setmaxnreg.inc",
        "USETMAXREG.DEALLOC.CTAPOOL": "setmaxnreg.dec",
    }
    for op, what in expected.items():
        assert ops[op] > 0, f"N={n}: no {op} ({what}) in the SASS: {sorted(ops)}"
    assert ops[f"IGMMA.64x{n}x32.S8.S8"] == 4, "one wgmma per k32 step of the 128-byte K tile"
    assert not any(o.startswith("BPT") for o in ops), "a trap in the sm_90a build: a DITQ_SM90A guard is wrong"
    # ptxas serialises wgmmas (and says so) when accumulators are touched between issue and wait
    assert "warpgroup.wait is injected" not in stderr and "serializ" not in stderr.lower(), stderr[-2000:]


@pytest.mark.parametrize("n", [16, 128])
def test_sm90a_register_a_wgmma(compiled, n):
    funcs, _ = compiled["sm_90a"]
    ins = funcs[[k for k in funcs if re.search(rf"hopper_probe_rsILi{n}E", k)][0]]
    gmma = [(op, args) for op, args in _instructions(ins) if op.startswith("IGMMA")]
    assert [op for op, _ in gmma] == [f"IGMMA.64x{n}x32.S8.S8"], gmma
    assert "gdesc" in gmma[0][1] and re.match(r"R\d+, R\d+, gdesc", gmma[0][1]), \
        f"register A: IGMMA's second operand must be a register, got {gmma[0][1]}"


def test_sm80_build_traps_instead_of_hopper_instructions(compiled):
    funcs, _ = compiled["sm_80"]
    assert len(funcs) == 6
    for name, ins in funcs.items():
        ops = collections.Counter(op for op, _ in _instructions(ins))
        assert ops["BPT.TRAP"] > 0, f"{name}: no trap in the sm_80 build"
        assert not any(o.startswith(("IGMMA", "UTMA", "SYNCS", "WARPGROUP")) for o in ops), (name, sorted(ops))

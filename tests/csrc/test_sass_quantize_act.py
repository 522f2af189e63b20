"""The machine code of the activation-quantization kernels (csrc/quantize_act.cu), checked without a GPU:
compiled here by nvcc for sm_80 and sm_90a (torch-free, ~2 s per architecture), disassembled with the
cuobjdump in triton's wheel.

Every instantiation: no local memory (no LDL / STL, STACK:0 and LOCAL:0 in -res-usage), a modest register
count. The 16-byte paths load with LDG.E.128 and store 4 or 8 int8 at once; the per-token paths reduce the
row max with SHFL.BFLY (5 butterfly steps) and no shared memory or barrier."""
import re

import pytest
from nvcc_sass import by_key, compile_cuda, count as _count

ARCHS = ("sm_80", "sm_90a")


@pytest.fixture(scope="module", params=ARCHS)
def compiled(request, tmp_path_factory):
    arch = request.param
    return arch, compile_cuda("quantize_act.cu", arch, tmp_path_factory.mktemp("qact"))


def _functions(cubin):
    """{kernel signature (demangled-ish key): [unpredicated instructions]}, key like ('bf16', 1, 1)."""
    return by_key(cubin, _key)


def _key(mangled):
    m = re.search(r"quantize_act_kernelI(f|6__half|13__nv_bfloat16)Lb([01])ELb([01])E", mangled)
    assert m, mangled
    return {"f": "f32", "6__half": "f16", "13__nv_bfloat16": "bf16"}[m.group(1)], int(m.group(2)), int(m.group(3))


def test_all_twelve_instantiations_are_built(compiled):
    _, cubin = compiled
    assert sorted(_functions(cubin)) == sorted((d, v, y) for d in ("f32", "f16", "bf16") for v in (0, 1) for y in (0, 1))


def test_vector_paths_use_16_byte_loads_and_wide_stores(compiled):
    arch, cubin = compiled
    for (dtype, vec, dyn), ins in _functions(cubin).items():
        n128 = _count(ins, r"^LDG\.E\.128")
        if vec:
            assert n128 >= (2 if dyn else 1), f"{arch} {dtype} vec dyn={dyn}: {n128} LDG.E.128"
            assert _count(ins, r"^LDG\.E\.(U16|U8|64)") == 0, f"{arch} {dtype}: narrow loads on the 16-byte path"
            wide = r"^STG\.E\.64 " if dtype != "f32" else r"^STG\.E "
            assert _count(ins, wide) >= 1 and _count(ins, r"^STG\.E\.U8") == 0, f"{arch} {dtype}: narrow stores"
        else:
            assert n128 == 0


def test_per_token_paths_reduce_with_shuffles_only(compiled):
    arch, cubin = compiled
    for (dtype, vec, dyn), ins in _functions(cubin).items():
        shfl = _count(ins, r"^SHFL\.BFLY")
        assert shfl == (5 if dyn else 0), f"{arch} {dtype} vec={vec} dyn={dyn}: {shfl} SHFL.BFLY"
        assert _count(ins, r"^(BAR|LDS|STS)") == 0  # one warp per row: no shared memory, no barrier


def test_no_spills_no_stack_modest_registers(compiled, record_property):
    arch, cubin = compiled
    res, ptxas = cubin.res_usage, cubin.log
    for ins in _functions(cubin).values():
        assert _count(ins, r"^(LDL|STL)") == 0
    usage = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    assert len(usage) == 12, res
    for name, reg, stack, shared, local in usage:
        assert (int(stack), int(shared), int(local)) == (0, 0, 0), f"{arch} {name}: {reg} {stack} {shared} {local}"
        assert int(reg) <= 40, f"{arch} {name}: {reg} registers"
    assert "spill" not in ptxas or re.findall(r"(\d+) bytes spill", ptxas) and all(
        v == "0" for v in re.findall(r"(\d+) bytes spill", ptxas))
    record_property(f"registers_{arch}", sorted({int(u[1]) for u in usage}))

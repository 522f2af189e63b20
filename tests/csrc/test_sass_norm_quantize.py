"""The machine code of the fused LayerNorm + modulation + quantization (csrc/norm_quantize.cu), checked without
a GPU: compiled here by nvcc for sm_80 and sm_90a (torch-free, a few seconds), disassembled with the cuobjdump
in triton's wheel.

Every instantiation: no local memory (no LDL / STL; STACK, SHARED and LOCAL 0), a modest register count; the
row sums are warp butterflies (SHFL.BFLY: 5 for the mean, 5 for the variance, 5 more for a dynamic scale's
absmax) with no shared memory or barrier; the square root and the divisions are the IEEE ones, checked on
the PTX (sqrt.rn.f32, div.rn.f32, no .approx: in SASS both expand into MUFU plus a Newton fix-up that looks
much the same either way); the 16-byte paths load x, and the fp32 shift / scale, with LDG.E.128 and store 4
or 8 int8 at once."""
import re

import pytest
from nvcc_sass import by_key, compile_cuda, count as _count

from ditq.kernels import aot

ARCHS = ("sm_80", "sm_90a")


@pytest.fixture(scope="module", params=ARCHS)
def compiled(request, tmp_path_factory):
    arch = request.param
    return arch, compile_cuda("norm_quantize.cu", arch, tmp_path_factory.mktemp("normq"), ptx=True)


def _key(mangled):
    m = re.search(r"norm_quantize_kernelI(f|6__half|13__nv_bfloat16)Lb([01])ELb([01])E", mangled)
    assert m, mangled
    return {"f": "f32", "6__half": "f16", "13__nv_bfloat16": "bf16"}[m.group(1)], int(m.group(2)), int(m.group(3))


def _functions(cubin):
    return by_key(cubin, _key)


def test_twelve_instantiations(compiled):
    _, cubin = compiled
    assert sorted(_functions(cubin)) == sorted((d, v, y) for d in ("f32", "f16", "bf16") for v in (0, 1) for y in (0, 1))


def test_vector_paths_use_16_byte_loads_and_wide_stores(compiled):
    arch, cubin = compiled
    for (dtype, vec, dyn), ins in _functions(cubin).items():
        n128 = _count(ins, r"^LDG\.E\.128")
        if vec:
            # x in each pass (3, or 4 with a dynamic scale) plus shift and scale in the passes that modulate
            assert n128 >= (4 + 2 * 2 if dyn else 3 + 2), f"{arch} {dtype} vec dyn={dyn}: {n128} LDG.E.128"
            assert _count(ins, r"^LDG\.E\.(U16|U8|64)") == 0, f"{arch} {dtype}: narrow loads on the 16-byte path"
            wide = r"^STG\.E\.64 " if dtype != "f32" else r"^STG\.E "
            assert _count(ins, wide) >= 1 and _count(ins, r"^STG\.E\.U8") == 0, f"{arch} {dtype}: narrow stores"
        else:
            assert n128 == 0


def test_row_sums_are_warp_butterflies(compiled):
    arch, cubin = compiled
    for (dtype, vec, dyn), ins in _functions(cubin).items():
        shfl = _count(ins, r"^SHFL\.BFLY")
        assert shfl == (15 if dyn else 10), f"{arch} {dtype} vec={vec} dyn={dyn}: {shfl} SHFL.BFLY"
        assert _count(ins, r"^(BAR|LDS|STS)") == 0


def test_ieee_sqrt_and_division(compiled):
    """The PTX holds only round-to-nearest square roots and divisions (no .approx, no .ftz, no fma
    contraction of the explicit products: every mul / add is .rn)."""
    arch, cubin = compiled
    ptx = cubin.ptx
    assert re.search(r"sqrt\.rn\.f32", ptx) and re.search(r"div\.rn\.f32", ptx)
    assert not re.search(r"(sqrt|div|rsqrt|rcp)\.approx", ptx), f"{arch}: an approximate sqrt / division"
    assert not re.search(r"\.ftz\.", ptx), f"{arch}: flush-to-zero arithmetic"
    assert not re.search(r"\bfma\.rn\.f32", ptx), f"{arch}: a fused multiply-add (the contract has none)"


def test_no_spills_no_stack_modest_registers(compiled, record_property):
    arch, cubin = compiled
    res = cubin.res_usage
    for ins in _functions(cubin).values():
        assert _count(ins, r"^(LDL|STL)") == 0
    usage = aot.parse_res_usage(res)
    assert len(usage) == 12, res
    for name, u in usage.items():
        assert (u["STACK"], u["SHARED"], u["LOCAL"]) == (0, 0, 0), f"{arch} {name}: {u}"
        assert u["REG"] <= 48, f"{arch} {name}: {u['REG']} registers"
    record_property(f"registers_{arch}", sorted({u["REG"] for u in usage.values()}))

"""The fused GEMMs' float-A variant (``A_FLOAT``: a bf16 A tile quantized in registers as it is loaded) compiled
ahead of time for cc 90 and cc 80, as the adaLN linear runs it (the smallest-M table entry, bf16 A, static scale,
bias): nothing spills, the main loop keeps the int8 variant's tensor-core instructions, A arrives in 16-byte
copies, and the quantization really is compiled into the loop (a round to nearest even: ``FRND``, or a conversion
that rounds by itself). One W8A8 variant
on Hopper (whose int8 entry uses TMA, which a float A never does) and one W4A8 variant on Ampere, each next to
its int8 twin."""
import re
from collections import Counter

import pytest

from ditq.kernels import aot, config_table, w4a8, w8a8

pytestmark = pytest.mark.slow  # four compiles in one subprocess
M = 2  # adaLN: a row per sample


def _entry(kernel, arch):
    return config_table.params(config_table.pick(config_table.load_table(kernel, arch), M))


JOBS = {
    "w8a8-sm90-int8": w8a8.aot_job(_entry("w8a8", "sm90"), 90, per_token=False),
    "w8a8-sm90-float": w8a8.aot_job(_entry("w8a8", "sm90"), 90, per_token=False, a_float="bf16"),
    "w4a8-sm80-int8": w4a8.aot_job(_entry("w4a8", "sm80"), 80, group_size=128, per_token=False),
    "w4a8-sm80-float": w4a8.aot_job(_entry("w4a8", "sm80"), 80, group_size=128, per_token=False, a_float="bf16"),
}


@pytest.fixture(scope="module")
def compiled():
    return dict(zip(JOBS, aot.compile_many(list(JOBS.values()))))


@pytest.fixture(scope="module")
def stats(compiled):
    out = {name: aot.sass_stats(c) for name, c in compiled.items()}
    for name, s in out.items():  # shown with -s
        print(f"{name}: {s.summary()} loop_ops={s.loop_ops}")
    return out


def _loop_roundings(compiled) -> Counter:
    """The main loop's instructions that round a float to the nearest integer, with their modifiers. Triton 3.8
    emits ``rint`` as FRND and then truncates (``F2I...TRUNC``); triton 3.6 (the H200 image's) folds it into the
    conversion, an F2I with no rounding modifier, whose default is round to nearest even."""
    sass, _ = aot.disassemble(compiled.cubin_path)
    loop = aot.main_loop(aot.parse_sass(sass))
    return Counter(op for _, op, _ in loop
                   if op.split(".")[0] in ("FRND", "F2I") and not re.search(r"\.(TRUNC|FLOOR|CEIL)\b", op))


@pytest.mark.parametrize("kernel, mma", [("w8a8-sm90", "IGMMA"), ("w4a8-sm80", "IMMA")],
                         ids=("w8a8-sm90", "w4a8-sm80"))
def test_float_a_variant_compiles_clean_with_the_int8_main_loop(compiled, stats, kernel, mma):
    f, i = stats[f"{kernel}-float"], stats[f"{kernel}-int8"]
    assert f.spills == 0 and f.stack == 0 and f.local == 0, f.summary()
    assert f.registers <= 255 and f.byte_loads == 0, f.summary()
    # the same tensor-core instructions, in the loop, as the int8 variant
    assert f.loop_ops.get(mma, 0) == i.loop_ops.get(mma, 0) > 0, (f.loop_ops, i.loop_ops)
    assert (f.igmma, f.imma) == (i.igmma, i.imma), (f.summary(), i.summary())
    # A arrives in 16-byte copies (never TMA: the launcher gives a float A pointer loads)
    assert f.utmaldg == 0 and f.wide_loads > 0, f.summary()
    # the per-element quantization is in the loop (its round to nearest), which is longer than the int8 one
    rounding, int8_rounding = _loop_roundings(compiled[f"{kernel}-float"]), _loop_roundings(compiled[f"{kernel}-int8"])
    assert sum(rounding.values()) > 0 and not int8_rounding, (rounding, int8_rounding, f.loop_ops)
    assert f.loop_len > i.loop_len, (f.summary(), i.summary())

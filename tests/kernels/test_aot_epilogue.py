"""The fused epilogue compiled ahead of time (cc 80 and 90): the GEMM keeps its tensor-core main loop
unchanged, nothing spills, and the epilogue's gate / residual loads are 16 bytes wide. One representative
variant per kernel, at the table entry DiT-XL/2 runs (M = 4096): W8A8 on Hopper with GELU + int8 output
(fc1 feeding a static fc2), W4A8 on Ampere with gate + residual (attention out-projection and fc2); plus
a negative control showing the 16-byte check can fail."""
import pytest

from ditq.kernels import aot, config_table, w4a8, w8a8

pytestmark = pytest.mark.slow  # five compiles, ~30 s on a loaded 2-core CPU (one subprocess)
M = 4096


def _entry(kernel, arch):
    return config_table.params(config_table.pick(config_table.load_table(kernel, arch), M))


JOBS = {
    "w8a8-sm90-plain": w8a8.aot_job(_entry("w8a8", "sm90"), 90, n_aligned=True),
    "w8a8-sm90-gelu+quant": w8a8.aot_job(_entry("w8a8", "sm90"), 90, fused="gelu+quant"),
    "w4a8-sm80-plain": w4a8.aot_job(_entry("w4a8", "sm80"), 80, group_size=128),
    "w4a8-sm80-gate+residual": w4a8.aot_job(_entry("w4a8", "sm80"), 80, group_size=128, fused="gate+residual"),
    # N not known to be a multiple of 16: the gate / residual rows lose their 16-byte alignment
    "w8a8-sm90-gate+residual-unaligned-n": w8a8.aot_job(_entry("w8a8", "sm90"), 90, fused="gate+residual",
                                                        n_aligned=False),
}


@pytest.fixture(scope="module")
def stats():
    compiled = aot.compile_many(list(JOBS.values()))
    out = {name: aot.sass_stats(c) for name, c in zip(JOBS, compiled)}
    for name, s in out.items():  # shown with -s: the figures quoted for the fused kernels
        print(f"{name}: {s.summary()}")
    return out


@pytest.mark.parametrize("fused, plain, mma", [("w8a8-sm90-gelu+quant", "w8a8-sm90-plain", "IGMMA"),
                                               ("w4a8-sm80-gate+residual", "w4a8-sm80-plain", "IMMA")],
                         ids=("w8a8-sm90-gelu-quant", "w4a8-sm80-gate-residual"))
def test_fused_epilogue_keeps_the_main_loop_and_spills_nothing(stats, fused, plain, mma):
    f, p = stats[fused], stats[plain]
    assert f.spills == 0 and f.stack == 0 and f.local == 0, f.summary()
    assert f.registers <= 255 and f.byte_loads == 0, f.summary()
    # the epilogue is after the loop: the loop keeps the plain GEMM's tensor-core ops, loads and length (ptxas
    # schedules the loop's address arithmetic a little differently around a different epilogue: a few IMAD / SHF)
    for op in (mma, "LDGSTS", "UTMALDG", "STS", "LDL", "STL"):
        assert f.loop_ops.get(op, 0) == p.loop_ops.get(op, 0), (op, f.loop_ops, p.loop_ops)
    assert f.loop_ops[mma] > 0 and f.loop_len <= 1.05 * p.loop_len, (f.summary(), p.summary())
    assert f.igmma == p.igmma and f.imma == p.imma and f.wide_loads >= p.wide_loads
    assert f.total > p.total  # the pieces are really compiled in


def test_gate_and_residual_loads_are_16_bytes(stats):
    f, p = stats["w4a8-sm80-gate+residual"], stats["w4a8-sm80-plain"]
    assert f.ldg.get("LDG.E.128", 0) >= p.ldg.get("LDG.E.128", 0) + 2, (f.ldg, p.ldg)
    # without N % 16 == 0 (which Triton's launch specialisation sees for DiT widths) the tile's rows are read
    # two bytes at a time, and holding them costs so many registers that ptxas spills
    control = stats["w8a8-sm90-gate+residual-unaligned-n"]
    assert control.ldg.get("LDG.E.128", 0) == 0 and control.byte_loads > 0, control.ldg

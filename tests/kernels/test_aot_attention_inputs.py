"""The attention-inputs kernel compiled ahead of time for cc 80 / 90 (no GPU): the exact IEEE operations its
interpreter twin emulates (no fma on a product that feeds an add, no approximate division, square root or reciprocal
square root, no flush to zero), 16-byte loads, no spills, launchable register counts."""
import pytest

from ditq.kernels import aot, attention_inputs as ai

# label -> aot_job keyword arguments (cc first)
JOBS = {
    "sm90-flux-bf16-torchnorm-rope": dict(cc=90),  # FLUX.1: 24 heads x 128
    "sm90-flux-bf16-diffusersnorm": dict(cc=90, rounding=2, rope=False),  # diffusers' RMSNorm rounds twice
    # rope alone, fp16, one token of one head (Triton's JIT makes S = H = 1 constexpr)
    "sm80-fp16-rope-only-one-head": dict(cc=80, dtype="fp16", norm_dtype=None, rounding=0, heads=1,
                                         ones=("S", "H")),
}


@pytest.fixture(scope="module")
def compiled():
    jobs = {label: ai.aot_job(kw.pop("cc"), **kw) for label, kw in ((k, dict(v)) for k, v in JOBS.items())}
    out = dict(zip(jobs, aot.compile_many(list(jobs.values()))))
    result = {}
    for label, c in out.items():
        sass, _ = aot.disassemble(c.cubin_path)
        ops = [op for _, op, _ in aot.parse_sass(sass)]
        stats = aot.sass_stats(c)
        print(f"attention_inputs {label} num_warps={jobs[label]['num_warps']}: {stats.summary()}")
        result[label] = (c, stats, ops, jobs[label])
    return result


@pytest.mark.parametrize("label", sorted(JOBS))
def test_exact_ieee_ops_in_ptx(compiled, label):
    c, _, _, job = compiled[label]
    norm, rope = job["constexprs"]["Q_NORM"], job["constexprs"]["ROPE"]
    assert ("div.rn.f32" in c.ptx and "sqrt.rn.f32" in c.ptx) == norm  # mean and 1 / sqrt, correctly rounded
    assert ("mul.rn.f32" in c.ptx) == (norm or rope)  # x * x into the sum, the rotary products
    assert ("add.rn.f32" in c.ptx) == rope
    for bad in ("div.full", "div.approx", "sqrt.approx", "rsqrt", ".ftz", "fma."):
        assert bad not in c.ptx, f"{label}: {bad} in the PTX"


@pytest.mark.parametrize("label", sorted(JOBS))
def test_no_spills_wide_loads_and_launchable(compiled, label):
    _, s, _, job = compiled[label]
    assert s.spills == 0 and s.stack == 0 and s.local == 0, s.summary()
    assert s.ldg.get("LDG.E.128", 0) > 0, s.summary()
    assert s.registers * job["num_warps"] * 32 <= 65536, s.summary()


def test_no_fma_on_a_product(compiled):
    """The rotary embedding adds no FFMA (its products are mul.rn); the FFMAs with a norm are the division and
    square root sequences, the same count with and without the rope (and either rounding)."""
    ffma = {label: sum(op.startswith("FFMA") for op in ops) for label, (_, _, ops, _) in compiled.items()}
    assert ffma["sm80-fp16-rope-only-one-head"] == 0, ffma
    assert ffma["sm90-flux-bf16-torchnorm-rope"] == ffma["sm90-flux-bf16-diffusersnorm"], ffma

"""The fused LayerNorm + modulate + quantize kernel compiled ahead of time for cc 80 / 90 (no GPU): it uses the
exact IEEE operations its interpreter twin emulates, never an fma on a per-element product, 16-byte loads, no
spills, and registers that let a 16-warp CTA launch. Plus controls proving the checks can fail: without the
alignment hint the loads narrow, and a plain ``y * a + b`` does become an FFMA."""
import re

import pytest
import triton
import triton.language as tl

from ditq.kernels import aot, norm_quantize as nq

# (label, config, cc, keyword arguments of aot_job): DiT-XL's K = 1152 runs at BLOCK_K = 2048; 16384 is the limit
CASES = [
    ("sm90-bf16-adaln-dynamic-2048", {"BLOCK_K": 2048}, 90, {}),
    ("sm80-bf16-adaln-dynamic-2048", {"BLOCK_K": 2048}, 80, {}),
    ("sm90-fp16-plain-static-2048", {"BLOCK_K": 2048}, 90, dict(in_dtype="fp16", mod_dtype=None, per_token=False)),
    ("sm80-bf16-adaln_fp32-static-2048", {"BLOCK_K": 2048}, 80, dict(mod_dtype="fp32", per_token=False)),
    ("sm90-bf16-adaln-dynamic-16384", {"BLOCK_K": 16384}, 90, {}),
    ("sm90-fp32-adaln_fp32-dynamic-16384", {"BLOCK_K": 16384}, 90, dict(in_dtype="fp32", mod_dtype="fp32")),
    ("sm80-bf16-adaln_fp32-dynamic-16384", {"BLOCK_K": 16384}, 80, dict(mod_dtype="fp32")),
]
IDS = [c[0] for c in CASES]
BLOCK = 1024  # the controls: 1024 elements over 4 warps, 8 per thread


@triton.jit
def _plain_modulate(x_ptr, a_ptr, b_ptr, o_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    y = tl.load(x_ptr + offs) * tl.load(a_ptr + offs) + tl.load(b_ptr + offs)  # compiled to one fma
    tl.store(o_ptr + offs, y)


@triton.jit
def _rn_modulate(x_ptr, a_ptr, b_ptr, o_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    y = nq._add_rn(nq._mul_rn(tl.load(x_ptr + offs), tl.load(a_ptr + offs), False), tl.load(b_ptr + offs), False)
    tl.store(o_ptr + offs, y)


def _control_job(fn):
    sig = {"x_ptr": "*fp32", "a_ptr": "*fp32", "b_ptr": "*fp32", "o_ptr": "*fp32"}
    return dict(fn=fn, signature=sig, constexprs={"BLOCK": BLOCK}, cc=90, num_warps=4, num_stages=1,
                aligned=list(sig))


def _ones_job(names):
    """The launch with integer arguments equal to 1 (K = 1, or one token per image: S = 1), which Triton's JIT
    passes as constexpr 1 rather than as i32: the kernel must compile that way too."""
    job = nq.aot_job({"BLOCK_K": 1 if "K" in names else 2048}, 90)
    for name in names:
        del job["signature"][name]
        job["constexprs"][name] = 1
        job["aligned"] = [a for a in job["aligned"] if a != name]
    return job


@pytest.fixture(scope="module")
def compiled():
    jobs = [nq.aot_job(cfg, cc, **kw) for _, cfg, cc, kw in CASES]
    unaligned = nq.aot_job({"BLOCK_K": 2048}, 90)
    unaligned["aligned"] = [a for a in unaligned["aligned"] if a != "K"]  # K not known divisible by 16
    jobs += [unaligned, _control_job(_plain_modulate), _control_job(_rn_modulate)]
    jobs += [_ones_job(("K",)), _ones_job(("S",)), _ones_job(("K", "S"))]
    out = aot.compile_many(jobs)
    stats = [aot.sass_stats(c) for c in out]
    for (label, *_), job, s in zip(CASES, jobs, stats):  # shown with -s: the figures quoted in reports
        print(f"norm_quantize {label} num_warps={job['num_warps']}: {s.summary()}")
    n = len(CASES)
    return {"jobs": jobs[:n], "c": out[:n], "s": stats[:n], "unaligned": stats[n],
            "plain": (out[n + 1], stats[n + 1]), "rn": (out[n + 2], stats[n + 2]), "ones": out[n + 3:]}


def _sass_ops(c):
    sass, _ = aot.disassemble(c.cubin_path)
    return [op for _, op, _ in aot.parse_sass(sass)]


@pytest.mark.parametrize("i", range(len(CASES)), ids=IDS)
def test_exact_ieee_ops_in_ptx(compiled, i):
    c, (label, _, _, kw) = compiled["c"][i], CASES[i]
    ptx = c.ptx
    assert "div.rn.f32" in ptx and "sqrt.rn.f32" in ptx  # mean, var, 1 / sqrt, scale: correctly rounded
    assert "cvt.rni.f32.f32" in ptx  # rint, half to even
    assert "mul.rn.f32" in ptx  # d * d (and y * (1 + scale)): never contracted
    assert ("add.rn.f32" in ptx) == (kw.get("mod_dtype", "bf16") is not None)  # + shift only when modulating
    for bad in ("div.full", "div.approx", "sqrt.approx", "rsqrt", ".ftz", "fma."):
        assert bad not in ptx, f"{label}: {bad} in the PTX"


@pytest.mark.parametrize("i", range(len(CASES)), ids=IDS)
def test_no_spills_wide_loads_and_launchable(compiled, i):
    s, job = compiled["s"][i], compiled["jobs"][i]
    assert s.spills == 0 and s.stack == 0 and s.local == 0, s.summary()
    assert s.byte_loads == 0 and s.ldg.get("LDG.E.128", 0) > 0, s.summary()
    # one CTA of num_warps * 32 threads must fit the SM's 64K registers, or the launch fails
    assert s.registers * job["num_warps"] * 32 <= 65536, s.summary()


def test_no_per_element_fma(compiled):
    """The FFMAs in the SASS are those of the few scalar divisions and the square root (their correctly
    rounded software sequences): the count does not grow with BLOCK_K, so no per-element product was fused."""
    ops = {label: _sass_ops(c) for (label, *_), c in zip(CASES, compiled["c"])}
    ffma = {label: sum(op.startswith("FFMA") for op in o) for label, o in ops.items()}
    fmul = {label: sum(op.split(".")[0] == "FMUL" for op in o) for label, o in ops.items()}
    assert ffma["sm90-bf16-adaln-dynamic-2048"] == ffma["sm90-bf16-adaln-dynamic-16384"], ffma
    assert ffma["sm80-bf16-adaln_fp32-static-2048"] < 64, ffma
    # per element (8 per thread at 2048 over 8 warps): d * rstd, d * d, y * (1 + scale), y * inv
    assert fmul["sm90-bf16-adaln-dynamic-2048"] >= 4 * 8, fmul


def test_controls_show_the_checks_can_fail(compiled):
    assert compiled["unaligned"].byte_loads > 0, compiled["unaligned"].summary()  # bf16 rows read 2 bytes at a time
    plain_c, plain_s = compiled["plain"]
    rn_c, rn_s = compiled["rn"]
    per_thread = BLOCK // (4 * 32)
    plain_ops, rn_ops = _sass_ops(plain_c), _sass_ops(rn_c)
    assert sum(op.startswith("FFMA") for op in plain_ops) >= per_thread  # the contraction the kernel avoids
    assert "fma.rn.f32" in plain_c.ptx  # LLVM contracts it already (Triton enables fp fusion by default)
    assert not any(op.startswith("FFMA") for op in rn_ops)
    assert sum(op.split(".")[0] == "FMUL" for op in rn_ops) >= per_thread
    assert len(re.findall(r"mul\.rn\.f32", rn_c.ptx)) == per_thread


def test_arguments_equal_to_one_compile(compiled):
    assert len(compiled["ones"]) == 3
    for c in compiled["ones"]:  # compiled at all (compile_many raises otherwise), with the exact ops
        assert "div.rn.f32" in c.ptx and "sqrt.rn.f32" in c.ptx and ".ftz" not in c.ptx

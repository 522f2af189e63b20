"""The benchmark scripts run in CI in their CPU modes (--smoke / --short) and write the JSON a GPU run writes.

Checks only the schema (keys, types, one row per configured case) and static properties, never a timing.
Each script runs once per session in a subprocess (fresh interpreter: TRITON_INTERPRET must be set before
triton is imported, and the scripts' own argument handling is part of what is tested).
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "benchmarks")
NUM = (int, float)


SCRIPTS = {"gemm": ("bench_gemm.py", "--smoke"), "model": ("bench_model.py", "--smoke"),
           # FLUX: eager only (compiling is the DiT run's business; the same code path)
           "flux": ("bench_model.py", "--smoke", "--model", "flux", "--precisions", "bf16", "w8a8-fused",
                    "fp8-rowwise", "w8a8-fused-lora", "--modes", "eager"),
           "static": ("static_report.py", "--short")}


@pytest.fixture(scope="module")
def _runs(tmp_path_factory):
    """Start the four scripts at once (they are mostly waiting on subprocesses and imports: together they
    take about as long as the slowest), then hand each test its finished run."""
    procs = {}
    for key, (script, *args) in SCRIPTS.items():
        out = tmp_path_factory.mktemp(key)
        env = dict(os.environ, TRITON_INTERPRET="1", OUT=str(out))
        cmd = [sys.executable, os.path.join(BENCH, script), *args, "--out", str(out)]
        procs[key] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                       cwd=ROOT), out, cmd)
    yield procs
    for p, _, _ in procs.values():
        if p.poll() is None:
            p.kill()


def _finished(runs, key, name):
    p, out, cmd = runs[key]
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, f"{' '.join(cmd[1:])} failed:\n{stdout[-3000:]}\n{stderr[-3000:]}"
    return json.load(open(out / name)), out, stdout


@pytest.fixture(scope="module")
def gemm(_runs):
    return _finished(_runs, "gemm", "gemm.json")


@pytest.fixture(scope="module")
def model(_runs):
    return _finished(_runs, "model", "model.json")


@pytest.fixture(scope="module")
def flux(_runs):
    return _finished(_runs, "flux", "model_flux.json")


@pytest.fixture(scope="module")
def static(_runs):
    return _finished(_runs, "static", "static_report.json")


def _env_ok(env):
    for k in ("date", "python", "torch", "command"):
        assert isinstance(env[k], str) and env[k]


def _cpu_fp8_refusal():
    """Why this torch build's CPU _scaled_mm cannot take row-wise scales (torch 2.11's takes tensor-wide ones only),
    or None: the fp8 peer's rows then say "unavailable" with this reason rather than run."""
    sys.path.insert(0, BENCH)
    import fp8_rowwise
    return fp8_rowwise.unsupported_reason("cpu", 16, 16)


def _ok_or_reason(row):
    """A row ran ("ok"), or could not run here and says why ("skipped: ...", "unavailable: ..."). A row that
    ran and failed ("error: ...") fails the smoke test: that is what the smoke run is for."""
    assert isinstance(row["status"], str) and row["status"]
    if row["status"] != "ok":
        assert row["status"].split(":")[0] in ("skipped", "unavailable"), row
        assert row["status"].split(":", 1)[1].strip(), row  # the reason itself


# ---- bench_gemm ---------------------------------------------------------------------------------------

def test_gemm_schema(gemm):
    rep, out, stdout = gemm
    assert rep["schema"] == "ditq.bench_gemm/1" and rep["smoke"] is True and rep["device"] == "cpu"
    _env_ok(rep["env"])
    for k in ("bf16_flops", "int8_ops", "copy_bytes_s"):
        assert isinstance(rep["ceilings"][k], NUM) and rep["ceilings"][k] > 0
    assert "torch" in rep["available_backends"] and "torch" in rep["backends"]
    assert isinstance(rep["cases"], int) and len(rep["rows"]) == rep["cases"] > 0
    for name in ("gemm.md", "gemm.json"):
        assert (out / name).stat().st_size > 0


def test_gemm_one_row_per_case(gemm):
    """Every configured case (shape x M x impl) appears exactly once; every backend covers every group size
    that divides K, and the activation op has a static and a dynamic row per (backend, M, K)."""
    rep = gemm[0]
    keys = [(r["model"], r["layer"], r["M"], r["impl"]) for r in rep["rows"]]
    assert len(keys) == len(set(keys))
    shapes = {(s["model"], s["layer"]): s for s in rep["shapes"]}
    for (model, layer), s in shapes.items():
        for m in rep["m_values"]:
            impls = {k[3] for k in keys if k[:3] == (model, layer, m)}
            assert {"bf16 matmul", "torch._int_mm + scale", "fp8 row-wise (_scaled_mm)"} <= impls
            for b in rep["backends"]:
                assert f"ditq-{b} w8a8" in impls
                for g in rep["group_sizes"]:
                    assert (f"ditq-{b} w4a8 g{g}" in impls) == (s["K"] % g == 0)
                    # integer group scales: a row per CUDA backend (the Hopper kernels; elsewhere it says why not)
                    # and for triton (its INT_SCALES kernel)
                    assert (f"ditq-{b} w4a8i g{g}" in impls) == (s["K"] % g == 0 and b != "torch")
    quant = [r for r in rep["rows"] if r["kind"] == "quant"]
    ditq_quant = [r for r in quant if r["impl"].startswith("ditq-")]
    assert {r["impl"].rsplit(" ", 1)[1] for r in ditq_quant} == {"static", "dynamic"}
    fp8_quant = {(r["M"], r["K"], r["impl"]) for r in quant if not r["impl"].startswith("ditq-")}
    ks = {s["K"] for s in rep["shapes"]}
    assert fp8_quant == {(m, k, f"fp8 row-wise quantize {how}") for m in rep["m_values"] for k in ks
                         for how in ("eager", "compiled")}


def test_gemm_rows_are_checked_before_timing(monkeypatch):
    """A ditq row is timed only when its output is the exact product on the sampled rows: a planted error in one
    element of a sampled row, a NaN or a wrong shape gives 'wrong: ...' and no time; the true product passes."""
    import argparse

    import torch
    sys.path.insert(0, BENCH)
    import bench_gemm
    import common
    from ditq.quant import reference as ref

    m, n, k = 300, 24, 64
    g = torch.Generator().manual_seed(0)
    a, w = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8), torch.randint(
        -127, 128, (n, k), generator=g, dtype=torch.int8)
    a_s, w_s, bias = torch.rand(1, generator=g) / 100 + 1e-3, torch.rand(n, generator=g) / 100, torch.randn(n)
    rows = common.sample_rows(torch, m)
    assert rows[0] == 0 and rows[-1] == m - 1 and len(rows) < m and all(b <= r < b + 64 for b, r in
                                                                        zip(range(0, m, 64), rows[1:]))
    good = ref.gemm_w8a8(a, a_s, w, w_s, bias, torch.bfloat16)
    reference = common.exact_rows(torch, rows, a, a_s, w, w_s, bias, None)
    assert common.output_error(torch, good, m, n, reference) is None
    off = good.clone()
    off[rows[3], 5] += 1.0
    nan = good.clone()
    nan[m // 2 + 1, 0] = float("nan")  # an unsampled row: the finiteness check still sees it
    assert "outputs off the exact reference" in common.output_error(torch, off, m, n, reference)
    assert "not written or not finite" in common.output_error(torch, nan, m, n, reference)
    assert "output shape" in common.output_error(torch, good[:-1], m, n, reference)

    def planted(torch_, case, inp):
        fn = lambda i: off  # noqa: E731
        fn.check = lambda: common.output_error(torch, fn(0), m, n, reference)
        return fn
    monkeypatch.setattr(bench_gemm, "make_call", planted)
    case = dict(model="t", layer="t", N=n, K=k, M=m, impl="ditq-torch w8a8", kind="gemm", backend="torch", bits=8)
    row = bench_gemm.run_case(torch, case, None, {}, argparse.Namespace())
    assert row["status"].startswith("wrong: output: 1 outputs off") and row.get("median_ms") is None


def test_gemm_fp8_rowwise(gemm):
    """The fp8 row-wise peer runs on CPU (torch._scaled_mm with [M, 1] and [1, N] fp32 scales): finite times,
    the speedup columns against it and against bf16 filled in, its own speedup vs itself exactly 1."""
    rows = gemm[0]["rows"]
    fp8 = [r for r in rows if r["impl"] == "fp8 row-wise (_scaled_mm)"]
    refusal = _cpu_fp8_refusal()
    if refusal:  # a torch whose CPU kernel refuses: every fp8 row says so, and nothing is compared against it
        assert fp8 and all(r["status"] == f"unavailable: {refusal}" for r in fp8), [r["status"] for r in fp8]
        assert all(r.get("speedup_vs_fp8") is None for r in rows)
        return
    assert fp8 and all(r["status"] == "ok" for r in fp8), [r["status"] for r in fp8]
    for r in fp8:
        assert r["speedup_vs_fp8"] == 1.0 and r["bytes"] == r["M"] * r["K"] + 4 * r["M"] + r["N"] * r["K"] \
            + 4 * r["N"] + 2 * r["M"] * r["N"] + 2 * r["N"]
    for r in rows:
        if r["kind"] == "gemm" and r["status"] == "ok":
            assert isinstance(r["speedup_vs_fp8"], NUM) and r["speedup_vs_fp8"] > 0, r
        else:
            assert r.get("speedup_vs_fp8") is None, r
    md = (gemm[1] / "gemm.md").read_text()
    assert "speedup vs fp8 row-wise" in md and "fp8 row-wise quantize compiled" in md


def test_fp8_rowwise_quantize_is_exact_per_row():
    """The activation pass the fp8 rows time: each row's largest magnitude maps to 448 (e4m3's largest finite
    value) exactly, every value round-trips to within e4m3's rounding (3 mantissa bits: half an ulp is 1/16 of
    the value's power of two), and a zero row gives zeros with a positive scale, not NaN."""
    import torch
    sys.path.insert(0, BENCH)
    import fp8_rowwise

    g = torch.Generator().manual_seed(7)
    x = (torch.randn(5, 48, generator=g) * torch.tensor([1e-3, 1.0, 30.0, 1e3, 0.0])[:, None]).to(torch.bfloat16)
    q, scale = fp8_rowwise.quantize(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and scale.shape == (5, 1)
    qf = q.float()
    assert torch.equal(qf[:4].abs().amax(dim=1), torch.full((4,), 448.0))
    assert torch.equal(qf[4], torch.zeros(48)) and scale[4].item() > 0
    err = (qf * scale - x.float()).abs()
    assert bool((err <= x.float().abs() / 16 + scale * 2.0 ** -9).all())  # subnormals: 2^-9 steps below 2^-6


def test_gemm_row_fields(gemm):
    rows = gemm[0]["rows"]
    for r in rows:
        _ok_or_reason(r)
        for k in ("model", "layer", "impl", "kind", "backend"):
            assert isinstance(r[k], str)
        for k in ("N", "K", "M", "bits"):
            assert isinstance(r[k], int)
        if r["status"] != "ok":
            continue
        for k in ("median_ms", "min_ms", "gbps", "roofline_ms", "roofline_fraction", "bytes"):
            assert isinstance(r[k], NUM) and r[k] > 0, (k, r)
        assert r["timing"] == "wall-clock"
        if r["kind"] == "gemm":
            assert isinstance(r["tops"], NUM) and r["flops"] == 2 * r["M"] * r["N"] * r["K"]
            assert isinstance(r["speedup_vs_bf16"], NUM)
    # the torch backend is the reference and runs everywhere: none of its cases may fail (the fp8 GEMM only where
    # this torch's CPU _scaled_mm takes row-wise scales)
    refusal = _cpu_fp8_refusal()
    failed = [(r["impl"], r["status"]) for r in rows
              if r["backend"] == "torch" and r["status"] != "ok"
              and not (refusal and r["impl"] == "fp8 row-wise (_scaled_mm)")]
    assert not failed, failed


# ---- bench_model --------------------------------------------------------------------------------------

def test_model_schema(model):
    rep, out, stdout = model
    assert rep["schema"] == "ditq.bench_model/1" and rep["smoke"] is True
    _env_ok(rep["env"])
    assert rep["config"]["num_layers"] == 2  # the tiny config, not DiT-XL/2
    assert isinstance(rep["cases"], int) and len(rep["rows"]) == rep["cases"]
    assert rep["cases"] == len(rep["resolutions"]) * len(rep["batches"]) * len(rep["precisions"]) * 3
    assert {"bf16", "w8a8", "w4a8"} <= set(rep["precisions"])
    assert (out / "model.md").stat().st_size > 0


def test_model_rows(model):
    rows = model[0]["rows"]
    keys = [(r["resolution"], r["batch"], r["variant"]) for r in rows]
    assert len(keys) == len(set(keys))
    for r in rows:
        _ok_or_reason(r)
        assert r["M"] == 2 * r["batch"] * r["tokens_per_image"]  # classifier-free guidance doubles the batch
        assert r["variant"] == f"{r['precision']} {r['mode']}"
        if r["precision"] == "fp8-rowwise" and _cpu_fp8_refusal():
            continue  # _fp8_rows below
        if r["mode"] == "cudagraph":
            assert r["status"].startswith("skipped")  # CPU
            continue
        assert r["status"] == "ok", r  # eager and compiled (dynamo, eager backend) must work on CPU
        for k in ("median_ms", "ms_per_image", "images_per_s", "weight_bytes", "first_call_s"):
            assert isinstance(r[k], NUM) and r[k] > 0, (k, r)
    by = {r["precision"]: r["weight_bytes"] for r in rows}
    assert by["w8a8"] < by["bf16"] and by["w4a8"] < by["bf16"]
    for r in rows:
        assert r["model"] == "dit" and r["text_tokens"] == 0
        if r["precision"] not in ("bf16", "fp8-rowwise"):  # fp8: _fp8_rows
            assert isinstance(r["output_sqnr_db"], NUM)  # quantize() ran and measured itself
            assert r["output_sqnr_db"] > 15, r  # and the model still computes what bf16 computes
    _fp8_rows(rows)


@pytest.mark.parametrize("precision", ["w8a8", "w4a8-fused", "w4a8i-fused"])
def test_model_kernels_are_checked_against_the_torch_backend(precision):
    """bench_model's end-to-end check of a quantized model's kernels: the tiny DiT on the emulated CUDA kernels
    against the same quantized model on the torch backend is close (same integers: fp32 rounding only), every
    layer is back on its backend after, and one layer that computes something else on its kernels shows."""
    import torch
    sys.path.insert(0, BENCH)
    import bench_model
    from ditq import backends
    from ditq.nn import QuantLinear

    if backends.unavailable_reason("cuda-emulated", "cpu"):
        pytest.skip("needs ditq._C (cuda-emulated)")
    spec = bench_model.Spec("dit", smoke=True)
    model = spec.build(torch, bench_model.SMOKE_SAMPLE_SIZE, torch.device("cpu"), torch.float32)
    calib = spec.inputs(torch, bench_model.SMOKE_SAMPLE_SIZE, 1, torch.device("cpu"), torch.float32)
    model, info = bench_model.quantize(torch, model, precision, "cuda-emulated", calib, rebuild=None)
    assert info["backend"] == "cuda-emulated"
    assert info["sqnr_vs_torch_backend_db"] > 60, info
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.backend == "cuda-emulated" for m in layers)
    if precision.startswith("w4a8i"):  # integer group scales: the layers hold the kernels' integer form
        assert all(m.fmt.group_scales == "int" and m.scales.dtype == torch.int32 for m in layers)
    if precision.endswith("-fused"):
        return
    victim = layers[len(layers) // 2]
    forward = victim.forward
    victim.forward = lambda x, *a, **k: forward(x, *a, **k) * (1.0 if victim.backend == "torch" else 1.1)
    assert bench_model.kernels_vs_reference_db(torch, model, calib) < 40


def _fp8_rows(rows):
    """The fp8 row-wise peer ran in every mode asked (torch._scaled_mm on CPU; torchao where it is installed) over
    the linears ditq quantizes: its weight bytes sit next to W8A8's (one byte a weight, fp32 scales per channel),
    its output near bf16's. Where this torch's CPU _scaled_mm refuses row-wise scales (and torchao is absent),
    every row says "unavailable" with that reason instead."""
    fp8 = [r for r in rows if r["precision"] == "fp8-rowwise"]
    refusal = _cpu_fp8_refusal()
    if refusal and not any(r["implementation"] == "torchao" for r in fp8):
        assert fp8 and all(r["status"] == f"unavailable: {refusal}" for r in fp8), [r["status"] for r in fp8]
        return
    assert fp8 and all(r["implementation"] in ("torch._scaled_mm", "torchao") for r in fp8)
    assert all(r["status"] == "ok" for r in fp8 if r["mode"] != "cudagraph")
    assert all(isinstance(r["output_sqnr_db"], NUM) and r["output_sqnr_db"] > 15
               for r in fp8 if r["mode"] != "cudagraph"), fp8
    w8 = next(r["weight_bytes"] for r in rows if r["precision"].startswith("w8a8"))
    assert abs(fp8[0]["weight_bytes"] - w8) / w8 < 0.05, (fp8[0]["weight_bytes"], w8)


# ---- bench_model --model flux -------------------------------------------------------------------------

def test_flux_schema(flux):
    rep, out, stdout = flux
    assert rep["schema"] == "ditq.bench_model/1" and rep["smoke"] is True and rep["model"] == "flux"
    _env_ok(rep["env"])
    cfg = rep["config"]  # the tiny FLUX: one double- and one single-stream block, with a guidance embedder
    assert (cfg["num_layers"], cfg["num_single_layers"], cfg["guidance_embeds"]) == (1, 1, True)
    assert rep["precisions"] == ["bf16", "w8a8-fused", "fp8-rowwise", "w8a8-fused-lora"] and rep["batches"] == [1]
    assert rep["modes"] == ["eager"] and len(rep["rows"]) == rep["cases"] == len(rep["precisions"])
    assert not rep.get("partial")
    for name in ("model_flux.md", "model_flux.json"):
        assert (out / name).stat().st_size > 0
    assert not (out / "model.json").exists()  # a DiT run's file is never overwritten by a FLUX run


def test_flux_rows(flux):
    rows = flux[0]["rows"]
    for r in rows:
        _ok_or_reason(r)
        assert r["model"] == "flux" and r["cfg_batch"] == r["batch"]  # guidance-distilled: no CFG batch
        assert r["tokens_per_image"] == (r["sample_size"] // 2) ** 2 and r["text_tokens"] == 6
        assert r["M"] == r["batch"] * (r["tokens_per_image"] + r["text_tokens"])
        if r["precision"] == "fp8-rowwise":
            continue  # _fp8_rows below
        assert r["status"] == "ok", r
        assert isinstance(r["median_ms"], NUM) and r["median_ms"] > 0
        if r["precision"] != "bf16":
            assert isinstance(r["output_sqnr_db"], NUM) and r["output_sqnr_db"] > 15, r
    fused = [r for r in rows if r["precision"] in ("w8a8-fused", "w8a8-fused-lora")]
    assert len(fused) == 2 and all(r["fused_blocks"] == 2 for r in fused)  # both blocks ran the fused MM-DiT path
    # the LoRA row: a rank-32 adapter on every attention and MLP linear of the blocks (the joint block's 12
    # linears, to_q / to_k / to_v and add_*_proj as the fused to_qkv / to_added_qkv; the single block's 5), its
    # bytes counted with the weights
    lora_row, plain = (next(r for r in rows if r["precision"] == p) for p in ("w8a8-fused-lora", "w8a8-fused"))
    assert lora_row["implementation"] == "ditq-torch+lora-r32x17", lora_row
    assert lora_row["weight_bytes"] > plain["weight_bytes"]
    _fp8_rows(rows)


# ---- static_report ------------------------------------------------------------------------------------

def test_static_schema(static):
    rep, out, stdout = static
    assert rep["schema"] == "ditq.static_report/1" and rep["short"] is True and rep["archs"] == ["sm90"]
    _env_ok(rep["env"])
    assert (out / "static_report.md").stat().st_size > 0
    # Every Triton family compiles and is analysed (a schema check over rows that all say "not compiled"
    # would prove nothing); CUDA rows may say why they are absent, e.g. a CPU-only extension has no cubins.
    triton = [r for r in rep["kernels"] if r["family"] == "triton"]
    assert {r["kernel"].split()[0] for r in triton} == {"w8a8", "w4a8", "w4a8i"}  # w4a8i: integer group scales
    assert all(r["status"] == "ok" for r in triton), [r["status"] for r in triton if r["status"] != "ok"]
    assert any(r["family"] == "cuda" for r in rep["kernels"])
    for r in rep["kernels"]:
        if r["status"] != "ok":
            assert r["family"] == "cuda" and r["status"].startswith(("not built", "no ", "cuobjdump")), r
            continue
        for k in ("regs", "stack", "spills", "smem_bytes", "mma_total"):
            assert isinstance(r[k], int) and r[k] >= 0
        assert r["ctas_per_sm"] is None or 0 <= r["ctas_per_sm"] <= 32
    for r in triton:  # a GEMM's main loop is found and holds its tensor-core instructions
        assert r["mma_total"] > 0 and r["loop_mma"] > 0 and r["loop_instructions"] > r["loop_mma"], r
    s = rep["summary"]
    assert s["kernels_ok"] + s["kernels_missing"] == len(rep["kernels"])


def test_static_weight_bytes(static):
    """Transformer bytes per format, counted on the meta device: quantizing can only shrink the model, and 4-bit
    groups of 128 more than 8 bits (a static property of the format, not a timing)."""
    rows = {(r["resolution"], r["format"]): r for r in static[0]["weights"] if r["status"] == "ok"}
    for res in (256, 512):
        bf16, w8, w4 = rows[(res, "bf16")], rows[(res, "w8a8")], rows[(res, "w4a8 g128")]
        assert bf16["ratio_vs_bf16"] == 1.0 and isinstance(bf16["bytes"], int)
        assert 0 < w4["ratio_vs_bf16"] < w8["ratio_vs_bf16"] < 1
        # 7 linears per block: q, k, v, out, fc1, fc2, adaLN (its timestep embedder's two stay float)
        assert w8["quantized_linears"] == w4["quantized_linears"] == 28 * 7


def test_static_roofline(static):
    rows = static[0]["roofline"]
    assert rows
    for r in rows:
        assert r["gflop"] == pytest.approx(2 * r["M"] * r["N"] * r["K"] / 1e9)
        assert r["bound_us"] > 0 and r["bound_by"] in ("compute", "memory")
        if r["tiled_mb"] is not None:
            assert r["tiled_mb"] >= r["min_mb"]  # re-reads only add bytes
    ideal = {(r["shape"], r["M"], r["impl"]): r for r in rows if r["impl"].endswith("(ideal)")}
    for (shape, m, impl), r in ideal.items():  # fewer bytes can only lower the bound
        if impl.startswith("w4a8"):
            assert r["bound_us"] <= ideal[(shape, m, "w8a8 (ideal)")]["bound_us"]


def test_sass_parser_on_a_known_listing():
    """The parser and classifier on a fixed SASS excerpt (format of cuobjdump 13): the loop is found from its
    backward branch, MMA and loads are classified, load widths read from the opcode."""
    sys.path.insert(0, BENCH)
    import static_report as sr
    from ditq.kernels import aot

    text = """
\t\tFunction : k
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R8.64] ;
        /*0030*/                   LDSM.16.M88.4 R12, [R3] ;
        /*0040*/                   IMMA.16832.S8.S8 R16, R12.ROW, R4.COL, R16 ;
        /*0050*/                   PRMT R5, R4, 0x7610, R5 ;
        /*0060*/                   LDG.E.U8 R9, desc[UR4][R2.64] ;
        /*0070*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0080*/              @!P0 BRA 0x20 ;
        /*0090*/                   STG.E desc[UR4][R2.64], R16 ;
        /*00a0*/                   EXIT ;
"""
    funcs = aot.sass_functions(text)
    a = sr.analyze_function(funcs["k"])
    assert a["mma_instructions"] == {"IMMA.16832.S8.S8": 1} and a["spill_instructions"] == 0
    loop = a["main_loop"]
    assert (loop["start"], loop["end"], loop["instructions"], loop["mma"]) == ("0x20", "0x80", 7, 1)
    assert loop["by_class"] == {"mma": 1, "shared load": 1, "global load": 2, "int/bit": 1, "barrier/sync": 1,
                                "control": 1}
    assert loop["global_loads_by_bytes"] == {"1": 1, "16": 1} and loop["non_mma_per_mma"] == 6.0
    occ = sr.occupancy(regs=128, smem=64 * 1024, threads=256, gpu="H100-SXM")
    assert occ["ctas_per_sm"] == 2 and occ["warps_per_sm"] == 16  # regs: 65536 / (128 * 256) = 2
    assert sr.occupancy(regs=32, smem=200 * 1024, threads=128, gpu="A100-SXM")["ctas_per_sm"] == 0  # > 163 KB


def test_cuda_kernel_names():
    """CUDA rows are named from the demangled template arguments (no cubin is compiled in --short mode)."""
    sys.path.insert(0, BENCH)
    import static_report as sr

    tiles = {0: (16, 64, 128, 1, 2, 4), 2: (128, 128, 64, 2, 4, 3)}
    ns = "ditq::gemm::(anonymous namespace)::"
    meta = sr._cuda_kernel_meta(f"void {ns}gemm_kernel<{ns}Tile<128, 128, 64, 2, 4, 3>, {ns}W4<32> >"
                                f"(ditq::gemm::GemmParams)", tiles)
    assert meta["kernel"] == "w4a8 g32" and meta["tile"] == 2 and meta["threads"] == 256
    assert meta["dyn_smem"] == 3 * (128 * 64 + 128 * 64 // 2)  # the formula of csrc/configs/gemm_tiles.h
    meta = sr._cuda_kernel_meta(f"void {ns}gemm_kernel<{ns}Tile<16, 64, 128, 1, 2, 4>, {ns}W8>(x)", tiles)
    assert meta["kernel"] == "w8a8" and meta["tile"] == 0 and meta["dyn_smem"] == 4 * (16 * 128 + 64 * 128)
    for epi, a_type, want in [("PlainEpilogue", "signed char", "w4a8 g128"),
                              ("FusedEpilogue", "signed char", "w4a8 g128 +fused"),
                              ("FusedEpilogue", "__nv_bfloat16", "w4a8 g128 +fused +float-A bf16"),
                              ("FusedEpilogue", "float", "w4a8 g128 +fused +float-A fp32")]:
        meta = sr._cuda_kernel_meta(f"void {ns}gemm_kernel<{ns}Tile<16, 64, 128, 1, 2, 4>, {ns}W4<128>, {ns}{epi}, "
                                    f"{a_type}>(ditq::gemm::GemmParams)", tiles)
        assert meta["kernel"] == want, (epi, a_type, meta["kernel"])
    h = "ditq::gemm::sm90::"  # the Hopper kernels: Sm90Tile<BM, BN, STAGES, CONSUMERS>[, G], epilogue policy
    for args, want in [("Sm90Tile<64, 128, 6, 1>, ditq::gemm::PlainEpilogue", "wgmma-w8a8"),
                       ("Sm90Tile<64, 128, 6, 1>, ditq::gemm::FusedEpilogue", "wgmma-w8a8 +fused"),
                       ("Sm90Tile<16, 64, 8, 1>, 32, ditq::gemm::PlainEpilogue", "wgmma-w4a8 g32"),
                       ("Sm90Tile<16, 64, 8, 1>, 32, ditq::gemm::FusedEpilogue", "wgmma-w4a8 g32 +fused"),
                       ("Sm90Tile<128, 128, 5, 2>, 64, ditq::gemm::PlainEpilogue", "wgmma-w4a8i g64")]:
        kernel = ("gemm_w4a8i_sm90_kernel" if "w4a8i" in want else "gemm_w4a8_sm90_kernel" if "w4a8" in want
                  else "gemm_w8a8_sm90_kernel")
        meta = sr._cuda_kernel_meta(f"void {h}{kernel}<{h}{args}>({h}Sm90Params)", tiles)
        assert meta["kernel"] == want and meta["sm90"], (args, meta["kernel"])
    assert sr._cuda_kernel_meta("void ditq::qact::quantize_act_kernel<float, true, true>(P)", tiles) is None
    assert sr._short_name("void ditq::qact::quantize_act_kernel<float, true, true>(P)") == \
        "qact::quantize_act_kernel<float, true, true>"


# ---- record_gpu_run -----------------------------------------------------------------------------------

def _recorder():
    sys.path.insert(0, BENCH)
    import record_gpu_run
    return record_gpu_run


def _suite_folder(tmp_path, gemm, model, flux, commit=None):
    """A folder shaped like the suite's $OUT, from the smoke runs' files (optionally as if from another commit)."""
    import shutil
    tmp_path.mkdir(parents=True, exist_ok=True)
    for (rep, out, _), name in ((gemm, "gemm.json"), (model, "model.json"), (flux, "model_flux.json")):
        shutil.copy(out / name, tmp_path / name)
        if commit:
            data = json.load(open(tmp_path / name))
            data["env"]["commit"] = commit
            json.dump(data, open(tmp_path / name, "w"))
    (tmp_path / "stages.txt").write_text("pytest-cuda    rc=0      41s\nbench-gemm     rc=0     120s\n")
    return tmp_path


def test_record_gpu_run_writes_one_entry_idempotently(tmp_path, gemm, model, flux, capsys):
    rec = _recorder()
    folder = _suite_folder(tmp_path / "run", gemm, model, flux)
    results = tmp_path / "RESULTS.md"
    original = open(os.path.join(BENCH, "RESULTS.md")).read()
    assert original.count(rec.BEGIN) == 1 and original.count(rec.END) == 1  # the real file carries the markers
    results.write_text(original)
    assert rec.main([str(folder), "--results", str(results)]) == 2  # smoke results are not a GPU run
    assert results.read_text() == original
    assert rec.main([str(folder), "--results", str(results), "--allow-smoke"]) == 0
    once = results.read_text()
    key = rec.entry_key(str(folder))
    assert once.count(f"<!-- gpu-run {key} -->") == 1 and rec.NONE_YET not in once
    head, tail = original.split(rec.BEGIN)[0], original.split(rec.END)[1]
    assert once.startswith(head) and once.endswith(tail)  # nothing outside the markers moves
    block = once.split(rec.BEGIN)[1].split(rec.END)[0]
    for needle in ("fp8-rowwise", "fp8 row-wise (_scaled_mm)", "FLUX.1-dev batch 1", "x28 =", "bench-gemm",
                   "target W4A8 GEMM at M <= 64", "torch: `", "eager: run-time LoRA (ditq-torch+lora-r32x17)"):
        assert needle in block, needle
    assert rec.main([str(folder), "--results", str(results), "--allow-smoke"]) == 0
    assert results.read_text() == once  # same run again: same file
    other = _suite_folder(tmp_path / "run2", gemm, model, flux, commit="f00dfee")
    assert rec.main([str(other), "--results", str(results), "--allow-smoke"]) == 0
    twice = results.read_text()
    keys = [m.group("key") for m in rec.ENTRY_RE.finditer(twice)]
    assert keys == [rec.entry_key(str(other)), key]  # the newer run first, the older one kept as it was
    assert rec.main([str(folder), "--summary"]) == 0
    assert "## Targets" in capsys.readouterr().out


def test_record_gpu_run_target_lines():
    """The target arithmetic on made-up rows: medians of speedups over the selected M, verdicts at the thresholds,
    the DiT comparison against bf16 compiled and against the fastest fp8 row-wise variant."""
    rec = _recorder()

    def g(m, impl, sp, vs8=None):
        return dict(kind="gemm", status="ok", impl=impl, M=m, speedup_vs_bf16=sp, speedup_vs_fp8=vs8)
    rows = [g(4096, "ditq-cuda w8a8", 1.9, 1.1), g(16384, "ditq-cuda w8a8", 1.7, 1.0),
            g(8192, "ditq-cuda w8a8", 2.0, 1.2), g(512, "ditq-cuda w8a8", 0.1),  # M < 4096: not counted
            g(16, "ditq-cuda w4a8 g128", 2.9), g(64, "ditq-cuda w4a8 g128", 3.1), g(64, "ditq-cuda w4a8 g128", 3.5),
            g(4096, "fp8 row-wise (_scaled_mm)", 1.6, 1.0), g(4096, "torchao fp8 row-wise", 1.4),
            g(16384, "torchao fp8 row-wise", 1.5)]
    lines = "\n".join(rec.gemm_targets({"rows": rows, "backends": ["cuda"], "group_sizes": [128]}))
    assert "ditq-cuda median 1.90x (min 1.70x, max 2.00x, 3 shapes x M): **met**; vs fp8 row-wise median 1.10x" \
        in lines
    assert "ditq-cuda g128 median 3.10x (min 2.90x, max 3.50x, 3 shapes x M): **met**" in lines
    assert "fp8 row-wise (`torch._scaled_mm`) vs bf16 at M >= 4096: median 1.60x" in lines
    assert "torchao fp8 row-wise (torchao's linear, its quantization pass included) vs bf16 at M >= 4096: median " \
           "1.45x (min 1.40x, max 1.50x, 2 shapes x M)" in lines
    assert "integer group scales" not in lines  # no w4a8i rows: no line
    # W4A8 with integer group scales against the float-scale W4A8 and W8A8 rows of the same shape and M
    t = lambda m, impl, ms: dict(g(m, impl, 1.0), model="dit", layer="fc1", N=4608, K=1152, median_ms=ms)  # noqa
    rows += [t(4096, "ditq-cuda w4a8i g128", 1.0), t(4096, "ditq-cuda w4a8 g128", 1.5), t(4096, "ditq-cuda w8a8", 0.9),
             t(16384, "ditq-cuda w4a8i g128", 4.0), t(16384, "ditq-cuda w4a8 g128", 5.0)]
    lines = "\n".join(rec.gemm_targets({"rows": rows, "backends": ["cuda"], "group_sizes": [128]}))
    assert ("W4A8 integer group scales g128 (cuda) at M >= 4096: median 1.38x (min 1.25x, max 1.50x, 2 shapes x M) "
            "the float-group-scale W4A8; median 0.90x (min 0.90x, max 0.90x, 1 shapes x M) W8A8") in lines

    def d(variant, ms, impl=None):
        prec, mode = variant.rsplit(" ", 1)
        return dict(resolution=256, batch=8, variant=variant, precision=prec, mode=mode, status="ok",
                    median_ms=ms, implementation=impl)
    dit = {"rows": [d("bf16 compile", 100.0), d("bf16 eager", 150.0), d("w8a8 eager", 70.0),
                    d("w8a8-fused cudagraph", 62.5), d("fp8-rowwise compile", 60.0, "torch._scaled_mm"),
                    d("fp8-rowwise eager", 90.0, "torch._scaled_mm")]}
    lines = "\n".join(rec.dit_targets(dit))
    assert "1.6x bf16 torch.compile: 1.60x (w8a8-fused cudagraph 62.50 ms vs 100.00 ms): **met**" in lines
    assert "faster than fp8 row-wise: 0.96x" in lines and lines.endswith("60.00 ms): not met")
    # a LoRA row beside its precision without the adapter (same resolution, batch, mode); a LoRA row alone: nothing
    dit["rows"] += [d("w8a8-fused-lora cudagraph", 70.0, "ditq-cuda+lora-r32x196"), d("w4a8-fused-lora eager", 80.0)]
    assert "\n".join(rec.lora_lines(dit, "DiT-XL/2")) == (
        "- DiT-XL/2 256 px batch 8 cudagraph: run-time LoRA (ditq-cuda+lora-r32x196) 70.00 ms vs 62.50 ms without: "
        "+12.0 %")


def test_record_gpu_run_says_when_the_hopper_kernels_did_not_run():
    rec = _recorder()
    line = rec.hopper_kernels_missing({"capability": "9.0", "sm90a_kernels": False})
    assert len(line) == 1 and "Hopper (wgmma) kernels did not run" in line[0] and "9.0a" in line[0]
    for env in ({"capability": "9.0", "sm90a_kernels": True}, {"capability": "8.0", "sm90a_kernels": False},
                {"capability": "9.0", "sm90a_kernels": None}, {"gpu": None}):
        assert rec.hopper_kernels_missing(env) == [], env


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests"><testsuite name="pytest" errors="1"
 failures="1" skipped="3" tests="7"><testcase classname="tests.csrc.test_a" name="test_ok[1]" time="0.1" />
<testcase classname="tests.csrc.test_a" name="test_ok[2]" time="0.1" />
<testcase classname="tests.csrc.test_b" name="test_wgmma[w8]" time="0.3"><failure
 message="AssertionError: 17 of 4096 outputs differ&#10;assert 17 == 0">long traceback</failure></testcase>
<testcase classname="tests.kernels.test_c" name="test_fixture" time="0.0"><error message="failed on setup with
 &quot;RuntimeError: CUDA error&quot;">trace</error></testcase>
<testcase classname="tests.kernels.test_c" name="test_late[1]" time="0.0"><skipped type="pytest.skip"
 message="out of time: DITQ_TEST_DEADLINE has passed (the run's time cap)">x</skipped></testcase>
<testcase classname="tests.kernels.test_c" name="test_late[2]" time="0.0"><skipped type="pytest.skip"
 message="out of time: DITQ_TEST_DEADLINE has passed (the run's time cap)">x</skipped></testcase>
<testcase classname="tests.kernels.test_d" name="test_a100" time="0.0"><skipped type="pytest.skip"
 message="needs an sm_80 GPU">x</skipped></testcase></testsuite></testsuites>"""


def test_record_gpu_run_reports_the_cuda_tests(tmp_path):
    """The short report's correctness lines come from the cuda tests' JUnit XML: counts, skips by reason (the
    deadline's "out of time" apart from the others), every failure and error with its message's first line."""
    rec = _recorder()
    assert rec.cuda_tests(str(tmp_path)) is None  # no XML: no section
    (tmp_path / "pytest_cuda.xml").write_text(JUNIT)
    lines = rec.cuda_tests(str(tmp_path))
    assert lines[0] == ("- GPU tests (`cuda` and `gpu` marks): **2 passed, 1 failed, 1 errors**, 3 skipped; "
                        "2 skipped: out of time: "
                        "DITQ_TEST_DEADLINE has passed (the run's time cap); 1 skipped: needs an sm_80 GPU")
    assert lines[1] == "  - failure: `tests.csrc.test_b::test_wgmma[w8]`: AssertionError: 17 of 4096 outputs differ"
    assert lines[2].startswith("  - error: `tests.kernels.test_c::test_fixture`: failed on setup with")
    assert "## Correctness" in rec.summary(str(tmp_path))
    assert rec.wrong_gemms({"rows": [dict(status="ok")]}) == []
    wrong = rec.wrong_gemms({"rows": [dict(model="FLUX.1", layer="mlp", M=4096, impl="ditq-cuda w8a8",
                                           status="wrong: output: 3 outputs off the exact reference")]})
    rows = [dict(resolution=256, precision="w8a8", sqnr_vs_torch_backend_db=52.0),
            dict(resolution=256, precision="w4a8", sqnr_vs_torch_backend_db=3.5),
            dict(resolution=256, precision="w4a8", sqnr_vs_torch_backend_db=3.5),  # another mode, same build
            dict(resolution=256, precision="bf16", sqnr_vs_torch_backend_db=None)]
    assert rec.suspect_models({"rows": rows}, "DiT-XL/2") == [
        "- DiT-XL/2 w4a8: kernels vs the torch backend **3.5 dB** (< 30: a kernel computes something else)"]
    assert wrong == ["- GEMM table: **1 ditq rows computed a wrong product** (not timed):",
                     "  - FLUX.1 mlp M=4096 ditq-cuda w8a8: output: 3 outputs off the exact reference"]
    (tmp_path / "pytest_cuda.xml").write_text(JUNIT[:300])  # pytest killed while writing it
    assert "unreadable" in rec.cuda_tests(str(tmp_path))[0]
    assert rec.failed_tests(str(tmp_path)) == []


def test_record_gpu_run_lists_failed_tests_for_the_sanitizer(tmp_path, monkeypatch, capsys):
    """gpu_suite.sh reruns failed GPU tests under compute-sanitizer from these node ids: real modules only (the
    made-up ones of the XML above are dropped), failures and errors, parametrized ids intact, at most N."""
    rec = _recorder()
    monkeypatch.chdir(ROOT)
    real = JUNIT.replace("tests.csrc.test_b", "tests.csrc.test_gemm_cuda").replace(
        'name="test_wgmma[w8]"', 'name="test_cuda_matches_reference_and_emulator[None-shape0-dtype0]"').replace(
        "tests.kernels.test_c", "tests.kernels.test_triton_cuda")
    (tmp_path / "pytest_cuda.xml").write_text(real)
    assert rec.failed_tests(str(tmp_path)) == [
        "tests/csrc/test_gemm_cuda.py::test_cuda_matches_reference_and_emulator[None-shape0-dtype0]",
        "tests/kernels/test_triton_cuda.py::test_fixture"]
    assert rec.main([str(tmp_path), "--failed", "1"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == [
        "tests/csrc/test_gemm_cuda.py::test_cuda_matches_reference_and_emulator[None-shape0-dtype0]"]


def test_fp8_rowwise_linear_matches_its_dequantized_product():
    """The plain fp8 row-wise linear bench_model falls back to (no torchao) computes exactly what its e4m3 operands
    and scales say, up to the bf16 output's rounding: checked against the float64 product of the dequantized
    operands at a ragged shape (M = 1 and 5 rows, odd batch dims, N not a multiple of 32); shapes _scaled_mm cannot
    take are refused with the reason."""
    import torch
    sys.path.insert(0, BENCH)
    import fp8_rowwise

    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(64, 48).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 64, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(48, generator=g))
    assert "multiples of 16" in fp8_rowwise.unsupported_reason("cpu", 48, 72)
    with pytest.raises(ValueError, match="multiples of 16"):
        fp8_rowwise.Fp8RowwiseLinear(torch.nn.Linear(72, 48))
    refusal = _cpu_fp8_refusal()
    if refusal:
        with pytest.raises(fp8_rowwise.Unavailable, match="refused row-wise scales"):
            fp8_rowwise.Fp8RowwiseLinear(lin)
        pytest.skip(f"this torch's CPU _scaled_mm cannot run it: {refusal}")
    fp8 = fp8_rowwise.Fp8RowwiseLinear(lin)
    assert fp8.weight.dtype == torch.float8_e4m3fn and fp8.weight_scale.shape == (1, 48)
    for shape in ((1, 64), (5, 1, 64)):
        x = (torch.randn(*shape, generator=g) * 3).to(torch.bfloat16)
        out = torch.full((*shape[:-1], 48), float("nan"), dtype=torch.bfloat16)
        out.copy_(fp8(x))  # poisoned first: every element must be written
        q, s = fp8_rowwise.quantize(x.reshape(-1, 64))
        ref = (q.double() * s.double()) @ (fp8.weight.double() * fp8.weight_scale.double().t()).t() \
            + lin.bias.double()
        ref = ref.reshape(out.shape)
        assert bool(torch.isfinite(out).all())
        assert torch.allclose(out.double(), ref, rtol=2 ** -7, atol=1e-3), (out.double() - ref).abs().max()

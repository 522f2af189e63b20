"""benchmarks/tune_tiles.py in its --smoke form (Triton interpreter, cuda-emulated, tiny shapes): the report a GPU
run writes, the tables --write-configs rewrites, and that a configuration computing the wrong product is never
chosen however fast it is. Timings themselves are never checked (wall clock of the interpreter)."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from ditq.kernels import config_table, w4a8, w8a8

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "tune_tiles.py")
CONFIGS = os.path.join(ROOT, "kernels", "configs")
KERNELS = {"w8a8": w8a8, "w4a8": w4a8}


def _module():
    spec = importlib.util.spec_from_file_location("tune_tiles", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cuda_built():
    from ditq.backends import cuda_backend
    return cuda_backend.built()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run, every family, with --write-configs on a copy of the Triton tables."""
    out, cfg = tmp_path_factory.mktemp("tune_out"), tmp_path_factory.mktemp("tune_cfg") / "configs"
    shutil.copytree(CONFIGS, cfg)
    cmd = [sys.executable, SCRIPT, "--smoke", "--write-configs", "--configs-dir", str(cfg), "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env=dict(os.environ, TRITON_INTERPRET="1", OUT=str(out)))
    assert p.returncode == 0, f"{' '.join(cmd[1:])} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return json.load(open(out / "tiles.json")), out, cfg


def _shipped(row):
    """What the launcher itself runs for this row's M (the tables were untouched while the run measured)."""
    if row["kind"] == "cuda":
        return {"tile": None, "splits": None}
    if row["kernel"] == "w8a8":
        return w8a8.kernel_config(row["M"], "cpu")
    return w4a8.kernel_config(row["M"], "cpu", row["group_size"])


def test_smoke_report_has_the_shipped_config_in_every_row(smoke):
    rep, out, _ = smoke
    assert rep["schema"] == "ditq.tune_tiles/1" and rep["smoke"] is True and rep["device"] == "cpu"
    want = {"triton-w8a8", "triton-w4a8-g128"} | ({"cuda-w8a8", "cuda-w4a8-g128"} if _cuda_built() else set())
    assert set(rep["families"]) == want
    assert {r["family"] for r in rep["rows"]} == want
    for r in rep["rows"]:
        assert r["shipped"]["config"] == _shipped(r), r
        assert r["shipped"]["status"] == "ok", r  # the smoke run reaches and passes everything
        assert any(c["config"] == r["shipped"]["config"] for c in r["candidates"])
        assert len(r["candidates"]) >= 3, r  # the shipped one and at least two alternatives
        for c in r["candidates"]:
            assert c["status"] == "ok", c
            assert c["median_ms"] > 0 and c["sm_fill"] > 0
        best = r["best"]
        assert best["median_ms"] == min(c["median_ms"] for c in r["candidates"])
        assert r["speedup"] == pytest.approx(r["shipped"]["median_ms"] / best["median_ms"])
    # every bucket of each table has a row, at its bound (and past the last bound)
    for fam in want - {"cuda-w8a8", "cuda-w4a8-g128"}:
        table = config_table.load_table(fam.split("-")[1], "interpreter")
        assert {r["bucket_max_m"] for r in rep["rows"] if r["family"] == fam} == {e["max_m"] for e in table}
    for b in rep["buckets"]:
        assert b["best_total_ms"] <= b["shipped_total_ms"] and b["configs_complete"] == b["configs_tried"] >= 3
    for r in [r for r in rep["rows"] if r["kind"] == "triton"]:  # the automatic split count against a forced 1
        forced = [c for c in r["candidates"] if "splits" in c["config"]]
        assert [c["config"] for c in forced] == [dict(r["shipped"]["config"], splits=1)], r["candidates"]
        assert forced[0]["label"].endswith(" split 1")
    assert not any("splits" in b["best"] for b in rep["buckets"] if b["kind"] == "triton")  # tables hold no count
    assert (out / "tiles.md").read_text().count("\n| ") >= len(rep["rows"]) + len(rep["buckets"])


def test_write_configs_keeps_the_bucket_structure(smoke, monkeypatch):
    rep, out, cfg = smoke
    monkeypatch.setattr(config_table, "CONFIG_DIR", str(cfg))
    for kernel in ("w8a8", "w4a8"):
        before = json.load(open(os.path.join(CONFIGS, f"{kernel}_interpreter.json")))
        after = json.load(open(cfg / f"{kernel}_interpreter.json"))
        table = config_table.load_table(kernel, "interpreter")  # through the loader, from the copy
        assert [e["max_m"] for e in table] == [e["max_m"] for e in before["entries"]]
        assert [list(e) for e in table] == [list(e) for e in before["entries"]]  # same keys, same order
        fam = next(f for f in rep["families"] if f.startswith(f"triton-{kernel}"))
        for e in table:
            b = next(b for b in rep["buckets"] if b["family"] == fam and b["bucket_max_m"] == e["max_m"])
            assert config_table.params(e) == b["best"]  # the measured best, which the launcher accepts
            KERNELS[kernel].fit_config(config_table.params(e), *([128] if kernel == "w4a8" else []))
        rec = after["measured"]
        assert rec["command"].startswith("tune_tiles.py --smoke") and rec["torch"] == torch.__version__
        assert [b["bucket_max_m"] for b in rec["buckets"]] == [e["max_m"] for e in table]
    # the shipped tables themselves are untouched
    assert not any(k == "measured" for k in json.load(open(os.path.join(CONFIGS, "w8a8_interpreter.json"))))
    for kernel in ("w8a8", "w4a8"):  # and a copy comes back with the report
        name = f"{kernel}_interpreter.json"
        assert (out / "configs" / name).read_text() == (cfg / name).read_text()
    if _cuda_built():
        text = (out / "gemm_tile_rules.h.txt").read_text()
        mod = _module()
        rules, _ = mod.read_tile_rules()
        proposed = [line for line in text.splitlines() if line.startswith("    {")]
        assert len(proposed) == len(rules) and "constexpr TileRule kTileRules[] = {" in text


def test_a_wrong_configuration_is_marked_and_never_chosen(tmp_path, monkeypatch):
    """A configuration that returns garbage at once would be the fastest by far: the check must catch it first."""
    mod = _module()
    real_run = mod.TritonFamily.run
    wrong = []

    def run(self, cfg, weights, act, i, poison=False):
        if cfg["BN"] == 32:  # a neighbour of both interpreter buckets' entries (BN 16 doubled)
            wrong.append(cfg)
            a, w = act[0][0], weights[0][0]
            return torch.randn(a.shape[0], w.shape[0]).to(torch.bfloat16)
        return real_run(self, cfg, weights, act, i, poison)

    monkeypatch.setattr(mod.TritonFamily, "run", run)
    cfg = tmp_path / "configs"
    shutil.copytree(CONFIGS, cfg)
    threads = torch.get_num_threads()
    try:
        assert mod.main(["--smoke", "--families", "triton-w8a8", "--write-configs", "--configs-dir", str(cfg),
                         "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    rep = json.load(open(tmp_path / "tiles.json"))
    assert wrong, "no BN = 32 candidate was tried: the test checks nothing"
    seen = [c for r in rep["rows"] for c in r["candidates"] if c["config"]["BN"] == 32]
    assert seen and all(c["status"].startswith("wrong:") and "median_ms" not in c for c in seen), seen
    assert all(r["best"]["config"]["BN"] != 32 for r in rep["rows"])
    assert all(b["best"]["BN"] != 32 for b in rep["buckets"])
    assert all(e["BN"] != 32 for e in json.load(open(cfg / "w8a8_interpreter.json"))["entries"])


def _report_row(family, max_m, m, results):
    """A tiles.json row with the given (config, median_ms or None for a wrong one) results."""
    cands = [{"config": c, "status": "ok", "median_ms": t} if t else {"config": c, "status": "wrong: garbage"}
             for c, t in results]
    return {"family": family, "bucket_max_m": max_m, "M": m, "candidates": cands}


def test_write_configs_on_a_gpu_table_with_two_group_sizes(tmp_path):
    """sm80's W4A8 table (by_group on its last entry), measured at G = 128 then G = 32: the entries take G = 128's
    best, G = 32 gets a by_group override only where its best differs from what the entry gives it."""
    mod = _module()
    cfg = tmp_path / "configs"
    shutil.copytree(CONFIGS, cfg)
    table = config_table.load_table("w4a8", "sm80")
    fams = []
    for g in (128, 32):  # a family as the script builds it on an sm80 GPU, without the GPU
        f = mod.TritonFamily.__new__(mod.TritonFamily)
        f.torch, f.bits, f.group, f.mod, f.kernel, f.name = torch, 4, g, w4a8, "w4a8", f"triton-w4a8-g{g}"
        f.kind, f.path, f.table, f.table_file = "triton", str(cfg / "w4a8_sm80.json"), table, json.load(
            open(cfg / "w4a8_sm80.json"))
        fams.append(f)
    buckets = []
    for i, e in enumerate(table):
        for f in fams:
            best = f.shipped(i)
            if i == 0:
                best = dict(best, BN=64)  # both groups: the entry changes, no override
            if i == 1 and f.group == 32:
                best = dict(best, num_stages=3)  # G = 32 only: an override
            buckets.append({"family": f.name, "bucket_max_m": e["max_m"], "best": best, "shipped": f.shipped(i),
                            "m_values": [1], "cases": 1, "shipped_label": "", "shipped_total_ms": 2.0,
                            "best_label": "", "best_total_ms": 1.0, "speedup": 2.0})
    written = mod.write_triton_tables({"buckets": buckets}, fams, {"command": "test"}, str(tmp_path))
    assert str(cfg / "w4a8_sm80.json") in written
    new = json.load(open(cfg / "w4a8_sm80.json"))
    config_table.validate_table(new["entries"])
    assert [e["max_m"] for e in new["entries"]] == [e["max_m"] for e in table]
    assert new["entries"][0]["BN"] == 64 and "by_group" not in new["entries"][0]
    assert new["entries"][1]["by_group"] == {"32": {"num_stages": 3}}
    assert new["entries"][2]["by_group"] == table[2]["by_group"]  # G = 256's override, not measured: kept
    assert w4a8.fit_config(config_table.params(new["entries"][1]), 32)["num_stages"] == 3
    assert w4a8.fit_config(config_table.params(new["entries"][1]), 128)["num_stages"] == table[1]["num_stages"]
    assert new["measured"]["group_sizes"] == [128, 32] and len(new["measured"]["buckets"]) == len(table)


@pytest.mark.skipif(not _cuda_built(), reason="ditq._C is not built")
def test_cuda_rules_proposal_for_a_hopper_gpu():
    """The proposal a sm_90 run writes: a Hopper tile's bucket names it in kSm90TileRules; an mma.sync tile's
    bucket hands over (-1) and sets the arch-90 kTileRules row; a fixed split that did better is noted."""
    mod = _module()
    f = mod.CudaFamily.__new__(mod.CudaFamily)
    f.torch, f.bits, f.group, f.kernel, f.name, f.kind = torch, 8, None, "w8a8", "cuda-w8a8", "cuda"
    from ditq.backends import cuda_backend
    f.cb, f.arch, f.sms, f.hopper = cuda_backend, 90, 132, True
    f.rules, f.sm90_rules = mod.read_tile_rules()
    auto = {"tile": None, "splits": None}
    rows = [_report_row("cuda-w8a8", 16, 16, [(auto, 3.0), ({"tile": 101, "splits": None}, 2.0),
                                               ({"tile": 0, "splits": 2}, 1.0), ({"tile": 2, "splits": None}, None)]),
            _report_row("cuda-w8a8", 64, 64, [(auto, 3.0), ({"tile": 1, "splits": None}, 2.0)])]
    text = mod.cuda_rules_text({"rows": rows}, [f], {"command": "test"})
    sm90 = text.split("kSm90TileRules[] = {")[1].split("};")[0]
    w4_now = {r[0]: r[2] for r in f.sm90_rules}  # W4 was not measured: its buckets keep what they have
    assert f"{{16, 1, {w4_now[16]}}}," in sm90 and f"{{64, -1, {w4_now[64]}}}," in sm90
    mma = text.split("kTileRules[] = {")[1].split("};")[0]
    assert "{90, 64, 1, " in mma and "{80, 64, 1, 1}," in mma
    assert "a fixed split did better: tile 0" in text
    assert "tile 2 " not in text.split("// csrc")[0]  # the wrong one is never proposed

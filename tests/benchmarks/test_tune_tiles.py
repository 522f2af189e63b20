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
    for r in [r for r in rep["rows"] if r["kind"] == "triton"]:  # the automatic count capped (smoke: at 1)
        capped = [c for c in r["candidates"] if "max_splits" in c["config"]]
        assert [c["config"] for c in capped] == [dict(r["shipped"]["config"], max_splits=1)], r["candidates"]
        assert capped[0]["label"].endswith(" cap 1") and capped[0]["status"] == "ok"
    for b in [b for b in rep["buckets"] if b["kind"] == "triton"]:  # the cap timed, and chosen only by a margin
        assert set(b["cap_totals_ms"]) == {"1"} and b["auto_total_ms"] == b["shipped_total_ms"]
        wins = b["cap_totals_ms"]["1"] < b["auto_total_ms"] * 0.97
        assert b["best_cap"] == (1 if wins else None) and "max_splits" not in b["best"]
    for r in [r for r in rep["rows"] if r["kind"] == "cuda"]:  # mma.sync buckets: the automatic count capped at 1
        capped = [c for c in r["candidates"] if "max_splits" in c["config"]]
        assert [c["config"] for c in capped] == [{"tile": None, "splits": None, "max_splits": 1}], r["candidates"]
        assert capped[0]["label"] == "auto cap 1" and capped[0]["status"] == "ok"
    for b in [b for b in rep["buckets"] if b["kind"] == "cuda"]:
        assert b["cap_kind"] == "mma" and set(b["cap_totals_ms"]) == {"1"} and b["cap_tile"].startswith("tile ")
    assert "Split caps per bucket" in (out / "tiles.md").read_text()
    assert (out / "tiles.md").read_text().count("\n| ") >= len(rep["rows"]) + len(rep["buckets"])


def test_write_configs_keeps_the_bucket_structure(smoke, monkeypatch):
    rep, out, cfg = smoke
    monkeypatch.setattr(config_table, "CONFIG_DIR", str(cfg))
    for kernel in ("w8a8", "w4a8"):
        before = json.load(open(os.path.join(CONFIGS, f"{kernel}_interpreter.json")))
        after = json.load(open(cfg / f"{kernel}_interpreter.json"))
        table = config_table.load_table(kernel, "interpreter")  # through the loader, from the copy
        assert [e["max_m"] for e in table] == [e["max_m"] for e in before["entries"]]
        # same keys, same order (and the cap, where one won)
        assert [[k for k in e if k != "max_splits"] for e in table] == [list(e) for e in before["entries"]]
        fam = next(f for f in rep["families"] if f.startswith(f"triton-{kernel}"))
        for e in table:
            b = next(b for b in rep["buckets"] if b["family"] == fam and b["bucket_max_m"] == e["max_m"])
            tile = {k: v for k, v in config_table.params(e).items() if k != "max_splits"}
            assert tile == b["best"]  # the measured best, which the launcher accepts
            # a winning cap goes in only on the tile it was timed on (the shipped one)
            assert e.get("max_splits") == (b["best_cap"] if b["best"] == b["shipped"] else None)
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
    cap_now = {r[0]: r[3] for r in f.sm90_rules}  # no cap was timed: each bucket keeps its max_splits
    assert f"{{16, 1, {w4_now[16]}, {cap_now[16]}}}," in sm90 and f"{{64, -1, {w4_now[64]}, {cap_now[64]}}}," in sm90
    mma = text.split("kTileRules[] = {")[1].split("};")[0]
    mma_cap = {(r[0], r[1]): r[4] for r in f.rules}  # no mma.sync cap was timed: each row keeps its max_splits
    assert "{90, 64, 1, " in mma and f"{{80, 64, 1, 1, {mma_cap[80, 64]}}}," in mma
    assert "a fixed split did better: tile 0" in text
    assert "tile 2 " not in text.split("// csrc")[0]  # the wrong one is never proposed


def test_triton_cap_chosen_by_margin_and_written(tmp_path):
    """Made-up timings: per bucket of sm90's W8A8 table, the shipped tile's automatic count against caps 1, 2, 4,
    8. A cap > 3% faster is chosen and written as the entry's max_splits; one within 3% is not; a cap timed on
    a tile the bucket does not keep is not written; an entry's own cap stays where no cap won."""
    mod = _module()
    cfg = tmp_path / "configs"
    shutil.copytree(CONFIGS, cfg)
    path = cfg / "w8a8_sm90.json"
    data = json.load(open(path))
    data["entries"][2]["max_splits"] = 4  # a cap shipped earlier: kept when nothing beats it
    path.write_text(json.dumps(data))
    table = config_table.validate_table(json.load(open(path))["entries"])
    f = mod.TritonFamily.__new__(mod.TritonFamily)
    f.torch, f.bits, f.group, f.mod, f.kernel, f.name = torch, 8, None, w8a8, "w8a8", "triton-w8a8"
    f.kind, f.path, f.table, f.table_file, f.caps = "triton", str(path), table, json.load(open(path)), mod.TRITON_CAPS
    # bucket 0 (M <= 16): cap 2 is 10% faster -> chosen; bucket 1: cap 1 only 2% faster -> none;
    # bucket 2 (ships cap 4): a neighbour tile wins and cap 1 is faster on the old tile -> tile changes, no cap
    timings = [{None: 10.0, 1: 9.5, 2: 9.0, 4: 9.8, 8: 10.0}, {None: 10.0, 1: 9.8, 2: 10.5, 4: 10.0, 8: 10.0},
               {None: 10.0, 1: 5.0, 2: 6.0, 4: 10.0, 8: 10.0}]
    buckets = []
    for i, e in enumerate(table):
        shipped = f.shipped(i)
        assert shipped.get("max_splits") == (4 if i == 2 else None)
        auto = {k: v for k, v in shipped.items() if k != "max_splits"}
        assert f.capped(i) == ([auto] if i == 2 else []) + [dict(auto, max_splits=c) for c in (1, 2, 4, 8)]
        cands = [(auto, timings[i][None])] + [(dict(auto, max_splits=c), timings[i][c]) for c in (1, 2, 4, 8)]
        best = dict(shipped, BN=64) if i == 2 else shipped  # (buckets 0 and 1: the shipped entry is `auto`)
        if i == 2:  # (its shipped entry is the cap-4 candidate)
            cands.append((best, 1.0))
        row = _report_row(f.name, e["max_m"], 16 * (i + 1), cands)
        caps = mod.triton_cap_totals(f, [row], shipped)
        assert caps["auto_total_ms"] == timings[i][None]
        assert caps["cap_totals_ms"] == {c: timings[i][c] for c in (1, 2, 4, 8)}
        assert caps["best_cap"] == (2, None, 1)[i]
        buckets.append({"family": f.name, "bucket_max_m": e["max_m"], "best": best, "shipped": shipped,
                        "m_values": [16], "cases": 1, "shipped_label": "", "shipped_total_ms": 10.0,
                        "best_label": "", "best_total_ms": 1.0, "speedup": 10.0, **caps})
    assert buckets[0]["cap_speedup"] == pytest.approx(10 / 9)
    mod.write_triton_tables({"buckets": buckets}, [f], {"command": "test"}, str(tmp_path))
    new = json.load(open(path))["entries"]
    config_table.validate_table(new)
    assert new[0]["max_splits"] == 2 and config_table.params(new[0]) == dict(f.shipped(0), max_splits=2)
    assert new[1] == table[1]  # within the margin: as it was
    assert new[2]["BN"] == 64 and new[2]["max_splits"] == 4  # the new tile keeps the entry's own cap
    cfg0 = w8a8.fit_config(config_table.params(new[0]))
    assert w8a8.auto_split_count(cfg0, 16, 1152, 4608, 132) == 2  # and the launcher honours it
    assert w8a8.auto_split_count(f.shipped(0), 16, 1152, 4608, 132) == 14


def test_hopper_tail_counts_and_cap_proposal():
    """Made-up timings of a sm_90 run at DiT-XL/2 fc1 (M = 512: 132 whole + 12 tails, automatic S = 9) and fc2
    (M = 512: 36 tiles, automatic S = 3): the Hopper tile's forced counts time the tail; the cap that limits
    each case's automatic count is timed by the forced count it comes to, chosen by the 3% margin, and proposed
    as the bucket's max_splits in kSm90TileRules."""
    mod = _module()
    f = mod.CudaFamily.__new__(mod.CudaFamily)
    f.torch, f.bits, f.group, f.kernel, f.name, f.kind = torch, 8, None, "w8a8", "cuda-w8a8", "cuda"
    f.arch, f.sms, f.hopper = 90, 132, True
    f.rules, f.sm90_rules = mod.read_tile_rules()
    assert all(len(r) == 4 and r[3] >= 1 for r in f.sm90_rules)  # the max_splits column is read
    f.splits, f.sm90_splits, f.tile_ids, f.max_candidates = mod.SPLITS, mod.SM90_SPLITS, [0, 101], None
    assert {"tile": 101, "splits": 9} in f.candidates(2) and {"tile": 0, "splits": 9} not in f.candidates(2)
    f.tile_shape = lambda t: (128, 128, 128) if t >= 100 else (64, 64, 64)
    f.sm90_auto_splits = lambda tile, m, n, k: {4608: 9, 1152: 3}[n]
    f.auto_tile = lambda m: 101
    f.cb = None
    # fc1: the tail at 9 (auto) 10 ms, forced 4 -> 8, 3 -> 8.5, 2 -> 9, 1 -> 12; fc2: auto (3) 5, 2 -> 6, 1 -> 9
    fc1 = {None: 10.0, 1: 12.0, 2: 9.0, 3: 8.5, 4: 8.0, 6: 9.0, 9: 10.0}
    fc2 = {None: 5.0, 1: 9.0, 2: 6.0, 3: 5.0, 4: 5.5, 6: 6.0, 9: 7.0}
    rows = []
    for n, times in ((4608, fc1), (1152, fc2)):
        row = _report_row("cuda-w8a8", 4096, 512, [({"tile": 101, "splits": s}, t) for s, t in times.items()])
        row.update(N=n, K=1152)
        rows.append(row)
    caps = mod.sm90_cap_totals(f, rows, {"tile": 101, "splits": None})
    # cap c: fc1 runs min(9, c), fc2 min(3, c); 16 and 9 are today's schedule
    want = {1: 12 + 9, 2: 9 + 6, 3: 8.5 + 5, 4: 8 + 5, 6: 9 + 5, 9: 10 + 5, 16: 10 + 5}
    assert caps["auto_total_ms"] == 15 and caps["cap_totals_ms"] == want and caps["best_cap"] == 4
    assert caps["cap_speedup"] == pytest.approx(15 / 13)
    bucket = {"family": "cuda-w8a8", "bucket_max_m": 4096, **caps}
    text = mod.cuda_rules_text({"rows": rows, "buckets": [bucket]}, [f], {"command": "test"})
    sm90 = text.split("kSm90TileRules[] = {")[1].split("};")[0]
    now = {r[0]: r for r in f.sm90_rules}
    assert f"{{4096, 1, {now[4096][2]}, 4}}," in sm90  # the cap proposed for the measured bucket
    assert f"{{64, {now[64][1]}, {now[64][2]}, {now[64][3]}}}," in sm90  # the others keep theirs
    assert "cap 4 13 ms" in text and "-> cap 4" in text
    # a bucket that ships a cap (3 here): the automatic configuration runs fc1 at 3, so cap 16 is timed by the
    # forced 9 and cap 3 is today's schedule itself
    f.sm90_rules = [r[:3] + (3,) if r[0] == 4096 else r for r in f.sm90_rules]
    shipped3 = mod.sm90_cap_totals(f, rows, {"tile": 101, "splits": None})
    assert shipped3["auto_total_ms"] == 15 and shipped3["cap_totals_ms"][16] == 10 + 5
    assert shipped3["cap_totals_ms"][3] == 15 and shipped3["cap_totals_ms"][4] == 8 + 5
    f.sm90_rules = mod.read_tile_rules()[1]
    # within the margin: no cap proposed, the bucket keeps its own
    close = {**fc1, 4: 9.8, 3: 9.9, 2: 9.9, 6: 9.9}
    rows[0]["candidates"] = _report_row("", 0, 0, [({"tile": 101, "splits": s}, t)
                                                   for s, t in close.items()])["candidates"]
    assert mod.sm90_cap_totals(f, rows, {"tile": 101, "splits": None})["best_cap"] is None


def _mma_family(mod, hopper=False):
    """A cuda-w8a8 family as the script builds it on an sm_80 GPU (or sm_90 with ``hopper``), without the GPU or
    the build: tile picks from the header's rules, made-up tile shapes."""
    from types import SimpleNamespace
    f = mod.CudaFamily.__new__(mod.CudaFamily)
    f.torch, f.bits, f.group, f.kernel, f.name, f.kind = torch, 8, None, "w8a8", "cuda-w8a8", "cuda"
    f.arch, f.sms, f.hopper = (90, 132, True) if hopper else (80, 108, False)
    f.rules, f.sm90_rules = mod.read_tile_rules()
    shapes = {0: (16, 64, 128), 1: (64, 64, 64), 2: (128, 128, 64)}
    f.cb = SimpleNamespace(gemm_pick_tile=lambda arch, m, w4: mod._current(f.rules, f.arch_row(), m, 4 if w4 else 8),
                           gemm_tile_info=lambda t: list(shapes[t]) + [1, 1, 1, 32])
    f.splits, f.sm90_splits, f.tile_ids, f.caps, f.max_candidates = mod.SPLITS, mod.SM90_SPLITS, [0, 1, 2], \
        mod.MMA_CAPS, None
    return f


def test_mma_caps_are_candidates_where_mma_runs():
    """Every bucket that runs an mma.sync tile times its automatic count capped at each of MMA_CAPS; a bucket that
    runs a Hopper tile does not (its cap is timed by its forced tail counts), unless its rule hands it over."""
    mod = _module()
    f = _mma_family(mod)
    assert all(len(r) == 5 and r[4] >= 1 for r in f.rules)  # the max_splits column is read
    caps = [{"tile": None, "splits": None, "max_splits": c} for c in mod.MMA_CAPS]
    assert f.bounds() == [16, 64, None]
    for b in range(3):
        cands = f.candidates(b)
        assert cands[-len(caps):] == caps and len(cands) == 3 * len(mod.SPLITS) + len(caps)
    assert f.label(caps[1]) == "auto cap 2"
    h = _mma_family(mod, hopper=True)
    assert all(h.capped(b) == [] for b in range(len(h.bounds())))
    h.sm90_rules = [(r[0], -1, r[2], r[3]) if r[0] == 64 else r for r in h.sm90_rules]  # M <= 64 handed over
    assert [bool(h.capped(b)) for b in range(len(h.bounds()))] == [h.bounds()[b] == 64 for b in range(len(h.bounds()))]


def test_mma_cap_chosen_by_margin_and_proposed():
    """Made-up timings of an sm_80 run, per bucket: the automatic count against caps 1, 2, 4, 8, 16 (each case's
    count capped, forced). M <= 16: cap 4 is 17% faster over its two cases -> proposed as the arch-80 row's
    max_splits; M <= 64: within 3% -> the row keeps its cap; larger M: cap 2 wins, but a forced tile 1 with
    automatic split-K beats the rule's tile, which changes -> the cap (timed on the old tile) is not proposed."""
    mod = _module()
    f = _mma_family(mod)
    auto = {"tile": None, "splits": None}
    timings = {16: [{None: 10.0, 1: 14.0, 2: 9.0, 4: 8.0, 8: 9.5, 16: 10.0},
                    {None: 5.0, 1: 6.0, 2: 5.0, 4: 4.5, 8: 5.0, 16: 5.0}],
               64: [{None: 10.0, 1: 9.9, 2: 9.8, 4: 9.9, 8: 10.0, 16: 10.0}],
               None: [{None: 10.0, 1: 12.0, 2: 8.0, 4: 9.0, 8: 10.0, 16: 10.0}]}
    rows, buckets = [], []
    for b_max, cases in timings.items():
        brows = []
        for i, t in enumerate(cases):
            res = [(auto if c is None else dict(auto, max_splits=c), ms) for c, ms in t.items()]
            if b_max is None:
                res.append(({"tile": 1, "splits": None}, 5.0))
            row = _report_row("cuda-w8a8", b_max, (b_max or 4096) - i, res)
            row.update(N=(4608, 1152)[i], K=1152)
            brows.append(row)
        caps = mod.mma_cap_totals(f, brows, auto)
        assert caps["cap_kind"] == "mma" and caps["auto_total_ms"] == sum(t[None] for t in cases)
        assert caps["cap_totals_ms"] == {c: sum(t[c] for t in cases) for c in mod.MMA_CAPS}
        assert caps["best_cap"] == {16: 4, 64: None, None: 2}[b_max]
        rows += brows
        buckets.append({"family": "cuda-w8a8", "bucket_max_m": b_max, **caps})
    assert buckets[0]["cap_speedup"] == pytest.approx(15 / 12.5) and buckets[0]["cap_tile"].startswith("tile 0 (")
    text = mod.cuda_rules_text({"rows": rows, "buckets": buckets}, [f], {"command": "test"})
    mma = text.split("kTileRules[] = {")[1].split("};")[0]
    now = {(r[0], r[1]): r for r in f.rules}
    assert f"{{80, 16, 0, {now[80, 16][3]}, 4}}," in mma  # the cap chosen, on the tile the bucket keeps
    assert f"{{80, 64, 1, {now[80, 64][3]}, {now[80, 64][4]}}}," in mma  # within the margin: as it is
    assert f"{{80, -1, 1, {now[80, -1][3]}, {now[80, -1][4]}}}," in mma  # a new tile: the cap it has now
    assert "{%d, %d, %d, %d, %d}," % now[90, 16] in mma  # the other arch's rows as they are
    assert f"automatic (cap {now[80, 16][4]}) 15 ms; cap 1 20 ms, cap 2 14 ms, cap 4 12.5 ms, cap 8 14.5 ms, cap 16 15 ms -> cap 4" \
        in text and "-> cap 2 (not proposed: the bucket changes tile to 1)" in text
    assert "kSm90TileRules" not in text  # no Hopper kernels on this GPU


@pytest.mark.skipif(not _cuda_built(), reason="ditq._C is not built")
def test_mma_cap_counts_come_from_the_build():
    """CudaFamily asks the build for the count (gemm_auto_splits), capped or at the rule's cap: M = 16, N = 1152
    on the 16 x 64 tile is 18 CTAs, 15 splits for two waves of 132 SMs (K = 4608: 36 units); capped at 2, 36 CTAs."""
    mod = _module()
    f = mod.CudaFamily(torch, torch.device("cpu"), 8, None, False, None)
    assert f.cb.gemm_tile_info(0)[:2] == [16, 64] and f.cb.gemm_pick_tile(90, 16, False) == 0
    assert f.ctas({"tile": None, "splits": None}, 16, 1152, 4608) == 18 * 15
    assert f.ctas({"tile": None, "splits": None, "max_splits": 2}, 16, 1152, 4608) == 18 * 2
    assert f.ctas({"tile": 0, "splits": None}, 16, 1152, 4608) == 18 * 15
    assert f.mma_splits(0, 16, 1152, 4608, 7) == 7 and f.mma_splits(0, 16, 1152, 4608) == 15

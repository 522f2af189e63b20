"""benchmarks/real_size.py on tiny configs, in process: every measured field is filled, the loaded model reproduces
the saved one bit for bit, a model too large for the memory cap is skipped with its size named, and the RESULTS.md
entries are replaced, not duplicated."""
import importlib.util
import json
import math
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def rs():
    spec = importlib.util.spec_from_file_location("real_size", os.path.join(ROOT, "benchmarks", "real_size.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def run(rs, tmp_path_factory):
    d = tmp_path_factory.mktemp("real_size")
    results = d / "RESULTS.md"
    results.write_text("# results\n\n## Other section\n\nkept\n")
    real_count = rs.count_params
    # FLUX.1's 12B parameters take seconds to count even on the meta device: its count is given here, and
    # test_meta_count_matches_a_built_model checks the counting itself
    flux = {"params": 11_901_408_320, "linear_params": 11_898_322_944}
    rs.count_params = lambda name, tiny: flux if name == "flux" else real_count(name, tiny)
    try:
        assert rs.main(["--tiny", "--in-process", "--models", "dit", "flux", "--configs", "w8a8", "--out", str(d),
                        "--work", str(d), "--update-results", "--results", str(results)]) == 0
    finally:
        rs.count_params = real_count
    return json.loads((d / "real_size.json").read_text()), results, d


def test_tiny_dit_row_is_complete(run):
    rep, _, _ = run
    assert rep["schema"] == "ditq.real_size/1" and rep["tiny"]
    dit = [r for r in rep["rows"] if r["model"] == "dit"]
    assert len(dit) == 1
    r = dit[0]
    assert r["status"] == "ok" and r["identical"] is True, r["status"]
    assert r["layers_quantized"] > 0 and r["layers_skipped"] == sum(r["skip_reasons"].values())
    assert any("output layer" in why for why in r["skip_reasons"])
    assert 20 < r["output_sqnr_db"] < 100
    for k in ("build_s", "float_forward_s", "quantize_s", "quant_forward_s", "save_s", "load_s", "ckpt_gib",
              "float_gib", "packed_gib"):
        assert isinstance(r[k], (int, float)) and r[k] > 0, (k, r[k])
    assert r["quantize_peak_rss_gib"] >= r["rss_before_quantize_gib"] > 0
    assert r["packed_gib"] < r["float_gib"]  # int8 linears (the float layers that remain are small)


def test_flux_is_not_built(run):
    rep, _, _ = run
    (fx,) = [r for r in rep["rows"] if r["model"] == "flux"]
    assert fx["status"].startswith("not run: 11.9B parameters are 44 GiB in float32"), fx["status"]
    assert "build_s" not in fx


def test_meta_count_matches_a_built_model(rs):
    import torch

    for name in ("dit", "pixart", "sd3"):
        m = rs.build(name, True, torch.float32)
        lin = sum(x.weight.numel() for x in m.modules() if isinstance(x, torch.nn.Linear))
        assert rs.count_params(name, True) == {"params": sum(p.numel() for p in m.parameters()),
                                               "linear_params": lin}


def test_model_over_the_cap_is_skipped(rs, tmp_path):
    assert rs.main(["--tiny", "--in-process", "--models", "pixart", "--max-rss-gb", "0.5", "--out",
                    str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "real_size.json").read_text())["rows"]
    assert row["status"].startswith("not run: estimated peak") and "--max-rss-gb 0.5" in row["status"]


def test_results_entries_replace_not_duplicate(rs, run):
    rep, results, d = run
    text = results.read_text()
    assert text.startswith("# results\n\n## Other section\n\nkept\n")
    assert text.count(rs.BEGIN) == 1 and text.count(rs.END) == 1
    assert text.count("<!-- real-size dit -->") == 1 and text.count("<!-- real-size flux -->") == 1
    assert text.index("<!-- real-size dit -->") < text.index("<!-- real-size flux -->")
    # the same run rendered again from its JSON replaces the entries in place
    assert rs.main(["--from-json", str(d / "real_size.json"), "--out", str(d), "--update-results",
                    "--results", str(results)]) == 0
    assert results.read_text() == text
    again = rs.update_results(text, {"dit": "### DiT-XL/2: new\n\nbody"})
    assert again.count("<!-- real-size dit -->") == 1 and "### DiT-XL/2: new" in again
    assert "<!-- real-size flux -->" in again


def test_estimate_skips_what_does_not_fit(rs):
    count = {"params": 2_000_000_000, "linear_params": 1_900_000_000}
    est = rs._estimate_peak(count, 4)
    assert math.isclose(est, 8e9 + 1.9e9 + rs.GIB)

"""``ditq demo`` on a tiny setting (2 steps, 1 sample per class, 5 settings) writes a valid report and grid."""
from __future__ import annotations

import json
import math
import os

import pytest
from PIL import Image

from ditq.cli import main
from ditq.demo import run as demo

ROW_KEYS = {"setting", "calibration", "backend", "image_sqnr_db", "transformer_sqnr_db", "accuracy",
            "frechet_real", "frechet_fp32", "transformer_bytes", "seconds_per_step"}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo"))
    code = main(["demo", "--out", out, "--steps", "2", "--samples-per-class", "1", "--quiet",
                 "--settings", "w8a8", "w4a8-all", "w8a8-best", "w4a8-dyn"])
    assert code == 0
    return out, json.load(open(os.path.join(out, "demo.json")))


def test_report_has_one_row_per_setting(result):
    _, d = result
    assert [r["setting"] for r in d["rows"]] == ["fp32", "w8a8", "w4a8-all", "w8a8-best", "w4a8-dyn"]  # fp32 first
    assert d["steps"] == 2 and d["samples"] == 10 and d["samples_per_class"] == 1
    for r in d["rows"]:
        assert set(r) == ROW_KEYS
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["seconds_per_step"] > 0 and r["frechet_real"] >= 0
    fp, w8, w4, best, dyn = d["rows"]
    assert (best["calibration"], dyn["calibration"]) == ("policy", "dynamic")
    policy = d["quant_reports"]["w8a8-best"]
    assert policy["calibration"]["calls_per_run"] == [2] and "smoothing" in policy["calibration"]
    assert {lr["act_estimator"] for lr in policy["layers"]} <= {"max", "percentile", "mse"}
    assert all(lr["format"].endswith("a8-d") for lr in d["quant_reports"]["w4a8-dyn"]["layers"])
    assert fp["image_sqnr_db"] is None and fp["calibration"] == "-"
    assert (w8["calibration"], w4["calibration"]) == ("first-step", "all-steps")
    assert w8["backend"] == w4["backend"] == "torch"  # no GPU here: auto resolves to the reference
    # Bytes follow from the format: int8 quarters the quantized fp32 linears' bytes, int4 g128 ~ 8x smaller; the
    # layers kept in float (timestep embedders, output layers: ~13% of this model's weights) bound the whole ratio.
    assert fp["transformer_bytes"] > 2.5 * w8["transformer_bytes"] > 2.5 * w4["transformer_bytes"]
    for r in (w8, w4):
        assert math.isfinite(r["image_sqnr_db"]) and r["transformer_sqnr_db"] > 20
        assert r["frechet_fp32"] >= 0
    assert w8["transformer_sqnr_db"] > w4["transformer_sqnr_db"]  # 8-bit weights beat 4-bit
    assert set(d["quant_reports"]) == {"w8a8", "w4a8-all", "w8a8-best", "w4a8-dyn"}
    assert d["quant_reports"]["w4a8-all"]["calibration"]["calls_per_run"] == [2]  # every step was observed
    assert d["quant_reports"]["w8a8"]["calibration"]["calls_per_run"] == [1]


def test_png_has_the_expected_size(result):
    out, d = result
    img = Image.open(os.path.join(out, "demo.png"))
    assert img.size == demo.grid_size(rows=5, columns=10)
    assert img.size == (demo.LABEL_WIDTH + 10 * (demo.CELL + demo.GAP) + demo.GAP,
                        5 * (demo.CELL + demo.GAP) + demo.GAP)
    assert demo.CELL >= 64  # 16-px digits upscaled at least 4x: readable at a glance
    # each row's label strip carries text (setting, image SQNR, accuracy): not a blank strip
    import numpy as np
    strip = np.asarray(img)[: demo.CELL, : demo.LABEL_WIDTH]
    assert (strip > 200).sum() > 100


def test_bad_setting_and_numbers(tmp_path, capsys):
    with pytest.raises(demo.DemoError, match="unknown demo setting 'w3a3'"):
        demo.check_settings(["w3a3"])
    assert demo.check_settings(["w4a8", "fp32", "w4a8"]) == ["fp32", "w4a8"]
    assert demo.check_settings(None) == list(demo.DEFAULT_SETTINGS) and demo.DEFAULT_SETTINGS[0] == "fp32"
    assert set(demo.DEFAULT_SETTINGS) < set(demo.SETTINGS)  # the full set stays behind --settings all
    assert demo.check_settings(["all"]) == list(demo.SETTINGS)
    code = main(["demo", "--out", str(tmp_path), "--steps", "0"])
    assert code == 2 and "--steps must be at least 1" in capsys.readouterr().err
    with pytest.raises(demo.DemoError, match="--samples-per-class must be a positive integer"):
        demo.run_demo(str(tmp_path), samples_per_class=0)
    with pytest.raises(ValueError, match="backend"):
        demo.run_demo(str(tmp_path), backend="tpu")


def test_table_formats_every_row():
    rows = [demo.Row("fp32", "-", "cpu-fp32", None, None, 1.0, 300.0, None, 8_500_000, 0.2),
            demo.Row("w4a8", "first-step", "torch", 13.2, float("inf"), 0.9, 250.0, 90.0, 1_350_000, 0.5)]
    table = demo.format_table(rows).splitlines()
    assert len(table) == 4 and "img SQNR" in table[0]
    assert table[3].split()[:6] == ["w4a8", "first-step", "torch", "13.2", "inf", "90.0"]

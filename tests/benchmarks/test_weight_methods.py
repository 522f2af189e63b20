"""benchmarks/weight_methods.py runs one small setting per method and prints their weight and output SQNRs."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow  # three quantize + sample runs of the bundled model (~20 s on an idle 2-core CPU)
def test_weight_methods_reports_each_method(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("weight_methods", os.path.join(ROOT, "benchmarks",
                                                                                 "weight_methods.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--out", str(tmp_path), "--groups", "32", "--steps", "2", "--samples-per-class", "1"]) == 0
    d = json.load(open(tmp_path / "demo.json"))
    assert [r["setting"] for r in d["rows"]] == ["fp32", "w4a8-g32-rtn", "w4a8-g32-mse", "w4a8-g32-gptq"]
    reps = d["quant_reports"]
    assert {lr["weight_method"] for lr in reps["w4a8-g32-gptq"]["layers"]} == {"gptq"}
    # gptq is fitted to the calibration inputs, and the report's transformer SQNR is measured on them
    assert reps["w4a8-g32-gptq"]["output_sqnr"] > reps["w4a8-g32-rtn"]["output_sqnr"]
    out = capsys.readouterr().out
    assert "w4a8-g32-gptq" in out and "out est" in out

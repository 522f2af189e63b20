"""benchmarks/skip_study.py runs and reports every layer group (the README's skip-list figures come from it)."""
import importlib.util
import json
import math
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_skip_study_reports_every_group(tmp_path):
    spec = importlib.util.spec_from_file_location("skip_study", os.path.join(ROOT, "benchmarks", "skip_study.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "skip.json"
    assert mod.main(["--seeds", "0", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["sqnr_db"]["0"]
    assert set(rows) == set(mod.GROUPS)
    assert all(math.isfinite(v) and 10 < v < 80 for v in rows.values()), rows

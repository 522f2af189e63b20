"""benchmarks/skip_study.py runs and reports every layer group (the README's skip-list figures and the table in
ditq/convert.py's docstring come from it)."""
import importlib.util
import json
import math
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _docstring_table(mod):
    """{group: [seed-0 value of each SETTINGS column]} from ditq/convert.py's docstring table."""
    import ditq.convert
    doc = ditq.convert.__doc__
    body = doc.split("group (diffusers DiT names)", 1)[1].split("\n\n", 1)[0]
    rows = [line for line in body.splitlines()[2:] if line and not line.startswith("=")]
    prefixes = {"timestep embedders": "timestep embedders", "adaLN": "adaLN modulation", "attention": "attention q",
                "MLP": "MLP fc1", "proj_out_1": "final adaLN", "proj_out_2": "final projection",
                "all of them": "all of them", "all but proj_out*": "all but"}
    table = {}
    for name, prefix in prefixes.items():
        line = next(r for r in rows if r.startswith(prefix))
        cells = re.findall(r"(\d+\.\d) / \d+\.\d", line)
        table[name] = [float(c) for c in cells[:len(mod.SETTINGS)]]
    return table


def test_skip_study_reports_every_group(tmp_path):
    spec = importlib.util.spec_from_file_location("skip_study", os.path.join(ROOT, "benchmarks", "skip_study.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "skip.json"
    assert mod.main(["--seeds", "0", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    groups = set(mod.GROUPS) | set(mod.COMBINED)
    assert set(data["sqnr_db"]) == set(mod.SETTINGS)
    for setting, by_seed in data["sqnr_db"].items():
        rows = by_seed["0"]
        assert set(rows) == groups
        assert all(math.isfinite(v) and 10 < v < 80 for v in rows.values()), (setting, rows)
    shares = data["dit_xl_share"]
    assert set(shares) == groups and math.isclose(shares["all of them"], 1.0)
    assert math.isclose(sum(shares[g] for g in mod.GROUPS), 1.0)  # DiT-XL/2's linears: every one in some group
    # the docstring quotes this run (seed 0, every column), to its printed precision
    documented = _docstring_table(mod)
    measured = {g: [data["sqnr_db"][s]["0"][g] for s in mod.SETTINGS] for g in groups}
    for g in groups:
        assert len(documented[g]) == len(mod.SETTINGS), (g, documented[g])
        assert all(abs(d - m) <= 0.15 for d, m in zip(documented[g], measured[g])), (g, documented[g], measured[g])

"""benchmarks/paper_figures.py --quick runs end to end and writes every figure, its JSON and the markdown."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIGURES = ["fig1_activations.png", "fig1_weights.png", "fig2_calibration_step.png", "fig3_grid.png",
           "fig4_settings.png"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("figures")
    md = out / "PAPER_FIGURES.md"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "paper_figures.py"), "--quick",
                        "--no-progress", "--out-dir", str(out), "--markdown", str(md)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, md, r.stdout


def test_writes_every_figure(quick):
    from PIL import Image
    out, _, _ = quick
    for f in FIGURES:
        img = Image.open(out / f)
        assert img.size[0] > 300 and img.size[1] > 100, f


def test_json_holds_the_measurements(quick):
    out, _, _ = quick
    d = json.load(open(out / "paper_figures.json"))
    assert d["steps"] == 3 and d["samples_per_class"] == 1
    settings = [row["setting"] for row in d["table"]]
    assert settings[0] == "fp32" and len(settings) == 4
    for row in d["table"][1:]:
        assert isinstance(row["trajectory_sqnr"], float) and isinstance(row["image_sqnr"], float)
        assert 0 <= row["accuracy"] <= 1
    cal = [c["calibration"] for c in d["fig2"]["choices"]]
    assert cal == [[0], [2], "all-steps"]
    for c in d["fig2"]["choices"]:
        assert len(c["trajectory_sqnr_per_step"]) == 3  # one SQNR per sampling step of the fp32 trajectory
    act = d["fig1"]["act_absmax_per_step"]
    assert act and all(sorted(rec) == ["0", "1", "2"] for rec in act.values())  # all-steps records every step
    assert len(d["fig1"]["channel_absmax"]) == 3
    by_type = d["fig1"]["weights"]["by_type"]
    # groups are a refinement of per-channel scales: never worse on any layer type
    for v in by_type.values():
        assert v["g32"] >= v["per_channel"] - 1e-6
        assert v["g32_mse"] >= v["g32"] - 1e-6  # an MSE-chosen clip never loses weight SQNR to the absmax
    overall = d["fig1"]["weights"]["overall"]
    assert set(overall) == {"per_channel", "g128", "g64", "g32", "g32_mse"}


def test_markdown_states_the_findings(quick):
    _, md, stdout = quick
    text = md.read_text()
    assert text.startswith("# The paper's analysis on the bundled digits DiT")
    assert "| W8A8 all-steps (baseline) |" in text and "![Fig. 2" in text
    assert "Which single step to calibrate on (Fig. 2)" in text and "Which single step" in stdout


def test_committed_markdown_is_what_the_committed_json_renders(tmp_path):
    """PAPER_FIGURES.md holds no hand edits: --from-json re-renders it from benchmarks/figures/paper_figures.json
    (image paths aside, which follow --markdown's folder), and no finding repeats its bold title in its text."""
    md = tmp_path / "PAPER_FIGURES.md"
    bench = os.path.join(ROOT, "benchmarks")
    r = subprocess.run([sys.executable, os.path.join(bench, "paper_figures.py"), "--from-json",
                        os.path.join(bench, "figures", "paper_figures.json"), "--markdown", str(md),
                        "--out-dir", os.path.join(bench, "figures")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    committed = open(os.path.join(bench, "PAPER_FIGURES.md")).read()
    rel = os.path.relpath(os.path.join(bench, "figures"), str(tmp_path))
    assert md.read_text().replace(rel + "/", "figures/") == committed
    for line in committed.splitlines():
        if line.startswith("- **"):
            title, text = line[4:].split("**", 1)
            assert title.rstrip(".") not in text, line

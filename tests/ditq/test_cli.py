"""The ``ditq`` command line: help everywhere, one-line errors, and quantize -> info -> generate on the
bundled model (tiny calibration: 2 labels, 2 steps)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ditq.cli import main

SUBCOMMANDS = ["demo", "quantize", "generate", "info"]


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("cmd", [[]] + [[c] for c in SUBCOMMANDS])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main(cmd + ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ditq")
    for c in ([] if cmd else SUBCOMMANDS):
        assert c in out


def test_no_command_prints_help(capsys):
    code, out, _ = run([], capsys)
    assert code == 2 and "usage: ditq" in out


def _one_line_error(code, err, *needles):
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_dir(tmp_path, capsys):
    missing = str(tmp_path / "nope")
    _one_line_error(*run(["info", missing], capsys)[::2], "no such directory")
    _one_line_error(*run(["generate", missing, "--class-labels", "1", "--out", str(tmp_path / "x.png")],
                         capsys)[::2], "no such directory")
    _one_line_error(*run(["quantize", missing, "--preset", "w8a8", "--out", str(tmp_path / "o")], capsys)[::2],
                    "no such model directory")


def test_not_a_diffusers_dir(tmp_path, capsys):
    _one_line_error(*run(["quantize", str(tmp_path), "--preset", "w8a8", "--out", str(tmp_path / "o")],
                         capsys)[::2], "not a diffusers pipeline directory")


def test_not_a_dit_pipeline(tmp_path, capsys):
    unet = tmp_path / "unet_pipe"
    unet.mkdir()
    (unet / "model_index.json").write_text(json.dumps(
        {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
         "scheduler": ["diffusers", "DDPMScheduler"]}))
    _one_line_error(*run(["quantize", str(unet), "--preset", "w4a8", "--out", str(tmp_path / "o")], capsys)[::2],
                    "no transformer component", "UNet")
    odd = tmp_path / "odd_pipe"
    odd.mkdir()
    (odd / "model_index.json").write_text(json.dumps({"_class_name": "X", "transformer": ["diffusers", "UNet2DModel"]}))
    _one_line_error(*run(["quantize", str(odd), "--preset", "w4a8", "--out", str(tmp_path / "o")], capsys)[::2],
                    "not a DiT-family transformer")


def test_info_on_a_non_checkpoint(tmp_path, capsys):
    _one_line_error(*run(["info", str(tmp_path)], capsys)[::2], "not a ditq checkpoint")


def test_bad_preset_and_bad_numbers(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["quantize", "bundled", "--preset", "w2a2", "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert "invalid choice: 'w2a2'" in capsys.readouterr().err
    _one_line_error(*run(["quantize", "bundled", "--preset", "w8a8", "--calib-steps", "0",
                          "--out", str(tmp_path / "o")], capsys)[::2], "--calib-steps must be at least 1")


def test_python_dash_m(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ditq", "info", str(tmp_path / "missing")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert r.stderr.strip() == f"ditq info: error: no such directory: {tmp_path / 'missing'}"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cli") / "w8a8")
    code = main(["quantize", "bundled", "--preset", "w8a8", "--calib-labels", "0", "1", "--calib-steps", "2",
                 "--quiet", "--out", out])
    assert code == 0
    return out


def test_quantize_writes_a_checkpoint_and_report(checkpoint, capsys):
    assert os.path.isfile(os.path.join(checkpoint, "model_index.json"))
    assert os.path.isfile(os.path.join(checkpoint, "transformer", "ditq_quant.json"))
    report = json.load(open(os.path.join(checkpoint, "ditq_report.json")))
    assert report["config"]["weight_bits"] == 8 and report["calibration"]["mode"] == "first-step"
    assert report["calibration"]["calls_per_run"] == [1]  # first-step calibration stops after one call
    assert report["bytes_after"] < report["bytes_before"]


def test_quantize_refuses_a_non_empty_out(checkpoint, capsys):
    _one_line_error(*run(["quantize", "bundled", "--preset", "w8a8", "--out", checkpoint], capsys)[::2],
                    "exists and is not empty")


def test_info(checkpoint, capsys):
    code, out, _ = run(["info", checkpoint], capsys)
    assert code == 0
    assert "8-bit weights (group per-channel)" in out and "DiTTransformer2DModel" in out
    code, out, _ = run(["info", checkpoint, "--json"], capsys)
    d = json.loads(out)
    header = json.load(open(os.path.join(checkpoint, "transformer", "ditq_quant.json")))
    assert len(d["layers"]) == len(header["layers"]) > 0
    assert {layer["bits"] for layer in d["layers"]} == {8}
    # int8 weight + fp32 per-channel scale + bias: every quantized layer is under half its bf16 size + epsilon
    for layer in d["layers"]:
        k, n = layer["in_features"], layer["out_features"]
        assert k * n <= layer["bytes"] < k * n + 16 * n
    weights = os.path.getsize(os.path.join(checkpoint, "transformer", "diffusion_pytorch_model.safetensors"))
    assert d["total_bytes"] < weights < d["total_bytes"] + 64 * 1024  # the file = tensors + its JSON header
    code, out, _ = run(["info", checkpoint, "--layers"], capsys)
    assert "transformer_blocks.0.attn1.to_q" in out


def test_generate(checkpoint, tmp_path, capsys):
    png = str(tmp_path / "g.png")
    code, out, _ = run(["generate", checkpoint, "--class-labels", "1", "2", "--steps", "2", "--quiet",
                        "--out", png], capsys)
    assert code == 0, out
    img = Image.open(png)
    assert img.size == (2 * 16 * 4, 16 * 4)  # two 16x16 digits side by side, scaled 4x
    assert len(np.unique(np.asarray(img))) > 2  # not a blank picture


def test_generate_bad_class_label(checkpoint, tmp_path, capsys):
    _one_line_error(*run(["generate", checkpoint, "--class-labels", "3", "10", "--steps", "1",
                          "--out", str(tmp_path / "x.png")], capsys)[::2], "class label 10 is out of range")
    _one_line_error(*run(["generate", checkpoint, "--class-labels", "-1", "--steps", "1",
                          "--out", str(tmp_path / "x.png")], capsys)[::2], "class label -1")

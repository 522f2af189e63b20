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
    assert code == 2  # an error the user can fix: argparse's code for a bad flag
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
    """``python -m ditq`` runs the CLI; building the parser (``--help``) and ``info`` never import diffusers,
    whose import alone took 5 of the 13 s ``ditq --help`` did."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "ditq", "info", str(tmp_path / "missing")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    imports = [ln.rsplit("|", 1)[-1].strip() for ln in r.stderr.splitlines() if ln.startswith("import time:")]
    assert "ditq.cli" in imports and "ditq.demo.run" in imports
    assert not [m for m in imports if m.split(".")[0] == "diffusers"]
    errors = [ln for ln in r.stderr.splitlines() if not ln.startswith("import time:")]
    assert errors == [f"ditq info: error: no such directory: {tmp_path / 'missing'}"]


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


def _lora_file(checkpoint, path, std=0.5):
    """A random LoRA (diffusers keys) for the checkpoint's attention outputs and MLPs, written as safetensors."""
    import torch
    from safetensors.torch import save_file

    import ditq
    from ditq.nn import QuantLinear
    transformer = ditq.load_quantized(checkpoint).transformer
    g, sd = torch.Generator().manual_seed(0), {}
    for name, m in transformer.named_modules():
        if isinstance(m, QuantLinear) and name.endswith(("to_out.0", "ff.net.0.proj", "ff.net.2")):
            sd[f"transformer.{name}.lora_A.weight"] = torch.randn(4, m.in_features, generator=g) / m.in_features ** 0.5
            sd[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, 4, generator=g) * std
    assert sd
    save_file(sd, str(path))
    return str(path)


def test_generate_with_a_lora(checkpoint, tmp_path, capsys):
    """--lora runs the adapter beside the quantized weights: the images change; --lora-scale 0 gives the images
    without it, pixel for pixel."""
    lora = _lora_file(checkpoint, tmp_path / "style.safetensors")
    pixels = {}
    for name, extra in (("plain", []), ("lora", ["--lora", lora]), ("off", ["--lora", lora, "--lora-scale", "0"])):
        png = str(tmp_path / f"{name}.png")
        code, out, _ = run(["generate", checkpoint, "--class-labels", "1", "2", "--steps", "2", "--quiet",
                            "--out", png] + extra, capsys)
        assert code == 0, out
        pixels[name] = np.asarray(Image.open(png)).astype(int)
        if extra:
            assert f"LoRA style.safetensors at scale {extra[-1] if len(extra) > 2 else 1}" in out, out
    assert np.array_equal(pixels["off"], pixels["plain"])
    assert np.abs(pixels["lora"] - pixels["plain"]).mean() > 1  # the adapter moved the picture
    # a file that also adapts a text encoder: its transformer part applies, one warning line says what was left out
    from safetensors.torch import load_file, save_file
    import torch
    both = str(tmp_path / "both.safetensors")
    save_file({**load_file(lora), "text_encoder.layer.q.lora_A.weight": torch.ones(2, 8),
               "text_encoder.layer.q.lora_B.weight": torch.ones(8, 2)}, both)
    code, out, err = run(["generate", checkpoint, "--class-labels", "1", "2", "--steps", "2", "--quiet",
                          "--out", str(tmp_path / "both.png"), "--lora", both], capsys)
    assert code == 0 and err.strip() == ("ditq generate: warning: 2 keys of this LoRA adapt text_encoder, not the "
                                         "transformer: left out (ditq adapts the transformer; load them into the "
                                         "text encoder with diffusers)"), err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "both.png")).astype(int), pixels["lora"])


def test_generate_lora_errors(checkpoint, tmp_path, capsys, monkeypatch):
    """A missing file, a scale without a file or not finite, a LoRA on a full-precision pipeline: refused before
    loading; a file of another model: one line naming the file."""
    png = str(tmp_path / "x.png")
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file
    import torch
    save_file({"transformer.blocks.0.qkv.lora_A.weight": torch.ones(2, 8),
               "transformer.blocks.0.qkv.lora_B.weight": torch.ones(8, 2)}, str(other))
    _one_line_error(*run(["generate", checkpoint, "--class-labels", "1", "--steps", "1", "--out", png,
                          "--lora", str(other)], capsys)[::2], f"--lora {other}: ValueError: 1 LoRA modules name no layer")
    assert not os.path.exists(png)
    with monkeypatch.context() as m:
        _fail_if_loaded(m)
        for extra, needle in ((["--lora", str(tmp_path / "missing.safetensors")], "no such file"),
                              (["--lora-scale", "0.5"], "--lora-scale needs --lora"),
                              (["--lora", str(other), "--lora-scale", "nan"], "--lora-scale must be a finite number")):
            _one_line_error(*run(["generate", checkpoint, "--class-labels", "1", "--out", png] + extra,
                                 capsys)[::2], needle)
        _one_line_error(*run(["generate", "bundled", "--class-labels", "1", "--out", png, "--lora", str(other)],
                             capsys)[::2], "is a full-precision pipeline", "--lora applies to a quantized one")


class _TextPipe:
    """A text-to-image pipeline's call: records its prompts and samples a random picture per prompt."""
    transformer = None

    def __call__(self, prompt=None, num_inference_steps=25, generator=None, output_type="pil", guidance_scale=4.5,
                 **kwargs):
        import types

        import torch
        self.calls.append(dict(prompt=prompt, steps=num_inference_steps, output_type=output_type))
        return types.SimpleNamespace(images=torch.rand(len(prompt), 3, 8, 8, generator=generator))


def test_generate_with_prompts(tmp_path, capsys, monkeypatch):
    """--prompt samples a text-to-image pipeline, one image per prompt; --class-labels there, or --prompt on a
    class-conditional one, or both at once, are refused."""
    import ditq.cli as cli
    pipe = _TextPipe()
    pipe.calls = []
    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: pipe)
    png = str(tmp_path / "t.png")
    code, out, _ = run(["generate", str(tmp_path), "--prompt", "a cat", "a dog on a bike", "--steps", "3",
                        "--out", png], capsys)
    assert code == 0 and "2 image(s), 2 prompt(s), 3 steps" in out, out
    assert pipe.calls == [dict(prompt=["a cat", "a dog on a bike"], steps=3, output_type="pt")]
    assert Image.open(png).size == (2 * 8 * 4, 8 * 4)
    _one_line_error(*run(["generate", str(tmp_path), "--class-labels", "1", "--out", png], capsys)[::2],
                    "_TextPipe does not take class labels; give --prompt instead")
    _one_line_error(*run(["generate", str(tmp_path), "--prompt", " ", "--out", png], capsys)[::2], "an empty prompt")
    monkeypatch.undo()
    _one_line_error(*run(["generate", "bundled", "--prompt", "a seven", "--out", png], capsys)[::2],
                    "does not take prompts; give --class-labels instead")
    with pytest.raises(SystemExit) as e:
        main(["generate", "bundled", "--prompt", "a", "--class-labels", "1", "--out", png])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_quiet_also_hides_the_hub_and_transformers_loading_bars(tmp_path, capsys, monkeypatch):
    """--quiet turns off the hub's progress bars before diffusers' logging imports transformers, whose own loading
    bars ("Loading weights" of a text encoder) start from that switch; without --quiet they stay."""
    import huggingface_hub.utils as hub

    import ditq.cli as cli
    pipe = _TextPipe()
    pipe.calls = []
    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: pipe)
    try:
        for quiet in (False, True):
            hub.enable_progress_bars()
            argv = ["generate", str(tmp_path), "--prompt", "a cat", "--out", str(tmp_path / "t.png")]
            assert run(argv + (["--quiet"] if quiet else []), capsys)[0] == 0
            assert hub.are_progress_bars_disabled() == quiet
    finally:
        hub.enable_progress_bars()


# ---- bad input: --out, corrupt checkpoints, NaN images, layers that cannot be quantized -------------------

def _fail_if_loaded(monkeypatch):
    """Loading or sampling anything fails the test: the checks under test must come first."""
    import ditq
    import ditq.cli as cli

    def boom(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")
    monkeypatch.setattr(ditq, "load_quantized", boom)
    monkeypatch.setattr(cli, "load_pipeline", boom)


@pytest.mark.parametrize("out,needle", [("x.txt", "give an image file name ending in one of"),
                                        ("x", "give an image file name ending in one of"),
                                        ("missing_dir/x.png", "does not exist"),
                                        ("a_dir.png", "is a directory")])
def test_generate_checks_out_before_loading(checkpoint, tmp_path, capsys, monkeypatch, out, needle):
    (tmp_path / "a_dir.png").mkdir()
    _fail_if_loaded(monkeypatch)
    _one_line_error(*run(["generate", checkpoint, "--class-labels", "1", "--steps", "1",
                          "--out", str(tmp_path / out)], capsys)[::2], "--out", needle)
    assert not os.path.exists(tmp_path / "missing_dir")


def test_generate_out_not_writable(checkpoint, tmp_path, capsys, monkeypatch):
    # Permission bits do not bind root (these tests may run as root), so the access check itself is faked.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if os.path.samefile(p, tmp_path) else
                        real_access(p, mode))
    _fail_if_loaded(monkeypatch)
    _one_line_error(*run(["generate", checkpoint, "--class-labels", "1", "--out", str(tmp_path / "x.png")],
                         capsys)[::2], "is not writable")


class _NaNPipe:
    """A pipeline whose sampler returns NaN images (what NaN weight scales give)."""
    transformer = type("T", (), {"config": type("C", (), {"num_embeds_ada_norm": 10})()})()

    def __call__(self, class_labels, **kw):
        import torch
        images = torch.rand(len(class_labels), 1, 16, 16)
        images[0, 0, 3, 4] = float("nan")
        return type("Out", (), {"images": images})()


def test_generate_refuses_nan_images(tmp_path, capsys, monkeypatch):
    import ditq.cli as cli
    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: _NaNPipe())
    png = tmp_path / "x.png"
    _one_line_error(*run(["generate", str(tmp_path), "--class-labels", "1", "2", "--out", str(png)],
                         capsys)[::2], "1 NaN / inf values of 512", "nothing written")
    assert not png.exists()


def _copy(checkpoint, tmp_path):
    import shutil
    path = str(tmp_path / "ckpt")
    shutil.copytree(checkpoint, path)
    return path, os.path.join(path, "transformer", "diffusion_pytorch_model.safetensors")


def test_generate_on_nan_scales_fails_and_writes_nothing(checkpoint, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    path, weights = _copy(checkpoint, tmp_path)
    sd = load_file(weights)
    name = next(k for k in sd if k.endswith(".scales"))
    sd[name][:] = float("nan")
    save_file(sd, weights)
    png = tmp_path / "x.png"
    code, _, err = run(["generate", path, "--class-labels", "1", "--steps", "1", "--quiet", "--out", str(png)],
                       capsys)
    _one_line_error(code, err)
    assert "scales" in err or "NaN" in err, err
    assert not png.exists()
    _one_line_error(*run(["info", path], capsys)[::2], weights, f"layer {name.rsplit('.', 1)[0]!r} tensor 'scales'",
                    "not positive finite")


@pytest.mark.parametrize("cut", [0.5, 0.99])
def test_info_reports_a_truncated_checkpoint(checkpoint, tmp_path, capsys, cut):
    path, weights = _copy(checkpoint, tmp_path)
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[:int(len(data) * cut)])
    _one_line_error(*run(["info", path], capsys)[::2], weights, "corrupt")
    _one_line_error(*run(["generate", path, "--class-labels", "1", "--out", str(tmp_path / "x.png")],
                         capsys)[::2], weights, "corrupt")


def test_info_reports_a_missing_tensor_and_a_bad_header(checkpoint, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    path, weights = _copy(checkpoint, tmp_path)
    sd = load_file(weights)
    name = next(k for k in sd if k.endswith(".act_scale"))
    del sd[name]
    save_file(sd, weights)
    _one_line_error(*run(["info", path], capsys)[::2], weights, repr(name.rsplit(".", 1)[0]), "'act_scale'")
    header = os.path.join(path, "transformer", "ditq_quant.json")
    h = json.load(open(header))
    del h["quant_config"]
    json.dump(h, open(header, "w"))
    _one_line_error(*run(["info", path], capsys)[::2], header, "'quant_config' is missing")
    open(header, "w").write("{")
    _one_line_error(*run(["info", path], capsys)[::2], header, "not readable JSON")


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory):
    """A DiT pipeline whose attention and adaLN linears take K = 64 inputs: int4 groups of 128 fit only the
    layers with K = 256 (the MLP's second linear and the timestep embedder's first)."""
    from tiny_models import tiny_dit_pipeline
    path = str(tmp_path_factory.mktemp("tiny") / "pipe")
    tiny_dit_pipeline().save_pretrained(path)
    return path


def test_quantize_warns_about_layers_it_could_not_quantize(tiny_pipeline_dir, tmp_path, capsys):
    out = str(tmp_path / "o")
    code, stdout, err = run(["quantize", tiny_pipeline_dir, "--preset", "w4a8", "--calib-labels", "1", "2",
                             "--calib-steps", "2", "--quiet", "--out", out], capsys)
    assert code == 0, err
    warnings = [ln for ln in err.splitlines() if ln.startswith("ditq quantize: warning:")]
    assert len(warnings) == 1 and "UnquantizedLayersWarning" not in err, err  # the library's own is not repeated
    report = json.load(open(os.path.join(out, "ditq_report.json")))
    failed = [why for why in report["skipped"].values() if why.startswith("group_size 128 does not divide K")]
    assert failed and report["layers"]
    assert f"{len(failed)} of {len(failed) + len(report['layers'])} linear layers could not be quantized" \
        in warnings[0], warnings[0]
    assert "group_size 128 does not divide K = 64" in warnings[0]
    assert f"quantized {len(report['layers'])}" in warnings[0]


def test_quantize_fails_when_no_layer_fits(tiny_pipeline_dir, tmp_path, capsys, monkeypatch):
    """Every linear refused (as on a model none of whose K the group size divides): exit 2, nothing written."""
    import ditq.convert as convert
    real = convert.select_layers

    def nothing_fits(transformer, cfg):
        cands, skipped = real(transformer, cfg)
        skipped.update({n: f"group_size 128 does not divide K = {m.in_features + 1}" for n, m in cands.items()})
        return {}, skipped
    monkeypatch.setattr(convert, "select_layers", nothing_fits)
    out = tmp_path / "o"
    _one_line_error(*run(["quantize", tiny_pipeline_dir, "--preset", "w4a8", "--calib-labels", "1",
                          "--calib-steps", "1", "--quiet", "--out", str(out)], capsys)[::2],
                    "no quantizable layer", "group_size 128 does not divide")
    assert not out.exists() or not os.listdir(out)


def test_quantize_refuses_a_report_without_layers(tiny_pipeline_dir, tmp_path, capsys, monkeypatch):
    """Layers can also drop out after selection (calibration never reached them): a report with no quantized
    layer is an error, after the warning that says why."""
    import ditq
    from ditq.report import QuantReport

    def quantize(pipe, cfg, calib_inputs=None, component="transformer"):
        return QuantReport(config=cfg.to_dict(), backend="torch",
                           skipped={"a": "never ran during calibration (no activation range)"})
    monkeypatch.setattr(ditq, "quantize", quantize)
    out = tmp_path / "o"
    code, _, err = run(["quantize", tiny_pipeline_dir, "--preset", "w8a8", "--calib-labels", "1", "--quiet",
                        "--out", str(out)], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 2 and "Traceback" not in err, err
    assert "1 of 1 linear layers could not be quantized" in lines[0] and "never ran during calibration" in lines[0]
    assert lines[1] == "ditq quantize: error: no layer was quantized (see the warning above); nothing written"
    assert not out.exists() or not os.listdir(out)


def test_quantize_with_the_calibration_policy_and_fusion(tiny_pipeline_dir, tmp_path, capsys):
    out = str(tmp_path / "o")
    code, stdout, err = run(["quantize", tiny_pipeline_dir, "--preset", "w8a8", "--calib-labels", "1", "2",
                             "--calib-steps", "3", "--calibration", "all-steps", "--timestep-groups", "2",
                             "--smooth-alpha", "0.5", "--fuse", "--quiet", "--out", out], capsys)
    assert code == 0, err
    report = json.load(open(os.path.join(out, "ditq_report.json")))
    assert report["config"]["timestep_groups"] == 2 and report["config"]["fuse"] is True
    assert report["fusion"]["projections"], report["fusion"]
    # info shows what shaped the checkpoint, and each grouped layer's scales (not one of them)
    code, text, _ = run(["info", out, "--layers"], capsys)
    assert code == 0
    assert "calibration all-steps, backend auto, up to 2 timestep groups, smoothing alpha 0.5, fused" in text
    header = json.load(open(os.path.join(out, "transformer", "ditq_quant.json")))
    name, spec = next((n, s) for n, s in header["layers"].items() if s.get("act_scales"))
    row = next(ln for ln in text.splitlines() if ln.startswith(name + " "))
    assert f"{min(spec['act_scales']):.3g}-{max(spec['act_scales']):.3g}" in row, row
    code, _, err = run(["quantize", tiny_pipeline_dir, "--preset", "w8a8", "--timestep-groups", "2", "--quiet",
                        "--out", str(tmp_path / "p")], capsys)
    assert code == 2 and "--timestep-groups > 1 needs --act-scheme static" in err and len(err.strip().splitlines()) == 1


def test_quantize_with_a_weight_method(tiny_pipeline_dir, tmp_path, capsys):
    out = str(tmp_path / "o")
    code, _, err = run(["quantize", tiny_pipeline_dir, "--preset", "w4a8", "--group-size", "32", "--calib-labels",
                        "1", "2", "--calib-steps", "2", "--weight-method", "gptq", "--quiet", "--out", out], capsys)
    assert code == 0, err
    report = json.load(open(os.path.join(out, "ditq_report.json")))
    assert report["config"]["weight_method"] == "gptq"
    assert all(lr["weight_method"] == "gptq" and lr["layer_output_sqnr"] > lr["layer_output_sqnr_rtn"]
               for lr in report["layers"])
    with pytest.raises(SystemExit) as e:  # argparse refuses an unknown method before any work
        main(["quantize", tiny_pipeline_dir, "--preset", "w4a8", "--weight-method", "awq", "--out", str(tmp_path)])
    assert e.value.code == 2 and "invalid choice: 'awq'" in capsys.readouterr().err


def test_quantize_with_integer_group_scales(tiny_pipeline_dir, tmp_path, capsys):
    out = str(tmp_path / "o")
    code, _, err = run(["quantize", tiny_pipeline_dir, "--preset", "w4a8", "--group-size", "32", "--calib-labels",
                        "1", "2", "--calib-steps", "2", "--group-scales", "int", "--quiet", "--out", out], capsys)
    assert code == 0, err
    assert json.load(open(os.path.join(out, "ditq_report.json")))["config"]["group_scales"] == "int"
    code, info, err = run(["info", out], capsys)
    assert code == 0 and "int group scales" in info, info + err
    code, _, err = run(["quantize", tiny_pipeline_dir, "--preset", "w8a8", "--group-scales", "int", "--quiet",
                        "--out", str(tmp_path / "p")], capsys)
    assert code == 2 and "integer group scales are for 4-bit weights" in err and len(err.strip().splitlines()) == 1


# ---- mistakes caught before any work: devices, backends, --out, flags that would be ignored ------------------

def _no_gpu(monkeypatch):
    """This machine as one without a GPU, whatever it has (the GPU runs of the suite included)."""
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _fail_if_anything_runs(monkeypatch):
    import ditq.demo.run as demo_run
    _fail_if_loaded(monkeypatch)

    def boom(*a, **k):
        raise AssertionError("the demo ran before its flags were checked")
    monkeypatch.setattr(demo_run, "run_demo", boom)


def _argv(cmd, tmp_path, *extra):
    return {"quantize": ["quantize", "bundled", "--preset", "w8a8", "--out", str(tmp_path / "o")],
            "generate": ["generate", "bundled", "--class-labels", "1", "--out", str(tmp_path / "x.png")],
            "demo": ["demo", "--out", str(tmp_path / "d")]}[cmd] + list(extra)


@pytest.mark.parametrize("cmd", ["quantize", "generate", "demo"])
@pytest.mark.parametrize("device, needle", [("cuda:7", "--device 'cuda:7': no CUDA GPU is visible"),
                                            ("cuda", "--device 'cuda': no CUDA GPU is visible"),
                                            ("gpu", "--device 'gpu' is not a torch device"),
                                            ("mps", "--device 'mps': this machine has no mps device"),
                                            ("xpu", "--device 'xpu': this machine has no xpu device")],
                         ids=["cuda7", "cuda", "not-a-device", "mps", "xpu"])
def test_a_device_this_machine_lacks_is_refused_before_loading(cmd, device, needle, tmp_path, capsys, monkeypatch):
    import torch
    _no_gpu(monkeypatch)
    monkeypatch.setattr(torch.mps, "is_available", lambda: False)  # the same answer on a Mac
    monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    _fail_if_anything_runs(monkeypatch)
    _one_line_error(*run(_argv(cmd, tmp_path, "--device", device), capsys)[::2], needle)


def test_a_cuda_index_past_the_visible_gpus_is_refused(tmp_path, capsys, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    _fail_if_anything_runs(monkeypatch)
    _one_line_error(*run(_argv("quantize", tmp_path, "--device", "cuda:2"), capsys)[::2],
                    "--device 'cuda:2': only 2 CUDA device(s) are visible (cuda:0 to cuda:1)")


@pytest.mark.parametrize("cmd", ["quantize", "generate", "demo"])
def test_a_backend_that_cannot_run_here_is_refused_before_loading(cmd, tmp_path, capsys, monkeypatch):
    _no_gpu(monkeypatch)
    _fail_if_anything_runs(monkeypatch)
    _one_line_error(*run(_argv(cmd, tmp_path, "--backend", "cuda"), capsys)[::2],
                    "--backend cuda cannot run on cpu", "available there: torch")


@pytest.mark.parametrize("cmd", ["quantize", "demo"])
@pytest.mark.parametrize("out, needle", [("a_file", "exists and is not a directory"),
                                         ("a_file/sub", "is a file, not a directory"),
                                         ("", "--out is empty")], ids=["file", "under-a-file", "empty"])
def test_an_out_that_cannot_be_a_directory_is_refused_before_loading(cmd, out, needle, tmp_path, capsys,
                                                                      monkeypatch):
    (tmp_path / "a_file").write_text("x")
    _fail_if_anything_runs(monkeypatch)
    argv = _argv(cmd, tmp_path)
    argv[argv.index("--out") + 1] = str(tmp_path / out) if out else ""
    _one_line_error(*run(argv, capsys)[::2], needle)


def test_quantize_out_in_a_read_only_directory(tmp_path, capsys, monkeypatch):
    # Permission bits do not bind root (these tests may run as root), so the access check itself is faked.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if os.path.samefile(p, tmp_path) else
                        real_access(p, mode))
    _fail_if_anything_runs(monkeypatch)
    _one_line_error(*run(_argv("quantize", tmp_path), capsys)[::2], f"directory {tmp_path} is not writable")


def test_flags_that_would_be_ignored_are_refused(tmp_path, capsys, monkeypatch):
    _fail_if_anything_runs(monkeypatch)
    _one_line_error(*run(_argv("generate", tmp_path, "--backend", "torch"), capsys)[::2],
                    "--backend torch: bundled is a full-precision pipeline, not a ditq checkpoint")
    _one_line_error(*run(_argv("quantize", tmp_path, "--group-size", "32"), capsys)[::2],
                    "--group-size applies to --preset w4a8")
    _one_line_error(*run(_argv("generate", tmp_path, "--guidance-scale", "nan"), capsys)[::2],
                    "--guidance-scale must be a finite number")


@pytest.mark.parametrize("flags, line", [
    (["--timestep-groups", "0"], "--timestep-groups must be a positive int, got 0"),
    (["--timestep-groups", "2"], "--timestep-groups > 1 needs --act-scheme static and more than one calibration "
                                 "step (--calibration all-steps)"),
    (["--smooth-alpha", "2"], "--smooth-alpha must be a number in (0, 1], got 2.0"),
    (["--smooth-alpha", "0.5", "--act-scheme", "dynamic"],
     "--smooth-alpha needs calibration data: use it with --act-scheme static"),
    (["--max-dynamic-layers", "-1"], "--max-dynamic-layers must be a non-negative int, got -1"),
], ids=["groups-0", "groups-first-step", "alpha-2", "alpha-dynamic", "dynamic-layers"])
def test_a_setting_quantconfig_refuses_names_the_flag(flags, line, tmp_path, capsys, monkeypatch):
    """QuantConfig's messages name its fields (group_size, act_scheme='static'); the command line's name the flags
    the user typed. Every flag that feeds QuantConfig and takes a free value is here; the others take argparse
    choices (--group-size: the sizes the kernels are built for) or are switches (test_choice_flags_name_themselves)."""
    _fail_if_anything_runs(monkeypatch)
    code, _, err = run(["quantize", "bundled", "--preset", "w4a8", "--out", str(tmp_path / "o")] + flags, capsys)
    _one_line_error(code, err, f"ditq quantize: error: {line}")
    assert err.strip() == f"ditq quantize: error: {line}"


@pytest.mark.parametrize("flag", ["--preset", "--calibration", "--act-scheme", "--group-size", "--weight-method",
                                  "--group-scales", "--act-estimator", "--backend"])
def test_choice_flags_name_themselves(flag, tmp_path, capsys, monkeypatch):
    _fail_if_anything_runs(monkeypatch)
    argv = ["quantize", "bundled", "--preset", "w4a8", "--out", str(tmp_path / "o"), flag, "48"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert f"argument {flag}: invalid choice: '48'" in capsys.readouterr().err.replace("invalid choice: 48",
                                                                                        "invalid choice: '48'")


@pytest.mark.parametrize("takes, flag, needle", [
    ("class_labels", ["--calib-prompts", "a cat"], "--calib-prompts: T is class-conditional"),
    ("prompt", ["--calib-labels", "1"], "--calib-labels: T is text-to-image")], ids=["prompts", "labels"])
def test_calibration_inputs_of_the_other_kind_are_refused(takes, flag, needle, tmp_path, capsys, monkeypatch):
    """A loaded pipeline whose calls take the other kind of input: refused before calibrating it."""
    import ditq.cli as cli
    pipe_cls = type("T", (), {"transformer": _NaNPipe.transformer, "__call__": _call_taking(takes)})
    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: pipe_cls())
    _one_line_error(*run(_argv("quantize", tmp_path, *flag), capsys)[::2], needle)
    assert not (tmp_path / "o").exists()


def _call_taking(takes):
    if takes == "prompt":
        def call(self, prompt=None, num_inference_steps=25):
            raise AssertionError("calibrated")
    else:
        def call(self, class_labels=None, num_inference_steps=25):
            raise AssertionError("calibrated")
    return call


def test_generate_on_a_bare_transformer_checkpoint(tmp_path, capsys):
    import ditq
    from tiny_models import tiny_dit
    t = tiny_dit()
    ditq.quantize(t, ditq.QuantConfig(act_scheme="dynamic", backend="torch", progress=False))
    ditq.save_quantized(t, str(tmp_path / "t"))
    _one_line_error(*run(["generate", str(tmp_path / "t"), "--class-labels", "1", "--out", str(tmp_path / "x.png")],
                         capsys)[::2], "a quantized transformer without its pipeline (no model_index.json)")


def test_an_unexpected_failure_exits_1_and_points_to_debug(tmp_path, capsys, monkeypatch):
    import ditq.cli as cli

    def broken(args):
        raise RuntimeError("an internal failure\nsecond line")
    monkeypatch.setattr(cli, "cmd_info", broken)
    code, _, err = run(["info", str(tmp_path)], capsys)
    assert code == 1 and err.strip() == ("ditq info: error: RuntimeError: an internal failure (unexpected: rerun "
                                         "with --debug for the traceback)")
    with pytest.raises(RuntimeError, match="an internal failure"):
        main(["--debug", "info", str(tmp_path)])


def test_version(capsys):
    import ditq
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"ditq {ditq.__version__}"


def _call_taking_prompt_and_kwargs(self, prompt=None, num_inference_steps=25, **kwargs):
    raise AssertionError("sampled")  # as PixArt's pipelines: labels would vanish into **kwargs


@pytest.mark.parametrize("call", [_call_taking("prompt"), _call_taking_prompt_and_kwargs], ids=["prompt", "kwargs"])
def test_generate_refuses_a_pipeline_without_class_labels(call, tmp_path, capsys, monkeypatch):
    import ditq.cli as cli
    pipe_cls = type("TextPipe", (), {"transformer": _NaNPipe.transformer, "__call__": call})
    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: pipe_cls())
    _one_line_error(*run(["generate", str(tmp_path), "--class-labels", "1", "--out", str(tmp_path / "x.png")],
                         capsys)[::2], "TextPipe does not take class labels")
    assert not (tmp_path / "x.png").exists()



def test_a_failure_inside_loading_is_not_blamed_on_the_checkpoint(checkpoint, tmp_path, capsys, monkeypatch):
    import ditq

    def broken(*a, **k):
        raise RuntimeError("a bug")
    monkeypatch.setattr(ditq, "load_quantized", broken)
    code, _, err = run(["generate", checkpoint, "--class-labels", "1", "--out", str(tmp_path / "x.png")], capsys)
    assert code == 1 and err.strip() == ("ditq generate: error: RuntimeError: a bug (unexpected: rerun with --debug "
                                         "for the traceback)")

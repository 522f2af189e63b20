"""``ditq demo``: quantize the bundled digits DiT several ways and compare the samples with full precision.

Every setting samples the *same* classes from the *same* initial noise (one seeded generator per setting), so the
differences between rows are what quantization did. Settings (names used by ``--settings``):

================= ==============================================================================
``fp32``          the full-precision model; always runs first, as the reference for the others
``w8a8``          int8 weights per output channel, static int8 activations, first-step calibration (the paper)
``w4a8``          int4 weights in groups of 128, static int8 activations, first-step calibration (the paper)
``w8a8-all``      as ``w8a8`` but the activation scales come from every sampling step (max over all steps)
``w4a8-all``      as ``w4a8`` with all-steps calibration
``w8a8-best``     the best static policy measured: every step recorded, max-absmax ranges, one static scale per
                  timestep group (up to 4 groups of adjacent steps), SmoothQuant (alpha 0.5) folded into adaLN /
                  to_v at each site where it lowers the estimated activation + weight error
``w4a8-best``     the same policy with int4 weights in groups of 32 rounded by GPTQ against each layer's
                  calibration inputs (``weight_method="gptq"``; smoothing is then rarely kept: it moves range into
                  the 4-bit weights)
``w8a8-dyn``      int8 weights, per-token int8 activation scales computed at run time (no calibration)
``w4a8-dyn``      int4 weights in groups of 128, per-token activations
================= ==============================================================================

Calibration runs use class labels 0..9 with their own seed (not the evaluation seed), the same step count and
guidance as the evaluation.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

# The static policy of the "-best" rows (see the table above and ditq.QuantConfig). Ranges stay max-absmax: on the
# bundled models, clipping chosen by activation MSE (act_estimator="auto"/"mse") lowered the activation error by
# ~4 dB per layer yet cost image quality (old 6-block model, W8A8, 10 steps, 40 samples: auto 38.4 dB image SQNR /
# 97.5 % accuracy vs max 41.0 dB / 100 %): a clipped outlier costs the output more than its squared error says.
BEST_POLICY = dict(calibration="all-steps", act_estimator="max", timestep_groups=4, smooth_alpha=0.5)
SETTINGS: Dict[str, Optional[dict]] = {
    "fp32": None,
    "w8a8": dict(preset="w8a8", calibration="first-step"),
    "w4a8": dict(preset="w4a8", calibration="first-step"),
    "w8a8-all": dict(preset="w8a8", calibration="all-steps"),
    "w4a8-all": dict(preset="w4a8", calibration="all-steps"),
    "w8a8-best": dict(preset="w8a8", **BEST_POLICY),
    "w4a8-best": dict(preset="w4a8", group_size=32, weight_method="gptq", **BEST_POLICY),
    "w8a8-dyn": dict(preset="w8a8", act_scheme="dynamic", calibration="first-step"),
    "w4a8-dyn": dict(preset="w4a8", act_scheme="dynamic", calibration="first-step"),
}

# What `ditq demo` runs without --settings: the paper's first-step calibration against ditq's policy, in both
# formats (the other rows, `--settings all`, add all-steps max ranges and per-token scales and take ~3x longer).
DEFAULT_SETTINGS = ("fp32", "w8a8", "w4a8", "w8a8-best", "w4a8-best")


def _calibration_label(spec: Optional[dict]) -> str:
    if spec is None:
        return "-"
    if spec.get("act_scheme") == "dynamic":
        return "dynamic"
    if spec.get("act_estimator", "max") != "max" or spec.get("timestep_groups", 1) > 1:
        return "policy"
    return spec["calibration"]
DEFAULT_STEPS = 10
DEFAULT_SAMPLES_PER_CLASS = 4
# Measured on the shared 2-core CPU box (torch reference backend): 853 s of CPU time for all nine settings (21 min
# wall while other jobs kept the load average at 5-12); the five DEFAULT_SETTINGS plus one more row, 176 s of CPU
# time on one thread.
# Guidance 1.5 is the bundled model's measured sweet spot (MODEL_CARD.md: 100% accuracy, Fréchet 50.2 at 25
# steps); higher guidance makes samples within a class alike and the Fréchet distance climb (124.4 at 2.0).
DEFAULT_GUIDANCE = 1.5
CALIB_SEED = 1234  # differs from every evaluation seed a user is likely to pick: calibration is not evaluation
CELL = 64          # pixels per image in the PNG grid (16x16 digits scaled by 4, nearest neighbour)
GAP = 4
LABEL_WIDTH = 220  # left strip: each row's setting, image SQNR and accuracy


class DemoError(ValueError):
    """A demo option ditq cannot honour; the message says which and what is accepted."""


@dataclass
class Row:
    setting: str
    calibration: str
    backend: str
    image_sqnr_db: Optional[float]
    transformer_sqnr_db: Optional[float]
    accuracy: float
    frechet_real: float
    frechet_fp32: Optional[float]
    transformer_bytes: int
    seconds_per_step: float


def check_settings(settings: Optional[Sequence[str]]) -> List[str]:
    """The settings to run, ``fp32`` first (the reference), each once. None: :data:`DEFAULT_SETTINGS`; ``"all"``
    stands for every setting."""
    if settings is None:
        return list(DEFAULT_SETTINGS)
    settings = list(settings)
    if "all" in settings:
        settings = list(SETTINGS)
    for s in settings:
        if s not in SETTINGS:
            raise DemoError(f"unknown demo setting {s!r}; choose from {', '.join(SETTINGS)}")
    return ["fp32"] + [s for s in dict.fromkeys(settings) if s != "fp32"]


def default_device(backend: str) -> torch.device:
    """The GPU when there is one (unless the torch reference backend was asked for on purpose), else CPU."""
    if torch.cuda.is_available() and backend != "torch" and backend != "cuda-emulated":
        return torch.device("cuda")
    return torch.device("cpu")


def grid_size(rows: int, columns: int) -> tuple:
    """(width, height) in pixels of the PNG :func:`save_grid` writes."""
    return LABEL_WIDTH + columns * (CELL + GAP) + GAP, rows * (CELL + GAP) + GAP


def _font(size: int):
    """matplotlib's bundled DejaVu Sans (readable at any size), else PIL's built-in bitmap font."""
    from PIL import ImageFont
    try:
        import matplotlib
        return ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf"), size)
    except Exception:
        return ImageFont.load_default()


def save_grid(images: Dict[str, torch.Tensor], path: str, labels: Optional[Dict[str, List[str]]] = None) -> None:
    """One row per setting, one column per image; images (C, 1, H, W) in [0, 1], upscaled (nearest) to CELL px.

    ``labels``: per setting, the lines written in the row's left strip (default: its name)."""
    from PIL import Image, ImageDraw

    names = list(images)
    columns = max(len(v) for v in images.values())
    width, height = grid_size(len(names), columns)
    canvas = Image.new("L", (width, height), color=96)  # grey gaps tell the black digit backgrounds apart
    draw = ImageDraw.Draw(canvas)
    big, small = _font(16), _font(13)
    for r, name in enumerate(names):
        y = GAP + r * (CELL + GAP)
        lines = (labels or {}).get(name) or [name]
        draw.text((6, y + 4), lines[0], fill=255, font=big)
        for i, line in enumerate(lines[1:]):
            draw.text((6, y + 26 + 17 * i), line, fill=220, font=small)
        for c, img in enumerate(images[name]):
            arr = (img[0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
            tile = Image.fromarray(arr, mode="L").resize((CELL, CELL), Image.NEAREST)
            canvas.paste(tile, (LABEL_WIDTH + GAP + c * (CELL + GAP), y))
    canvas.save(path)


def _sqnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    from ..quant.reference import sqnr
    return sqnr(ref, x)


def _finite(v):
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else ("-inf" if v < 0 else "nan")
    return v


def format_table(rows: List[Row]) -> str:
    def num(v, fmt):
        if v is None:
            return "-"
        if isinstance(v, float) and math.isinf(v):
            return "inf"
        return format(v, fmt)

    head = (f"{'setting':<10} {'calibration':<11} {'backend':<8} {'img SQNR':>8} {'net SQNR':>8} {'acc %':>6} "
            f"{'FD real':>8} {'FD fp32':>8} {'MB':>6} {'s/step':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.setting:<10} {r.calibration:<11} {r.backend:<8} {num(r.image_sqnr_db, '.1f'):>8} "
                     f"{num(r.transformer_sqnr_db, '.1f'):>8} {100 * r.accuracy:>6.1f} "
                     f"{num(r.frechet_real, '.2f'):>8} {num(r.frechet_fp32, '.2f'):>8} "
                     f"{r.transformer_bytes / 1e6:>6.2f} {r.seconds_per_step:>7.3f}")
    return "\n".join(lines)


def run_demo(out: str, steps: int = DEFAULT_STEPS, samples_per_class: int = DEFAULT_SAMPLES_PER_CLASS,
             backend: str = "auto", settings: Optional[Sequence[str]] = None, seed: int = 0,
             guidance_scale: float = DEFAULT_GUIDANCE, device=None, progress: bool = True,
             load_pipeline: Optional[Callable[[], object]] = None, print_fn=print) -> dict:
    """Run the demo, write ``demo.png`` and ``demo.json`` into ``out``; returns the JSON's dict.

    ``load_pipeline``: a function returning a fresh full-precision pipeline (default: the bundled digits DiT);
    each setting gets its own copy, since quantization works in place.
    """
    import ditq
    from . import load_bundled_pipeline, metrics
    from .data import NUM_CLASSES, load_digits_split

    if not isinstance(steps, int) or steps < 1:
        raise DemoError(f"--steps must be a positive integer, got {steps!r}")
    if not isinstance(samples_per_class, int) or samples_per_class < 1:
        raise DemoError(f"--samples-per-class must be a positive integer, got {samples_per_class!r}")
    names = check_settings(settings)
    ditq.QuantConfig(backend=backend)  # validates the backend name before any work
    device = torch.device(device) if device is not None else default_device(backend)
    load_pipeline = load_pipeline or load_bundled_pipeline
    os.makedirs(out, exist_ok=True)

    labels = torch.arange(NUM_CLASSES).repeat(samples_per_class)  # 0..9, 0..9, ...: the first 10 fill the grid
    held, _ = load_digits_split("held_out")
    train, _ = load_digits_split("train")
    held_feats = metrics.features((held + 1) / 2)
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[: len(labels)]
    real_floor = metrics.frechet_distance(metrics.features((train[pick] + 1) / 2), held_feats)

    from diffusers.utils import logging as dlogging
    bars_were_on = dlogging.is_progress_bar_enabled()
    dlogging.disable_progress_bar()  # "Loading pipeline components" once per setting is noise here
    try:
        return _run(out, names, labels, steps, samples_per_class, backend, seed, guidance_scale, device, progress,
                    load_pipeline, held_feats, real_floor, print_fn)
    finally:
        if bars_were_on:
            dlogging.enable_progress_bar()


def _run(out, names, labels, steps, samples_per_class, backend, seed, guidance_scale, device, progress,
         load_pipeline, held_feats, real_floor, print_fn) -> dict:
    from tqdm.auto import tqdm

    import ditq
    from . import load_bundled_pipeline, metrics
    from ..convert import module_bytes
    from .data import NUM_CLASSES

    start = time.perf_counter()
    rows: List[Row] = []
    reports: Dict[str, dict] = {}
    grid: Dict[str, torch.Tensor] = {}
    fp_images = fp_feats = None
    fp_noise = None
    bar = tqdm(names, desc="ditq demo", unit="setting", disable=not progress)
    for name in bar:
        bar.set_postfix(setting=name)
        pipe = load_pipeline().to(device)
        pipe.set_progress_bar_config(disable=not progress, leave=False, desc=f"{name} sampling")
        spec = SETTINGS[name]
        report = None
        if spec is not None:
            cfg = ditq.QuantConfig.preset(spec["preset"], backend=backend, progress=progress,
                                          **{k: v for k, v in spec.items() if k != "preset"})
            calib = dict(class_labels=list(range(NUM_CLASSES)), num_inference_steps=steps,
                         guidance_scale=guidance_scale,
                         generator=torch.Generator(device.type).manual_seed(CALIB_SEED))
            report = ditq.quantize(pipe, cfg, calib_inputs=calib)
            reports[name] = report.to_dict()
        gen = torch.Generator(device.type).manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        images = pipe(labels.to(device), guidance_scale=guidance_scale, num_inference_steps=steps,
                      generator=gen, output_type="pt").images.float().cpu()
        if device.type == "cuda":
            torch.cuda.synchronize()
        per_step = (time.perf_counter() - t0) / steps
        feats = metrics.features(images)
        if fp_images is None:
            fp_images, fp_feats = images, feats
            # The metric's own noise: full precision from other noise (seed + 1) vs the reference samples. A
            # quantized row whose Fréchet-to-fp32 is below this is indistinguishable from fp32 at this count.
            other = pipe(labels.to(device), guidance_scale=guidance_scale, num_inference_steps=steps,
                         generator=torch.Generator(device.type).manual_seed(seed + 1),
                         output_type="pt").images.float().cpu()
            fp_noise = metrics.frechet_distance(metrics.features(other), fp_feats)
        rows.append(Row(
            setting=name,
            calibration=_calibration_label(spec),
            backend=f"{device.type}-fp32" if report is None else report.backend,
            image_sqnr_db=None if spec is None else _sqnr(fp_images, images),
            transformer_sqnr_db=None if report is None else report.output_sqnr,
            accuracy=metrics.classifier_accuracy(images, labels),
            frechet_real=metrics.frechet_distance(feats, held_feats),
            frechet_fp32=None if spec is None else metrics.frechet_distance(feats, fp_feats),
            transformer_bytes=module_bytes(pipe.transformer) if report is None else report.bytes_after,
            seconds_per_step=per_step))
        grid[name] = images[:NUM_CLASSES]
        del pipe

    wall = time.perf_counter() - start
    png = os.path.join(out, "demo.png")
    row_labels = {r.setting: [r.setting, ("reference" if r.image_sqnr_db is None else
                                          f"image SQNR {r.image_sqnr_db:.1f} dB"),
                              f"accuracy {100 * r.accuracy:.1f}%"] for r in rows}
    save_grid(grid, png, row_labels)
    result = {
        "model": "bundled digits DiT (ditq.demo)" if load_pipeline is load_bundled_pipeline else "custom",
        "device": str(device), "backend_requested": backend, "steps": steps, "samples_per_class": samples_per_class,
        "samples": len(labels), "seed": seed, "calibration_seed": CALIB_SEED, "guidance_scale": guidance_scale,
        "torch_threads": torch.get_num_threads(), "wall_seconds": wall,
        "real_vs_real_frechet": real_floor,
        "fp32_vs_fp32_frechet": fp_noise,
        "columns": {"image_sqnr_db": "SQNR of the final images vs fp32 (same seeds)",
                    "transformer_sqnr_db": "transformer output SQNR on the calibration inputs (quantize report)",
                    "accuracy": "digit classifier accuracy against the requested class",
                    "frechet_real": "Frechet distance on classifier features vs held-out real digits",
                    "frechet_fp32": "the same vs the fp32 samples (compare with fp32_vs_fp32_frechet: fp32 "
                                    "samples from seed + 1 vs seed, the metric's own noise at this count)",
                    "transformer_bytes": "bytes of the transformer's parameters and buffers",
                    "seconds_per_step": "sampling wall time / steps (whole batch)"},
        "rows": [{k: _finite(v) for k, v in asdict(r).items()} for r in rows],
        "png": png,
        "quant_reports": reports,
    }
    with open(os.path.join(out, "demo.json"), "w") as f:
        json.dump(result, f, indent=2)
    if print_fn is not None:
        print_fn(format_table(rows))
        print_fn(f"{len(labels)} samples ({samples_per_class} per class), {steps} steps, guidance {guidance_scale}, "
                 f"seed {seed}, device {device}; real-vs-real Fréchet floor at this count: {real_floor:.2f}; "
                 f"fp32 seed {seed} vs seed {seed + 1} (the metric's noise for 'FD fp32'): {fp_noise:.2f}")
        print_fn(f"wrote {png} and {os.path.join(out, 'demo.json')} in {wall:.0f} s")
    return result

"""Measure the demo DiT: classifier accuracy of its samples and Fréchet distance to held-out real digits.

    nice -n 10 python -m ditq.demo.evaluate --per-class 20 --steps 25 --guidance 1.5

The Fréchet distance depends on the sample count, so a real-vs-real reference at the same count (train-split digits
against the held-out ones) is printed beside it: that is the floor a perfect generator would reach.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from . import metrics
from .data import NUM_CLASSES, load_digits_split
from .pipeline import PixelDiTPipeline


def save_grid(images: torch.Tensor, path: str, per_class: int) -> None:
    """images (N, 1, H, W) in [0, 1], ``per_class`` consecutive images per class -> one PNG, one labelled row per
    class (the demo's grid: :func:`ditq.demo.run.save_grid`)."""
    from .run import save_grid as save_rows

    rows = {f"digit {c}": images[c * per_class:(c + 1) * per_class] for c in range(len(images) // per_class)}
    save_rows(rows, path)


def evaluate(pipe: PixelDiTPipeline, per_class: int, steps: int, guidance: float, seed: int) -> dict:
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    start = time.time()
    images = pipe(labels, guidance_scale=guidance, num_inference_steps=steps,
                  generator=torch.Generator().manual_seed(seed), output_type="pt").images
    seconds = time.time() - start

    held, _ = load_digits_split("held_out")
    train, _ = load_digits_split("train")
    held_feats = metrics.features((held + 1) / 2)
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[: len(labels)]
    return dict(
        samples=len(labels), steps=steps, guidance=guidance, seed=seed, sampling_seconds=round(seconds, 1),
        accuracy=metrics.classifier_accuracy(images, labels),
        frechet_to_held_out=metrics.frechet_distance(metrics.features(images), held_feats),
        real_train_frechet_to_held_out=metrics.frechet_distance(metrics.features((train[pick] + 1) / 2), held_feats),
    ), images


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="pipeline directory (default: the bundled model)")
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--grid", default=None, help="also write the samples as a PNG grid, one class per row")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    if args.model is None:
        from . import load_bundled_pipeline

        pipe = load_bundled_pipeline()
    else:
        pipe = PixelDiTPipeline.from_pretrained(args.model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    result, images = evaluate(pipe, args.per_class, args.steps, args.guidance, args.seed)
    if args.grid:
        save_grid(images, args.grid, args.per_class)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

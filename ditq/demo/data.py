"""scikit-learn's bundled handwritten digits as 16x16 images in [-1, 1].

The data ships inside scikit-learn (1797 images, 8x8, 10 classes), so the demo model can be trained and scored
without any download. Images are upsampled to 16x16 so that a patch-2 DiT sees 64 tokens, the same token grid
shape (8x8) as the digits themselves.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
NUM_CLASSES = 10
HELD_OUT_FRACTION = 0.2
SPLIT_SEED = 0


def to_model_range(images_0_16: torch.Tensor) -> torch.Tensor:
    """(N, 8, 8) raw digit intensities in 0..16 -> (N, 1, 16, 16) float32 in [-1, 1]."""
    x = images_0_16.float().unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return (x * 2.0 - 1.0).clamp(-1.0, 1.0)


def load_digits_split(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 16, 16) float32 in [-1, 1] and labels (N,) int64 of the `train` or `held_out` split.

    The split is stratified per class with a fixed seed, so every class keeps the same 80/20 share and the split is
    identical on every machine and run.
    """
    from sklearn.datasets import load_digits

    if split not in ("train", "held_out", "all"):
        raise ValueError(f"split must be 'train', 'held_out' or 'all', got {split!r}")
    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32))
    labels = torch.from_numpy(digits.target.astype(np.int64))
    if split == "all":
        return to_model_range(images), labels

    rng = np.random.RandomState(SPLIT_SEED)
    held = np.zeros(len(labels), dtype=bool)
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(digits.target == c)
        rng.shuffle(idx)
        held[idx[: int(round(len(idx) * HELD_OUT_FRACTION))]] = True
    keep = torch.from_numpy(held if split == "held_out" else ~held)
    return to_model_range(images[keep]), labels[keep]

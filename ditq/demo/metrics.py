"""Scores for generated digits: classifier accuracy and a Fréchet distance on the classifier's features.

Images are what the pipeline returns: `output_type="pt"` (N, 1, 16, 16) or `"np"` (N, 16, 16, 1), values in [0, 1].
Real digits from `data.load_digits_split` are in [-1, 1]: pass `(x + 1) / 2`.

    from ditq.demo import load_bundled_pipeline, metrics
    images = load_bundled_pipeline()(labels, output_type="pt").images
    metrics.classifier_accuracy(images, labels)                              # fraction in [0, 1]
    metrics.frechet_distance(metrics.features(images), metrics.features(real))   # 0 = same statistics

Only numpy and torch are needed (the matrix square root uses symmetric eigendecompositions, no scipy).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from .classifier import DigitClassifier, load_classifier


@functools.lru_cache(maxsize=1)
def _classifier() -> DigitClassifier:
    return load_classifier()


def _to_model_range(images) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images).detach().float().cpu()
    if x.ndim == 3:
        x = x.unsqueeze(1)
    elif x.ndim == 4 and x.shape[1] != 1 and x.shape[-1] == 1:
        x = x.permute(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected (N, 1, H, W) or (N, H, W, 1) images, got shape {tuple(x.shape)}")
    return x * 2.0 - 1.0


@torch.no_grad()
def features(images, batch_size: int = 512) -> torch.Tensor:
    """(N, 64) float32 penultimate-layer features of the scoring classifier."""
    x = _to_model_range(images)
    return torch.cat([_classifier().features(chunk) for chunk in x.split(batch_size)])


@torch.no_grad()
def predict(images, batch_size: int = 512) -> torch.Tensor:
    """(N,) predicted digit per image."""
    x = _to_model_range(images)
    return torch.cat([_classifier()(chunk).argmax(1) for chunk in x.split(batch_size)])


def classifier_accuracy(images, labels) -> float:
    """Fraction of images the classifier reads as the digit they were generated for."""
    labels = torch.as_tensor(labels).reshape(-1).cpu()
    return (predict(images) == labels).float().mean().item()


def _sqrtm_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(feats_a, feats_b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows are samples), as in FID.

    Uses tr sqrt(Ca Cb) = tr sqrt(Ca^1/2 Cb Ca^1/2): the inner matrix is symmetric PSD, so two eigendecompositions
    give an exact, real result where a general sqrtm can return complex noise. Like FID it is biased upward at small
    sample counts: compare numbers measured with the same counts.
    """
    a = np.asarray(torch.as_tensor(feats_a).double().cpu())
    b = np.asarray(torch.as_tensor(feats_b).double().cpu())
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    sa = _sqrtm_psd(ca)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(sa @ cb @ sa), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * tr_covmean)

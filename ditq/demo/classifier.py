"""A small CNN digit classifier that scores the demo DiT's samples (accuracy and Fréchet-distance features).

It plays the role Inception plays for FID, at digit scale: trained on the same 16x16 digits as the DiT (train split
only), shipped as `classifier.safetensors` beside this file. Retrain with `python -m ditq.demo.train_classifier`.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from .data import IMAGE_SIZE, NUM_CLASSES

CLASSIFIER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "classifier.safetensors")
FEATURE_DIM = 64


class DigitClassifier(nn.Module):
    """Input (N, 1, 16, 16) in [-1, 1] (the DiT's pixel range); `features` is the 64-d penultimate layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        flat = 64 * (IMAGE_SIZE // 4) ** 2
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(flat, FEATURE_DIM), nn.ReLU())
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def load_classifier(path: str = CLASSIFIER_PATH) -> DigitClassifier:
    from safetensors.torch import load_file

    model = DigitClassifier()
    model.load_state_dict(load_file(path))
    return model.eval().requires_grad_(False)

"""Train the scoring classifier on the digits' train split (deterministic, one CPU thread, about a minute).

    nice -n 10 python -m ditq.demo.train_classifier --out ditq/demo/classifier.safetensors
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from .classifier import CLASSIFIER_PATH, DigitClassifier
from .data import load_digits_split


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by up to `max_shift` pixels: generated digits are rarely centred exactly like the real ones,
    and the classifier should judge the digit, not its position."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


@torch.no_grad()
def accuracy(model: DigitClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model.eval()(x).argmax(1) == y).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=CLASSIFIER_PATH)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x, y = load_digits_split("train")
    xh, yh = load_digits_split("held_out")
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=gen).split(64):
            loss = F.cross_entropy(model(random_shift(x[idx], gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        if (epoch + 1) % 5 == 0:
            print(f"epoch {epoch + 1}: train acc {accuracy(model, x, y):.4f} "
                  f"held-out acc {accuracy(model, xh, yh):.4f} ({time.time() - start:.0f} s)", flush=True)

    from safetensors.torch import save_file

    held = accuracy(model, xh, yh)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out,
              metadata={"input": "(N,1,16,16) float in [-1,1]", "held_out_accuracy": f"{held:.4f}"})
    print(f"saved {args.out}: held-out accuracy {held:.4f}", flush=True)


if __name__ == "__main__":
    main()

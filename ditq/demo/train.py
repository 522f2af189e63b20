"""Train the bundled demo DiT on scikit-learn's digits, deterministically, on one CPU thread.

    nice -n 10 python -m ditq.demo.train --out ditq/demo/model --steps 2000

The number of steps fixes the whole run (data order, noise, learning-rate schedule), so the same command gives the
same weights on the same machine and torch build. `--minutes` is only a safety cap: a run it cuts short is not
reproducible, and the log says so.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time

import torch
import torch.nn as nn
from diffusers import DDIMScheduler, DiTTransformer2DModel

from .data import NUM_CLASSES, load_digits_split
from .pipeline import PixelDiTPipeline

# The shipped model: 3 blocks of hidden 4 x 64 = 256 and MLP 1024, so every quantized GEMM has K >= 256 and int4
# groups of 32-128 are finer than a whole channel everywhere (at hidden 128 a group of 128 *is* the channel).
# --layers/--heads/--head-dim override it (the previous model, 6 x 4 x 32, is described in MODEL_CARD.md).
TRANSFORMER_CONFIG = dict(
    num_layers=3,
    num_attention_heads=4,
    attention_head_dim=64,
    in_channels=1,
    out_channels=1,
    sample_size=16,
    patch_size=2,
    num_embeds_ada_norm=NUM_CLASSES,
    norm_type="ada_norm_zero",
)
# DiT's own noise schedule and objective (linear betas, epsilon). "trailing" spacing makes the first sampling step
# t = T - 1, the step the quantization runtime calibrates on. No x0 clipping (DiT's DDIM has none either): near t = T
# an epsilon model's x0 estimate is divided by sqrt(alpha_bar) ~ 0.006, clipping it saturates the image and guidance
# made it worse (accuracy fell from 100% to 17-73% at guidance 4 on the same weights).
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="linear",
    beta_start=1e-4,
    beta_end=0.02,
    prediction_type="epsilon",
    clip_sample=False,
    timestep_spacing="trailing",
)


def init_like_dit(model: DiTTransformer2DModel) -> None:
    """The original DiT initialisation (diffusers leaves PyTorch defaults): zeroed adaLN and output layers make every
    block start as the identity, which trains markedly faster on a small budget."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    proj = model.pos_embed.proj
    nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    nn.init.zeros_(proj.bias)
    for block in model.transformer_blocks:
        emb = block.norm1.emb
        nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)
    for layer in (model.proj_out_1, model.proj_out_2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def build_transformer(seed: int) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(**TRANSFORMER_CONFIG)
    init_like_dit(model)
    # diffusers drops labels inside every block's own embedder, independently per block; we drop them once, below.
    for block in model.transformer_blocks:
        block.norm1.emb.class_embedder.dropout_prob = 0.0
    return model


def save_pipeline(ema: DiTTransformer2DModel, out: str, info: dict) -> None:
    transformer = copy.deepcopy(ema).to(torch.float16)
    PixelDiTPipeline(transformer=transformer, scheduler=DDIMScheduler(**SCHEDULER_CONFIG)).save_pretrained(out)
    with open(os.path.join(out, "training.json"), "w") as f:
        json.dump(info, f, indent=2)


def train(args: argparse.Namespace) -> None:
    TRANSFORMER_CONFIG.update(num_layers=args.layers, num_attention_heads=args.heads, attention_head_dim=args.head_dim)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    images, labels = load_digits_split("train")
    model = build_transformer(args.seed)
    ema = copy.deepcopy(model).requires_grad_(False)
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}", flush=True)

    alphas_cumprod = DDIMScheduler(**SCHEDULER_CONFIG).alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    # Min-SNR-5 weighting (Hang et al. 2023): stops near-clean timesteps from dominating the epsilon loss.
    loss_weight = snr.clamp(max=5.0) / snr

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = min(100, args.steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(images), generator=gen)
    cursor, running, start = 0, None, time.time()
    info = dict(vars(args), transformer=TRANSFORMER_CONFIG)

    for step in range(args.steps):
        if cursor + args.batch_size > len(order):
            order, cursor = torch.randperm(len(images), generator=gen), 0
        idx = order[cursor : cursor + args.batch_size]
        cursor += args.batch_size
        x0, y = images[idx], labels[idx]
        t = torch.randint(0, len(alphas_cumprod), (len(idx),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        y = torch.where(torch.rand(len(idx), generator=gen) < args.class_dropout, NUM_CLASSES, y)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise

        pred = model(xt, timestep=t, class_labels=y).sample
        loss = (loss_weight[t] * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()

        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)

        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        elapsed = time.time() - start
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            print(f"step {done}/{args.steps} loss {running:.4f} lr {sched.get_last_lr()[0]:.2e} "
                  f"{elapsed / 60:.1f} min ({elapsed / done:.2f} s/step)", flush=True)
        if args.save_every and done % args.save_every == 0 and done < args.steps:
            save_pipeline(ema, args.out, dict(info, steps_done=done, wall_minutes=elapsed / 60, loss=running))
        if args.stop_after and done >= args.stop_after:
            # The schedule (learning rate, data order) is that of --steps; stopping early keeps the run
            # deterministic: the same command gives the same weights.
            print(f"stopped by --stop-after after {done} of {args.steps} scheduled steps", flush=True)
            break
        if args.minutes and elapsed > args.minutes * 60 and done < args.steps:
            print(f"stopped by --minutes after {done} steps: this run is NOT reproducible", flush=True)
            break

    info.update(steps_done=done, wall_minutes=(time.time() - start) / 60, loss=running)
    save_pipeline(ema, args.out, info)
    print(f"saved EMA pipeline to {args.out} after {info['wall_minutes']:.1f} min", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="ditq/demo/model")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--layers", type=int, default=TRANSFORMER_CONFIG["num_layers"])
    p.add_argument("--heads", type=int, default=TRANSFORMER_CONFIG["num_attention_heads"])
    p.add_argument("--head-dim", type=int, default=TRANSFORMER_CONFIG["attention_head_dim"])
    p.add_argument("--minutes", type=float, default=0.0, help="wall-clock safety cap (0: none)")
    p.add_argument("--stop-after", type=int, default=0,
                   help="stop (and save) after this many steps of the --steps schedule; deterministic (0: run all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--class-dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=0, help="also save the EMA pipeline every N steps (0: never)")
    train(p.parse_args())


if __name__ == "__main__":
    main()

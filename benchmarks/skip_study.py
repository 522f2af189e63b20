"""Which layers to keep in full precision: quantize one layer group at a time, measure the model output's SQNR.

The numbers behind ditq's default skip list (README, "Default skip list"): a tiny random DiT (the architecture of
DiT-XL/2 at toy width, built from a config, nothing downloaded), W4A8 with groups of 32 and first-step static
scales, one group of linears quantized at a time, output SQNR against the full-precision model on fresh inputs.

    python3 benchmarks/skip_study.py [--seeds 0 1] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import json

import torch

GROUPS = {  # name -> fnmatch patterns of the linears it quantizes (relative to the transformer)
    "timestep embedders": ["*timestep_embedder*"],
    "adaLN": ["*norm1.linear"],
    "attention": ["*attn1.to_*"],
    "MLP": ["*ff.net*"],
    "proj_out_1": ["proj_out_1"],
    "proj_out_2": ["proj_out_2"],
}


def tiny_dit(seed: int):
    from diffusers import DiTTransformer2DModel
    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_layers=2, num_attention_heads=4, attention_head_dim=16, in_channels=4,
                                 out_channels=8, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()


def inputs(seed: int, batch: int = 4):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
                timestep=torch.randint(0, 1000, (batch,), generator=g),
                class_labels=torch.randint(0, 10, (batch,), generator=g))


def study(seed: int) -> dict:
    import ditq

    base = tiny_dit(seed)
    calib, test = inputs(1000 + seed), inputs(2000 + seed)
    calib["timestep"] = torch.full_like(calib["timestep"], 999)  # first step, t = T (the paper's calibration)
    with torch.no_grad():
        ref = base(**test).sample
    out = {}
    for name, patterns in GROUPS.items():
        model = copy.deepcopy(base)
        cfg = ditq.QuantConfig.preset("w4a8", group_size=32, backend="torch", include=patterns,
                                      default_skip=False, progress=False)
        ditq.quantize(model, cfg, calib_fn=lambda m: m(**calib))
        with torch.no_grad():
            out[name] = round(ditq.sqnr(ref, model(**test).sample), 1)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--json", help="also write the table as JSON here")
    args = p.parse_args(argv)
    rows = {seed: study(seed) for seed in args.seeds}
    print(f"{'quantized group':<20}" + "".join(f"  seed {s:>3}" for s in args.seeds) + "   (output SQNR, dB)")
    for name in GROUPS:
        print(f"{name:<20}" + "".join(f"  {rows[s][name]:>8.1f}" for s in args.seeds))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seeds": args.seeds, "sqnr_db": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Which layers to keep in full precision: quantize one layer group at a time, measure the model output's SQNR.

The numbers behind ditq's default skip list (README, "Default skip list"; the table in ``ditq/convert.py``): a
tiny random DiT (the architecture of DiT-XL/2 at toy width, built from a config, nothing downloaded), W4A8 with
groups of 32 and W8A8, first-step static scales (calibrated at t = T on 4 class labels; and W8A8 with dynamic
per-token scales, which shows what the static ranges cost), one group of linears
quantized at a time (then all of them, and all but the output layers), output SQNR against the full-precision
model on fresh inputs at random timesteps. The last column is each group's share of DiT-XL/2's linear weights,
counted on the meta device (nothing allocated).

    python3 benchmarks/skip_study.py [--seeds 0 1] [--json out.json]      # ~10 s on the CPU
"""
from __future__ import annotations

import argparse
import copy
import fnmatch
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
COMBINED = {  # the same study for unions of the groups above
    "all of them": [p for ps in GROUPS.values() for p in ps],
    "all but proj_out*": [p for name, ps in GROUPS.items() if not name.startswith("proj_out") for p in ps],
}
SETTINGS = {  # column -> QuantConfig.preset arguments
    "W4A8 g32": ("w4a8", dict(group_size=32)),
    "W8A8": ("w8a8", {}),
    "W8A8 per-token": ("w8a8", dict(act_scheme="dynamic")),  # no calibrated range: what static scales cost
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


def study(seed: int, setting: str) -> dict:
    """{group: output SQNR in dB} for one seed and one column of SETTINGS."""
    import ditq

    preset, extra = SETTINGS[setting]
    base = tiny_dit(seed)
    calib, test = inputs(1000 + seed), inputs(2000 + seed)
    calib["timestep"] = torch.full_like(calib["timestep"], 999)  # first step, t = T (the paper's calibration)
    with torch.no_grad():
        ref = base(**test).sample
    out = {}
    for name, patterns in {**GROUPS, **COMBINED}.items():
        model = copy.deepcopy(base)
        cfg = ditq.QuantConfig.preset(preset, backend="torch", include=patterns, default_skip=False, progress=False,
                                      **extra)
        ditq.quantize(model, cfg, calib_fn=lambda m: m(**calib))
        with torch.no_grad():
            out[name] = round(ditq.sqnr(ref, model(**test).sample), 1)
    return out


def dit_xl_shares() -> dict:
    """{group: fraction of DiT-XL/2's linear weight elements it holds}, counted on the meta device."""
    from accelerate import init_empty_weights
    from diffusers import DiTTransformer2DModel

    with init_empty_weights():
        model = DiTTransformer2DModel(num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4,
                                      out_channels=8, patch_size=2, num_embeds_ada_norm=1000)
    sizes = {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    total = sum(sizes.values())
    return {name: sum(v for n, v in sizes.items() if any(fnmatch.fnmatchcase(n, p) for p in patterns)) / total
            for name, patterns in {**GROUPS, **COMBINED}.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--json", help="also write the table as JSON here")
    args = p.parse_args(argv)
    rows = {setting: {seed: study(seed, setting) for seed in args.seeds} for setting in SETTINGS}
    shares = dit_xl_shares()
    seeds = " / ".join(str(s) for s in args.seeds)
    head = f"{'quantized group':<20}" + "".join(f"  {setting + ', seeds ' + seeds:>22}" for setting in SETTINGS)
    print(head + "  share of DiT-XL/2 linear weights   (output SQNR, dB)")
    for name in {**GROUPS, **COMBINED}:
        cells = "".join(f"  {' / '.join(f'{rows[st][s][name]:.1f}' for s in args.seeds):>22}" for st in SETTINGS)
        share = f"{100 * shares[name]:.1f}%" if shares[name] >= 0.001 else "<0.1%"
        print(f"{name:<20}{cells}  {share}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seeds": args.seeds, "sqnr_db": rows, "dit_xl_share": shares}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

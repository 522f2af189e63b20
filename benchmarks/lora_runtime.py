"""What a run-time LoRA on a quantized model costs in accuracy, against merging it and quantizing again.

Static activation scales are calibrated without the adapter. ``ditq.load_lora`` adds a float branch that reads the
layer's float input (exact), but the layers after an adapted one see the adapted activations through the old
scales. The alternative is diffusers' ``fuse_lora``-style merge into the float weights, then ``ditq.quantize``
(calibrated on the adapted model, so the scales fit; the low-rank update is then rounded with the weights).

For the tiny random test models (``tests/ditq/tiny_models.py``: DiT, 2 blocks; FLUX, 1 joint + 1 single block), a
random rank-4 LoRA on every attention / MLP linear (and DiT's ``proj_out_1``), two strengths (``std``: the
adapted float output is about 20-30 dB and 10-20 dB from the unadapted one), W8A8 and W4A8 (groups of 32) with
first-step static scales calibrated on one input set and measured on two fresh ones. Columns: output SQNR (dB)
against the float model with the LoRA merged, for the quantized model with the LoRA at run time and for the
merged-then-quantized model; and the unadapted quantized model against its own float model, for scale.

    python3 benchmarks/lora_runtime.py [--seeds 0 1] [--json out.json]      # ~1 min on the CPU
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "ditq"))

FAMILIES = {
    "flux": ["to_q", "to_k", "to_v", "to_out.0", "proj_mlp", "proj_out", "ff.net.0.proj", "ff.net.2"],
    "dit": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_out_1"],
}
# the tiny models are 64 wide: W4A8's default groups of 128 would leave every block linear in float
PRESETS = {"w8a8": ("w8a8", {}), "w4a8 g32": ("w4a8", dict(group_size=32))}
STDS = (0.05, 0.2)


def _model(family):
    import tiny_models

    if family == "dit":
        return tiny_models.tiny_dit(seed=0), [tiny_models.dit_inputs(batch=2, seed=s) for s in (1, 11, 12)]
    model, inputs = tiny_models.tiny_flux()
    sets = [inputs]
    for s in (11, 12):  # fresh noise, text and pooled embeddings; same shapes and ids
        g = torch.Generator().manual_seed(s)
        sets.append({**inputs, **{k: torch.randn(inputs[k].shape, generator=g)
                                  for k in ("hidden_states", "encoder_hidden_states", "pooled_projections")}})
    return model, sets


def _adapter(model, targets, seed, std, rank=4):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            sd[f"{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) / m.in_features ** 0.5
            sd[f"{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * std / rank ** 0.5
    return sd


def _merged(model, sd):
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for key, a in sd.items():
            if key.endswith(".lora_A.weight"):
                path = key[:-len(".lora_A.weight")]
                merged.get_submodule(path).weight += sd[path + ".lora_B.weight"] @ a
    return merged


def measure(family, preset, std, seed):
    import ditq

    model, (calib, *evals) = _model(family)
    sd = _adapter(model, FAMILIES[family], seed, std)
    name, kw = PRESETS[preset]
    cfg = ditq.QuantConfig.preset(name, backend="torch", progress=False, **kw)

    def outs(m):
        with torch.no_grad():
            return torch.cat([m(**x).sample.flatten() for x in evals])

    merged = _merged(model, sd)
    base, ref = outs(model), outs(merged)
    runtime = copy.deepcopy(model)
    ditq.quantize(runtime, cfg, calib_fn=lambda m: m(**calib))
    quantized_base = outs(runtime)
    ditq.load_lora(runtime, sd)
    ditq.quantize(merged, cfg, calib_fn=lambda m: m(**calib))
    s = ditq.sqnr
    return {"family": family, "preset": preset, "std": std, "seed": seed,
            "adapter_effect_db": s(ref, base), "quantized_base_db": s(base, quantized_base),
            "runtime_lora_db": s(ref, outs(runtime)), "merge_then_quantize_db": s(ref, outs(merged))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")  # the tiny models leave a layer or two unquantized (zeros at calibration)
    rows = [measure(f, pr, std, seed) for f in FAMILIES for pr in PRESETS for std in STDS for seed in args.seeds]
    print("| model | preset | LoRA std | adapter effect | quantized, no LoRA | run-time LoRA | merge + quantize |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for f in FAMILIES:
        for pr in PRESETS:
            for std in STDS:
                sel = [r for r in rows if (r["family"], r["preset"], r["std"]) == (f, pr, std)]

                def col(k):
                    return " / ".join(f"{r[k]:.1f}" for r in sel)
                print(f"| {f} | {pr} | {std} | {col('adapter_effect_db')} | {col('quantized_base_db')} | "
                      f"{col('runtime_lora_db')} | {col('merge_then_quantize_db')} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return rows


if __name__ == "__main__":
    main()

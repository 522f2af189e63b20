"""What ditq's default layer choice means for each DiT family at its real size: how much of the transformer it
quantizes, what it keeps in float and why, and the weight bytes that result.

Each family is built on the meta device (accelerate's ``init_empty_weights``: nothing allocated, so a 32B FLUX.2
costs nothing) with its diffusers class's default config, which is the family's flagship release (Wan2.1-T2V-14B,
Qwen-Image, FLUX.2-dev, FLUX.1, HunyuanVideo, Chroma, Z-Image, LTX-Video 2B, CogVideoX-2B, Lumina-Image-2.0,
AuraFlow, Sana 1.6B). ``ditq.convert.select_layers`` then applies exactly what ``ditq.quantize`` would (the default
skip list, its class rule, the model's own ``_keep_in_fp32_modules``, the group size dividing K; 1x1 convolutions
as linears, ``ditq.pointwise``): no calibration runs, so a layer that calibration never reaches is not seen here.

Bytes: the float model in bfloat16; W8A8 (int8 weights, one float32 scale per output channel) and W4A8 g128 / g64
(packed int4, one float32 scale per 128 / 64 inputs and output channel), every layer ditq keeps in float in
bfloat16. A width that 128 does not divide (Sana's 2240) leaves W4A8 g128 nothing to quantize: g64 is its row.

    python3 benchmarks/families.py [--families wan flux2 ...] [--json out.json]      # ~15 s on the CPU

Prints a markdown table (and the reasons of the kept layers with ``--why``).
"""
from __future__ import annotations

import argparse
import json
from collections import Counter

# family -> (diffusers class, the release its default config is)
FAMILIES = {
    "wan": ("WanTransformer3DModel", "Wan2.1-T2V-14B"),
    "qwenimage": ("QwenImageTransformer2DModel", "Qwen-Image"),
    "flux2": ("Flux2Transformer2DModel", "FLUX.2-dev"),
    "flux": ("FluxTransformer2DModel", "FLUX.1"),
    "hunyuanvideo": ("HunyuanVideoTransformer3DModel", "HunyuanVideo"),
    "chroma": ("ChromaTransformer2DModel", "Chroma1"),
    "zimage": ("ZImageTransformer2DModel", "Z-Image"),
    "ltx": ("LTXVideoTransformer3DModel", "LTX-Video 2B"),
    "cogvideox": ("CogVideoXTransformer3DModel", "CogVideoX-2B"),
    "lumina2": ("Lumina2Transformer2DModel", "Lumina-Image-2.0"),
    "auraflow": ("AuraFlowTransformer2DModel", "AuraFlow"),
    "sana": ("SanaTransformer2DModel", "Sana 1.6B"),
}
BF16 = 2


def _packed_bytes(out_f: int, in_f: int, bits: int, group: int | None) -> int:
    """Bytes of one packed weight in ditq's canonical format (what ``QuantLinear.nbytes`` holds, bias aside)."""
    from ditq.format import WeightFormat
    shapes = WeightFormat(bits=bits, group_size=group).packed_shapes(out_f, in_f)
    q, s = shapes["qweight"], shapes["scales"]
    return q[0] * q[1] + 4 * (s[0] * (s[1] if len(s) > 1 else 1))


def study(family: str) -> dict:
    import diffusers
    import torch
    from accelerate import init_empty_weights

    import ditq
    from ditq import pointwise
    from ditq.convert import select_layers

    cls_name, release = FAMILIES[family]
    with init_empty_weights():
        model = getattr(diffusers, cls_name)()
    pointwise.wrap(model)  # 1x1 convolutions count as the linears ditq.quantize makes of them
    params = sum(p.numel() for p in model.parameters())
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    lin_params = sum(m.weight.numel() for m in linears.values())
    row = {"family": family, "class": cls_name, "release": release, "params": params, "linear_params": lin_params}
    for key, preset, bits, group in (("w8a8", "w8a8", 8, None), ("w4a8", "w4a8", 4, 128),
                                     ("w4a8_g64", "w4a8", 4, 64)):
        cand, skipped = select_layers(model, ditq.QuantConfig.preset(preset, group_size=group))
        # on the meta device every candidate is "not loaded": that is the only reason not to count it here
        cand.update({n: linears[n] for n, why in skipped.items() if why.startswith("weight is on the meta device")})
        kept = {n: why for n, why in skipped.items() if n not in cand}
        quant = sum(linears[n].weight.numel() for n in cand)
        packed = sum(_packed_bytes(linears[n].out_features, linears[n].in_features, bits, group) for n in cand)
        row[key] = {"layers": len(cand), "kept": len(kept), "quantized_share": quant / lin_params,
                       "bytes": packed + (params - quant) * BF16,
                       "kept_by_reason": dict(Counter(why.split(":")[1].strip() if why.startswith("default skip")
                                                      else why for why in kept.values()))}
    row["bf16_bytes"] = params * BF16
    return row


def table(rows) -> str:
    lines = ["| family (default config) | parameters | in linears | linears quantized (W8) | share of linear weights "
             "| bf16 GB | W8A8 GB | W4A8 g128 GB | W4A8 g64 GB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        w8, w4, w64 = r["w8a8"], r["w4a8"], r["w4a8_g64"]
        lines.append(f"| {r['family']} ({r['release']}) | {r['params'] / 1e9:.2f} B | "
                     f"{r['linear_params'] / r['params']:.1%} | {w8['layers']} of {w8['layers'] + w8['kept']} | "
                     f"{w8['quantized_share']:.1%} | {r['bf16_bytes'] / 1e9:.2f} | {w8['bytes'] / 1e9:.2f} "
                     f"({w8['bytes'] / r['bf16_bytes']:.0%}) | {w4['bytes'] / 1e9:.2f} "
                     f"({w4['bytes'] / r['bf16_bytes']:.0%}) | {w64['bytes'] / 1e9:.2f} "
                     f"({w64['bytes'] / r['bf16_bytes']:.0%}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="+", choices=sorted(FAMILIES), default=list(FAMILIES))
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--why", action="store_true", help="list the kept layers' reasons per family")
    args = ap.parse_args(argv)
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)  # diffusers' deprecation notices while building
    rows = [study(f) for f in args.families]
    print(table(rows))
    if args.why:
        for r in rows:
            print(f"\n{r['family']}: kept in float (W8A8)")
            for why, n in sorted(r["w8a8"]["kept_by_reason"].items(), key=lambda kv: -kv[1]):
                print(f"  {n:4d}  {why}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"schema": "ditq.families/1", "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

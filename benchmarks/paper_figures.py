"""The analysis of "An Analysis on Quantizing Diffusion Transformers", reproduced on ditq's bundled digits DiT.

    nice python benchmarks/paper_figures.py             # full run: PNGs in benchmarks/figures/, PAPER_FIGURES.md
    python benchmarks/paper_figures.py --quick          # CI: 3 steps, 1 sample per class, fewer calibration choices
    python benchmarks/paper_figures.py --from-json benchmarks/figures/paper_figures.json   # markdown only, no runs

What each figure measures (all on the bundled DiT -- its depth and width are read from it -- DDIM, guidance 1.5 as in the model card;
one sampling step = one transformer call on the doubled classifier-free-guidance batch):

* fig1_activations.png (paper Fig. 1 top): each quantized layer's input absmax at every sampling step (recorded
  by ditq's calibrator in all-steps mode), for a few layers; and one layer's per-input-channel absmax at the
  first, middle and last step (are the outlier channels the same at every step?).
* fig1_weights.png (paper Fig. 1 bottom): |w| along K for the output channel with the largest max/median ratio,
  with the 32-wide group boundaries; int4 weight SQNR per layer type, one scale per output channel vs groups of
  128 / 64 / 32 (``ditq.quant.reference``), and g32 with MSE-chosen clips (``ditq.weight_rounding``).
* fig2_calibration_step.png (paper Fig. 2): W8A8 quantized with activation scales calibrated on one single step
  i (for several i) vs on all steps. Two measures: the transformer's output SQNR along the *full-precision*
  trajectory (each step's recorded fp32 inputs fed to the quantized transformer; the total over all steps), and
  the SQNR of the final images vs fp32 from the same noise.
* fig3_grid.png (paper Fig. 3): samples, rows = settings (first-step vs all-steps calibration, W8A8 and W4A8),
  columns = classes, same noise everywhere.
* fig4_settings.png + the table (paper Fig. 4 / tables): W8A8 and W4A8 with and without the two improvements
  (first-step calibration; group-wise int4). "W4A8 per-channel" is not a ditq format (4-bit weights need groups):
  it is emulated by fake-quantizing each weight to int4 with one scale per output channel and serving the result
  through the W8A8 integer path; re-quantizing an int4 grid to int8 adds an error ~0.03 of an int4 step (under
  0.1 dB). Everything else runs ditq's real integer runtime (backend "auto": the torch reference on CPU). The
  last rows are ditq's static policy, with round-to-nearest int4 weights and with GPTQ-rounded ones
  (``QuantConfig.weight_method``).

Writes ``paper_figures.json`` beside the PNGs and a markdown section (``--markdown``) whose sentences about
agreement with the paper are derived from the measured numbers, so they cannot drift from them.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
NUM_CLASSES = 10
CALIB_SEED = 1234


def fig1_layers(blocks: int) -> List[str]:
    """A few layers of the first, middle and last block (the bundled model's depth is read, not assumed)."""
    mid, last = blocks // 2, blocks - 1
    return ["transformer_blocks.0.norm1.linear", "transformer_blocks.0.attn1.to_q",
            f"transformer_blocks.{mid}.ff.net.2", f"transformer_blocks.{last}.attn1.to_out.0",
            f"transformer_blocks.{last}.ff.net.0.proj"]


def channel_layer(blocks: int) -> str:
    """The layer whose per-input-channel ranges Fig. 1 shows: the middle block's MLP fc1."""
    return f"transformer_blocks.{blocks // 2}.ff.net.0.proj"
LAYER_TYPES = [("adaLN", "norm1.linear"), ("t-embed", "timestep_embedder"), ("q/k/v", "attn1.to_"),
               ("attn out", "to_out"), ("mlp fc1", "ff.net.0"), ("mlp fc2", "ff.net.2")]


def layer_type(name: str) -> str:
    if "to_out" in name:
        return "attn out"
    for label, key in LAYER_TYPES:
        if key in name:
            return label
    return "other"


# ---- model plumbing -------------------------------------------------------------------------------------

def fresh_pipe():
    from ditq.demo import load_bundled_pipeline
    pipe = load_bundled_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


class TrajectoryRecorder:
    """Keeps every transformer call's inputs and output during one full-precision sampling run, and the
    per-input-channel absmax of one layer at every step."""

    def __init__(self, transformer, channel_layer: Optional[str] = None):
        self.t, self.calls, self.channel_absmax = transformer, [], []
        self.handles = [transformer.register_forward_pre_hook(self._pre, with_kwargs=True),
                        transformer.register_forward_hook(self._post, with_kwargs=True)]
        if channel_layer:
            layer = transformer.get_submodule(channel_layer)
            self.handles.append(layer.register_forward_pre_hook(self._channels))

    def _pre(self, module, args, kwargs):
        self.calls.append([tuple(a.detach().clone() if torch.is_tensor(a) else a for a in args),
                           {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}, None])

    def _post(self, module, args, kwargs, out):
        self.calls[-1][2] = out.sample.detach().clone()

    def _channels(self, module, args):
        x = args[0].detach()
        self.channel_absmax.append(x.abs().reshape(-1, x.shape[-1]).amax(0))

    def remove(self):
        for h in self.handles:
            h.remove()


def sample(pipe, labels, steps, seed, guidance):
    return pipe(labels, guidance_scale=guidance, num_inference_steps=steps,
                generator=torch.Generator().manual_seed(seed), output_type="pt").images.float()


def trajectory_sqnr(transformer, calls) -> Dict[str, object]:
    """The transformer's output SQNR on each recorded fp32 call, and over all of them (total signal / noise)."""
    from ditq import sqnr
    per, sig, noise = [], 0.0, 0.0
    with torch.no_grad():
        for args, kwargs, ref in calls:
            out = transformer(*args, **kwargs).sample
            per.append(sqnr(ref, out))
            sig += float(ref.double().pow(2).sum())
            noise += float((ref.double() - out.double()).pow(2).sum())
    return {"per_step": per, "total": 10 * math.log10(sig / noise) if noise else math.inf}


def quantize(pipe, preset: str, calibration, steps: int, guidance: float, group_size=None, skip=(), **extra):
    import ditq
    kw = {} if group_size is None else {"group_size": group_size}
    kw["skip"] = list(skip)
    kw.update(extra)
    cfg = ditq.QuantConfig.preset(preset, calibration=calibration, progress=False, **kw)
    calib = dict(class_labels=list(range(NUM_CLASSES)), num_inference_steps=steps, guidance_scale=guidance,
                 generator=torch.Generator().manual_seed(CALIB_SEED))
    return ditq.quantize(pipe, cfg, calib_inputs=calib)


def fake_quant_int4_per_channel(pipe) -> None:
    """Replace every linear ditq would quantize by its int4 per-output-channel fake-quantized weight."""
    import ditq
    from ditq.convert import select_layers
    from ditq.quant import reference as ref
    layers, _ = select_layers(pipe.transformer, ditq.QuantConfig.preset("w8a8", progress=False))
    with torch.no_grad():
        for lin in layers.values():
            q, s = ref.quantize_per_channel(lin.weight.float(), qmax=ref.INT4_QMAX)
            lin.weight.copy_(ref.dequantize_per_channel(q, s).to(lin.weight.dtype))


# ---- figure 1 -------------------------------------------------------------------------------------------

def weight_analysis(transformer) -> dict:
    from ditq.quant import reference as ref
    from ditq.convert import DEFAULT_SKIP
    from ditq.format import WeightFormat
    from ditq.weight_rounding import round_weight
    import fnmatch
    rows, worst = [], None
    for name, lin in transformer.named_modules():
        if not isinstance(lin, torch.nn.Linear) or any(fnmatch.fnmatchcase(name, p) for p in DEFAULT_SKIP):
            continue
        w = lin.weight.detach().float()
        q, s = ref.quantize_per_channel(w, qmax=ref.INT4_QMAX)
        row = {"name": name, "type": layer_type(name), "K": w.shape[1],
               "per_channel": ref.sqnr(w, ref.dequantize_per_channel(q, s))}
        for g in (128, 64, 32):
            if w.shape[1] % g == 0:
                qg, sg = ref.quantize_groupwise(w, g, ref.INT4_QMAX)
                row[f"g{g}"] = ref.sqnr(w, ref.dequantize_groupwise(qg, sg, g))
        if w.shape[1] % 32 == 0:  # the same groups with the clip of each group's absmax chosen by weight MSE
            fmt = WeightFormat(4, 32)
            qg, sg = round_weight(w, fmt, "mse")
            row["g32_mse"] = ref.sqnr(w, ref.dequantize_groupwise(qg, sg, 32))
        ratio = (w.abs().amax(1) / w.abs().median(1).values.clamp_min(1e-12))
        n = int(ratio.argmax())
        if worst is None or float(ratio[n]) > worst["ratio"]:
            worst = {"layer": name, "channel": n, "ratio": float(ratio[n]), "abs": w[n].abs().tolist()}
        rows.append(row)
    by_type = {}
    for t in dict.fromkeys(r["type"] for r in rows):
        sel = [r for r in rows if r["type"] == t]
        by_type[t] = {k: sum(r[k] for r in sel) / len(sel) for k in ("per_channel", "g128", "g64", "g32", "g32_mse")
                      if all(k in r for r in sel)}
    overall = {k: sum(r[k] for r in rows) / len(rows) for k in ("per_channel", "g128", "g64", "g32", "g32_mse")
               if all(k in r for r in rows)}
    return {"layers": rows, "by_type": by_type, "overall": overall, "worst_channel": worst}


def plot_fig1(act: dict, channel: List[torch.Tensor], weights: dict, layers: List[str], channel_name: str,
              path_act: str, path_w: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    for name in layers:
        rec = act.get(name)
        if rec:
            steps = sorted(rec, key=int)
            a.plot([int(s) for s in steps], [rec[s] for s in steps], marker="o", ms=3,
                   label=name.replace("transformer_blocks.", "b"))
    a.set_xlabel("sampling step (0 = t=T, noisiest)")
    a.set_ylabel("input absmax")
    a.set_title("activation range per sampling step")
    a.legend(fontsize=7)
    picks = sorted({0, len(channel) // 2, len(channel) - 1})
    for i in picks:
        b.plot(channel[i].numpy(), lw=0.8, label=f"step {i}")
    b.set_xlabel(f"input channel of {channel_name.replace('transformer_blocks.', 'b')}")
    b.set_ylabel("absmax over tokens")
    b.set_title("per-channel activation range")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path_act, dpi=110)
    plt.close(fig)

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    worst = weights["worst_channel"]
    a.bar(range(len(worst["abs"])), worst["abs"], width=1.0)
    for k in range(32, len(worst["abs"]), 32):
        a.axvline(k - 0.5, color="grey", lw=0.4)
    a.set_title(f"|w| of {worst['layer'].replace('transformer_blocks.', 'b')} channel {worst['channel']} "
                f"(max/median {worst['ratio']:.0f}x)", fontsize=9)
    a.set_xlabel("input index k (grey: groups of 32)")
    types = list(weights["by_type"])
    keys = [k for k in ("per_channel", "g128", "g64", "g32") if all(k in weights["by_type"][t] for t in types)]
    width = 0.8 / len(keys)
    for j, k in enumerate(keys):
        b.bar([i + j * width for i in range(len(types))], [weights["by_type"][t][k] for t in types], width,
              label=k.replace("_", "-"))
    b.set_xticks([i + 0.4 - width / 2 for i in range(len(types))], types, fontsize=8)
    b.set_ylabel("int4 weight SQNR (dB)")
    b.set_title("int4 weights: one scale per channel vs groups")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path_w, dpi=110)
    plt.close(fig)


# ---- figure 2 -------------------------------------------------------------------------------------------

def plot_fig2(fig2: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    single = [r for r in fig2["choices"] if r["calibration"] != "all-steps"]
    allr = next(r for r in fig2["choices"] if r["calibration"] == "all-steps")
    xs = [r["calibration"][0] for r in single]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    a.plot(xs, [r["trajectory_sqnr"] for r in single], marker="o", label="one step i")
    a.axhline(allr["trajectory_sqnr"], color="red", ls="--", label="all steps")
    a.set_xlabel("calibration step i (0 = t=T)")
    a.set_ylabel("transformer output SQNR, whole trajectory (dB)")
    a.set_title("W8A8: calibrating on one step vs all")
    a.legend(fontsize=8)
    b.plot(xs, [r["image_sqnr"] for r in single], marker="o", label="one step i")
    b.axhline(allr["image_sqnr"], color="red", ls="--", label="all steps")
    b.set_xlabel("calibration step i")
    b.set_ylabel("final image SQNR vs fp32 (dB)")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_fig4(rows: List[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["setting"] != "fp32"]
    names = [r["setting"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    a.barh(names, [r["trajectory_sqnr"] for r in rows])
    a.set_xlabel("transformer output SQNR along the fp32 trajectory (dB)")
    a.invert_yaxis()
    b.barh(names, [r["frechet_fp32"] for r in rows], color="tab:orange")
    b.set_xlabel("Fréchet distance to the fp32 samples (lower is better)")
    b.invert_yaxis()
    b.set_yticklabels([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the run --------------------------------------------------------------------------------------------

CONDITIONING = ("*norm1.linear", "*timestep_embedder*")  # layers fed by the timestep / class embedding only
SETTINGS = [  # (name, preset, calibration, group size or "fake" = per-channel emulated, skip patterns)
    ("W8A8 all-steps (baseline)", "w8a8", "all-steps", None),
    ("W8A8 first-step (paper)", "w8a8", "first-step", None),
    ("W8A8 first-step, adaLN+t-embed fp", "w8a8", "first-step", None, CONDITIONING),
    ("W8A8 all-steps, adaLN+t-embed fp", "w8a8", "all-steps", None, CONDITIONING),
    ("W4A8 per-channel all-steps (baseline)", "w4a8", "all-steps", "fake"),
    ("W4A8 per-channel first-step", "w4a8", "first-step", "fake"),
    ("W4A8 g128 all-steps", "w4a8", "all-steps", 128),
    ("W4A8 g128 first-step (paper)", "w4a8", "first-step", 128),
    ("W4A8 g64 first-step", "w4a8", "first-step", 64),
    ("W4A8 g32 first-step", "w4a8", "first-step", 32),
    ("W4A8 g32 all-steps", "w4a8", "all-steps", 32),
    # ditq's static policy (ditq.demo.run.BEST_POLICY): every step recorded, per-layer range estimator,
    # timestep-grouped static scales, smoothing where it lowers the estimated error
    ("W8A8 static policy (ditq)", "w8a8", "all-steps", None, (), "policy"),
    ("W4A8 g32 static policy (ditq)", "w4a8", "all-steps", 32, (), "policy"),
    # the same with the int4 weights rounded by GPTQ against each layer's calibration inputs (the demo's w4a8-best)
    ("W4A8 g32 static policy + GPTQ (ditq)", "w4a8", "all-steps", 32, (), "policy", {"weight_method": "gptq"}),
]
QUICK_SETTINGS = (0, 5, 7)  # every code path once: all/first step, W8, W4, the per-channel emulation


def run(args) -> dict:
    from tqdm.auto import tqdm

    from ditq import sqnr
    from ditq.demo import metrics
    from ditq.demo.data import load_digits_split
    from ditq.demo.run import save_grid

    steps, per_class, guidance, seed = args.steps, args.samples_per_class, args.guidance, args.seed
    labels = list(range(NUM_CLASSES)) * per_class
    held, _ = load_digits_split("held_out")
    held_feats = metrics.features((held + 1) / 2)
    result = {"steps": steps, "samples_per_class": per_class, "guidance": guidance, "seed": seed,
              "calibration_labels": list(range(NUM_CLASSES)), "calibration_seed": CALIB_SEED,
              "torch_threads": torch.get_num_threads()}
    t_start = time.perf_counter()

    # fp32 reference: images, the trajectory's transformer calls, one layer's per-channel ranges
    pipe = fresh_pipe()
    cfg = pipe.transformer.config
    blocks = cfg.num_layers
    result["model"] = {"blocks": blocks, "hidden": cfg.num_attention_heads * cfg.attention_head_dim,
                       "heads": cfg.num_attention_heads,
                       "parameters": sum(p.numel() for p in pipe.transformer.parameters())}
    CHANNEL_LAYER = channel_layer(blocks)
    rec = TrajectoryRecorder(pipe.transformer, CHANNEL_LAYER)
    fp_images = sample(pipe, labels, steps, seed, guidance)
    rec.remove()
    calls, channel = rec.calls, [c.cpu() for c in rec.channel_absmax]
    fp_feats = metrics.features(fp_images)
    weights = weight_analysis(pipe.transformer)
    rows = [{"setting": "fp32", "trajectory_sqnr": None, "image_sqnr": None,
             "accuracy": metrics.classifier_accuracy(fp_images, labels),
             "frechet_real": metrics.frechet_distance(fp_feats, held_feats), "frechet_fp32": None,
             "transformer_bytes": sum(p.numel() * p.element_size() for p in pipe.transformer.parameters())}]
    grid = {"fp32": fp_images[:NUM_CLASSES]}
    act_per_step = None

    settings = SETTINGS if not args.quick else [SETTINGS[i] for i in QUICK_SETTINGS]
    from ditq.demo.run import BEST_POLICY
    for name, preset, calibration, group, *more in tqdm(settings, desc="figure 4 settings",
                                                        disable=args.no_progress):
        skip = more[0] if more else ()
        extra = {k: v for k, v in BEST_POLICY.items() if k != "calibration"} if more[1:2] == ["policy"] else {}
        extra.update(more[2] if len(more) > 2 else {})
        pipe = fresh_pipe()
        if group == "fake":
            fake_quant_int4_per_channel(pipe)
            report = quantize(pipe, "w8a8", calibration, steps, guidance, skip=skip)
        else:
            report = quantize(pipe, preset, calibration, steps, guidance, group_size=group, skip=skip, **extra)
        if preset == "w8a8" and calibration == "all-steps":
            act_per_step = report.act_absmax_per_step
        images = sample(pipe, labels, steps, seed, guidance)
        feats = metrics.features(images)
        rows.append({"setting": name, "trajectory_sqnr": trajectory_sqnr(pipe.transformer, calls)["total"],
                     "image_sqnr": sqnr(fp_images, images),
                     "accuracy": metrics.classifier_accuracy(images, labels),
                     "frechet_real": metrics.frechet_distance(feats, held_feats),
                     "frechet_fp32": metrics.frechet_distance(feats, fp_feats),
                     "transformer_bytes": None if group == "fake" else report.bytes_after})
        short = {"W8A8 first-step (paper)": "w8a8 1-step", "W8A8 all-steps (baseline)": "w8a8 all",
                 "W4A8 g128 first-step (paper)": "w4a8 1-step", "W4A8 g128 all-steps": "w4a8 all"}
        if name in short:
            grid[short[name]] = images[:NUM_CLASSES]
    result["table"] = rows

    # figure 2: one calibration step at a time vs all steps (W8A8), evaluated on one sample per class
    fig2_labels = list(range(NUM_CLASSES))
    if fig2_labels == labels:  # one sample per class: the table's fp32 run is this one
        fig2_calls, fp2 = calls, fp_images
    else:
        pipe = fresh_pipe()
        rec2 = TrajectoryRecorder(pipe.transformer)
        fp2 = sample(pipe, fig2_labels, steps, seed, guidance)
        rec2.remove()
        fig2_calls = rec2.calls
    choices = sorted(set(range(0, steps, max(1, -(-steps // args.fig2_points)))) | {0, steps - 1})
    fig2 = []
    for c in tqdm([[i] for i in choices] + ["all-steps"], desc="figure 2 calibration steps",
                  disable=args.no_progress):
        pipe = fresh_pipe()
        report = quantize(pipe, "w8a8", c, steps, guidance)
        traj = trajectory_sqnr(pipe.transformer, fig2_calls)
        images = sample(pipe, fig2_labels, steps, seed, guidance)
        fig2.append({"calibration": c, "trajectory_sqnr": traj["total"], "trajectory_sqnr_per_step": traj["per_step"],
                     "image_sqnr": sqnr(fp2, images), "calib_output_sqnr": report.output_sqnr})
    result["fig2"] = {"choices": fig2}
    result["fig1"] = {"act_absmax_per_step": act_per_step,
                      "channel_layer": CHANNEL_LAYER, "channel_absmax": [c.tolist() for c in channel],
                      "weights": weights}
    result["wall_seconds"] = time.perf_counter() - t_start

    out = args.out_dir
    os.makedirs(out, exist_ok=True)
    plot_fig1(act_per_step or {}, channel, weights, fig1_layers(blocks), CHANNEL_LAYER, os.path.join(out, "fig1_activations.png"),
              os.path.join(out, "fig1_weights.png"))
    plot_fig2(result["fig2"], os.path.join(out, "fig2_calibration_step.png"))
    save_grid(grid, os.path.join(out, "fig3_grid.png"))
    plot_fig4(rows, os.path.join(out, "fig4_settings.png"))
    result["quick"] = args.quick
    with open(os.path.join(out, "paper_figures.json"), "w") as f:
        json.dump(_finite(result), f, indent=1)
    return result


def _finite(o):
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, dict):
        return {str(k): _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


# ---- the markdown ---------------------------------------------------------------------------------------

def _f(v, fmt=".1f"):
    return "-" if v is None else format(v, fmt)


def _k_sentence(layers: List[dict]) -> str:
    """Which inner dimensions the quantized linears have, and what that means for groups of 128."""
    ks = sorted({lr["K"] for lr in layers})
    small = [lr for lr in layers if lr["K"] <= 128]
    if not small:
        return (f"Every quantized linear has K >= {ks[0]} (K in {ks}), so groups of 128, 64 and 32 are all true "
                f"sub-channel groups here.")
    return (f"{len(small)} of {len(layers)} quantized linears have K <= 128; there groups of 128 *are* per-channel "
            f"scales (a gain of 0 dB) and only layers with larger K (K in {ks}) can show the group-128 effect.")


def findings(r: dict) -> List[str]:
    """Sentences comparing our numbers with the paper's claims; each states the numbers it rests on."""
    out = []
    act = r["fig1"]["act_absmax_per_step"] or {}
    if act:
        first_is_max = [n for n, rec in act.items() if rec and max(rec, key=lambda s: rec[s]) in (0, "0")]
        ratios = [max(rec.values()) / min(v for v in rec.values() if v > 0) for rec in act.values() if rec]
        ratios.sort()
        out.append(f"**Activation ranges move across steps (Fig. 1 top).** Over {r['steps']} steps, the ratio "
                   f"of a layer's largest to smallest per-step input absmax has median {ratios[len(ratios) // 2]:.2f}x "
                   f"and maximum {ratios[-1]:.2f}x across {len(ratios)} layers; the first step (t = T) holds the "
                   f"largest range in {len(first_is_max)} of {len(act)} layers. The paper reports ranges that move "
                   f"with the timestep: " + ("ours do too." if ratios[-1] > 1.5 else "ours move little."))
        later = {}
        for n, rec in act.items():
            if rec and (rec.get(0) or rec.get("0")):
                later.setdefault(layer_type(n), []).append(max(rec.values()) / (rec.get(0) or rec.get("0")))
        med = {t: sorted(v)[len(v) // 2] for t, v in later.items()}
        out.append("**What a first-step scale clips later.** Median over layers of (largest per-step absmax) / "
                   "(step-0 absmax), per layer type: " + ", ".join(f"{t} {m:.2f}x" for t, m in med.items()) +
                   ". A ratio above 1 means a static scale taken at t = T saturates at later steps.")
    ch = r["fig1"]["channel_absmax"]
    if ch:
        k = 5
        tops = [set(torch.tensor(c).topk(k).indices.tolist()) for c in ch]
        overlap = len(tops[0] & tops[-1])
        med = [float(torch.tensor(c).median()) for c in ch]
        mx = [max(c) for c in ch]
        out.append(f"**Persistent outlier channels.** In `{r['fig1']['channel_layer']}` the {k} input channels "
                   f"with the largest range at the first step and at the last step share {overlap} of {k}; the "
                   f"largest channel is {mx[0] / med[0]:.1f}x the median channel at the first step and "
                   f"{mx[-1] / med[-1]:.1f}x at the last. " + (
                       "As in the paper, the outliers sit in the same channels throughout sampling." if overlap >= 3
                       else "Unlike the paper, the outlier channels change along the trajectory."))
    w = r["fig1"]["weights"]["by_type"]
    gains = {t: v["g32"] - v["per_channel"] for t, v in w.items() if "g32" in v}
    g128 = {t: v["g128"] - v["per_channel"] for t, v in w.items() if "g128" in v}
    if gains:
        out.append("**Group-wise int4 weights (Fig. 1 bottom).** int4 weight SQNR gains over one scale per output "
                   "channel, averaged per layer type: groups of 32 " +
                   ", ".join(f"{t} +{g:.1f} dB" for t, g in gains.items()) + "; groups of 128 " +
                   ", ".join(f"{t} +{g:.1f} dB" for t, g in g128.items()) +
                   ". " + _k_sentence(r["fig1"]["weights"]["layers"]))
    ov = r["fig1"]["weights"].get("overall", {})
    if "g32" in ov:
        d = ov["g32"] - ov["per_channel"]
        text = (f"**Groups of 32 vs one scale per channel, all {len(r['fig1']['weights']['layers'])} quantized "
                f"linears.** Mean int4 weight SQNR {ov['per_channel']:.2f} dB per channel, {ov['g32']:.2f} dB at "
                f"g32 ({d:+.2f} dB); the paper claims at least 1 dB: ours " +
                ("agrees." if d >= 1.0 else "does not reach it."))
        if "g32_mse" in ov:
            text += (f" Choosing each g32 group's clip by weight MSE (`weight_method=\"mse\"`) adds "
                     f"{ov['g32_mse'] - ov['g32']:+.2f} dB more ({ov['g32_mse']:.2f} dB).")
        out.append(text)
    rows = {row["setting"]: row for row in r["table"]}

    def cmp(a, b):
        ra, rb = rows.get(a), rows.get(b)
        if not ra or not rb:
            return None
        d = ra["trajectory_sqnr"] - rb["trajectory_sqnr"]
        di = ra["image_sqnr"] - rb["image_sqnr"]
        return (f"Trajectory SQNR {ra['trajectory_sqnr']:.1f} vs {rb['trajectory_sqnr']:.1f} dB "
                f"({d:+.1f}), final images {ra['image_sqnr']:.1f} vs {rb['image_sqnr']:.1f} dB ({di:+.1f}), "
                f"Fréchet to fp32 {ra['frechet_fp32']:.2f} vs {rb['frechet_fp32']:.2f}"), d, di

    for a, b, what, claim in [
            ("W8A8 first-step (paper)", "W8A8 all-steps (baseline)", "W8A8, first-step vs all-steps calibration",
             "the paper finds first-step calibration better"),
            ("W8A8 first-step, adaLN+t-embed fp", "W8A8 all-steps, adaLN+t-embed fp",
             "W8A8 with adaLN and timestep-embedder linears in full precision, first-step vs all-steps",
             "the paper finds first-step calibration better"),
            ("W4A8 g128 first-step (paper)", "W4A8 g128 all-steps", "W4A8 g128, first-step vs all-steps",
             "the paper finds first-step calibration better"),
            ("W4A8 g128 first-step (paper)", "W4A8 per-channel first-step", "W4A8 first-step, g128 vs per-channel",
             "the paper finds group-wise int4 better"),
            ("W4A8 g32 first-step", "W4A8 per-channel first-step", "W4A8 first-step, g32 vs per-channel",
             "the paper finds group-wise int4 better")]:
        c = cmp(a, b)
        if c:
            text, d, di = c
            verdict = ("agrees" if d > 0.5 and di > 0 else "disagrees" if d < -0.5 and di < 0
                       else "is mixed or within noise")
            out.append(f"**{what}.** {text}. {claim[0].upper() + claim[1:]}; ours {verdict}.")
    f2 = r["fig2"]["choices"]
    single = [c for c in f2 if c["calibration"] != "all-steps"]
    best = max(single, key=lambda c: c["trajectory_sqnr"])
    allr = next(c for c in f2 if c["calibration"] == "all-steps")
    first = next(c for c in single if c["calibration"] == [0])
    out.append(f"**Which single step to calibrate on (Fig. 2).** Trajectory SQNR: step 0 (t = T) "
               f"{first['trajectory_sqnr']:.1f} dB, best single step {best['calibration'][0]} "
               f"{best['trajectory_sqnr']:.1f} dB, all steps {allr['trajectory_sqnr']:.1f} dB; final-image SQNR "
               f"{first['image_sqnr']:.1f} / {best['image_sqnr']:.1f} / {allr['image_sqnr']:.1f} dB. The paper "
               f"finds the first step best; ours " +
               ("agrees." if best["calibration"] == [0] and first["trajectory_sqnr"] >= allr["trajectory_sqnr"]
                else "does not: " + ("another single step" if best["calibration"] != [0] else "all-steps") +
                " calibrates better here."))
    return out


def markdown(r: dict, fig_rel: str) -> str:
    lines = ["# The paper's analysis on the bundled digits DiT", "",
             "Generated by `benchmarks/paper_figures.py`" + (" --quick" if r.get("quick") else "") +
             f" ({r['steps']} DDIM steps, guidance {r['guidance']}, {r['samples_per_class']} samples per class = "
             f"{r['samples_per_class'] * NUM_CLASSES} images from seed {r['seed']}; calibration on class labels "
             f"0-9 with seed {r['calibration_seed']}; {r['torch_threads']} CPU "
             f"thread{'s' if r['torch_threads'] != 1 else ''}, "
             f"{r['wall_seconds'] / 60:.1f} min). Backend: the torch reference (real integer arithmetic on CPU).",
             "", f"The model is small ({r['model']['blocks']} blocks, hidden {r['model']['hidden']}, 64 tokens of "
             f"16x16 pixels, {r['model']['parameters'] / 1e6:.1f} M parameters; see "
             "`ditq/demo/MODEL_CARD.md`), so it can only echo the paper, which measured DiT-XL/2 on ImageNet.", "",
             "## Settings (paper Fig. 4 and tables)", "",
             "| setting | trajectory SQNR dB | image SQNR dB | accuracy % | Fréchet vs real | Fréchet vs fp32 | "
             "transformer bytes |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in r["table"]:
        lines.append(f"| {row['setting']} | {_f(row['trajectory_sqnr'])} | {_f(row['image_sqnr'])} | "
                     f"{100 * row['accuracy']:.0f} | {_f(row['frechet_real'], '.2f')} | "
                     f"{_f(row['frechet_fp32'], '.2f')} | "
                     f"{'(emulated)' if row['transformer_bytes'] is None else format(row['transformer_bytes'], ',')} |")
    lines += ["", "Trajectory SQNR: the quantized transformer fed each step's fp32 inputs, output vs fp32 output, "
              "over all steps. Image SQNR: final images vs fp32 from the same noise. Fréchet: on the digit "
              "classifier's features (FID-style; it grows as samples shrink, so compare within this table). "
              "Per-channel W4 is emulated (fake-quantized int4 weights served by the W8A8 path).", "",
              "## Calibrating on one step vs all steps (paper Fig. 2), W8A8", "",
              "| calibration | trajectory SQNR dB | image SQNR dB |", "|---|---:|---:|"]
    for c in r["fig2"]["choices"]:
        name = "all steps" if c["calibration"] == "all-steps" else f"step {c['calibration'][0]} only"
        lines.append(f"| {name} | {c['trajectory_sqnr']:.1f} | {c['image_sqnr']:.1f} |")
    lines += ["", "## int4 weight SQNR by layer type (paper Fig. 1 bottom), dB", "",
              "| layer type | per channel | g128 | g64 | g32 | g32, mse clip |", "|---|---:|---:|---:|---:|---:|"]
    weights = r["fig1"]["weights"]
    for t, v in list(weights["by_type"].items()) + [("**all**", weights.get("overall", {}))]:
        lines.append(f"| {t} | {_f(v.get('per_channel'))} | {_f(v.get('g128'))} | {_f(v.get('g64'))} | "
                     f"{_f(v.get('g32'))} | {_f(v.get('g32_mse'))} |")
    lines += ["", "## Where our small model agrees with the paper, and where not", ""]
    lines += [f"- {s}" for s in findings(r)]
    lines += ["", "## Figures", ""]
    for f, cap in [("fig1_activations.png", "Fig. 1 top: activation ranges per step; per-channel ranges"),
                   ("fig1_weights.png", "Fig. 1 bottom: a weight channel's outliers; int4 per-channel vs groups"),
                   ("fig2_calibration_step.png", "Fig. 2: calibrating on one step vs all steps"),
                   ("fig3_grid.png", "Fig. 3: samples, first-step vs all-steps calibration"),
                   ("fig4_settings.png", "Fig. 4: all settings")]:
        lines += [f"![{cap}]({fig_rel}/{f})", "", f"*{cap}*", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="CI mode: 3 steps, 1 sample per class, 3 settings, Fig. 2 at the first and last step")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 10; --quick 3)")
    p.add_argument("--samples-per-class", type=int, default=None, help="default 3; --quick 1")
    p.add_argument("--fig2-points", type=int, default=5, help="how many single calibration steps Fig. 2 tries")
    p.add_argument("--guidance", type=float, default=1.5, help="the bundled model's measured setting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=os.path.join(HERE, "figures"), help="PNGs and paper_figures.json")
    p.add_argument("--markdown", default=os.path.join(HERE, "PAPER_FIGURES.md"), help="markdown file to write")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--from-json", metavar="PATH",
                   help="rewrite the markdown from a saved paper_figures.json (no model runs, PNGs untouched)")
    args = p.parse_args(argv)
    args.steps = args.steps or (3 if args.quick else 10)
    args.samples_per_class = args.samples_per_class or (1 if args.quick else 3)
    if args.quick:
        args.fig2_points = 1  # steps 0 and the last one
    if args.steps < 2 or args.samples_per_class < 1 or args.fig2_points < 1:
        print("paper_figures: error: --steps must be >= 2, --samples-per-class and --fig2-points >= 1",
              file=sys.stderr)
        return 1
    if args.from_json:
        with open(args.from_json) as f:
            r = json.load(f)
    else:
        from diffusers.utils import logging as dlogging
        dlogging.disable_progress_bar()  # "Loading pipeline components" once per setting
        r = run(args)
    rel = os.path.relpath(args.out_dir, os.path.dirname(os.path.abspath(args.markdown)))
    with open(args.markdown, "w") as f:
        f.write(markdown(r, rel) + "\n")
    print("\n".join(findings(r)))
    print(f"wrote {args.out_dir}/*.png and {args.markdown} in {r['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Model benchmark: one transformer call (one denoising step) of a model with exactly DiT-XL/2's architecture and
random weights (diffusers ``DiTTransformer2DModel``, 28 blocks, 16 x 72 heads, patch 2), at 256 px (32 x 32
latent) and 512 px (64 x 64), batch 1-32 with classifier-free guidance (the transformer sees 2 x batch).

Variants: bf16 eager / CUDA graph / ``torch.compile``; ditq W8A8 and W4A8 (``ditq.quantize`` with a first-step
calibration call) eager / CUDA graph / compiled; torchao int8 dynamic activations when installed. Per case: median
step latency (CUDA events), latency per image, images per second (per step), peak GPU memory during the step
(this model's weights plus the step's transient allocations), the transformer's weight bytes, speedups vs bf16
eager and bf16 compiled.

    python benchmarks/bench_model.py                       # full grid on the GPU (compiles take minutes)
    python benchmarks/bench_model.py --resolutions 256 --batches 1 8 --compile-batches 8 --max-seconds 240
    python benchmarks/bench_model.py --smoke               # 2-block tiny DiT on CPU, torch backend, same schema

Writes model.json, model.md and model_latency.png under --out / $OUT / benchmarks/out.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import traceback
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SCHEMA = "ditq.bench_model/1"
XL = dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
          patch_size=2, num_embeds_ada_norm=1000)
TINY = dict(num_layers=2, num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8,
            patch_size=2, num_embeds_ada_norm=10)
SAMPLE_SIZE = {256: 32, 512: 64}  # latent side = pixels / 8 (the VAE's factor)
# "-fused": the same quantization with QuantConfig(fuse=True) (one q/k/v GEMM, quantization inside the norms,
# GEMM epilogues that feed the next layer): the pair measures what fusion buys, side by side in one run.
PRECISIONS = ("bf16", "w8a8", "w8a8-fused", "w4a8", "w4a8-fused", "torchao-int8dq")
MODES = ("eager", "cudagraph", "compile")
ROW_KEYS = ("resolution", "sample_size", "batch", "cfg_batch", "tokens_per_image", "M", "variant", "precision",
            "mode", "status", "median_ms", "min_ms", "ms_per_image", "images_per_s", "peak_mem_gib", "step_extra_gib",
            "weight_bytes", "weight_ratio_vs_bf16", "speedup_vs_bf16_eager", "speedup_vs_bf16_compile",
            "first_call_s", "timing", "output_sqnr_db", "fused_blocks")


def build_model(torch, cfg: Dict, sample_size: int, device, dtype):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)  # every variant starts from the same random weights
    with torch.device(device):
        model = DiTTransformer2DModel(sample_size=sample_size, **cfg)
    return model.to(dtype).eval().requires_grad_(False)


def make_inputs(torch, cfg: Dict, sample_size: int, batch: int, device, dtype) -> Dict:
    """Classifier-free guidance: the conditional half, then the null class (index num_embeds_ada_norm)."""
    g = torch.Generator(device="cpu").manual_seed(batch)
    n_cls = cfg["num_embeds_ada_norm"]
    x = torch.randn(batch, cfg["in_channels"], sample_size, sample_size, generator=g)
    labels = torch.randint(0, n_cls, (batch,), generator=g)
    return dict(hidden_states=torch.cat([x, x]).to(device, dtype),
                timestep=torch.full((2 * batch,), 999, dtype=torch.long, device=device),
                class_labels=torch.cat([labels, torch.full_like(labels, n_cls)]).to(device),
                return_dict=False)


def quantize(torch, model, precision: str, backend: str, calib: Dict):
    """The one call that turns a bf16 model into a ditq (or torchao) one; returns an info dict."""
    if precision == "torchao-int8dq":
        from torchao.quantization import quantize_
        try:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig as cfg
        except ImportError:
            from torchao.quantization import int8_dynamic_activation_int8_weight as cfg
        quantize_(model, cfg())
        return {}
    import ditq
    preset, fused = precision.removesuffix("-fused"), precision.endswith("-fused")
    cfg = ditq.QuantConfig.preset(preset, backend=backend, progress=False, fuse=fused)
    rep = ditq.quantize(model, cfg, calib_fn=lambda m: m(**calib))
    info = {"output_sqnr_db": rep.output_sqnr, "backend": rep.backend, "quantized_layers": len(rep.layers)}
    if fused:  # a fusion that did not apply would make the pair measure nothing: the row says how many blocks ran fused
        info["fused_blocks"] = sum(why is None for why in rep.fusion.get("blocks", {}).values())
    return info


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + [b for b in model.buffers() if b is not None]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def timed_runner(torch, model, mode: str, inputs: Dict, device, smoke: bool):
    """(fn(i), seconds the first call took): the callable that the timing loop runs for one mode."""
    t0 = time.perf_counter()
    if mode == "eager":
        fn = lambda i: model(**inputs)  # noqa: E731
        fn(0)
    elif mode == "compile":
        # Smoke: dynamo with the eager backend traces the whole model (custom ops through their fake impls)
        # without a C++ toolchain; on a GPU the default Inductor backend, static shapes per batch.
        compiled = torch.compile(model, backend="eager" if smoke else "inductor", dynamic=False)
        fn = lambda i: compiled(**inputs)  # noqa: E731
        fn(0)
    elif mode == "cudagraph":
        if device.type != "cuda":
            raise NotImplementedError("CUDA graphs need a CUDA device")
        s = torch.cuda.Stream(device)
        s.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(s):
            for _ in range(3):
                model(**inputs)
        torch.cuda.current_stream(device).wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(**inputs)
        fn = lambda i: graph.replay()  # noqa: E731
        fn(0)
        fn.graph = graph  # keep it alive as long as the callable
    else:
        raise ValueError(mode)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return fn, time.perf_counter() - t0


def enumerate_cases(resolutions, batches, precisions) -> List[Dict]:
    return [dict(resolution=r, batch=b, precision=p, mode=m, variant=f"{p} {m}")
            for r in resolutions for p in precisions for m in MODES for b in batches]


def run(args, torch, device, dtype) -> Dict:
    cfg = TINY if args.smoke else XL
    sizes = {r: (8 if args.smoke else SAMPLE_SIZE[r]) for r in args.resolutions}
    cases = enumerate_cases(args.resolutions, args.batches, args.precisions)
    deadline = common.Deadline(args.max_seconds)
    rows = {}
    p = cfg["patch_size"]

    def base(c):
        s = sizes[c["resolution"]]
        tokens = (s // p) ** 2
        return dict({k: c.get(k) for k in ROW_KEYS}, sample_size=s, cfg_batch=2 * c["batch"],
                    tokens_per_image=tokens, M=2 * c["batch"] * tokens)

    for res in args.resolutions:
        # All precisions are built first (DiT-XL/2 weights are ~1.3 GB in bf16: they fit together), then each mode
        # runs over all of them: eager and CUDA-graph numbers for every precision arrive before the slow compiles,
        # so a --max-seconds budget cuts compiles, not whole precisions.
        models: Dict[str, tuple] = {}
        for prec in args.precisions:
            if deadline.passed():
                models[prec] = (None, {}, "skipped: time budget (--max-seconds)")
                continue
            info, model, err = {}, None, None
            try:
                model = build_model(torch, cfg, sizes[res], device, dtype)
                if prec != "bf16":
                    calib = make_inputs(torch, cfg, sizes[res], 1, device, dtype)
                    info = quantize(torch, model, prec, args.backend, calib)
            except Exception as e:
                err = f"error: {'quantize' if model is not None else 'build'} failed: {type(e).__name__}: " \
                      f"{str(e).splitlines()[0][:200] if str(e) else ''}"
                model = None
                if args.verbose:
                    traceback.print_exc()
            models[prec] = (model, info, err)
        for mode in MODES:
            for prec in args.precisions:
                model, info, err = models[prec]
                wbytes = weight_bytes(model) if model is not None else None
                for c in [c for c in cases if (c["resolution"], c["precision"], c["mode"]) == (res, prec, mode)]:
                    row = dict(base(c), weight_bytes=wbytes, output_sqnr_db=info.get("output_sqnr_db"),
                               fused_blocks=info.get("fused_blocks"))
                    rows[id(c)] = row
                    if err:
                        row["status"] = err
                    elif deadline.passed():
                        row["status"] = "skipped: time budget (--max-seconds)"
                    elif mode == "compile" and args.compile_batches and c["batch"] not in args.compile_batches:
                        row["status"] = "skipped: batch not in --compile-batches"
                    elif mode == "cudagraph" and device.type != "cuda":
                        row["status"] = "skipped: CUDA graphs need a GPU"
                    else:
                        run_one(torch, model, cfg, sizes[res], c, row, device, dtype, args)
                    if args.verbose:
                        print(f"{res}px b{c['batch']} {c['variant']}: {row['status']} "
                              f"{common.fmt(row.get('median_ms'))} ms", file=sys.stderr)
                if mode == "compile" and hasattr(torch, "_dynamo"):
                    torch._dynamo.reset()  # this precision's compiled graphs are done with
        models.clear()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out = [rows[id(c)] for c in cases]
    add_ratios(out)
    return {"cases": len(cases), "rows": out, "config": dict(cfg), "sample_sizes": sizes}


def run_one(torch, model, cfg, sample_size, c, row, device, dtype, args) -> None:
    fn = None
    try:
        inputs = make_inputs(torch, cfg, sample_size, c["batch"], device, dtype)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            resident = torch.cuda.memory_allocated(device)  # every built model's weights, and these inputs
        fn, first = timed_runner(torch, model, c["mode"], inputs, device, args.smoke)
        t = common.time_calls(fn, device, args.warmup, args.iters)
        ms = t["median_ms"]
        row.update(status="ok", median_ms=ms, min_ms=t["min_ms"], timing=t["timing"], first_call_s=first,
                   ms_per_image=ms / c["batch"], images_per_s=c["batch"] / (ms * 1e-3))
        if device.type == "cuda":
            # Peak of this model alone: its weights plus what the step (graph pools, compiled buffers included)
            # allocated on top of everything resident before it. The other precisions' models do not count.
            extra = torch.cuda.max_memory_allocated(device) - resident
            row["step_extra_gib"] = extra / 2 ** 30
            row["peak_mem_gib"] = (row["weight_bytes"] + extra) / 2 ** 30
    except Exception as e:
        row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if args.verbose:
            traceback.print_exc()
    finally:
        del fn


def add_ratios(rows: List[Dict]) -> None:
    ref = {}
    for r in rows:
        if r["precision"] == "bf16" and r["status"] == "ok":
            ref[(r["resolution"], r["batch"], r["mode"])] = r["median_ms"]
        if r["precision"] == "bf16" and r.get("weight_bytes"):
            ref[("bytes", r["resolution"])] = r["weight_bytes"]
    for r in rows:
        wb = ref.get(("bytes", r["resolution"]))
        if r.get("weight_bytes") and wb:
            r["weight_ratio_vs_bf16"] = r["weight_bytes"] / wb
        if r["status"] != "ok":
            continue
        for mode, key in (("eager", "speedup_vs_bf16_eager"), ("compile", "speedup_vs_bf16_compile")):
            b = ref.get((r["resolution"], r["batch"], mode))
            if b:
                r[key] = b / r["median_ms"]


def plot(rows: List[Dict], path: str):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    res_list = list(dict.fromkeys(r["resolution"] for r in rows))
    fig, axes = plt.subplots(1, len(res_list), figsize=(6 * len(res_list), 4), squeeze=False)
    for ax, res in zip(axes[0], res_list):
        sel = [r for r in rows if r["resolution"] == res and r["status"] == "ok"]
        for v in dict.fromkeys(r["variant"] for r in sel):
            pts = sorted((r["batch"], r["ms_per_image"]) for r in sel if r["variant"] == v)
            ax.plot([q[0] for q in pts], [q[1] for q in pts], marker="o", ms=3, label=v)
        ax.set(xscale="log", yscale="log", title=f"DiT-XL/2 architecture, {res} px, one step, CFG",
               xlabel="images per batch", ylabel="ms per image per step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


MD_COLS = ["resolution", "batch", "M", "variant", "status", "median_ms", "ms_per_image", "images_per_s",
           "peak_mem_gib", "weight_bytes", "weight_ratio_vs_bf16", "speedup_vs_bf16_eager",
           "speedup_vs_bf16_compile", "first_call_s"]
MD_HEAD = ["px", "batch", "M", "variant", "status", "step ms", "ms/image", "images/s (per step)", "peak GiB",
           "weight bytes", "weights vs bf16", "speedup vs bf16 eager", "speedup vs bf16 compiled",
           "first call s"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny 2-block DiT on CPU with the torch backend")
    ap.add_argument("--resolutions", type=int, nargs="+", choices=sorted(SAMPLE_SIZE), default=[256, 512])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--compile-batches", type=int, nargs="+", help="compile only these batches (compiles are slow)")
    ap.add_argument("--precisions", nargs="+", choices=PRECISIONS, help="default: all (torchao when installed)")
    ap.add_argument("--backend", default="auto", help="ditq backend for the quantized variants")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--max-seconds", type=float, default=None, help="budget: later cases become 'skipped' rows")
    ap.add_argument("--out", help="output folder (default $OUT or benchmarks/out)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)

    device = common.select_device(args, "tiny DiT on CPU")
    import torch

    if args.smoke:
        args.resolutions, args.batches = [256], [1, 2]
        args.backend = "torch" if args.backend == "auto" else args.backend
    if args.precisions is None:
        args.precisions = [p for p in PRECISIONS if p != "torchao-int8dq"]
        try:
            import torchao  # noqa: F401
            if not args.smoke:
                args.precisions.append("torchao-int8dq")
        except ImportError:
            pass
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    args.iters = args.iters if args.iters is not None else (2 if args.smoke else 10)
    dtype = torch.bfloat16
    import torch._dynamo  # one forward code object serves every model and batch: raise the recompile cap (8)
    for name in ("cache_size_limit", "recompile_limit"):  # the name changed across torch versions
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    try:
        import diffusers  # noqa: F401
    except ImportError as e:
        res = {"cases": 0, "rows": [], "config": {}, "sample_sizes": {},
               "error": f"diffusers is not installed ({e}); carry its wheel (see gpu_suite.sh)"}
    else:
        res = run(args, torch, device, dtype)
    report = {"schema": SCHEMA, "smoke": args.smoke, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
              "backend": args.backend, "precisions": list(args.precisions), "resolutions": list(args.resolutions),
              "batches": list(args.batches), "env": common.environment(), **res}
    d = common.out_dir(args.out)
    common.write_json(os.path.join(d, "model.json"), report)
    where = "smoke: tiny DiT on CPU" if args.smoke else report["env"].get("gpu")
    title = f"## DiT-XL/2-architecture step latency ({where})"
    md = "\n".join([title, "", common.env_markdown(report["env"]), "",
                    "One transformer call (one denoising step) with classifier-free guidance (M = 2 x batch x tokens); "
                    "random weights; peak memory includes the weights.", "",
                    report.get("error") or common.md_table(report["rows"], MD_COLS, MD_HEAD)]) + "\n"
    with open(os.path.join(d, "model.md"), "w") as f:
        f.write(md)
    png = plot(report["rows"], os.path.join(d, "model_latency.png"))
    short = [r for r in report["rows"] if r["batch"] in (1, 8) and r["resolution"] == args.resolutions[0]]
    print(common.md_table(short, ["resolution", "batch", "variant", "status", "median_ms", "peak_mem_gib",
                                  "weight_ratio_vs_bf16", "speedup_vs_bf16_compile"]))
    ok = sum(r["status"] == "ok" for r in report["rows"])
    written = "model.json, model.md" + (", model_latency.png" if png else "")
    print(f"\n{ok}/{len(report['rows'])} cases ok; wrote {written} in {d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

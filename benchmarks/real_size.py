"""Real-size transformers through ditq on the CPU: build, quantize, run, save and load DiT-XL/2, PixArt-Sigma and
SD3-medium with random weights and their published architectures, measuring time and peak resident memory.

What the README promises users who have the hub models: they go through the same code path as the tiny test
models, and quantization goes layer by layer, so peak memory stays near the model's own size. This script checks
both at the real layer shapes, without downloads (random weights; the configs are the hub models'):

- ``dit``: DiT-XL/2 (``benchmarks/bench_model.py``'s config; 675M parameters) at 256 px: a 32 x 32 latent, 256
  image tokens, batch 1 with classifier-free guidance (the transformer sees 2 images).
- ``pixart``: PixArt-Sigma's transformer (PixArt-Sigma-XL-2-1024-MS: 28 blocks, 16 x 72 heads, T5 features of
  width 4096, 300 text tokens), built with its 1024 px config (sample size 128) but run on a 32 x 32 latent (its
  patch embedding takes any even latent size and recomputes the positional table; the native 128 x 128 latent,
  4096 tokens, would make every forward ~20x slower on this CPU); batch 1 with guidance.
- ``sd3``: SD3-medium's transformer (24 joint blocks, 24 x 64 heads, 2B parameters, 77 CLIP + 256 T5 text tokens),
  32 x 32 latent (its positional table is cropped from pos_embed_max_size 192), batch 1 with guidance.
- ``flux``: FLUX.1-dev (12B parameters) is only counted on the meta device: 48 GB in float32 and 24 GB in bf16
  do not fit this machine's memory (``--max-rss-gb``), so it is never built.

Per model, before anything is built, the parameters are counted on the meta device and the run's peak is
estimated (float model + packed copy + the interpreter); a model over ``--max-rss-gb`` is skipped, saying so.
Per model and config (W8A8 = ``QuantConfig.preset("w8a8")``, W4A8 g128 = ``preset("w4a8")``; both
``backend="torch"``, static first-step activation scales from one forward at the real shapes), in a fresh
subprocess so that peak RSS belongs to that run alone: build (time), one float forward (time, the reference),
``ditq.quantize`` (time, peak RSS sampled every 10 ms from /proc/self/statm, layers quantized / skipped and why),
one quantized forward (time, output SQNR vs the float output), ``save_quantized`` (time, bytes on disk, peak RSS).
Then, in another fresh subprocess, ``load_quantized`` (time, peak RSS) and one forward, whose output must equal
the one computed before saving bit for bit.

    nice -n 10 python3 benchmarks/real_size.py --models dit --update-results      # ~10 min on 1 thread here
    python3 benchmarks/real_size.py --tiny                                         # tiny configs, seconds

Writes real_size.json (rewritten after every run) and real_size.md under --out / $OUT / benchmarks/out;
``--update-results`` also writes each model's entry into benchmarks/RESULTS.md (a model measured again replaces
its entry).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402
from bench_model import FLUX_DEV, TINY as DIT_TINY, XL as DIT_XL  # noqa: E402  (one source of the configs)

SCHEMA = "ditq.real_size/1"
GIB = 2 ** 30

# PixArt-Sigma-XL-2-1024-MS's transformer/config.json (diffusers' defaults are that model's, except these)
PIXART_SIGMA = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                    cross_attention_dim=1152, caption_channels=4096, sample_size=128, patch_size=2,
                    norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                    num_embeds_ada_norm=1000, interpolation_scale=2, use_additional_conditions=False)
PIXART_TINY = dict(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=2,
                   cross_attention_dim=64, caption_channels=32, sample_size=8, patch_size=2,
                   norm_type="ada_norm_single", use_additional_conditions=False)
# stable-diffusion-3-medium-diffusers' transformer/config.json
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
SD3_TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=32,
                num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=32,
                out_channels=4, pos_embed_max_size=16)

# name -> (diffusers class, real config, tiny config, latent side (real, tiny), text tokens (real, tiny))
MODELS = {
    "dit": ("DiTTransformer2DModel", dict(DIT_XL, sample_size=32), dict(DIT_TINY, sample_size=8), (32, 8), (0, 0)),
    "pixart": ("PixArtTransformer2DModel", PIXART_SIGMA, PIXART_TINY, (32, 8), (300, 6)),
    "sd3": ("SD3Transformer2DModel", SD3_MEDIUM, SD3_TINY, (32, 8), (77 + 256, 6)),
    "flux": ("FluxTransformer2DModel", FLUX_DEV, None, (128, None), (512, None)),
}
TITLE = {"dit": "DiT-XL/2", "pixart": "PixArt-Sigma (1024 px config)", "sd3": "SD3-medium", "flux": "FLUX.1-dev"}
CONFIGS = {"w8a8": dict(preset="w8a8"), "w4a8-g128": dict(preset="w4a8", group_size=128)}
CFG_BATCH = 2  # batch 1 with classifier-free guidance: the transformer sees the image twice


# ---- memory ---------------------------------------------------------------------------------------------------

def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler:
    """Peak resident memory per phase, sampled every ``period`` s by a thread (torch's allocations are invisible
    to tracemalloc; ru_maxrss only gives the whole process's peak). BLAS and most torch ops release the GIL, so
    the sampler runs during them; a spike shorter than the period can be missed, ru_maxrss bounds it above."""

    def __init__(self, period: float = 0.01, collect: bool = True):
        self.period, self.peak, self._stop = period, rss_bytes(), threading.Event()
        self.collect = collect  # gc before each phase: ~1 s in a process that imported diffusers (so not in tests)
        self.phases: Dict[str, Dict] = {}
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stop.wait(self.period):
            self.peak = max(self.peak, rss_bytes())

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.collect:
            gc.collect()
        before = rss_bytes()
        self.peak = before
        t0 = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - t0
            after = rss_bytes()
            self.phases[name] = {"seconds": seconds, "rss_before": before, "rss_after": after,
                                 "peak_rss": max(self.peak, after)}

    def stop(self):
        self._stop.set()
        self._thread.join()


def machine() -> Dict:
    """The CPU model, core count and memory (common.environment names only the architecture on a CPU)."""
    out: Dict = {"cores": os.cpu_count()}
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        out["cpu_model"] = names[0] if names else None
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/meminfo") as f:
            out["mem_total_gib"] = round(int(f.readline().split()[1]) * 1024 / GIB, 1)
    return out


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


# ---- models ---------------------------------------------------------------------------------------------------

def model_class(name: str):
    import diffusers
    return getattr(diffusers, MODELS[name][0])


def model_config(name: str, tiny: bool) -> Dict:
    return dict(MODELS[name][2 if tiny else 1])


def count_params(name: str, tiny: bool) -> Dict:
    """Parameters and the linears' share, counted on the meta device (nothing allocated: FLUX.1's 12B too)."""
    import torch
    from accelerate import init_empty_weights

    with init_empty_weights():
        m = model_class(name)(**model_config(name, tiny))
    total = sum(p.numel() for p in m.parameters())
    linear = sum(mod.weight.numel() for mod in m.modules() if isinstance(mod, torch.nn.Linear))
    return {"params": total, "linear_params": linear}


def build(name: str, tiny: bool, dtype):
    """Random weights (diffusers' own initialisation, seed 0) made directly in ``dtype``: no float32 copy first."""
    import torch

    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = model_class(name)(**model_config(name, tiny))
    finally:
        torch.set_default_dtype(prev)
    return model.eval().requires_grad_(False)


def make_inputs(name: str, tiny: bool, dtype) -> Dict:
    """What the model's pipeline hands the transformer at its first step, batch 1 with guidance (both halves
    random: the numbers, not the prompts, matter here)."""
    import torch

    cfg = model_config(name, tiny)
    side = MODELS[name][3][1 if tiny else 0]
    text = MODELS[name][4][1 if tiny else 0]
    g = torch.Generator().manual_seed(0)
    b = CFG_BATCH
    x = torch.randn(b, cfg["in_channels"], side, side, generator=g).to(dtype)
    if name == "dit":
        labels = torch.randint(0, cfg["num_embeds_ada_norm"], (1,), generator=g)
        return dict(hidden_states=x, timestep=torch.full((b,), 999, dtype=torch.long),
                    class_labels=torch.cat([labels, torch.full_like(labels, cfg["num_embeds_ada_norm"])]),
                    return_dict=False)
    if name == "pixart":
        return dict(hidden_states=x,
                    encoder_hidden_states=torch.randn(b, text, cfg["caption_channels"], generator=g).to(dtype),
                    encoder_attention_mask=torch.ones(b, text), timestep=torch.full((b,), 999, dtype=torch.long),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)
    if name == "sd3":
        return dict(hidden_states=x,
                    encoder_hidden_states=torch.randn(b, text, cfg["joint_attention_dim"], generator=g).to(dtype),
                    pooled_projections=torch.randn(b, cfg["pooled_projection_dim"], generator=g).to(dtype),
                    timestep=torch.full((b,), 1000.0, dtype=dtype), return_dict=False)
    raise ValueError(f"no inputs for {name!r}")


def tokens(name: str, tiny: bool) -> Dict:
    side = MODELS[name][3][1 if tiny else 0]
    p = model_config(name, tiny)["patch_size"]
    return {"latent": side, "image_tokens": (side // p) ** 2, "text_tokens": MODELS[name][4][1 if tiny else 0]}


def _output(out):
    return out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)


def sqnr_db(ref, out) -> float:
    ref, out = ref.double(), out.double()
    noise = float((out - ref).pow(2).sum())
    sig = float(ref.pow(2).sum())
    if not (math.isfinite(noise) and math.isfinite(sig)):
        return float("nan")
    return float("inf") if noise == 0 else 10 * math.log10(sig / noise)


def quant_config(key: str):
    import ditq

    spec = dict(CONFIGS[key])
    return ditq.QuantConfig.preset(spec.pop("preset"), backend="torch", progress=False, **spec)


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


# ---- the two workers (each in its own process) ----------------------------------------------------------------

def _start_worker(args):
    """A worker's RSS sampler, with the imports timed as their own phase (diffusers imports a model's module on
    first use: not the build's time), torch's threads set; returns (sampler, torch, ditq, the model dtype)."""
    sampler = RssSampler(collect=not getattr(args, "in_process", False))
    with sampler.phase("import"):
        import torch
        import ditq
        model_class(args.model)
    torch.set_num_threads(args.threads)
    return sampler, torch, ditq, getattr(torch, args.dtype)


def worker_quantize(args) -> Dict:
    sampler, torch, ditq, dtype = _start_worker(args)
    res: Dict = {}
    with sampler.phase("build"):
        model = build(args.model, args.tiny, dtype)
    res["float_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    inputs = make_inputs(args.model, args.tiny, dtype)
    with sampler.phase("float_forward"), torch.no_grad():
        ref = _output(model(**inputs)).clone()
    with sampler.phase("quantize"):
        report = ditq.quantize(model, quant_config(args.config), calib_fn=lambda m: m(**inputs))
    reasons: Dict[str, int] = {}
    for why in report.skipped.values():
        reasons[why] = reasons.get(why, 0) + 1
    res.update(layers_quantized=len(report.layers), layers_skipped=len(report.skipped), skip_reasons=reasons,
               report_output_sqnr_db=report.output_sqnr, bytes_before=report.bytes_before,
               bytes_after=report.bytes_after)
    del report
    with sampler.phase("quant_forward"), torch.no_grad():
        out = _output(model(**inputs)).clone()
    res["output_sqnr_db"] = sqnr_db(ref, out)
    with sampler.phase("save"):
        ditq.save_quantized(model, args.ckpt)
    res["ckpt_bytes"] = dir_bytes(args.ckpt)
    torch.save(out, args.ckpt + ".out.pt")
    sampler.stop()
    res["phases"] = sampler.phases
    res["max_rss"] = max_rss_bytes()
    return res


def worker_load(args) -> Dict:
    sampler, torch, ditq, dtype = _start_worker(args)
    with sampler.phase("load"):
        model = ditq.load_quantized(args.ckpt, device="cpu")
    inputs = make_inputs(args.model, args.tiny, dtype)
    with sampler.phase("forward"), torch.no_grad():
        out = _output(model(**inputs))
    saved = torch.load(args.ckpt + ".out.pt")
    res = {"identical": bool(out.dtype == saved.dtype and out.shape == saved.shape and torch.equal(out, saved)),
           "loaded_vs_saved_sqnr_db": sqnr_db(saved, out)}
    sampler.stop()
    res["phases"] = sampler.phases
    res["max_rss"] = max_rss_bytes()
    return res


def _worker_main(args) -> int:
    res = (worker_quantize if args.worker == "quantize" else worker_load)(args)
    with open(args.result, "w") as f:
        json.dump(common._clean(res), f)
    return 0


# ---- the driver -----------------------------------------------------------------------------------------------

def _spawn(args, worker: str, model: str, config: str, ckpt: str, timeout: float) -> Dict:
    if args.in_process:  # the smoke test's mode: no fresh interpreter, so the RSS figures are not this run's alone
        wargs = argparse.Namespace(**vars(args))
        wargs.model, wargs.config, wargs.ckpt = model, config, ckpt
        try:
            return json.loads(json.dumps(common._clean(
                (worker_quantize if worker == "quantize" else worker_load)(wargs))))
        except Exception as e:
            return {"error": f"{worker} failed: {type(e).__name__}: {str(e)[:300]}"}
    fd, result = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", worker, "--models", model, "--configs", config,
           "--ckpt", ckpt, "--result", result, "--dtype", args.dtype, "--threads", str(args.threads)]
    if args.tiny:
        cmd.append("--tiny")
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0:
            tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or [f"exit status {p.returncode}"]
            if p.returncode < 0:
                tail = [f"killed by signal {-p.returncode} (out of memory?)"] + tail
            return {"error": f"{worker} failed: {' / '.join(tail)[:300]}"}
        with open(result) as f:
            return json.load(f)
    except subprocess.TimeoutExpired:
        return {"error": f"{worker} ran past {timeout:.0f} s"}
    finally:
        os.unlink(result)


def _estimate_peak(count: Dict, dtype_bytes: int) -> float:
    """A run's expected peak, bytes: the float model, its packed W8 copy (the originals are kept until the swap
    and the check run finish), and ~1 GiB for the interpreter, torch, diffusers and the activations."""
    return count["params"] * dtype_bytes + count["linear_params"] * 1.0 + 1.0 * GIB


def _row(model: str, config: Optional[str], count: Dict, tok: Dict, **kw) -> Dict:
    return dict(model=model, config=config, params=count["params"], linear_params=count["linear_params"], **tok, **kw)


def run_all(args, write) -> List[Dict]:
    import torch

    rows: List[Dict] = []
    dtype_bytes = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    for model in args.models:
        count = count_params(model, args.tiny and model != "flux")
        if MODELS[model][2] is None or (model == "flux"):
            need = count["params"] * dtype_bytes
            rows.append(_row(model, None, count, {"latent": MODELS[model][3][0], "image_tokens": None,
                                                   "text_tokens": MODELS[model][4][0]},
                             status=f"not run: {count['params'] / 1e9:.1f}B parameters are {need / GIB:.0f} GiB in "
                                    f"{args.dtype} ({count['params'] * 2 / GIB:.0f} GiB in bf16), over the "
                                    f"{args.max_rss_gb:g} GiB allowed here"))
            write(rows)
            continue
        tok = tokens(model, args.tiny)
        est = _estimate_peak(count, dtype_bytes)
        if est > args.max_rss_gb * GIB:
            rows.append(_row(model, None, count, tok, status=f"not run: estimated peak {est / GIB:.1f} GiB is over "
                                                              f"--max-rss-gb {args.max_rss_gb:g}"))
            write(rows)
            continue
        for config in args.configs:
            row = _row(model, config, count, tok, status="running", estimated_peak_rss=est)
            rows.append(row)
            if args.work:
                os.makedirs(args.work, exist_ok=True)
            ckpt = tempfile.mkdtemp(prefix=f"ditq_real_{model}_{config}_", dir=args.work)
            try:
                q = _spawn(args, "quantize", model, config, ckpt, args.timeout)
                row.update(quantize=q)
                if "error" in q:
                    row["status"] = q["error"]
                else:
                    ld = _spawn(args, "load", model, config, ckpt, args.timeout)
                    row.update(load=ld)
                    row["status"] = ld.get("error") or ("ok" if ld["identical"] else "loaded output differs")
            finally:
                shutil.rmtree(ckpt, ignore_errors=True)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(ckpt + ".out.pt")
            flatten(row)
            if args.verbose:
                print(f"{model} {config}: {row['status']}", file=sys.stderr)
            write(rows)
    return rows


def flatten(row: Dict) -> None:
    """The table's columns from the workers' nested records."""
    q, ld = row.get("quantize") or {}, row.get("load") or {}
    ph, lph = q.get("phases") or {}, ld.get("phases") or {}

    def gib(v):
        return None if v is None else v / GIB

    def sec(d, k):
        return (d.get(k) or {}).get("seconds")

    row.update(
        float_gib=gib(q.get("float_bytes")), build_s=sec(ph, "build"), float_forward_s=sec(ph, "float_forward"),
        rss_before_quantize_gib=gib((ph.get("quantize") or {}).get("rss_before")),
        quantize_s=sec(ph, "quantize"), quantize_peak_rss_gib=gib((ph.get("quantize") or {}).get("peak_rss")),
        rss_after_quantize_gib=gib((ph.get("quantize") or {}).get("rss_after")),
        layers_quantized=q.get("layers_quantized"), layers_skipped=q.get("layers_skipped"),
        skip_reasons=q.get("skip_reasons"), packed_gib=gib(q.get("bytes_after")),
        quant_forward_s=sec(ph, "quant_forward"), output_sqnr_db=q.get("output_sqnr_db"),
        save_s=sec(ph, "save"), save_peak_rss_gib=gib((ph.get("save") or {}).get("peak_rss")),
        ckpt_gib=gib(q.get("ckpt_bytes")), max_rss_gib=gib(q.get("max_rss")),
        load_import_rss_gib=gib((lph.get("import") or {}).get("rss_after")), load_s=sec(lph, "load"),
        load_peak_rss_gib=gib((lph.get("load") or {}).get("peak_rss")), loaded_forward_s=sec(lph, "forward"),
        load_max_rss_gib=gib(ld.get("max_rss")), identical=ld.get("identical"))
    if row["quantize_peak_rss_gib"] is not None and row["rss_before_quantize_gib"] is not None:
        row["quantize_extra_gib"] = row["quantize_peak_rss_gib"] - row["rss_before_quantize_gib"]


MD_COLS = ["model", "config", "params", "latent", "image_tokens", "text_tokens", "status", "float_gib", "build_s",
           "float_forward_s", "quantize_s", "rss_before_quantize_gib", "quantize_peak_rss_gib", "quantize_extra_gib",
           "layers_quantized", "layers_skipped", "packed_gib", "quant_forward_s", "output_sqnr_db", "save_s",
           "save_peak_rss_gib", "ckpt_gib", "load_s", "load_import_rss_gib", "load_peak_rss_gib",
           "loaded_forward_s", "identical"]
MD_HEAD = ["model", "config", "params", "latent", "image tokens", "text tokens", "status", "float GiB", "build s",
           "float fwd s", "quantize s", "RSS before quantize GiB", "quantize peak RSS GiB", "quantize extra GiB",
           "layers quantized", "skipped", "model after GiB", "quantized fwd s", "output SQNR dB", "save s",
           "save peak RSS GiB", "checkpoint GiB", "load s", "RSS after imports GiB", "load peak RSS GiB",
           "loaded fwd s", "loaded output bit-identical"]


def skip_lines(rows: List[Dict]) -> List[str]:
    out = []
    for r in rows:
        for why, n in sorted((r.get("skip_reasons") or {}).items()):
            line = f"- {r['model']} {r['config']}: {n} x {why}"
            out.append(line)
    return out


def markdown(rows: List[Dict], env: Dict, args) -> str:
    where = f"CPU ({env.get('cpu_model') or env.get('cpu')}, {args.threads} thread{'s' if args.threads > 1 else ''})"
    parts = [f"{common.env_markdown(env)}",
             f"- machine: `{env.get('cpu_model')}, {env.get('cores')} cores, {env.get('mem_total_gib')} GiB RAM`",
             "",
             f"{'Tiny configs' if args.tiny else 'Published architectures'}, random weights, {args.dtype}, on the "
             f"{where}; `backend=\"torch\"`; batch 1 with classifier-free guidance (the transformer sees 2). Each row "
             f"runs in fresh processes: peak RSS is sampled every 10 ms; 'RSS before quantize' is the built model "
             f"plus the interpreter; 'model after' is the quantized transformer's bytes (packed linears plus what "
             f"stays float); the loaded output is compared with the output computed before saving.", "",
             common.md_table(rows, MD_COLS, MD_HEAD)]
    skips = skip_lines(rows)
    if skips:
        parts += ["", "Layers left in full precision, and why:", ""] + skips
    return "\n".join(parts) + "\n"


# ---- RESULTS.md -----------------------------------------------------------------------------------------------

RESULTS = os.path.join(HERE, "RESULTS.md")
HEADING = "## CPU runs at real size"
BEGIN = "<!-- real-size:begin (generated by benchmarks/real_size.py --update-results; do not edit) -->"
END = "<!-- real-size:end -->"
ENTRY_RE = re.compile(r"<!-- real-size (?P<key>[^>]*?) -->\n.*?<!-- /real-size -->\n", re.S)
INTRO = ("What `python benchmarks/real_size.py --update-results` measured: the published architectures of DiT-XL/2,\n"
         "PixArt-Sigma and SD3-medium with random weights, through `ditq.quantize`, one forward, `save_quantized` and\n"
         "`load_quantized` on the CPU (see the script's header). One entry per model; measuring a model again\n"
         "replaces its entry.")


def update_results(text: str, entries: Dict[str, str]) -> str:
    """RESULTS.md text with each model's entry replaced (or added, in MODELS order) inside the real-size block;
    the block and its heading are appended when absent."""
    if BEGIN not in text or END not in text:
        text = text.rstrip("\n") + f"\n\n{HEADING}\n\n{INTRO}\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    block, tail = rest.split(END, 1)
    have = {m.group("key"): m.group(0) for m in ENTRY_RE.finditer(block)}
    for key, body in entries.items():
        have[key] = f"<!-- real-size {key} -->\n{body.rstrip()}\n<!-- /real-size -->\n"
    order = [k for k in MODELS if k in have] + sorted(k for k in have if k not in MODELS)
    return head + BEGIN + "\n" + "".join(have[k] for k in order) + END + tail


def results_entries(rows: List[Dict], env: Dict, args) -> Dict[str, str]:
    out = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        head = f"### {TITLE[model]}: {env['date']}, commit `{env.get('commit')}`\n\n"
        if all(r["status"].startswith("not run") for r in mine):  # nothing measured: the reason is the entry
            out[model] = head + "\n".join(f"{r['params']:,} parameters (counted on the meta device); {r['status']}."
                                           for r in mine) + "\n"
        else:
            out[model] = head + markdown(mine, env, args)
    return out


# ---- main -----------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=["dit", "pixart", "sd3", "flux"])
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="the float model's dtype (default float32: bf16 matmuls run ~5x slower on AVX2 CPUs)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1: a shared CPU)")
    ap.add_argument("--max-rss-gb", type=float, default=14.0, help="skip a model whose estimated peak is above")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per worker process")
    ap.add_argument("--tiny", action="store_true", help="tiny configs of the same classes (the test's mode)")
    ap.add_argument("--in-process", action="store_true", help="run the measured steps in this process (fast; "
                    "the peak RSS figures then include whatever this process held before)")
    ap.add_argument("--from-json", nargs="+", metavar="JSON", help="write the markdown (and with "
                    "--update-results the RESULTS.md entries) from earlier runs' real_size.json; nothing is run")
    ap.add_argument("--work", default=None, help="folder for the temporary checkpoints (default: the system's)")
    ap.add_argument("--out", help="output folder (default $OUT or benchmarks/out)")
    ap.add_argument("--update-results", action="store_true", help="write the entries into benchmarks/RESULTS.md")
    ap.add_argument("--results", default=RESULTS, help=argparse.SUPPRESS)
    ap.add_argument("-v", "--verbose", action="store_true")
    # internal: one measured step in a fresh process
    ap.add_argument("--worker", choices=["quantize", "load"], help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        args.model, args.config = args.models[0], args.configs[0]
        return _worker_main(args)

    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (no GPU here)
    d = common.out_dir(args.out)
    if args.from_json:
        return from_json(args, d)
    env = common.environment()
    env.update(machine())
    env["cpu_threads"] = args.threads

    def report(rows):
        return {"schema": SCHEMA, "tiny": args.tiny, "dtype": args.dtype, "threads": args.threads,
                "max_rss_gb": args.max_rss_gb, "configs": list(args.configs), "env": env, "rows": rows}

    def write(rows):
        common.write_json(os.path.join(d, "real_size.json"), report(rows))

    rows = run_all(args, write)
    write(rows)
    return finish([(rows, env, args)], args, d)


def finish(runs, args, d: str) -> int:
    """real_size.md (and the RESULTS.md entries) of one or more runs: (rows, env, run's args) each."""
    md = "\n".join(markdown(rows, env, a) for rows, env, a in runs)
    with open(os.path.join(d, "real_size.md"), "w") as f:
        f.write(f"# ditq at real size on the CPU\n\n{md}")
    print(md)
    if args.update_results:
        entries = {}
        for rows, env, a in runs:
            entries.update(results_entries(rows, env, a))
        with open(args.results) as f:
            text = f.read()
        with open(args.results, "w") as f:
            f.write(update_results(text, entries))
        print(f"updated {args.results}")
    rows = [r for rs, _, _ in runs for r in rs]
    ok = sum(r["status"] == "ok" for r in rows)
    print(f"{ok}/{len(rows)} rows ok; wrote real_size.md in {d}")
    return 0


def from_json(args, d: str) -> int:
    runs = []
    for path in args.from_json:
        with open(path) as f:
            rep = json.load(f)
        if rep.get("schema") != SCHEMA:
            raise SystemExit(f"{path}: not a {SCHEMA} file (schema {rep.get('schema')!r})")
        a = argparse.Namespace(tiny=rep["tiny"], dtype=rep["dtype"], threads=rep["threads"])
        runs.append((rep["rows"], rep["env"], a))
    return finish(runs, args, d)


if __name__ == "__main__":
    sys.exit(main())

"""Model benchmark: one transformer call (one denoising step) of a model with exactly the architecture of DiT-XL/2
or FLUX.1-dev and random bf16 weights.

- ``--model dit`` (default): diffusers ``DiTTransformer2DModel`` (28 blocks, 16 x 72 heads, patch 2) at 256 px
  (32 x 32 latent) and 512 px (64 x 64), batch 1-32 with classifier-free guidance (the transformer sees 2 x batch;
  M = 2 x batch x 256 or 1024 tokens).
- ``--model flux``: diffusers ``FluxTransformer2DModel`` with FLUX.1-dev's architecture (19 double-stream and 38
  single-stream blocks, 24 x 128 heads, 64 input channels = 16 latent channels packed 2 x 2, T5 features of width
  4096, pooled CLIP 768, guidance embedding, rotary axes (16, 56, 56)), 12B parameters built directly on the GPU in
  bf16 (~24 GB), at 1024 px: 4096 image tokens (128 x 128 latent packed 2 x 2), 512 text tokens, batch 1, guidance
  3.5, no classifier-free guidance (FLUX.1-dev is guidance-distilled); M = batch x (4096 + 512), the rows of the
  single-stream blocks' GEMMs. Published anchor (H100, 28 steps at 1024^2, diffusers-torchao): bf16 compiled 4.21 s,
  torchao int8 dynamic compiled 3.41 s, torchao fp8 row-wise compiled 2.97-3.04 s.

Variants: bf16 eager / CUDA graph / ``torch.compile``; ditq W8A8 and W4A8 (``ditq.quantize`` with a first-step
calibration call; "-fused": QuantConfig(fuse=True)) eager / CUDA graph / compiled; the fp8 row-wise peer
(``fp8-rowwise``: torchao's ``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`` when torchao imports
and runs, else the same computation written here: each linear ditq would quantize holds e4m3 weights with one fp32
scale per output channel, quantizes its input per row and calls ``torch._scaled_mm``; the row's ``implementation``
says which ran); torchao int8 dynamic activations when installed; opt-in, ``w8a8-fused-lora`` / ``w4a8-fused-lora``: the
fused model with a random rank-32 run-time LoRA (``ditq.load_lora``) on every attention and MLP linear of its
blocks, what an adapter costs a step beside its ``-fused`` twin (its output SQNR is the model's without it). Per case: median step latency (CUDA events),
latency per image, images per second (per step), peak GPU memory during the step (this model's weights plus the
step's transient allocations), the transformer's weight bytes, output SQNR of the quantized model vs bf16 on the
calibration input, speedups vs bf16 eager and bf16 compiled; for ditq on a kernel backend, the SQNR of its output
against the same quantized model on the ``torch`` backend (the reference maths: a kernel that computes something
else shows there, at model scale and through the fused blocks).

Budget (``--max-seconds``): each precision is built and runs eager and CUDA graph at once, the compiles come after
all of them, so a cut drops compiles first; a build, or a case, starts only when its estimated cost (the slowest
build so far; steps x the last measured step time; ``--compile-estimate`` seconds for a compile) fits in what is
left, else its rows are ``skipped`` rows saying so. On
SIGTERM (a stage's ``timeout``) the rows not run are marked skipped and the JSON is still written; it is also
rewritten after every case.

    python benchmarks/bench_model.py                       # DiT, full grid on the GPU (compiles take minutes)
    python benchmarks/bench_model.py --resolutions 256 --batches 1 8 --compile-batches 8 --max-seconds 240
    python benchmarks/bench_model.py --model flux --max-seconds 300
    python benchmarks/bench_model.py --smoke [--model flux]   # tiny model on CPU, torch backend, same schema

Writes model.json, model.md and model_latency.png (FLUX: model_flux.*) under --out / $OUT / benchmarks/out.
"""
from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SCHEMA = "ditq.bench_model/1"
XL = dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
          patch_size=2, num_embeds_ada_norm=1000)
TINY = dict(num_layers=2, num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8,
            patch_size=2, num_embeds_ada_norm=10)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
# tests/ditq/tiny_models.py's tiny FLUX, with the guidance embedder FLUX.1-dev has (rotary axes sum to the head dim)
FLUX_TINY = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                 num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                 axes_dims_rope=(4, 6, 6))
FLUX_TEXT_TOKENS, FLUX_TINY_TEXT_TOKENS, FLUX_GUIDANCE = 512, 6, 3.5
FLUX_STEPS = 28  # the anchor's step count: summaries multiply a step by it
# latent side = pixels / 8 (the VAE's factor); FLUX then packs 2 x 2 latent pixels into one token
SAMPLE_SIZE = {256: 32, 512: 64}  # DiT (static_report.py reads it too)
FLUX_SAMPLE_SIZE = {512: 64, 1024: 128}
SIZES = {"dit": SAMPLE_SIZE, "flux": FLUX_SAMPLE_SIZE}
SMOKE_SAMPLE_SIZE = 8
# "-fused": the same quantization with QuantConfig(fuse=True) (one q/k/v GEMM, quantization inside the norms,
# GEMM epilogues that feed the next layer): the pair measures what fusion buys, side by side in one run.
# "-lora" (opt-in, not in the default list): the same model with a random run-time LoRA adapter (ditq.load_lora,
# rank LORA_RANK) on every attention and MLP linear of its blocks: beside its "-fused" twin, what a LoRA costs a step.
# "w4a8i" (opt-in): W4A8 with integer group scales (QuantConfig(group_scales="int")): on Hopper the W4A8 GEMMs keep
# one int32 sum over K instead of folding every group into float sums; beside "w4a8", what that buys a step.
PRECISIONS = ("bf16", "w8a8", "w8a8-fused", "w4a8", "w4a8-fused", "fp8-rowwise", "torchao-int8dq",
              "w8a8-fused-lora", "w4a8-fused-lora", "w4a8i", "w4a8i-fused")
OPT_IN = ("torchao-int8dq", "w8a8-fused-lora", "w4a8-fused-lora", "w4a8i", "w4a8i-fused")
LORA_RANK = 32
MODES = ("eager", "cudagraph", "compile")
ROW_KEYS = ("model", "resolution", "sample_size", "batch", "cfg_batch", "tokens_per_image", "text_tokens", "M",
            "variant", "precision", "implementation", "mode", "status", "median_ms", "min_ms", "ms_per_image",
            "images_per_s", "peak_mem_gib", "step_extra_gib", "weight_bytes", "weight_ratio_vs_bf16",
            "speedup_vs_bf16_eager", "speedup_vs_bf16_compile", "first_call_s", "timing", "output_sqnr_db",
            "sqnr_vs_torch_backend_db", "fused_blocks")
NOT_RUN = "skipped: not reached"
OUT_STEM = {"dit": "model", "flux": "model_flux"}
TITLE = {"dit": "DiT-XL/2-architecture step latency", "flux": "FLUX.1-dev-architecture step latency"}


class Spec:
    """What differs between the two architectures: config, builder, inputs, token counts."""

    def __init__(self, name: str, smoke: bool):
        self.name = name
        if name == "dit":
            self.cfg, self.cfg_factor, self.text_tokens = (TINY if smoke else XL), 2, 0
        else:
            self.cfg, self.cfg_factor = (FLUX_TINY if smoke else FLUX_DEV), 1
            self.text_tokens = FLUX_TINY_TEXT_TOKENS if smoke else FLUX_TEXT_TOKENS

    def tokens(self, sample_size: int) -> int:
        """Image tokens per image: (latent side / patch)^2 for DiT, (latent side / 2)^2 packed tokens for FLUX."""
        p = self.cfg["patch_size"] if self.name == "dit" else 2
        return (sample_size // p) ** 2

    def m(self, batch: int, sample_size: int) -> int:
        return self.cfg_factor * batch * (self.tokens(sample_size) + self.text_tokens)

    def build(self, torch, sample_size: int, device, dtype):
        return build_model(torch, self.cfg, sample_size, device, dtype) if self.name == "dit" \
            else build_flux(torch, self.cfg, device, dtype)

    def inputs(self, torch, sample_size: int, batch: int, device, dtype) -> Dict:
        if self.name == "dit":
            return make_inputs(torch, self.cfg, sample_size, batch, device, dtype)
        return make_flux_inputs(torch, self.cfg, sample_size, batch, self.text_tokens, device, dtype)


def build_model(torch, cfg: Dict, sample_size: int, device, dtype):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)  # every variant starts from the same random weights
    with torch.device(device):
        model = DiTTransformer2DModel(sample_size=sample_size, **cfg)
    return model.to(dtype).eval().requires_grad_(False)


def build_flux(torch, cfg: Dict, device, dtype):
    """Random weights made where they will live, in their final dtype: FLUX.1-dev's 12B parameters are ~24 GB in
    bf16, 48 GB in the float32 a default construction would make first (and far too slow to make on a CPU)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(**cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.eval().requires_grad_(False)  # already in dtype (a .to() would only make diffusers warn)


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


def make_flux_inputs(torch, cfg: Dict, sample_size: int, batch: int, text_tokens: int, device, dtype) -> Dict:
    """What FluxPipeline hands the transformer at its first step: packed latents [B, (side/2)^2, 64], T5 features,
    pooled CLIP features, timestep 1.0 (sigma; the model scales it by 1000), guidance 3.5, and the rotary ids:
    (0, row, column) per image token, zeros per text token."""
    g = torch.Generator(device="cpu").manual_seed(batch)
    side = sample_size // 2
    tokens = side * side
    img_ids = torch.zeros(tokens, 3)
    img_ids[:, 1] = torch.arange(tokens) // side
    img_ids[:, 2] = torch.arange(tokens) % side
    return dict(hidden_states=torch.randn(batch, tokens, cfg["in_channels"], generator=g).to(device, dtype),
                encoder_hidden_states=torch.randn(batch, text_tokens, cfg["joint_attention_dim"],
                                                  generator=g).to(device, dtype),
                pooled_projections=torch.randn(batch, cfg["pooled_projection_dim"], generator=g).to(device, dtype),
                timestep=torch.full((batch,), 1.0, device=device, dtype=dtype),
                img_ids=img_ids.to(device, dtype), txt_ids=torch.zeros(text_tokens, 3, device=device, dtype=dtype),
                guidance=torch.full((batch,), FLUX_GUIDANCE, device=device, dtype=torch.float32),
                return_dict=False)


def _output(out):
    return out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)


def _sqnr_db(torch, ref, out) -> Optional[float]:
    ref, out = ref.float(), out.float()
    noise = (out - ref).pow(2).sum().item()
    sig = ref.pow(2).sum().item()
    if not math.isfinite(noise) or not math.isfinite(sig):
        return float("nan")
    return float("inf") if noise == 0 else 10 * math.log10(sig / noise)


def fp8_targets(model) -> Dict:
    """The linears ditq's W8A8 preset quantizes (same skip rules: embedders, output layers, text projections stay
    float), less any _scaled_mm cannot take (K or N not a multiple of 16)."""
    import ditq
    from ditq.convert import select_layers

    cands = select_layers(model, ditq.QuantConfig.preset("w8a8"))[0]
    return {n: lin for n, lin in cands.items() if lin.in_features % 16 == 0 and lin.out_features % 16 == 0}


def quantize_fp8_rowwise(torch, model, calib: Dict, rebuild: Callable):
    """(model, info): torchao's float8 row-wise config on the same linears when torchao imports and a forward runs
    after it, else fp8_rowwise.Fp8RowwiseLinear in their place (on a fresh copy of the model: a failed torchao pass may have left it
    half converted)."""
    targets = fp8_targets(model)
    ref = _output(model(**calib))
    info: Dict = {"quantized_layers": len(targets)}
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except Exception as e:
        info["torchao"] = f"not used: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    else:
        try:
            quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
                      filter_fn=lambda mod, fqn: fqn in targets)
            out = _output(model(**calib))
            info.update(implementation="torchao", output_sqnr_db=_sqnr_db(torch, ref, out))
            return model, info
        except Exception as e:
            info["torchao"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            model = rebuild()
            targets = fp8_targets(model)
    from fp8_rowwise import Fp8RowwiseLinear

    for name, lin in targets.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, Fp8RowwiseLinear(lin))
    out = _output(model(**calib))
    info.update(implementation="torch._scaled_mm", output_sqnr_db=_sqnr_db(torch, ref, out))
    return model, info


def quantize(torch, model, precision: str, backend: str, calib: Dict, rebuild: Callable,
             check_kernels: bool = True):
    """The one call that turns a bf16 model into a ditq (or torchao, or fp8) one; returns (model, info).
    ``check_kernels``: also measure a ditq model's kernels against the torch backend (kernels_vs_reference_db)."""
    if precision == "fp8-rowwise":
        return quantize_fp8_rowwise(torch, model, calib, rebuild)
    if precision == "torchao-int8dq":
        from torchao.quantization import quantize_
        try:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig as cfg
        except ImportError:
            from torchao.quantization import int8_dynamic_activation_int8_weight as cfg
        quantize_(model, cfg())
        return model, {"implementation": "torchao"}
    import ditq
    lora = precision.endswith("-lora")
    preset = precision.removesuffix("-lora").removesuffix("-fused")
    fused = precision.removesuffix("-lora").endswith("-fused")
    adapter = random_lora(torch, model, LORA_RANK) if lora else None
    int_scales = preset == "w4a8i"
    cfg = ditq.QuantConfig.preset("w4a8" if int_scales else preset, backend=backend, progress=False, fuse=fused,
                                  **({"group_scales": "int"} if int_scales else {}))
    rep = ditq.quantize(model, cfg, calib_fn=lambda m: m(**calib))
    info = {"output_sqnr_db": rep.output_sqnr, "backend": rep.backend, "quantized_layers": len(rep.layers),
            "implementation": f"ditq-{rep.backend}"}
    if lora:  # the output SQNR above is the model's without it (the adapter changes the function)
        placed = ditq.load_lora(model, adapter)
        info["implementation"] += f"+lora-r{LORA_RANK}x{sum(map(len, placed.values()))}"
    if fused:  # a fusion that did not apply would make the pair measure nothing: the row says how many blocks ran fused
        info["fused_blocks"] = sum(why is None for why in rep.fusion.get("blocks", {}).values())
    if rep.backend != "torch" and check_kernels:
        info["sqnr_vs_torch_backend_db"] = kernels_vs_reference_db(torch, model, calib)
    return model, info


def random_lora(torch, model, rank: int) -> Dict:
    """A random LoRA state dict (diffusers keys, the model's dtype and device) for every linear of the model's
    transformer blocks but the adaLN ones (``norm*.linear``): what style LoRAs for DiT-family models target."""
    g = torch.Generator(device="cpu").manual_seed(0)
    sd = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and "transformer_blocks." in name and ".norm" not in name:
            w = next(m.parameters())
            for key, shape, std in (("lora_A", (rank, m.in_features), m.in_features ** -0.5),
                                    ("lora_B", (m.out_features, rank), 0.01 * rank ** -0.5)):
                sd[f"{name}.{key}.weight"] = (torch.randn(shape, generator=g) * std).to(w.device, w.dtype)
    return sd


def kernels_vs_reference_db(torch, model, calib: Dict) -> float:
    """SQNR of the quantized model's output on its kernels against the same quantized model on the ``torch``
    backend (ditq's reference maths: same integers, same scales), on the calibration input. Both compute the same
    integer GEMMs, so only fp32 rounding and the int8 ties it moves separate them (tens of dB up): a kernel that
    computes something else shows here at model scale, in the fused blocks too. Each layer goes back to its own
    backend afterwards."""
    from ditq.nn import QuantLinear

    layers = [(m, m.backend_request) for m in model.modules() if isinstance(m, QuantLinear)]
    with torch.no_grad():
        out = _output(model(**calib)).float()
        try:
            for m, _ in layers:
                m.set_backend("torch")
            ref = _output(model(**calib)).float()
        finally:
            for m, request in layers:
                m.set_backend(request)
    return _sqnr_db(torch, ref, out)


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


def enumerate_cases(resolutions, batches, precisions, modes=MODES) -> List[Dict]:
    return [dict(resolution=r, batch=b, precision=p, mode=m, variant=f"{p} {m}")
            for r in resolutions for p in precisions for m in MODES if m in modes for b in batches]


def _estimate_s(mode: str, prec: str, measured: Dict, args) -> float:
    """Seconds a case should take: its steps times the last measured step of this precision (or of bf16, or the
    slowest seen), a compile's estimate for compiles; 0 before anything was measured."""
    if mode == "compile":
        return args.compile_estimate
    step = measured.get(prec) or measured.get("bf16") or max(measured.values(), default=0.0)
    return (args.warmup + args.iters + 4) * step


def run(args, torch, device, dtype, write_partial: Callable[[Dict], None]) -> Dict:
    spec = Spec(args.model, args.smoke)
    sizes = {r: (SMOKE_SAMPLE_SIZE if args.smoke else SIZES[args.model][r]) for r in args.resolutions}
    cases = enumerate_cases(args.resolutions, args.batches, args.precisions, args.modes)
    deadline = common.Deadline(args.max_seconds)
    res_out = {"cases": len(cases), "config": dict(spec.cfg), "sample_sizes": sizes, "model": args.model,
               "text_tokens": spec.text_tokens, "quantize_info": {}}

    def base(c):
        ss = sizes[c["resolution"]]
        return dict({k: c.get(k) for k in ROW_KEYS}, model=args.model, sample_size=ss,
                    cfg_batch=spec.cfg_factor * c["batch"], tokens_per_image=spec.tokens(ss),
                    text_tokens=spec.text_tokens, M=spec.m(c["batch"], ss), status=NOT_RUN)

    rows = {id(c): base(c) for c in cases}

    def snapshot():
        out = [rows[id(c)] for c in cases]
        add_ratios(out)
        return dict(res_out, rows=out)

    measured: Dict[str, float] = {}  # precision -> last eager / CUDA-graph step seconds (for the estimates)
    try:
        for res in args.resolutions:
            # Each precision is built, then runs eager and CUDA graph at once; the compiles come after all of them
            # (every model stays built: DiT-XL/2 is ~1.3 GB in bf16, FLUX.1-dev ~24 GB, and five or six copies fit
            # an H100 / H200). So a --max-seconds budget cuts compiles first, then the last precisions, and the
            # rows measured before a cut are complete.
            models: Dict[str, tuple] = {}
            build_s = 0.0  # the slowest build + quantization so far: the next one starts only if it may fit

            def fresh():
                """A bf16 model: a copy of the bf16 precision's when built (the same random weights; copying ~24 GB
                on the GPU takes milliseconds, constructing FLUX.1-dev's thousands of modules seconds), else built."""
                base = models.get("bf16", (None,))[0]
                return copy.deepcopy(base) if base is not None else spec.build(torch, sizes[res], device, dtype)

            def build(prec):
                info, model, err = {}, None, None
                try:
                    model = fresh()
                    if prec != "bf16":
                        calib = spec.inputs(torch, sizes[res], 1, device, dtype)
                        # the torch backend's W4A8 runs a launch per group and row block: minutes at FLUX.1's
                        # K = 12288, so that check is left to the GEMM table's exactness checks
                        model, info = quantize(torch, model, prec, args.backend, calib, rebuild=fresh,
                                               check_kernels=spec.name == "dit" or not prec.startswith("w4"))
                    else:
                        info = {"implementation": "torch"}
                except Exception as e:
                    err = f"error: {'quantize' if model is not None else 'build'} failed: {type(e).__name__}: " \
                          f"{str(e).splitlines()[0][:200] if str(e) else ''}"
                    import fp8_rowwise  # here select_device has run, as the module asks
                    if isinstance(e, fp8_rowwise.Unavailable):  # a peer this torch build cannot run here
                        err = f"unavailable: {e}"
                    model = None
                    if args.verbose:
                        traceback.print_exc()
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # the bf16 weights a quantization replaced
                if args.verbose:
                    print(f"{res}px {prec}: {err or 'built'} {info}", file=sys.stderr)
                res_out["quantize_info"][f"{res} {prec}"] = dict(info, error=err)  # e.g. why torchao was not used
                return model, info, err

            def run_cases(prec, mode):
                model, info, err = models[prec]
                wbytes = weight_bytes(model) if model is not None else None
                for c in [c for c in cases if (c["resolution"], c["precision"], c["mode"]) == (res, prec, mode)]:
                    row = rows[id(c)]
                    row.update(weight_bytes=wbytes, output_sqnr_db=info.get("output_sqnr_db"),
                               sqnr_vs_torch_backend_db=info.get("sqnr_vs_torch_backend_db"),
                               fused_blocks=info.get("fused_blocks"), implementation=info.get("implementation"))
                    need = _estimate_s(mode, prec, measured, args)
                    if err:
                        row["status"] = err
                    elif deadline.passed() or need > deadline.left():
                        row["status"] = (f"skipped: time budget (--max-seconds): about {need:.0f} s needed, "
                                         f"{max(deadline.left(), 0):.0f} s left")
                    elif mode == "compile" and args.compile_batches and c["batch"] not in args.compile_batches:
                        row["status"] = "skipped: batch not in --compile-batches"
                    elif mode == "cudagraph" and device.type != "cuda":
                        row["status"] = "skipped: CUDA graphs need a GPU"
                    else:
                        run_one(torch, model, spec, sizes[res], c, row, device, dtype, args)
                        if row["status"] == "ok" and mode != "compile":
                            measured[prec] = row["median_ms"] * 1e-3
                    if args.verbose:
                        print(f"{res}px b{c['batch']} {c['variant']}: {row['status']} "
                              f"{common.fmt(row.get('median_ms'))} ms", file=sys.stderr)
                    write_partial(snapshot())

            for prec in args.precisions:
                need = build_s + _estimate_s("eager", prec, measured, args)
                if deadline.passed() or need > deadline.left():
                    models[prec] = (None, {}, f"skipped: time budget (--max-seconds) before the model was built: "
                                              f"about {need:.0f} s needed, {max(deadline.left(), 0):.0f} s left")
                else:
                    t0 = time.perf_counter()
                    models[prec] = build(prec)
                    build_s = max(build_s, time.perf_counter() - t0)
                for mode in [m for m in MODES if m in args.modes and m != "compile"]:
                    run_cases(prec, mode)
            if "compile" in args.modes:
                for prec in args.precisions:
                    run_cases(prec, "compile")
                    if hasattr(torch, "_dynamo"):
                        torch._dynamo.reset()  # this precision's compiled graphs are done with
            models.clear()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    except common.Stopped as e:  # the stage's cap: keep what ran, say why the rest did not
        print(f"stopped: {e}; writing what ran", file=sys.stderr)
        res_out["stopped"] = str(e)
        for r in rows.values():
            if r["status"] == NOT_RUN:
                r["status"] = f"skipped: {e}"
    return snapshot()


def run_one(torch, model, spec, sample_size, c, row, device, dtype, args) -> None:
    fn = None
    try:
        inputs = spec.inputs(torch, sample_size, c["batch"], device, dtype)
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


def plot(rows: List[Dict], path: str, title: str):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    res_list = list(dict.fromkeys(r["resolution"] for r in rows))
    if not res_list:
        return None
    fig, axes = plt.subplots(1, len(res_list), figsize=(6 * len(res_list), 4), squeeze=False)
    for ax, res in zip(axes[0], res_list):
        sel = [r for r in rows if r["resolution"] == res and r["status"] == "ok"]
        for v in dict.fromkeys(r["variant"] for r in sel):
            pts = sorted((r["batch"], r["ms_per_image"]) for r in sel if r["variant"] == v)
            ax.plot([q[0] for q in pts], [q[1] for q in pts], marker="o", ms=3, label=v)
        ax.set(xscale="log", yscale="log", title=f"{title}, {res} px, one step",
               xlabel="images per batch", ylabel="ms per image per step")
        if sel:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


MD_COLS = ["resolution", "batch", "M", "variant", "implementation", "status", "median_ms", "ms_per_image",
           "images_per_s", "peak_mem_gib", "weight_bytes", "weight_ratio_vs_bf16", "output_sqnr_db",
           "sqnr_vs_torch_backend_db", "speedup_vs_bf16_eager", "speedup_vs_bf16_compile", "first_call_s"]
MD_HEAD = ["px", "batch", "M", "variant", "implementation", "status", "step ms", "ms/image", "images/s (per step)",
           "peak GiB", "weight bytes", "weights vs bf16", "output SQNR dB", "kernels vs torch backend dB",
           "speedup vs bf16 eager",
           "speedup vs bf16 compiled", "first call s"]
SHORT_COLS = ["resolution", "batch", "variant", "implementation", "status", "median_ms", "peak_mem_gib",
              "weight_ratio_vs_bf16", "speedup_vs_bf16_compile"]


def describe(report: Dict) -> str:
    if report.get("model") == "flux":
        return (f"One transformer call (one denoising step; FLUX.1-dev has no classifier-free guidance); "
                f"M = batch x (image + {report.get('text_tokens')} text tokens), the single-stream GEMMs' rows; "
                f"x{FLUX_STEPS} steps is the anchor's sampling length; random weights; peak memory includes the "
                f"weights; output SQNR: the quantized model vs bf16 on the calibration input.")
    return ("One transformer call (one denoising step) with classifier-free guidance (M = 2 x batch x tokens); "
            "random weights; peak memory includes the weights; output SQNR: the quantized model vs bf16 on the "
            "calibration input.")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny 2-block DiT (or 1 + 1-block FLUX) on CPU with the "
                    "torch backend")
    ap.add_argument("--model", choices=sorted(SIZES), default="dit")
    ap.add_argument("--resolutions", type=int, nargs="+",
                    help="pixels: DiT 256 / 512 (default both), FLUX 512 / 1024 (default 1024)")
    ap.add_argument("--batches", type=int, nargs="+", help="default: DiT 1 2 4 8 16 32, FLUX 1")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="default: all (run in this "
                    "order whatever the order given: eager, cudagraph, compile)")
    ap.add_argument("--compile-batches", type=int, nargs="+", help="compile only these batches (compiles are slow)")
    ap.add_argument("--precisions", nargs="+", choices=PRECISIONS, help="default: all (torchao when installed)")
    ap.add_argument("--backend", default="auto", help="ditq backend for the quantized variants")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--max-seconds", type=float, default=None, help="budget: later cases become 'skipped' rows")
    ap.add_argument("--compile-estimate", type=float, default=None,
                    help="seconds a compiled case is assumed to take (a compile starts only if that much is left; "
                         "default DiT 60, FLUX 150, smoke 0)")
    ap.add_argument("--out", help="output folder (default $OUT or benchmarks/out)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)

    device = common.select_device(args, f"tiny {args.model} on CPU")
    import torch

    sizes = SIZES[args.model]
    if args.smoke:
        args.resolutions = [max(sizes) if args.model == "flux" else min(sizes)]
        args.batches = [1] if args.model == "flux" else [1, 2]
        args.backend = "torch" if args.backend == "auto" else args.backend
    args.resolutions = args.resolutions or ([1024] if args.model == "flux" else [256, 512])
    bad = [r for r in args.resolutions if r not in sizes]
    if bad:
        ap.error(f"--resolutions {bad}: {args.model} takes {sorted(sizes)}")
    args.batches = args.batches or ([1] if args.model == "flux" else [1, 2, 4, 8, 16, 32])
    if args.precisions is None:
        args.precisions = [p for p in PRECISIONS if p not in OPT_IN]
        try:
            import torchao  # noqa: F401
            if not args.smoke:
                args.precisions.append("torchao-int8dq")
        except ImportError:
            pass
    if args.compile_estimate is None:
        args.compile_estimate = 0.0 if args.smoke else (150.0 if args.model == "flux" else 60.0)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else (2 if args.model == "flux" else 3))
    args.iters = args.iters if args.iters is not None else (2 if args.smoke else (5 if args.model == "flux" else 10))
    dtype = torch.bfloat16
    import torch._dynamo  # one forward code object serves every model and batch: raise the recompile cap (8)
    for name in ("cache_size_limit", "recompile_limit"):  # the name changed across torch versions
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    common.stop_on_sigterm()
    d = common.out_dir(args.out)
    stem = OUT_STEM[args.model]

    def report_of(res):
        return {"schema": SCHEMA, "smoke": args.smoke, "device": str(device), "model": args.model,
                "dtype": str(dtype).replace("torch.", ""), "backend": args.backend,
                "precisions": list(args.precisions), "modes": list(args.modes), "resolutions": list(args.resolutions),
                "batches": list(args.batches), "env": common.environment(), **res}

    def write_partial(res):  # a SIGKILL after a stage's grace period still leaves every finished row on disk
        common.write_json(os.path.join(d, f"{stem}.json"), dict(report_of(res), partial=True))

    try:
        import diffusers  # noqa: F401
    except ImportError as e:
        res = {"cases": 0, "rows": [], "config": {}, "sample_sizes": {}, "model": args.model,
               "error": f"diffusers is not installed ({e}); carry its wheel (see gpu_suite.sh)"}
    else:
        res = run(args, torch, device, dtype, write_partial)
    report = report_of(res)
    common.write_json(os.path.join(d, f"{stem}.json"), report)
    where = f"smoke: tiny {args.model} on CPU" if args.smoke else report["env"].get("gpu")
    md = "\n".join([f"## {TITLE[args.model]} ({where})", "", common.env_markdown(report["env"]), "",
                    describe(report), "",
                    report.get("error") or common.md_table(report["rows"], MD_COLS, MD_HEAD)]) + "\n"
    with open(os.path.join(d, f"{stem}.md"), "w") as f:
        f.write(md)
    png = plot(report["rows"], os.path.join(d, f"{stem}_latency.png"), TITLE[args.model].split(" step")[0])
    short = [r for r in report["rows"] if r["batch"] in (1, 8) and r["resolution"] == args.resolutions[0]]
    print(common.md_table(short, SHORT_COLS))
    ok = sum(r["status"] == "ok" for r in report["rows"])
    written = f"{stem}.json, {stem}.md" + (f", {stem}_latency.png" if png else "")
    print(f"\n{ok}/{len(report['rows'])} cases ok; wrote {written} in {d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

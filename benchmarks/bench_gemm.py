"""GEMM benchmark: every ditq backend (W8A8, W4A8 at each group size) against cuBLAS bf16, ``torch._int_mm`` plus
its scaling pass (torchao int8 dynamic's path), ``torch._scaled_mm`` with row-wise fp8 e4m3 scales (torchao float8
row-wise's path: on Hopper the peer to beat), and torchao / gemlite when importable, on DiT-XL/2, PixArt, SD3 and
FLUX linear shapes.

For each (shape, M, implementation): the median time (CUDA events around CUDA-graph replays of several calls,
after warm-up, rotating input buffers so the weights do not sit in L2), TOP/s, the fraction of the roofline
(max of FLOP time and byte time, from ceilings measured in the same run: a large bf16 and int8 matmul, a device
copy) and the speedups over bf16 and over fp8 row-wise. ditq, ``_int_mm`` and fp8 rows time the GEMM on already
quantized activations (int8, or e4m3 with one fp32 scale per row); each activation quantization has rows of its
own (GB/s vs the measured copy bandwidth): ditq's ``quantize_act`` (static / dynamic), and fp8 row-wise's
amax / scale / cast pass in plain torch ("eager", several kernels) and ``torch.compile``d ("compiled", the one
fused kernel torchao's compiled path runs). torchao / gemlite rows include their own activation quantization.
fp8 rows need compute capability >= 8.9 and K, N multiples of 16; elsewhere they are 'unavailable' rows.
Before a ditq GEMM is timed its output is checked against the exact integer reference (every row up to M = 128,
about three per 64-row block beyond, all columns; ditq.testing's fp32-rounding tolerance): a kernel that computes
something else gets a 'wrong: ...' row and no time, so no table quotes the speed of a wrong result.

    python benchmarks/bench_gemm.py              # full grid on the GPU (about 15-30 min on an H100)
    python benchmarks/bench_gemm.py --quick      # DiT-XL/2 + FLUX.1 shapes, a few M, groups 64 and 128: minutes
    python benchmarks/bench_gemm.py --smoke      # tiny shapes on CPU, wall-clock timing, same JSON schema

Writes gemm.json, gemm.md and gemm_speedup.png (when matplotlib imports) under --out / $OUT / benchmarks/out.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
from typing import Callable, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SCHEMA = "ditq.bench_gemm/1"
# --quick runs M in this order (a --max-seconds cut drops the last ones first): the sizes the targets name
# (W8A8 at M >= 4096, W4A8 at M <= 64) come first; rows are still written in shape-major order.
QUICK_M = (16, 4096, 64, 16384, 512)
QUICK_SHAPES = common.DIT_SHAPES + [s for s in common.OTHER_SHAPES
                                    if s[0] == "FLUX.1" and s[1] in ("attn q/k/v/out", "mlp fc1", "mlp fc2")]
SHAPE_SETS = {"all": common.ALL_SHAPES, "dit": common.DIT_SHAPES, "quick": QUICK_SHAPES,
              "flux": [s for s in common.OTHER_SHAPES if s[0] == "FLUX.1"]}
FP8_GEMM = "fp8 row-wise (_scaled_mm)"
TORCHAO_INT8, TORCHAO_FP8 = "torchao int8-dyn-act int8-weight", "torchao fp8 row-wise"  # when torchao imports
FP8_QUANT = "fp8 row-wise quantize"
ROW_KEYS = ("model", "layer", "N", "K", "M", "impl", "kind", "backend", "bits", "group_size", "status",
            "median_ms", "min_ms", "timing", "tops", "gbps", "roofline_ms", "roofline_fraction",
            "speedup_vs_bf16", "speedup_vs_fp8", "bytes", "flops")


# ---- ceilings -----------------------------------------------------------------------------------------

def measure_ceilings(torch, device, size: int, warmup: int, iters: int) -> Dict:
    """bf16 FLOP/s and int8 OP/s of a size^3 product, copy bytes/s (read + write) of a large buffer."""
    out: Dict = {"matmul_size": size}
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=g, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, generator=g, dtype=torch.bfloat16)
    t = common.time_calls(lambda i: a @ b, device, warmup, iters)
    out["bf16_flops"] = 2 * size ** 3 / (t["median_ms"] * 1e-3)
    ai = torch.randint(-127, 128, (size, size), device=device, dtype=torch.int8, generator=g)
    bi = torch.randint(-127, 128, (size, size), device=device, dtype=torch.int8, generator=g).t()
    try:
        t = common.time_calls(lambda i: torch._int_mm(ai, bi), device, warmup, iters)
        out["int8_ops"] = 2 * size ** 3 / (t["median_ms"] * 1e-3)
    except Exception as e:  # no int8 matmul here: fall back to bf16 as the compute ceiling, and say so
        out["int8_ops"], out["int8_note"] = out["bf16_flops"], f"_int_mm failed ({type(e).__name__}); bf16 used"
    n = (1 << 28) if torch.device(device).type == "cuda" else (1 << 22)  # 256 MiB on GPU: far past L2
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = common.time_calls(lambda i: dst.copy_(src), device, warmup, iters)
    out["copy_bytes_s"] = 2 * n / (t["median_ms"] * 1e-3)
    return out


# ---- cases --------------------------------------------------------------------------------------------

def enumerate_cases(shapes, ms, backends, groups, extra: List[str]) -> List[Dict]:
    """One dict per (shape, M, implementation); every case becomes exactly one row."""
    cases = []
    seen_quant = set()
    for model, layer, n, k in shapes:
        for m in ms:
            base = dict(model=model, layer=layer, N=n, K=k, M=m)
            cases.append(dict(base, impl="bf16 matmul", kind="gemm", backend="torch", bits=16, group_size=None))
            cases.append(dict(base, impl="torch._int_mm + scale", kind="gemm", backend="torch", bits=8,
                              group_size=None))
            cases.append(dict(base, impl=FP8_GEMM, kind="gemm", backend="torch", bits=8, group_size=None))
            if ("fp8", m, k) not in seen_quant:
                seen_quant.add(("fp8", m, k))
                for scheme in ("eager", "compiled"):
                    cases.append(dict(base, impl=f"{FP8_QUANT} {scheme}", kind="quant", backend="torch", bits=8,
                                      group_size=None, scheme=scheme))
            for b in backends:
                cases.append(dict(base, impl=f"ditq-{b} w8a8", kind="gemm", backend=b, bits=8, group_size=None))
                for g in groups:
                    if k % g == 0:
                        cases.append(dict(base, impl=f"ditq-{b} w4a8 g{g}", kind="gemm", backend=b, bits=4,
                                          group_size=g))
                        if b.startswith("cuda") or b == "triton":  # integer group scales (q applied on unpack)
                            cases.append(dict(base, impl=f"ditq-{b} w4a8i g{g}", kind="gemm", backend=b, bits=4,
                                              group_size=g, int_scales=True))
                if (b, m, k) not in seen_quant:  # the activation op depends on M and K only
                    seen_quant.add((b, m, k))
                    for scheme in ("static", "dynamic"):
                        cases.append(dict(base, impl=f"ditq-{b} quantize_act {scheme}", kind="quant", backend=b,
                                          bits=8, group_size=None, scheme=scheme))
            for e in extra:
                cases.append(dict(base, impl=e, kind="gemm", backend=e.split()[0], bits=8, group_size=None))
    return cases


def _nbytes(c: Dict) -> Tuple[float, float]:
    """(FLOPs, minimal bytes) of a case: every operand read once, the bf16 output written once."""
    m, n, k = c["M"], c["N"], c["K"]
    if c["kind"] == "quant":
        return 0.0, 2 * m * k + m * k + 4 * m
    out = 2 * m * n + 2 * n  # bf16 output + bias
    if c["bits"] == 16:
        return 2.0 * m * n * k, 2 * m * k + 2 * n * k + out
    act = 2 * m * k if c["backend"] in ("torchao", "gemlite") else m * k + 4  # those quantize inside
    if c["impl"] == FP8_GEMM:
        act = m * k + 4 * m  # e4m3 values and one fp32 scale per row
    if c["bits"] == 8:
        return 2.0 * m * n * k, act + n * k + 4 * n + out
    return 2.0 * m * n * k, act + n * k // 2 + 4 * (k // c["group_size"]) * n + out + (4 * n if c.get("int_scales") else 0)


# ---- implementations ----------------------------------------------------------------------------------

class Unsupported(Exception):
    """An implementation that does not take this shape (a row saying so, not an error)."""


class Inputs:
    """Rotating input buffers for one (shape, M): enough copies to spill L2 so each call reads from memory."""

    def __init__(self, torch, device, m, n, k, l2_bytes: int, max_sets: int):
        self.torch, self.device, self.m, self.n, self.k = torch, device, m, n, k
        per_set = 2 * m * k + 2 * n * k  # the largest implementation's operands (bf16)
        self.sets = max(1, min(max_sets, math.ceil(2 * l2_bytes / per_set))) if l2_bytes else 2
        self.g = torch.Generator(device=device).manual_seed(1234)
        self._cache: Dict[str, list] = {}

    def get(self, key: str, make: Callable[[], tuple]) -> list:
        if key not in self._cache:
            self._cache[key] = [make() for _ in range(self.sets)]
        return self._cache[key]

    def randn(self, *shape, dtype=None):
        t = self.torch
        return t.randn(*shape, device=self.device, generator=self.g, dtype=t.float32).to(dtype or t.bfloat16)

    def int8(self, *shape):
        return self.torch.randint(-127, 128, shape, device=self.device, generator=self.g, dtype=self.torch.int8)

    def scales(self, *shape):
        return self.torch.rand(*shape, device=self.device, generator=self.g) * 1e-2 + 1e-3


def make_call(torch, case: Dict, inp: Inputs) -> Callable[[int], object]:
    """fn(i) running the case on buffer set i % sets (all preparation happens here, outside the timing)."""
    from ditq import backends as B
    from ditq.format import WeightFormat
    import torch.nn.functional as F

    m, n, k, impl = case["M"], case["N"], case["K"], case["impl"]
    bf16 = torch.bfloat16
    if impl == "bf16 matmul":
        s = inp.get("bf16", lambda: (inp.randn(m, k), inp.randn(n, k) * 0.02, inp.randn(n)))
        return lambda i: F.linear(*s[i % len(s)])
    if impl == "torch._int_mm + scale":
        if inp.device.type == "cuda" and (m <= 16 or k % 8 or n % 8):
            raise Unsupported("_int_mm on CUDA needs M > 16 and K, N multiples of 8")
        s = inp.get("int_mm", lambda: (inp.int8(m, k), inp.scales(m, 1), inp.int8(n, k).t(), inp.scales(1, n),
                                      inp.randn(n)))

        def int_mm(i):
            a, sa, wt, sw, b = s[i % len(s)]
            return (torch._int_mm(a, wt).float().mul_(sa).mul_(sw).add_(b)).to(bf16)  # the 2nd pass it needs
        return int_mm
    if case["impl"] == FP8_GEMM or case.get("scheme") in ("eager", "compiled"):
        return _fp8(torch, case, inp)
    if case["backend"] in ("torchao", "gemlite"):
        return _third_party(torch, case, inp)
    be = case["backend"]
    if case["kind"] == "quant":
        static = case["scheme"] == "static"
        s = inp.get("act", lambda: (inp.randn(m, k), inp.scales(1)))  # shared by both schemes
        q = torch.ops.ditq.quantize_act
        return lambda i: q(s[i % len(s)][0], s[i % len(s)][1] if static else None, be)
    backend = B.get_backend(be, inp.device)
    # each set: the op's operands (the weight in the backend's layout), then the canonical weight values and
    # scales the exact reference reads
    if case["bits"] == 8:
        fmt = WeightFormat(8)

        def make8():
            w_q, w_scale = inp.int8(n, k), inp.scales(n)
            w, ws = backend.prepare_weight(fmt, w_q, w_scale)
            return inp.int8(m, k), inp.scales(1), w, ws, inp.randn(n), w_q, w_scale
        s = inp.get(f"w8-{be}", make8)
        op8 = torch.ops.ditq.gemm_w8a8
        call = lambda i: op8(*s[i % len(s)][:5], bf16, be)  # noqa: E731
        group = None
    else:
        group = case["group_size"]
        fmt = WeightFormat(4, group)

        def make4():
            from ditq.quant import reference as ref

            canon, w_scale = torch.randint(0, 256, (n, k // 2), device=inp.device, generator=inp.g,
                                           dtype=torch.uint8), inp.scales(k // group, n)
            w, ws = backend.prepare_weight(fmt, canon, w_scale)
            return inp.int8(m, k), inp.scales(1), w, ws, inp.randn(n), ref.unpack_int4(canon), w_scale
        s = inp.get(f"w4-{be}-{group}", make4)
        op4 = torch.ops.ditq.gemm_w4a8
        call = lambda i: op4(*s[i % len(s)][:5], group, bf16, be)  # noqa: E731
        if case.get("int_scales"):  # the same packed weights, q in [1, 16] per group, a float scale per channel
            call = _int_scales(torch, case, inp, s, group)
            return call

    def check() -> Optional[str]:
        a, a_scale, _, _, bias, w_q, w_scale = s[0]
        ref_rows = common.exact_rows(torch, common.sample_rows(torch, m), a, a_scale, w_q, w_scale, bias, group)
        return common.output_error(torch, call(0), m, n, ref_rows)
    call.check = check
    return call


def _int_scales(torch, case: Dict, inp: Inputs, sets, group: int):
    """W4A8 with integer group scales on the float-scale rows' packed weights: q int32 [K // G, N] in [1, 16], one
    float scale per channel; ditq_C::gemm_w4a8i (the Hopper kernels) on the CUDA backends, the Triton launcher given
    the int32 form (``ditq.format.int_scales_to_kernel``: ``INT_SCALES``) on triton. Checked against the exact W8A8
    product of the expanded weight q * w."""
    from ditq.format import int_scales_to_kernel
    from ditq.quant import reference as ref

    m, n, k = case["M"], case["N"], case["K"]

    def make():
        qs, sc = (torch.randint(1, ref.MAX_INT_GROUP_SCALE + 1, (k // group, n), device=inp.device, generator=inp.g,
                                dtype=torch.int32), inp.scales(n))
        return qs, sc, int_scales_to_kernel(qs, sc)
    qsets = inp.get(f"w4i-{case['backend']}-{group}", make)
    if case["backend"] == "triton":
        from ditq.kernels import w4a8

        def op(a, a_scale, w, qs, sc, bias, g, dt, packed):
            return w4a8.gemm_w4a8(a, a_scale, w, packed, bias, g, dt)
    else:
        def op(a, a_scale, w, qs, sc, bias, g, dt, packed):
            return torch.ops.ditq_C.gemm_w4a8i(a, a_scale, w, qs, sc, bias, g, dt)

    def call(i):
        a, a_scale, w, _, bias = sets[i % len(sets)][:5]
        qs, sc, packed = qsets[i % len(qsets)]
        return op(a, a_scale, w, qs, sc, bias, group, torch.bfloat16, packed)
    try:
        call(0)
    except ValueError as e:  # not an sm_90 GPU with sm_90a code (or the emulator not set to sm_90a)
        raise Unsupported(str(e).splitlines()[0][:200]) from e

    def check() -> Optional[str]:
        a, a_scale, _, _, bias, w_q, _ = sets[0]
        qs, sc, _ = qsets[0]
        wq = ref.expand_int_group_scales(w_q.cpu(), qs.cpu(), group).to(a.device)
        rows = common.exact_rows(torch, common.sample_rows(torch, m), a, a_scale, wq, sc, bias, None)
        return common.output_error(torch, call(0), m, n, rows)
    call.check = check
    return call


_FP8_COMPILED = {}


def _fp8(torch, case: Dict, inp: Inputs):
    """torch._scaled_mm on e4m3 operands with fp32 scales per activation row and per weight row (output channel),
    bias and bf16 output in the same call, fast accumulation as torchao's inference default; or the activation's
    quantization pass alone (plain torch, or torch.compile'd: dynamic shapes, one compile serves every M and K)."""
    import fp8_rowwise

    m, n, k = case["M"], case["N"], case["K"]
    why = fp8_rowwise.unsupported_reason(inp.device, n, k, product=case["kind"] == "gemm")
    if why:
        raise Unsupported(why)
    if case["kind"] == "quant":
        fn = fp8_rowwise.quantize
        if case["scheme"] == "compiled":
            backend = "inductor" if inp.device.type == "cuda" else "eager"  # CPU smoke: trace only, no C++ build
            if backend not in _FP8_COMPILED:
                _FP8_COMPILED[backend] = torch.compile(fp8_rowwise.quantize, backend=backend, dynamic=True)
            fn = _FP8_COMPILED[backend]
        s = inp.get("act", lambda: (inp.randn(m, k), inp.scales(1)))  # the bf16 activations ditq's rows read
        return lambda i: fn(s[i % len(s)][0])

    def make():
        a, sa = fp8_rowwise.quantize(inp.randn(m, k))
        w, sw = fp8_rowwise.quantize(inp.randn(n, k) * 0.02)
        return a, sa, w.t(), sw.t(), inp.randn(n)  # mat2 column-major [K, N], its scales [1, N]
    s = inp.get("fp8", make)

    def call(i):
        return fp8_rowwise.matmul(*s[i % len(s)], torch.bfloat16)
    try:
        call(0)
    except RuntimeError as e:  # e.g. a build whose _scaled_mm takes tensor-wide scales only
        raise Unsupported(f"torch._scaled_mm refused row-wise scales: {str(e).splitlines()[0][:160]}") from e
    return call


def third_party_impls() -> List[str]:
    out = []
    try:
        import torchao  # noqa: F401
        out += [TORCHAO_INT8, TORCHAO_FP8]
    except Exception:
        pass
    try:
        import gemlite  # noqa: F401
        out.append("gemlite a8w8 int8-dynamic")
    except Exception:
        pass
    return out


def _third_party(torch, case, inp):
    """torchao / gemlite on a bf16 nn.Linear, quantized by the library's own entry point. Written against their
    documented APIs but not run here (neither is installed on the team's machines): errors become rows."""
    m, n, k = case["M"], case["N"], case["K"]

    def make_linear():
        lin = torch.nn.Linear(k, n, bias=True, device=inp.device, dtype=torch.bfloat16)
        if case["impl"] == TORCHAO_FP8:  # torchao's float8 row-wise inference path: the peer on Hopper
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
            try:
                quantize_(lin, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
            except (AssertionError, NotImplementedError, RuntimeError) as e:  # e.g. no fp8 tensor cores (cc < 8.9)
                raise Unsupported(f"torchao float8 row-wise refused: {str(e).splitlines()[0][:160]}") from e
            return lin, inp.randn(m, k)
        if case["backend"] == "torchao":
            from torchao.quantization import quantize_
            try:
                from torchao.quantization import Int8DynamicActivationInt8WeightConfig as cfg
                quantize_(lin, cfg())
            except ImportError:
                from torchao.quantization import int8_dynamic_activation_int8_weight as cfg
                quantize_(lin, cfg())
            return lin, inp.randn(m, k)
        from gemlite.helper import A8W8_int8_dynamic
        return A8W8_int8_dynamic(device=str(inp.device)).from_linear(lin), inp.randn(m, k)
    s = inp.get(case["impl"], make_linear)
    return lambda i: s[i % len(s)][0](s[i % len(s)][1])


# ---- run ----------------------------------------------------------------------------------------------

def run_case(torch, case, inp, ceil, args) -> Dict:
    row = {k: case.get(k) for k in ROW_KEYS}
    flops, nbytes = _nbytes(case)
    row.update(flops=flops, bytes=nbytes)
    try:
        fn = make_call(torch, case, inp)
        # a ditq GEMM is timed only once its output is the product: a wrong kernel's time is no result
        why = fn.check() if hasattr(fn, "check") else None
        if why:
            row["status"] = f"wrong: {why}"
            return row
        big = case["M"] * case["N"] * case["K"] >= 1 << 33
        t = common.time_calls(fn, inp.device, args.warmup, args.iters,
                              graph_calls=0 if args.smoke or args.no_graph else max(inp.sets, 2 if big else 10))
    except Unsupported as e:
        row["status"] = f"unavailable: {e}"
        return row
    except Exception as e:
        row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if args.verbose:
            traceback.print_exc()
        return row
    ms = t["median_ms"]
    row.update(status="ok", median_ms=ms, min_ms=t["min_ms"], timing=t["timing"])
    if case["kind"] == "quant":
        row["gbps"] = nbytes / (ms * 1e-3) / 1e9
        row["roofline_ms"] = nbytes / ceil["copy_bytes_s"] * 1e3
    else:
        row["tops"] = flops / (ms * 1e-3) / 1e12
        row["gbps"] = nbytes / (ms * 1e-3) / 1e9
        peak = ceil["bf16_flops"] if case["bits"] == 16 else ceil["int8_ops"]
        row["roofline_ms"] = common.roofline_s(flops, nbytes, peak, ceil["copy_bytes_s"]) * 1e3
    row["roofline_fraction"] = row["roofline_ms"] / ms
    return row


def add_speedups(rows: List[Dict]) -> None:
    for impl, key in (("bf16 matmul", "speedup_vs_bf16"), (FP8_GEMM, "speedup_vs_fp8")):
        base = {(r["model"], r["layer"], r["M"]): r["median_ms"] for r in rows
                if r["impl"] == impl and r["status"] == "ok"}
        for r in rows:
            b = base.get((r["model"], r["layer"], r["M"]))
            if r["kind"] == "gemm" and r["status"] == "ok" and b:
                r[key] = b / r["median_ms"]


def plot(rows: List[Dict], path: str) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    shapes = list(dict.fromkeys((r["model"], r["layer"]) for r in rows if r["kind"] == "gemm"))
    cols = min(3, len(shapes)) or 1
    nrows = math.ceil(len(shapes) / cols) or 1
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
    for ax, (model, layer) in zip(axes.flat, shapes):
        sel = [r for r in rows if (r["model"], r["layer"]) == (model, layer) and r.get("speedup_vs_bf16")]
        for impl in dict.fromkeys(r["impl"] for r in sel):
            pts = sorted((r["M"], r["speedup_vs_bf16"]) for r in sel if r["impl"] == impl)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=impl)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        n, k = next((r["N"], r["K"]) for r in rows if (r["model"], r["layer"]) == (model, layer))
        ax.set(xscale="log", title=f"{model} {layer} (N={n}, K={k})", xlabel="M (tokens)", ylabel="speedup vs bf16")
    for ax in list(axes.flat)[len(shapes):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=7)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


MD_COLS = ["model", "layer", "N", "K", "M", "impl", "status", "median_ms", "tops", "gbps", "roofline_fraction",
           "speedup_vs_bf16", "speedup_vs_fp8", "timing"]
MD_HEAD = ["model", "layer", "N", "K", "M", "impl", "status", "median ms", "TOP/s", "GB/s", "of roofline",
           "speedup vs bf16", "speedup vs fp8 row-wise", "timing"]


def markdown(report: Dict) -> str:
    c = report["ceilings"]
    head = [f"## GEMM benchmark ({'smoke, CPU' if report['smoke'] else report['env'].get('gpu')})", "",
            common.env_markdown(report["env"]), "",
            f"Measured ceilings: bf16 {c['bf16_flops'] / 1e12:.4g} TFLOP/s, int8 {c['int8_ops'] / 1e12:.4g} TOP/s "
            f"({c['matmul_size']}^3), copy {c['copy_bytes_s'] / 1e9:.4g} GB/s (read + write). "
            "'of roofline' = max(FLOP time, byte time) / measured time; ditq, _int_mm and fp8 row-wise rows time "
            "the GEMM on already quantized activations (int8; e4m3 with fp32 row scales): add the quantize_act row "
            "(ditq) or the 'fp8 row-wise quantize' row (amax / scale / cast, plain torch or torch.compile'd) for "
            "the activation pass; quantization rows: GB/s vs copy.", ""]
    return "\n".join(head) + common.md_table(report["rows"], MD_COLS, MD_HEAD) + "\n"


def short_table(rows: List[Dict]) -> str:
    """The lines a GPU run prints last: DiT-XL/2 fc1 at the target M values."""
    pick = [r for r in rows if r["layer"] in ("mlp fc1", "square") and r["M"] in (1, 16, 17, 512, 4096)
            and r["model"] in ("DiT-XL/2", "tiny")]
    return common.md_table(pick, ["layer", "M", "impl", "status", "median_ms", "tops", "roofline_fraction",
                                  "speedup_vs_bf16", "speedup_vs_fp8"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (torch / interpreter / emulator)")
    ap.add_argument("--quick", action="store_true", help="DiT-XL/2 shapes and FLUX.1's attention / MLP, M in %s, "
                    "group sizes 64 and 128" % (QUICK_M,))
    ap.add_argument("--shapes", choices=sorted(SHAPE_SETS), default=None, help="default: all (quick with --quick)")
    ap.add_argument("--m", type=int, nargs="+", help="M values (default: 1 .. 16384)")
    ap.add_argument("--backends", nargs="+", help="ditq backends (default: every one available on the device, "
                    "except 'torch' on a GPU: it is the int64 reference, not an engine)")
    ap.add_argument("--groups", type=int, nargs="+", help="W4A8 group sizes (default: all supported)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--no-graph", action="store_true", help="time single calls with events, no CUDA graphs")
    ap.add_argument("--max-seconds", type=float, default=None, help="budget: later cases become 'skipped' rows")
    ap.add_argument("--out", help="output folder (default $OUT or benchmarks/out)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)

    device = common.select_device(args, "tiny shapes on CPU")  # before anything imports triton
    import torch
    import ditq  # noqa: F401  (registers torch.ops.ditq.*)
    from ditq import backends as B
    from ditq.format import SUPPORTED_GROUP_SIZES

    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 10)
    args.iters = args.iters if args.iters is not None else (2 if args.smoke else 50)
    if args.smoke:
        shapes, ms = common.TINY_SHAPES, tuple(args.m or common.TINY_M)
    else:
        shapes = SHAPE_SETS[args.shapes or ("quick" if args.quick else "all")]
        ms = tuple(args.m or (QUICK_M if args.quick else common.M_VALUES))
    avail = B.available_backends(device)
    backends = args.backends or [b for b in avail if not (device.type == "cuda" and b == "torch")]
    groups = args.groups or ((64, 128) if args.quick else SUPPORTED_GROUP_SIZES)
    extra = [] if args.smoke else third_party_impls()
    cases = enumerate_cases(shapes, ms, backends, groups, extra)
    deadline = common.Deadline(args.max_seconds)

    if device.type == "cuda":
        ceil = measure_ceilings(torch, device, 8192, 3, 10)
        l2 = torch.cuda.get_device_properties(device).L2_cache_size
    else:
        ceil = measure_ceilings(torch, device, 256, 1, 3)
        l2 = 0
    common.stop_on_sigterm()
    done: Dict[int, Dict] = {}
    by_shape: Dict[tuple, Inputs] = {}
    # M-outer execution (in the order of --m / QUICK_M, which puts the targets' sizes first), so that a budget
    # cut drops whole M values across every shape instead of whole shapes; rows keep the shape-major case order.
    order = sorted(range(len(cases)), key=lambda j: (ms.index(cases[j]["M"]), j))
    stopped = None
    try:
        for n_run, i in enumerate(order):
            case = cases[i]
            key = (case["N"], case["K"], case["M"])
            if deadline.passed():
                done[i] = dict({k: case.get(k) for k in ROW_KEYS}, status="skipped: time budget (--max-seconds)")
                continue
            if key not in by_shape:
                by_shape.clear()  # free the previous shape's buffers first
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                by_shape[key] = Inputs(torch, device, case["M"], case["N"], case["K"], l2, 16)
            if case["backend"] not in avail and case["backend"] not in ("torchao", "gemlite"):
                why = B.unavailable_reason(case["backend"], device)
                done[i] = dict({k: case.get(k) for k in ROW_KEYS}, status=f"unavailable: {why}")
                continue
            done[i] = run_case(torch, case, by_shape[key], ceil, args)
            if args.verbose:
                r = done[i]
                print(f"[{n_run + 1}/{len(cases)}] {r['model']} {r['layer']} M={r['M']} {r['impl']}: {r['status']} "
                      f"{common.fmt(r.get('median_ms'))} ms", file=sys.stderr)
    except common.Stopped as e:  # the stage's cap: keep what ran, say why the rest did not
        stopped = str(e)
        print(f"stopped: {stopped}; writing what ran", file=sys.stderr)
    rows = [done.get(i) or dict({k: c.get(k) for k in ROW_KEYS}, status=f"skipped: {stopped}")
            for i, c in enumerate(cases)]
    by_shape.clear()
    add_speedups(rows)
    report = {"schema": SCHEMA, "smoke": args.smoke, "device": str(device), "env": common.environment(),
              "ceilings": ceil, "backends": list(backends), "available_backends": list(avail),
              "group_sizes": list(groups), "m_values": list(ms), "cases": len(cases), "stopped": stopped,
              "shapes": [common.shape_dict(*s) for s in shapes], "rows": rows}
    d = common.out_dir(args.out)
    common.write_json(os.path.join(d, "gemm.json"), report)
    with open(os.path.join(d, "gemm.md"), "w") as f:
        f.write(markdown(report))
    png = plot(rows, os.path.join(d, "gemm_speedup.png"))
    ok = sum(r["status"] == "ok" for r in rows)
    print(short_table(rows))
    print(f"\n{ok}/{len(rows)} cases ok; wrote gemm.json, gemm.md{', gemm_speedup.png' if png else ''} in {d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared helpers of the benchmark scripts: shapes, ceilings, timing, environment, JSON / markdown writers.

Kept small on purpose; each script owns its own cases and tables.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# ---- shapes -------------------------------------------------------------------------------------------
# (model, layer, N, K). DiT-XL/2 as diffusers builds it; PixArt-alpha shares DiT-XL's hidden size
# 1152 and MLP 4608, so only its extra cross-attention K/V projection of T5 features (4096 -> 1152) is new;
# SD3-medium: hidden 1536 (24 x 64), MLP 6144; FLUX.1: hidden 3072, MLP 12288, single-stream blocks fuse
# qkv + MLP-in (3072 -> 21504) and attn-out + MLP-out (15360 -> 3072).
DIT_SHAPES = [
    ("DiT-XL/2", "attn q/k/v/out", 1152, 1152),
    ("DiT-XL/2", "qkv fused", 3456, 1152),
    ("DiT-XL/2", "mlp fc1", 4608, 1152),
    ("DiT-XL/2", "mlp fc2", 1152, 4608),
    ("DiT-XL/2", "adaLN", 6912, 1152),
]
OTHER_SHAPES = [
    ("PixArt-a", "cross-attn k/v (T5)", 1152, 4096),
    ("SD3-medium", "attn q/k/v/out", 1536, 1536),
    ("SD3-medium", "mlp fc1", 6144, 1536),
    ("SD3-medium", "mlp fc2", 1536, 6144),
    ("FLUX.1", "attn q/k/v/out", 3072, 3072),
    ("FLUX.1", "mlp fc1", 12288, 3072),
    ("FLUX.1", "mlp fc2", 3072, 12288),
    ("FLUX.1", "single linear1", 21504, 3072),
    ("FLUX.1", "single linear2", 3072, 15360),
]
ALL_SHAPES = DIT_SHAPES + OTHER_SHAPES
M_VALUES = (1, 16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384)
TINY_SHAPES = [("tiny", "square", 64, 128), ("tiny", "wide", 96, 256)]  # --smoke: CPU, interpreter-sized
TINY_M = (1, 17)


def shape_dict(model: str, layer: str, n: int, k: int) -> Dict:
    return {"model": model, "layer": layer, "N": n, "K": k}


# ---- ceilings -----------------------------------------------------------------------------------------
# Datasheet numbers (dense), used by the static report; the GPU benchmarks measure their own in each run.
DATASHEET = {
    "H100-SXM": {"bf16_flops": 989e12, "int8_ops": 1979e12, "hbm_bytes_s": 3.35e12, "copy_bytes_s": 3.0e12,
                 "sms": 132, "smem_per_sm": 228 * 1024, "smem_per_cta": 227 * 1024},
    "A100-SXM": {"bf16_flops": 312e12, "int8_ops": 624e12, "hbm_bytes_s": 2.04e12, "copy_bytes_s": 1.7e12,
                 "sms": 108, "smem_per_sm": 164 * 1024, "smem_per_cta": 163 * 1024},
}


def roofline_s(flops: float, nbytes: float, peak_flops: float, bytes_s: float) -> float:
    """Lower bound on run time: the larger of compute time and memory time."""
    return max(flops / peak_flops if peak_flops else 0.0, nbytes / bytes_s if bytes_s else 0.0)


# ---- correctness of a timed GEMM ------------------------------------------------------------------------

def sample_rows(torch, m: int, seed: int = 0) -> List[int]:
    """Rows of an M-row GEMM output to check against the exact reference: all of them up to M = 128; beyond, the
    first, the last and one at a random offset in each 64-row block, so every row tile of any configuration
    (BM <= 256) is seen, at varying positions within it."""
    if m <= 128:
        return list(range(m))
    rng = torch.Generator().manual_seed(seed + m)
    return sorted({0, m - 1} | {b + int(torch.randint(min(64, m - b), (1,), generator=rng))
                                for b in range(0, m, 64)})


def exact_rows(torch, rows: List[int], a, a_scale, w_q, w_scale, bias, group: Optional[int]):
    """(row index tensor, float64 value, magnitude, fp32 operations) of the exact W8A8 (``group`` None; ``w_q``
    int8 [N, K], ``w_scale`` [N]) or W4A8 (``w_q`` the int4 values as int8 [N, K], ``w_scale`` [K // G, N])
    product on ``rows``: ditq.quant.reference's integer sums, computed where the operands live."""
    from ditq.quant import reference as ref

    idx = torch.tensor(rows, device=a.device)
    a_rows = a[idx]
    s_rows = a_scale if a_scale.numel() == 1 else a_scale.reshape(-1)[idx]
    if group is None:
        exact, mag = ref.gemm_w8a8_exact(a_rows, s_rows, w_q, w_scale, bias)
        return idx, exact, mag, 4
    exact, mag = ref.gemm_w4a8_exact(a_rows, s_rows, w_q, w_scale, group, bias)
    return idx, exact, mag, 4 + 2 * (a.shape[1] // group)


def output_error(torch, y, m: int, n: int, reference) -> Optional[str]:
    """None if ``y`` is the [M, N] product (finite everywhere: the caller poisoned it; on the reference's rows
    within ditq.testing's fp32-rounding tolerance), else why not, in one line. ``reference``: exact_rows' tuple."""
    from ditq import testing

    if y is None or tuple(y.shape) != (m, n):
        return f"output shape {None if y is None else tuple(y.shape)}, expected {(m, n)}"
    bad = ~torch.isfinite(y.float())
    if bool(bad.any()):
        return f"{int(bad.sum())} of {m * n} outputs not written or not finite"
    idx, exact, mag, ops = reference
    try:
        testing.assert_matches_exact(y[idx], exact, mag, ops, what="output")
    except AssertionError as e:
        return str(e).splitlines()[0][:300]
    return None


# ---- timing -------------------------------------------------------------------------------------------

def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def time_calls(fn: Callable[[int], object], device, warmup: int = 5, iters: int = 30,
               graph_calls: int = 0) -> Dict:
    """Median time of ``fn(i)`` (i = call index: the callee rotates its input buffers with it).

    CUDA: CUDA events. With ``graph_calls`` > 0, ``graph_calls`` consecutive calls are captured in one CUDA
    graph and each replay is timed (per-call time = replay / graph_calls), which removes Python and launch
    overhead from kernel timings; if capture fails, per-call events are used and the result says so.
    CPU: wall clock per call. Returns {"median_ms", "min_ms", "n", "timing"}.
    """
    import torch

    dev = torch.device(device)
    for i in range(warmup):
        fn(i)
    if dev.type != "cuda":
        ts = []
        for i in range(iters):
            t0 = time.perf_counter()
            fn(i)
            ts.append((time.perf_counter() - t0) * 1e3)
        return {"median_ms": median(ts), "min_ms": min(ts), "n": len(ts), "timing": "wall-clock"}
    torch.cuda.synchronize(dev)
    how = "cuda-events"
    if graph_calls > 0:
        try:
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream(dev)
            s.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(s):
                for i in range(graph_calls):  # warm the side stream (allocator pools, lazy init)
                    fn(i)
                with torch.cuda.graph(g, stream=s):
                    for i in range(graph_calls):
                        fn(i)
            torch.cuda.current_stream(dev).wait_stream(s)
            torch.cuda.synchronize(dev)
            g.replay()
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(max(3, iters // graph_calls))]
            for a, b in ev:
                a.record()
                g.replay()
                b.record()
            torch.cuda.synchronize(dev)
            ts = [a.elapsed_time(b) / graph_calls for a, b in ev]
            del g
            return {"median_ms": median(ts), "min_ms": min(ts), "n": len(ts) * graph_calls,
                    "timing": f"cuda-graph x{graph_calls}"}
        except Exception as e:  # some callees cannot be captured; fall back, and say so
            how = f"cuda-events (graph capture failed: {type(e).__name__})"
            torch.cuda.synchronize(dev)
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for i, (a, b) in enumerate(ev):
        a.record()
        fn(warmup + i)
        b.record()
    torch.cuda.synchronize(dev)
    ts = [a.elapsed_time(b) for a, b in ev]
    return {"median_ms": median(ts), "min_ms": min(ts), "n": len(ts), "timing": how}


class Deadline:
    """A wall-clock budget: cases past it are recorded as skipped rather than silently dropped."""

    def __init__(self, seconds: Optional[float]):
        self.end = None if not seconds else time.monotonic() + seconds

    def passed(self) -> bool:
        return self.end is not None and time.monotonic() > self.end

    def left(self) -> float:
        """Seconds left (inf without a budget)."""
        return float("inf") if self.end is None else self.end - time.monotonic()


class Stopped(BaseException):
    """Raised in the main thread on SIGTERM (what ``timeout`` sends at a stage's cap): the script stops the case
    it is in, marks the rest skipped and still writes its JSON. A BaseException, so that the ``except Exception``
    around each case (which turns a failure into an error row) does not swallow it."""


def stop_on_sigterm() -> None:
    import signal

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second TERM (or timeout's KILL) ends the process
        raise Stopped("SIGTERM (the stage's time limit)")
    signal.signal(signal.SIGTERM, handler)


# ---- environment --------------------------------------------------------------------------------------

def _run(cmd: List[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        return ""


def environment() -> Dict:
    """Date, versions, device and commit: what RESULTS.md needs beside every number."""
    import torch

    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "host": platform.machine(), "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
           "commit": _run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"])}
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    env["triton_interpret"] = os.environ.get("TRITON_INTERPRET") == "1"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, sms=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                   gpu_memory_gib=round(p.total_memory / 2 ** 30, 1),
                   driver=_run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) or None)
        # Whether the cuda backend's Hopper (wgmma) kernels run here: an sm_90 GPU and this build's sm_90a code.
        from ditq.backends import cuda_backend
        env["sm90a_kernels"] = (bool(torch.ops.ditq_C.gemm_sm90_available()) if cuda_backend.built_with_cuda()
                                else None)
    else:
        env.update(gpu=None, cpu=platform.processor() or platform.machine(), cpu_threads=torch.get_num_threads())
    return env


def use_interpreter_without_gpu() -> None:
    """Triton reads TRITON_INTERPRET when it is first imported (diffusers imports it): set it before that."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def select_device(args, smoke_what: str):
    """The device a benchmark runs on. ``--smoke``, or no CUDA GPU, means tiny shapes on the CPU (Triton through
    its interpreter, set up before triton is imported) with one thread: tiny ops on more threads only spin
    against each other on a shared CPU. Sets ``args.smoke`` accordingly."""
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    use_interpreter_without_gpu()
    import torch

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        print(f"no CUDA GPU: running the --smoke configuration ({smoke_what})", file=sys.stderr)
        args.smoke = True
    if args.smoke:
        torch.set_num_threads(1)
    return device


# ---- output -------------------------------------------------------------------------------------------

def out_dir(explicit: Optional[str] = None) -> str:
    d = explicit or os.environ.get("OUT") or os.path.join(HERE, "out")
    os.makedirs(d, exist_ok=True)
    return d


def _clean(x):
    """JSON has no inf / nan: write them as strings so the file stays standard JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(path: str, obj) -> str:
    with open(path, "w") as f:
        json.dump(_clean(obj), f, indent=1, allow_nan=False)
        f.write("\n")
    return path


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 10 ** -digits):
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}" if abs(v) >= 1 else f"{v:.{digits}f}".rstrip("0").rstrip(".") or "0"
    return str(v)


def md_table(rows: List[Dict], cols: List[str], headers: Optional[List[str]] = None) -> str:
    headers = headers or cols
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(c)).replace("|", "/") for c in cols) + " |")
    return "\n".join(out)


def env_markdown(env: Dict) -> str:
    keys = ("date", "gpu", "driver", "capability", "sm90a_kernels", "cpu", "python", "torch", "cuda", "triton", "commit",
            "command")
    return "\n".join(f"- {k}: `{env[k]}`" for k in keys if env.get(k) is not None)

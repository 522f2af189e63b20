"""Activation calibration: record each quantizable linear's input range per sampling step.

A *step* is one denoising step inside a calibration run (a pipeline call, or one ``calib_fn(module)``): the
transformer calls that share a timestep. DiT, PixArt, SD3 and FLUX pipelines call the transformer once per step
(classifier-free guidance batched); Wan's and Qwen-Image's call it twice, conditional then unconditional, at the
same timestep, and both calls are that step. Step 0 is t = T, the noisiest step. A transformer whose forward takes
no timestep counts each call as a step.

Modes (``QuantConfig.calibration``):

* ``"first-step"`` (the paper): observers record only step 0 of each run, and the run is *stopped* as the
  transformer is called for step 1 (a private exception raised from a forward pre-hook on the transformer and
  caught here), so calibrating costs one step per run instead of a whole sampling loop.
* a list of step indices: observers record those steps; the run stops as the step after the last one starts.
* ``"all-steps"`` (the baseline the paper compares against): every step of every run.

Each observer keeps, per recorded step, ``absmax[step]`` (the max over runs of max |x|) and a histogram of |x| on
fixed log-spaced bins (count, sum |x|, sum x² per bin: 3 x 770 float64 per layer and step, whatever the batch), plus
the per-input-channel max |x| over all recorded steps (for outlier smoothing). The histogram is what the range
estimators work from, so memory stays bounded however many rows calibration sees:

* ``"max"``: the max |x| (the paper's choice; the default);
* ``"percentile"``: the ``p``-th percentile of |x| (interpolated inside a bin);
* ``"mse"``: a 1-D search over clip ratios of the max, minimizing the estimated int8 quantization MSE of the
  recorded activations (:func:`quant_mse`).

With ``record_hessian`` (``QuantConfig(weight_method="gptq")``) each observer also sums ``x^T x`` over the rows of
the layer's input at the selected steps: float32 ``[K, K]`` per layer on the activations' device (``4 K^2`` bytes
each), the input second moment that GPTQ rounds the weights against (``ditq.weight_rounding``).

The static scale is ``clip / 127`` over the selected steps. The transformer's positional and keyword inputs at
its first call of each run are kept (detached copies) so that the report can re-run exactly those calls before and after
quantization; its timestep at each step is kept too (for timestep-grouped scales).

A non-finite activation in calibration raises :class:`CalibrationError` naming the layer and the step: a NaN
would otherwise become a NaN scale and an SQNR of "nan dB" with no warning.
"""
from __future__ import annotations

import functools
import inspect
import math
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from .quant.reference import INT8_QMAX, symmetric_scale
from .timestep_groups import noise_level, timestep_of

ESTIMATORS = ("max", "percentile", "mse")

# Histogram bins of |x| in the log2 domain: bin 0 holds |x| < 2^LOG2_MIN (zeros included), then BINS_PER_OCTAVE
# bins per octave up to 2^LOG2_MAX (larger values land in the last bin; its sums stay exact). 16 bins per octave
# put a bin's edges 4.4 % apart, finer than the clip-ratio grid of the MSE search.
LOG2_MIN, LOG2_MAX, BINS_PER_OCTAVE = -24, 24, 16
NUM_BINS = (LOG2_MAX - LOG2_MIN) * BINS_PER_OCTAVE + 2
MSE_RATIOS = torch.linspace(0.2, 1.0, 81).tolist()  # clip candidates, as fractions of the max


def bin_edges() -> torch.Tensor:
    """float64 [NUM_BINS + 1] lower/upper edges of the histogram bins (bin 0 starts at 0, the last ends at inf)."""
    inner = 2.0 ** (LOG2_MIN + torch.arange(NUM_BINS - 1, dtype=torch.float64) / BINS_PER_OCTAVE)
    return torch.cat([torch.zeros(1, dtype=torch.float64), inner, torch.full((1,), math.inf, dtype=torch.float64)])


# Elements of |x| binned per pass: each pass holds ~6 float64/int64 temporaries of this length (~50 MB), however
# large the activation (a FLUX.1 single block's [4608, 12288] input would otherwise take ~3 GB of temporaries).
HIST_CHUNK = 1 << 20


def histogram(x: torch.Tensor) -> torch.Tensor:
    """float64 [3, NUM_BINS]: per bin of |x|, the count, the sum of |x| and the sum of x²."""
    flat = x.detach().reshape(-1)
    out = torch.zeros(3, NUM_BINS, dtype=torch.float64, device=flat.device)
    for i in range(0, flat.numel(), HIST_CHUNK):
        a = flat[i:i + HIST_CHUNK].abs().double()
        idx = torch.floor((torch.log2(a.clamp(min=2.0 ** LOG2_MIN)) - LOG2_MIN) * BINS_PER_OCTAVE).long() + 1
        idx = torch.where(a < 2.0 ** LOG2_MIN, torch.zeros_like(idx), idx.clamp(1, NUM_BINS - 1))
        out[0].index_add_(0, idx, torch.ones_like(a))
        out[1].index_add_(0, idx, a)
        out[2].index_add_(0, idx, a * a)
    return out.cpu()


def release_freed_memory(device) -> None:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim``) after CPU work on a large model.

    Calibration and the layer swap free hundreds of transients of 1-40 MB (activations, a layer's fp32 weight
    copy) while small tensors that live on (histograms, packed weights) land between them; glibc keeps the
    freed space in its heap, so RSS only grows. Measured on DiT-XL/2 in float32 (benchmarks/real_size.py): RSS
    peaked 3.1 GiB above the 2.8 GiB model during ``quantize``, and stayed 2.3 GiB above the quantized model
    after it returned. A no-op on GPUs (the caching allocator reuses its blocks) and off glibc."""
    if torch.device(device).type != "cpu":
        return
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    """glibc's ``malloc_trim``, looked up once; None off glibc (other libcs lack it)."""
    try:
        import ctypes
        return getattr(ctypes.CDLL("libc.so.6"), "malloc_trim", None)
    except OSError:
        return None


def quant_mse(hist: torch.Tensor, clip: float, qmax: int = INT8_QMAX) -> float:
    """Estimated sum of squared int8 errors of the histogrammed values with clip ``clip`` (scale clip / qmax).

    Per bin: values above the clip cost (|x| - c)² exactly (from the bin's count and sums); values that round to
    zero (|x| < s/2) cost x² exactly; the rest cost the uniform rounding noise s²/12 each. A bin straddling the
    clip is split by its width (bins are 4.4 % wide, so the approximation is small)."""
    if clip <= 0:
        return float(hist[2].sum())
    s = clip / qmax
    edges = bin_edges()
    lo, hi = edges[:-1], edges[1:]
    n, s1, s2 = hist[0], hist[1], hist[2]
    clipped = (s2 - 2 * clip * s1 + n * clip * clip).clamp(min=0)
    inside = torch.where(hi <= s / 2, s2, n * (s * s / 12))
    width = torch.where(torch.isfinite(hi), hi - lo, torch.ones_like(hi))
    frac_above = ((hi.clamp(max=1e300) - clip) / width).clamp(0, 1)
    frac_above = torch.where(lo >= clip, torch.ones_like(frac_above), frac_above)
    frac_above = torch.where(hi <= clip, torch.zeros_like(frac_above), frac_above)
    return float((frac_above * clipped + (1 - frac_above) * inside).sum())


def percentile_clip(hist: torch.Tensor, absmax: float, p: float) -> float:
    """The p-th percentile (0 < p <= 100) of |x|, interpolated linearly inside its bin, never above the max."""
    counts = hist[0]
    total = float(counts.sum())
    if total == 0 or absmax == 0:
        return 0.0
    target = total * p / 100.0
    cum = torch.cumsum(counts, 0)
    i = int(torch.searchsorted(cum, torch.tensor([target], dtype=cum.dtype)).clamp(max=len(cum) - 1))
    edges = bin_edges()
    lo, hi = float(edges[i]), min(float(edges[i + 1]), absmax)
    before = float(cum[i - 1]) if i > 0 else 0.0
    frac = 0.0 if counts[i] == 0 else (target - before) / float(counts[i])
    return min(absmax, lo + max(0.0, min(1.0, frac)) * max(0.0, hi - lo))


def mse_clip(hist: torch.Tensor, absmax: float, qmax: int = INT8_QMAX) -> float:
    """The clip in ``MSE_RATIOS x absmax`` with the least estimated quantization MSE (ties: the larger clip)."""
    if absmax == 0:
        return 0.0
    best, best_err = absmax, quant_mse(hist, absmax, qmax)
    for r in reversed(MSE_RATIOS[:-1]):
        err = quant_mse(hist, r * absmax, qmax)
        if err < best_err * (1 - 1e-9):
            best, best_err = r * absmax, err
    return best


def clip_value(hist: torch.Tensor, absmax: float, estimator: str, percentile: float = 99.99) -> float:
    """The activation clip of one layer from its (summed) histogram and max under ``estimator``."""
    if estimator == "max":
        return absmax
    if estimator == "percentile":
        return percentile_clip(hist, absmax, percentile)
    if estimator == "mse":
        return mse_clip(hist, absmax)
    raise ValueError(f"unknown range estimator {estimator!r}; choose one of {ESTIMATORS}")


def hist_sqnr(hist: torch.Tensor, clip: float) -> Optional[float]:
    """Estimated activation SQNR (dB) of the histogrammed values quantized with clip ``clip``."""
    signal = float(hist[2].sum())
    if signal == 0:
        return None
    noise = quant_mse(hist, clip)
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


class CalibrationError(RuntimeError):
    """Calibration could not produce activation scales; the model was left as it was."""


class _StopRun(Exception):
    """Raised from the transformer's forward hooks once every selected step has run (never escapes)."""


def _detach_copy(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detach_copy(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _detach_copy(v) for k, v in obj.items()}
    return obj


class Calibrator:
    """Hooks on ``transformer`` and on ``layers`` (name -> nn.Linear inside it) that observe calibration runs.

    ``steps``: the step indices to record, or None for every step. ``record_ranges=False`` only counts calls and
    keeps the first-step inputs (the dynamic scheme needs no ranges but the report still re-runs step 0).
    ``record_hessian``: also sum ``x^T x`` per layer (``hessian[name]``, float32 [K, K]; ``hessian_rows[name]``
    counts the rows).
    """

    def __init__(self, transformer: nn.Module, layers: Dict[str, nn.Linear], steps: Optional[Sequence[int]],
                 record_ranges: bool = True, record_hessian: bool = False):
        self.transformer = transformer
        self.layers = dict(layers)
        self.steps = None if steps is None else sorted(set(steps))
        self.record_ranges = record_ranges
        self.record_hessian = record_hessian
        self.hessian: Dict[str, torch.Tensor] = {}
        self.hessian_rows: Dict[str, int] = {}
        self.absmax: Dict[str, Dict[int, float]] = {n: {} for n in self.layers}
        self.hist: Dict[str, Dict[int, torch.Tensor]] = {n: {} for n in self.layers}
        self.channel_absmax: Dict[str, torch.Tensor] = {}  # name -> float32 [K], max over recorded steps and runs
        self.timesteps: Dict[int, float] = {}  # step -> the transformer's timestep at that step (first run's)
        self.calls_per_run: List[int] = []
        self.steps_per_run: List[int] = []
        self.first_step_inputs: List[tuple] = []  # (args, kwargs) of the first call of each run
        self._step = -1          # the step the running forward belongs to; -1 outside the transformer
        self._calls = 0          # transformer calls finished in this run
        self._steps = 0          # steps started in this run
        self._timestep = None    # the timestep of this run's last call (None: none, or no timestep input)
        self._handles = []

    # ---- hooks --------------------------------------------------------------------------------------

    def _selected(self, step: int) -> bool:
        return self.steps is None or step in self.steps

    def _pre_transformer(self, module, args, kwargs):
        t = timestep_of(module, args, kwargs)
        try:
            t = None if t is None else float(noise_level(t))
        except (TypeError, ValueError, IndexError, RuntimeError):
            t = None  # a timestep that is no number: each call is then a step, and grouped scales are unavailable
        if self._calls == 0 or t is None or t != self._timestep:  # a new step (see the module docstring)
            if self.steps is not None and self._steps > self.steps[-1]:
                raise _StopRun()  # the step after the last one asked for: stopped before its forward runs
            self._steps += 1
        self._timestep = t
        self._step = self._steps - 1
        if self._calls == 0:
            self.first_step_inputs.append((_detach_copy(args), _detach_copy(kwargs)))
        if t is not None and self._step not in self.timesteps:
            self.timesteps[self._step] = t

    def _post_transformer(self, module, args, kwargs, output):
        self._calls += 1
        self._step = -1
        if self.steps is not None and self._timestep is None and self._steps > self.steps[-1]:
            raise _StopRun()  # no timestep to tell a step's second call by: each call is a step, stop after it

    def _observer(self, name: str):
        record, hists = self.absmax[name], self.hist[name]

        def hook(module, args):
            if self._step < 0 or not self._selected(self._step):
                return
            x = args[0]
            if not torch.is_tensor(x) or not x.is_floating_point() or not x.numel():
                return
            x = x.detach()
            if not bool(torch.isfinite(x).all()):
                bad = int((~torch.isfinite(x)).sum())
                raise CalibrationError(f"layer {name!r} got {bad} non-finite activation value(s) (NaN/inf) at "
                                       f"calibration step {self._step}: calibration data must be finite (check "
                                       f"the model's inputs and dtype)")
            if self.record_hessian:
                xf = x.reshape(-1, x.shape[-1]).float()
                h = self.hessian.get(name)
                if h is None:
                    self.hessian[name] = xf.t() @ xf
                else:
                    h.addmm_(xf.t(), xf)
                self.hessian_rows[name] = self.hessian_rows.get(name, 0) + xf.shape[0]
            if not self.record_ranges:
                return
            x2 = x.reshape(-1, x.shape[-1]).abs()
            v = float(x2.amax())
            record[self._step] = max(record.get(self._step, 0.0), v)
            h = histogram(x2)
            hists[self._step] = h if self._step not in hists else hists[self._step] + h
            ch = x2.amax(dim=0).float().cpu()
            prev = self.channel_absmax.get(name)
            self.channel_absmax[name] = ch if prev is None else torch.maximum(prev, ch)
        return hook

    def __enter__(self):
        self._handles.append(self.transformer.register_forward_pre_hook(self._pre_transformer, with_kwargs=True))
        self._handles.append(self.transformer.register_forward_hook(self._post_transformer, with_kwargs=True))
        if self.record_ranges or self.record_hessian:
            for name, layer in self.layers.items():
                self._handles.append(layer.register_forward_pre_hook(self._observer(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    # ---- runs ---------------------------------------------------------------------------------------

    def run(self, fn: Callable[[], object]) -> None:
        """One calibration run: ``fn()`` calls the transformer; stopped early once the selected steps ran."""
        self._calls, self._steps, self._step, self._timestep = 0, 0, -1, None
        try:
            with torch.no_grad():
                fn()
        except _StopRun:
            pass
        finally:
            self._step = -1
            self.calls_per_run.append(self._calls)
            self.steps_per_run.append(self._steps)
        if self._calls == 0:
            raise CalibrationError("a calibration run never called the transformer: check calib_inputs / calib_fn")
        if self.steps is not None and self._steps <= self.steps[-1]:
            raise CalibrationError(f"calibration step {self.steps[-1]} was asked for, but a run had only "
                                   f"{self._steps} step(s) ({self._calls} transformer call(s))")

    # ---- results ------------------------------------------------------------------------------------

    def recorded_steps(self, name: str) -> List[int]:
        return sorted(self.absmax[name])

    def summed_hist(self, name: str, steps: Optional[Iterable[int]] = None) -> torch.Tensor:
        """The histogram of layer ``name`` summed over ``steps`` (None: every recorded step)."""
        rec = self.hist[name]
        keys = list(rec) if steps is None else [s for s in steps if s in rec]
        out = torch.zeros(3, NUM_BINS, dtype=torch.float64)
        for k in keys:
            out += rec[k]
        return out

    def clip(self, name: str, steps: Optional[Iterable[int]] = None, estimator: str = "max",
             percentile: float = 99.99) -> Optional[float]:
        """The clip of layer ``name`` over ``steps`` (None: every recorded step); None if it never ran there."""
        rec = self.absmax[name]
        keys = list(rec) if steps is None else [s for s in steps if s in rec]
        if not keys:
            return None
        absmax = max(rec[k] for k in keys)
        return clip_value(self.summed_hist(name, keys), absmax, estimator, percentile)

    def scale(self, name: str, steps: Optional[Iterable[int]] = None, estimator: str = "max",
              percentile: float = 99.99) -> Optional[torch.Tensor]:
        """float32 [1] static scale ``clip / 127`` of layer ``name`` over the recorded steps; None if it never
        ran. A layer whose recorded inputs were all zero gets 1.0 (:func:`ditq.quant.reference.symmetric_scale`);
        :func:`ditq.quantize` keeps such a layer in full precision instead, with a warning."""
        c = self.clip(name, steps, estimator, percentile)
        if c is None:
            return None
        return symmetric_scale(torch.tensor([c], dtype=torch.float32), INT8_QMAX)


# ---- drivers ------------------------------------------------------------------------------------------

def pipeline_runs(pipe, calib_inputs) -> List[Callable[[], object]]:
    """One closure per calibration run of a diffusers pipeline. ``calib_inputs``: the pipeline call's kwargs,
    or a list of them (one run each). A fixed generator (seed = run index) is added when the pipeline takes one
    and none is given, so calibration is reproducible."""
    if isinstance(calib_inputs, dict):
        calib_inputs = [calib_inputs]
    if not isinstance(calib_inputs, (list, tuple)) or not calib_inputs or \
            not all(isinstance(c, dict) for c in calib_inputs):
        raise CalibrationError("calib_inputs must be a dict of pipeline call arguments or a non-empty list of them")
    try:
        takes_generator = "generator" in inspect.signature(pipe.__call__).parameters
    except (TypeError, ValueError):
        takes_generator = False
    runs = []
    for i, kwargs in enumerate(calib_inputs):
        kwargs = dict(kwargs)
        if takes_generator and kwargs.get("generator") is None:
            kwargs["generator"] = torch.Generator("cpu").manual_seed(i)
        runs.append(_rerunnable(pipe, kwargs))
    return runs


def _rerunnable(pipe, kwargs):
    """A run that starts its generator(s) from the same state every time it is called: smoothing calibrates
    twice, and both passes must see the same noise."""
    gens = kwargs.get("generator")
    gens = gens if isinstance(gens, (list, tuple)) else [gens]
    states = [(g, g.get_state()) for g in gens if isinstance(g, torch.Generator)]

    def run():
        for g, st in states:
            g.set_state(st)
        return pipe(**kwargs)
    return run


def calibrate(transformer: nn.Module, layers: Dict[str, nn.Linear], runs: List[Callable[[], object]],
              steps: Optional[Sequence[int]], record_ranges: bool = True, progress: bool = True,
              pipe=None, record_hessian: bool = False) -> Calibrator:
    """Run every calibration run under observers; returns the :class:`Calibrator` with the records.

    Any error inside a run is re-raised as :class:`CalibrationError` after all hooks are removed.
    """
    from tqdm.auto import tqdm

    cal = Calibrator(transformer, layers, steps, record_ranges, record_hessian)
    saved_bar = None
    if pipe is not None and hasattr(pipe, "set_progress_bar_config"):
        saved_bar = dict(getattr(pipe, "_progress_bar_config", {}))
        pipe.set_progress_bar_config(disable=True)  # our bar counts runs; the pipeline's would count steps
    try:
        with cal, tqdm(runs, desc="ditq calibration", unit="run", disable=not progress) as bar:
            for run in bar:
                try:
                    cal.run(run)
                except CalibrationError:
                    raise
                except Exception as e:
                    raise CalibrationError(f"calibration run {len(cal.calls_per_run) - 1} failed: "
                                           f"{type(e).__name__}: {e}") from e
                bar.set_postfix(transformer_calls=sum(cal.calls_per_run))
    finally:
        if saved_bar is not None:
            pipe._progress_bar_config = saved_bar
    return cal

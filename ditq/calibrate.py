"""Activation calibration: record each quantizable linear's input range per sampling step.

A *step* is one call of the transformer inside a calibration run (a pipeline call, or one ``calib_fn(module)``):
diffusers' DiT-family pipelines call the transformer exactly once per denoising step (classifier-free guidance is
batched), so call ``i`` of a run is denoising step ``i``, and call 0 is t = T, the noisiest step.

Modes (``QuantConfig.calibration``):

* ``"first-step"`` (the paper): observers record only call 0 of each run, and the run is *stopped* right after it
  (a private exception raised from a forward hook on the transformer and caught here), so calibrating costs one
  transformer call per run instead of a whole sampling loop.
* a list of step indices: observers record those calls; the run stops after the last one.
* ``"all-steps"`` (the baseline the paper compares against): every call of every run.

Each observer keeps ``absmax[step]`` (the max over runs of max |x| at that step), so the per-step ranges stay
available for the report and for figures; the static scale is ``absmax / 127`` over the selected steps. The
transformer's positional and keyword inputs at call 0 of each run are kept (detached copies) so that the report
can re-run exactly those calls before and after quantization.
"""
from __future__ import annotations

import inspect
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from .quant.reference import INT8_QMAX, symmetric_scale


class CalibrationError(RuntimeError):
    """Calibration could not produce activation scales; the model was left as it was."""


class _StopRun(Exception):
    """Raised from the transformer's forward hook once every selected step has run (never escapes)."""


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
    """

    def __init__(self, transformer: nn.Module, layers: Dict[str, nn.Linear], steps: Optional[Sequence[int]],
                 record_ranges: bool = True):
        self.transformer = transformer
        self.layers = dict(layers)
        self.steps = None if steps is None else sorted(set(steps))
        self.record_ranges = record_ranges
        self.absmax: Dict[str, Dict[int, float]] = {n: {} for n in self.layers}
        self.calls_per_run: List[int] = []
        self.first_step_inputs: List[tuple] = []  # (args, kwargs) of call 0 of each run
        self._step = -1
        self._calls = 0
        self._handles = []

    # ---- hooks --------------------------------------------------------------------------------------

    def _selected(self, step: int) -> bool:
        return self.steps is None or step in self.steps

    def _pre_transformer(self, module, args, kwargs):
        self._step = self._calls
        if self._step == 0:
            self.first_step_inputs.append((_detach_copy(args), _detach_copy(kwargs)))

    def _post_transformer(self, module, args, kwargs, output):
        self._calls += 1
        self._step = -1
        if self.steps is not None and self._calls > self.steps[-1]:
            raise _StopRun()

    def _observer(self, name: str):
        record = self.absmax[name]

        def hook(module, args):
            if self._step < 0 or not self._selected(self._step):
                return
            x = args[0]
            if not torch.is_tensor(x) or not x.is_floating_point():
                return
            v = float(x.detach().abs().amax()) if x.numel() else 0.0
            record[self._step] = max(record.get(self._step, 0.0), v)
        return hook

    def __enter__(self):
        self._handles.append(self.transformer.register_forward_pre_hook(self._pre_transformer, with_kwargs=True))
        self._handles.append(self.transformer.register_forward_hook(self._post_transformer, with_kwargs=True))
        if self.record_ranges:
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
        self._calls, self._step = 0, -1
        try:
            with torch.no_grad():
                fn()
        except _StopRun:
            pass
        finally:
            self._step = -1
            self.calls_per_run.append(self._calls)
        if self._calls == 0:
            raise CalibrationError("a calibration run never called the transformer: check calib_inputs / calib_fn")
        if self.steps is not None and self._calls <= self.steps[-1]:
            raise CalibrationError(f"calibration step {self.steps[-1]} was asked for, but a run called the "
                                   f"transformer only {self._calls} time(s)")

    # ---- results ------------------------------------------------------------------------------------

    def scale(self, name: str) -> Optional[torch.Tensor]:
        """float32 [1] static scale of layer ``name`` over the recorded steps; None if it never ran."""
        rec = self.absmax[name]
        if not rec:
            return None
        return symmetric_scale(torch.tensor([max(rec.values())], dtype=torch.float32), INT8_QMAX)


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
        runs.append(lambda kw=kwargs: pipe(**kw))
    return runs


def calibrate(transformer: nn.Module, layers: Dict[str, nn.Linear], runs: List[Callable[[], object]],
              steps: Optional[Sequence[int]], record_ranges: bool = True, progress: bool = True,
              pipe=None) -> Calibrator:
    """Run every calibration run under observers; returns the :class:`Calibrator` with the records.

    Any error inside a run is re-raised as :class:`CalibrationError` after all hooks are removed.
    """
    from tqdm.auto import tqdm

    cal = Calibrator(transformer, layers, steps, record_ranges)
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

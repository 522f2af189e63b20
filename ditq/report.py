"""``QuantReport``: what :func:`ditq.quantize` did, measured.

* per quantized layer: shape, format, weight SQNR (the packed weight dequantized vs the original) and, when
  ``weight_method`` is not round-to-nearest, the method and what round-to-nearest would have given (for gptq also
  the layer-output SQNR of both on the calibration inputs, estimated from ``X^T X``), activation
  SQNR (the layer's first-step calibration input through int8 quantization with the scale it will use, static or
  per-token, vs that input), the static scale, bytes before / after; for static layers also the range estimator
  used, the estimated activation SQNR over every recorded calibration step, the timestep-grouped scales and the
  smoothing site, when those apply; other names of a linear reachable under several names;
* layers left in full precision, each with the reason;
* model-output SQNR: the transformer re-run on the recorded first-step calibration inputs, quantized vs full
  precision (None when there were no calibration inputs);
* bytes of the whole transformer before / after, and the per-step activation ranges calibration recorded.

``str(report)`` prints a table; ``to_dict()`` / ``to_json()`` serialize it (infinite SQNRs become "inf").
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional


@dataclass
class LayerReport:
    """One quantized layer: its shape and format, weight and activation SQNR (dB), static scale, bytes."""

    name: str
    in_features: int
    out_features: int
    format: str
    weight_sqnr: float
    act_sqnr: Optional[float]
    act_scale: Optional[float]
    bytes_before: int
    bytes_after: int
    act_estimator: Optional[str] = None        # range estimator the static scale came from (None: dynamic)
    act_scales: Optional[List[float]] = None   # timestep-grouped scales, ascending timestep order (else None)
    act_sqnr_trajectory: Optional[float] = None  # estimated act SQNR over every recorded calibration step
    smoothed: Optional[str] = None             # the smoothing site this layer's input belongs to, if smoothed
    aliases: List[str] = field(default_factory=list)  # other names of the same linear (quantized once, shared)
    weight_method: str = "rtn"                 # how the weight was rounded (ditq.weight_rounding)
    weight_sqnr_rtn: Optional[float] = None    # weight SQNR round-to-nearest gives (method != rtn): the gain's base
    layer_output_sqnr: Optional[float] = None  # gptq: estimated SQNR of X W^T over the calibration inputs
    layer_output_sqnr_rtn: Optional[float] = None  # gptq: the same with round-to-nearest weights


# How ditq.convert.select_layers words the layers a user's own choice keeps in full precision (a skip pattern, the
# include list, the default skip list); every other reason is a layer the config meant to quantize.
CHOSEN_SKIPS = ("skip pattern", "not matched by any include pattern", "default skip list")


class UnquantizedLayersWarning(UserWarning):
    """:func:`ditq.quantize` kept layers in full precision that its config meant to quantize (a group size that
    does not divide K, a layer calibration never reached, ...): ``QuantReport.unplanned_skips`` lists them."""


@dataclass
class QuantReport:
    """What :func:`ditq.quantize` did, measured: ``print(report)`` shows the table, ``report.layer(name)`` one
    quantized layer (:class:`LayerReport`), ``report.skipped`` the layers kept in full precision and why,
    ``report.output_sqnr`` the model-output SQNR on the first-step calibration inputs (None without them),
    ``report.compression`` the transformer's bytes before / after, ``to_json()`` all of it (the module docstring
    lists every field)."""

    config: dict
    backend: str
    layers: List[LayerReport] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)  # module name -> reason
    output_sqnr: Optional[float] = None
    output_sqnr_per_run: List[float] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    calibration: dict = field(default_factory=dict)  # mode, runs, transformer calls and steps per run
    act_absmax_per_step: Dict[str, Dict[int, float]] = field(default_factory=dict)
    # QuantConfig(fuse=True): attention -> {fused layer: members} (ditq.fuse), block -> None or why not fused
    fusion: dict = field(default_factory=dict)

    @property
    def unplanned_skips(self) -> Dict[str, str]:
        """The skipped layers the config meant to quantize, and why (not the ones a skip pattern, the include list
        or the default skip list kept)."""
        return {n: why for n, why in self.skipped.items() if not why.startswith(CHOSEN_SKIPS)}

    def unplanned_summary(self) -> Optional[str]:
        """One line on :attr:`unplanned_skips` (how many of the linear layers, the three commonest reasons), or
        None when every layer the config meant to quantize was."""
        failed = self.unplanned_skips
        if not failed:
            return None
        reasons: Dict[str, int] = {}
        for why in failed.values():
            reasons[why] = reasons.get(why, 0) + 1
        shown = "; ".join(f"{n} x {why}" for why, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:3])
        more = f"; {len(reasons) - 3} more reasons" if len(reasons) > 3 else ""
        return (f"{len(failed)} of {len(self.layers) + len(failed)} linear layers could not be quantized and stay "
                f"in full precision ({shown}{more}); quantized {len(self.layers)}")

    @property
    def compression(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else float("nan")

    def layer(self, name: str) -> LayerReport:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no quantized layer named {name!r}")

    def weight_summary(self) -> str:
        """One line: mean weight SQNR of the chosen rounding vs round-to-nearest (and, for gptq, the mean estimated
        layer-output SQNR of both), over the quantized layers."""
        def mean(vals):
            vals = [v for v in vals if v is not None and math.isfinite(v)]
            return sum(vals) / len(vals) if vals else float("nan")

        w, r = mean(lr.weight_sqnr for lr in self.layers), mean(lr.weight_sqnr_rtn for lr in self.layers)
        text = f"mean weight SQNR {w:.2f} dB vs {r:.2f} dB round-to-nearest ({w - r:+.2f} dB)"
        if any(lr.layer_output_sqnr is not None for lr in self.layers):
            o, orr = (mean(lr.layer_output_sqnr for lr in self.layers),
                      mean(lr.layer_output_sqnr_rtn for lr in self.layers))
            text += (f"; mean estimated layer-output SQNR on the calibration inputs {o:.2f} dB vs {orr:.2f} dB "
                     f"({o - orr:+.2f} dB)")
        return text

    # ---- serialization ----------------------------------------------------------------------------

    def to_dict(self) -> dict:
        d = asdict(self)
        d["compression"] = self.compression
        return _finite(d)

    def to_json(self, **kw) -> str:
        kw.setdefault("indent", 2)
        return json.dumps(self.to_dict(), **kw)

    # ---- table ------------------------------------------------------------------------------------

    def __str__(self) -> str:
        def db(v):
            return "-" if v is None else ("inf" if v == math.inf else f"{v:.1f}")

        width = max([len(lr.name) for lr in self.layers] + [len(n) for n in self.skipped] + [5])
        method = self.config.get("weight_method", "rtn")
        gptq = any(lr.layer_output_sqnr is not None for lr in self.layers)
        extra_head = "" if method == "rtn" else f" {'W rtn':>7}" + (f" {'out est':>7} {'out rtn':>7}" if gptq else "")
        lines = [f"ditq quantization report: {self.config.get('weight_bits')}-bit weights"
                 f" (group {self.config.get('group_size') or 'per-channel'}), int8 activations "
                 f"({self.config.get('act_scheme')}), backend {self.backend}",
                 f"calibration: {self.calibration.get('mode')}, {self.calibration.get('runs', 0)} run(s), "
                 f"transformer calls per run {self.calibration.get('calls_per_run', [])}, steps per run "
                 f"{self.calibration.get('steps_per_run', [])}",
                 "",
                 f"{'layer':<{width}}  {'K':>6} {'N':>6}  {'format':<10} {'W SQNR':>7}{extra_head} {'A SQNR':>7} "
                 f"{'A traj':>7} {'range':<10} {'groups':>6} {'bytes':>10} -> {'packed':>9}"]
        for lr in self.layers:
            rng = (lr.act_estimator or "per-token") + ("+smooth" if lr.smoothed else "")
            extra = "" if method == "rtn" else f" {db(lr.weight_sqnr_rtn):>7}" + (
                f" {db(lr.layer_output_sqnr):>7} {db(lr.layer_output_sqnr_rtn):>7}" if gptq else "")
            lines.append(f"{lr.name:<{width}}  {lr.in_features:>6} {lr.out_features:>6}  {lr.format:<10} "
                         f"{db(lr.weight_sqnr):>7}{extra} {db(lr.act_sqnr):>7} {db(lr.act_sqnr_trajectory):>7} "
                         f"{rng:<10} {len(lr.act_scales) if lr.act_scales else 1:>6} {lr.bytes_before:>10} -> "
                         f"{lr.bytes_after:>9}" + (f"  (also {', '.join(lr.aliases)})" if lr.aliases else ""))
        if method != "rtn" and self.layers:
            lines.append(f"weights: {method}: " + self.weight_summary())
        for note in self.calibration.get("policy", []):
            lines.append(f"policy: {note}")
        if self.fusion:
            fused = self.fusion.get("projections", {})
            blocks = self.fusion.get("blocks", {})
            lines.append(f"fusion: q/k/v as one GEMM in {len(fused)} attention(s); "
                         f"{sum(why is None for why in blocks.values())} of {len(blocks)} block(s) with fused norms")
            lines += [f"  not fused: {n}: {why}" for n, why in {**self.fusion.get("left", {}), **{
                k: v for k, v in blocks.items() if v is not None}}.items()]
        if self.skipped:
            lines += ["", f"kept in full precision ({len(self.skipped)}):"]
            lines += [f"  {n:<{width}}  {why}" for n, why in self.skipped.items()]
        lines += ["",
                  f"quantized layers: {len(self.layers)}; transformer bytes {self.bytes_before:,} -> "
                  f"{self.bytes_after:,} ({self.compression:.2f}x smaller)",
                  f"model-output SQNR vs full precision on the calibration inputs: {db(self.output_sqnr)} dB"]
        if self.config.get("weight_method") == "gptq":
            # GPTQ fitted the weights to these very inputs: the figure is in-sample and flatters it against
            # rtn / mse. Held-out inputs (other seeds or prompts) tell the generalizing figure.
            lines.append("  (in-sample for gptq, whose weights were fitted to these inputs: compare on other seeds "
                         "or prompts)")
        return "\n".join(lines)


def _finite(obj):
    """JSON has no infinities: write them as strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {(str(k) if not isinstance(k, str) else k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj

"""``QuantConfig``: what to quantize and how, validated once, serializable.

One config drives :func:`ditq.quantize`, is written into every checkpoint and read back by
:func:`ditq.load_quantized`. Its weight fields become a :class:`ditq.format.WeightFormat` (the single description
of a packed weight), so the meaning of ``group_size`` lives in one place.
"""
from __future__ import annotations

from collections.abc import Mapping, Set as AbstractSet
from dataclasses import dataclass, field, fields
from typing import List, Optional, Sequence, Union

from . import backends
from .backends import BACKEND_NAMES
from .format import FormatError, WeightFormat
from .weight_rounding import WEIGHT_METHODS

ACT_SCHEMES = ("static", "dynamic")
CALIBRATION_MODES = ("first-step", "all-steps")
ACT_ESTIMATORS = ("max", "percentile", "mse", "auto")
PRESETS = {
    "w8a8": dict(weight_bits=8, group_size=None),
    "w4a8": dict(weight_bits=4, group_size=128),
}
_DEFAULT = "default"  # group_size not given: 128 for 4-bit weights, per channel (None) for 8-bit


class QuantConfigError(ValueError):
    """A quantization setting ditq cannot honour; the message names the field and the accepted values."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _patterns(value, what: str) -> List[str]:
    """One pattern, or a list / tuple (or any iterator: consumed once, in its order) of them, as the list kept.

    A mapping is refused: its keys would silently act as the patterns, whatever its values meant (``{"a": 1}``).
    So is a set: its iteration order changes from process to process (string hashing is randomized), so the
    same config would be written into checkpoint headers in a different order each run; bytes are not text."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if isinstance(value, (Mapping, AbstractSet, bytes, bytearray)):
        raise QuantConfigError(f"{what} must be a list of fnmatch patterns (str), got a {type(value).__name__}"
                               + (" (pass sorted(...) of it)" if isinstance(value, AbstractSet) else ""))
    try:
        value = list(value)
    except TypeError:
        raise QuantConfigError(f"{what} must be a list of fnmatch patterns (str), got {type(value).__name__}")
    for p in value:
        if not isinstance(p, str) or not p:
            raise QuantConfigError(f"{what} patterns must be non-empty strings, got {p!r}")
    return value


@dataclass
class QuantConfig:
    """Post-training quantization settings.

    Args:
        weight_bits: 8 (one scale per output channel) or 4 (group-wise along K).
        group_size: ``None`` = one scale per output channel (required for 8-bit); for 4-bit, groups of that many
            inputs along K: one the kernels are built for (``ditq.backends.kernel_group_sizes()``: 32, 64, 128,
            256 today). Left out: 128 for 4-bit, ``None`` for 8-bit.
        weight_method: how the integers and scales of the weights are chosen (``ditq.weight_rounding``; the format
            and kernels are the same for all): ``"rtn"`` (absmax scales, round to nearest: the paper, and what a
            checkpoint without this field used), ``"mse"`` (per group, the clip of the absmax with the least squared
            weight error) or ``"gptq"`` (error-compensating rounding against each layer's calibration inputs
            ``X^T X``; needs calibration data, and keeps a ``K x K`` float32 matrix per layer during
            :func:`ditq.quantize`).
        group_scales: 4-bit only: ``"float"`` (a float32 scale per group, the paper) or ``"int"`` (two-level: each
            group's scale an integer multiple q in [1, 16] of a float scale per output channel, as in QServe's
            progressive quantization; ``ditq.format``). The same checkpoint tensors and the same kernels
            everywhere; on Hopper the W4A8 GEMM then applies q to the int4 values before the tensor cores and keeps
            one int32 sum over K, as W8A8 does, instead of folding every group's partial into float sums. Measured
            on the bundled DiT at g32: mean weight SQNR 22.21 vs 22.25 dB, images as close (README).
        act_bits: activation bits; only 8 is implemented (int8 GEMMs).
        act_scheme: ``"static"``: one activation scale per layer, calibrated (the paper); ``"dynamic"``: one scale
            per token computed at run time (no calibration needed).
        calibration: ``"first-step"`` (the paper: only the transformer's first call of each calibration run,
            t = T), ``"all-steps"`` (the baseline), or a list of step indices (0 = the first call).
        act_estimator: how a static scale's range comes from the recorded activations (``ditq.calibrate``):
            ``"max"`` (max |x|, the paper), ``"percentile"`` (``act_percentile`` of |x|), ``"mse"`` (the clip that
            minimizes the int8 quantization MSE of the recorded activations), or ``"auto"``: per layer (and per
            timestep group), whichever of the three gives the least estimated error over the recorded steps.
            Clipping lowers the activation MSE but a clipped outlier can cost the output more than its squared
            error says: on the bundled digits DiT "max" gave the better images (``ditq.demo.run.BEST_POLICY``).
        act_percentile: the percentile for ``"percentile"`` (0 < p <= 100).
        timestep_groups: 1 = one static scale per layer (over the calibration steps). G > 1: the recorded steps
            are split into at most G runs of adjacent steps with similar ranges, each with its own static scale;
            at run time each layer picks its scale from the transformer's timestep (no host sync). Needs the
            static scheme and more than one calibration step.
        smooth_alpha: None = off; else SmoothQuant-style migration strength in (0, 1]: per input channel c of a
            layer fed by an adaLN modulate (q/k/v, MLP fc1) or by attention (out, through v), the activation is
            divided by ``s_c = max|x_c|^alpha / max|w_c|^(1-alpha)`` and the weight column multiplied by it;
            folded into the preceding linear's weights, so the float model's output does not change.
        max_dynamic_layers: the policy's budget of per-token (dynamic) layers in a static model: at most this
            many layers, those whose static scale fits their recorded activations worst, run dynamic.
        backend: ``"auto"``, ``"torch"``, ``"triton"``, ``"cuda"`` or ``"cuda-emulated"`` (``ditq.backends``).
        skip: fnmatch patterns of module names (relative to the transformer) never to quantize; wins over all.
            One str, or a list / tuple / iterator, kept in order; a dict (its keys would act as the patterns) or a
            set (its order, written into checkpoint headers, changes run to run) is refused.
        include: fnmatch patterns, taken as ``skip``'s; when given, only matching ``nn.Linear`` layers are
            candidates, and a layer that matches one is quantized even if the default skip list names it.
        default_skip: apply :data:`ditq.convert.DEFAULT_SKIP` (layers best kept in full precision).
        fuse: after quantizing, run sibling projections (q/k/v) as one GEMM and, where the backend has the kernel,
            fuse each DiT / PixArt / SD3 / FLUX block's norms into the next GEMM's activation quantization
            (``ditq.fuse``, ``ditq.blocks``, ``ditq.blocks_joint``; the same integer GEMMs). Off by default: the
            model then keeps diffusers' module names layer for layer.
        progress: show tqdm progress bars during calibration and conversion.
    """

    weight_bits: int = 8
    group_size: Union[int, None, str] = _DEFAULT
    weight_method: str = "rtn"
    group_scales: str = "float"
    act_bits: int = 8
    act_scheme: str = "static"
    calibration: Union[str, List[int]] = "first-step"
    act_estimator: str = "max"
    act_percentile: float = 99.99
    timestep_groups: int = 1
    smooth_alpha: Optional[float] = None
    max_dynamic_layers: int = 0
    backend: str = "auto"
    skip: List[str] = field(default_factory=list)
    include: List[str] = field(default_factory=list)
    default_skip: bool = True
    fuse: bool = False
    progress: bool = True

    def __post_init__(self):
        if not _is_int(self.weight_bits) or self.weight_bits not in (4, 8):
            raise QuantConfigError(f"weight_bits must be 4 or 8, got {self.weight_bits!r}")
        if isinstance(self.group_size, str) and self.group_size == _DEFAULT:
            self.group_size = 128 if self.weight_bits == 4 else None
        try:
            WeightFormat(self.weight_bits, self.group_size, group_scales=self.group_scales)
        except FormatError as e:
            raise QuantConfigError(str(e)) from None
        if self.weight_method not in WEIGHT_METHODS:
            raise QuantConfigError(f"weight_method must be one of {WEIGHT_METHODS}, got {self.weight_method!r}")
        if not _is_int(self.act_bits) or self.act_bits != 8:
            raise QuantConfigError(f"act_bits must be 8 (the GEMMs take int8 activations), got {self.act_bits!r}")
        if self.act_scheme not in ACT_SCHEMES:
            raise QuantConfigError(f"act_scheme must be one of {ACT_SCHEMES}, got {self.act_scheme!r}")
        self.calibration = self._check_calibration(self.calibration)
        if self.act_estimator not in ACT_ESTIMATORS:
            raise QuantConfigError(f"act_estimator must be one of {ACT_ESTIMATORS}, got {self.act_estimator!r}")
        if isinstance(self.act_percentile, bool) or not isinstance(self.act_percentile, (int, float)) or \
                not 0 < self.act_percentile <= 100:
            raise QuantConfigError(f"act_percentile must be a number in (0, 100], got {self.act_percentile!r}")
        self.act_percentile = float(self.act_percentile)
        if not _is_int(self.timestep_groups) or self.timestep_groups < 1:
            raise QuantConfigError(f"timestep_groups must be a positive int, got {self.timestep_groups!r}")
        if self.timestep_groups > 1 and (self.act_scheme != "static" or self.calibration == "first-step"):
            raise QuantConfigError("timestep_groups > 1 needs act_scheme='static' and more than one calibration "
                                   "step (calibration='all-steps' or a list of steps)")
        if self.smooth_alpha is not None and (isinstance(self.smooth_alpha, bool) or
                                              not isinstance(self.smooth_alpha, (int, float)) or
                                              not 0 < self.smooth_alpha <= 1):
            raise QuantConfigError(f"smooth_alpha must be None (off) or a number in (0, 1], got "
                                   f"{self.smooth_alpha!r}")
        if self.smooth_alpha is not None and self.act_scheme != "static":
            raise QuantConfigError("smooth_alpha needs calibration data: use it with act_scheme='static'")
        if not _is_int(self.max_dynamic_layers) or self.max_dynamic_layers < 0:
            raise QuantConfigError(f"max_dynamic_layers must be a non-negative int, got {self.max_dynamic_layers!r}")
        if not isinstance(self.backend, str) or self.backend not in BACKEND_NAMES + ("auto",):
            raise QuantConfigError(f"backend must be one of {BACKEND_NAMES + ('auto',)}, got {self.backend!r}")
        self._check_group_size_is_built()
        self.skip = _patterns(self.skip, "skip")
        self.include = _patterns(self.include, "include")
        if not isinstance(self.default_skip, bool):
            raise QuantConfigError(f"default_skip must be True or False, got {self.default_skip!r}")
        if not isinstance(self.fuse, bool):
            raise QuantConfigError(f"fuse must be True or False, got {self.fuse!r}")
        if not isinstance(self.progress, bool):
            raise QuantConfigError(f"progress must be True or False, got {self.progress!r}")

    def _check_group_size_is_built(self) -> None:
        """A group size some kernel runs, read from the kernels' own descriptions: the explicit backend's, or with
        "auto" the GPU kernels' (cuda, triton) so that a GPU never falls back to the reference maths."""
        if self.group_size is None:
            return
        if self.backend == "auto":
            built = backends.kernel_group_sizes()
            where = "the GPU kernels (cuda, triton)"
        else:
            fam = backends.describe().get(self.backend, {}).get("gemm_w4a8")
            if fam is None:
                return  # the backend cannot load or describe itself here: layer construction says why
            built, where = fam.group_sizes, f"backend {self.backend!r}"
        if built and self.group_size not in built:
            raise QuantConfigError(f"group_size {self.group_size} is not built into {where}: it runs "
                                   f"{', '.join(map(str, built))} (backend='torch' runs any power of two)")

    @staticmethod
    def _check_calibration(cal):
        if isinstance(cal, str):
            if cal not in CALIBRATION_MODES:
                raise QuantConfigError(f"calibration must be one of {CALIBRATION_MODES} or a list of step "
                                       f"indices, got {cal!r}")
            return cal
        if isinstance(cal, Sequence) and not isinstance(cal, (bytes, bytearray)):
            steps = list(cal)
            if not steps:
                raise QuantConfigError("calibration step list is empty: give at least one step index (0 = first)")
            for s in steps:
                if not _is_int(s) or s < 0:
                    raise QuantConfigError(f"calibration steps must be non-negative ints, got {s!r}")
            if len(set(steps)) != len(steps):
                raise QuantConfigError(f"calibration steps must not repeat, got {steps}")
            return sorted(steps)
        raise QuantConfigError(f"calibration must be one of {CALIBRATION_MODES} or a list of step indices, "
                               f"got {cal!r}")

    # ---- derived -------------------------------------------------------------------------------------

    @property
    def weight_format(self) -> WeightFormat:
        return WeightFormat(self.weight_bits, self.group_size, group_scales=self.group_scales)

    @property
    def needs_calibration(self) -> bool:
        return self.act_scheme == "static"

    def calibration_steps(self) -> Optional[List[int]]:
        """Step indices whose activations set the static scales; None = every step ("all-steps")."""
        if self.calibration == "first-step":
            return [0]
        if self.calibration == "all-steps":
            return None
        return list(self.calibration)

    @property
    def name(self) -> str:
        g = "" if self.group_size is None else f"g{self.group_size}"
        tail = "-int-scales" if self.group_scales == "int" else ""
        return f"w{self.weight_bits}{g}a{self.act_bits}-{self.act_scheme}{tail}"

    # ---- construction / serialization ----------------------------------------------------------------

    @classmethod
    def preset(cls, name: str, **overrides) -> "QuantConfig":
        """``"w8a8"`` (int8 per-channel weights) or ``"w4a8"`` (int4, groups of 128); ``overrides`` replace fields."""
        if not isinstance(name, str) or name not in PRESETS:
            raise QuantConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        cls._check_field_names(overrides, " in the preset's overrides")
        kw = dict(PRESETS[name])
        if "weight_bits" in overrides and "group_size" not in overrides:
            kw.pop("group_size")  # let the new bit width pick its own default group size
        kw.update(overrides)
        return cls(**kw)

    def to_dict(self) -> dict:
        d = {f.name: (list(v) if isinstance(v, list) else v) for f in fields(self) for v in [getattr(self, f.name)]}
        if d["group_scales"] == "float":  # a newer field: float-scale checkpoints stay readable by older ditq
            del d["group_scales"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        if not isinstance(d, dict):
            raise QuantConfigError(f"QuantConfig.from_dict takes a dict, got {type(d).__name__}")
        cls._check_field_names(d)
        return cls(**d)

    @classmethod
    def _check_field_names(cls, d: dict, where: str = "") -> None:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise QuantConfigError(f"unknown QuantConfig fields {sorted(unknown)}{where}; known: {sorted(known)}")

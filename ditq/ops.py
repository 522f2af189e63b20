"""The seam between the runtime and the kernels: ``torch.ops.ditq.*`` custom ops.

Two kinds of op live in the ``ditq`` namespace:

* the **generic ops**, ``quantize_act`` / ``gemm_w8a8`` / ``gemm_w4a8`` / ``norm_modulate_quantize`` /
  ``gemm_w8a8_fused`` / ``gemm_w4a8_fused`` / ``attention_inputs``, whose last argument names a backend:
  the entry point for tests, benchmarks and users who call a kernel by hand. Each resolves the backend on the
  inputs' device and runs that backend's (validating) kernel.
* the **kernel ops** each backend hands a quantized layer once (:meth:`ditq.backends.Backend.kernel_ops`): the
  same contracts without the backend argument. They validate their inputs *once*, in one place: in C++ for the
  CUDA kernels (``ditq_C``), in the Triton launchers for ``triton``, and with :func:`check_quantize_act` /
  :func:`check_gemm_w8a8` / :func:`check_gemm_w4a8` (and their ``_fused`` twins) below for the reference maths
  (``attention_inputs`` everywhere with one function, ``ditq.kernels.attention_inputs_checks.check_args``).
  Backends written in Python register theirs with :func:`define_kernel_ops`.

Every op has a fake implementation (shapes and dtypes only), so ``torch.compile`` traces through it; the fake
implementations also refuse inputs on different devices, which is what a call mixing ``meta`` and real tensors
reaches (the dispatcher picks the meta kernel and would otherwise return uninitialized memory).

Contract (M tokens, K inputs, N outputs):

``quantize_act(x, scale, backend) -> (q, scales)``
    x: float16/bfloat16/float32 [M, K], contiguous. ``scale``: a float32 [1] static scale, or None for
    dynamic per-token scales. Returns q int8 [M, K] and the scales used, float32 [1] or [M].
    Non-finite inputs (the same on every backend): with a static scale NaN quantizes to 0 and +-inf saturates
    to +-127; with dynamic scales a row holding any NaN or inf gets scale NaN and q = 0, so the GEMM's output
    row is NaN (the problem stays visible instead of being crushed into range).
``gemm_w8a8(a, a_scale, w, w_scale, bias, out_dtype, backend) -> y``
    a int8 [M, K]; a_scale float32 [1] or [M]; w int8 [N, K] in the backend's layout; w_scale float32 [N];
    bias float [N] or None. y [M, N] in out_dtype.
``gemm_w4a8(a, a_scale, w, w_scale, bias, group_size, out_dtype, backend) -> y``
    w uint8, two int4 per byte, in the backend's layout (``Backend.prepare_weight``); w_scale float32
    [K // group_size, N]; otherwise as gemm_w8a8. Integer group scales (``ditq.format``, ``group_scales="int"``)
    are float scales to every backend; the CUDA and Triton backends also take them as integers, int32
    [K // group_size + 1, N] (``ditq.format.int_scales_to_kernel``: q, then the channel scales' bits), which the
    Hopper CUDA kernels and the Triton kernel apply before the tensor cores (one int32 sum over K); the CUDA
    binding turns them back into float scales on other GPUs.
``norm_modulate_quantize(x, shift, scale, eps, act_scale, backend) -> (q, scales)``
    x float [B, S, K]: LayerNorm without affine, adaLN modulation by shift / scale ([B, K] each, or both None),
    and quantization as quantize_act (``act_scale`` float32 [1] or None), in one pass
    (``ditq.quant.reference.norm_modulate_quantize`` is the contract). q int8 [B * S, K].
``gemm_w8a8_fused(a, a_scale, w, w_scale, bias, gelu, gate, residual, rows_per_gate, out_scale, out_dtype,
backend) -> y``
``gemm_w4a8_fused(a, a_scale, w, w_scale, bias, group_size, gelu, gate, residual, rows_per_gate, out_scale,
out_dtype, backend) -> y``
    The GEMM with more of the layer's tail in its epilogue (``ditq.quant.reference.gemm_epilogue`` is the
    contract). In fp32, in this order: (1) ``y = acc * a_scale[m] * w_scale[n] (+ bias[n])``, exactly the plain
    GEMM's epilogue, so with no other piece the fused op equals the plain one bit for bit; (2) ``gelu``: GELU's
    tanh approximation ``0.5 * y * (1 + tanh(0.7978845608028654 * (y + 0.044715 * y^3)))``; (3) ``gate``
    (float [M // rows_per_gate, N], contiguous): ``y * gate[m // rows_per_gate, n]``, adaLN's per-sample gate
    over its rows; (4) ``residual`` (float [M, N], contiguous, dtype == out_dtype): ``y + residual[m, n]``;
    (5) ``out_scale`` (float32 [1], the next layer's static activation scale): the output is int8 [M, N],
    quantized exactly as ``quantize_act`` with a static scale (NaN -> 0, +-inf -> +-127), and ``out_dtype``
    then names only the residual's dtype; otherwise y in out_dtype [M, N]. ``rows_per_gate`` is an int >= 1
    (pass 1 without a gate) and must divide M when a gate is given; ``out_scale`` must be positive and finite
    (checked where its value can be read without a device synchronization, i.e. on the CPU). GELU's tanh
    differs in its last bits between math libraries (the reference's ``torch.tanh``, libdevice, NumPy);
    steps 2-5 are otherwise the same IEEE operations on every backend.
    A backend without these kernels leaves ``KernelOps.gemm_w8a8_fused`` / ``gemm_w4a8_fused`` None and its
    generic op raises NotImplementedError: callers then run the plain ops and the epilogue themselves.

    Float activations: ``a`` may also be float16 / bfloat16 / float32 [M, K] (contiguous, the same K rules)
    **when ``a_scale`` is a static float32 [1]**. The kernel then quantizes ``a`` as it loads it, exactly as
    ``quantize_act(a, a_scale)`` does (``q = clamp(rint(x_fp32 * (1 / s)), -127, 127)``, NaN -> 0,
    +-inf -> +-127: the same rounding helper), so the result equals ``quantize_act`` followed by the fused op
    on int8 ``a`` bit for bit, every epilogue piece included, when both run the same split-K count. (The CUDA
    kernels run a float ``a`` on one tile, unsplit, while an int8 ``a`` gets its M bucket's tile and split count.
    W8A8's int32 sums make every split count give the same bits; a split W4A8 launch adds its fp32 group sums
    per split, in another order, so there the two agree to fp32 rounding, within ``ditq.testing``'s bounds.) This makes a float input such as adaLN's
    ``silu(emb)`` one op instead of two (for a few rows, re-quantizing A in every N tile costs nothing). A float
    ``a`` with per-token scales [M] is a ValueError (dynamic scales need the whole row first: run
    ``quantize_act``). ``KernelOps.fused_gemm_float_a`` says whether a backend's fused GEMMs do this (torch,
    triton, cuda and cuda-emulated all do); where it is False the generic op raises NotImplementedError for a
    float ``a`` and callers quantize it first (``QuantLinear.forward_fused`` does).
``attention_inputs(first, second, batch, heads, first_q_norm, first_k_norm, second_q_norm, second_k_norm, eps,
rope_cos, rope_sin, torch_norm, backend) -> (q, k, v)``
    From the fused q/k/v GEMM outputs of one or two token streams to SDPA's inputs, in one pass. ``first``:
    float16/bfloat16/float32 [batch * S1, 3 * heads * D], contiguous, column blocks q | k | v (each heads x D,
    head-major); ``second``: None, or the same for S2 more tokens (same dtype, heads and D), placed after ``first``
    in the sequence (FLUX's joint block: text first; SD3: image first). ``*_q_norm`` / ``*_k_norm``: a stream's q /
    k RMSNorm weight [D] (the activations' dtype or float32), or None for no norm; ``eps``: the norms' epsilon (one
    value for all four); ``torch_norm``: False for diffusers' ``RMSNorm`` (SD3.5), True for ``torch.nn.RMSNorm``
    (FLUX's attention), which rounds differently in 16 bits. ``rope_cos`` / ``rope_sin``: float32 [S1 + S2, D]
    (diffusers' FLUX ``image_rotary_emb``, interleaved pairs (2i, 2i + 1); D even), or both None. Returns q, k, v
    [batch, heads, S1 + S2, D], contiguous, in ``first``'s dtype. The numbers are diffusers' composition op for op
    (``ditq.quant.reference.attention_inputs``: the RMSNorm, concatenation, ``apply_rotary_emb``; v copied bit for
    bit); a kernel may sum a head's squares in another order, which can move a 16-bit output by one unit in the last
    place. Where ``KernelOps.attention_inputs`` is None, callers run diffusers' own ops.
"""
from __future__ import annotations

import torch

from . import backends
from .backends import KernelOps
from .format import MAX_GROUP_SIZE
from .kernels.attention_inputs_checks import check_args
from .kernels.epilogue_checks import check_args as check_epilogue_args
from .quant.reference import MAX_K

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT8 = (torch.int8,)
_FUSED_A_DTYPES = (torch.int8,) + _FLOAT_DTYPES  # the fused GEMMs also quantize a float ``a`` on load

SCHEMAS = {
    "quantize_act": "(Tensor x, Tensor? scale{backend}) -> (Tensor, Tensor)",
    "gemm_w8a8": "(Tensor a, Tensor a_scale, Tensor w, Tensor w_scale, Tensor? bias, ScalarType out_dtype"
                 "{backend}) -> Tensor",
    "gemm_w4a8": "(Tensor a, Tensor a_scale, Tensor w, Tensor w_scale, Tensor? bias, int group_size, "
                 "ScalarType out_dtype{backend}) -> Tensor",
    "norm_modulate_quantize": "(Tensor x, Tensor? shift, Tensor? scale, float eps, Tensor? act_scale{backend}) "
                              "-> (Tensor, Tensor)",
    "gemm_w8a8_fused": "(Tensor a, Tensor a_scale, Tensor w, Tensor w_scale, Tensor? bias, bool gelu, "
                       "Tensor? gate, Tensor? residual, int rows_per_gate, Tensor? out_scale, "
                       "ScalarType out_dtype{backend}) -> Tensor",
    "gemm_w4a8_fused": "(Tensor a, Tensor a_scale, Tensor w, Tensor w_scale, Tensor? bias, int group_size, bool gelu, "
                       "Tensor? gate, Tensor? residual, int rows_per_gate, Tensor? out_scale, ScalarType out_dtype"
                       "{backend}) -> Tensor",
    "attention_inputs": "(Tensor first, Tensor? second, int batch, int heads, Tensor? first_q_norm, "
                        "Tensor? first_k_norm, Tensor? second_q_norm, Tensor? second_k_norm, float eps, "
                        "Tensor? rope_cos, Tensor? rope_sin, bool torch_norm{backend}) -> (Tensor, Tensor, Tensor)",
}


# ---- validation: one flat function per op (it runs on the reference backend's hot path: no helper calls) --

def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _bad_tensor(name: str, t, dtypes, dim=None) -> Exception:
    """The error for a tensor argument that failed the flat checks (dtype, or number of dimensions)."""
    if not isinstance(t, torch.Tensor):
        return TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        return TypeError(f"{name} must be {', '.join(map(_dtype_name, dtypes))}; got {_dtype_name(t.dtype)}")
    return ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")


def _bad_device(ref: torch.Tensor, **tensors) -> Exception:
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            return ValueError(f"{name} is on {t.device} but the activations are on {ref.device}: "
                              f"move all inputs of a ditq op to one device")
    return AssertionError("no device mismatch")  # pragma: no cover - only called after a mismatch was seen


def _same_device(ref: torch.Tensor, **tensors) -> None:
    for t in tensors.values():
        if t is not None and t.device != ref.device:
            raise _bad_device(ref, **tensors)


def _check_epilogue(a, a_scale, w, w_scale, bias, out_dtype, m: int, n: int) -> None:
    if not isinstance(a_scale, torch.Tensor) or a_scale.dtype != torch.float32:
        raise _bad_tensor("a_scale", a_scale, (torch.float32,))
    if a_scale.dim() != 1 or a_scale.numel() not in (1, m):
        raise ValueError(f"a_scale must be float32 [1] (static) or [M] = [{m}] (per token), "
                         f"got shape {tuple(a_scale.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dtype not in _FLOAT_DTYPES:
            raise _bad_tensor("bias", bias, _FLOAT_DTYPES)
        if bias.shape != (n,):
            raise ValueError(f"bias must have shape [N] = [{n}], got {tuple(bias.shape)}")
    if out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    dev = a.device
    if a_scale.device != dev or w.device != dev or w_scale.device != dev or (bias is not None and bias.device != dev):
        raise _bad_device(a, a_scale=a_scale, w=w, w_scale=w_scale, bias=bias)


def check_quantize_act(x, scale) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES or x.dim() != 2:
        raise _bad_tensor("x", x, _FLOAT_DTYPES, 2)
    if not x.is_contiguous():
        raise ValueError("x must be contiguous (call .contiguous() first)")
    if scale is not None:
        if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32:
            raise _bad_tensor("scale", scale, (torch.float32,))
        if scale.shape != (1,):
            raise ValueError(f"a static scale must be float32 [1], got shape {tuple(scale.shape)}")
        if scale.device != x.device:
            raise _bad_device(x, scale=scale)


def check_norm_modulate_quantize(x, shift, scale, eps, act_scale) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES or x.dim() != 3:
        raise _bad_tensor("x", x, _FLOAT_DTYPES, 3)
    if not x.is_contiguous():
        raise ValueError("x must be contiguous (call .contiguous() first)")
    if (shift is None) != (scale is None):
        raise ValueError("shift and scale come together: give both (adaLN modulation) or neither")
    for name, t in (("shift", shift), ("scale", scale)):
        if t is not None:
            if not isinstance(t, torch.Tensor) or t.dtype not in _FLOAT_DTYPES:
                raise _bad_tensor(name, t, _FLOAT_DTYPES)
            if t.shape != (x.shape[0], x.shape[2]):
                raise ValueError(f"{name} must be [B, K] = [{x.shape[0]}, {x.shape[2]}], got {tuple(t.shape)}")
    if not isinstance(eps, float) or not eps > 0 or eps == float("inf"):
        raise ValueError(f"eps must be a positive finite float, got {eps!r}")
    if act_scale is not None:
        if not isinstance(act_scale, torch.Tensor) or act_scale.dtype != torch.float32:
            raise _bad_tensor("act_scale", act_scale, (torch.float32,))
        if act_scale.shape != (1,):
            raise ValueError(f"a static scale must be float32 [1], got shape {tuple(act_scale.shape)}")
    _same_device(x, shift=shift, scale=scale, act_scale=act_scale)


def check_gemm_w8a8(a, a_scale, w, w_scale, bias, out_dtype, a_dtypes=_INT8) -> None:
    if not isinstance(a, torch.Tensor) or a.dtype not in a_dtypes or a.dim() != 2:
        raise _bad_tensor("a", a, a_dtypes, 2)
    if not isinstance(w, torch.Tensor) or w.dtype != torch.int8 or w.dim() != 2:
        raise _bad_tensor("w", w, (torch.int8,), 2)
    if not isinstance(w_scale, torch.Tensor) or w_scale.dtype != torch.float32:
        raise _bad_tensor("w_scale", w_scale, (torch.float32,))
    m, k = a.shape
    n = w.shape[0]
    if w.shape[1] != k:
        raise ValueError(f"a is [M, K] = {tuple(a.shape)} but w is {tuple(w.shape)}: w must be [N, K]")
    if not 0 < k <= MAX_K:
        raise ValueError(f"K = {k} must be in [1, {MAX_K}], the K ditq's int8 GEMMs take")
    if not (a.is_contiguous() and w.is_contiguous()):
        raise ValueError("a and w must be contiguous")
    if w_scale.shape != (n,):
        raise ValueError(f"w_scale must be float32 [N] = [{n}], got {tuple(w_scale.shape)}")
    _check_epilogue(a, a_scale, w, w_scale, bias, out_dtype, m, n)


def check_gemm_w4a8(a, a_scale, w, w_scale, bias, group_size, out_dtype, a_dtypes=_INT8) -> None:
    if not isinstance(a, torch.Tensor) or a.dtype not in a_dtypes or a.dim() != 2:
        raise _bad_tensor("a", a, a_dtypes, 2)
    if not isinstance(w, torch.Tensor) or w.dtype != torch.uint8 or w.dim() != 2:
        raise _bad_tensor("w", w, (torch.uint8,), 2)
    if not isinstance(w_scale, torch.Tensor) or w_scale.dtype != torch.float32 or w_scale.dim() != 2:
        raise _bad_tensor("w_scale", w_scale, (torch.float32,), 2)
    m, k = a.shape
    # ditq.format.is_canonical_group_size, inline (this runs on the reference backend's hot path)
    if not (type(group_size) is int and 2 <= group_size <= MAX_GROUP_SIZE and group_size & (group_size - 1) == 0):
        raise ValueError(f"group_size must be a power of two from 2 to {MAX_GROUP_SIZE}, got {group_size!r}")
    if not 0 < k <= MAX_K or k % group_size:
        raise ValueError(f"K = {k} must be a multiple of group_size {group_size} in [1, {MAX_K}], the K ditq's "
                         f"int8 GEMMs take")
    n = w_scale.shape[1]
    if w_scale.shape[0] != k // group_size:
        raise ValueError(f"w_scale must be [K // group_size, N] = [{k // group_size}, N], "
                         f"got {tuple(w_scale.shape)}")
    if w.shape != (n, k // 2):
        raise ValueError(f"w must be uint8 [N, K // 2] = [{n}, {k // 2}] (two int4 per byte), "
                         f"got {tuple(w.shape)}")
    if not (a.is_contiguous() and w.is_contiguous()):
        raise ValueError("a and w must be contiguous")
    _check_epilogue(a, a_scale, w, w_scale, bias, out_dtype, m, n)


def float_a_needs_static_scale(a_scale) -> ValueError:
    """The refusal of a float ``a`` with per-token scales (the Triton launchers raise the same words)."""
    return ValueError(f"a float activation needs a static a_scale, float32 [1] (the fused GEMM quantizes it as it "
                      f"loads it), got shape {tuple(a_scale.shape)}: quantize it with quantize_act for per-token "
                      f"scales")


def check_gemm_w8a8_fused(a, a_scale, w, w_scale, bias, gelu, gate, residual, rows_per_gate, out_scale,
                          out_dtype) -> None:
    check_gemm_w8a8(a, a_scale, w, w_scale, bias, out_dtype, _FUSED_A_DTYPES)
    if a.dtype != torch.int8 and a_scale.shape != (1,):
        raise float_a_needs_static_scale(a_scale)
    check_epilogue_args(a.device, a.shape[0], w.shape[0], gelu, gate, residual, rows_per_gate, out_scale, out_dtype)


def check_gemm_w4a8_fused(a, a_scale, w, w_scale, bias, group_size, gelu, gate, residual, rows_per_gate, out_scale,
                          out_dtype) -> None:
    check_gemm_w4a8(a, a_scale, w, w_scale, bias, group_size, out_dtype, _FUSED_A_DTYPES)
    if a.dtype != torch.int8 and a_scale.shape != (1,):
        raise float_a_needs_static_scale(a_scale)
    check_epilogue_args(a.device, a.shape[0], w_scale.shape[1], gelu, gate, residual, rows_per_gate, out_scale,
                        out_dtype)


# one validation for every backend (plain torch, shared with the Triton launcher): the same words everywhere
check_attention_inputs = check_args


# ---- fake implementations: shapes only, plus the one check a meta tensor needs --------------------------

def _fake_quantize_act(x, scale, *_):
    _same_device(x, scale=scale)
    return torch.empty_like(x, dtype=torch.int8), x.new_empty((1,) if scale is not None else (x.shape[0],),
                                                               dtype=torch.float32)


def _fake_gemm_w8a8(a, a_scale, w, w_scale, bias, out_dtype, *_):
    _same_device(a, a_scale=a_scale, w=w, w_scale=w_scale, bias=bias)
    return a.new_empty((a.shape[0], w_scale.shape[0]), dtype=out_dtype)


def _fake_gemm_w4a8(a, a_scale, w, w_scale, bias, group_size, out_dtype, *_):
    _same_device(a, a_scale=a_scale, w=w, w_scale=w_scale, bias=bias)
    return a.new_empty((a.shape[0], w_scale.shape[1]), dtype=out_dtype)


def _fake_norm_modulate_quantize(x, shift, scale, eps, act_scale, *_):
    _same_device(x, shift=shift, scale=scale, act_scale=act_scale)
    m = x.shape[0] * x.shape[1]
    return x.new_empty((m, x.shape[2]), dtype=torch.int8), x.new_empty((1,) if act_scale is not None else (m,),
                                                                          dtype=torch.float32)


def _fake_gemm_w8a8_fused(a, a_scale, w, w_scale, bias, gelu, gate, residual, rows_per_gate, out_scale,
                          out_dtype, *_):
    _same_device(a, a_scale=a_scale, w=w, w_scale=w_scale, bias=bias, gate=gate, residual=residual,
                 out_scale=out_scale)
    return a.new_empty((a.shape[0], w_scale.shape[0]), dtype=torch.int8 if out_scale is not None else out_dtype)


def _fake_gemm_w4a8_fused(a, a_scale, w, w_scale, bias, group_size, gelu, gate, residual, rows_per_gate,
                          out_scale, out_dtype, *_):
    _same_device(a, a_scale=a_scale, w=w, w_scale=w_scale, bias=bias, gate=gate, residual=residual,
                 out_scale=out_scale)
    return a.new_empty((a.shape[0], w_scale.shape[1]), dtype=torch.int8 if out_scale is not None else out_dtype)


def _fake_attention_inputs(first, second, batch, heads, first_q_norm, first_k_norm, second_q_norm, second_k_norm,
                           eps, rope_cos, rope_sin, torch_norm, *_):
    _same_device(first, second=second, first_q_norm=first_q_norm, first_k_norm=first_k_norm,
                 second_q_norm=second_q_norm, second_k_norm=second_k_norm, rope_cos=rope_cos, rope_sin=rope_sin)
    seq = (first.shape[0] + (0 if second is None else second.shape[0])) // batch
    shape = (batch, heads, seq, first.shape[1] // (3 * heads))
    return tuple(first.new_empty(shape) for _ in range(3))


FAKES = {"quantize_act": _fake_quantize_act, "gemm_w8a8": _fake_gemm_w8a8, "gemm_w4a8": _fake_gemm_w4a8,
         "norm_modulate_quantize": _fake_norm_modulate_quantize, "gemm_w8a8_fused": _fake_gemm_w8a8_fused,
         "gemm_w4a8_fused": _fake_gemm_w4a8_fused, "attention_inputs": _fake_attention_inputs}

_lib = torch.library.Library("ditq", "DEF")


def define_kernel_ops(prefix: str, impls: dict) -> KernelOps:
    """Register a Python backend's kernels as ``torch.ops.ditq.<prefix>_<op>`` (CPU and CUDA keys, with fake
    implementations) and return them as :class:`KernelOps`. ``impls`` maps op name to a function with the
    op's contract that validates its own inputs; the optional fused ops may be left out."""
    return KernelOps(**{name: define_kernel_op(prefix, name, fn) for name, fn in impls.items()})


def define_kernel_op(prefix: str, name: str, fn):
    """Register one kernel op ``torch.ops.ditq.<prefix>_<name>`` (CPU and CUDA keys, fake implementation) and
    return it (for a backend that adds a Python op to others, as cuda's ``attention_inputs``). ``fn``: one function
    for both keys, or a dict of one per key (``{"CPU": ..., "CUDA": ...}``): torch's dispatcher then picks the
    implementation by the tensors' device, as it does for the ``ditq_C`` ops."""
    _lib.define(f"{prefix}_{name}" + SCHEMAS[name].format(backend=""))
    impls = fn if isinstance(fn, dict) else {"CPU": fn, "CUDA": fn}
    if set(impls) != {"CPU", "CUDA"}:
        raise ValueError(f"define_kernel_op: implementations for the CPU and CUDA keys, got {sorted(impls)}")
    for key, impl in impls.items():
        _lib.impl(f"{prefix}_{name}", impl, key)
    torch.library.register_fake(f"ditq::{prefix}_{name}", FAKES[name], lib=_lib)
    return getattr(torch.ops.ditq, f"{prefix}_{name}").default


# ---- the generic ops: resolve the backend, run its kernel op ----------------------------------------------

def _quantize_act(x, scale, backend: str):
    return backends.get_backend(backend, x.device).quantize_act(x, scale)


def _gemm_w8a8(a, a_scale, w, w_scale, bias, out_dtype, backend: str):
    return backends.get_backend(backend, a.device).gemm_w8a8(a, a_scale, w, w_scale, bias, out_dtype)


def _gemm_w4a8(a, a_scale, w, w_scale, bias, group_size, out_dtype, backend: str):
    return backends.get_backend(backend, a.device).gemm_w4a8(a, a_scale, w, w_scale, bias, group_size, out_dtype)


def _norm_modulate_quantize(x, shift, scale, eps, act_scale, backend: str):
    return backends.get_backend(backend, x.device).norm_modulate_quantize(x, shift, scale, eps, act_scale)


def _fused_backend(a, backend: str):
    """The backend of a fused GEMM; a float ``a`` is refused here, before any kernel (a C++ one included) sees
    it, where the backend's fused kernels load A as int8 only (``KernelOps.fused_gemm_float_a``)."""
    b = backends.get_backend(backend, a.device)
    if a.dtype in _FLOAT_DTYPES and not b.kernel_ops().fused_gemm_float_a:
        raise NotImplementedError(f"backend {b.name!r}: its fused GEMMs load A as int8 and take no float "
                                  f"activation ({_dtype_name(a.dtype)}); quantize it with quantize_act first")
    return b


def _gemm_w8a8_fused(a, a_scale, w, w_scale, bias, gelu, gate, residual, rows_per_gate, out_scale, out_dtype,
                     backend: str):
    return _fused_backend(a, backend).gemm_w8a8_fused(a, a_scale, w, w_scale, bias, gelu, gate, residual,
                                                      rows_per_gate, out_scale, out_dtype)


def _gemm_w4a8_fused(a, a_scale, w, w_scale, bias, group_size, gelu, gate, residual, rows_per_gate, out_scale,
                     out_dtype, backend: str):
    return _fused_backend(a, backend).gemm_w4a8_fused(a, a_scale, w, w_scale, bias, group_size, gelu, gate,
                                                      residual, rows_per_gate, out_scale, out_dtype)


def _attention_inputs(first, second, batch, heads, first_q_norm, first_k_norm, second_q_norm, second_k_norm, eps,
                      rope_cos, rope_sin, torch_norm, backend: str):
    return backends.get_backend(backend, first.device).attention_inputs(
        first, second, batch, heads, first_q_norm, first_k_norm, second_q_norm, second_k_norm, eps, rope_cos,
        rope_sin, torch_norm)


for _name, _fn in (("quantize_act", _quantize_act), ("gemm_w8a8", _gemm_w8a8), ("gemm_w4a8", _gemm_w4a8),
                   ("norm_modulate_quantize", _norm_modulate_quantize), ("gemm_w8a8_fused", _gemm_w8a8_fused),
                   ("gemm_w4a8_fused", _gemm_w4a8_fused), ("attention_inputs", _attention_inputs)):
    _lib.define(_name + SCHEMAS[_name].format(backend=", str backend"))
    for _key in ("CPU", "CUDA"):
        _lib.impl(_name, _fn, _key)
    torch.library.register_fake(f"ditq::{_name}", FAKES[_name], lib=_lib)

quantize_act = torch.ops.ditq.quantize_act
gemm_w8a8 = torch.ops.ditq.gemm_w8a8
gemm_w4a8 = torch.ops.ditq.gemm_w4a8
norm_modulate_quantize = torch.ops.ditq.norm_modulate_quantize
gemm_w8a8_fused = torch.ops.ditq.gemm_w8a8_fused
gemm_w4a8_fused = torch.ops.ditq.gemm_w4a8_fused
attention_inputs = torch.ops.ditq.attention_inputs

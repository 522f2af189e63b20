"""Property-based fuzz of the op seam (``torch.ops.ditq.*``, the contract in ditq/ops.py): hypothesis draws the
problem (shapes, dtypes, static or per-row scales, value regimes, epilogue pieces) and the same problem runs
through every backend here -- ``torch`` (the reference maths), ``triton`` (under TRITON_INTERPRET=1 on the CPU),
``cuda-emulated`` (the CUDA kernels on the SIMT emulator) and, on a GPU, ``cuda`` -- each checked against the
exact integer reference:

* quantize_act: q and the scales equal ``ditq.quant.reference`` bit for bit (NaN and +-inf included), so every
  backend equals every other;
* gemm_w8a8 / gemm_w4a8 (every group size the backend's ``KernelFamily`` lists; the reference's: any canonical
  one): ``ditq.testing.assert_gemm_w8a8`` / ``assert_gemm_w4a8`` (integers exact, the fp32 epilogue's roundings);
* norm_modulate_quantize on rows whose sums are exact in any summation order (an integer mean plus +-pairs of
  integers, times a power of two; non-finite rows too): the reference bit for bit (the kernels sum rows in their
  own order, so random rows are covered by tests/kernels/test_norm_quantize.py's tie-aware checks, not here);
* gemm_w8a8_fused / gemm_w4a8_fused with every combination of bias, GELU, gate (any rows_per_gate dividing M),
  residual and out_scale, an int8 ``a`` or a float one with a static scale: the float output against the float64
  composition (``ditq.testing.assert_gemm_fused``); an int8 output equal bit for bit to ``quantize_act``'s static
  rounding of the same backend's fp32 output (a float32 twin of the residual holds the same values); with no
  piece, equal bit for bit to the plain op; a float ``a`` equal bit for bit to ``quantize_act`` + the int8 op.

No op takes an ``out`` tensor, so outputs are poisoned where they are allocated: during each backend call
``torch.empty`` / ``torch.empty_like`` fill with NaN (float) or -128 (integers; 128 for uint8: never a quantizer
output), which catches an element the Triton launchers' outputs leave unwritten; the CUDA bindings
poison their own outputs. Under the interpreter masked loads without ``other=`` also read poison
(tests/kernels/conftest.py's ``poison_like``). Any NaN left in a float output fails the exactness check.

Every random tensor comes from a seed that hypothesis draws, so a failure's printed ``case`` reproduces it:
``check_<op>("<backend>", <case>)`` in this module (check_quantize_act, check_gemm, check_fused,
check_norm_modulate_quantize), or an ``@example(case=...)`` on the test's inner ``run``. The number of
examples per backend is small (the interpreter runs every program in NumPy); set ``DITQ_FUZZ_EXAMPLES=20`` (a
multiplier) for a long run.
"""
import contextlib
import functools
import importlib.util
import os
from typing import NamedTuple, Optional
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ditq  # noqa: F401  (registers torch.ops.ditq)
from ditq import backends, testing
from ditq.format import WeightFormat
from ditq.quant import reference as ref

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}



class Budget(NamedTuple):
    examples: int  # per test
    m: int  # the largest M (rows: B * S for the norm)
    n: int
    k: int  # K drawn up to about this (several BK steps, a tail); the reference also near MAX_K now and then


# Triton's interpreter runs each program of the grid in NumPy, ~0.1-1 s a call at these shapes (a fused example
# makes up to five calls): few examples, small shapes, still a masked tail in every dimension. The emulator and
# the reference take milliseconds. The file takes ~15-25 s on one idle core.
_MULT = float(os.environ.get("DITQ_FUZZ_EXAMPLES", "1"))
BUDGET = {"torch": Budget(40, 70, 40, 320), "triton": Budget(6, 9, 24, 192),
          "cuda-emulated": Budget(40, 70, 40, 320), "cuda": Budget(20, 70, 40, 320)}  # cuda: the GPU suite's cap


def _param(name, *marks):
    return pytest.param(name, id=name, marks=marks)


# triton runs here on CPU tensors only: on a GPU machine its kernels would compile one variant per drawn option
# combination (minutes), and tests/kernels covers them there
BACKENDS = [_param("torch"), _param("triton"), _param("cuda-emulated"), _param("cuda", pytest.mark.cuda)]
DEVICE = {"torch": "cpu", "triton": "cpu", "cuda-emulated": "cpu", "cuda": "cuda"}


def _backend(name):
    """The backend, or skip saying why it cannot run here."""
    reason = backends.unavailable_reason(name, DEVICE[name])
    if reason is not None:
        pytest.skip(f"backend {name!r} unavailable: {reason}")
    return backends.get_backend(name, DEVICE[name])


def _settings(name, row_op=False):
    """``row_op``: quantize_act and the norm, one program per row: under the interpreter ~40 ms an example at these
    shapes, against ~0.3-1 s for a GEMM, so five times the examples."""
    examples = BUDGET[name].examples * (5 if row_op and name == "triton" else 1)
    return settings(max_examples=max(1, int(examples * _MULT)), deadline=None)


# ---- poison -----------------------------------------------------------------------------------------------

def _poisoned(fn):
    """``fn`` (torch.empty or empty_like) whose tensors hold NaN, or -128 (128 unsigned): never a kernel's output."""
    def empty(*args, **kwargs):
        t = fn(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(-128 if t.dtype.is_signed else 128)
        return t
    return empty


@functools.lru_cache(maxsize=None)
def _load_poison_like():
    path = os.path.join(os.path.dirname(__file__), os.pardir, "kernels", "conftest.py")
    spec = importlib.util.spec_from_file_location("ditq_fuzz_kernels_conftest", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.poison_like


@contextlib.contextmanager
def _poison(name):
    """Outputs allocated poisoned during a backend call; under the interpreter, masked loads read poison too."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(torch, "empty", _poisoned(torch.empty)))
        stack.enter_context(mock.patch.object(torch, "empty_like", _poisoned(torch.empty_like)))
        if name == "triton":
            from ditq.kernels import interpret
            if interpret.interpreting():
                from triton.runtime import interpreter as ti
                poison_like, original = _load_poison_like(), ti.InterpreterBuilder.create_masked_load

                def create_masked_load(self, ptrs, mask, other, *args, **kwargs):
                    return original(self, ptrs, mask, poison_like(ptrs) if other is None else other, *args,
                                    **kwargs)
                stack.enter_context(mock.patch.object(ti.InterpreterBuilder, "create_masked_load",
                                                      create_masked_load))
        yield


def _call(name, op, *args):
    """``torch.ops.ditq.<op>`` on backend ``name``: tensors moved to its device, results back on the CPU."""
    dev = DEVICE[name]
    args = [a.to(dev) if isinstance(a, torch.Tensor) else a for a in args]
    with _poison(name):
        out = getattr(torch.ops.ditq, op)(*args, name)
    return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()


_TORCH_EMPTY, _TORCH_EMPTY_LIKE = torch.empty, torch.empty_like


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_poison_fills_fresh_outputs(name):
    """The poison this file relies on: fresh tensors hold NaN / -128 during a backend call, and under the
    interpreter masked loads without ``other=`` are wrapped; nothing of it outlives the call."""
    loads = None
    if name == "triton":
        _backend(name)
        from triton.runtime import interpreter as ti
        loads = ti.InterpreterBuilder
    original = None if loads is None else loads.create_masked_load
    with _poison(name):
        assert torch.empty(3).isnan().all() and torch.empty_like(torch.ones(2, dtype=torch.bfloat16)).isnan().all()
        assert torch.empty(2, 3, dtype=torch.int8).eq(-128).all() and torch.empty(4, dtype=torch.uint8).eq(128).all()
        assert torch.empty(2, dtype=torch.int32).eq(-128).all()
        assert loads is None or loads.create_masked_load is not original
    assert loads is None or loads.create_masked_load is original
    assert torch.empty is _TORCH_EMPTY and torch.empty_like is _TORCH_EMPTY_LIKE


def assert_same_bits(got, want, what):
    assert got.dtype == want.dtype and got.shape == want.shape, \
        f"{what}: {got.dtype} {tuple(got.shape)} vs {want.dtype} {tuple(want.shape)}"
    if got.is_floating_point():
        got, want = (t.view({4: torch.int32, 2: torch.int16}[t.element_size()]) for t in (got, want))
    bad = got != want
    assert not bool(bad.any()), (f"{what}: {int(bad.sum())} of {bad.numel()} differ, first at "
                                 f"{bad.nonzero()[0].tolist()}")


# ---- value generators (all from one seed) -------------------------------------------------------------------

def _ints(shape, low, high, regime, gen):
    """Integers in [low, high]: 'uniform', 'extremes' (only low and high) or 'sparse' (90 % zeros); never all
    zeros."""
    if regime == "extremes":
        t = torch.where(torch.rand(shape, generator=gen) < 0.5, low, high)
    else:
        t = torch.randint(low, high + 1, shape, generator=gen)
        if regime == "sparse":
            t = t * (torch.rand(shape, generator=gen) < 0.1)
    if not bool(t.any()):
        t.view(-1)[0] = high
    return t.to(torch.int8)


def _float_values(m, k, dtype, scale, nonfinite, gen):
    """Float activations for a static scale ``scale``: random values over a row-dependent spread, exact ties of
    x / s (scale is a power of two), values past +-127 s, an all-zero row now and then, and optionally NaN and
    +-inf."""
    x = torch.randn(m, k, generator=gen) * 40 * scale * 2.0 ** torch.randint(-6, 3, (m, 1), generator=gen)
    ties = (torch.randint(-140, 140, (m, k), generator=gen).float() + 0.5) * scale
    x = torch.where(torch.rand(m, k, generator=gen) < 0.3, ties, x)
    if m > 2:
        x[int(torch.randint(0, m, (1,), generator=gen))] = 0.0
    if nonfinite:
        idx = torch.randint(0, m * k, (3,), generator=gen)
        x.view(-1)[idx] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    return x.to(dtype)


# ---- quantize_act -------------------------------------------------------------------------------------------

class QuantCase(NamedTuple):
    m: int
    k: int
    dtype: str
    static: bool
    scale_exp: int  # static scale 2 ** -scale_exp
    nonfinite: bool
    seed: int


@st.composite
def quant_cases(draw, name):
    return QuantCase(m=draw(st.integers(1, BUDGET[name].m)), k=draw(st.integers(1, BUDGET[name].k)),
                     dtype=draw(st.sampled_from(sorted(DTYPES))), static=draw(st.booleans()),
                     scale_exp=draw(st.integers(2, 9)), nonfinite=draw(st.booleans()),
                     seed=draw(st.integers(0, 2 ** 31 - 1)))


def check_quantize_act(name, case: QuantCase):
    gen = torch.Generator().manual_seed(case.seed)
    s = 2.0 ** -case.scale_exp
    x = _float_values(case.m, case.k, DTYPES[case.dtype], s, case.nonfinite, gen)
    scale = torch.tensor([s]) if case.static else None
    q, sc = _call(name, "quantize_act", x, scale)
    rq, rs = (ref.quantize_with_scale(x, scale, 127), scale) if case.static else ref.quantize_per_token(x)
    assert_same_bits(q, rq, f"{name} quantize_act q")
    assert_same_bits(sc, rs, f"{name} quantize_act scales")


@pytest.mark.parametrize("name", BACKENDS)
def test_quantize_act(name):
    _backend(name)

    @_settings(name, row_op=True)
    @given(case=quant_cases(name))
    def run(case):
        check_quantize_act(name, case)
    run()


# ---- plain GEMMs -----------------------------------------------------------------------------------------

class GemmCase(NamedTuple):
    bits: int
    group: Optional[int]
    m: int
    n: int
    k: int
    a_values: str
    w_values: str
    per_row: bool
    nan_row: bool  # one per-row activation scale NaN, as quantize_act gives a row holding NaN or inf
    bias: Optional[str]  # the bias dtype, or None
    out_dtype: str
    seed: int


def _group_sizes(name):
    fam = _backend(name).families()["gemm_w4a8"]
    if fam.group_sizes is not None:
        return list(fam.group_sizes)
    return [2 ** e for e in range(1, 15)]  # the reference: every canonical group size (2 .. MAX_GROUP_SIZE)


@st.composite
def gemm_shapes(draw, name, bits):
    """(group, m, n, k): K a multiple of the family's k_multiple and of the group, mostly not of a tile (an odd
    number of units); M from 1; N odd or even; on the reference now and then K near MAX_K."""
    be = _backend(name)
    fam = be.families()["gemm_w8a8" if bits == 8 else "gemm_w4a8"]
    group = draw(st.sampled_from(_group_sizes(name))) if bits == 4 else None
    unit = max(fam.k_multiple, group or 1)  # powers of two: the larger is a multiple of the smaller
    max_k = min(fam.max_k or ref.MAX_K, ref.MAX_K)
    # near MAX_K on the reference only where it is cheap: its W4A8 folds the groups in a Python loop
    if name == "torch" and (group or 64) >= 64 and draw(st.integers(0, 9)) == 9:
        k = (max_k // unit - draw(st.integers(0, 2))) * unit
    else:
        k = draw(st.integers(1, max(1, BUDGET[name].k // unit))) * unit
    k = max(k, unit)
    m = draw(st.integers(1, BUDGET[name].m) | st.just(1))
    n = draw(st.integers(1, BUDGET[name].n))
    return group, m, n, k


@st.composite
def gemm_cases(draw, name, bits):
    group, m, n, k = draw(gemm_shapes(name, bits))
    regimes = st.sampled_from(["uniform", "extremes", "sparse"])
    return GemmCase(bits=bits, group=group, m=m, n=n, k=k, a_values=draw(regimes), w_values=draw(regimes),
                    per_row=draw(st.booleans()), nan_row=draw(st.booleans()),
                    bias=draw(st.none() | st.sampled_from(sorted(DTYPES))),
                    out_dtype=draw(st.sampled_from(sorted(DTYPES))), seed=draw(st.integers(0, 2 ** 31 - 1)))


class Problem:
    """A GEMM's operands from a case: canonical weights (for the reference) and the backend's layout."""

    def __init__(self, name, case, gen):
        m, n, k = case.m, case.n, case.k
        self.a = _ints((m, k), -127, 127, case.a_values, gen)
        # row scales over a few binades (fp16 outputs reach their subnormals); |y| stays far below fp16's max
        self.a_scale = (torch.rand(m if case.per_row else 1, generator=gen) * 0.02 + 1e-3) \
            * 2.0 ** torch.randint(-8, 4, (m if case.per_row else 1,), generator=gen)
        self.nan_row = None
        if case.per_row and case.nan_row:
            self.nan_row = int(torch.randint(0, m, (1,), generator=gen))
            self.a_scale[self.nan_row] = float("nan")
        shrink = min(1.0, 256 / k)
        if case.bits == 8:
            self.w_q = _ints((n, k), -128, 127, case.w_values, gen)
            self.w_scale = (torch.rand(n, generator=gen) * 0.01 + 1e-4) * shrink
            w = self.w_q
        else:
            self.w_q = _ints((n, k), -8, 7, case.w_values, gen)
            self.w_scale = (torch.rand(k // case.group, n, generator=gen) * 0.05 + 1e-4) * shrink
            w = ref.pack_int4(self.w_q)
        fmt = WeightFormat(case.bits, case.group)
        self.w, self.w_kernel_scale = _backend(name).prepare_weight(fmt, w, self.w_scale)
        self.bias = None if case.bias is None else (torch.randn(n, generator=gen) * 4).to(DTYPES[case.bias])
        self.group = case.group

    def plain(self, name, a, a_scale, out_dtype):
        if self.group is None:
            return _call(name, "gemm_w8a8", a, a_scale, self.w, self.w_kernel_scale, self.bias, out_dtype)
        return _call(name, "gemm_w4a8", a, a_scale, self.w, self.w_kernel_scale, self.bias, self.group, out_dtype)

    def fused(self, name, a, a_scale, gelu, gate, residual, rows_per_gate, out_scale, out_dtype):
        if self.group is None:
            return _call(name, "gemm_w8a8_fused", a, a_scale, self.w, self.w_kernel_scale, self.bias, gelu, gate,
                         residual, rows_per_gate, out_scale, out_dtype)
        return _call(name, "gemm_w4a8_fused", a, a_scale, self.w, self.w_kernel_scale, self.bias, self.group, gelu,
                     gate, residual, rows_per_gate, out_scale, out_dtype)


    def finite_rows(self, y, what):
        """The rows to check against the exact reference: all but the one with a NaN activation scale, which must
        come out NaN (ditq.ops: the problem stays visible)."""
        keep = torch.ones(y.shape[0], dtype=torch.bool)
        if self.nan_row is not None:
            assert bool(y[self.nan_row].isnan().all()), f"{what}: the row with a NaN activation scale is not NaN"
            keep[self.nan_row] = False
        return keep


def check_gemm(name, case: GemmCase):
    gen = torch.Generator().manual_seed(case.seed)
    p = Problem(name, case, gen)
    out_dtype = DTYPES[case.out_dtype]
    y = p.plain(name, p.a, p.a_scale, out_dtype)
    assert y.dtype == out_dtype and y.shape == (case.m, case.n)
    what = f"{name} W{case.bits}A8"
    keep = p.finite_rows(y, what)
    a_scale = p.a_scale[keep] if case.per_row else p.a_scale
    if not keep.any():  # M = 1, and its row's scale NaN
        return
    if case.bits == 8:
        testing.assert_gemm_w8a8(y[keep], p.a[keep], a_scale, p.w_q, p.w_scale, p.bias, what=what)
    else:
        testing.assert_gemm_w4a8(y[keep], p.a[keep], a_scale, p.w_q, p.w_scale, p.group, p.bias, what=what)


@pytest.mark.parametrize("name", BACKENDS)
def test_gemm_w8a8(name):
    _backend(name)

    @_settings(name)
    @given(case=gemm_cases(name, 8))
    def run(case):
        check_gemm(name, case)
    run()


@pytest.mark.parametrize("name", BACKENDS)
def test_gemm_w4a8(name):
    _backend(name)

    @_settings(name)
    @given(case=gemm_cases(name, 4))
    def run(case):
        check_gemm(name, case)
    run()


# ---- GEMMs with a fused epilogue --------------------------------------------------------------------------

class FusedCase(NamedTuple):
    gemm: GemmCase
    a_dtype: str  # "int8", or a float dtype quantized on load with the static scale 2 ** -a_scale_exp
    a_scale_exp: int
    gelu: bool
    rows_per_gate: int  # 0: no gate
    gate_dtype: str
    residual: bool
    out_scale: bool
    nonfinite: bool  # NaN / +-inf in a float a


@st.composite
def fused_cases(draw, name, bits):
    g = draw(gemm_cases(name, bits))
    a_dtype = draw(st.sampled_from(["int8"] + sorted(DTYPES)))
    if a_dtype != "int8":
        g = g._replace(per_row=False, nan_row=False)  # a float a takes a static scale only (ditq.ops)
    divisors = [d for d in range(1, g.m + 1) if g.m % d == 0]
    return FusedCase(gemm=g, a_dtype=a_dtype, a_scale_exp=draw(st.integers(3, 8)), gelu=draw(st.booleans()),
                     rows_per_gate=draw(st.just(0) | st.sampled_from(divisors)),
                     gate_dtype=draw(st.sampled_from(sorted(DTYPES))), residual=draw(st.booleans()),
                     out_scale=draw(st.booleans()), nonfinite=draw(st.booleans()))


def _same_split(name, bits):
    """On the cuda backends a float ``a`` runs on GEMM tile 0 only while an int8 one gets the tile and split-K
    count of its M, and a W4A8 result depends on the split count (fp32 group sums added per split): pin both to
    tile 0, unsplit, so the comparison is of the quantization on load alone. The unpinned float-a W4A8 case is
    test_cuda_float_a_against_quantize_act_then_int8_op_unpinned (ditq.ops: fp32 rounding there)."""
    if name in ("cuda", "cuda-emulated") and bits == 4:
        from ditq.backends import cuda_backend
        return cuda_backend.gemm_tile(0, 1)
    return contextlib.nullcontext()


def check_fused(name, case: FusedCase):
    c = case.gemm
    gen = torch.Generator().manual_seed(c.seed)
    p = Problem(name, c, gen)
    out_dtype = DTYPES[c.out_dtype]
    a_in, a_scale, q = p.a, p.a_scale, p.a
    if case.a_dtype != "int8":
        a_scale = torch.tensor([2.0 ** -case.a_scale_exp])
        a_in = _float_values(c.m, c.k, DTYPES[case.a_dtype], float(a_scale), case.nonfinite, gen)
        q = ref.quantize_with_scale(a_in, a_scale, 127)
    gate = None
    if case.rows_per_gate:
        gate = ((torch.rand(c.m // case.rows_per_gate, c.n, generator=gen) * 2 - 1) * 2).to(DTYPES[case.gate_dtype])
    residual = (torch.randn(c.m, c.n, generator=gen) * 3).to(out_dtype) if case.residual else None
    rows = case.rows_per_gate or 1
    what = f"{name} W{c.bits}A8 fused"

    def assert_exact(y, what):
        keep = p.finite_rows(y, what)  # the gate spelled out per row, so that a row can be left out
        if not keep.any():
            return
        per_row = (lambda t: None if t is None else t[keep])
        testing.assert_gemm_fused(y[keep], q[keep], a_scale[keep] if a_scale.numel() > 1 else a_scale, p.w_q,
                                  p.w_scale, p.group, p.bias, gelu=case.gelu,
                                  gate=per_row(None if gate is None else gate.repeat_interleave(rows, dim=0)),
                                  residual=per_row(residual), what=what)

    # the fp32 result before any int8 quantization (a float32 residual holds the same values: the same sums)
    y32 = p.fused(name, a_in, a_scale, case.gelu, gate, None if residual is None else residual.float(), rows,
                  None, torch.float32)
    assert_exact(y32, what + " (fp32)")
    if case.out_scale:
        # the largest output at 20-200 quantization steps: often past 127 (clamped), most outputs far from 0
        top = y32.nan_to_num(nan=0.0).abs().max()
        out_scale = (top / (20 + 180 * torch.rand(1, generator=gen))).clamp(min=1e-30).float()
        y = p.fused(name, a_in, a_scale, case.gelu, gate, residual, rows, out_scale, out_dtype)
        assert_same_bits(y, ref.quantize_with_scale(y32, out_scale, 127),
                         what + ": int8 output is quantize_act's static rounding of its fp32 output (NaN -> 0)")
    else:
        y = p.fused(name, a_in, a_scale, case.gelu, gate, residual, rows, None, out_dtype)
        assert y.dtype == out_dtype and y.shape == (c.m, c.n)
        assert_exact(y, what)
    out_scale_arg = out_scale if case.out_scale else None
    if case.a_dtype != "int8":  # quantize_act, then the int8 op: the same bits, every piece included
        qb, sb = _call(name, "quantize_act", a_in, a_scale)
        assert_same_bits(qb, q, f"{name} quantize_act")
        with _same_split(name, c.bits):
            yf = p.fused(name, a_in, a_scale, case.gelu, gate, residual, rows, out_scale_arg, out_dtype)
            yq = p.fused(name, qb, sb, case.gelu, gate, residual, rows, out_scale_arg, out_dtype)
        assert_same_bits(yf, yq, what + ": float a vs quantize_act + int8 a")
    if not (case.gelu or gate is not None or residual is not None or case.out_scale):
        # a float a's fused result is the int8 one's (above); the int8 fused op is the plain op's
        fused = y if case.a_dtype == "int8" else p.fused(name, q, a_scale, False, None, None, 1, None, out_dtype)
        assert_same_bits(fused, p.plain(name, q, a_scale, out_dtype), what + " with no piece vs the plain op")


def _fused_test(bits):
    def test(name):
        _backend(name)

        @_settings(name)
        @given(case=fused_cases(name, bits))
        def run(case):
            check_fused(name, case)
        run()
    return test


test_gemm_w8a8_fused = pytest.mark.parametrize("name", BACKENDS)(_fused_test(8))
test_gemm_w4a8_fused = pytest.mark.parametrize("name", BACKENDS)(_fused_test(4))


# ---- norm_modulate_quantize -----------------------------------------------------------------------------

class NormCase(NamedTuple):
    b: int
    s: int
    k: int
    dtype: str
    shift_dtype: Optional[str]  # None: no modulation
    scale_dtype: str
    power: int  # the rows' integers times 2 ** power
    eps: float
    static: bool
    nonfinite: bool
    seed: int


@st.composite
def norm_cases(draw, name):
    rows = BUDGET[name].m
    b = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    mod = sorted(DTYPES)  # shift / scale: any float dtype (ditq.ops), each its own
    return NormCase(b=b, s=draw(st.integers(1, max(1, rows // b))), k=draw(st.integers(1, BUDGET[name].k)), dtype=dtype,
                    shift_dtype=draw(st.none() | st.sampled_from(mod)), scale_dtype=draw(st.sampled_from(mod)),
                    power=draw(st.integers(-4, 4)),
                    eps=draw(st.sampled_from([1e-6, 1e-5, 0.25])), static=draw(st.booleans()),
                    nonfinite=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 31 - 1)))


def _exact_sum_rows(b, s, k, power, gen):
    """Rows whose float sums are exact in any order: an integer mean c plus +-pairs of small integers (an odd K
    has one lane equal to c), shuffled, times 2 ** power. The sum is c * K, the squared deviations small
    integers: every backend's LayerNorm statistics are then the same floats, and so is everything after."""
    half = k // 2
    dev = torch.randint(1, 9, (b, s, half), generator=gen).float()  # never 0: a row of K >= 2 is not constant
    dev = torch.cat([dev, -dev, torch.zeros(b, s, k - 2 * half)], dim=2)
    dev = torch.gather(dev, 2, torch.argsort(torch.rand(b, s, k, generator=gen), dim=2))
    c = torch.randint(-20, 21, (b, s, 1), generator=gen).float()
    return (dev + c) * 2.0 ** power  # |values| <= 28 * 2 ** power: exact in every float dtype here


def check_norm_modulate_quantize(name, case: NormCase):
    gen = torch.Generator().manual_seed(case.seed)
    x = _exact_sum_rows(case.b, case.s, case.k, case.power, gen)
    if case.nonfinite:
        x[int(torch.randint(0, case.b, (1,), generator=gen)), int(torch.randint(0, case.s, (1,), generator=gen)),
          int(torch.randint(0, case.k, (1,), generator=gen))] = float(["nan", "inf", "-inf"][case.seed % 3])
    x = x.to(DTYPES[case.dtype])
    shift = scale = None
    if case.shift_dtype is not None:
        shift = (torch.randn(case.b, case.k, generator=gen) * 0.5).to(DTYPES[case.shift_dtype])
        scale = (torch.randn(case.b, case.k, generator=gen) * 0.5).to(DTYPES[case.scale_dtype])
    act_scale = (torch.rand(1, generator=gen) * 0.05 + 5e-3) if case.static else None
    q, sc = _call(name, "norm_modulate_quantize", x, shift, scale, case.eps, act_scale)
    rq, rs = ref.norm_modulate_quantize(x, shift, scale, case.eps, act_scale)
    assert_same_bits(q, rq, f"{name} norm_modulate_quantize q")
    assert_same_bits(sc, rs, f"{name} norm_modulate_quantize scales")
    if case.k > 1 and not case.nonfinite:
        assert bool(q.ne(0).any()), "a test on zeros"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NumPy's inf - inf, non-finite rows
@pytest.mark.parametrize("name", BACKENDS)
def test_norm_modulate_quantize(name):
    _backend(name)

    @_settings(name, row_op=True)
    @given(case=norm_cases(name))
    def run(case):
        check_norm_modulate_quantize(name, case)
    run()


@pytest.mark.parametrize("name", BACKENDS)
def test_norm_modulation_in_any_float_dtype(name):
    """bfloat16 x modulated by a float16 shift and a float32 scale, on exact-sum rows, equals the reference bit for
    bit on every backend (triton's launcher once took only x's dtype or float32, refusing what ditq.ops allows)."""
    _backend(name)
    check_norm_modulate_quantize(name, NormCase(b=2, s=3, k=37, dtype="bf16", shift_dtype="f16", scale_dtype="f32",
                                                power=-1, eps=1e-6, static=False, nonfinite=False, seed=11))


@pytest.mark.parametrize("bits", (8, 4), ids=("w8a8", "w4a8"))
def test_cuda_float_a_against_quantize_act_then_int8_op_unpinned(bits):
    """The fuzz's first counterexample (M = 17, N = 1, K = 96, group 32, bfloat16 a, no epilogue piece), unpinned:
    the float-a kernel runs tile 0 unsplit while the int8 call takes its M bucket's tile and 2 splits here. W8A8
    (int32 sums) gives the same bits at any split; W4A8 adds its fp32 group sums per split, so ditq.ops promises
    the same integers and fp32 rounding there, and bit for bit when both are pinned to one tile and split count
    (what check_fused does). On the emulator only: a GPU's split count follows its SM count."""
    from ditq.backends import cuda_backend
    name = "cuda-emulated"
    _backend(name)
    c = GemmCase(bits=bits, group=32 if bits == 4 else None, m=17, n=1, k=96, a_values="uniform",
                 w_values="uniform", per_row=False, nan_row=False, bias=None, out_dtype="f32", seed=0)
    gen = torch.Generator().manual_seed(c.seed)
    p = Problem(name, c, gen)
    a_scale = torch.tensor([2.0 ** -3])
    x = _float_values(c.m, c.k, torch.bfloat16, float(a_scale), False, gen)
    q, s = _call(name, "quantize_act", x, a_scale)
    float_a = p.fused(name, x, a_scale, False, None, None, 1, None, torch.float32)
    int8_a = p.fused(name, q, s, False, None, None, 1, None, torch.float32)
    testing.assert_gemm_fused(float_a, q, s, p.w_q, p.w_scale, p.group, None, what=f"{name} float a")
    testing.assert_gemm_fused(int8_a, q, s, p.w_q, p.w_scale, p.group, None, what=f"{name} int8 a")
    if bits == 8:
        assert_same_bits(float_a, int8_a, f"{name} W8A8 float a vs int8 a, unpinned")
    with cuda_backend.gemm_tile(0, 1):
        pinned = p.fused(name, q, s, False, None, None, 1, None, torch.float32)
    assert_same_bits(float_a, pinned, f"{name} float a vs int8 a on the same tile, unsplit")

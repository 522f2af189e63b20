"""Bad input at the op and layer level: every class rejected clearly, the same on every backend, nothing silent.

Checkpoint files and the command line have their own tests (test_bad_checkpoints.py, test_cli.py); this file
covers the ops, QuantLinear, and the non-finite activation contract (README, "Non-finite values"), plus a
property test that throws random bad inputs at every backend.
"""
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ditq
from ditq import backends
from ditq.nn import QuantLinear
from ditq.quant import reference as ref
from ditq.testing import assert_gemm_w4a8, assert_gemm_w8a8, random_int4, random_int8

BACKENDS = [b for b in ("torch", "cuda-emulated", "triton") if backends.unavailable_reason(b, "cpu") is None]
# What ditq promises to raise for bad input: a ValueError or TypeError (C++ checks raise the same Python types),
# or a BackendUnavailableError saying why a backend cannot run something.
DOCUMENTED = (ValueError, TypeError, backends.BackendUnavailableError)


def _w8(m=3, n=6, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [random_int8(m, k, generator=g), torch.rand(m, generator=g) + 0.1, random_int8(n, k, generator=g),
            torch.rand(n, generator=g) + 0.1, torch.randn(n, generator=g)]


def _w4(m=3, n=6, k=128, group=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    wq = random_int4(n, k, generator=g)
    return [random_int8(m, k, generator=g), torch.rand(m, generator=g) + 0.1, ref.pack_int4(wq),
            torch.rand(k // group, n, generator=g) + 0.1, torch.randn(n, generator=g)], wq


def _prepared_w4(backend, args, group):
    a, sa, w, sw, b = args
    w, sw = backends.get_backend(backend, "cpu").prepare_weight(ditq.format.WeightFormat(4, group), w, sw)
    return [a, sa, w, sw, b]


# ---- a meta tensor among real ones: the dispatcher picks the fake kernel, which must refuse -----------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("slot", [1, 2, 3, 4])
def test_meta_mixed_with_real_tensors_is_refused(backend, slot):
    args = _w8()
    args[slot] = args[slot].to("meta")
    with pytest.raises(ValueError, match="is on meta"):
        torch.ops.ditq.gemm_w8a8(*args, torch.float32, backend)
    ops = backends.get_backend(backend, "cpu").kernel_ops()
    with pytest.raises(ValueError, match="is on meta"):
        ops.gemm_w8a8(*args, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_meta_static_scale_with_real_activations_is_refused(backend):
    with pytest.raises(ValueError, match="is on meta"):
        torch.ops.ditq.quantize_act(torch.randn(2, 32), torch.ones(1, device="meta"), backend)


# ---- loaded values --------------------------------------------------------------------------------------------

def _layer(bits=8, backend="torch"):
    lin = torch.nn.Linear(128, 32)
    cfg = ditq.QuantConfig.preset("w8a8" if bits == 8 else "w4a8", backend=backend)
    return QuantLinear.from_linear(lin, cfg, act_scale=0.05)


@pytest.mark.parametrize("value, match", [
    (torch.tensor([0.0]), "positive"), (torch.tensor([-0.1]), "positive"), (torch.tensor([float("nan")]), "NaN"),
    (torch.tensor([float("inf")]), "NaN or inf"), (torch.tensor([3]), "float act_scale"),
    (torch.tensor([0.1, 0.2]), "one element")])
def test_bad_act_scale_is_refused(value, match):
    layer = _layer()
    can = layer.canonical()
    with pytest.raises(ValueError, match=match):
        layer.load_canonical(can["qweight"], can["scales"], can["bias"], value)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, 0.0])
def test_bad_weight_scales_are_refused(bits, bad):
    layer = _layer(bits)
    can = layer.canonical()
    scales = can["scales"].clone()
    scales.view(-1)[3] = bad
    with pytest.raises(ValueError, match="scales must be positive finite"):
        layer.load_canonical(can["qweight"], scales, can["bias"], can["act_scale"])
    sd = {k: v.clone() for k, v in layer.state_dict().items()}
    sd["scales"] = scales
    with pytest.raises(RuntimeError, match="scales must be positive finite"):
        layer.load_state_dict(sd)


def test_nan_bias_is_refused():
    layer = _layer()
    can = layer.canonical()
    with pytest.raises(ValueError, match="bias must be finite"):
        layer.load_canonical(can["qweight"], can["scales"], torch.full_like(can["bias"], float("nan")),
                             can["act_scale"])


# ---- odd uses of a layer --------------------------------------------------------------------------------------

def test_double_model_says_what_dtypes_run():
    layer = _layer().double()
    with pytest.raises(TypeError, match="float16/bfloat16/float32"):
        layer(torch.randn(2, 128, dtype=torch.float64))
    assert layer.bias.dtype == torch.float32  # kept usable: float32 input still runs
    assert layer(torch.randn(2, 128)).dtype == torch.float32


def test_gradients_do_not_flow_and_the_layer_says_so():
    layer = _layer()
    x = torch.randn(2, 128, requires_grad=True)
    with pytest.warns(UserWarning, match="inference-only"):
        layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(2, 128))  # no grad asked for: no warning


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_act_with_no_features(backend):
    """K = 0 is well defined (an empty row scales like an all-zero one), and the same everywhere."""
    q, s = torch.ops.ditq.quantize_act(torch.randn(3, 0), None, backend)
    assert q.shape == (3, 0) and q.dtype == torch.int8 and torch.equal(s, torch.ones(3))
    q, s = torch.ops.ditq.quantize_act(torch.randn(3, 0), torch.tensor([0.5]), backend)
    assert q.shape == (3, 0) and torch.equal(s, torch.tensor([0.5]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_misshaped_int4_weight_is_refused(backend):
    args, _ = _w4()
    args = _prepared_w4(backend, args, 64)
    args[2] = args[2][:-1].contiguous()  # one output channel short of w_scale's N
    with pytest.raises(ValueError):
        torch.ops.ditq.gemm_w4a8(*args, 64, torch.float32, backend)


# ---- non-finite activations: one contract on every backend ----------------------------------------------------

def _rows_with_non_finite(k=64):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, k, generator=g)
    x[0, 5] = float("nan")
    x[1, 9] = float("inf")
    x[2, 0] = -float("inf")
    x[3] = 0.0
    x[4, 3], x[4, 7] = float("nan"), float("inf")
    return x  # row 5 is finite


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_activations_dynamic(backend):
    x = _rows_with_non_finite()
    q, s = torch.ops.ditq.quantize_act(x, None, backend)
    q_ref, s_ref = ref.quantize_per_token(x)
    assert torch.equal(q, q_ref)
    assert torch.allclose(s, s_ref, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(s[[0, 1, 2, 4]]).all() and s[3] == 1.0 and torch.isfinite(s[5])
    assert (q[[0, 1, 2, 3, 4]] == 0).all()
    # downstream, the rows with a non-finite input come out NaN and the others stay exact
    _, _, w, sw, b = _w8(m=6, k=64)
    y = torch.ops.ditq.gemm_w8a8(q, s, w, sw, b, torch.float32, backend)
    assert torch.isnan(y[[0, 1, 2, 4]]).all()
    assert_gemm_w8a8(y[[3, 5]], q[[3, 5]], s[[3, 5]], w, sw, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_activations_static(backend):
    x = _rows_with_non_finite()
    scale = torch.tensor([0.02])
    q, s = torch.ops.ditq.quantize_act(x, scale, backend)
    assert torch.equal(q, ref.quantize_with_scale(x, scale, 127)) and torch.equal(s, scale)
    assert q[0, 5] == 0 and q[1, 9] == 127 and q[2, 0] == -127


# ---- property test: random bad inputs through every backend -------------------------------------------------

def _mutations():
    """(name, function(args, group) -> (args, group)) pairs, each producing input some check must catch or that
    still has a well-defined result."""
    def at(i, f):
        def mutate(args, group):
            args = list(args)
            args[i] = f(args[i])
            return args, group
        return mutate
    return {
        "a float": at(0, lambda t: t.float()),
        "a uint8": at(0, lambda t: t.to(torch.uint8)),
        "a 1-D": at(0, lambda t: t.reshape(-1)),
        "a transposed": at(0, lambda t: t.t().contiguous().t()),
        "a_scale float64": at(1, lambda t: t.double()),
        "a_scale wrong length": at(1, lambda t: torch.cat([t, t])),
        "a_scale NaN": at(1, lambda t: torch.full_like(t, float("nan"))),
        "w wrong dtype": at(2, lambda t: t.to(torch.int32)),
        "w one row short": at(2, lambda t: t[:-1].contiguous()),
        "w meta": at(2, lambda t: t.to("meta")),
        "w_scale short": at(3, lambda t: t[..., :-1].contiguous()),
        "w_scale int": at(3, lambda t: t.to(torch.int32)),
        "bias wrong length": at(4, lambda t: torch.cat([t, t])),
        "bias int": at(4, lambda t: t.to(torch.int64)),
        "no bias": at(4, lambda t: None),
        "group not a power of two": lambda args, group: (args, 48),
        "group larger than K": lambda args, group: (args, 256),
        "group zero": lambda args, group: (args, 0),
    }


MUTATIONS = _mutations()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(backend=st.sampled_from(BACKENDS), bits=st.sampled_from([8, 4]), mutation=st.sampled_from(sorted(MUTATIONS)),
       seed=st.integers(0, 2 ** 16), m=st.integers(1, 5))
def test_bad_inputs_raise_a_documented_error_or_match_the_reference(backend, bits, mutation, seed, m):
    group = 64
    if bits == 8:
        args, wq = _w8(m=m, seed=seed), None
    else:
        args, wq = _w4(m=m, seed=seed)
        args = _prepared_w4(backend, args, group)
    args, group = MUTATIONS[mutation](args, group)
    try:
        if bits == 8:
            y = torch.ops.ditq.gemm_w8a8(*args, torch.float32, backend)
        else:
            y = torch.ops.ditq.gemm_w4a8(*args, group, torch.float32, backend)
    except DOCUMENTED:
        return
    # accepted: then it must be right (the reference's own conventions; NaN scales give NaN outputs)
    a, sa, w, sw, b = args
    if bool(torch.isnan(sa).any()):
        assert torch.isnan(y).all()
    elif bits == 8:
        assert_gemm_w8a8(y, a, sa, w, sw, b)
    else:
        assert_gemm_w4a8(y, a, sa, wq, sw, group, b)

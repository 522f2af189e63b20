"""The fused LayerNorm + adaLN modulation + int8 quantization in CUDA (csrc/norm_quantize.cuh,
ditq_C::norm_modulate_quantize) under the SIMT emulator (backend "cuda-emulated"), against
ditq.quant.reference.norm_modulate_quantize.

The kernel sums a row in its own order (each lane in index order, then a butterfly), torch in another, so:

* rows whose sums are exact in any order (an integer mean plus +-pairs of small integers): every later step
  is the same IEEE operation in both, so q and the scales must be bit-equal;
* random rows: q equal except where the reference's ``v = y * (1/s)`` lies within 1e-5 (relative) of a .5
  tie, off by one there and rarely; per-token scales within a few fp32 ulps.

The binding poisons q (-128) and the scales (NaN) before the kernel runs, and the emulator's global-memory
checker knows every buffer's extent (x, shift, scale, the static scale, q, scales)."""
import pytest
import torch

from ditq import backends
from ditq.quant import reference as ref

BACKEND = "cuda-emulated"
_reason = backends.unavailable_reason(BACKEND, "cpu")
if _reason is None and not hasattr(torch.ops.ditq_C, "norm_modulate_quantize"):
    _reason = "this build of ditq._C has no fused norm"
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"backend {BACKEND!r} unavailable: {_reason}")

if _reason is None:
    from ditq.emulator import emulator_options

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
EPS = 1e-6
NAN, INF = float("nan"), float("inf")
TIE_REL = 1e-5
S_ULPS = 8  # per-token scales on random rows: the two row sums differ by a few ulps (see the module docstring)
ORDERS = (("forward", 0), ("reverse", 0), ("random", 1), ("random", 2))


def _run(x, shift, scale, act_scale, eps=EPS, **opts):
    with emulator_options(race_check=True, **opts):
        q, s = torch.ops.ditq_C.norm_modulate_quantize(x, shift, scale, eps, act_scale)
    b, seq, k = x.shape
    assert q.dtype == torch.int8 and q.shape == (b * seq, k)
    assert s.dtype == torch.float32 and s.shape == ((b * seq,) if act_scale is None else (1,))
    assert not bool((q == -128).any()), "some q were not written"
    rq, rs = ref.norm_modulate_quantize(x, shift, scale, eps, act_scale)
    return q, s, rq, rs


def _v(x, shift, scale, eps, rs):
    """The value each reference q rounds: y * (1/s), recomputed from the reference's own steps."""
    b, seq, k = x.shape
    xf = x.float()
    mean = xf.sum(-1, keepdim=True) / k
    d = xf - mean
    var = (d * d).sum(-1, keepdim=True) / k
    y = d * (1.0 / torch.sqrt((var + torch.tensor(eps, dtype=torch.float32)).double()).float())
    if scale is not None:
        y = y * (1.0 + scale.float()[:, None, :]) + shift.float()[:, None, :]
    return y.reshape(-1, k) * torch.reciprocal(rs.reshape(-1, 1) if rs.numel() > 1 else rs)


def _assert_close(q, s, rq, rs, v, static, what=""):
    diff = q != rq
    n = int(diff.sum())
    if n:
        off = (q[diff].int() - rq[diff].int()).abs()
        assert bool((off == 1).all()), f"{what}: q differs by more than 1 at {diff.nonzero()[:5].tolist()}"
        frac = v[diff].abs() - v[diff].abs().floor()
        near = (frac - 0.5).abs() <= TIE_REL * v[diff].abs().clamp(min=1.0)
        assert bool(near.all()), f"{what}: q differs away from a rounding tie: v = {v[diff][:5].tolist()}"
        assert n <= max(2, q.numel() // 1000), f"{what}: {n} of {q.numel()} q differ"
    if static:
        assert torch.equal(s, rs), f"{what}: the static scale is returned as given"
    else:
        nan = torch.isnan(rs)
        assert torch.equal(torch.isnan(s), nan), f"{what}: NaN scales differ"
        ulps = (s[~nan].view(torch.int32).long() - rs[~nan].view(torch.int32).long()).abs()
        assert ulps.numel() == 0 or int(ulps.max()) <= S_ULPS, f"{what}: scales differ by {int(ulps.max())} ulps"


def _mod(b, k, dtype, gen, spread=0.5):
    return ((torch.randn(b, k, generator=gen) * spread).to(dtype), (torch.randn(b, k, generator=gen) * spread).to(dtype))


def _random_x(b, s, k, dtype, gen):
    x = torch.randn(b, s, k, generator=gen) * (torch.rand(b, s, 1, generator=gen) * 8 + 0.1)
    x = x + torch.randn(b, s, 1, generator=gen) * 5
    if k > 4:
        x[..., 3] *= 20
    return x.to(dtype)


def _integer_rows(b, s, k, dtype, gen, power=0):
    """Rows whose float sums are exact in any order: an integer mean c plus +-pairs of small integers (an odd
    K has one element equal to c), times 2**power."""
    half = k // 2
    a = torch.randint(-8, 9, (b, s, half), generator=gen).float()
    dev = torch.cat([a, -a, torch.zeros(b, s, k - 2 * half)], dim=2)
    dev = torch.gather(dev, 2, torch.argsort(torch.rand(b, s, k, generator=gen), dim=2))
    c = torch.randint(-20, 21, (b, s, 1), generator=gen).float()
    return ((dev + c) * 2.0 ** power).to(dtype)


# (B, S, K): one token; odd K (the scalar path); K = 40 (16-byte rows in 16-bit types only); 8 rows in a
# block of 4 warps plus a partial block; DiT-XL's 1152; K = 1 (variance 0)
SHAPES = ((1, 1, 16), (2, 3, 37), (1, 5, 40), (3, 3, 200), (2, 2, 1152), (3, 1, 1))


@pytest.mark.parametrize("static", (False, True), ids=("dynamic", "static"))
@pytest.mark.parametrize("modulate", (True, False), ids=("adaln", "plain"))
@pytest.mark.parametrize("dtype", DTYPES, ids=("f32", "bf16", "f16"))
@pytest.mark.parametrize("b,s,k,power", ((2, 3, 37, -3), (1, 5, 40, 0), (2, 2, 1152, 0), (3, 3, 200, 4)))
def test_exact_sums_bit_exact(b, s, k, power, dtype, modulate, static):
    gen = torch.Generator().manual_seed(k + power)
    x = _integer_rows(b, s, k, dtype, gen, power)
    shift, scale = _mod(b, k, dtype, gen) if modulate else (None, None)
    act_scale = torch.tensor([0.013]) if static else None
    q, sc, rq, rs = _run(x, shift, scale, act_scale)
    assert torch.equal(q, rq), f"{int((q != rq).sum())} of {q.numel()} q differ"
    assert torch.equal(sc, rs), (sc - rs).abs().max()
    assert int(q.abs().max()) >= 100  # not a trivial comparison of zeros


@pytest.mark.parametrize("static", (False, True), ids=("dynamic", "static"))
@pytest.mark.parametrize("dtype", DTYPES, ids=("f32", "bf16", "f16"))
@pytest.mark.parametrize("b,s,k", SHAPES, ids=[f"{b}x{s}x{k}" for b, s, k in SHAPES])
def test_random_rows_match_the_reference(b, s, k, dtype, static):
    gen = torch.Generator().manual_seed(b * 1000 + s * 100 + k)
    x = _random_x(b, s, k, dtype, gen)
    modulate = (b + k) % 2 == 0 or k == 1
    shift, scale = _mod(b, k, dtype, gen) if modulate else (None, None)
    act_scale = torch.tensor([0.02]) if static else None
    q, sc, rq, rs = _run(x, shift, scale, act_scale)
    _assert_close(q, sc, rq, rs, _v(x, shift, scale, EPS, rs), static, what=f"{dtype} {b}x{s}x{k}")
    if k > 1:
        assert int(q.abs().max()) >= (127 if static else 100) and float((q != 0).float().mean()) > 0.5


def test_modulation_in_any_float_dtype():
    """shift / scale in another dtype than x (the op contract allows any float): read exactly as fp32."""
    gen = torch.Generator().manual_seed(5)
    x = _integer_rows(2, 3, 64, torch.bfloat16, gen)
    shift, scale = _mod(2, 64, torch.float16, gen)
    q, sc, rq, rs = _run(x, shift, scale.float(), None)
    assert torch.equal(q, rq) and torch.equal(sc, rs)


@pytest.mark.parametrize("order,seed", ORDERS, ids=[f"{o}{s}" for o, s in ORDERS])
def test_fiber_orders(order, seed):
    """The butterflies are the only collectives: every schedule gives the same bits (vector and scalar path)."""
    gen = torch.Generator().manual_seed(77)
    for k in (64, 37):
        x = _random_x(2, 5, k, torch.bfloat16, gen)
        shift, scale = _mod(2, k, torch.bfloat16, gen)
        base = torch.ops.ditq_C.norm_modulate_quantize(x, shift, scale, EPS, None)
        q, sc, _, _ = _run(x, shift, scale, None, order=order, seed=seed)
        assert torch.equal(q, base[0]) and torch.equal(sc, base[1])


def test_constant_rows():
    """Variance 0: y = 0 (plain: scale 1, q 0) or y = shift (modulated)."""
    x = torch.full((2, 2, 24), 3.25)
    x[1, 1] = 0.0
    q, sc, rq, rs = _run(x, None, None, None)
    assert bool((q == 0).all()) and bool((sc == 1).all()) and torch.equal(sc, rs)
    shift = torch.linspace(-2, 2, 24).repeat(2, 1)
    q, sc, rq, rs = _run(x, shift, torch.zeros(2, 24), None)
    assert torch.equal(q, rq) and torch.equal(sc, rs)


@pytest.mark.parametrize("dtype", DTYPES, ids=("f32", "bf16", "f16"))
def test_non_finite(dtype):
    """A NaN / inf in x's row makes its y NaN: per-token scale NaN and q 0, static q 0. In shift / scale it
    poisons that feature of that image: static q follows the elementwise contract, per-token rows of that
    image get scale NaN and q 0."""
    b, s, k = 2, 3, 40
    gen = torch.Generator().manual_seed(9)
    x = _random_x(b, s, k, torch.float32, gen)
    x[0, 0, 4], x[0, 1, 39], x[0, 2, 0] = NAN, INF, -INF
    x = x.to(dtype)
    for act_scale in (None, torch.tensor([0.02])):
        q, sc, rq, rs = _run(x, None, None, act_scale)
        assert bool((q[:3] == 0).all()) and bool((rq[:3] == 0).all())
        if act_scale is None:
            assert bool(torch.isnan(sc[:3]).all()) and not bool(torch.isnan(sc[3:]).any())
        _assert_close(q, sc, rq, rs, _v(x, None, None, EPS, rs), act_scale is not None)
    xf = _random_x(b, s, k, dtype, gen)
    shift, scale = _mod(b, k, torch.float32, gen)
    shift[1, 5], shift[1, 6], scale[1, 7] = INF, -INF, NAN
    q, sc, rq, rs = _run(xf, shift, scale, torch.tensor([0.02]))
    assert bool((q[3:, 5] == 127).all()) and bool((q[3:, 6] == -127).all()) and bool((q[3:, 7] == 0).all())
    _assert_close(q, sc, rq, rs, _v(xf, shift, scale, EPS, rs), True)
    q, sc, rq, rs = _run(xf, shift, scale, None)
    assert bool(torch.isnan(sc[3:]).all()) and bool((q[3:] == 0).all()) and not bool(torch.isnan(sc[:3]).any())


def test_static_scale_is_a_copy_and_empty_inputs():
    x = torch.randn(1, 2, 8)
    s = torch.tensor([0.1])
    _, sc = torch.ops.ditq_C.norm_modulate_quantize(x, None, None, EPS, s)
    assert torch.equal(sc, s) and sc.data_ptr() != s.data_ptr()
    q, sc = torch.ops.ditq_C.norm_modulate_quantize(torch.randn(2, 0, 8), None, None, EPS, None)
    assert q.shape == (0, 8) and sc.shape == (0,)
    q, sc = torch.ops.ditq_C.norm_modulate_quantize(torch.randn(2, 3, 0), None, None, EPS, None)
    assert q.shape == (6, 0) and bool((sc == 1).all())


def test_misaligned_x_takes_the_scalar_path():
    """A view of x 4 bytes past an aligned address runs the scalar path (which sums in another order than the
    vector path): bit-equal to the reference on rows with exact sums, close on random ones."""
    gen = torch.Generator().manual_seed(3)
    for x in (_integer_rows(1, 3, 64, torch.float32, gen), _random_x(1, 3, 64, torch.float32, gen)):
        buf = torch.empty(x.numel() + 1)
        xv = buf[1:].view(1, 3, 64)
        xv.copy_(x)
        assert xv.data_ptr() % 16 != 0
        q, sc, rq, rs = _run(xv, None, None, None)
        _assert_close(q, sc, rq, rs, _v(x, None, None, EPS, rs), False)
    q, sc, rq, rs = _run(xv.copy_(_integer_rows(1, 3, 64, torch.float32, gen)), None, None, None)
    assert torch.equal(q, rq) and torch.equal(sc, rs)


def test_generic_op_and_kernel_ops():
    """torch.ops.ditq.norm_modulate_quantize(..., "cuda-emulated") and the backend's KernelOps run this kernel."""
    gen = torch.Generator().manual_seed(4)
    x = _integer_rows(2, 3, 48, torch.bfloat16, gen)
    shift, scale = _mod(2, 48, torch.bfloat16, gen)
    want = torch.ops.ditq_C.norm_modulate_quantize(x, shift, scale, EPS, None)
    got = torch.ops.ditq.norm_modulate_quantize(x, shift, scale, EPS, None, BACKEND)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    ops = backends.get_backend(BACKEND, "cpu").kernel_ops()
    assert ops.norm_modulate_quantize is torch.ops.ditq_C.norm_modulate_quantize.default
    fam = backends.get_backend(BACKEND, "cpu").families()["norm_quantize"]
    assert fam.k_multiple == 1 and fam.max_k >= 16384


@pytest.mark.parametrize("case", ("x_int", "x_2d", "x_noncontig", "one_of_shift_scale", "shift_shape",
                                  "scale_int", "eps_zero", "eps_tiny", "eps_inf", "act_dtype", "act_shape"))
def test_bad_inputs(case):
    x, shift, scale, eps, act = torch.randn(2, 3, 8), torch.randn(2, 8), torch.randn(2, 8), EPS, None
    exc, match = ValueError, None
    if case == "x_int":
        x, exc, match = x.int(), TypeError, "x must be float16, bfloat16, float32; got int32"
    elif case == "x_2d":
        x, match = x[0], "x must be 3-D"
    elif case == "x_noncontig":
        x, match = torch.randn(2, 8, 3).transpose(1, 2), "contiguous"
    elif case == "one_of_shift_scale":
        scale, match = None, "shift and scale come together"
    elif case == "shift_shape":
        shift, match = torch.randn(3, 8), r"shift must be \[B, K\]"
    elif case == "scale_int":
        scale, exc, match = torch.ones(2, 8, dtype=torch.int32), TypeError, "scale must be float16, bfloat16, float32"
    elif case in ("eps_zero", "eps_tiny", "eps_inf"):
        eps, match = {"eps_zero": 0.0, "eps_tiny": 1e-50, "eps_inf": INF}[case], "eps must be a positive finite float"
    elif case == "act_dtype":
        act, exc, match = torch.tensor([0.1], dtype=torch.float64), TypeError, "act_scale must be float32; got float64"
    elif case == "act_shape":
        act, match = torch.tensor([0.1, 0.2]), r"float32 \[1\]"
    with pytest.raises(exc, match=match):
        torch.ops.ditq_C.norm_modulate_quantize(x, shift, scale, eps, act)

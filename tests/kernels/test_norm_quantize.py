"""Fused LayerNorm + adaLN modulation + int8 quantization against its plain-torch reference.

The kernel and the reference sum a row in different orders (a tree here, torch's order there), so on random
data ``y`` may differ in its last fp32 bits. Two kinds of check follow from that:

* rows whose sums are exact in any order (integer values, symmetric about an integer mean): every later step
  is the same IEEE operation in both, so q and s must be bit-equal;
* random rows: q must equal the reference's q except where the reference's ``v = y * (1/s)`` lies within
  1e-5 (relative, against max(|v|, 1)) of a .5 rounding tie; such differences must be rare and off by one;
  a per-token scale must be within S_ULPS fp32 ulps of the reference's (see there).

Outputs are poisoned with -128 (a value the kernel never writes) before every call, and the autouse fixture
of tests/kernels/conftest.py poisons masked-off lanes of loads without ``other=``.
"""
import importlib.util
import math
import os

import pytest
import torch

import ditq.kernels
from ditq.kernels import interpret, norm_quantize as nq

pytestmark = pytest.mark.gpu  # also run on the GPU by benchmarks/gpu_suite.sh
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter (tests/conftest.py)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (B, S, K): one token of one image; odd K (masked tail); K not a multiple of the block (300 -> 512);
# DiT-XL's width 1152 at a few tokens; K = 1 (variance 0)
SHAPES = ((1, 1, 16), (2, 3, 37), (1, 5, 300), (2, 2, 1152), (3, 1, 1))
EPS = 1e-6
NAN, INF = float("nan"), float("inf")
TIE_REL = 1e-5
# Per-token scales, kernel vs reference on random rows: the two row sums, taken in different orders, differ
# by a few ulps; that error reaches y through rstd and the scale's own roundings. Measured under the
# interpreter on 1000 random modulated rows each at K = 37, 300, 1152 (float32 and bfloat16 x): 0 ulps for
# ~72%, at most 4. 8 ulps (~1e-6 relative) leaves room for a GPU's different tree order and is still far
# inside the 1e-5 window the q check allows; rows with exact sums are checked bit for bit instead.
S_ULPS = 8


def _mod(b, k, dtype, gen, spread=0.5):
    shift = (torch.randn(b, k, generator=gen) * spread).to(dtype)
    scale = (torch.randn(b, k, generator=gen) * spread).to(dtype)
    return shift, scale


def _random_x(b, s, k, dtype, gen):
    # per-row offsets and spreads, a few large outliers: LayerNorm must centre and rescale each row
    x = torch.randn(b, s, k, generator=gen) * (torch.rand(b, s, 1, generator=gen) * 8 + 0.1)
    x = x + torch.randn(b, s, 1, generator=gen) * 5
    if k > 4:
        x[..., 3] *= 20
    return x.to(dtype)


def _dev(*ts):
    return [None if t is None else t.to(DEVICE) for t in ts]


def _run(x, shift, scale, act_scale, eps=EPS):
    x, shift, scale, act_scale = _dev(x, shift, scale, act_scale)
    b, s, k = x.shape
    q_out = torch.full((b * s, k), -128, dtype=torch.int8, device=DEVICE)  # poison: never written by the kernel
    q, sc = nq.norm_modulate_quantize(x, shift, scale, eps, act_scale, out=q_out)
    assert q.data_ptr() == q_out.data_ptr() and q.dtype == torch.int8 and q.shape == (b * s, k)
    assert not (q == -128).any(), "some q were not written"
    assert sc.dtype == torch.float32 and sc.shape == ((b * s,) if act_scale is None else (1,))
    rq, rs, v = nq.reference(x, shift, scale, eps, act_scale)
    return q.cpu(), sc.cpu(), rq.cpu(), rs.cpu(), v.cpu()


def _near_tie(v):
    frac = v.abs() - v.abs().floor()
    return (frac - 0.5).abs() <= TIE_REL * v.abs().clamp(min=1.0)


def _assert_close(q, s, rq, rs, v, static, what=""):
    """q equal except near rounding ties (rare, off by one); per-token s within 2 ulps, NaN where the
    reference's is NaN."""
    diff = q != rq
    n = int(diff.sum())
    if n:
        off = (q[diff].int() - rq[diff].int()).abs()
        assert (off == 1).all(), f"{what}: q differs by more than 1 at {diff.nonzero()[:5].tolist()}"
        assert _near_tie(v[diff]).all(), f"{what}: q differs away from a rounding tie: v = {v[diff][:5].tolist()}"
        assert n <= max(2, q.numel() // 1000), f"{what}: {n} of {q.numel()} q differ (near ties, but too many)"
    if not static:
        nan = torch.isnan(rs)
        assert torch.equal(torch.isnan(s), nan), f"{what}: NaN scales differ: {s} vs {rs}"
        ulps = (s[~nan].view(torch.int32).long() - rs[~nan].view(torch.int32).long()).abs()
        assert ulps.numel() == 0 or int(ulps.max()) <= S_ULPS, f"{what}: scales differ by {int(ulps.max())} ulps"
    else:
        assert torch.equal(s, rs), f"{what}: the static scale is returned as given"


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("modulate", [True, False], ids=["adaln", "plain"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,s,k", SHAPES)
def test_random_rows_match_the_reference(b, s, k, dtype, modulate, static):
    gen = torch.Generator().manual_seed(b * 1000 + s * 100 + k)
    x = _random_x(b, s, k, dtype, gen)
    shift, scale = _mod(b, k, dtype, gen) if modulate else (None, None)
    # static: a calibrated scale at which a good share of the values clamp at +-127
    act_scale = torch.tensor([0.02]) if static else None
    q, sc, rq, rs, v = _run(x, shift, scale, act_scale)
    _assert_close(q, sc, rq, rs, v, static, what=f"{dtype} {b}x{s}x{k}")
    if k > 1:  # the data is not trivial: q spans the range, not only zeros
        assert int(q.abs().max()) >= (127 if static else 100) and (q != 0).float().mean() > 0.5


def _integer_rows(b, s, k, dtype, gen, power=0):
    """Rows whose float sums are exact in any order: an integer mean c plus +-pairs of small integers (an odd
    K has one lane equal to c), times 2**power. Sum = c*K and the squared deviations are small integers."""
    half = k // 2
    a = torch.randint(-8, 9, (b, s, half), generator=gen).float()
    dev = torch.cat([a, -a, torch.zeros(b, s, k - 2 * half)], dim=2)
    dev = torch.gather(dev, 2, torch.argsort(torch.rand(b, s, k, generator=gen), dim=2))  # shuffle the lanes
    c = torch.randint(-20, 21, (b, s, 1), generator=gen).float()
    return ((dev + c) * 2.0 ** power).to(dtype)  # |values| <= 28 * 2**power: exact in bfloat16 too


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("modulate", [True, False], ids=["adaln", "plain"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,s,k,power", [(2, 3, 37, -3), (1, 2, 1152, 0), (2, 1, 300, 4)])
def test_exact_sums_bit_exact(b, s, k, power, dtype, modulate, static):
    gen = torch.Generator().manual_seed(k + power)
    x = _integer_rows(b, s, k, dtype, gen, power)
    shift, scale = _mod(b, k, dtype, gen) if modulate else (None, None)
    act_scale = torch.tensor([0.013]) if static else None
    q, sc, rq, rs, _ = _run(x, shift, scale, act_scale)
    assert torch.equal(q, rq), f"{int((q != rq).sum())} of {q.numel()} q differ"
    assert torch.equal(sc, rs), (sc - rs).abs().max()


def test_modulation_in_float32_with_16_bit_x():
    """shift / scale may be float32 while x is bfloat16 / float16 (adaLN's linear often runs in fp32)."""
    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.bfloat16, torch.float16):
        x = _integer_rows(2, 2, 40, dtype, gen)
        shift, scale = _mod(2, 40, torch.float32, gen)
        for act_scale in (None, torch.tensor([0.03])):
            q, sc, rq, rs, _ = _run(x, shift, scale, act_scale)
            assert torch.equal(q, rq) and torch.equal(sc, rs)
        # the reference really uses the float32 values (not rounded through x's dtype)
        r32 = nq.reference(x, shift, scale, EPS, None)[2]
        r16 = nq.reference(x, shift.to(dtype), scale.to(dtype), EPS, None)[2]
        assert not torch.equal(r32, r16)


def test_each_image_gets_its_own_modulation():
    """Row m = b*S + s uses shift[b], scale[b]: with scale = -1 the normalized part vanishes and y = shift[b]
    exactly, so q is known in closed form (s = 1: every .5 value is a tie, rounded half to even)."""
    b, s, k = 3, 2, 11
    x = _random_x(b, s, k, torch.float32, torch.Generator().manual_seed(0))
    shift = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, 127.0, 3.0, 4.4999995],
                          [1.0] * k, [-2.0] * k])
    scale = torch.full((b, k), -1.0)
    want_rows = [[0, 2, 2, 0, -2, -2, 126, -126, 127, 3, 4], [1] * k, [-2] * k]
    q, sc, rq, rs, _ = _run(x, shift, scale, torch.tensor([1.0]))
    assert q.tolist() == [r for r in want_rows for _ in range(s)]
    assert torch.equal(q, rq)
    q, sc, rq, rs, _ = _run(x, shift, scale, None)  # dynamic: absmax 127 -> s = 1; 1 / 127; 2 / 127
    assert q[:2].tolist() == want_rows[:1] * 2 and (q[2:4] == 127).all() and (q[4:] == -127).all()
    assert torch.equal(q, rq) and torch.equal(sc, rs) and sc[:2].tolist() == [1.0, 1.0]


def test_reference_is_layernorm_then_adaln():
    """The reference's own maths, against torch's LayerNorm in float64 (independent code)."""
    b, s, k = 2, 3, 64
    gen = torch.Generator().manual_seed(1)
    x = _random_x(b, s, k, torch.float32, gen)
    shift, scale = _mod(b, k, torch.float32, gen)
    act = torch.tensor([0.01])
    _, _, v = nq.reference(x, shift, scale, EPS, act)
    ln = torch.nn.functional.layer_norm(x.double(), (k,), eps=EPS)
    y = ln * (1 + scale.double()[:, None, :]) + shift.double()[:, None, :]
    assert torch.allclose(v.double() * 0.01, y.reshape(b * s, k), rtol=1e-5, atol=1e-5)


def test_constant_rows():
    """Variance 0: y = 0 (plain LayerNorm: scale 1, q 0) or y = shift (modulated)."""
    x = torch.full((2, 2, 24), 3.25)
    x[1, 1] = 0.0
    q, sc, rq, rs, _ = _run(x, None, None, None)
    assert (q == 0).all() and (sc == 1).all() and torch.equal(sc, rs)
    shift = torch.linspace(-2, 2, 24).repeat(2, 1)
    q, sc, rq, rs, _ = _run(x, shift, torch.zeros(2, 24), None)
    assert torch.equal(q, rq) and torch.equal(sc, rs)
    assert torch.allclose(sc, torch.full((4,), 2 / 127))


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # NumPy computing inf - inf under the interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite(dtype):
    """A NaN or inf anywhere in x's row makes the whole row's y NaN (the mean is): per-token scale NaN and q 0,
    static q 0. A NaN / inf in shift or scale poisons that feature of that image only: static q follows the
    elementwise contract (NaN -> 0, +-inf -> +-127), per-token rows of that image get scale NaN and q 0."""
    b, s, k = 2, 3, 37
    gen = torch.Generator().manual_seed(9)
    x = _random_x(b, s, k, torch.float32, gen)
    x[0, 0, 4] = NAN
    x[0, 1, 36] = INF  # the last lane, next to the masked tail
    x[0, 2, 0] = -INF
    x = x.to(dtype)
    shift, scale = _mod(b, k, torch.float32, gen)
    for act_scale in (None, torch.tensor([0.02])):
        q, sc, rq, rs, v = _run(x, None, None, act_scale)
        assert (q[:3] == 0).all() and (rq[:3] == 0).all()
        if act_scale is None:
            assert torch.isnan(sc[:3]).all() and not torch.isnan(sc[3:]).any()
        _assert_close(q, sc, rq, rs, v, act_scale is not None)
    xf = _random_x(b, s, k, dtype, gen)
    shift[1, 5], shift[1, 6], scale[1, 7] = INF, -INF, NAN
    q, sc, rq, rs, v = _run(xf, shift.to(dtype), scale.to(dtype), torch.tensor([0.02]))
    assert (q[3:, 5] == 127).all() and (q[3:, 6] == -127).all() and (q[3:, 7] == 0).all()
    _assert_close(q, sc, rq, rs, v, True)
    q, sc, rq, rs, v = _run(xf, shift.to(dtype), scale.to(dtype), None)
    assert torch.isnan(sc[3:]).all() and (q[3:] == 0).all() and not torch.isnan(sc[:3]).any()
    _assert_close(q, sc, rq, rs, v, False)


def test_scales_and_q_fully_written(monkeypatch):
    """Every per-token scale is written: the launcher's own buffers are poisoned (NaN / -128) here too."""
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(-128) if t.dtype == torch.int8 else t.fill_(NAN)

    monkeypatch.setattr(nq.torch, "empty", poisoned_empty)
    gen = torch.Generator().manual_seed(6)
    x = _integer_rows(3, 2, 45, torch.float16, gen).to(DEVICE)
    shift, scale = _dev(*_mod(3, 45, torch.float16, gen))
    q, s = nq.norm_modulate_quantize(x, shift, scale, EPS, None)
    monkeypatch.undo()
    rq, rs, _ = nq.reference(x, shift, scale, EPS, None)
    assert torch.equal(q, rq) and torch.equal(s, rs)


def test_largest_k():
    gen = torch.Generator().manual_seed(7)
    k = nq.MAX_BLOCK_K
    x = _integer_rows(1, 2, k, torch.bfloat16, gen)
    shift, scale = _mod(1, k, torch.float32, gen)
    for act_scale in (None, torch.tensor([0.02])):
        q, sc, rq, rs, _ = _run(x, shift, scale, act_scale)
        assert torch.equal(q, rq) and torch.equal(sc, rs)


def test_static_scale_is_a_copy():
    x = _random_x(1, 2, 32, torch.float32, torch.Generator().manual_seed(2)).to(DEVICE)
    act = torch.tensor([0.05], device=DEVICE)
    _, s = nq.norm_modulate_quantize(x, None, None, EPS, act)
    assert torch.equal(s, act) and s.data_ptr() != act.data_ptr()


def test_empty():
    for shape in ((0, 4, 16), (2, 0, 16)):
        q, s = nq.norm_modulate_quantize(torch.empty(shape, device=DEVICE), None, None, EPS, None)
        assert q.shape == (0, 16) and s.shape == (0,)
    q, s = nq.norm_modulate_quantize(torch.empty(2, 3, 0, device=DEVICE), torch.empty(2, 0, device=DEVICE),
                                     torch.empty(2, 0, device=DEVICE), EPS, None)
    assert q.shape == (6, 0) and s.tolist() == [1.0] * 6  # K = 0: an empty row, like an all-zero one, scale 1


def test_eps_enters_in_float32():
    """eps is rounded to float32 once, in the kernel and the reference alike; a tiny variance shows it."""
    x = _integer_rows(1, 2, 20, torch.float32, torch.Generator().manual_seed(4), power=-12)
    for eps in (1e-6, 0.1, 1e-30, 3):
        q, sc, rq, rs, _ = _run(x, None, None, None, eps=eps)
        assert torch.equal(q, rq) and torch.equal(sc, rs), eps
    q_small = _run(x, None, None, torch.tensor([0.01]), eps=1e-12)[0]
    q_big = _run(x, None, None, torch.tensor([0.01]), eps=1e-4)[0]
    assert not torch.equal(q_small, q_big)  # eps matters at this variance (~2**-24)


def test_errors(monkeypatch):
    x = torch.randn(2, 3, 32)
    sh, sc = torch.randn(2, 32), torch.randn(2, 32)
    f = nq.norm_modulate_quantize
    with pytest.raises(TypeError, match="x must be float16, bfloat16, float32, got int32"):
        f(x.to(torch.int32), None, None, EPS, None)
    with pytest.raises(ValueError, match="x must have 3 dimension"):
        f(x[0], None, None, EPS, None)
    with pytest.raises(ValueError, match="contiguous"):
        f(x.transpose(0, 1), None, None, EPS, None)
    with pytest.raises(ValueError, match="both be given"):
        f(x, sh, None, EPS, None)
    with pytest.raises(ValueError, match="both be given"):
        f(x, None, sc, EPS, None)
    with pytest.raises(ValueError, match=r"shift must be float16, bfloat16, float32 \[B, K\] = \[2, 32\], "
                                         r"got shape \(1, 32\)"):
        f(x, sh[:1], sc, EPS, None)
    with pytest.raises(ValueError, match=r"scale must be float16, bfloat16, float32 \[B, K\] = \[2, 32\]"):
        f(x, sh, sc[:, :31].contiguous(), EPS, None)
    with pytest.raises(ValueError, match="scale must be contiguous"):
        f(x, sh, torch.randn(32, 2).t(), EPS, None)
    with pytest.raises(TypeError, match="scale must be float16, bfloat16, float32, got float64"):
        f(x, sh, sc.double(), EPS, None)
    with pytest.raises(ValueError, match=r"act_scale must be float32 \[1\]"):
        f(x, None, None, EPS, torch.tensor([0.1, 0.2]))
    with pytest.raises(TypeError, match="act_scale must be float32, got float64"):
        f(x, None, None, EPS, torch.tensor([0.1], dtype=torch.float64))
    for eps in (0.0, -1e-6, NAN, INF, 1e-50, 1e39):  # 1e-50 is 0 and 1e39 is inf in float32
        with pytest.raises(ValueError, match="eps must be finite and positive"):
            f(x, None, None, eps, None)
    for eps in (True, "1e-6", torch.tensor(1e-6), None):
        with pytest.raises(TypeError, match="eps must be a real number"):
            f(x, None, None, eps, None)
    with pytest.raises(ValueError, match="exceeds"):
        f(torch.zeros(1, 1, nq.MAX_BLOCK_K + 16), None, None, EPS, None)
    with pytest.raises(ValueError, match="act_scale is on meta but x is on cpu"):
        f(x, None, None, EPS, torch.tensor([0.1], device="meta"))
    with pytest.raises(ValueError, match="shift is on meta but x is on cpu"):
        f(x, sh.to("meta"), sc, EPS, None)
    with pytest.raises(ValueError, match=r"out must be int8 \[B\*S, K\] = \[6, 32\]"):
        f(x, None, None, EPS, None, out=torch.empty(6, 31, dtype=torch.int8))
    with pytest.raises(TypeError, match="out must be int8"):
        f(x, None, None, EPS, None, out=torch.empty(6, 32, dtype=torch.uint8))
    monkeypatch.setattr(interpret, "interpreting", lambda: False)  # as if imported with it off
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1"):
        f(x, None, None, EPS, None)


# ---- the tests above can fail: mutants of the kernel that each drop one safeguard ----------------------

def _mutant(tmp_path, old, new):
    src = open(os.path.join(os.path.dirname(ditq.kernels.__file__), "norm_quantize.py")).read()
    assert src.count(old) == 1, f"the mutation site {old!r} moved: update this probe"
    src = src.replace(old, new).replace("from . import", "from ditq.kernels import")
    src = src.replace("from .interpret import", "from ditq.kernels.interpret import")
    src = src.replace("from .quantize_act import", "from ditq.kernels.quantize_act import")
    path = tmp_path / "mutant_norm_quantize.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"mutant_nq_{abs(hash(str(tmp_path)))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


MUTANTS = {
    # padding lanes hold -mean after centring: summed into the variance they change every y of the row
    "unmasked_variance": ("d = tl.where(mask, x - mean, 0.0)", "d = x - mean"),
    # without other=, the padding lanes of scale read NaN under the fixture: y there is NaN, so the row's
    # per-token scale would be NaN (the absmax and the non-finite count rely on y = 0 on padding lanes)
    "no_other_scale": ("sc = tl.load(scale_ptr + img * K + offs, mask=mask, other=0.0)",
                       "sc = tl.load(scale_ptr + img * K + offs, mask=mask)"),
    # without other=, the padding lanes of x read poison (NaN) under the fixture, undefined on a GPU
    "no_other": ("x = tl.load(x_ptr + row * K + offs, mask=mask, other=0.0)",
                 "x = tl.load(x_ptr + row * K + offs, mask=mask)"),
    # every row modulated with image 0's shift / scale (stays in bounds, unlike a wrong index could)
    "image_index": ("img = row // S", "img = row * 0"),
}


@pytest.mark.skipif(not interpret.interpreting(), reason="mutants are imported as interpreted kernels")
@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_mutants_are_caught(tmp_path, monkeypatch, name):
    mod = _mutant(tmp_path, *MUTANTS[name])
    monkeypatch.setattr(nq, "norm_quantize_kernel", mod.norm_quantize_kernel)
    gen = torch.Generator().manual_seed(11)
    b, s, k = 2, 3, 37  # odd K: a masked tail; B = 2, S = 3: image index and token index differ
    x = _integer_rows(b, s, k, torch.float32, gen)
    shift, scale = _mod(b, k, torch.float32, gen, spread=0.1)
    with pytest.raises(AssertionError):
        q, sc, rq, rs, v = _run(x, shift, scale, None)
        assert torch.equal(q, rq) and torch.equal(sc, rs)
    monkeypatch.undo()
    q, sc, rq, rs, v = _run(x, shift, scale, None)  # the shipped kernel passes the same check
    assert torch.equal(q, rq) and torch.equal(sc, rs)


def test_tie_window_is_narrow():
    """The tolerance of the random-row check admits only values next to a .5 tie."""
    v = torch.tensor([0.5, 2.5000049, 126.49999, 2.4, 0.51, 3.0, 100.502])
    assert _near_tie(v).tolist() == [True, True, True, False, False, False, False]
    assert math.isclose(TIE_REL, 1e-5)

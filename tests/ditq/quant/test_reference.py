"""The reference maths every kernel is tested against must itself be right: property tests against
float64 arithmetic and the error bounds of symmetric rounding."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ditq.format import MAX_GROUP_SIZE
from ditq.quant import reference as ref

settings.register_profile("ditq", max_examples=40, deadline=None)
settings.load_profile("ditq")

shapes = st.tuples(st.integers(1, 9), st.integers(1, 6).map(lambda g: 2 * g))
seeds = st.integers(0, 2**31 - 1)


def _randn(shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


# ---- int4 packing --------------------------------------------------------------------------------------

@given(shapes, seeds)
def test_pack_unpack_int4_round_trip(shape, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, shape, dtype=torch.int8, generator=g)
    packed = ref.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], shape[1] // 2)
    assert torch.equal(ref.unpack_int4(packed), q)


def test_pack_int4_layout_low_nibble_is_even_k():
    q = torch.tensor([[-8, 7, 1, -1]], dtype=torch.int8)
    # k=0 (-8 -> 0x8) low, k=1 (7) high; k=2 (1) low, k=3 (-1 -> 0xF) high
    assert ref.pack_int4(q).tolist() == [[0x78, 0xF1]]


@pytest.mark.parametrize("bad, err", [
    (torch.tensor([[8, 0]], dtype=torch.int8), ValueError),
    (torch.tensor([[-9, 0]], dtype=torch.int8), ValueError),
    (torch.tensor([[1, 2, 3]], dtype=torch.int8), ValueError),
    (torch.tensor([[1, 2]], dtype=torch.int32), TypeError),
])
def test_pack_int4_rejects_bad_input(bad, err):
    with pytest.raises(err):
        ref.pack_int4(bad)


# ---- quantizers ----------------------------------------------------------------------------------------

@given(shapes, seeds, st.floats(1e-3, 1e3))
def test_per_token_error_is_at_most_half_a_step(shape, seed, scale):
    x = _randn(shape, seed, scale)
    q, s = ref.quantize_per_token(x)
    assert q.dtype == torch.int8 and s.shape == (shape[0],)
    assert int(q.abs().max()) <= 127
    err = (q.double() * s.double()[:, None] - x.double()).abs()
    # rint error is s/2; the fp32 product x * (1/s) adds a relative rounding of ~2^-23 of |q| <= 127 steps
    assert bool((err <= s.double()[:, None] * (0.5 + 127 * 2.0 ** -22)).all())
    # the row maximum maps onto the end of the range
    assert bool((q.abs().amax(dim=1) == 127).all())


@given(shapes, seeds)
def test_per_tensor_uses_one_scale_and_reaches_the_range_end(shape, seed):
    x = _randn(shape, seed)
    q, s = ref.quantize_per_tensor(x)
    assert s.shape == (1,)
    assert int(q.abs().max()) == 127
    assert torch.allclose(q.float() * s, x, atol=float(s) * 0.5 * (1 + 1e-5), rtol=0)


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_groupwise_int4_range_scales_and_error(group_size):
    w = _randn((5, 2 * group_size), seed=group_size)
    w[0, 3] = 40.0  # an outlier only spoils its own group
    q, s = ref.quantize_groupwise(w, group_size)
    assert s.shape == (2, 5) and s.dtype == torch.float32
    assert int(q.min()) >= -7 and int(q.max()) <= 7          # quantizer range is [-7, 7]
    assert int(q.abs().max()) == 7
    deq = ref.dequantize_groupwise(q, s, group_size)
    step = s.t().repeat_interleave(group_size, dim=1)
    assert bool(((deq - w).abs() <= step * (0.5 + 1e-5)).all())
    # the outlier's group has a big step, the other group of that row does not
    assert float(s[0, 0]) == pytest.approx(40.0 / 7) and float(s[1, 0]) < 1.0


def test_per_channel_int8_and_zero_rows():
    w = _randn((4, 16), seed=1)
    w[2] = 0.0
    q, s = ref.quantize_per_channel(w)
    assert s[2] == 1.0 and bool((q[2] == 0).all())   # all-zero slice: scale 1, no division by zero
    assert bool((q[[0, 1, 3]].abs().amax(dim=1) == 127).all())


def test_rounding_is_half_to_even():
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -2.5, 127.0]])
    q = ref.quantize_with_scale(x, torch.tensor(1.0), 127)
    assert q.tolist() == [[0, 2, 2, 0, -2, 127]]


def test_clamp_keeps_minus_128_out():
    q = ref.quantize_with_scale(torch.tensor([[-1000.0, 1000.0]]), torch.tensor(1.0), 127)
    assert q.tolist() == [[-127, 127]]


@pytest.mark.parametrize("fn", [ref.quantize_per_token, ref.quantize_per_channel, ref.quantize_per_tensor])
def test_quantizers_reject_integer_input(fn):
    with pytest.raises(TypeError, match="floating-point"):
        fn(torch.ones(2, 4, dtype=torch.int32))


def test_groupwise_rejects_group_that_does_not_divide_k():
    with pytest.raises(ValueError, match="does not divide K = 96"):
        ref.quantize_groupwise(torch.randn(2, 96), 64)


def test_weight_quantizers_reject_wrong_rank():
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        ref.quantize_per_channel(torch.randn(2, 3, 4))


# ---- SQNR ----------------------------------------------------------------------------------------------

def test_sqnr_of_known_signals():
    x = torch.ones(1000)
    assert ref.sqnr(x, x * 1.1) == pytest.approx(20.0)          # noise 0.1² vs 1: 10 log10(100)
    assert ref.sqnr(x, x) == math.inf
    assert ref.sqnr(torch.zeros(4), torch.ones(4)) == -math.inf
    g = torch.Generator().manual_seed(0)
    s = torch.randn(200_000, generator=g, dtype=torch.float64)
    n = torch.randn(200_000, generator=g, dtype=torch.float64) * 0.01
    assert ref.sqnr(s, s + n) == pytest.approx(40.0, abs=0.1)   # power ratio 10^4


def test_sqnr_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="one shape"):
        ref.sqnr(torch.ones(3), torch.ones(4))


def test_int8_sqnr_matches_theory():
    # uniform rounding noise has power step²/12; for a Gaussian at absmax ≈ 4.5σ, SQNR ≈ 10 log10(12 (127/4.5)²)
    x = _randn((64, 4096), seed=3)
    q, s = ref.quantize_per_token(x)
    got = ref.sqnr(x, q.float() * s[:, None])
    absmax_over_sigma = float(x.abs().amax(dim=1).mean())
    expect = 10 * math.log10(12 * (127 / absmax_over_sigma) ** 2)
    assert got == pytest.approx(expect, abs=0.5)


# ---- exact GEMMs ---------------------------------------------------------------------------------------

@given(st.integers(1, 7), st.integers(1, 9), st.integers(1, 4), seeds, st.booleans(), st.booleans())
def test_gemm_w8a8_against_float64(m, n, kb, seed, per_token, with_bias):
    g = torch.Generator().manual_seed(seed)
    k = 16 * kb
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    a_s = torch.rand(m if per_token else 1, generator=g) + 0.01
    w_s = torch.rand(n, generator=g) + 0.01
    bias = torch.randn(n, generator=g) if with_bias else None
    y = ref.gemm_w8a8(a, a_s, w, w_s, bias)
    exact = (a.double() @ w.double().t()) * a_s.double().reshape(-1, 1) * w_s.double()
    if bias is not None:
        exact = exact + bias.double()
    assert torch.allclose(y.double(), exact, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_gemm_w4a8_against_dequantized_float64(group_size):
    g = torch.Generator().manual_seed(group_size)
    m, n, k = 3, 5, 2 * group_size
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    wq = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
    s = torch.rand(k // group_size, n, generator=g) + 0.01
    a_s = torch.rand(m, generator=g)
    bias = torch.randn(n, generator=g)
    y = ref.gemm_w4a8(a, a_s, wq, s, group_size, bias, out_dtype=torch.float32)
    w_deq = wq.double() * s.double().t().repeat_interleave(group_size, dim=1)
    exact = (a.double() * a_s.double()[:, None]) @ w_deq.t() + bias.double()
    assert torch.allclose(y.double(), exact, rtol=1e-5, atol=1e-5)
    exact2, mag = ref.gemm_w4a8_exact(a, a_s, wq, s, group_size, bias)
    assert torch.allclose(exact2, exact, rtol=1e-12, atol=1e-9)
    assert bool((mag >= exact.abs() - 1e-9).all())


def test_gemm_output_dtypes():
    a = torch.randint(-127, 128, (2, 32), dtype=torch.int8)
    w = torch.randint(-127, 128, (3, 32), dtype=torch.int8)
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        assert ref.gemm_w8a8(a, torch.ones(1), w, torch.ones(3), out_dtype=dt).dtype == dt


def test_int32_bound_at_the_largest_k():
    # worst case |a| = 127, |w| = 128 (int4 values x16, or int8 -128) over MAX_K: still inside int32
    assert 127 * 128 * ref.MAX_K < 2**31


def test_int_matmul_is_exact_at_the_extremes():
    # float64 BLAS underneath: exact while |sums| < 2^53; the worst case here is 127 * 128 * MAX_K < 2^31
    a = torch.full((2, ref.MAX_K), 127, dtype=torch.int8)
    w = torch.full((3, ref.MAX_K), -128, dtype=torch.int8)
    w[1, ::2] = 127
    assert torch.equal(ref.int_matmul(a, w), a.long() @ w.long().t())
    g = torch.Generator().manual_seed(5)
    a = torch.randint(-127, 128, (33, 1152), dtype=torch.int8, generator=g)
    w = torch.randint(-128, 128, (17, 1152), dtype=torch.int8, generator=g)
    assert torch.equal(ref.int_matmul(a, w), a.long() @ w.long().t())
    assert torch.equal(ref.group_partials(a, w, 128).sum(0), a.long() @ w.long().t())



@pytest.mark.parametrize("k", [1024, 1040, 3 * 1024 + 16, ref.MAX_K])  # float32 slices of 1024, int32 sums
def test_gemm_w8a8_sums_are_the_int32_sums_at_the_extremes(k):
    """The reference's float32 slices hold every partial sum exactly and their int32 total is exact: the output
    equals the int64 sums scaled as the contract says, bit for bit, with the largest products everywhere (2^24
    per slice of 1024; 127 * 128 * MAX_K in all), and on random values at a ragged K."""
    a = torch.full((3, k), -127, dtype=torch.int8)
    w = torch.full((4, k), -128, dtype=torch.int8)
    a[1, 1::2], w[2, ::3] = 127, 127
    scale, w_scale = torch.tensor([0.37]), torch.rand(4, generator=torch.Generator().manual_seed(3))
    want = (a.long() @ w.long().t()).to(torch.int32).float() * (scale.reshape(-1, 1) * w_scale.reshape(1, -1))
    assert torch.equal(ref.gemm_w8a8(a, scale, w, w_scale), want)
    g = torch.Generator().manual_seed(k)
    a = torch.randint(-127, 128, (5, k), dtype=torch.int8, generator=g)
    w = torch.randint(-128, 128, (7, k), dtype=torch.int8, generator=g)
    want = (a.long() @ w.long().t()).to(torch.int32).float() * (scale.reshape(-1, 1) * w_scale[:1].reshape(1, -1))
    assert torch.equal(ref.gemm_w8a8(a, scale, w, w_scale[:1].expand(7).contiguous()), want)


@pytest.mark.parametrize("group_size", [32, 256])
def test_gemm_w4a8_partials_are_the_int32_partials_at_the_extremes(group_size):
    """The float32 batched matmul and the row blocks give each group's int32 partial exactly, folded in group
    order: bit for bit the int64 partials folded one group at a time (more rows than one block holds)."""
    k, n = 2 * group_size, 3
    m = ref._W4_BLOCK_ELEMENTS // (2 * n) + 5  # two row blocks, the second ragged
    g = torch.Generator().manual_seed(4)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    a[:2] = 127
    w = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
    w[0] = -8
    scales, a_scale = torch.rand(2, n, generator=g), torch.rand(m, generator=g)
    p = ref.group_partials(a, w, group_size).to(torch.int32).float()
    want = (p[0] * scales[0] + p[1] * scales[1]) * a_scale.reshape(-1, 1)
    assert torch.equal(ref.gemm_w4a8(a, a_scale, w, scales, group_size), want)


@pytest.mark.parametrize("group_size", [2048, MAX_GROUP_SIZE])
def test_gemm_w4a8_groups_beyond_exact_float32_partials(group_size):
    """Groups past 1024 (canonical up to MAX_GROUP_SIZE, so the torch backend takes them): an int4 partial is at
    most 128 * 8 * group_size <= 2^24, so the float32 partials are still exact, at the extremes too."""
    k, n = ref.MAX_K, 3
    g = torch.Generator().manual_seed(5)
    a = torch.randint(-127, 128, (4, k), dtype=torch.int8, generator=g)
    a[:2] = 127  # rows at the extremes: with w[0] = -8, partials of 127 * 8 * group_size (float32 spacing 1..2 there)
    w = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
    w[0] = -8
    scales, a_scale = torch.rand(k // group_size, n, generator=g), torch.rand(4, generator=g)
    p = ref.group_partials(a, w, group_size).to(torch.int32).float()
    want = p[0] * scales[0]
    for i in range(1, k // group_size):
        want += p[i] * scales[i]
    got = ref.gemm_w4a8(a, a_scale, w, scales, group_size)
    assert p.abs().max() == 127 * 8 * group_size and torch.equal(got, want * a_scale.reshape(-1, 1))

# ---- fused GEMM epilogues -----------------------------------------------------------------------------

def test_gelu_tanh_is_diffusers_gelu_and_close_to_float64():
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(7)
    y = torch.cat([torch.randn(20000, generator=g) * 4, torch.tensor([0.0, -0.0, 1e-30, -40.0, 40.0])])
    out = ref.gelu_tanh(y)
    # torch's own kernel evaluates the same formula, vectorised: only tanh's last bits may differ
    torch.testing.assert_close(out, F.gelu(y, approximate="tanh"), rtol=1e-5, atol=1e-6)
    y64 = y.double()
    exact = 0.5 * y64 * (1 + torch.tanh(0.7978845608028654 * (y64 + 0.044715 * y64 ** 3)))
    # 1 + tanh is only absolutely accurate in fp32: the error bound scales with |y| (gemm_epilogue_exact)
    assert bool(((out.double() - exact).abs() <= 4 * 2.0 ** -24 * (y64.abs() + exact.abs())).all())


@pytest.mark.parametrize("gelu", (False, True), ids=("no-gelu", "gelu"))
@pytest.mark.parametrize("gated", (False, True), ids=("no-gate", "gate"))
@pytest.mark.parametrize("with_residual", (False, True), ids=("no-residual", "residual"))
def test_gemm_epilogue_against_float64(gelu, gated, with_residual):
    from ditq.testing import assert_matches_exact, random_int8

    g = torch.Generator().manual_seed(11 + 2 * gelu + 4 * gated + 8 * with_residual)
    m, n, k, rows = 6, 7, 48, 3
    a, w = random_int8(m, k, generator=g), random_int8(n, k, generator=g)
    a_s, w_s = torch.rand(m, generator=g) / 100 + 1e-3, torch.rand(n, generator=g) / 100 + 1e-3
    bias = torch.randn(n, generator=g)
    gate = torch.randn(m // rows, n, generator=g) if gated else None
    res = torch.randn(m, n, generator=g) if with_residual else None
    out = ref.gemm_w8a8_fused(a, a_s, w, w_s, bias, gelu, gate, res, rows, None, torch.float32)
    exact, mag = ref.gemm_epilogue_exact(*ref.gemm_w8a8_exact(a, a_s, w, w_s, bias), gelu, gate, res, rows)
    assert_matches_exact(out, exact, mag, fp32_ops=8, what="fused epilogue")
    # the tolerance is tight: one wrong piece (the gate of the wrong sample) fails it
    if gated and m // rows > 1:
        wrong = ref.gemm_w8a8_fused(a, a_s, w, w_s, bias, gelu, gate.flip(0), res, rows, None, torch.float32)
        with pytest.raises(AssertionError):
            assert_matches_exact(wrong, exact, mag, fp32_ops=8)


def test_gemm_epilogue_without_pieces_is_the_plain_cast_and_int8_is_quantize_with_scale():
    g = torch.Generator().manual_seed(3)
    y = torch.randn(5, 9, generator=g) * 30
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(ref.gemm_epilogue(y, out_dtype=dt), y.to(dt))
    y[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    s = torch.tensor([0.05])
    q = ref.gemm_epilogue(y, out_scale=s, out_dtype=torch.bfloat16)
    assert q.dtype == torch.int8 and torch.equal(q, ref.quantize_with_scale(y, s, 127))
    assert q[0, :3].tolist() == [0, 127, -127]

"""The op seam: schemas, fake implementations and the validation every backend shares."""
import pytest
import torch

import ditq  # noqa: F401  (registers torch.ops.ditq)
from ditq.quant import reference as ref
from ditq.testing import assert_gemm_w4a8, assert_gemm_w8a8, random_int4, random_int8


def _w8_args(m=3, n=5, k=32, per_token=True):
    return (random_int8(m, k), torch.rand(m if per_token else 1) + 0.1, random_int8(n, k), torch.rand(n) + 0.1,
            torch.randn(n))


def _w4_args(m=3, n=5, k=128, g=64):
    wq = random_int4(n, k)
    return (random_int8(m, k), torch.rand(m) + 0.1, ref.pack_int4(wq), torch.rand(k // g, n) + 0.1,
            torch.randn(n)), wq


def test_torch_backend_through_the_ops_matches_the_exact_reference():
    a, a_s, w, w_s, b = _w8_args()
    assert_gemm_w8a8(torch.ops.ditq.gemm_w8a8(a, a_s, w, w_s, b, torch.float32, "torch"), a, a_s, w, w_s, b)
    (a, a_s, w, w_s, b), wq = _w4_args()
    y = torch.ops.ditq.gemm_w4a8(a, a_s, w, w_s, b, 64, torch.bfloat16, "torch")
    assert y.dtype == torch.bfloat16
    assert_gemm_w4a8(y, a, a_s, wq, w_s, 64, b)


def test_opcheck_schemas_and_fake_impls():
    a, a_s, w, w_s, b = _w8_args()
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.ditq.gemm_w8a8.default, (a, a_s, w, w_s, b, torch.float16, "torch"),
                          test_utils=checks)
    (a, a_s, w, w_s, b), _ = _w4_args()
    torch.library.opcheck(torch.ops.ditq.gemm_w4a8.default, (a, a_s, w, w_s, None, 64, torch.float32, "torch"),
                          test_utils=checks)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.ditq.quantize_act.default, (x, None, "torch"), test_utils=checks)
    torch.library.opcheck(torch.ops.ditq.quantize_act.default, (x, torch.tensor([0.05]), "torch"),
                          test_utils=checks)


def test_quantize_act_static_and_dynamic_match_the_reference():
    x = torch.randn(5, 24, dtype=torch.float16)
    q, s = torch.ops.ditq.quantize_act(x, None, "torch")
    q_ref, s_ref = ref.quantize_per_token(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    scale = torch.tensor([0.01])
    q, s = torch.ops.ditq.quantize_act(x, scale, "torch")
    assert torch.equal(q, ref.quantize_with_scale(x, scale, 127)) and torch.equal(s, scale)


@pytest.mark.parametrize("mutate, err, msg", [
    (lambda a: a.__setitem__(0, a[0].float()), TypeError, "a must be int8"),
    (lambda a: a.__setitem__(2, a[2][:, :16].contiguous()), ValueError, "w must be \\[N, K\\]"),
    (lambda a: a.__setitem__(1, torch.rand(2)), ValueError, "a_scale must be float32 \\[1\\]"),
    (lambda a: a.__setitem__(1, a[1].double()), TypeError, "a_scale must be float32"),
    (lambda a: a.__setitem__(3, torch.rand(4)), ValueError, "w_scale must be float32 \\[N\\]"),
    (lambda a: a.__setitem__(4, torch.randn(7)), ValueError, "bias must have shape"),
    (lambda a: a.__setitem__(0, random_int8(32, 3).t()), ValueError, "contiguous"),
])
def test_gemm_w8a8_errors(mutate, err, msg):
    args = list(_w8_args())
    mutate(args)
    with pytest.raises(err, match=msg):
        torch.ops.ditq.gemm_w8a8(*args, torch.float32, "torch")


def test_gemm_w8a8_rejects_int_out_dtype_and_k_beyond_max_k():
    with pytest.raises(TypeError, match="out_dtype"):
        torch.ops.ditq.gemm_w8a8(*_w8_args(), torch.int32, "torch")
    k = ref.MAX_K + 16
    with pytest.raises(ValueError, match="the K ditq's int8 GEMMs take"):
        torch.ops.ditq.gemm_w8a8(random_int8(1, k), torch.ones(1), random_int8(2, k), torch.ones(2), None,
                                 torch.float32, "torch")


@pytest.mark.parametrize("group_size, msg", [(48, "group_size must be a power of two"), (256, "must be a multiple of group_size 256")])
def test_gemm_w4a8_group_size_errors(group_size, msg):
    (a, a_s, w, _, b), _ = _w4_args()
    with pytest.raises(ValueError, match=msg):
        torch.ops.ditq.gemm_w4a8(a, a_s, w, torch.rand(1, 5), b, group_size, torch.float32, "torch")


def test_gemm_w4a8_shape_errors():
    (a, a_s, w, w_s, b), _ = _w4_args()
    with pytest.raises(ValueError, match=r"w_scale must be \[K // group_size, N\]"):
        torch.ops.ditq.gemm_w4a8(a, a_s, w, w_s[:1], b, 64, torch.float32, "torch")
    with pytest.raises(ValueError, match=r"w must be uint8 \[N, K // 2\]"):
        torch.ops.ditq.gemm_w4a8(a, a_s, w[:4], w_s, b, 64, torch.float32, "torch")
    with pytest.raises(TypeError, match="w must be uint8"):
        torch.ops.ditq.gemm_w4a8(a, a_s, w.view(torch.int8), w_s, b, 64, torch.float32, "torch")


def test_quantize_act_errors():
    with pytest.raises(TypeError, match="x must be float16, bfloat16, float32"):
        torch.ops.ditq.quantize_act(torch.ones(2, 4, dtype=torch.int8), None, "torch")
    with pytest.raises(ValueError, match="x must be 2-D"):
        torch.ops.ditq.quantize_act(torch.ones(2, 4, 4), None, "torch")
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.ditq.quantize_act(torch.ones(4, 2).t(), None, "torch")
    with pytest.raises(ValueError, match="static scale must be float32 \\[1\\]"):
        torch.ops.ditq.quantize_act(torch.ones(2, 4), torch.ones(2), "torch")


# ---- GEMMs with a fused epilogue -------------------------------------------------------------------------

def _fused_pieces(m, n, rows, gelu, gated, with_residual, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(m // rows, n, generator=g).to(dtype) if gated else None
    res = torch.randn(m, n, generator=g).to(dtype) if with_residual else None
    return gelu, gate, res, rows


def _w8_fused_inputs(m=6, n=7, k=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (random_int8(m, k, generator=g), torch.rand(m, generator=g) / 50 + 1e-3, random_int8(n, k, generator=g),
            torch.rand(n, generator=g) / 50 + 1e-3, torch.randn(n, generator=g))


@pytest.mark.parametrize("out_dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("bits", (8, 4))
def test_fused_without_pieces_equals_the_plain_op_bit_for_bit(bits, out_dtype):
    for per_token, bias in ((True, True), (False, False)):
        if bits == 8:
            a, a_s, w, w_s, b = _w8_args(m=5, n=7, k=48, per_token=per_token)
            b = b if bias else None
            plain = torch.ops.ditq.gemm_w8a8(a, a_s, w, w_s, b, out_dtype, "torch")
            fused = torch.ops.ditq.gemm_w8a8_fused(a, a_s, w, w_s, b, False, None, None, 1, None, out_dtype, "torch")
        else:
            (a, a_s, w, w_s, b), _ = _w4_args(m=5, n=7, k=128, g=32)
            a_s, b = (a_s if per_token else a_s[:1]), (b if bias else None)
            plain = torch.ops.ditq.gemm_w4a8(a, a_s, w, w_s, b, 32, out_dtype, "torch")
            fused = torch.ops.ditq.gemm_w4a8_fused(a, a_s, w, w_s, b, 32, False, None, None, 1, None, out_dtype,
                                                   "torch")
        assert fused.dtype == out_dtype and torch.equal(fused, plain)


@pytest.mark.parametrize("gelu, gated, with_residual", [
    (True, False, False), (False, True, False), (False, False, True), (False, True, True), (True, True, True)],
    ids=("gelu", "gate", "residual", "gate-residual", "all"))
@pytest.mark.parametrize("out_dtype", (torch.float32, torch.bfloat16))
def test_fused_pieces_against_a_float64_composition(gelu, gated, with_residual, out_dtype):
    from ditq.testing import assert_matches_exact

    m, n, rows = 6, 7, 2
    a, a_s, w, w_s, b = _w8_fused_inputs(m, n)
    pieces = _fused_pieces(m, n, rows, gelu, gated, with_residual, out_dtype, seed=5)
    y = torch.ops.ditq.gemm_w8a8_fused(a, a_s, w, w_s, b, *pieces, None, out_dtype, "torch")
    exact, mag = ref.gemm_epilogue_exact(*ref.gemm_w8a8_exact(a, a_s, w, w_s, b), *pieces)
    assert y.dtype == out_dtype
    assert_matches_exact(y, exact, mag, fp32_ops=8, what="W8A8 fused")
    (a, a_s, w, w_s, b), wq = _w4_args(m=m, n=n, k=128, g=64)
    y = torch.ops.ditq.gemm_w4a8_fused(a, a_s, w, w_s, b, 64, *pieces, None, out_dtype, "torch")
    exact, mag = ref.gemm_epilogue_exact(*ref.gemm_w4a8_exact(a, a_s, wq, w_s, 64, b), *pieces)
    assert_matches_exact(y, exact, mag, fp32_ops=12, what="W4A8 fused")


@pytest.mark.parametrize("gelu, gated, with_residual", [(True, False, False), (False, True, True)],
                         ids=("gelu", "gate-residual"))
def test_fused_int8_output_is_quantize_act_of_the_fp32_output(gelu, gated, with_residual):
    m, n, rows = 6, 7, 3
    a, a_s, w, w_s, b = _w8_fused_inputs(m, n, seed=1)
    a_s[2] = float("nan")  # a non-finite row quantizes to 0, as quantize_act's static contract says
    pieces = _fused_pieces(m, n, rows, gelu, gated, with_residual, torch.float32, seed=2)
    out_scale = torch.tensor([0.004])
    y = torch.ops.ditq.gemm_w8a8_fused(a, a_s, w, w_s, b, *pieces, None, torch.float32, "torch")
    q = torch.ops.ditq.gemm_w8a8_fused(a, a_s, w, w_s, b, *pieces, out_scale, torch.float32, "torch")
    q_ref, _ = torch.ops.ditq.quantize_act(y, out_scale, "torch")
    assert q.dtype == torch.int8 and torch.equal(q, q_ref)
    assert q[2].eq(0).all() and q.abs().max() == 127 and q.ne(0).sum() > m * n // 2
    (a, a_s, w, w_s, b), _ = _w4_args(m=m, n=n, k=128, g=32)
    y = torch.ops.ditq.gemm_w4a8_fused(a, a_s, w, w_s, b, 32, *pieces, None, torch.float32, "torch")
    q = torch.ops.ditq.gemm_w4a8_fused(a, a_s, w, w_s, b, 32, *pieces, out_scale, torch.float32, "torch")
    assert q.dtype == torch.int8 and torch.equal(q, torch.ops.ditq.quantize_act(y, out_scale, "torch")[0])


def test_fused_kernel_ops_of_the_torch_backend():
    from ditq import backends

    ops = backends.get_backend("torch").kernel_ops()
    a, a_s, w, w_s, b = _w8_fused_inputs()
    gate = torch.randn(3, 7)
    got = ops.gemm_w8a8_fused(a, a_s, w, w_s, b, True, gate, None, 2, None, torch.float32)
    assert torch.equal(got, ref.gemm_w8a8_fused(a, a_s, w, w_s, b, True, gate, None, 2, None, torch.float32))
    assert ops.gemm_w4a8_fused is not None


def test_opcheck_fused_schemas_and_fake_impls():
    checks = ("test_schema", "test_faketensor")
    a, a_s, w, w_s, b = _w8_fused_inputs()
    # a float output here, an int8 one (out_scale) for W4A8 below
    torch.library.opcheck(torch.ops.ditq.gemm_w8a8_fused.default,
                          (a, a_s, w, w_s, b, True, torch.randn(3, 7), torch.randn(6, 7, dtype=torch.float16),
                           2, None, torch.float16, "torch"), test_utils=checks)
    (a, a_s, w, w_s, b), _ = _w4_args(m=6, n=7, k=128, g=64)
    torch.library.opcheck(torch.ops.ditq.gemm_w4a8_fused.default,
                          (a, a_s, w, w_s, None, 64, False, None, torch.randn(6, 7), 1, torch.tensor([0.1]),
                           torch.float32, "torch"), test_utils=checks)
    with torch.device("meta"):
        y = torch.ops.ditq.gemm_w8a8_fused(a.to("meta"), a_s.to("meta"), torch.empty(9, 128, dtype=torch.int8),
                                           torch.empty(9), None, False, None, None, 1, torch.empty(1),
                                           torch.bfloat16, "torch")
    assert y.shape == (6, 9) and y.dtype == torch.int8


def _fused_call(**overrides):
    a, a_s, w, w_s, b = _w8_fused_inputs()
    kw = dict(gelu=False, gate=torch.randn(3, 7), residual=torch.randn(6, 7), rows_per_gate=2,
              out_scale=None, out_dtype=torch.float32)
    kw.update(overrides)
    return lambda: torch.ops.ditq.gemm_w8a8_fused(a, a_s, w, w_s, b, kw["gelu"], kw["gate"], kw["residual"],
                                                  kw["rows_per_gate"], kw["out_scale"], kw["out_dtype"], "torch")


@pytest.mark.parametrize("overrides, err, msg", [
    (dict(rows_per_gate=0), ValueError, "rows_per_gate must be an int >= 1"),
    (dict(rows_per_gate=4), ValueError, "M = 6 must be a multiple of rows_per_gate = 4"),
    (dict(rows_per_gate=3), ValueError, r"gate must be \[M // rows_per_gate, N\] = \[2, 7\]"),
    (dict(gate=torch.randn(3, 7).to(torch.int32)), TypeError, "gate must be float16, bfloat16, float32"),
    (dict(gate=torch.randn(7, 3).t()), ValueError, "gate must be contiguous"),
    (dict(residual=torch.randn(6, 7, dtype=torch.float16)), TypeError, "residual must be float32"),
    (dict(residual=torch.randn(6, 8)), ValueError, r"residual must be \[M, N\] = \[6, 7\]"),
    (dict(residual=torch.randn(7, 6).t()), ValueError, "residual must be contiguous"),
    (dict(out_scale=torch.tensor([0.1, 0.2])), ValueError, r"out_scale must be a static scale, float32 \[1\]"),
    (dict(out_scale=torch.tensor([1], dtype=torch.float64)), TypeError, "out_scale must be float32"),
    (dict(out_scale=torch.tensor([0.0])), ValueError, "out_scale must be positive and finite"),
    (dict(out_scale=torch.tensor([float("inf")])), ValueError, "out_scale must be positive and finite"),
    (dict(out_scale=torch.tensor([float("nan")])), ValueError, "out_scale must be positive and finite"),
    (dict(residual=torch.randn(6, 7, device="meta")), ValueError, "residual is on meta"),
], ids=("rows-zero", "rows-not-dividing-m", "gate-rows", "gate-dtype", "gate-strided", "residual-dtype",
        "residual-shape", "residual-strided", "out-scale-shape", "out-scale-dtype", "out-scale-zero",
        "out-scale-inf", "out-scale-nan", "residual-device"))
def test_fused_bad_inputs_are_refused(overrides, err, msg):
    with pytest.raises(err, match=msg):
        _fused_call(**overrides)()


def test_fused_w4a8_checks_the_gemm_and_the_epilogue():
    (a, a_s, w, w_s, b), _ = _w4_args(m=6, n=5, k=128, g=64)
    with pytest.raises(ValueError, match="group_size must be a power of two"):
        torch.ops.ditq.gemm_w4a8_fused(a, a_s, w, w_s, b, 48, False, None, None, 1, None, torch.float32, "torch")
    with pytest.raises(ValueError, match=r"gate must be \[M // rows_per_gate, N\] = \[3, 5\]"):
        torch.ops.ditq.gemm_w4a8_fused(a, a_s, w, w_s, b, 64, False, torch.randn(3, 7), None, 2, None,
                                       torch.float32, "torch")

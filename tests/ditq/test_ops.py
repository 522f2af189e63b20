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


def test_gemm_w8a8_rejects_int_out_dtype_and_k_beyond_the_int32_bound():
    with pytest.raises(TypeError, match="out_dtype"):
        torch.ops.ditq.gemm_w8a8(*_w8_args(), torch.int32, "torch")
    k = ref.MAX_K + 16
    with pytest.raises(ValueError, match="overflow"):
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

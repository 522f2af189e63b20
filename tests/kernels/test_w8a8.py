"""W8A8 GEMM kernel under the interpreter (or on a GPU), against the exact integer reference."""
import pytest
import torch

from ditq.kernels import interpret, w8a8
from ditq.testing import assert_gemm_w8a8, random_int8

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter (tests/conftest.py)
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Interpreter tiles (configs/w8a8_interpreter.json): BK = 32, BN = 16, BM = 16 (M <= 16) or 32.
# M = 1 / odd / > BM; N not a multiple of BN; K a multiple of 16 but not of BK.
SHAPES = ((1, 17, 48), (7, 33, 80), (37, 19, 48))
# Every code path: the table's choice, and forced pointer / TMA x plain / swapped operands.
CONFIGS = {
    "ptr": dict(BM=16, BN=16, BK=32, GROUP_M=2, SWAP_AB=False, USE_TMA=False, num_warps=1, num_stages=1),
    "ptr-swap": dict(BM=16, BN=32, BK=32, GROUP_M=2, SWAP_AB=True, USE_TMA=False, num_warps=1, num_stages=1),
    "tma": dict(BM=32, BN=16, BK=32, GROUP_M=2, SWAP_AB=False, USE_TMA=True, num_warps=1, num_stages=1),
    "tma-swap": dict(BM=16, BN=16, BK=32, GROUP_M=2, SWAP_AB=True, USE_TMA=True, num_warps=1, num_stages=1),
}


def _inputs(m, n, k, per_token, bias, seed):
    g = torch.Generator().manual_seed(seed)
    a, w = random_int8(m, k, generator=g), random_int8(n, k, generator=g)
    a_scale = (torch.rand(m if per_token else 1, generator=g) + 0.05) / 127
    w_scale = (torch.rand(n, generator=g) + 0.05) / 127
    b = torch.randn(n, generator=g) if bias else None
    return tuple(t if t is None else t.to(DEVICE) for t in (a, a_scale, w, w_scale, b))


def _run(m, n, k, out_dtype, per_token, bias, config=None, seed=0):
    a, a_scale, w, w_scale, b = _inputs(m, n, k, per_token, bias, seed)
    out = torch.full((m, n), float("nan"), dtype=out_dtype, device=DEVICE)  # every element must be written
    y = w8a8.gemm_w8a8(a, a_scale, w, w_scale, b, out_dtype, out=out, config=config)
    assert y.data_ptr() == out.data_ptr() and y.dtype == out_dtype
    assert_gemm_w8a8(y, a, a_scale, w, w_scale, b)


@pytest.mark.parametrize("per_token", (True, False), ids=("per-token", "static"))
@pytest.mark.parametrize("bias", (True, False), ids=("bias", "no-bias"))
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_table_config(m, n, k, out_dtype, bias, per_token):
    _run(m, n, k, out_dtype, per_token, bias, seed=m * 1000 + n + k)


@pytest.mark.gpu  # also run on the GPU by benchmarks/gpu_suite.sh: code paths the GPU tables do not pick
@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_every_code_path(m, n, k, name):
    _run(m, n, k, torch.bfloat16, per_token=True, bias=True, config=CONFIGS[name], seed=m + n + k)
    _run(m, n, k, torch.float16, per_token=False, bias=False, config=CONFIGS[name], seed=m * n + k)


def test_int32_accumulation_at_the_largest_k():
    # |sum| = 32768 * 127 * 128 = 5.3e8: beyond fp32's exact integers (2**24), inside int32.
    k = w8a8.MAX_K
    assert k == 32768
    a = torch.full((1, k), -127, dtype=torch.int8)
    a[0, ::3] = 127
    w = torch.full((3, k), -128, dtype=torch.int8)
    w[1] = 127
    w[2, 1::2] = 5
    cfg = dict(BM=16, BN=16, BK=1024, GROUP_M=2, SWAP_AB=False, USE_TMA=False, num_warps=1, num_stages=1)
    a, w, ones1, ones3 = a.to(DEVICE), w.to(DEVICE), torch.ones(1, device=DEVICE), torch.ones(3, device=DEVICE)
    out = torch.full((1, 3), float("nan"), device=DEVICE)
    y = w8a8.gemm_w8a8(a, ones1, w, ones3, None, torch.float32, out=out, config=cfg)
    assert_gemm_w8a8(y, a, ones1, w, ones3)


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's table")
def test_launcher_uses_the_table():
    assert w8a8.kernel_config(1, "cpu")["BM"] == 16
    assert w8a8.kernel_config(17, "cpu")["BM"] == 32


def test_errors(monkeypatch):
    """Every input the kernel cannot take is refused by the launcher, by name, before Triton sees it."""
    a, a_scale, w, w_scale, b = (t.cpu() for t in _inputs(4, 8, 32, True, True, seed=3))
    f32 = torch.float32
    bad = [
        (TypeError, "a must be int8, got float32", lambda: w8a8.gemm_w8a8(a.float(), a_scale, w, w_scale)),
        (TypeError, "a must be a torch.Tensor", lambda: w8a8.gemm_w8a8(a.numpy(), a_scale, w, w_scale)),
        (ValueError, "a must have 2 dimension", lambda: w8a8.gemm_w8a8(a[None], a_scale, w, w_scale)),
        (TypeError, "w must be int8, got uint8", lambda: w8a8.gemm_w8a8(a, a_scale, w.to(torch.uint8), w_scale)),
        (ValueError, "a must be contiguous",
         lambda: w8a8.gemm_w8a8(torch.randint(-5, 5, (32, 4), dtype=torch.int8).t(), a_scale, w, w_scale)),
        (ValueError, r"w must be int8 \[N, K\] = \[\*, 32\]",
         lambda: w8a8.gemm_w8a8(a, a_scale, w[:, :16].contiguous(), w_scale)),
        (ValueError, "multiple of 16",
         lambda: w8a8.gemm_w8a8(a[:, :24].contiguous(), a_scale, w[:, :24].contiguous(), w_scale)),
        (ValueError, "exceeds 32768", lambda: w8a8.gemm_w8a8(torch.zeros(1, 32784, dtype=torch.int8), a_scale[:1],
                                                              torch.zeros(2, 32784, dtype=torch.int8), w_scale[:2])),
        (ValueError, r"a_scale must be float32 \[1\] or \[M\]", lambda: w8a8.gemm_w8a8(a, a_scale[:3], w, w_scale)),
        (TypeError, "a_scale must be float32, got float64", lambda: w8a8.gemm_w8a8(a, a_scale.double(), w, w_scale)),
        (ValueError, "a_scale must be contiguous",
         lambda: w8a8.gemm_w8a8(a, torch.rand(8)[::2], w, w_scale)),
        (ValueError, r"w_scale must be float32 \[N\] = \[8\]", lambda: w8a8.gemm_w8a8(a, a_scale, w, w_scale[:5])),
        (ValueError, r"bias must be float16, bfloat16, float32 \[N\] = \[8\]",
         lambda: w8a8.gemm_w8a8(a, a_scale, w, w_scale, b[:3])),
        (TypeError, "bias must be float16, bfloat16, float32",
         lambda: w8a8.gemm_w8a8(a, a_scale, w, w_scale, b.to(torch.int32))),
        (TypeError, "out_dtype", lambda: w8a8.gemm_w8a8(a, a_scale, w, w_scale, None, torch.int32)),
        (TypeError, "out must be float32",
         lambda: w8a8.gemm_w8a8(a, a_scale, w, w_scale, None, f32, out=torch.empty(4, 8, dtype=torch.float16))),
        (ValueError, "out must be contiguous",
         lambda: w8a8.gemm_w8a8(a, a_scale, w, w_scale, None, f32, out=torch.empty(8, 4).t())),
        (ValueError, "w_scale is on meta but a is on cpu",
         lambda: w8a8.gemm_w8a8(a, a_scale, w, w_scale.to("meta"))),
        (ValueError, "lacks", lambda: w8a8.gemm_w8a8(a, a_scale, w, w_scale, config={"BM": 16})),
        (ValueError, "BK must be a power of two",
         lambda: w8a8.gemm_w8a8(a, a_scale, w, w_scale, config=dict(CONFIGS["ptr"], BK=24))),
    ]
    for exc, msg, call in bad:
        with pytest.raises(exc, match=msg):
            call()
    monkeypatch.setattr(interpret, "interpreting", lambda: False)  # as if imported with it off
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1 before importing triton or diffusers"):
        w8a8.gemm_w8a8(a, a_scale, w, w_scale)

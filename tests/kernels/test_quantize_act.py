"""Activation quantization kernel: bit-exact against ditq.quant.reference (same q, same scales)."""
import pytest
import torch

from ditq.kernels import interpret, quantize_act as qa
from ditq.quant import reference as ref

pytestmark = pytest.mark.gpu  # also run on the GPU by benchmarks/gpu_suite.sh
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter (tests/conftest.py)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SHAPES = ((1, 16), (5, 300), (33, 1152))  # M = 1, odd M and K (K not a power of two: masked tail)


def _input(m, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 10).to(dtype)
    if m > 2:
        x[1] = 0  # an all-zero row: scale 1, q 0
    return x


def _check(x, scale):
    x, scale = x.to(DEVICE), None if scale is None else scale.to(DEVICE)
    q_out = torch.full(x.shape, -128, dtype=torch.int8, device=DEVICE)  # poisoned: the kernel never writes -128
    q, s = qa.quantize_act(x, scale, out=q_out)
    if scale is None:
        rq, rs = ref.quantize_per_token(x)
    else:
        rq, rs = ref.quantize_with_scale(x, scale, ref.INT8_QMAX), scale
    assert q.data_ptr() == q_out.data_ptr()
    assert torch.equal(q, rq), f"{int((q != rq).sum())} of {q.numel()} values differ"
    assert s.dtype == torch.float32 and torch.equal(s, rs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k", SHAPES)
def test_per_token_bit_exact(m, k, dtype):
    _check(_input(m, k, dtype, seed=m * 7 + k), None)


def test_the_widest_row():
    """K = 24576 (FLUX.2-dev's single-block output projection; the GEMMs take up to 32768): one program holds the
    row, masked past K in its 32768-wide block."""
    _check(_input(3, 24576, torch.bfloat16, seed=5), None)
    x = _input(2, qa.MAX_BLOCK_K, torch.float32, seed=6)
    _check(x, torch.tensor([float(x.abs().max()) / 127 * 0.5]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k", SHAPES)
def test_static_bit_exact(m, k, dtype):
    x = _input(m, k, dtype, seed=m + k)
    scale = torch.tensor([float(x.float().abs().max()) / 127 * 0.6])  # 40% of the values clamp at +-127
    _check(x, scale)


def test_ties_round_half_to_even():
    # absmax 127 gives s = 1 exactly, so these x are exact .5 ties: rint must give the even neighbour.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 126.5, -126.5, 4.4999995, 0.0]])
    q, s = qa.quantize_act(x.to(DEVICE))
    assert s.item() == 1.0
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 4, 126, -126, 4, 0]]
    _check(x, None)
    _check(x * 3, torch.tensor([3.0]))


def test_scale_is_a_copy():
    x = _input(3, 32, torch.float32, seed=0)
    scale = torch.tensor([0.05], device=DEVICE)
    _, s = qa.quantize_act(x.to(DEVICE), scale)
    assert torch.equal(s, scale) and s.data_ptr() != scale.data_ptr()


def test_errors(monkeypatch):
    x = _input(4, 32, torch.float32, seed=1)
    with pytest.raises(TypeError, match="x must be float16, bfloat16, float32, got int32"):
        qa.quantize_act(x.to(torch.int32))
    with pytest.raises(ValueError, match="x must have 2 dimension"):
        qa.quantize_act(x[None])
    with pytest.raises(ValueError, match="contiguous"):
        qa.quantize_act(x.t())
    with pytest.raises(ValueError, match=r"static scale must be float32 \[1\]"):
        qa.quantize_act(x, torch.tensor([0.1, 0.2]))
    with pytest.raises(TypeError, match="static scale must be float32, got float64"):
        qa.quantize_act(x, torch.tensor([0.1], dtype=torch.float64))
    with pytest.raises(ValueError, match="static scale is on meta but x is on cpu"):
        qa.quantize_act(x, torch.tensor([0.1], device="meta"))
    with pytest.raises(ValueError, match="exceeds"):
        qa.quantize_act(torch.zeros(1, qa.MAX_BLOCK_K + 16))
    with pytest.raises(ValueError, match=r"out must be int8 \[M, K\] = \[4, 32\]"):
        qa.quantize_act(x, out=torch.empty(4, 31, dtype=torch.int8))
    with pytest.raises(TypeError, match="out must be int8"):
        qa.quantize_act(x, out=torch.empty(4, 32, dtype=torch.uint8))
    monkeypatch.setattr(interpret, "interpreting", lambda: False)  # as if imported with it off
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1 before importing triton or diffusers"):
        qa.quantize_act(x)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_inf_per_token(dtype):
    """A row holding any NaN or +-inf gets scale NaN and q all 0 (the GEMM row then becomes NaN, never a
    plausible wrong number); an all-zero row keeps scale 1 and q 0; finite rows are unaffected."""
    x = torch.randn(6, 37, generator=torch.Generator().manual_seed(5)) * 3
    x[0, 3] = NAN
    x[1, 36] = INF  # in the last lane, past the previous power of two: the masked tail's neighbour
    x[2, 0] = -INF
    x[3] = 0.0
    x[4, 1], x[4, 2], x[4, 3] = NAN, INF, -INF  # mixed
    x = x.to(dtype).to(DEVICE)
    q_out = torch.full(x.shape, -128, dtype=torch.int8, device=DEVICE)
    q, s = qa.quantize_act(x, None, out=q_out)
    s, q = s.cpu(), q.cpu()
    assert torch.isnan(s[[0, 1, 2, 4]]).all(), s
    assert (q[[0, 1, 2, 3, 4]] == 0).all(), q[:5]
    assert s[3].item() == 1.0
    rq, rs = ref.quantize_per_token(x[5:].cpu())  # the finite row: bit-exact as always
    assert torch.equal(q[5:], rq) and torch.equal(s[5:], rs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_inf_static(dtype):
    """Static scale: elementwise, NaN -> 0, +inf -> 127, -inf -> -127; the scale is returned as given."""
    x = torch.tensor([[NAN, INF, -INF, 1.0, -2.5, 1000.0, NAN, 0.0],
                      [0.5, NAN, NAN, NAN, INF, INF, -INF, -300.0]]).to(dtype)
    scale = torch.tensor([0.5])
    q, s = qa.quantize_act(x.to(DEVICE), scale.to(DEVICE))
    assert q.cpu().tolist() == [[0, 127, -127, 2, -5, 127, 0, 0], [1, 0, 0, 0, 127, 127, -127, -127]]
    assert torch.equal(s.cpu(), scale)

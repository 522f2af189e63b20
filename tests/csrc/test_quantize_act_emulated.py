"""The CUDA activation-quantization kernel (csrc/quantize_act.cuh) under the SIMT emulator, through
``torch.ops.ditq.quantize_act(..., backend="cuda-emulated")``: bit-exact against ditq/quant/reference.py at
ragged shapes, every fiber order (several seeds) x every cp.async mode, race checker on, fp32/fp16/bf16,
static and per-token scales. Outputs come back poisoned (-128 / NaN) from the binding before the kernel runs,
so an element the kernel skips fails the exact comparison."""
import pytest
import torch

import ditq  # noqa: F401  (registers torch.ops.ditq)
from ditq.backends import cuda_backend
from ditq.quant import reference as ref

pytestmark = pytest.mark.skipif(not cuda_backend.built(), reason="ditq._C is not built")

from ditq.emulator import emulator_options, get_emulator_options, set_emulator_options  # noqa: E402

SETTINGS = [(order, seed, cp) for order, seed in [("forward", 0), ("reverse", 0), ("random", 1), ("random", 7)]
            for cp in ("issue", "wait", "barrier")]
# M = 1, rows not a multiple of the 4 rows per block, odd K (scalar path), K a multiple of 16 bytes
# (16-byte vector path), K = 1 and one 8-element vector.
SHAPES = [(1, 1), (1, 8), (1, 1152), (3, 17), (5, 40), (6, 64), (9, 333), (13, 1152)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(m, k, dtype, gen):
    x = torch.randn(m, k, generator=gen) * torch.logspace(-2, 2, m)[:, None]  # rows of very different ranges
    if m > 2 and k > 3:
        x[1] = 0.0  # all-zero row: scale 1
        x[2, k // 2] = -1e3 * (1 + torch.rand(1, generator=gen))  # the absmax is a negative outlier
        x[0, :4] = torch.tensor([0.5, 1.5, 2.5, -2.5]) * x[0].abs().max() / 127  # near-ties of x / s
    return x.to(dtype)


def _check(x, scale, what):
    q, s = torch.ops.ditq.quantize_act(x, scale, "cuda-emulated")
    if scale is None:
        rq, rs = ref.quantize_per_token(x)
    else:
        rq, rs = ref.quantize_with_scale(x, scale, ref.INT8_QMAX), scale
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.equal(q, rq), f"{what}: {int((q != rq).sum())} q values differ, first at {(q != rq).nonzero()[0]}"
    assert torch.equal(s, rs), f"{what}: scales differ: {s} vs {rs}"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("dynamic", [True, False], ids=["per_token", "static"])
def test_exact_under_every_schedule(dtype, dynamic):
    gen = torch.Generator().manual_seed(1234 + DTYPES.index(dtype))
    for m, k in SHAPES:
        x = _inputs(m, k, dtype, gen)
        # A static scale small enough that some values clamp at +-127, and one that hits exact .5 ties.
        scale = None if dynamic else torch.tensor([float(x.float().abs().max()) / 200 + 1e-3])
        for order, seed, cp in SETTINGS:
            with emulator_options(order=order, seed=seed, cp_async=cp, race_check=True):
                _check(x, scale, f"{dtype} {m}x{k} {order}/{seed}/{cp}")


def test_round_half_to_even_and_clamp_with_a_static_scale():
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.5, 300.0, -300.0, 0.0, -0.0]])
    with emulator_options():
        q, s = torch.ops.ditq.quantize_act(x, torch.tensor([1.0]), "cuda-emulated")
    assert q.tolist() == [[0, 2, 2, 0, -2, -2, 126, 127, 127, -127, 0, 0]]
    assert s.tolist() == [1.0]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_unaligned_rows_take_the_scalar_path(dtype):
    """A contiguous view that starts 1 element into its storage is not 16-byte aligned: the launcher must
    fall back to scalar loads (the emulator rejects a misaligned 16-byte load)."""
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(7 * 64 + 1, generator=gen).to(dtype)
    x = base[1:].view(7, 64)
    assert x.is_contiguous() and x.data_ptr() % 16 != 0
    with emulator_options(order="random", seed=3):
        _check(x, None, "unaligned")


def test_empty_inputs():
    for m, k in [(0, 16), (3, 0)]:
        x = torch.randn(m, k)
        q, s = torch.ops.ditq.quantize_act(x, None, "cuda-emulated")
        assert q.shape == (m, k) and s.tolist() == [1.0] * m


def test_larger_activation_matches_the_reference():
    """A DiT-sized row (K = 1152) for a few hundred tokens, random order with the race checker."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(257, 1152, generator=gen).to(torch.bfloat16)
    with emulator_options(order="random", seed=11, race_check=True):
        _check(x, None, "257x1152 bf16")


# ---- errors a user can meet ---------------------------------------------------------------------------------
@pytest.mark.parametrize("make,exc,text", [
    (lambda: (torch.zeros(4, 8, dtype=torch.int32), None), TypeError, "x must be float32, float16 or bfloat16"),
    (lambda: (torch.zeros(8), None), ValueError, "x must be 2-D"),
    (lambda: (torch.zeros(8, 4).t(), None), ValueError, "x must be contiguous"),
    (lambda: (torch.zeros(4, 8), torch.tensor([1.0], dtype=torch.float64)), TypeError, "static scale must be float32"),
    (lambda: (torch.zeros(4, 8), torch.tensor([1.0, 2.0])), ValueError, "static scale must have shape [1]"),
])
def test_direct_op_validates_its_inputs(make, exc, text):
    """torch.ops.ditq_C.quantize_act is callable without ditq.ops: it checks its inputs itself."""
    x, scale = make()
    with pytest.raises(exc, match=text.replace("[", r"\[").replace("]", r"\]")):
        torch.ops.ditq_C.quantize_act(x, scale)


def test_emulator_options_validate_and_restore():
    before = get_emulator_options()
    with pytest.raises(ValueError, match="order must be one of"):
        set_emulator_options(order="sideways")
    with pytest.raises(ValueError, match="cp_async must be one of"):
        set_emulator_options(cp_async="never")
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        set_emulator_options(seed=-1)
    with pytest.raises(ValueError, match="emulator order must be 0"):
        torch.ops.ditq_C.emulator_set_options(7, 0, 0, False)
    with emulator_options(order="reverse", seed=3, cp_async="issue", race_check=True):
        # mem_check on by default, arch, async_landing and sm_count at their defaults
        assert tuple(get_emulator_options()) == ("reverse", 3, "issue", True, True, "sm_80", "wait", 132)
    assert get_emulator_options() == before


def test_backend_reasons():
    from ditq.backends import unavailable_reason

    assert unavailable_reason("cuda-emulated", "cpu") is None
    if not torch.cuda.is_available():
        assert "no CUDA GPU is visible" in unavailable_reason("cuda") or "without CUDA" in unavailable_reason("cuda")
    assert "runs on cpu tensors" in unavailable_reason("cuda-emulated", "cuda")


# ---- non-finite inputs: the contract ---------------------------------------------------------------------------
# Static scale: q = clamp(rint(x / s), -127, 127) elementwise with NaN -> 0, +inf -> 127, -inf -> -127.
# Dynamic: a row holding any NaN or +-inf gets scale NaN and q all 0 (the GEMM row is then NaN); an all-zero row
# keeps scale 1 and q 0; other rows are unchanged.
def _contract(x, scale):
    xf = x.float()
    if scale is not None:
        q = torch.clamp(torch.round(xf * (1.0 / scale)), -127, 127)
        return torch.where(xf.isnan(), 0.0, q).to(torch.int8), scale
    amax = xf.abs().amax(dim=1)  # NaN-propagating in torch
    finite = torch.isfinite(xf).all(dim=1)
    s = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    s = torch.where(finite, s, torch.full_like(s, float("nan")))
    inv = torch.where(finite, 1.0 / s, torch.zeros_like(s))
    q = torch.clamp(torch.round(xf * inv[:, None]), -127, 127)
    return torch.where(finite[:, None], q, 0.0).to(torch.int8), s


def _nonfinite_rows(k, dtype, gen):
    x = torch.randn(7, k, generator=gen) * 3
    x[0, k // 3] = float("nan")                      # one NaN
    x[1, k - 1] = float("inf")                       # +inf at the end of the row
    x[2, 0] = float("-inf")                          # -inf first
    x[3] = 0.0                                       # all zero
    x[4, 1], x[4, k // 2] = float("nan"), float("inf")  # mixed
    x[5] = float("nan")                              # all NaN
    # row 6 stays finite: unchanged behaviour next to the others
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("k", [64, 33], ids=["vector", "scalar"])
def test_nonfinite_inputs_follow_the_contract(dtype, k):
    x = _nonfinite_rows(k, dtype, torch.Generator().manual_seed(k))
    for scale in (None, torch.tensor([0.05])):
        want_q, want_s = _contract(x, scale)
        for order, seed, cp in SETTINGS[::3]:
            with emulator_options(order=order, seed=seed, cp_async=cp, race_check=True):
                q, s = torch.ops.ditq_C.quantize_act(x, scale)
            what = f"{dtype} K={k} {'static' if scale is not None else 'dynamic'} {order}/{seed}"
            assert torch.equal(q, want_q), f"{what}: q rows {sorted(set((q != want_q).nonzero()[:, 0].tolist()))}"
            assert torch.equal(s.view(torch.int32), want_s.view(torch.int32)), f"{what}: scales {s} vs {want_s}"
    q, s = torch.ops.ditq_C.quantize_act(x, None)
    assert s[:6].isnan().tolist() == [True, True, True, False, True, True] and s[3].item() == 1.0
    assert not bool(q[[0, 1, 2, 4, 5]].any()) and not bool(q[3].any()) and bool(q[6].any())
    q_static, _ = torch.ops.ditq_C.quantize_act(x, torch.tensor([0.05]))
    assert q_static[1, k - 1].item() == 127 and q_static[2, 0].item() == -127 and q_static[0, k // 3].item() == 0


def test_nonfinite_row_makes_the_gemm_row_nan():
    """The point of the contract: quantize_act -> gemm_w8a8 turns a row holding NaN / inf into a NaN output
    row (with and without bias), and leaves the other rows finite."""
    x = _nonfinite_rows(64, torch.float32, torch.Generator().manual_seed(3))
    q, s = torch.ops.ditq_C.quantize_act(x, None)
    w = torch.randint(-127, 128, (9, 64), generator=torch.Generator().manual_seed(4), dtype=torch.int8)
    for bias in (None, torch.randn(9)):
        y = torch.ops.ditq_C.gemm_w8a8(q, s, w, torch.rand(9) + 0.1, bias, torch.bfloat16, -1, 1)
        assert y.float().isnan().all(dim=1).tolist() == [True, True, True, False, True, True, False]
        assert torch.isfinite(y[[3, 6]].float()).all()

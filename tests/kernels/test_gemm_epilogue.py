"""The Triton GEMMs' fused epilogue (kernels/epilogue.py) against the reference ``gemm_epilogue``.

Each combination a DiT block uses (plain, GELU alone, GELU + int8 output, gate + residual) plus all pieces at
once, in both tile orientations of both kernels, at ragged shapes: M = 1 and odd, N odd, K a multiple of the
group but not of the step. Outputs are poisoned before the call (NaN, or -128 for int8, which the int8 tail
never writes). Without GELU the interpreter matches the reference bit for bit; with GELU, tanh's last bits
differ between libraries (NumPy's exp here, libdevice on a GPU, torch in the reference), so fp32 outputs are
held to the float64 composition's tolerance and int8 outputs may differ by one only where the fp32 value lies
within that error of a rounding boundary. Every case is also checked against the float64 composition.
"""
import pytest
import torch

from ditq import testing
from ditq.kernels import interpret, w4a8, w8a8
from ditq.quant import reference as ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EXACT = interpret.interpreting()  # compiled, Triton contracts the plain GEMM's scale-and-bias into an fma

W8_CFG = {False: dict(BM=16, BN=16, BK=32, GROUP_M=2, SWAP_AB=False, USE_TMA=False, num_warps=1, num_stages=1),
          True: dict(BM=16, BN=32, BK=32, GROUP_M=2, SWAP_AB=True, USE_TMA=False, num_warps=1, num_stages=1)}


def _w4_cfg(swap):
    return dict(BM=16, BN=16, BK=64, GROUP_M=2, SWAP_AB=swap, UNPACK_ASM=False, num_warps=4, num_stages=2)


# (name, gelu, gate, residual, int8 out, out dtype): what the blocks run, and everything at once
COMBOS = [("plain", False, False, False, False, torch.bfloat16),
          ("gelu", True, False, False, False, torch.float32),
          ("gelu-quant", True, False, False, True, torch.float32),
          ("gate-residual", False, True, True, False, torch.bfloat16),
          ("all-quant", True, True, True, True, torch.float16)]
# (M, N, K, rows per gate): M = 1; M odd over several tiles, one gate row per 7 rows; N odd everywhere
SHAPES = [(1, 17, 96, 1), (21, 19, 160, 7)]


def _inputs(bits, m, n, k, gated, with_residual, out_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    a = testing.random_int8(m, k, generator=gen)
    # scales that put y mostly in [-3, 3], where GELU bends (beyond it GELU is nearly y or 0)
    a_s = torch.rand(m, generator=gen) / 200 + 1e-4
    b = torch.randn(n, generator=gen)
    if bits == 8:
        wq = testing.random_int8(n, k, generator=gen)
        w_s = torch.rand(n, generator=gen) / 200 + 1e-4
    else:
        wq = testing.random_int4(n, k, generator=gen)
        w_s = torch.rand(k // 32, n, generator=gen) / 12 + 1e-3
    return a, a_s, wq, w_s, b


def _pieces(m, n, rows, gelu, gated, with_residual, out_dtype, seed):
    gen = torch.Generator().manual_seed(seed + 1)
    gate = (torch.randn(m // rows, n, generator=gen) * 2).to(torch.bfloat16) if gated else None
    res = torch.randn(m, n, generator=gen).to(out_dtype) if with_residual else None
    return gelu, gate, res, rows


def _run(bits, a, a_s, wq, w_s, b, pieces, out_scale, out_dtype, swap):
    m, n = a.shape[0], wq.shape[0]
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    gelu, gate, res, rows = pieces
    if out_scale is not None:
        out = torch.full((m, n), -128, dtype=torch.int8, device=DEVICE)
    else:
        out = torch.full((m, n), float("nan"), dtype=out_dtype, device=DEVICE)
    if bits == 8:
        y = w8a8.gemm_w8a8_fused(dev(a), dev(a_s), dev(wq), dev(w_s), dev(b), gelu, dev(gate), dev(res), rows,
                                 dev(out_scale), out_dtype, out=out, config=W8_CFG[swap])
    else:
        w = w4a8.pack_weight(ref.pack_int4(wq), 32)
        y = w4a8.gemm_w4a8_fused(dev(a), dev(a_s), dev(w), dev(w_s), dev(b), 32, gelu, dev(gate), dev(res), rows,
                                 dev(out_scale), out_dtype, out=out, config=_w4_cfg(swap))
    assert y is out
    return y.cpu()


def _reference(bits, a, a_s, wq, w_s, b, pieces, out_scale, out_dtype):
    if bits == 8:
        return ref.gemm_w8a8_fused(a, a_s, wq, w_s, b, *pieces, out_scale, out_dtype)
    return ref.gemm_w4a8_fused(a, a_s, wq, w_s, 32, b, *pieces, out_scale, out_dtype)


def _exact(bits, a, a_s, wq, w_s, b, pieces):
    gemm = ref.gemm_w8a8_exact(a, a_s, wq, w_s, b) if bits == 8 else ref.gemm_w4a8_exact(a, a_s, wq, w_s, 32, b)
    return ref.gemm_epilogue_exact(*gemm, *pieces)


def _assert_int8_near(q, q_ref, y_ref, y_pre, out_scale):
    """q may differ from q_ref by one only where y_ref * (1 / s) is within GELU's error of a rounding boundary."""
    v = y_ref.double() * (1.0 / out_scale.double())
    # GELU's error bound (gemm_epilogue_exact): 1e-5 relative, plus ulps of |y| before it (1 + tanh is absolute)
    slack = 1e-5 * v.abs() + y_pre.abs().double() / out_scale.double() * 2.0 ** -20
    near = ((v.abs() - v.abs().floor() - 0.5).abs() <= slack) & (v.abs() < 127.5)
    diff = (q.int() - q_ref.int()).abs()
    assert int(diff.max()) <= 1, f"int8 outputs off by {int(diff.max())}"
    assert bool((near | (diff == 0)).all()), f"{int(((diff > 0) & ~near).sum())} int8 outputs off away from a tie"


@pytest.mark.gpu  # also run on the GPU by benchmarks/gpu_suite.sh: code paths the GPU tables do not pick
@pytest.mark.parametrize("swap", (False, True), ids=("plain-tile", "swapped-tile"))
@pytest.mark.parametrize("bits", (8, 4), ids=("w8a8", "w4a8"))
@pytest.mark.parametrize("combo", COMBOS, ids=[c[0] for c in COMBOS])
def test_fused_epilogue_matches_the_reference(combo, bits, swap):
    name, gelu, gated, with_residual, quant, out_dtype = combo
    for i, (m, n, k, rows) in enumerate(SHAPES):
        seed = 100 * i + 10 * bits + swap + len(name)
        a, a_s, wq, w_s, b = _inputs(bits, m, n, k, gated, with_residual, out_dtype, seed)
        pieces = _pieces(m, n, rows, gelu, gated, with_residual, out_dtype, seed)
        out_scale = torch.tensor([0.01]) if quant else None
        y = _run(bits, a, a_s, wq, w_s, b, pieces, out_scale, out_dtype, swap)
        y_ref = _reference(bits, a, a_s, wq, w_s, b, pieces, out_scale, out_dtype)
        assert y.dtype == y_ref.dtype
        if quant:
            assert int(y.abs().max()) == 127 and int(y.ne(0).sum()) > m * n // 2, "a test on (nearly) zeros"
            y32 = _reference(bits, a, a_s, wq, w_s, b, pieces, None, out_dtype)  # the fp32 value quantized
            if gelu or not EXACT:
                y_pre = _reference(bits, a, a_s, wq, w_s, b, (False, None, None, 1), None, torch.float32)
                _assert_int8_near(y, y_ref, y32, y_pre, out_scale)
            else:
                assert torch.equal(y, y_ref)
            continue
        exact, mag = _exact(bits, a, a_s, wq, w_s, b, pieces)
        testing.assert_matches_exact(y, exact, mag, fp32_ops=8 + 2 * k // 32, what=f"{name} epilogue")
        if EXACT and not gelu:
            assert torch.equal(y, y_ref), f"{name}: not bit for bit the reference"
        elif out_dtype == torch.float32:
            torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6 * float(mag.max()))


@pytest.mark.parametrize("bits", (8, 4), ids=("w8a8", "w4a8"))
def test_no_piece_is_the_plain_gemm_bit_for_bit(bits):
    m, n, k = 5, 19, 96
    a, a_s, wq, w_s, b = _inputs(bits, m, n, k, False, False, torch.bfloat16, seed=bits)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    for per_token in (True, False):
        s = a_s if per_token else a_s[:1]
        if bits == 8:
            plain = w8a8.gemm_w8a8(dev(a), dev(s), dev(wq), dev(w_s), dev(b), torch.bfloat16, config=W8_CFG[True])
            fused = w8a8.gemm_w8a8_fused(dev(a), dev(s), dev(wq), dev(w_s), dev(b), False, None, None, 1, None,
                                         torch.bfloat16, config=W8_CFG[True])
        else:
            w = dev(w4a8.pack_weight(ref.pack_int4(wq), 32))
            plain = w4a8.gemm_w4a8(dev(a), dev(s), w, dev(w_s), dev(b), 32, torch.bfloat16, config=_w4_cfg(False))
            fused = w4a8.gemm_w4a8_fused(dev(a), dev(s), w, dev(w_s), dev(b), 32, False, None, None, 1, None,
                                         torch.bfloat16, config=_w4_cfg(False))
        assert torch.equal(plain, fused)


def test_int8_output_saturates_and_zeroes_non_finite_rows():
    """The int8 tail is quantize_act's: a NaN row (per-token scale NaN) gives 0, huge values +-127."""
    m, n, k = 3, 17, 32
    a, a_s, wq, w_s, b = _inputs(8, m, n, k, False, False, torch.float32, seed=9)
    a_s[1] = float("nan")
    a_s[2] = 1e30
    y = _run(8, a, a_s, wq, w_s, None, (False, None, None, 1), torch.tensor([0.05]), torch.float32, False)
    assert torch.equal(y, ref.gemm_w8a8_fused(a, a_s, wq, w_s, None, False, None, None, 1, torch.tensor([0.05]),
                                              torch.float32))
    assert y[1].eq(0).all() and y[2].abs().eq(127).all()


def test_triton_kernel_ops_run_the_fused_launchers():
    import ditq  # noqa: F401  (registers torch.ops.ditq)
    from ditq import backends

    ops = backends.get_backend("triton", DEVICE).kernel_ops()
    assert ops.gemm_w4a8_fused is not None
    m, n, k = 2, 17, 32
    a, a_s, wq, w_s, b = (t.to(DEVICE) for t in _inputs(8, m, n, k, False, False, torch.float32, seed=4))
    res = torch.randn(m, n, device=DEVICE)
    y = ops.gemm_w8a8_fused(a, a_s, wq, w_s, b, False, None, res, 1, None, torch.float32)
    assert torch.equal(y, w8a8.gemm_w8a8_fused(a, a_s, wq, w_s, b, False, None, res, 1, None, torch.float32))


# ---- the same refusals as the torch backend -----------------------------------------------------------------

BAD = {
    "rows-zero": dict(rows_per_gate=0),
    "rows-not-dividing-m": dict(rows_per_gate=4),
    "gate-shape": dict(rows_per_gate=3),
    "gate-dtype": dict(gate=torch.ones(3, 7, dtype=torch.int32)),
    "gate-strided": dict(gate=torch.ones(7, 3).t()),
    "residual-dtype": dict(residual=torch.ones(6, 7, dtype=torch.float16)),
    "residual-shape": dict(residual=torch.ones(6, 8)),
    "out-scale-shape": dict(out_scale=torch.ones(2)),
    "out-scale-dtype": dict(out_scale=torch.ones(1, dtype=torch.float64)),
    "out-scale-zero": dict(out_scale=torch.zeros(1)),
}


@pytest.mark.skipif(DEVICE != "cpu", reason="compares the CPU refusals of both backends")
@pytest.mark.parametrize("bits", (8, 4), ids=("w8a8", "w4a8"))
@pytest.mark.parametrize("bad", BAD, ids=list(BAD))
def test_bad_epilogue_arguments_are_refused_like_the_torch_backend(bad, bits):
    import ditq  # noqa: F401  (registers torch.ops.ditq)
    from ditq import backends

    m, n, k = 6, 7, 64
    a, a_s, wq, w_s, b = _inputs(bits, m, n, k, False, False, torch.float32, seed=1)
    kw = dict(gelu=False, gate=torch.ones(3, 7), residual=torch.ones(6, 7), rows_per_gate=2, out_scale=None)
    kw.update(BAD[bad])
    args = (kw["gelu"], kw["gate"], kw["residual"], kw["rows_per_gate"], kw["out_scale"], torch.float32)
    errors = []
    for backend in ("torch", "triton"):
        w = ref.pack_int4(wq) if bits == 4 else wq
        w, _ = backends.get_backend(backend).prepare_weight(_Fmt(bits), w, w_s) if bits == 4 else (w, w_s)
        with pytest.raises((TypeError, ValueError)) as info:
            if bits == 8:
                torch.ops.ditq.gemm_w8a8_fused(a, a_s, w, w_s, b, *args, backend)
            else:
                torch.ops.ditq.gemm_w4a8_fused(a, a_s, w, w_s, b, 32, *args, backend)
        errors.append((info.type, str(info.value)))
    assert errors[0] == errors[1]


class _Fmt:
    """The fields of a weight format that ``prepare_weight`` reads."""

    def __init__(self, bits):
        self.bits, self.group_size, self.group_scales = bits, 32, "float"

"""The Triton GEMMs compiled for the GPU at its own tables' tiles, against the exact integer reference.

The CPU tests run these kernels under the interpreter, at interpreter-sized tiles and K of one or two steps:
they never see the compiled software pipeline (num_stages > 1 over many k steps), the TMA loads, the
GPU's register layouts or a split launch's workspace filled by programs that really run at once. Here each
kernel runs as the launcher picks it on this GPU (``config=None``: the shipped table's entry for the M bucket,
the automatic split-K count) at model-like widths with K many steps long and ragged: M = 1, odd, past a tile;
N odd; K a multiple of 16 (W8A8) or of the group (W4A8) but not of the step. Outputs are poisoned (NaN, or -128
for int8 outputs) before each call; inputs are fresh random values over the whole int8 / int4 range. Few
flag combinations per case: each distinct one is a compile.
"""
import pytest
import torch

from ditq import testing
from ditq.kernels import split_k, w4a8, w8a8
from ditq.quant import reference as ref

pytestmark = pytest.mark.cuda
DEVICE = "cuda"

# (M, N, K, out dtype, per-token scales, bias): every sm90 / sm80 bucket (M <= 16, <= 64, <= 256, larger), K of
# 9 steps and a 16-wide tail (1168 = 9 x 128 + 16), one case of 36 steps (4624)
W8_CASES = [(1, 1153, 1168, torch.bfloat16, True, True), (16, 3073, 1168, torch.float16, False, True),
            (61, 1155, 1168, torch.float32, True, False), (200, 1153, 1168, torch.bfloat16, True, True),
            (515, 4607, 1168, torch.bfloat16, True, True), (1031, 1155, 4624, torch.float16, False, False)]
# K for each group size: a multiple of the group, not of 128 where the group allows it
W4_K = {32: 800, 64: 1216, 128: 1152, 256: 1280}
# (M, N) of the integer-scale cases (and SPLIT_SHAPE): the smallest and the largest entry, few compiles per group
W4_INT_MN = ((1, 1153), (515, 1155))
# DiT-XL/2 at batch 1 with guidance: attention out / fc2 have 36 tiles of 128 x 128: the automatic count splits
SPLIT_SHAPE = (512, 1152, 1152)


def _w8_inputs(m, n, k, per_token, bias, seed):
    g = torch.Generator().manual_seed(seed)
    a, w = testing.random_int8(m, k, generator=g), testing.random_int8(n, k, generator=g)
    a_s = (torch.rand(m if per_token else 1, generator=g) + 0.05) / 127
    w_s = (torch.rand(n, generator=g) + 0.05) / 127
    b = torch.randn(n, generator=g) if bias else None
    return a, a_s, w, w_s, b


def _dev(*ts):
    return [None if t is None else t.to(DEVICE) for t in ts]


def _poisoned(m, n, dtype):
    return torch.full((m, n), -128 if dtype == torch.int8 else float("nan"), dtype=dtype, device=DEVICE)


def _sync():  # errors of an asynchronous launch surface here, in the test that made them
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("m,n,k,out_dtype,per_token,bias", W8_CASES,
                         ids=[f"M{c[0]}-N{c[1]}-K{c[2]}" for c in W8_CASES])
def test_w8a8_table_tiles_exact(m, n, k, out_dtype, per_token, bias):
    a, a_s, w, w_s, b = _w8_inputs(m, n, k, per_token, bias, seed=m * 7 + n)
    out = _poisoned(m, n, out_dtype)
    y = w8a8.gemm_w8a8(*_dev(a, a_s, w, w_s, b), out_dtype, out=out)
    _sync()
    assert y is out
    testing.assert_gemm_w8a8(y, a, a_s, w, w_s, b, what=f"triton W8A8 M={m} N={n} K={k}")


@pytest.mark.parametrize("group", sorted(W4_K))
def test_w4a8_table_tiles_exact(group):
    k = W4_K[group]
    for m, n in ((1, 1153), (61, 3073), (515, 1155)):
        a, q, s, a_s, b = testing.random_w4a8_case(m, n, k, group, seed=m + n + group)
        w = w4a8.pack_weight(ref.pack_int4(q), group)
        out = _poisoned(m, n, torch.bfloat16)
        y = w4a8.gemm_w4a8(*_dev(a, a_s, w, s, b), group, torch.bfloat16, out=out)
        _sync()
        assert y is out
        testing.assert_gemm_w4a8(y, a, a_s, q, s, group, b, what=f"triton W4A8 g{group} M={m} N={n} K={k}")


@pytest.mark.parametrize("group", sorted(W4_K))
def test_w4a8_int_scales_table_tiles_exact(group):
    """Integer group scales (INT_SCALES: the unpack's PTX multiplies by q, one int32 sum over K) at this GPU's
    table entries, with the automatic split count at the split shape: within the reference's tolerance on the
    float scales q * c, and a split launch the same bits as the unsplit one (int32 partials)."""
    from ditq.format import int_scales_to_kernel

    k = W4_K[group]
    for m, n in W4_INT_MN + (SPLIT_SHAPE[:2],):
        kk = SPLIT_SHAPE[2] if (m, n) == SPLIT_SHAPE[:2] and SPLIT_SHAPE[2] % group == 0 else k
        a, q, _, a_s, b = testing.random_w4a8_case(m, n, kk, group, seed=m + n + group)
        gen = torch.Generator().manual_seed(group + m)
        qs = torch.randint(1, 17, (kk // group, n), generator=gen, dtype=torch.int32)
        c = (torch.rand(n, generator=gen) + 0.05) / 127 / 16
        args = _dev(a, a_s, w4a8.pack_weight(ref.pack_int4(q), group), int_scales_to_kernel(qs, c), b)
        y = w4a8.gemm_w4a8(*args, group, torch.bfloat16, out=_poisoned(m, n, torch.bfloat16))
        whole = w4a8.gemm_w4a8(*args, group, torch.bfloat16, out=_poisoned(m, n, torch.bfloat16), splits=1)
        _sync()
        testing.assert_gemm_w4a8(y, a, a_s, q, qs.float() * c[None, :], group, b,
                                 what=f"triton W4A8 int scales g{group} M={m} N={n} K={kk}")
        assert torch.equal(y.view(torch.int16), whole.view(torch.int16)), "split != unsplit bits"


def test_group_sizes_cover_the_family():
    """The cases above cover every group size the W4A8 family lists (a new one needs its K here)."""
    assert sorted(W4_K) == sorted(w4a8.describe()["group_sizes"])


def _auto_count(bits, m, n, k, group=128):
    """The split count the launcher picks on this GPU (its table's tile, its SM count)."""
    sms = split_k.sm_count(DEVICE)
    if bits == 8:
        return w8a8.auto_split_count(w8a8.kernel_config(m, DEVICE), m, n, k, sms)
    return w4a8.auto_split_count(w4a8.kernel_config(m, DEVICE, group), m, n, k, group, sms)


def test_w8a8_automatic_split_equals_unsplit_bit_for_bit():
    """The automatic split count on this GPU's SMs, real programs racing into the workspace: int32 partials,
    so the bits are the unsplit launch's."""
    m, n, k = SPLIT_SHAPE
    if _auto_count(8, m, n, k) < 2:
        pytest.skip(f"{DEVICE}: the automatic count does not split {m}x{n}x{k}")
    a, a_s, w, w_s, b = _w8_inputs(m, n, k, True, True, seed=5)
    args = _dev(a, a_s, w, w_s, b)
    split = w8a8.gemm_w8a8(*args, torch.bfloat16, out=_poisoned(m, n, torch.bfloat16))
    whole = w8a8.gemm_w8a8(*args, torch.bfloat16, out=_poisoned(m, n, torch.bfloat16), splits=1)
    _sync()
    testing.assert_gemm_w8a8(split, a, a_s, w, w_s, b, what="split W8A8")
    assert torch.equal(split.view(torch.int16), whole.view(torch.int16)), "split != unsplit bits"


def test_w4a8_automatic_split_exact_and_repeatable():
    m, n, k = SPLIT_SHAPE
    if _auto_count(4, m, n, k) < 2:
        pytest.skip(f"{DEVICE}: the automatic count does not split {m}x{n}x{k}")
    a, q, s, a_s, b = testing.random_w4a8_case(m, n, k, 128, seed=6)
    args = _dev(a, a_s, w4a8.pack_weight(ref.pack_int4(q), 128), s, b)
    runs = [w4a8.gemm_w4a8(*args, 128, torch.float32, out=_poisoned(m, n, torch.float32)) for _ in range(3)]
    _sync()
    testing.assert_gemm_w4a8(runs[0], a, a_s, q, s, 128, b, what="split W4A8")
    assert all(torch.equal(r, runs[0]) for r in runs[1:]), "a split W4A8 launch is not deterministic"


@pytest.mark.parametrize("bits", (8, 4), ids=("w8a8", "w4a8"))
def test_fused_gate_and_residual_exact(bits):
    """What attention out and fc2 run in a DiT block: scale, bias, adaLN gate (one row per image), residual add,
    at the split shape (so the epilogue also runs after a split's reduce)."""
    m, n, k = SPLIT_SHAPE
    rows = m // 2
    g = torch.Generator().manual_seed(40 + bits)
    gate = (torch.randn(m // rows, n, generator=g) * 2).to(torch.bfloat16)
    res = torch.randn(m, n, generator=g).to(torch.bfloat16)
    out = _poisoned(m, n, torch.bfloat16)
    if bits == 8:
        a, a_s, w, w_s, b = _w8_inputs(m, n, k, True, True, seed=41)
        y = w8a8.gemm_w8a8_fused(*_dev(a, a_s, w, w_s, b), False, *_dev(gate, res), rows, None, torch.bfloat16,
                                 out=out)
        exact = ref.gemm_w8a8_exact(a, a_s, w, w_s, b)
        ops = 8
    else:
        a, q, w_s, a_s, b = testing.random_w4a8_case(m, n, k, 128, seed=42)
        w = w4a8.pack_weight(ref.pack_int4(q), 128)
        y = w4a8.gemm_w4a8_fused(*_dev(a, a_s, w, w_s, b), 128, False, *_dev(gate, res), rows, None,
                                 torch.bfloat16, out=out)
        exact = ref.gemm_w4a8_exact(a, a_s, q, w_s, 128, b)
        ops = 8 + 2 * k // 128
    _sync()
    assert y is out
    want, mag = ref.gemm_epilogue_exact(*exact, False, gate, res, rows)
    testing.assert_matches_exact(y, want, mag, fp32_ops=ops, what=f"fused W{bits}A8 gate + residual")


def test_fused_gelu_to_int8_within_one():
    """fc1 feeding a static fc2: GELU then int8 quantization in the epilogue; libdevice's tanh differs from
    torch's in its last bits, so a value may round the other way only at a tie."""
    m, n, k = 61, 1155, 1168
    a, a_s, w, w_s, b = _w8_inputs(m, n, k, True, True, seed=43)
    a_s, w_s = a_s / 40, w_s / 40  # y mostly in [-3, 3], where GELU bends
    out_scale = torch.tensor([0.01])
    out = _poisoned(m, n, torch.int8)
    q = w8a8.gemm_w8a8_fused(*_dev(a, a_s, w, w_s, b), True, None, None, 1, out_scale.to(DEVICE), torch.float32,
                             out=out)
    _sync()
    q_ref = ref.gemm_w8a8_fused(a, a_s, w, w_s, b, True, None, None, 1, out_scale, torch.float32)
    assert int(q_ref.abs().max()) == 127 and int(q_ref.ne(0).sum()) > m * n // 2, "a test on (nearly) zeros"
    diff = (q.cpu().int() - q_ref.int()).abs()
    assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= m * n // 1000, (
        f"{int((diff > 0).sum())} int8 outputs differ, up to {int(diff.max())}")


def test_float_a_quantized_on_load_equals_quantize_then_gemm():
    """The fused GEMM taking bf16 activations with a static scale quantizes them as it loads them, exactly as
    quantize_act does: the same bits as quantize_act followed by the int8 fused GEMM."""
    from ditq.kernels import quantize_act

    m, n, k = 61, 1155, 1168
    g = torch.Generator().manual_seed(44)
    x = (torch.randn(m, k, generator=g) * 3).to(torch.bfloat16).to(DEVICE)
    scale = torch.tensor([float(x.float().abs().max()) / 127 * 0.7], device=DEVICE)  # some values clamp
    _, _, w, w_s, b = _w8_inputs(m, n, k, False, True, seed=45)
    w, w_s, b = _dev(w, w_s, b)
    fused = w8a8.gemm_w8a8_fused(x, scale, w, w_s, b, False, None, None, 1, None, torch.bfloat16,
                                 out=_poisoned(m, n, torch.bfloat16))
    qa, _ = quantize_act.quantize_act(x, scale)
    twice = w8a8.gemm_w8a8_fused(qa, scale, w, w_s, b, False, None, None, 1, None, torch.bfloat16,
                                 out=_poisoned(m, n, torch.bfloat16))
    _sync()
    assert torch.equal(fused.view(torch.int16), twice.view(torch.int16))
    testing.assert_gemm_w8a8(twice, qa, scale, w, w_s, b, what="int8 fused GEMM")

"""The Triton W4A8 kernel with integer group scales (``INT_SCALES``: int32 [K // G + 1, N] scales, the q rows then
the channel scales' bits): q applied while unpacking, one int32 sum over K, W8A8's epilogue.

Its contract is exact: bit for bit the Triton W8A8 kernel on the expanded int8 weight ``q * w`` with the channel
scales (the same int32 sum, the same epilogue expression), and within the fp32 tolerance of the exact reference on
the float scales ``q * c``. Fresh random inputs with q over all of [1, 16] and w over [-8, 7], ragged shapes (M = 1,
odd N, K a multiple of G but not of the step nor, for G = 32, of the pack block), outputs poisoned with NaN."""
import pytest
import torch

from ditq import testing
from ditq.format import MAX_INT_GROUP_SCALE, int_scales_to_kernel
from ditq.kernels import w4a8, w8a8
from ditq.quant import reference as ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1, 17, 3), (7, 45, 3), (37, 33, 5)]  # (M, N, K in groups), as tests/kernels/test_w4a8.py
WORDS = [v | ((v * 7 + 3) & 0xFF) << 8 | ((v * 13 + 5) & 0xFF) << 16 | ((v * 29 + 11) & 0xFF) << 24
         for v in range(256)]  # words holding every byte value in every position (odd multipliers: bijections)
W8A8_CFG = dict(BM=16, BN=16, BK=32, GROUP_M=4, SWAP_AB=False, USE_TMA=False, num_warps=4, num_stages=2)


def _cfg(swap, g, bm=16, bn=16):
    return dict(BM=bm, BN=bn, BK=128 if g < 256 else 256, GROUP_M=4, SWAP_AB=swap, UNPACK_ASM=False, num_warps=4,
                num_stages=2)


def _case(m, n, k, g, seed, per_token=True):
    gen = torch.Generator().manual_seed(seed)
    a = testing.random_int8(m, k, generator=gen)
    w = testing.random_int4(n, k, generator=gen)
    q = torch.randint(1, MAX_INT_GROUP_SCALE + 1, (k // g, n), generator=gen, dtype=torch.int32)
    q[0, 0], q[-1, -1] = 1, MAX_INT_GROUP_SCALE  # both ends of q in every case
    c = torch.rand(n, generator=gen) * 0.002 + 1e-4
    a_s = torch.rand(m if per_token else 1, generator=gen) * 0.05 + 1e-3
    bias = torch.randn(n, generator=gen) * 4
    return a, w, q, c, a_s, bias


def _dev(*ts):
    return [None if t is None else t.to(DEVICE) for t in ts]


def _expanded(w, q, g):
    """The int8 weight q * w [N, K] (|q w| <= 128 = 16 * 8: int8 holds -128)."""
    return (w.int() * q.repeat_interleave(g, dim=0).T).to(torch.int8).contiguous()


def _int_gemm(a, w, q, c, a_s, bias, g, out_dtype, cfg, splits=None, **fused):
    wp = w4a8.pack_weight(ref.pack_int4(w), g)
    out = torch.full((a.shape[0], w.shape[0]), float("nan"), dtype=out_dtype, device=DEVICE)
    args = _dev(a, a_s, wp, int_scales_to_kernel(q, c), bias)
    if fused:
        return w4a8.gemm_w4a8_fused(*args, g, fused.get("gelu", False), fused.get("gate"), fused.get("residual"),
                                    fused.get("rows_per_gate", 1), fused.get("out_scale"), out_dtype,
                                    config=cfg, splits=splits)
    ret = w4a8.gemm_w4a8(*args, g, out_dtype, out=out, config=cfg, splits=splits)
    assert ret is out
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("swap", [True, False], ids=["swap", "noswap"])
@pytest.mark.parametrize("g", w4a8.GROUP_SIZES)
def test_bit_equal_to_w8a8_on_q_times_w_and_exact(g, swap):
    for i, (m, n, groups) in enumerate(SHAPES):
        out_dtype = (torch.float32, torch.bfloat16, torch.float16)[i]
        a, w, q, c, a_s, bias = _case(m, n, groups * g, g, seed=100 * g + 10 * i + swap, per_token=i != 1)
        y = _int_gemm(a, w, q, c, a_s, bias, g, out_dtype, _cfg(swap, g))
        y8 = w8a8.gemm_w8a8(*_dev(a, a_s, _expanded(w, q, g), c, bias), out_dtype, config=W8A8_CFG)
        what = f"w4a8 int scales G={g} swap={swap} {m}x{n}x{groups * g} {out_dtype}"
        assert torch.equal(y, y8), what
        testing.assert_gemm_w4a8(y, a, a_s, w, q.float() * c[None, :], g, bias, what=what)


@pytest.mark.parametrize("g", [32, 128])
def test_every_split_count_gives_the_unsplit_bits(g):
    """Integer partials: split-K adds int32 sums, so every count (and the automatic one) gives the same bits,
    unlike the float-scale kernel's fp32 partials. G = 32 with an odd group count: the short tail block goes to
    the last split."""
    m, n, k = 5, 24, 7 * 32 if g == 32 else 3 * g
    a, w, q, c, a_s, bias = _case(m, n, k, g, seed=7 + g)
    cfg = _cfg(True, g)
    want = _int_gemm(a, w, q, c, a_s, bias, g, torch.float32, cfg, splits=1)
    units = -(-k // w4a8.pack_block(g))
    for s in range(2, units + 1):
        assert torch.equal(_int_gemm(a, w, q, c, a_s, bias, g, torch.float32, cfg, splits=s), want), s
    assert torch.equal(_int_gemm(a, w, q, c, a_s, bias, g, torch.float32, cfg), want)


def test_largest_products():
    """|a| = 127 against q * w = 16 * -8 = -128 everywhere over the largest K the test affords: the int8 tile
    values at their bound and the int32 sum far past the float-scale kernel's per-group partials."""
    g, m, n, k = 256, 3, 20, 1024
    a = torch.where(torch.rand(m, k, generator=torch.Generator().manual_seed(1)) < 0.5, 127, -127).to(torch.int8)
    a[0] = 127
    w = torch.full((n, k), -8, dtype=torch.int8)
    w[1::2, ::5] = 7
    q = torch.full((k // g, n), MAX_INT_GROUP_SCALE, dtype=torch.int32)
    q[:, 3] = 1
    c, a_s, bias = torch.rand(n) + 0.5, torch.rand(m) + 0.5, torch.randn(n)
    y = _int_gemm(a, w, q, c, a_s, bias, g, torch.float32, _cfg(True, g))
    y8 = w8a8.gemm_w8a8(*_dev(a, a_s, _expanded(w, q, g), c, bias), torch.float32, config=W8A8_CFG)
    assert torch.equal(y, y8)
    assert float(y[0, 0].cpu()) == pytest.approx(float(a_s[0] * c[0]) * 127 * -128 * k + float(bias[0]), rel=1e-6)


def test_one_int32_sum_over_the_largest_k():
    """The whole of MAX_K (FLUX.2-dev's widest input is 24576) in one int32 sum: |a| = 127 against q * w = -128,
    127 * 128 * 32768 = 5.3e8 < 2^31, bit for bit W8A8 on q * w and the closed form."""
    g, m, n, k = 256, 1, 3, w4a8.MAX_K
    a = torch.full((m, k), 127, dtype=torch.int8)
    w = torch.full((n, k), -8, dtype=torch.int8)
    w[1, ::2] = 7
    q = torch.full((k // g, n), MAX_INT_GROUP_SCALE, dtype=torch.int32)
    q[::3, 2] = 3
    c, a_s = torch.rand(n) + 0.5, torch.rand(m) + 0.5
    cfg = dict(_cfg(True, g), BK=1024)  # few steps: the interpreter runs each
    y = _int_gemm(a, w, q, c, a_s, None, g, torch.float32, cfg)
    y8 = w8a8.gemm_w8a8(*_dev(a, a_s, _expanded(w, q, g), c, None), torch.float32,
                        config=dict(W8A8_CFG, BK=1024))
    assert torch.equal(y, y8)
    assert float(y[0, 0].cpu()) == pytest.approx(float(a_s[0] * c[0]) * 127 * -128 * k, rel=1e-6)


@pytest.mark.parametrize("swap", [True, False], ids=["swap", "noswap"])
def test_fused_epilogue_and_float_a_equal_w8a8_fused(swap):
    """The fused pieces (GELU, gate, residual; int8 output) and a float A quantized on load: the same bits as the
    W8A8 fused kernel on q * w, split or not."""
    g, m, n, k = 64, 6, 40, 192
    a, w, q, c, _, bias = _case(m, n, k, g, seed=31)
    gen = torch.Generator().manual_seed(32)
    gate = torch.randn(2, n, generator=gen).to(torch.bfloat16)
    res = torch.randn(m, n, generator=gen).to(torch.bfloat16)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    s_static = torch.tensor([0.02])
    w8 = _expanded(w, q, g)
    for a_in, a_s in ((a, torch.rand(m, generator=gen) * 0.05 + 1e-3), (x, s_static)):
        for kw in (dict(gelu=True, gate=gate, residual=res, rows_per_gate=3), dict(out_scale=torch.tensor([0.05]))):
            fused = {k_: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k_, v in kw.items()}
            want = w8a8.gemm_w8a8_fused(*_dev(a_in, a_s, w8, c, bias), kw.get("gelu", False), fused.get("gate"),
                                        fused.get("residual"), kw.get("rows_per_gate", 1), fused.get("out_scale"),
                                        torch.bfloat16, config=W8A8_CFG)
            for splits in (1, 3):
                got = _int_gemm(a_in, w, q, c, a_s, bias, g, torch.bfloat16, _cfg(swap, g), splits=splits, **fused)
                assert torch.equal(got, want), (a_in.dtype, sorted(kw), splits)


def _unpacks_exactly(words, q) -> bool:
    """Whether the emulated word arithmetic gives, in every byte, the int8 q * w of both nibbles."""
    lo, hi = w4a8.scaled_nibbles_emulated(words, q)
    for wd, l_, h_ in zip(words, lo, hi):
        for b in range(4):
            for got, nib in ((l_ >> 8 * b & 0xFF, wd >> 8 * b & 0xF), (h_ >> 8 * b & 0xFF, wd >> (8 * b + 4) & 0xF)):
                if got != (q * (nib - 16 * (nib >= 8))) & 0xFF:
                    return False
    return True


def test_scaled_nibbles_bit_logic():
    """The unpack's word arithmetic (the pure-Triton path, and the PTX of ``UNPACK_ASM`` emulated bit for bit):
    every byte value in every byte position of a word, times every q, gives the int8 q * w of both nibbles; at
    q = 17 the bias 128 - 8 q goes negative and borrows from the next byte: the bound is real."""
    for q in range(1, MAX_INT_GROUP_SCALE + 1):
        assert _unpacks_exactly(WORDS, q), q
    assert not _unpacks_exactly(WORDS, MAX_INT_GROUP_SCALE + 1)


def _run_ptx(text: str, args):
    """Evaluate inline PTX of 32-bit logic / integer ops (the instructions the unpacks use) on Python ints: ``args``
    are $2, $3, ...; returns ($0, $1). Anything else in the text is an error, so a new instruction needs a line
    here before its text can pass."""
    regs = {f"${i + 2}": v & 0xFFFFFFFF for i, v in enumerate(args)}
    val = lambda o: regs[o] if o in regs else int(o, 0) & 0xFFFFFFFF  # noqa: E731
    body = text.strip().removeprefix("{").removesuffix("}")
    for ins in (i.strip() for i in body.split(";")):
        if not ins or ins.startswith(".reg"):
            continue
        op, rest = ins.split(None, 1)
        d, *src = [o.strip() for o in rest.split(",")]
        v = [val(o) for o in src]
        if op == "lop3.b32":  # LUT bit i selects the minterm (a if i & 4) & (b if i & 2) & (c if i & 1)
            r = 0
            for i in range(8):
                if v[3] >> i & 1:
                    r |= ((v[0] if i & 4 else ~v[0]) & (v[1] if i & 2 else ~v[1]) & (v[2] if i & 1 else ~v[2]))
        else:
            r = {"and.b32": lambda: v[0] & v[1], "xor.b32": lambda: v[0] ^ v[1], "shl.b32": lambda: v[0] << v[1],
                 "shr.u32": lambda: v[0] >> v[1], "mad.lo.u32": lambda: v[0] * v[1] + v[2]}[op]()
        regs[d] = r & 0xFFFFFFFF
    return regs["$0"], regs["$1"]



def test_ptx_text_bit_logic():
    """The inline PTX strings the GPU compiles (w4a8.UNPACK_PTX, w4a8.UNPACK_INT_PTX), evaluated instruction by
    instruction on every byte value: the same words as their Python twins, which the tests above hold to the
    definitions. So a typo in the asm text (a constant, a LUT, an operand) fails here, not first on a GPU."""
    lo, hi = w4a8.unpack_words_emulated(WORDS)
    assert [_run_ptx(w4a8.UNPACK_PTX.value, [wd]) for wd in WORDS] == list(zip(lo, hi))
    for q in (1, 2, 7, 15, 16):
        bias = (0x80808080 - q * 0x08080808) & 0xFFFFFFFF
        for q_hi in (q, 17 - q):  # the two halves' scales are separate operands (G = 32: two groups)
            lo, _ = w4a8.scaled_nibbles_emulated(WORDS, q)
            _, hi = w4a8.scaled_nibbles_emulated(WORDS, q_hi)
            bias_hi = (0x80808080 - q_hi * 0x08080808) & 0xFFFFFFFF
            got = [_run_ptx(w4a8.UNPACK_INT_PTX.value, [wd, q, bias, q_hi, bias_hi]) for wd in WORDS]
            assert got == list(zip(lo, hi)), (q, q_hi)


def test_bounds_agree():
    assert w4a8.MAX_INT_GROUP_SCALE == MAX_INT_GROUP_SCALE == w4a8.describe()["max_int_group_scale"]


def test_launcher_errors():
    g, m, n, k = 32, 4, 8, 64
    a, w, q, c, a_s, bias = _case(m, n, k, g, seed=3)
    wp = w4a8.pack_weight(ref.pack_int4(w), g)
    good = int_scales_to_kernel(q, c)
    run = lambda s: w4a8.gemm_w4a8(a, a_s, wp, s, bias, g, torch.float32)  # noqa: E731
    assert torch.isfinite(run(good)).all()
    for bad_q, match in ((0, r"\[1, 16\]"), (17, r"\[1, 16\]")):
        s = good.clone()
        s[0, 1] = bad_q
        with pytest.raises(ValueError, match=match):
            run(s)
    for bad_c in (float("nan"), float("inf"), -1.0, 0.0):
        s = good.clone()
        s[-1:].view(torch.float32)[0, 2] = bad_c
        with pytest.raises(ValueError, match="finite and positive"):
            run(s)
    with pytest.raises(ValueError, match=r"\[K // group_size \+ 1, N\] = \[3, N\]"):
        run(good[:-1].contiguous())  # the float scales' row count, as int32: the channel row is missing
    with pytest.raises(ValueError, match="contiguous"):
        run(torch.cat([good, good], dim=1)[:, ::2])
    with pytest.raises(TypeError, match="w_scale"):
        run(good.to(torch.int16))

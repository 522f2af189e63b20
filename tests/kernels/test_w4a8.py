"""The Triton W4A8 group-wise GEMM against the exact integer reference (interpreter on CPU, or a GPU).

Every case: fresh random int8 activations and int4 weights covering -8 and 7, random scales, output
poisoned with NaN before the call, checked by ``ditq.testing.assert_gemm_w4a8`` (fp32-rounding tolerance).
Shapes are ragged on purpose: M = 1, odd, more than one tile; N not a multiple of the tile; K a multiple of
the group but not of the step (BK) nor, for G = 32, of the pack block (the masked tail step)."""
import pytest
import torch

from ditq import testing
from ditq.kernels import w4a8
from ditq.quant import reference as ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _cfg(swap, bm=16, bn=16, bk=128):
    # small tiles: the interpreter's integer dot is NumPy matmul, run once per program
    return dict(BM=bm, BN=bn, BK=bk, GROUP_M=4, SWAP_AB=swap, UNPACK_ASM=False, num_warps=4, num_stages=2)


def _case(m, n, k, g, seed, per_token, with_bias, bias_dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    a = testing.random_int8(m, k, generator=gen)
    q = testing.random_int4(n, k, generator=gen)
    s = torch.rand(k // g, n, generator=gen) * 0.02 + 1e-4
    a_s = torch.rand(m if per_token else 1, generator=gen) * 0.05 + 1e-3
    bias = (torch.randn(n, generator=gen) * 4).to(bias_dtype) if with_bias else None
    return a, q, s, a_s, bias


def _run(a, q, s, a_s, bias, g, out_dtype, cfg):
    w = w4a8.pack_weight(ref.pack_int4(q), g)
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    out = torch.full((a.shape[0], q.shape[0]), float("nan"), dtype=out_dtype, device=DEVICE)
    ret = w4a8.gemm_w4a8(dev(a), dev(a_s), dev(w), dev(s), dev(bias), g, out_dtype, out=out, config=cfg)
    assert ret is out
    return out


# (M, N, K-in-groups): K = 3 groups is never a multiple of BK = 2 groups nor of G = 32's 64-k pack block
SHAPES = [(1, 17, 3), (7, 45, 3), (37, 33, 5)]


@pytest.mark.gpu  # also run on the GPU by benchmarks/gpu_suite.sh: code paths the GPU tables do not pick
@pytest.mark.parametrize("swap", [True, False], ids=["swap", "noswap"])
@pytest.mark.parametrize("g", [32, 64, 128, 256])
def test_matches_exact_reference(g, swap):
    for i, (m, n, groups) in enumerate(SHAPES):
        for j, out_dtype in enumerate(OUT_DTYPES):
            per_token, with_bias = (i + j) % 2 == 0, (i + 2 * j) % 3 != 0  # every combination across cases
            seed = 1000 * g + 100 * i + 10 * j + swap
            a, q, s, a_s, bias = _case(m, n, groups * g, g, seed, per_token, with_bias)
            bk = 128 if g < 256 else 256
            out = _run(a, q, s, a_s, bias, g, out_dtype, _cfg(swap, bk=bk))
            testing.assert_gemm_w4a8(out, a, a_s, q, s, g, bias,
                                     what=f"w4a8 G={g} swap={swap} {m}x{n}x{groups * g} {out_dtype} "
                                          f"per_token={per_token} bias={with_bias}")


def test_random_nibbles_cover_both_ends():
    _, q, _, _, _ = _case(1, 17, 96, 32, 0, False, False)
    assert int(q.min()) == -8 and int(q.max()) == 7


@pytest.mark.parametrize("swap", [True, False], ids=["swap", "noswap"])
def test_largest_partials_and_fp16_bias(swap):
    """|a| = 127 against w = -8 everywhere: the largest per-group partial (16 * 127 * 8 * 256 at G = 256,
    the bound the x16 trick relies on), plus a half-precision bias, bigger tiles and the tail of G = 32."""
    for g, k in ((256, 512), (32, 160)):
        m, n = 19, 40
        a = torch.where(torch.rand(m, k) < 0.5, 127, -127).to(torch.int8)
        a[0] = 127  # one row of pure maximum products
        q = torch.full((n, k), -8, dtype=torch.int8)
        q[1::2, ::3] = 7
        s = torch.rand(k // g, n) + 0.5
        a_s = torch.rand(m) + 0.5
        bias = torch.randn(n).to(torch.float16)
        out = _run(a, q, s, a_s, bias, g, torch.float32, _cfg(swap, bm=32, bn=32, bk=256))
        testing.assert_gemm_w4a8(out, a, a_s, q, s, g, bias, what=f"w4a8 extremes G={g}")


def test_the_largest_k():
    """K = MAX_K (FLUX.2-dev's widest input is 24576) with float group scales: 256 groups folded into fp32."""
    g, m, n, k = 128, 2, 3, w4a8.MAX_K
    a = torch.full((m, k), 127, dtype=torch.int8)
    a[1, ::2] = -127
    q = torch.full((n, k), -8, dtype=torch.int8)
    q[1, ::3] = 7
    gen = torch.Generator().manual_seed(3)
    s, a_s = torch.rand(k // g, n, generator=gen) + 0.5, torch.rand(m, generator=gen) + 0.5
    out = _run(a, q, s, a_s, None, g, torch.float32, _cfg(True, bk=1024))
    testing.assert_gemm_w4a8(out, a, a_s, q, s, g, None, what="w4a8 at MAX_K")


def test_shipped_table_and_strided_out():
    """No config given: the launcher picks from the tile table of this device (both M buckets); ``out`` may
    be a row-strided view, and the columns beside it stay untouched."""
    g = 64
    for m in (3, 40):
        a, q, s, a_s, bias = _case(m, 21, 3 * g, g, 7 + m, True, True)
        w = w4a8.pack_weight(ref.pack_int4(q), g)
        big = torch.full((m, 30), float("nan"), device=DEVICE)
        out = big[:, 4:25]
        w4a8.gemm_w4a8(a.to(DEVICE), a_s.to(DEVICE), w.to(DEVICE), s.to(DEVICE), bias.to(DEVICE), g,
                       torch.float32, out=out)
        testing.assert_gemm_w4a8(out, a, a_s, q, s, g, bias, what=f"w4a8 table M={m}")
        assert torch.isnan(big[:, :4]).all() and torch.isnan(big[:, 25:]).all()
        y = w4a8.gemm_w4a8(a.to(DEVICE), a_s.to(DEVICE), w.to(DEVICE), s.to(DEVICE), None, g, torch.bfloat16)
        assert y.dtype == torch.bfloat16 and y.shape == (m, 21)
        testing.assert_gemm_w4a8(y, a, a_s, q, s, g, None, what=f"w4a8 table M={m} bf16")


def test_launcher_errors():
    """The launcher is the kernel's only validation: every input it cannot take is refused, by name."""
    a, q, s, a_s, _ = _case(4, 16, 64, 32, 3, False, False)
    w = w4a8.pack_weight(ref.pack_int4(q), 32)
    f32 = torch.float32
    gemm = w4a8.gemm_w4a8
    bad = [
        (ValueError, "out must be", lambda: gemm(a, a_s, w, s, None, 32, f32, out=torch.empty(4, 15))),
        (ValueError, "out must be", lambda: gemm(a, a_s, w, s, None, 32, f32, out=torch.empty(4, 16).half())),
        (ValueError, "BK must be", lambda: gemm(a, a_s, w, s, None, 32, f32, config=_cfg(True, bk=32))),
        (ValueError, "lacks", lambda: gemm(a, a_s, w, s, None, 32, f32, config={"BM": 16})),
        # a misshaped packed weight: too few rows, or the canonical K // 2 bytes of a different K
        (ValueError, r"w must be uint8 \[N, K / 2\] = \[16, 32\]", lambda: gemm(a, a_s, w[:8], s, None, 32, f32)),
        (ValueError, r"w must be uint8 \[N, K / 2\] = \[16, 32\]",
         lambda: gemm(a, a_s, w.reshape(32, 16), s, None, 32, f32)),
        (ValueError, "group_size must be one of", lambda: gemm(a, a_s, w, s, None, 16, f32)),
        (ValueError, "group_size must be one of", lambda: gemm(a, a_s, w, s, None, True, f32)),
        (ValueError, "group_size 64 does not divide K = 32",
         lambda: gemm(a[:, :32].contiguous(), a_s, w, s, None, 64, f32)),
        (ValueError, "exceeds 32768", lambda: gemm(torch.zeros(1, 32768 + 32, dtype=torch.int8), a_s[:1],
                                                    torch.zeros(2, 16400, dtype=torch.uint8),
                                                    torch.ones(1025, 2), None, 32, f32)),
        (TypeError, "a must be int8", lambda: gemm(a.float(), a_s, w, s, None, 32, f32)),
        (ValueError, "a must be contiguous", lambda: gemm(a.t().contiguous().t(), a_s, w, s, None, 32, f32)),
        (TypeError, "w must be uint8", lambda: gemm(a, a_s, w.to(torch.int8), s, None, 32, f32)),
        (ValueError, "w must be contiguous",
         lambda: gemm(a, a_s, torch.zeros(16, 64, dtype=torch.uint8)[:, ::2], s, None, 32, f32)),
        (ValueError, r"w_scale must be \[K // group_size, N\] = \[2, N\]",
         lambda: gemm(a, a_s, w, s[:1], None, 32, f32)),
        (TypeError, "w_scale must be float32", lambda: gemm(a, a_s, w, s.double(), None, 32, f32)),
        (ValueError, r"a_scale must be float32 \[1\] or \[M\]",
         lambda: gemm(a, torch.ones(3), w, s, None, 32, f32)),
        (ValueError, r"bias must be float16, bfloat16, float32 \[N\] = \[16\]",
         lambda: gemm(a, a_s, w, s, torch.ones(15), 32, f32)),
        (TypeError, "out_dtype", lambda: gemm(a, a_s, w, s, None, 32, torch.int32)),
        (ValueError, "w is on meta but a is on cpu", lambda: gemm(a, a_s, w.to("meta"), s, None, 32, f32)),
        (ValueError, "16-byte aligned",
         lambda: gemm(a, a_s, torch.zeros(16 * 32 + 4, dtype=torch.uint8)[4:].view(16, 32), s, None, 32, f32)),
    ]
    for exc, msg, call in bad:
        with pytest.raises(exc, match=msg):
            call()


def test_unpack_asm_bit_logic():
    """The inline PTX of the GPU unpack (shl.b32 4; and.b32 0xF0F0F0F0), emulated bit for bit on 32-bit words
    holding every byte value: each byte becomes 16 * its signed low / high nibble, as int8. (The asm itself
    runs only on a GPU; this checks its logic, the GPU run checks the asm.)"""
    import struct

    all_bytes = bytes(range(256))
    words = list(struct.unpack("<64I", all_bytes)) + [0xFFFFFFFF, 0x80808080, 0x08080808, 0x7F7F7F7F]
    lo, hi = w4a8.unpack_words_emulated(words)
    as_int8 = lambda ws: torch.frombuffer(bytearray(struct.pack(f"<{len(ws)}I", *ws)), dtype=torch.int8)  # noqa
    b = torch.frombuffer(bytearray(struct.pack(f"<{len(words)}I", *words)), dtype=torch.uint8).to(torch.int16)
    signed = lambda v: v - ((v & 8) << 1)  # noqa: E731  4-bit two's complement
    assert torch.equal(as_int8(lo).to(torch.int16), 16 * signed(b & 0xF))
    assert torch.equal(as_int8(hi).to(torch.int16), 16 * signed(b >> 4))

"""The Hopper GEMMs (csrc/gemm_sm90.cuh: TMA, mbarriers, wgmma) run on CPU tensors by the SIMT emulator (backend
"cuda-emulated"): exact against the integer reference at ragged shapes (M = 1, odd N, K a multiple of 16 or of
the group but not of the 128-k stage), every Hopper tile, every W4 group size, output dtypes, bias / none,
static / per-token scales, under every fiber order x async-landing mode with the race checker on. A tile id
kSm90TileBase + i picks Hopper tile i directly; emulator_options(arch="sm_90a") makes the automatic choice pick
them as on an H100/H200. The binding poisons the output with NaN first."""
import pytest
import torch

from ditq import backends
from ditq.format import WeightFormat
from ditq.quant import reference as ref
from ditq.testing import assert_gemm_w4a8, assert_gemm_w8a8, random_int4, random_int8

BACKEND = "cuda-emulated"
BASE = 100  # kSm90TileBase, csrc/configs/gemm_tiles_sm90.h
_reason = backends.unavailable_reason(BACKEND, "cpu")
if _reason is None:
    import torch.ops  # noqa: F401
    from ditq.backends import cuda_backend
    if not hasattr(torch.ops.ditq_C, "gemm_sm90_tile_info"):
        _reason = "this build of the CUDA backend has no Hopper GEMMs"
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"backend {BACKEND!r} unavailable: {_reason}")


def _tiles(w4):
    if _reason is not None:
        return (BASE,)
    out = []
    while True:
        try:
            torch.ops.ditq_C.gemm_sm90_tile_info(BASE + len(out), w4)
        except (RuntimeError, ValueError):
            return tuple(BASE + i for i in range(len(out)))
        out.append(BASE + len(out))


W8_TILES, W4_TILES = _tiles(False), _tiles(True)


def _opts(**kw):
    from ditq.emulator import emulator_options
    return emulator_options(race_check=True, **kw)


def _inputs(m, n, k, *, w4_group=None, per_token=True, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = random_int8(m, k, generator=g)
    sa = (torch.rand(m if per_token else 1, generator=g) * 0.02 + 1e-3).float()
    b = (torch.randn(n, generator=g) * 4).float() if bias else None
    if w4_group is None:
        return a, sa, random_int8(n, k, low=-128, generator=g), (torch.rand(n, generator=g) * 0.01 + 1e-4).float(), b
    q = random_int4(n, k, generator=g)
    q[0, 0], q[-1, -1] = -8, 7  # both ends of the int4 range
    return a, sa, q, (torch.rand(k // w4_group, n, generator=g) * 0.05 + 1e-4).float(), b


def _w8a8(a, sa, w, sw, b, dtype, tile=None, splits=None):
    pw, ps = backends.get_backend(BACKEND, "cpu").prepare_weight(WeightFormat(8), w, sw)
    with cuda_backend.gemm_tile(tile, splits):
        return torch.ops.ditq.gemm_w8a8(a, sa, pw, ps, b, dtype, BACKEND)


def _w4a8(a, sa, q, ss, b, group, dtype, tile=None, splits=None):
    pw, ps = backends.get_backend(BACKEND, "cpu").prepare_weight(WeightFormat(4, group), ref.pack_int4(q), ss)
    with cuda_backend.gemm_tile(tile, splits):
        return torch.ops.ditq.gemm_w4a8(a, sa, pw, ps, b, group, dtype, BACKEND)


DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.mark.parametrize("tile", W8_TILES)
@pytest.mark.parametrize("shape", ((1, 9, 80), (70, 131, 176)))
def test_w8a8_sm90_exact(tile, shape):
    m, n, k = shape
    i = tile - BASE + shape[0]
    a, sa, w, sw, b = _inputs(m, n, k, per_token=i % 2 == 0, bias=i % 3 != 2, seed=i)
    dtype = DTYPES[i % 3]
    with _opts():
        y = _w8a8(a, sa, w, sw, b, dtype, tile)
    assert y.dtype == dtype and y.shape == (m, n)
    assert_gemm_w8a8(y, a, sa, w, sw, b, what=f"Hopper W8A8 tile {tile} {shape} {dtype}")


# K a multiple of the group but (for G < 128) not of the 128-k stage; G = 256 spans two stages.
W4_SHAPES = {32: (1, 9, 96), 64: (33, 67, 192), 128: (18, 33, 384), 256: (5, 7, 512)}


@pytest.mark.parametrize("tile", W4_TILES)
@pytest.mark.parametrize("group", sorted(W4_SHAPES))
def test_w4a8_sm90_exact(tile, group):
    m, n, k = W4_SHAPES[group]
    i = tile - BASE + group // 32
    a, sa, q, ss, b = _inputs(m, n, k, w4_group=group, per_token=i % 2 == 0, bias=i % 3 != 1, seed=group + tile)
    dtype = DTYPES[i % 3]
    with _opts():
        y = _w4a8(a, sa, q, ss, b, group, dtype, tile)
    assert y.dtype == dtype and y.shape == (m, n)
    assert_gemm_w4a8(y, a, sa, q, ss, group, b, what=f"Hopper W4A8 g{group} tile {tile} {(m, n, k)} {dtype}")


ORDERS = (("forward", 0), ("reverse", 0), ("random", 1), ("random", 2))
LANDINGS = ("issue", "wait")  # TMA bytes / wgmma results land at once, or at the latest wait that may see them


@pytest.mark.parametrize("order,seed", ORDERS)
@pytest.mark.parametrize("landing", LANDINGS)
def test_sm90_orders_and_landing(order, seed, landing):
    """A missing wait, a stage released too early, a wrong phase parity or a race on the ring shows up here:
    every schedule and landing time gives the same exact bits. Both kernels run 7 k tiles through a 6-stage
    ring, so every barrier's phase flips at least once and the first stage is refilled."""
    a, sa, w, sw, b = _inputs(19, 21, 880, seed=11)
    a4, sa4, q, ss, b4 = _inputs(19, 21, 896, w4_group=64, seed=12)
    a2, sa2, w2, sw2, b2 = _inputs(70, 130, 96, seed=13)  # two consumer warpgroups
    a5, sa5, q5, ss5, b5 = _inputs(70, 130, 160, w4_group=32, seed=14)
    with _opts(order=order, seed=seed, async_landing=landing):
        y8 = _w8a8(a, sa, w, sw, b, torch.float32, BASE)
        y4 = _w4a8(a4, sa4, q, ss, b4, 64, torch.float32, BASE + 1)
        y2 = _w8a8(a2, sa2, w2, sw2, b2, torch.float32, W8_TILES[-1])
        y5 = _w4a8(a5, sa5, q5, ss5, b5, 32, torch.float32, W4_TILES[-1])
    assert_gemm_w8a8(y8, a, sa, w, sw, b)
    assert_gemm_w4a8(y4, a4, sa4, q, ss, 64, b4)
    assert_gemm_w8a8(y2, a2, sa2, w2, sw2, b2)
    assert_gemm_w4a8(y5, a5, sa5, q5, ss5, 32, b5)


def test_sm90_automatic_choice_and_bigger_shape():
    """arch="sm_90a": the op's own choice runs the Hopper kernels (no tile forced), several CTAs each way and
    more k tiles than the ring has stages."""
    a, sa, w, sw, b = _inputs(130, 300, 1040, seed=5)
    a4, sa4, q, ss, b4 = _inputs(80, 136, 1280, w4_group=128, seed=6)
    with _opts(arch="sm_90a"):
        y8 = _w8a8(a, sa, w, sw, b, torch.bfloat16)
        y4 = _w4a8(a4, sa4, q, ss, b4, 128, torch.bfloat16)
    assert_gemm_w8a8(y8, a, sa, w, sw, b)
    assert_gemm_w4a8(y4, a4, sa4, q, ss, 128, b4)


@pytest.mark.parametrize("order, landing", [("forward", "wait"), ("random", "issue")])
def test_sm90_the_largest_k(order, landing):
    """K = MAX_K = 32768 on the Hopper kernels, unsplit and split: W8's int32 sum at its bound (|a| = 127 against
    w = -128), W4 g128 with float and with integer group scales (q * w = -128 too: q = 16, w = -8); in fiber order
    and shuffled, async copies landing at their wait and at their issue."""
    m, n, k = 2, 3, ref.MAX_K
    a = torch.full((m, k), 127, dtype=torch.int8)
    a[1, ::2] = -127
    w = torch.full((n, k), -128, dtype=torch.int8)
    w[1, ::3] = 127
    q = torch.full((n, k), -8, dtype=torch.int8)
    q[1, ::3] = 7
    sa, sw, ss = torch.rand(m) + 0.5, torch.rand(n) + 0.5, torch.rand(k // 128, n) + 0.5
    qs = torch.full((k // 128, n), 16, dtype=torch.int32)
    qs[::5, 2] = 3
    c = torch.rand(n) + 0.5
    pw = backends.get_backend(BACKEND, "cpu").prepare_weight(WeightFormat(4, 128), ref.pack_int4(q),
                                                             torch.ones(k // 128, n))[0]
    from ditq.emulator import emulator_options
    for splits in (1, None):
        with emulator_options(order=order, seed=7, arch="sm_90a", async_landing=landing):
            y8 = _w8a8(a, sa, w, sw, None, torch.float32, splits=splits)
            y4 = _w4a8(a, sa, q, ss, None, 128, torch.float32, splits=splits)
            y4i = torch.ops.ditq_C.gemm_w4a8i(a, sa, pw, qs, c, None, 128, torch.float32, -1,
                                               -1 if splits is None else splits)
        assert_gemm_w8a8(y8, a, sa, w, sw, None, what=f"sm90 W8A8 K = {k}, splits {splits}")
        assert_gemm_w4a8(y4, a, sa, q, ss, 128, None, what=f"sm90 W4A8 g128 K = {k}, splits {splits}")
        assert_gemm_w8a8(y4i, a, sa, ref.expand_int_group_scales(q, qs, 128), c, None,
                         what=f"sm90 W4A8 g128 integer scales K = {k}, splits {splits}")


def test_sm90_tile_tables():
    """What the kernels assume of configs/gemm_tiles_sm90.h (also static_asserts in gemm_sm90.cuh) and what an
    H100/H200 SM holds: 64 rows (W8) or 64 channels (W4) per consumer warpgroup, <= 227 KB of shared memory."""
    for w4, tiles in ((False, W8_TILES), (True, W4_TILES)):
        assert len(tiles) >= 2
        for t in tiles:
            bm, bn, bk, stages, consumers, threads, smem = torch.ops.ditq_C.gemm_sm90_tile_info(t, w4)
            assert bk == 128 and threads == 128 * (1 + consumers) and stages >= 2
            assert (bn if w4 else bm) == 64 * consumers
            assert smem == stages * (bm * 128 + bn * (64 if w4 else 128) + 16) <= 227 * 1024


def test_sm90_binding_checks():
    a, sa, w, sw, b = _inputs(4, 8, 64, seed=1)
    with pytest.raises(ValueError, match="split-K count"):  # one k unit (split-K: test_gemm_sm90_splitk_emulated.py)
        _w8a8(a, sa, w, sw, b, torch.float32, BASE, splits=2)
    with pytest.raises(ValueError, match="Hopper W8A8 table"):
        _w8a8(a, sa, w, sw, b, torch.float32, BASE + len(W8_TILES))
    info = torch.ops.ditq_C.gemm_sm90_tile_info(BASE, True)
    assert info[2] == 128 and info[5] == 128 * (1 + info[4])  # BK, threads = producer + consumer warpgroups

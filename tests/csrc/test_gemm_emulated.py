"""The CUDA GEMMs (csrc/gemm.cuh) run on CPU tensors by the SIMT emulator (backend "cuda-emulated"):
exact against the integer reference (ditq.testing) at ragged shapes, every tile of the table, with and
without split-K, every group size, output dtype, bias / none, static / per-token scales, under every fiber
order x cp.async mode with the shared-memory race checker on. The emulated binding poisons its output with NaN before the kernel runs, so an
element the kernel fails to write fails the check."""
import itertools

import pytest
import torch

from ditq import backends
from ditq.format import WeightFormat
from ditq.quant import reference as ref
from ditq.testing import assert_gemm_w4a8, assert_gemm_w8a8, random_int4, random_int8

BACKEND = "cuda-emulated"
_reason = backends.unavailable_reason(BACKEND, "cpu")
if _reason is None:
    from ditq.backends import cuda_backend
    if not hasattr(cuda_backend, "gemm_tile"):
        _reason = "this build of the CUDA backend has no GEMMs"
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"backend {BACKEND!r} unavailable: {_reason}")

if _reason is None:
    from ditq.emulator import emulator_options
    TILES = tuple(range(cuda_backend.gemm_tile_count()))
else:  # collected but skipped
    TILES = (0,)

ORDERS = (("forward", 0), ("reverse", 0), ("random", 1), ("random", 2))
CP_ASYNC_MODES = ("issue", "wait", "barrier")  # ditq.emulator.CP_ASYNC_MODES
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _inputs(m, n, k, *, w4_group=None, per_token=True, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = random_int8(m, k, generator=g)
    a_scale = (torch.rand(m if per_token else 1, generator=g) * 0.02 + 1e-3).float()
    b = (torch.randn(n, generator=g) * 4).float() if bias else None
    if w4_group is None:
        w = random_int8(n, k, low=-128, generator=g)
        w_scale = (torch.rand(n, generator=g) * 0.01 + 1e-4).float()
        return a, a_scale, w, w_scale, b
    q = random_int4(n, k, generator=g)
    w_scales = (torch.rand(k // w4_group, n, generator=g) * 0.05 + 1e-4).float()
    return a, a_scale, q, w_scales, b


def _w8a8(a, a_scale, w, w_scale, bias, out_dtype, tile=None, backend=BACKEND, splits=None):
    be = backends.get_backend(backend, "cpu")
    pw, ps = be.prepare_weight(WeightFormat(8), w, w_scale)
    with cuda_backend.gemm_tile(tile, splits):
        return torch.ops.ditq.gemm_w8a8(a, a_scale, pw, ps, bias, out_dtype, backend)


def _w4a8(a, a_scale, q, w_scales, bias, group, out_dtype, tile=None, backend=BACKEND, splits=None):
    be = backends.get_backend(backend, "cpu")
    pw, ps = be.prepare_weight(WeightFormat(4, group), ref.pack_int4(q), w_scales)
    with cuda_backend.gemm_tile(tile, splits):
        return torch.ops.ditq.gemm_w4a8(a, a_scale, pw, ps, bias, group, out_dtype, backend)


# Ragged shapes: M = 1 and M not a multiple of any BM; odd N; K a multiple of 16 (W8) or of the group (W4)
# but not of the tile's BK (64 or 128).
W8_SHAPES = ((1, 9, 80), (17, 33, 176), (70, 130, 48))
COMBOS = list(itertools.product(OUT_DTYPES, (True, False), (True, False)))  # dtype x bias x per-token


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("shape", W8_SHAPES)
def test_w8a8_exact(tile, shape):
    """splits 1 and the automatic count (as on a 132-SM GPU: split-K at these small grids); W8's int32
    partials make the split result identical to the unsplit one."""
    m, n, k = shape
    for i, (dtype, bias, per_token) in enumerate(COMBOS[tile::len(TILES)][:2]):
        a, sa, w, sw, b = _inputs(m, n, k, per_token=per_token, bias=bias, seed=13 * i + m + tile)
        with emulator_options(race_check=True):
            y = _w8a8(a, sa, w, sw, b, dtype, tile, splits=1)
            y_split = _w8a8(a, sa, w, sw, b, dtype, tile)
        assert y.dtype == dtype and y.shape == (m, n)
        assert_gemm_w8a8(y, a, sa, w, sw, b, what=f"W8A8 tile {tile} {shape} {dtype} bias={bias}")
        assert torch.equal(y_split, y), f"W8A8 tile {tile} {shape}: split-K changed the result"


@pytest.mark.parametrize("dtype,bias,per_token", COMBOS)
def test_w8a8_epilogue_variants(dtype, bias, per_token):
    """Every dtype x bias x scale mode through the op's own tile choice (M = 5: the small-M tile)."""
    a, sa, w, sw, b = _inputs(5, 31, 144, per_token=per_token, bias=bias, seed=3)
    with emulator_options(race_check=True):
        y = _w8a8(a, sa, w, sw, b, dtype)
    assert_gemm_w8a8(y, a, sa, w, sw, b)


W4_CASES = [(32, (1, 9, 96)), (32, (20, 40, 224)), (64, (33, 17, 192)), (64, (1, 64, 320)),
            (128, (18, 33, 384)), (256, (5, 7, 512))]


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("group,shape", W4_CASES)
def test_w4a8_exact(tile, group, shape):
    m, n, k = shape
    dtype, bias, per_token = COMBOS[(tile + 3 * W4_CASES.index((group, shape))) % len(COMBOS)]
    a, sa, q, ss, b = _inputs(m, n, k, w4_group=group, per_token=per_token, bias=bias, seed=group + m)
    q[0, 0], q[-1, -1] = -8, 7  # both ends of the int4 range
    for splits in (1, None):
        with emulator_options(race_check=True):
            y = _w4a8(a, sa, q, ss, b, group, dtype, tile, splits=splits)
        assert y.dtype == dtype and y.shape == (m, n)
        assert_gemm_w4a8(y, a, sa, q, ss, group, b, what=f"W4A8 g{group} tile {tile} {shape} {dtype} {splits}")


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("order,seed", ORDERS)
@pytest.mark.parametrize("cp_async", CP_ASYNC_MODES)
def test_fiber_orders_and_cp_async(tile, order, seed, cp_async):
    """Missing barriers, a wait on too few cp.async groups, or a shared-memory race show up here: every
    schedule must give the same (exact) bits."""
    a, sa, w, sw, b = _inputs(19, 21, 208, seed=11)
    a4, sa4, q, ss, b4 = _inputs(19, 21, 192, w4_group=64, seed=12)
    with emulator_options(order=order, seed=seed, cp_async=cp_async, race_check=True):
        y8 = _w8a8(a, sa, w, sw, b, torch.float32, tile)
        y4 = _w4a8(a4, sa4, q, ss, b4, 64, torch.float32, tile)
    assert_gemm_w8a8(y8, a, sa, w, sw, b)
    assert_gemm_w4a8(y4, a4, sa4, q, ss, 64, b4)
    with emulator_options():
        assert torch.equal(y8, _w8a8(a, sa, w, sw, b, torch.float32, tile))
        assert torch.equal(y4, _w4a8(a4, sa4, q, ss, b4, 64, torch.float32, tile))


def _extremes(m, n, k):
    """|a| = 127 against w = -128 (W8) / q = -8 (W4, x16 in the kernels) over all of k: int32 sums at their bound."""
    a = torch.full((m, k), 127, dtype=torch.int8)
    a[1:, ::2] = -127
    w = torch.full((n, k), -128, dtype=torch.int8)
    w[1, ::3] = 127
    q = torch.full((n, k), -8, dtype=torch.int8)
    q[1, ::3] = 7
    return a, w, q


@pytest.mark.parametrize("order, cp_async", [("forward", "wait"), ("reverse", "issue"), ("random", "barrier")])
def test_the_largest_k(order, cp_async):
    """K = MAX_K = 32768 (FLUX.2-dev's widest input is 24576), unsplit and split: 127 * 128 * 32768 = 5.3e8 in one
    int32 sum (W8), 256 groups folded (W4 g128); each fiber order, each cp.async landing mode."""
    m, n, k = 2, 3, ref.MAX_K
    a, w, q = _extremes(m, n, k)
    sa, sw, ss = torch.rand(m) + 0.5, torch.rand(n) + 0.5, torch.rand(k // 128, n) + 0.5
    for splits in (1, None):
        with emulator_options(order=order, seed=7, cp_async=cp_async):
            y8 = _w8a8(a, sa, w, sw, None, torch.float32, splits=splits)
            y4 = _w4a8(a, sa, q, ss, None, 128, torch.float32, splits=splits)
        assert_gemm_w8a8(y8, a, sa, w, sw, None, what=f"W8A8 K = {k}, splits {splits}")
        assert_gemm_w4a8(y4, a, sa, q, ss, 128, None, what=f"W4A8 g128 K = {k}, splits {splits}")


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_output_cast_is_round_to_nearest_even(dtype):
    """The kernel's own float -> bf16 / fp16 conversion equals torch's (RNE) on its fp32 result, bit for bit,
    including values past fp16's range (-> inf) and in its subnormals."""
    a, sa, w, sw, b = _inputs(33, 45, 96, seed=5)
    for scale in (1.0, 3e4, 1e-6):  # 3e4: many |y| > 65504; 1e-6: fp16 subnormals
        with emulator_options():
            y32 = _w8a8(a, sa * scale, w, sw, b * scale, torch.float32)
            y = _w8a8(a, sa * scale, w, sw, b * scale, dtype)
        assert torch.equal(y.view(torch.int16), y32.to(dtype).view(torch.int16))


def test_triton_agrees():
    if "triton" not in backends.available_backends("cpu"):
        pytest.skip(f"backend 'triton' unavailable on cpu: {backends.unavailable_reason('triton', 'cpu')}")
    a, sa, w, sw, b = _inputs(17, 33, 128, seed=21)
    a4, sa4, q, ss, b4 = _inputs(17, 33, 256, w4_group=128, seed=22)
    with emulator_options():
        y8 = _w8a8(a, sa, w, sw, b, torch.float32)
        y4 = _w4a8(a4, sa4, q, ss, b4, 128, torch.float32)
    t8 = _w8a8(a, sa, w, sw, b, torch.float32, backend="triton")
    t4 = _w4a8(a4, sa4, q, ss, b4, 128, torch.float32, backend="triton")
    # identical int32 sums; each epilogue is a few fp32 roundings of the terms' magnitude off the exact value,
    # so the two differ by at most the sum of both bounds
    assert_gemm_w8a8(t8, a, sa, w, sw, b, what="triton W8A8")
    assert_gemm_w4a8(t4, a4, sa4, q, ss, 128, b4, what="triton W4A8")
    mag8 = ref.gemm_w8a8_exact(a, sa, w, sw, b)[1]
    mag4 = ref.gemm_w4a8_exact(a4, sa4, q, ss, 128, b4)[1]
    assert bool(((y8.double() - t8.double()).abs() <= 2 * 4 * 2 ** -24 * mag8 + 1e-30).all())
    assert bool(((y4.double() - t4.double()).abs() <= 2 * (4 + 2 * 2) * 2 ** -24 * mag4 + 1e-30).all())


# ---- the binding's own checks (ops.py validates first; these guard direct calls to ditq._C) -------------

def test_binding_rejects_unaligned_and_bad_k():
    a, sa, w, sw, b = _inputs(4, 8, 64, seed=1)
    with pytest.raises(ValueError, match="multiple of 16"):
        _w8a8(a[:, :40].contiguous(), sa, w[:, :40].contiguous(), sw, b, torch.float32)
    buf = torch.empty(4 * 64 + 1, dtype=torch.int8)
    a_off = buf[1:].view(4, 64)
    a_off.copy_(a)
    with pytest.raises(ValueError, match="16-byte aligned"):
        _w8a8(a_off, sa, w, sw, b, torch.float32)


def test_binding_rejects_w4_weight_of_wrong_shape():
    # ops.py checks the weight's element count only; the kernel reads a [N, K // 2] matrix
    a, sa, q, ss, b = _inputs(2, 8, 64, w4_group=32, seed=2)
    with pytest.raises(ValueError, match="w must be"):
        with cuda_backend.gemm_tile(None):
            torch.ops.ditq.gemm_w4a8(a, sa, ref.pack_int4(q).reshape(-1), ss, b, 32, torch.float32, BACKEND)


def test_tile_choice():
    """Small M gets the 16-row memory-bound tile; every M gets a tile whose BM grows with M; pre-sm_80
    GPUs get none (the binding turns that into an error naming the architecture)."""
    bms = []
    for m in (1, 8, 16, 17, 64, 65, 256, 4096, 10 ** 6):
        for w4 in (False, True):
            for arch in (80, 86, 89, 90):
                t = cuda_backend.gemm_pick_tile(arch, m, w4)
                assert 0 <= t < len(TILES)
            bms.append(torch.ops.ditq_C.gemm_tile_info(cuda_backend.gemm_pick_tile(90, m, w4))[0])
    assert bms[0] == 16 and bms == sorted(bms)
    assert cuda_backend.gemm_pick_tile(75, 16, True) == -1


def test_grid_limit_and_empty_problems():
    w, sw = random_int8(8, 16), torch.rand(8)
    a = torch.empty(16 * 65535 + 1, 16, dtype=torch.int8)  # 65536 row tiles of the 16-row tile
    with pytest.raises(ValueError, match="65535 row tiles"):
        torch.ops.ditq_C.gemm_w8a8(a, torch.ones(1), w, sw, None, torch.float32, 0, 1)
    y = torch.ops.ditq_C.gemm_w8a8(a[:0], torch.ones(1), w, sw, None, torch.bfloat16)
    assert y.shape == (0, 8) and y.dtype == torch.bfloat16


def test_bad_split_and_tile_rejected():
    a, sa, w, sw, b = _inputs(3, 8, 64, seed=4)
    with pytest.raises(ValueError, match="split-K count"):
        torch.ops.ditq_C.gemm_w8a8(a, sa, w, sw, b, torch.float32, 0, 5)
    with pytest.raises(ValueError, match="tile"):
        torch.ops.ditq_C.gemm_w8a8(a, sa, w, sw, b, torch.float32, 99, 1)

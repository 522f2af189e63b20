"""The Hopper W4A8 GEMMs with integer group scales (csrc/gemm_sm90.cuh, ``ditq_C::gemm_w4a8i`` / ``_fused``) under
the SIMT emulator. The weight is s[n] * q[g, n] * w[n, k] with q in [1, 16]; the kernel unpacks q * w into the
wgmma's int8 A fragment and keeps one int32 sum over K, so its output must equal the Hopper W8A8 kernel's on the
expanded int8 weight q * w (``ditq.quant.reference.expand_int_group_scales``) bit for bit, and the exact integer
reference within fp32 rounding: every Hopper W4 tile and group size at ragged shapes, both ends of the int4 and q
ranges, forced split counts (int32 partials: the same bits for each), the fused epilogue, every fiber order x
async-landing mode with the race checker on; elsewhere (another architecture, an mma.sync tile, a float a) the
binding runs the float-scale kernels on q * c. The binding poisons the output with NaN first."""
import pytest
import torch

from ditq import backends
from ditq.format import WeightFormat, int_scales_to_kernel
from ditq.quant import reference as ref
from ditq.testing import assert_gemm_w4a8, assert_gemm_w8a8, random_int4, random_int8

from test_gemm_sm90_emulated import BACKEND, BASE, W4_TILES  # the Hopper tile ids, read from the build

_reason = backends.unavailable_reason(BACKEND, "cpu")
if _reason is None:
    import torch.ops  # noqa: F401
    from ditq.backends import cuda_backend  # noqa: F401  (loads ditq._C)
    if not hasattr(torch.ops.ditq_C, "gemm_w4a8i"):
        _reason = "this build of the CUDA backend has no integer-group-scale GEMMs"
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"backend {BACKEND!r} unavailable: {_reason}")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# K a multiple of the group but (for G < 128) not of the 128-k stage; G = 256 spans two stages.
SHAPES = {32: (1, 9, 96), 64: (33, 67, 192), 128: (18, 33, 384), 256: (5, 7, 512)}


def _opts(**kw):
    from ditq.emulator import emulator_options
    kw.setdefault("arch", "sm_90a")
    return emulator_options(race_check=True, **kw)


def _inputs(m, n, k, group, *, per_token=True, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = random_int8(m, k, generator=g)
    sa = (torch.rand(m if per_token else 1, generator=g) * 0.02 + 1e-3).float()
    w = random_int4(n, k, generator=g)
    w[0, 0], w[-1, -1] = -8, 7  # both ends of the int4 range
    qs = torch.randint(1, ref.MAX_INT_GROUP_SCALE + 1, (k // group, n), generator=g, dtype=torch.int32)
    qs[0, 0], qs[-1, -1] = ref.MAX_INT_GROUP_SCALE, 1  # both ends of q (with w = -8: q * w = -128)
    sc = (torch.rand(n, generator=g) * 0.01 + 1e-4).float()
    b = (torch.randn(n, generator=g) * 4).float() if bias else None
    return a, sa, w, qs, sc, b


def _packed(w, group):
    return backends.get_backend(BACKEND, "cpu").prepare_weight(WeightFormat(4, group), ref.pack_int4(w),
                                                               torch.ones(w.shape[1] // group, w.shape[0]))[0]


def _w4a8i(a, sa, w, qs, sc, b, group, dtype, tile=-1, splits=-1):
    return torch.ops.ditq_C.gemm_w4a8i(a, sa, _packed(w, group), qs, sc, b, group, dtype, tile, splits)


def _w8a8_expanded(a, sa, w, qs, sc, b, group, dtype):
    """The Hopper W8A8 kernel on the int8 weight q * w: what gemm_w4a8i must equal bit for bit."""
    wq = ref.expand_int_group_scales(w, qs, group)
    return torch.ops.ditq_C.gemm_w8a8(a, sa, wq, sc, b, dtype, BASE, -1)


@pytest.mark.parametrize("tile", W4_TILES)
@pytest.mark.parametrize("group", sorted(SHAPES))
def test_w4a8i_sm90_exact_and_equal_to_w8a8(tile, group):
    m, n, k = SHAPES[group]
    i = tile - BASE + group // 32
    a, sa, w, qs, sc, b = _inputs(m, n, k, group, per_token=i % 2 == 0, bias=i % 3 != 1, seed=group + tile)
    dtype = DTYPES[i % 3]
    with _opts():
        y = _w4a8i(a, sa, w, qs, sc, b, group, dtype, tile)
        y8 = _w8a8_expanded(a, sa, w, qs, sc, b, group, dtype)
    assert y.dtype == dtype and y.shape == (m, n)
    what = f"Hopper W4A8 integer scales g{group} tile {tile} {(m, n, k)} {dtype}"
    assert_gemm_w8a8(y, a, sa, ref.expand_int_group_scales(w, qs, group), sc, b, what=what)
    assert torch.equal(y.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       y8.view(torch.int16 if dtype != torch.float32 else torch.int32)), what


def test_w4a8i_sm90_split_counts_give_the_same_bits():
    """int32 partials: every forced split count (and the automatic schedule) gives identical output bits."""
    a, sa, w, qs, sc, b = _inputs(20, 70, 1024, 32, seed=3)
    with _opts(sm_count=4):
        ys = [_w4a8i(a, sa, w, qs, sc, b, 32, torch.float32, BASE, s) for s in (1, 2, 3, 8)]
        ys.append(_w4a8i(a, sa, w, qs, sc, b, 32, torch.float32))
    assert_gemm_w8a8(ys[0], a, sa, ref.expand_int_group_scales(w, qs, 32), sc, b)
    for y in ys[1:]:
        assert torch.equal(y.view(torch.int32), ys[0].view(torch.int32))


def test_w4a8i_sm90_group_larger_than_a_stage_split():
    """G = 256 spans two 128-k stages: a split starts on a group boundary, q follows the absolute k."""
    a, sa, w, qs, sc, b = _inputs(9, 66, 1536, 256, seed=4)
    with _opts(sm_count=2):
        y1 = _w4a8i(a, sa, w, qs, sc, b, 256, torch.float32, BASE, 1)
        y3 = _w4a8i(a, sa, w, qs, sc, b, 256, torch.float32, BASE, 3)
    assert_gemm_w8a8(y1, a, sa, ref.expand_int_group_scales(w, qs, 256), sc, b)
    assert torch.equal(y1.view(torch.int32), y3.view(torch.int32))


def test_w4a8i_sm90_fused_epilogue_equals_w8a8_fused():
    a, sa, w, qs, sc, b = _inputs(24, 70, 320, 64, per_token=False, seed=5)
    g = torch.Generator().manual_seed(6)
    gate = torch.randn(3, 70, generator=g)
    residual = torch.randn(24, 70, generator=g)
    out_scale = torch.tensor([0.05])
    wq = ref.expand_int_group_scales(w, qs, 64)
    with _opts():
        for gelu, gt, res, os_ in ((True, None, None, out_scale), (False, gate, residual, None)):
            y = torch.ops.ditq_C.gemm_w4a8i_fused(a, sa, _packed(w, 64), qs, sc, b, 64, gelu, gt, res, 8, os_,
                                                  torch.float32, BASE + 1, -1)
            y8 = torch.ops.ditq_C.gemm_w8a8_fused(a, sa, wq, sc, b, gelu, gt, res, 8, os_, torch.float32, BASE, -1)
            assert y.dtype == (torch.int8 if os_ is not None else torch.float32)
            assert not (y.dtype == torch.float32 and torch.isnan(y).any())
            assert torch.equal(y, y8), (gelu, gt is not None)


ORDERS = (("forward", 0), ("reverse", 0), ("random", 1), ("random", 2))
LANDINGS = ("issue", "wait")


@pytest.mark.parametrize("order,seed", ORDERS)
@pytest.mark.parametrize("landing", LANDINGS)
def test_w4a8i_sm90_orders_and_landing(order, seed, landing):
    """A unit's A registers rewritten while its wgmma is in flight, a stage released too early or a q read late
    shows up here: 7 k tiles through the smallest tile's ring (phases flip, the first stage is refilled), and two
    consumer warpgroups on the largest."""
    a, sa, w, qs, sc, b = _inputs(19, 21, 896, 32, seed=12)
    a2, sa2, w2, qs2, sc2, b2 = _inputs(70, 130, 160, 32, seed=14)
    with _opts(order=order, seed=seed, async_landing=landing):
        y = _w4a8i(a, sa, w, qs, sc, b, 32, torch.float32, BASE)
        y2 = _w4a8i(a2, sa2, w2, qs2, sc2, b2, 32, torch.float32, W4_TILES[-1])
    assert_gemm_w8a8(y, a, sa, ref.expand_int_group_scales(w, qs, 32), sc, b)
    assert_gemm_w8a8(y2, a2, sa2, ref.expand_int_group_scales(w2, qs2, 32), sc2, b2)


def test_w4a8i_binding_checks():
    a, sa, w, qs, sc, b = _inputs(4, 8, 64, 32, seed=1)
    pw = _packed(w, 32)
    op = torch.ops.ditq_C.gemm_w4a8i
    with _opts():
        for bad, match in ((qs.clone().fill_(17), r"\[1, 16\]"), (qs.clone().fill_(0), r"\[1, 16\]")):
            with pytest.raises(ValueError, match=match):
                op(a, sa, pw, bad, sc, b, 32, torch.float32, -1, -1)
        with pytest.raises(TypeError, match="w_qscale must be int32"):
            op(a, sa, pw, qs.to(torch.int16), sc, b, 32, torch.float32, -1, -1)
        with pytest.raises(ValueError, match="w_scale must be float32 \\[N\\]"):
            op(a, sa, pw, qs, torch.ones(2, 8), b, 32, torch.float32, -1, -1)
        with pytest.raises(ValueError, match="w_qscale \\[K // group_size, N\\]"):
            op(a, sa, pw, qs[:1].contiguous(), sc, b, 32, torch.float32, -1, -1)
        with pytest.raises(ValueError, match="group_size must be one of"):
            op(a, sa, pw, qs, sc, b, 48, torch.float32, -1, -1)
        with pytest.raises(ValueError, match=r"\[K // group_size \+ 1, N\]"):  # the packed form, one row short
            torch.ops.ditq_C.gemm_w4a8(a, sa, pw, qs, b, 32, torch.float32, -1, -1)
        with pytest.raises(TypeError, match="a must be int8"):  # float a: the fused op only
            op(a.float(), sa[:1], pw, qs, sc, b, 32, torch.float32, -1, -1)


def _kernel_form(qs, sc):
    return int_scales_to_kernel(qs, sc)


def test_w4a8i_elsewhere_runs_the_float_scale_kernels():
    """Where the Hopper kernels do not run (the emulator at sm_80 as on an A100, a forced mma.sync tile, a float a
    in the fused op), the binding hands q * c to the mma.sync kernels as float group scales: bit for bit gemm_w4a8
    with those scales, and the Hopper integer kernel's result to fp32 rounding."""
    a, sa, w, qs, sc, b = _inputs(21, 40, 256, 64, per_token=False, seed=8)
    pw, fs = _packed(w, 64), qs.float() * sc[None]
    with _opts():
        y_int = _w4a8i(a, sa, w, qs, sc, b, 64, torch.float32)
        y_forced = _w4a8i(a, sa, w, qs, sc, b, 64, torch.float32, 0)  # an mma.sync tile id
        y_float_tile0 = torch.ops.ditq_C.gemm_w4a8(a, sa, pw, fs, b, 64, torch.float32, 0, -1)
    with _opts(arch="sm_80"):
        y80 = _w4a8i(a, sa, w, qs, sc, b, 64, torch.float32)
        y80_float = torch.ops.ditq_C.gemm_w4a8(a, sa, pw, fs, b, 64, torch.float32, -1, -1)
        y80_packed = torch.ops.ditq_C.gemm_w4a8(a, sa, pw, _kernel_form(qs, sc), b, 64, torch.float32, -1, -1)
        xf = torch.randn(21, 256, generator=torch.Generator().manual_seed(9))
        y_fa = torch.ops.ditq_C.gemm_w4a8i_fused(xf, sa, pw, qs, sc, b, 64, False, None, None, 1, None,
                                                 torch.float32, -1, -1)
        qa, _ = torch.ops.ditq_C.quantize_act(xf, sa)  # what the float-A kernel quantizes on load
    assert torch.equal(y_forced, y_float_tile0) and torch.equal(y80, y80_float) and torch.equal(y80_packed, y80)
    assert_gemm_w8a8(y_int, a, sa, ref.expand_int_group_scales(w, qs, 64), sc, b)
    for y, act in ((y_forced, a), (y80, a), (y_fa, qa)):  # float group scales: a fold per group
        assert_gemm_w4a8(y, act, sa, w, fs, 64, b)


def test_w4a8_takes_the_kernel_form_of_integer_scales():
    """The layers' form (ditq.backends.cuda_layout.int_scales_to_kernel: int32 q rows, then the channel scales'
    bits) through the plain and fused gemm_w4a8: the same bits as gemm_w4a8i / _fused on the Hopper kernels."""
    a, sa, w, qs, sc, b = _inputs(17, 70, 384, 128, seed=10)
    pw, packed = _packed(w, 128), _kernel_form(qs, sc)
    with _opts():
        y = torch.ops.ditq_C.gemm_w4a8(a, sa, pw, packed, b, 128, torch.bfloat16, -1, -1)
        yi = torch.ops.ditq_C.gemm_w4a8i(a, sa, pw, qs, sc, b, 128, torch.bfloat16, -1, -1)
        yf = torch.ops.ditq_C.gemm_w4a8_fused(a, sa, pw, packed, b, 128, True, None, None, 1, None, torch.float32,
                                              -1, -1)
        yfi = torch.ops.ditq_C.gemm_w4a8i_fused(a, sa, pw, qs, sc, b, 128, True, None, None, 1, None, torch.float32,
                                                -1, -1)
    assert torch.equal(y.view(torch.int16), yi.view(torch.int16)) and torch.equal(yf, yfi)


def test_expand_int_group_scales_reference():
    w = torch.tensor([[-8, 7, 1, -1], [3, -3, 0, 2]], dtype=torch.int8)
    qs = torch.tensor([[16, 2], [1, 5]], dtype=torch.int32)  # [K // 2, N]
    assert ref.expand_int_group_scales(w, qs, 2).tolist() == [[-128, 112, 1, -1], [6, -6, 0, 10]]
    with pytest.raises(ValueError, match=r"\[1, 16\]"):
        ref.expand_int_group_scales(w, qs * 2, 2)
    with pytest.raises(ValueError, match="qscale must be"):
        ref.expand_int_group_scales(w, qs.t(), 4)

"""The CUDA GEMMs with the fused epilogue (ditq_C::gemm_w8a8_fused / gemm_w4a8_fused, csrc/gemm.cuh's
FusedEpilogue) under the SIMT emulator (backend "cuda-emulated").

How exactness is established: step 1 of the fused epilogue (y = acc * scales + bias) is the plain GEMM's
epilogue, so the fused op with no piece must equal the plain op bit for bit (the plain op is checked against
the exact integer reference in test_gemm_emulated.py, and here once more); every later step is then the
contract's fp32 operation applied to the plain op's fp32 output in torch, which the kernel must reproduce
bit for bit, except GELU, whose exp differs in its last bits between libraries (compared with the contract's
tolerance). The binding poisons the output (NaN, or -128 for int8: never a quantizer output) before the
kernel runs, so an element never written fails; the global-memory checker knows the exact extents of gate,
residual and out_scale. The Hopper kernels (csrc/gemm_sm90.cuh, which carry the same FusedEpilogue) run a fused
GEMM with an int8 a where a plain one would; they are checked the same way at the end of this file."""
import itertools
import json

import pytest
import torch

from ditq import backends
from ditq.format import WeightFormat
from ditq.quant import reference as ref
from ditq.testing import assert_gemm_w4a8, assert_gemm_w8a8, random_int4, random_int8

BACKEND = "cuda-emulated"
_reason = backends.unavailable_reason(BACKEND, "cpu")
if _reason is None and not hasattr(torch.ops.ditq_C, "gemm_w8a8_fused"):
    _reason = "this build of ditq._C has no fused GEMMs"
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"backend {BACKEND!r} unavailable: {_reason}")

if _reason is None:
    from ditq.backends import cuda_backend
    from ditq.emulator import emulator_options
    TILES = tuple(range(cuda_backend.gemm_tile_count()))
else:  # collected but skipped
    TILES = (0, 1, 2)

OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_IDS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
ORDERS = (("forward", 0), ("reverse", 0), ("random", 1), ("random", 2))
CP_ASYNC_MODES = ("issue", "wait", "barrier")


class Problem:
    """A random GEMM (W8, or W4 of group ``group``) in the cuda layout, with the unpacked weights kept for the
    exact reference."""

    def __init__(self, m, n, k, group=None, seed=0, bias=True, per_token=True):
        g = torch.Generator().manual_seed(seed)
        self.m, self.n, self.k, self.group = m, n, k, group
        self.a = random_int8(m, k, generator=g)
        self.sa = (torch.rand(m if per_token else 1, generator=g) * 0.02 + 1e-3).float()
        self.bias = (torch.randn(n, generator=g) * 4).float() if bias else None
        be = backends.get_backend(BACKEND, "cpu")
        if group is None:
            self.q = random_int8(n, k, low=-128, generator=g)
            self.sw = (torch.rand(n, generator=g) * 0.01 + 1e-4).float()
            self.w, self.ws = be.prepare_weight(WeightFormat(8), self.q, self.sw)
        else:
            self.q = random_int4(n, k, generator=g)
            self.sw = (torch.rand(k // group, n, generator=g) * 0.05 + 1e-4).float()
            self.w, self.ws = be.prepare_weight(WeightFormat(4, group), ref.pack_int4(self.q), self.sw)
        self.g = g

    def plain(self, out_dtype=torch.float32, tile=None, splits=None):
        with cuda_backend.gemm_tile(tile, splits):
            if self.group is None:
                return torch.ops.ditq.gemm_w8a8(self.a, self.sa, self.w, self.ws, self.bias, out_dtype, BACKEND)
            return torch.ops.ditq.gemm_w4a8(self.a, self.sa, self.w, self.ws, self.bias, self.group, out_dtype,
                                            BACKEND)

    def fused(self, gelu=False, gate=None, residual=None, rows_per_gate=1, out_scale=None,
              out_dtype=torch.float32, tile=-1, splits=-1):
        if self.group is None:
            return torch.ops.ditq_C.gemm_w8a8_fused(self.a, self.sa, self.w, self.ws, self.bias, gelu, gate, residual,
                                                    rows_per_gate, out_scale, out_dtype, tile, splits)
        return torch.ops.ditq_C.gemm_w4a8_fused(self.a, self.sa, self.w, self.ws, self.bias, self.group, gelu, gate,
                                                residual, rows_per_gate, out_scale, out_dtype, tile, splits)

    def assert_plain_exact(self, y, what):
        if self.group is None:
            assert_gemm_w8a8(y, self.a, self.sa, self.q, self.sw, self.bias, what=what)
        else:
            assert_gemm_w4a8(y, self.a, self.sa, self.q, self.sw, self.group, self.bias, what=what)

    def gate(self, rows_per_gate):
        return (torch.randn(self.m // rows_per_gate, self.n, generator=self.g) * 2).float()

    def residual(self, dtype):
        return (torch.randn(self.m, self.n, generator=self.g) * 3).to(dtype)


def gelu_tanh(y):
    """The contract's GELU in fp32 torch (diffusers' GELU(approximate="tanh"))."""
    return torch.nn.functional.gelu(y, approximate="tanh")


def epilogue(y, gelu=False, gate=None, residual=None, rows_per_gate=1, out_scale=None, out_dtype=torch.float32):
    """Steps 2-5 of the contract on the fp32 result of step 1, in fp32 torch: what the fused kernel computes."""
    if hasattr(ref, "gemm_epilogue"):
        return ref.gemm_epilogue(y, gelu, gate, residual, rows_per_gate, out_scale, out_dtype)
    y = y.float()
    if gelu:
        y = gelu_tanh(y)
    if gate is not None:
        y = y * gate.float().repeat_interleave(rows_per_gate, dim=0)
    if residual is not None:
        y = y + residual.float()
    if out_scale is not None:
        return ref.quantize_with_scale(y, out_scale, 127)
    return y.to(out_dtype)


def assert_equal(got, want, what):
    assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype} {got.shape} vs {want.shape}"
    if got.dtype == torch.int8:
        bad = got != want
    else:  # bitwise, NaN included
        bad = got.view(torch.int32 if got.dtype == torch.float32 else torch.int16) != \
            want.view(torch.int32 if want.dtype == torch.float32 else torch.int16)
    assert not bool(bad.any()), (f"{what}: {int(bad.sum())} of {bad.numel()} differ, first at "
                                 f"{bad.nonzero()[0].tolist()}: {got[bad][0].item()} vs {want[bad][0].item()}")


# Ragged shapes: M = 1 and M not a multiple of any BM; odd N; K a multiple of 16 (W8) or of the group (W4) but
# not of the tile's BK (64 or 128).
W8_SHAPES = ((1, 9, 80), (18, 33, 176), (70, 130, 48))
W4_CASES = ((32, (1, 9, 96)), (64, (20, 40, 192)), (128, (18, 33, 384)))


def _problems():
    for shape in W8_SHAPES:
        yield f"w8-{shape[0]}x{shape[1]}x{shape[2]}", None, shape
    for group, shape in W4_CASES:
        yield f"w4g{group}-{shape[0]}x{shape[1]}x{shape[2]}", group, shape


PROBLEMS = list(_problems())


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("pid,group,shape", PROBLEMS, ids=[p[0] for p in PROBLEMS])
def test_no_piece_is_the_plain_gemm(tile, pid, group, shape):
    """With no piece the fused kernel is the plain kernel, bit for bit, in every output dtype, split or not."""
    pr = Problem(*shape, group=group, seed=10 * PROBLEMS.index((pid, group, shape)) + tile, per_token=tile != 1,
                 bias=tile != 2)
    with emulator_options(race_check=True):
        for i, dtype in enumerate(OUT_DTYPES):
            splits = 1 if i == 0 else -1  # -1: the automatic count, split-K at these grids
            y = pr.fused(out_dtype=dtype, tile=tile, splits=splits)
            want = pr.plain(dtype, tile, None if splits < 0 else splits)
            assert_equal(y, want, f"{pid} tile {tile} {dtype} splits {splits}")
    pr.assert_plain_exact(pr.plain(torch.float32, tile, 1), what=f"{pid} tile {tile}")


# gate / residual dtype / int8 output, without GELU: exact. Every combination at one shape per weight kind,
# the tiles rotating so each combination meets more than one tile.
PIECES = [c for c in itertools.product((False, True), (None,) + OUT_DTYPES, (False, True)) if any(c[:1]) or
          c[1] is not None or c[2]]


def _piece_id(c):
    gate, res, quant = c
    return f"gate{int(gate)}-res_{DTYPE_IDS[res] if res is not None else 'none'}-q{int(quant)}"


@pytest.mark.parametrize("weights", ("w8", "w4g64"))
@pytest.mark.parametrize("pieces", PIECES, ids=[_piece_id(c) for c in PIECES])
def test_pieces_exact(weights, pieces):
    use_gate, res_dtype, quant = pieces
    i = PIECES.index(pieces)
    tile = TILES[i % len(TILES)]
    # odd N: element-wise loads and stores; even N: the paired 8- / 4- / 2-byte ones
    pr = Problem(18, 33 + (i % 4 >= 2), 192, group=None if weights == "w8" else 64, seed=100 + i, per_token=i % 3 == 0)
    rows_per_gate = (1, 6, 18)[i % 3]  # per row, per "sample" of 6 tokens, one gate for all
    gate = pr.gate(rows_per_gate) if use_gate else None
    out_dtype = res_dtype if res_dtype is not None else OUT_DTYPES[i % 3]
    residual = pr.residual(out_dtype) if res_dtype is not None else None
    out_scale = torch.tensor([0.05 + 0.01 * i], dtype=torch.float32) if quant else None
    with emulator_options(race_check=True):
        y32 = pr.plain(torch.float32, tile, 1)
        got = pr.fused(False, gate, residual, rows_per_gate, out_scale, out_dtype, tile, 1)
    want = epilogue(y32, False, gate, residual, rows_per_gate, out_scale, out_dtype)
    assert_equal(got, want, f"{weights} {_piece_id(pieces)} tile {tile}")
    if quant:  # saturation and rounding both exercised, and the result is quantize_act's
        assert bool((got.abs() == 127).any()) and bool((got.abs() < 127).any())
        with emulator_options():
            y_unfused = epilogue(y32, False, gate, residual, rows_per_gate)
            q_act, _ = torch.ops.ditq.quantize_act(y_unfused, out_scale, BACKEND)
        assert_equal(got, q_act, "fused int8 output vs quantize_act of the unfused result")


@pytest.mark.parametrize("weights", ("w8", "w4g32"))
def test_split_k_with_pieces(weights):
    """The epilogue runs once, in the CTA that reduces the splits: the same bits as its plain twin with the
    same split count."""
    pr = Problem(5, 70, 512, group=None if weights == "w8" else 32, seed=7)  # 4 k units of tile 0
    gate, residual = pr.gate(5), pr.residual(torch.bfloat16)
    scale = torch.tensor([0.08])
    with emulator_options(race_check=True):
        for splits in (2, 4):
            y32 = pr.plain(torch.float32, 0, splits)
            got = pr.fused(False, gate, residual, 5, None, torch.bfloat16, 0, splits)
            assert_equal(got, epilogue(y32, False, gate, residual, 5, None, torch.bfloat16), f"splits {splits}")
            got = pr.fused(False, gate, residual.float(), 5, scale, torch.float32, 0, splits)
            assert_equal(got, epilogue(y32, False, gate, residual.float(), 5, scale), f"int8 splits {splits}")


def _gelu_bound(y, gated, residual):
    """The contract's GELU tolerance (1e-5 relative) carried through the gate and the residual add, plus the
    literal formula's own error where 1 + tanh(u) cancels (y below about -4: an ulp of 1 times |y|)."""
    g = 1e-5 * gated.abs() + 2.0 ** -23 * y.abs()
    return g * (1 if residual is None else 2) + 2.0 ** -23 * (0 if residual is None else residual.float().abs())


@pytest.mark.parametrize("weights", ("w8", "w4g128"))
def test_gelu(weights):
    """GELU alone (fp32 out) and with every other piece (bf16 out, int8 out): within the contract's
    tolerance of torch's GELU; int8 off by one only where the fp32 value lies that close to a rounding
    boundary."""
    pr = Problem(17, 45, 256, group=None if weights == "w8" else 128, seed=31)
    pr.sa *= 20  # |y| up to ~10: both tails of GELU, and values near 0
    with emulator_options(race_check=True):
        y32 = pr.plain(torch.float32, None, 1)
        got = pr.fused(True, out_dtype=torch.float32, splits=1)
    assert float(y32.min()) < -5 and float(y32.max()) > 5
    want = gelu_tanh(y32)
    err = (got.double() - want.double()).abs()
    assert bool((err <= _gelu_bound(y32, want, None).double()).all()), float((err / want.abs().double()).max())

    gate, residual = pr.gate(17), pr.residual(torch.float32)
    with emulator_options():
        got = pr.fused(True, gate, residual, 17, None, torch.float32, splits=1)
    want = epilogue(y32, True, gate, residual, 17)
    bound = _gelu_bound(y32, gelu_tanh(y32) * gate.float(), residual).double()
    assert bool(((got.double() - want.double()).abs() <= bound).all())

    out_scale = torch.tensor([0.03])
    with emulator_options():
        q = pr.fused(True, gate, residual, 17, out_scale, torch.float32, splits=1)
    qwant = epilogue(y32, True, gate, residual, 17, out_scale)
    v = want.double() / float(out_scale)  # the fp32 value each q rounds
    off = (q.int() - qwant.int()).abs()
    near = ((v - v.floor() - 0.5).abs() <= bound / float(out_scale)) & (v.abs() < 127.5)
    assert bool((off <= 1).all()) and bool((off == 0)[~near].all()), int((off > 0).sum())


@pytest.mark.parametrize("order,seed", ORDERS)
@pytest.mark.parametrize("cp_async", CP_ASYNC_MODES)
def test_fiber_orders_and_cp_async(order, seed, cp_async):
    """Every schedule x cp.async landing mode gives the same (exact) bits, race checker on; the tiles
    rotate over the combinations."""
    tile = TILES[(ORDERS.index((order, seed)) + CP_ASYNC_MODES.index(cp_async)) % len(TILES)]
    p8, p4 = Problem(19, 21, 208, seed=11), Problem(19, 21, 192, group=64, seed=12)
    with emulator_options():
        ref8, ref4 = p8.plain(torch.float32, tile), p4.plain(torch.float32, tile)
    for pr, y32 in ((p8, ref8), (p4, ref4)):
        gate, residual, scale = pr.gate(19), pr.residual(torch.float16), torch.tensor([0.1])
        with emulator_options(order=order, seed=seed, cp_async=cp_async, race_check=True):
            got = pr.fused(False, gate, residual, 19, None, torch.float16, tile)
            q = pr.fused(False, gate, residual, 19, scale, torch.float16, tile)
        assert_equal(got, epilogue(y32, False, gate, residual, 19, None, torch.float16), f"tile {tile}")
        assert_equal(q, epilogue(y32, False, gate, residual, 19, scale), f"int8 tile {tile}")


def test_non_finite_values_follow_quantize_act():
    """int8 output: NaN -> 0, +-inf -> +-127 (as quantize_act's static path); float output keeps them."""
    pr = Problem(4, 10, 64, seed=3)
    residual = pr.residual(torch.float32)
    residual[0, 0], residual[1, 3], residual[2, 5] = float("nan"), float("inf"), -float("inf")
    gate = pr.gate(2)
    gate[1, 7] = float("inf")  # rows 2, 3 column 7: +-inf, or NaN where y is 0... y is never exactly 0 here
    scale = torch.tensor([0.5])
    with emulator_options():
        y32 = pr.plain(torch.float32, None, 1)
        q = pr.fused(False, gate, residual, 2, scale)
        y = pr.fused(False, gate, residual, 2, None, torch.float32)
    assert_equal(q, epilogue(y32, False, gate, residual, 2, scale), "int8")
    assert_equal(y, epilogue(y32, False, gate, residual, 2), "fp32")
    assert q[0, 0] == 0 and q[1, 3] == 127 and q[2, 5] == -127 and q[2, 7].abs() == 127
    assert y[0, 0].isnan() and y[1, 3] == float("inf") and y[2, 5] == -float("inf")


# ---- the binding's checks (direct calls to ditq_C), in the words of ditq.ops's checks of the same arguments ----

@pytest.mark.parametrize("case", ("rpg0", "rpg_not_dividing", "gate_shape", "gate_int", "gate_noncontig",
                                  "res_dtype", "res_shape", "res_noncontig", "res_device", "scale_dtype", "scale_shape", "scale_negative", "scale_nan",
                                  "scale_inf"))
def test_bad_inputs(case):
    pr = Problem(6, 8, 64, seed=9)
    gate, residual, rpg, scale = None, None, 1, None
    dtype = torch.float32
    exc, match = ValueError, None
    if case == "rpg0":
        gate, rpg, match = pr.gate(1), 0, "rows_per_gate must be an int >= 1"
    elif case == "rpg_not_dividing":
        gate, rpg, match = pr.gate(1)[:1], 4, "M = 6 must be a multiple of rows_per_gate = 4"
    elif case == "gate_shape":
        gate, rpg, match = pr.gate(1), 2, r"gate must be \[M // rows_per_gate, N\] = \[3, 8\]"
    elif case == "gate_int":
        gate, exc, match = torch.ones(6, 8, dtype=torch.int32), TypeError, "gate must be float16, bfloat16, float32"
    elif case == "res_dtype":
        residual, dtype, exc, match = pr.residual(torch.float16), torch.bfloat16, TypeError, "residual must be bfloat16; got float16"
    elif case == "res_shape":
        residual, match = pr.residual(torch.float32)[:5], r"residual must be \[M, N\] = \[6, 8\]"
    elif case == "res_noncontig":
        residual, match = torch.randn(8, 6).t(), "residual must be contiguous"
    elif case == "gate_noncontig":
        gate, match = torch.randn(8, 6).t(), "gate must be contiguous"
    elif case == "res_device":  # the dispatcher sends a call with a meta tensor to the fake, which checks this
        backends.get_backend(BACKEND, "cpu").kernel_ops()  # (the backend registers its fakes with its ops)
        residual, match = torch.randn(6, 8, device="meta"), "residual is on meta but the activations are on cpu"
    elif case == "scale_dtype":
        scale, exc, match = torch.tensor([0.5], dtype=torch.float64), TypeError, "out_scale must be float32"
    elif case == "scale_shape":
        scale, match = torch.tensor([0.5, 0.5]), r"out_scale must be a static scale, float32 \[1\]"
    else:
        value = {"scale_negative": -0.5, "scale_nan": float("nan"), "scale_inf": float("inf")}[case]
        scale, match = torch.tensor([value]), "positive and finite"
    with pytest.raises(exc, match=match):
        pr.fused(False, gate, residual, rpg, scale, dtype)
    p4 = Problem(6, 8, 64, group=32, seed=9)
    with pytest.raises(exc, match=match):
        p4.fused(False, gate, residual, rpg, scale, dtype)


def test_kernel_ops_and_fakes():
    """The cuda-emulated backend hands the fused ops to layers, and torch.compile's fake tensors get the
    right shapes and dtypes (int8 with an out_scale)."""
    be = backends.get_backend(BACKEND, "cpu")
    ops = be.kernel_ops()
    for name in ("gemm_w8a8_fused", "gemm_w4a8_fused", "norm_modulate_quantize"):
        if name in type(ops)._fields:
            assert getattr(ops, name) is getattr(torch.ops.ditq_C, name).default
    pr = Problem(3, 5, 32, seed=1)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        a, sa, w, ws = (mode.from_tensor(t) for t in (pr.a, pr.sa, pr.w, pr.ws))
        y = torch.ops.ditq_C.gemm_w8a8_fused(a, sa, w, ws, None, True, None, None, 1, mode.from_tensor(
            torch.ones(1)), torch.bfloat16)
        assert y.shape == (3, 5) and y.dtype == torch.int8
        y = torch.ops.ditq_C.gemm_w8a8_fused(a, sa, w, ws, None, True, None, None, 1, None, torch.bfloat16)
        assert y.dtype == torch.bfloat16


def test_generic_ops_run_these_kernels():
    """torch.ops.ditq.gemm_*_fused(..., "cuda-emulated") is this backend's kernel, and the kernel ops it hands
    layers are the ditq_C ops themselves."""
    for group in (None, 32):
        pr = Problem(6, 10, 64, group=group, seed=2)
        gate, residual, scale = pr.gate(3), pr.residual(torch.bfloat16), torch.tensor([0.07])
        for out_scale in (None, scale):
            with emulator_options():
                want = pr.fused(True, gate, residual, 3, out_scale, torch.bfloat16)
                if group is None:
                    got = torch.ops.ditq.gemm_w8a8_fused(pr.a, pr.sa, pr.w, pr.ws, pr.bias, True, gate, residual, 3,
                                                         out_scale, torch.bfloat16, BACKEND)
                else:
                    got = torch.ops.ditq.gemm_w4a8_fused(pr.a, pr.sa, pr.w, pr.ws, pr.bias, group, True, gate,
                                                         residual, 3, out_scale, torch.bfloat16, BACKEND)
            assert_equal(got, want, f"generic op, group {group}, int8 {out_scale is not None}")


# ---- the Hopper kernels (csrc/gemm_sm90.cuh with FusedEpilogue) -------------------------------------------------
# An int8 `a` runs them exactly when the plain op would: a forced Hopper tile id (kSm90TileBase + i), or the
# automatic choice under emulator_options(arch="sm_90a"). Their epilogue is the same FusedEpilogue after the
# Hopper main loop, so each piece is checked on every Hopper tile (and W4 group size) against the contract
# applied in torch to the plain Hopper op's fp32 output (itself exact against the integer reference).

SM90_BASE = 100  # kSm90TileBase, csrc/configs/gemm_tiles_sm90.h


def _sm90_tiles(w4):
    if _reason is not None:
        return (SM90_BASE,)
    out = []
    while True:
        try:
            torch.ops.ditq_C.gemm_sm90_tile_info(SM90_BASE + len(out), w4)
        except (RuntimeError, ValueError):
            return tuple(SM90_BASE + i for i in range(len(out)))
        out.append(SM90_BASE + len(out))


def _w4_groups():
    if _reason is not None:
        return (32,)
    return tuple(json.loads(torch.ops.ditq_C.kernel_families())["gemm_w4a8"]["group_sizes"])


# K a multiple of the group but, below G = 128, not of the 128-k stage (G = 256: two stages per group).
SM90_K = {None: 176, 32: 96, 64: 192, 128: 384, 256: 512}
SM90_CASES = [(f"w8-t{t}", None, t) for t in _sm90_tiles(False)] + \
             [(f"w4g{g}-t{t}", g, t) for g in _w4_groups() for t in _sm90_tiles(True)]


@pytest.mark.parametrize("cid,group,tile", SM90_CASES, ids=[c[0] for c in SM90_CASES])
def test_sm90_pieces_exact(cid, group, tile):
    """Every piece on a forced Hopper tile: none (the plain Hopper kernel bit for bit), gate with
    rows_per_gate > 1 + bf16 residual + bias, fp32 residual + int8 output, GELU (fp32 out, and with gate,
    residual and int8 out: the mma.sync fused kernel's bits, the same emulated expf). M = 1 and M = 18, odd N
    (and an even one: the paired loads and stores), K not a multiple of the 128-k stage below G = 128."""
    i = SM90_CASES.index((cid, group, tile))
    k = SM90_K[group]
    p1 = Problem(1, 9 + 2 * (i % 3), k, group=group, seed=300 + i, bias=False)
    p18 = Problem(18, 33 + 7 * (i % 2), k, group=group, seed=400 + i, per_token=i % 3 != 1)
    with emulator_options(race_check=True):
        y1 = p1.plain(torch.float32, tile, 1)
        y18 = p18.plain(torch.float32, tile, 1)
        none32 = p1.fused(out_dtype=torch.float32, tile=tile, splits=1)
        none16 = p1.fused(out_dtype=torch.float16, tile=tile, splits=1)
        want16 = p1.plain(torch.float16, tile, 1)
    p1.assert_plain_exact(y1, what=f"{cid} plain M=1")
    p18.assert_plain_exact(y18, what=f"{cid} plain M=18")
    assert_equal(none32, y1, f"{cid} no piece fp32")
    assert_equal(none16, want16, f"{cid} no piece fp16")

    gate6, res16 = p18.gate(6), p18.residual(torch.bfloat16)
    gate1, res32 = p1.gate(1), p1.residual(torch.float32)
    scale = torch.tensor([0.04 + 0.01 * (i % 4)], dtype=torch.float32)
    with emulator_options(race_check=True):
        got = p18.fused(False, gate6, res16, 6, None, torch.bfloat16, tile, 1)
        q = p1.fused(False, gate1, res32, 1, scale, torch.float32, tile, 1)
    assert_equal(got, epilogue(y18, False, gate6, res16, 6, None, torch.bfloat16), f"{cid} gate6 + bf16 residual")
    assert_equal(q, epilogue(y1, False, gate1, res32, 1, scale), f"{cid} fp32 residual + int8 out")

    gate3, res18 = p18.gate(3), p18.residual(torch.float32)
    with emulator_options(race_check=True):
        g32 = p18.fused(True, out_dtype=torch.float32, tile=tile, splits=1)
        gq = p18.fused(True, gate3, res18, 3, scale, torch.float32, tile, 1)
        mma_gq = p18.fused(True, gate3, res18, 3, scale, torch.float32, 0, 1)  # an mma.sync tile
    want = gelu_tanh(y18)
    assert bool(((g32.double() - want.double()).abs() <= _gelu_bound(y18, want, None).double()).all()), cid
    assert_equal(gq, mma_gq, f"{cid} GELU + gate3 + fp32 residual + int8 out vs the mma.sync kernel")
    assert bool((gq.abs() == 127).any()) and bool((gq.abs() < 127).any()), "saturation and rounding both seen"


def test_sm90_automatic_choice():
    """Under arch="sm_90a" the op's own choice (tile and splits automatic) runs the Hopper tile a plain call
    would: its bits are the forced Hopper tile's with its automatic split count. The W4 problem tells the two
    paths apart: both split K here, in the same 128-k units, but into different counts (9 tiles of 64 channels:
    the Hopper rule fits one wave, 14 splits; the mma.sync rule two, 16), so their fp32 bits differ."""
    for group in (None, 32):
        pr = Problem(8, 576, 2048, group=group, seed=21)
        gate, residual = pr.gate(4), pr.residual(torch.float32)
        forced = SM90_BASE  # M = 8: kSm90TileRules' first rule (M <= 16) picks Hopper tile 0, W8 and W4 alike
        with emulator_options(race_check=True, arch="sm_90a"):
            auto = pr.fused(False, gate, residual, 4, None, torch.float32)
        with emulator_options(race_check=True):
            hopper = pr.fused(False, gate, residual, 4, None, torch.float32, forced)
            mma_split = pr.fused(False, gate, residual, 4, None, torch.float32)  # sm_80: mma.sync, split-K
        assert_equal(auto, hopper, f"group {group}: automatic choice under sm_90a vs Hopper tile {forced}")
        if group is not None:
            assert not torch.equal(auto, mma_split), "the mma.sync split-K result is the same bits: no proof"


ORDER_LANDINGS = [(o, s, landing) for o, s in ORDERS for landing in ("issue", "wait")]


@pytest.mark.parametrize("order,seed,landing", ORDER_LANDINGS, ids=[f"{o}{s}-{l}" for o, s, l in ORDER_LANDINGS])
def test_sm90_fiber_orders_and_landing(order, seed, landing):
    """Every schedule x async-landing mode, race checker on, two consumer warpgroups: the same exact bits."""
    p8 = Problem(19, 21, 272, seed=31)
    p4 = Problem(19, 21, 320, group=32, seed=32)
    for pr, tile in ((p8, _sm90_tiles(False)[-1]), (p4, _sm90_tiles(True)[-1])):
        with emulator_options():
            y32 = pr.plain(torch.float32, tile, 1)
        gate, residual, scale = pr.gate(19), pr.residual(torch.float16), torch.tensor([0.1])
        with emulator_options(order=order, seed=seed, async_landing=landing, race_check=True):
            got = pr.fused(False, gate, residual, 19, None, torch.float16, tile, 1)
            q = pr.fused(False, gate, residual, 19, scale, torch.float16, tile, 1)
        assert_equal(got, epilogue(y32, False, gate, residual, 19, None, torch.float16), f"tile {tile}")
        assert_equal(q, epilogue(y32, False, gate, residual, 19, scale), f"int8 tile {tile}")


def test_sm90_binding_checks():
    """A forced Hopper tile splits K into at most its k units, must be in the table, and a float `a` (quantized on
    load, which TMA cannot do) never runs one."""
    for group in (None, 64):
        pr = Problem(6, 8, 128, group=group, seed=9)
        with pytest.raises(ValueError, match=r"split-K count must be in \[1, 1\]"):
            pr.fused(tile=SM90_BASE, splits=2)
        n_tiles = len(_sm90_tiles(group is not None))
        with pytest.raises(ValueError, match="is not in the Hopper"):
            pr.fused(tile=SM90_BASE + n_tiles)
        x = torch.randn(6, 128)
        with pytest.raises(ValueError, match="a float a runs on GEMM tile"):
            if group is None:
                torch.ops.ditq_C.gemm_w8a8_fused(x, torch.tensor([0.02]), pr.w, pr.ws, None, False, None, None, 1,
                                                 None, torch.float32, SM90_BASE, -1)
            else:
                torch.ops.ditq_C.gemm_w4a8_fused(x, torch.tensor([0.02]), pr.w, pr.ws, None, group, False, None,
                                                 None, 1, None, torch.float32, SM90_BASE, -1)

"""The CUDA fused GEMMs given a float A with a static scale (csrc/gemm_fused_float_a.cu, gemm.cuh's
FloatATileLoader: A quantized as it is loaded) under the SIMT emulator (backend "cuda-emulated").

How exactness is established: the contract (ditq.ops) says the result equals quantize_act(a, a_scale) followed by
the int8 fused op bit for bit, every epilogue piece included; the int8 fused op is itself checked against the
exact integer reference (test_gemm_fused_emulated.py). So every case here compares the float-A call with
quantize_act + the int8 fused kernel of the same tile and split count (a W4 result depends on the split count
through its fp32 group sums), with torch.equal. Inputs hold exact .5 ties of x / s, values past +-127 s, NaN
and +-inf; the binding poisons the output (NaN, or -128 for int8) before the kernel runs; the global-memory
checker knows A's exact extent in float elements, so a read past M or K is reported."""
import pytest
import torch

from ditq import backends
from ditq.format import WeightFormat
from ditq.quant import reference as ref
from ditq.testing import random_int4, random_int8

BACKEND = "cuda-emulated"
_reason = backends.unavailable_reason(BACKEND, "cpu")
if _reason is None and not backends.get_backend(BACKEND, "cpu").kernel_ops().fused_gemm_float_a:
    _reason = "this build of ditq._C has no float-A fused GEMMs"
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"backend {BACKEND!r} unavailable: {_reason}")

if _reason is None:
    from ditq.backends import cuda_backend
    from ditq.emulator import emulator_options

SCALE = 0.0625  # a power of two: (j + 0.5) * SCALE is an exact tie of x / s in every float dtype
A_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
ORDERS = (("forward", 0), ("reverse", 0), ("random", 1), ("random", 2))
CP_ASYNC_MODES = ("issue", "wait", "barrier")


def float_a(m, k, dtype, gen):
    """Random values, exact ties of x / s, values past +-127 s, NaN and +-inf (all converted exactly to fp32
    by the kernel: ties stay ties in bf16 / fp16, whose 8 / 11 bits hold (j + 0.5) / 16 for |j| < 90)."""
    x = torch.randn(m, k, generator=gen) * 30 * SCALE
    ties = (torch.randint(-90, 90, (m, k), generator=gen).float() + 0.5) * SCALE
    x = torch.where(torch.rand(m, k, generator=gen) < 0.4, ties, x)
    x = torch.where(torch.rand(m, k, generator=gen) < 0.05, x * 50, x)
    idx = torch.randperm(m * k, generator=gen)[:4]
    x.view(-1)[idx] = torch.tensor([float("nan"), float("inf"), float("-inf"), float("nan")])
    return x.to(dtype)


class Problem:
    """A random fused GEMM with a float A: W8, or W4 of group ``group``, in the cuda layout."""

    def __init__(self, m, n, k, group, a_dtype, seed):
        g = torch.Generator().manual_seed(seed)
        self.m, self.n, self.k, self.group, self.g = m, n, k, group, g
        self.x = float_a(m, k, a_dtype, g)
        self.s = torch.tensor([SCALE])
        self.bias = (torch.randn(n, generator=g) * 4).float()
        be = backends.get_backend(BACKEND, "cpu")
        if group is None:
            q, sw = random_int8(n, k, low=-128, generator=g), (torch.rand(n, generator=g) * 0.01 + 1e-4).float()
            self.w, self.ws = be.prepare_weight(WeightFormat(8), q, sw)
        else:
            q, sw = random_int4(n, k, generator=g), (torch.rand(k // group, n, generator=g) * 0.05 + 1e-4).float()
            self.w, self.ws = be.prepare_weight(WeightFormat(4, group), ref.pack_int4(q), sw)
        self.tile = torch.ops.ditq_C.gemm_pick_tile(80, 1, group is not None)  # float_a_tile: smallest-M's

    def pieces(self, combo, out_dtype):
        """(gelu, gate, residual, rows_per_gate, out_scale, out_dtype) of a named combination."""
        if combo == "plain":
            return False, None, None, 1, None, out_dtype
        if combo == "gate-residual":
            return (False, torch.randn(1, self.n, generator=self.g) * 2, torch.randn(self.m, self.n, generator=self.g)
                    .to(out_dtype) * 3, self.m, None, out_dtype)
        assert combo == "gelu-quant"
        return True, None, None, 1, torch.tensor([0.05]), out_dtype

    def call(self, a, a_scale, pieces, tile=-1, splits=-1):
        if self.group is None:
            return torch.ops.ditq_C.gemm_w8a8_fused(a, a_scale, self.w, self.ws, self.bias, *pieces, tile, splits)
        return torch.ops.ditq_C.gemm_w4a8_fused(a, a_scale, self.w, self.ws, self.bias, self.group, *pieces, tile,
                                                splits)

    def check(self, pieces, what, splits=-1):
        """The float-A call == quantize_act + the int8 fused kernel (same tile, same splits), bit for bit."""
        got = self.call(self.x, self.s, pieces, -1, splits)
        q, qs = torch.ops.ditq.quantize_act(self.x, self.s, BACKEND)
        assert q.abs().max() == 127 and bool(q[self.x.float().isnan()].eq(0).all())  # saturation, NaN -> 0
        want = self.call(q, qs, pieces, self.tile, splits)
        assert got.dtype == want.dtype and got.shape == want.shape, what
        assert torch.equal(got, want), f"{what}: {int((got != want).sum())} of {got.numel()} differ"
        assert int(got.ne(0).sum()) > got.numel() // 4, f"{what}: mostly zeros"  # (GELU zeroes y < 0 nearly)
        return got


# K a multiple of the group but not of the tile's BK (128), except g256 (every multiple of 256 is one of 128)
WEIGHTS = {"w8": (None, 208), "w4g32": (32, 160), "w4g128": (128, 384), "w4g256": (256, 768)}
COMBOS = ("plain", "gate-residual", "gelu-quant")


@pytest.mark.parametrize("a_dtype", list(A_DTYPES))
@pytest.mark.parametrize("weights", list(WEIGHTS))
def test_float_a_is_quantize_act_then_the_int8_fused_gemm(weights, a_dtype):
    """M = 1, 3 and 70 (more than one M tile), odd N, every combination of pieces, race checker on; the
    output dtype follows A's, or int8."""
    group, k = WEIGHTS[weights]
    with emulator_options(race_check=True):
        for i, combo in enumerate(COMBOS):
            for m in (1, 3, 70):
                if m == 70 and weights == "w4g256" and combo != "gate-residual":
                    continue  # the large K: one M > BM case per A dtype keeps this test short
                seed = 1000 * list(WEIGHTS).index(weights) + 100 * list(A_DTYPES).index(a_dtype) + 10 * i + m
                pr = Problem(m, 17 + 2 * i, k, group, A_DTYPES[a_dtype], seed)
                out_dtype = A_DTYPES[a_dtype] if a_dtype != "f32" else torch.bfloat16
                pr.check(pr.pieces(combo, out_dtype), f"{weights} {a_dtype} {combo} M={m}")


@pytest.mark.parametrize("weights", ("w8", "w4g32"))
def test_split_k(weights):
    """Split K over whole units (splits 1, 2, 4 and automatic): the epilogue runs in the CTA that reduces."""
    group = None if weights == "w8" else 32
    pr = Problem(5, 70, 512, group, torch.bfloat16, seed=4)  # 4 k units of the 128-deep tile
    with emulator_options(race_check=True):
        for splits in (1, 2, 4, -1):
            pr.check(pr.pieces("gate-residual", torch.bfloat16), f"splits {splits}", splits)


@pytest.mark.parametrize("order,seed", ORDERS)
@pytest.mark.parametrize("cp_async", CP_ASYNC_MODES)
def test_fiber_orders_and_cp_async(order, seed, cp_async):
    """Every schedule x cp.async landing mode (the W tile's copies; A's quantizing stores are synchronous),
    race checker on: the same bits. Two M tiles, W8 and W4."""
    for group, k, dtype in ((None, 208, torch.float16), (64, 192, torch.float32)):
        pr = Problem(19, 21, k, group, dtype, seed=5)
        with emulator_options(order=order, seed=seed, cp_async=cp_async, race_check=True):
            pr.check(pr.pieces("gelu-quant", torch.float32), f"{order} {seed} {cp_async} group {group}", 1)


def test_under_the_hopper_arch():
    """Float A never takes the Hopper path: under emulator_options(arch="sm_90a") it runs the mma.sync tile."""
    pr = Problem(3, 34, 192, 64, torch.bfloat16, seed=6)
    with emulator_options(race_check=True, arch="sm_90a"):
        pr.check(pr.pieces("gate-residual", torch.bfloat16), "sm_90a")


# ---- the binding's checks, in the words of ditq.ops ----------------------------------------------------------

@pytest.mark.parametrize("weights", ("w8", "w4g32"))
def test_float_a_with_per_token_scales_is_refused(weights):
    pr = Problem(3, 16, 64, None if weights == "w8" else 32, torch.float32, seed=8)
    pieces = pr.pieces("plain", torch.float32)
    per_token = torch.full((3,), SCALE)
    with pytest.raises(ValueError) as direct:
        pr.call(pr.x, per_token, pieces)
    with pytest.raises(ValueError) as generic:
        if pr.group is None:
            torch.ops.ditq.gemm_w8a8_fused(pr.x, per_token, pr.w, pr.ws, None, *pieces, BACKEND)
        else:
            torch.ops.ditq.gemm_w4a8_fused(pr.x, per_token, pr.w, pr.ws, None, 32, *pieces, BACKEND)
    from ditq.ops import float_a_needs_static_scale
    words = str(float_a_needs_static_scale(per_token))
    for err in (direct, generic):  # the generic op reaches the same binding, which prefixes the op's name
        assert words in str(err.value), (str(err.value), words)
    with pytest.raises(TypeError, match="a must be int8, float16, bfloat16, float32; got float64"):
        pr.call(pr.x.double(), pr.s, pieces)


def test_float_a_runs_on_its_one_tile():
    """The float-A kernels exist for one tile: another one pinned is a ValueError, that one runs."""
    pr = Problem(3, 16, 64, None, torch.float32, seed=9)
    pieces = pr.pieces("plain", torch.float32)
    other = (pr.tile + 1) % cuda_backend.gemm_tile_count()
    with pytest.raises(ValueError, match=f"a float a runs on GEMM tile {pr.tile} only"):
        pr.call(pr.x, pr.s, pieces, other, 1)
    with emulator_options():
        assert torch.equal(pr.call(pr.x, pr.s, pieces, pr.tile, 1), pr.call(pr.x, pr.s, pieces))

"""The GEMM epilogue's output conversion under the emulator, on constructed values where rounding decides the
bits: exact ties (halves of a bf16 / fp16 ulp, both parities, both signs), +-0, fp32 and fp16 subnormals,
the largest finite values and the ties just past them (which round to inf). Every element is compared bit for
bit with torch (float32 -> bfloat16 / float16 in torch is round-to-nearest-even).

The integer inputs are built so that each dot product is a chosen integer T (a[m] = 127 at k = 2m and 1 at
k = 2m + 1; w[n] = q, r there, T = 127 q + r), and the scales are powers of two, so the fp32 value before
the cast is exactly T * scale: a tie in, a tie at the conversion. Random data are covered by
test_gemm_emulated.py::test_output_cast_is_round_to_nearest_even.

The probe library (emu_probe.cpp, probe_cast) converts the same fp32 values with deliberately broken
conversions (ties away from zero, the `u += 0x7fff` ties-down bug): the check below must reject them."""
import ctypes
import importlib.util
import os

import numpy as np
import pytest
import torch

from ditq.backends import cuda_backend

pytestmark = pytest.mark.skipif(not cuda_backend.built(), reason="ditq._C is not built")

_spec = importlib.util.spec_from_file_location("emu_probe", os.path.join(os.path.dirname(__file__), "emu_probe.py"))
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)

# Dot products (rows). bf16 keeps 8 significant bits, so odd T in [257, 511] is a tie at scale 1; fp16 keeps
# 11, so odd T in [2049, 4095] is. 257 / 2049 round down to the even neighbour, 259 / 2051 up: a ties-away or
# a ties-down conversion gets one of each pair wrong.
T_VALUES = [0, 1, 3, 5, 257, 259, -257, -259, 2049, 2051, -2049, -2051, 4093, 4095, 509, 511]
# Column scales (w_scale; a_scale = 1): 1, -1 (negative ties, -0), bf16 subnormal ties (2^-134: units of
# 2^-133 with a half), fp16 subnormal ties (2^-25: units of 2^-24 with a half; T = 1 is a tie to +0),
# 16 (4095 * 16 = 65520: the tie past fp16's max, to inf; 4093 * 16 = 65488: a tie below it), 2^119
# (511 * 2^119: the tie past bf16's max, to inf; 509 * 2^119 a tie below it), 2^-140 (fp32 subnormals).
SCALES = [1.0, -1.0, 2.0 ** -134, 2.0 ** -25, 16.0, 2.0 ** 119, 2.0 ** -140, 0.5, -(2.0 ** -25)]


def _problem(t_values, scales):
    m, n = len(t_values), len(scales)
    k = max(16, -(-2 * m // 16) * 16)
    t = torch.tensor(t_values, dtype=torch.int64)
    q = torch.round(t.double() / 127).to(torch.int64)
    r = t - 127 * q
    assert bool((q.abs() <= 127).all() and (r.abs() <= 63).all())
    a = torch.zeros(m, k, dtype=torch.int8)
    w = torch.zeros(n, k, dtype=torch.int8)
    for i in range(m):
        a[i, 2 * i], a[i, 2 * i + 1] = 127, 1
        w[:, 2 * i], w[:, 2 * i + 1] = int(q[i]), int(r[i])
    t_mat = t[:, None].expand(m, n)
    assert torch.equal(a.long() @ w.long().t(), t_mat)
    return a, torch.ones(m), w, torch.tensor(scales, dtype=torch.float32), t_mat


def _expected32(t_mat, scales):
    """The epilogue's fp32 value: float(T) * (1 * s_w), each an fp32 IEEE product, as in torch."""
    return t_mat.float() * (torch.ones(1) * scales)[None, :]


def _bits(x):
    return x.view(torch.int16 if x.element_size() == 2 else torch.int32)


def _mismatches(got, expected):
    return [(i, j) for i, j in zip(*torch.nonzero(_bits(got) != _bits(expected), as_tuple=True))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_w8a8_epilogue_ties_and_extremes_are_bit_exact(dtype):
    from ditq.emulator import emulator_options

    a, sa, w, sw, t_mat = _problem(T_VALUES, SCALES)
    exp32 = _expected32(t_mat, sw)
    for splits in (1, -1):
        with emulator_options(race_check=True):
            y = torch.ops.ditq_C.gemm_w8a8(a, sa, w, sw, None, dtype, -1, splits)
        bad = _mismatches(y, exp32.to(dtype))
        assert not bad, f"{dtype}: {len(bad)} elements differ from torch's RNE, e.g. T = " + ", ".join(
            f"{T_VALUES[i]} x {SCALES[j]}: got {y[i, j].item()!r} want {exp32.to(dtype)[i, j].item()!r}"
            for i, j in bad[:4])


def test_the_constructed_values_are_ties():
    """The point of the construction: at scale 1 the bf16 rows 257..259 and fp16 rows 2049..2051 are exact
    halves of an ulp (torch rounds them to the even neighbour), and the sign of zero survives."""
    exp = _expected32(*_problem(T_VALUES, SCALES)[4:], torch.tensor(SCALES))
    col = exp[:, 0]
    assert col[T_VALUES.index(257)].to(torch.bfloat16).item() == 256.0
    assert col[T_VALUES.index(259)].to(torch.bfloat16).item() == 260.0
    assert col[T_VALUES.index(2049)].to(torch.float16).item() == 2048.0
    assert col[T_VALUES.index(2051)].to(torch.float16).item() == 2052.0
    assert exp[T_VALUES.index(4095), SCALES.index(16.0)].to(torch.float16).isinf()
    assert exp[T_VALUES.index(511), SCALES.index(2.0 ** 119)].to(torch.bfloat16).isinf()
    neg_zero = exp[T_VALUES.index(0), SCALES.index(-1.0)]
    assert neg_zero.item() == 0.0 and _bits(neg_zero.to(torch.bfloat16)).item() == -32768


def _probe_cast(values, mode):
    lib = probe.load()
    x = np.ascontiguousarray(values.numpy().astype(np.float32).ravel())
    out = np.zeros(x.size, dtype=np.uint16)
    lib.probe_cast(x.ctypes.data_as(ctypes.c_void_p), x.size, mode, out.ctypes.data_as(ctypes.c_void_p))
    return torch.from_numpy(out.view(np.int16).copy()).view(values.shape)


PROBE_MODES = {"bf16": (0, torch.bfloat16), "bf16_ties_away": (1, torch.bfloat16),
               "bf16_ties_down": (2, torch.bfloat16), "f16": (3, torch.float16), "f16_ties_away": (4, torch.float16)}


@pytest.mark.parametrize("name", sorted(PROBE_MODES))
def test_tie_check_rejects_a_broken_conversion(name):
    """The kernel's conversion (ptx::f32_to_*_bits) passes the check; a ties-away or ties-down variant of it
    fails it on the constructed values (so the test above can fail)."""
    mode, dtype = PROBE_MODES[name]
    _, _, _, sw, t_mat = _problem(T_VALUES, SCALES)
    exp32 = _expected32(t_mat, sw)
    got = _probe_cast(exp32, mode)
    bad = int((got != _bits(exp32.to(dtype))).sum())
    if name in ("bf16", "f16"):
        assert bad == 0, f"{name}: {bad} mismatches"
    else:
        assert bad > 0, f"{name}: the tie values did not expose the broken conversion"


# ---- W4A8: the same ties through the group-scaled epilogue ------------------------------------------------------
# int4 weights reach fewer integers per k, so each row uses 8 k: a[m] = 127 x 6, 16, 1 at k = 8m..8m+7 and
# w[n] = q1..q6, r1, r0 there (all in [-8, 7]): T = 127 (q1 + ... + q6) + 16 r1 + r0. One group of 64 covers
# K; the kernel folds 16 T * (s_w / 16) = T * s_w exactly, then multiplies by s_a = 1.
W4_T = [257, 259, -257, -259, 2049, 2051, -2051, 0]
W4_SCALES = [1.0, -1.0, 2.0 ** -134, 2.0 ** -25, 2.0 ** 119, 2.0 ** -140, 0.5]


def _problem_w4(t_values, scales, group=64):
    m, n, k = len(t_values), len(scales), group
    assert 8 * m <= k
    a = torch.zeros(m, k, dtype=torch.int8)
    q = torch.zeros(n, k, dtype=torch.int8)
    for i, t in enumerate(t_values):
        qt = round(t / 127)
        rem = t - 127 * qt
        r1 = (rem + 8) // 16
        r0 = rem - 16 * r1
        qs, left = [], qt
        for _ in range(6):  # greedy: six int4 summands of qt
            qs.append(max(-8, min(7, left)))
            left -= qs[-1]
        assert sum(qs) == qt and -8 <= r1 <= 7 and -8 <= r0 <= 7, (t, qs, r1, r0)
        a[i, 8 * i:8 * i + 8] = torch.tensor([127] * 6 + [16, 1], dtype=torch.int8)
        q[:, 8 * i:8 * i + 8] = torch.tensor(qs + [r1, r0], dtype=torch.int8)
    t_mat = torch.tensor(t_values, dtype=torch.int64)[:, None].expand(m, n)
    assert torch.equal(a.long() @ q.long().t(), t_mat)
    return a, torch.ones(m), q, torch.tensor(scales, dtype=torch.float32)[None, :], t_mat


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_w4a8_epilogue_ties_are_bit_exact(dtype):
    from ditq.backends import cuda_layout
    from ditq.emulator import emulator_options
    from ditq.quant import reference as ref

    a, sa, q, ss, t_mat = _problem_w4(W4_T, W4_SCALES)
    w = cuda_layout.w4_canonical_to_kernel(ref.pack_int4(q))
    # The group sum starts at +0 and adds fma(16 T, s_w / 16, acc): a zero result is +0 even for s_w < 0
    # (-0 + +0 = +0 in IEEE), unlike W8A8's single product.
    want = (_expected32(t_mat, ss[0]) + 0.0).to(dtype)
    with emulator_options(race_check=True):
        y = torch.ops.ditq_C.gemm_w4a8(a, sa, w, ss, None, 64, dtype, -1, 1)
    bad = _mismatches(y, want)
    assert not bad, f"{dtype}: " + ", ".join(f"{W4_T[i]} x {W4_SCALES[j]}: got {y[i, j].item()!r} want "
                                            f"{want[i, j].item()!r}" for i, j in bad[:4])

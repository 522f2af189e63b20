"""The emulator's float intrinsics (csrc/emu/emu.h) against numpy / torch, bit for bit: fp16 and bf16
conversions (round to nearest even, subnormals, overflow, signed zeros) and __float2int_rn (ties to even,
saturation, NaN -> 0): the roundings every bit-exact comparison between the real and emulated kernels rests on."""
import importlib.util
import os

import numpy as np
import torch

_spec = importlib.util.spec_from_file_location("emu_probe", os.path.join(os.path.dirname(__file__), "emu_probe.py"))
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)


def _values():
    rng = np.random.default_rng(0)
    specials = [0.0, -0.0, 1.0, -1.0, 0.5, 1.5, 2.5, -2.5, 65504.0, 65519.99, 65520.0, -65520.0, 1e9, -1e9,
                2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26, 2.0 ** -14, 2.0 ** -14 * (1 - 2.0 ** -11), 1e-30, np.inf,
                -np.inf, 2147483520.0, 2147483648.0, -2147483648.0, -3e9, 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11,
                1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8]
    with np.errstate(invalid="ignore"):  # the random bit patterns include NaNs, dropped below
        rand = np.concatenate([rng.standard_normal(20000) * 10.0 ** rng.integers(-9, 6, 20000),
                               rng.integers(-2 ** 20, 2 ** 20, 4000) + 0.5,  # exact .5 ties for rint
                               rng.integers(0, 2 ** 32, 20000, dtype=np.uint64).astype(np.uint32).view(np.float32)])
    v = np.concatenate([np.array(specials), rand]).astype(np.float32)
    return v[~np.isnan(v)]  # NaN payloads are outside the contract (csrc/README.md)


def test_conversions_match_numpy_and_torch_bit_for_bit():
    x = np.ascontiguousarray(_values())
    n = len(x)
    h, b = np.zeros(n, np.uint16), np.zeros(n, np.uint16)
    hb, bb, ri = np.zeros(n, np.float32), np.zeros(n, np.float32), np.zeros(n, np.int32)
    probe.load().probe_convert(x.ctypes.data, n, h.ctypes.data, b.ctypes.data, hb.ctypes.data, bb.ctypes.data,
                               ri.ctypes.data)
    with np.errstate(over="ignore"):
        want_h = x.astype(np.float16).view(np.uint16)
    want_b = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert (h == want_h).all(), x[h != want_h][:5]
    assert (b == want_b).all(), x[b != want_b][:5]
    assert (hb.view(np.uint32) == want_h.view(np.float16).astype(np.float32).view(np.uint32)).all()
    assert (bb.view(np.uint32) == torch.from_numpy(want_b.view(np.int16)).view(torch.bfloat16).float()
            .numpy().view(np.uint32)).all()
    want_i = np.clip(np.rint(x.astype(np.float64)), -2 ** 31, 2 ** 31 - 1).astype(np.int64)
    assert (ri == want_i).all(), x[ri != want_i][:5]


def test_nan_conversions_are_canonical():
    x = np.array([np.nan, -np.nan], dtype=np.float32)
    h, b = np.zeros(2, np.uint16), np.zeros(2, np.uint16)
    hb, bb, ri = np.zeros(2, np.float32), np.zeros(2, np.float32), np.zeros(2, np.int32)
    probe.load().probe_convert(x.ctypes.data, 2, h.ctypes.data, b.ctypes.data, hb.ctypes.data, bb.ctypes.data,
                               ri.ctypes.data)
    assert h.tolist() == [0x7FFF, 0x7FFF] and b.tolist() == [0x7FFF, 0x7FFF] and ri.tolist() == [0, 0]
    assert np.isnan(hb).all() and np.isnan(bb).all()

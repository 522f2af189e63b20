"""Planted bugs in the float-A fused GEMMs (csrc/gemm.cuh FloatATileLoader) are caught: each mutant copies
csrc/ to a temporary directory, changes one line, builds the emulated float-A launchers
(tests/csrc/gemm_float_a_probe.cpp includes csrc/emulated_gemm_fused_float_a.cpp; g++, cached by the sources'
hash) and runs them on inputs the unmutated kernel gets exactly right:

* a loader that reads one row past M is reported by the emulator's global-memory checker (A's extent is
  registered in float elements), with the source line;
* a quantizer that rounds ties away from zero (rintf's half-to-even replaced) breaks the bit-for-bit equality
  with quantize_act + the int8 kernel on the exact .5 ties the exactness tests feed it."""
import ctypes
import importlib.util
import os

import pytest
import torch

from ditq.backends import cuda_backend

pytestmark = [pytest.mark.skipif(not cuda_backend.built(), reason="ditq._C is not built"), pytest.mark.slow]

HERE = os.path.dirname(os.path.abspath(__file__))
PROBE = os.path.join(HERE, "gemm_float_a_probe.cpp")
_spec = importlib.util.spec_from_file_location("emu_probe", os.path.join(HERE, "emu_probe.py"))
_emu_probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_emu_probe)

# name -> (file under csrc/, original text, mutated text)
MUTANTS = {
    "float_a_row_past_the_end": ("gemm.cuh", "const bool ok = r0 + row < nrows && (CHUNKS",
                                 "const bool ok = r0 + row <= nrows && (CHUNKS"),
    "float_a_ties_away": ("gemm.cuh", "epi::quantize_int8(chunk_elem_f32<AT>(w, e), inv)",
                          "epi::quantize_int8(ties_away(chunk_elem_f32<AT>(w, e), inv), 1.0f)"),
}
# the helper the ties_away mutant calls: x * inv rounded half away from zero, then quantized with scale 1
TIES_AWAY = ("template <class AT>\nconstexpr bool kIntA",
             "DITQ_DEVICE float ties_away(float x, float inv) { return roundf(__fmul_rn(x, inv)); }\n\n"
             "template <class AT>\nconstexpr bool kIntA")


def build_mutant(name):
    edits = [MUTANTS[name]] + ([("gemm.cuh", *TIES_AWAY)] if name == "float_a_ties_away" else [])
    out = _emu_probe.build_mutant(name, edits, PROBE)
    lib = ctypes.CDLL(out)
    lib.gemm_float_a_probe.restype = ctypes.c_int
    lib.gemm_float_a_probe.argtypes = ([ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int] * 5
                                       + [ctypes.c_char_p, ctypes.c_int] * 2)
    return lib


def run(lib, x, a_scale, w, w_scale, tile):
    """One emulated W8 launch of the mutant: (status, kind, message, y)."""
    m, k = x.shape
    n = w.shape[0]
    dtype_id = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[x.dtype]  # ditq::DType
    y = torch.full((m, n), float("nan"))
    kind, msg = ctypes.create_string_buffer(64), ctypes.create_string_buffer(4096)
    rc = lib.gemm_float_a_probe(x.data_ptr(), dtype_id, a_scale.data_ptr(), w.data_ptr(), w_scale.data_ptr(),
                                y.data_ptr(), m, n, k, 0, tile, kind, 64, msg, 4096)
    assert rc != 2, msg.value.decode()
    return ("error" if rc == 1 else "ok"), kind.value.decode(), msg.value.decode(), y


def _problem(m, n, k, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    scale = 0.0625
    ties = (torch.randint(-90, 90, (m, k), generator=g).float() + 0.5) * scale  # every x / s an exact .5 tie
    x = ties.to(dtype)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    return x, torch.tensor([scale]), w, torch.rand(n, generator=g) * 0.01 + 1e-3


def _exact(x, s, w, ws):
    """quantize_act + the int8 fused kernel (the unmutated build), fp32 output, splits 1."""
    tile = torch.ops.ditq_C.gemm_pick_tile(80, 1, False)
    q, qs = torch.ops.ditq_C.quantize_act(x, s)
    want = torch.ops.ditq_C.gemm_w8a8_fused(q, qs, w, ws, None, False, None, None, 1, None, torch.float32, tile, 1)
    got = torch.ops.ditq_C.gemm_w8a8_fused(x, s, w, ws, None, False, None, None, 1, None, torch.float32, tile, 1)
    assert torch.equal(got, want), "the unmutated float-A kernel must be exact on these inputs"
    return want, tile


def test_loader_reading_one_row_past_the_matrix_is_reported():
    x, s, w, ws = _problem(3, 33, 176, seed=1, dtype=torch.float32)  # M = 3 < BM: rows 3.. of the tile are past M
    _, tile = _exact(x, s, w, ws)
    status, kind, msg, _ = run(build_mutant("float_a_row_past_the_end"), x, s, w, ws, tile)
    assert status == "error" and kind == "global-address", f"{status} {kind} {msg}"
    assert "past the end of `a`" in msg and "gemm.cuh:" in msg and "A=f32" in msg, msg


def test_ties_rounded_away_from_zero_break_the_equality():
    x, s, w, ws = _problem(3, 33, 176, seed=2)
    want, tile = _exact(x, s, w, ws)
    status, _, msg, y = run(build_mutant("float_a_ties_away"), x, s, w, ws, tile)
    assert status == "ok", msg
    assert not torch.equal(y, want), "the mutant's ties-away rounding went unnoticed"

"""Planted one-line bugs in the real kernel sources are caught on a CPU.

Each mutant copies csrc/ to a temporary directory, changes one line, builds the emulated GEMM launchers
(tests/csrc/gemm_probe.cpp includes csrc/emulated_gemm.cpp; g++, ~10 s, cached by the sources' hash) and runs
a ragged problem. Without the matching check each of these bugs passed the CPU suite:

* the tile loader's row test `<` -> `<=` reads one row past A and W; the garbage only reaches rows that are
  never stored, so the results stay exact. The global-memory checker reports the read.
* the emulated bf16 conversion without its ties-to-even term (`u += 0x7fff`) rounds exact ties down; random
  data never hits a tie. The constructed ties of test_gemm_rounding.py expose it through the GEMM epilogue.

The device-only half of the conversion (a `_rz` in place of `_rn`) is covered by test_gemm_sass.py, which
names the exact SASS conversion instruction and has its own mutant."""
import ctypes
import importlib.util
import os

import numpy as np
import pytest
import torch

from ditq.backends import cuda_backend
from ditq.testing import assert_gemm_w8a8

pytestmark = pytest.mark.skipif(not cuda_backend.built(), reason="ditq._C is not built")

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# name -> (file under csrc/, original text, mutated text)
MUTANTS = {
    "loader_row_past_the_end": ("gemm.cuh", "&& r0 + row < nrows;", "&& r0 + row <= nrows;"),
    "bf16_ties_down": ("emu/emu.h", "(u + 0x7fffu + ((u >> 16) & 1u)) >> 16", "(u + 0x7fffu) >> 16"),
}


def build_mutant(name):
    out = _load("emu_probe").build_mutant(name, [MUTANTS[name]], os.path.join(HERE, "gemm_probe.cpp"))
    lib = ctypes.CDLL(out)
    lib.gemm_probe.restype = ctypes.c_int
    lib.gemm_probe.argtypes = ([ctypes.c_void_p] * 2 + [ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_int] * 7
                               + [ctypes.c_void_p] * 2 + [ctypes.c_char_p, ctypes.c_int] * 2)
    return lib


def run_gemm(lib, a, a_scale, w, w_scale, out_dtype, tile, group=0):
    """One emulated launch (splits = 1): (status, kind, message, y)."""
    m, k = a.shape
    n = w.shape[0]
    dtype_id = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[out_dtype]  # ditq::DType
    y = torch.full((m, n), float("nan"), dtype=out_dtype)
    kind, msg = ctypes.create_string_buffer(64), ctypes.create_string_buffer(4096)
    tensors = [a.contiguous(), a_scale.contiguous(), w.contiguous(), w_scale.contiguous()]
    rc = lib.gemm_probe(tensors[0].data_ptr(), tensors[1].data_ptr(), int(a_scale.numel() == m and m > 1),
                        tensors[2].data_ptr(), tensors[3].data_ptr(), y.data_ptr(), dtype_id, m, n, k, group, tile,
                        1, None, None, kind, 64, msg, 4096)
    assert rc != 2, msg.value.decode()
    return ("error" if rc == 1 else "ok"), kind.value.decode(), msg.value.decode(), y


def test_loader_reading_one_row_past_the_matrix_is_reported():
    g = torch.Generator().manual_seed(7)
    m, n, k = 17, 33, 176  # M, N not multiples of any BM / BN; K a multiple of 16, not of BK
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    sa, sw = torch.rand(m, generator=g) + 0.5, torch.rand(n, generator=g) + 0.5
    for tile in range(torch.ops.ditq_C.gemm_tile_count()):  # the real kernels: exact, nothing reported
        y = torch.ops.ditq_C.gemm_w8a8(a, sa, w, sw, None, torch.float32, tile, 1)
        assert_gemm_w8a8(y, a, sa, w, sw, None, what=f"unmutated tile {tile}")
    lib = build_mutant("loader_row_past_the_end")
    for tile in range(torch.ops.ditq_C.gemm_tile_count()):
        status, kind, msg, _ = run_gemm(lib, a, sa, w, sw, torch.float32, tile)
        assert status == "error" and kind == "global-address", f"tile {tile}: {status} {kind} {msg}"
        assert "of kernel gemm_w8a8<" in msg and "gemm.cuh:" in msg and "cp.async" in msg, msg
        assert "past the end of `a`" in msg or "past the end of `w`" in msg, msg


def test_bf16_ties_down_is_caught_by_the_tie_values():
    rounding = _load("test_gemm_rounding")
    a, sa, w, sw, t_mat = rounding._problem(rounding.T_VALUES, rounding.SCALES)
    want = rounding._expected32(t_mat, sw).to(torch.bfloat16)
    lib = build_mutant("bf16_ties_down")
    status, kind, msg, y = run_gemm(lib, a, sa, w, sw, torch.bfloat16, 0)
    assert status == "ok", msg
    wrong = int((y.view(torch.int16) != want.view(torch.int16)).sum())
    assert wrong > 0, "the mutant's ties-down bf16 conversion went unnoticed"
    # ... and the unmutated kernel is exact on the same values (test_gemm_rounding.py checks every dtype)
    y_ok = torch.ops.ditq_C.gemm_w8a8(a, sa, w, sw, None, torch.bfloat16, 0, 1)
    assert torch.equal(y_ok.view(torch.int16), want.view(torch.int16))
    assert np.count_nonzero(y.view(torch.int16).numpy() != y_ok.view(torch.int16).numpy()) == wrong

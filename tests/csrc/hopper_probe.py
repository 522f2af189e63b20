"""Builds and loads tests/csrc/hopper_probe.cpp (the emulator's Hopper probes) like emu_probe.py does for
emu_probe.cpp: g++ into a small shared library with no torch, cached by the hash of its sources, called
through ctypes. Loaded by path from the tests. Skips the caller if there is no host compiler."""
from __future__ import annotations

import ctypes
import importlib.util
import glob
import os
import re

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")
SOURCE = os.path.join(HERE, "hopper_probe.cpp")

# the shared probe-library builder (loaded by path, as the tests load these modules)
_spec = importlib.util.spec_from_file_location("emu_probe", os.path.join(HERE, "emu_probe.py"))
_emu_probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_emu_probe)

ORDERS = {"forward": 0, "reverse": 1, "random": 2}
LANDING = {"issue": 0, "wait": 1}
SWIZZLES = {"none": 0, "32B": 1, "64B": 2, "128B": 3}
# Bug ids: the order of hopper_probe.cpp's Bug enum.
BUGS = ["none", "no_final_wait", "wrong_parity", "expect_too_many", "expect_too_few", "no_mbar_init_fence",
        "skip_wgmma", "no_wgmma_fence", "touch_accum", "use_before_init", "early_release"]

_lib = None
c_p = ctypes.c_void_p
c_i = ctypes.c_int
c_u = ctypes.c_uint
c_ull = ctypes.c_ulonglong
c_s = ctypes.c_char_p


def _sources():
    return [SOURCE, os.path.join(CSRC, "ptx.cuh"), os.path.join(CSRC, "tma.h")] + sorted(
        glob.glob(os.path.join(CSRC, "emu", "*.h")))


def build() -> str:
    # hidden visibility: the emulator's inline state stays private to this library (see hopper_probe.cpp)
    return _emu_probe.build_library(SOURCE, _sources(), "libhopper_probe",
                                    ("-Wno-psabi", "-fvisibility=hidden", "-fvisibility-inlines-hidden"),
                                    "the Hopper probes")


def load():
    global _lib
    if _lib is None:
        lib = ctypes.CDLL(build())
        err = [c_s, c_i, c_s, c_i]
        lib.probe_tma.argtypes = [c_p, c_ull, c_ull, c_ull, c_u, c_u, c_i, c_i, c_i, c_i, c_i, c_ull, c_i, c_p] + err
        lib.probe_misuse.argtypes = [c_i, c_p] + err
        lib.probe_tma_map_check.argtypes = [c_ull, c_ull, c_ull, c_ull, c_u, c_u, c_i, c_s, c_i]
        lib.probe_wgmma.argtypes = [c_i, c_p, c_i, c_p, c_p, c_i, c_p, c_i, c_p, c_p, c_i, c_i] + err
        lib.probe_gemm.argtypes = [c_i, c_i, c_p, c_p, c_i, c_i, c_i, c_i, c_i, c_p, c_i, c_ull, c_i, c_i] + err
        lib.probe_proxy_fence.argtypes = [c_i, c_p, c_p, c_p] + err
        lib.probe_setmaxnreg.argtypes = [c_i, c_p] + err
        lib.probe_ring.argtypes = [c_i, c_p, c_i, c_i, c_p, c_i, c_ull, c_i] + err
        _lib = lib
    return _lib


class Result:
    """rc 0: ran; 1: the emulator reported (kind, msg); 2: another exception (msg)."""

    def __init__(self, rc, kind, msg):
        self.rc, self.kind, self.msg = rc, kind.value.decode(), msg.value.decode()

    def __repr__(self):
        return f"Result(rc={self.rc}, kind={self.kind!r}, msg={self.msg!r})"


def call(fn, *args):
    kind = ctypes.create_string_buffer(64)
    msg = ctypes.create_string_buffer(8192)
    rc = fn(*args, kind, 64, msg, 8192)
    return Result(rc, kind, msg)


def ptr(a: np.ndarray):
    assert a.flags["C_CONTIGUOUS"]
    return a.ctypes.data_as(ctypes.c_void_p)


def marker_line(marker: str) -> int:
    with open(SOURCE) as f:
        hits = [i for i, line in enumerate(f, 1) if re.search(rf"// @{re.escape(marker)}\b", line)]
    assert len(hits) == 1, f"marker @{marker} found {len(hits)} times in hopper_probe.cpp"
    return hits[0]


def where(marker: str) -> str:
    return f"hopper_probe.cpp:{marker_line(marker)}"

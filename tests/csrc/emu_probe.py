"""Builds and loads tests/csrc/emu_probe.cpp: test-only kernels run by the SIMT emulator, as a small shared
library with no torch (g++, a few seconds; cached by the hash of its sources), called through ctypes.

Loaded by path from the tests (``load()``), so it needs no package. Skips the caller if no host compiler.
"""
from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import re
import shutil
import subprocess
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")
SOURCE = os.path.join(HERE, "emu_probe.cpp")

ORDERS = {"forward": 0, "reverse": 1, "random": 2}
CP_ASYNC = {"issue": 0, "wait": 1, "barrier": 2}

_lib = None


def _sources():
    return [SOURCE, os.path.join(CSRC, "ptx.cuh")] + sorted(glob.glob(os.path.join(CSRC, "emu", "*.h")))


def build_library(source: str, sources, stem: str, extra_flags=(), what: str = "the emulator probes") -> str:
    """g++ ``source`` into ``<tmp>/ditq_emu_probe/<stem>_<hash of sources>.so`` (built once, reused while the
    sources are unchanged) and return its path; skips the caller if there is no host compiler."""
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no host C++ compiler ({cxx}) to build {what}")
    h = hashlib.sha256()
    for path in sources:
        with open(path, "rb") as f:
            h.update(f.read())
    out_dir = os.path.join(tempfile.gettempdir(), "ditq_emu_probe")
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, f"{stem}_{h.hexdigest()[:16]}.so")
    if not os.path.exists(out):
        tmp = f"{out}.{os.getpid()}.tmp"
        cmd = [cxx, "-O1", "-std=c++17", "-U_FORTIFY_SOURCE", "-Wno-unknown-pragmas", *extra_flags, "-shared",
               "-fPIC", "-I", CSRC, source, "-o", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, f"building {what} failed:\n{' '.join(cmd)}\n{r.stderr[-4000:]}"
        os.replace(tmp, out)  # atomic: parallel test workers never load a half-written library
    return out


def build() -> str:
    return build_library(SOURCE, _sources(), "libemu_probe")


def build_mutant(name: str, edits, probe: str) -> str:
    """g++ ``probe`` against a copy of csrc/ with ``edits`` applied in order, each ``(file under csrc/, text,
    replacement)`` whose text must occur exactly once (a planted bug whose line moved fails loudly instead of
    testing the unmutated kernel). Cached in ``<tmp>/ditq_mutants/<name>_<hash>.so`` by the hash of csrc/, the
    probe and the edits; returns its path. Skips the caller if there is no host compiler."""
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no host C++ compiler ({cxx})")
    h = hashlib.sha256(repr(list(edits)).encode())
    for root, _, files in os.walk(CSRC):
        for f in sorted(files):
            if f.endswith((".h", ".cuh", ".cpp")):
                with open(os.path.join(root, f), "rb") as fh:
                    h.update(fh.read())
    with open(probe, "rb") as fh:
        h.update(fh.read())
    out_dir = os.path.join(tempfile.gettempdir(), "ditq_mutants")
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, f"{name}_{h.hexdigest()[:16]}.so")
    if not os.path.exists(out):
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "csrc")
            shutil.copytree(CSRC, src)
            for rel, old, new in edits:
                path = os.path.join(src, rel)
                with open(path) as fh:
                    text = fh.read()
                assert text.count(old) == 1, f"mutant {name}: {old!r} is not (once) in csrc/{rel}: update the mutant"
                with open(path, "w") as fh:
                    fh.write(text.replace(old, new))
            tmp_out = f"{out}.{os.getpid()}.tmp"
            cmd = [cxx, "-O1", "-std=c++17", "-U_FORTIFY_SOURCE", "-Wno-unknown-pragmas", "-shared", "-fPIC",
                   "-I", src, probe, "-o", tmp_out]
            r = subprocess.run(cmd, capture_output=True, text=True)
            assert r.returncode == 0, r.stderr[-4000:]
            os.replace(tmp_out, out)  # atomic: parallel test workers never load a half-written library
    return out


def load():
    global _lib
    if _lib is None:
        lib = ctypes.CDLL(build())
        lib.probe_run.restype = ctypes.c_int
        lib.probe_run.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_ulonglong, ctypes.c_int, ctypes.c_int,
                                  ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.probe_mma.argtypes = [ctypes.c_void_p] * 4
        lib.probe_ldmatrix.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                       ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
        lib.probe_convert.argtypes = [ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 5
        lib.probe_cast.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
        _lib = lib
    return _lib


def run(name: str, order="forward", seed=0, cp_async="wait", race_check=True, mem_check=True):
    """Runs probe kernel `name`: returns ("ok" | "wrong" | "error", kind, message)."""
    lib = load()
    kind = ctypes.create_string_buffer(64)
    msg = ctypes.create_string_buffer(4096)
    rc = lib.probe_run(name.encode(), ORDERS[order], seed, CP_ASYNC[cp_async], int(race_check), int(mem_check),
                       kind, 64, msg, 4096)
    assert rc != 2, f"probe {name}: {msg.value.decode()}"
    return {0: "ok", 3: "wrong", 1: "error"}[rc], kind.value.decode(), msg.value.decode()


def marker_line(marker: str) -> int:
    """The line of emu_probe.cpp carrying `// @marker`."""
    with open(SOURCE) as f:
        hits = [i for i, line in enumerate(f, 1) if re.search(rf"// @{re.escape(marker)}\b", line)]
    assert len(hits) == 1, f"marker @{marker} found {len(hits)} times in emu_probe.cpp"
    return hits[0]


def where(marker: str) -> str:
    return f"emu_probe.cpp:{marker_line(marker)}"

"""Every CUDA runtime call in csrc/'s host code is legal inside a CUDA-graph capture, so that any ditq op may be
captured, the first one of a process included.

A capture in the global mode (torch.cuda.graph's default) refuses "potentially unsafe" calls from any thread while
it runs: synchronous copies and memsets, allocation, synchronisation, event and stream queries. Such a call fails
and invalidates the capture, so the user's graph cannot be built. ditq's launchers therefore use only calls that
touch no stream: launches on the current stream, function attributes, the current device, error state and the
driver's entry points (resolved once). Allocation goes through torch's caching allocator, which captures. No GPU
runs the launchers in CI, so this reads their source; tests/csrc/test_gemm_sm90_cuda.py captures on a GPU."""
import os
import re

import pytest

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")

# Runtime calls the host code may make, and why each is safe during a capture.
CAPTURE_SAFE = {
    "cudaGetLastError": "reads and clears this thread's error state",
    "cudaGetErrorString": "formats an error code",
    "cudaGetDevice": "reads the current device",
    "cudaFuncSetAttribute": "sets a kernel's dynamic shared-memory limit; no stream work",
    "cudaFuncGetAttributes": "reads a kernel's attributes (the sm_90a probe); no stream work",
    "cudaGetDriverEntryPointByVersion": "resolves cuTensorMapEncodeTiled once; the map is encoded on the host",
}
CALL = re.compile(r"\b(cuda[A-Z]\w*)\s*\(")


def runtime_calls(text: str):
    """{name: [line numbers]} of the CUDA runtime calls in C++ source text, comments removed."""
    text = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
    out = {}
    for i, line in enumerate(text.splitlines(), 1):
        for name in CALL.findall(line.split("//")[0]):
            out.setdefault(name, []).append(i)
    return out


def _host_sources():
    """csrc's files that nvcc compiles for the real GPU, and the bindings (the emulator's files call no runtime)."""
    return sorted(n for n in os.listdir(CSRC) if n.endswith((".cu", ".cuh", ".h", ".cpp")) and
                  not n.startswith("emulated"))


def test_the_sources_and_their_calls_are_found():
    names = set(_host_sources())
    assert {"gemm_sm90.cu", "gemm_launch.cuh", "gemm_sm90_launch.cuh", "quantize_act.cu", "tma.h"} <= names
    seen = set()
    for n in names:
        seen |= set(runtime_calls(open(os.path.join(CSRC, n)).read()))
    assert {"cudaGetLastError", "cudaFuncGetAttributes", "cudaFuncSetAttribute"} <= seen, seen


@pytest.mark.parametrize("name", _host_sources())
def test_only_capture_safe_runtime_calls(name):
    calls = runtime_calls(open(os.path.join(CSRC, name)).read())
    bad = {c: lines for c, lines in calls.items() if c not in CAPTURE_SAFE}
    assert not bad, (f"csrc/{name} calls {bad} (name: line numbers), which a CUDA-graph capture may refuse; use a "
                     f"stream-free call, or add it to CAPTURE_SAFE with the reason it is safe")


def test_the_rule_fails_a_synchronous_copy():
    old_probe = ("bool available() {\n  int v = 0;\n  // cudaMemcpy in a comment is fine\n"
                 "  if (cudaMemcpyFromSymbol(&v, kFlag, sizeof(v)) != cudaSuccess) { cudaGetLastError(); }\n}\n")
    calls = runtime_calls(old_probe)
    assert set(calls) == {"cudaMemcpyFromSymbol", "cudaGetLastError"} and calls["cudaMemcpyFromSymbol"] == [4]
    assert "cudaMemcpyFromSymbol" not in CAPTURE_SAFE

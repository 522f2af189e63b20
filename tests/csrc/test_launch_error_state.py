"""Every real kernel launch in csrc/ clears the runtime's error state before it launches.

The launchers report a launch failure with cudaGetLastError() after the `<<<...>>>`. That call returns (and
clears) the last error of *any* runtime call made by this host thread, not only of the launch just made (CUDA
runtime API, error handling): an unchecked non-sticky error left by another library would be reported as the
GEMM's own failure, after its kernel was in fact launched, and the op would throw away a correct result. So each
launcher calls cudaGetLastError() once, discarding the result, before launching (quantize_act.cu started it).
No GPU runs these launchers in CI: this reads their source."""
import os
import re

import pytest

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")
LAUNCH = re.compile(r"<<<")
CLEAR = re.compile(r"^\s*cudaGetLastError\(\);")  # a call whose result is discarded: it only clears
CHECK = re.compile(r"=\s*cudaGetLastError\(\)")  # the check after the launch


def launch_problems(text):
    """For each `<<<` launch in a source text: why its function does not clear the error state before launching
    and check it after (empty list: all fine). The function is the lines from the nearest earlier line that starts
    in column 0 (its signature or template head) to the next line that is a closing brace in column 0."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        if not LAUNCH.search(line) or line.lstrip().startswith("//"):
            continue
        start = i
        while start > 0 and not re.match(r"[A-Za-z_]", lines[start]):
            start -= 1
        end = i
        while end < len(lines) - 1 and not lines[end].startswith("}"):
            end += 1
        if not any(CLEAR.match(l) for l in lines[start:i]):
            out.append(f"line {i + 1}: no cudaGetLastError(); before the launch (function at line {start + 1})")
        if not any(CHECK.search(l) for l in lines[i + 1:end + 1]):
            out.append(f"line {i + 1}: no cudaGetLastError() check after the launch")
    return out


def _launch_files():
    names = sorted(n for n in os.listdir(CSRC) if n.endswith((".cu", ".cuh", ".h")))
    return [n for n in names if LAUNCH.search(open(os.path.join(CSRC, n)).read())]


def test_the_launch_files_are_found():
    assert {"gemm_launch.cuh", "gemm_sm90_launch.cuh", "quantize_act.cu", "norm_quantize.cu"} <= set(_launch_files())


@pytest.mark.parametrize("name", _launch_files())
def test_launcher_clears_the_error_state_before_launching(name):
    problems = launch_problems(open(os.path.join(CSRC, name)).read())
    assert not problems, f"csrc/{name}: " + "; ".join(problems)


def test_the_rule_fails_a_launcher_without_the_clear():
    good = ("const char* go(void* stream) {\n  cudaGetLastError();  // why\n  kernel<<<1, 32, 0, s>>>(p);\n"
            "  const cudaError_t e = cudaGetLastError();\n  return nullptr;\n}\n")
    assert launch_problems(good) == []
    bad = good.replace("  cudaGetLastError();  // why\n", "")
    assert len(launch_problems(bad)) == 1 and "before the launch" in launch_problems(bad)[0]
    unchecked = good.replace("  const cudaError_t e = cudaGetLastError();\n", "")
    assert "after the launch" in launch_problems(unchecked)[0]

"""The sm_90a probe (csrc/sm90a_marker.cuh): which pass of the build the runtime loaded for the current GPU, told by
a marker kernel's launch bound (cudaFuncGetAttributes' maxThreadsPerBlock), so that asking never touches a stream
and the first GEMM of a process may sit inside a CUDA-graph capture.

No GPU asks the question in CI, so these tests read the answer the runtime would get from the compiled code: the
marker's bound (EIATTR_MAX_THREADS in the cubin's .nv.info) must be kSm90aMarkerThreads in the sm_90a pass and
kOtherMarkerThreads in every other, both in a compile of the header per architecture and in the cubins built into
ditq._C. On an H200 tests/csrc/test_gemm_sm90_cuda.py asks the runtime itself, inside a capture."""
import os
import re
import subprocess
import tempfile

import pytest
import torch

import nvcc_sass

HEADER = os.path.join(nvcc_sass.CSRC, "sm90a_marker.cuh")
PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sm90a_marker_probe.cu")
MARKER = "sm90a_marker_kernel"


def _constant(name):
    m = re.search(rf"constexpr int {name} = (\d+);", open(HEADER).read())
    assert m, f"{name} not found in csrc/sm90a_marker.cuh"
    return int(m.group(1))


SM90A_THREADS, OTHER_THREADS = _constant("kSm90aMarkerThreads"), _constant("kOtherMarkerThreads")


def max_threads(elf_text: str, function_part: str):
    """{mangled name: launch bound} of the functions whose name contains ``function_part``, from
    ``cuobjdump -elf``: each function's .nv.info section holds an EIATTR_MAX_THREADS entry (x, y, z) when the
    kernel has a __launch_bounds__."""
    parts = re.split(r"^\.nv\.info\.(\S+)\s*$", elf_text, flags=re.M)
    out = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        if function_part in name:
            m = re.search(r"EIATTR_MAX_THREADS\s*\n\s*Format:[^\n]*\n\s*Value:\s*(0x[0-9a-fA-F]+)", body)
            out[name] = int(m.group(1), 16) if m else None
    return out


def _elf(cuobjdump, cubin):
    return subprocess.run([cuobjdump, "-elf", cubin], capture_output=True, text=True, check=True).stdout


def _cubin_arch(elf_text: str) -> str:
    """The architecture a cubin was compiled for ("sm_90a"), from its ``cuobjdump -elf`` text: the nvcc command
    line embedded in the cubin (``-arch sm_90a``) first, then the PTX target, then the header's ``sm=``. An older
    cuobjdump (triton 3.6 bundles CUDA 12.8's) reads a CUDA 13 cubin's header as ``sm=90`` and names the file
    ``.sm_90.cubin``: only the embedded command line keeps the "a"."""
    m = (re.search(r"-arch[ =]sm_(\d+a?)\b", elf_text) or re.search(r"\.target sm_(\d+a?)\b", elf_text)
         or re.search(r"\bsm=(\d+a?)\b", elf_text))
    assert m, "no architecture in the cubin's cuobjdump -elf text"
    return f"sm_{m.group(1)}"


def test_the_two_bounds_tell_the_passes_apart():
    assert SM90A_THREADS != OTHER_THREADS and 0 < min(SM90A_THREADS, OTHER_THREADS)
    assert max(SM90A_THREADS, OTHER_THREADS) <= 1024 and SM90A_THREADS % 32 == 0 and OTHER_THREADS % 32 == 0


@pytest.mark.parametrize("arch", ["sm_80", "sm_90", "sm_90a"])
def test_marker_bound_per_architecture(arch, tmp_path):
    """Only the sm_90a pass carries the sm_90a bound: a plain sm_90 build (no wgmma) must answer no, or the Hopper
    kernels, compiled there as traps, would be launched."""
    nvcc_sass.compile_cuda(PROBE, arch, tmp_path)
    _, cuobjdump = nvcc_sass.tools()
    bounds = max_threads(_elf(cuobjdump, str(tmp_path / f"{os.path.basename(PROBE)}_{arch}.cubin")), MARKER)
    assert len(bounds) == 1, f"{arch}: marker kernels found: {bounds}"
    assert list(bounds.values()) == [SM90A_THREADS if arch == "sm_90a" else OTHER_THREADS], (arch, bounds)


def test_reader_finds_the_bound_and_its_absence():
    text = (".nv.info._Z6markerPi\n\tAttribute:\tEIATTR_MAX_THREADS\n\tFormat:\tEIFMT_SVAL\n\tValue:\t0x60 0x1 0x1 \n"
            ".nv.info._Z5otherPi\n\tAttribute:\tEIATTR_REGCOUNT\n\tFormat:\tEIFMT_SVAL\n\tValue:\t0x4 \n")
    assert max_threads(text, "marker") == {"_Z6markerPi": 96}
    assert max_threads(text, "other") == {"_Z5otherPi": None}


def _built_cubins():
    """{arch: [cubin paths]} embedded in the built ditq._C, or skip saying why."""
    from ditq.backends import cuda_backend
    if cuda_backend._C is None or not cuda_backend.built_with_cuda():
        pytest.skip("ditq._C is not built with CUDA kernels")
    _, cuobjdump = nvcc_sass.tools()
    tmp = tempfile.mkdtemp(prefix="ditq_marker_")
    subprocess.run([cuobjdump, "-xelf", "all", os.path.abspath(cuda_backend._C.__file__)], cwd=tmp,
                   capture_output=True, check=True)
    found = {}
    for f in sorted(os.listdir(tmp)):
        path = os.path.join(tmp, f)
        if f.endswith(".cubin") and MARKER.encode() in open(path, "rb").read():
            found.setdefault(_cubin_arch(_elf(cuobjdump, path)), []).append(path)
    if not found:
        pytest.skip("ditq._C holds no cubin with the marker kernel")
    return cuobjdump, found


def test_built_extension_carries_the_marker_per_pass():
    """The cubins that ship: each architecture's copy of the marker has its pass's bound, and the build's sm_90a
    pass (the one the Hopper kernels need) says so."""
    cuobjdump, found = _built_cubins()
    for arch, paths in found.items():
        bounds = {}
        for p in paths:
            bounds.update(max_threads(_elf(cuobjdump, p), MARKER))
        want = SM90A_THREADS if arch == "sm_90a" else OTHER_THREADS
        assert bounds and set(bounds.values()) == {want}, (arch, bounds)


def test_op_answers_no_without_a_gpu():
    from ditq.backends import cuda_backend
    if cuda_backend._C is None:
        pytest.skip("ditq._C is not built")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: tests/csrc/test_gemm_sm90_cuda.py checks the answer there")
    assert torch.ops.ditq_C.gemm_sm90_available() is False

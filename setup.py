"""Build and install ditq.

* ``kernels/`` (Triton) ships as ``ditq.kernels``: never as a top-level ``kernels`` module, a name that
  belongs to another package which diffusers probes for.
* ``ditq._C`` is built from ``csrc/`` with torch's cpp_extension (ninja):
  - torch with CUDA and nvcc found: the real CUDA kernels (``csrc/*.cu``) for a short architecture list
    (``TORCH_CUDA_ARCH_LIST``, default ``8.0;9.0a`` when no GPU is visible: torch's full default list takes
    far too long), plus the same kernels compiled by the host compiler for the SIMT emulator;
  - CPU-only torch or no nvcc: the emulated kernels only (backend ``cuda-emulated``), and a one-line notice
    that the CUDA kernels were not built.
  Install with ``pip install --no-build-isolation -e .``: this file imports torch, and pip's build isolation
  would otherwise install a second torch to build against.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0a"


def _rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


def _nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return os.path.join(cuda_home, "bin", "nvcc")
    return shutil.which("nvcc")


# torch.utils.cpp_extension fixes CUDA_HOME when it is imported, and with no GPU visible it guesses from the
# nvcc on PATH; a wrapper script in /usr/local/bin makes that /usr/local and the link fails ("cannot find
# -lcudart"). Point it at the standard toolkit root before torch is imported.
if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"


def _pip_cuda_includes():
    """Headers torch's CUDA headers include (ATen/cuda/CUDAContext.h -> cusparse.h, cublas_v2.h) that a bare
    nvcc toolkit lacks but torch's pip CUDA wheels (nvidia/cu*/include) carry."""
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    if os.path.exists(os.path.join(cuda_home, "include", "cusparse.h")):
        return []
    import site
    roots = site.getsitepackages() + [site.getusersitepackages()]
    found = sorted(glob.glob(os.path.join(r, "nvidia", "*", "include", "cusparse.h")) for r in roots)
    return [os.path.dirname(f) for hits in found for f in hits][:1]


def _built_archs(torch):
    """The SM architectures nvcc builds for, as "80,90", for csrc/families.cpp (kernel_families' built_archs):
    from TORCH_CUDA_ARCH_LIST ("8.0;9.0a", "8.6+PTX", "8.0 9.0"), else the visible GPUs (torch's own rule)."""
    import re
    spec = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if spec:
        archs = {int(a) * 10 + int(b) for a, b in re.findall(r"(\d+)\.(\d+)", spec)}
    else:
        archs = {a * 10 + b for a, b in (torch.cuda.get_device_capability(i)
                                         for i in range(torch.cuda.device_count()))}
    return ",".join(str(a) for a in sorted(archs))


def _extensions():
    if os.environ.get("DITQ_NO_EXTENSION") == "1":
        print("ditq: DITQ_NO_EXTENSION=1, building no C++/CUDA extension", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("ditq: torch is not installed, so ditq._C (CUDA and emulated kernels) was not built; "
              "install torch first and use pip install --no-build-isolation", file=sys.stderr)
        return [], {}

    host_sources = _rel(glob.glob(os.path.join(HERE, "csrc", "*.cpp")))
    cuda_sources = _rel(glob.glob(os.path.join(HERE, "csrc", "*.cu")))
    if not host_sources:
        return [], {}
    # torch >= 2.10's headers need C++20 (bindings.cpp); -U_FORTIFY_SOURCE: fortified longjmp rejects the
    # emulator's stack switch; -g0 cancels Python's default -g (debug info doubles the torch TU's build time);
    # kernels carry nvcc's `#pragma unroll`, unknown to g++ in the emulated build.
    cxx = ["-O2", "-std=c++20", "-U_FORTIFY_SOURCE", "-g0", "-Wno-unknown-pragmas"]
    include = [os.path.join(HERE, "csrc")]
    include += _pip_cuda_includes()
    with_cuda = torch.version.cuda is not None and _nvcc() is not None and cuda_sources
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
        nvcc = ["-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr"]
        if _built_archs(torch):  # host compiler only: nvcc would split "80,90" into two -D options
            cxx.append(f"-DDITQ_CUDA_ARCHS={_built_archs(torch)}")
        ext = cpp_extension.CUDAExtension(
            "ditq._C", host_sources + cuda_sources, include_dirs=include,
            define_macros=[("DITQ_WITH_CUDA", "1")], extra_compile_args={"cxx": cxx, "nvcc": nvcc})
    else:
        why = "torch is a CPU-only build" if torch.version.cuda is None else "nvcc was not found (set CUDA_HOME)"
        print(f"ditq: {why}: the CUDA kernels (backend 'cuda') were NOT built; the same kernels are built "
              f"for the CPU emulator (backend 'cuda-emulated') only.", file=sys.stderr)
        ext = cpp_extension.CppExtension(
            "ditq._C", host_sources, include_dirs=include, define_macros=[("DITQ_WITH_CUDA", "0")],
            extra_compile_args={"cxx": cxx})
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="ditq",
    version="0.1.0",
    description="Real-integer post-training quantization and inference for Diffusion Transformers",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ditq", "ditq.*"]) + ["ditq.kernels"],
    package_dir={"ditq.kernels": "kernels"},
    package_data={"ditq.kernels": ["configs/*.json"],
                  "ditq.demo": ["*.md", "*.json", "*.png", "*.safetensors", "model/*", "model/*/*"]},
    include_package_data=False,
    entry_points={"console_scripts": ["ditq=ditq.cli:main"]},
    # diffusers is required: ditq quantizes its models and loads through its pipelines. accelerate lets diffusers
    # load (quantized) checkpoints without allocating full-precision weights first (it warns without it).
    install_requires=["torch>=2.4", "numpy", "safetensors", "tqdm", "diffusers>=0.30", "accelerate"],
    extras_require={"triton": ["triton>=3.0"],
                    "demo": ["scikit-learn", "matplotlib"],
                    # what the test suite needs; diffusers pinned to the release the tests were verified on
                    "test": ["pytest", "pytest-xdist", "hypothesis", "scikit-learn", "matplotlib", "triton>=3.0",
                             "ninja", "diffusers==0.42.1"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)

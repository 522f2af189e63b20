#!/usr/bin/env bash
# Build ditq._C for a GPU machine ahead of time, here on the CPU, so that the GPU's minutes are not spent in nvcc.
#
# The GPU suite's install stage compiles the extension (nvcc for sm_90a plus the emulated kernels' C++), about
# two minutes of a ten-minute call. The compile needs no GPU: only the GPU machine's Python and torch. So this
# script builds it against them, in a virtualenv here that holds the same versions (the H200 image: Python 3.12,
# torch 2.11.0+cu130), from a clean clone of HEAD, and leaves in .prebuilt/ (git-ignored, carried to the GPU
# machine with carry=[".whl", ".prebuilt"]):
#   _C.<python tag>.so   the extension, for TORCH_CUDA_ARCH_LIST (default 9.0a) and the CPU emulator
#   BUILD_INFO           the sources' hash (git ls-files csrc setup.py, contents), torch's version, the archs
# benchmarks/gpu_suite.sh uses it only when all three match the machine and the tree it runs on, and the module
# loads; otherwise it builds as before. A stale .so can therefore never be tested in place of the sources.
#
#   python3.12 -m venv /work/venv312 && /work/venv312/bin/pip install torch==2.11.0 numpy setuptools wheel ninja
#   bash benchmarks/prebuild_extension.sh /work/venv312/bin/python     # ~10 min on 2 cores; 20-30 MB
set -eu
PY=${1:?usage: prebuild_extension.sh PYTHON, a python with the torch version of the GPU machine}
cd "$(dirname "$0")/.."
REPO=$PWD
ARCHS=${TORCH_CUDA_ARCH_LIST:-9.0a}
WORK=$(mktemp -d /tmp/ditq_prebuild.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
git clone -q "$REPO" "$WORK/ditq"
cd "$WORK/ditq"
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST="$ARCHS" MAX_JOBS=${MAX_JOBS:-2} \
  "$PY" setup.py -q build_ext --inplace
SO=$(ls ditq/_C*.so)
mkdir -p "$REPO/.prebuilt"
rm -f "$REPO"/.prebuilt/_C*.so
cp "$SO" "$REPO/.prebuilt/"
TORCH_VERSION=$("$PY" -c 'import torch; print(torch.__version__)')
{ echo "sources $(bash benchmarks/source_hash.sh)"
  echo "torch $TORCH_VERSION"
  echo "archs $ARCHS"
  echo "commit $(git rev-parse --short HEAD)"; } >"$REPO/.prebuilt/BUILD_INFO"
echo "prebuilt: $REPO/.prebuilt/$(basename "$SO") ($(du -h "$SO" | cut -f1)); carry it with carry=[\".prebuilt\"]"
cat "$REPO/.prebuilt/BUILD_INFO"

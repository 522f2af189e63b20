#!/usr/bin/env bash
# Prepare, here on the CPU, what a GPU call carries (benchmarks/gpu_suite.sh; the device tool's
# carry=[".whl", ".prebuilt"]), so that none of the GPU's minutes go to what a CPU can do:
#   .whl/       the wheels the GPU image lacks (it has no internet): diffusers (pure Python) and torchao, for the
#               image's Python 3.12;
#   .prebuilt/  ditq._C built against the image's Python 3.12 and torch 2.11 (benchmarks/prebuild_extension.sh).
# Both folders are git-ignored. The suite checks .prebuilt/ against this tree and builds on the GPU machine when it
# does not match, so a stale folder costs minutes, never a wrong result. Rerun after any change under csrc/.
#
#   bash benchmarks/prepare_gpu_run.sh            # 3.7 min on the 2-core CPU here (downloads, venv, nvcc)
#
# PY312 (default: a python3.12 on PATH or under pyenv) makes the virtualenv VENV (default /work/venv312) that
# holds the image's torch; an existing VENV with that torch is reused.
set -eu
cd "$(dirname "$0")/.."
if [ -z "${PY312:-}" ]; then  # a python3.12 that runs (a pyenv shim may exist without the version selected)
  for c in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
    if "$c" -c pass 2>/dev/null; then PY312=$c; break; fi
  done
fi
PY312=${PY312:-}
VENV=${VENV:-/work/venv312}
IMAGE_TORCH=2.11.0

python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers==0.42.1
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 -d .whl torchao==0.17.0
echo "wheels: $(ls .whl | tr '\n' ' ')"

if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$IMAGE_TORCH')" \
    2>/dev/null; then
  [ -n "$PY312" ] || { echo "prepare_gpu_run: no python3.12 (set PY312)" >&2; exit 2; }
  "$PY312" -m venv "$VENV"
  "$VENV/bin/pip" install -q "torch==$IMAGE_TORCH" numpy setuptools wheel ninja
fi
bash benchmarks/prebuild_extension.sh "$VENV/bin/python"

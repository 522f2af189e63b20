"""With pytest's importlib mode the test directory is not on sys.path; put it there so that test modules can share
setup with their siblings (the split-K Hopper tests reuse the unsplit ones' tile ids and inputs, the SASS tests
nvcc_sass). The GPU tests' common skip conditions are fixtures here."""
import os
import sys

import pytest
import torch

from ditq import backends

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="module")
def cuda_pair():
    """For the `cuda`-marked tests that run a real kernel beside its emulated twin: the cuda_backend module, when
    a CUDA GPU is visible and both backends ("cuda" on it, "cuda-emulated" on the CPU) are available; else skip,
    saying which is missing."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    for name, device in (("cuda", "cuda"), ("cuda-emulated", "cpu")):
        reason = backends.unavailable_reason(name, device)
        if reason is not None:
            pytest.skip(f"backend {name!r} unavailable on {device}: {reason}")
    from ditq.backends import cuda_backend
    return cuda_backend


@pytest.fixture(scope="module")
def hopper_pair(cuda_pair):
    """:func:`cuda_pair` on an sm_90 GPU (H100 / H200), where the Hopper (wgmma + TMA) kernels run."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Hopper kernels need an sm_90 GPU (H100 / H200)")
    return cuda_pair

import pytest
import torch

from ditq import backends
from ditq.backends import BackendUnavailableError


def test_torch_backend_runs_everywhere_and_auto_falls_back_to_it_on_cpu():
    assert "torch" in backends.available_backends("cpu")
    assert backends.resolve("auto", "cpu") in backends.available_backends("cpu")
    assert backends.get_backend("torch", "cpu").name == "torch"


def test_unknown_backend_lists_the_choices():
    with pytest.raises(BackendUnavailableError, match="unknown backend 'tpu'.*torch, triton, cuda, cuda-emulated, auto"):
        backends.resolve("tpu", "cpu")


def test_cuda_backend_on_cpu_tensors_says_why_and_what_is_available():
    with pytest.raises(BackendUnavailableError) as e:
        backends.resolve("cuda", "cpu")
    msg = str(e.value)
    assert "backend 'cuda' is not available on cpu" in msg and "Available on cpu:" in msg and "torch" in msg


def test_op_routes_the_backend_error_to_the_user():
    x = torch.randn(2, 8)
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' is not available"):
        torch.ops.ditq.quantize_act(x, None, "cuda")

"""The real CUDA activation-quantization kernels against the emulated ones (bit for bit) and the reference.
Marked `cuda`: skipped without a GPU (benchmarks/gpu_suite.sh runs them)."""
import pytest
import torch

import ditq  # noqa: F401
from ditq.backends import cuda_backend
from ditq.quant import reference as ref

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not cuda_backend.built_with_cuda(), reason="ditq._C built without CUDA")]

SHAPES = [(1, 1), (1, 1152), (3, 17), (5, 40), (13, 1152), (256, 4608), (1000, 1152)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dynamic", [True, False], ids=["per_token", "static"])
def test_real_equals_emulated_and_reference(dtype, dynamic):
    gen = torch.Generator().manual_seed(3)
    for m, k in SHAPES:
        x = (torch.randn(m, k, generator=gen) * 5).to(dtype)
        scale = None if dynamic else torch.tensor([float(x.float().abs().max()) / 150])
        q_e, s_e = torch.ops.ditq.quantize_act(x, scale, "cuda-emulated")
        q_c, s_c = torch.ops.ditq.quantize_act(x.cuda(), None if scale is None else scale.cuda(), "cuda")
        torch.cuda.synchronize()
        assert torch.equal(q_c.cpu(), q_e) and torch.equal(s_c.cpu(), s_e), f"{dtype} {m}x{k}"
        rq = ref.quantize_per_token(x)[0] if dynamic else ref.quantize_with_scale(x, scale, 127)
        assert torch.equal(q_e, rq)


def test_runs_on_the_current_stream_and_device_checks():
    x = torch.randn(64, 1152, device="cuda", dtype=torch.bfloat16)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        q, sc = torch.ops.ditq_C.quantize_act(x, None)
    s.synchronize()
    assert torch.equal(q.cpu(), ref.quantize_per_token(x.cpu())[0])
    with pytest.raises(ValueError, match="scale is on"):
        torch.ops.ditq_C.quantize_act(x, torch.tensor([1.0]))

"""The real fused LayerNorm + modulation + quantization on a GPU (backend "cuda":
ditq_C::norm_modulate_quantize), equal bit for bit to the same kernel run by the SIMT emulator on the same
inputs (the same summation order in both builds). Skipped without a GPU; benchmarks/gpu_suite.sh runs them
(pytest -m cuda)."""
import pytest
import torch


pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=("f32", "bf16", "f16"))
@pytest.mark.parametrize("k", (1152, 37))
def test_fused_norm_equals_the_emulated_kernel(cuda_pair, dtype, k):
    g = torch.Generator().manual_seed(k)
    x = (torch.randn(2, 33, k, generator=g) * 3 + 1).to(dtype)
    shift, scale = torch.randn(2, k, generator=g).to(dtype), (torch.randn(2, k, generator=g) * 0.2).to(dtype)
    for act in (None, torch.tensor([0.02])):
        torch.full((66, k), -128, dtype=torch.int8, device="cuda")  # poison the allocation q gets back
        q, s = torch.ops.ditq_C.norm_modulate_quantize(x.cuda(), shift.cuda(), scale.cuda(), 1e-6,
                                                       None if act is None else act.cuda())
        qe, se = torch.ops.ditq_C.norm_modulate_quantize(x, shift, scale, 1e-6, act)
        assert torch.equal(q.cpu(), qe) and torch.equal(s.cpu(), se)

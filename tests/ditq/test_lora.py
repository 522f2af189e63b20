"""LoRA with ditq: adapters are merged into the float weights before quantizing (diffusers' fuse_lora), so the
quantized model carries them at no cost per step; an adapter loaded into an already quantized model is refused.
diffusers' LoRA support needs ``peft``, which ditq does not depend on: without it these tests skip."""
import copy

import pytest
import torch

import ditq

from .tiny_models import tiny_flux

peft = pytest.importorskip("peft", reason="diffusers' LoRA support needs peft (not a ditq dependency)")

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_mlp", "proj_out", "ff.net.0.proj", "ff.net.2"]


def _adapter():
    torch.manual_seed(3)  # init_lora_weights=False: random A and B, so the adapter changes the output
    return peft.LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False)


def _w8a8():
    return ditq.QuantConfig.preset("w8a8", backend="torch", progress=False)


def test_fused_lora_is_quantized_with_the_weights(tmp_path):
    model, inputs = tiny_flux()
    with torch.no_grad():
        base = model(**inputs).sample
    model.add_adapter(_adapter())
    with torch.no_grad():
        with_lora = model(**inputs).sample
    assert ditq.sqnr(with_lora, base) < 30  # the adapter matters
    model.fuse_lora()
    model.unload_lora()
    assert not any("lora" in name for name, _ in model.named_modules())
    report = ditq.quantize(model, _w8a8(), calib_fn=lambda m: m(**inputs))
    assert not report.unplanned_skips
    with torch.no_grad():
        quantized = model(**inputs).sample
    assert ditq.sqnr(with_lora, quantized) > 30 > ditq.sqnr(base, quantized)  # it computes the model with the LoRA
    ditq.save_quantized(model, tmp_path / "ckpt")
    loaded = ditq.load_quantized(tmp_path / "ckpt", progress=False)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, quantized)


def test_adapter_after_quantizing_is_refused():
    model, inputs = tiny_flux()
    ditq.quantize(model, _w8a8(), calib_fn=lambda m: m(**inputs))
    with torch.no_grad():
        before = model(**inputs).sample
    with pytest.raises(ValueError, match="QuantLinear"):
        model.add_adapter(_adapter())
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, before)

"""LoRA merged before quantizing: adapters are merged into the float weights (diffusers' fuse_lora), so the
quantized model carries them at no cost per step; peft refuses an adapter on an already quantized model (ditq's
own run-time adapters, ``ditq.load_lora``, are tested in test_lora_runtime.py). diffusers' LoRA support needs
``peft``, which ditq does not depend on: without it these tests skip."""
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


def test_runtime_adapter_matches_peft(tmp_path):
    """A LoRA trained with peft and saved by diffusers (save_lora_adapter: diffusers keys, lora_alpha in the file's
    metadata, here alpha = 2 r) loads into the quantized model with ditq.load_lora and computes what peft computes
    on the float model, to the quantization error. peft's random init makes a very strong adapter (the adapted float
    output is 2.5 dB from the unadapted one): measured 39.4 dB at run time, 42.7 dB merged then quantized; with the
    alpha ignored it would be 8.6 dB."""
    model, inputs = tiny_flux()
    quantized = copy.deepcopy(model)
    ditq.quantize(quantized, _w8a8(), calib_fn=lambda m: m(**inputs))
    torch.manual_seed(3)
    model.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    with torch.no_grad():
        with_lora = model(**inputs).sample
    model.save_lora_adapter(tmp_path)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1
    ditq.load_lora(quantized, files[0])
    with torch.no_grad():
        got = quantized(**inputs).sample
    assert ditq.sqnr(with_lora, got) > 35
    ditq.set_lora_scale(quantized, 0.5)  # alpha / r was read from the metadata: half the scale is half the branch
    model.set_adapters(["default_0"] if "default_0" in model.peft_config else list(model.peft_config), weights=[0.5])
    with torch.no_grad():
        assert ditq.sqnr(model(**inputs).sample, quantized(**inputs).sample) > 35

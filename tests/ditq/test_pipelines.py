"""README's "Quantizing a DiT" on the text-to-image pipelines (PixArt, SD3, FLUX) as a user writes it: quantize the
*pipeline*, sample 2 steps, save, ``ditq info``, load, sample again (the same images), cast to bfloat16.

The pipelines' modules import ``transformers`` (their text encoders' classes), which ditq does not depend on: the
tests skip without it. The pipelines are built without text encoders and called with prompt embeddings (what a text
encoder would give), so nothing is downloaded; the DiT pipeline is tested in test_io and test_models.
"""
import pytest
import torch

import ditq
from ditq import QuantConfig
from ditq.nn import QuantLinear
from tiny_models import FAMILIES

pytest.importorskip("transformers", reason="diffusers' text-to-image pipelines import transformers")


def _vae():
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    # shift_factor: SD3 and FLUX latents are shifted as well as scaled (their VAEs' configs set both)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                         down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                         layers_per_block=1, norm_num_groups=4, sample_size=8, shift_factor=0.1).eval()


def _pipeline(family):
    """(pipeline without text encoders, the components from_pretrained must be told are absent, call kwargs)."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
    g = torch.Generator().manual_seed(5)
    model, _ = FAMILIES[family]()
    if family == "pixart":
        from diffusers import PixArtAlphaPipeline
        pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=_vae(), transformer=model,
                                   scheduler=DPMSolverMultistepScheduler())
        absent = {}  # PixArt's text encoder and tokenizer are optional components
        kw = dict(prompt_embeds=torch.randn(2, 6, 32, generator=g), prompt_attention_mask=torch.ones(2, 6),
                  negative_prompt=None, negative_prompt_embeds=torch.randn(2, 6, 32, generator=g),
                  negative_prompt_attention_mask=torch.ones(2, 6), use_resolution_binning=False)
    elif family == "sd3":
        from diffusers import StableDiffusion3Pipeline
        absent = {f"{part}{i}": None for part in ("text_encoder", "tokenizer") for i in ("", "_2", "_3")}
        pipe = StableDiffusion3Pipeline(transformer=model, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(),
                                        **absent)
        kw = dict(prompt_embeds=torch.randn(2, 6, 32, generator=g),
                  pooled_prompt_embeds=torch.randn(2, 32, generator=g),
                  negative_prompt_embeds=torch.randn(2, 6, 32, generator=g),
                  negative_pooled_prompt_embeds=torch.randn(2, 32, generator=g))
    else:
        from diffusers import FluxPipeline
        absent = {f"{part}{i}": None for part in ("text_encoder", "tokenizer") for i in ("", "_2")}
        pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(), transformer=model, **absent)
        kw = dict(prompt_embeds=torch.randn(1, 6, 32, generator=g),
                  pooled_prompt_embeds=torch.randn(1, 32, generator=g))
    pipe.set_progress_bar_config(disable=True)
    return pipe, absent, dict(kw, height=8, width=8)


def _sample(pipe, kw):
    dtype = pipe.transformer.dtype
    kw = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}
    return pipe(**kw, num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("family", ["pixart", "sd3", "flux"])
def test_the_readme_on_a_text_to_image_pipeline(family, tmp_path):
    from ditq.cli import info
    pipe, absent, kw = _pipeline(family)
    ref = _sample(pipe, kw)
    cfg = QuantConfig.preset("w4a8", group_size=32, backend="torch", progress=False)
    report = ditq.quantize(pipe, cfg, calib_inputs=dict(kw, num_inference_steps=2))
    assert report.calibration["calls_per_run"] == [1]  # first-step: the calibration run stopped after one call
    out = _sample(pipe, kw)
    assert ditq.sqnr(ref, out) > 25.0
    ditq.save_quantized(pipe, str(tmp_path))
    described = info(str(tmp_path))
    assert described["pipeline_class"].endswith(type(pipe).__name__)
    assert len(described["layers"]) == len(report.layers)
    loaded = ditq.load_quantized(str(tmp_path), progress=False, **absent)
    assert type(loaded) is type(pipe) and isinstance(loaded.transformer, type(pipe.transformer))
    assert sum(isinstance(m, QuantLinear) for m in loaded.transformer.modules()) == len(report.layers)
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(_sample(loaded, kw), out)
    with pytest.raises(ditq.convert.QuantizeError, match="already quantized by ditq"):
        ditq.quantize(loaded, cfg, calib_inputs=dict(kw, num_inference_steps=2))
    bf = _sample(pipe.to(torch.bfloat16), kw)  # after quantizing: the quantized layers keep their integers
    assert bf.dtype == torch.bfloat16 and ditq.sqnr(out, bf.float()) > 20.0

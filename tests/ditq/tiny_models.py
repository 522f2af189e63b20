"""Tiny random diffusers models built from configs (nothing downloaded), shared by the runtime tests.

Widths are multiples of 64 so group sizes 32 and 64 divide every K; every model is built from a config, offline.
"""
import zlib

import torch
from diffusers import DiffusionPipeline


def tiny_dit(seed=0, **overrides):
    from diffusers import DiTTransformer2DModel
    torch.manual_seed(seed)
    kw = dict(num_layers=2, num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8,
              sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    kw.update(overrides)
    return DiTTransformer2DModel(**kw).eval()


def tiny_vae(seed=0):
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                         down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                         layers_per_block=1, norm_num_groups=4, sample_size=8).eval()


def tiny_dit_pipeline(seed=0):
    from diffusers import DDIMScheduler, DiTPipeline
    # DiTPipeline hard-codes 1000 as the null class for guidance: the label table needs 1001 rows.
    return DiTPipeline(transformer=tiny_dit(seed, num_embeds_ada_norm=1000), vae=tiny_vae(seed),
                       scheduler=DDIMScheduler())


def dit_inputs(batch=2, seed=0, t=999):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
                timestep=torch.full((batch,), t, dtype=torch.long),
                class_labels=torch.randint(0, 10, (batch,), generator=g))


# Transformer-level families: (model, inputs of one denoising call).
def tiny_pixart():
    from diffusers import PixArtTransformer2DModel
    torch.manual_seed(0)
    m = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8,
                                 num_layers=2, cross_attention_dim=64, caption_channels=32, sample_size=8,
                                 patch_size=2, norm_type="ada_norm_single", use_additional_conditions=False).eval()
    g = torch.Generator().manual_seed(1)
    inp = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g),
               encoder_hidden_states=torch.randn(2, 6, 32, generator=g),
               timestep=torch.tensor([999, 999]), added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    return m, inp


def tiny_sd3(**overrides):
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(0)
    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=32,
                              num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=64,
                              pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16, **overrides).eval()
    if overrides.get("qk_norm"):  # trained norm weights are not ones: random ones show each norm is applied
        with torch.no_grad():
            for name, p in m.named_parameters():
                if ".norm_q." in name or ".norm_k." in name or ".norm_added_" in name:
                    p.uniform_(0.5, 1.5)
    g = torch.Generator().manual_seed(1)
    inp = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g),
               encoder_hidden_states=torch.randn(2, 6, 32, generator=g),
               pooled_projections=torch.randn(2, 32, generator=g), timestep=torch.tensor([999, 999]))
    return m, inp


def tiny_sd35():
    """SD3.5-large-like: SD3's joint blocks with RMSNorm q/k norms (``qk_norm="rms_norm"``), no dual attention."""
    return tiny_sd3(qk_norm="rms_norm")


def tiny_sd35m():
    """SD3.5-medium-like (diffusers' MMDiT-X): q/k RMSNorms and, in the first block, the dual attention (``attn2``,
    a second self-attention over the image stream with its own q/k RMSNorms and adaLN shift / scale / gate); the
    last block is a plain SD3.5 block, as in SD3.5-medium, whose dual attention stops halfway."""
    return tiny_sd3(qk_norm="rms_norm", dual_attention_layers=(0,))


def tiny_flux():
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    m = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                               attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                               pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=(4, 6, 6)).eval()
    g = torch.Generator().manual_seed(1)
    tokens, text = 16, 6
    inp = dict(hidden_states=torch.randn(1, tokens, 16, generator=g),
               encoder_hidden_states=torch.randn(1, text, 32, generator=g),
               pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([1.0]),
               img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(text, 3))
    inp["img_ids"][:, 1] = torch.arange(tokens) // 4
    inp["img_ids"][:, 2] = torch.arange(tokens) % 4
    return m, inp


FAMILIES = {"pixart": tiny_pixart, "sd3": tiny_sd3, "sd35": tiny_sd35, "sd35m": tiny_sd35m, "flux": tiny_flux}


def tiny_family(name):
    """(model, inputs) of one tiny family, "dit" included (only that one is built)."""
    return (tiny_dit(seed=0), dit_inputs(batch=2, seed=1)) if name == "dit" else FAMILIES[name]()


# More DiT families through the generic path (no fused block of their own; each model's forward as diffusers
# wrote it). Inputs: one denoising call at a high-noise timestep, batch 1.
def _randn(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _grid_ids(tokens, width, axes):
    ids = torch.zeros(tokens, axes)
    ids[:, 1], ids[:, 2] = torch.arange(tokens) // width, torch.arange(tokens) % width
    return ids


def tiny_wan():
    from diffusers import WanTransformer3DModel
    torch.manual_seed(0)
    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4,
                              out_channels=4, text_dim=32, freq_dim=64, ffn_dim=128, num_layers=2, rope_max_seq_len=32)
    return m.eval(), dict(hidden_states=_randn(1, 4, 2, 8, 8), encoder_hidden_states=_randn(1, 6, 32, seed=2),
                          timestep=torch.tensor([999]))


def tiny_qwenimage():
    from diffusers import QwenImageTransformer2DModel
    torch.manual_seed(0)
    m = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32,
                                    num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(8, 12, 12))
    return m.eval(), dict(hidden_states=_randn(1, 16, 64), encoder_hidden_states=_randn(1, 6, 32, seed=2),
                          encoder_hidden_states_mask=torch.ones(1, 6, dtype=torch.long),
                          timestep=torch.tensor([1.0]), img_shapes=[(1, 4, 4)])


def tiny_sana():
    from diffusers import SanaTransformer2DModel
    torch.manual_seed(0)
    m = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32,
                               num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=32,
                               cross_attention_dim=64, caption_channels=32, sample_size=8)
    return m.eval(), dict(hidden_states=_randn(1, 4, 8, 8), encoder_hidden_states=_randn(1, 6, 32, seed=2),
                          timestep=torch.tensor([999]))


def tiny_chroma():
    from diffusers import ChromaTransformer2DModel
    torch.manual_seed(0)
    m = ChromaTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                 attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                 axes_dims_rope=(4, 6, 6), approximator_num_channels=8, approximator_hidden_dim=64,
                                 approximator_layers=1)
    return m.eval(), dict(hidden_states=_randn(1, 16, 16), encoder_hidden_states=_randn(1, 6, 32, seed=2),
                          timestep=torch.tensor([1.0]), img_ids=_grid_ids(16, 4, 3), txt_ids=torch.zeros(6, 3))


def tiny_flux2():
    from diffusers import Flux2Transformer2DModel
    torch.manual_seed(0)
    m = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
    return m.eval(), dict(hidden_states=_randn(1, 16, 16), encoder_hidden_states=_randn(1, 6, 32, seed=2),
                          timestep=torch.tensor([1.0]), img_ids=_grid_ids(16, 4, 4)[None],
                          txt_ids=torch.zeros(1, 6, 4))


def tiny_ltx():
    from diffusers import LTXVideoTransformer3DModel
    torch.manual_seed(0)
    m = LTXVideoTransformer3DModel(in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=32,
                                   cross_attention_dim=64, num_layers=2, caption_channels=32)
    return m.eval(), dict(hidden_states=_randn(1, 2 * 4 * 4, 16), encoder_hidden_states=_randn(1, 6, 32, seed=2),
                          timestep=torch.tensor([999]), encoder_attention_mask=torch.ones(1, 6), num_frames=2,
                          height=4, width=4)


def tiny_cogvideox():
    from diffusers import CogVideoXTransformer3DModel
    torch.manual_seed(0)
    m = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
                                    time_embed_dim=32, text_embed_dim=32, num_layers=2, sample_width=8,
                                    sample_height=8, sample_frames=5, patch_size=2, max_text_seq_length=6)
    return m.eval(), dict(hidden_states=_randn(1, 2, 4, 8, 8), encoder_hidden_states=_randn(1, 6, 32, seed=2),
                          timestep=torch.tensor([999]))


def tiny_lumina2():
    from diffusers import Lumina2Transformer2DModel
    torch.manual_seed(0)
    m = Lumina2Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, hidden_size=64, num_layers=2,
                                  num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=16,
                                  axes_dim_rope=(8, 12, 12), axes_lens=(32, 32, 32), cap_feat_dim=32)
    return m.eval(), dict(hidden_states=_randn(1, 4, 8, 8), timestep=torch.tensor([0.0]),
                          encoder_hidden_states=_randn(1, 6, 32, seed=2),
                          encoder_attention_mask=torch.ones(1, 6, dtype=torch.bool))


def tiny_auraflow():
    from diffusers import AuraFlowTransformer2DModel
    torch.manual_seed(0)
    m = AuraFlowTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1,
                                   num_single_dit_layers=1, attention_head_dim=32, num_attention_heads=2,
                                   joint_attention_dim=32, caption_projection_dim=64, out_channels=4,
                                   pos_embed_max_size=64)
    return m.eval(), dict(hidden_states=_randn(1, 4, 8, 8), encoder_hidden_states=_randn(1, 6, 32, seed=2),
                          timestep=torch.tensor([999]))


def tiny_hunyuanvideo():
    from diffusers import HunyuanVideoTransformer3DModel
    torch.manual_seed(0)
    m = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32,
                                       num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2,
                                       patch_size_t=1, guidance_embeds=False, text_embed_dim=32,
                                       pooled_projection_dim=16, rope_axes_dim=(8, 12, 12))
    return m.eval(), dict(hidden_states=_randn(1, 4, 2, 8, 8), timestep=torch.tensor([999]),
                          encoder_hidden_states=_randn(1, 6, 32, seed=2), encoder_attention_mask=torch.ones(1, 6),
                          pooled_projections=_randn(1, 16, seed=3))


def tiny_zimage():
    from diffusers import ZImageTransformer2DModel
    torch.manual_seed(0)
    m = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=64, n_layers=2,
                                 n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[8, 12, 12],
                                 axes_lens=[64, 32, 32])
    # Z-Image takes lists (one entry per image) and calls its noise level ``t`` (0 = noise, 1 = clean)
    return m.eval(), dict(x=[_randn(4, 1, 8, 8)], t=torch.tensor([0.0]), cap_feats=[_randn(6, 32, seed=2)])


MORE_FAMILIES = {"wan": tiny_wan, "qwenimage": tiny_qwenimage, "sana": tiny_sana, "chroma": tiny_chroma,
                 "flux2": tiny_flux2, "ltx": tiny_ltx, "cogvideox": tiny_cogvideox, "lumina2": tiny_lumina2,
                 "auraflow": tiny_auraflow, "hunyuanvideo": tiny_hunyuanvideo, "zimage": tiny_zimage}


def tiny_wan_experts_pipeline(boundary_ratio=0.5):
    """A Wan 2.2 A14B-shaped pipeline of two tiny Wan transformers (see :class:`TinyWanExpertsPipeline`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    high, _ = tiny_wan()
    torch.manual_seed(1)
    low, _ = tiny_wan()  # the same architecture, other weights
    return TinyWanExpertsPipeline(high, low, FlowMatchEulerDiscreteScheduler(shift=3.0), boundary_ratio)


def _tiny_text_features(prompt, scale=1.0):
    g = torch.Generator().manual_seed(zlib.crc32(prompt.encode()))
    return scale * torch.randn(6, 32, generator=g)


class TinyWanExpertsPipeline(DiffusionPipeline):
    """Wan 2.2 A14B's denoising loop over two experts. diffusers' WanPipeline needs the ``transformers`` package
    (its UMT5 text encoder), which the tests do without, so this one runs that loop itself: the high-noise expert
    ``transformer`` at t >= boundary, the low-noise ``transformer_2`` below it, and guidance as two calls per step
    (conditional, then unconditional) at the same timestep, as WanPipeline makes them. Prompts become fixed random
    text features (a stand-in text encoder)."""
    model_cpu_offload_seq = "transformer->transformer_2"
    _optional_components = ["transformer", "transformer_2"]

    def __init__(self, transformer, transformer_2, scheduler, boundary_ratio=0.5):
        super().__init__()
        self.register_modules(transformer=transformer, transformer_2=transformer_2, scheduler=scheduler)
        self.register_to_config(boundary_ratio=boundary_ratio)

    @torch.no_grad()
    def __call__(self, prompt, num_inference_steps=4, guidance_scale=4.0, generator=None):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        # the unconditional features are larger than the prompts' on purpose: a calibration that observed only the
        # conditional call of a step would miss the range of the unconditional one
        cond = torch.stack([_tiny_text_features(p) for p in prompts])
        uncond = torch.stack([_tiny_text_features("", scale=4.0)] * len(prompts))
        latents = torch.randn(len(prompts), 4, 2, 8, 8, generator=generator)
        self.scheduler.set_timesteps(num_inference_steps)
        boundary = self.config.boundary_ratio * self.scheduler.config.num_train_timesteps
        for t in self.progress_bar(self.scheduler.timesteps):
            model = self.transformer if t >= boundary else self.transformer_2
            ts = t.expand(latents.shape[0])
            c = model(hidden_states=latents, timestep=ts, encoder_hidden_states=cond, return_dict=False)[0]
            u = model(hidden_states=latents, timestep=ts, encoder_hidden_states=uncond, return_dict=False)[0]
            latents = self.scheduler.step(u + guidance_scale * (c - u), t, latents).prev_sample
        return latents

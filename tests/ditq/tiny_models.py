"""Tiny random diffusers models built from configs (nothing downloaded), shared by the runtime tests.

Widths are multiples of 64 so group sizes 32 and 64 divide every K; every model is built from a config, offline.
"""
import torch


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

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

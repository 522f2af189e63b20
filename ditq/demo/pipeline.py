"""A class-conditional DiT pipeline in pixel space (no VAE), shaped like diffusers' DiTPipeline.

The denoising loop is DiTPipeline's, line for line where it matters: the batch is doubled for classifier-free
guidance with the null class id, the timestep is broadcast to the doubled batch, and `self.transformer(...)` runs
exactly once per step on that doubled batch. The quantization runtime relies on that last point: it counts transformer
calls to calibrate activation ranges on the first denoising step only.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, DiTTransformer2DModel, ImagePipelineOutput
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils.torch_utils import randn_tensor


class PixelDiTPipeline(DiffusionPipeline):
    r"""Class-conditional image generation with a `DiTTransformer2DModel` that denoises pixels directly.

    Components:
        transformer: a class-conditional `DiTTransformer2DModel`; its null (unconditional) class id is
            `transformer.config.num_embeds_ada_norm`.
        scheduler: any diffusers scheduler usable with DiTPipeline (DDIMScheduler, DPMSolverMultistepScheduler, ...).
    """

    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer: DiTTransformer2DModel, scheduler: KarrasDiffusionSchedulers):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int] | torch.Tensor,
        guidance_scale: float = 1.5,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 25,
        output_type: str | None = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate one image per class label.

        Args:
            class_labels: class ids in `[0, num_embeds_ada_norm)`, one image each.
            guidance_scale: classifier-free guidance weight; guidance (and the doubled batch) is on when > 1.
            generator: makes the initial noise deterministic.
            num_inference_steps: denoising steps; the transformer runs once per step.
            output_type: `"pil"`, `"np"` (N, H, W, C) float in [0, 1], or `"pt"` (N, C, H, W) float in [0, 1].
            return_dict: return an `ImagePipelineOutput` rather than a tuple.
        """
        class_labels = torch.as_tensor(class_labels, device=self._execution_device).reshape(-1)
        batch_size = len(class_labels)
        sample_size = self.transformer.config.sample_size
        channels = self.transformer.config.in_channels
        out_channels = self.transformer.config.out_channels or channels
        null_class = self.transformer.config.num_embeds_ada_norm
        guided = guidance_scale > 1

        samples = randn_tensor(
            shape=(batch_size, channels, sample_size, sample_size),
            generator=generator,
            device=self._execution_device,
            dtype=self.transformer.dtype,
        )
        model_input = torch.cat([samples] * 2) if guided else samples
        class_null = torch.full_like(class_labels, null_class)
        class_labels_input = torch.cat([class_labels, class_null], 0) if guided else class_labels

        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.progress_bar(self.scheduler.timesteps):
            if guided:
                # Both halves must stay identical: the scheduler steps the doubled batch with the same guided eps.
                half = model_input[: len(model_input) // 2]
                model_input = torch.cat([half, half], dim=0)
            model_input = self.scheduler.scale_model_input(model_input, t)

            timesteps = t
            if not torch.is_tensor(timesteps):
                dtype = torch.float64 if isinstance(timesteps, float) else torch.int64
                timesteps = torch.tensor([timesteps], dtype=dtype, device=model_input.device)
            elif len(timesteps.shape) == 0:
                timesteps = timesteps[None].to(model_input.device)
            timesteps = timesteps.expand(model_input.shape[0])

            noise_pred = self.transformer(model_input, timestep=timesteps, class_labels=class_labels_input).sample

            if guided:
                eps, rest = noise_pred[:, :channels], noise_pred[:, channels:]
                cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
                half_eps = uncond_eps + guidance_scale * (cond_eps - uncond_eps)
                eps = torch.cat([half_eps, half_eps], dim=0)
                noise_pred = torch.cat([eps, rest], dim=1)

            # A learned-sigma model (out_channels == 2 * in_channels) carries variances the scheduler does not use.
            if out_channels // 2 == channels:
                model_output, _ = torch.split(noise_pred, channels, dim=1)
            else:
                model_output = noise_pred

            model_input = self.scheduler.step(model_output, t, model_input).prev_sample

        samples = model_input.chunk(2, dim=0)[0] if guided else model_input
        samples = (samples.float() / 2 + 0.5).clamp(0, 1)

        if output_type != "pt":
            samples = samples.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                samples = self.numpy_to_pil(samples)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (samples,)
        return ImagePipelineOutput(images=samples)

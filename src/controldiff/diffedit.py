"""DiffEdit's mask (Couairon et al. 2022): the region an edit from a source to a target
prompt should repaint is where the model's noise predictions for the two prompts differ,
on the image noised part-way. ``pipe.diffedit_mask(image, source, target)`` equals
diffusers' ``StableDiffusionDiffEditPipeline.generate_mask``; the edit itself is
``pipe(target, inversion=inv, controls=[DiffEdit(mask, inv)])``
(:mod:`controldiff.controls.diffedit`).

One UNet call over all branches (source and target, each with its negative prompt when
guided), for ``num_maps_per_mask`` noise draws per image. The differences are compared as
noise (epsilon): for v- or x0-predicting models the raw outputs differ from it by one
factor per step, which the relative threshold cancels, so the mask is the same either way.

Where we differ from the reference: it unpacks ``encode_prompt``'s (prompt, negative) as
(negative, prompt), so it guides each prompt towards its negative; with equal negative
prompts (the default) that only scales the difference and the masks agree, with
different ones its mask is ours with each prompt and its negative swapped. It fails
without guidance (``guidance_scale`` <= 1) and marks everything when the two predictions
are identical (0/0); ours runs unguided and returns an empty mask.
"""
from __future__ import annotations

from typing import List, Optional, Union

import torch

from .checks import finite_number, is_number, positive_int
from .controls.cfg import CFG
from .images import as_batch, preprocess_image
from .models.vae import DiagonalGaussian
from .noise import randn_tensor, seeded
from .sampling.control import Step
from .text.encode import TextCond, as_list


def _count(value, name: str, batch: int) -> None:
    """A prompt argument gives one prompt, or one per target prompt."""
    if value is not None and len(as_list(value, name)) not in (1, batch):
        raise ValueError(f"{name}: got {len(as_list(value, name))} prompts for {batch} target prompts; "
                         "pass one, or one per target prompt")


class DiffEditMixin:
    """``Pipeline.diffedit_mask``."""

    def _encode_repeated(self, pixels: torch.Tensor, maps: int, generator) -> torch.Tensor:
        """Latents of each image ``maps`` times, each a separate posterior sample: the draws of
        encoding the repeated images (the reference's way), for one VAE pass per image."""
        pixels = pixels.to(self.device, self.vae.dtype)
        posterior = DiagonalGaussian(self.vae.encode(pixels).parameters.repeat_interleave(maps, dim=0))
        return self._scaled_latents(posterior.sample(generator))

    @torch.no_grad()
    def diffedit_mask(
        self,
        image,
        source_prompt: Union[str, List[str]],
        target_prompt: Union[str, List[str]],
        num_maps_per_mask: int = 10,
        mask_encode_strength: float = 0.5,
        mask_thresholding_ratio: float = 3.0,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        seed: Optional[int] = None,
        *,
        source_negative_prompt: Union[str, List[str], None] = None,
        target_negative_prompt: Union[str, List[str], None] = None,
        generator=None,
        scheduler: str = "ddim",
        clip_skip: Optional[int] = None,
    ) -> torch.Tensor:
        """The DiffEdit mask of ``image`` (one, or one per target prompt) for editing
        ``source_prompt`` into ``target_prompt``: a float tensor (prompts, h, w) of 0/1 at
        latent size (1 = repaint), on the CPU. Edit it freely or pass your own (pixel or latent
        size) to :class:`~controldiff.controls.diffedit.DiffEdit`.

        The image is noised to ``mask_encode_strength`` of ``scheduler``'s schedule of
        ``num_inference_steps`` (``num_maps_per_mask`` draws); the absolute difference of the
        guided source and target noise predictions, averaged over draws and channels, is
        clamped at ``mask_thresholding_ratio`` times its mean over the batch and binarised at
        half of that. Everything is checked before any model runs."""
        targets = as_list(target_prompt, "target_prompt")
        batch = len(targets)
        _count(source_prompt, "source_prompt", batch)
        sources = as_list(source_prompt, "source_prompt")
        sources = sources * (batch // len(sources))
        _count(source_negative_prompt, "source_negative_prompt", batch)
        _count(target_negative_prompt, "target_negative_prompt", batch)
        maps = positive_int(num_maps_per_mask, "num_maps_per_mask")
        if not is_number(mask_encode_strength) or not 0.0 < mask_encode_strength <= 1.0:
            raise ValueError(f"mask_encode_strength: expected a value in (0, 1], got {mask_encode_strength!r}")
        ratio = finite_number(mask_thresholding_ratio, "mask_thresholding_ratio")
        if ratio <= 0:
            raise ValueError(f"mask_thresholding_ratio: expected a number > 0, got {mask_thresholding_ratio!r}")
        positive_int(num_inference_steps, "num_inference_steps")
        cfg = CFG(finite_number(guidance_scale, "guidance_scale"))
        if self.info.kind != "txt2img":
            raise ValueError(f"diffedit_mask: needs a text-to-image model, this one is {self.info.kind!r}")
        generator, seed = seeded(generator, seed, batch * maps)
        image = as_batch(image, "image", "image")
        count = len(image) if isinstance(image, list) else image.shape[0]
        if count not in (1, batch):
            raise ValueError(f"image: got {count} images for {batch} target prompts; pass one, or one per prompt")
        height, width = self._default_size(None, None, image, ())
        for name, value in (("source_prompt", sources), ("target_prompt", targets),
                            ("source_negative_prompt", source_negative_prompt),
                            ("target_negative_prompt", target_negative_prompt)):
            self.prompt_encoder.check(value, name)
        sched = self.make_scheduler(scheduler)
        sched.set_timesteps(num_inference_steps, device=self.device)
        t_start = num_inference_steps - min(int(num_inference_steps * mask_encode_strength), num_inference_steps)
        if t_start >= num_inference_steps:
            raise ValueError(f"mask_encode_strength: {mask_encode_strength} with {num_inference_steps} steps "
                             "noises the image to no step; raise it or num_inference_steps")
        begin = t_start * sched.order
        sched.set_begin_index(begin)
        rows = batch * maps

        # ---- the work
        def encode(prompts, negative):
            return self._encode_prompts(prompts, negative, None, None, cfg.enabled, maps, clip_skip)

        source, target = encode(sources, source_negative_prompt), encode(targets, target_negative_prompt)
        ctx = self._context(sched, sched.timesteps[begin:begin + 1], target, generator, maps, height, width, cfg.scale)
        self._inversion_time_ids(ctx, height, width, rows)  # SDXL: the micro-conditioning of pipe.invert
        latents = self._repeat(self._encode_repeated(preprocess_image(image, height, width), maps, generator),
                               rows, "image")
        noise = randn_tensor(latents.shape, generator, self.device, self.dtype)
        t = ctx.timesteps[0]
        noised = sched.add_noise(latents, noise, ctx.timesteps[:1].repeat(rows))

        # branches in the reference's order: source negative, source, target negative, target
        names = ("uncond", "cond") if cfg.enabled else ("cond",)
        conds = [text[k] for text in (source, target) for k in names]
        ids = None
        if ctx.time_ids is not None:
            uncond_ids = ctx.time_ids if ctx.uncond_time_ids is None else ctx.uncond_time_ids
            ids = torch.cat([uncond_ids if k == "uncond" else ctx.time_ids for _ in (source, target) for k in names])
        x = sched.scale_model_input(torch.cat([noised] * len(conds)), t)
        preds = ctx.run_unet(x, t, TextCond.cat(conds), time_ids=ids).chunk(len(conds))
        if cfg.enabled:
            g = cfg.scale
            src, tgt = preds[0] + g * (preds[1] - preds[0]), preds[2] + g * (preds[3] - preds[2])
        else:
            src, tgt = preds
        alpha, sigma = sched.noise_level(begin)
        step = Step(index=0, t=t, count=1, alpha=alpha, sigma=sigma, prediction_type=sched.config.prediction_type)
        xs = x[:rows, :latents.shape[1]]
        difference = (step.x0_eps(tgt, xs)[1] - step.x0_eps(src, xs)[1]).abs()
        guide = difference.reshape(batch, maps, *difference.shape[-3:]).mean([1, 2]).float()
        # the threshold is relative to the mean over the whole batch, as the reference's
        clamp = guide.mean() * ratio
        if not clamp > 0:  # identical predictions: nothing to repaint (the reference's 0/0 marks everything)
            return torch.zeros_like(guide).cpu()
        return (guide.clamp(0, clamp) / clamp > 0.5).float().cpu()

"""Inpainting, the two ways the reference does it.

- ``InpaintConcat`` (9-channel UNets): mask and masked-image latents are extra input
  channels of every branch.
- ``InpaintBlend`` (4-channel UNets, "partial diffusion"): after each step the
  unmasked area is replaced by the original latents noised to the next timestep.
"""
from __future__ import annotations

import torch

from ..sampling.control import Control


class InpaintConcat(Control):
    def __init__(self, mask: torch.Tensor, masked_latents: torch.Tensor):
        self.extra = torch.cat([mask, masked_latents], dim=1)

    def setup(self, ctx):
        ctx.concat = self.extra if ctx.concat is None else torch.cat([ctx.concat, self.extra], dim=1)


class InpaintBlend(Control):
    def __init__(self, mask: torch.Tensor, image_latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        self.mask = mask                  # 1 = repaint, latent resolution
        self.image_latents = image_latents
        self.noise = noise
        self.timesteps = timesteps

    def after_step(self, ctx, step, latents):
        known = self.image_latents
        if step.index < step.count - 1:
            t_next = self.timesteps[step.index + 1]
            known = ctx.scheduler.add_noise(known, self.noise, t_next.reshape(1))
        return (1 - self.mask) * known + self.mask * latents

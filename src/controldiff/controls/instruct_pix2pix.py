"""InstructPix2Pix: edit an image by instruction, on 8-channel UNets.

The image's latents (``vae.encode(image).mode()``, unscaled, like the reference) are
extra input channels of every branch. With guidance on, one more branch evaluates the
negative prompt with a zero image; CFG's "uncond" (negative prompt + image) and "cond"
(prompt + image) complete the reference's three-way batch. CFG already gives
``u_img + g (c - u_img)``; adding ``(ig - 1) (u_img - u_zero)`` makes the reference's
``u_zero + g (c - u_img) + ig (u_img - u_zero)``. With ``image_guidance_scale == 1``
that term vanishes and the zero-image branch is not evaluated.

Reference quirk kept: the reference turns *all* guidance off when
``image_guidance_scale < 1`` (its ``do_classifier_free_guidance`` needs ig >= 1), so
the prediction is then the conditional one alone.
"""
from __future__ import annotations

import torch

from ..checks import finite_number
from ..images import as_batch, image_size, preprocess_image
from ..sampling.control import Branch, Control


class InstructPix2Pix(Control):
    def __init__(self, image, image_guidance_scale: float = 1.5):
        if image is None:
            raise ValueError("image: InstructPix2Pix needs the image to edit")
        self.image = as_batch(image, "image", "image")
        self.image_guidance_scale = finite_number(image_guidance_scale, "image_guidance_scale")
        self.name = "ip2p_uncond_zero_image"
        self._channels = slice(0, 0)
        self._zero = None


    def default_size(self):
        return image_size(self.image)

    def setup(self, ctx):
        channels = ctx.unet.config.in_channels
        if channels != 8:
            raise ValueError(f"InstructPix2Pix: needs an 8-channel instruct-pix2pix UNet; this model "
                             f"({ctx.info.kind if ctx.info is not None else 'unknown'}) has {channels} input channels")
        pixels = preprocess_image(self.image, ctx.height, ctx.width, "image").to(ctx.device, ctx.vae.dtype)
        latents = ctx.vae.encode(pixels).mode().to(ctx.dtype)
        if latents.shape[0] != ctx.batch:
            if ctx.batch % latents.shape[0]:
                raise ValueError(f"image: {latents.shape[0]} images cannot be spread over a batch of {ctx.batch}")
            latents = latents.repeat(ctx.batch // latents.shape[0], 1, 1, 1)
        start = 0 if ctx.concat is None else ctx.concat.shape[1]
        ctx.concat = latents if ctx.concat is None else torch.cat([ctx.concat, latents], dim=1)
        self._channels = slice(start, start + latents.shape[1])
        self._zero = None
        self.guided = "uncond" in ctx.text and self.image_guidance_scale >= 1.0

    def _zero_image(self, ctx) -> torch.Tensor:
        """ctx.concat with this control's channels zeroed (other controls' channels kept)."""
        if self._zero is None or self._zero.shape != ctx.concat.shape:
            self._zero = ctx.concat.clone()
            self._zero[:, self._channels] = 0
        return self._zero

    def branches(self, ctx, step):
        if not self.guided or self.image_guidance_scale == 1.0:
            return []
        return [Branch(self.name, ctx.text["uncond"], concat=self._zero_image(ctx),
                       time_ids=ctx.uncond_time_ids)]

    def combine(self, ctx, step, preds, pred):
        if "uncond" not in preds:
            return pred
        if self.image_guidance_scale < 1.0:
            return preds["cond"]  # the reference's quirk: no guidance at all
        if self.image_guidance_scale == 1.0:
            return pred
        return pred + (self.image_guidance_scale - 1.0) * (preds["uncond"] - preds[self.name])

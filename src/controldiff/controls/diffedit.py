"""DiffEdit (Couairon et al. 2022): regenerate an inverted image with a new prompt and keep
it outside a mask, as diffusers' ``StableDiffusionDiffEditPipeline.__call__``::

    inv = pipe.invert(image, source_prompt, strength=0.8)           # its inpaint_strength
    mask = pipe.diffedit_mask(image, source_prompt, target_prompt)
    out = pipe(target_prompt, inversion=inv, controls=[DiffEdit(mask, inv)])

After every step the latents outside the mask (0) are replaced by the inversion's latents
of that step: after step i by ``trajectory[:, i]``, the latents step i *started* from (the
reference's indexing, one step noisier than the latents they are mixed with; the last step
keeps the inversion's least-noised latents, not the clean image's).

The pipeline starts the run from ``inversion=`` (its steps, size, partial strength); the
control needs the same inversion for the trajectory. Both are given, and the control
checks they agree: the run's size, steps and scheduler in ``setup``, and at step 0 that
the run starts from exactly this inversion's latents.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..images import image_size, preprocess_mask
from ..inversion import Inversion
from ..sampling.control import Control


def latent_mask(mask, inversion: Inversion) -> torch.Tensor:
    """``mask`` (any mask input: white/1 = repaint) at the inversion's latent size, (N, 1, h, w)
    of 0/1. A latent-size mask (what ``pipe.diffedit_mask`` returns) is binarised at 0.5, as
    the reference; a pixel-size one is read like ``mask_image`` and resized to the latents
    by nearest neighbour, as the pipeline's inpainting does."""
    h, w = inversion.latents.shape[-2:]
    size = image_size(mask, "mask", "mask")
    if size == (h, w):
        return preprocess_mask(mask, h, w, "mask")
    if size == (inversion.height, inversion.width):
        return F.interpolate(preprocess_mask(mask, inversion.height, inversion.width, "mask"), size=(h, w))
    raise ValueError(f"mask: size {size} (h, w) is neither the inverted image's {(inversion.height, inversion.width)} "
                     f"nor its latents' {(h, w)}")


def _tile(t: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """``t`` repeated to ``batch`` rows as the pipeline repeats ``inversion=``'s latents."""
    if batch % t.shape[0]:
        raise ValueError(f"{name}: {t.shape[0]} images cannot be spread over a batch of {batch}")
    return t.repeat(batch // t.shape[0], *([1] * (t.ndim - 1)))


class DiffEdit(Control):
    """Keep the inverted image outside ``mask``, regenerate it inside (``pipe.invert``'s
    ``strength`` is DiffEdit's ``inpaint_strength``). An all-ones mask is plain generation
    from the inversion; an all-zeros one returns the inversion's last latents."""

    def __init__(self, mask, inversion: Inversion):
        if not isinstance(inversion, Inversion):
            raise ValueError(f"inversion: expected what pipe.invert() returns, got {type(inversion).__name__}")
        if inversion.method != "ddim":
            raise ValueError(f"inversion: DiffEdit follows a DDIM inversion's trajectory (pipe.invert(method='ddim')), "
                             f"got method {inversion.method!r}")
        self.mask = mask
        self.inversion = inversion
        self._latent_mask = latent_mask(mask, inversion)
        self._trajectory = self._mask = None

    def describe(self) -> dict:
        inv = self.inversion
        return {"name": "DiffEdit", "repainted": float(self._latent_mask.mean()),
                "inversion": {"num_inference_steps": inv.num_inference_steps, "strength": inv.strength,
                              "height": inv.height, "width": inv.width, "scheduler": inv.scheduler}}

    def setup(self, ctx):
        inv, again = self.inversion, "; generate with pipe(..., inversion=inv) from DiffEdit's inversion"
        if (ctx.height, ctx.width) != (inv.height, inv.width):
            raise ValueError(f"inversion: DiffEdit's inversion is {inv.height}x{inv.width}, this generation "
                             f"{ctx.height}x{ctx.width}{again}")
        if ctx.scheduler.name != inv.scheduler:
            raise ValueError(f"inversion: DiffEdit's inversion was made for the scheduler {inv.scheduler!r}, this "
                             f"generation uses {ctx.scheduler.name!r}{again}")
        if ctx.steps != inv.trajectory.shape[1]:
            raise ValueError(f"inversion: DiffEdit's inversion has {inv.trajectory.shape[1]} steps "
                             f"({inv.num_inference_steps} at strength {inv.strength:g}), this generation runs "
                             f"{ctx.steps}{again}")
        trajectory = _tile(inv.trajectory, ctx.batch, "inversion")
        self._trajectory = trajectory.transpose(0, 1).to(ctx.device, ctx.dtype)   # (steps, batch, C, h, w)
        self._mask = _tile(self._latent_mask, ctx.batch, "mask").to(ctx.device, ctx.dtype)

    def teardown(self, ctx):
        self._trajectory = self._mask = None

    def before_step(self, ctx, step, latents):
        if step.index == 0 and not torch.equal(latents, self._trajectory[0]):
            raise ValueError("inversion: this generation does not start from DiffEdit's inversion; pass the same "
                             "one as pipe(..., inversion=inv)")
        return latents

    def after_step(self, ctx, step, latents):
        return latents * self._mask + self._trajectory[step.index] * (1 - self._mask)

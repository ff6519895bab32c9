"""Region prompts (MultiDiffusion's region-based generation).

Each ``Region`` prompt is one more branch of the batched model call. Per latent pixel
the guided predictions of the regions and of the main prompt (the background) are
averaged, weighted by ``weight * mask``; the background's weight is
``max(0, 1 - sum of region weights)``, so a region of weight >= 1 replaces the
background inside its mask and overlapping regions average.

Written as a correction of the incoming prediction: region i guided is
``u + g (r_i - u) = cfg + g (r_i - c)``, so the average is
``noise + g * sum_i W_i (r_i - c)`` (W normalised weights). Terms other controls
added to ``noise`` (image guidance, SEGA, ...) are kept whatever the control order.

Why averaging noise predictions is the paper's averaging of denoised latents: every
scheduler step is affine in the model output (``x' = a x + b eps (+ c z)``, multistep
methods add earlier outputs with fixed coefficients) and the per-pixel weights sum to
one and do not change over the run, so ``step(sum W_i eps_i) = sum W_i step(eps_i)``
(with each region's history). Nonlinear steps (``clip_sample``, thresholding) are the
exception: there the result is the step of the averaged prediction.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from ..checks import finite_number
from ..images import image_size, to_tensor
from ..sampling.control import Branch, Control, crop_views
from ..text.encode import TextCond, check_text

_ids = itertools.count()


@dataclass
class Region:
    """A prompt for part of the image: ``mask`` (white = region, pixels, image size) or
    ``box=(x0, y0, x1, y1)`` in pixels; neither = the whole image."""

    prompt: str
    mask: Any = None
    box: Optional[Sequence[float]] = None
    weight: float = 1.0

    def __post_init__(self):
        if not isinstance(self.prompt, str):
            raise ValueError(f"prompt: expected a string, got {type(self.prompt).__name__}")
        check_text(self.prompt, "Region.prompt")
        if self.mask is not None and self.box is not None:
            raise ValueError("mask, box: give a region one of them, not both")
        finite_number(self.weight, "Region.weight", minimum=0.0)
        if self.box is not None:
            box = tuple(self.box)
            if len(box) != 4 or not all(isinstance(v, (int, float)) for v in box):
                raise ValueError(f"box: expected (x0, y0, x1, y1) in pixels, got {self.box!r}")
            self.box = box


def _mask_tensor(mask, argument: str) -> torch.Tensor:
    """Any mask input (``controldiff.images`` conventions, values kept soft) -> (N, 1, H, W) in [0, 1]."""
    height, width = image_size(mask, argument, "mask")
    return to_tensor(mask, height, width, "L", argument, "mask")[:, :1]


def region_mask(region: Region, height: int, width: int, argument: str) -> torch.Tensor:
    """The region at pixel resolution, (N, 1, height, width) in [0, 1]."""
    if region.box is not None:
        x0, y0, x1, y1 = region.box
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ValueError(f"{argument}.box: {region.box} is not a non-empty box inside the image "
                             f"(0 <= x0 < x1 <= {width}, 0 <= y0 < y1 <= {height})")
        mask = torch.zeros(1, 1, height, width)
        mask[..., int(round(y0)):int(round(y1)), int(round(x0)):int(round(x1))] = 1.0
        return mask
    if region.mask is None:
        return torch.ones(1, 1, height, width)
    mask = _mask_tensor(region.mask, f"{argument}.mask")
    if tuple(mask.shape[-2:]) != (height, width):
        raise ValueError(f"{argument}.mask: size {tuple(mask.shape[-2:])} (h, w) differs from the image size "
                         f"{(height, width)}")
    return mask


class Regions(Control):
    """Prompts for areas of the image, on top of the main prompt (the background)."""

    def __init__(self, regions: Sequence[Region]):
        regions = list(regions) if isinstance(regions, (list, tuple)) else regions
        if not isinstance(regions, list) or not regions or not all(isinstance(r, Region) for r in regions):
            raise ValueError(f"regions: expected a non-empty list of Region, got {regions!r}")
        self.regions = regions
        self.key = f"region{next(_ids)}"
        self.active: list[tuple[str, TextCond, torch.Tensor]] = []
        self.background: Optional[torch.Tensor] = None
        self.scale = 1.0

    def setup(self, ctx):
        f = ctx.vae.latent_factor
        size = (ctx.height // f, ctx.width // f)
        self.active = []
        total = torch.zeros(ctx.batch, 1, *size, device=ctx.device, dtype=ctx.dtype)
        for i, region in enumerate(self.regions):
            argument = f"regions[{i}]"
            mask = region_mask(region, ctx.height, ctx.width, argument)
            if mask.shape[0] not in (1, ctx.batch):
                raise ValueError(f"{argument}.mask: {mask.shape[0]} masks for a batch of {ctx.batch} images")
            if region.weight == 0:
                continue  # no effect, no model evaluation
            small = F.interpolate(mask, size=size, mode="nearest") * float(region.weight)
            small = small.expand(ctx.batch, -1, -1, -1).to(ctx.device, ctx.dtype)
            text = ctx.encode_prompt(region.prompt)
            text = text.tile(ctx.batch // text.embeds.shape[0])  # one prompt for a batch of several
            self.active.append((f"{self.key}.{i}", text, small))
            total = total + small
        self.background = (1.0 - total).clamp(min=0)
        self.guided = "uncond" in ctx.text
        if self.guided:
            self.scale = float(ctx.guidance_scale)

    def branches(self, ctx, step):
        return [Branch(name, text) for name, text, _ in self.active]

    def combine(self, ctx, step, preds, pred):
        if not self.active:
            return pred
        views = step.call.views if step.call is not None else None
        cond = preds["cond"]
        weight = crop_views(self.background, views)
        delta = torch.zeros_like(pred)
        for name, _, mask in self.active:
            m = crop_views(mask, views)
            delta = delta + m * (preds[name] - cond)
            weight = weight + m
        return pred + (self.scale if self.guided else 1.0) * delta / weight

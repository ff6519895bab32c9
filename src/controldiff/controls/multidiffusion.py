"""MultiDiffusion (panoramas): denoise overlapping windows, average the results.

Each step the canvas is cut into views (windows of ``window`` pixels every ``stride``
pixels, wrapping around horizontally with ``circular``); the loop's ``denoise`` runs
the usual evaluate-combine-step on up to ``batch_size`` views at once, and the stepped
windows are averaged where they overlap (MultiDiffusion eq. 5). The same as diffusers'
StableDiffusionPanoramaPipeline, including its one scheduler state per group of views
(multistep and ancestral schedulers keep per-group history, so results do not depend
on the order groups are visited).
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch

from ..sampling.control import Control, View, crop_views


def get_views(height: int, width: int, window: int, stride: int, circular: bool = False) -> list[View]:
    """Views of a ``height`` x ``width`` latent canvas, row-major, like the reference.

    A canvas no larger than the window in a dimension gets one view covering it. Unlike
    the reference, a last row/column of windows flush with the edge is added when the
    stride does not divide (the reference leaves that strip uncovered and zeroes it).
    """

    def starts(size: int, wrap: bool) -> list[int]:
        if size <= window:
            return [0]
        if wrap:
            return [i * stride for i in range(size // stride)]
        s = [i * stride for i in range((size - window) // stride + 1)]
        if s[-1] + window < size:
            s.append(size - window)
        return s

    wh, ww = min(window, height), min(window, width)
    return [View(h, h + wh, w, w + ww) for h in starts(height, False) for w in starts(width, circular)]


class MultiDiffusion(Control):
    """Split the canvas into windows (sizes in pixels) denoised in batches of views."""

    def __init__(self, window: int = 512, stride: int = 64, circular: bool = False, batch_size: Optional[int] = None):
        for name, value in (("window", window), ("stride", stride)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: expected a positive number of pixels, got {value!r}")
        if stride > window:
            raise ValueError(f"stride: {stride} is larger than window {window}; the windows would leave gaps")
        if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
            raise ValueError(f"batch_size: expected None (all views at once) or a positive integer, got {batch_size!r}")
        self.window, self.stride, self.circular, self.batch_size = window, stride, bool(circular), batch_size
        self.views: list[View] = []
        self.groups: list[list[View]] = []
        self._states: Optional[list] = None

    def setup(self, ctx):
        f = ctx.vae.latent_factor
        for name, value in (("window", self.window), ("stride", self.stride)):
            if value % f:
                raise ValueError(f"{name}: {value} pixels is not a multiple of {f} (the VAE's latent factor)")
        self.views = get_views(ctx.height // f, ctx.width // f, self.window // f, self.stride // f, self.circular)
        size = self.batch_size or len(self.views)
        self.groups = [self.views[i:i + size] for i in range(0, len(self.views), size)]
        self._states = None  # scheduler state per group, taken at the first step of this run
        if self.circular:
            # the reference decodes circular panoramas with 8 wrapped latent columns on each
            # side (decode_latents_with_padding); for the pipeline's decoder to honour
            ctx.decode_wrap = 8

    def calls_per_step(self) -> int:
        """UNet calls one step makes (groups of views)."""
        return math.ceil(len(self.views) / (self.batch_size or len(self.views)))

    def step_views(self, ctx, step, latents, denoise):
        several = len(self.groups) > 1
        if several and self._states is None:
            self._states = [copy.deepcopy(ctx.scheduler.__dict__) for _ in self.groups]
        value = torch.zeros_like(latents)
        count = torch.zeros_like(latents)
        for j, group in enumerate(self.groups):
            if several:  # each group steps with its own scheduler history, as the reference
                ctx.scheduler.__dict__.update(self._states[j])
            out = denoise(crop_views(latents, group), group)
            if several:
                self._states[j] = copy.deepcopy(ctx.scheduler.__dict__)
            for view, part in zip(group, out.chunk(len(group))):
                view.add_into(value, part)
                view.add_into(count, torch.ones_like(part))
        return torch.where(count > 0, value / count, value)

"""T2I-Adapter as a control: features of a control image added inside the UNet's down blocks.

The adapter runs once, in ``setup`` (its input does not change between steps); each call
then gets ``down_intrablock_additional_residuals``, repeated for every row and cropped per
view. Several adapters sum their ``scale``-weighted features: diffusers' MultiAdapter with
``adapter_conditioning_scale=[s1, s2, ...]`` equals ``[T2IAdapter(a1, i1, s1), T2IAdapter(a2,
i2, s2), ...]``. (MultiAdapter's own default weights, 1/n each, are reached with
``scale=1/n``.)
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..images import as_batch, image_size
from ..models.t2i_adapter import T2IAdapter as T2IAdapterModel
from ..sampling.control import Control, View
from .controlnet import check_device, check_scale, control_image

KEY = "down_intrablock_additional_residuals"


def intrablock_shapes(unet_config, latent_h: int, latent_w: int) -> list[tuple[int, int, int]]:
    """(channels, h, w) the UNet adds an intrablock residual at: one per down block, then the mid block."""
    shapes = []
    h, w = latent_h, latent_w
    kinds, channels = unet_config.down_block_types, unet_config.block_out_channels
    for i, (kind, ch) in enumerate(zip(kinds, channels)):
        last = i == len(kinds) - 1
        down_h, down_w = (h, w) if last else (math.ceil(h / 2), math.ceil(w / 2))
        # cross-attention blocks add it before their downsampler, plain blocks after it
        shapes.append((ch, h, w) if kind == "CrossAttnDownBlock2D" else (ch, down_h, down_w))
        h, w = down_h, down_w
    shapes.append((channels[-1], h, w))
    return shapes


def _view_at(view: View, d: int, factor: int) -> View:
    if any(c % d for c in (view.h0, view.h1, view.w0, view.w1)):
        raise ValueError(f"T2IAdapter: view {view} (latent pixels) is not aligned to the adapter's feature grid "
                         f"of {d} latent pixels; use a window and stride that are multiples of {d * factor} pixels")
    return View(view.h0 // d, view.h1 // d, view.w0 // d, view.w1 // d)


def add_intrablock(kwargs: dict, features: list) -> None:
    """Sum into the call's adapter residuals (several adapters add up)."""
    old = kwargs.get(KEY)
    if old is None:
        kwargs[KEY] = list(features)
        return
    out = [a + b for a, b in zip(old, features)]
    longer = old if len(old) > len(features) else features
    kwargs[KEY] = out + list(longer[len(out):])


class T2IAdapter(Control):
    """``T2IAdapter(model, image, scale=1.0)``: ``model`` from ``load_t2i_adapter(path)``; ``image``
    in [0, 1] (grayscale for adapters with ``in_channels=1``), resized to the output size."""

    def __init__(self, model: T2IAdapterModel, image, scale: float = 1.0):
        if not isinstance(model, T2IAdapterModel):
            raise ValueError(f"model: expected a T2IAdapter model (controldiff.load_t2i_adapter), "
                             f"got {type(model).__name__}")
        if image is None:
            raise ValueError("image: T2IAdapter needs a control image")
        self.model = model
        self.image = as_batch(image, "image", "control")
        self.scale = check_scale(scale)
        self._features: Optional[list] = None
        self._cache: tuple = (None, None)

    def default_size(self):
        return image_size(self.image)

    def _describe(self) -> str:
        c = self.model.config
        return f"T2IAdapter ({c.adapter_type}, channels={list(c.channels)}, downscale_factor={c.downscale_factor})"

    def setup(self, ctx) -> None:
        cfg = self.model.config
        check_device(self.model, ctx, "T2I-Adapter")
        for name, v in (("height", ctx.height), ("width", ctx.width)):
            if v % cfg.downscale_factor:
                raise ValueError(f"{name}: {self._describe()} needs a multiple of {cfg.downscale_factor}, got {v}")
        image = control_image(self.image, ctx, cfg.in_channels, self._describe(), expand=False)
        features = self.model(image.to(self.model.device, self.model.dtype))
        if features[0].shape[0] != ctx.batch:
            features = [f.repeat_interleave(ctx.batch // f.shape[0], dim=0) for f in features]
        self._factor = factor = ctx.vae.latent_factor if ctx.vae is not None else 8
        self._latent_h = ctx.height // factor
        expected = intrablock_shapes(ctx.unet.config, ctx.height // factor, ctx.width // factor)
        n_blocks = len(expected) - 1
        got = [tuple(f.shape[1:]) for f in features]
        if len(got) < n_blocks or got[:n_blocks] != expected[:n_blocks]:
            family = getattr(ctx.info, "family", None) or "this"
            raise ValueError(f"T2IAdapter: {self._describe()} cannot serve this {family} model: at {ctx.height}x"
                             f"{ctx.width} it gives features {got} (channels, h, w), the UNet's down blocks "
                             f"({list(ctx.unet.config.down_block_types)}) take {expected[:n_blocks]}")
        # features the UNet will not use (beyond the mid block, or not matching it) are dropped
        keep = n_blocks + (1 if len(got) > n_blocks and got[n_blocks] == expected[-1] else 0)
        self._features = [(f * self.scale).to(ctx.dtype) for f in features[:keep]]
        self._cache = (None, None)

    def prepare_call(self, ctx, step, call) -> None:
        if self.scale == 0.0:
            return  # the features would be exact zeros
        rows = call.x.shape[0]
        key = (rows, None if call.views is None else tuple(call.views))
        if self._cache[0] != key:
            out = []
            for f in self._features:
                if call.views is not None:
                    d = self._latent_h // f.shape[-2]  # latent pixels per feature position
                    f = torch.cat([_view_at(v, d, self._factor).crop(f) for v in call.views])
                if rows != f.shape[0]:
                    f = f.repeat(rows // f.shape[0], 1, 1, 1)
                out.append(f)
            self._cache = (key, out)
        add_intrablock(call.kwargs, self._cache[1])

"""ControlNet as a control: residuals for the UNet computed from a control image.

Each step, in ``prepare_call``, the ControlNet runs on the same batched (scaled) latents,
timestep and text embeddings as the UNet call and adds its residuals to the call's
``down_block_additional_residuals`` / ``mid_block_additional_residual``. Several
ControlNet controls sum their residuals (diffusers' MultiControlNetModel). ``start``/``end``
keep it active on a fraction of the steps, with diffusers' ``controlnet_keep`` rule; guess
mode runs it on the "cond" rows only (zeros elsewhere) with log-spaced residual scales.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..checks import finite_number
from ..images import as_batch, image_size, to_tensor01
from ..models.controlnet import ControlNetModel
from ..sampling.control import Control, crop_views


def check_scale(value, name: str = "scale") -> float:
    return finite_number(value, name, minimum=0.0)


def control_image(image, ctx, channels: int, owner: str, expand: bool = True) -> torch.Tensor:
    """The control image as (ctx.batch, channels, height, width) in [0, 1].

    One image serves the whole batch; k images serve k prompts, each repeated for its
    images per prompt (diffusers' ``repeat_interleave``); ``expand=False`` checks that but
    returns the k images."""
    mode = "L" if channels == 1 else "RGB"
    t = to_tensor01(image, ctx.height, ctx.width, mode, "image")
    if t.shape[1] != channels:
        raise ValueError(f"image: {owner} expects a control image with {channels} channel(s), got {t.shape[1]}")
    n = t.shape[0]
    if ctx.batch % n:
        raise ValueError(f"image: {n} control images for a batch of {ctx.batch}; pass one image, or one per prompt")
    if expand and n != ctx.batch:
        t = t.repeat_interleave(ctx.batch // n, dim=0)
    return t


def _kind(cfg) -> str:
    return "SDXL" if cfg.get("addition_embed_type") == "text_time" else "SD1/SD2"


def _per_block(v, n: int) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v] * n


def check_device(model, ctx, owner: str) -> None:
    """Control models must sit where the UNet is: moving tensors every step would be slow."""
    if model.device != ctx.device:
        raise ValueError(f"model: the {owner} is on {model.device}, the pipeline's UNet on {ctx.device}; "
                         f"load it with device={str(ctx.device)!r}")


def add_residuals(kwargs: dict, down: list, mid: torch.Tensor) -> None:
    """Sum into the call's ControlNet residuals (several ControlNets add up)."""
    old_down = kwargs.get("down_block_additional_residuals")
    if old_down is None:
        kwargs["down_block_additional_residuals"] = list(down)
        kwargs["mid_block_additional_residual"] = mid
        return
    kwargs["down_block_additional_residuals"] = [a + b for a, b in zip(old_down, down)]
    kwargs["mid_block_additional_residual"] = kwargs["mid_block_additional_residual"] + mid


class ControlNet(Control):
    """``ControlNet(model, image, scale=1.0, start=0.0, end=1.0, guess_mode=False)``.

    ``model``: a :class:`ControlNetModel` (``load_controlnet(path)``); ``image``: the control
    image (PIL, array, tensor in [0, 1] or path), resized to the output size."""

    def __init__(self, model: ControlNetModel, image, scale: float = 1.0, start: float = 0.0, end: float = 1.0,
                 guess_mode: bool = False):
        if not isinstance(model, ControlNetModel):
            raise ValueError(f"model: expected a ControlNetModel (controldiff.load_controlnet), "
                             f"got {type(model).__name__}")
        if image is None:
            raise ValueError("image: ControlNet needs a control image")
        self.model = model
        self.image = as_batch(image, "image", "control")
        self.scale = check_scale(scale)
        self.start, self.end = float(start), float(end)
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(f"start, end: expected 0 <= start < end <= 1, got start={start!r}, end={end!r}")
        self.guess_mode = bool(guess_mode) or bool(model.config.global_pool_conditions)
        self._cond: Optional[torch.Tensor] = None
        self._cache: tuple = (None, None)

    def default_size(self):
        return image_size(self.image)

    # ---------------------------------------------------------------- setup

    def _check_model(self, ctx) -> None:
        cn, unet = self.model.config, ctx.unet.config
        problems = []
        if cn.addition_embed_type != unet.addition_embed_type:
            problems.append(f"addition_embed_type {cn.addition_embed_type!r} vs {unet.addition_embed_type!r}")
        n = len(unet.block_out_channels)
        if _per_block(cn.cross_attention_dim, n) != _per_block(unet.cross_attention_dim, n):
            problems.append(f"cross_attention_dim {cn.cross_attention_dim} vs {unet.cross_attention_dim}")
        if list(cn.block_out_channels) != list(unet.block_out_channels):
            problems.append(f"block_out_channels {list(cn.block_out_channels)} vs {list(unet.block_out_channels)}")
        if _per_block(cn.layers_per_block, n) != _per_block(unet.layers_per_block, n):
            problems.append(f"layers_per_block {cn.layers_per_block} vs {unet.layers_per_block}")
        if cn.addition_embed_type == "text_time" and not problems:
            a, b = self.model.add_embedding.linear_1.in_features, ctx.unet.add_embedding.linear_1.in_features
            if a != b:
                problems.append(f"added-conditioning size {a} vs {b}")
        latent_channels = ctx.vae.config.latent_channels if ctx.vae is not None else 4
        if cn.in_channels not in (latent_channels, unet.in_channels):
            problems.append(f"in_channels {cn.in_channels} vs latents {latent_channels} / UNet {unet.in_channels}")
        if ctx.vae is not None and self.model.downscale != ctx.vae.latent_factor:
            problems.append(f"control image downscale {self.model.downscale} vs VAE latent factor "
                            f"{ctx.vae.latent_factor}")
        if problems:
            family = getattr(ctx.info, "family", None) or _kind(unet)
            raise ValueError(f"ControlNet: a {_kind(cn)} ControlNet cannot serve this {family} model (controlnet vs "
                             "unet: " + "; ".join(problems) + ")")

    def setup(self, ctx) -> None:
        self._check_model(ctx)
        check_device(self.model, ctx, "ControlNet")
        cond = control_image(self.image, ctx, self.model.config.conditioning_channels, "this ControlNet")
        self._cond = cond.to(self.model.device, self.model.dtype)
        self._factor = self.model.downscale
        self._cache = (None, None)

    # ---------------------------------------------------------------- per call
    def _scale_at(self, index: int, count: int) -> float:
        """diffusers' controlnet_keep: off before ``start`` and after ``end`` (fractions of the steps)."""
        off = index / count < self.start or (index + 1) / count > self.end
        return 0.0 if off else self.scale

    def _image_for(self, rows: int, views) -> torch.Tensor:
        key = (rows, None if views is None else tuple(views))
        if self._cache[0] != key:
            img = crop_views(self._cond, views, self._factor)
            if rows != img.shape[0]:
                img = img.repeat(rows // img.shape[0], 1, 1, 1)
            self._cache = (key, img)
        return self._cache[1]

    def prepare_call(self, ctx, step, call) -> None:
        scale = self._scale_at(step.index, step.count)
        if scale == 0.0:
            return  # the residuals would be exact zeros
        dtype = self.model.dtype
        x = call.x[:, : self.model.config.in_channels]
        embeds = call.embeds
        added = call.kwargs.get("added_cond_kwargs")
        rows = None
        if self.guess_mode and "cond" in call.slices and len(call.slices) > 1:
            rows = call.rows("cond")
            x, embeds = x[rows], embeds[rows]
            added = None if added is None else {k: v[rows] for k, v in added.items()}
        if added is not None:
            added = {k: v.to(dtype) for k, v in added.items()}
        image = self._image_for(x.shape[0], call.views)
        down, mid = self.model(x.to(dtype), call.t, embeds.to(dtype), image, scale,
                               added_cond_kwargs=added, guess_mode=self.guess_mode)
        out_dtype = call.x.dtype
        if rows is not None:
            down = [_into_rows(d, rows, call.x.shape[0]) for d in down]
            mid = _into_rows(mid, rows, call.x.shape[0])
        add_residuals(call.kwargs, [d.to(out_dtype) for d in down], mid.to(out_dtype))


def _into_rows(t: torch.Tensor, rows: slice, total: int) -> torch.Tensor:
    out = t.new_zeros((total, *t.shape[1:]))
    out[rows] = t
    return out

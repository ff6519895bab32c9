"""Depth conditioning for 5-channel depth models (SD2 depth2img).

The depth map is resized to the latent size (bicubic) and min/max normalised to
[-1, 1] per image, exactly as StableDiffusionDepth2ImgPipeline.prepare_depth_map, then
appended to every branch's input. Use the pipeline's ``image=`` / ``strength=`` for
the img2img start, as the reference does. Estimating depth from ``image`` needs a
depth estimator, which is not bundled yet: pass ``depth_map``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from ..images import open_image
from ..sampling.control import Control


def _depth_tensor(depth_map) -> torch.Tensor:
    """PIL / numpy / tensor / path depth -> (N, H, W) float (larger = nearer, any scale; a
    16-bit PNG keeps its 16 bits)."""
    if isinstance(depth_map, (str, Path)):
        depth_map = open_image(depth_map, "depth_map")
    if isinstance(depth_map, PIL.Image.Image):
        keep = depth_map.mode in ("F", "I") or depth_map.mode.startswith("I;16")  # 16/32-bit depth as it is
        depth_map = np.asarray(depth_map if keep else depth_map.convert("F"))
    if isinstance(depth_map, np.ndarray):
        depth_map = torch.from_numpy(depth_map.astype(np.float32))
    if not isinstance(depth_map, torch.Tensor):
        raise ValueError(f"depth_map: expected a PIL image, numpy array or tensor, got {type(depth_map).__name__}")
    d = depth_map.float()
    if d.ndim == 4:
        if d.shape[1] != 1:
            raise ValueError(f"depth_map: expected one channel, got shape {tuple(d.shape)}")
        d = d[:, 0]
    if d.ndim == 2:
        d = d[None]
    if d.ndim != 3:
        raise ValueError(f"depth_map: expected (H, W), (N, H, W) or (N, 1, H, W), got shape {tuple(d.shape)}")
    if not torch.isfinite(d).all():
        raise ValueError("depth_map: contains NaN or infinite values")
    flat = d.flatten(1)
    if (flat.amax(1) == flat.amin(1)).any():
        raise ValueError("depth_map: a constant depth map cannot be normalised to [-1, 1]")
    return d


def prepare_depth(depth: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, H, W) -> (N, 1, height, width) in [-1, 1], as the reference (bicubic, min/max)."""
    d = F.interpolate(depth.unsqueeze(1), size=(height, width), mode="bicubic", align_corners=False)
    lo = torch.amin(d, dim=[1, 2, 3], keepdim=True)
    hi = torch.amax(d, dim=[1, 2, 3], keepdim=True)
    return 2.0 * (d - lo) / (hi - lo) - 1.0


class Depth(Control):
    def __init__(self, image=None, depth_map=None):
        if depth_map is None:
            raise ValueError("depth_map: required; estimating depth from image needs a depth estimator, "
                             "which controldiff does not bundle yet (pass a depth map: PIL, numpy or tensor)")
        self.image = image  # kept for a future estimator; the img2img start is the pipeline's image=
        self.depth = _depth_tensor(depth_map)

    def setup(self, ctx):
        channels = ctx.unet.config.in_channels
        if channels != 5:
            raise ValueError(f"Depth: needs a 5-channel depth UNet; this model "
                             f"({ctx.info.kind if ctx.info is not None else 'unknown'}) has {channels} input channels")
        f = ctx.vae.latent_factor
        depth = prepare_depth(self.depth.to(ctx.device, ctx.dtype), ctx.height // f, ctx.width // f).to(ctx.dtype)
        if depth.shape[0] != ctx.batch:
            if ctx.batch % depth.shape[0]:
                raise ValueError(f"depth_map: {depth.shape[0]} maps cannot be spread over a batch of {ctx.batch}")
            depth = depth.repeat(ctx.batch // depth.shape[0], 1, 1, 1)
        ctx.concat = depth if ctx.concat is None else torch.cat([ctx.concat, depth], dim=1)

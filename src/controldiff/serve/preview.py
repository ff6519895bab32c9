"""A cheap preview of the image being sampled, from its current latents.

Four-channel latents (SD 1.x/2.x, SDXL) go through A1111's "Approx cheap" linear map
(``modules/sd_vae_approx.py``, ``cheap_approximation``: one 4x3 matrix per family), which costs
nothing next to a step, so a preview can come every step; no VAE runs. Other latent spaces have
no such map yet: no preview.
"""
from __future__ import annotations

import base64
import io
from typing import Optional

import torch
from PIL import Image

__all__ = ["preview_png", "preview_image"]

# A1111's coefficients: latent channel -> RGB in [-1, 1]
_SD = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))
_SDXL = ((0.3448, 0.4168, 0.4395), (-0.1953, -0.0290, 0.0250), (0.1074, 0.0886, -0.0163),
         (-0.3730, -0.2499, -0.2088))


@torch.no_grad()
def preview_image(family: str, latent_factor: int, latents: torch.Tensor) -> Optional[Image.Image]:
    """The first image of ``latents`` (the loop's scaled latents) as RGB at the output's pixel
    size, or None when the latent space has no cheap map."""
    x = latents[:1].detach().float().cpu()
    if x.shape[1] != 4:
        return None
    rgb = torch.einsum("bchw,cr->brhw", x, torch.tensor(_SDXL if family == "sdxl" else _SD))
    rgb = ((rgb[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    im = Image.fromarray(rgb, "RGB")
    return im.resize((im.width * latent_factor, im.height * latent_factor), Image.NEAREST)


def preview_png(pipe, latents: torch.Tensor) -> Optional[str]:
    """:func:`preview_image` for ``pipe``'s model, as base64 PNG."""
    im = preview_image(pipe.info.family, pipe.info.latent_factor, latents)
    if im is None:
        return None
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")

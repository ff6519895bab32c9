"""A cheap preview of the image being sampled, from its current latents.

Four-channel latents (SD 1.x/2.x, SDXL) go through A1111's "Approx cheap" linear map
(``modules/sd_vae_approx.py``, ``cheap_approximation``: one 4x3 matrix per family), which costs
nothing next to a step; other latent spaces go through the pipeline's own VAE decoder.
"""
from __future__ import annotations

import base64
import io

import torch
from PIL import Image

__all__ = ["preview_png", "preview_image"]

# A1111's coefficients, latent channel -> RGB in [-1, 1]
_SD = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))
_SDXL = ((0.3448, 0.4168, 0.4395), (-0.1953, -0.0290, 0.0250), (0.1074, 0.0886, -0.0163),
         (-0.3730, -0.2499, -0.2088))


@torch.no_grad()
def preview_image(pipe, latents: torch.Tensor) -> Image.Image:
    """The first image of ``latents`` (scaled model latents, as the loop holds them) as RGB, at
    the output's pixel size."""
    x = latents[:1].detach().float().cpu()
    if x.shape[1] == 4:
        coefs = torch.tensor(_SDXL if pipe.info.family == "sdxl" else _SD)
        rgb = torch.einsum("bchw,cr->brhw", x, coefs)
    else:
        vae = pipe.vae
        z = latents[:1].to(vae.dtype) / vae.config.get("scaling_factor", 0.18215)
        if vae.config.get("shift_factor") is not None:
            z = z + vae.config["shift_factor"]
        rgb = vae.decode(z).float().cpu()
    rgb = ((rgb[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    im = Image.fromarray(rgb, "RGB")
    f = pipe.info.latent_factor if x.shape[1] == 4 else 1
    return im.resize((im.width * f, im.height * f), Image.BILINEAR) if f > 1 else im


def preview_png(pipe, latents: torch.Tensor) -> str:
    """:func:`preview_image` as base64 PNG."""
    buf = io.BytesIO()
    preview_image(pipe, latents).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")

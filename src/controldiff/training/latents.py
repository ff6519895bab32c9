"""Images to scaled VAE latents, optionally cached: each image is encoded once and the
posterior (mean, std) kept; every step still draws its sample, with the same draw as an
uncached step, so caching changes speed, not results (it needs deterministic transforms)."""
from __future__ import annotations

import torch

from ..noise import randn_tensor

__all__ = ["LatentCache", "scale"]


def scale(vae, latents: torch.Tensor) -> torch.Tensor:
    return latents * vae.config.scaling_factor


class LatentCache:
    def __init__(self, vae, images):
        """``images``: one (3, H, W) tensor per example, in [-1, 1]."""
        with torch.no_grad():
            posts = [vae.encode(x[None].to(vae.device, vae.dtype)) for x in images]
        self.vae = vae
        self.mean = torch.cat([p.mean for p in posts])
        self.std = torch.cat([p.std for p in posts])

    def sample(self, indices) -> torch.Tensor:
        mean, std = self.mean[indices], self.std[indices]
        return scale(self.vae, mean + std * randn_tensor(mean.shape, device=mean.device, dtype=mean.dtype))

"""Images to scaled VAE latents, optionally cached: each image is encoded once and its
posterior kept; every step still draws its sample from the batch's posterior, exactly as an
uncached step does (same draw, same memory layout, which ``randn_like`` noise follows), so
caching changes speed, not results. It needs deterministic transforms (center crop or buckets, no flip)."""
from __future__ import annotations

import torch

from ..models.vae import DiagonalGaussian

__all__ = ["LatentCache", "scale"]


def scale(vae, latents: torch.Tensor) -> torch.Tensor:
    return latents * vae.config.scaling_factor


class LatentCache:
    def __init__(self, vae, images):
        """``images``: one (3, H, W) tensor per example, in [-1, 1]."""
        with torch.no_grad():
            self.parameters = [vae.encode(x[None].to(vae.device, vae.dtype)).parameters for x in images]
        self.shapes, self.vae = [tuple(x.shape) for x in images], vae  # sizes differ with buckets
        self.layouts: dict[tuple, tuple] = {}  # batch shape -> the VAE output's strides for it

    def _strides(self, shape: tuple):
        """The strides the VAE's output has for a batch of images of ``shape`` (the backend
        chooses the layout, e.g. channels-last for some batch sizes on CPU): probed once a shape."""
        if shape not in self.layouts:
            with torch.no_grad():
                batch = torch.zeros(shape, device=self.vae.device, dtype=self.vae.dtype)
                self.layouts[shape] = self.vae.encode(batch).parameters.stride()
        return self.layouts[shape]

    def sample(self, indices) -> torch.Tensor:
        """A batch's latents (its images of one size)."""
        cat = torch.cat([self.parameters[i] for i in indices])
        shape = (len(indices), *self.shapes[indices[0]])
        params = torch.empty_strided(cat.shape, self._strides(shape), dtype=cat.dtype, device=cat.device)
        params.copy_(cat)
        posterior = DiagonalGaussian(params)
        return scale(self.vae, posterior.sample())

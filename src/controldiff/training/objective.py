"""The denoising objective of one training step: noise, timesteps, ``add_noise``, the target
for the model's prediction type, MSE with optional min-SNR weighting and noise offset.

Random draws are those of diffusers' training scripts, in their order, from torch's global
RNG (``randn_like`` noise, the offset's ``randn``, ``randint`` timesteps), so a seed gives
their noise."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..schedulers.prediction import to_output

__all__ = ["Objective", "compute_snr"]


def compute_snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha^2 / sigma^2 at each timestep, as diffusers' ``compute_snr``."""
    alphas_cumprod = alphas_cumprod.to(timesteps.device)
    alpha = (alphas_cumprod**0.5)[timesteps].float()
    sigma = ((1.0 - alphas_cumprod) ** 0.5)[timesteps].float()
    return (alpha / sigma) ** 2


@dataclass
class Objective:
    """``scheduler``: a DDPM-family scheduler of ours (``alphas_cumprod``, ``add_noise``).
    ``snr_gamma``: min-SNR-gamma loss weighting (Hang et al. 2023), None = plain MSE.
    ``noise_offset``: scale of a per-channel constant added to the noise (Guttenberg 2023)."""

    scheduler: object
    snr_gamma: Optional[float] = None
    noise_offset: float = 0.0

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def sample(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise, timesteps) for a batch of clean latents."""
        noise = torch.randn_like(latents)
        if self.noise_offset:
            b, c = latents.shape[:2]
            noise = noise + self.noise_offset * torch.randn((b, c, 1, 1), device=latents.device)
        timesteps = torch.randint(0, self.num_train_timesteps, (latents.shape[0],), device=latents.device).long()
        return noise, timesteps

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        kind = self.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            ac = self.scheduler.alphas_cumprod.to(latents.device, latents.dtype)[timesteps]
            shape = (-1,) + (1,) * (latents.ndim - 1)
            return to_output(kind, latents, noise, (ac**0.5).view(shape), ((1 - ac) ** 0.5).view(shape))
        raise ValueError(f"prediction_type: training supports 'epsilon' and 'v_prediction', got {kind!r}")

    def loss(self, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.snr_gamma is None:
            return F.mse_loss(pred.float(), target.float(), reduction="mean")
        snr = compute_snr(self.scheduler.alphas_cumprod, timesteps)
        weights = torch.stack([snr, self.snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
        weights = weights / (snr + 1) if self.prediction_type == "v_prediction" else weights / snr
        loss = F.mse_loss(pred.float(), target.float(), reduction="none")
        return (loss.mean(dim=list(range(1, loss.ndim))) * weights).mean()

    def __call__(self, unet, latents: torch.Tensor, embeds: torch.Tensor, added_cond_kwargs=None,
                 noise: Optional[torch.Tensor] = None, timesteps: Optional[torch.Tensor] = None,
                 mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The loss of ``unet`` on clean ``latents`` with text ``embeds`` (noise and timesteps
        drawn unless given); ``mask``: a per-example loss mask in the latent grid, for an
        objective whose ``loss`` takes one (Custom Diffusion's)."""
        if noise is None or timesteps is None:
            noise, timesteps = self.sample(latents)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        pred = unet(noisy, timesteps, embeds, added_cond_kwargs=added_cond_kwargs)
        target = self.target(latents, noise, timesteps)
        return self.loss(pred, target, timesteps) if mask is None else self.loss(pred, target, timesteps, mask)

"""DDIM (Song et al. 2020): deterministic for eta=0, ancestral noise for eta>0."""
from __future__ import annotations

import torch

from ..noise import randn_tensor
from .base import AlphaScheduler, require
from .prediction import x0_eps


class DDIM(AlphaScheduler):
    name = "ddim"
    CLASS_NAME = "DDIMScheduler"
    DEFAULTS = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        clip_sample=True, set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon", thresholding=False,
        dynamic_thresholding_ratio=0.995, clip_sample_range=1.0, sample_max_value=1.0,
        timestep_spacing="leading", rescale_betas_zero_snr=False,
    )

    def __init__(self, config=None, **overrides) -> None:
        super().__init__(config, **overrides)
        require(self.config, "prediction_type", ("epsilon", "sample", "v_prediction"))
        require(self.config, "timestep_spacing", ("linspace", "leading", "trailing"))
        self.final_alpha_cumprod = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        self._set_spaced_timesteps(num_inference_steps, device)
        self.final_alpha_cumprod = self.final_alpha_cumprod.to(device)
        # DDIM always steps back by n_train // n, whatever the spacing (as the reference).
        self._stride = self.config.num_train_timesteps // num_inference_steps

    def _alpha_prev(self, prev_timestep):
        return self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod

    def step(self, model_output, timestep, sample, generator=None, eta: float = 0.0, variance_noise=None):
        """``variance_noise``: the noise of an ``eta > 0`` step, instead of drawing it from
        ``generator`` (edit-friendly DDPM inversion replays its noise maps so)."""
        if self.num_inference_steps is None:
            raise ValueError("set_timesteps must be called before step")
        prev_timestep = timestep - self._stride
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self._alpha_prev(prev_timestep)
        x0, eps = x0_eps(self.config.prediction_type, model_output, sample, alpha_prod_t**0.5, (1 - alpha_prod_t) ** 0.5)
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        beta_prod_t = 1 - alpha_prod_t
        variance = (1 - alpha_prod_t_prev) / beta_prod_t * (1 - alpha_prod_t / alpha_prod_t_prev)
        std_dev_t = eta * variance**0.5
        direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5 * eps
        prev_sample = alpha_prod_t_prev**0.5 * x0 + direction
        if eta > 0:
            noise = variance_noise if variance_noise is not None else randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
            prev_sample = prev_sample + std_dev_t * noise
        self.pred_original_sample = x0
        return prev_sample

"""DDPM (Ho et al. 2020): ancestral sampling with the posterior variance."""
from __future__ import annotations

import torch

from ..noise import randn_tensor
from .base import AlphaScheduler, require
from .prediction import x0_eps


class DDPM(AlphaScheduler):
    name = "ddpm"
    CLASS_NAME = "DDPMScheduler"
    EXTRA_SCHEDULES = ("sigmoid",)
    DEFAULTS = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        variance_type="fixed_small", clip_sample=True, prediction_type="epsilon", thresholding=False,
        dynamic_thresholding_ratio=0.995, clip_sample_range=1.0, sample_max_value=1.0,
        timestep_spacing="leading", steps_offset=0, rescale_betas_zero_snr=False,
    )

    def __init__(self, config=None, **overrides) -> None:
        super().__init__(config, **overrides)
        require(self.config, "prediction_type", ("epsilon", "sample", "v_prediction"))
        require(self.config, "variance_type", ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"))
        require(self.config, "timestep_spacing", ("linspace", "leading", "trailing"))
        self.one = torch.tensor(1.0)
        self._prev: dict[int, int] = {}

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        self._set_spaced_timesteps(num_inference_steps, device)
        self.one = self.one.to(self.alphas_cumprod.device)
        # previous_timestep: the next entry of the schedule (first match), -1 after the last.
        self._prev = {}
        ts = self.timesteps.tolist()
        for t, prev in zip(ts, ts[1:] + [-1]):
            self._prev.setdefault(t, prev)

    def previous_timestep(self, timestep) -> int:
        return self._prev[int(timestep)]

    def _variance(self, alpha_prod_t, alpha_prod_t_prev):
        current_beta_t = 1 - alpha_prod_t / alpha_prod_t_prev
        variance = (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t
        variance = torch.clamp(variance, min=1e-20)
        kind = self.config.variance_type
        if kind == "fixed_small":
            return variance**0.5
        if kind == "fixed_small_log":
            return torch.exp(0.5 * torch.log(variance))
        if kind == "fixed_large":
            return current_beta_t**0.5
        return torch.log(current_beta_t) ** 0.5  # fixed_large_log, as the reference

    def step(self, model_output, timestep, sample, generator=None, eta: float = 0.0):
        if self.num_inference_steps is None:
            raise ValueError("set_timesteps must be called before step")
        t = timestep
        prev_t = self.previous_timestep(t)
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t
        x0, _ = x0_eps(self.config.prediction_type, model_output, sample, alpha_prod_t**0.5, beta_prod_t**0.5)
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        x0_coeff = alpha_prod_t_prev**0.5 * current_beta_t / beta_prod_t
        sample_coeff = current_alpha_t**0.5 * beta_prod_t_prev / beta_prod_t
        prev_sample = x0_coeff * x0 + sample_coeff * sample
        if t > 0:
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
            prev_sample = prev_sample + self._variance(alpha_prod_t, alpha_prod_t_prev) * noise
        self.pred_original_sample = x0
        return prev_sample

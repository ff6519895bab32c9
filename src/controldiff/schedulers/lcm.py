"""Latent Consistency Model sampling (Luo et al. 2023), the reference's LCMScheduler.

A consistency model maps any noisy latent straight to x0; each step re-noises that
estimate to the next timestep with fresh noise (none after the last). Timesteps are a
subset of the distillation schedule (``original_inference_steps`` evenly spaced points).
"""
from __future__ import annotations

import numpy as np
import torch

from ..noise import randn_tensor
from .base import AlphaScheduler, require
from .prediction import x0_eps


class LCM(AlphaScheduler):
    name = "lcm"
    CLASS_NAME = "LCMScheduler"
    DEFAULTS = dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        trained_betas=None, original_inference_steps=50, clip_sample=False, clip_sample_range=1.0,
        set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon", thresholding=False,
        dynamic_thresholding_ratio=0.995, sample_max_value=1.0, timestep_spacing="leading",
        timestep_scaling=10.0, rescale_betas_zero_snr=False,
    )

    def __init__(self, config=None, **overrides) -> None:
        super().__init__(config, **overrides)
        require(self.config, "prediction_type", ("epsilon", "sample", "v_prediction"))
        self.final_alpha_cumprod = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        self.timesteps = torch.from_numpy(np.arange(0, self.config.num_train_timesteps)[::-1].copy().astype(np.int64))

    def _origin_timesteps(self) -> np.ndarray:
        """The distillation schedule: every k-th training timestep (k = train / original steps)."""
        original = self.config.original_inference_steps
        n_train = self.config.num_train_timesteps
        if original > n_train:
            raise ValueError(f"scheduler config: original_inference_steps={original} is larger than "
                             f"num_train_timesteps={n_train}")
        k = n_train // original
        return np.asarray(list(range(1, original + 1))) * k - 1

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """(timestep_spacing is accepted but unused, as in the reference.)"""
        n_train, original = self.config.num_train_timesteps, self.config.original_inference_steps
        origin = self._origin_timesteps()
        if num_inference_steps > n_train or num_inference_steps > original:
            raise ValueError(f"num_inference_steps: {num_inference_steps} is larger than original_inference_steps "
                             f"{original} (the schedule is a subset of the distillation schedule)")
        self.num_inference_steps = num_inference_steps
        origin = origin[::-1].copy()
        indices = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False)).astype(np.int64)
        self.timesteps = torch.from_numpy(origin[indices]).to(device=device, dtype=torch.long)
        self._move_schedule(device)
        self.final_alpha_cumprod = self.final_alpha_cumprod.to(self.alphas_cumprod.device)
        self._step_index = None
        self._begin_index = None

    def _prev_timestep(self, timestep):
        """The next timestep of the schedule (LCM: the same one after the last step)."""
        i = self._step_index + 1
        return self.timesteps[i] if i < len(self.timesteps) else timestep

    def _x0(self, model_output, sample, alpha_prod_t):
        x0 = x0_eps(self.config.prediction_type, model_output, sample, alpha_prod_t.sqrt(), (1 - alpha_prod_t).sqrt())[0]
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return x0

    def boundary_scalings(self, timestep) -> tuple:
        """(c_skip, c_out) of the consistency boundary condition at a discrete timestep."""
        sigma_data = 0.5
        scaled = timestep * self.config.timestep_scaling
        return sigma_data**2 / (scaled**2 + sigma_data**2), scaled / (scaled**2 + sigma_data**2) ** 0.5

    def step(self, model_output, timestep, sample, generator=None, eta: float = 0.0):
        """``eta`` is accepted and ignored (the reference's step has none; pipelines skip it)."""
        if self.num_inference_steps is None:
            raise ValueError("set_timesteps must be called before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        prev_timestep = self._prev_timestep(timestep)
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        c_skip, c_out = self.boundary_scalings(timestep)
        x0 = self._x0(model_output, sample, alpha_prod_t)
        denoised = c_out * x0 + c_skip * sample
        if self._step_index != self.num_inference_steps - 1:
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device, dtype=denoised.dtype)
            prev_sample = alpha_prod_t_prev.sqrt() * denoised + (1 - alpha_prod_t_prev).sqrt() * noise
        else:
            prev_sample = denoised
        self._step_index += 1
        self.pred_original_sample = denoised
        return prev_sample

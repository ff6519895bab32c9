"""Heun (Karras et al. 2022, algorithm 2): Euler predictor + trapezoid corrector.

Each sigma interval takes two model calls, so timesteps/sigmas repeat every interior
entry (order = 2); ``dt is None`` means the next call is a first-order (predictor) call.
"""
from __future__ import annotations

import numpy as np
import torch

from .base import KSigmaScheduler, require


class Heun(KSigmaScheduler):
    name = "heun"
    CLASS_NAME = "HeunDiscreteScheduler"
    order = 2
    EXTRA_SCHEDULES = ("exp",)
    ZERO_SNR_FIX = False
    DEFAULTS = dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear", trained_betas=None,
        prediction_type="epsilon", use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
        clip_sample=False, clip_sample_range=1.0, timestep_spacing="linspace", steps_offset=0,
    )

    def __init__(self, config=None, **overrides) -> None:
        super().__init__(config, **overrides)
        require(self.config, "prediction_type", ("epsilon", "sample", "v_prediction"))
        self.set_timesteps(self.config.num_train_timesteps)
        self.num_inference_steps = None

    @property
    def state_in_first_order(self) -> bool:
        return self.dt is None

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        self.num_inference_steps = num_inference_steps
        sigmas, timesteps = self._sigmas_and_timesteps(num_inference_steps)
        sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32)).to(device=device)
        self.sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
        timesteps = torch.from_numpy(timesteps)
        timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)])
        self.timesteps = timesteps.to(device=device, dtype=torch.float32)
        self.prev_derivative = None
        self.dt = None
        self.sample = None
        self._step_index = None
        self._begin_index = None

    def step(self, model_output, timestep, sample, generator=None, eta: float = 0.0):
        if self._step_index is None:
            self._init_step_index(timestep)
        first = self.state_in_first_order
        if first:
            sigma, sigma_next = self.sigmas[self._step_index], self.sigmas[self._step_index + 1]
        else:
            sigma, sigma_next = self.sigmas[self._step_index - 1], self.sigmas[self._step_index]
        sigma_hat = sigma * (0 + 1)  # gamma = 0
        x0 = self._x0(model_output, sample, sigma_hat if first else sigma_next)
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        if first:
            derivative = (sample - x0) / sigma_hat
            dt = sigma_next - sigma_hat
            self.prev_derivative, self.dt, self.sample = derivative, dt, sample
        else:
            derivative = (self.prev_derivative + (sample - x0) / sigma_next) / 2
            dt, sample = self.dt, self.sample
            self.prev_derivative, self.dt, self.sample = None, None, None
        prev_sample = sample + derivative * dt
        self._step_index += 1
        self.pred_original_sample = x0
        return prev_sample

"""Euler and Euler-ancestral (Karras et al. 2022 / k-diffusion) on the discrete sigma schedule."""
from __future__ import annotations

import numpy as np
import torch

from ..noise import randn_tensor
from .base import KSigmaScheduler, require, spaced_timesteps, train_sigmas


class Euler(KSigmaScheduler):
    """First-order ODE step; s_churn is not exposed (the pipelines never set it)."""

    name = "euler"
    CLASS_NAME = "EulerDiscreteScheduler"
    DEFAULTS = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        prediction_type="epsilon", interpolation_type="linear", use_karras_sigmas=False,
        use_exponential_sigmas=False, use_beta_sigmas=False, sigma_min=None, sigma_max=None,
        timestep_spacing="linspace", timestep_type="discrete", steps_offset=0, rescale_betas_zero_snr=False,
        final_sigmas_type="zero",
    )

    def __init__(self, config=None, **overrides) -> None:
        super().__init__(config, **overrides)
        require(self.config, "prediction_type", ("epsilon", "v_prediction", "sample", "original_sample"))
        require(self.config, "interpolation_type", ("linear", "log_linear"))
        require(self.config, "timestep_type", ("discrete", "continuous"))
        require(self.config, "final_sigmas_type", ("zero", "sigma_min"))
        require(self.config, "timestep_spacing", ("linspace", "leading", "trailing"))
        if self.config.use_karras_sigmas:
            self.name = "euler_karras"  # the registered name of this configuration
        # Before set_timesteps: the full training schedule (init_noise_sigma reads it).
        sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).flip(0)
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])
        self.timesteps = torch.from_numpy(np.linspace(0, len(sigmas) - 1, len(sigmas))[::-1].copy()).float()
        if self._continuous_v:
            self.timesteps = torch.Tensor([0.25 * s.log() for s in sigmas])

    @property
    def _continuous_v(self) -> bool:
        return self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction"

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        self.num_inference_steps = n = num_inference_steps
        if self.config.interpolation_type == "log_linear":
            for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
                if self.config[key]:
                    raise ValueError(f"scheduler config: {key}=True with interpolation_type='log_linear' is not supported")
            timesteps = spaced_timesteps(self.config, n, round_linspace=False).astype(np.float32)
            base = train_sigmas(self.alphas_cumprod)
            sigmas = torch.linspace(np.log(base[-1]), np.log(base[0]), n + 1).exp().numpy()
        else:
            sigmas, timesteps = self._sigmas_and_timesteps(n)
        if self.config.final_sigmas_type == "sigma_min":
            sigma_last = ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5
        else:
            sigma_last = 0
        sigmas = torch.from_numpy(np.concatenate([sigmas, [sigma_last]]).astype(np.float32)).to(device=device)
        if self._continuous_v:
            self.timesteps = torch.Tensor([0.25 * s.log() for s in sigmas[:-1]]).to(device=device)
        else:
            self.timesteps = torch.from_numpy(timesteps.astype(np.float32)).to(device=device)
        self.sigmas = sigmas
        self._step_index = None
        self._begin_index = None

    def step(self, model_output, timestep, sample, generator=None, eta: float = 0.0):
        if self._step_index is None:
            self._init_step_index(timestep)
        sample = sample.to(torch.float32)
        sigma = self.sigmas[self._step_index]
        sigma_hat = sigma * (0.0 + 1)  # gamma = 0 (no churn)
        if self.config.prediction_type == "epsilon":
            x0 = sample - sigma_hat * model_output
        else:
            x0 = self._x0(model_output, sample, sigma)
        derivative = (sample - x0) / sigma_hat
        dt = self.sigmas[self._step_index + 1] - sigma_hat
        prev_sample = (sample + derivative * dt).to(model_output.dtype)
        self._step_index += 1
        self.pred_original_sample = x0
        return prev_sample


class EulerAncestral(KSigmaScheduler):
    """Euler step to sigma_down, then fresh noise of size sigma_up (ancestral sampling)."""

    name = "euler_a"
    CLASS_NAME = "EulerAncestralDiscreteScheduler"
    DEFAULTS = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        prediction_type="epsilon", timestep_spacing="linspace", steps_offset=0, rescale_betas_zero_snr=False,
    )

    def __init__(self, config=None, **overrides) -> None:
        super().__init__(config, **overrides)
        require(self.config, "prediction_type", ("epsilon", "v_prediction"))
        require(self.config, "timestep_spacing", ("linspace", "leading", "trailing"))
        sigmas = np.concatenate([train_sigmas(self.alphas_cumprod)[::-1], [0.0]]).astype(np.float32)
        self.sigmas = torch.from_numpy(sigmas)
        n = self.config.num_train_timesteps
        self.timesteps = torch.from_numpy(np.linspace(0, n - 1, n, dtype=float)[::-1].copy())

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        self.num_inference_steps = num_inference_steps
        sigmas, timesteps = self._sigmas_and_timesteps(num_inference_steps)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32)).to(device=device)
        self.timesteps = torch.from_numpy(timesteps).to(device=device)
        self._step_index = None
        self._begin_index = None

    def step(self, model_output, timestep, sample, generator=None, eta: float = 0.0):
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index]
        sample = sample.to(torch.float32)
        x0 = self._x0(model_output, sample, sigma)
        sigma_from = sigma
        sigma_to = self.sigmas[self._step_index + 1]
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        derivative = (sample - x0) / sigma
        prev_sample = sample + derivative * (sigma_down - sigma)
        noise = randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device, generator=generator)
        prev_sample = (prev_sample + noise * sigma_up).to(model_output.dtype)
        self._step_index += 1
        self.pred_original_sample = x0
        return prev_sample

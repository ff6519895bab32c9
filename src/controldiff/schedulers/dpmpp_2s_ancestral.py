"""DPM-Solver++(2S) ancestral (k-diffusion's ``sample_dpmpp_2s_ancestral``, eta = 1; A1111's
"DPM++ 2S a"). There is no diffusers class: the reference is k-diffusion's own function.

Sigmas are diffusers' Euler schedule of the same config (``use_karras_sigmas`` too); the
model sees the timestep of each call's sigma as k-diffusion's CompVisDenoiser computes it
(log-sigma interpolation, not quantized). Each step: a first-order call at sigma_k, a
DPM-Solver++ update from its midpoint towards sigma_down, then fresh noise of size sigma_up
drawn with :func:`controldiff.noise.randn_tensor` from the pipeline's generator, as our
``euler_a`` draws it. Given the same noise tensors (k-diffusion's ``noise_sampler``) the
result equals k-diffusion's. ``eta`` (DDIM's) is ignored: the ancestral eta is 1, A1111's.
"""
from __future__ import annotations

import numpy as np
import torch

from ..noise import randn_tensor
from .base import require, sigma_to_t, train_sigmas
from .midpoint import MidpointScheduler, ancestral_step, log_midpoint, sigma_of, t_of


class DPMPP2SAncestral(MidpointScheduler):
    name = "dpmpp_2s_a"
    DEFAULTS = dict(  # EulerDiscreteScheduler's, for its sigma schedule
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        prediction_type="epsilon", use_karras_sigmas=False, sigma_min=None, sigma_max=None,
        timestep_spacing="linspace", steps_offset=0, rescale_betas_zero_snr=False,
    )

    def __init__(self, config=None, **overrides) -> None:
        super().__init__(config, **overrides)
        require(self.config, "prediction_type", ("epsilon", "v_prediction"))
        require(self.config, "timestep_spacing", ("linspace", "leading", "trailing"))
        if self.config.use_karras_sigmas:
            self.name = "dpmpp_2s_a_karras"  # the registered name of this configuration

    def _midpoint_sigma(self, sigma, sigma_next):
        sigma_down, _ = ancestral_step(sigma, sigma_next)
        return sigma_of(log_midpoint(t_of(sigma), t_of(sigma_down))) if sigma_down != 0 else None

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        self.num_inference_steps = num_inference_steps
        sigmas, _ = self._sigmas_and_timesteps(num_inference_steps)
        self._lay_out(torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32)))
        log_sigmas = np.log(train_sigmas(self.alphas_cumprod))
        timesteps = sigma_to_t(self.levels.double().numpy(), log_sigmas)
        self.timesteps = torch.from_numpy(timesteps.astype(np.float32)).to(device=device)

    def step(self, model_output, timestep, sample, generator=None, eta: float = 0.0):
        if self._step_index is None:
            self._init_step_index(timestep)
        first, sigma, sigma_next = self._call()
        x0 = self._x0(model_output, sample, self.levels[self._step_index])
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next)
        if sigma_down == 0:  # Euler (the last step)
            derivative = (sample - x0) / sigma
            prev_sample = sample + derivative * (sigma_down - sigma)
        else:
            t, t_next = t_of(sigma), t_of(sigma_down)
            h = t_next - t
            if first:  # to the midpoint, where the second call evaluates
                prev_sample = (sigma_of(log_midpoint(t, t_next)) / sigma_of(t)) * sample - (-h * 0.5).expm1() * x0
                self.sample = sample
            else:
                prev_sample = (sigma_of(t_next) / sigma_of(t)) * self.sample - (-h).expm1() * x0
                self.sample = None
        if self.sample is None and sigma_next > 0:  # the step is done: ancestral noise
            noise = randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                                 generator=generator)
            prev_sample = prev_sample + noise * sigma_up
        self._step_index += 1
        self.pred_original_sample = x0
        return prev_sample

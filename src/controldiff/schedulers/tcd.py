"""Trajectory Consistency Distillation sampling (Zheng et al. 2024), the reference's TCDScheduler.

Like LCM, but each step goes to an intermediate timestep ``s = floor((1 - gamma) * t_prev)``
on the predicted trajectory, then re-noises from s to t_prev. ``eta`` is gamma: 0 is
deterministic (the DDIM-like end), 1 is LCM-like. The step's default is 0.0, not the
reference class's 0.3: diffusers pipelines always pass their ``eta`` (default 0.0),
and ours passes it only when non-zero, so 0.0 here keeps both pipelines equal.
"""
from __future__ import annotations

import torch

from ..noise import randn_tensor
from .lcm import LCM
from .prediction import x0_eps


class TCD(LCM):
    name = "tcd"
    CLASS_NAME = "TCDScheduler"

    def _prev_timestep(self, timestep):
        i = self._step_index + 1
        return self.timesteps[i] if i < len(self.timesteps) else torch.tensor(0)

    def step(self, model_output, timestep, sample, generator=None, eta: float = 0.0):
        """``eta``: gamma in [0, 1], the stochasticity of each step."""
        if self.num_inference_steps is None:
            raise ValueError("set_timesteps must be called before step")
        if not 0 <= eta <= 1.0:
            raise ValueError(f"eta: TCD's gamma must be in [0, 1], got {eta}")
        if self._step_index is None:
            self._init_step_index(timestep)
        prev_timestep = self._prev_timestep(timestep)
        timestep_s = torch.floor((1 - eta) * prev_timestep).to(dtype=torch.long)
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        alpha_prod_s = self.alphas_cumprod[timestep_s]
        x0, eps = x0_eps(self.config.prediction_type, model_output, sample, alpha_prod_t.sqrt(), (1 - alpha_prod_t).sqrt())
        noised = alpha_prod_s.sqrt() * x0 + (1 - alpha_prod_s).sqrt() * eps
        if eta > 0 and self._step_index != self.num_inference_steps - 1:
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device, dtype=noised.dtype)
            ratio = alpha_prod_t_prev / alpha_prod_s
            prev_sample = ratio.sqrt() * noised + (1 - ratio).sqrt() * noise
        else:
            prev_sample = noised
        self._step_index += 1
        self.pred_original_sample = x0
        return prev_sample

"""DDIM inversion (diffusers' ``DDIMInverseScheduler``): the deterministic DDIM update run
backwards, image latents -> noise, for real-image editing (Pix2Pix-Zero, DiffEdit).

Timesteps ascend. At timestep t the sample sits at the level of ``t - stride`` (the
initial alpha for the first step) and moves to the level of t; the model is evaluated at
t, so ``noise_level`` reports t's level (what the prediction is consistent with), and so
do the reference pipelines' regularisers.
"""
from __future__ import annotations

import numpy as np
import torch

from .base import AlphaScheduler, require
from .prediction import x0_eps


class DDIMInverse(AlphaScheduler):
    name = "ddim_inverse"
    CLASS_NAME = "DDIMInverseScheduler"
    DEFAULTS = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        clip_sample=True, set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon", clip_sample_range=1.0,
        timestep_spacing="leading", rescale_betas_zero_snr=False,
    )

    def __init__(self, config=None, **overrides) -> None:
        super().__init__(config, **overrides)
        require(self.config, "prediction_type", ("epsilon", "sample", "v_prediction"))
        require(self.config, "timestep_spacing", ("leading", "trailing"))
        self.initial_alpha_cumprod = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        n_train = self.config.num_train_timesteps
        if num_inference_steps > n_train:
            raise ValueError(f"num_inference_steps: {num_inference_steps} is larger than num_train_timesteps {n_train}")
        self.num_inference_steps = num_inference_steps
        if self.config.timestep_spacing == "leading":
            ratio = n_train // num_inference_steps
            timesteps = (np.arange(0, num_inference_steps) * ratio).round().copy().astype(np.int64)
            timesteps += self.config.steps_offset
        else:
            timesteps = np.round(np.arange(n_train, 0, -n_train / num_inference_steps)[::-1]).astype(np.int64) - 1
        self.timesteps = torch.from_numpy(timesteps).to(device)
        self._move_schedule(device)

    def step(self, model_output, timestep, sample, generator=None):
        if self.num_inference_steps is None:
            raise ValueError("set_timesteps must be called before step")
        n_train = self.config.num_train_timesteps
        prev_timestep = timestep
        timestep = min(timestep - n_train // self.num_inference_steps, n_train - 1)
        alpha_prod_t = self.alphas_cumprod[timestep] if timestep >= 0 else self.initial_alpha_cumprod.to(sample.device)
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep]
        x0, eps = x0_eps(self.config.prediction_type, model_output, sample, alpha_prod_t**0.5, (1 - alpha_prod_t) ** 0.5)
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        self.pred_original_sample = x0
        return alpha_prod_t_prev**0.5 * x0 + (1 - alpha_prod_t_prev) ** 0.5 * eps

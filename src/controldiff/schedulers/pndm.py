"""PNDM (Liu et al. 2022): Runge-Kutta warm-up (unless skip_prk_steps) then linear multistep."""
from __future__ import annotations

import numpy as np
import torch

from .base import AlphaScheduler, require, spaced_timesteps
from .prediction import x0_eps


class PNDM(AlphaScheduler):
    name = "pndm"
    CLASS_NAME = "PNDMScheduler"
    DEFAULTS = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        skip_prk_steps=False, set_alpha_to_one=False, prediction_type="epsilon", timestep_spacing="leading",
        steps_offset=0,
    )
    pndm_order = 4

    def __init__(self, config=None, **overrides) -> None:
        super().__init__(config, **overrides)
        require(self.config, "prediction_type", ("epsilon", "v_prediction"))
        require(self.config, "timestep_spacing", ("linspace", "leading", "trailing"))
        self.final_alpha_cumprod = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        self._reset()

    def _reset(self) -> None:
        self.ets: list[torch.Tensor] = []
        self.counter = 0
        self.cur_model_output = 0
        self.cur_sample = None

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        self.num_inference_steps = n = num_inference_steps
        ascending = spaced_timesteps(self.config, n)[::-1].astype(np.int64)
        if self.config.skip_prk_steps:
            # plms with the second-to-last timestep repeated: the first step is a 2-stage warm-up.
            self.prk_timesteps = np.array([], dtype=np.int64)
            plms = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1].copy()
        else:
            half = self.config.num_train_timesteps // n // 2
            prk = np.array(ascending[-self.pndm_order:]).repeat(2) + np.tile(np.array([0, half]), self.pndm_order)
            self.prk_timesteps = prk[:-1].repeat(2)[1:-1][::-1].copy()
            plms = ascending[:-3][::-1].copy()
        self.plms_timesteps = plms
        timesteps = np.concatenate([self.prk_timesteps, plms]).astype(np.int64)
        self.timesteps = torch.from_numpy(timesteps).to(device)
        self._move_schedule(device)
        self.final_alpha_cumprod = self.final_alpha_cumprod.to(self.alphas_cumprod.device)
        self._stride = self.config.num_train_timesteps // n
        self._reset()

    def step(self, model_output, timestep, sample, generator=None, eta: float = 0.0):
        if self.num_inference_steps is None:
            raise ValueError("set_timesteps must be called before step")
        if self.counter < len(self.prk_timesteps) and not self.config.skip_prk_steps:
            return self._step_prk(model_output, timestep, sample)
        return self._step_plms(model_output, timestep, sample)

    def _step_prk(self, model_output, timestep, sample):
        diff_to_prev = 0 if self.counter % 2 else self._stride // 2
        prev_timestep = timestep - diff_to_prev
        timestep = self.prk_timesteps[self.counter // 4 * 4]
        phase = self.counter % 4
        if phase == 0:
            self.cur_model_output += 1 / 6 * model_output
            self.ets.append(model_output)
            self.cur_sample = sample
        elif phase in (1, 2):
            self.cur_model_output += 1 / 3 * model_output
        else:
            model_output = self.cur_model_output + 1 / 6 * model_output
            self.cur_model_output = 0
        cur_sample = self.cur_sample if self.cur_sample is not None else sample
        self.counter += 1
        return self._prev_sample(cur_sample, timestep, prev_timestep, model_output)

    def _step_plms(self, model_output, timestep, sample):
        if not self.config.skip_prk_steps and len(self.ets) < 3:
            raise ValueError("pndm: the linear multistep phase needs the Runge-Kutta warm-up steps first")
        prev_timestep = timestep - self._stride
        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(model_output)
        else:
            prev_timestep = timestep
            timestep = timestep + self._stride
        ets = self.ets
        if len(ets) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(ets) == 1 and self.counter == 1:
            model_output = (model_output + ets[-1]) / 2
            sample = self.cur_sample
            self.cur_sample = None
        elif len(ets) == 2:
            model_output = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            model_output = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            model_output = 1 / 24 * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        self.counter += 1
        return self._prev_sample(sample, timestep, prev_timestep, model_output)

    def _prev_sample(self, sample, timestep, prev_timestep, model_output):
        """Formula (9) of the PNDM paper: x_t -> x_{t-delta} given epsilon."""
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        if self.config.prediction_type == "v_prediction":
            model_output = x0_eps("v_prediction", model_output, sample, alpha_prod_t**0.5, beta_prod_t**0.5)[1]
        sample_coeff = (alpha_prod_t_prev / alpha_prod_t) ** 0.5
        denom = alpha_prod_t * beta_prod_t_prev**0.5 + (alpha_prod_t * beta_prod_t * alpha_prod_t_prev) ** 0.5
        return sample_coeff * sample - (alpha_prod_t_prev - alpha_prod_t) * model_output / denom

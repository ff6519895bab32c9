"""DPM-Solver++ singlestep (DPM++ 2S), the reference's DPMSolverSinglestepScheduler.

Unlike the multistep solver, a second-order step does not reuse an older model
output: the schedule's timesteps come in groups (``order_list``: 1, 2, 1, 2, ...);
the first step of a group is an Euler-like step to an intermediate point, and the
last one integrates the whole group from the sample saved at the group's start,
using every model output evaluated inside it. Same noise levels, conversions and
first-order step as :class:`.DPMSolverMultistep` (inherited); its ancestral
"DPM++ 2S a" is a k-diffusion sampler, not a diffusers class, so it is not here.
"""
from __future__ import annotations

import numpy as np
import torch

from ..noise import randn_tensor
from .base import sigma_to_t, spaced_timesteps, train_sigmas
from .dpmsolver import DPMSolverMultistep, log_snr, second_order_update


def order_list(steps: int, order: int, lower_order_final: bool, final_zero: bool) -> list[int]:
    """Solver order of each step: groups of 1..order, shortened at the end as the reference."""
    if lower_order_final:
        if order == 3:
            tail = {0: [1, 2, 1], 1: [1], 2: [1, 2]}[steps % 3]
            orders = [1, 2, 3] * (steps // 3 - (steps % 3 == 0)) + tail
        elif order == 2:
            orders = [1, 2] * (steps // 2 - (steps % 2 == 0)) + ([1, 1] if steps % 2 == 0 else [1])
        else:
            orders = [1] * steps
    else:
        orders = list(range(1, order + 1)) * (steps // order)
    if final_zero:
        orders[-1] = 1
    return orders


class DPMSolverSinglestep(DPMSolverMultistep):
    name = "dpmpp_2s"
    CLASS_NAME = "DPMSolverSinglestepScheduler"
    DEFAULTS = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        solver_order=2, prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
        sample_max_value=1.0, algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=False,
        use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False, use_flow_sigmas=False,
        flow_shift=1.0, final_sigmas_type="zero", lambda_min_clipped=-float("inf"), variance_type=None,
        use_dynamic_shifting=False, time_shift_type="exponential",
    )

    def __init__(self, config=None, **overrides) -> None:
        super().__init__(config, **overrides)
        sde = "_sde" if self.config.algorithm_type == "sde-dpmsolver++" else ""
        self.name = f"dpmpp_2s{sde}{'_karras' if self.config.use_karras_sigmas else ''}"
        self.order_list: list[int] = []

    def _reset(self) -> None:
        super()._reset()
        self.sample = None  # the sample at the start of the current group

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        cfg = self.config
        clipped_idx = torch.searchsorted(torch.flip(self._lambda_t, [0]), cfg.lambda_min_clipped).item()
        n_train = cfg.num_train_timesteps
        # the reference has no timestep_spacing option: always linspace
        spacing = {"timestep_spacing": "linspace", "num_train_timesteps": n_train}
        timesteps = spaced_timesteps(spacing, num_inference_steps, solver=True,
                                     last_timestep=n_train - clipped_idx).astype(np.int64)
        sigmas = train_sigmas(self.alphas_cumprod)
        schedule = self._sigma_schedule()
        if schedule is not None:
            log_sigmas = np.log(sigmas)
            sigmas = schedule(np.flip(sigmas).copy(), num_inference_steps)
            timesteps = np.array([sigma_to_t(s, log_sigmas) for s in sigmas])
            if cfg.use_karras_sigmas:
                timesteps = timesteps.round()  # (the reference rounds only Karras timesteps)
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
        if cfg.final_sigmas_type == "sigma_min":
            sigma_last = ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5
        else:
            sigma_last = 0
        sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
        first = timesteps.astype(np.int64) == int(timesteps[0])
        if first.sum() > 1:  # the first step's lookup lands on the repeat: the reference runs off its order list
            raise ValueError(
                f"scheduler: {self.name} repeats its first timestep {timesteps.astype(np.int64).tolist()} for "
                f"{num_inference_steps} steps with beta_schedule={cfg.beta_schedule!r}; use fewer karras steps or "
                "another scheduler")
        self.sigmas = torch.from_numpy(sigmas).to(device=device)
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.int64)
        self.num_inference_steps = num_inference_steps
        # the reference switches lower_order_final on (in its config) when groups cannot end cleanly
        if not cfg.lower_order_final and (num_inference_steps % cfg.solver_order != 0 or cfg.final_sigmas_type == "zero"):
            cfg["lower_order_final"] = True
        self.order_list = order_list(num_inference_steps, cfg.solver_order, cfg.lower_order_final,
                                     cfg.final_sigmas_type == "zero")
        self._reset()

    def _second_order(self, sample, noise):
        """From the group's start s1 over the intermediate point s0 to t."""
        i = self._step_index
        alpha_t, sigma_t, lambda_t = log_snr(self.sigmas[i + 1])
        _, _, lambda_s0 = log_snr(self.sigmas[i])
        _, sigma_s1, lambda_s1 = log_snr(self.sigmas[i - 1])
        m0, m1 = self.model_outputs[-1], self.model_outputs[-2]
        h, h_0 = lambda_t - lambda_s1, lambda_s0 - lambda_s1
        r0 = h_0 / h
        D0, D1 = m1, 1.0 / r0 * (m0 - m1)
        return second_order_update(sample, noise, alpha_t, sigma_t, sigma_s1, h, D0, D1,
                                   self.config.solver_type == "midpoint")

    def _third_order(self, sample, noise):
        """From the group's start s2 over s1 and s0 to t."""
        i = self._step_index
        alpha_t, sigma_t, lambda_t = log_snr(self.sigmas[i + 1])
        _, _, lambda_s0 = log_snr(self.sigmas[i])
        _, _, lambda_s1 = log_snr(self.sigmas[i - 1])
        _, sigma_s2, lambda_s2 = log_snr(self.sigmas[i - 2])
        m0, m1, m2 = self.model_outputs[-1], self.model_outputs[-2], self.model_outputs[-3]
        h, h_0, h_1 = lambda_t - lambda_s2, lambda_s0 - lambda_s2, lambda_s1 - lambda_s2
        r0, r1 = h_0 / h, h_1 / h
        D0 = m2
        D1_0, D1_1 = 1.0 / r1 * (m1 - m2), 1.0 / r0 * (m0 - m2)
        D1 = (r0 * D1_0 - r1 * D1_1) / (r0 - r1)
        D2 = 2.0 * (D1_1 - D1_0) / (r0 - r1)
        midpoint = self.config.solver_type == "midpoint"
        if noise is None:
            x = sigma_t / sigma_s2 * sample - alpha_t * (torch.exp(-h) - 1.0) * D0
            if midpoint:
                return x + alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0) * D1_1
            return x + alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0) * D1 \
                - alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5) * D2
        x = sigma_t / sigma_s2 * torch.exp(-h) * sample + alpha_t * (1.0 - torch.exp(-2.0 * h)) * D0
        if midpoint:
            x = x + alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0) * D1_1
        else:
            x = x + alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0) * D1 \
                + alpha_t * ((1.0 - torch.exp(-2.0 * h) + (-2.0 * h)) / (-2.0 * h) ** 2 - 0.5) * D2
        return x + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise

    def step(self, model_output, timestep, sample, generator=None, eta: float = 0.0, variance_noise=None):
        """``variance_noise``: the SDE variant's noise, instead of drawing it from ``generator``."""
        if self.num_inference_steps is None:
            raise ValueError("set_timesteps must be called before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        x0 = self._convert(model_output, sample)
        self.model_outputs = self.model_outputs[1:] + [x0]
        noise = None
        if self.config.algorithm_type == "sde-dpmsolver++":
            noise = variance_noise.to(model_output) if variance_noise is not None else randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
        order = self.order_list[self._step_index]
        while self.model_outputs[-order] is None:  # img2img may start inside a group
            order -= 1
        if order == 1:
            self.sample = sample
            prev_sample = self._first_order(x0, self.sample, noise)
        elif order == 2:
            prev_sample = self._second_order(self.sample, noise)
        else:
            prev_sample = self._third_order(self.sample, noise)
        self._step_index += 1
        self.pred_original_sample = x0
        return prev_sample

"""DPM-Solver++ multistep (Lu et al. 2022), the reference's DPMSolverMultistepScheduler.

Works in data (x0) prediction; the first step and (for short schedules) the last
steps drop to lower order; ``final_sigmas_type='zero'`` ends with a first-order step.
"""
from __future__ import annotations

import numpy as np
import torch

from ..noise import randn_tensor
from .base import SigmaScheduler, expand_to, require, sigma_to_t, spaced_timesteps, train_sigmas
from .prediction import alpha_sigma, x0_eps


def log_snr(sigma):
    alpha_t, sigma_t = alpha_sigma(sigma)
    return alpha_t, sigma_t, torch.log(alpha_t) - torch.log(sigma_t)


def second_order_update(sample, noise, alpha_t, sigma_t, sigma_s, h, D0, D1, midpoint: bool):
    """DPM-Solver++(2M) / (2S)'s second-order update from level s over step h (noise: the SDE
    variant), in the reference's order of operations."""
    if noise is None:
        if midpoint:
            return sigma_t / sigma_s * sample - alpha_t * (torch.exp(-h) - 1.0) * D0 \
                - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * D1
        return sigma_t / sigma_s * sample - alpha_t * (torch.exp(-h) - 1.0) * D0 \
            + alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0) * D1
    base = sigma_t / sigma_s * torch.exp(-h) * sample + alpha_t * (1 - torch.exp(-2.0 * h)) * D0
    if midpoint:
        base = base + 0.5 * (alpha_t * (1 - torch.exp(-2.0 * h))) * D1
    else:
        base = base + alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0) * D1
    return base + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise


class DPMSolverMultistep(SigmaScheduler):
    SIGMA_SCHEDULES = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
    name = "dpmpp_2m"
    CLASS_NAME = "DPMSolverMultistepScheduler"
    ZERO_SNR_FIX = True
    _missing_timestep_is_last = True
    DEFAULTS = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        solver_order=2, prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
        sample_max_value=1.0, algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
        euler_at_final=False, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
        use_lu_lambdas=False, use_flow_sigmas=False, flow_shift=1.0, final_sigmas_type="zero",
        lambda_min_clipped=-float("inf"), variance_type=None, timestep_spacing="linspace", steps_offset=0,
        rescale_betas_zero_snr=False, use_dynamic_shifting=False, time_shift_type="exponential",
    )

    def __init__(self, config=None, **overrides) -> None:
        super().__init__(config, **overrides)
        if self.config.solver_type in ("logrho", "bh1", "bh2"):  # other solvers' names, as the reference
            self.config["solver_type"] = "midpoint"
        if self.config.algorithm_type == "deis":
            self.config["algorithm_type"] = "dpmsolver++"
        require(self.config, "algorithm_type", ("dpmsolver++", "sde-dpmsolver++"))
        require(self.config, "solver_type", ("midpoint", "heun"))
        require(self.config, "solver_order", (1, 2, 3))
        require(self.config, "prediction_type", ("epsilon", "sample", "v_prediction"))
        require(self.config, "variance_type", (None,))
        require(self.config, "final_sigmas_type", ("zero", "sigma_min"))
        # the registered name of this configuration (dpmpp_2m, dpmpp_2m_sde, ..._karras)
        sde = "_sde" if self.config.algorithm_type == "sde-dpmsolver++" else ""
        self.name = f"dpmpp_2m{sde}{'_karras' if self.config.use_karras_sigmas else ''}"
        lambda_t = torch.log(torch.sqrt(self.alphas_cumprod)) - torch.log(torch.sqrt(1 - self.alphas_cumprod))
        self._lambda_t = lambda_t
        self._train_schedule()
        self._reset()

    def _reset(self) -> None:
        self.model_outputs: list[torch.Tensor | None] = [None] * self.config.solver_order
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        cfg = self.config
        clipped_idx = torch.searchsorted(torch.flip(self._lambda_t, [0]), cfg.lambda_min_clipped)
        last_timestep = (cfg.num_train_timesteps - clipped_idx).numpy().item()
        timesteps = spaced_timesteps(cfg, num_inference_steps, solver=True, last_timestep=last_timestep).astype(np.int64)
        sigmas = train_sigmas(self.alphas_cumprod)
        schedule = self._sigma_schedule()
        if schedule is not None:
            log_sigmas = np.log(sigmas)
            sigmas = schedule(np.flip(sigmas).copy(), num_inference_steps)
            timesteps = np.array([sigma_to_t(s, log_sigmas) for s in sigmas])
            if cfg.use_karras_sigmas and cfg.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()  # (the reference rounds only Karras timesteps)
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
        if cfg.final_sigmas_type == "sigma_min":
            sigma_last = ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5
        else:
            sigma_last = 0
        sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
        self.sigmas = torch.from_numpy(sigmas).to(device=device)
        if len(np.unique(timesteps.astype(np.int64))) < len(timesteps):
            raise ValueError(
                f"scheduler: {self.name} gives repeated timesteps {timesteps.astype(np.int64).tolist()} for "
                f"{num_inference_steps} steps with beta_schedule={cfg.beta_schedule!r}; use fewer karras steps or "
                "another scheduler")
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.int64)
        self.num_inference_steps = len(timesteps)
        self._reset()

    def _convert(self, model_output, sample):
        """Model output -> x0 prediction (data prediction is what DPM-Solver++ integrates)."""
        alpha_t, sigma_t = alpha_sigma(self.sigmas[self._step_index])
        return x0_eps(self.config.prediction_type, model_output, sample, alpha_t, sigma_t)[0]

    def _first_order(self, x0, sample, noise):
        alpha_t, sigma_t, lambda_t = log_snr(self.sigmas[self._step_index + 1])
        _, sigma_s, lambda_s = log_snr(self.sigmas[self._step_index])
        h = lambda_t - lambda_s
        if noise is None:
            return sigma_t / sigma_s * sample - alpha_t * (torch.exp(-h) - 1.0) * x0
        return (sigma_t / sigma_s * torch.exp(-h)) * sample + alpha_t * (1 - torch.exp(-2.0 * h)) * x0 \
            + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise

    def _second_order(self, sample, noise):
        i = self._step_index
        alpha_t, sigma_t, lambda_t = log_snr(self.sigmas[i + 1])
        _, sigma_s0, lambda_s0 = log_snr(self.sigmas[i])
        _, _, lambda_s1 = log_snr(self.sigmas[i - 1])
        m0, m1 = self.model_outputs[-1], self.model_outputs[-2]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        D0, D1 = m0, 1.0 / r0 * (m0 - m1)
        return second_order_update(sample, noise, alpha_t, sigma_t, sigma_s0, h, D0, D1,
                                   self.config.solver_type == "midpoint")

    def _third_order(self, sample, noise):
        i = self._step_index
        alpha_t, sigma_t, lambda_t = log_snr(self.sigmas[i + 1])
        _, sigma_s0, lambda_s0 = log_snr(self.sigmas[i])
        _, _, lambda_s1 = log_snr(self.sigmas[i - 1])
        _, _, lambda_s2 = log_snr(self.sigmas[i - 2])
        m0, m1, m2 = self.model_outputs[-1], self.model_outputs[-2], self.model_outputs[-3]
        h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
        r0, r1 = h_0 / h, h_1 / h
        D0 = m0
        D1_0, D1_1 = 1.0 / r0 * (m0 - m1), 1.0 / r1 * (m1 - m2)
        D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)
        D2 = 1.0 / (r0 + r1) * (D1_0 - D1_1)
        if noise is None:
            return sigma_t / sigma_s0 * sample - alpha_t * (torch.exp(-h) - 1.0) * D0 \
                + alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0) * D1 \
                - alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5) * D2
        return sigma_t / sigma_s0 * torch.exp(-h) * sample + alpha_t * (1.0 - torch.exp(-2.0 * h)) * D0 \
            + alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0) * D1 \
            + alpha_t * ((1.0 - torch.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5) * D2 \
            + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise

    def step(self, model_output, timestep, sample, generator=None, eta: float = 0.0, variance_noise=None):
        """``variance_noise``: the SDE variant's noise, instead of drawing it from ``generator``."""
        if self.num_inference_steps is None:
            raise ValueError("set_timesteps must be called before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        cfg, n = self.config, len(self.timesteps)
        lower_order_final = self._step_index == n - 1 and (
            cfg.euler_at_final or (cfg.lower_order_final and n < 15) or cfg.final_sigmas_type == "zero")
        lower_order_second = self._step_index == n - 2 and cfg.lower_order_final and n < 15
        x0 = self._convert(model_output, sample)
        self.model_outputs = self.model_outputs[1:] + [x0]
        sample = sample.to(torch.float32)
        noise = None
        if cfg.algorithm_type == "sde-dpmsolver++" and variance_noise is not None:
            noise = variance_noise.to(device=model_output.device, dtype=torch.float32)
        elif cfg.algorithm_type == "sde-dpmsolver++":
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device, dtype=torch.float32)
        if cfg.solver_order == 1 or self.lower_order_nums < 1 or lower_order_final:
            prev_sample = self._first_order(x0, sample, noise)
        elif cfg.solver_order == 2 or self.lower_order_nums < 2 or lower_order_second:
            prev_sample = self._second_order(sample, noise)
        else:
            prev_sample = self._third_order(sample, noise)
        if self.lower_order_nums < cfg.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        self.pred_original_sample = x0
        return prev_sample.to(model_output.dtype)

    def add_noise(self, original, noise, timesteps):
        sigmas = self.sigmas.to(device=original.device, dtype=original.dtype)
        sigma = expand_to(sigmas[self._step_indices(timesteps, original.device)], original)
        alpha_t, sigma_t = alpha_sigma(sigma)
        return alpha_t * original + sigma_t * noise

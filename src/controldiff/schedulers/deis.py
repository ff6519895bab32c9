"""DEIS multistep (Zhang & Chen 2022), the reference's DEISMultistepScheduler.

Exponential integrator in epsilon space with log-rho (rho = sigma / alpha) polynomial
extrapolation of past epsilons; lower orders at the start and, for short schedules,
the end. The last noise level is the schedule's smallest sigma, never zero.
"""
from __future__ import annotations

import numpy as np
import torch

from .base import SigmaScheduler, require, sigma_to_t, spaced_timesteps, train_sigmas
from .dpmsolver import DPMSolverMultistep, log_snr
from .prediction import alpha_sigma, x0_eps


def _log(x: torch.Tensor) -> torch.Tensor:
    """numpy's float32 log, as the reference (torch.log differs in the last bit, and the
    coefficients' cancellation turns that into ~1e-5 differences over a schedule)."""
    return torch.as_tensor(np.log(x.detach().cpu().numpy()), device=x.device)


def _log_rho_coefficient_2(t, b, c):
    """Integral of the linear Lagrange basis through log b, log c (2nd order)."""
    return t * (-_log(c) + _log(t) - 1) / (_log(b) - _log(c))


def _log_rho_coefficient_3(t, b, c, d):
    """Integral of the quadratic Lagrange basis through log b, log c, log d (3rd order)."""
    lt, lc, ld = _log(t), _log(c), _log(d)
    numerator = t * (lc * (ld - lt + 1) - ld * lt + ld + lt**2 - 2 * lt + 2)
    return numerator / ((_log(b) - lc) * (_log(b) - ld))


class DEIS(SigmaScheduler):
    name = "deis"
    CLASS_NAME = "DEISMultistepScheduler"
    SIGMA_SCHEDULES = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
    _missing_timestep_is_last = True
    DEFAULTS = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        solver_order=2, prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
        sample_max_value=1.0, algorithm_type="deis", solver_type="logrho", lower_order_final=True,
        use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False, use_flow_sigmas=False,
        flow_shift=1.0, timestep_spacing="linspace", steps_offset=0, use_dynamic_shifting=False,
        time_shift_type="exponential",
    )
    add_noise = DPMSolverMultistep.add_noise  # VP noising at the looked-up sigma, as every solver scheduler

    def __init__(self, config=None, **overrides) -> None:
        super().__init__(config, **overrides)
        if self.config.algorithm_type in ("dpmsolver", "dpmsolver++"):  # other solvers' names, as the reference
            self.config["algorithm_type"] = "deis"
        if self.config.solver_type in ("midpoint", "heun", "bh1", "bh2"):
            self.config["solver_type"] = "logrho"
        require(self.config, "algorithm_type", ("deis",))
        require(self.config, "solver_type", ("logrho",))
        require(self.config, "solver_order", (1, 2, 3))
        require(self.config, "prediction_type", ("epsilon", "sample", "v_prediction"))
        self._train_schedule()
        self._reset()

    def _reset(self) -> None:
        self.model_outputs: list[torch.Tensor | None] = [None] * self.config.solver_order
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        cfg = self.config
        timesteps = spaced_timesteps(cfg, num_inference_steps, solver=True).astype(np.int64)
        sigmas = train_sigmas(self.alphas_cumprod)
        schedule = self._sigma_schedule()
        if schedule is not None:
            log_sigmas = np.log(sigmas)
            sigmas = schedule(np.flip(sigmas).copy(), num_inference_steps)
            timesteps = np.array([sigma_to_t(s, log_sigmas) for s in sigmas])
            if cfg.use_karras_sigmas:
                timesteps = timesteps.round()  # (the reference rounds only Karras timesteps)
            sigmas = np.concatenate([sigmas, sigmas[-1:]]).astype(np.float32)
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
            sigma_last = ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5
            sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
        self.sigmas = torch.from_numpy(sigmas).to(device=device)
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.int64)
        self.num_inference_steps = len(timesteps)
        self._reset()

    def _convert(self, model_output, sample):
        """(x0, eps): DEIS integrates the epsilon recomputed from the x0 prediction."""
        alpha_t, sigma_t = alpha_sigma(self.sigmas[self._step_index])
        x0 = x0_eps(self.config.prediction_type, model_output, sample, alpha_t, sigma_t)[0]
        return x0, (sample - alpha_t * x0) / sigma_t

    def _rhos(self, count: int):
        """alpha_t and rho = sigma / alpha at t (the next level), s0, s1, ...; alpha_s0."""
        i = self._step_index
        alpha_t, sigma_t = alpha_sigma(self.sigmas[i + 1])
        alpha_s0, sigma_s0 = alpha_sigma(self.sigmas[i])
        rhos = [sigma_t / alpha_t, sigma_s0 / alpha_s0]
        for k in range(1, count):
            alpha_k, sigma_k = alpha_sigma(self.sigmas[i - k])
            rhos.append(sigma_k / alpha_k)
        return alpha_t, alpha_s0, rhos

    def _first_order(self, eps, sample):
        alpha_t, sigma_t, lambda_t = log_snr(self.sigmas[self._step_index + 1])
        alpha_s, _, lambda_s = log_snr(self.sigmas[self._step_index])
        h = lambda_t - lambda_s
        return alpha_t / alpha_s * sample - sigma_t * (torch.exp(h) - 1.0) * eps

    def _second_order(self, sample):
        alpha_t, alpha_s0, (rho_t, rho_s0, rho_s1) = self._rhos(2)
        m0, m1 = self.model_outputs[-1], self.model_outputs[-2]
        f = _log_rho_coefficient_2
        coef1 = f(rho_t, rho_s0, rho_s1) - f(rho_s0, rho_s0, rho_s1)
        coef2 = f(rho_t, rho_s1, rho_s0) - f(rho_s0, rho_s1, rho_s0)
        return alpha_t * (sample / alpha_s0 + coef1 * m0 + coef2 * m1)

    def _third_order(self, sample):
        alpha_t, alpha_s0, (rho_t, rho_s0, rho_s1, rho_s2) = self._rhos(3)
        m0, m1, m2 = self.model_outputs[-1], self.model_outputs[-2], self.model_outputs[-3]
        f = _log_rho_coefficient_3
        coef1 = f(rho_t, rho_s0, rho_s1, rho_s2) - f(rho_s0, rho_s0, rho_s1, rho_s2)
        coef2 = f(rho_t, rho_s1, rho_s2, rho_s0) - f(rho_s0, rho_s1, rho_s2, rho_s0)
        coef3 = f(rho_t, rho_s2, rho_s0, rho_s1) - f(rho_s0, rho_s2, rho_s0, rho_s1)
        return alpha_t * (sample / alpha_s0 + coef1 * m0 + coef2 * m1 + coef3 * m2)

    def step(self, model_output, timestep, sample, generator=None, eta: float = 0.0):
        if self.num_inference_steps is None:
            raise ValueError("set_timesteps must be called before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        cfg, n = self.config, len(self.timesteps)
        lower_order_final = self._step_index == n - 1 and cfg.lower_order_final and n < 15
        lower_order_second = self._step_index == n - 2 and cfg.lower_order_final and n < 15
        x0, eps = self._convert(model_output, sample)
        self.model_outputs = self.model_outputs[1:] + [eps]
        if cfg.solver_order == 1 or self.lower_order_nums < 1 or lower_order_final:
            prev_sample = self._first_order(eps, sample)
        elif cfg.solver_order == 2 or self.lower_order_nums < 2 or lower_order_second:
            prev_sample = self._second_order(sample)
        else:
            prev_sample = self._third_order(sample)
        if self.lower_order_nums < cfg.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        self.pred_original_sample = x0
        return prev_sample

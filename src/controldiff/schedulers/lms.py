"""LMS (k-diffusion's linear multistep): Adams-style combination of past derivatives."""
from __future__ import annotations

import numpy as np
import torch

from .base import KSigmaScheduler, require


def lms_coefficient(sigmas: np.ndarray, order: int, t: int, current_order: int) -> float:
    """Integral over [sigma_t, sigma_{t+1}] of the Lagrange basis polynomial for node
    ``t - current_order`` through nodes ``t, t-1, ..., t-order+1`` (exact, no quadrature)."""
    poly = np.poly1d([1.0])
    for k in range(order):
        if k == current_order:
            continue
        poly = poly * np.poly1d([1.0, -sigmas[t - k]]) / (sigmas[t - current_order] - sigmas[t - k])
    antiderivative = poly.integ()
    return float(antiderivative(sigmas[t + 1]) - antiderivative(sigmas[t]))


class LMS(KSigmaScheduler):
    name = "lms"
    CLASS_NAME = "LMSDiscreteScheduler"
    DEFAULTS = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False, prediction_type="epsilon",
        timestep_spacing="linspace", steps_offset=0,
    )
    max_order = 4
    KARRAS_READS_BOUNDS = False

    def __init__(self, config=None, **overrides) -> None:
        super().__init__(config, **overrides)
        require(self.config, "prediction_type", ("epsilon", "sample", "v_prediction"))
        self.set_timesteps(self.config.num_train_timesteps)
        self.num_inference_steps = None

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        self.num_inference_steps = num_inference_steps
        sigmas, timesteps = self._sigmas_and_timesteps(num_inference_steps)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.sigmas = torch.from_numpy(sigmas).to(device=device)
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.float32)
        self._sigmas_np = sigmas.astype(np.float64)
        self._coeffs: dict[tuple[int, int], list[float]] = {}
        self._step_index = None
        self._begin_index = None
        self.derivatives: list[torch.Tensor] = []

    def _lms_coeffs(self, order: int, t: int) -> list[float]:
        key = (order, t)
        if key not in self._coeffs:
            self._coeffs[key] = [lms_coefficient(self._sigmas_np, order, t, j) for j in range(order)]
        return self._coeffs[key]

    def step(self, model_output, timestep, sample, generator=None, eta: float = 0.0):
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index]
        x0 = self._x0(model_output, sample, sigma)
        derivative = (sample - x0) / sigma
        self.derivatives.append(derivative)
        if len(self.derivatives) > self.max_order:
            self.derivatives.pop(0)
        order = min(self._step_index + 1, self.max_order)
        coeffs = self._lms_coeffs(order, self._step_index)
        prev_sample = sample + sum(c * d for c, d in zip(coeffs, reversed(self.derivatives)))
        self._step_index += 1
        self.pred_original_sample = x0
        return prev_sample

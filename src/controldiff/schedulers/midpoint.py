"""Samplers with two model calls a step, the second at a midpoint in log-sigma (DPM-Solver++
2S ancestral, DPM-Solver SDE): the shared schedule layout and formulas.

Time is ``t = -log(sigma)`` (k-diffusion's ``t_fn``/``sigma_fn``). Step k goes from sigma_k
towards a target level (sigma_{k+1}, or the ancestral sigma_down); its second call is at the
midpoint ``exp(-(t + (t_target - t) / 2))``. The last step (to sigma 0) is one Euler call. The
layout is Heun's: ``timesteps``/``sigmas`` hold every call, so img2img starts at ``2 * t_start``.
All arithmetic is on 0-dim float32 tensors in the references' order, so results stay bit-equal.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .base import KSigmaScheduler, train_sigmas
from .prediction import alpha_sigma


def t_of(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.log().neg()


def sigma_of(t: torch.Tensor) -> torch.Tensor:
    return t.neg().exp()


def log_midpoint(t: torch.Tensor, t_to: torch.Tensor) -> torch.Tensor:
    """Halfway from ``t`` to ``t_to`` in log-sigma time."""
    return t + (t_to - t) * 0.5


def ancestral_step(sigma_from, sigma_to):
    """(sigma_down, sigma_up) of an ancestral step, eta = 1 (k-diffusion's get_ancestral_step)."""
    sigma_up = min(sigma_to, (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


class MidpointScheduler(KSigmaScheduler):
    """Schedule state of a two-call sampler, one entry per model call: ``levels`` is the call's
    noise level (what the model input is scaled by), ``sigmas`` the level add_noise uses (Heun's
    layout: a step's first call its start, a midpoint call the step's end; then 0)."""

    order = 2

    def __init__(self, config=None, **overrides) -> None:
        super().__init__(config, **overrides)
        # before set_timesteps, the training schedule (init_noise_sigma reads it); stepping
        # needs set_timesteps, as the pipelines call it
        sigmas = np.concatenate([train_sigmas(self.alphas_cumprod)[::-1], [0.0]]).astype(np.float32)
        self.sigmas = torch.from_numpy(sigmas)
        n = self.config.num_train_timesteps
        self.timesteps = torch.from_numpy(np.linspace(0, n - 1, n)[::-1].copy())
        self.levels: Optional[torch.Tensor] = None
        self.sample = None

    def _midpoint_sigma(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> Optional[torch.Tensor]:
        """The second call's noise level of the step from ``sigma`` to ``sigma_next``
        (None: the step is one Euler call)."""
        raise NotImplementedError

    def _lay_out(self, sigmas: torch.Tensor) -> None:
        """``sigmas``: the steps' float32 levels, ending with 0. Kept on the CPU (as diffusers'
        DPMSolverSDEScheduler does): each step reads scalars."""
        self.step_sigmas = sigmas = sigmas.cpu()
        levels, steps, second = [], [], []
        for k in range(len(sigmas) - 1):
            mid = self._midpoint_sigma(sigmas[k], sigmas[k + 1])
            calls = [sigmas[k]] if mid is None else [sigmas[k], mid]
            levels += calls
            steps += [k] * len(calls)
            second += [False, True][:len(calls)]
        self.levels = torch.stack(levels)
        self._call_step, self._second = steps, second
        at = [sigmas[k + 1] if s else sigmas[k] for k, s in zip(steps, second)]
        self.sigmas = torch.stack([*at, sigmas[-1]])
        self.sample = None
        self._step_index = None
        self._begin_index = None

    @property
    def state_in_first_order(self) -> bool:
        return self.sample is None

    def _call(self) -> tuple[bool, torch.Tensor, torch.Tensor]:
        """(is the current call its step's first, the step's sigma, its sigma_next)."""
        k = self._call_step[self._step_index]
        return not self._second[self._step_index], self.step_sigmas[k], self.step_sigmas[k + 1]

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        if self._step_index is None:
            self._init_step_index(timestep)
        return sample / (self.levels[self._step_index] ** 2 + 1) ** 0.5

    def noise_level(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        return alpha_sigma(self.levels[position].float())

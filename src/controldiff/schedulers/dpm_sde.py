"""DPM-Solver++ SDE (k-diffusion's ``sample_dpmpp_sde``, r = 1/2; A1111's "DPM++ SDE"), equal
to diffusers' DPMSolverSDEScheduler: two calls a step, noise from a Brownian tree (torchsde).

The tree's seed: the config's ``noise_sampler_seed`` when set (as diffusers); else one draw
``torch.randint(0, 2**63 - 1, [])`` from the pipeline's generator (one per generator for a
list: each image's noise is its own); else from torch's global generator. Diffusers' pipelines
never pass their generator to this scheduler, so it draws from the global one: with
``generator=torch.manual_seed(s)`` (that global generator) diffusers gives our image for
``torch.Generator().manual_seed(s)``.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from .base import require, sigma_to_t, train_sigmas
from .midpoint import MidpointScheduler, ancestral_step, log_midpoint, sigma_of, t_of

_SEED_LIMIT = 2**63 - 1


def _torchsde():
    try:
        import torchsde
    except ImportError as e:  # optional: only this sampler needs it
        raise ValueError("scheduler: dpmpp_sde needs torchsde (pip install 'controldiff[sde]')") from e
    return torchsde


def _sort(a, b):
    return (a, b, 1.0) if a < b else (b, a, -1.0)


class BrownianNoise:
    """Unit-variance Brownian increments between two noise levels: diffusers' (k-diffusion's)
    BrownianTreeNoiseSampler over BatchedBrownianTree, one tree per seed of a list."""

    def __init__(self, x: torch.Tensor, sigma_min: float, sigma_max: float, seed) -> None:
        torchsde = _torchsde()
        t0, t1, self.sign = _sort(torch.as_tensor(sigma_min), torch.as_tensor(sigma_max))
        self.batched = isinstance(seed, (list, tuple))
        seeds = list(seed) if self.batched else [seed]
        if self.batched and len(seeds) != x.shape[0]:
            raise ValueError(f"generator: got {len(seeds)} generators (or noise_sampler_seed values) "
                             f"for a batch of {x.shape[0]}")
        w0 = torch.zeros_like(x)
        w0 = w0[0] if self.batched else w0
        self.trees = [torchsde.BrownianInterval(t0=t0, t1=t1, size=w0.shape, dtype=w0.dtype, device=w0.device,
                                                entropy=s, tol=1e-6, pool_size=24, halfway_tree=True)
                      for s in seeds]

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        t0, t1 = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        a, b, sign = _sort(t0, t1)
        with warnings.catch_warnings():
            # a level recomputed as exp(-(-log sigma)) falls an ulp outside the tree's interval:
            # torchsde warns and uses it as is (so does the reference); nothing to tell the user
            warnings.filterwarnings("ignore", message="Should have t", category=UserWarning)
            w = torch.stack([tree(a, b) for tree in self.trees]) * (self.sign * sign)
        w = w if self.batched else w[0]
        return w / (t1 - t0).abs().sqrt()


def _draw_seed(generator=None) -> int:
    if generator is None:
        return torch.randint(0, _SEED_LIMIT, []).item()
    return torch.randint(0, _SEED_LIMIT, [], generator=generator, device=generator.device).item()


class DPMSolverSDE(MidpointScheduler):
    name = "dpmpp_sde"
    CLASS_NAME = "DPMSolverSDEScheduler"
    KARRAS_READS_BOUNDS = False  # the reference's Karras ignores sigma_min/sigma_max
    DEFAULTS = dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear", trained_betas=None,
        prediction_type="epsilon", use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
        noise_sampler_seed=None, timestep_spacing="linspace", steps_offset=0,
    )

    def __init__(self, config=None, **overrides) -> None:
        super().__init__(config, **overrides)
        _torchsde()  # missing: fail now, before any model work
        require(self.config, "prediction_type", ("epsilon", "v_prediction"))
        if self.config.use_karras_sigmas:
            self.name = "dpmpp_sde_karras"  # the registered name of this configuration
        self.noise_sampler: BrownianNoise | None = None  # made at the first step, from its sample

    def _midpoint_sigma(self, sigma, sigma_next):
        return sigma_of(log_midpoint(t_of(sigma), t_of(sigma_next))) if sigma_next > 0 else None

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        self.num_inference_steps = num_inference_steps
        sigmas, timesteps = self._sigmas_and_timesteps(num_inference_steps, float32=False)
        log_sigmas = np.log(train_sigmas(self.alphas_cumprod))
        # the second calls' timesteps, in float64 as the reference computes them
        t = -np.log(sigmas)
        mids = np.exp(-(t[:-1] + np.diff(t) * 0.5))
        mid_timesteps = torch.from_numpy(sigma_to_t(mids, log_sigmas))
        self._lay_out(torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32)))
        timesteps = torch.from_numpy(timesteps)
        timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)])
        timesteps[1::2] = mid_timesteps
        self.timesteps = timesteps.to(device=device)
        self.noise_sampler = None

    def _tree_seed(self, generator):
        if self.config.noise_sampler_seed is not None:
            return self.config.noise_sampler_seed
        if isinstance(generator, (list, tuple)):
            return [_draw_seed(g) for g in generator]
        return _draw_seed(generator)

    def step(self, model_output, timestep, sample, generator=None, eta: float = 0.0, s_noise: float = 1.0):
        """``eta`` is ignored (the reference's step takes none)."""
        if self._step_index is None:
            self._init_step_index(timestep)
        if self.noise_sampler is None:
            positive = self.sigmas[self.sigmas > 0]
            self.noise_sampler = BrownianNoise(sample, positive.min().item(), self.sigmas.max().item(),
                                               self._tree_seed(generator))
        first, sigma, sigma_next = self._call()
        t, t_next = t_of(sigma), t_of(sigma_next)
        t_mid = log_midpoint(t, t_next)
        x0 = self._x0(model_output, sample, sigma if first else sigma_of(t_mid))
        if sigma_next == 0:
            derivative = (sample - x0) / sigma
            prev_sample = sample + derivative * (sigma_next - sigma)
        else:
            if first:
                t_next = t_mid
            else:
                sample = self.sample
            sigma_down, sigma_up = ancestral_step(sigma_of(t), sigma_of(t_next))
            ancestral_t = t_of(sigma_down)
            prev_sample = (sigma_of(ancestral_t) / sigma_of(t)) * sample - (t - ancestral_t).expm1() * x0
            prev_sample = prev_sample + self.noise_sampler(sigma_of(t), sigma_of(t_next)) * s_noise * sigma_up
            self.sample = sample if first else None
        self._step_index += 1
        self.pred_original_sample = x0
        return prev_sample

"""Shared scheduler pieces: config resolution, noise schedules, timestep spacing, sigmas.

Every function here reproduces the arithmetic (and dtypes) of the diffusers reference
exactly, so our schedulers match it step for step; keep the order of operations.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch

from ..models.config import Config as SchedulerConfig  # a dict whose keys read as attributes
from .prediction import alpha_sigma, k_x0


def resolve_config(defaults: Mapping[str, Any], config: Mapping[str, Any] | None,
                   class_name: str | None = None) -> SchedulerConfig:
    """``from_config`` semantics: keys the target class accepts override its defaults.

    Keys listed in ``_use_default_values`` were defaults of the saving class and are
    dropped. Keys the target does not accept (another class's options) do not affect
    it but are kept, as diffusers keeps them, so a config converted twice round-trips.
    """
    config = dict(config or {})
    used_defaults = set(config.pop("_use_default_values", None) or [])
    out = SchedulerConfig(defaults)
    for key, value in config.items():
        if key not in used_defaults:
            out[key] = value
    if class_name is not None:
        out["_class_name"] = class_name
    return out


def require(config: Mapping[str, Any], key: str, allowed) -> None:
    """Unsupported option values fail loudly, naming the key."""
    if config[key] not in allowed:
        raise ValueError(f"scheduler config: {key}={config[key]!r} is not supported (supported: {list(allowed)})")


# ---------------------------------------------------------------------------- noise schedule


def betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999, kind: str = "cosine") -> torch.Tensor:
    """Discretised alpha_bar(t) (``squaredcos_cap_v2`` is the cosine schedule)."""
    if kind == "cosine":
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    elif kind == "exp":
        def alpha_bar(t):
            return math.exp(t * -12.0)
    else:
        raise ValueError(f"alpha_transform_type: unsupported {kind!r}")
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas to zero terminal SNR (arXiv:2305.08891, algorithm 1)."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first = alphas_bar_sqrt[0].clone()
    last = alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= last
    alphas_bar_sqrt *= first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def make_betas(config: Mapping[str, Any], extra_schedules: tuple[str, ...] = ()) -> torch.Tensor:
    """Betas from ``trained_betas`` or ``beta_schedule`` (float32, as the reference)."""
    n = config["num_train_timesteps"]
    schedule = config["beta_schedule"]
    if config.get("trained_betas") is not None:
        return torch.tensor(config["trained_betas"], dtype=torch.float32)
    if schedule == "linear":
        return torch.linspace(config["beta_start"], config["beta_end"], n, dtype=torch.float32)
    if schedule == "scaled_linear":
        return torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, n, dtype=torch.float32) ** 2
    if schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(n)
    if schedule == "exp" and "exp" in extra_schedules:
        return betas_for_alpha_bar(n, kind="exp")
    if schedule == "sigmoid" and "sigmoid" in extra_schedules:
        return torch.sigmoid(torch.linspace(-6, 6, n)) * (config["beta_end"] - config["beta_start"]) + config["beta_start"]
    raise ValueError(
        f"scheduler config: beta_schedule={schedule!r} is not supported "
        f"(supported: {['linear', 'scaled_linear', 'squaredcos_cap_v2', *extra_schedules]})"
    )


def make_alphas_cumprod(config: Mapping[str, Any], extra_schedules: tuple[str, ...] = (), zero_snr_fix: bool = False) -> torch.Tensor:
    """Cumulative alphas; with zero-terminal-SNR rescaling, sigma-based samplers clamp the
    last value to 2**-24 so the largest sigma stays finite (``zero_snr_fix``)."""
    betas = make_betas(config, extra_schedules)
    rescale = config.get("rescale_betas_zero_snr", False)
    if rescale:
        betas = rescale_zero_terminal_snr(betas)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    if rescale and zero_snr_fix:
        alphas_cumprod[-1] = 2**-24
    return alphas_cumprod


# ---------------------------------------------------------------------------- timesteps


def spaced_timesteps(config: Mapping[str, Any], n: int, *, round_linspace: bool = True, solver: bool = False,
                     last_timestep: int | None = None) -> np.ndarray:
    """Descending training timesteps for ``n`` inference steps, per ``timestep_spacing``.

    Returns float64 values (callers cast as their reference class does).
    ``round_linspace``: DDIM-style classes round linspace values, k-diffusion-style ones do not.
    ``solver``: DPM-Solver/UniPC space ``n + 1`` points and drop the last (timestep 0).
    """
    spacing = config["timestep_spacing"]
    num_train = config["num_train_timesteps"]
    last = num_train if last_timestep is None else last_timestep
    if spacing == "linspace":
        if solver:
            return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy()
        ts = np.linspace(0, num_train - 1, n)
        return (ts.round() if round_linspace else ts)[::-1].copy()
    if spacing == "leading":
        if solver:
            step_ratio = last // (n + 1)
            ts = (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1].copy()
        else:
            step_ratio = num_train // n
            ts = (np.arange(0, n) * step_ratio).round()[::-1].copy()
        return (ts + config["steps_offset"]).astype(np.float64)
    if spacing == "trailing":
        step_ratio = num_train / n
        return np.round(np.arange(last, 0, -step_ratio)) - 1
    raise ValueError(f"scheduler config: timestep_spacing={spacing!r} is not supported (supported: ['linspace', 'leading', 'trailing'])")


# ---------------------------------------------------------------------------- sigmas


def train_sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """sqrt((1 - a) / a) over the training timesteps, as float32 numpy (the reference's dtype)."""
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).cpu().numpy()


def interp_sigmas(timesteps: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """Sigmas at (possibly fractional) timesteps by linear interpolation."""
    return np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep of a sigma, interpolating in log-sigma."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low = log_sigmas[low_idx]
    high = log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(sigma.shape)


def karras_sigmas(in_sigmas: np.ndarray, n: int, sigma_min: float | None = None, sigma_max: float | None = None,
                  rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) noise levels between the schedule's extremes (first = max)."""
    sigma_min = sigma_min if sigma_min is not None else in_sigmas[-1].item()
    sigma_max = sigma_max if sigma_max is not None else in_sigmas[0].item()
    ramp = np.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(in_sigmas: np.ndarray, n: int, sigma_min: float | None = None,
                       sigma_max: float | None = None) -> np.ndarray:
    """Noise levels evenly spaced in log-sigma between the schedule's extremes (first = max)."""
    sigma_min = sigma_min if sigma_min is not None else in_sigmas[-1].item()
    sigma_max = sigma_max if sigma_max is not None else in_sigmas[0].item()
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def beta_sigmas(in_sigmas: np.ndarray, n: int, sigma_min: float | None = None, sigma_max: float | None = None,
                alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """Noise levels at Beta(0.6, 0.6) quantiles (arXiv:2407.12173): dense at both ends."""
    try:
        import scipy.stats
    except ImportError as e:  # scipy is optional: only this schedule needs it
        raise ValueError("scheduler config: use_beta_sigmas=True needs scipy (pip install scipy)") from e
    sigma_min = sigma_min if sigma_min is not None else in_sigmas[-1].item()
    sigma_max = sigma_max if sigma_max is not None else in_sigmas[0].item()
    ppfs = [scipy.stats.beta.ppf(t, alpha, beta) for t in 1 - np.linspace(0, 1, n)]
    return np.array([sigma_min + ppf * (sigma_max - sigma_min) for ppf in ppfs])


SIGMA_SCHEDULES = {"use_karras_sigmas": karras_sigmas, "use_exponential_sigmas": exponential_sigmas,
                   "use_beta_sigmas": beta_sigmas}


def expand_to(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Flatten per-sample values and add trailing dims to broadcast against ``like``."""
    values = values.flatten()
    while values.ndim < like.ndim:
        values = values.unsqueeze(-1)
    return values


# ---------------------------------------------------------------------------- base classes


class Scheduler:
    """Common state: resolved config, alphas_cumprod, begin/step index bookkeeping.

    Subclasses set ``name``, ``DEFAULTS`` (the reference ``__init__`` defaults) and
    implement ``set_timesteps``/``step``. ``pred_original_sample`` holds the x0
    prediction of the last step (controls need it).
    """

    name: str = ""
    CLASS_NAME: str | None = None  # the diffusers class this one equals
    order: int = 1
    DEFAULTS: dict[str, Any] = {}
    init_noise_sigma: Any = 1.0
    _missing_timestep_is_last = False  # DPM-Solver/UniPC: an unknown timestep means the last step

    def __init__(self, config: Mapping[str, Any] | None = None, **overrides: Any) -> None:
        self.config = resolve_config(self.DEFAULTS, config, self.CLASS_NAME)
        self.config.update(overrides)  # like from_config(cfg, **kwargs): kwargs always win
        self.num_inference_steps: int | None = None
        self.timesteps: torch.Tensor | None = None
        self.pred_original_sample: torch.Tensor | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._check_config()

    SIGMA_SCHEDULES: tuple[str, ...] = ()  # the use_*_sigmas options this class implements
    KARRAS_READS_BOUNDS = True  # LMS's reference Karras ignores sigma_min/sigma_max

    def _check_config(self) -> None:
        """Raise ValueError for options we do not implement."""
        for key in ("thresholding", "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas",
                    "use_lu_lambdas", "use_dynamic_shifting"):
            if self.option(key) and key not in self.SIGMA_SCHEDULES:
                raise ValueError(f"scheduler config: {key}=True is not supported by {self.name!r}")
        chosen = [key for key in SIGMA_SCHEDULES if self.option(key)]
        if len(chosen) > 1:
            raise ValueError(f"scheduler config: only one of {', '.join(SIGMA_SCHEDULES)} can be True (got {chosen})")

    def _sigma_schedule(self):
        """The configured sigma re-spacing (Karras, exponential, beta), or None; it reads
        sigma_min/sigma_max even when carried over from another class's config, as the
        reference does (``hasattr(self.config, "sigma_min")``)."""
        for key, schedule in SIGMA_SCHEDULES.items():
            if self.option(key):
                lo, hi = self.config.get("sigma_min"), self.config.get("sigma_max")
                if key == "use_karras_sigmas" and not self.KARRAS_READS_BOUNDS:
                    lo = hi = None
                return lambda in_sigmas, n: schedule(in_sigmas, n, lo, hi)
        return None

    def option(self, key: str) -> Any:
        """A config value this class accepts (None otherwise: carried-over keys of other
        classes must not change behaviour)."""
        return self.config[key] if key in self.DEFAULTS else None

    @property
    def settings(self) -> dict[str, Any]:
        """Only the keys this class accepts (what the schedule is computed from)."""
        return {k: self.config[k] for k in self.DEFAULTS}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, steps={self.num_inference_steps})"

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """img2img starts part-way: the first step uses this index instead of a lookup."""
        self._begin_index = begin_index

    def index_for_timestep(self, timestep, schedule_timesteps: torch.Tensor | None = None) -> int:
        """Position of ``timestep``; the second match when repeated (as the reference)."""
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        indices = (schedule == timestep).nonzero()
        if len(indices) == 0 and self._missing_timestep_is_last:
            return len(self.timesteps) - 1
        return indices[1 if len(indices) > 1 else 0].item()

    def _init_step_index(self, timestep) -> None:
        if self._begin_index is None:
            if isinstance(timestep, torch.Tensor):
                timestep = timestep.to(self.timesteps.device)
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def noise_level(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, sigma) of the model input at ``self.timesteps[position]``: the input is
        ``alpha * x0 + sigma * eps`` (see :mod:`.prediction`); float32 scalars."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self.config.num_train_timesteps


class AlphaScheduler(Scheduler):
    """DDPM-family: noise is added with sqrt(alpha_bar) and sqrt(1 - alpha_bar)."""

    EXTRA_SCHEDULES: tuple[str, ...] = ()

    def __init__(self, config=None, **overrides) -> None:
        super().__init__(config, **overrides)
        self.alphas_cumprod = make_alphas_cumprod(self.settings, self.EXTRA_SCHEDULES)

    def _move_schedule(self, device) -> None:
        """Keep alphas_cumprod beside the timesteps so steps index it without transfers."""
        if device is not None:
            self.alphas_cumprod = self.alphas_cumprod.to(device)

    def _set_spaced_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Integer timesteps spaced as the config says (DDIM, DDPM), schedule on ``device``."""
        n_train = self.config.num_train_timesteps
        if num_inference_steps > n_train:
            raise ValueError(f"num_inference_steps: {num_inference_steps} is larger than num_train_timesteps {n_train}")
        self.num_inference_steps = num_inference_steps
        timesteps = spaced_timesteps(self.config, num_inference_steps).astype(np.int64)
        self.timesteps = torch.from_numpy(timesteps).to(device)
        self._move_schedule(device)

    def noise_level(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        alpha_bar = self.alphas_cumprod[self.timesteps[position]].float()
        return alpha_bar**0.5, (1 - alpha_bar) ** 0.5

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        self.alphas_cumprod = self.alphas_cumprod.to(device=original.device)
        alphas_cumprod = self.alphas_cumprod.to(dtype=original.dtype)
        timesteps = timesteps.to(original.device)
        sqrt_alpha_prod = expand_to(alphas_cumprod[timesteps] ** 0.5, original)
        sqrt_one_minus_alpha_prod = expand_to((1 - alphas_cumprod[timesteps]) ** 0.5, original)
        return sqrt_alpha_prod * original + sqrt_one_minus_alpha_prod * noise


class SigmaScheduler(Scheduler):
    """Sigma-indexed schedulers: a step counter, started by lookup or ``set_begin_index``."""

    def _train_schedule(self) -> None:
        """Sigmas and timesteps over the whole training schedule (before set_timesteps)."""
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        n = self.config.num_train_timesteps
        self.timesteps = torch.from_numpy(np.linspace(0, n - 1, n, dtype=np.float32)[::-1].copy())

    EXTRA_SCHEDULES: tuple[str, ...] = ()
    ZERO_SNR_FIX = True

    def __init__(self, config=None, **overrides) -> None:
        super().__init__(config, **overrides)
        self.alphas_cumprod = make_alphas_cumprod(self.settings, self.EXTRA_SCHEDULES, zero_snr_fix=self.ZERO_SNR_FIX)
        self.sigmas: torch.Tensor | None = None

    def _step_indices(self, timesteps: torch.Tensor, device) -> list[int]:
        """Which sigma add_noise uses: lookup before set_begin_index, else the current/begin index."""
        if self._begin_index is None:
            schedule = self.timesteps.to(device)
            return [self.index_for_timestep(t, schedule) for t in timesteps.to(device)]
        if self._step_index is not None:
            return [self._step_index] * timesteps.shape[0]
        return [self._begin_index] * timesteps.shape[0]

    def noise_level(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        return alpha_sigma(self.sigmas[position].float())

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sigmas = self.sigmas.to(device=original.device, dtype=original.dtype)
        sigma = expand_to(sigmas[self._step_indices(timesteps, original.device)], original)
        return original + noise * sigma


class KSigmaScheduler(SigmaScheduler):
    """k-diffusion-style (LMS, Euler, Heun): inputs scaled by 1/sqrt(sigma^2+1)."""

    SIGMA_SCHEDULES = tuple(SIGMA_SCHEDULES)

    @property
    def init_noise_sigma(self):
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return self.sigmas.max()
        return (self.sigmas.max() ** 2 + 1) ** 0.5

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index]
        return sample / (sigma**2 + 1) ** 0.5

    def _sigmas_and_timesteps(self, n: int, float32: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Spaced timesteps (float32, or float64 where the reference keeps them so), their
        interpolated sigmas and optional Karras sigmas."""
        timesteps = spaced_timesteps(self.config, n, round_linspace=False)
        timesteps = timesteps.astype(np.float32) if float32 else timesteps
        sigmas = train_sigmas(self.alphas_cumprod)
        log_sigmas = np.log(sigmas)
        sigmas = interp_sigmas(timesteps, sigmas)
        schedule = self._sigma_schedule()
        if schedule is not None:
            sigmas = schedule(sigmas, n)
            timesteps = np.array([sigma_to_t(s, log_sigmas) for s in sigmas])
        return sigmas, timesteps

    def _x0(self, model_output: torch.Tensor, sample: torch.Tensor, sigma) -> torch.Tensor:
        """x0 from the model output at noise level ``sigma`` (k-diffusion parameterisation)."""
        return k_x0(self.config.prediction_type, model_output, sample, sigma)

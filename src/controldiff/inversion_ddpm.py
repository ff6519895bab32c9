"""Edit-friendly DDPM inversion (Huberman-Spiegelglas et al. 2024), the inversion LEDITS++
uses: ``pipe.invert(image, method="ddpm")``, as diffusers' ``LEditsPPPipeline*.invert``.

The image's latents are noised independently to every step's level; one pass of THE loop
then records, per step, the noise map ``z`` that takes the scheduler's eta=1 step from each
level exactly to the next. Generation replays those maps (``variance_noise``), so the same
predictions give the image back and edited predictions edit it. Both directions are a
scheduler wrapped around the real one (DDIM or SDE-DPM-Solver++, leading spacing, as the
reference forces): the loop, CFG, LoRA, embeddings and controls are those of generation.

``skip`` drops the noisiest share of the schedule: ``num_inference_steps`` steps run out of
``int(num_inference_steps * (1 + skip))``; generation runs the same ones (the inversion's
``strength``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .checks import finite_number
from .controls.cfg import CFG
from .images import as_batch, preprocess_image
from .noise import randn_tensor
from .schedulers.ddim import DDIM
from .schedulers.dpmsolver import DPMSolverMultistep, log_snr

SCHEDULERS = ("ddim", "dpmpp_2m_sde")


def forward_scheduler(pipe, name: str):
    """DDIM, or DPM-Solver++ SDE of order 2, from the model's config with leading spacing
    (the reference sets ``timestep_spacing = "leading"`` on whichever it uses)."""
    if name == "ddim":
        return DDIM(pipe.scheduler_config, timestep_spacing="leading")
    return DPMSolverMultistep(pipe.scheduler_config, algorithm_type="sde-dpmsolver++", solver_order=2,
                              timestep_spacing="leading")


def noise_std(sched, position: int) -> torch.Tensor:
    """Standard deviation of the noise the eta=1 step at ``sched.timesteps[position]`` adds."""
    if isinstance(sched, DDIM):
        t = sched.timesteps[position]
        prev = t - sched.config.num_train_timesteps // sched.num_inference_steps
        a_t = sched.alphas_cumprod[t]
        a_prev = sched.alphas_cumprod[prev] if prev >= 0 else sched.final_alpha_cumprod
        return ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
    _, sigma_t, lambda_t = log_snr(sched.sigmas[position + 1])
    _, _, lambda_s = log_snr(sched.sigmas[position])
    return sigma_t * torch.sqrt(1.0 - torch.exp(-2 * (lambda_t - lambda_s)))


class _Around:
    """A scheduler with its own ``step``; everything else is the wrapped scheduler's."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        if name == "inner":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _index(self, timestep) -> int:
        """Index of ``timestep`` in this run (timesteps are unique; the run starts at begin_index)."""
        position = int((self.inner.timesteps == timestep).nonzero()[0])
        return position - (self.inner.begin_index or 0)


class NoiseMapInversion(_Around):
    """Steps to the given ``targets`` (the noised image at each next level) and keeps the
    noise map each step needs to get there: ``z = (target - mu) / std``."""

    def __init__(self, inner, targets: list):
        super().__init__(inner)
        self.targets = targets
        self.noise: list = []

    def step(self, model_output, timestep, sample, generator=None, **_):
        k = self._index(timestep)
        std = noise_std(self.inner, k + (self.inner.begin_index or 0))
        mu = self.inner.step(model_output, timestep, sample, eta=1.0, variance_noise=torch.zeros_like(sample))
        z = (self.targets[k] - mu) / std if std > 0 else torch.zeros_like(mu)
        self.noise.append(z)
        return mu + std * z  # the target again, up to rounding (the reference's "correction")


class NoiseMapReplay(_Around):
    """Generation from a DDPM inversion: every step adds its recorded noise map (eta = 1)."""

    def __init__(self, inner, noise: torch.Tensor):
        super().__init__(inner)
        self.noise = noise  # (B, S, C, h, w)

    def step(self, model_output, timestep, sample, generator=None, eta: Optional[float] = None, **kwargs):
        if eta is not None and eta != 1.0:
            raise ValueError(f"eta: a DDPM inversion replays the noise of eta=1 steps; leave eta unset, got {eta}")
        z = self.noise[:, self._index(timestep)].to(sample.device, sample.dtype)
        z = z.repeat(sample.shape[0] // z.shape[0], 1, 1, 1)
        return self.inner.step(model_output, timestep, sample, eta=1.0, variance_noise=z, **kwargs)


def replay_scheduler(pipe, inversion) -> NoiseMapReplay:
    return NoiseMapReplay(forward_scheduler(pipe, inversion.scheduler), inversion.noise)


# ---------------------------------------------------------------------------- pipe.invert(method="ddpm")


@dataclass
class DDPMPlan:
    """The checked arguments of a DDPM inversion."""

    prompts: list
    steps: int          # steps run
    total: int          # steps of the whole schedule: int(steps * (1 + skip))
    scale: float        # source_guidance_scale
    skip: float
    scheduler: str
    zero_steps: int     # final steps generation runs without noise (SDXL's num_zero_noise_steps)

    @property
    def strength(self) -> float:
        """The share of the schedule run, such that ``int(total * strength) == steps``."""
        share = self.steps / self.total
        while int(self.total * share) < self.steps:
            share = math.nextafter(share, 2.0)
        return share


def plan(pipe, prompts, image, steps, guidance_scale, strength, num_reg_steps, source_guidance_scale, skip,
         scheduler, num_zero_noise_steps) -> DDPMPlan:
    """Check what only the DDPM inversion takes (ValueErrors naming the argument); one
    prompt serves every image, as in the reference."""
    if guidance_scale != 1.0:
        raise ValueError("guidance_scale: the DDPM inversion guides with source_guidance_scale (default 3.5); "
                         f"leave guidance_scale at 1, got {guidance_scale!r}")
    if strength != 1.0:
        raise ValueError(f"strength: the DDPM inversion shortens the schedule with skip; leave strength at 1, "
                         f"got {strength!r}")
    if num_reg_steps != 0:
        raise ValueError("num_reg_steps: the noise regularisation is for method='ddim'")
    scale = finite_number(3.5 if source_guidance_scale is None else source_guidance_scale, "source_guidance_scale",
                          note=" (<= 1 turns guidance off)")
    skip = 0.15 if skip is None else skip
    if not (isinstance(skip, (int, float)) and not isinstance(skip, bool) and 0.0 <= skip < 1.0):
        raise ValueError(f"skip: expected a share of the schedule in [0, 1), got {skip!r}")
    total, trained = int(steps * (1 + skip)), pipe.scheduler_config.get("num_train_timesteps", 1000)
    if total > trained:
        raise ValueError(f"num_inference_steps, skip: {steps} steps with skip {skip} make a schedule of {total} steps, "
                         f"more than the model's {trained} training timesteps")
    if scheduler is None:
        scheduler = "ddim" if pipe.scheduler_config.get("_class_name") == "DDIMScheduler" else "dpmpp_2m_sde"
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler: the DDPM inversion steps with {' or '.join(map(repr, SCHEDULERS))} "
                         f"(eta=1 DDIM, SDE DPM-Solver++), got {scheduler!r}")
    if num_zero_noise_steps is None:
        num_zero_noise_steps = 3 if pipe.info.family == "sdxl" else 0
    if isinstance(num_zero_noise_steps, bool) or not isinstance(num_zero_noise_steps, int) \
            or not 0 <= num_zero_noise_steps <= steps:
        raise ValueError(f"num_zero_noise_steps: expected an integer from 0 to num_inference_steps ({steps}), "
                         f"got {num_zero_noise_steps!r}")
    images = as_batch(image, "image", "image")
    count = len(images) if isinstance(images, list) else images.shape[0]
    if len(prompts) == 1 and count > 1:
        prompts = prompts * count
    return DDPMPlan(prompts, steps, total, scale, float(skip), scheduler, num_zero_noise_steps)


def encode_mode(pipe, image: torch.Tensor) -> torch.Tensor:
    """The VAE posterior's mode, scaled (the reference inverts the mode, not a sample)."""
    image = image.to(pipe.device, pipe.vae.dtype)
    return pipe._scaled_latents(pipe.vae.encode(image).mode())


def invert_ddpm(pipe, p: DDPMPlan, image, height: int, width: int, generator, seed, negative_prompt, prompt_2,
                negative_prompt_2, controls: list, clip_skip, callback):
    """Run the inversion (arguments checked by ``pipe.invert``); returns an Inversion."""
    from .inversion import Inversion, _Trajectory

    inner = forward_scheduler(pipe, p.scheduler)
    inner.set_timesteps(p.total, device=pipe.device)
    t_start = p.total - p.steps
    timesteps = inner.timesteps[t_start:]
    cfg = CFG(p.scale if any(p.prompts) else 1.0)  # the empty source prompt: no guidance, as the reference
    batch = len(p.prompts)

    # ---- the work
    text = pipe._encode_prompts(p.prompts, negative_prompt, prompt_2, negative_prompt_2, cfg.enabled, 1, clip_skip)
    x0 = pipe._repeat(encode_mode(pipe, preprocess_image(image, height, width)), batch, "image")
    # the image noised to every step's level, drawn from the least noised up, as the reference
    levels = [inner.add_noise(x0, randn_tensor(x0.shape, generator, pipe.device, x0.dtype), t.reshape(1))
              for t in timesteps.flip(0)][::-1]
    inner.set_begin_index(t_start)
    sched = NoiseMapInversion(inner, levels[1:] + [x0])
    ctx = pipe._context(sched, timesteps, text, generator, 1, height, width, cfg.scale)
    pipe._inversion_time_ids(ctx, height, width, batch)
    trajectory = _Trajectory()
    _, done = pipe._run(ctx, levels[0], [cfg, *controls, trajectory], callback, {})
    if done < len(timesteps):
        raise RuntimeError(f"invert: cancelled by the callback after {done} of {len(timesteps)} steps")
    noise = torch.stack(sched.noise, dim=1)
    if p.zero_steps:
        noise[:, noise.shape[1] - p.zero_steps:] = 0
    settings = dict(prompt=p.prompts, negative_prompt=negative_prompt, source_guidance_scale=p.scale, skip=p.skip,
                    num_zero_noise_steps=p.zero_steps, seed=seed, controls=[c.describe() for c in controls])
    return Inversion(latents=levels[0], trajectory=torch.stack([levels[0], *trajectory.latents[:-1]], dim=1),
                     num_inference_steps=p.total, strength=p.strength, height=height, width=width,
                     scheduler=p.scheduler, method="ddpm", model=str(pipe.path or ""), settings=settings,
                     noise=noise)

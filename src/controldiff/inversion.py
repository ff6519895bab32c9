"""Inversion: a real image's latents run backwards to noise, so editing controls can
regenerate it (Pix2Pix-Zero, DiffEdit). ``pipe.invert(image)`` returns an
:class:`Inversion`; ``pipe(prompt, inversion=inv)`` starts from it.

DDIM inversion is diffusers' ``DDIMInverseScheduler`` driven by THE loop, so the prompt
encoding, LoRA, embeddings and controls are those of generation. The optional
regularisation of the noise predictions towards i.i.d. Gaussian noise (auto-correlation
and KL terms, Pix2Pix-Zero's ``invert``; DiffEdit borrows it) is a control on the
combined prediction. ``method="ddpm"``: the edit-friendly DDPM inversion of LEDITS++
(:mod:`.inversion_ddpm`), whose noise maps generation replays.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .checks import finite_number, is_number, positive_int
from .controls.cfg import CFG
from .defaults import defaults_for
from .images import as_batch, preprocess_image
from .noise import seeded
from .sampling.control import Control
from .schedulers.ddim_inverse import DDIMInverse
from .text.encode import as_list

METHODS = ("ddim", "ddpm")


@dataclass
class Inversion:
    """Inverted latents of one or more images, and what they were made with (generation
    from them must use the same size, steps, scheduler and model: checked)."""

    latents: torch.Tensor        # (B, C, h, w): the most noised latents, where generation starts
    trajectory: torch.Tensor     # (B, S, C, h, w): every step's latents in denoising order ([:, 0] is latents)
    num_inference_steps: int
    strength: float              # the share of the schedule inverted (DiffEdit's inpaint_strength)
    height: int
    width: int
    scheduler: str               # the scheduler generation must use
    method: str = "ddim"
    model: str = ""              # the model folder it was made with (empty when unknown)
    settings: dict = field(default_factory=dict)
    noise: Optional[torch.Tensor] = None  # (B, S, C, h, w) "ddpm": each step's noise map, replayed by generation

    def make_scheduler(self, pipe):
        """The scheduler generation from this inversion steps with (DDPM: one replaying the noise maps)."""
        if self.noise is None:
            return pipe.make_scheduler(self.scheduler)
        from .inversion_ddpm import replay_scheduler

        return replay_scheduler(pipe, self)

    def check(self, pipe, steps: Optional[int], height: Optional[int], width: Optional[int],
              scheduler: Optional[str], prompts: int, per_prompt: int) -> None:
        """ValueErrors naming the argument that disagrees with this inversion."""
        rows = self.latents.shape[0]
        pipe._check_spread(self.latents, prompts * per_prompt, "inversion")
        if rows > 1 and per_prompt > 1:
            # rows would repeat whole (img2img's rule, DiffEdit's masks follow it) while prompts
            # interleave: refuse rather than guess
            raise ValueError(f"num_images_per_prompt: {per_prompt} with an inversion of {rows} images is "
                             "ambiguous; generate from each image's inversion, or invert one image")
        here = str(pipe.path or "")
        if self.model and here and self.model != here:
            raise ValueError(f"inversion: made with the model {self.model!r}, this pipeline is {here!r}")
        if self.latents.shape[1] != pipe.vae.config.latent_channels:
            raise ValueError(f"inversion: has {self.latents.shape[1]} latent channels, this model "
                             f"{pipe.vae.config.latent_channels}")
        for name, mine, given in (("num_inference_steps", self.num_inference_steps, steps),
                                  ("height", self.height, height), ("width", self.width, width),
                                  ("scheduler", self.scheduler, scheduler)):
            if given is not None and given != mine:
                raise ValueError(f"{name}: {given!r} differs from the inversion's {mine!r}; invert again "
                                 f"with {name}={given!r} or leave it unset")


def auto_corr_loss(eps: torch.Tensor, generator=None) -> torch.Tensor:
    """Pix2Pix-Zero's pairwise auto-correlation of each noise map with random rolls of itself,
    over a pyramid of average-pooled resolutions (down to 8x8)."""
    loss = 0.0
    for i in range(eps.shape[0]):
        for j in range(eps.shape[1]):
            noise = eps[i:i + 1, j:j + 1]
            while True:
                roll = torch.randint(noise.shape[2] // 2, (1,), generator=generator).item()
                loss += (noise * torch.roll(noise, shifts=roll, dims=2)).mean() ** 2
                loss += (noise * torch.roll(noise, shifts=roll, dims=3)).mean() ** 2
                if noise.shape[2] <= 8:
                    break
                noise = F.avg_pool2d(noise, kernel_size=2)
    return loss


def kl_divergence(eps: torch.Tensor) -> torch.Tensor:
    """KL of N(mean, var) of all values against the standard normal (up to a factor)."""
    mean, var = eps.mean(), eps.var()
    return var + mean**2 - 1 - torch.log(var + 1e-7)


class NoiseRegularizer(Control):
    """Pushes each combined noise prediction towards i.i.d. standard normal noise with
    gradient steps on :func:`auto_corr_loss` and :func:`kl_divergence`, as the reference
    ``invert`` methods do (the losses read epsilon, converted at this step's level)."""

    def __init__(self, lambda_auto_corr: float, lambda_kl: float, num_reg_steps: int, num_auto_corr_rolls: int):
        self.lambda_auto_corr = lambda_auto_corr
        self.lambda_kl = lambda_kl
        self.num_reg_steps = num_reg_steps
        self.num_auto_corr_rolls = num_auto_corr_rolls

    def combine(self, ctx, step, preds, pred):
        if self.num_reg_steps == 0:
            return pred
        x = step.call.x[step.call.rows("cond"), :pred.shape[1]]
        # the reference draws its rolls from the generator; one generator per image is not its case
        generator = ctx.generator[0] if isinstance(ctx.generator, (list, tuple)) else ctx.generator
        with torch.enable_grad():
            for _ in range(self.num_reg_steps):
                if self.lambda_auto_corr > 0:
                    for _ in range(self.num_auto_corr_rolls):
                        var = pred.detach().clone().requires_grad_(True)
                        auto_corr_loss(step.x0_eps(var, x.detach())[1], generator).backward()
                        pred = pred - self.lambda_auto_corr * var.grad.detach() / self.num_auto_corr_rolls
                if self.lambda_kl > 0:
                    var = pred.detach().clone().requires_grad_(True)
                    kl_divergence(step.x0_eps(var, x.detach())[1]).backward()
                    pred = pred - self.lambda_kl * var.grad.detach()
                pred = pred.detach()
        return pred


class _Trajectory(Control):
    """Keeps the latents after every step."""

    def __init__(self):
        self.latents: List[torch.Tensor] = []

    def after_step(self, ctx, step, latents):
        self.latents.append(latents.detach().clone())
        return latents


def _non_negative_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: expected an integer >= 0, got {value!r}")
    return value


class InversionMixin:
    """``Pipeline.invert``."""

    def _inversion_time_ids(self, ctx, height: int, width: int, batch: int) -> None:
        """SDXL's micro-conditioning for an inversion: the image's own size, no crop."""
        if self.info.family == "sdxl":
            d = defaults_for("sdxl", "img2img")
            micro = dict(original_size=None, target_size=None, crops_coords_top_left=(0, 0),
                         negative_crops_coords_top_left=(0, 0), negative_original_size=None,
                         negative_target_size=None, aesthetic_score=d.aesthetic_score,
                         negative_aesthetic_score=d.negative_aesthetic_score)
            ctx.time_ids, ctx.uncond_time_ids = self._micro_conditioning("img2img", (height, width), micro, batch)

    @torch.no_grad()
    def invert(
        self,
        image,
        prompt: Union[str, List[str]] = "",
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        strength: float = 1.0,
        seed: Optional[int] = None,
        method: str = "ddim",
        lambda_auto_corr: float = 20.0,
        lambda_kl: float = 20.0,
        num_reg_steps: int = 0,
        num_auto_corr_rolls: int = 5,
        *,
        negative_prompt: Union[str, List[str], None] = None,
        generator=None,
        controls: Sequence[Control] = (),
        clip_skip: Optional[int] = None,
        callback: Optional[Callable[[int, torch.Tensor, torch.Tensor], Optional[bool]]] = None,
        prompt_2=None,
        negative_prompt_2=None,
        source_guidance_scale: Optional[float] = None,
        skip: Optional[float] = None,
        scheduler: Optional[str] = None,
        num_zero_noise_steps: Optional[int] = None,
    ) -> Inversion:
        """Invert ``image`` (one per prompt, or one for all) to the noise that regenerates it.

        ``strength`` < 1 inverts only that share of the schedule (DiffEdit's
        ``inpaint_strength``); ``num_reg_steps`` > 0 regularises every noise prediction
        (Pix2Pix-Zero's ``invert`` uses 5). ``seed``/``generator`` sample the VAE posterior
        and the regulariser's rolls, as the reference. Everything is checked first; a
        callback returning False cancels with a RuntimeError (half an inversion is no use).

        ``method="ddpm"`` (LEDITS++'s edit-friendly inversion, :mod:`.inversion_ddpm`): runs
        ``num_inference_steps`` of ``int(num_inference_steps * (1 + skip))`` (``skip``: default
        0.15), guided by ``source_guidance_scale`` (default 3.5; none for the empty prompt) with
        ``scheduler`` "ddim" or "dpmpp_2m_sde" (default: "ddim" for a DDIM model folder);
        ``num_zero_noise_steps`` final steps regenerate without noise (default 3 on SDXL, else 0)."""
        prompts = as_list(prompt, "prompt")
        if method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
        positive_int(num_inference_steps, "num_inference_steps")
        ddpm_only = dict(source_guidance_scale=source_guidance_scale, skip=skip, scheduler=scheduler,
                         num_zero_noise_steps=num_zero_noise_steps)
        if method == "ddpm":
            from .inversion_ddpm import invert_ddpm, plan

            ddpm = plan(self, prompts, image, num_inference_steps, guidance_scale, strength, num_reg_steps,
                        **ddpm_only)
            prompts = ddpm.prompts
        elif any(v is not None for v in ddpm_only.values()):
            names = "/".join(k for k, v in ddpm_only.items() if v is not None)
            raise ValueError(f"{names}: only for method='ddpm'")
        cfg = CFG(finite_number(guidance_scale, "guidance_scale"))
        if not is_number(strength) or not 0.0 < strength <= 1.0:
            raise ValueError(f"strength: expected a value in (0, 1], got {strength!r}")
        lambda_auto_corr = finite_number(lambda_auto_corr, "lambda_auto_corr", 0.0)
        lambda_kl = finite_number(lambda_kl, "lambda_kl", 0.0)
        _non_negative_int(num_reg_steps, "num_reg_steps")
        positive_int(num_auto_corr_rolls, "num_auto_corr_rolls")
        controls = list(controls)
        for c in controls:
            if not isinstance(c, Control):
                raise ValueError(f"controls: expected controldiff controls, got {type(c).__name__}")
        if self.info.kind != "txt2img":
            raise ValueError(f"invert: needs a text-to-image model, this one is {self.info.kind!r}")
        batch = len(prompts)
        generator, seed = seeded(generator, seed, batch)
        image = as_batch(image, "image", "image")
        height, width = self._default_size(None, None, image, controls)
        for name, value in (("prompt", prompts), ("negative_prompt", negative_prompt), ("prompt_2", prompt_2),
                            ("negative_prompt_2", negative_prompt_2)):
            self.prompt_encoder.check(value, name)
        if method == "ddpm":
            return invert_ddpm(self, ddpm, image, height, width, generator, seed, negative_prompt, prompt_2,
                               negative_prompt_2, controls, clip_skip, callback)
        sched = DDIMInverse(self.scheduler_config)
        sched.set_timesteps(num_inference_steps, device=self.device)
        t_start = num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)
        if t_start >= num_inference_steps:
            raise ValueError(f"strength: {strength} with {num_inference_steps} steps leaves no step to run")
        timesteps = sched.timesteps[:len(sched.timesteps) - t_start]

        # ---- the work
        text = self._encode_prompts(prompts, negative_prompt, prompt_2, negative_prompt_2, cfg.enabled, 1, clip_skip)
        ctx = self._context(sched, timesteps, text, generator, 1, height, width, cfg.scale)
        self._inversion_time_ids(ctx, height, width, batch)
        latents = self._repeat(self._encode_image(preprocess_image(image, height, width), generator), batch, "image")
        trajectory = _Trajectory()
        regularizer = NoiseRegularizer(lambda_auto_corr, lambda_kl, num_reg_steps, num_auto_corr_rolls)
        latents, done = self._run(ctx, latents, [cfg, *controls, regularizer, trajectory], callback, {})
        if done < len(timesteps):  # half an inversion regenerates nothing
            raise RuntimeError(f"invert: cancelled by the callback after {done} of {len(timesteps)} steps")
        settings = dict(prompt=prompts, negative_prompt=negative_prompt, guidance_scale=cfg.scale, seed=seed,
                        lambda_auto_corr=lambda_auto_corr, lambda_kl=lambda_kl, num_reg_steps=num_reg_steps,
                        num_auto_corr_rolls=num_auto_corr_rolls, controls=[c.describe() for c in controls])
        return Inversion(latents=latents, trajectory=torch.stack(trajectory.latents[::-1], dim=1),
                         num_inference_steps=num_inference_steps, strength=float(strength), height=height,
                         width=width, scheduler="ddim", method=method, model=str(self.path or ""),
                         settings=settings)

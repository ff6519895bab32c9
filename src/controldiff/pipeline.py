"""The user-facing Pipeline: prepares the inputs, runs THE loop, decodes.

One class for SD1.x, SD2.x and SDXL, for txt2img, img2img and inpainting; every
other technique comes in through ``controls``.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Union

import torch

from . import schedulers
from .checks import finite_number, is_number, positive_int
from .controls.cfg import CFG
from .controls.inpaint import InpaintBlend, InpaintConcat
from .controls.prompt_schedule import PromptSchedule, is_plain, schedule_texts
from .inversion import Inversion, InversionMixin
from .loading.custom_diffusion import CustomDiffusionMixin
from .loading.lora import LoraMixin
from .loading.single_file import SingleFileMixin
from .loading.textual_inversion import TextualInversionMixin
from .defaults import default_strength, defaults_for, task_of
from .diffedit import DiffEditMixin
from .images import as_batch, image_size, postprocess, preprocess_image, preprocess_mask
from .memory import check_fits, parse_budget, resolve_budget
from .model_editing import ModelEditingMixin
from .noise import randn_tensor, seeded
from .precision import LATENT_DTYPE, resolve_dtype
from .sampling.control import Context, Control
from .sampling.finite import check_finite
from .sampling.loop import sample
from .text.encode import PromptEncoder, TextCond, as_list as _as_list, spread

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@contextlib.contextmanager
def _set_up(controls: Sequence[Control], ctx: Context):
    """Each control's ``setup`` in order; on leaving, ``teardown`` of every control whose
    setup ran, in reverse order, whatever happened in between."""
    ready: list[Control] = []
    ctx.controls = tuple(controls)
    try:
        for c in controls:
            c.setup(ctx)
            ready.append(c)
        yield
    finally:
        for c in reversed(ready):
            c.teardown(ctx)


@dataclass
class Output:
    """What a call returns. ``images`` as asked by output_type; ``seed`` when one was used;
    ``cancelled`` when the callback stopped the loop after ``steps_done`` steps."""

    images: Any
    seed: Optional[int] = None
    steps_done: int = 0
    cancelled: bool = False
    settings: dict = field(default_factory=dict)


class Pipeline(LoraMixin, CustomDiffusionMixin, TextualInversionMixin, SingleFileMixin, ModelEditingMixin,
               InversionMixin, DiffEditMixin):
    """A loaded model and everything needed to sample from it."""

    def __init__(self, unet, vae, text_encoders, tokenizers, scheduler_config: dict, info, model_index: Optional[dict] = None,
                 path: Optional[Path] = None):
        self.unet = unet
        if info.family == "sdxl" and vae.dtype == torch.float16 and vae.config.get("force_upcast", True):
            vae = vae.float()  # the SDXL VAE overflows in float16: keep it in float32, as diffusers does
        self.vae = vae
        self.text_encoders = list(text_encoders)
        self.tokenizers = list(tokenizers)
        self.scheduler_config = dict(scheduler_config)
        self.info = info
        self.model_index = dict(model_index or {})
        self.path = path
        self.prompt_encoder = PromptEncoder(self.tokenizers, self.text_encoders, sdxl=info.family == "sdxl")
        self.progress = True
        self.memory_budget = None   # bytes a UNet call may use: None = half the free memory, '4GiB', math.inf

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype: Union[torch.dtype, str] = torch.float32,
                        variant: Optional[str] = None) -> "Pipeline":
        """Load a diffusers-layout folder (the family is read from its configs), or a
        single-file checkpoint (see :meth:`from_single_file`). ``dtype="auto"``: float16 on
        CUDA, bfloat16 on a CPU with native bf16, else float32 (:mod:`controldiff.precision`)."""
        from .loading.folder import load_components

        dtype = resolve_dtype(dtype, device)
        if Path(path).is_file():
            return cls.from_single_file(path, device=device, dtype=dtype)

        c = load_components(path, device=device, dtype=dtype, variant=variant)
        index_file = Path(path) / "model_index.json"
        model_index = json.loads(index_file.read_text()) if index_file.is_file() else {}
        return cls(c.unet, c.vae, c.text_encoders, c.tokenizers, c.scheduler_config, c.info, model_index, Path(path))

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def latent_factor(self) -> int:
        return self.vae.latent_factor

    @property
    def default_size(self) -> tuple[int, int]:
        s = self.unet.config.sample_size
        h, w = (s, s) if isinstance(s, int) else s
        return h * self.latent_factor, w * self.latent_factor

    def compile(self, mode=None, dynamic=None, channels_last=None, fullgraph=False, backend="inductor") -> "Pipeline":
        """torch.compile the UNet's and VAE's layers, keeping every control composable
        (:mod:`controldiff.compile`); :meth:`uncompile` goes back to eager."""
        from .compile import compile_pipeline

        compile_pipeline(self, mode, dynamic, channels_last, fullgraph, backend)
        return self

    def uncompile(self) -> "Pipeline":
        from .compile import uncompile_pipeline

        uncompile_pipeline(self)
        return self

    def make_scheduler(self, name: Optional[str] = None):
        """A fresh scheduler: the model folder's own, or one by name built from its config."""
        if name is None:
            return schedulers.from_config(self.scheduler_config)
        return schedulers.create(name, self.scheduler_config)

    # ------------------------------------------------------------------ prompts
    def _encode_prompts(self, prompts, negative, prompts_2, negative_2, guided: bool, n: int, clip_skip) -> dict:
        text = self.prompt_encoder.encode_pair(prompts, negative, prompts_2, negative_2, guided=guided,
                                               zero_negative=self._zero_negative(negative), clip_skip=clip_skip)
        names = {"cond": "prompt", "uncond": "negative_prompt"}
        return {k: self._place(v, n, names.get(k, k)) for k, v in text.items()}

    def _zero_negative(self, negative) -> bool:
        """SDXL base models use zeros, not the empty prompt, when no negative prompt is given."""
        return (self.info.family == "sdxl" and negative is None
                and self.model_index.get("force_zeros_for_empty_prompt", True))

    def _schedule_steps(self, prompts, negative, prompt_2, negative_2, steps: int) -> Optional[int]:
        """``steps`` when a prompt uses A1111 prompt editing, alternation or AND (a1111 syntax),
        else None; checks each step's text as a prompt. Runs no model."""
        negatives = None if negative is None else _as_list(negative, "negative_prompt")
        if self.prompt_syntax != "a1111" or (all(is_plain(p, steps) for p in prompts)
                                             and all(is_plain(p, steps, split=False) for p in negatives or [])):
            return None
        if prompt_2 is not None or negative_2 is not None:
            raise ValueError("prompt_2/negative_prompt_2: with A1111 prompt editing, alternation or AND in the prompt, "
                             "leave them unset (A1111 gives both SDXL text encoders the same prompt)")
        parts, negs = schedule_texts(prompts, negatives, steps)
        self.prompt_encoder.check([t for p in parts for _, s in p for _, t in s], "prompt")
        if negs:
            self.prompt_encoder.check([t for s in negs for _, t in s], "negative_prompt")
        return steps

    def _encode_schedule(self, prompts, negative, n: int, clip_skip, steps: int) -> tuple:
        """The first step's {"cond", "uncond"} and the PromptSchedule control that changes them.
        The negative prompt is encoded even without CFG: AND composes around it."""
        zero = self._zero_negative(negative)
        negatives = None
        if not zero:
            negatives = spread([""] if negative is None else _as_list(negative, "negative_prompt"), len(prompts),
                               "negative_prompt")

        def encode(texts, is_negative):  # like diffusers, the negative prompt without clip_skip
            cond = self.prompt_encoder.encode(texts, clip_skip=None if is_negative else clip_skip)
            return self._place(cond, 1, "negative_prompt" if is_negative else "prompt")

        control = PromptSchedule(prompts, negatives, steps, n, encode)
        if zero:
            control.zero_uncond = control.text_at(0)["cond"].zeros_like()
        return control.text_at(0), control

    def _place(self, cond: TextCond, n: int, what: str) -> TextCond:
        """On the model's device and dtype, each prompt repeated n times; checked finite."""
        cond = cond.to(self.device, self.dtype)
        for t in (cond.embeds, cond.pooled):
            if t is not None:
                check_finite(t, f"text encoder ({what})", self.dtype)
        return cond.repeat(n)

    @property
    def prompt_syntax(self) -> str:
        """How prompt strings are read: "a1111" (default), "compel" or "none"."""
        return self.prompt_encoder.syntax

    @prompt_syntax.setter
    def prompt_syntax(self, value: str) -> None:
        self.prompt_encoder.syntax = value

    def _time_ids(self, ids: list, batch: int) -> torch.Tensor:
        proj_dim = self.text_encoders[-1].config.projection_dim
        expected = self.unet.add_embedding.linear_1.in_features
        if self.unet.config.addition_time_embed_dim * len(ids) + proj_dim != expected:
            raise ValueError(f"unet: expects an added embedding of {expected}, the text encoder gives "
                             f"{self.unet.config.addition_time_embed_dim * len(ids) + proj_dim}")
        return torch.tensor([ids], dtype=self.dtype, device=self.device).repeat(batch, 1)

    def _micro_conditioning(self, task: str, size: tuple, sdxl: dict, batch: int) -> tuple:
        """SDXL's added time ids for "cond" and "uncond" (None: the same as "cond"), by the
        rules of the reference pipeline for the task. A refiner takes 5 ids, the aesthetic
        score instead of the target size (``StableDiffusionXLImg2ImgPipeline``)."""
        original = tuple(sdxl["original_size"] or size)
        target = tuple(sdxl["target_size"] or size)
        crops, neg_crops = tuple(sdxl["crops_coords_top_left"]), tuple(sdxl["negative_crops_coords_top_left"])
        neg_original, neg_target = sdxl["negative_original_size"], sdxl["negative_target_size"]
        if self.info.refiner:
            cond = [*original, *crops, sdxl["aesthetic_score"]]
            uncond = [*(neg_original or original), *neg_crops, sdxl["negative_aesthetic_score"]]
            return self._time_ids(cond, batch), self._time_ids(uncond, batch)
        cond = self._time_ids([*original, *crops, *target], batch)
        if task in ("img2img", "inpaint"):  # negative sizes default to the positive ones; crops are the positive ones
            uncond = [*(neg_original or original), *crops, *(neg_target or target)]
            return cond, self._time_ids(uncond, batch)
        if neg_original is not None and neg_target is not None:
            return cond, self._time_ids([*neg_original, *neg_crops, *neg_target], batch)
        return cond, None

    # ------------------------------------------------------------------ latents
    def _encode_image(self, image: torch.Tensor, generator) -> torch.Tensor:
        """VAE-encode, sampling the posterior with the generator(s) as diffusers does."""
        image = image.to(self.device, self.vae.dtype)
        if isinstance(generator, (list, tuple)):
            parts = [self.vae.encode(image[i:i + 1]).sample(generator[i]) for i in range(image.shape[0])]
            latents = torch.cat(parts)
        else:
            latents = self.vae.encode(image).sample(generator)
        return self._scaled_latents(latents)

    def _scaled_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents (checked finite) in the UNet's space and dtype: shifted and scaled
        by the VAE's config (the inverse of :meth:`_decode`'s first step)."""
        check_finite(latents, "VAE encode (image)", self.vae.dtype)
        shift = self.vae.config.get("shift_factor") or 0.0
        return ((latents - shift) * self.vae.config.scaling_factor).to(LATENT_DTYPE)

    def _decode_wrapped(self, latents: torch.Tensor, pad: int) -> torch.Tensor:
        """Decode; with ``pad`` (circular panoramas) decode with ``pad`` latent columns wrapped
        around each side and cut them off again, so the left and right edges join seamlessly."""
        if not pad:
            return self._decode(latents)
        image = self._decode(torch.cat([latents[..., -pad:], latents, latents[..., :pad]], dim=-1))
        cut = pad * self.latent_factor
        return image[..., cut:-cut]

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
        latents = latents.to(self.vae.dtype)
        if mean is not None and std is not None:
            c = latents.shape[1]
            m = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(1, c, 1, 1)
            s = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(1, c, 1, 1)
            latents = latents * s / cfg.scaling_factor + m
        else:
            latents = latents / cfg.scaling_factor + (cfg.get("shift_factor") or 0.0)
        return self.vae.decode(latents)

    # ------------------------------------------------------------------ call
    @torch.no_grad()  # not inference_mode: gradient-based controls enable grad locally
    def __call__(
        self,
        prompt: Union[str, List[str]],
        negative_prompt: Union[str, List[str], None] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        scheduler: Optional[str] = None,
        generator=None,
        num_images_per_prompt: int = 1,
        image=None,
        strength: Optional[float] = None,
        mask_image=None,
        controls: Sequence[Control] = (),
        output_type: str = "pil",
        *,
        seed: Optional[int] = None,
        eta: Optional[float] = None,
        clip_skip: Optional[int] = None,
        callback: Optional[Callable[[int, torch.Tensor, torch.Tensor], Optional[bool]]] = None,
        prompt_2=None,
        negative_prompt_2=None,
        original_size: Optional[tuple] = None,
        target_size: Optional[tuple] = None,
        crops_coords_top_left: tuple = (0, 0),
        negative_original_size: Optional[tuple] = None,
        negative_target_size: Optional[tuple] = None,
        negative_crops_coords_top_left: tuple = (0, 0),
        aesthetic_score: Optional[float] = None,
        negative_aesthetic_score: Optional[float] = None,
        latents: Optional[torch.Tensor] = None,
        inversion: Optional[Inversion] = None,
    ) -> Output:
        """Generate images. Arguments left at None take the reference pipeline's default for
        this model family and task (:mod:`controldiff.defaults`: e.g. SDXL guidance 5.0,
        img2img strength 0.8, SDXL refiner aesthetic scores 6.0 / 2.5); ``out.settings``
        records the values used. Every argument is checked before any model runs.

        ``latents``: initial latents (txt2img), scaled by the scheduler's initial sigma as
        diffusers does. ``inversion``: start from ``pipe.invert(...)``'s latents, with its
        size, steps and scheduler (given values must agree)."""
        # ---- everything is checked first: no encoding, no allocation before this block ends
        prompts = _as_list(prompt, "prompt")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type: expected one of {OUTPUT_TYPES}, got {output_type!r}")
        positive_int(num_images_per_prompt, "num_images_per_prompt")
        sdxl = self.info.family == "sdxl"
        xl_only = dict(prompt_2=prompt_2, negative_prompt_2=negative_prompt_2, original_size=original_size,
                       target_size=target_size, aesthetic_score=aesthetic_score,
                       negative_aesthetic_score=negative_aesthetic_score)
        if not sdxl and any(v is not None for v in xl_only.values()):
            names = "/".join(k for k, v in xl_only.items() if v is not None)
            raise ValueError(f"{names}: only for SDXL models, this model is {self.info.family}")
        controls = list(controls)
        for c in controls:
            if not isinstance(c, Control):
                raise ValueError(f"controls: expected controldiff controls, got {type(c).__name__}")
        if self.info.kind == "inpaint" and mask_image is None:
            raise ValueError("mask_image: this is an inpainting model (9 input channels): pass image and mask_image")

        task = task_of(self.info.kind, image, mask_image)
        if (latents is not None or inversion is not None) and image is not None:
            raise ValueError(f"{'latents' if latents is not None else 'inversion'}: starts generation from "
                             "latents; image (img2img, inpainting) starts from an image: pass one")
        if latents is not None and inversion is not None:
            raise ValueError("latents, inversion: pass one of them, not both")
        if inversion is not None:
            if not isinstance(inversion, Inversion):
                raise ValueError(f"inversion: expected what pipe.invert() returns, got {type(inversion).__name__}")
            inversion.check(self, num_inference_steps, height, width, scheduler, len(prompts), num_images_per_prompt)
            num_inference_steps, height, width = inversion.num_inference_steps, inversion.height, inversion.width
            scheduler = inversion.scheduler
        if latents is not None:
            height, width = self._latents_size(latents, height, width)
            self._check_spread(latents, len(prompts) * num_images_per_prompt, "latents")
        d = defaults_for(self.info.family, task)
        steps = d.num_inference_steps if num_inference_steps is None else num_inference_steps
        positive_int(steps, "num_inference_steps")
        cfg = CFG(d.guidance_scale if guidance_scale is None else guidance_scale)
        eta = finite_number(d.eta if eta is None else eta, "eta")
        aesthetic = finite_number(d.aesthetic_score if aesthetic_score is None else aesthetic_score,
                                         "aesthetic_score")
        negative_aesthetic = finite_number(
            d.negative_aesthetic_score if negative_aesthetic_score is None else negative_aesthetic_score,
            "negative_aesthetic_score")

        batch = len(prompts) * num_images_per_prompt
        generator, seed = seeded(generator, seed, batch)

        if mask_image is not None and image is None:
            raise ValueError("mask_image: inpainting also needs image")
        if strength is not None and image is None:
            raise ValueError("strength: only meaningful with image (img2img or inpainting)")
        if image is not None:
            image = as_batch(image, "image", "image")
            if mask_image is not None:
                mask_image = as_batch(mask_image, "mask_image", "mask")
                mask_size = image_size(mask_image, "mask_image", "mask")
                if mask_size != image_size(image):
                    raise ValueError(f"mask_image: size {mask_size} (h, w) differs from image size {image_size(image)}")
            strength = default_strength(self.info.family, task) if strength is None else strength
            if not is_number(strength) or not 0.0 < strength <= 1.0:
                raise ValueError(f"strength: expected a value in (0, 1], got {strength!r}")
            strength = float(strength)
        height, width = self._default_size(height, width, image, controls)
        parse_budget(self.memory_budget, "pipe.memory_budget")
        check_fits(batch, height, width, self.vae.config.block_out_channels[0], self.vae.dtype.itemsize,
                   self.device, num_images_per_prompt)
        for name, value in (("prompt", prompts), ("negative_prompt", negative_prompt), ("prompt_2", prompt_2),
                            ("negative_prompt_2", negative_prompt_2)):
            self.prompt_encoder.check(value, name)
        schedule_steps = self._schedule_steps(prompts, negative_prompt, prompt_2, negative_prompt_2, steps)

        # timesteps
        sched = self.make_scheduler(scheduler) if inversion is None else inversion.make_scheduler(self)
        sched.set_timesteps(steps, device=self.device)
        timesteps = sched.timesteps
        cut = strength if image is not None else (inversion.strength if inversion is not None else None)
        if cut is not None:
            init = min(int(steps * cut), steps)
            t_start = max(steps - init, 0)
            if steps - t_start < 1:
                raise ValueError(f"strength: {strength} with {steps} steps leaves no step to run; "
                                 "raise strength or num_inference_steps")
            timesteps = timesteps[t_start * sched.order:]
            sched.set_begin_index(t_start * sched.order)

        # ---- the work
        if schedule_steps is None:
            text, schedule = self._encode_prompts(prompts, negative_prompt, prompt_2, negative_prompt_2, cfg.enabled,
                                                  num_images_per_prompt, clip_skip), None
        else:
            text, schedule = self._encode_schedule(prompts, negative_prompt, num_images_per_prompt, clip_skip,
                                                   schedule_steps)
        ctx = self._context(sched, timesteps, text, generator, num_images_per_prompt, height, width, cfg.scale)
        if sdxl:
            micro = dict(xl_only, crops_coords_top_left=crops_coords_top_left, aesthetic_score=aesthetic,
                         negative_aesthetic_score=negative_aesthetic, negative_original_size=negative_original_size,
                         negative_target_size=negative_target_size,
                         negative_crops_coords_top_left=negative_crops_coords_top_left)
            ctx.time_ids, ctx.uncond_time_ids = self._micro_conditioning(task, (height, width), micro, batch)

        if inversion is not None:
            latents, internal = self._repeat(inversion.latents.to(self.device, LATENT_DTYPE), batch, "inversion"), []
        elif latents is not None:
            latents, internal = self._repeat(latents.to(self.device, LATENT_DTYPE), batch, "latents"), []
            latents = latents * sched.init_noise_sigma
        else:
            latents, internal = self._prepare_latents(batch, height, width, image, mask_image, strength, timesteps,
                                                      sched, generator)
        step_kwargs = {"eta": eta} if eta else {}
        first = [] if schedule is None else [schedule]   # before CFG: it sets the step's texts and composes AND
        latents, done = self._run(ctx, latents, [*first, cfg, *internal, *controls], callback, step_kwargs)
        settings = dict(prompt=prompts, negative_prompt=negative_prompt, height=height, width=width, task=task,
                        steps=steps, guidance_scale=cfg.scale, scheduler=scheduler or sched.name, seed=seed,
                        strength=strength, eta=eta, clip_skip=clip_skip,
                        controls=[c.describe() for c in controls])
        if sdxl:
            settings.update(prompt_2=prompt_2, negative_prompt_2=negative_prompt_2)
            if self.info.refiner:
                settings.update(aesthetic_score=aesthetic, negative_aesthetic_score=negative_aesthetic)
        out = Output(latents, seed, done, done < len(timesteps), settings)
        if output_type == "latent":
            return out
        decoded = self._decode_wrapped(latents, ctx.decode_wrap)
        check_finite(decoded, "VAE decode", self.vae.dtype)
        out.images = postprocess(decoded.float(), output_type)
        return out

    def _context(self, sched, timesteps, text: dict, generator, n: int, height: int, width: int,
                 guidance_scale: float) -> Context:
        """What the controls of one run see (``n`` images per prompt)."""
        return Context(unet=self.unet, scheduler=sched, batch=text["cond"].embeds.shape[0], text=text,
                       generator=generator,
                       encode_prompt=lambda p: self._place(self.prompt_encoder.encode(_as_list(p, "prompt")), n,
                                                           "a control's prompt"),
                       vae=self.vae, info=self.info, height=height, width=width, timesteps=timesteps,
                       guidance_scale=guidance_scale, decoder=self._decode, encoder=self._encode_image,
                       tokenize=self.prompt_encoder.token_ids,
                       memory_budget=resolve_budget(self.memory_budget, self.device))

    def _run(self, ctx: Context, latents: torch.Tensor, controls: list, callback, step_kwargs: dict) -> tuple:
        """Set up the controls, check the UNet's input channels, run THE loop, tear down."""
        with _set_up(controls, ctx):
            extra = 0 if ctx.concat is None else ctx.concat.shape[1]
            if latents.shape[1] + extra != self.unet.config.in_channels:
                raise ValueError(f"controls: the UNet takes {self.unet.config.in_channels} input channels "
                                 f"({self.info.kind} model); the latents and controls give {latents.shape[1] + extra}")
            return sample(ctx, latents, ctx.timesteps, controls, callback=callback, progress=self.progress,
                          step_kwargs=step_kwargs)

    def _latents_size(self, latents, height, width) -> tuple[int, int]:
        """(height, width) in pixels that ``latents`` fit; given sizes must agree."""
        f, c = self.latent_factor, self.vae.config.latent_channels
        if not torch.is_tensor(latents) or latents.ndim != 4 or latents.shape[1] != c:
            shape = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
            raise ValueError(f"latents: expected a tensor (batch, {c}, height/{f}, width/{f}), got {shape}")
        if not bool(torch.isfinite(latents).all()):
            raise ValueError("latents: contains NaN or infinite values")
        size = (latents.shape[2] * f, latents.shape[3] * f)
        for name, given, fits in (("height", height, size[0]), ("width", width, size[1])):
            if given is not None and given != fits:
                raise ValueError(f"{name}: {given} does not fit latents of shape {tuple(latents.shape)} "
                                 f"({fits} pixels)")
        return size

    def _default_size(self, height, width, image, controls) -> tuple[int, int]:
        """Checked (height, width): given, else the image's, a control's or the model's size,
        rounded down to the latent factor (:mod:`controldiff.defaults`)."""
        f = self.latent_factor
        if image is not None:
            dh, dw = image_size(image)
        else:
            suggested = next((s for s in (c.default_size() for c in controls) if s is not None), None)
            dh, dw = self.default_size if suggested is None else suggested  # e.g. a ControlNet image's size
        height = dh - dh % f if height is None else height
        width = dw - dw % f if width is None else width
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % f:
                raise ValueError(f"{name}: expected a positive multiple of {f} (the VAE's latent factor), got {v!r}")
        return height, width

    def _prepare_latents(self, batch, height, width, image, mask_image, strength, timesteps, sched, generator):
        """Initial latents, plus the internal controls img2img/inpainting need."""
        shape = (batch, self.vae.config.latent_channels, height // self.latent_factor, width // self.latent_factor)
        if image is None:
            noise = randn_tensor(shape, generator, self.device, LATENT_DTYPE)
            return noise * sched.init_noise_sigma, []
        init_image = preprocess_image(image, height, width)
        t0 = timesteps[:1].repeat(batch)
        if mask_image is None:  # img2img
            if isinstance(generator, (list, tuple)) and init_image.shape[0] < batch:
                init_image = init_image.repeat(batch // init_image.shape[0], 1, 1, 1)
            image_latents = self._repeat(self._encode_image(init_image, generator), batch, "image")
            noise = randn_tensor(image_latents.shape, generator, self.device, LATENT_DTYPE)
            return sched.add_noise(image_latents, noise, t0), []

        concat = self.info.kind == "inpaint"
        image_latents = None
        if not concat or strength < 1.0:
            image_latents = self._repeat(self._encode_image(init_image, generator), batch, "image")
        noise = randn_tensor(shape, generator, self.device, LATENT_DTYPE)
        latents = noise * sched.init_noise_sigma if strength == 1.0 else sched.add_noise(image_latents, noise, t0)
        mask = preprocess_mask(mask_image, height, width)
        masked = init_image * (mask < 0.5)
        small = torch.nn.functional.interpolate(mask, size=shape[-2:]).to(self.device, LATENT_DTYPE)
        small = self._repeat(small, batch, "mask_image")
        if concat:
            masked_latents = self._repeat(self._encode_image(masked, generator), batch, "image")
            return latents, [InpaintConcat(small, masked_latents)]
        self._skip_draws(masked, generator)
        return latents, [InpaintBlend(small, image_latents, noise, timesteps)]

    def _skip_draws(self, images: torch.Tensor, generator) -> None:
        """Advance the generator(s) as encoding ``images`` would, without encoding.

        The reference also VAE-encodes the masked image for 4-channel inpainting and
        throws it away; drawing the same noise keeps seeds compatible for free.
        """
        f = self.latent_factor
        n, c = images.shape[0], self.vae.config.latent_channels
        shape = (c, images.shape[2] // f, images.shape[3] // f)
        if isinstance(generator, (list, tuple)):
            for i in range(n):
                randn_tensor((1, *shape), generator[i], self.device, self.vae.dtype)
        elif generator is not None:
            randn_tensor((n, *shape), generator, self.device, self.vae.dtype)

    @staticmethod
    def _check_spread(t: torch.Tensor, batch: int, name: str) -> None:
        if batch % t.shape[0]:
            raise ValueError(f"{name}: {t.shape[0]} images cannot be spread over a batch of {batch}")

    @classmethod
    def _repeat(cls, t: torch.Tensor, batch: int, name: str) -> torch.Tensor:
        if t.shape[0] == batch:
            return t
        cls._check_spread(t, batch, name)
        return t.repeat(batch // t.shape[0], 1, 1, 1)

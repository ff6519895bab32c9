"""The user-facing Pipeline: prepares the inputs, runs THE loop, decodes.

One class for SD1.x, SD2.x and SDXL, for txt2img, img2img and inpainting; every
other technique comes in through ``controls``.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Union

import torch

from . import schedulers
from .controls.cfg import CFG
from .controls.inpaint import InpaintBlend, InpaintConcat
from .loading.lora import LoraMixin
from .loading.single_file import SingleFileMixin
from .loading.textual_inversion import TextualInversionMixin
from .images import image_size, load_image, postprocess, preprocess_image, preprocess_mask
from .noise import randn_tensor
from .sampling.control import Context, Control
from .sampling.loop import sample
from .text.encode import PromptEncoder, TextCond, as_list as _as_list

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class Output:
    """What a call returns. ``images`` as asked by output_type; ``seed`` when one was used;
    ``cancelled`` when the callback stopped the loop after ``steps_done`` steps."""

    images: Any
    seed: Optional[int] = None
    steps_done: int = 0
    cancelled: bool = False
    settings: dict = field(default_factory=dict)


class Pipeline(LoraMixin, TextualInversionMixin, SingleFileMixin):
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

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype: torch.dtype = torch.float32, variant: Optional[str] = None) -> "Pipeline":
        """Load a diffusers-layout folder (the family is read from its configs), or a
        single-file checkpoint (see :meth:`from_single_file`)."""
        from .loading.folder import load_components

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

    def make_scheduler(self, name: Optional[str] = None):
        """A fresh scheduler: the model folder's own, or one by name built from its config."""
        if name is None:
            return schedulers.from_config(self.scheduler_config)
        return schedulers.create(name, self.scheduler_config)

    # ------------------------------------------------------------------ prompts
    def _encode_prompts(self, prompts, negative, prompts_2, negative_2, guided: bool, n: int, clip_skip) -> dict:
        # SDXL base models use zeros, not the empty prompt, when no negative prompt is given
        zero_negative = (self.info.family == "sdxl" and negative is None
                         and self.model_index.get("force_zeros_for_empty_prompt", True))
        text = self.prompt_encoder.encode_pair(prompts, negative, prompts_2, negative_2, guided=guided,
                                               zero_negative=zero_negative, clip_skip=clip_skip)
        return {k: self._place(v, n) for k, v in text.items()}

    def _place(self, cond: TextCond, n: int) -> TextCond:
        """On the model's device and dtype, each prompt repeated n times."""
        return cond.to(self.device, self.dtype).repeat(n)

    @property
    def prompt_syntax(self) -> str:
        """How prompt strings are read: "a1111" (default), "compel" or "none"."""
        return self.prompt_encoder.syntax

    @prompt_syntax.setter
    def prompt_syntax(self, value: str) -> None:
        self.prompt_encoder.syntax = value

    def _time_ids(self, size, crops, target, batch: int) -> torch.Tensor:
        ids = list(size) + list(crops) + list(target)
        proj_dim = self.text_encoders[-1].config.projection_dim
        expected = self.unet.add_embedding.linear_1.in_features
        if self.unet.config.addition_time_embed_dim * len(ids) + proj_dim != expected:
            raise ValueError(f"unet: expects an added embedding of {expected}, the text encoder gives "
                             f"{self.unet.config.addition_time_embed_dim * len(ids) + proj_dim}")
        return torch.tensor([ids], dtype=self.dtype, device=self.device).repeat(batch, 1)

    # ------------------------------------------------------------------ latents
    def _encode_image(self, image: torch.Tensor, generator) -> torch.Tensor:
        """VAE-encode, sampling the posterior with the generator(s) as diffusers does."""
        image = image.to(self.device, self.vae.dtype)
        if isinstance(generator, (list, tuple)):
            parts = [self.vae.encode(image[i:i + 1]).sample(generator[i]) for i in range(image.shape[0])]
            latents = torch.cat(parts)
        else:
            latents = self.vae.encode(image).sample(generator)
        sf = self.vae.config.scaling_factor
        shift = self.vae.config.get("shift_factor") or 0.0
        return ((latents - shift) * sf).to(self.dtype)

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
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
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
        eta: float = 0.0,
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
    ) -> Output:
        prompts = _as_list(prompt, "prompt")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type: expected one of {OUTPUT_TYPES}, got {output_type!r}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps: expected a positive integer, got {num_inference_steps!r}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt: expected a positive integer, got {num_images_per_prompt!r}")
        sdxl = self.info.family == "sdxl"
        if not sdxl and any(v is not None for v in (prompt_2, negative_prompt_2, original_size, target_size)):
            raise ValueError("prompt_2/negative_prompt_2/original_size/target_size: only for SDXL models, "
                             f"this model is {self.info.family}")
        controls = list(controls)
        for c in controls:
            if not isinstance(c, Control):
                raise ValueError(f"controls: expected controldiff controls, got {type(c).__name__}")

        # seeds and generators
        if generator is not None and seed is not None:
            raise ValueError("generator, seed: pass one of them, not both")
        if generator is None:
            if seed is None:
                seed = random.randrange(2**32)
            generator = torch.Generator("cpu").manual_seed(int(seed))

        # images, sizes, strength
        if mask_image is not None and image is None:
            raise ValueError("mask_image: inpainting also needs image")
        if strength is not None and image is None:
            raise ValueError("strength: only meaningful with image (img2img or inpainting)")
        if image is not None:
            image = load_image(image, "image")
            if mask_image is not None:
                mask_image = load_image(mask_image, "mask_image")
                if image_size(mask_image) != image_size(image):
                    raise ValueError(f"mask_image: size {image_size(mask_image)} (h, w) differs from image size "
                                     f"{image_size(image)}")
            strength = (1.0 if mask_image is not None else 0.8) if strength is None else float(strength)
            if not 0.0 < strength <= 1.0:
                raise ValueError(f"strength: expected a value in (0, 1], got {strength}")
            ih, iw = image_size(image)
            height = ih - ih % self.latent_factor if height is None else height
            width = iw - iw % self.latent_factor if width is None else width
        dh, dw = self.default_size
        suggested = next((s for s in (c.default_size() for c in controls) if s is not None), None)
        if suggested is not None:  # e.g. a ControlNet image's size, rounded down to the latent factor
            dh, dw = (v - v % self.latent_factor for v in suggested)
        height = dh if height is None else height
        width = dw if width is None else width
        f = self.latent_factor
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v <= 0 or v % f:
                raise ValueError(f"{name}: expected a positive multiple of {f} (the VAE's latent factor), got {v!r}")
        if self.info.kind == "inpaint" and mask_image is None:
            raise ValueError("mask_image: this is an inpainting model (9 input channels): pass image and mask_image")

        batch = len(prompts) * num_images_per_prompt
        cfg = CFG(guidance_scale)
        text = self._encode_prompts(prompts, negative_prompt, prompt_2, negative_prompt_2, cfg.enabled,
                                    num_images_per_prompt, clip_skip)

        # timesteps
        sched = self.make_scheduler(scheduler)
        sched.set_timesteps(num_inference_steps, device=self.device)
        timesteps = sched.timesteps
        if image is not None:
            init = min(int(num_inference_steps * strength), num_inference_steps)
            t_start = max(num_inference_steps - init, 0)
            timesteps = timesteps[t_start * sched.order:]
            sched.set_begin_index(t_start * sched.order)
            if num_inference_steps - t_start < 1:
                raise ValueError(f"strength: {strength} with {num_inference_steps} steps leaves no step to run; "
                                 "raise strength or num_inference_steps")

        ctx = Context(unet=self.unet, scheduler=sched, batch=batch, text=text, generator=generator,
                      encode=lambda p: self._place(self.prompt_encoder.encode(_as_list(p, "prompt")), num_images_per_prompt),
                      vae=self.vae, info=self.info, height=height, width=width)
        ctx.extras["guidance_scale"] = guidance_scale
        if sdxl:
            size = (height, width)
            ctx.time_ids = self._time_ids(original_size or size, crops_coords_top_left, target_size or size, batch)
            if negative_original_size is not None and negative_target_size is not None:
                ctx.extras["uncond_time_ids"] = self._time_ids(negative_original_size, negative_crops_coords_top_left,
                                                               negative_target_size, batch)

        latents, internal = self._prepare_latents(batch, height, width, image, mask_image, strength, timesteps,
                                                  sched, generator)
        all_controls: list[Control] = [cfg, *internal, *controls]
        for c in all_controls:
            c.setup(ctx)
        extra = 0 if ctx.concat is None else ctx.concat.shape[1]
        if latents.shape[1] + extra != self.unet.config.in_channels:
            raise ValueError(f"controls: the UNet takes {self.unet.config.in_channels} input channels "
                             f"({self.info.kind} model); the latents and controls give {latents.shape[1] + extra}")

        step_kwargs = {"eta": eta} if eta else {}
        latents, done = sample(ctx, latents, timesteps, all_controls, callback=callback, progress=self.progress,
                               step_kwargs=step_kwargs)
        cancelled = done < len(timesteps)
        settings = dict(prompt=prompts, negative_prompt=negative_prompt, height=height, width=width,
                        steps=num_inference_steps, guidance_scale=guidance_scale,
                        scheduler=scheduler or sched.name, seed=seed, strength=strength)
        if output_type == "latent":
            return Output(latents, seed, done, cancelled, settings)
        decoded = self._decode_wrapped(latents, ctx.extras.get("decode_wrap", 0))
        if torch.isnan(decoded).any():
            hint = ("try dtype=torch.float32, or a VAE made for float16" if self.dtype != torch.float32
                    else "check the weights and the controls' strengths")
            raise FloatingPointError(f"the decoded image contains NaN (dtype={self.dtype}): nothing was saved; {hint}")
        return Output(postprocess(decoded.float(), output_type), seed, done, cancelled, settings)

    def _prepare_latents(self, batch, height, width, image, mask_image, strength, timesteps, sched, generator):
        """Initial latents, plus the internal controls img2img/inpainting need."""
        shape = (batch, self.vae.config.latent_channels, height // self.latent_factor, width // self.latent_factor)
        if image is None:
            noise = randn_tensor(shape, generator, self.device, self.dtype)
            return noise * sched.init_noise_sigma, []
        init_image = preprocess_image(image, height, width)
        t0 = timesteps[:1].repeat(batch)
        if mask_image is None:  # img2img
            if isinstance(generator, (list, tuple)) and init_image.shape[0] < batch:
                init_image = init_image.repeat(batch // init_image.shape[0], 1, 1, 1)
            image_latents = self._repeat(self._encode_image(init_image, generator), batch, "image")
            noise = randn_tensor(image_latents.shape, generator, self.device, self.dtype)
            return sched.add_noise(image_latents, noise, t0), []

        concat = self.info.kind == "inpaint"
        image_latents = None
        if not concat or strength < 1.0:
            image_latents = self._repeat(self._encode_image(init_image, generator), batch, "image")
        noise = randn_tensor(shape, generator, self.device, self.dtype)
        latents = noise * sched.init_noise_sigma if strength == 1.0 else sched.add_noise(image_latents, noise, t0)
        mask = preprocess_mask(mask_image, height, width)
        masked = init_image * (mask < 0.5)
        small = torch.nn.functional.interpolate(mask, size=shape[-2:]).to(self.device, self.dtype)
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
    def _repeat(t: torch.Tensor, batch: int, name: str) -> torch.Tensor:
        if t.shape[0] == batch:
            return t
        if batch % t.shape[0]:
            raise ValueError(f"{name}: {t.shape[0]} images cannot be spread over a batch of {batch}")
        return t.repeat(batch // t.shape[0], 1, 1, 1)

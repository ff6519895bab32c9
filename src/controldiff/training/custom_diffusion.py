"""Custom Diffusion (Kumari et al. 2023): only the cross-attention key/value projections
trainable (``freeze_model="crossattn_kv"``; ``"crossattn"`` adds the query and output
projections), plus optional modifier tokens (``"<new1>+<new2>"``) learnt as textual
inversion embeddings. Saved in diffusers' format (``pytorch_custom_diffusion_weights.safetensors``
and ``<new1>.safetensors``), which ``pipe.load_custom_diffusion`` and diffusers load.

As diffusers' ``examples/custom_diffusion/train_custom_diffusion.py``: per instance image a
flip draw, then (``aug=True``, the script's default) a random scale, two thirds of the time
in ``[R/3, R]`` (the image placed at a random spot of a blank square, the caption prefixed
"a far away " or "very small " below 0.6 R), else in ``[1.2 R, 1.4 R)`` (a random R x R crop,
"zoomed in " or "close up "), drawn from numpy's global RNG as the script does; the loss
masked to the latents the image covers, less a one-latent border (``aug=False``: the whole
image resized to the square, the mask the grid without its border). With prior preservation
(``class_data``) each example is an instance and a class image (flip, shorter side resized,
center or random crop), the class images' loss plain MSE. The key/value of the first (BOS)
text token pass no gradient.

SDXL: diffusers has no SDXL script, so this follows the SD1 one. The trainable weights are the
same attn2 projections. The modifier tokens go into both tokenizers (``tokens.py``, shared with
textual inversion), and in each text encoder a token's row starts from its initializer's row
in that encoder. A token's file holds A1111's SDXL keys ``clip_l``/``clip_g``. The time ids are
built as diffusers' SDXL scripts build them: the image's size, the crop's (top, left) in the
resized image, and the resolution. That crop is the random crop of a zoomed-in draw, (0, 0) for
an image placed whole on the square (or resized to it), or a class image's crop.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..loading.custom_diffusion import WEIGHT_NAMES
from ..loading.textual_inversion import SDXL_KEYS
from .data import Example, read_folder
from .objective import Objective
from .prior import PriorObjective
from .tokens import NewTokens
from .transforms import ImageTransform

__all__ = ["CustomDiffusion", "FREEZE_MODELS", "LR"]

FREEZE_MODELS = ("crossattn_kv", "crossattn")
LR = 1e-5  # the script's --learning_rate default
#: diffusers registers the UNet's up blocks before its mid block: the script's processor order
_UNET_ORDER = {"down": 0, "up": 1, "mid": 2}
_PARAMS = {"to_k.weight": "to_k_custom_diffusion.weight", "to_v.weight": "to_v_custom_diffusion.weight",
           "to_q.weight": "to_q_custom_diffusion.weight", "to_out.0.weight": "to_out_custom_diffusion.0.weight",
           "to_out.0.bias": "to_out_custom_diffusion.0.bias"}


def _split(value: Optional[str], name: str) -> list[str]:
    if value is None:
        return []
    parts = value.split("+") if isinstance(value, str) else None
    if not parts or any(not p or p != p.strip() or len(p.split()) != 1 for p in parts):
        raise ValueError(f"{name}: expected '+'-separated words without spaces (e.g. '<new1>+<new2>'), got {value!r}")
    return parts


class _Instance(Example):
    """An instance image (the trainer adds class images as plain examples)."""


class Drawn(NamedTuple):
    """One example as the script's data set gives it."""

    pixels: torch.Tensor   # (3, R, R) in [-1, 1]
    caption: str
    mask: torch.Tensor     # (1, R/f, R/f): the latents the loss counts
    crop: tuple[int, int]  # (top, left) of the square in the resized image: SDXL's crop coordinates


def _flip(img: Image.Image, flip: bool) -> Image.Image:
    """The script's ``RandomHorizontalFlip(0.5 * hflip)``: one draw even without ``hflip``."""
    return img.transpose(Image.FLIP_LEFT_RIGHT) if torch.rand(1) < 0.5 * flip else img


@dataclass(frozen=True)
class ScriptData:
    """The script's ``CustomDiffusionDataset.__getitem__``, in its order of random draws."""

    resolution: int
    latent_factor: int
    flip: bool = False
    center_crop: bool = False  # the class images' crop
    aug: bool = True

    def __call__(self, example: Example, img: Image.Image) -> Drawn:
        img = _flip(img, self.flip)
        r = self.resolution
        factor = r // (r // self.latent_factor)
        if not isinstance(example, _Instance):  # a class image: mask unused (its loss is plain MSE)
            x, crop = ImageTransform(r, self.center_crop, False, "bilinear")(img)
            return Drawn(x, example.caption, torch.ones(1, r // factor, r // factor), crop)
        scale = r
        if self.aug:
            scale = np.random.randint(r // 3, r + 1) if np.random.uniform() < 0.66 else \
                np.random.randint(int(1.2 * r), int(1.4 * r))
        x, mask, crop = self._place(img, scale, factor)
        caption = example.caption
        if scale < 0.6 * r:
            caption = str(np.random.choice(["a far away ", "very small "])) + caption
        elif scale > r:
            caption = str(np.random.choice(["zoomed in ", "close up "])) + caption
        return Drawn(torch.from_numpy(x).permute(2, 0, 1), caption, torch.from_numpy(mask).float()[None], crop)

    def _place(self, img: Image.Image, scale: int, factor: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        """The script's ``preprocess``: ``img`` resized to ``scale`` and put at a random spot of the
        square (or the square cropped at random from it); the mask of the latents it covers; the
        crop's (top, left), (0, 0) for an image placed whole."""
        r, grid = self.resolution, self.resolution // factor
        outer, inner = (scale, r) if scale > r else (r, scale)
        top, left = np.random.randint(0, outer - inner + 1), np.random.randint(0, outer - inner + 1)
        x = (np.array(img.resize((scale, scale), resample=Image.BILINEAR)).astype(np.uint8) / 127.5 - 1.0)
        x = x.astype(np.float32)
        if scale > r:
            return x[top:top + r, left:left + r, :], np.ones((grid, grid)), (top, left)
        square, mask = np.zeros((r, r, 3), dtype=np.float32), np.zeros((grid, grid))
        square[top:top + scale, left:left + scale, :] = x
        mask[top // factor + 1:(top + scale) // factor - 1, left // factor + 1:(left + scale) // factor - 1] = 1.0
        return square, mask, (0, 0)


class MaskedObjective(Objective):
    """The script's loss: per image the squared error summed over the mask's latents (all
    channels), divided by the mask's size; the batch mean."""

    def loss(self, pred, target, timesteps, mask):
        loss = F.mse_loss(pred.float(), target.float(), reduction="none")
        return ((loss * mask).sum([1, 2, 3]) / mask.sum([1, 2, 3])).mean()


@dataclass
class _MaskedPrior(PriorObjective, MaskedObjective):
    """Prior preservation with the mask on the instances' loss."""


def _detach_first_token(module, inputs, output):
    """The script's ``detach`` of the first text token's key/value (forward unchanged)."""
    return torch.cat([output[:, :1].detach(), output[:, 1:]], dim=1)


class CustomDiffusion:
    """The Custom Diffusion method: what is trainable and what is saved."""

    name = "custom-diffusion"
    formats = ("diffusers",)
    lr = LR

    def __init__(self, modifier_token: Optional[str] = None, initializer_token: Optional[str] = "ktn+pll+ucd",
                 freeze_model: str = "crossattn_kv", aug: bool = True):
        if not isinstance(aug, bool):
            raise ValueError(f"aug: expected True or False, got {aug!r}")
        self.aug = aug  # the script's random-scale augmentation (its --noaug: False)
        self.tokens = _split(modifier_token, "modifier_token")
        inits = _split(initializer_token, "initializer_token") if self.tokens else []
        if len(inits) < len(self.tokens):
            raise ValueError(f"initializer_token: expected one '+'-separated word per modifier token "
                             f"({len(self.tokens)}), got {initializer_token!r}")
        if freeze_model not in FREEZE_MODELS:
            raise ValueError(f"freeze_model: expected one of {FREEZE_MODELS}, got {freeze_model!r}")
        self.initializers = inits[:len(self.tokens)]
        self.freeze_model = freeze_model
        self.train_text_encoder = bool(self.tokens)  # gradients flow through the text encoder
        self.params: dict[str, nn.Parameter] = {}    # "unet.SITE.to_k.weight" -> the parameter
        self.new_tokens = NewTokens(self.tokens, self.initializers, "modifier_token") if self.tokens else None
        self.hooks: list = []

    @classmethod
    def from_args(cls, args) -> "CustomDiffusion":
        """From ``controldiff train custom-diffusion`` arguments."""
        return cls(args.modifier_token, args.initializer_token or "ktn+pll+ucd", args.freeze_model, not args.noaug)

    def describe(self) -> dict:
        return {"method": self.name, "modifier_token": self.tokens, "initializer_token": self.initializers,
                "freeze_model": self.freeze_model, "aug": self.aug}

    # ------------------------------------------------------------------ data
    def read_data(self, model, config):
        """The examples, after checking the settings and tokens (before any weight is read)."""
        from ..loading.folder import read_configs

        for name, what in (("snr_gamma", "min-SNR weighting"), ("buckets", "aspect-ratio buckets"),
                           ("cache_latents", "latent cache (it draws a scale and a flip per image)")):
            if getattr(config, name) not in (None, False):
                raise ValueError(f"{name}: not supported with custom-diffusion (its script has no {what})")
        r, f = config.resolution, read_configs(model).info.latent_factor
        if self.aug and r // 3 < 3 * f:  # else a smallest image's mask can be empty: the script's loss 0/0
            raise ValueError(f"resolution: {r} is too small for the random-scale augmentation with this VAE "
                             f"(latent factor {f}): its smallest images ({r // 3} px) may cover no latent inside "
                             f"their border; pass a resolution of at least {9 * f} or aug=False (--noaug)")
        if self.new_tokens is not None:
            self.new_tokens.check(model)
        self.resolution = r
        self._data = ScriptData(r, f, config.flip, config.center_crop, self.aug)
        return [_Instance(e.path, e.caption, e.size) for e in read_folder(config.data, r, config.prompt)]

    def draw(self, example: Example, img: Image.Image) -> Drawn:
        """Its pixels, caption and loss mask (the script's; ``interpolation`` unused: bilinear)."""
        return self._data(example, img)

    def objective(self, objective: Objective) -> MaskedObjective:
        if isinstance(objective, PriorObjective):
            return _MaskedPrior(objective.scheduler, objective.snr_gamma, objective.noise_offset,
                                objective.prior_loss_weight)
        return MaskedObjective(objective.scheduler, objective.snr_gamma, objective.noise_offset)

    # ------------------------------------------------------------------ what is trainable
    def bind(self, components) -> None:
        self.components = components
        if self.new_tokens is not None:
            self.new_tokens.bind(components.tokenizers)

    def attach(self, roots: dict[str, nn.Module]) -> list[nn.Parameter]:
        """In the script's order of random draws: the resized token embeddings (SDXL: both
        encoders'), the processors' Linear inits (then loaded from the base weights), the VAE probe."""
        params = [] if self.new_tokens is None else self.new_tokens.attach(roots)
        unet = roots["unet"]
        sites = sorted(unet.attention_sites().items(), key=lambda kv: _UNET_ORDER[kv[1].site.block])
        names = ["to_k.weight", "to_v.weight"] + (["to_q.weight", "to_out.0.weight", "to_out.0.bias"]
                                                  if self.freeze_model == "crossattn" else [])
        for name, attn in sites:
            if attn.site.kind != "cross":
                continue
            self._consume_inits(attn)
            for n in names:
                p = attn.get_parameter(n)
                p.requires_grad_(True)
                self.params[f"{name}.{n}"] = p
                params.append(p)
            self.hooks += [attn.to_k.register_forward_hook(_detach_first_token),
                           attn.to_v.register_forward_hook(_detach_first_token)]
        vae = self.components.vae
        f, r = vae.latent_factor, self.resolution
        torch.randn(1, 3, r, r)  # the script probes the latent size: vae.encode(randn).latent_dist.sample()
        torch.randn(1, vae.config.latent_channels, r // f, r // f)
        return params

    def _consume_inits(self, attn) -> None:
        """Draw what the script's ``CustomDiffusionAttnProcessor(...)`` Linear inits draw."""
        q = self.freeze_model == "crossattn"
        for lin, bias in [(attn.to_k, False), (attn.to_v, False)] + ([(attn.to_q, False), (attn.to_out[0], True)]
                                                                       if q else []):
            nn.Linear(lin.in_features, lin.out_features, bias=bias)

    # ------------------------------------------------------------------ state (checkpoints)
    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"unet.{k}": p.detach().clone() for k, p in self.params.items()}
        return out if self.new_tokens is None else {**out, **self.new_tokens.state_dict()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], source: str) -> None:
        mine = self.state_dict()
        if set(mine) != set(state) or any(mine[k].shape != state[k].shape for k in mine):
            raise ValueError(f"resume: {source} holds other tensors than this run trains; "
                             "was it trained on another model or with other settings?")
        for k, p in self.params.items():
            p.copy_(state[f"unet.{k}"])
        if self.new_tokens is not None:
            self.new_tokens.load_state_dict(state)

    # ------------------------------------------------------------------ what is saved
    def diffusers_state(self) -> dict[str, torch.Tensor]:
        """``pytorch_custom_diffusion_weights`` as diffusers' ``save_attn_procs`` (safetensors) writes it."""
        out = {}
        for key, p in self.params.items():
            site, _, param = key.partition(".to_")
            out[f"{site}.processor.{_PARAMS['to_' + param]}"] = p.detach().float().cpu().contiguous()
        return out

    def save(self, output: Path, formats: Sequence[str], write) -> list[Path]:
        """The weights file; per modifier token ``<token>.safetensors``: ``{token: row}`` as the
        script (SD1/SD2), on SDXL A1111's ``{"clip_l": (1, width), "clip_g": (1, width_2)}``, the
        format ``pipe.load_textual_inversion`` (thus ``load_custom_diffusion``) and A1111 read."""
        files = [write(output / WEIGHT_NAMES[0], self.diffusers_state(), {"format": "pt"})]
        if self.new_tokens is not None:
            rows = self.new_tokens.rows()
            for i, token in enumerate(self.tokens):
                data = {token: rows[0][i]} if len(rows) == 1 else dict(zip(SDXL_KEYS, (r[i:i + 1] for r in rows)))
                files.append(write(output / f"{token}.safetensors", data, {"format": "pt"}))
        return files

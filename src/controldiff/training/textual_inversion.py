"""Textual inversion training: new token embeddings are learnt, everything else stays
frozen; saved as diffusers' ``learned_embeds.safetensors`` and as A1111/kohya embeddings.

As diffusers' ``examples/textual_inversion/textual_inversion.py`` (SDXL:
``textual_inversion_sdxl.py``): ``token``, ``token_1``, ... (``num_vectors``) are added to
every tokenizer, the text encoders' token embeddings are resized by transformers (whose
random init the global RNG follows, as in the script) and the new rows start as the
initializer token's. The script trains the whole embedding matrix and puts the other rows
back after each step; here only the new rows are parameters (the others are a frozen
tensor beside them), which gives the same rows: AdamW works element by element, and
nothing else reads the other rows' gradients (``max_grad_norm=None`` as the script; a norm
clip would see only the new rows).

Captions: an image without a ``.txt`` caption (and no ``prompt``) gets one of the script's
templates per draw (``random.choice``, as the script), "a photo of a {}" ... or, with
``learnable_property="style"``, "a painting in the style of {}" ...; a caption (file or
``prompt``) must contain the token, which is expanded to all its vectors as pipelines expand
it at inference. Images: the script's transform (center crop to a square on SD1/SD2 when
asked, resize to the square resolution, optional flip), ``transforms.py``'s RNG use.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..checks import positive_int
from ..loading.textual_inversion import SDXL_KEYS
from .data import Example, read_folder
from .checkpoint import atomic_path
from .tokens import NewTokens
from .transforms import INTERPOLATIONS

__all__ = ["TextualInversion", "TEMPLATES", "STYLE_TEMPLATES", "SquareTransform"]

#: the script's ``imagenet_templates_small``
TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)
#: the script's ``imagenet_style_templates_small``
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a cropped painting in the style of {}", "a good painting in the style of {}",
    "a close-up painting in the style of {}", "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}",
    "a large painting in the style of {}",
)
PROPERTIES = ("object", "style")
DIFFUSERS_FILES = ("learned_embeds.safetensors", "learned_embeds_2.safetensors")  # per text encoder, as the scripts
_NO_CAPTION = "\x00no caption\x00"  # read_folder's stand-in prompt; recognised by identity, never trained on


@dataclass(frozen=True)
class SquareTransform:
    """The scripts' image transform: ``(tensor (3, R, R) in [-1, 1], (top, left) = (0, 0))``.

    SD1/SD2 (``crop_first``): with ``center_crop`` the central square of the image, then a
    resize to R x R; SDXL: the resize to R x R, then its (no-op) crop. Without
    ``center_crop`` the whole image is resized to the square, as the scripts do."""

    resolution: int
    center_crop: bool = False
    flip: bool = False
    interpolation: str = "bicubic"
    crop_first: bool = True

    @property
    def random(self) -> bool:
        return self.flip

    def resized(self, w: int, h: int) -> tuple[int, int]:
        return self.resolution, self.resolution

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        r = self.resolution
        if self.center_crop and self.crop_first:
            arr = np.array(img).astype(np.uint8)
            h, w = arr.shape[:2]
            crop = min(h, w)
            img = Image.fromarray(arr[(h - crop) // 2:(h + crop) // 2, (w - crop) // 2:(w + crop) // 2])
        img = img.resize((r, r), resample=INTERPOLATIONS[self.interpolation])
        if self.flip and torch.rand(1) < 0.5:  # transforms.RandomHorizontalFlip(p=0.5)
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        x = (np.array(img).astype(np.uint8) / 127.5 - 1.0).astype(np.float32)
        return torch.from_numpy(x).permute(2, 0, 1), (0, 0)


class TextualInversion:
    """The textual inversion method: trainable ``num_vectors`` embedding rows of ``token``
    per text encoder, initialised from ``initializer_token`` (one token); what is saved.
    ``repeats``: the script's data repetition, which sets its data order (default 100)."""

    name = "textual-inversion"
    train_text_encoder = True  # gradients flow through the (frozen) text encoders, in train mode as the script

    def __init__(self, token: Optional[str], initializer_token: Optional[str], num_vectors: int = 1,
                 learnable_property: str = "object", repeats: int = 100):
        if not isinstance(token, str) or not token or token != token.strip() or len(token.split()) != 1:
            raise ValueError(f"token: expected the placeholder token, one word without spaces (--token, e.g. "
                             f"'<cat-toy>'), got {token!r}")
        if not isinstance(initializer_token, str) or not initializer_token.strip():
            raise ValueError(f"initializer_token: expected a word of one token whose embedding starts the new "
                             f"ones (--initializer-token, e.g. 'toy'), got {initializer_token!r}")
        positive_int(num_vectors, "num_vectors")
        positive_int(repeats, "repeats")
        if learnable_property not in PROPERTIES:
            raise ValueError(f"learnable_property: expected one of {PROPERTIES}, got {learnable_property!r}")
        self.token, self.initializer_token = token, initializer_token
        self.num_vectors, self.learnable_property, self.repeats = num_vectors, learnable_property, repeats
        self.tokens = [token] + [f"{token}_{i}" for i in range(1, num_vectors)]
        self.templates = STYLE_TEMPLATES if learnable_property == "style" else TEMPLATES
        self.new_tokens = NewTokens(self.tokens, [initializer_token] * num_vectors, "token")

    @classmethod
    def from_args(cls, args) -> "TextualInversion":
        """From ``controldiff train textual-inversion`` arguments."""
        return cls(args.token, args.initializer_token, args.num_vectors, args.learnable_property)

    @property
    def placeholder(self) -> str:
        """The token as captions spell it for the tokenizer: all its vectors."""
        return " ".join(self.tokens)

    def describe(self) -> dict:
        return {"method": self.name, "token": self.token, "initializer_token": self.initializer_token,
                "num_vectors": self.num_vectors, "learnable_property": self.learnable_property,
                "repeats": self.repeats}

    # ------------------------------------------------------------------ data
    def read_data(self, model, config) -> list[Example]:
        """The training examples (caption None: a template per draw), ``repeats`` times as
        the script's dataset (its data order), after checking the tokens against the model's
        tokenizers: errors come before any weight is read."""
        self.new_tokens.check(model)
        if config.prompt is not None and self.token not in config.prompt:
            raise ValueError(f"prompt: {config.prompt!r} does not contain the token {self.token!r} (a caption "
                             "without it trains nothing)")
        examples = []
        for e in read_folder(config.data, config.resolution,
                             _NO_CAPTION if config.prompt is None else config.prompt):
            if e.caption is _NO_CAPTION:
                examples.append(Example(e.path, None, e.size))
                continue
            if self.token not in e.caption:
                where = "prompt" if e.caption is config.prompt else str(e.path.with_suffix(".txt"))
                raise ValueError(f"{where}: the caption {e.caption!r} does not contain the token {self.token!r} "
                                 "(a caption without it trains nothing); add it or delete the caption to train "
                                 "on the script's templates")
            examples.append(Example(e.path, e.caption.replace(self.token, self.placeholder), e.size))
        return examples * self.repeats

    def transform(self, config, sdxl: bool) -> SquareTransform:
        return SquareTransform(config.resolution, config.center_crop, config.flip, config.interpolation,
                               crop_first=not sdxl)

    def caption(self, example: Example) -> str:
        if example.caption is None:
            return random.choice(self.templates).format(self.placeholder)
        return example.caption

    # ------------------------------------------------------------------ what is trainable
    def bind(self, components) -> None:
        """Add the tokens to the run's tokenizers (the trainer calls it before :meth:`attach`)."""
        self.new_tokens.bind(components.tokenizers)

    def attach(self, roots: dict[str, nn.Module]) -> list[nn.Parameter]:
        """The tokens' rows in each text encoder, started at the initializer's (``tokens.py``)."""
        return self.new_tokens.attach(roots)

    # ------------------------------------------------------------------ state (checkpoints)
    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.new_tokens.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], source: str) -> None:
        mine = self.state_dict()
        if set(mine) != set(state) or any(mine[k].shape != state[k].shape for k in mine):
            raise ValueError(f"resume: {source} holds other embeddings ({ {k: tuple(v.shape) for k, v in state.items()} }) "
                             f"than this run trains ({ {k: tuple(v.shape) for k, v in mine.items()} })")
        self.new_tokens.load_state_dict(state)

    # ------------------------------------------------------------------ what is saved
    def file_name(self) -> str:
        """The A1111 file name: A1111 names an embedding (its prompt word) by its file."""
        return re.sub(r"[^\w.-]", "", self.token) or "embedding"

    def save(self, output: Path, formats: Sequence[str], write) -> list[Path]:
        """``diffusers``: ``learned_embeds.safetensors`` ({token: rows}; SDXL's second encoder
        in ``learned_embeds_2.safetensors``, as the SDXL script). ``kohya``: the A1111 files
        kohya's scripts also write, ``NAME.safetensors`` (``emb_params``; SDXL ``clip_l`` and
        ``clip_g``) and on SD1/SD2 ``NAME.pt`` (``string_to_param``)."""
        vectors = self.new_tokens.rows()
        files = []
        if "diffusers" in formats:
            for name, v in zip(DIFFUSERS_FILES, vectors):
                files.append(write(output / name, {self.token: v}, {"format": "pt"}))
        if "kohya" in formats:
            name = self.file_name()
            if len(vectors) == 2:
                files.append(write(output / f"{name}.safetensors", dict(zip(SDXL_KEYS, vectors)),
                                   {"format": "pt"}))
            else:
                files.append(write(output / f"{name}.safetensors", {"emb_params": vectors[0]}, {"format": "pt"}))
                files.append(_save_pt(output / f"{name}.pt", {
                    "string_to_token": {"*": 265}, "string_to_param": {"*": vectors[0]}, "name": self.token}))
        return files


def _save_pt(path: Path, data: dict) -> Path:
    """``torch.save`` through a temporary file renamed when complete."""
    return atomic_path(path, lambda tmp: torch.save(data, tmp))

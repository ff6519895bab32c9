"""CLIP guidance, as diffusers' community ``CLIPGuidedStableDiffusion``.

Each step the "cond" branch is run again with gradients (one extra UNet call), its x0
decoded, the image (random cutouts, or resized) embedded by a CLIP model and compared
with the prompt's CLIP text embedding (spherical distance). With g the gradient of
``-scale * loss`` with respect to the model input x (= alpha * x0 + sigma * eps), both of
the reference's updates move x0 by ``sigma**2 / alpha * g``; which one runs follows what the
scheduler keeps as latents, the line the reference draws between its schedulers:

- latents = x (DDIM, PNDM, DPM-Solver, UniPC, DDPM): the prediction changes, eps' = eps -
  sigma * g, and the decoded latents are the reference's blend ``sigma * x0 + (1 - sigma) * x``;
- k-diffusion latents x / alpha (LMS, Euler, Euler a, Heun): the latents move by
  ``sigma**2 / alpha * g`` (= k**2 * the latents' gradient), the prediction stays and x0 is
  decoded. The move is added after the scheduler step, which is the reference's move before
  it for steps of the form ``latents + f(eps)`` (LMS, Euler, Euler a; Heun's full step keeps
  the move of its second half, moving before would keep its first's). before_step could not do
  it as the reference does: the model's prediction must still see the unmoved latents.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..checks import finite_number, is_number, positive_int
from ..sampling.control import Control
from ..schedulers.base import KSigmaScheduler
from ..text.encode import as_list
from ..text.tokens import NO_TOKEN

# OpenAI CLIP's image normalisation (the OpenAI and LAION CLIP image processors use it)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def spherical_dist_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared great-circle distance between the directions of x and y (the reference's)."""
    x = F.normalize(x, dim=-1)
    y = F.normalize(y, dim=-1)
    return (x - y).norm(dim=-1).div(2).arcsin().pow(2).mul(2)


def make_cutouts(images: torch.Tensor, size: int, n: int, generator=None) -> torch.Tensor:
    """``n`` random square crops of every image, each pooled to ``size`` (cutout-major: n * B
    rows). The random numbers are drawn as the reference's ``MakeCutouts`` draws them (from
    torch's global generator when ``generator`` is None)."""
    side_y, side_x = images.shape[2:4]
    max_size = min(side_x, side_y)
    min_size = min(side_x, side_y, size)
    cutouts = []
    for _ in range(n):
        s = int(torch.rand([], generator=generator) * (max_size - min_size) + min_size)
        ox = int(torch.randint(0, side_x - s + 1, (), generator=generator))
        oy = int(torch.randint(0, side_y - s + 1, (), generator=generator))
        cutouts.append(F.adaptive_avg_pool2d(images[:, :, oy:oy + s, ox:ox + s], size))
    return torch.cat(cutouts)


def resize_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """The short side to ``size`` as torchvision's ``Resize(size)`` (bilinear, antialiased; the
    reference's path without cutouts), then the centre ``size`` x ``size`` (CLIP's input)."""
    h, w = images.shape[-2:]
    nh, nw = (int(size * h / w), size) if w <= h else (size, int(size * w / h))
    if (nh, nw) != (h, w):
        images = F.interpolate(images, size=[nh, nw], mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - size + 1) // 2, (nw - size + 1) // 2
    return images[..., top:top + size, left:left + size]


def load_clip(folder) -> torch.nn.Module:
    """A transformers CLIPModel from a folder, from safetensors only (no pickles are read)."""
    from transformers import CLIPModel

    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"clip_model: expected a CLIPModel or a model folder, got {str(folder)!r} (not a folder)")
    config = path / "config.json"
    kind = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    if kind != "clip":
        raise ValueError(f"clip_model: {str(folder)!r} holds no CLIPModel (config.json model_type {kind!r}, "
                         "expected 'clip': text and vision towers with their projections)")
    if not any(path.glob("*.safetensors")):
        raise ValueError(f"clip_model: {str(folder)!r} has no .safetensors weights; pickled weights "
                         "(.bin, .pt) are not loaded (they can run code): convert them to safetensors")
    return CLIPModel.from_pretrained(str(path), use_safetensors=True).eval().requires_grad_(False)


def _normalisation(folder, mean, std) -> tuple[list, list]:
    """(mean, std): given, else the folder's image processor's, else OpenAI CLIP's."""
    saved = {}
    if folder is not None and (Path(folder) / "preprocessor_config.json").is_file():
        saved = json.loads((Path(folder) / "preprocessor_config.json").read_text())
    out = []
    for name, value, default in (("image_mean", mean, CLIP_MEAN), ("image_std", std, CLIP_STD)):
        value = value if value is not None else saved.get(name, default)
        if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(is_number(v) for v in value)) \
                or (name == "image_std" and min(value) <= 0):
            raise ValueError(f"{name}: expected 3 finite numbers (one per RGB channel)"
                             f"{', all > 0' if name == 'image_std' else ''}, got {value!r}")
        out.append([float(v) for v in value])
    return out[0], out[1]


def _check_projections(model) -> None:
    """Text and image features must live in one space of ``projection_dim`` numbers."""
    cfg = model.config
    for name, proj, width in (("text", model.text_projection, cfg.text_config.hidden_size),
                              ("visual", model.visual_projection, cfg.vision_config.hidden_size)):
        if (proj.in_features, proj.out_features) != (width, cfg.projection_dim):
            raise ValueError(f"clip_model: its {name}_projection maps {proj.in_features} -> {proj.out_features} "
                             f"features; expected its pooled width {width} -> projection_dim {cfg.projection_dim}")


class CLIPGuidance(Control):
    """Guide towards ``prompt`` with CLIP: None, each image's generation prompt (``prompt``,
    not ``prompt_2``); a string, every image; a list, one per generation prompt.

    ``clip_model``: a transformers ``CLIPModel`` (run on its own device) or its folder (loaded
    from safetensors, moved to the pipeline's device). The CLIP text model reads the
    generation model's (first) tokenizer's tokens, as the reference; it must share that
    vocabulary (SD1/SD2/SDXL tokenizers all use CLIP's). ``image_mean``/``image_std``: the
    image normalisation; default the folder's ``preprocessor_config.json``, else OpenAI
    CLIP's. Images are cut to the vision model's ``image_size``. ``generator``: for the
    cutouts' random sizes and places (None: torch's global generator, as the reference).
    The loss is each image's mean over its cutouts, summed over images (the reference
    averages over the batch without cutouts: the same for one image).
    """

    def __init__(self, clip_model, prompt: Union[str, Sequence[str], None] = None, scale: float = 100.0,
                 num_cutouts: int = 4, use_cutouts: bool = True, *, image_mean=None, image_std=None,
                 generator: Optional[torch.Generator] = None):
        from transformers import CLIPModel

        self.scale = finite_number(scale, "scale", minimum=0)
        self.num_cutouts = positive_int(num_cutouts, "num_cutouts")
        if not isinstance(use_cutouts, bool):
            raise ValueError(f"use_cutouts: expected True or False, got {use_cutouts!r}")
        self.use_cutouts = use_cutouts
        self.prompt = None if prompt is None else as_list(prompt, "prompt")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator: expected None or a torch.Generator, got {type(generator).__name__}")
        self.generator = generator
        folder = clip_model if isinstance(clip_model, (str, os.PathLike)) else None
        if folder is not None:
            self.model, self._owned = load_clip(folder), True
        elif isinstance(clip_model, CLIPModel):
            self.model, self._owned = clip_model, False
        else:
            raise ValueError(f"clip_model: expected a transformers CLIPModel or its folder, got {type(clip_model).__name__}")
        _check_projections(self.model)
        self.clip_model = str(folder) if folder is not None else clip_model
        self.image_mean, self.image_std = _normalisation(folder, image_mean, image_std)
        self.size = self.model.config.vision_config.image_size
        self._text: Optional[torch.Tensor] = None   # (batch, projection_dim), unit length
        self._k = False                              # the scheduler keeps k-diffusion latents
        self._shift = None                           # k-diffusion latents: the move after this step
        self._canvas = None                          # the latents' shape (views add their moves into it)

    # ------------------------------------------------------------------ setup
    def setup(self, ctx):
        if self.scale == 0:
            return
        if self._owned:
            self.model.to(ctx.device, ctx.dtype)
        self._k = isinstance(ctx.scheduler, KSigmaScheduler)
        rows = self._prompt_tokens(ctx)
        with torch.no_grad():
            features = self.model.get_text_features(self._frame(rows)).pooler_output.float()
        self._text = features / features.norm(p=2, dim=-1, keepdim=True)

    def teardown(self, ctx):
        self._text, self._shift, self._canvas = None, None, None

    def _prompt_tokens(self, ctx) -> list[list[int]]:
        """Per latent row, the prompt's tokens (no BOS/EOS) from the generation tokenizer."""
        if self.prompt is None:
            ids = ctx.text["cond"].ids
            if ids is None:
                raise ValueError("CLIPGuidance: prompt=None reads the generation prompt's tokens, "
                                 "which this context does not keep; pass prompt=")
            return [[t for t in row if t != NO_TOKEN] for row in ids.tolist()]
        if ctx.tokenize is None:
            raise ValueError("CLIPGuidance: this context has no tokenizer for prompt=")
        if ctx.batch % len(self.prompt):
            raise ValueError(f"prompt: got {len(self.prompt)} prompts for a batch of {ctx.batch} images "
                             "(one prompt, or one per generation prompt)")
        each = ctx.batch // len(self.prompt)
        return [ctx.tokenize(p) for p in self.prompt for _ in range(each)]

    def _frame(self, rows: list[list[int]]) -> torch.Tensor:
        """BOS + tokens (truncated to the text model's window) + EOS, padded with EOS (the
        causal text model pools at the first EOS, so the padding changes nothing)."""
        cfg = self.model.config.text_config
        vocab = cfg.vocab_size
        # transformers' legacy configs (eos_token_id 2, as OpenAI's) pool at the largest id: CLIP's
        # BPE vocabularies end with <|startoftext|>, <|endoftext|>
        bos, eos = (vocab - 2, vocab - 1) if cfg.eos_token_id == 2 else (cfg.bos_token_id, cfg.eos_token_id)
        body = cfg.max_position_embeddings - 2
        framed = [[bos, *r[:body], eos] for r in rows]
        top = max(max(r) for r in framed)
        if top >= vocab:
            raise ValueError(f"clip_model: its text model has {vocab} tokens, the prompt has token id {top}; "
                             "it must share the generation model's tokenizer vocabulary")
        length = max(len(r) for r in framed)
        ids = [r + [eos] * (length - len(r)) for r in framed]
        return torch.tensor(ids, device=self.model.device)

    # ------------------------------------------------------------------ each step
    def before_step(self, ctx, step, latents):
        self._canvas = latents.shape
        return latents

    def combine(self, ctx, step, preds, pred):
        if self.scale == 0:
            return pred
        call = step.call
        rows = call.rows("cond")
        channels = preds["cond"].shape[1]
        x = call.x[rows, :channels]
        alpha, sigma = (torch.as_tensor(v, device=x.device, dtype=x.dtype) for v in (step.alpha, step.sigma))
        g = self._gradient(ctx, step, call, rows, x, sigma)
        if not self._k:
            x0, eps = step.x0_eps(pred, x)
            return step.to_prediction(x0 + sigma**2 / alpha * g, eps - sigma * g)
        self._add_shift(call, sigma**2 / alpha * g)
        return pred

    def after_step(self, ctx, step, latents):
        shift, self._shift = self._shift, None
        if shift is None:
            return latents
        if isinstance(shift, tuple):   # per view, averaged where views overlap (as MultiDiffusion merges)
            value, count = shift
            shift = torch.where(count > 0, value / count.clamp(min=1), value)
        return latents + shift

    def _add_shift(self, call, shift):
        if call.views is None:
            self._shift = shift
            return
        if self._shift is None:
            canvas = torch.zeros(self._canvas, device=shift.device, dtype=shift.dtype)
            self._shift = (canvas, torch.zeros_like(canvas))
        value, count = self._shift
        for view, part in zip(call.views, shift.chunk(len(call.views))):
            view.add_into(value, part)
            view.add_into(count, torch.ones_like(part))

    def _gradient(self, ctx, step, call, rows, x, sigma) -> torch.Tensor:
        """-d(scale * loss)/dx through the cond prediction, the VAE decoder and CLIP."""
        text, time_ids, extra = call.branch_inputs("cond")
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            inp = torch.cat([x, call.x[rows, x.shape[1]:]], dim=1) if call.x.shape[1] > x.shape[1] else x
            out = ctx.run_unet(inp, step.t, text, time_ids=time_ids, **extra)
            x0, _ = step.x0_eps(out, x)
            target = x0 if self._k else x0 * sigma + x * (1 - sigma)
            loss = self._loss(ctx.decode(target)) * self.scale
            return -torch.autograd.grad(loss, x)[0]

    def _loss(self, images: torch.Tensor) -> torch.Tensor:
        """Spherical distance of each image (its cutouts' mean) to its prompt, summed over images."""
        images = (images / 2 + 0.5).clamp(0, 1)
        n = self.num_cutouts if self.use_cutouts else 1
        images = make_cutouts(images, self.size, n, self.generator) if self.use_cutouts \
            else resize_square(images, self.size)
        mean = torch.tensor(self.image_mean, device=images.device, dtype=images.dtype).view(-1, 1, 1)
        std = torch.tensor(self.image_std, device=images.device, dtype=images.dtype).view(-1, 1, 1)
        images = ((images - mean) / std).to(self.model.device, self.model.dtype)
        features = self.model.get_image_features(images).pooler_output.float()
        features = features / features.norm(p=2, dim=-1, keepdim=True)
        text = self._text.repeat(features.shape[0] // self._text.shape[0], 1)  # views, then cutouts
        return spherical_dist_loss(features, text.to(features.device)).view(n, -1).mean(0).sum()


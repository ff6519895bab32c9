"""Pix2Pix-Zero (Parmar et al. 2023), as diffusers' ``StableDiffusionPix2PixZeroPipeline``.

Edits an image regenerated from its inversion (``pipe(caption, inversion=inv)``): the
caption's embedding moves by ``mean(target) - mean(source)`` while the cross-attention
maps are pulled towards those of the unedited regeneration, the *reference pass*. The
reference runs that regeneration to the end first, keeping every step's maps (on the CPU),
then the edit. Here both run in lockstep: each step, before the scheduler step,

1. the reference latents (this control's copy, stepped by its own scheduler copy) are
   evaluated with the original caption, reading the maps at every cross-attention site;
2. a gradient pass on the edit latents with the edited caption (cut short after the last
   cross-attention site) gives the loss ``sum over sites of mean over rows and heads of
   ||A - A_ref||^2`` and the model input moves by ``-cross_attention_guidance_amount * grad``;
3. the loop's own call evaluates the moved input with the edited caption (CFG and every
   other control act here) and steps the scheduler.

So only one step's maps ever exist, the maps are read only where and for the rows needed,
and no gradient is taken for the weights. ``amount = 0`` skips steps 1 and 2 (they would
change nothing): the edit is then the embedding move alone.

Kept from the reference: each classifier-free-guidance half of the model input moves by
its own rows' gradient; this step's conditional prediction uses the moved conditional
half, and the trajectory continues from the moved unconditional half
(``x_in.chunk(2)[0]``); the loss is computed in the model input (``scale_model_input``).

Fixed (the reference is right for one image with CFG only, where both agree): the
direction moves every image's caption (the reference adds it to row 1 of
``[negative; caption]`` embeddings: image 2's negative prompt in a batch, nothing without
CFG); each image's loss is averaged over its own rows, so it moves as it would alone (the
reference's mean over the batch divides the step by the batch size); without CFG every
image continues from its own latents (the reference's ``chunk(2)[0]`` carries image 1's
forward for all); the moved input is mapped back to latents (the reference continues from
the scaled input, shrinking sigma-scaled latents every step); a stochastic step draws the
same noise in both passes, so the reference pass is the plain regeneration.

The reference pass is the plain text-conditioned (CFG) regeneration: other controls act
on the edit pass only. List Pix2PixZero before controls that add inputs to the model call
computed from its latents (ControlNet): it moves the conditional rows' input they read.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence, Union

import torch

from ..checks import finite_number
from ..sampling.control import Control, crop_views, default_processor
from .prompt_schedule import PromptSchedule
from ..text.encode import TextCond, check_text

Prompts = Union[str, Sequence[str], torch.Tensor]


class _LastSite(Exception):
    """Raised after the last cross-attention site of the loss pass: the rest of the UNet
    does not change the loss."""


def _check_side(value, name: str):
    """A prompt, a list of prompts, or (prompts, tokens, width) embeddings."""
    if isinstance(value, str):
        return check_text(value, name)
    if isinstance(value, (list, tuple)):
        if not value or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{name}: expected a prompt, a non-empty list of prompts or an embedding tensor, "
                             f"got {value!r}")
        return [check_text(v, name) for v in value]
    if torch.is_tensor(value):
        if value.ndim != 3 or 0 in value.shape or not value.is_floating_point():
            raise ValueError(f"{name}: expected float embeddings (prompts, tokens, width), e.g. (1, 77, 768) as "
                             f"diffusers' get_embeds returns, got a {value.dtype} tensor of shape {tuple(value.shape)}")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name}: the embeddings contain NaN or infinite values")
        return value
    raise ValueError(f"{name}: expected a prompt, a non-empty list of prompts or an embedding tensor, "
                     f"got {type(value).__name__}")


def attention_sites(unet) -> list[str]:
    """The UNet's cross-attention sites (``attn2`` with text keys): where the maps are read."""
    return [n for n, a in unet.attention_sites().items() if a.site.kind == "cross" and a.is_cross_attention]


def _reading(name: str, on_map, stop: Optional[str] = None):
    """A processor wrap for site ``name``: ``on_map(name, probs)`` with the rows' maps
    (B, heads, Nq, Nk); the output is the inner processor's (one projection when the inner
    one is the default computation, so the output equals it bit for bit)."""
    def wrap(inner):
        def read(attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
            if inner is default_processor:
                q, k, v = attn.project_qkv(hidden_states, encoder_hidden_states)
            else:
                q = attn.split_heads(attn.to_q(hidden_states))
                k = attn.split_heads(attn.to_k(encoder_hidden_states))
            on_map(name, attn.probs(q, k, attention_mask))
            if name == stop:
                raise _LastSite
            if inner is default_processor:
                return attn.project_out(attn.attend(q, k, v, attention_mask))
            return inner(attn, hidden_states, encoder_hidden_states, attention_mask)
        return read
    return wrap


class Pix2PixZero(Control):
    """``source`` / ``target``: a prompt, a list of prompts (their embeddings averaged) or
    embeddings (prompts, tokens, width) averaged over the first axis, as the reference's
    ``source_embeds`` / ``target_embeds``. ``cross_attention_guidance_amount``: the step
    size of the attention-map loss (v-prediction models need about 0.01 or less).

    ``losses`` holds each step's attention loss (before its update), for inspection."""

    def __init__(self, source: Prompts, target: Prompts, cross_attention_guidance_amount: float = 0.1):
        self.source = _check_side(source, "source")
        self.target = _check_side(target, "target")
        self.cross_attention_guidance_amount = finite_number(
            cross_attention_guidance_amount, "cross_attention_guidance_amount", 0.0)
        tensors = [v for v in (self.source, self.target) if torch.is_tensor(v)]
        if len(tensors) == 2 and tensors[0].shape[1:] != tensors[1].shape[1:]:
            raise ValueError(f"source, target: embeddings of shape {tuple(tensors[0].shape)} and "
                             f"{tuple(tensors[1].shape)} differ in tokens or width")
        self.losses: list[torch.Tensor] = []
        self._original: Optional[TextCond] = None

    @property
    def guided(self) -> bool:
        return self.cross_attention_guidance_amount > 0

    # ------------------------------------------------------------------ setup
    def setup(self, ctx):
        if any(isinstance(c, PromptSchedule) for c in ctx.controls):
            raise ValueError("controls: Pix2PixZero edits the prompt's embedding once; it does not combine with "
                             "A1111 prompt editing, alternation or AND (the prompt changes per step)")
        self.losses = []
        self._sites = attention_sites(ctx.unet)
        if self.guided and not self._sites:
            raise ValueError("controls: Pix2PixZero reads cross-attention maps, and this UNet has no "
                             "cross-attention (attn2) site")
        cond = ctx.text["cond"]
        source, target = self._embeds(ctx, self.source, "source"), self._embeds(ctx, self.target, "target")
        length = max(source.shape[1], target.shape[1])
        direction = (self._pad(target, length).mean(0) - self._pad(source, length).mean(0)).unsqueeze(0)
        if direction.shape[1] > cond.length:
            try:
                cond = cond.pad_to(direction.shape[1])
            except ValueError as e:
                raise ValueError(f"source, target: {direction.shape[1]} tokens do not fit the caption's "
                                 f"{cond.length} ({e})") from None
        direction = self._pad(direction, cond.length)
        self._original = ctx.text["cond"]
        ctx.text["cond"] = TextCond(cond.embeds + direction, cond.pooled, cond.empty_chunk, cond.ids)
        self._scheduler = copy.deepcopy(ctx.scheduler) if self.guided else None
        self._ref = self._cond_input = self._bad = None
        self._last = None   # the last cross-attention site in execution order (seen in the first pass)

    def teardown(self, ctx):
        if self._original is not None:
            ctx.text["cond"] = self._original
        self._original = self._scheduler = self._ref = self._cond_input = None

    @staticmethod
    def _embeds(ctx, value, name: str) -> torch.Tensor:
        width = ctx.text["cond"].embeds.shape[-1]
        if torch.is_tensor(value):
            if value.shape[-1] != width:
                raise ValueError(f"{name}: embeddings of width {value.shape[-1]}; this model's text conditioning "
                                 f"is {width} wide")
            return value.to(ctx.device, ctx.dtype)
        text = ctx.encode_prompt([value] if isinstance(value, str) else list(value))
        return text.embeds

    @staticmethod
    def _pad(embeds: torch.Tensor, length: int) -> torch.Tensor:
        """Zero direction beyond the given tokens."""
        return torch.nn.functional.pad(embeds, (0, 0, 0, length - embeds.shape[1]))

    # ------------------------------------------------------------------ each step
    def before_step(self, ctx, step, latents):
        if not self.guided:
            return latents
        if step.index == 0 or self._ref is None:
            self._ref = latents.detach().clone()
        guided = "uncond" in ctx.text
        texts = [ctx.text["uncond"]] if guided else []
        ids = [ctx.uncond_time_ids if ctx.uncond_time_ids is not None else ctx.time_ids] if guided else []
        maps = self._reference_step(ctx, step, TextCond.cat(texts + [self._original]), ids + [ctx.time_ids])
        x_in = self._model_input(ctx.scheduler, step, latents, len(texts) + 1)
        grad = self._loss_grad(ctx, step, x_in, TextCond.cat(texts + [ctx.text["cond"]]),
                               ids + [ctx.time_ids], maps, len(texts) + 1)
        # the reference's SGD step on the model input, x_in - amount * grad, written in latents
        # (exact at a zero gradient for every scheduler; the same numbers for DDIM's unscaled input)
        amount, b = self.cross_attention_guidance_amount, latents.shape[0]
        scale = ctx.scheduler.scale_model_input(torch.ones((), device=latents.device, dtype=latents.dtype), step.t)
        moved = latents.add(grad[:b] / scale, alpha=-amount)
        self._watch(step, moved)
        self._cond_input = (step.index, x_in[b:].add(grad[b:], alpha=-amount)) if guided else None
        return moved

    def prepare_call(self, ctx, step, call):
        """The conditional rows (every branch but "uncond") get the moved conditional half."""
        if self._cond_input is None or self._cond_input[0] != step.index or "uncond" not in call.slices:
            return
        if any(k != "added_cond_kwargs" for k in call.kwargs):
            raise ValueError("controls: list Pix2PixZero before the controls that add inputs to the model call "
                             f"({', '.join(k for k in call.kwargs if k != 'added_cond_kwargs')}): it moves the "
                             "conditional rows' input they are computed from")
        cond = crop_views(self._cond_input[1], call.views)
        x = call.x.clone()
        channels = cond.shape[1]
        for name, rows in call.slices.items():
            if name != "uncond":
                x[rows, :channels] = cond
        call.x = x

    def after_step(self, ctx, step, latents):
        if self.guided:
            self._watch(step, latents)   # before the loop's own check: this step's update is the likely cause
            if self._bad is not None and step.index == step.count - 1 and int(self._bad) >= 0:
                raise self._diverged(int(self._bad), step.count)
        return latents

    # ------------------------------------------------------------------ the passes
    @staticmethod
    def _model_input(scheduler, step, latents, n: int) -> torch.Tensor:
        return scheduler.scale_model_input(torch.cat([latents] * n) if n > 1 else latents, step.t)

    def _call(self, ctx, step, x, text: TextCond, ids: list, processors: dict, n: int) -> torch.Tensor:
        if ctx.concat is not None:
            x = torch.cat([x, torch.cat([ctx.concat] * n).to(x.dtype)], dim=1)
        time_ids = None if ids[0] is None else torch.cat(ids)
        return ctx.run_unet(x, step.t, text, time_ids=time_ids, processors=processors)

    def _reference_step(self, ctx, step, text: TextCond, ids: list) -> dict:
        """Evaluate and step the reference latents; their maps at every cross-attention site."""
        n = len(ids)
        maps: dict = {}
        x = self._model_input(self._scheduler, step, self._ref, n)
        keep = lambda name, probs: maps.__setitem__(name, probs)  # noqa: E731
        pred = self._call(ctx, step, x, text, ids, {s: _reading(s, keep)(default_processor) for s in self._sites}, n)
        if self._last is None:
            self._last = list(maps)[-1]   # dicts keep insertion order: the execution order
        if n > 1:
            uncond, cond = pred.chunk(2)
            pred = uncond + ctx.guidance_scale * (cond - uncond)
        generators = ctx.generator if isinstance(ctx.generator, (list, tuple)) else [ctx.generator]
        states = [g.get_state() for g in generators if g is not None]
        self._ref = self._scheduler.step(pred, step.t, self._ref, generator=ctx.generator,
                                         **ctx.step_kwargs)
        for g, s in zip([g for g in generators if g is not None], states):
            g.set_state(s)   # the edit pass's step draws the same noise
        return maps

    def _loss_grad(self, ctx, step, x_in, text: TextCond, ids: list, maps: dict, n: int) -> torch.Tensor:
        """The gradient of the attention loss in the model input ``x_in``."""
        x_in = x_in.detach().requires_grad_(True)
        terms: list = []

        def loss(name, probs):
            ref = maps.pop(name)
            d = (probs.float() - ref.float()).pow(2).sum((-2, -1))   # (rows, heads)
            terms.append(d.sum() / (n * d.shape[1]))                  # each image: mean over its rows and heads

        with torch.enable_grad():
            try:
                self._call(ctx, step, x_in, text, ids,
                           {s: _reading(s, loss, self._last)(default_processor) for s in self._sites}, n)
            except _LastSite:
                pass
            if len(terms) != len(self._sites):
                raise RuntimeError("Pix2PixZero: not every cross-attention map was read in the loss pass")
            total = torch.stack(terms).sum()
            self.losses.append(total.detach())
            return torch.autograd.grad(total, x_in)[0]

    # ------------------------------------------------------------------ divergence
    def _watch(self, step, x: torch.Tensor) -> None:
        """The first step whose moved input, or the latents after it, are not finite:
        raised at once on the CPU, after the last step on an accelerator (no read-back per
        step, as the loop's own check)."""
        bad = ~torch.isfinite(x).all()
        if x.device.type == "cpu":
            if bool(bad):
                raise self._diverged(step.index, step.count)
            return
        if self._bad is None:
            self._bad = torch.full((), -1, dtype=torch.long, device=x.device)
        self._bad = torch.where(bad & (self._bad < 0), torch.full_like(self._bad, step.index), self._bad)

    def _diverged(self, index: int, count: int) -> ValueError:
        return ValueError(f"cross_attention_guidance_amount: {self.cross_attention_guidance_amount:g} made the "
                          f"latents diverge (NaN or infinite at step {index + 1} of {count}, after the "
                          "attention-loss update); use a smaller value (v-prediction models need about 0.01 or less)")

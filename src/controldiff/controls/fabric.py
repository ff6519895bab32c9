"""FABRIC: feedback through liked and disliked images (von Rütte et al. 2023), as
diffusers' community ``FabricPipeline``.

The images are VAE-encoded once (``setup``). At each step whose feedback weight is
above zero they are noised to the step's level and run through the UNet with the empty
prompt (one extra call, all images batched), recording every self-attention's input.
In the main call each self-attention of the "cond" rows also attends to the recorded
tokens of the liked images, the "uncond" rows to those of the disliked ones (so the
disliked act through classifier-free guidance). The reference tokens' attention is
scaled by a weight, as a log-weight bias (the reference multiplies the softmax by the
weight and renormalises: the same numbers).

Weights: ``max_weight`` at step indices round(n * start) .. round(n * end) (inclusive),
``min_weight`` at the other steps (0 turns feedback off there); per UNet level the
weight runs linearly from ``w`` at the outer blocks towards ``w * bottleneck_scale`` at
the mid block; disliked weights are ``neg_scale`` times the liked ones.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..checks import finite_number
from ..images import as_batch, preprocess_image
from ..noise import randn_tensor
from ..sampling.control import Control, default_processor
from ..text.encode import TextCond


def _load(images, name: str) -> list:
    """Each image (or batch) of ``images`` read and checked now, named ``name[i]``."""
    if images is None:
        return []
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    return [as_batch(image, f"{name}[{i}]") for i, image in enumerate(items)]


def level_weights(n_down: int, weight: float, bottleneck: float) -> dict:
    """Weight per (block, block_index): the reference's linspace from ``weight`` at the
    outermost blocks to ``weight * bottleneck`` at the mid block, mirrored on the way up."""
    outer = torch.linspace(weight, weight * bottleneck, steps=n_down + 1)[:-1].tolist()
    return {"down": outer, "mid": [weight * bottleneck], "up": outer[::-1]}


def attend_with(attn, h: torch.Tensor, ref: torch.Tensor, weight: float) -> torch.Tensor:
    """Self-attention of the rows ``h`` over their own tokens and the reference tokens
    ``ref`` (1, M, C), the reference tokens' attention scaled by ``weight``."""
    q, k, v = attn.project_qkv(h)
    rows = h.shape[0]
    rk = attn.split_heads(attn.to_k(ref)).expand(rows, -1, -1, -1)
    rv = attn.split_heads(attn.to_v(ref)).expand(rows, -1, -1, -1)
    bias = q.new_zeros(1, 1, 1, k.shape[2] + rk.shape[2])
    bias[..., k.shape[2]:] = math.log(weight) if weight > 0 else -math.inf
    return attn.project_out(attn.attend(q, torch.cat([k, rk], dim=2), torch.cat([v, rv], dim=2), bias))


class FABRIC(Control):
    """Liked / disliked images as attention feedback. Images: paths, PIL images, arrays or
    tensors (see :mod:`controldiff.images`), resized to the generated size. With no
    images at all it does nothing (the first round of a feedback loop)."""

    def __init__(self, liked=(), disliked=(), feedback_start_ratio: float = 0.33, feedback_end_ratio: float = 0.66,
                 min_weight: float = 0.05, max_weight: float = 0.8, neg_scale: float = 0.5,
                 pos_bottleneck_scale: float = 1.0, neg_bottleneck_scale: float = 1.0):
        self._images = {"liked": _load(liked, "liked"), "disliked": _load(disliked, "disliked")}
        self.liked = liked
        self.disliked = disliked
        for name, v in (("feedback_start_ratio", feedback_start_ratio), ("feedback_end_ratio", feedback_end_ratio)):
            if not 0.0 <= finite_number(v, name) <= 1.0:
                raise ValueError(f"{name}: expected a value in [0, 1], got {v!r}")
        if feedback_start_ratio > feedback_end_ratio:
            raise ValueError(f"feedback_start_ratio: {feedback_start_ratio} is after feedback_end_ratio "
                             f"{feedback_end_ratio}")
        self.feedback_start_ratio = float(feedback_start_ratio)
        self.feedback_end_ratio = float(feedback_end_ratio)
        self.min_weight = finite_number(min_weight, "min_weight", minimum=0.0)
        self.max_weight = finite_number(max_weight, "max_weight", minimum=0.0)
        if self.min_weight > self.max_weight:
            raise ValueError(f"min_weight: {min_weight} is above max_weight {max_weight}")
        self.neg_scale = finite_number(neg_scale, "neg_scale", minimum=0.0)
        self.pos_bottleneck_scale = finite_number(pos_bottleneck_scale, "pos_bottleneck_scale", minimum=0.0)
        self.neg_bottleneck_scale = finite_number(neg_bottleneck_scale, "neg_bottleneck_scale", minimum=0.0)
        self._clear()

    def _clear(self):
        self._latents: Optional[torch.Tensor] = None  # liked then disliked, (n, 4, h, w)
        self._counts = {"liked": 0, "disliked": 0}
        self._null: Optional[TextCond] = None
        self._time_ids = None
        self._generator = None
        self._states: dict = {}   # this step: site -> {"liked": (1, M, C), "disliked": ...}
        self._weights: dict = {}  # this step: site -> {"liked": w, "disliked": w}

    # ---- setup: checks, then the images' latents and the empty prompt, once per run
    def setup(self, ctx):
        self._clear()
        if not any(self._images.values()):
            return
        if self._images["disliked"] and "uncond" not in ctx.text:
            raise ValueError("disliked: FABRIC's disliked images act through the unconditional branch; "
                             "they need classifier-free guidance (guidance_scale > 1)")
        channels = ctx.vae.config.latent_channels
        if ctx.unet.config.in_channels != channels:
            raise ValueError(f"FABRIC: the UNet takes {ctx.unet.config.in_channels} input channels (inpainting or "
                             f"InstructPix2Pix); the feedback images' pass has only the {channels} latent ones")
        if not any(a.site.kind == "self" for a in ctx.unet.attention_sites().values()):
            raise ValueError("FABRIC: the UNet has no self-attention to attend to the feedback images")
        if ctx.encode_prompt is None:
            raise ValueError("FABRIC: needs a context that can encode prompts (the feedback pass uses the empty one)")
        generator = ctx.generator[0] if isinstance(ctx.generator, (list, tuple)) else ctx.generator
        self._generator = generator
        parts = []
        for name, batches in self._images.items():  # liked first, then disliked, as the reference
            if batches:
                images = torch.cat([preprocess_image(b, ctx.height, ctx.width, name) for b in batches])
                images = images.contiguous()  # PIL input arrives channels-last: one layout, the same bits
                parts.append(ctx.encode_image(images, generator))
                self._counts[name] = images.shape[0]
        self._latents = torch.cat(parts)
        n = self._latents.shape[0]
        null = ctx.encode_prompt("")
        pooled = None if null.pooled is None else null.pooled[:1]
        self._null = TextCond(null.embeds[:1], pooled).tile(n)
        if ctx.time_ids is not None:   # SDXL: the images are resized to the generated size
            self._time_ids = ctx.time_ids[:1].repeat(n, 1)

    def teardown(self, ctx):
        self._clear()

    def weight(self, step) -> float:
        """This step's feedback weight: max_weight inside the feedback window, else min_weight."""
        start = round(step.count * self.feedback_start_ratio)
        end = round(step.count * self.feedback_end_ratio)
        return self.max_weight if start <= step.index <= end else self.min_weight

    # ---- each step: the feedback images' pass, recording every self-attention's input
    def before_step(self, ctx, step, latents):
        self._states, self._weights = {}, {}
        w = self.weight(step)
        if self._latents is None or w <= 0:
            return latents
        z = self._latents
        noised = step.noised(z, randn_tensor(z.shape, self._generator, z.device, z.dtype))
        sites = {n: a.site for n, a in ctx.unet.attention_sites().items() if a.site.kind == "self"}
        seen: dict = {}

        def record(name):
            def proc(attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
                seen[name] = hidden_states
                return default_processor(attn, hidden_states, encoder_hidden_states, attention_mask)
            return proc

        ctx.run_unet(noised, step.t, self._null, time_ids=self._time_ids,
                     processors={name: record(name) for name in sites})
        n_down = len(ctx.unet.down_blocks)
        levels = {"liked": level_weights(n_down, w, self.pos_bottleneck_scale),
                  "disliked": level_weights(n_down, w * self.neg_scale, self.neg_bottleneck_scale)}
        n_liked = self._counts["liked"]
        for name, site in sites.items():
            h = seen[name]
            self._states[name] = {"liked": h[:n_liked].reshape(1, -1, h.shape[-1]),
                                  "disliked": h[n_liked:].reshape(1, -1, h.shape[-1])}
            self._weights[name] = {k: level[site.block][site.block_index] for k, level in levels.items()}
        return latents

    # ---- the main call: "cond" rows attend to the liked tokens, "uncond" rows to the disliked
    def prepare_call(self, ctx, step, call):
        if not self._states:
            return
        feeds = [(call.rows(branch), which) for branch, which in (("cond", "liked"), ("uncond", "disliked"))
                 if branch in call.slices and self._counts[which]]
        feeds.sort(key=lambda f: f[0].start)
        for site, states in self._states.items():
            parts = [(rows, states[which], self._weights[site][which]) for rows, which in feeds]
            call.add_processor(site, lambda inner, parts=parts: self._processor(inner, parts, call))

    @staticmethod
    def _processor(inner, parts, call):
        def fabric(attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
            h = hidden_states
            here = [(call.local(rows), ref, w) for rows, ref, w in parts]   # in the part evaluated now
            # another control's processor sees the whole batch, its rows where it expects them
            base = None if inner is default_processor else inner(attn, h, encoder_hidden_states, attention_mask)

            def other(lo, hi):
                if base is not None:
                    return base[lo:hi]
                return attn.default(h[lo:hi], encoder_hidden_states, attention_mask)

            out, pos = [], 0
            for rows, ref, w in here:
                if rows.start == rows.stop:
                    continue
                if rows.start > pos:
                    out.append(other(pos, rows.start))
                out.append(attend_with(attn, h[rows], ref, w))
                pos = rows.stop
            if pos < h.shape[0]:
                out.append(other(pos, h.shape[0]))
            return torch.cat(out)
        return fabric

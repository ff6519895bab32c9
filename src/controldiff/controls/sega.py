"""Semantic guidance (SEGA): steer towards or away from concepts during sampling.

Each ``Concept`` is one extra branch (its prompt) in the same batched model call as
"cond"/"uncond". ``combine`` runs after CFG and adds the semantic guidance on top of
CFG's result, with the reference's (diffusers' ``SemanticStableDiffusionPipeline``)
warmup, cooldown, per-channel quantile threshold, weights and momentum. Everything is
computed on the latents' device; momentum lives for one run (reset in ``setup``).

LEDITS++ (``controls/ledits.py``) extends this class: same concepts, branches and guidance
term (:meth:`SEGA.guidance`), its own masks and accumulation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from ..checks import finite_number
from ..sampling.control import Branch, Control
from ..text.encode import TextCond, check_text


@dataclass
class Concept:
    """One editing concept. ``scale``: guidance strength; ``reverse``: steer away;
    ``warmup``/``cooldown``: step indices where it starts/stops acting (cooldown None = never);
    ``threshold``: quantile of |guidance| below which it is zeroed; ``weight``: None = 1.

    A ``warmup`` at or past the number of steps the run has would make the concept do
    nothing: SEGA refuses it with a ValueError before step 0 (the reference is silent)."""

    prompt: str
    scale: float = 5.0
    reverse: bool = False
    warmup: int = 10
    cooldown: Optional[int] = None
    threshold: float = 0.9
    weight: Optional[float] = None

    def __post_init__(self):
        if not isinstance(self.prompt, str) or not self.prompt:
            raise ValueError(f"Concept.prompt: expected a non-empty string, got {self.prompt!r}")
        check_text(self.prompt, "Concept.prompt")
        for name in ("scale", "threshold") + (("weight",) if self.weight is not None else ()):
            finite_number(getattr(self, name), f"Concept.{name}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"Concept.threshold: expected a value in [0, 1], got {self.threshold}")
        for name in ("warmup",) + (("cooldown",) if self.cooldown is not None else ()):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"Concept.{name}: expected a non-negative integer step index, got {v!r}")


class SEGA(Control):
    """Semantic guidance over one or more concepts (needs classifier-free guidance)."""

    def __init__(self, concepts: Union[Concept, Sequence[Concept]], momentum_scale: float = 0.1,
                 momentum_beta: float = 0.4):
        concepts = [concepts] if isinstance(concepts, Concept) else list(concepts)
        if not concepts or not all(isinstance(c, Concept) for c in concepts):
            raise ValueError("concepts: expected one or more controldiff Concept(...) objects")
        if not 0.0 <= momentum_beta <= 1.0:
            raise ValueError(f"momentum_beta: expected a value in [0, 1], got {momentum_beta}")
        self.concepts = concepts
        self.momentum_scale = float(momentum_scale)
        self.momentum_beta = float(momentum_beta)
        self._text: dict[str, TextCond] = {}
        self._momentum: dict = {}

    @staticmethod
    def branch_name(concept: Concept) -> str:
        return f"sega:{concept.prompt}"  # the same prompt twice shares one evaluation

    def setup(self, ctx):
        if "uncond" not in ctx.text:
            raise ValueError("guidance_scale: SEGA needs classifier-free guidance (guidance_scale > 1), "
                             "its guidance is measured from the unconditional prediction")
        self.prepare_concepts(ctx)

    def prepare_concepts(self, ctx) -> None:
        """Check the concepts against this run and encode their prompts (one branch each)."""
        if ctx.encode_prompt is None:
            raise ValueError(f"concepts: {type(self).__name__} needs a context that can encode prompts "
                             "(ctx.encode_prompt)")
        for c in self.concepts:
            if c.warmup >= ctx.steps:
                raise ValueError(f"Concept.warmup: {c.warmup} for {c.prompt!r} is at or past the {ctx.steps} timesteps "
                                 "this run has, so the concept would never act; lower warmup or raise "
                                 "num_inference_steps (img2img runs only strength x num_inference_steps)")
        self._momentum = {}
        self._text = {}
        for c in self.concepts:
            text = ctx.encode_prompt(c.prompt)  # one row per image of one prompt: spread over the batch
            self._text[self.branch_name(c)] = text.tile(ctx.batch // text.embeds.shape[0])

    def branches(self, ctx, step):
        return [Branch(name, text) for name, text in self._text.items()]

    def guidance(self, preds, base: torch.Tensor, c: Concept) -> torch.Tensor:
        """The concept's raw guidance: its prediction minus ``base``, reversed, scaled."""
        guide = preds[self.branch_name(c)] - base
        if c.reverse:
            guide = guide * -1
        return guide * c.scale

    def combine(self, ctx, step, preds, pred):
        uncond = preds["uncond"]
        i, n = step.index, len(self.concepts)
        weights = torch.zeros((n, uncond.shape[0]), device=uncond.device, dtype=uncond.dtype)
        edits = torch.zeros((n, *uncond.shape), device=uncond.device, dtype=uncond.dtype)
        warm = []
        for k, c in enumerate(self.concepts):
            if i >= c.warmup:
                warm.append(k)
            if c.cooldown is not None and i >= c.cooldown:
                continue
            guide = self.guidance(preds, uncond, c)
            weights[k, :] = 1.0 if c.weight is None else c.weight
            mag = guide.abs().flatten(start_dim=2)  # per sample and channel, over latent pixels
            q = torch.quantile(mag.float(), c.threshold, dim=2).to(guide.dtype)
            edits[k] = torch.where(guide.abs() >= q[:, :, None, None], guide, torch.zeros_like(guide))

        if 0 < len(warm) < n:  # some concepts warmed up: their normalised mix, without momentum
            idx = torch.tensor(warm, device=uncond.device)
            w = weights.index_select(0, idx).clamp_min(0)
            w = torch.nan_to_num(w / w.sum(dim=0))  # the reference gives NaN when all are cooled down
            pred = pred + torch.einsum("cb,cbijk->bijk", w, edits.index_select(0, idx))

        weights = torch.nan_to_num(weights.clamp_min(0))
        edit = torch.einsum("cb,cbijk->bijk", weights, edits)
        key = None if step.call is None or step.call.views is None else tuple(step.call.views)
        momentum = self._momentum.get(key)
        if momentum is None:
            momentum = torch.zeros_like(edit)
        edit = edit + self.momentum_scale * momentum
        self._momentum[key] = self.momentum_beta * momentum + (1 - self.momentum_beta) * edit
        if len(warm) == n:
            pred = pred + edit
        return pred

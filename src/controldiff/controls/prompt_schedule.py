"""A1111 prompt editing, alternation and ``AND`` in the loop: each step's conditioning.

The pipeline builds this control (first, before CFG) when a prompt uses the syntax of
``text/prompt_schedule.py``. Every text any step needs is encoded once, before the loop, as
A1111 does; each step then picks its rows (A1111's ``reconstruct_cond_batch``: the step
counter starts at 0 with the first step run and counts model evaluations, so a 2nd-order
scheduler's extra evaluations count, as in A1111's k-diffusion samplers).

- ``before_step`` sets ``ctx.text["cond"]`` / ``["uncond"]`` to the step's texts, so CFG and
  every control that reads them this step (PAG, InstructPix2Pix, ...) see the step's prompt.
- ``AND`` parts after the first are extra branches ``and1``, ``and2``, ... of the same
  batched call; ``combine`` (before CFG's) turns the conditional prediction into
  ``uncond + sum_i w_i (cond_i - uncond)``, which CFG then scales: A1111's
  ``uncond + cfg * sum_i w_i (cond_i - uncond)``. ``preds["cond"]`` becomes that composed
  prediction too, so controls combining after (Regions, SEGA) guide from it. A prompt of a
  batch with fewer parts fills the others with its first part at weight 0.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ..sampling.control import Branch, Control
from ..text.encode import TextCond
from ..text.prompt_schedule import at_step, prompt_schedule, split_and

Schedule = list[tuple[int, int]]  # (end_at_step, row of the encoded table)


def is_plain(prompt: str, steps: int, split: bool = True) -> bool:
    """True when the prompt reads the same at every step with one part of weight 1."""
    if split and split_and(prompt) != [(prompt, 1.0)]:
        return False
    return prompt_schedule(prompt, steps) == [(steps, prompt)]


def schedule_texts(prompts: Sequence[str], negatives: Optional[Sequence[str]], steps: int):
    """(parts, negative schedules) with texts in place of table rows: parts[i] is prompt i's
    ``[(weight, [(end, text), ...]), ...]``; each negative is scheduled but never split."""
    parts = [[(w, prompt_schedule(text, steps)) for text, w in split_and(p)] for p in prompts]
    negs = None if negatives is None else [prompt_schedule(n, steps) for n in negatives]
    return parts, negs


class PromptSchedule(Control):
    """Built by the pipeline; ``encode(texts, negative: bool) -> TextCond`` on the model's device."""

    def __init__(self, prompts: Sequence[str], negatives: Optional[Sequence[str]], steps: int, images_per_prompt: int,
                 encode: Callable[[list[str], bool], TextCond], zero_uncond: Optional[TextCond] = None):
        parts, negs = schedule_texts(prompts, negatives, steps)
        cond_texts = list(dict.fromkeys(t for p in parts for _, s in p for _, t in s))
        neg_texts = [] if negs is None else list(dict.fromkeys(t for s in negs for _, t in s))
        tables = [encode(cond_texts, False)] + ([encode(neg_texts, True)] if neg_texts else [])
        self.table = TextCond.cat(tables)
        cond_row = {t: i for i, t in enumerate(cond_texts)}
        neg_row = {t: len(cond_texts) + i for i, t in enumerate(neg_texts)}
        self.parts = [[(w, [(end, cond_row[t]) for end, t in s]) for w, s in p] for p in parts]
        self.negatives = None if negs is None else [[(end, neg_row[t]) for end, t in s] for s in negs]
        self.zero_uncond = zero_uncond
        self.n = images_per_prompt
        self.count = max(len(p) for p in self.parts)
        # composition changes the prediction; a single part of weight 1 only switches texts
        self.composed = self.count > 1 or any(w != 1.0 for p in self.parts for w, _ in p)
        self._conds: dict[tuple, TextCond] = {}
        self._weights: dict[tuple, torch.Tensor] = {}

    def _cond(self, schedules: list[Schedule], step: int) -> TextCond:
        rows = tuple(s[at_step(s, step)][1] for s in schedules)
        if rows not in self._conds:
            self._conds[rows] = self.table.select(rows).repeat(self.n)
        return self._conds[rows]

    def _part(self, j: int) -> list[Schedule]:
        return [(p[j] if j < len(p) else p[0])[1] for p in self.parts]

    def text_at(self, step: int) -> dict:
        """The step's {"cond", "uncond"} (uncond only when the prompts are guided)."""
        text = {"cond": self._cond(self._part(0), step)}
        if self.negatives is not None:
            text["uncond"] = self._cond(self.negatives, step)
        elif self.zero_uncond is not None:
            text["uncond"] = self.zero_uncond
        return text

    def weights(self, j: int, like: torch.Tensor) -> torch.Tensor:
        """Part j's weight per row of ``like`` (rows: prompt-major images, then views); made
        once per part and call shape, not every step."""
        key = (j, like.shape, like.dtype, like.device)
        if key not in self._weights:
            w = torch.tensor([p[j][0] if j < len(p) else 0.0 for p in self.parts], dtype=like.dtype,
                             device=like.device)
            w = w.repeat_interleave(self.n).repeat(like.shape[0] // (len(self.parts) * self.n))
            self._weights[key] = w.view(-1, *([1] * (like.ndim - 1)))
        return self._weights[key]

    def before_step(self, ctx, step, latents):
        ctx.text.update(self.text_at(step.index))
        return latents

    def branches(self, ctx, step):
        out = [Branch(f"and{j}", self._cond(self._part(j), step.index)) for j in range(1, self.count)]
        if self.composed and ctx.guidance_scale <= 1.0:  # A1111 composes around uncond even without CFG
            out.insert(0, Branch("uncond", ctx.text["uncond"], time_ids=ctx.uncond_time_ids))
        return out

    def combine(self, ctx, step, preds, pred):
        if not self.composed:
            return pred
        uncond = preds["uncond"]
        out = uncond + self.weights(0, pred) * (pred - uncond)
        for j in range(1, self.count):
            out = out + self.weights(j, pred) * (preds[f"and{j}"] - uncond)
        preds["cond"] = out
        return out

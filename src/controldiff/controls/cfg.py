"""Classifier-free guidance, written as the first control of the loop.

Declares the "uncond" and "cond" branches and combines them as
``uncond + scale * (cond - uncond)``; with scale <= 1 only "cond" is evaluated, as in
diffusers.
"""
from __future__ import annotations

from ..sampling.control import Branch, Control


class CFG(Control):
    def __init__(self, scale: float = 7.5):
        self.scale = float(scale)

    @property
    def enabled(self) -> bool:
        return self.scale > 1.0

    def branches(self, ctx, step):
        cond = Branch("cond", ctx.text["cond"])
        if not self.enabled:
            return [cond]
        return [Branch("uncond", ctx.text["uncond"], time_ids=ctx.extras.get("uncond_time_ids")), cond]

    def combine(self, ctx, step, preds, noise):
        if not self.enabled:
            return noise
        uncond = preds["uncond"]
        return uncond + self.scale * (noise - uncond)

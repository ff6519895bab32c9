"""Classifier-free guidance, written as the first control of the loop.

Declares the "uncond" and "cond" branches and combines them as
``uncond + scale * (cond - uncond)``; with scale <= 1 only "cond" is evaluated, as in
diffusers. The scale must be a finite number: NaN would otherwise silently turn
guidance off (NaN > 1 is False) and infinity would fill the latents with NaN.
"""
from __future__ import annotations

from ..checks import finite_number
from ..sampling.control import Branch, Control


class CFG(Control):
    def __init__(self, scale: float = 7.5):
        self.scale = finite_number(scale, "guidance_scale", note=" (<= 1 turns guidance off)")

    @property
    def enabled(self) -> bool:
        return self.scale > 1.0

    def branches(self, ctx, step):
        cond = Branch("cond", ctx.text["cond"])
        if not self.enabled:
            return [cond]
        return [Branch("uncond", ctx.text["uncond"], time_ids=ctx.uncond_time_ids), cond]

    def combine(self, ctx, step, preds, pred):
        if not self.enabled:
            return pred
        uncond = preds["uncond"]
        return uncond + self.scale * (pred - uncond)

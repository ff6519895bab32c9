"""Learning-rate schedules, as ``diffusers.optimization.get_scheduler`` builds them
(a ``LambdaLR`` of the step), so runs and their checkpoints match the scripts'."""
from __future__ import annotations

import math

from torch.optim.lr_scheduler import LambdaLR

__all__ = ["SCHEDULES", "lr_schedule"]

SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")


def lr_schedule(optimizer, name: str, warmup_steps: int, total_steps: int) -> LambdaLR:
    """``name``: constant (warm-up ignored, as diffusers), constant_with_warmup, linear or
    cosine (both decay to 0 at ``total_steps`` after the warm-up)."""
    if name not in SCHEDULES:
        raise ValueError(f"lr_scheduler: expected one of {SCHEDULES}, got {name!r}")

    def warm(step: int) -> float:
        return float(step) / float(max(1, warmup_steps))

    def constant(step: int) -> float:
        return 1.0

    def constant_with_warmup(step: int) -> float:
        return warm(step) if step < warmup_steps else 1.0

    def linear(step: int) -> float:
        if step < warmup_steps:
            return warm(step)
        return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))

    def cosine(step: int) -> float:
        if step < warmup_steps:
            return warm(step)
        progress = float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))

    fn = {"constant": constant, "constant_with_warmup": constant_with_warmup, "linear": linear, "cosine": cosine}
    return LambdaLR(optimizer, fn[name])

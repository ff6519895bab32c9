"""An exponential moving average of the trainable tensors, as diffusers' ``EMAModel`` with
its defaults (no warmup, ``update_after_step=0``, ``min_decay=0``): after optimisation step
``n`` the average moves towards the weights by ``1 - decay(n)`` with
``decay(n) = min(decay, (1 + s) / (10 + s))``, ``s = n - 1`` (0 at the first step, which
copies the weights). Saved instead of the raw weights at the end; checkpoints keep it
(``ema.I`` tensors beside the method's, I the position among the trainable parameters)."""
from __future__ import annotations

import torch

from ..checks import finite_number

__all__ = ["EMA", "PREFIX", "check_decay"]

PREFIX = "ema."


def check_decay(decay) -> None:
    finite_number(decay, "ema_decay", minimum=0)
    if not decay < 1:
        raise ValueError(f"ema_decay: expected a number in [0, 1), got {decay!r}")


class EMA:
    """The averages of ``params``, updated with :meth:`update` after each optimizer step."""

    def __init__(self, params, decay: float = 0.9999):
        check_decay(decay)
        self.params, self.decay, self.step = list(params), decay, 0
        self.shadow = [p.detach().clone() for p in self.params]

    def decay_at(self, step: int) -> float:
        s = max(0, step - 1)
        return 0.0 if s <= 0 else min((1 + s) / (10 + s), self.decay)

    @torch.no_grad()
    def update(self) -> None:
        self.step += 1
        keep = 1 - self.decay_at(self.step)
        for s, p in zip(self.shadow, self.params):
            if p.requires_grad:
                s.sub_(keep * (s - p))
            else:
                s.copy_(p)

    @torch.no_grad()
    def copy_to(self) -> None:
        """Put the averages into the trained parameters (what is saved then holds them)."""
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Not copied: the trainer snapshots between optimizer steps, as the method's tensors."""
        return {f"{PREFIX}{i}": s for i, s in enumerate(self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], step: int, source: str) -> None:
        mine = self.state_dict()
        if set(mine) != set(state) or any(mine[k].shape != state[k].shape for k in mine):
            raise ValueError(f"resume: {source} holds {'no' if not state else 'another'} EMA of the trainable "
                             f"tensors than this run's ({len(mine)} tensors); was it trained with --ema?")
        for k, s in mine.items():
            s.copy_(state[k])
        self.step = step

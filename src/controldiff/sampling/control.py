"""The loop's extension points: what a control may add to one generation.

A control overrides only the hooks it needs. The loop calls them in the order the
controls were given; every control sees the same ``Context``.

- ``setup``: validate against the model and precompute (encode images, prompts).
- ``branches``: named model evaluations it needs this step; the loop batches the
  branches of all controls into one model call.
- ``prepare_call``: adjust the batched model call (add residuals, attention processors).
- ``combine``: turn the branch predictions into the noise prediction (CFG first,
  then guidance terms added by other controls).
- ``before_step`` / ``after_step``: latent operators around the scheduler step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch

from ..text.encode import TextCond


@dataclass
class Branch:
    """One model evaluation over the whole latent batch.

    ``text`` conditions it; ``concat`` (optional) replaces the context's extra input
    channels for this branch (e.g. an unconditional image branch).
    """

    name: str
    text: TextCond
    concat: Optional[torch.Tensor] = None
    time_ids: Optional[torch.Tensor] = None


@dataclass
class ModelCall:
    """One batched UNet evaluation: every branch of this step, side by side.

    ``slices[name]`` is the batch range of a branch. Controls may add UNet keyword
    arguments (``kwargs``) or attention processors (``processors``, by site name).
    """

    x: torch.Tensor
    t: torch.Tensor
    embeds: torch.Tensor
    branches: list
    slices: Dict[str, slice]
    kwargs: Dict[str, Any] = field(default_factory=dict)
    processors: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Step:
    index: int          # 0-based position in this run's timesteps
    t: torch.Tensor     # the scheduler timestep
    count: int          # how many timesteps this run has


@dataclass
class Context:
    """What every control can read: the model, the batch and the conditioning."""

    unet: Any
    scheduler: Any
    batch: int                               # latent batch size (prompts x images per prompt)
    text: Dict[str, TextCond]                # "cond", "uncond" (when guidance is on), ...
    generator: Any = None
    concat: Optional[torch.Tensor] = None    # extra UNet input channels, appended to every branch
    time_ids: Optional[torch.Tensor] = None  # SDXL micro-conditioning for "cond" (batch, 6)
    extras: Dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype


class Control:
    """Base class: every hook is optional and does nothing by default."""

    def setup(self, ctx: Context) -> None:
        pass

    def branches(self, ctx: Context, step: Step) -> list[Branch]:
        return []

    def prepare_call(self, ctx: Context, step: Step, call: "ModelCall") -> None:
        pass

    def combine(self, ctx: Context, step: Step, preds: Dict[str, torch.Tensor], noise: torch.Tensor) -> torch.Tensor:
        return noise

    def before_step(self, ctx: Context, step: Step, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def after_step(self, ctx: Context, step: Step, latents: torch.Tensor) -> torch.Tensor:
        return latents

"""The base of our top-level models: an nn.Module that says its dtype and device."""
from __future__ import annotations

import torch
from torch import nn


class Model(nn.Module):
    """What pipelines and controls ask of a model: the dtype and device of its weights."""

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

"""Mixed precision, as diffusers' scripts (``weight_dtype`` and ``cast_training_params``):
the frozen parameters (VAE, frozen text encoders, the UNet under LoRA / textual inversion)
are held in bf16 or fp16, the trainable ones and the optimizer state stay float32, and the
forward passes run under ``torch.autocast`` (which lets float32 adapters meet bf16 weights).
fp16 gradients go through a loss scaler (accelerate's ``GradScaler``); bf16 needs none."""
from __future__ import annotations

from contextlib import nullcontext

import torch

__all__ = ["PRECISIONS", "check_precision", "hold_frozen", "autocast", "scaler"]

PRECISIONS = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(name, device=None) -> None:
    if name not in PRECISIONS:
        raise ValueError(f"mixed_precision: expected one of {tuple(PRECISIONS)}, got {name!r}")
    if name == "fp16" and device is not None and torch.device(device).type != "cuda":
        raise ValueError(f"mixed_precision: fp16 needs a CUDA device, got {device}; use bf16 or 'no'")


def hold_frozen(modules, name: str) -> None:
    """The parameters of ``modules`` that train nothing, in ``name``'s dtype (in place)."""
    dtype = PRECISIONS[name]
    if dtype is None:
        return
    for m in modules:
        for p in m.parameters() if m is not None else ():
            if not p.requires_grad and p.is_floating_point():
                p.data = p.data.to(dtype)


def autocast(name: str, device):
    dtype = PRECISIONS[name]
    return nullcontext() if dtype is None else torch.autocast(torch.device(device).type, dtype=dtype)


def scaler(name: str, device) -> torch.amp.GradScaler:
    """A loss scaler for fp16 (a pass-through otherwise)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=name == "fp16")

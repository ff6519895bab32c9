"""The optimizer: torch's AdamW, or bitsandbytes' 8-bit AdamW (``use_8bit_adam``, the diffusers
scripts' ``--use_8bit_adam``), which keeps Adam's two moments block-wise quantised to 8 bits
for tensors of 4096+ elements: a quarter of AdamW's state, what makes full fine-tuning fit a
smaller GPU. bitsandbytes is an optional extra (``pip install 'controldiff[bnb]'``)."""
from __future__ import annotations

import logging

import torch

__all__ = ["adamw", "check_8bit"]


def _bitsandbytes():
    # its CPU backend warns at import that an optional 4-bit kernel package is missing
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes
    return bitsandbytes


def check_8bit(use_8bit_adam: bool) -> None:
    """Refuse ``use_8bit_adam`` without bitsandbytes, before any work."""
    if not use_8bit_adam:
        return
    try:
        _bitsandbytes()
    except ImportError as e:
        raise ValueError("use_8bit_adam: needs bitsandbytes (pip install 'controldiff[bnb]'), which "
                         f"cannot be imported here ({e})") from None


def adamw(groups, use_8bit_adam: bool, **settings) -> torch.optim.Optimizer:
    """AdamW over ``groups`` (parameters or param groups) with ``settings`` (lr, betas, ...)."""
    if use_8bit_adam:
        return _bitsandbytes().optim.AdamW8bit(groups, **settings)
    return torch.optim.AdamW(groups, **settings)

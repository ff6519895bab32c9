"""Non-finite values are reported where they first appear, never saved as a black image.

One cheap check per stage: the text encodings, the latents after every step of the
loop, the VAE's encode and decode. The error names the stage.
"""
from __future__ import annotations

import torch


def check_finite(x: torch.Tensor, stage: str, dtype: torch.dtype) -> None:
    """A FloatingPointError naming ``stage`` when ``x`` holds NaN or +-inf."""
    if bool(torch.isfinite(x).all()):
        return
    what = "NaN" if bool(torch.isnan(x).any()) else "infinite values"
    hint = ("try dtype=torch.float32, or a VAE made for float16" if dtype != torch.float32
            else "check the weights, the prompt weights and the controls' strengths")
    raise FloatingPointError(f"{stage}: the result contains {what} (dtype={dtype}): nothing was saved; {hint}")

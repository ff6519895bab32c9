"""Non-finite values are reported where they first appear, never saved as a black image.

One cheap check per stage: the text encodings, the latents after every step of the
loop, the VAE's encode and decode. The error names the stage.
"""
from __future__ import annotations

from typing import Optional

import torch


def _error(stage: str, what: str, dtype: torch.dtype) -> FloatingPointError:
    hint = ("try dtype=torch.float32, or a VAE made for float16" if dtype != torch.float32
            else "check the weights, the prompt weights and the controls' strengths")
    return FloatingPointError(f"{stage}: the result contains {what} (dtype={dtype}): nothing was saved; {hint}")


def check_finite(x: torch.Tensor, stage: str, dtype: torch.dtype) -> None:
    """A FloatingPointError naming ``stage`` when ``x`` holds NaN or +-inf."""
    if bool(torch.isfinite(x).all()):
        return
    raise _error(stage, "NaN" if bool(torch.isnan(x).any()) else "infinite values", dtype)


class StepWatch:
    """The first sampling step whose latents are not finite.

    On the CPU each step is checked at once (a reduction; a fault stops the loop there).
    On an accelerator reading the answer back every step would make each step wait for
    the previous one, so the index of the first bad step is kept on the device and
    :meth:`check` reads it once, after the loop.
    """

    def __init__(self, timesteps: torch.Tensor, dtype: torch.dtype, defer: Optional[bool] = None):
        self.timesteps, self.dtype = timesteps, dtype
        self.defer = defer  # None: defer on every device but the CPU
        self.first: Optional[torch.Tensor] = None  # on the device: -1, or the first bad step

    def _stage(self, i: int) -> str:
        return f"UNet step {i + 1} of {len(self.timesteps)} (t={float(self.timesteps[i]):g})"

    def see(self, i: int, latents: torch.Tensor) -> None:
        if not (latents.device.type != "cpu" if self.defer is None else self.defer):
            check_finite(latents, self._stage(i), self.dtype)
            return
        if self.first is None:
            self.first = torch.full((), -1, dtype=torch.long, device=latents.device)
        bad = ~torch.isfinite(latents).all()
        self.first = torch.where(bad & (self.first < 0), torch.full_like(self.first, i), self.first)

    def check(self) -> None:
        if self.first is not None and int(self.first) >= 0:
            raise _error(self._stage(int(self.first)), "NaN or infinite values", self.dtype)

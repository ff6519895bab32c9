"""Model outputs to x0 and epsilon, and back: the one place that knows prediction types.

Variance-preserving form (every scheduler's *model input*): ``x = alpha * x0 + sigma * eps``
with ``alpha = sqrt(alpha_bar)``, ``sigma = sqrt(1 - alpha_bar)``. k-diffusion schedulers
keep their latents unscaled (``x * sqrt(1 + k**2)`` with ``k = sigma / alpha``); their own
step uses :func:`k_x0` on those. The order of operations is the reference schedulers', so
results stay bit-equal to diffusers.
"""
from __future__ import annotations

import torch

KINDS = ("epsilon", "sample", "v_prediction")


def alpha_sigma(k_sigma):
    """VP coefficients (alpha, sigma) of a k-diffusion sigma: x = alpha * x0 + sigma * eps."""
    alpha_t = 1 / (k_sigma**2 + 1) ** 0.5
    return alpha_t, k_sigma * alpha_t


def x0_eps(kind: str, output: torch.Tensor, x: torch.Tensor, alpha, sigma) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) from a model ``output`` of ``kind`` at the VP level (alpha, sigma)."""
    if kind == "epsilon":
        return (x - sigma * output) / alpha, output
    if kind == "sample":
        return output, (x - alpha * output) / sigma
    if kind == "v_prediction":
        return alpha * x - sigma * output, alpha * output + sigma * x
    raise ValueError(f"prediction_type: expected one of {KINDS}, got {kind!r}")


def to_output(kind: str, x0: torch.Tensor, eps: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """The model output of ``kind`` that :func:`x0_eps` turns into (x0, eps)."""
    if kind == "epsilon":
        return eps
    if kind == "sample":
        return x0
    if kind == "v_prediction":
        return alpha * eps - sigma * x0
    raise ValueError(f"prediction_type: expected one of {KINDS}, got {kind!r}")


def k_x0(kind: str, output: torch.Tensor, sample: torch.Tensor, sigma) -> torch.Tensor:
    """x0 from unscaled k-diffusion latents ``sample = x0 + sigma * eps``."""
    if kind == "epsilon":
        return sample - sigma * output
    if kind == "v_prediction":
        return output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
    return output

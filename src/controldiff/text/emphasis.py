"""How token weights act on the encoder's hidden states, for each syntax.

- a1111 (``process_tokens``, emphasis "Original"): multiply each token's embedding by its
  weight, then rescale so the chunk's mean equals the unweighted mean. Done per prompt
  and per chunk (A1111 takes the mean over its whole batch chunk; with one prompt that is
  the same).
- compel: ``empty + (z - empty) * w`` per token (``empty`` = the empty prompt's chunk);
  tokens of weight exactly 1 are left untouched. Fragments weighted below 1 are also
  lerped toward the encoding with those tokens masked out (see ``downweight_lerp``).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


def a1111(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """z (k, L, D), weights (k, L): weighted, each chunk's mean restored."""
    if bool((weights == 1).all()):
        return z
    w = weights.to(z.device, z.dtype).unsqueeze(-1)
    original = z.mean(dim=(1, 2), keepdim=True)
    weighted = z * w
    new = weighted.mean(dim=(1, 2), keepdim=True)
    # chunks with no weight keep a ratio of exactly 1; a zero mean (possible when the final
    # layer norm has no bias) would give 0/0: leave that chunk unscaled instead of NaN
    plain = (weights == 1).all(dim=1).to(z.device).reshape(-1, 1, 1)
    ratio = torch.where(plain | (new == 0), torch.ones_like(new), original / new)
    return weighted * ratio


def compel(z: torch.Tensor, weights: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """z (k, L, D), weights (k, L), empty (1, L, D)."""
    w = weights.to(z.device, z.dtype).unsqueeze(-1).expand(z.shape)
    identity = w == 1
    if bool(identity.all()):
        return z
    return torch.where(identity, z, empty + (z - empty) * w)


def downweight_lerp(base: torch.Tensor, without: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """compel's lerp: ``base`` with weight 1, each ``without[i]`` (the prompt encoded with the
    i-th down-weighted fragment masked) with ``tan((1 - w_i) * pi / 2)``, normalised."""
    if not without:
        return base
    lerp = [1.0] + [math.tan((1.0 - max(1e-5, w)) * math.pi / 2) for w in weights]
    return weighted_sum([base, *without], lerp, normalize=True)


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    """sum_i w_i * t_i (compel's ``apply_embedding_weights``; ``.blend``)."""
    stacked = torch.stack(list(tensors))
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    if normalize:
        w = w / torch.sum(w)
    return torch.sum(stacked * w.reshape(w.shape + (1,) * (stacked.ndim - 1)), dim=0)

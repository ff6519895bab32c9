"""Random tensors drawn exactly as diffusers draws them, so seeds carry over."""
from __future__ import annotations

from typing import Sequence, Union

import torch

Generator = Union[torch.Generator, Sequence[torch.Generator], None]


def randn_tensor(shape, generator: Generator = None, device=None, dtype=None) -> torch.Tensor:
    """Same draw order and device rules as ``diffusers.utils.torch_utils.randn_tensor``.

    A CPU generator draws on the CPU whatever the target device (so a seed gives the
    same image everywhere); a list of generators draws one sample each.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    rand_device = device
    shape = tuple(shape)
    if generator is not None:
        first = generator[0] if isinstance(generator, (list, tuple)) else generator
        if first.device.type != device.type:
            if first.device.type != "cpu":
                raise ValueError(f"generator: cannot draw a {device} tensor from a {first.device} generator")
            rand_device = torch.device("cpu")
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"generator: got a list of {len(generator)} generators for a batch of {shape[0]}")
        one = (1,) + shape[1:]
        parts = [torch.randn(one, generator=g, device=rand_device, dtype=dtype) for g in generator]
        return torch.cat(parts, dim=0).to(device)
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)

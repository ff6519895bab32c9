"""Random tensors drawn exactly as diffusers draws them, so seeds carry over."""
from __future__ import annotations

import random

from numbers import Integral
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


#: Seeds are integers in [0, SEED_LIMIT): every value torch.Generator.manual_seed takes
#: without wrapping (a negative seed would silently alias a large one).
SEED_LIMIT = 2**64


def check_seed(seed, name: str = "seed") -> int:
    """``seed`` (an int or numpy integer) as an int, or a ValueError naming ``name`` and the
    accepted range."""
    if isinstance(seed, bool) or not isinstance(seed, Integral) or not 0 <= int(seed) < SEED_LIMIT:
        raise ValueError(f"{name}: expected an integer in [0, 2**64), got {seed!r}")
    return int(seed)


def check_generator(generator, batch: int) -> None:
    """A torch.Generator or a list of them, one per image, as the reference pipelines
    require (``len(generator) != batch_size`` is refused there too)."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if not isinstance(generator, (list, tuple)) or not all(isinstance(g, torch.Generator) for g in generator):
        raise ValueError(f"generator: expected a torch.Generator or a list of them, got {generator!r}")
    if len(generator) != batch:
        raise ValueError(f"generator: got a list of {len(generator)} generators for a batch of {batch} images "
                         "(prompts x num_images_per_prompt); pass one per image, or a single generator")


def seeded(generator, seed, batch: int) -> tuple:
    """(generator, seed) of a call: the caller's generator(s) checked, else a CPU generator
    from ``seed`` (a random one, to be recorded, when neither is given)."""
    if generator is not None and seed is not None:
        raise ValueError("generator, seed: pass one of them, not both")
    check_generator(generator, batch)
    if generator is None:
        seed = random.randrange(2**32) if seed is None else check_seed(seed)
        generator = torch.Generator("cpu").manual_seed(seed)
    return generator, seed

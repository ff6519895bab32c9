"""Refuse requests that cannot fit before anything is allocated.

The largest tensor of a generation is a VAE activation at full resolution (the decoder's
last stage: ``block_out_channels[0]`` channels x height x width per image, all images
decoded together, as the reference does). That lower bound is compared with the memory
the device has in total, so only requests that clearly cannot fit are refused.
"""
from __future__ import annotations

import os
from typing import Optional

import torch


def device_memory(device: torch.device) -> Optional[int]:
    """Total bytes of the device (CUDA memory, else physical RAM); None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[1])
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def check_fits(images: int, height: int, width: int, channels: int, itemsize: int, device, per_prompt: int) -> None:
    """A ValueError naming ``height``/``width`` (one image cannot fit) or
    ``num_images_per_prompt`` (the batch cannot) when the decode alone exceeds the device."""
    total = device_memory(device)
    if total is None:
        return
    one = channels * height * width * itemsize
    if one > total:
        raise ValueError(f"height, width: one {height}x{width} image needs at least {_size(one)} to decode "
                         f"({channels} channels x {height} x {width} x {itemsize} bytes); the {torch.device(device)} "
                         f"has {_size(total)} in all")
    if one * images > total:
        raise ValueError(f"num_images_per_prompt: {images} images of {height}x{width} ({per_prompt} per prompt) "
                         f"need at least {_size(one * images)} to decode together; the {torch.device(device)} "
                         f"has {_size(total)} in all")

"""Refuse requests that cannot fit before anything is allocated.

The largest tensor of a generation is a VAE activation at full resolution (the decoder's
last stage: ``block_out_channels[0]`` channels x height x width per image, all images
decoded together, as the reference does). That lower bound is compared with the memory
the device has in total, so only requests that clearly cannot fit are refused.

UNet calls get a memory budget instead: the loop splits a call's batch rows (branches,
views) into as many evaluations as fit it (:func:`plan_rows`, per-row cost from
:func:`unet_row_bytes`); the split gives the same prediction as one call.
"""
from __future__ import annotations

import math
import os
import re
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


# ---- the UNet's memory budget: calls split into parts that fit -------------------------

DEFAULT_FRACTION = 0.5   # of the memory free when a run starts (room for the VAE, caches, misestimates)
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}
# Calibrated from VmHWM measurements of our UNet (SDPA attention, no autograd) on CPU, float32 and
# bfloat16, tiny / tiny-sdxl / sd15-small layouts: a batch row at N latent pixels costs about
# itemsize * N * (ROW_CONV * C0 + ROW_ATTN * Ca) bytes, C0 the first level's channels and Ca the
# widest attention level's channels per latent pixel (C / 4**level). Measured 36-41 * C0 floats per
# pixel on SD layouts (this gives 44), 20-26 * C0 on SDXL's (this gives 27).
ROW_CONV, ROW_ATTN = 10, 34


def parse_budget(value, name: str = "memory_budget"):
    """None (automatic), math.inf (no limit) or a positive size: bytes, or a string such as
    "4GiB", "512MB", "1.5G"; returns None, math.inf or an int. ValueError names ``name``."""
    if value is None or value == math.inf:
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{name}: expected a size such as '4GiB', '512MB' or a number of bytes, got {value!r}")
        value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{name}: expected None (automatic), a size ('4GiB') or bytes, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name}: expected a positive size, got {value!r}")
    return int(value)


def free_memory(device) -> Optional[int]:
    """Bytes free now: CUDA's free memory plus what torch's allocator holds unused; on the CPU
    the kernel's MemAvailable (/proc/meminfo). None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def resolve_budget(value, device) -> Optional[int]:
    """The bytes one UNet call may use in this run: ``value`` parsed, None (automatic) as
    DEFAULT_FRACTION of the free memory; None means no limit (math.inf, or free memory unknown)."""
    value = parse_budget(value)
    if value is None:
        free = free_memory(device)
        return None if free is None else int(free * DEFAULT_FRACTION)
    return None if value == math.inf else value


def unet_row_bytes(config, height: int, width: int, itemsize: int) -> int:
    """Estimated peak bytes one batch row adds to a UNet evaluation at ``height`` x ``width``
    latents (``config``: the UNet's config; see ROW_CONV, ROW_ATTN)."""
    channels = list(config["block_out_channels"])
    kinds = list(config["down_block_types"])
    attn = [c / 4**i for i, (c, kind) in enumerate(zip(channels, kinds)) if "CrossAttn" in kind]
    attn.append(channels[-1] / 4 ** (len(channels) - 1))   # the mid block's
    per_pixel = ROW_CONV * channels[0] + ROW_ATTN * max(attn)
    return int(itemsize * height * width * per_pixel)


def plan_rows(rows: int, per_row: int, budget: Optional[int], what: str = "UNet call") -> list[slice]:
    """``rows`` batch rows in consecutive parts of at most ``budget // per_row`` rows each
    (one part when ``budget`` is None); ValueError when not even one row fits."""
    if budget is None or per_row * rows <= budget:
        return [slice(0, rows)]
    size = budget // per_row
    if size < 1:
        raise ValueError(f"memory_budget: {_size(budget)} cannot hold one row of a {what} "
                         f"(about {_size(per_row)} needed); raise the budget or lower the size")
    return [slice(i, min(i + size, rows)) for i in range(0, rows, size)]

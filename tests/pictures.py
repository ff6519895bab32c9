"""Test images."""
from __future__ import annotations

import numpy as np
import PIL.Image


def photo(seed: int = 0, size=64) -> PIL.Image.Image:
    """A smooth random RGB image, ``size`` pixels square or (height, width): 4x4 random colours
    upsampled bicubically (noise-free images invert well, as photographs do)."""
    h, w = (size, size) if isinstance(size, int) else size
    small = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return PIL.Image.fromarray(small).resize((w, h), PIL.Image.BICUBIC)

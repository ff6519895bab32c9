"""A1111 textual-inversion embeddings shared as PNG images (A1111's
``textual_inversion/image_embedding.py``): the embedding is JSON, with tensors written
as ``{"TORCHTENSOR": nested lists}``, either base64 in the ``sd-ti-embedding`` text chunk
or zlib-compressed in the low bits of two noise blocks beside the preview picture.
Only JSON is read: nothing is unpickled.
"""
from __future__ import annotations

import base64
import binascii
import json
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import torch

TEXT_CHUNK = "sd-ti-embedding"


def _tensors(obj: dict):
    if "TORCHTENSOR" in obj:
        return torch.tensor(np.asarray(obj["TORCHTENSOR"], dtype=np.float64), dtype=torch.float32)
    return obj


def _lcg_block(shape) -> np.ndarray:
    """A1111's xor mask: the LCG (a=1664525, c=1013904223, m=2**32, seed 0) modulo 255, low 4 bits."""
    n = int(np.prod(shape))
    out = np.empty(n, dtype=np.uint8)
    seed = 0
    for i in range(n):
        seed = (1664525 * seed + 1013904223) % 2**32
        out[i] = seed % 255
    return (out & 0x0F).reshape(shape)


def _crop_black(img: np.ndarray) -> np.ndarray:
    mask = (img > 0).all(2)
    cols, rows = mask.any(0), mask.any(1)
    c0, c1 = cols.argmax(), mask.shape[1] - cols[::-1].argmax()
    r0, r1 = rows.argmax(), mask.shape[0] - rows[::-1].argmax()
    return img[r0:r1, c0:c1]


def _from_pixels(image: PIL.Image.Image) -> bytes:
    """The compressed data of A1111's ``insert_image_data_embed`` (its ``extract_image_data_embed``)."""
    low4 = _crop_black(np.asarray(image.convert("RGB"), dtype=np.uint8)) & 0x0F
    black = np.where(low4.sum(axis=(0, 2)) == 0)[0]
    if black.shape[0] < 2:
        raise ValueError("no embedding data in its pixels")
    lower, upper = low4[:, :black.min()], low4[:, black.max() + 1:]
    lower, upper = lower ^ _lcg_block(lower.shape), upper ^ _lcg_block(upper.shape)
    return ((upper << 4) | lower).flatten().tobytes()


def read_png_embedding(path: Path) -> dict:
    """The embedding dict (``string_to_param``, ``name``, ...) of an A1111 embedding PNG."""
    try:
        with PIL.Image.open(path) as image:
            image.load()
            text = getattr(image, "text", {}).get(TEXT_CHUNK)
            if text is not None:
                raw = base64.b64decode(text)
            else:
                raw = zlib.decompressobj().decompress(_from_pixels(image))
        data = json.loads(raw, object_hook=_tensors)
    except (OSError, ValueError, binascii.Error, zlib.error, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not an A1111 embedding image (no '{TEXT_CHUNK}' text chunk and no data in "
                         f"its pixels: {str(e)[:200]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the embedding data is a {type(data).__name__}, expected a dict")
    return data

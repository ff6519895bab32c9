"""Image and mask conversion, the same arithmetic as diffusers' VaeImageProcessor.

Images in: PIL, numpy (H,W,C) / (N,H,W,C) in [0,1], or tensors (N,C,H,W) in [0,1].
Model space: float tensors in [-1, 1]. Masks: white (1) = repaint, binarised at 0.5.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

ImageInput = Union[PIL.Image.Image, np.ndarray, torch.Tensor, str, Path, list]


def load_image(image, argument: str = "image"):
    """A path becomes a PIL image; other inputs pass through."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"{argument}: {path} not found")
        with PIL.Image.open(path) as im:
            im.load()
            return im.copy()
    return image


def image_size(image) -> tuple[int, int]:
    """(height, width) of any accepted image input."""
    image = load_image(image)
    if isinstance(image, list):
        image = image[0]
    if isinstance(image, PIL.Image.Image):
        return image.height, image.width
    if isinstance(image, np.ndarray):
        return (image.shape[0], image.shape[1]) if image.ndim == 3 else (image.shape[1], image.shape[2])
    if isinstance(image, torch.Tensor):
        return image.shape[-2], image.shape[-1]
    raise ValueError(f"image: expected a PIL image, numpy array, tensor or path, got {type(image).__name__}")


def to_tensor01(image, height: int, width: int, mode: str, argument: str) -> torch.Tensor:
    """Any input -> (N, C, height, width) float tensor in [0, 1], resized like diffusers."""
    image = load_image(image, argument)
    items = image if isinstance(image, list) else [image]
    items = [load_image(i, argument) for i in items]
    if isinstance(items[0], PIL.Image.Image):
        arrays = []
        for im in items:
            if im.size != (width, height):  # resize first, then convert: the reference's order
                im = im.resize((width, height), resample=PIL.Image.LANCZOS)
            im = im.convert(mode)
            arrays.append(np.array(im).astype(np.float32) / 255.0)
        arr = np.stack(arrays)
        if arr.ndim == 3:
            arr = arr[..., None]
        return torch.from_numpy(arr.transpose(0, 3, 1, 2))
    if isinstance(items[0], np.ndarray):
        arr = np.concatenate(items) if items[0].ndim == 4 else np.stack(items)
        if arr.ndim == 3:
            arr = arr[..., None]
        t = torch.from_numpy(arr.astype(np.float32).transpose(0, 3, 1, 2))
    elif isinstance(items[0], torch.Tensor):
        t = torch.cat(items) if items[0].ndim == 4 else torch.stack(items)
        t = t.float()
    else:
        raise ValueError(f"{argument}: expected a PIL image, numpy array, tensor or path, got {type(items[0]).__name__}")
    if t.shape[-2:] != (height, width):
        t = F.interpolate(t, size=(height, width))
    return t


def preprocess_image(image, height: int, width: int, argument: str = "image") -> torch.Tensor:
    """To (N, 3, H, W) in [-1, 1]."""
    t = to_tensor01(image, height, width, "RGB", argument)
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    if t.shape[1] != 3:
        raise ValueError(f"{argument}: expected 3 colour channels, got {t.shape[1]}")
    return t * 2.0 - 1.0


def preprocess_mask(mask, height: int, width: int, argument: str = "mask_image") -> torch.Tensor:
    """To (N, 1, H, W) of 0/1; white (>= 0.5) marks the area to repaint."""
    t = to_tensor01(mask, height, width, "L", argument)
    if t.shape[1] != 1:
        t = t[:, :1]
    return (t >= 0.5).to(t.dtype)


def postprocess(images: torch.Tensor, output_type: str):
    """Decoded images in [-1, 1] -> "pt" (N,3,H,W in [0,1]), "np" (N,H,W,3) or "pil"."""
    images = (images * 0.5 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images
    arr = images.cpu().permute(0, 2, 3, 1).float().numpy()
    if output_type == "np":
        return arr
    return [PIL.Image.fromarray(a) for a in (arr * 255).round().astype("uint8")]

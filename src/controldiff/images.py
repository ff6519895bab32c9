"""Image and mask inputs: the conventions of diffusers' VaeImageProcessor, checked.

Accepted for every image argument (errors name the argument and what was expected):

- a path: EXIF orientation applied, 16-bit greyscale scaled to 8 bits (not clipped), as
  ``diffusers.utils.load_image``; or a PIL image;
- numpy arrays, channels last: (H, W), (H, W, C) or (N, H, W, C) with C = 1 or 3;
- torch tensors, channels first: (C, H, W) or (N, C, H, W) with C = 1 or 3;
- a list of one of these kinds (a batch).

Values: floats in [0, 1]; images for the VAE may also be in [-1, 1], recognised as
diffusers does it (a negative minimum); uint8 (0..255) and uint16 (0..65535) arrays and
tensors are scaled. Masks (white = repaint): one channel (a colour mask is read by its
first channel, a PIL one as "L"), values in [0, 1], binarised at 0.5; tensors may also be
(H, W) or (N, H, W). NaN or infinite values are refused. Model space: tensors in [-1, 1].
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F

ImageInput = Union[PIL.Image.Image, np.ndarray, torch.Tensor, str, Path, list]

KINDS = ("image", "control", "mask")  # VAE input ([0,1] or [-1,1]), control image ([0,1]), mask ([0,1])
_SLACK = 1e-3  # float rounding past the range ends is tolerated (values are not clamped, as diffusers)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def open_image(path, argument: str = "image") -> PIL.Image.Image:
    """The file as a PIL image in its own mode, EXIF orientation applied; a ValueError
    naming ``argument`` and the file when it is not a readable image."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{argument}: {path} not found")
    try:
        with PIL.Image.open(path) as im:
            im.load()
            return PIL.ImageOps.exif_transpose(im)  # a copy, detached from the file
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as e:
        raise ValueError(f"{argument}: cannot read {path} as an image ({e})") from None


def to_8bit(image: PIL.Image.Image) -> PIL.Image.Image:
    """16-bit greyscale ("I;16", or "I" holding 16-bit values) as 8-bit "L", scaled by 1/257;
    PIL's own conversion would clip everything above 255 to white."""
    if image.mode not in _SIXTEEN_BIT:
        return image
    values = np.asarray(image, dtype=np.float64)
    return PIL.Image.fromarray(np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8), mode="L")


def load_image(image, argument: str = "image"):
    """A path becomes a PIL image (:func:`open_image`, then 8 bits); a 16-bit PIL image
    becomes 8-bit; other inputs pass through unchanged (checked by :func:`as_batch`)."""
    if isinstance(image, (str, Path)):
        image = open_image(image, argument)
    if isinstance(image, PIL.Image.Image):
        return to_8bit(image)
    return image


# ---------------------------------------------------------------------------- checking
def _scaled(t: torch.Tensor, argument: str) -> torch.Tensor:
    """Integer pixels as floats in [0, 1]; floats unchanged."""
    if t.dtype == torch.bool:
        return t.float()
    if t.dtype == torch.uint8:
        return t.float() / 255.0
    if t.dtype == torch.uint16:
        return t.float() / 65535.0
    if t.is_floating_point():
        return t.float()
    raise ValueError(f"{argument}: expected float values in [0, 1] or uint8/uint16 pixels, got dtype {t.dtype}")


def _from_numpy(a: np.ndarray, argument: str, kind: str) -> torch.Tensor:
    """A channels-last array -> (N, C, H, W) tensor."""
    if a.dtype == np.uint16:
        a = a.astype(np.float32) / 65535.0
    elif a.dtype.kind not in "fub":
        raise ValueError(f"{argument}: expected float values in [0, 1] or uint8/uint16 pixels, got dtype {a.dtype}")
    shape = tuple(a.shape)
    if a.ndim == 2:
        a = a[None, :, :, None]
    elif a.ndim == 3:
        if kind == "mask" and a.shape[-1] not in (1, 3):
            a = a[..., None]  # (N, H, W): several masks, as diffusers' mask processor reads them
        else:
            a = a[None]
    elif a.ndim != 4:
        raise ValueError(f"{argument}: expected a numpy array (H, W), (H, W, C) or (N, H, W, C), got shape {shape}")
    if a.shape[-1] not in (1, 3):
        hint = "; for (C, H, W) data transpose it or pass a torch tensor" if a.shape[1] in (1, 3) else ""
        raise ValueError(f"{argument}: numpy arrays are channels last, (H, W, C) or (N, H, W, C) with C = 1 or 3, "
                         f"got shape {shape}{hint}")
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


def _from_tensor(t: torch.Tensor, argument: str, kind: str) -> torch.Tensor:
    """A channels-first tensor -> (N, C, H, W)."""
    shape = tuple(t.shape)
    if kind == "mask" and t.ndim == 2:
        t = t[None, None]
    elif kind == "mask" and t.ndim == 3:
        t = t.unsqueeze(1)  # (N, H, W) or (1, H, W), as diffusers' mask processor
    elif t.ndim == 3:
        t = t[None]
    elif t.ndim != 4:
        forms = "(H, W), (N, H, W) or (N, 1, H, W)" if kind == "mask" else "(C, H, W) or (N, C, H, W)"
        raise ValueError(f"{argument}: expected a tensor {forms}, got shape {shape}")
    if t.shape[1] not in (1, 3):
        hint = "; for (N, H, W, C) data use .permute(0, 3, 1, 2)" if t.shape[-1] in (1, 3) else ""
        raise ValueError(f"{argument}: tensors are channels first, (N, C, H, W) with C = 1 or 3, got shape "
                         f"{shape}{hint}")
    return t


def _check_values(t: torch.Tensor, argument: str, kind: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{argument}: contains NaN or infinite values")
    lo, hi = float(t.min()), float(t.max())
    signed = kind == "image" and lo < 0  # diffusers: a negative minimum means [-1, 1]
    low = -1.0 if signed else 0.0
    if lo < low - _SLACK or hi > 1.0 + _SLACK:
        accepted = "[0, 1] (or [-1, 1])" if kind == "image" else "[0, 1]"
        looks_8bit = lo >= 0 and 1.0 + _SLACK < hi <= 255.0
        hint = "; divide 0..255 data by 255, or pass a uint8 array" if looks_8bit else ""
        raise ValueError(f"{argument}: expected values in {accepted}, got [{lo:g}, {hi:g}]{hint}")


def as_batch(image, argument: str = "image", kind: str = "image") -> Union[list, torch.Tensor]:
    """Any accepted input as a list of PIL images or an (N, C, H, W) float tensor, checked
    (layout, channels, finite values in range). ``kind``: "image" (VAE input), "control"
    (a control image, [0, 1] only) or "mask"."""
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    items = image if isinstance(image, (list, tuple)) else [image]
    if not items:
        raise ValueError(f"{argument}: got an empty list of images")
    items = [load_image(i, argument) for i in items]
    forms = (PIL.Image.Image, np.ndarray, torch.Tensor)
    form = next((f for f in forms if isinstance(items[0], f)), None)
    bad = next((i for i in items if not isinstance(i, forms)), None)
    if form is None or bad is not None:
        found = type(items[0] if form is None else bad).__name__
        raise ValueError(f"{argument}: expected a PIL image, numpy array, torch tensor or path, got {found}")
    if not all(isinstance(i, form) for i in items):
        raise ValueError(f"{argument}: a list of images must hold one kind (all PIL, all arrays or all tensors)")
    if form is PIL.Image.Image:
        return items
    convert = _from_numpy if form is np.ndarray else _from_tensor
    parts = [convert(i, argument, kind) for i in items]
    if len({tuple(p.shape[1:]) for p in parts}) > 1:
        raise ValueError(f"{argument}: the images of a list differ in size or channels: "
                         f"{sorted({tuple(p.shape[1:]) for p in parts})}")
    t = torch.cat([_scaled(p, argument) for p in parts])
    _check_values(t, argument, kind)
    return t


def image_size(image, argument: str = "image", kind: str = "image") -> tuple[int, int]:
    """(height, width) of any accepted image input (the first image of a list)."""
    batch = as_batch(image, argument, kind)
    if isinstance(batch, list):
        return batch[0].height, batch[0].width
    return int(batch.shape[-2]), int(batch.shape[-1])


# ---------------------------------------------------------------------------- converting
def to_tensor(image, height: int, width: int, mode: str, argument: str, kind: str) -> torch.Tensor:
    """Any input -> (N, C, height, width) float tensor, resized like diffusers: PIL with
    Lanczos, then converted to ``mode``; arrays and tensors by nearest interpolation."""
    batch = as_batch(image, argument, kind)
    if isinstance(batch, list):
        arrays = []
        for im in batch:
            if im.size != (width, height):  # resize first, then convert: the reference's order
                im = im.resize((width, height), resample=PIL.Image.LANCZOS)
            arrays.append(np.array(im.convert(mode)).astype(np.float32) / 255.0)
        arr = np.stack(arrays)
        if arr.ndim == 3:
            arr = arr[..., None]
        return torch.from_numpy(arr.transpose(0, 3, 1, 2))
    if batch.shape[-2:] != (height, width):
        batch = F.interpolate(batch, size=(height, width))
    return batch


def to_tensor01(image, height: int, width: int, mode: str, argument: str) -> torch.Tensor:
    """A control image as (N, C, height, width) in [0, 1]."""
    return to_tensor(image, height, width, mode, argument, "control")


def preprocess_image(image, height: int, width: int, argument: str = "image") -> torch.Tensor:
    """To (N, 3, H, W) in [-1, 1]; input already in [-1, 1] (negative minimum) is kept, as diffusers."""
    t = to_tensor(image, height, width, "RGB", argument, "image")
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    if t.shape[1] != 3:
        raise ValueError(f"{argument}: expected 3 colour channels, got {t.shape[1]}")
    return t if float(t.min()) < 0 else t * 2.0 - 1.0


def preprocess_mask(mask, height: int, width: int, argument: str = "mask_image") -> torch.Tensor:
    """To (N, 1, H, W) of 0/1; white (>= 0.5) marks the area to repaint."""
    t = to_tensor(mask, height, width, "L", argument, "mask")[:, :1]
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

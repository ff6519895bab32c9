"""Training image transforms, as diffusers' training scripts do them with torchvision:
resize the shorter side to the resolution, crop (center or random), optionally flip, scale
to [-1, 1]. Random choices use torch's global RNG exactly as torchvision does, so a seed
gives the crops of the reference scripts."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = ["BucketTransform", "INTERPOLATIONS", "ImageTransform", "load_rgb"]

INTERPOLATIONS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                  "box": Image.BOX, "hamming": Image.HAMMING, "lanczos": Image.LANCZOS}


def load_rgb(path) -> Image.Image:
    """The image at ``path``, EXIF orientation applied, in RGB (as the scripts load it)."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        return im.convert("RGB") if im.mode != "RGB" else im.copy()


@dataclass(frozen=True)
class ImageTransform:
    """``transform(image) -> (tensor (3, R, R) in [-1, 1], (top, left) of the crop in the resized image)``."""

    resolution: int
    center_crop: bool = False
    flip: bool = False
    interpolation: str = "lanczos"  # the scripts' default

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation: expected one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r}")

    @property
    def random(self) -> bool:
        """Whether the same image can give different tensors (random crop or flip)."""
        return self.flip or not self.center_crop

    def resized(self, w: int, h: int) -> tuple[int, int]:
        """Shorter side to the resolution; the longer one truncated, as torchvision's Resize(int)."""
        r = self.resolution
        return (r, int(r * h / w)) if w <= h else (int(r * w / h), r)

    def resize(self, img: Image.Image) -> Image.Image:
        size = self.resized(*img.size)
        return img if size == img.size else img.resize(size, INTERPOLATIONS[self.interpolation])

    def crop_box(self, img: Image.Image) -> tuple[int, int]:
        w, h = img.size
        r = self.resolution
        if self.center_crop:
            return int(round((h - r) / 2.0)), int(round((w - r) / 2.0))
        if (w, h) == (r, r):
            return 0, 0
        top = torch.randint(0, h - r + 1, size=(1,)).item()
        left = torch.randint(0, w - r + 1, size=(1,)).item()
        return top, left

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        img = self.resize(img)
        top, left = self.crop_box(img)
        r = self.resolution
        return _tensor(img.crop((left, top, left + r, top + r)), self.flip), (top, left)


def _tensor(img: Image.Image, flip: bool) -> torch.Tensor:
    """Optionally flipped (torchvision's RandomHorizontalFlip draw), scaled to [-1, 1]."""
    if flip and torch.rand(1) < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).contiguous().float().div(255)
    return (x - 0.5) / 0.5


@dataclass(frozen=True)
class BucketTransform(ImageTransform):
    """For aspect-ratio buckets (``buckets.py``), as kohya's ``trim_and_resize_if_required``: resize
    to cover the bucket (scale rounded half up), center crop to it, optionally flip.
    ``transform(image, (width, height)) -> (tensor (3, height, width), (top, left))``."""

    center_crop: bool = True

    def resized_to(self, w: int, h: int, size: tuple[int, int]) -> tuple[int, int]:
        scale = size[1] / h if w / h > size[0] / size[1] else size[0] / w
        return int(w * scale + 0.5), int(h * scale + 0.5)

    def crop_to(self, w: int, h: int, size: tuple[int, int]) -> tuple[int, int]:
        """(top, left) of the crop in the image of (w, h) resized for ``size``."""
        w, h = self.resized_to(w, h, size)
        return (h - size[1]) // 2, (w - size[0]) // 2

    def __call__(self, img: Image.Image, size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        top, left = self.crop_to(*img.size, size)
        resized = self.resized_to(*img.size, size)
        if resized != img.size:
            img = img.resize(resized, INTERPOLATIONS[self.interpolation])
        return _tensor(img.crop((left, top, left + size[0], top + size[1])), self.flip), (top, left)

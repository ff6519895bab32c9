"""The few torchvision transforms diffusers' training scripts use, written as torchvision 0.2x
does them on PIL images (``torchvision/transforms/transforms.py`` and ``functional.py``), with
the same use of torch's global RNG. torchvision cannot be installed beside our torch; the
parity tests install this as ``sys.modules["torchvision"]``. Test-only reference code."""
from __future__ import annotations

import enum
import importlib.machinery
import sys
import types

import numpy as np
import torch
from PIL import Image


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


_PIL = {InterpolationMode.NEAREST: Image.NEAREST, InterpolationMode.BILINEAR: Image.BILINEAR,
        InterpolationMode.BICUBIC: Image.BICUBIC, InterpolationMode.BOX: Image.BOX,
        InterpolationMode.HAMMING: Image.HAMMING, InterpolationMode.LANCZOS: Image.LANCZOS}


def _size(size):
    return (size, size) if isinstance(size, int) else tuple(size)


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, img):
        for t in self.transforms:
            img = t(img)
        return img


class Resize:
    """An int: the shorter side becomes ``size``, the longer ``int(size * long / short)``."""

    def __init__(self, size, interpolation=InterpolationMode.BILINEAR, antialias=True):
        self.size, self.interpolation = size, interpolation

    def __call__(self, img):
        w, h = img.size
        if isinstance(self.size, int):
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.size, int(self.size * long / short)
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        else:
            new_h, new_w = self.size
        if (new_w, new_h) == (w, h):
            return img
        return img.resize((new_w, new_h), _PIL[self.interpolation])


def crop(img, top, left, height, width):
    return img.crop((left, top, left + width, top + height))


def center_crop(img, output_size):
    th, tw = _size(output_size)
    w, h = img.size
    top = int(round((h - th) / 2.0))
    left = int(round((w - tw) / 2.0))
    return crop(img, top, left, th, tw)


class CenterCrop:
    def __init__(self, size):
        self.size = _size(size)

    def __call__(self, img):
        return center_crop(img, self.size)


class RandomCrop:
    def __init__(self, size):
        self.size = _size(size)

    @staticmethod
    def get_params(img, output_size):
        w, h = img.size
        th, tw = output_size
        if h == th and w == tw:
            return 0, 0, h, w
        i = torch.randint(0, h - th + 1, size=(1,)).item()
        j = torch.randint(0, w - tw + 1, size=(1,)).item()
        return i, j, th, tw

    def __call__(self, img):
        i, j, h, w = self.get_params(img, self.size)
        return crop(img, i, j, h, w)


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, img):
        if torch.rand(1) < self.p:
            return img.transpose(Image.FLIP_LEFT_RIGHT)
        return img


class ToTensor:
    def __call__(self, pic):
        arr = np.array(pic, copy=True)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        t = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
        return t.float().div(255) if t.dtype == torch.uint8 else t.float()


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = mean, std

    def __call__(self, t):
        mean = torch.as_tensor(self.mean, dtype=t.dtype).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=t.dtype).view(-1, 1, 1)
        return (t - mean) / std


class _Functional(types.ModuleType):
    crop = staticmethod(crop)
    center_crop = staticmethod(center_crop)

    @staticmethod
    def hflip(img):
        return img.transpose(Image.FLIP_LEFT_RIGHT)


def install() -> None:
    """Make ``import torchvision`` / ``from torchvision import transforms`` find this module."""
    transforms = types.ModuleType("torchvision.transforms")
    for name in ("InterpolationMode", "Compose", "Resize", "CenterCrop", "RandomCrop", "RandomHorizontalFlip",
                 "ToTensor", "Normalize"):
        setattr(transforms, name, globals()[name])
    functional = _Functional("torchvision.transforms.functional")
    transforms.functional = functional
    root = types.ModuleType("torchvision")
    root.transforms = transforms
    for m in (root, transforms, functional):
        m.__spec__ = importlib.machinery.ModuleSpec(m.__name__, None)
    sys.modules.update({"torchvision": root, "torchvision.transforms": transforms,
                        "torchvision.transforms.functional": functional})

"""The training data: a folder of images with optional same-name ``.txt`` captions.

Everything that can be wrong with the folder is found before the models load, each error
naming the file: no images, an image that cannot be read or is smaller than the training
resolution, a caption that is not UTF-8 text, an image with neither caption nor prompt.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from PIL import Image

from ..text.encode import check_text

__all__ = ["Example", "IMAGE_SUFFIXES", "read_folder"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class Example:
    """One training image, its caption and its size (width, height) as loaded: EXIF orientation applied."""

    path: Path
    caption: str
    size: tuple[int, int]


def _caption(image: Path, prompt: Optional[str]) -> str:
    txt = image.with_suffix(".txt")
    if not txt.is_file():
        if prompt is None:
            raise ValueError(f"prompt: {image} has no caption file ({txt.name}); add one or pass a prompt "
                             "for images without captions")
        return prompt
    try:
        return check_text(txt.read_bytes().decode("utf-8").strip(), str(txt))
    except UnicodeDecodeError as e:
        raise ValueError(f"{txt}: the caption is not UTF-8 text (byte 0x{txt.read_bytes()[e.start]:02x} at "
                         f"offset {e.start}); save it as UTF-8 text") from None


#: EXIF orientations that turn the image by 90 degrees (transforms.load_rgb applies them)
_TURNED = (5, 6, 7, 8)


def _size(image: Path) -> tuple[int, int]:
    try:
        with Image.open(image) as im:
            im.verify()  # decodes enough to find truncated or corrupt files (and must come first)
        with Image.open(image) as im:
            (w, h), turned = im.size, im.getexif().get(0x0112) in _TURNED
    except Exception as e:  # PIL raises many kinds
        raise ValueError(f"{image}: cannot read the image ({type(e).__name__}: {e})") from None
    return (h, w) if turned else (w, h)


def read_folder(folder, resolution: int, prompt: Optional[str] = None) -> list[Example]:
    """The folder's images (sorted by name) with their captions, checked.

    An image's caption is ``NAME.txt`` beside ``NAME.png``; images without one get ``prompt``.
    Each image's shorter side must be at least ``resolution`` (it is resized down, never up,
    so training sees no upscaled pixels)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"data: {folder} is not a folder" + ("" if folder.exists() else " (it does not exist)"))
    if prompt is not None:
        check_text(prompt, "prompt")
    try:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    except OSError as e:
        raise ValueError(f"data: cannot list {folder} ({e.strerror})") from None
    if not files:
        raise ValueError(f"data: {folder} holds no images (looked for {', '.join(IMAGE_SUFFIXES)})")
    examples = []
    for path in files:
        w, h = _size(path)
        if min(w, h) < resolution:
            raise ValueError(f"{path}: the image is {w}x{h}, smaller than the resolution {resolution} "
                             f"(its shorter side must be at least {resolution}); use a larger image or a "
                             "smaller resolution")
        examples.append(Example(path, _caption(path, prompt), (w, h)))
    return examples

"""A pixel-analysis judge for the synthetic scenes: does an image show what its caption asks?

No learned weights, so the judge cannot share a model's blind spots. It finds the background
(the border's commonest colour), the foreground blobs (pixels well away from the background,
connected, specks dropped; each grown to where its own colour covers half a pixel), and reads
each blob's colour (the named colour it is, or is blended from with the background), position
(bounding-box centre -> nearest named position), and shape and size together: the nearest of
the references ``scenes.render`` itself draws (every shape at both sizes, sharp and blurred),
compared on the silhouette scaled to 8x8, its convexity and its area. Blobs are matched to
the caption's objects by the assignment that agrees on the most attributes.

    v = judge(image, "a small red circle at the top left on a blue background")
    v.scores  # {"colour": 1.0, "shape": 1.0, "position": 1.0, "size": 1.0, "present": 1.0,
              #  "background": 1.0, "count": 1.0, "all_present": 1.0}

Attribute scores are fractions over the objects that are present (a missing object counts
once, under "present", not again under colour or shape), so each mistake shows in its own
column; ``summarize`` averages them over many images for the benchmark tables.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Optional, Sequence, Union

import numpy as np
from PIL import Image
from scipy import ndimage

from .scenes import COLOURS, MAX_OBJECTS, NEW_SHAPES, POSITIONS, SHAPES, SIZE, SIZES, Scene, Thing, render

_NAMES = list(COLOURS)
_RGB = np.array([COLOURS[c] for c in _NAMES], np.float32)
_ALL_SHAPES = SHAPES + NEW_SHAPES
_TEMPLATE = 8  # silhouettes compared at 8x8: enough for a triangle's apex or a star's points
_ATTRIBUTES = ("colour", "shape", "position", "size")


# --- captions --------------------------------------------------------------------------------

def parse_caption(text: str) -> Scene:
    """The caption grammar's inverse: ``parse_caption(scene.caption()) == scene``.

    Case and spacing are free; the word order is the grammar's. A word it cannot read raises
    ValueError naming the word, its place and what was expected there."""
    if not isinstance(text, str):
        raise TypeError(f"caption: expected a str, got {type(text).__name__}")
    words = text.lower().split()
    pos = 0

    def take(expected: Sequence[str], what: str) -> str:
        nonlocal pos
        if pos >= len(words):
            raise ValueError(f"caption {text!r}: ended after word {pos}; expected {what} ({_one_of(expected)})")
        word = words[pos]
        if word not in expected:
            raise ValueError(f"caption {text!r}: cannot read word {pos + 1} {word!r}; "
                             f"expected {what} ({_one_of(expected)})")
        pos += 1
        return word

    things = []
    while True:
        take(("a",), "'a'")
        size = take(list(SIZES), "a size")
        colour = take(list(COLOURS), "a colour")
        shape = take(list(_ALL_SHAPES), "a shape")
        take(("at",), "'at'")
        take(("the",), "'the'")
        first = take(sorted({p.split()[0] for p in POSITIONS}), "a position")
        if first in POSITIONS:
            position = first
        else:
            position = f"{first} {take(sorted({p.split()[1] for p in POSITIONS if ' ' in p}), 'left or right')}"
        things.append(Thing(colour, shape, position, size))
        if take(("and", "on"), "'and' or 'on'") == "on":
            break
        if len(things) == MAX_OBJECTS:
            raise ValueError(f"caption {text!r}: word {pos} 'and' starts object {MAX_OBJECTS + 1}; "
                             f"expected at most {MAX_OBJECTS} objects")
    take(("a",), "'a'")
    background = take(list(COLOURS), "a background colour")
    take(("background",), "'background'")
    if pos < len(words):
        raise ValueError(f"caption {text!r}: cannot read word {pos + 1} {words[pos]!r}; "
                         "expected the end of the caption")
    return Scene(tuple(things), background)


def _one_of(words: Sequence[str]) -> str:
    return ", ".join(repr(w) for w in words) if len(words) > 1 else repr(words[0])


# --- what the image shows ---------------------------------------------------------------------

@dataclass(frozen=True)
class Blob:
    """One foreground object as the judge reads it."""
    colour: str
    shape: str
    position: str
    size: str
    area: int
    centre: tuple[float, float]  # (x, y), bounding-box centre, pixels
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    rgb: tuple[int, int, int]  # measured colour


@dataclass(frozen=True)
class ObjectVerdict:
    """One caption object against the blob matched to it (None: not present)."""
    thing: Thing
    blob: Optional[Blob]

    @property
    def present(self) -> bool:
        return self.blob is not None

    def correct(self, attribute: str) -> Optional[bool]:
        """Whether the matched blob has the caption's ``attribute``; None when absent."""
        return None if self.blob is None else getattr(self.blob, attribute) == getattr(self.thing, attribute)

    @property
    def marks(self) -> dict[str, Optional[bool]]:
        """present, and colour/shape/position/size right (None when absent)."""
        return {"present": self.present, **{a: self.correct(a) for a in _ATTRIBUTES}}


@dataclass(frozen=True)
class Verdict:
    scene: Scene
    background: str  # what the judge found
    blobs: tuple[Blob, ...]
    objects: tuple[ObjectVerdict, ...]

    @property
    def scores(self) -> dict[str, Optional[float]]:
        """attribute -> fraction correct. colour/shape/position/size: over the objects present
        (None when none is); present: fraction of objects found; background, count (blobs ==
        objects) and all_present: 0 or 1."""
        found = [o for o in self.objects if o.present]
        out: dict[str, Optional[float]] = {
            a: (sum(o.correct(a) for o in found) / len(found) if found else None) for a in _ATTRIBUTES
        }
        out["present"] = len(found) / len(self.objects)
        out["background"] = float(self.background == self.scene.background)
        out["count"] = float(len(self.blobs) == len(self.objects))
        out["all_present"] = float(len(found) == len(self.objects))
        return out

    @property
    def wrong(self) -> set[str]:
        """The attributes that are not fully right (empty: the image shows the caption)."""
        return {k for k, v in self.scores.items() if v is not None and v < 1} | (
            set(_ATTRIBUTES) if not any(o.present for o in self.objects) else set())

    @property
    def correct(self) -> bool:
        return not self.wrong


def judge(image: Union[Image.Image, np.ndarray], prompt: Union[str, Scene]) -> Verdict:
    """Read ``image`` (PIL or HxWx3 array, uint8 0..255 or float 0..1; resized to
    ``scenes.SIZE`` if needed) and compare it with ``prompt`` (a caption or a Scene)."""
    scene = parse_caption(prompt) if isinstance(prompt, str) else prompt
    if not isinstance(scene, Scene):
        raise TypeError(f"prompt: expected a caption str or a Scene, got {type(prompt).__name__}")
    if not scene.things:
        raise ValueError("prompt: expected a scene with at least one object, got none")
    background, blobs = analyse(_pixels(image))
    return Verdict(scene, background, blobs, _match(scene.things, blobs))


def summarize(verdicts: Iterable[Verdict]) -> dict[str, float]:
    """Accuracies over many images: colour, shape, position, size (per object present),
    present (per object), background, count and all_present (per image), plus n (images)."""
    verdicts = list(verdicts)
    if not verdicts:
        raise ValueError("verdicts: expected at least one Verdict, got none")
    out: dict[str, float] = {}
    for a in _ATTRIBUTES:
        marks = [o.correct(a) for v in verdicts for o in v.objects if o.present]
        out[a] = sum(marks) / len(marks) if marks else 0.0
    objects = [o for v in verdicts for o in v.objects]
    out["present"] = sum(o.present for o in objects) / len(objects)
    for key in ("background", "count", "all_present"):
        out[key] = sum(v.scores[key] for v in verdicts) / len(verdicts)
    out["correct"] = sum(v.correct for v in verdicts) / len(verdicts)
    out["n"] = len(verdicts)
    return out


def _pixels(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        if image.size != (SIZE, SIZE):
            image = image.resize((SIZE, SIZE), Image.BOX if min(image.size) > SIZE else Image.BILINEAR)
        return np.asarray(image, np.float32)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ValueError(f"image: expected an HxWx3 array, got shape {image.shape}")
        arr = image[..., :3].astype(np.float32)
        if image.dtype.kind == "f":
            if arr.min() < -1e-3 or arr.max() > 1 + 1e-3:
                raise ValueError(f"image: expected floats in [0, 1], got {arr.min():.3g}..{arr.max():.3g}")
            arr = arr * 255
        if arr.shape[:2] != (SIZE, SIZE):
            return _pixels(Image.fromarray(arr.clip(0, 255).round().astype(np.uint8)))
        return arr
    raise TypeError(f"image: expected a PIL image or a numpy array, got {type(image).__name__}")


def _nearest_colour(rgb: np.ndarray) -> np.ndarray:
    return np.argmin(((rgb[..., None, :] - _RGB) ** 2).sum(-1), axis=-1)


def colour_area(pixels: np.ndarray, colour: str) -> float:
    """Fraction of the (H, W, 3) uint8 ``pixels`` (any size) nearer to ``colour`` than to any
    other named colour, and within 60 of it: how much of a picture a colour covers."""
    d = ((pixels.reshape(-1, 1, 3).astype(np.float32) - _RGB[None]) ** 2).sum(-1)
    return float(((d.argmin(1) == _NAMES.index(colour)) & (d.min(1) < 60.0 ** 2)).mean())


_MIN_MIX = 0.6  # a blob's colour may be this little of a named colour, the rest background


def _colour_name(rgb: np.ndarray, bg: np.ndarray) -> str:
    """The named colour ``rgb`` is, or is mixed from with the background: a small or blurred
    object has no pure pixel, so a yellow star on black reads dark yellow, not orange."""
    axis = _RGB - bg
    t = np.clip(((rgb - bg) * axis).sum(-1) / np.maximum((axis ** 2).sum(-1), 1e-6), _MIN_MIX, 1)
    return _NAMES[int(np.argmin(((bg + t[:, None] * axis - rgb) ** 2).sum(-1)))]


def analyse(pixels: np.ndarray) -> tuple[str, tuple[Blob, ...]]:
    """(background colour name, blobs largest first) of a SIZE x SIZE x 3 float image."""
    return _analyse(pixels, _nearest_reference)


def _analyse(pixels: np.ndarray, classify) -> tuple[str, tuple[Blob, ...]]:
    """``classify(cover, mask) -> (shape, size)`` reads each blob's silhouette (its coverage
    and its pixels over one half, cropped to its bounding box)."""
    border = _border(pixels)
    votes = _nearest_colour(border)
    bg_index = int(np.bincount(votes, minlength=len(_NAMES)).argmax())
    bg_pixels = border[votes == bg_index]
    bg = np.median(bg_pixels, axis=0)
    noise = float(np.median(np.abs(bg_pixels - bg)) * 1.4826)
    # Noisy pictures are smoothed first: per-pixel noise of sigma 20 would otherwise cross any
    # threshold that still keeps a yellow object on an orange background.
    work = ndimage.gaussian_filter(pixels, sigma=(1, 1, 0)) if noise > 4 else pixels
    dist = np.linalg.norm(work - bg, axis=-1)
    others = np.delete(_RGB, bg_index, axis=0)
    # Objects stand out by half the gap to the nearest other colour, and well above what
    # the background itself wanders (nothing stands out of a picture of pure noise).
    seed_threshold = max(0.5 * float(np.linalg.norm(others - bg, axis=-1).min()),
                         4 * float(np.median(_border(dist[..., None]))))
    labels, _ = ndimage.label(dist > seed_threshold)
    blobs = []
    taken = np.zeros(dist.shape, bool)
    for index, window in enumerate(ndimage.find_objects(labels), start=1):
        seed = labels == index
        if seed.sum() < _MIN_SEED:
            continue
        while (blob := _blob(work, bg, dist, seed, window, taken, classify)) is not None:
            blobs.append(blob)
            # Touching objects of two colours share a seed: what the first one leaves (less
            # its blended rim) may be another.
            rest, n = ndimage.label(seed & ~ndimage.binary_dilation(taken, iterations=2))
            if not n:
                break
            sizes = np.bincount(rest.ravel())[1:]
            if sizes.max() < _MIN_AREA:
                break
            seed = rest == sizes.argmax() + 1
    blobs.sort(key=lambda b: -b.area)
    return _NAMES[bg_index], tuple(blobs)


def _border(a: np.ndarray) -> np.ndarray:
    """The pixels of a 2-pixel ring around the picture, (N, channels)."""
    c = a.shape[-1]
    return np.concatenate([a[:2].reshape(-1, c), a[-2:].reshape(-1, c),
                           a[2:-2, :2].reshape(-1, c), a[2:-2, -2:].reshape(-1, c)])


_MIN_SEED = 6  # pixels: specks below this are noise, not objects
_MIN_AREA = 20  # the smallest object drawn (a small star) has about 60
_OFF_LINE = 0.4  # of the colour's distance to the background: farther is another colour
_MAX_AREA = SIZE * SIZE // 4  # the largest (a large square) has 462; more is a failed background


def _blob(work, bg, dist, seed, window, taken, classify) -> Optional[Blob]:
    # The blob's own colour: its most saturated pixels (edges are mixtures with the background).
    core = seed & (dist >= np.quantile(dist[seed], 0.75))
    rgb = np.median(work[core], axis=0)
    # Coverage of each pixel by that colour (0 = background, 1 = the colour), in a margin
    # around the seed; the silhouette is where coverage passes one half.
    ys, xs = window
    y0, y1 = max(ys.start - 3, 0), min(ys.stop + 3, SIZE)
    x0, x1 = max(xs.start - 3, 0), min(xs.stop + 3, SIZE)
    axis = rgb - bg
    offset = work[y0:y1, x0:x1] - bg
    cover = np.clip((offset @ axis) / float(axis @ axis), 0, 1)
    # ...and near the line from the background to it: a touching object of another colour
    # may project past one half too.
    off_line = np.linalg.norm(offset - cover[..., None] * axis, axis=-1)
    cover[off_line > _OFF_LINE * np.linalg.norm(axis)] = 0
    solid = cover > 0.5
    parts, _ = ndimage.label(solid)
    keep = np.unique(parts[seed[y0:y1, x0:x1] & solid])
    mask = np.isin(parts, keep[keep > 0]) & ~taken[y0:y1, x0:x1]
    mask = ndimage.binary_fill_holes(mask)
    area = int(mask.sum())
    if not _MIN_AREA <= area <= _MAX_AREA:
        return None
    taken[y0:y1, x0:x1] |= mask
    rows, cols = np.nonzero(mask)
    by0, by1, bx0, bx1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    centre = ((x0 + bx0 + x0 + bx1) / 2, (y0 + by0 + y0 + by1) / 2)
    shape, size = classify(cover[by0:by1, bx0:bx1], mask[by0:by1, bx0:bx1])
    return Blob(
        colour=_colour_name(rgb, bg),
        shape=shape,
        position=min(POSITIONS, key=lambda p: (POSITIONS[p][0] - centre[0]) ** 2 + (POSITIONS[p][1] - centre[1]) ** 2),
        size=size,
        area=area, centre=centre,
        bbox=(int(x0 + bx0), int(y0 + by0), int(x0 + bx1), int(y0 + by1)),
        rgb=tuple(int(round(float(v))) for v in rgb),
    )


def _features(cover: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """What a blob is compared on: its soft silhouette scaled to its bounding box at
    _TEMPLATE x _TEMPLATE (a triangle's apex, a square's corners), how much of its convex hull
    it fills (a star's points, a cross's arms) and its log area (which size, and a blurred
    small star from a circle, whose silhouettes both round off)."""
    template = np.asarray(Image.fromarray(cover.astype(np.float32)).resize((_TEMPLATE, _TEMPLATE), Image.BILINEAR))
    return np.concatenate([template.ravel() / _TEMPLATE, [_solidity(mask), np.log(mask.sum())]])


def _solidity(mask: np.ndarray) -> float:
    """Area over convex-hull area, with pixels as unit squares (1 for a convex shape)."""
    rows = np.nonzero(mask.any(axis=1))[0]
    left = mask[rows].argmax(axis=1)
    right = mask.shape[1] - mask[rows, ::-1].argmax(axis=1)
    # Each row's outer pixel corners; only a row's two ends can be on the hull.
    ys = np.concatenate([rows, rows + 1, rows, rows + 1])
    xs = np.concatenate([left, left, right, right])
    points = sorted(set(zip(xs.tolist(), ys.tolist())))
    x, y = np.array(_convex_hull(points), float).T
    hull_area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
    return float(mask.sum() / hull_area) if hull_area > 0 else 1.0


def _convex_hull(points: list) -> list:
    """Andrew's monotone chain on sorted (x, y) points."""
    def half(seq):
        out = []
        for p in seq:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(p)
        return out
    lower, upper = half(points), half(points[::-1])
    return lower[:-1] + upper[:-1]


_REFERENCE_BLURS = (0, 0.6, 1.0, 1.4)  # Gaussian sigmas, pixels: a small model's edges are soft


@lru_cache(maxsize=1)
def _references() -> tuple[list[tuple[str, str]], np.ndarray]:
    """(shape, size) of every shape at both sizes as ``scenes.render`` draws it, sharp and
    softened, and the features the judge's own reading finds in each: what blobs are compared to."""
    labels, vectors = [], []
    for shape in _ALL_SHAPES:
        for size in SIZES:
            pixels = np.asarray(render(Scene((Thing("white", shape, "center", size),), "black")), np.float32)
            for blur in _REFERENCE_BLURS:
                found: list = []
                soft = ndimage.gaussian_filter(pixels, sigma=(blur, blur, 0)) if blur else pixels
                _analyse(soft, lambda cover, mask: found.append(_features(cover, mask)) or (shape, size))
                labels.append((shape, size))
                vectors.append(found[0])
    return labels, np.stack(vectors)


def _nearest_reference(cover: np.ndarray, mask: np.ndarray) -> tuple[str, str]:
    labels, vectors = _references()
    return labels[int(np.argmin(((vectors - _features(cover, mask)) ** 2).sum(-1)))]


# --- matching ---------------------------------------------------------------------------------

def _match(things: Sequence[Thing], blobs: Sequence[Blob]) -> tuple[ObjectVerdict, ...]:
    """The assignment of blobs to objects agreeing on the most attributes (ties: nearest
    centres); objects left without a blob are absent."""
    candidates = list(blobs[: MAX_OBJECTS + 5])
    best, best_key = None, None
    slots = candidates + [None] * len(things)
    for choice in itertools.permutations(range(len(slots)), len(things)):
        picked = [slots[i] for i in choice]
        agree = present = 0
        dist = 0.0
        for thing, blob in zip(things, picked):
            if blob is None:
                continue
            present += 1
            agree += sum(getattr(blob, a) == getattr(thing, a) for a in _ATTRIBUTES)
            tx, ty = POSITIONS[thing.position]
            dist += (blob.centre[0] - tx) ** 2 + (blob.centre[1] - ty) ** 2
        key = (present, agree, -dist)
        if best_key is None or key > best_key:
            best, best_key = picked, key
    return tuple(ObjectVerdict(t, b) for t, b in zip(things, best))

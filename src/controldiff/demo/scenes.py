"""Synthetic scenes: coloured shapes on a plain background, with captions from a grammar.

The embedded default model is trained on these (``demo/recipe.py``) and judged on them
(``demo/judge.py``), so every control can be measured: what a caption asks for is known
exactly, and so are the edge and position maps a ControlNet needs and the edits an
InstructPix2Pix-style model learns. Everything is a pure function of a seed.

    "a small red circle at the top left on a blue background"
    "a large green square at the center and a small white triangle at the top right on a black background"
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # pixels; the model's own size
_SUPER = 4  # drawn at 4x and averaged down: anti-aliased edges, as photographs have

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 220, 40),
    "purple": (150, 60, 200), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
NEW_SHAPES = ("star", "cross")  # never in the base training data: DreamBooth and textual inversion learn them
POSITIONS = {  # centre of each position, in pixels
    "top left": (16, 16), "top right": (48, 16), "bottom left": (16, 48), "bottom right": (48, 48),
    "center": (32, 32),
}
SIZES = {"small": 7, "large": 12}  # half-width in pixels
MAX_OBJECTS = 3
WORDS = sorted({"a", "at", "the", "on", "and", "background", "make", "turn", "into", "of",
                *COLOURS, *SHAPES, *NEW_SHAPES, *SIZES, *(w for p in POSITIONS for w in p.split())})


@dataclass(frozen=True)
class Thing:
    colour: str
    shape: str
    position: str
    size: str

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} at the {self.position}"


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]
    background: str

    def caption(self) -> str:
        return " and ".join(t.phrase() for t in self.things) + f" on a {self.background} background"


def held_out() -> frozenset[tuple[str, str, str, str]]:
    """30 (colour, shape, position, size) objects never drawn in training: the judge's
    targets are measured on captions made of these, so the model must compose, not recall."""
    combos = [(c, s, p, z) for c in COLOURS for s in SHAPES for p in POSITIONS for z in SIZES]
    return frozenset(random.Random(20261202).sample(combos, 30))


def _thing(rng: random.Random, position: str, size: str, shapes=SHAPES) -> Thing:
    return Thing(rng.choice(list(COLOURS)), rng.choice(shapes), position, size)


def sample(rng: random.Random, *, count: Optional[int] = None, held: str = "exclude", shapes=SHAPES) -> Scene:
    """A random scene. ``held``: "exclude" (training: no held-out object), "only" (one
    held-out object, for evaluation) or "any". Objects never overlap: a scene with an object
    at the center and another one has small objects only."""
    if held not in ("exclude", "only", "any"):
        raise ValueError(f"held: expected 'exclude', 'only' or 'any', got {held!r}")
    held_set = held_out()
    if held == "only":
        colour, shape, position, size = rng.choice(sorted(held_set))
        thing = Thing(colour, shape, position, size)
        return Scene((thing,), rng.choice([c for c in COLOURS if c != colour]))
    n = count if count is not None else rng.choice((1, 1, 2, 3))
    if not 1 <= n <= MAX_OBJECTS:
        raise ValueError(f"count: expected 1 to {MAX_OBJECTS}, got {n}")
    while True:
        positions = rng.sample(list(POSITIONS), n)
        small_only = n > 1 and "center" in positions
        things = tuple(_thing(rng, p, "small" if small_only else rng.choice(list(SIZES)), shapes) for p in positions)
        if held == "exclude" and any((t.colour, t.shape, t.position, t.size) in held_set for t in things):
            continue
        colours = {t.colour for t in things}
        backgrounds = [c for c in COLOURS if c not in colours]
        return Scene(things, rng.choice(backgrounds))


def _draw_shape(draw: ImageDraw.ImageDraw, thing: Thing, fill) -> None:
    cx, cy = (v * _SUPER for v in POSITIONS[thing.position])
    r = SIZES[thing.size] * _SUPER
    if thing.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif thing.shape == "square":
        h = round(r * 0.9)  # about the circle's area
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif thing.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif thing.shape == "star":
        pts = []
        for k in range(10):
            a = np.pi / 2 + k * np.pi / 5
            rr = r if k % 2 == 0 else r * 0.45
            pts.append((cx + rr * np.cos(a), cy - rr * np.sin(a)))
        draw.polygon(pts, fill=fill)
    elif thing.shape == "cross":
        w = round(r * 0.35)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        raise ValueError(f"shape: expected one of {SHAPES + NEW_SHAPES}, got {thing.shape!r}")


def masks(scene: Scene) -> np.ndarray:
    """(objects, SIZE, SIZE) float coverage in [0, 1] of each object (later ones on top)."""
    big = SIZE * _SUPER
    out = []
    for thing in scene.things:
        m = Image.new("L", (big, big), 0)
        _draw_shape(ImageDraw.Draw(m), thing, 255)
        out.append(np.asarray(m.resize((SIZE, SIZE), Image.BOX), dtype=np.float32) / 255)
    return np.stack(out) if out else np.zeros((0, SIZE, SIZE), np.float32)


def render(scene: Scene) -> Image.Image:
    big = SIZE * _SUPER
    img = Image.new("RGB", (big, big), COLOURS[scene.background])
    draw = ImageDraw.Draw(img)
    for thing in scene.things:
        _draw_shape(draw, thing, COLOURS[thing.colour])
    return img.resize((SIZE, SIZE), Image.BOX)


def edge_map(scene: Scene) -> Image.Image:
    """White object outlines on black: a ControlNet's canny-like condition."""
    m = masks(scene).max(axis=0) if scene.things else np.zeros((SIZE, SIZE), np.float32)
    solid = m > 0.5
    inner = solid.copy()
    for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        inner &= np.roll(solid, (dy, dx), axis=(0, 1))
    return Image.fromarray(((solid & ~inner) * 255).astype(np.uint8)).convert("RGB")


def position_map(scene: Scene) -> Image.Image:
    """Each object's silhouette in white on black: where things go, not what they are."""
    m = masks(scene).max(axis=0) if scene.things else np.zeros((SIZE, SIZE), np.float32)
    return Image.fromarray((m * 255).round().astype(np.uint8)).convert("RGB")


def edit(rng: random.Random, scene: Scene) -> tuple[str, Scene]:
    """An instruction and the scene it asks for (InstructPix2Pix-style pairs): recolour an
    object, change its shape, or recolour the background."""
    i = rng.randrange(len(scene.things))
    thing = scene.things[i]
    kind = rng.choice(("colour", "shape", "background"))
    used = {t.colour for t in scene.things} | {scene.background}
    if kind == "background":
        colour = rng.choice([c for c in COLOURS if c not in used])
        return f"make the background {colour}", replace(scene, background=colour)
    if kind == "colour":
        colour = rng.choice([c for c in COLOURS if c not in used])
        new = replace(thing, colour=colour)
        text = f"make the {thing.shape} {colour}"
    else:
        shape = rng.choice([s for s in SHAPES if s != thing.shape])
        new = replace(thing, shape=shape)
        text = f"turn the {thing.shape} into a {shape}"
    return text, replace(scene, things=scene.things[:i] + (new,) + scene.things[i + 1:])

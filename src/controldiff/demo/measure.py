"""What each control does, measured on the embedded default model with the judge.

Every function returns ``{"without": x, "with": y, ...}``: the same captions and seeds with
and without the control, so a number moves only because of the control. The benchmark
(``benchmarks/bench_demo_controls.py``) prints them as a table; ``tests/test_demo_controls.py``
holds each to a threshold that fails without the control.
"""
from __future__ import annotations

import random
from functools import partial
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from . import scenes
from .judge import colour_area, judge, summarize

STEPS = 20
SEEDS = (0, 1)


def _generate(pipe, prompt, seed: int, **kwargs) -> np.ndarray:
    kwargs.setdefault("num_inference_steps", STEPS)
    out = pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kwargs)
    return (out.images[0] * 255).round().astype(np.uint8)


def _means(out: dict) -> dict:
    """Each key's list of per-image numbers -> its mean."""
    return {k: float(np.mean(v)) for k, v in out.items()}


def held_out_captions(n_two: int = 20, seed: int = 0) -> tuple[list[str], list[str]]:
    """Each held-out object once (on a random background) and ``n_two`` two-object captions
    with a held-out object in them."""
    rng = random.Random(seed)
    singles = []
    for colour, shape, position, size in sorted(scenes.held_out()):
        bg = rng.choice([c for c in scenes.COLOURS if c != colour])
        singles.append(scenes.Scene((scenes.Thing(colour, shape, position, size),), bg).caption())
    twos = []
    while len(twos) < n_two:
        s = scenes.sample(rng, count=2, held="any")
        if any((t.colour, t.shape, t.position, t.size) in scenes.held_out() for t in s.things):
            twos.append(s.caption())
    return singles, twos


def accuracy(pipe, captions: Sequence[str], seeds=SEEDS, **kwargs) -> dict:
    """The judge's accuracies over ``captions`` x ``seeds``."""
    return summarize(judge(_generate(pipe, c, s, **kwargs), c) for c in captions for s in seeds)


def base(pipe, seeds=SEEDS) -> dict:
    singles, twos = held_out_captions()
    one, two = accuracy(pipe, singles, seeds), accuracy(pipe, twos, seeds)
    return {"held-out single objects": one, "two objects": two}


def _two_object_scenes(n: int, seed: int) -> list[scenes.Scene]:
    rng = random.Random(seed)
    return [scenes.sample(rng, count=2) for _ in range(n)]


def negative_prompt(pipe, n: int = 8, seeds=SEEDS) -> dict:
    """The first object's phrase as the negative prompt: area of its colour, without and with."""
    out = {"without": [], "with": []}
    for s in _two_object_scenes(n, 1):
        first = s.things[0]
        for seed in seeds:
            out["without"].append(colour_area(_generate(pipe, s.caption(), seed), first.colour))
            img = _generate(pipe, s.caption(), seed, negative_prompt=first.phrase())
            out["with"].append(colour_area(img, first.colour))
    return _means(out)


def sega(pipe, n: int = 8, seeds=SEEDS, scale: float = 5.0) -> dict:
    """SEGA adds an object (its colour's area grows) and, reversed, removes the caption's
    (its colour's area shrinks)."""
    from ..controls.sega import SEGA, Concept

    rng = random.Random(2)
    add_without, add_with, rm_without, rm_with = [], [], [], []
    for _ in range(n):
        s = scenes.sample(rng, count=1)
        while s.things[0].position == "center":  # the added object goes to another corner
            s = scenes.sample(rng, count=1)
        thing = s.things[0]
        free = [p for p in scenes.POSITIONS if p not in (thing.position, "center")]
        colour = rng.choice([c for c in scenes.COLOURS if c not in (thing.colour, s.background)])
        extra = scenes.Thing(colour, rng.choice(scenes.SHAPES), rng.choice(free), "large")
        for seed in seeds:
            plain = _generate(pipe, s.caption(), seed)
            added = _generate(pipe, s.caption(), seed, controls=[SEGA(Concept(extra.phrase(), scale=scale, warmup=2))])
            removed = _generate(pipe, s.caption(), seed,
                                controls=[SEGA(Concept(thing.phrase(), scale=scale, warmup=2, reverse=True))])
            add_without.append(colour_area(plain, colour))
            add_with.append(colour_area(added, colour))
            rm_without.append(colour_area(plain, thing.colour))
            rm_with.append(colour_area(removed, thing.colour))
    return {"added colour, without": float(np.mean(add_without)), "added colour, with": float(np.mean(add_with)),
            "removed colour, without": float(np.mean(rm_without)), "removed colour, with": float(np.mean(rm_with))}


def img2img_strength(pipe, strengths=(0.2, 0.4, 0.6, 0.8, 1.0), n: int = 6, seeds=SEEDS) -> dict:
    """Mean absolute change from the init image at each strength (it should grow with it)."""
    rng = random.Random(3)
    pairs = [(scenes.sample(rng), scenes.sample(rng)) for _ in range(n)]
    out = {}
    for strength in strengths:
        diffs = []
        for a, b in pairs:
            init = scenes.render(a)
            for seed in seeds:
                img = _generate(pipe, b.caption(), seed, image=init, strength=strength)
                diffs.append(np.abs(img.astype(float) - np.asarray(init, float)).mean() / 255)
        out[strength] = float(np.mean(diffs))
    return out


def inpainting(pipe, n: int = 8, seeds=SEEDS) -> dict:
    """A scene with one object; the mask a box at an empty corner; the prompt adds an object
    there. Change outside the mask (should stay ~0) and the new object found by the judge."""
    rng = random.Random(4)
    outside, found, found_without = [], [], []
    for _ in range(n):
        s = scenes.sample(rng, count=1)
        thing = s.things[0]
        corners = [p for p in scenes.POSITIONS if p not in (thing.position, "center")]
        if thing.position == "center":
            thing = scenes.Thing(thing.colour, thing.shape, thing.position, "small")
            s = scenes.Scene((thing,), s.background)
        position = rng.choice(corners)
        colour = rng.choice([c for c in scenes.COLOURS if c not in (thing.colour, s.background)])
        new = scenes.Thing(colour, rng.choice(scenes.SHAPES), position, "small")
        target = scenes.Scene((thing, new), s.background)
        cx, cy = scenes.POSITIONS[position]
        mask = np.zeros((scenes.SIZE, scenes.SIZE), np.uint8)
        mask[max(cy - 14, 0):cy + 14, max(cx - 14, 0):cx + 14] = 255
        init = scenes.render(s)
        for seed in seeds:
            img = _generate(pipe, target.caption(), seed, image=init, mask_image=Image.fromarray(mask))
            keep = mask == 0
            outside.append(np.abs(img.astype(float) - np.asarray(init, float))[keep].mean() / 255)
            found.append(judge(img, target).objects[1].present)
            found_without.append(judge(np.asarray(init), target).objects[1].present)
    return {"change outside the mask": float(np.mean(outside)), "new object found": float(np.mean(found)),
            "new object in the init image": float(np.mean(found_without))}


def regions(pipe, n: int = 8, seeds=SEEDS) -> dict:
    """Two Regions (left and right halves), each a one-object prompt: the fraction of images
    where each region's object colour dominates its half, without (the joined caption) and with."""
    from ..controls.regions import Region, Regions

    rng = random.Random(5)
    half = scenes.SIZE // 2
    hits_without, hits_with = [], []
    for _ in range(n):
        bg = rng.choice(list(scenes.COLOURS))
        c1, c2 = rng.sample([c for c in scenes.COLOURS if c != bg], 2)
        left = scenes.Thing(c1, rng.choice(scenes.SHAPES), "top left", "large")
        right = scenes.Thing(c2, rng.choice(scenes.SHAPES), "bottom right", "large")
        p1 = scenes.Scene((left,), bg).caption()
        p2 = scenes.Scene((right,), bg).caption()
        control = Regions([Region(p1, box=(0, 0, half, scenes.SIZE)), Region(p2, box=(half, 0, scenes.SIZE, scenes.SIZE))])
        joined = scenes.Scene((left, right), bg).caption()

        def ok(img):
            return colour_area(img[:, :half], c1) > colour_area(img[:, :half], c2) and \
                colour_area(img[:, half:], c2) > colour_area(img[:, half:], c1)

        for seed in seeds:
            hits_without.append(ok(_generate(pipe, joined, seed)))
            hits_with.append(ok(_generate(pipe, joined, seed, controls=[control])))
    return {"without": float(np.mean(hits_without)), "with": float(np.mean(hits_with))}


def panorama_seams(pipe, n: int = 4, seeds=SEEDS, width: int = 192) -> dict:
    """A 64 x ``width`` panorama: MultiDiffusion against three separate 64x64 images side by
    side. Seam: the mean colour jump across the tile borders over the mean jump elsewhere."""
    from ..controls.multidiffusion import MultiDiffusion

    rng = random.Random(6)
    size = scenes.SIZE
    borders = list(range(size, width, size))

    def seam(img):
        jumps = np.abs(np.diff(img.astype(float), axis=1)).mean(axis=(0, 2))  # (width - 1,)
        at = jumps[[b - 1 for b in borders]].mean()
        return at / max(np.delete(jumps, [b - 1 for b in borders]).mean(), 1e-6)

    tiled, md = [], []
    for _ in range(n):
        s = scenes.sample(rng, count=1)
        for seed in seeds:
            tiles = [_generate(pipe, s.caption(), seed * 10 + k) for k in range(width // size)]
            tiled.append(seam(np.concatenate(tiles, axis=1)))
            md.append(seam(_generate(pipe, s.caption(), seed, width=width, height=size,
                                     controls=[MultiDiffusion(window=size, stride=size // 4)])))
    return {"separate tiles": float(np.mean(tiled)), "MultiDiffusion": float(np.mean(md))}


def attend_and_excite(pipe, n: int = 10, seeds=SEEDS) -> dict:
    """Two-object captions: both objects present, without and with Attend-and-Excite on the
    two shape words."""
    from ..controls.attend_excite import AttendAndExcite

    without, with_ = [], []
    for s in _two_object_scenes(n, 7):
        words = sorted({t.shape for t in s.things})
        control = AttendAndExcite(words, attn_res=(8, 8), max_iter_to_alter=STEPS // 2)
        for seed in seeds:
            without.append(judge(_generate(pipe, s.caption(), seed), s).scores["all_present"])
            with_.append(judge(_generate(pipe, s.caption(), seed, controls=[control]), s).scores["all_present"])
    return {"without": float(np.mean(without)), "with": float(np.mean(with_))}


def model_editing(pipe, n: int = 10, seeds=SEEDS, colour: str = "red") -> dict:
    """TIME "circle" -> "red circle" (TIME keeps the source's words in the destination, so a
    shape cannot be swapped for another): the red area of captions that name no colour
    ("a large circle at the top left on a blue background"), before and after the edit (undone
    after)."""
    rng = random.Random(8)
    captions = []
    while len(captions) < n:
        s = scenes.sample(rng, count=1)
        if s.background != colour:
            t = s.things[0]
            captions.append(f"a {t.size} circle at the {t.position} on a {s.background} background")

    def area():
        return float(np.mean([colour_area(_generate(pipe, c, seed), colour) for c in captions for seed in seeds]))

    before = area()
    pipe.edit_model("circle", f"{colour} circle")
    try:
        after = area()
    finally:
        pipe.reset_model_edits()
    return {"without": before, "with": after}


def guidance(pipe, control, seeds=(0,), n: int = 15) -> dict:
    """SAG / PAG: the judge's accuracies on held-out captions without and with ``control``."""
    singles, _ = held_out_captions()
    return {"without": accuracy(pipe, singles[:n], seeds), "with": accuracy(pipe, singles[:n], seeds, controls=[control])}


NEW_SHAPE_TRAINING = {  # method -> its `controldiff train` settings on the scenes of a new shape
    "lora": ["--steps", "300", "--lr", "1e-3", "--rank", "8", "--train-text-encoder", "--format", "diffusers"],
    "dreambooth": ["--steps", "300", "--lr", "1e-4", "--train-text-encoder", "--format", "diffusers"],
    "textual-inversion": ["--steps", "300", "--lr", "5e-3", "--token", "<new>", "--initializer-token", "triangle"],
    # the cross-attention k/v and a modifier token; no random-scale augmentation (it would
    # shrink and zoom the scenes' objects and prefix their captions with "very small"...)
    "custom-diffusion": ["--steps", "300", "--lr", "1e-3", "--modifier-token", "<new>", "--initializer-token",
                         "triangle", "--noaug"],
}
NEW_TOKEN = {"textual-inversion": "<new>", "custom-diffusion": "<new>"}  # a method's word for the new shape


def new_shape(pipe, model_dir, work_dir, method: str = "lora", shape: str = "star", n_train: int = 32,
              n: int = 12, seeds=(0,)) -> dict:
    """LoRA, DreamBooth, textual inversion or Custom Diffusion trained with ``controldiff train``
    on ``n_train`` scenes of a shape the base model never saw, captioned by the grammar (textual
    inversion and Custom Diffusion: the shape's word replaced by their new token): how often the
    judge finds that shape on other captions with it, without and with what was trained
    (unloaded after)."""
    from pathlib import Path

    from .. import cli
    from ..pipeline import Pipeline

    if method not in NEW_SHAPE_TRAINING:
        raise ValueError(f"method: expected one of {list(NEW_SHAPE_TRAINING)}, got {method!r}")
    word = NEW_TOKEN.get(method, shape)
    work, rng = Path(work_dir), random.Random(9)
    data = work / "data"
    data.mkdir(parents=True)
    for i in range(n_train):
        s = scenes.sample(rng, count=1, shapes=(shape,))
        scenes.render(s).save(data / f"{i:03d}.png")
        (data / f"{i:03d}.txt").write_text(s.caption().replace(shape, word))
    rc = cli.main(["train", method, str(model_dir), "--data", str(data), "--output", str(work / method),
                   "--resolution", str(scenes.SIZE), "--batch-size", "8", "--seed", "0", "--center-crop",
                   "--no-progress", *NEW_SHAPE_TRAINING[method]])
    if rc != 0:
        raise RuntimeError(f"controldiff train {method} exited {rc}")
    tests = [scenes.sample(rng, count=1, shapes=(shape,)) for _ in range(n)]

    def found(p, word):
        return float(np.mean([o.present and o.blob.shape == shape for s in tests for seed in seeds
                              for o in judge(_generate(p, s.caption().replace(shape, word), seed), s).objects]))

    without = found(pipe, shape)
    if method == "dreambooth":
        tuned = Pipeline.from_pretrained(work / method / "diffusers", dtype=torch.float32)
        tuned.progress = False
        return {"without": without, "with": found(tuned, shape)}
    if method == "lora":
        unload = partial(pipe.unload_lora, pipe.load_lora(work / method / "pytorch_lora_weights.safetensors"))
    elif method == "custom-diffusion":
        pipe.load_custom_diffusion(work / method)
        unload = pipe.unload_custom_diffusion
    else:
        pipe.load_textual_inversion(work / method / "learned_embeds.safetensors")
        unload = partial(pipe.unload_textual_inversion, word)
    try:
        return {"without": without, "with": found(pipe, word)}
    finally:
        unload()


# ----------------------------------------------------------------------------- the ControlNet variants (demo/variants.py)


def _foreground(img: np.ndarray) -> np.ndarray:
    """Pixels far (> 60) from the image's own background: the median colour of its border."""
    px = img.astype(np.float32)
    border = np.concatenate([px[0], px[-1], px[:, 0], px[:, -1]])
    return np.sqrt(((px - np.median(border, axis=0)) ** 2).sum(-1)) > 60


def controlnet(pipe, model, kind: str = "edges", n: int = 8, seeds=SEEDS, scale: float = 1.0) -> dict:
    """Scenes of 1-3 objects (held-out ones too), their own captions, and the ControlNet given
    their edge or position map: the IoU of what is drawn with the scene's silhouettes, and the
    judge's shape and position accuracy, without and with."""
    from ..controls.controlnet import ControlNet

    maps = {"edges": scenes.edge_map, "positions": scenes.position_map}
    if kind not in maps:
        raise ValueError(f"kind: expected one of {list(maps)}, got {kind!r}")
    draw = maps[kind]
    rng = random.Random(10)
    out = {f"{k}, {w}": [] for k in ("IoU", "shape", "position") for w in ("without", "with")}
    for _ in range(n):
        s = scenes.sample(rng, held="any")
        truth = scenes.masks(s).max(axis=0) > 0.5
        for seed in seeds:
            for w, controls in (("without", []), ("with", [ControlNet(model, draw(s), scale=scale)])):
                img = _generate(pipe, s.caption(), seed, controls=controls)
                fg = _foreground(img)
                out[f"IoU, {w}"].append((fg & truth).sum() / max((fg | truth).sum(), 1))
                scores = judge(img, s).scores
                out[f"shape, {w}"].append(scores["shape"] or 0.0)
                out[f"position, {w}"].append(scores["position"] or 0.0)
    return _means(out)

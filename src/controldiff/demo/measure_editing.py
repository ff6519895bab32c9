"""The real-image editing controls measured on the embedded default model: Pix2Pix-Zero,
DiffEdit and LEDITS++ recolour the object of a rendered one-object scene.

Every function takes the same edits (``edit_cases``: ``scenes.edit``'s colour edits of
``scenes.sample(rng, count=1)`` scenes, e.g. "a large orange circle ..." -> the same with
"red") and returns ``{"edit done, without": ..., "edit done, with": ..., "change elsewhere,
without": ..., "change elsewhere, with": ..., ...}``:

- "edit done": how often the judge reads the target colour on the object;
- "change elsewhere": the mean absolute pixel change (0..1) from the source image outside
  both the source's and the target's object (``scenes.masks``).

"without" is the same inversion and regeneration with no edit (the source prompt), so a
number moves only because of the control. The floor of "change elsewhere" is the VAE's
round trip (about 0.02 on these scenes): every path here goes through it. The README's
table comes from ``n=12, seeds=(0, 1)``; ``tests/test_demo_editing.py`` holds each to a
threshold that fails without the control.
"""
from __future__ import annotations

import random

import numpy as np

from . import scenes
from .judge import judge
from .measure import SEEDS, STEPS, _generate, _means


CASES = 20  # the edits' seed: the three functions edit the same scenes


def edit_cases(n: int, seed: int = CASES) -> list[tuple[scenes.Scene, scenes.Scene]]:
    """``n`` (source, target) pairs: a one-object scene and ``scenes.edit``'s recolouring of
    its object (a colour used by neither the object nor the background)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        source = scenes.sample(rng, count=1)
        while True:
            _, target = scenes.edit(rng, source)
            if target.things[0].colour != source.things[0].colour:
                break
        out.append((source, target))
    return out


def _touched(source: scenes.Scene, target: scenes.Scene) -> np.ndarray:
    """Pixels of the object before or after the edit: what the edit may change."""
    return np.maximum(scenes.masks(source)[0], scenes.masks(target)[0]) > 0.01


def _score(source: scenes.Scene, target: scenes.Scene, img: np.ndarray) -> tuple[bool, float]:
    """(the judge reads the target colour on the object, mean change outside the object)."""
    done = bool(judge(img, target).objects[0].correct("colour"))
    init = np.asarray(scenes.render(source), float)
    keep = ~_touched(source, target)
    return done, float(np.abs(img.astype(float) - init)[keep].mean() / 255)


def _record(out: dict, name: str, source, target, img) -> None:
    done, change = _score(source, target, img)
    out.setdefault(f"edit done, {name}", []).append(done)
    out.setdefault(f"change elsewhere, {name}", []).append(change)


def sentence_bank(colour: str, shape: str, k: int = 16, seed: int = 99) -> list[str]:
    """Pix2Pix-Zero's sentence bank: ``k`` captions that name a ``colour`` ``shape`` (random
    size, position and background). The same ``seed`` gives the same sentences with only the
    colour word changed, so the mean embedding difference is the colour's direction."""
    rng = random.Random(seed)
    out = []
    for _ in range(k):
        thing = scenes.sample(rng, count=1).things[0]
        background = rng.choice([c for c in scenes.COLOURS if c != colour])
        out.append(scenes.Scene((scenes.Thing(colour, shape, thing.position, thing.size),), background).caption())
    return out


def pix2pix_zero(pipe, n: int = 12, seeds=SEEDS, amount: float = 0.1, num_reg_steps: int = 5) -> dict:
    """Pix2Pix-Zero: the source image DDIM-inverted with its caption (``num_reg_steps`` of the
    noise regulariser, as the reference's ``invert``), regenerated with the caption (CFG 7.5)
    and the edit direction ``mean(bank(target colour)) - mean(bank(source colour))``
    (``sentence_bank``), cross-attention guidance ``amount`` (the reference's 0.1). "without":
    the same regeneration with no direction; "direction only": ``amount=0`` (no
    cross-attention guidance, the paper's ablation)."""
    from ..controls.pix2pix_zero import Pix2PixZero

    out: dict = {}
    for source, target in edit_cases(n, CASES):
        thing, new = source.things[0], target.things[0]
        src, tgt = sentence_bank(thing.colour, thing.shape), sentence_bank(new.colour, thing.shape)
        for seed in seeds:
            inv = pipe.invert(scenes.render(source), source.caption(), num_inference_steps=STEPS, seed=seed,
                              num_reg_steps=num_reg_steps)
            for name, controls in (("without", []), ("with", [Pix2PixZero(src, tgt, amount)]),
                                   ("direction only", [Pix2PixZero(src, tgt, 0.0)])):
                _record(out, name, source, target, _generate(pipe, source.caption(), seed, inversion=inv,
                                                            controls=controls))
    return _means(out)


def diffedit(pipe, n: int = 12, seeds=SEEDS, strength: float = 0.8) -> dict:
    """DiffEdit: the mask from ``pipe.diffedit_mask(image, source caption, target caption)``
    (the reference's defaults: 10 maps, encode strength 0.5, ratio 3), the image DDIM-inverted
    with the source caption to ``strength`` (the reference's inpaint_strength 0.8), then the
    target caption regenerated with the mask. "without": the source caption from the same
    inversion; "target prompt, no mask": the target caption from it without DiffEdit. "mask on
    the object" / "mask elsewhere": the share of latent cells under the edited object (a
    quarter or more of the cell) / of the others that the mask repaints."""
    from ..controls.diffedit import DiffEdit

    out: dict = {}
    f = scenes.SIZE // 16   # the latent factor (16x16 latents)
    for source, target in edit_cases(n, CASES):
        init = scenes.render(source)
        obj = np.maximum(scenes.masks(source)[0], scenes.masks(target)[0])
        cells = obj.reshape(16, f, 16, f).mean((1, 3)) >= 0.25
        for seed in seeds:
            mask = pipe.diffedit_mask(init, source.caption(), target.caption(), num_inference_steps=STEPS, seed=seed)
            m = mask[0].numpy() > 0.5
            out.setdefault("mask on the object", []).append(m[cells].mean())
            out.setdefault("mask elsewhere", []).append(m[~cells].mean())
            inv = pipe.invert(init, source.caption(), num_inference_steps=STEPS, strength=strength, seed=seed)
            _record(out, "without", source, target, _generate(pipe, source.caption(), seed, inversion=inv))
            _record(out, "with", source, target, _generate(pipe, target.caption(), seed, inversion=inv,
                                                           controls=[DiffEdit(mask, inv)]))
            _record(out, "target prompt, no mask", source, target,
                    _generate(pipe, target.caption(), seed, inversion=inv))
    return _means(out)


def ledits(pipe, n: int = 12, seeds=SEEDS, scale: float = 5.0) -> dict:
    """LEDITS++: the edit-friendly DDPM inversion of the image with no prompt (the
    reference's default; this model folder's dpmpp_2m_sde, skip 0.15: 23 steps of which 20
    run), regenerated with the empty prompt and guidance 1 and two concepts at ``scale`` (the
    reference's edit_guidance_scale 5), warmup 0, threshold 0.9, the SD1 intersection mask:
    the source's "<colour> <shape>" reversed and the target's added. "without": the same
    regeneration with no concept (the inversion's reconstruction)."""
    from ..controls.ledits import LEdits
    from ..controls.sega import Concept

    out: dict = {}
    for source, target in edit_cases(n, CASES):
        thing, new = source.things[0], target.things[0]
        control = LEdits([Concept(f"{thing.colour} {thing.shape}", scale=scale, warmup=0, reverse=True),
                          Concept(f"{new.colour} {thing.shape}", scale=scale, warmup=0)])
        for seed in seeds:
            inv = pipe.invert(scenes.render(source), "", method="ddpm", num_inference_steps=STEPS, seed=seed)
            for name, controls in (("without", []), ("with", [control])):
                img = _generate(pipe, "", seed, inversion=inv, num_inference_steps=inv.num_inference_steps,
                                guidance_scale=1.0, controls=controls)
                _record(out, name, source, target, img)
    return _means(out)

"""The demo judge reads rendered scenes right, keeps reading them through what a small model's
pictures suffer (noise, blur, a shift, JPEG, off colours, specks), and flags exactly the
attribute a picture gets wrong."""
from __future__ import annotations

import io
import random
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage

from controldiff.demo import scenes
from controldiff.demo.judge import judge, parse_caption, summarize
from controldiff.demo.scenes import COLOURS, NEW_SHAPES, POSITIONS, SHAPES, SIZES, Scene, Thing, render

ALL_SHAPES = SHAPES + NEW_SHAPES


def random_scenes(seed: int, n: int) -> list[Scene]:
    rng = random.Random(seed)
    return [scenes.sample(rng, held="any", shapes=ALL_SHAPES) for _ in range(n)]


def test_rendered_scenes_are_read_right():
    found = random_scenes(0, 500)
    assert {len(s.things) for s in found} == {1, 2, 3}
    assert {t.shape for s in found for t in s.things} == set(ALL_SHAPES)
    verdicts = [judge(render(s), s) for s in found]
    wrong = [(v.scene.caption(), v.wrong) for v in verdicts if not v.correct]
    assert not wrong, wrong[:5]
    summary = summarize(verdicts)
    assert all(summary[k] == 1.0 for k in ("colour", "shape", "position", "size", "background", "count",
                                           "all_present", "correct")), summary


def test_judge_reads_the_blobs_it_reports():
    scene = Scene((Thing("red", "star", "top left", "large"), Thing("white", "cross", "bottom right", "small")), "blue")
    v = judge(render(scene), scene.caption())
    assert v.background == "blue"
    by_position = {b.position: b for b in v.blobs}
    star, cross = by_position["top left"], by_position["bottom right"]
    assert (star.colour, star.shape, star.size) == ("red", "star", "large")
    assert (cross.colour, cross.shape, cross.size) == ("white", "cross", "small")
    assert abs(star.centre[0] - 16) <= 1.5 and abs(cross.centre[1] - 48) <= 1.5
    assert star.area > cross.area  # the large star outweighs the small cross
    assert [o.blob for o in v.objects] == [star, cross]
    assert v.objects[0].marks == {"present": True, "colour": True, "shape": True, "position": True, "size": True}


def test_touching_objects_of_two_colours_are_two_blobs():
    """A model may draw objects that touch; the generator never does, so draw them by hand."""
    img = Image.new("RGB", (scenes.SIZE, scenes.SIZE), COLOURS["white"])
    draw = ImageDraw.Draw(img)
    draw.rectangle([6, 6, 27, 27], fill=COLOURS["red"])
    draw.ellipse([28, 4, 52, 28], fill=COLOURS["blue"])
    v = judge(img, "a large red square at the top left and a large blue circle at the top right on a white background")
    assert v.correct, (v.wrong, v.blobs)


# --- what a small model's pictures suffer -----------------------------------------------------

def noisy(sigma):
    def apply(img, rng):
        noise = np.random.default_rng(rng.randrange(2 ** 32)).normal(0, sigma, (scenes.SIZE, scenes.SIZE, 3))
        return Image.fromarray((np.asarray(img, np.float32) + noise).clip(0, 255).round().astype(np.uint8))
    return apply


def blurred(img, rng):
    return img.filter(ImageFilter.GaussianBlur(2))


def shifted(img, rng):
    dx, dy = rng.choice((-3, 3)), rng.choice((-3, 3))
    return Image.fromarray(np.roll(np.asarray(img), (dy, dx), axis=(0, 1)))


def jpeg(img, rng):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=75)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def off_colours(img, rng):
    """Every colour a little off (a per-channel offset of up to 25), as an undertrained model paints."""
    offset = np.array([rng.uniform(-25, 25) for _ in range(3)])
    return Image.fromarray((np.asarray(img, np.float32) + offset).clip(0, 255).round().astype(np.uint8))


def specks(img, rng):
    """Four 2x2 specks of random colour in the background (2 pixels clear of any object), as
    a sampler leaves behind."""
    arr = np.asarray(img).copy()
    plain = (arr == arr[0, 0]).all(axis=-1)
    clear = ndimage.binary_erosion(plain, np.ones((6, 6), bool), border_value=1)
    spots = np.argwhere(clear)
    for y, x in spots[[rng.randrange(len(spots)) for _ in range(4)]]:
        arr[y - 1:y + 1, x - 1:x + 1] = COLOURS[rng.choice(list(COLOURS))]
    return Image.fromarray(arr)


def soft_and_noisy(img, rng):
    return noisy(20)(img.filter(ImageFilter.GaussianBlur(1.5)), rng)


PERTURBATIONS = {"noise 10": noisy(10), "noise 20": noisy(20), "blur 2": blurred, "shift 3": shifted,
                 "jpeg 75": jpeg, "off colours": off_colours, "specks": specks, "blur 1.5 + noise 20": soft_and_noisy}


@pytest.mark.parametrize("name", PERTURBATIONS)
def test_perturbed_scenes_are_still_read_right(name):
    rng = random.Random(1)
    found = random_scenes(1, 200)
    summary = summarize(judge(PERTURBATIONS[name](render(s), rng), s) for s in found)
    assert summary["correct"] >= 0.95, summary
    assert min(summary[k] for k in ("colour", "shape", "position", "size", "background", "count")) >= 0.95, summary


def test_a_blurred_small_object_keeps_its_colour():
    """Blurred, a small star has no pure pixel left: a yellow one on black is dark yellow, not
    orange, and a blue one on yellow is blended, not purple."""
    wrong = []
    for background in COLOURS:
        for colour in COLOURS:
            for shape in ("star", "cross", "triangle"):
                scene = Scene((Thing(colour, shape, "center", "small"),), background)
                if colour != background:
                    v = judge(render(scene).filter(ImageFilter.GaussianBlur(2)), scene)
                    if v.scores["colour"] != 1:
                        wrong.append((colour, shape, background, [b.colour for b in v.blobs]))
    assert not wrong, wrong


def test_perturbations_change_the_pixels():
    """The perturbation tests mean something only if the pictures really differ."""
    rng = random.Random(2)
    img = render(random_scenes(2, 1)[0])
    for name, perturb in PERTURBATIONS.items():
        diff = np.abs(np.asarray(perturb(img, rng), np.float32) - np.asarray(img, np.float32))
        assert diff.mean() > 0.1, name


# --- what a picture gets wrong ----------------------------------------------------------------

def spaced(scene: Scene) -> bool:
    """No two objects within 2 pixels of each other (touching objects read as one blob)."""
    m = scenes.masks(scene) > 0
    return all(not (ndimage.binary_dilation(m[i], iterations=2) & m[j]).any()
               for i in range(len(m)) for j in range(i + 1, len(m)))


def free_positions(scene: Scene) -> list[str]:
    return [p for p in POSITIONS if p not in {t.position for t in scene.things}]


def with_thing(scene: Scene, i: int, thing: Thing) -> Scene:
    return replace(scene, things=scene.things[:i] + (thing,) + scene.things[i + 1:])


def changed(kind: str, scene: Scene, rng: random.Random):
    """The scene drawn with one thing wrong (None: not possible for this scene)."""
    i = rng.randrange(len(scene.things))
    thing = scene.things[i]
    used = {t.colour for t in scene.things} | {scene.background}
    if kind == "colour":
        colours = [c for c in COLOURS if c not in (thing.colour, scene.background)]
        return with_thing(scene, i, replace(thing, colour=rng.choice(colours)))
    if kind == "shape":
        return with_thing(scene, i, replace(thing, shape=rng.choice([s for s in ALL_SHAPES if s != thing.shape])))
    if kind == "position":
        free = free_positions(scene)
        return with_thing(scene, i, replace(thing, position=rng.choice(free))) if free else None
    if kind == "size":
        return with_thing(scene, i, replace(thing, size=next(z for z in SIZES if z != thing.size)))
    if kind == "background":
        return replace(scene, background=rng.choice([c for c in COLOURS if c not in used]))
    if kind == "missing":
        return replace(scene, things=scene.things[:i] + scene.things[i + 1:]) if len(scene.things) > 1 else None
    if kind == "extra":
        if not free_positions(scene):
            return None
        extra = Thing(rng.choice([c for c in COLOURS if c != scene.background]), rng.choice(ALL_SHAPES),
                      rng.choice(free_positions(scene)), rng.choice(list(SIZES)))
        return replace(scene, things=scene.things + (extra,))
    raise AssertionError(kind)


FLAGS = {"colour": {"colour"}, "shape": {"shape"}, "position": {"position"}, "size": {"size"},
         "background": {"background"}, "missing": {"present", "all_present", "count"}, "extra": {"count"}}


@pytest.mark.parametrize("kind", FLAGS)
def test_a_wrong_attribute_is_flagged_and_nothing_else(kind):
    rng = random.Random(3)
    flagged = total = 0
    misses = []
    for scene in random_scenes(3, 400):
        drawn = changed(kind, scene, rng)
        if drawn is None or not spaced(drawn):
            continue
        v = judge(render(drawn), scene.caption())
        total += 1
        flagged += v.wrong == FLAGS[kind]
        if v.wrong != FLAGS[kind]:
            misses.append((scene.caption(), drawn.caption(), v.wrong))
        if total == 200:
            break
    assert total == 200
    assert flagged >= 0.95 * total, misses[:5]


def test_an_empty_picture_or_noise_scores_low():
    found = random_scenes(4, 40)
    blank = [judge(Image.new("RGB", (scenes.SIZE, scenes.SIZE), COLOURS[s.background]), s) for s in found]
    assert all(v.scores["present"] == 0 and v.scores["count"] == 0 and v.scores["colour"] is None for v in blank)
    assert all(v.wrong >= {"colour", "shape", "position", "size", "present", "count"} for v in blank)
    assert summarize(blank)["correct"] == 0
    rng = np.random.default_rng(4)
    noise = [judge(Image.fromarray(rng.integers(0, 256, (scenes.SIZE, scenes.SIZE, 3), dtype=np.uint8)), s)
             for s in found]
    summary = summarize(noise)
    assert summary["correct"] == 0 and summary["present"] <= 0.1 and summary["count"] <= 0.1, summary
    assert summary["background"] <= 0.4, summary  # eight colours: a guess is right one time in eight


def test_summarize_counts_each_mistake_once():
    scene = Scene((Thing("red", "circle", "top left", "small"),
                   Thing("green", "square", "bottom right", "large")), "blue")
    good = judge(render(scene), scene)
    recoloured = judge(render(with_thing(scene, 0, replace(scene.things[0], colour="yellow"))), scene)
    half = judge(render(replace(scene, things=scene.things[1:])), scene)
    assert recoloured.scores["colour"] == 0.5 and recoloured.wrong == {"colour"}
    assert half.scores["present"] == 0.5 and half.scores["colour"] == 1.0
    summary = summarize([good, recoloured, half])
    assert summary["colour"] == pytest.approx(4 / 5)  # 5 objects present, one the wrong colour
    assert summary["present"] == pytest.approx(5 / 6)
    assert summary["all_present"] == pytest.approx(2 / 3) and summary["count"] == pytest.approx(2 / 3)
    assert summary["correct"] == pytest.approx(1 / 3) and summary["n"] == 3
    with pytest.raises(ValueError, match="verdicts"):
        summarize([])


# --- inputs -----------------------------------------------------------------------------------

def test_judge_takes_arrays_and_other_sizes():
    scene = Scene((Thing("orange", "triangle", "center", "large"),), "yellow")
    img = render(scene)
    assert judge(np.asarray(img), scene).correct
    assert judge(np.asarray(img, np.float32) / 255, scene).correct
    assert judge(img.resize((256, 256), Image.NEAREST), scene).correct
    assert judge(img.resize((48, 48), Image.BILINEAR), scene).correct
    assert judge(img.convert("RGBA"), scene).correct


def test_judge_rejects_bad_input():
    img = render(random_scenes(5, 1)[0])
    with pytest.raises(TypeError, match="prompt"):
        judge(img, 3)
    with pytest.raises(TypeError, match="image"):
        judge("picture.png", "a small red circle at the center on a blue background")
    with pytest.raises(ValueError, match="image: expected an HxWx3 array"):
        judge(np.zeros((64, 64)), "a small red circle at the center on a blue background")
    with pytest.raises(ValueError, match=r"image: expected floats in \[0, 1\]"):
        judge(np.full((64, 64, 3), 2.0), "a small red circle at the center on a blue background")
    with pytest.raises(ValueError, match="'blu'"):
        judge(img, "a small red circle at the center on a blu background")
    with pytest.raises(ValueError, match="prompt: expected a scene with at least one object"):
        judge(img, Scene((), "blue"))


def test_parse_caption_inverts_the_grammar():
    found = random_scenes(6, 500)
    assert {len(s.things) for s in found} == {1, 2, 3}
    for scene in found:
        assert parse_caption(scene.caption()) == scene
    assert parse_caption("  A Small RED circle at the   center on a Blue background ") == Scene(
        (Thing("red", "circle", "center", "small"),), "blue")


@pytest.mark.parametrize("caption, word", [
    ("a tiny red circle at the center on a blue background", "'tiny'"),
    ("a small red blob at the center on a blue background", "'blob'"),
    ("a small red circle at the middle on a blue background", "'middle'"),
    ("a small red circle at the top centre on a blue background", "'centre'"),
    ("a small red circle at the center on a blu background", "'blu'"),
    ("a small red circle at the center on a blue background please", "'please'"),
    ("a small red circle at the center with a blue background", "'with'"),
    ("small red circle at the center on a blue background", "'small'"),
])
def test_parse_caption_names_the_word_it_cannot_read(caption, word):
    with pytest.raises(ValueError, match=word):
        parse_caption(caption)


def test_parse_caption_rejects_short_and_overlong_captions():
    with pytest.raises(ValueError, match="ended after word 9"):
        parse_caption("a small red circle at the top left and")
    with pytest.raises(ValueError, match="ended"):
        parse_caption("")
    four = " and ".join(f"a small red circle at the {p}" for p in list(POSITIONS)[:4]) + " on a blue background"
    with pytest.raises(ValueError, match="at most 3 objects"):
        parse_caption(four)
    with pytest.raises(TypeError, match="caption"):
        parse_caption(None)


def test_colour_area_is_the_share_of_a_colour():
    from controldiff.demo.judge import colour_area

    s = scenes.Scene((scenes.Thing("red", "square", "center", "large"),), "blue")
    pixels = np.asarray(scenes.render(s))
    covered = scenes.masks(s)[0].mean()
    assert abs(colour_area(pixels, "red") - covered) < 0.01
    assert abs(colour_area(pixels, "blue") - (1 - covered)) < 0.01 and colour_area(pixels, "green") == 0
    assert colour_area(pixels[:, :16], "red") == 0  # any size: the left quarter holds no square

"""Infotext round trip: our ``parameters`` text reads as A1111 reads it, A1111's sampler
names are ours, and ``generate --from-png`` remakes an image from its PNG.

``a1111_parse`` is A1111's ``parse_generation_parameters`` (modules/infotext_utils.py,
AUTOMATIC1111/stable-diffusion-webui), vendored in tests/reference/a1111_infotext.py without its
UI-specific fix-ups.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from controldiff.png import format_parameters, parse_parameters, read_parameters, write_png
from controldiff.schedulers.a1111 import from_a1111
from reference.a1111_infotext import parse_generation_parameters as a1111_parse
from test_cli import FAST, home, demo_home, run  # noqa: F401  (fixtures)


TEXTS = [
    # as A1111 writes them
    "girl with a beret, (eyeshadow:1.2), [blurry]\nNegative prompt: ugly, (deformed)\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 965400086, Size: 512x768, "
    "Model hash: 45dee52b, Model: v1-5, Lora hashes: \"style: 1a2b3c\", Version: v1.10.1",
    "a cat\nsecond line of the prompt\nNegative prompt: bad\nsecond negative line\n"
    "Steps: 30, Sampler: Euler a, CFG scale: 5.5, Seed: 1, Size: 64x64",
    "only a prompt, no settings",
    'a "quoted" word\nSteps: 4, Sampler: LCM, CFG scale: 1, Seed: 3, Size: 1024x1024, '
    'ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny, Weight: 1.0"',
]


@pytest.mark.parametrize("text", TEXTS)
def test_parse_equals_a1111(text):
    ours = parse_parameters(text)
    expected = a1111_parse(text)
    size = {k for k in ours if k not in expected}
    assert size <= {"Size"} and {k: ours[k] for k in expected} == expected


def test_format_then_parse_is_symmetric():
    extra = {"Lora": "style:0.8", "TI": "<toy> <toy>_1", "Clip skip": 2, "Note": 'say "hi", then: go\nnow'}
    text = format_parameters("a cat, (red:1.2)\non two lines", "blurry, bad: very", 20, "Euler a", 7.5, 5,
                             512, 768, "sd15", extra)
    p = parse_parameters(text)
    assert p == a1111_parse(text) | {"Size": "512x768"}
    assert (p["Prompt"], p["Negative prompt"], p["Steps"], p["Sampler"], p["CFG scale"], p["Seed"]) == \
        ("a cat, (red:1.2)\non two lines", "blurry, bad: very", "20", "Euler a", "7.5", "5")
    assert (p["Size-1"], p["Size-2"], p["Model"], p["Lora"], p["TI"], p["Clip skip"], p["Note"]) == \
        ("512", "768", "sd15", "style:0.8", "<toy> <toy>_1", "2", 'say "hi", then: go\nnow')


@pytest.mark.parametrize("sampler, schedule, ours", [
    ("Euler a", None, "euler_a"), ("DPM++ 2M", "Karras", "dpmpp_2m_karras"), ("DPM++ 2M Karras", None,
                                                                              "dpmpp_2m_karras"),
    ("DPM++ 2M", "Automatic", "dpmpp_2m"), ("PLMS", None, "pndm"), ("euler_a", None, "euler_a"),
    ("Restart", None, None),
])
def test_a1111_sampler_names(sampler, schedule, ours):
    assert from_a1111(sampler, schedule) == ours


def _pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_from_png_remakes_our_image(home, tmp_path, capsys):
    first = tmp_path / "first.png"
    rc, _, err = run(capsys, "generate", "-p", "a red cube, shiny", "-n", "blurry", "--seed", 11, "--cfg", 4,
                     "--scheduler", "Euler a", *FAST, "-o", first)
    assert rc == 0, err
    again = tmp_path / "again.png"
    rc, _, err = run(capsys, "generate", "--from-png", first, "-o", again)
    assert rc == 0, err
    assert np.array_equal(_pixels(again), _pixels(first))
    assert read_parameters(again).splitlines()[:2] == ["a red cube, shiny", "Negative prompt: blurry"]
    changed = tmp_path / "changed.png"   # options given on the command line win over the PNG's
    rc, _, err = run(capsys, "generate", "--from-png", first, "--seed", 12, "-o", changed)
    assert rc == 0, err
    assert "Seed: 12," in read_parameters(changed) and not np.array_equal(_pixels(changed), _pixels(first))


def test_from_png_reads_a1111_infotext(home, tmp_path, capsys):
    src = tmp_path / "a1111.png"
    with open(src, "wb") as f:
        write_png(Image.new("RGB", (8, 8)), f, "a house\nNegative prompt: fog\nSteps: 2, Sampler: DPM++ 2M, "
                  "Schedule type: Karras, CFG scale: 6, Seed: 4, Size: 64x64, Model: v1-5, Lora: style:0.5")
    out = tmp_path / "out.png"
    rc, _, err = run(capsys, "generate", "--from-png", src, "-o", out)
    assert rc == 0, err
    text = read_parameters(out)
    assert text.startswith("a house\nNegative prompt: fog\n")
    for field in ("Steps: 2", "Sampler: DPM++ 2M", "Schedule type: Karras", "CFG scale: 6.0", "Seed: 4", "Size: 64x64"):
        assert field in text
    assert "made with Lora style:0.5; pass --lora" in err and "made with Model v1-5" in err


def test_clip_skip_is_counted_as_a1111_counts_it(home, tmp_path, capsys):
    """A1111's "Clip skip: 2" uses the penultimate layer: our --clip-skip 1. "Clip skip: 1" is no skip."""
    made = {}
    for given in (None, 1):
        out = tmp_path / f"ours-{given}.png"
        flags = [] if given is None else ["--clip-skip", given]
        assert run(capsys, "generate", "-p", "a red cube", "--seed", 3, *FAST, *flags, "-o", out)[0] == 0
        made[given] = out
    assert "Clip skip" not in read_parameters(made[None]) and "Clip skip: 2" in read_parameters(made[1])
    for a1111, ours in (("2", made[1]), ("1", made[None])):
        src = tmp_path / f"a1111-{a1111}.png"
        with open(src, "wb") as f:
            write_png(Image.new("RGB", (8, 8)), f, "a red cube\nSteps: 2, Sampler: PLMS, CFG scale: 7.5, Seed: 3, "
                      f"Size: 64x64, Clip skip: {a1111}")
        out = tmp_path / f"again-{a1111}.png"
        assert run(capsys, "generate", "--from-png", src, "-o", out)[0] == 0
        assert np.array_equal(_pixels(out), _pixels(ours)), a1111
    assert not np.array_equal(_pixels(made[1]), _pixels(made[None]))


@pytest.mark.parametrize("text, match", [
    (None, "has no 'parameters' text"),
    ("x\nSteps: 2, Sampler: Restart, CFG scale: 6, Seed: 4, Size: 64x64", "sampler 'Restart'"),
    ("x\nSteps: many, Sampler: Euler, CFG scale: 6, Seed: 4, Size: 64x64", "cannot read Steps: 'many'"),
])
def test_from_png_errors(home, tmp_path, capsys, text, match):
    src = tmp_path / "src.png"
    if text is None:
        Image.new("RGB", (8, 8)).save(src)
    else:
        with open(src, "wb") as f:
            write_png(Image.new("RGB", (8, 8)), f, text)
    rc, _, err = run(capsys, "generate", "--from-png", src, "-o", tmp_path / "o.png")
    assert rc == 2 and match in err

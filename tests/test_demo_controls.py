"""Every control measured on the embedded default model (``controldiff.demo.measure``): the
same captions and seeds without and with the control, read by the pixel judge. Each threshold
fails without the control; the full-size numbers are in benchmarks/RESULTS.md and the README
(``benchmarks/bench_demo_controls.py``); these runs are smaller, for the suite's time."""
from __future__ import annotations

import pytest

from controldiff.demo import default_model_path, measure

ONE = (0,)


def test_held_out_captions_are_drawn(demo_pipe):
    singles, twos = measure.held_out_captions()
    one = measure.accuracy(demo_pipe, singles, ONE)
    print(one)
    # far above chance (background and colour 1/8, shape 1/3, size 1/2); position is not learned yet
    assert one["background"] >= 0.7 and one["colour"] >= 0.45 and one["shape"] >= 0.4 and one["size"] >= 0.7
    assert one["present"] == 1.0


def test_negative_prompt_removes_a_colour(demo_pipe):
    r = measure.negative_prompt(demo_pipe, n=4, seeds=ONE)
    print(r)
    assert r["with"] < 0.25 * r["without"] and r["without"] > 0.02


def test_sega_adds_and_removes_a_concept(demo_pipe):
    r = measure.sega(demo_pipe)  # full size: on one seed alone the effect is within the noise
    print(r)
    assert r["added colour, with"] > 1.4 * r["added colour, without"]
    assert r["removed colour, with"] < 0.8 * r["removed colour, without"]


def test_img2img_change_grows_with_strength(demo_pipe):
    r = measure.img2img_strength(demo_pipe, strengths=(0.2, 0.5, 0.8), n=3, seeds=ONE)
    print(r)
    values = list(r.values())
    assert values == sorted(values) and values[-1] > 1.5 * values[0]


def test_inpainting_draws_in_the_mask_and_keeps_the_rest(demo_pipe):
    r = measure.inpainting(demo_pipe, n=4, seeds=ONE)
    print(r)
    assert r["new object found"] >= 0.75 and r["new object in the init image"] == 0
    assert r["change outside the mask"] < 0.06  # the VAE's round trip (4-channel latent blending)


def test_regions_put_each_object_in_its_box(demo_pipe):
    r = measure.regions(demo_pipe, n=8, seeds=ONE)
    print(r)
    assert r["with"] >= r["without"] + 0.2


def test_multidiffusion_panorama_has_no_seams(demo_pipe):
    r = measure.panorama_seams(demo_pipe, n=2, seeds=ONE)
    print(r)
    assert r["MultiDiffusion"] < 1.5 and r["separate tiles"] > 2 * r["MultiDiffusion"]


def test_time_edit_makes_circles_red(demo_pipe):
    r = measure.model_editing(demo_pipe, n=5, seeds=ONE)
    print(r)
    assert r["with"] > r["without"] + 0.1


@pytest.mark.parametrize("method, gain", [("lora", 0.2), ("dreambooth", 0.2), ("textual-inversion", 0.1),
                                          ("custom-diffusion", 0.2)])
def test_training_learns_a_new_shape(demo_pipe, tmp_path, method, gain):
    r = measure.new_shape(demo_pipe, default_model_path(), tmp_path, method)
    print(r)
    assert r["with"] >= r["without"] + gain


# ----------------------------------------------------------------------------- the variants (demo/variants.py)


@pytest.mark.parametrize("kind", ["edges", "positions"])
def test_a_controlnet_puts_the_objects_on_the_map(demo_pipe, kind):
    from controldiff import load_controlnet
    from controldiff.demo.variants import variant_path

    model = load_controlnet(variant_path(f"controlnet-{kind}"))
    r = measure.controlnet(demo_pipe, model, kind, n=6, seeds=ONE)
    print(r)
    assert r["position, with"] >= 0.85 and r["position, with"] >= r["position, without"] + 0.4
    assert r["IoU, with"] >= r["IoU, without"] + 0.07

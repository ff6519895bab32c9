"""Defaults equal the reference pipelines', per family and task.

The table (controldiff.defaults) is compared with the signatures of the diffusers
pipelines' ``__call__``; then calls with no explicit guidance, strength, size or
aesthetic score are compared end to end with the diffusers pipeline called the same way
(only a small ``num_inference_steps``, given to both, keeps them fast).
"""
from __future__ import annotations

import inspect

import numpy as np
import PIL.Image
import pytest
import torch

import controldiff as cd
from controldiff import defaults
from controldiff.controls.depth import Depth

import diffusers
from pipes import ours, reference

TOL = 1e-4
CHECKED = ("num_inference_steps", "guidance_scale", "strength", "eta", "aesthetic_score", "negative_aesthetic_score")


def gen(seed):
    return torch.Generator("cpu").manual_seed(seed)


def picture(h, w, seed=0):
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def mask(h, w):
    m = np.zeros((h, w), np.uint8)
    m[h // 4: 3 * h // 4, w // 3:] = 255
    return PIL.Image.fromarray(m)


def assert_close(a, b, what):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    diff = float(np.abs(a - b).max())
    assert diff <= TOL, f"{what}: max abs diff {diff}"


# ---------------------------------------------------------------------------- the table
@pytest.mark.parametrize("key", sorted(defaults.REFERENCE), ids=lambda k: "-".join(k))
def test_table_equals_the_reference_signatures(key):
    params = inspect.signature(getattr(diffusers, defaults.REFERENCE[key]).__call__).parameters
    row = defaults.defaults_for("sdxl" if key[0] == "sdxl" else "sd1", key[1])
    for name in CHECKED:
        if name in params:
            assert getattr(row, name) == params[name].default, (key, name)
    if "strength" not in params:
        assert row.strength is None, key
    if key[0] == "sd":  # SD2 reads the same row as SD1
        assert defaults.defaults_for("sd2", key[1]) == row


def test_known_values():
    """The values the issue names, so a wrong table cannot agree with a wrong oracle."""
    assert defaults.defaults_for("sdxl", "txt2img").guidance_scale == 5.0
    assert defaults.defaults_for("sd1", "txt2img").guidance_scale == 7.5
    assert defaults.defaults_for("sdxl", "img2img").strength == 0.3
    xl_img2img = defaults.defaults_for("sdxl", "img2img")
    assert (xl_img2img.aesthetic_score, xl_img2img.negative_aesthetic_score) == (6.0, 2.5)
    assert defaults.defaults_for("sdxl", "inpaint").strength == 0.9999
    assert defaults.defaults_for("sd1", "instruct_pix2pix").num_inference_steps == 100


def test_image_guidance_scale_default_is_the_references():
    ref = inspect.signature(diffusers.StableDiffusionInstructPix2PixPipeline.__call__).parameters
    ours_ = inspect.signature(cd.InstructPix2Pix.__init__).parameters
    assert ours_["image_guidance_scale"].default == ref["image_guidance_scale"].default


def test_call_arguments_default_to_none():
    params = inspect.signature(cd.Pipeline.__call__).parameters
    for name in CHECKED + ("height", "width"):
        assert params[name].default is None, name


@pytest.mark.parametrize("kind, image, mask_image, task", [
    ("txt2img", None, None, "txt2img"), ("txt2img", "x", None, "img2img"), ("txt2img", "x", "m", "inpaint"),
    ("inpaint", "x", "m", "inpaint"), ("instruct_pix2pix", None, None, "instruct_pix2pix"),
    ("depth", "x", None, "depth2img"), ("depth", None, None, "depth2img"),
])
def test_task_of(kind, image, mask_image, task):
    assert defaults.task_of(kind, image, mask_image) == task


# ---------------------------------------------------------------------------- end to end
def test_sd1_txt2img_no_explicit_values(tiny_model):
    path = tiny_model("sd1")
    kw = dict(num_inference_steps=3, output_type="np")
    got = ours(path)("a red cube", generator=gen(0), **kw)
    expected = reference("StableDiffusionPipeline", path)("a red cube", generator=gen(0), **kw).images
    assert_close(got.images, expected, "sd1 txt2img")
    assert (got.settings["guidance_scale"], got.settings["height"], got.settings["width"]) == (7.5, 64, 64)


def test_sdxl_txt2img_no_explicit_guidance(tiny_model):
    """The reference's SDXL guidance is 5.0; 7.5 would differ by far more than TOL."""
    path = tiny_model("sdxl")
    kw = dict(num_inference_steps=3, output_type="np")
    mine = ours(path)
    got = mine("a castle", generator=gen(2), **kw)
    expected = reference("StableDiffusionXLPipeline", path)("a castle", generator=gen(2), **kw).images
    assert_close(got.images, expected, "sdxl txt2img")
    assert got.settings["guidance_scale"] == 5.0 and got.settings["task"] == "txt2img"
    other = mine("a castle", generator=gen(2), guidance_scale=7.5, **kw).images
    assert np.abs(other - expected).max() > 10 * TOL  # the default is what makes them equal


def test_sd1_img2img_and_inpaint_default_strength(tiny_model):
    path = tiny_model("sd1")
    mine, init = ours(path), picture(64, 64, 1)
    kw = dict(num_inference_steps=5, output_type="np")
    got = mine("a cat", image=init, generator=gen(0), **kw)
    ref = reference("StableDiffusionImg2ImgPipeline", path)
    assert_close(got.images, ref("a cat", image=init, generator=gen(0), **kw).images, "sd1 img2img")
    assert got.settings["strength"] == 0.8
    got = mine("a hat", image=init, mask_image=mask(64, 64), generator=gen(1), **kw)
    ref = reference("StableDiffusionInpaintPipeline", path)
    expected = ref("a hat", image=init, mask_image=mask(64, 64), generator=gen(1), **kw).images
    assert_close(got.images, expected, "sd1 inpaint")
    assert got.settings["strength"] == 1.0


def test_sdxl_img2img_and_inpaint_defaults(tiny_model):
    path = tiny_model("sdxl")
    mine, init = ours(path), picture(64, 64, 2)
    kw = dict(num_inference_steps=10, output_type="np")
    got = mine("x", image=init, generator=gen(0), **kw)
    ref = reference("StableDiffusionXLImg2ImgPipeline", path)
    assert_close(got.images, ref("x", image=init, generator=gen(0), **kw).images, "sdxl img2img")
    assert (got.settings["strength"], got.settings["guidance_scale"], got.steps_done) == (0.3, 5.0, 3)
    kw = dict(num_inference_steps=4, output_type="np")
    got = mine("y", image=init, mask_image=mask(64, 64), generator=gen(3), **kw)
    ref = reference("StableDiffusionXLInpaintPipeline", path)
    expected = ref("y", image=init, mask_image=mask(64, 64), generator=gen(3), **kw).images
    assert_close(got.images, expected, "sdxl inpaint")
    assert (got.settings["strength"], got.settings["guidance_scale"], got.steps_done) == (0.9999, 7.5, 3)


def test_sdxl_refiner_aesthetic_scores(tiny_model):
    """A refiner (5 time ids) takes the aesthetic scores, 6.0 and 2.5 by default."""
    path = tiny_model("sdxl", refiner=True)
    mine, init = ours(path), picture(64, 64, 3)
    assert mine.info.refiner
    ref = reference("StableDiffusionXLImg2ImgPipeline", path)
    kw = dict(num_inference_steps=10, output_type="np")
    got = mine("a photo", image=init, generator=gen(4), **kw)
    assert_close(got.images, ref("a photo", image=init, generator=gen(4), **kw).images, "refiner")
    assert (got.settings["aesthetic_score"], got.settings["negative_aesthetic_score"]) == (6.0, 2.5)
    kw.update(aesthetic_score=9.0, negative_aesthetic_score=1.0, negative_original_size=(32, 32), strength=0.5)
    got = mine("a photo", image=init, generator=gen(4), **kw).images
    assert_close(got, ref("a photo", image=init, generator=gen(4), **kw).images, "refiner, explicit scores")


def test_instruct_pix2pix_and_depth_defaults(tiny_model):
    path = tiny_model("sd1", in_channels=8)
    mine, init = ours(path), picture(64, 64, 5)
    kw = dict(num_inference_steps=3, output_type="np")
    got = mine("make it snowy", generator=gen(1), controls=[cd.InstructPix2Pix(init)], **kw).images
    ref = reference("StableDiffusionInstructPix2PixPipeline", path)
    assert_close(got, ref("make it snowy", image=init, generator=gen(1), **kw).images, "instruct-pix2pix")
    stopped = mine("x", controls=[cd.InstructPix2Pix(init)], callback=lambda i, t, x: False, output_type="latent")
    assert stopped.settings["steps"] == 100 and stopped.steps_done == 1

    path = tiny_model("sd2", in_channels=5)
    mine = ours(path)
    depth = torch.rand(1, 64, 64, generator=gen(0)) + 0.5
    kw = dict(num_inference_steps=5, output_type="np")
    got = mine("a room", image=init, generator=gen(3), controls=[Depth(depth_map=depth)], **kw)
    ref = reference("StableDiffusionDepth2ImgPipeline", path, depth_estimator=None, feature_extractor=None)
    expected = ref("a room", image=init, depth_map=depth, generator=gen(3), **kw).images
    assert_close(got.images, expected, "depth2img")
    assert got.settings["strength"] == 0.8 and got.settings["task"] == "depth2img"

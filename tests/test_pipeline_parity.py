"""Parity with the diffusers pipelines on tiny random models (the oracle).

Same folder, same settings, same torch.Generator seed: our output_type="np" images
must equal diffusers' within 1e-4 (float32, CPU).
"""
from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from controldiff.schedulers import DIFFUSERS_EQUIVALENT

import diffusers  # the oracle: part of the test extra
import pipes
from pipes import ours

# DPMSolverSDE draws its noise's seed from the global RNG, not the pipeline's generator:
# test_schedulers_sde.py compares it with diffusers given generator=torch.manual_seed(s)
SCHEDULER_CLASSES = {name: c for name, c in DIFFUSERS_EQUIVALENT.items() if c[0] != "DPMSolverSDEScheduler"}
TOL = 1e-4


def reference(cls_name: str, path, scheduler: str | None):
    pipe = pipes.reference(cls_name, path)
    if scheduler is not None:
        name, extra = SCHEDULER_CLASSES[scheduler]
        pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **extra)
    return pipe


def gen(seed):
    return torch.Generator("cpu").manual_seed(seed)


def assert_close(a, b, what=""):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = float(np.abs(a - b).max())
    assert diff <= TOL, f"{what}: max abs diff {diff}"
    return diff


def test_random_images_differ_from_each_other(tiny_model):
    """Sanity for the parity tests below: different seeds give different images."""
    pipe = ours(tiny_model("sd1"))
    a = pipe("a cat", num_inference_steps=2, seed=1, output_type="np").images
    b = pipe("a cat", num_inference_steps=2, seed=2, output_type="np").images
    assert np.abs(a - b).max() > 1e-3


@pytest.mark.parametrize("scheduler", list(SCHEDULER_CLASSES))
def test_txt2img_sd1_every_scheduler(tiny_model, scheduler):
    path = tiny_model("sd1")
    ref, mine = reference("StableDiffusionPipeline", path, scheduler), ours(path)
    for seed, steps, scale in ((0, 4, 7.5), (3, 3, 1.0)):
        kw = dict(num_inference_steps=steps, guidance_scale=scale, output_type="np")
        expected = ref("a red cube", generator=gen(seed), **kw).images
        got = mine("a red cube", generator=gen(seed), scheduler=scheduler, **kw).images
        assert_close(got, expected, f"{scheduler} seed={seed}")


def test_txt2img_sd1_folder_scheduler_negative_batch_and_sizes(tiny_model):
    path = tiny_model("sd1")
    ref, mine = reference("StableDiffusionPipeline", path, None), ours(path)
    kw = dict(num_inference_steps=3, guidance_scale=5.0, output_type="np", height=48, width=80,
              negative_prompt=["blurry", "dark"], num_images_per_prompt=2)
    expected = ref(["a dog", "a house by the sea"], generator=gen(11), **kw).images
    got = mine(["a dog", "a house by the sea"], generator=gen(11), **kw).images
    assert got.shape == (4, 48, 80, 3)
    assert_close(got, expected, "batch")
    # a list of generators, one per image
    kw.update(num_images_per_prompt=1, negative_prompt=None)
    expected = ref(["a", "b"], generator=[gen(1), gen(2)], **kw).images
    got = mine(["a", "b"], generator=[gen(1), gen(2)], **kw).images
    assert_close(got, expected, "generator list")


def test_seed_equals_generator(tiny_model):
    pipe = ours(tiny_model("sd1"))
    a = pipe("x", num_inference_steps=2, seed=5, output_type="np")
    b = pipe("x", num_inference_steps=2, generator=gen(5), output_type="np")
    assert a.seed == 5
    np.testing.assert_array_equal(a.images, b.images)


def test_latent_factor_two(tiny_model):
    path = tiny_model("sd1", latent_factor=2)
    ref, mine = reference("StableDiffusionPipeline", path, "euler_a"), ours(path)
    assert mine.latent_factor == 2
    kw = dict(num_inference_steps=3, guidance_scale=6.0, output_type="np", height=16, width=24)
    assert_close(mine("a", generator=gen(0), scheduler="euler_a", **kw).images,
                 ref("a", generator=gen(0), **kw).images, "factor 2")


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmpp_2m", "unipc", "heun", "ddpm"])
def test_sd2_v_prediction(tiny_model, scheduler):
    path = tiny_model("sd2", prediction_type="v_prediction")
    ref, mine = reference("StableDiffusionPipeline", path, scheduler), ours(path)
    assert mine.info.family == "sd2" and mine.info.prediction_type == "v_prediction"
    for seed, scale in ((0, 7.0), (1, 0.5)):
        kw = dict(num_inference_steps=4, guidance_scale=scale, output_type="np")
        assert_close(mine("a tree", generator=gen(seed), scheduler=scheduler, **kw).images,
                     ref("a tree", generator=gen(seed), **kw).images, f"sd2 {scheduler}")


@pytest.mark.parametrize("scheduler", [None, "euler_a", "dpmpp_2m_karras", "ddim", "lms", "pndm"])
def test_sdxl(tiny_model, scheduler):
    path = tiny_model("sdxl")
    ref, mine = reference("StableDiffusionXLPipeline", path, scheduler), ours(path)
    assert mine.info.family == "sdxl"
    kw = dict(num_inference_steps=3, guidance_scale=5.0, output_type="np", height=64, width=64)
    assert_close(mine("a castle", generator=gen(2), scheduler=scheduler, **kw).images,
                 ref("a castle", generator=gen(2), **kw).images, "sdxl")
    if scheduler is None:
        extra = dict(prompt_2="at night", negative_prompt="fog", original_size=(128, 96),
                     crops_coords_top_left=(8, 0), target_size=(64, 64), guidance_scale=3.0)
        kw.update(extra)
        assert_close(mine("a castle", generator=gen(4), **kw).images,
                     ref("a castle", generator=gen(4), **kw).images, "sdxl micro-conditioning")
        kw.update(guidance_scale=1.0, num_images_per_prompt=2)
        assert_close(mine("a castle", generator=gen(4), **kw).images,
                     ref("a castle", generator=gen(4), **kw).images, "sdxl no cfg")


def _image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _mask(h, w):
    m = np.zeros((h, w), dtype=np.uint8)
    m[h // 4: 3 * h // 4, w // 3:] = 255
    return PIL.Image.fromarray(m).convert("RGB")


@pytest.mark.parametrize("scheduler", list(SCHEDULER_CLASSES))
def test_img2img_every_scheduler(tiny_model, scheduler):
    path = tiny_model("sd1")
    ref, mine = reference("StableDiffusionImg2ImgPipeline", path, scheduler), ours(path)
    init = _image(64, 64)
    for seed, strength, scale in ((0, 0.6, 7.5), (1, 1.0, 1.0)):
        kw = dict(num_inference_steps=5, guidance_scale=scale, output_type="np", strength=strength)
        assert_close(mine("a cat", image=init, generator=gen(seed), scheduler=scheduler, **kw).images,
                     ref("a cat", image=init, generator=gen(seed), **kw).images, f"img2img {scheduler}")


@pytest.mark.parametrize("channels", [4, 9])
@pytest.mark.parametrize("scheduler", list(SCHEDULER_CLASSES))
def test_inpaint_every_scheduler(tiny_model, scheduler, channels):
    path = tiny_model("sd1", in_channels=channels)
    ref, mine = reference("StableDiffusionInpaintPipeline", path, scheduler), ours(path)
    init, mask = _image(64, 64, 1), _mask(64, 64)
    for seed, strength, scale in ((0, 1.0, 7.5), (2, 0.7, 1.0)):
        kw = dict(num_inference_steps=4, guidance_scale=scale, output_type="np", strength=strength,
                  height=64, width=64)
        assert_close(mine("a hat", image=init, mask_image=mask, generator=gen(seed), scheduler=scheduler, **kw).images,
                     ref("a hat", image=init, mask_image=mask, generator=gen(seed), **kw).images,
                     f"inpaint{channels} {scheduler}")


def test_sdxl_img2img(tiny_model):
    path = tiny_model("sdxl")
    mine = ours(path)
    init = _image(64, 64, 2)
    ref = reference("StableDiffusionXLImg2ImgPipeline", path, None)
    kw = dict(num_inference_steps=4, guidance_scale=5.0, output_type="np", strength=0.5)
    assert_close(mine("x", image=init, generator=gen(0), **kw).images,
                 ref("x", image=init, generator=gen(0), **kw).images, "sdxl img2img")

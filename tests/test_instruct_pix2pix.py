"""InstructPix2Pix: parity with StableDiffusionInstructPix2PixPipeline, branches,
rejection on other models, composition with MultiDiffusion."""
from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

import controldiff as cd
from controldiff.controls.instruct_pix2pix import InstructPix2Pix
from controldiff.controls.multidiffusion import MultiDiffusion
from controldiff.schedulers import DIFFUSERS_EQUIVALENT

import diffusers
from pipes import ours

TOL = 1e-4


def gen(seed):
    return torch.Generator("cpu").manual_seed(seed)


def picture(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def path(tiny_model):
    return tiny_model("sd1", in_channels=8)


@pytest.fixture(scope="module")
def mine(path):
    return ours(path)


@pytest.fixture(scope="module")
def ref(path):
    pipe = diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained(path, safety_checker=None,
                                                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_batches(pipe):
    rows = []
    return rows, pipe.unet.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))


# (scheduler, guidance_scale, image_guidance_scale, negative prompt, images per prompt, expected UNet rows)
SETTINGS = [
    ("euler_a", 7.5, 1.5, None, 1, 3),
    ("ddim", 5.0, 1.0, None, 1, 2),         # ig == 1: plain CFG on image-conditioned branches
    ("dpmpp_2m", 7.5, 2.5, "blurry", 2, 6),
    ("euler", 1.0, 1.5, None, 1, 1),        # guidance off
    ("ddim", 7.5, 0.5, None, 1, 2),         # the reference turns guidance off when ig < 1
]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(map(str, s)))
def test_parity_with_reference(ref, mine, setting):
    scheduler, g, ig, negative, n, rows_expected = setting
    name, extra = DIFFUSERS_EQUIVALENT[scheduler]
    ref.scheduler = getattr(diffusers, name).from_config(ref.scheduler.config, **extra)
    image = picture(64, 64)
    kw = dict(num_inference_steps=3, guidance_scale=g, negative_prompt=negative, num_images_per_prompt=n,
              output_type="np")
    expected = ref("make it snowy", image=image, image_guidance_scale=ig, generator=gen(5), **kw).images
    rows, handle = unet_batches(mine)
    try:
        got = mine("make it snowy", height=64, width=64, scheduler=scheduler, generator=gen(5),
                   controls=[InstructPix2Pix(image, image_guidance_scale=ig)], **kw).images
    finally:
        handle.remove()
    assert got.shape == expected.shape == (n, 64, 64, 3)
    assert np.abs(got - expected).max() <= TOL, np.abs(got - expected).max()
    assert rows[0] == rows_expected  # one batched call holds every branch


def test_the_image_matters(mine):
    kw = dict(height=64, width=64, num_inference_steps=2, output_type="np", seed=1)
    a = mine("x", controls=[InstructPix2Pix(picture(64, 64, 0))], **kw).images
    b = mine("x", controls=[InstructPix2Pix(picture(64, 64, 1))], **kw).images
    assert np.abs(a - b).max() > 1e-3


def test_rejected_on_other_models_before_any_step(tiny_model):
    pipe = cd.Pipeline.from_pretrained(tiny_model("sd1"))
    rows, handle = unet_batches(pipe)
    try:
        with pytest.raises(ValueError, match=r"InstructPix2Pix.*8-channel.*4 input channels"):
            pipe("x", num_inference_steps=1, controls=[InstructPix2Pix(picture(64, 64))])
    finally:
        handle.remove()
    assert rows == []


def test_bad_arguments():
    with pytest.raises(ValueError, match="image"):
        InstructPix2Pix(None)
    with pytest.raises(ValueError, match="image_guidance_scale"):
        InstructPix2Pix(picture(8, 8), image_guidance_scale="high")


def test_with_multidiffusion_wide_canvas(mine):
    """Image latents (and the zero-image branch) are cropped per view by the loop."""
    image = picture(64, 128)
    kw = dict(height=64, width=128, num_inference_steps=2, output_type="latent", seed=2, scheduler="euler_a")
    rows, handle = unet_batches(mine)
    try:
        wide = mine("x", controls=[InstructPix2Pix(image), MultiDiffusion(window=64, stride=32, batch_size=2)],
                    **kw).images
    finally:
        handle.remove()
    assert wide.shape == (1, 4, 8, 16) and torch.isfinite(wide).all()
    assert rows[:2] == [3 * 2, 3 * 1]  # 3 views in groups of 2: three branches per view
    # the image steers every view: another image changes both halves of the canvas
    other = mine("x", controls=[InstructPix2Pix(picture(64, 128, 7)), MultiDiffusion(64, 32, batch_size=2)],
                 **kw).images
    assert (wide - other)[..., :8].abs().max() > 1e-3 and (wide - other)[..., 8:].abs().max() > 1e-3


@pytest.mark.parametrize("g, ig", [(7.5, 1.5), (5.0, 1.0), (7.5, 0.5)])
def test_parity_sdxl(tiny_model, g, ig):
    path = tiny_model("sdxl", in_channels=8)
    ref = diffusers.StableDiffusionXLInstructPix2PixPipeline.from_pretrained(path)
    ref.set_progress_bar_config(disable=True)
    mine = cd.Pipeline.from_pretrained(path)
    mine.progress = False
    image = picture(64, 64, 3)
    kw = dict(num_inference_steps=3, guidance_scale=g, output_type="np")
    expected = ref("make it snowy", image=image, image_guidance_scale=ig, generator=gen(1), **kw).images
    got = mine("make it snowy", height=64, width=64, generator=gen(1),
               controls=[InstructPix2Pix(image, image_guidance_scale=ig)], **kw).images
    assert np.abs(got - expected).max() <= TOL, np.abs(got - expected).max()

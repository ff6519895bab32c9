"""Depth (5-channel depth models): parity with StableDiffusionDepth2ImgPipeline given a
depth map, errors, composition with MultiDiffusion."""
from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

import controldiff as cd
from controldiff.controls.depth import Depth
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


def depth_map(h, w, seed=0):
    return torch.rand(1, h, w, generator=gen(seed)) * 10.0


@pytest.fixture(scope="module")
def path(tiny_model):
    return tiny_model("sd2", in_channels=5)


@pytest.fixture(scope="module")
def mine(path):
    return ours(path)


@pytest.fixture(scope="module")
def ref(path):
    pipe = diffusers.StableDiffusionDepth2ImgPipeline.from_pretrained(path, depth_estimator=None,
                                                                    feature_extractor=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# (scheduler, guidance, strength, negative, images per prompt, depth size, depth as numpy)
SETTINGS = [
    (None, 7.5, 0.8, None, 1, (64, 64), False),
    ("euler_a", 1.0, 1.0, None, 1, (48, 40), True),
    ("dpmpp_2m", 5.0, 0.6, "dark", 2, (32, 32), False),
    ("euler", 7.5, 0.75, None, 1, (80, 72), True),
]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(map(str, s)))
def test_parity_with_reference(ref, mine, setting):
    scheduler, g, strength, negative, n, dsize, as_numpy = setting
    if scheduler is not None:
        name, extra = DIFFUSERS_EQUIVALENT[scheduler]
        ref.scheduler = getattr(diffusers, name).from_config(ref.scheduler.config, **extra)
    else:
        ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)  # the folder's own
    image, depth = picture(64, 64), depth_map(*dsize)
    kw = dict(num_inference_steps=4, guidance_scale=g, strength=strength, negative_prompt=negative,
              num_images_per_prompt=n, output_type="np")
    expected = ref("a room", image=image, depth_map=depth, generator=gen(3), **kw).images
    given = depth[0].numpy() if as_numpy else depth
    got = mine("a room", image=image, scheduler=scheduler, generator=gen(3), controls=[Depth(depth_map=given)],
               **kw).images
    assert got.shape == expected.shape == (n, 64, 64, 3)
    assert np.abs(got - expected).max() <= TOL, np.abs(got - expected).max()


def test_depth_matters(mine):
    kw = dict(num_inference_steps=2, output_type="np", seed=1, height=64, width=64)
    a = mine("x", controls=[Depth(depth_map=depth_map(64, 64, 0))], **kw).images
    b = mine("x", controls=[Depth(depth_map=depth_map(64, 64, 1))], **kw).images
    assert np.abs(a - b).max() > 1e-3
    # a PIL depth map works too (any scale: it is min/max normalised)
    pil = PIL.Image.fromarray((depth_map(64, 64, 0)[0].numpy() * 25).astype(np.uint8))
    assert mine("x", controls=[Depth(depth_map=pil)], **kw).images.shape == (1, 64, 64, 3)


def test_errors(tiny_model, mine):
    with pytest.raises(ValueError, match="depth_map.*estimator"):
        Depth(image=picture(64, 64))
    with pytest.raises(ValueError, match="depth_map.*constant"):
        Depth(depth_map=torch.ones(1, 8, 8))
    with pytest.raises(ValueError, match="depth_map.*shape"):
        Depth(depth_map=torch.rand(1, 3, 8, 8))
    pipe = cd.Pipeline.from_pretrained(tiny_model("sd1"))
    rows = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, a: rows.append(1))
    try:
        with pytest.raises(ValueError, match=r"Depth.*5-channel.*4 input channels"):
            pipe("x", num_inference_steps=1, controls=[Depth(depth_map=depth_map(64, 64))])
    finally:
        handle.remove()
    assert rows == []
    # a depth model without its depth map: the pipeline names the channel mismatch
    with pytest.raises(ValueError, match="5 input channels"):
        mine("x", num_inference_steps=1)


def test_with_multidiffusion_wide_canvas(mine):
    kw = dict(height=64, width=128, num_inference_steps=2, output_type="latent", seed=2)
    a = mine("x", controls=[Depth(depth_map=depth_map(64, 128, 0)), MultiDiffusion(64, 32)], **kw).images
    b = mine("x", controls=[Depth(depth_map=depth_map(64, 128, 1)), MultiDiffusion(64, 32)], **kw).images
    assert a.shape == (1, 4, 8, 16) and torch.isfinite(a).all()
    assert (a - b)[..., :8].abs().max() > 1e-3 and (a - b)[..., 8:].abs().max() > 1e-3

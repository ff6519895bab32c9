"""MultiDiffusion: parity with diffusers' StableDiffusionPanoramaPipeline, batching of
views, circular wrap, errors.

The reference hard-codes window 64 / stride 8 latents in ``get_views``; the tests
bind smaller numbers on the reference instance (its own code, other arguments) so a
tiny canvas holds several overlapping views. The reference's circular merge indexes
the view crop with canvas rows (``latents_view_denoised[:, :, h_start:h_end, ...]``),
so it only runs when the window spans the full height: circular parity settings use
one row of views; several rows with wrap are tested against the plain merge instead.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

import controldiff as cd
from controldiff.controls.multidiffusion import MultiDiffusion, get_views
from controldiff.schedulers import DIFFUSERS_EQUIVALENT

import diffusers
from pipes import ours

TOL = 1e-4


def gen(seed):
    return torch.Generator("cpu").manual_seed(seed)


@pytest.fixture(scope="module")
def path(tiny_model):
    return tiny_model("sd1")


@pytest.fixture(scope="module")
def mine(path):
    return ours(path)


@pytest.fixture(scope="module")
def ref(path):
    pipe = diffusers.StableDiffusionPanoramaPipeline.from_pretrained(path, safety_checker=None,
                                                                     requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_ref(ref, scheduler, window_px, stride_px, view_batch_size, **kw):
    name, extra = DIFFUSERS_EQUIVALENT[scheduler]
    ref.scheduler = getattr(diffusers, name).from_config(ref.scheduler.config, **extra)
    f = ref.vae_scale_factor
    ref.get_views = functools.partial(type(ref).get_views, ref, window_size=window_px // f, stride=stride_px // f)
    return ref(view_batch_size=view_batch_size, **kw).images


def count_calls(pipe):
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    return calls, handle


# (scheduler, guidance, height, width, window px, stride px, circular, batch_size)
SETTINGS = [
    ("ddim", 7.5, 64, 128, 32, 16, False, None),
    ("ddim", 1.0, 64, 128, 64, 32, False, 2),
    ("euler_a", 5.0, 64, 192, 64, 32, False, 1),
    ("euler_a", 5.0, 64, 128, 32, 32, False, 3),
    ("dpmpp_2m", 7.5, 64, 192, 64, 32, False, 1),
    ("dpmpp_2m", 1.0, 64, 128, 32, 16, False, None),
    ("euler", 7.5, 64, 128, 64, 32, True, 2),
    ("euler_a", 7.5, 64, 128, 64, 16, True, None),
    ("dpmpp_2m", 3.0, 64, 192, 64, 32, True, 1),
]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(map(str, s)))
def test_parity_with_panorama_pipeline(ref, mine, setting):
    scheduler, scale, h, w, window, stride, circular, bs = setting
    f = mine.latent_factor
    n_views = len(get_views(h // f, w // f, window // f, stride // f, circular))
    assert n_views > 2
    steps = 3 if scheduler == "dpmpp_2m" else 2  # 3: the multistep history is used (not only first order)
    # images, so circular panoramas also check the wrap-padded decoding
    kw = dict(num_inference_steps=steps, guidance_scale=scale, height=h, width=w, output_type="np")
    expected = run_ref(ref, scheduler, window, stride, bs or n_views, prompt="a wide valley",
                       circular_padding=circular, generator=gen(4), **kw)
    control = MultiDiffusion(window=window, stride=stride, circular=circular, batch_size=bs)
    calls, handle = count_calls(mine)
    try:
        got = mine("a wide valley", generator=gen(4), scheduler=scheduler, controls=[control], **kw).images
    finally:
        handle.remove()
    expected, got = np.asarray(expected), np.asarray(got.cpu() if torch.is_tensor(got) else got)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= TOL, np.abs(got - expected).max()
    # views are batched: ceil(views / batch_size) UNet calls per step, each with every branch
    per_step = math.ceil(n_views / (bs or n_views))
    assert len(calls) == steps * per_step
    branches = 2 if scale > 1 else 1
    assert calls[0] == branches * min(n_views, bs or n_views)


def test_batch_size_does_not_change_deterministic_result(mine):
    kw = dict(num_inference_steps=3, height=64, width=128, output_type="latent", scheduler="dpmpp_2m")
    results = [mine("a river", seed=2, controls=[MultiDiffusion(32, 32, batch_size=b)], **kw).images
               for b in (None, 1, 3)]
    for r in results[1:]:
        assert (r - results[0]).abs().max() <= 1e-5 * results[0].abs().max()  # float rounding only


def test_views_cover_canvas_and_wrap():
    views = get_views(8, 16, 4, 2)
    assert len(views) == 3 * 7 and views[-1] == cd.sampling.control.View(4, 8, 12, 16)
    wrapped = get_views(8, 16, 4, 2, circular=True)
    assert len(wrapped) == 3 * 8 and wrapped[-1].w1 == 18  # runs past the right edge
    # a stride that does not divide still covers every column (the reference would zero them)
    cover = torch.zeros(1, 1, 8, 15)
    for v in get_views(8, 15, 4, 3):
        v.add_into(cover, torch.ones(1, 1, 4, 4))
    assert (cover > 0).all()
    # canvas smaller than the window: one view covering it
    assert get_views(4, 6, 8, 2) == [cd.sampling.control.View(0, 4, 0, 6)]


def test_one_view_equals_plain_generation(mine):
    """Also for batches: the reference pairs latents and prompts wrongly when more than one
    image is generated with guidance (repeat_interleave latents vs concatenated prompts),
    so batches are checked against plain generation instead."""
    kw = dict(num_inference_steps=2, height=64, width=64, output_type="np", scheduler="euler_a",
              num_images_per_prompt=2, negative_prompt="dark")
    plain = mine("a cat", seed=3, **kw).images
    viewed = mine("a cat", seed=3, controls=[MultiDiffusion(window=64, stride=8)], **kw).images
    assert np.abs(plain - viewed).max() <= 1e-5


def test_wide_canvas_differs_from_plain_and_seams_are_blended(mine):
    kw = dict(num_inference_steps=2, height=64, width=128, output_type="latent", scheduler="ddim")
    plain = mine("a cat", seed=3, **kw).images
    viewed = mine("a cat", seed=3, controls=[MultiDiffusion(window=64, stride=32)], **kw).images
    assert (plain - viewed).abs().max() > 1e-3


@pytest.mark.parametrize("kwargs, arg", [
    (dict(window=0), "window"), (dict(stride=-8), "stride"), (dict(window=32, stride=64), "stride"),
    (dict(batch_size=0), "batch_size"),
])
def test_bad_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        MultiDiffusion(**kwargs)


def test_window_not_multiple_of_latent_factor(mine):
    with pytest.raises(ValueError, match="window"):
        mine("x", num_inference_steps=1, height=64, width=128, controls=[MultiDiffusion(window=36, stride=16)])


def test_only_one_view_control(mine):
    with pytest.raises(ValueError, match="only one control"):
        mine("x", num_inference_steps=1, height=64, width=128,
             controls=[MultiDiffusion(32, 16), MultiDiffusion(64, 32)])

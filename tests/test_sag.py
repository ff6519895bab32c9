"""SAG: parity with diffusers' StableDiffusionSAGPipeline, and behaviour."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import controldiff as cd
from controldiff.controls.sag import SAG, SITE
from controldiff.sampling.control import Control

import diffusers  # the oracle

TOL = 1e-4
SCHEDULERS = {"ddim": "DDIMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}


def gen(seed):
    return torch.Generator("cpu").manual_seed(seed)


def load(path):
    ref = diffusers.StableDiffusionSAGPipeline.from_pretrained(path, safety_checker=None,
                                                                requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    mine = cd.Pipeline.from_pretrained(path)
    mine.progress = False
    return ref, mine


@pytest.fixture(scope="module")
def sd1(tiny_model):
    return load(tiny_model("sd1"))


def check(ref, mine, scheduler, prompt, sag_scale, **kw):
    ref.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(ref.scheduler.config)
    kw = dict(num_inference_steps=3, output_type="np", **kw)
    expected = ref(prompt, generator=gen(4), sag_scale=sag_scale, **kw).images
    got = mine(prompt, generator=gen(4), scheduler=scheduler, controls=[SAG(sag_scale)], **kw).images
    plain = mine(prompt, generator=gen(4), scheduler=scheduler, **kw).images
    assert np.abs(got - plain).max() > 1e-3, "SAG had no effect"
    assert float(np.abs(got - expected).max()) <= TOL


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("guidance, scale", [(7.5, 0.5), (1.0, 1.0)])
def test_parity_sd1(sd1, scheduler, guidance, scale):
    check(*sd1, scheduler, "a cat", scale, guidance_scale=guidance)


def test_parity_batch_and_negative(sd1):
    check(*sd1, "ddim", ["a cat", "a dog"], 0.75, guidance_scale=5.0, negative_prompt=["blurry", "dark"],
          num_images_per_prompt=2)


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_parity_sd2_v_prediction(tiny_model, scheduler):
    check(*load(tiny_model("sd2", prediction_type="v_prediction")), scheduler, "a cat", 1.0, guidance_scale=7.5)


class _Probe(Control):
    """Records the processors attached to each call (placed after SAG)."""

    def __init__(self):
        self.sites = []

    def prepare_call(self, ctx, step, call):
        self.sites.append(sorted(call.processors))


def test_zero_scale_equals_no_control_and_single_site(sd1):
    _, mine = sd1
    kw = dict(num_inference_steps=2, guidance_scale=7.5, output_type="np", scheduler="ddim")
    plain = mine("a cat", generator=gen(1), **kw).images
    probe = _Probe()
    assert np.array_equal(mine("a cat", generator=gen(1), controls=[SAG(0.0), probe], **kw).images, plain)
    assert probe.sites == [[], []]
    probe = _Probe()
    mine("a cat", generator=gen(1), controls=[SAG(), probe], **kw)
    assert probe.sites == [[SITE], [SITE]]
    assert not any(a.processor for a in mine.unet.attention_sites().values())  # nothing left attached


def test_euler_runs_on_sigma_inputs(sd1):
    """The reference refuses float-timestep schedulers; ours works in alpha space."""
    _, mine = sd1
    kw = dict(num_inference_steps=3, guidance_scale=7.5, output_type="np", scheduler="euler")
    plain = mine("a cat", generator=gen(1), **kw).images
    got = mine("a cat", generator=gen(1), controls=[SAG(0.75)], **kw).images
    assert np.isfinite(got).all() and np.abs(got - plain).max() > 1e-3


def test_errors(sd1):
    with pytest.raises(ValueError, match="scale"):
        SAG(-1.0)
    assert SAG().scale == 0.75


def test_composes_with_pag_on_the_same_site_in_any_order(sd1):
    """SAG reads the mid-block map while PAG perturbs its own rows there: order is irrelevant."""
    from controldiff.controls.pag import PAG

    _, mine = sd1
    kw = dict(num_inference_steps=2, guidance_scale=7.5, output_type="np", scheduler="ddim")
    a = mine("a cat", generator=gen(3), controls=[SAG(1.0), PAG(2.0)], **kw).images
    b = mine("a cat", generator=gen(3), controls=[PAG(2.0), SAG(1.0)], **kw).images
    pag_only = mine("a cat", generator=gen(3), controls=[PAG(2.0)], **kw).images
    # the site's wrapped processors run in the other order: the same math, summed in another
    # order by float32 (1e-6 seen on one thread), far below SAG's own effect
    assert np.abs(a - b).max() <= 1e-5
    assert np.abs(a - pag_only).max() > 1e-3


def test_composes_with_concat_inpainting(tiny_model):
    """A 9-channel inpainting UNet: the degraded re-run gets the branch's mask channels too."""
    mine = cd.Pipeline.from_pretrained(tiny_model("sd1", in_channels=9))
    mine.progress = False
    image = np.random.default_rng(0).random((64, 64, 3)).astype(np.float32)
    mask = np.zeros((64, 64), np.float32)
    mask[16:48, 16:48] = 1.0
    import PIL.Image

    kw = dict(image=PIL.Image.fromarray((image * 255).astype(np.uint8)),
              mask_image=PIL.Image.fromarray((mask * 255).astype(np.uint8)),
              num_inference_steps=2, output_type="np", scheduler="ddim")
    plain = mine("a cat", generator=gen(0), **kw).images
    got = mine("a cat", generator=gen(0), controls=[SAG(1.0)], **kw).images
    assert np.isfinite(got).all() and np.abs(got - plain).max() > 1e-3

"""DDIM inversion (``pipe.invert``) and generation from given latents or an inversion.

Parity: ``StableDiffusionPix2PixZeroPipeline.invert`` (final latents, with and without the
auto-correlation/KL regularisation) and ``StableDiffusionDiffEditPipeline.invert`` (the
whole trajectory, partial strengths); ``latents=`` against ``StableDiffusionPipeline``.
Behaviour on every family: inverting then regenerating with the same prompt gives the
image back far better than a random start does.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import diffusers
from pipes import ours, reference
from pictures import photo

TOL = 1e-4


def gen(seed):
    return torch.Generator("cpu").manual_seed(seed)


@pytest.fixture(scope="module")
def sd1(tiny_model):
    return tiny_model("sd1")


def with_inverse(ref):
    ref.inverse_scheduler = diffusers.DDIMInverseScheduler.from_config(ref.scheduler.config)
    return ref


@pytest.mark.parametrize("kw", [
    dict(num_reg_steps=0),
    dict(num_reg_steps=2),                                              # the default lambdas
    dict(num_reg_steps=1, lambda_auto_corr=3.0, lambda_kl=5.0, num_auto_corr_rolls=2),
    dict(num_reg_steps=1, lambda_auto_corr=0.0, guidance_scale=3.0),    # KL only, with guidance
])
def test_invert_equals_pix2pix_zero(sd1, kw):
    ref, mine = with_inverse(reference("StableDiffusionPix2PixZeroPipeline", sd1)), ours(sd1)
    expected = ref.invert("a cat", photo(), num_inference_steps=4, generator=gen(3), output_type="np", **kw).latents
    inv = mine.invert(photo(), "a cat", num_inference_steps=4, seed=3, **kw)
    assert (inv.latents - expected).abs().max() <= TOL
    assert torch.equal(inv.trajectory[:, 0], inv.latents) and inv.trajectory.shape[1] == 4


def test_regularisation_changes_the_inversion(sd1):
    pipe = ours(sd1)
    plain = pipe.invert(photo(), "a cat", num_inference_steps=3, seed=3)
    reg = pipe.invert(photo(), "a cat", num_inference_steps=3, seed=3, num_reg_steps=1)
    assert (plain.latents - reg.latents).abs().max() > 1e-3


@pytest.mark.parametrize("strength, guidance, steps", [(0.8, 3.0, 5), (0.5, 7.5, 6), (1.0, 1.0, 3)])
def test_invert_trajectory_equals_diffedit(sd1, strength, guidance, steps):
    ref, mine = with_inverse(reference("StableDiffusionDiffEditPipeline", sd1)), ours(sd1)
    expected = ref.invert(image=photo(1), prompt=["a cat", "a dog"], num_inference_steps=steps,
                          inpaint_strength=strength, guidance_scale=guidance, generator=gen(4),
                          decode_latents=False).latents
    inv = mine.invert(photo(1), ["a cat", "a dog"], num_inference_steps=steps, strength=strength,
                      guidance_scale=guidance, seed=4)
    assert inv.trajectory.shape == expected.shape == (2, int(steps * strength), 4, 8, 8)
    assert (inv.trajectory - expected).abs().max() <= TOL


@pytest.mark.parametrize("family, scheduler", [("sd1", "euler"), ("sd1", "ddim"), ("sdxl", "euler")])
def test_given_latents_equal_diffusers(tiny_model, family, scheduler):
    from test_pipeline_parity import reference as ref_with

    path = tiny_model(family)
    cls = "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline"
    ref, mine = ref_with(cls, path, scheduler), ours(path)
    start = torch.randn(2, 4, 8, 8, generator=gen(5))
    kw = dict(num_inference_steps=3, output_type="np")
    expected = ref(["a cat", "a dog"], latents=start.clone(), **kw).images
    got = mine(["a cat", "a dog"], latents=start.clone(), scheduler=scheduler, **kw).images
    assert np.abs(got - expected).max() <= TOL


@pytest.mark.parametrize("family, prediction", [("sd1", "epsilon"), ("sd2", "v_prediction"), ("sdxl", "epsilon")])
def test_inversion_reconstructs_the_image(tiny_model, family, prediction):
    """Invert, then regenerate with the same prompt and no guidance: the image's latents come
    back, closer with more steps (DDIM inversion's error is its step size), and far closer
    than generation from a random start. Measured in latent space: the random tiny VAE's
    decoder squashes pixel differences."""
    pipe = ours(tiny_model(family, prediction_type=prediction))
    image = photo(2)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    target = pipe._encode_image(pixels, gen(0))  # invert() samples the posterior with the same seed
    kw = dict(guidance_scale=1.0, output_type="latent")
    errors = []
    for steps in (10, 50):
        inv = pipe.invert(image, "a red house", num_inference_steps=steps, seed=0)
        back = pipe("a red house", inversion=inv, **kw).images
        errors.append((back - target).pow(2).mean().item())
    random_start = pipe("a red house", num_inference_steps=50, seed=0, scheduler="ddim", height=64, width=64, **kw)
    assert errors[1] < 0.7 * errors[0], errors
    assert errors[1] < 0.05 * (random_start.images - target).pow(2).mean().item()


def test_partial_inversion_regenerates_from_its_level(sd1):
    pipe = ours(sd1)
    inv = pipe.invert(photo(3), "a cat", num_inference_steps=10, strength=0.5, seed=0)
    steps = []
    out = pipe("a cat", inversion=inv, guidance_scale=1.0, output_type="latent",
               callback=lambda i, t, x: steps.append(int(t)))
    ddim = pipe.make_scheduler("ddim")
    ddim.set_timesteps(10)
    assert steps == ddim.timesteps[5:].tolist() and out.steps_done == 5
    assert (out.images - inv.trajectory[:, -1]).abs().max() < (inv.latents - inv.trajectory[:, -1]).abs().max()


def test_inversion_uses_the_controls_and_prompt_syntax(sd1):
    import controldiff as cd

    pipe = ours(sd1)
    base = pipe.invert(photo(), "a cat", num_inference_steps=3, seed=1, guidance_scale=3.0)
    weighted = pipe.invert(photo(), "a (cat:1.4)", num_inference_steps=3, seed=1, guidance_scale=3.0)
    pag = pipe.invert(photo(), "a cat", num_inference_steps=3, seed=1, guidance_scale=3.0,
                      controls=[cd.PAG(scale=2.0)])
    assert (base.latents - weighted.latents).abs().max() > 1e-4
    assert (base.latents - pag.latents).abs().max() > 1e-4
    assert pag.settings["controls"][0]["name"] == "PAG"


@pytest.mark.parametrize("kw, match", [
    (dict(num_inference_steps=7), "num_inference_steps: 7 differs from the inversion's 4"),
    (dict(height=32), "height: 32 differs"),
    (dict(scheduler="euler"), "scheduler: 'euler' differs from the inversion's 'ddim'"),
    (dict(image="x.png"), "inversion: starts generation from latents"),
    (dict(latents=torch.zeros(1, 4, 8, 8)), "latents, inversion: pass one"),
])
def test_generation_must_agree_with_the_inversion(sd1, kw, match):
    pipe = ours(sd1)
    inv = pipe.invert(photo(), "a cat", num_inference_steps=4, seed=0)
    with pytest.raises(ValueError, match=match):
        pipe("a cat", inversion=inv, **kw)


@pytest.mark.parametrize("kw, match", [
    (dict(latents=torch.zeros(1, 3, 8, 8)), r"latents: expected a tensor \(batch, 4"),
    (dict(latents=torch.full((1, 4, 8, 8), float("nan"))), "latents: contains NaN"),
    (dict(latents=torch.zeros(1, 4, 8, 8), width=32), "width: 32 does not fit latents"),
    (dict(latents=torch.zeros(3, 4, 8, 8)), "latents: 3 images cannot be spread over a batch of 2"),
    (dict(inversion="inv"), "inversion: expected what pipe.invert"),
])
def test_bad_latents(pipe, no_work, kw, match):
    with pytest.raises(ValueError, match=match):
        pipe(["a cat", "a dog"], **kw)


@pytest.mark.parametrize("kw, match", [
    (dict(strength=0.0), r"strength: expected a value in \(0, 1\]"),
    (dict(strength=0.1, num_inference_steps=5), "leaves no step to run"),
    (dict(method="ddpm2"), "method: expected one of"),
    (dict(lambda_kl=-1.0), "lambda_kl: expected a finite number >= 0"),
    (dict(num_reg_steps=1.5), "num_reg_steps: expected an integer >= 0"),
    (dict(num_auto_corr_rolls=0), "num_auto_corr_rolls: expected a positive integer"),
    (dict(guidance_scale=float("nan")), "guidance_scale: expected a finite number"),
    (dict(prompt=""), None),
])
def test_bad_invert_arguments(pipe, no_work, kw, match):
    if match is None:  # the empty prompt is the default: it gets as far as the model
        with pytest.raises(AssertionError, match="work started"):
            pipe.invert(photo(), **kw)
        return
    with pytest.raises(ValueError, match=match):
        pipe.invert(photo(), **kw)


def test_several_inverted_images_with_several_images_each_are_refused(pipe):
    inv = pipe.invert(photo(), ["a cat", "a dog"], num_inference_steps=2, seed=0)
    with pytest.raises(ValueError, match="num_images_per_prompt: 2 with an inversion of 2 images is ambiguous"):
        pipe(["a cat", "a dog"], inversion=inv, num_images_per_prompt=2)
    assert pipe(["a cat", "a dog"], inversion=inv, output_type="latent").images.shape[0] == 2


def test_cancelled_inversion_raises(pipe):
    with pytest.raises(RuntimeError, match="cancelled by the callback after 1 of 3 steps"):
        pipe.invert(photo(), num_inference_steps=3, seed=0, callback=lambda i, t, x: False)

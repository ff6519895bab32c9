"""Behaviour of the Pipeline where no oracle is needed: errors, cancel, output types,
the loop's extension points."""
from __future__ import annotations

import warnings

import numpy as np
import PIL.Image
import pytest
import torch

import controldiff as cd
from controldiff.images import preprocess_image


def run(pipe, **kw):
    kw.setdefault("num_inference_steps", 2)
    kw.setdefault("seed", 0)
    kw.setdefault("output_type", "np")
    return pipe(kw.pop("prompt", "a cat"), **kw)


@pytest.mark.parametrize("kw, words", [
    (dict(height=60), ["height", "multiple of 8"]),
    (dict(width=0), ["width"]),
    (dict(scheduler="nope"), ["nope", "euler_a"]),
    (dict(output_type="jpeg"), ["output_type"]),
    (dict(num_inference_steps=0), ["num_inference_steps"]),
    (dict(strength=0.5), ["strength", "image"]),
    (dict(prompt=""), []),
    (dict(prompt=[]), ["prompt"]),
    (dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"]), ["negative_prompt"]),
    (dict(generator=torch.Generator().manual_seed(0)), ["generator", "seed"]),
    (dict(prompt_2="x"), ["prompt_2", "SDXL"]),
])
def test_bad_arguments_are_named(pipe, kw, words):
    if kw.get("prompt") == "":
        run(pipe, **kw)  # an empty prompt is a valid (unconditional) prompt
        return
    with pytest.raises(ValueError) as e:
        run(pipe, **kw)
    for w in words:
        assert w in str(e.value)


def test_image_errors(pipe):
    img = PIL.Image.new("RGB", (64, 64), "white")
    with pytest.raises(ValueError, match="strength"):
        run(pipe, image=img, strength=0.0)
    with pytest.raises(ValueError, match="strength"):
        run(pipe, image=img, strength=1.5)
    with pytest.raises(ValueError, match="mask_image.*differs"):
        run(pipe, image=img, mask_image=PIL.Image.new("L", (32, 64)))
    with pytest.raises(ValueError, match="mask_image: inpainting also needs image"):
        run(pipe, mask_image=img)
    with pytest.raises(FileNotFoundError, match="image"):
        run(pipe, image="/nonexistent/picture.png")
    with pytest.raises(ValueError, match="strength"):
        run(pipe, image=img, strength=0.1, num_inference_steps=2)  # no step left


def test_inpaint_model_needs_mask(tiny_model):
    p = cd.Pipeline.from_pretrained(tiny_model("sd1", in_channels=9))
    p.progress = False
    with pytest.raises(ValueError, match="mask_image.*inpainting model"):
        run(p)


def test_long_prompt_is_chunked_not_truncated(pipe):
    words = " ".join(["word"] * 30) + " ENDING"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        chunked = run(pipe, prompt=words)
    assert not [w for w in seen if "dropped" in str(w.message)]
    pipe.prompt_encoder.truncate = True
    try:
        with pytest.warns(UserWarning, match="dropped.*ending"):
            truncated = run(pipe, prompt=words)
    finally:
        pipe.prompt_encoder.truncate = False
    assert np.abs(chunked.images - truncated.images).max() > 1e-4  # the tail is not lost

def test_output_types(pipe):
    np_img = run(pipe).images
    assert np_img.shape == (1, 64, 64, 3) and np_img.dtype == np.float32
    assert 0 <= np_img.min() and np_img.max() <= 1
    pt = run(pipe, output_type="pt").images
    assert isinstance(pt, torch.Tensor) and pt.shape == (1, 3, 64, 64)
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), np_img, atol=1e-6)
    pil = run(pipe, output_type="pil").images
    assert isinstance(pil[0], PIL.Image.Image) and pil[0].size == (64, 64)
    np.testing.assert_array_equal(np.array(pil[0]), (np_img[0] * 255).round().astype(np.uint8))
    lat = run(pipe, output_type="latent").images
    assert lat.shape == (1, 4, 8, 8)


def test_callback_cancel_returns_what_was_reached(pipe):
    seen = []

    def stop_after_two(i, t, latents):
        seen.append(i)
        return i < 1

    out = run(pipe, num_inference_steps=5, callback=stop_after_two, scheduler="euler")
    assert seen == [0, 1]
    assert out.cancelled and out.steps_done == 2
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()
    full = run(pipe, num_inference_steps=5, scheduler="euler")
    assert not full.cancelled and full.steps_done == 5
    assert np.abs(full.images - out.images).max() > 1e-4


def test_nan_is_reported_not_saved(pipe):
    class Poison(cd.Control):
        def after_step(self, ctx, step, latents):
            return latents * float("nan")

    with pytest.raises(FloatingPointError, match="NaN"):
        run(pipe, controls=[Poison()])


def test_random_seed_is_reported_and_reproducible(pipe):
    out = run(pipe, seed=None)
    assert isinstance(out.seed, int)
    again = run(pipe, seed=out.seed)
    np.testing.assert_array_equal(out.images, again.images)


def test_controls_extension_points_compose(pipe):
    """A control's branch is batched into the same model call; its combine sees it."""
    calls = []

    class Negative(cd.Control):
        def __init__(self, scale):
            self.scale = scale

        def branches(self, ctx, step):
            return [cd.Branch("extra", ctx.text["uncond"])]

        def prepare_call(self, ctx, step, call):
            calls.append(list(call.slices))

        def combine(self, ctx, step, preds, noise):
            return noise + self.scale * (noise - preds["extra"])

    base = run(pipe)
    zero = run(pipe, controls=[Negative(0.0)])
    np.testing.assert_allclose(zero.images, base.images, atol=1e-5)
    assert calls and all(c == ["uncond", "cond", "extra"] for c in calls)  # one call, three branches
    strong = run(pipe, controls=[Negative(3.0)])
    assert np.abs(strong.images - base.images).max() > 1e-3


def test_inpainting_keeps_unmasked_latents(pipe):
    img = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    out = run(pipe, image=img, mask_image=PIL.Image.fromarray(mask), output_type="latent", num_inference_steps=3)
    init = pipe._encode_image(preprocess_image(img, 64, 64), torch.Generator().manual_seed(0))
    # the left half (mask 0) is the original image's latents at the last step
    assert torch.allclose(out.images[..., :4], init[..., :4], atol=1e-5)
    assert not torch.allclose(out.images[..., 4:], init[..., 4:], atol=1e-2)

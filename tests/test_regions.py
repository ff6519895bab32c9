"""Regions (MultiDiffusion region prompts): behaviour tests, there is no reference
pipeline. One step is enough to compare areas exactly: after more steps the UNet's
receptive field carries a region's change to its neighbourhood, as in the paper."""
from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

import controldiff as cd
from controldiff.controls.multidiffusion import MultiDiffusion
from controldiff.controls.regions import Region, Regions

G = 7.5


def run(pipe, regions=None, steps=1, scheduler="ddim", output_type="latent", seed=1, width=64, extra=(), **kw):
    controls = ([Regions(regions)] if regions is not None else []) + list(extra)
    return pipe("a field", num_inference_steps=steps, guidance_scale=G, scheduler=scheduler, seed=seed,
                height=64, width=width, output_type=output_type, controls=controls, **kw).images


def close(a, b, tol=1e-5):
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


def test_region_changes_only_its_area(pipe):
    plain = run(pipe)
    left, right = Region("a red barn", box=(0, 0, 24, 64)), Region("a blue lake", box=(40, 0, 64, 64))
    both = run(pipe, [left, right])
    # latent columns 0-2 are the left box, 5-7 the right one, 3-4 the background
    # unchanged = equal to float32 rounding (close's 1e-5); changed = beyond it. A fixed 1e-3
    # would test the tiny random model's sensitivity to words, not the control
    assert close(both[..., 3:5], plain[..., 3:5])
    assert not close(both[..., :3], plain[..., :3]) and not close(both[..., 5:], plain[..., 5:])
    # inside its box a region is its own prompt alone (full-image region = that prompt)
    full_left = run(pipe, [Region("a red barn")])
    full_right = run(pipe, [Region("a blue lake")])
    assert close(both[..., :3], full_left[..., :3]) and close(both[..., 5:], full_right[..., 5:])


def test_full_image_region_with_main_prompt_equals_plain(pipe):
    kw = dict(steps=3, scheduler="euler_a", output_type="np")
    plain = torch.from_numpy(run(pipe, **kw))
    same = torch.from_numpy(run(pipe, [Region("a field")], **kw))
    assert (plain - same).abs().max() <= 1e-4


def test_zero_weight_region_is_no_region(pipe):
    plain = run(pipe, steps=2)
    zero = run(pipe, [Region("a castle", box=(0, 0, 32, 32), weight=0.0)], steps=2)
    assert torch.equal(plain, zero)


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a"])
def test_overlapping_regions_average_by_weight(pipe, scheduler):
    a, b = run(pipe, [Region("a castle")], scheduler=scheduler), run(pipe, [Region("a forest")], scheduler=scheduler)
    mixed = run(pipe, [Region("a castle", box=(0, 0, 40, 64)), Region("a forest", box=(24, 0, 64, 64), weight=3.0)],
                scheduler=scheduler)
    assert close(mixed[..., :3], a[..., :3])               # only the castle
    assert close(mixed[..., 5:], b[..., 5:])               # only the forest (weight 3 >= 1: no background)
    assert close(mixed[..., 3:5], 0.25 * a[..., 3:5] + 0.75 * b[..., 3:5])  # overlap: weighted average
    # a weight below 1 blends the region with the background
    plain = run(pipe, scheduler=scheduler)
    half = run(pipe, [Region("a castle", weight=0.5)], scheduler=scheduler)
    assert close(half, 0.5 * a + 0.5 * plain)


def test_mask_equals_box_and_formats(pipe):
    boxed = run(pipe, [Region("a red barn", box=(16, 8, 48, 40))])
    m = np.zeros((64, 64), dtype=np.uint8)
    m[8:40, 16:48] = 255
    for mask in (PIL.Image.fromarray(m), m, torch.from_numpy(m / 255.0).float()[None, None]):
        assert torch.equal(run(pipe, [Region("a red barn", mask=mask)]), boxed)


def test_without_guidance(pipe):
    plain = pipe("a field", num_inference_steps=1, guidance_scale=1.0, scheduler="ddim", seed=1, height=64,
                 width=64, output_type="latent").images
    region = pipe("a field", num_inference_steps=1, guidance_scale=1.0, scheduler="ddim", seed=1, height=64,
                  width=64, output_type="latent", controls=[Regions([Region("a cat", box=(0, 0, 24, 64))])]).images
    # (the tiny random text encoder steers weakly without guidance: smaller change)
    assert close(region[..., 3:], plain[..., 3:]) and not close(region[..., :3], plain[..., :3], 1e-4)


def test_with_multidiffusion_masks_cropped_per_view(pipe):
    md = lambda: MultiDiffusion(window=64, stride=32, batch_size=2)  # noqa: E731
    plain = run(pipe, width=128, extra=[md()])
    region = run(pipe, [Region("a blue lake", box=(80, 0, 128, 64))], width=128, extra=[md()])
    full = run(pipe, [Region("a blue lake")], width=128, extra=[md()])
    assert close(region[..., :10], plain[..., :10])
    assert close(region[..., 10:], full[..., 10:])
    assert not close(region[..., 10:], plain[..., 10:], 1e-3)
    # batches of prompts share the region
    out = pipe(["a field", "a town"], num_inference_steps=1, guidance_scale=G, seed=1, height=64, width=128,
               output_type="latent", controls=[Regions([Region("a lake", box=(0, 0, 64, 64))]), md()])
    assert out.images.shape == (2, 4, 8, 16)


@pytest.mark.parametrize("region, match", [
    (Region("x", box=(0, 0, 80, 64)), r"regions\[0\]\.box"),
    (Region("x", box=(10, 0, 10, 64)), r"regions\[0\]\.box"),
    (Region("x", mask=np.ones((32, 64), dtype=np.uint8)), r"regions\[0\]\.mask.*size"),
    (Region("x", mask=np.full((64, 64), 2.0)), r"regions\[0\]\.mask.*\[0, 1\]"),
])
def test_bad_regions(pipe, region, match):
    with pytest.raises(ValueError, match=match):
        run(pipe, [region])


def test_bad_arguments():
    with pytest.raises(ValueError, match="mask, box"):
        Region("x", mask=np.ones((8, 8)), box=(0, 0, 8, 8))
    with pytest.raises(ValueError, match="weight"):
        Region("x", weight=-1)
    with pytest.raises(ValueError, match="box"):
        Region("x", box=(0, 0, 8))
    with pytest.raises(ValueError, match="prompt"):
        Region(None)
    with pytest.raises(ValueError, match="regions"):
        Regions([])


def test_with_instruct_pix2pix_in_any_order(tiny_model):
    """Regions keeps the image-guidance term another control adds, in either order."""
    from controldiff.controls.instruct_pix2pix import InstructPix2Pix

    pipe = cd.Pipeline.from_pretrained(tiny_model("sd1", in_channels=8))
    pipe.progress = False
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    region = Region("a red barn", box=(0, 0, 32, 64))
    kw = dict(num_inference_steps=2, guidance_scale=G, seed=1, height=64, width=64, output_type="latent")
    a = pipe("snow", controls=[InstructPix2Pix(image, 2.0), Regions([region])], **kw).images
    b = pipe("snow", controls=[Regions([region]), InstructPix2Pix(image, 2.0)], **kw).images
    plain = pipe("snow", controls=[InstructPix2Pix(image, 2.0)], **kw).images
    assert close(a, b) and not close(a, plain, 1e-3)


def test_sdxl_full_image_region_equals_plain_and_runs_with_views(tiny_model):
    pipe = cd.Pipeline.from_pretrained(tiny_model("sdxl"))
    pipe.progress = False
    kw = dict(num_inference_steps=2, guidance_scale=G, seed=1, height=64, width=128, output_type="latent")
    plain = pipe("a field", **kw).images
    same = pipe("a field", controls=[Regions([Region("a field")])], **kw).images
    assert close(same, plain)
    views = [Regions([Region("a lake", box=(64, 0, 128, 64))]), MultiDiffusion(64, 32)]
    out = pipe("a field", **kw, controls=views).images
    assert out.shape == (1, 4, 8, 16) and torch.isfinite(out).all() and not close(out, plain, 1e-3)

"""DeepCache: parity with the ``DeepCache`` package's ``DeepCacheSDHelper`` on diffusers
pipelines (SD1, SDXL, Heun, img2img, ControlNet, SEGA, PAG), cached steps skipping work,
composition (SAG, MultiDiffusion views), teardown and errors.

The helper works unchanged with diffusers 0.42.1 (it wraps the blocks' ``forward`` and
counts steps by the position of the timestep in ``pipe.scheduler.timesteps``).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from DeepCache import DeepCacheSDHelper  # the reference

import controldiff as cd
from controldiff.loading.control_models import load_controlnet
from controldiff.models.blocks import ResnetBlock2D

import diffusers  # the oracle
from pipes import ours, reference
from tiny_models import build_controlnet

TOL = 1e-4
KW = dict(num_inference_steps=7, output_type="np", height=64, width=64)


def gen(seed):
    return torch.Generator("cpu").manual_seed(seed)


def with_helper(ref, cache_interval, cache_branch_id, *args, **kw):
    """The reference pipeline's output with DeepCacheSDHelper enabled for this call only."""
    helper = DeepCacheSDHelper(pipe=ref)
    helper.set_params(cache_interval=cache_interval, cache_branch_id=cache_branch_id)
    helper.enable()
    try:
        return ref(*args, **kw).images
    finally:
        helper.disable()


def max_abs(a, b) -> float:
    assert np.shape(a) == np.shape(b)
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.fixture(scope="module")
def sd1(tiny_model):
    path = tiny_model("sd1")
    return path, reference("StableDiffusionPipeline", path), ours(path)


# (cache_interval, cache_branch_id, guidance_scale, images per prompt): every branch of the
# two-level tiny UNet (0..5), the reference's own default interval 1 (no caching)
SETTINGS = [(3, 0, 7.5, 1), (2, 1, 7.5, 2), (3, 2, 1.0, 1), (2, 3, 5.0, 1), (4, 4, 7.5, 1), (3, 5, 7.5, 1),
            (1, 0, 7.5, 1)]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(map(str, s)))
def test_parity_sd1(sd1, setting):
    path, ref, mine = sd1
    interval, branch, guidance, n = setting
    kw = dict(KW, guidance_scale=guidance, num_images_per_prompt=n)
    expected = with_helper(ref, interval, branch, "a cat", generator=gen(0), **kw)
    got = mine("a cat", generator=gen(0), controls=[cd.DeepCache(interval, branch)], **kw).images
    assert max_abs(got, expected) <= TOL
    plain = mine("a cat", generator=gen(0), **kw).images
    if interval > 1:
        assert max_abs(got, plain) > 1e-3, "DeepCache had no effect"
    else:
        assert max_abs(got, plain) <= TOL


def test_parity_heun_and_img2img(sd1):
    """Heun evaluates each timestep but the first twice; the reference counts both as the
    timestep's first position. img2img starts part-way: counting starts at the first step."""
    path, ref, mine = sd1
    ref.scheduler = diffusers.HeunDiscreteScheduler.from_config(ref.scheduler.config)
    try:
        expected = with_helper(ref, 3, 1, "a cat", generator=gen(1), **dict(KW, num_inference_steps=5))
    finally:
        ref.scheduler = diffusers.PNDMScheduler.from_config(ref.scheduler.config)
    got = mine("a cat", generator=gen(1), scheduler="heun", controls=[cd.DeepCache(3, 1)],
               **dict(KW, num_inference_steps=5)).images
    assert max_abs(got, expected) <= TOL

    img2img = diffusers.StableDiffusionImg2ImgPipeline(**ref.components)
    img2img.set_progress_bar_config(disable=True)
    image = np.random.default_rng(0).random((1, 64, 64, 3)).astype(np.float32)
    kw = dict(KW, num_inference_steps=10, strength=0.6)
    kw.pop("height"), kw.pop("width")
    expected = with_helper(img2img, 2, 0, "a cat", image=image, generator=gen(2), **kw)
    got = mine("a cat", image=image, generator=gen(2), controls=[cd.DeepCache(2, 0)], **kw).images
    assert max_abs(got, expected) <= TOL


def test_parity_sdxl(tiny_model):
    path = tiny_model("sdxl")
    ref, mine = reference("StableDiffusionXLPipeline", path), ours(path)
    for interval, branch in ((3, 0), (2, 4)):
        expected = with_helper(ref, interval, branch, "a cat", generator=gen(3), **KW)
        got = mine("a cat", generator=gen(3), controls=[cd.DeepCache(interval, branch)], **KW).images
        assert max_abs(got, expected) <= TOL
        assert max_abs(got, mine("a cat", generator=gen(3), **KW).images) > 1e-3


def test_parity_with_controlnet(sd1, tmp_path):
    """ControlNet runs at every step; on cached steps only its residuals on the shallow
    skips act, as with the helper on diffusers' ControlNet pipeline."""
    path, _, mine = sd1
    folder = build_controlnet(path, tmp_path / "cn")
    ref = reference("StableDiffusionControlNetPipeline", path,
                    controlnet=diffusers.ControlNetModel.from_pretrained(folder))
    image = np.random.default_rng(1).random((1, 64, 64, 3)).astype(np.float32)
    control = cd.ControlNet(load_controlnet(folder), image, scale=0.8)
    for interval, branch in ((3, 0), (2, 2), (2, 3)):
        expected = with_helper(ref, interval, branch, "a cat", image=image, controlnet_conditioning_scale=0.8,
                               generator=gen(4), **KW)
        got = mine("a cat", generator=gen(4), controls=[control, cd.DeepCache(interval, branch)], **KW).images
        assert max_abs(got, expected) <= TOL
    cached = mine("a cat", generator=gen(4), controls=[cd.DeepCache(2, 3)], **KW).images
    assert max_abs(got, cached) > 1e-3, "the ControlNet had no effect on a cached run"


def test_parity_with_sega(sd1):
    """SEGA's concepts are rows of the one call: each row reuses its own deep features."""
    path, _, mine = sd1
    ref = diffusers.SemanticStableDiffusionPipeline.from_pretrained(path, safety_checker=None,
                                                                     requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    kw = dict(KW, guidance_scale=6.0)
    expected = with_helper(ref, 3, 1, "a face", generator=gen(5), editing_prompt=["smiling", "glasses"],
                           edit_guidance_scale=[5.0, 4.0], edit_warmup_steps=[1, 2], **kw)
    sega = cd.SEGA([cd.Concept("smiling", scale=5.0, warmup=1), cd.Concept("glasses", scale=4.0, warmup=2)])
    got = mine("a face", generator=gen(5), controls=[sega, cd.DeepCache(3, 1)], **kw).images
    assert max_abs(got, expected) <= TOL
    assert max_abs(got, mine("a face", generator=gen(5), controls=[cd.DeepCache(3, 1)], **kw).images) > 1e-3


def test_parity_with_pag(sd1):
    """PAG's perturbed rows keep deep features computed with the perturbation."""
    path, _, mine = sd1
    ref = reference("StableDiffusionPAGPipeline", path, pag_applied_layers=["mid", "up"])
    expected = with_helper(ref, 3, 0, "a cat", generator=gen(6), pag_scale=2.0, **KW)
    got = mine("a cat", generator=gen(6), controls=[cd.PAG(2.0, ("mid", "up")), cd.DeepCache(3, 0)], **KW).images
    assert max_abs(got, expected) <= TOL


def count_layers(unet):
    """Per UNet evaluation: how many resnets ran, and whether the mid block ran."""
    calls: list = []
    handles = [unet.register_forward_pre_hook(lambda m, a: calls.append({"resnets": 0, "mid": 0}))]
    for name, m in unet.named_modules():
        if isinstance(m, ResnetBlock2D):
            handles.append(m.register_forward_hook(lambda m, a, o: calls[-1].__setitem__(
                "resnets", calls[-1]["resnets"] + 1)))
    handles.append(unet.mid_block.register_forward_hook(lambda m, a, o: calls[-1].__setitem__("mid", 1)))
    return calls, handles


def test_cached_steps_skip_work_and_sag_reruns_run_in_full(sd1):
    """Tiny SD1: 12 resnets (down 2+2, mid 2, up 3+3). On cached steps branch 0 runs only the
    last up resnet; branch 4 (level 1, skip 1) all of level 0 (2 down, 3 up), the first
    down resnet of level 1 and its last two up resnets. SAG's re-runs run in full."""
    path, _, mine = sd1
    resnets = sum(isinstance(m, ResnetBlock2D) for m in mine.unet.modules())
    assert resnets == 12
    for branch, shallow in ((0, 1), (4, 2 + 1 + 2 + 3)):
        calls, handles = count_layers(mine.unet)
        try:
            mine("a cat", generator=gen(0), controls=[cd.DeepCache(3, branch)], **dict(KW, num_inference_steps=6,
                                                                                        scheduler="ddim"))
        finally:
            for h in handles:
                h.remove()
        expect = [{"resnets": 12, "mid": 1} if i % 3 == 0 else {"resnets": shallow, "mid": 0} for i in range(6)]
        assert calls == expect, branch

    kw = dict(KW, scheduler="ddim")
    calls, handles = count_layers(mine.unet)
    try:
        both = mine("a cat", generator=gen(0), controls=[cd.SAG(0.75), cd.DeepCache(3, 0)], **kw).images
    finally:
        for h in handles:
            h.remove()
    full, cached = {"resnets": 12, "mid": 1}, {"resnets": 1, "mid": 0}
    assert calls == [c for i in range(7) for c in ((full if i % 3 == 0 else cached), full)]
    alone = mine("a cat", generator=gen(0), controls=[cd.DeepCache(3, 0)], **kw).images
    sag = mine("a cat", generator=gen(0), controls=[cd.SAG(0.75)], **kw).images
    assert max_abs(both, alone) > 1e-3 and max_abs(both, sag) > 1e-3


def test_views_keep_their_own_features(sd1):
    """MultiDiffusion: each view group's call keeps its own cache, so views denoised one call
    each equal views batched into one call (a cache shared by the calls would differ)."""
    path, _, mine = sd1
    kw = dict(KW, width=128, scheduler="ddim")
    runs = {b: mine("a wide street", generator=gen(7), controls=[cd.MultiDiffusion(32, 16, batch_size=b),
                                                                  cd.DeepCache(3, 0)], **kw).images
            for b in (None, 1)}
    assert max_abs(runs[None], runs[1]) <= TOL
    plain = mine("a wide street", generator=gen(7), controls=[cd.MultiDiffusion(32, 16)], **kw).images
    assert max_abs(runs[None], plain) > 1e-3


def test_teardown_drops_the_cache_and_runs_repeat(sd1):
    path, _, mine = sd1
    control = cd.DeepCache(3, 2)
    first = mine("a cat", generator=gen(8), controls=[control], **KW).images
    assert control._caches == []
    again = mine("a cat", generator=gen(8), controls=[control], **KW).images
    assert max_abs(first, again) == 0

    def fail(i, t, latents):
        parts = control._caches[0].parts.values()   # the cache is live during the run (each part's)
        assert parts and all(c.feature is not None for c in parts)
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        mine("a cat", generator=gen(8), controls=[control], callback=fail, **KW)
    assert control._caches == []
    assert control.describe() == {"name": "DeepCache", "cache_interval": 3, "cache_branch_id": 2,
                                  "skip_mode": "uniform"}


def test_errors(pipe, monkeypatch):
    for kw, name in ((dict(cache_interval=0), "cache_interval"), (dict(cache_interval=2.0), "cache_interval"),
                     (dict(cache_branch_id=-1), "cache_branch_id"), (dict(cache_branch_id=True), "cache_branch_id"),
                     (dict(skip_mode="quadratic"), "skip_mode")):
        with pytest.raises(ValueError, match=name):
            cd.DeepCache(**kw)
    assert (cd.DeepCache().cache_interval, cd.DeepCache().cache_branch_id) == (3, 0)
    monkeypatch.setattr(pipe.unet, "forward", lambda *a, **k: pytest.fail("the UNet ran before the check"))
    with pytest.raises(ValueError, match="cache_branch_id: this UNet has skip branches 0..5"):
        pipe("a cat", controls=[cd.DeepCache(cache_branch_id=6)], **KW)

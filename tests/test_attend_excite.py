"""Attend-and-Excite: parity with diffusers' StableDiffusionAttendAndExcitePipeline, behaviour
on SD2 and SDXL, errors before step 0, cost.

The tiny random models have nearly uniform cross-attention (every token's smoothed maximum
is about 1/75), so the loss barely moves at the default step size. The "sharp" model has
its cross-attention keys scaled by 10 (30 for SDXL): maps with structure, as a trained
model's, where the refinement reaches its thresholds after a different number of
iterations per image, which the parity then covers too.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from controldiff.controls.attend_excite import AttendAndExcite
from controldiff.controls.sag import SAG
from controldiff.models.attention import Attention
from controldiff.sampling.control import Control

from pipes import ours, reference

TOL = 1e-4
PROMPT = "a cat and a dog"   # the tiny tokenizer spells words out: cat at 2-4, dog at 9-11
SCHEDULERS = {"pndm": "PNDMScheduler", "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler"}


def gen(seed=0):
    return torch.Generator("cpu").manual_seed(seed)


def sharpen(src, dst, factor):
    """A copy of model folder ``src`` with every cross-attention key projection times ``factor``."""
    shutil.copytree(src, dst)
    f = dst / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(str(f))
    for k in weights:
        if "attn2.to_k" in k:
            weights[k] = weights[k] * factor
    save_file(weights, str(f), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def sd1(tiny_model):
    path = tiny_model("sd1")
    return reference("StableDiffusionAttendAndExcitePipeline", path), ours(path)


@pytest.fixture(scope="module")
def sharp(tiny_model, tmp_path_factory):
    path = sharpen(tiny_model("sd1"), tmp_path_factory.mktemp("ae") / "sharp", 10.0)
    return reference("StableDiffusionAttendAndExcitePipeline", path), ours(path)


def check(ref, mine, prompt, indices, ae, scheduler="pndm", ours_indices=None, **kw):
    ref.scheduler = getattr(__import__("diffusers"), SCHEDULERS[scheduler]).from_config(ref.scheduler.config)
    kw = dict(num_inference_steps=3, output_type="latent", **kw)
    expected = ref(prompt, token_indices=indices, generator=gen(), **ae, **kw).images
    control = AttendAndExcite(indices if ours_indices is None else ours_indices, **ae)
    got = mine(prompt, generator=gen(), scheduler=scheduler, controls=[control], **kw).images
    plain = mine(prompt, generator=gen(), scheduler=scheduler, **kw).images
    assert (got - plain).abs().max() > 1e-3, "Attend-and-Excite had no effect"
    diff = float((got - expected).abs().max())
    assert diff <= TOL, diff
    return got


# the reference's default thresholds, shifted onto 3 steps
DEFAULT = dict(max_iter_to_alter=2, thresholds={0: 0.05, 1: 0.5, 2: 0.8}, scale_factor=20, attn_res=(8, 8))


def test_parity_default_thresholds(sd1):
    check(*sd1, PROMPT, [2, 9], DEFAULT, guidance_scale=7.5)


def test_parity_words_equal_positions(sd1):
    ae = dict(DEFAULT, attn_res=(4, 4))   # the mid-block's map
    got = check(*sd1, PROMPT, [2, 3, 4, 9, 10, 11], ae, ours_indices=["cat", "dog"], guidance_scale=7.5)
    _, mine = sd1
    by_position = mine(PROMPT, generator=gen(), num_inference_steps=3, guidance_scale=7.5, output_type="latent",
                       controls=[AttendAndExcite([2, 3, 4, 9, 10, 11], **ae)]).images
    assert torch.equal(got, by_position)


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_parity_without_cfg(sd1, scheduler):
    """Euler: the reference feeds the unscaled latents to its attention passes; so do we."""
    check(*sd1, PROMPT, [9], dict(DEFAULT, scale_factor=2000), scheduler, guidance_scale=1.0)


def test_parity_two_prompts_two_images_refinement_exits(sharp):
    """Images reach their thresholds after different numbers of refinement passes (at step 0:
    all four images pass 3 times, 3 of them 6 times, 2 of them all 20 times). A larger step
    size makes the 20 refinement passes chaotic: the maximum over pixels switches pixel and
    float32 rounding differences (1e-7) grow to 1e-3 in both implementations alike."""
    ae = dict(max_iter_to_alter=3, thresholds={0: 0.015, 2: 0.03}, scale_factor=50, attn_res=(8, 8))
    check(*sharp, [PROMPT, "a frog"], [[2, 3, 4, 9, 10, 11], [3, 4]], ae, "ddim", ours_indices=[["cat", "dog"], [3, 4]],
          guidance_scale=5.0, num_images_per_prompt=2, negative_prompt=["blurry", "dark"])


def test_parity_images_per_prompt(sharp):
    check(*sharp, PROMPT, [9, 10, 11], dict(DEFAULT, scale_factor=50), guidance_scale=7.5, num_images_per_prompt=2)


def test_parity_refinement_past_max_iter_to_alter(sharp):
    """The reference refines at threshold steps even past max_iter_to_alter (as the paper's code)."""
    check(*sharp, PROMPT, [9], dict(DEFAULT, max_iter_to_alter=0, thresholds={0: 0.02}), guidance_scale=7.5)


def test_parity_sd2_v_prediction(tiny_model, tmp_path):
    path = sharpen(tiny_model("sd2", prediction_type="v_prediction"), tmp_path / "sd2", 10.0)
    check(reference("StableDiffusionAttendAndExcitePipeline", path), ours(path), PROMPT, [9, 11],
          dict(DEFAULT, thresholds={0: 0.2}), "ddim", guidance_scale=7.5)


# ---------------------------------------------------------------- behaviour


class Probe(Control):
    """Before each step (after Attend-and-Excite's update when placed after it): the smallest
    smoothed max attention of the subject tokens, computed as the control computes it."""

    def __init__(self, **kw):
        self.ae, self.seen = AttendAndExcite(["dog"], **kw), []

    def setup(self, ctx):
        self.ae.setup(ctx)

    def before_step(self, ctx, step, latents):
        self.seen.append(float(self.ae.max_attention(ctx, step, latents).min()))
        return latents


@pytest.mark.parametrize("family, factor, res, threshold, scale", [
    ("sd2", 10.0, (8, 8), 0.2, 20), ("sdxl", 30.0, (4, 4), 0.05, 200)])
def test_neglected_token_rises_above_threshold(tiny_model, tmp_path, family, factor, res, threshold, scale):
    kind = "v_prediction" if family == "sd2" else "epsilon"
    mine = ours(sharpen(tiny_model(family, prediction_type=kind), tmp_path / family, factor))
    kw = dict(num_inference_steps=3, guidance_scale=7.5, output_type="latent")
    plain, excited = Probe(attn_res=res), Probe(attn_res=res)
    mine(PROMPT, generator=gen(), controls=[plain], **kw)
    ae = AttendAndExcite(["dog"], max_iter_to_alter=3, thresholds={0: threshold}, scale_factor=scale, attn_res=res)
    mine(PROMPT, generator=gen(), controls=[ae, excited], **kw)
    assert plain.seen[0] < threshold <= excited.seen[0], (plain.seen, excited.seen)
    assert all(e > 1.5 * p for p, e in zip(plain.seen, excited.seen)), (plain.seen, excited.seen)


# ---------------------------------------------------------------- strength, cost, composition


class Calls:
    def __init__(self, module):
        self.n = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, *args):
        self.n += 1


@pytest.mark.parametrize("ae", [dict(scale_factor=0), dict(max_iter_to_alter=0, thresholds={})])
def test_zero_strength_equals_no_control(sd1, ae):
    _, mine = sd1
    kw = dict(num_inference_steps=3, guidance_scale=7.5, output_type="latent")
    plain = mine(PROMPT, generator=gen(), **kw).images
    calls = Calls(mine.unet)
    got = mine(PROMPT, generator=gen(), controls=[AttendAndExcite(["dog"], attn_res=(8, 8), **ae)], **kw).images
    calls.handle.remove()
    assert torch.equal(got, plain) and calls.n == 4   # PNDM: 4 timesteps for 3 steps, no extra pass


def test_one_short_pass_for_all_images_maps_only_at_the_sites_read(sd1, monkeypatch):
    """Per step: one attention pass for both images, explicit softmax only at the 8x8 cross-
    attention sites (2 down, 3 up), none in the main call; the pass stops at the last one."""
    _, mine = sd1
    probs, ran = [], []
    original = Attention.probs

    def counted(self, *args, **kwargs):
        probs.append(self.site.name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Attention, "probs", counted)
    handles = [a.register_forward_pre_hook(lambda m, *_: ran.append(m.site.name))
               for a in mine.unet.attention_sites().values()]
    calls = Calls(mine.unet)
    mine(PROMPT, generator=gen(), num_inference_steps=1, guidance_scale=7.5, output_type="latent",
         num_images_per_prompt=2, scheduler="ddim", controls=[AttendAndExcite(["dog"], thresholds={}, attn_res=(8, 8))])
    calls.handle.remove()
    for h in handles:
        h.remove()
    sites = [n for n, a in mine.unet.attention_sites().items() if a.site.kind == "cross" and a.site.block != "mid"]
    assert calls.n == 2 and sorted(probs) == sorted(sites)
    assert ran[:len(ran) - len(mine.unet.attention_sites())][-1] == sites[-1]   # nothing after the last site read
    assert not any(a.processor for a in mine.unet.attention_sites().values())


def test_composes_with_sag(sd1):
    _, mine = sd1
    kw = dict(num_inference_steps=2, guidance_scale=7.5, output_type="latent", scheduler="ddim")
    ae = dict(thresholds={}, scale_factor=2000, attn_res=(4, 4))
    both = mine(PROMPT, generator=gen(), controls=[AttendAndExcite(["dog"], **ae), SAG(1.0)], **kw).images
    sag = mine(PROMPT, generator=gen(), controls=[SAG(1.0)], **kw).images
    alone = mine(PROMPT, generator=gen(), controls=[AttendAndExcite(["dog"], **ae)], **kw).images
    assert torch.isfinite(both).all() and (both - sag).abs().max() > 1e-3 and (both - alone).abs().max() > 1e-3


def test_inpainting_model_gets_its_mask_channels(tiny_model):
    """A 9-channel UNet: the attention passes append the context's mask and image channels."""
    import PIL.Image

    mine = ours(tiny_model("sd1", in_channels=9))
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    image = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    kw = dict(image=PIL.Image.fromarray(image), mask_image=PIL.Image.fromarray(mask), num_inference_steps=2,
              output_type="latent", scheduler="ddim")
    plain = mine(PROMPT, generator=gen(), **kw).images
    got = mine(PROMPT, generator=gen(), controls=[AttendAndExcite(["dog"], scale_factor=2000, attn_res=(8, 8))],
               **kw).images
    assert torch.isfinite(got).all() and (got - plain).abs().max() > 1e-3


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("kw, match", [
    (dict(token_indices=[]), "token_indices"),
    (dict(token_indices=[2.5]), "token_indices"),
    (dict(token_indices=[[2], []]), r"token_indices\[1\]"),
    (dict(token_indices=[2], thresholds={0: 1.5}), "thresholds"),
    (dict(token_indices=[2], thresholds={0: -0.1}), "thresholds"),
    (dict(token_indices=[2], thresholds={-1: 0.5}), "thresholds"),
    (dict(token_indices=[2], max_iter_to_alter=-1), "max_iter_to_alter"),
    (dict(token_indices=[2], scale_factor=float("nan")), "scale_factor"),
    (dict(token_indices=[2], attn_res=(16,)), "attn_res"),
    (dict(token_indices=[2], attn_res=(1, 1)), "attn_res"),
])
def test_argument_errors(no_work, kw, match):
    with pytest.raises(ValueError, match=match):
        AttendAndExcite(**kw)


@pytest.fixture
def no_unet(sd1, monkeypatch):
    """Setup checks need the encoded prompt; the UNet must not run before they pass."""
    _, mine = sd1

    def forbidden(*args, **kwargs):
        raise AssertionError("the UNet ran before the arguments were checked")

    monkeypatch.setattr(mine.unet, "forward", forbidden)
    return mine


@pytest.mark.parametrize("prompts, indices, attn_res, match", [
    (PROMPT, [0], (8, 8), "position 0 .*BOS"),          # BOS
    (PROMPT, [12], (8, 8), "position 12"),              # EOS
    (PROMPT, [40], (8, 8), "position 40"),              # padding
    (PROMPT, [77], (8, 8), "position 77"),              # out of range
    (PROMPT, ["frog"], (8, 8), "'frog' is not a word"),
    ([PROMPT, "a frog"], [["cat"]], (8, 8), "do not come in 1 group"),
    ([PROMPT, "a frog"], [["cat"], ["frog"], ["dog"]], (8, 8), "3 lists for a batch of 2"),
    (PROMPT, ["dog"], (16, 16), r"attn_res: \(16, 16\) matches no .* \(8, 8\), \(4, 4\)"),
    (PROMPT, ["dog"], None, r"attn_res: \(2, 2\) matches no"),   # the reference's default at 64 pixels
])
def test_setup_errors_before_step_0(no_unet, prompts, indices, attn_res, match):
    with pytest.raises(ValueError, match=match):
        no_unet(prompts, num_inference_steps=2, controls=[AttendAndExcite(indices, attn_res=attn_res)])

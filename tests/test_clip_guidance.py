"""CLIP guidance: parity with diffusers' community CLIPGuidedStableDiffusion, behaviour on every
scheduler and family, errors before step 0.

The reference draws its cutouts from torch's global generator: both runs of a parity check
seed it identically (``torch.manual_seed``) right before they start.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from controldiff import tiny
from controldiff.controls.clip_guidance import CLIP_MEAN, CLIP_STD, CLIPGuidance
from controldiff.controls.multidiffusion import MultiDiffusion
from controldiff.schedulers import NAMES
from hostile import Evil
from pipes import ours, reference
from tiny_models import perturb_norms

import diffusers  # the oracle
from reference.clip_guided_stable_diffusion import CLIPGuidedStableDiffusion

TOL = 1e-4
REF_SCHEDULERS = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "lms": "LMSDiscreteScheduler",
                  "dpmpp_2m": "DPMSolverMultistepScheduler"}
MEAN, STD = [0.5, 0.45, 0.4], [0.27, 0.26, 0.28]   # not CLIP's: the folder's processor must be read
KW = dict(height=64, width=64, num_inference_steps=3, output_type="np")


def gen(seed):
    return torch.Generator("cpu").manual_seed(seed)


def clip_config(vocab=tiny.VOCAB_SIZE, projection_dim=16):
    from transformers import CLIPConfig

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    return CLIPConfig(text_config=dict(tiny.text_encoder_config(), vocab_size=vocab), vision_config=vision,
                      projection_dim=projection_dim)


def tiny_clip(vocab=tiny.VOCAB_SIZE):
    from transformers import CLIPModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return perturb_norms(CLIPModel(clip_config(vocab)).eval())


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIPModel (vision 32 px, patch 8) and its image processor, as saved by transformers."""
    from transformers import CLIPImageProcessor

    folder = tmp_path_factory.mktemp("clip")
    tiny_clip().save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                       image_mean=MEAN, image_std=STD).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip(clip_dir):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(clip_dir, use_safetensors=True).eval()


@pytest.fixture(scope="module")
def sd1(tiny_model, clip_dir):
    from transformers import CLIPImageProcessor, CLIPModel

    path = tiny_model("sd1")
    sd = reference("StableDiffusionPipeline", path)
    ref = CLIPGuidedStableDiffusion(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet,
                                    scheduler=sd.scheduler, clip_model=CLIPModel.from_pretrained(clip_dir),
                                    feature_extractor=CLIPImageProcessor.from_pretrained(clip_dir))
    ref.set_progress_bar_config(disable=True)
    return ref, ours(path)


def check(sd1, clip_dir, scheduler, scale, num_cutouts, use_cutouts, prompt="a cat", ref_scale=None,
          clip_prompt=None, seed=4, **kw):
    ref, mine = sd1
    ref.scheduler = getattr(diffusers, REF_SCHEDULERS[scheduler]).from_config(ref.scheduler.config)
    kw = dict(KW, guidance_scale=7.5, **kw)
    torch.manual_seed(11)
    expected = ref(prompt, generator=gen(seed), clip_guidance_scale=scale if ref_scale is None else ref_scale,
                   clip_prompt=clip_prompt, num_cutouts=num_cutouts, use_cutouts=use_cutouts, **kw).images
    control = CLIPGuidance(str(clip_dir), prompt=clip_prompt, scale=scale, num_cutouts=num_cutouts,
                           use_cutouts=use_cutouts)
    torch.manual_seed(11)
    got = mine(prompt, generator=gen(seed), scheduler=scheduler, controls=[control], **kw).images
    plain = mine(prompt, generator=gen(seed), scheduler=scheduler, **kw).images
    assert np.abs(got - plain).max() > 1e-2, "CLIP guidance had no effect"
    diff = float(np.abs(got - expected).max())
    assert diff <= TOL, diff
    return diff


# ---------------------------------------------------------------------------- parity


@pytest.mark.parametrize("scheduler", list(REF_SCHEDULERS))
@pytest.mark.parametrize("use_cutouts, num_cutouts, scale", [(True, 1, 20.0), (True, 4, 100.0), (False, 4, 20.0),
                                                             (False, 1, 100.0)])
def test_parity_sd1(sd1, clip_dir, scheduler, use_cutouts, num_cutouts, scale):
    check(sd1, clip_dir, scheduler, scale, num_cutouts, use_cutouts)


@pytest.mark.parametrize("scheduler", ["ddim", "lms"])
def test_parity_two_scales_same_cutouts(sd1, clip_dir, scheduler):
    for scale in (20.0, 100.0):
        check(sd1, clip_dir, scheduler, scale, 4, True)


@pytest.mark.parametrize("scheduler", ["pndm", "lms"])
def test_parity_own_clip_prompt(sd1, clip_dir, scheduler):
    check(sd1, clip_dir, scheduler, 100.0, 2, True, clip_prompt="a red dog")


@pytest.mark.parametrize("scheduler", ["ddim", "lms"])
def test_parity_batch_of_images(sd1, clip_dir, scheduler):
    """Several images at once (the reference takes a batch only with one cutout: its (n * B, D)
    against (B, D) distance does not broadcast for n > 1 and B > 1)."""
    check(sd1, clip_dir, scheduler, 60.0, 1, True, num_images_per_prompt=2)


@pytest.mark.parametrize("scheduler", ["ddim", "lms"])
def test_batch_without_cutouts_sums_over_images(sd1, clip_dir, scheduler):
    """Without cutouts the reference averages the loss over the batch (each image's guidance
    1/B as strong); ours sums over images as the cutout path does: ours at s = reference at B*s.
    (Seed 5: with seed 4 one decoded pixel of the first LMS step lies within 2e-6 of the clamp to
    [0, 1], on either side in the two runs, and its gradient is cut in one run only.)"""
    check(sd1, clip_dir, scheduler, 30.0, 1, False, ref_scale=60.0, num_images_per_prompt=2, seed=5)


# ---------------------------------------------------------------------------- behaviour


def clip_loss(clip, images: np.ndarray, prompt_ids: list[int], mean, std) -> np.ndarray:
    """Per image: spherical distance between the CLIP embeddings of the image and of the prompt."""
    from controldiff.controls.clip_guidance import spherical_dist_loss

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=[32, 32], mode="bilinear", align_corners=False, antialias=True)
    x = (x - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    ids = torch.tensor([[tiny.BOS_ID, *prompt_ids, tiny.EOS_ID]])
    with torch.no_grad():
        image = clip.get_image_features(x).pooler_output
        text = clip.get_text_features(ids).pooler_output
    return spherical_dist_loss(image, text).numpy()


def falls(mine, clip, scheduler, scale=100.0, prompt="a cat", **kw):
    kw = {**KW, "guidance_scale": 7.5, **kw}
    control = CLIPGuidance(clip, scale=scale, num_cutouts=2, generator=gen(5))
    guided = mine(prompt, generator=gen(3), scheduler=scheduler, controls=[control], **kw).images
    plain = mine(prompt, generator=gen(3), scheduler=scheduler, **kw).images
    off = mine(prompt, generator=gen(3), scheduler=scheduler, controls=[CLIPGuidance(clip, scale=0.0)], **kw).images
    assert np.array_equal(off, plain), "scale=0 must equal no control exactly"
    ids = mine.prompt_encoder.token_ids(prompt)
    before, after = (clip_loss(clip, im, ids, CLIP_MEAN, CLIP_STD) for im in (plain, guided))
    assert np.isfinite(guided).all()
    assert (after < before - 1e-3).all(), (before, after)
    return before, after


@pytest.mark.parametrize("scheduler", NAMES)
def test_loss_falls_on_every_scheduler(sd1, clip, scheduler):
    falls(sd1[1], clip, scheduler)


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_loss_falls_sd2_v_prediction(tiny_model, clip, scheduler):
    falls(ours(tiny_model("sd2", prediction_type="v_prediction")), clip, scheduler)


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m"])
def test_loss_falls_sdxl(tiny_model, clip, scheduler):
    falls(ours(tiny_model("sdxl")), clip, scheduler, guidance_scale=5.0)


def test_each_image_is_guided_to_its_own_prompt(sd1, clip):
    """A batch of two prompts (and two images each): every image's loss to its prompt falls."""
    mine = sd1[1]
    prompts = ["a cat", "green grass"]
    kw = dict(KW, guidance_scale=7.5, num_images_per_prompt=2)
    control = CLIPGuidance(clip, scale=100.0, use_cutouts=False)
    guided = mine(prompts, generator=gen(3), scheduler="ddim", controls=[control], **kw).images
    plain = mine(prompts, generator=gen(3), scheduler="ddim", **kw).images
    for i, p in enumerate(prompts):
        ids = mine.prompt_encoder.token_ids(p)
        rows = slice(2 * i, 2 * i + 2)
        before, after = (clip_loss(clip, im[rows], ids, CLIP_MEAN, CLIP_STD) for im in (plain, guided))
        assert (after < before - 1e-3).all(), (p, before, after)


def test_generator_makes_cutouts_reproducible(sd1, clip):
    mine = sd1[1]
    kw = dict(KW, guidance_scale=7.5, scheduler="ddim")
    a = mine("a cat", generator=gen(1), controls=[CLIPGuidance(clip, scale=50.0, generator=gen(9))], **kw).images
    b = mine("a cat", generator=gen(1), controls=[CLIPGuidance(clip, scale=50.0, generator=gen(9))], **kw).images
    c = mine("a cat", generator=gen(1), controls=[CLIPGuidance(clip, scale=50.0, generator=gen(8))], **kw).images
    assert np.array_equal(a, b) and np.abs(a - c).max() > 1e-3


class _CountUNet:
    """Counts UNet forward calls and whether they were made with gradients on."""

    def __init__(self, unet, monkeypatch):
        self.calls = []
        forward = unet.forward

        def counted(*args, **kwargs):
            self.calls.append(torch.is_grad_enabled())
            return forward(*args, **kwargs)

        monkeypatch.setattr(unet, "forward", counted)


def test_one_extra_unet_call_per_step_with_grad(sd1, clip, monkeypatch):
    mine = sd1[1]
    counter = _CountUNet(mine.unet, monkeypatch)
    mine("a cat", generator=gen(1), scheduler="ddim", guidance_scale=7.5, controls=[CLIPGuidance(clip, scale=50.0)],
         **KW)
    assert counter.calls == [False, True] * KW["num_inference_steps"]


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_views_one_view_equals_whole_canvas_and_two_views_run(sd1, clip, scheduler):
    """With MultiDiffusion: a single view covering the canvas gives the same image (the k-diffusion
    latent move is averaged over views as MultiDiffusion averages them); two views run."""
    mine = sd1[1]
    kw = dict(KW, guidance_scale=7.5, scheduler=scheduler)
    alone = mine("a cat", generator=gen(2), controls=[CLIPGuidance(clip, scale=50.0, generator=gen(1))], **kw).images
    one = mine("a cat", generator=gen(2), controls=[MultiDiffusion(window=64, stride=64),
                                                     CLIPGuidance(clip, scale=50.0, generator=gen(1))], **kw).images
    assert np.abs(one - alone).max() <= 1e-6
    kw["width"] = 96
    md = [MultiDiffusion(window=64, stride=32)]
    guided = mine("a cat", generator=gen(2), controls=[*md, CLIPGuidance(clip, scale=50.0, generator=gen(1))],
                  **kw).images
    plain = mine("a cat", generator=gen(2), controls=md, **kw).images
    assert np.isfinite(guided).all() and np.abs(guided - plain).max() > 1e-2


def test_settings_and_folder_normalisation(sd1, clip_dir, clip):
    control = CLIPGuidance(str(clip_dir), scale=10.0)
    assert (control.image_mean, control.image_std) == (MEAN, STD)   # the folder's image processor
    assert (CLIPGuidance(clip).image_mean, CLIPGuidance(clip).image_std) == (list(CLIP_MEAN), list(CLIP_STD))
    out = sd1[1]("a cat", generator=gen(1), controls=[control], **KW)
    described = out.settings["controls"][0]
    assert described["name"] == "CLIPGuidance" and described["scale"] == 10.0
    assert described["clip_model"] == str(clip_dir) and described["num_cutouts"] == 4


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kw, name", [
    (dict(scale=-1.0), "scale"), (dict(scale=float("nan")), "scale"), (dict(scale=float("inf")), "scale"),
    (dict(scale=True), "scale"), (dict(num_cutouts=0), "num_cutouts"), (dict(num_cutouts=2.0), "num_cutouts"),
    (dict(use_cutouts="yes"), "use_cutouts"), (dict(prompt=3), "prompt"), (dict(prompt=[]), "prompt"),
    (dict(image_mean=[0.5, 0.5]), "image_mean"), (dict(image_std=[0.5, 0.0, 0.5]), "image_std"),
    (dict(generator=3), "generator"),
])
def test_argument_errors(clip, kw, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        CLIPGuidance(clip, **kw)


def test_not_a_clip_model(tiny_model, tmp_path):
    from transformers import CLIPTextModel

    with pytest.raises(ValueError, match="clip_model: expected a transformers CLIPModel"):
        CLIPGuidance(object())
    text_encoder = tiny_model("sd1") / "text_encoder"
    with pytest.raises(ValueError, match="clip_model: expected a transformers CLIPModel"):
        CLIPGuidance(CLIPTextModel.from_pretrained(text_encoder))
    with pytest.raises(ValueError, match="clip_model: .* model_type 'clip_text_model'"):
        CLIPGuidance(str(text_encoder))
    with pytest.raises(ValueError, match="clip_model: .*not a folder"):
        CLIPGuidance(str(tmp_path / "missing"))


def test_folder_without_safetensors_is_refused_unread(clip_dir, tmp_path):
    folder = tmp_path / "clip"
    shutil.copytree(clip_dir, folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "ran"
    torch.save({"x": Evil(str(marker))}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="clip_model: .*no .safetensors weights"):
        CLIPGuidance(str(folder))
    assert not marker.exists()


@pytest.mark.parametrize("which", ["visual_projection", "text_projection"])
def test_projection_mismatch(which):
    model = tiny_clip()
    proj = getattr(model, which)
    setattr(model, which, torch.nn.Linear(proj.in_features, proj.out_features + 1, bias=False))
    with pytest.raises(ValueError, match=f"clip_model: its {which} maps 32 -> 17 features; expected .* 32 -> "
                                         "projection_dim 16"):
        CLIPGuidance(model)


def test_setup_errors_before_step_0(sd1, clip, monkeypatch):
    """The vocabulary and prompt count are checked in setup, before the UNet runs."""
    mine = sd1[1]
    counter = _CountUNet(mine.unet, monkeypatch)
    with pytest.raises(ValueError, match="clip_model: its text model has 100 tokens"):
        mine("a cat", generator=gen(1), controls=[CLIPGuidance(tiny_clip(vocab=100))], **KW)
    with pytest.raises(ValueError, match="prompt: got 3 prompts for a batch of 4"):
        mine(["a", "b"], generator=gen(1), num_images_per_prompt=2,
             controls=[CLIPGuidance(clip, prompt=["x", "y", "z"])], **KW)
    assert counter.calls == []

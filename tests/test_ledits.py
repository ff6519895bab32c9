"""LEDITS++: the edit-friendly DDPM inversion (``pipe.invert(method="ddpm")``) and the
``LEdits`` control, against diffusers' ``LEditsPPPipelineStableDiffusion`` and
``LEditsPPPipelineStableDiffusionXL`` on the same tiny models.

Parity: the inverted latents and every noise map; the edited images for one and two
concepts, reversed, warmup/cooldown, thresholds, the magnitude, cross-attention and
intersection masks, skip, DDIM and SDE-DPM-Solver++, a batch of images, a user mask.
The masks read cross-attention at 1/4 of the latent size: the default tiny UNets have
none there, so those cases use a three-block variant. Two bugs of the SD reference's
``invert`` are repaired on the reference side (see ``invert_reference``).
Behaviour: SD2 v-prediction regenerates its trajectory; zero edit scale is a plain
reconstruction; composition with ControlNet, SAG, PAG, LoRA, textual inversion and a
weighted prompt; every error before step 0.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import diffusers
from controldiff import tiny
from controldiff.controls.ledits import LEdits
from controldiff.controls.sega import Concept
from pipes import ours, reference
from tiny_models import build_controlnet
from pictures import photo
from tiny_models import perturb_norms

TOL = 1e-4
SD, XL = "LEditsPPPipelineStableDiffusion", "LEditsPPPipelineStableDiffusionXL"


def gen(seed):
    return torch.Generator("cpu").manual_seed(seed)


def three_blocks(src, dst, family):
    """``src`` with a three-block UNet: cross-attention at 1/4 of the latent size, where the masks read it."""
    shutil.copytree(src, dst)
    cfg = tiny.unet_config(family)
    cfg.update(block_out_channels=[16, 32, 32], down_block_types=["CrossAttnDownBlock2D"] * 3,
               up_block_types=["CrossAttnUpBlock2D"] * 3)
    if family == "sdxl":
        cfg.update(down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                   up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                   attention_head_dim=[2, 4, 4], transformer_layers_per_block=[1, 1, 2])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        unet = perturb_norms(diffusers.UNet2DConditionModel(**cfg).eval())
    shutil.rmtree(dst / "unet")
    unet.save_pretrained(dst / "unet")
    return dst


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory):
    """family -> path; "sd1-mask"/"sdxl-mask": the three-block variants."""
    out = {f: tiny_model(f) for f in ("sd1", "sdxl")}
    for f in ("sd1", "sdxl"):
        out[f"{f}-mask"] = three_blocks(out[f], tmp_path_factory.mktemp(f"{f}-mask") / "m", f)
    return out


@pytest.fixture(scope="module")
def pipes(models):
    """(path, scheduler) -> (reference, ours), built once."""
    cache = {}

    def get(name, scheduler="dpmpp_2m_sde"):
        if (name, scheduler) not in cache:
            path = models[name]
            kw = {}
            if scheduler == "ddim":
                kw["scheduler"] = diffusers.DDIMScheduler.from_pretrained(path, subfolder="scheduler")
            ref = reference(XL if name.startswith("sdxl") else SD, path, **kw)
            cache[name, scheduler] = ref, ours(path)
        return cache[name, scheduler]

    return get


def invert_reference(ref, image, seed=0, **kw):
    """``ref.invert`` with two bugs of the SD pipeline repaired for the call: it unpacks
    ``encode_prompt``'s (edit, negative) embeddings swapped, guiding away from the source
    prompt (SDXL unpacks them right); and it noises with a float timestep tensor, which
    DDIMScheduler.add_noise cannot index with."""
    patched = []
    if isinstance(ref, diffusers.LEditsPPPipelineStableDiffusion):
        encode = ref.encode_prompt
        ref.encode_prompt = lambda *a, **k: (lambda e, n, t: (n, e, t))(*encode(*a, **k))
        patched.append(ref)
    add_noise = ref.scheduler.add_noise
    ref.scheduler.add_noise = lambda x, n, t: add_noise(x, n, t.long())
    try:
        ref.invert(image, generator=gen(seed), **kw)
    finally:
        del ref.scheduler.add_noise
        for p in patched:
            del p.encode_prompt
    return ref


def noise_maps(ref):
    return ref.zs.permute(1, 0, 2, 3, 4)  # (steps, B, ...) -> ours (B, steps, ...)


# ---------------------------------------------------------------------------- the inversion


@pytest.mark.parametrize("name, scheduler, ref_kw, kw", [
    ("sd1", "dpmpp_2m_sde", dict(num_inversion_steps=6, skip=0.2), {}),
    ("sd1", "dpmpp_2m_sde", dict(num_inversion_steps=4, skip=0.5, source_prompt="a cat", source_guidance_scale=3.0),
     dict(prompt="a cat", source_guidance_scale=3.0)),
    ("sd1", "ddim", dict(num_inversion_steps=5, skip=0.0), {}),
    ("sd1", "ddim", dict(num_inversion_steps=5, skip=0.3, source_prompt="a dog", source_guidance_scale=5.0),
     dict(prompt="a dog", source_guidance_scale=5.0)),
    ("sdxl", "dpmpp_2m_sde", dict(num_inversion_steps=6, skip=0.15, negative_prompt=""), {}),
    ("sdxl", "dpmpp_2m_sde", dict(num_inversion_steps=5, skip=0.2, source_prompt="a cat"), dict(prompt="a cat")),
    ("sdxl", "ddim", dict(num_inversion_steps=5, skip=0.1, source_prompt="a cat", num_zero_noise_steps=1),
     dict(prompt="a cat", num_zero_noise_steps=1)),
])
def test_inversion_equals_the_reference(pipes, name, scheduler, ref_kw, kw):
    ref, mine = pipes(name, scheduler)
    invert_reference(ref, photo(), seed=3, **ref_kw)
    steps, skip = ref_kw["num_inversion_steps"], ref_kw["skip"]
    inv = mine.invert(photo(), method="ddpm", num_inference_steps=steps, skip=skip, scheduler=scheduler, seed=3,
                      negative_prompt=ref_kw.get("negative_prompt"), **kw)
    assert inv.noise.shape == (1, steps, 4, 8, 8) and inv.trajectory.shape == (1, steps, 4, 8, 8)
    assert inv.num_inference_steps == int(steps * (1 + skip)) and inv.method == "ddpm"
    assert (inv.latents - ref.init_latents).abs().max() <= TOL
    assert (inv.noise - noise_maps(ref)).abs().max() <= TOL
    assert inv.noise[:, :-3].abs().amax(dim=(2, 3, 4)).min() > 0.1  # real noise maps, not zeros
    if name == "sdxl":  # SDXL zeroes the last num_zero_noise_steps maps (default 3)
        assert inv.noise[:, -kw.get("num_zero_noise_steps", 3):].abs().max() == 0


# ---------------------------------------------------------------------------- editing

def _user_mask():
    m = torch.zeros(1, 1, 12, 12)
    m[..., 3:9, 2:8] = 1.0
    return m


SD_CASES = {
    "intersection above t=800 (skip 0): attention mask alone there": (
        dict(editing_prompt=["cat"], edit_guidance_scale=8.0), LEdits(Concept("cat", scale=8.0, warmup=0)),
        dict(skip=0.0)),
    "one concept, magnitude mask": (dict(editing_prompt=["cat"], use_intersect_mask=False),
                                    LEdits("cat", use_intersect_mask=False), {}),
    "two concepts, reverse, warmup, cooldown, thresholds": (
        dict(editing_prompt=["cat", "red hair"], edit_guidance_scale=[4.0, 7.0], reverse_editing_direction=[False, True],
             edit_warmup_steps=[0, 2], edit_cooldown_steps=[4, 100], edit_threshold=[0.8, 0.5], use_intersect_mask=False),
        LEdits([Concept("cat", scale=4.0, warmup=0, cooldown=4, threshold=0.8),
                Concept("red hair", scale=7.0, reverse=True, warmup=2, threshold=0.5)], use_intersect_mask=False), {}),
    "cross-attention mask": (dict(editing_prompt=["cat"], use_intersect_mask=False, use_cross_attn_mask=True,
                                  edit_threshold=0.7),
                             LEdits(Concept("cat", warmup=0, threshold=0.7), use_intersect_mask=False,
                                    use_cross_attn_mask=True), {}),
    "intersection mask (default), two concepts": (
        dict(editing_prompt=["cat", "snow"], edit_guidance_scale=[6.0, 3.0], edit_threshold=[0.9, 0.6]),
        LEdits([Concept("cat", scale=6.0, warmup=0), Concept("snow", scale=3.0, warmup=0, threshold=0.6)]), {}),
    "DDIM, intersection": (dict(editing_prompt=["cat"], reverse_editing_direction=True),
                           LEdits(Concept("cat", reverse=True, warmup=0)), dict(scheduler="ddim")),
    "user mask": (dict(editing_prompt=["cat"], use_intersect_mask=False, user_mask=_user_mask()),
                  LEdits("cat", use_intersect_mask=False, user_mask=_user_mask()), {}),
}


@pytest.fixture(scope="module")
def inverted(pipes):
    """(name, scheduler, skip) -> (reference inverted in place, our Inversion, our plain reconstruction)
    of a 96x96 image (latents 12x12: masks at 3x3), six steps; the last one inverted is kept."""
    last = {}

    def get(name, scheduler, skip):
        key = (name, scheduler, skip)
        ref, mine = pipes(name, scheduler)
        if last.get(id(ref), (None,))[0] != key:
            neg = dict(negative_prompt="") if name.startswith("sdxl") else {}  # see test_sdxl_base_is_the_prompt
            invert_reference(ref, photo(size=96), seed=1, num_inversion_steps=6, skip=skip, **neg)
            inv = mine.invert(photo(size=96), method="ddpm", num_inference_steps=6, skip=skip, scheduler=scheduler,
                              seed=1)
            plain = mine("", inversion=inv, guidance_scale=1.0, output_type="np").images
            last[id(ref)] = key, inv, plain
        return (ref, mine) + last[id(ref)][1:]

    return get


def _edit_parity(inverted, name, ref_kw, control, inv_kw):
    scheduler = inv_kw.get("scheduler", "dpmpp_2m_sde")
    ref, mine, inv, plain = inverted(name, scheduler, inv_kw.get("skip", 0.25))
    neg = dict(negative_prompt="") if name.startswith("sdxl") else {}
    expected = ref(output_type="np", **neg, **ref_kw).images
    got = mine("", inversion=inv, guidance_scale=1.0, output_type="np", controls=[control]).images
    assert np.abs(got - plain).max() > 1e-2, "the edit changed nothing"
    return float(np.abs(got - expected).max())


@pytest.mark.parametrize("case", list(SD_CASES))
def test_sd1_edit_equals_the_reference(inverted, case):
    ref_kw, control, inv_kw = SD_CASES[case]
    assert _edit_parity(inverted, "sd1-mask", ref_kw, control, inv_kw) <= TOL


XL_CASES = {
    "default: magnitude mask": (dict(editing_prompt=["cat"]), LEdits("cat"), {}),
    "intersection mask, two concepts, reverse, cooldown": (
        dict(editing_prompt=["cat", "snow"], use_intersect_mask=True, reverse_editing_direction=[True, False],
             edit_cooldown_steps=[3, 100], edit_threshold=[0.9, 0.7]),
        LEdits([Concept("cat", reverse=True, warmup=0, cooldown=3), Concept("snow", warmup=0, threshold=0.7)],
               use_intersect_mask=True), {}),
    "cross-attention mask, DDIM": (dict(editing_prompt=["cat"], use_cross_attn_mask=True, edit_guidance_scale=9.0),
                                   LEdits(Concept("cat", scale=9.0, warmup=0), use_cross_attn_mask=True),
                                   dict(scheduler="ddim")),
}


@pytest.mark.parametrize("case", list(XL_CASES))
def test_sdxl_edit_equals_the_reference(inverted, case):
    ref_kw, control, inv_kw = XL_CASES[case]
    assert _edit_parity(inverted, "sdxl-mask", ref_kw, control, inv_kw) <= TOL


def test_batch_of_images_and_source_prompt_equal_the_reference(pipes):
    """Two images at once (the reference's attention store mixes images in a batch, so no
    attention masks here), inverted with a guided source prompt."""
    ref, mine = pipes("sd1")
    images = [photo(0), photo(5)]
    invert_reference(ref, images, seed=2, num_inversion_steps=5, skip=0.2, source_prompt="a cat",
                     source_guidance_scale=4.0)
    inv = mine.invert(images, "a cat", method="ddpm", num_inference_steps=5, skip=0.2, source_guidance_scale=4.0,
                      seed=2)
    assert (inv.noise - noise_maps(ref)).abs().max() <= TOL
    expected = ref(editing_prompt=["snow", "a hat"], edit_threshold=[0.7, 0.8], use_intersect_mask=False,
                   reverse_editing_direction=[False, True], output_type="np").images
    control = LEdits([Concept("snow", warmup=0, threshold=0.7), Concept("a hat", warmup=0, threshold=0.8, reverse=True)],
                     use_intersect_mask=False)
    got = mine(["", ""], inversion=inv, guidance_scale=1.0, output_type="np", controls=[control]).images
    assert got.shape == (2, 64, 64, 3) and np.abs(got - expected).max() <= TOL


def test_sdxl_base_is_the_prompt(pipes):
    """With guidance off our base is the prompt's prediction: SDXL's reference uses the zero
    embedding when no negative prompt is given (force_zeros_for_empty_prompt), ours the
    encoded "" (the reference with negative_prompt="")."""
    ref, mine = pipes("sdxl")
    invert_reference(ref, photo(), seed=0, num_inversion_steps=4, skip=0.0)
    zeros = ref.zs.clone()
    invert_reference(ref, photo(), seed=0, num_inversion_steps=4, skip=0.0, negative_prompt="")
    inv = mine.invert(photo(), method="ddpm", num_inference_steps=4, skip=0.0, seed=0)
    assert (inv.noise - noise_maps(ref)).abs().max() <= TOL
    assert (zeros - ref.zs).abs().max() > 1e-3


# ---------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp_2m_sde"])
def test_sd2_v_prediction_regenerates_its_trajectory(tiny_model, scheduler):
    """Generation with the inversion's own prompt and guidance passes through every inverted
    level (the replayed noise maps undo the inversion step by step) and ends near the
    image's latents. The SD reference's DDIM inversion reads every model output as noise,
    which is wrong for v-prediction; ours converts it as the scheduler's step does."""
    pipe = ours(tiny_model("sd2", prediction_type="v_prediction"))
    inv = pipe.invert(photo(2), "a red house", method="ddpm", num_inference_steps=8, skip=0.1, scheduler=scheduler,
                      source_guidance_scale=3.0, seed=0)
    seen = []
    out = pipe("a red house", inversion=inv, guidance_scale=3.0, output_type="latent",
               callback=lambda i, t, x: seen.append(x.clone()))
    assert len(seen) == 8
    assert (torch.stack(seen[:-1], dim=1) - inv.trajectory[:, 1:]).abs().max() <= 1e-4
    pixels = torch.from_numpy(np.asarray(photo(2), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    target = pipe.vae.encode(pixels).mode() * pipe.vae.config.scaling_factor
    random_start = pipe("a red house", num_inference_steps=8, seed=0, height=64, width=64, output_type="latent")
    # the last step ends on the model's x0 estimate at the lowest level run (t=1 for DDIM's leading
    # spacing, t=112 for DPM-Solver's n+1 one here): close to the image, not equal, with a random model
    assert (out.images - target).pow(2).mean() < 0.25 * (random_start.images - target).pow(2).mean()
    edited = pipe("a red house", inversion=inv, guidance_scale=3.0, output_type="latent",
                  controls=[LEdits("snow", use_intersect_mask=False)])
    assert (edited.images - out.images).abs().max() > 1e-2


def test_zero_edit_scale_is_a_plain_reconstruction(inverted):
    _, mine, inv, plain = inverted("sd1-mask", "dpmpp_2m_sde", 0.25)
    for masks in (dict(use_intersect_mask=True), dict(use_intersect_mask=False)):
        zero = LEdits([Concept("cat", scale=0.0, warmup=0), Concept("snow", scale=0.0, warmup=0)], **masks)
        got = mine("", inversion=inv, guidance_scale=1.0, output_type="np", controls=[zero]).images
        np.testing.assert_allclose(got, plain, atol=1e-5)


def test_guidance_rescale(pipes):
    """The reference's guidance_rescale crashes (it takes the mean of a tuple); ours rescales
    towards the concepts' mean prediction with diffusers' rescale_noise_cfg."""
    from diffusers.pipelines.ledits_pp.pipeline_leditspp_stable_diffusion import rescale_noise_cfg

    from controldiff.controls.ledits import rescale

    a, b = torch.randn(2, 4, 8, 8, generator=gen(0)), torch.randn(2, 4, 8, 8, generator=gen(1)) * 3
    assert torch.allclose(rescale(a, b, 0.7), rescale_noise_cfg(a, b, guidance_rescale=0.7), atol=1e-6)
    _, mine = pipes("sd1")
    inv = mine.invert(photo(), method="ddpm", num_inference_steps=3, seed=0)
    kw = dict(inversion=inv, guidance_scale=1.0, output_type="latent")
    plain = mine("", controls=[LEdits("snow", use_intersect_mask=False)], **kw).images
    rescaled = mine("", controls=[LEdits("snow", use_intersect_mask=False, guidance_rescale=0.7)], **kw).images
    assert torch.isfinite(rescaled).all() and (rescaled - plain).abs().max() > 1e-3


def test_all_concepts_share_one_unet_call_per_step(pipes, monkeypatch):
    _, mine = pipes("sd1-mask")
    inv = mine.invert(photo(size=96), method="ddpm", num_inference_steps=4, skip=0.0, seed=0)
    batches = []
    forward = type(mine.unet).forward
    monkeypatch.setattr(type(mine.unet), "forward", lambda self, x, *a, **k: (batches.append(x.shape[0]),
                                                                               forward(self, x, *a, **k))[1])
    mine("", inversion=inv, guidance_scale=1.0, output_type="latent",
         controls=[LEdits([Concept("cat", warmup=0), Concept("snow", warmup=0)])])
    assert batches == [3] * 4  # base + two concepts, one call per step, no extra pass for the masks


def test_composes_with_controlnet_sag_pag_lora_embeddings_and_weights(models, tmp_path):
    """All in one call on a three-block SD1 model; removing any one changes the image; all at
    zero strength equal the plain reconstruction."""
    import controldiff as cd
    from safetensors.torch import save_file
    from test_lora import make_lora

    path = models["sd1-mask"]
    controlnet = cd.load_controlnet(build_controlnet(path, tmp_path / "cn"))
    pipe = ours(path)
    pipe.load_lora(make_lora(path, "sd1", tmp_path), weight=0.8)
    save_file({"<tex>": torch.randn(2, 32, generator=gen(0)) * 2}, str(tmp_path / "emb.safetensors"))
    pipe.load_textual_inversion(tmp_path / "emb.safetensors")
    inv = pipe.invert(photo(size=96), "a (cat:1.2)", method="ddpm", num_inference_steps=3, seed=0)
    hint = photo(7, size=96)
    controls = {"LEdits": LEdits([Concept("<tex> hat", warmup=0), Concept("(snow:1.3)", scale=4.0, warmup=1)]),
                "ControlNet": cd.ControlNet(controlnet, hint, scale=0.8), "SAG": cd.SAG(scale=0.8),
                "PAG": cd.PAG(scale=2.0)}

    def run(cs):
        return pipe("", inversion=inv, guidance_scale=1.0, output_type="np", controls=list(cs)).images

    full = run(controls.values())
    assert np.isfinite(full).all()
    for name in controls:
        without = run(c for n, c in controls.items() if n != name)
        assert np.abs(full - without).max() > 1e-4, f"removing {name} changed nothing"
    zero = [LEdits(Concept("<tex> hat", scale=0.0, warmup=0)), cd.ControlNet(controlnet, hint, scale=0.0),
            cd.SAG(scale=0.0), cd.PAG(scale=0.0)]
    np.testing.assert_allclose(run(zero), run([]), atol=1e-5)


def test_describe_and_settings(pipes):
    _, mine = pipes("sd1")
    inv = mine.invert(photo(), "a cat", method="ddpm", num_inference_steps=3, seed=4, skip=0.5)
    assert inv.settings["source_guidance_scale"] == 3.5 and inv.settings["skip"] == 0.5 and inv.scheduler == "dpmpp_2m_sde"
    out = mine("", inversion=inv, guidance_scale=1.0, output_type="latent",
               controls=[LEdits("snow", use_intersect_mask=False)])
    described = out.settings["controls"][0]
    assert described["name"] == "LEdits" and described["use_intersect_mask"] is False
    assert out.settings["scheduler"] == "dpmpp_2m_sde" and out.steps_done == 3


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kw, match", [
    (dict(skip=1.0), r"skip: expected a share of the schedule in \[0, 1\)"),
    (dict(skip=-0.1), r"skip: expected a share"),
    (dict(skip=float("nan")), r"skip: expected a share"),
    (dict(scheduler="euler"), "scheduler: the DDPM inversion steps with 'ddim' or 'dpmpp_2m_sde'"),
    (dict(guidance_scale=7.5), "guidance_scale: the DDPM inversion guides with source_guidance_scale"),
    (dict(strength=0.5), "strength: the DDPM inversion shortens the schedule with skip"),
    (dict(num_reg_steps=1), "num_reg_steps: the noise regularisation is for method='ddim'"),
    (dict(source_guidance_scale=float("inf")), "source_guidance_scale: expected a finite number"),
    (dict(num_zero_noise_steps=9), r"num_zero_noise_steps: expected an integer from 0 to num_inference_steps \(4\)"),
    (dict(num_inference_steps=0), "num_inference_steps: expected a positive integer"),
    (dict(num_inference_steps=900, skip=0.5), r"num_inference_steps, skip: 900 steps with skip 0.5 make a schedule "
                                              r"of 1350 steps, more than the model's 1000 training timesteps"),
])
def test_bad_ddpm_arguments(pipe, no_work, kw, match):
    kw = {"method": "ddpm", "num_inference_steps": 4, **kw}
    with pytest.raises(ValueError, match=match):
        pipe.invert(photo(), **kw)


@pytest.mark.parametrize("kw", [dict(skip=0.1), dict(source_guidance_scale=2.0), dict(scheduler="ddim"),
                                dict(num_zero_noise_steps=1)])
def test_ddpm_arguments_refused_by_ddim(pipe, no_work, kw):
    with pytest.raises(ValueError, match=f"{next(iter(kw))}: only for method='ddpm'"):
        pipe.invert(photo(), **kw)


def test_control_errors(pipes, monkeypatch):
    with pytest.raises(ValueError, match="Concept.weight: LEdits has no concept weights"):
        LEdits(Concept("x", weight=2.0))
    with pytest.raises(ValueError, match="use_cross_attn_mask: expected True or False"):
        LEdits("x", use_cross_attn_mask=1)
    with pytest.raises(ValueError, match="user_mask: expected a tensor"):
        LEdits("x", user_mask=np.ones((8, 8)))
    with pytest.raises(ValueError, match="guidance_rescale: expected a finite number >= 0"):
        LEdits("x", guidance_rescale=-1)
    with pytest.raises(ValueError, match="concepts: expected one or more"):
        LEdits([])
    _, mine = pipes("sd1")
    inv = mine.invert(photo(), method="ddpm", num_inference_steps=3, seed=0)

    def forbidden(*a, **k):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(mine.unet, "forward", forbidden)
    for control, match in [
        (LEdits("x"), r"use_cross_attn_mask/use_intersect_mask: the attention masks read the down/up cross-attention "
                      r"at 1/4 of the latent size \(2x2\), this UNet has none"),
        (LEdits("x", use_intersect_mask=False, user_mask=torch.ones(3, 8, 8)), r"user_mask: expected finite values "
                                                                               r"broadcastable to the latents"),
        (LEdits(Concept("x", warmup=3), use_intersect_mask=False), "Concept.warmup: 3"),
    ]:
        with pytest.raises(ValueError, match=match):
            mine("", inversion=inv, guidance_scale=1.0, controls=[control])
    with pytest.raises(ValueError, match="num_inference_steps: 9 differs from the inversion's 3"):
        mine("", inversion=inv, num_inference_steps=9)


def test_eta_is_refused_with_a_ddpm_inversion(pipes):
    _, mine = pipes("sd1")
    inv = mine.invert(photo(), method="ddpm", num_inference_steps=2, seed=0, scheduler="ddim")
    with pytest.raises(ValueError, match="eta: a DDPM inversion replays the noise of eta=1 steps"):
        mine("", inversion=inv, guidance_scale=1.0, eta=0.5)

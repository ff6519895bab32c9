"""ControlNet: parity with diffusers' ControlNet pipelines (SD1 and SDXL, one and two
ControlNets, scales, start/end, guess mode, guidance on and off), views, loading, and
rejection of models and inputs it cannot serve."""
from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

import controldiff as cd
from controldiff.controls.controlnet import ControlNet
from controldiff.loading.control_models import load_controlnet
from controldiff.sampling.control import Control, View

import diffusers  # the oracle

TOL = 1e-4
STEPS = 3


def make_controlnet(folder, out, seed: int, cond_channels=(4, 8, 8, 16)):
    """A diffusers ControlNet copied from the tiny UNet, every weight perturbed (diffusers
    zero-initialises the output convs, which would make the control a no-op)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
        cn = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=cond_channels)
        for p in cn.parameters():
            p.data += 0.05 * torch.randn_like(p)
        cn.save_pretrained(out)
    return cn.eval()


def control_image(seed: int, size=(40, 56)) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def gen(seed):
    return torch.Generator("cpu").manual_seed(seed)


def assert_close(a, b, what=""):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = float(np.abs(a - b).max())
    assert diff <= TOL, f"{what}: max abs diff {diff}"


def assert_differ(a, b, what=""):
    assert float(np.abs(np.asarray(a) - np.asarray(b)).max()) > 1e-3, f"{what}: no effect"


@pytest.fixture(scope="module")
def sd1(tiny_model, tmp_path_factory):
    folder = tiny_model("sd1")
    tmp = tmp_path_factory.mktemp("controlnets")
    refs = [make_controlnet(folder, tmp / f"cn{s}", seed=s) for s in (1, 2)]
    kw = dict(safety_checker=None, requires_safety_checker=False)
    single = diffusers.StableDiffusionControlNetPipeline.from_pretrained(folder, controlnet=refs[0], **kw)
    multi = diffusers.StableDiffusionControlNetPipeline(**{**single.components, "controlnet": refs},
                                                        requires_safety_checker=False)
    for p in (single, multi):
        p.set_progress_bar_config(disable=True)
    ours = cd.Pipeline.from_pretrained(folder)
    ours.progress = False
    models = [load_controlnet(tmp / f"cn{s}") for s in (1, 2)]
    return dict(single=single, multi=multi, ours=ours, models=models, dirs=[tmp / f"cn{s}" for s in (1, 2)])


COMMON = dict(num_inference_steps=STEPS, output_type="np", height=64, width=64)


@pytest.mark.parametrize("setting", [
    dict(seed=0, guidance_scale=7.5, scale=1.0, check_effect=True),
    dict(seed=1, guidance_scale=1.0, scale=0.6, start=0.2, end=0.7, steps=5),
    dict(seed=2, guidance_scale=5.0, scale=0.8, guess_mode=True, images_per_prompt=2, check_effect=True),
    dict(seed=3, guidance_scale=1.0, scale=1.5, guess_mode=True),
], ids=["cfg", "no-cfg-start-end", "guess-mode-cfg", "guess-mode-no-cfg"])
def test_one_controlnet_matches_diffusers(sd1, setting):
    s = dict(setting)
    image = control_image(s["seed"])
    steps = s.get("steps", STEPS)
    kw = dict(COMMON, num_inference_steps=steps, guidance_scale=s["guidance_scale"],
              num_images_per_prompt=s.get("images_per_prompt", 1))
    expected = sd1["single"]("a red cube", image=image, generator=gen(s["seed"]),
                             controlnet_conditioning_scale=s["scale"], guess_mode=s.get("guess_mode", False),
                             control_guidance_start=s.get("start", 0.0), control_guidance_end=s.get("end", 1.0),
                             **kw).images
    control = ControlNet(sd1["models"][0], image, scale=s["scale"], start=s.get("start", 0.0),
                         end=s.get("end", 1.0), guess_mode=s.get("guess_mode", False))
    got = sd1["ours"]("a red cube", generator=gen(s["seed"]), controls=[control], **kw).images
    assert_close(got, expected, str(setting))
    if s.get("check_effect"):
        plain = sd1["ours"]("a red cube", generator=gen(s["seed"]), **kw).images
        assert_differ(got, plain, "controlnet")


@pytest.mark.parametrize("guess_mode", [False, True])
def test_two_controlnets_match_multicontrolnet(sd1, guess_mode):
    images = [control_image(10), control_image(11, size=(64, 64))]
    scales, starts, ends = [0.7, 1.3], [0.0, 0.25], [0.8, 1.0]
    kw = dict(COMMON, num_inference_steps=4, guidance_scale=6.0, negative_prompt="blurry")
    expected = sd1["multi"]("a tree", image=images, generator=gen(5), controlnet_conditioning_scale=scales,
                            control_guidance_start=starts, control_guidance_end=ends, guess_mode=guess_mode,
                            **kw).images
    controls = [ControlNet(m, i, scale=s, start=a, end=b, guess_mode=guess_mode)
                for m, i, s, a, b in zip(sd1["models"], images, scales, starts, ends)]
    got = sd1["ours"]("a tree", generator=gen(5), controls=controls, **kw).images
    assert_close(got, expected, f"two controlnets guess_mode={guess_mode}")
    one = sd1["ours"]("a tree", generator=gen(5), controls=controls[:1], **kw).images
    assert_differ(got, one, "second controlnet")


def test_controlnet_with_img2img_matches_diffusers(sd1):
    """start/end count the steps img2img actually runs (strength cuts the schedule)."""
    ref = diffusers.StableDiffusionControlNetImg2ImgPipeline(**sd1["single"].components, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    init, control = control_image(20, size=(64, 64)), control_image(21)
    kw = dict(COMMON, num_inference_steps=5, guidance_scale=4.0, strength=0.7)
    expected = ref("a hill", image=init, control_image=control, generator=gen(8), controlnet_conditioning_scale=0.9,
                   control_guidance_start=0.3, **kw).images
    got = sd1["ours"]("a hill", image=init, generator=gen(8), controls=[ControlNet(sd1["models"][0], control, 0.9,
                                                                                    start=0.3)], **kw).images
    assert_close(got, expected, "img2img")


def test_sd2_v_prediction_controlnet_matches_diffusers(tiny_model, tmp_path):
    folder = tiny_model("sd2", prediction_type="v_prediction")
    ref_cn = make_controlnet(folder, tmp_path / "cn", seed=6)
    ref = diffusers.StableDiffusionControlNetPipeline.from_pretrained(folder, controlnet=ref_cn, safety_checker=None,
                                                                      requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ours = cd.Pipeline.from_pretrained(folder)
    ours.progress = False
    image = control_image(6)
    kw = dict(COMMON, guidance_scale=6.0, negative_prompt="dull")
    expected = ref("a lake", image=image, generator=gen(6), controlnet_conditioning_scale=1.2, **kw).images
    got = ours("a lake", generator=gen(6), controls=[ControlNet(load_controlnet(tmp_path / "cn"), image, 1.2)],
               **kw).images
    assert_close(got, expected, "sd2 v-prediction")


def test_scale_zero_equals_no_control(sd1):
    kw = dict(COMMON, guidance_scale=7.5)
    plain = sd1["ours"]("a boat", generator=gen(7), **kw).images
    zero = sd1["ours"]("a boat", generator=gen(7), controls=[ControlNet(sd1["models"][0], control_image(7), scale=0.0)],
                       **kw).images
    np.testing.assert_array_equal(zero, plain)


class WholeAndHalves(Control):
    """A test-only view splitter: denoises the left and right halves as two views."""

    def step_views(self, ctx, step, latents, denoise):
        w = latents.shape[-1]
        views = [View(0, latents.shape[-2], 0, w // 2), View(0, latents.shape[-2], w // 2, w)]
        crops = torch.cat([v.crop(latents) for v in views])
        out = denoise(crops, views)
        merged = torch.zeros_like(latents)
        for i, v in enumerate(views):
            v.add_into(merged, out[i * latents.shape[0]:(i + 1) * latents.shape[0]])
        return merged


def test_views_crop_the_control_image(sd1):
    """Under a view split, each view's ControlNet sees its own crop of the control image:
    the residuals equal a ControlNet run on the cropped image and cropped latents."""
    model = sd1["models"][0]
    control = ControlNet(model, control_image(3, size=(64, 128)), scale=0.9)
    recorded = {}

    class Spy(Control):
        def prepare_call(self, ctx, step, call):
            recorded.setdefault("call", (call.x.clone(), call.t, call.embeds.clone(), call.views,
                                         [d.clone() for d in call.kwargs["down_block_additional_residuals"]]))

    out = sd1["ours"]("a wide view", generator=gen(4), num_inference_steps=2, guidance_scale=3.0, height=64,
                      width=128, output_type="np", controls=[WholeAndHalves(), control, Spy()]).images
    assert out.shape == (1, 64, 128, 3)
    x, t, embeds, views, down = recorded["call"]
    assert views is not None and len(views) == 2
    full = control._cond  # (1, 3, 64, 128) in [0, 1]
    for i, v in enumerate(views):
        rows = [i, 2 + i]  # view-major within each of the two branches (uncond, cond)
        img = v.crop(full, 8).repeat(2, 1, 1, 1)
        d, _ = model(x[rows], t, embeds[rows], img, 0.9)
        assert torch.allclose(down[0][rows], d[0], atol=1e-5)
        assert torch.allclose(down[-1][rows], d[-1], atol=1e-5)


@pytest.fixture(scope="module")
def sdxl(tiny_model, tmp_path_factory):
    folder = tiny_model("sdxl")
    out = tmp_path_factory.mktemp("controlnet-xl") / "cn"
    ref = make_controlnet(folder, out, seed=3)
    pipe = diffusers.StableDiffusionXLControlNetPipeline.from_pretrained(folder, controlnet=ref)
    pipe.set_progress_bar_config(disable=True)
    ours = cd.Pipeline.from_pretrained(folder)
    ours.progress = False
    return dict(ref=pipe, ours=ours, model=load_controlnet(out), dir=out)


@pytest.mark.parametrize("setting", [
    dict(seed=0, guidance_scale=5.0, scale=1.0),
    dict(seed=1, guidance_scale=4.0, scale=0.7, guess_mode=True, start=0.0, end=0.6),
], ids=["cfg", "guess-mode-end"])
def test_sdxl_controlnet_matches_diffusers(sdxl, setting):
    s = setting
    image = control_image(s["seed"], size=(64, 64))
    kw = dict(COMMON, num_inference_steps=STEPS, guidance_scale=s["guidance_scale"])
    expected = sdxl["ref"]("a castle", image=image, generator=gen(s["seed"]),
                           controlnet_conditioning_scale=s["scale"], guess_mode=s.get("guess_mode", False),
                           control_guidance_start=s.get("start", 0.0), control_guidance_end=s.get("end", 1.0),
                           **kw).images
    control = ControlNet(sdxl["model"], image, scale=s["scale"], start=s.get("start", 0.0), end=s.get("end", 1.0),
                         guess_mode=s.get("guess_mode", False))
    got = sdxl["ours"]("a castle", generator=gen(s["seed"]), controls=[control], **kw).images
    assert_close(got, expected, str(setting))


def test_wrong_family_is_rejected_before_sampling(sd1, sdxl):
    steps = []

    def callback(i, t, latents):
        steps.append(i)

    with pytest.raises(ValueError, match=r"SDXL ControlNet cannot serve this sd1 model.*addition_embed_type"):
        sd1["ours"]("x", controls=[ControlNet(sdxl["model"], control_image(0))], callback=callback, **COMMON)
    with pytest.raises(ValueError, match=r"SD1/SD2 ControlNet cannot serve this sdxl model"):
        sdxl["ours"]("x", controls=[ControlNet(sd1["models"][0], control_image(0))], callback=callback, **COMMON)
    assert steps == []


def test_bad_arguments_are_named(sd1):
    model = sd1["models"][0]
    with pytest.raises(ValueError, match="scale"):
        ControlNet(model, control_image(0), scale=-1.0)
    with pytest.raises(ValueError, match="scale"):
        ControlNet(model, control_image(0), scale=float("nan"))
    with pytest.raises(ValueError, match="start, end"):
        ControlNet(model, control_image(0), start=0.6, end=0.4)
    with pytest.raises(ValueError, match="start, end"):
        ControlNet(model, control_image(0), end=1.5)
    with pytest.raises(ValueError, match="model: expected a ControlNetModel"):
        ControlNet(sd1["ours"].unet, control_image(0))
    with pytest.raises(FileNotFoundError, match="image"):
        ControlNet(model, "/nonexistent/control.png")
    import copy

    elsewhere = copy.deepcopy(model).to("meta")
    with pytest.raises(ValueError, match=r"model: the ControlNet is on meta.*device='cpu'"):
        sd1["ours"]("x", controls=[ControlNet(elsewhere, control_image(0))], **COMMON)
    one_channel = torch.rand(1, 1, 64, 64)
    with pytest.raises(ValueError, match=r"image: this ControlNet expects a control image with 3 channel"):
        sd1["ours"]("x", controls=[ControlNet(model, one_channel)], **COMMON)
    with pytest.raises(ValueError, match=r"image: tensors are channels first.*\(1, 2, 64, 64\)"):
        ControlNet(model, torch.rand(1, 2, 64, 64))  # refused when the control is made


def test_loader_errors_name_the_file(sd1, tmp_path):
    import shutil

    with pytest.raises(FileNotFoundError, match="not found"):
        load_controlnet(tmp_path / "missing")
    broken = tmp_path / "broken"
    shutil.copytree(sd1["dirs"][0], broken)
    weights = broken / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.safetensors.*truncated"):
        load_controlnet(broken)
    wrong = tmp_path / "wrong"
    shutil.copytree(sd1["dirs"][0], wrong)
    cfg = (wrong / "config.json").read_text().replace('"ControlNetModel"', '"T2IAdapter"')
    (wrong / "config.json").write_text(cfg)
    with pytest.raises(ValueError, match=r"config\.json: this is a T2IAdapter config"):
        load_controlnet(wrong)

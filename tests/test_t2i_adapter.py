"""T2I-Adapter: parity with diffusers' adapter pipelines (SD1: full and light adapters, one
and several; SDXL: full_adapter_xl), composition with ControlNet, views, and rejection."""
from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

import controldiff as cd
from controldiff.controls.controlnet import ControlNet
from controldiff.controls.t2i_adapter import T2IAdapter
from controldiff.loading.control_models import load_controlnet, load_t2i_adapter
from controldiff.sampling.control import Control, View

import diffusers  # the oracle

from test_controlnet import WholeAndHalves, assert_close, assert_differ, gen, make_controlnet

COMMON = dict(num_inference_steps=3, output_type="np", height=64, width=64)


def make_adapter(out, seed: int, **config):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = diffusers.T2IAdapter(num_res_blocks=1, **config).eval()
        adapter.save_pretrained(out)
    return adapter


def image(seed: int, mode: str = "RGB", size=(48, 72)) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    shape = (*size, 3) if mode == "RGB" else size
    return PIL.Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


SD1_ADAPTERS = {
    "full": dict(seed=1, in_channels=3, channels=[16, 32], downscale_factor=8, adapter_type="full_adapter"),
    "full_gray": dict(seed=3, in_channels=1, channels=[16, 32], downscale_factor=8, adapter_type="full_adapter"),
    "light": dict(seed=2, in_channels=3, channels=[16, 32], downscale_factor=8, adapter_type="light_adapter"),
}


@pytest.fixture(scope="module")
def sd1(tiny_model, tmp_path_factory):
    folder = tiny_model("sd1")
    tmp = tmp_path_factory.mktemp("adapters")
    refs = {name: make_adapter(tmp / name, **cfg) for name, cfg in SD1_ADAPTERS.items()}
    ours = cd.Pipeline.from_pretrained(folder)
    ours.progress = False
    base = diffusers.StableDiffusionAdapterPipeline.from_pretrained(
        folder, adapter=refs["full"], safety_checker=None, requires_safety_checker=False)
    comps = {k: v for k, v in base.components.items() if k != "adapter"}

    def reference(adapter):
        pipe = diffusers.StableDiffusionAdapterPipeline(**comps, adapter=adapter, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    models = {name: load_t2i_adapter(tmp / name) for name in SD1_ADAPTERS}
    return dict(folder=folder, tmp=tmp, refs=refs, reference=reference, ours=ours, models=models)


@pytest.mark.parametrize("name, mode, scale, guidance, per_prompt", [
    ("full", "RGB", 0.7, 7.5, 2),
    ("full_gray", "L", 1.0, 1.0, 1),
    ("light", "RGB", 1.3, 5.0, 1),
])
def test_one_adapter_matches_diffusers(sd1, name, mode, scale, guidance, per_prompt):
    img = image(len(name), mode)
    kw = dict(COMMON, guidance_scale=guidance, num_images_per_prompt=per_prompt)
    expected = sd1["reference"](sd1["refs"][name])("a red cube", image=img, adapter_conditioning_scale=scale,
                                                    generator=gen(0), **kw).images
    got = sd1["ours"]("a red cube", generator=gen(0), controls=[T2IAdapter(sd1["models"][name], img, scale)],
                      **kw).images
    assert_close(got, expected, name)
    if name == "full":
        plain = sd1["ours"]("a red cube", generator=gen(0), **kw).images
        assert_differ(got, plain, "adapter")


def test_two_adapters_match_multiadapter(sd1):
    """diffusers' MultiAdapter weights each adapter by its entry of adapter_conditioning_scale:
    the same as one T2IAdapter control per adapter with that scale, summed."""
    images = [image(5), image(6, "L")]
    scales = [0.6, 0.9]
    pipe = sd1["reference"]([sd1["refs"]["full"], sd1["refs"]["full_gray"]])
    kw = dict(COMMON, guidance_scale=6.0)
    expected = pipe("a tree", image=images, adapter_conditioning_scale=scales, generator=gen(2), **kw).images
    controls = [T2IAdapter(sd1["models"][n], i, s) for n, i, s in zip(("full", "full_gray"), images, scales)]
    got = sd1["ours"]("a tree", generator=gen(2), controls=controls, **kw).images
    assert_close(got, expected, "two adapters")
    one = sd1["ours"]("a tree", generator=gen(2), controls=controls[:1], **kw).images
    assert_differ(got, one, "second adapter")


def test_controlnet_and_adapter_together(sd1):
    """Both controls add their residuals to the same UNet call; removing either changes the
    image, and a zero-scale ControlNet leaves the adapter's image exactly as it was."""
    out = sd1["tmp"] / "cn"
    if not out.exists():
        make_controlnet(sd1["folder"], out, seed=4)
    cn = load_controlnet(out)
    img = image(9, size=(64, 64))
    kw = dict(COMMON, guidance_scale=5.0)

    def run(*controls):
        return sd1["ours"]("a house", generator=gen(3), controls=list(controls), **kw).images

    adapter = T2IAdapter(sd1["models"]["full"], img, 0.8)
    both = run(ControlNet(cn, img, 0.9), adapter)
    only_adapter = run(adapter)
    only_controlnet = run(ControlNet(cn, img, 0.9))
    assert_differ(both, only_adapter, "controlnet in the mix")
    assert_differ(both, only_controlnet, "adapter in the mix")
    np.testing.assert_array_equal(run(ControlNet(cn, img, 0.0), adapter), only_adapter)


def test_views_crop_the_features(sd1):
    adapter = T2IAdapter(sd1["models"]["full"], image(4, size=(64, 128)), 1.0)
    recorded = {}

    class Spy(Control):
        def prepare_call(self, ctx, step, call):
            recorded.setdefault("call", (call.views, [f.clone() for f in call.kwargs[
                "down_intrablock_additional_residuals"]]))

    sd1["ours"]("a wide view", generator=gen(4), num_inference_steps=2, guidance_scale=1.0, height=64, width=128,
                output_type="np", controls=[WholeAndHalves(), adapter, Spy()])
    views, feats = recorded["call"]
    assert len(views) == 2 and len(feats) == 2
    full = adapter._features  # (1, 16, 8, 16) at latent resolution, (1, 32, 4, 8) at half of it
    for i, v in enumerate(views):
        assert torch.equal(feats[0][i:i + 1], v.crop(full[0]))
        half = View(v.h0 // 2, v.h1 // 2, v.w0 // 2, v.w1 // 2)
        assert torch.equal(feats[1][i:i + 1], half.crop(full[1]))


@pytest.fixture(scope="module")
def sdxl(tiny_model, tmp_path_factory):
    folder = tiny_model("sdxl")
    out = tmp_path_factory.mktemp("adapter-xl") / "a"
    ref = make_adapter(out, seed=7, in_channels=3, channels=[16, 32], downscale_factor=16,
                       adapter_type="full_adapter_xl")
    pipe = diffusers.StableDiffusionXLAdapterPipeline.from_pretrained(folder, adapter=ref)
    pipe.set_progress_bar_config(disable=True)
    ours = cd.Pipeline.from_pretrained(folder)
    ours.progress = False
    return dict(ref=pipe, ours=ours, model=load_t2i_adapter(out))


def test_sdxl_adapter_matches_diffusers(sdxl):
    img = image(8, size=(64, 64))
    kw = dict(COMMON, guidance_scale=5.0)
    expected = sdxl["ref"]("a castle", image=img, adapter_conditioning_scale=0.8, generator=gen(1), **kw).images
    got = sdxl["ours"]("a castle", generator=gen(1), controls=[T2IAdapter(sdxl["model"], img, 0.8)], **kw).images
    assert_close(got, expected, "sdxl adapter")


def test_wrong_model_and_inputs_are_rejected(sd1, sdxl):
    with pytest.raises(ValueError, match=r"T2IAdapter \(full_adapter_xl.*cannot serve this sd1 model"):
        sd1["ours"]("x", controls=[T2IAdapter(sdxl["model"], image(0))], **COMMON)
    with pytest.raises(ValueError, match=r"T2IAdapter \(full_adapter,.*cannot serve this sdxl model"):
        sdxl["ours"]("x", controls=[T2IAdapter(sd1["models"]["full"], image(0))], **COMMON)
    with pytest.raises(ValueError, match=r"image: T2IAdapter \(full_adapter.*expects a control image with 1 channel"):
        sd1["ours"]("x", controls=[T2IAdapter(sd1["models"]["full_gray"], torch.rand(1, 3, 64, 64))], **COMMON)
    with pytest.raises(ValueError, match=r"height: T2IAdapter \(full_adapter_xl.*multiple of 16"):
        sdxl["ours"]("x", controls=[T2IAdapter(sdxl["model"], image(0))], **dict(COMMON, height=72))
    with pytest.raises(ValueError, match="scale"):
        T2IAdapter(sd1["models"]["full"], image(0), scale=float("inf"))
    with pytest.raises(ValueError, match="model: expected a T2IAdapter"):
        T2IAdapter(sd1["ours"].vae, image(0))


def test_loader_rejects_a_controlnet_folder(sd1, tmp_path):
    (tmp_path / "config.json").write_text('{"_class_name": "ControlNetModel"}')
    with pytest.raises(ValueError, match=r"config\.json: this is a ControlNetModel config, not a T2I-Adapter"):
        load_t2i_adapter(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        load_t2i_adapter(tmp_path / "missing")

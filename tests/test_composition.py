"""Composition is the product: every control works together with the others.

No single reference pipeline combines these, so the tests assert properties that fail
if a control is missing or ignored: all together run (finite images), removing any one
changes the result, zero strength equals absence, and they also combine with
MultiDiffusion views, img2img, inpainting and SDXL.
"""
from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

import controldiff as cd
from pipes import ours as _pipe
from tiny_models import build_controlnet


def _control_image(size, seed=0):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny_controls(tmp_path_factory, tiny_model):
    """Tiny diffusers ControlNet and T2I-Adapter for the SD1 and SDXL tiny models, in diffusers format."""
    import diffusers

    out = {}
    for family in ("sd1", "sdxl"):
        unet = diffusers.UNet2DConditionModel.from_pretrained(tiny_model(family) / "unet")
        torch.manual_seed(1)   # the adapter below draws from the global generator
        cn_dir = build_controlnet(tiny_model(family), tmp_path_factory.mktemp(f"cn-{family}"))
        kind = "full_adapter_xl" if family == "sdxl" else "full_adapter"
        ad = diffusers.T2IAdapter(in_channels=3, channels=list(unet.config.block_out_channels), num_res_blocks=1,
                                  downscale_factor=8 if family == "sd1" else 16, adapter_type=kind)
        for p in ad.parameters():
            torch.nn.init.normal_(p, std=0.05)
        ad_dir = tmp_path_factory.mktemp(f"ad-{family}")
        ad.save_pretrained(ad_dir)
        out[family] = (cd.load_controlnet(cn_dir), cd.load_t2i_adapter(ad_dir))
    return out


def _all_controls(family, models, size):
    cn, ad = models[family]
    img = _control_image(size)
    return {
        "SEGA": cd.SEGA([cd.Concept("smiling", scale=4.0, warmup=0), cd.Concept("dark", scale=3.0, warmup=1, reverse=True)]),
        "SAG": cd.SAG(scale=0.8),
        "PAG": cd.PAG(scale=2.0),
        "ControlNet": cd.ControlNet(cn, img, scale=0.8),
        "T2IAdapter": cd.T2IAdapter(ad, img, scale=0.9),
    }


def _gen(pipe, controls, **kw):
    kw = {"num_inference_steps": 3, "seed": 3, "output_type": "np", "scheduler": "ddim", **kw}
    return pipe("a cat on a mat", controls=list(controls), **kw).images


def _each_one_matters(pipe, controls: dict, **kw):
    full = _gen(pipe, controls.values(), **kw)
    assert np.isfinite(full).all()
    for name in controls:
        rest = [c for n, c in controls.items() if n != name]
        without = _gen(pipe, rest, **kw)
        assert np.abs(full - without).max() > 1e-4, f"removing {name} changed nothing"
    return full


def test_all_controls_together_sd1(tiny_model, tiny_controls):
    pipe = _pipe(tiny_model("sd1"))
    _each_one_matters(pipe, _all_controls("sd1", tiny_controls, (64, 64)))


def test_zero_strength_controls_equal_no_control(tiny_model, tiny_controls):
    pipe = _pipe(tiny_model("sd1"))
    cn, ad = tiny_controls["sd1"]
    img = _control_image((64, 64))
    zero = [cd.SEGA([cd.Concept("smiling", scale=0.0, warmup=0)]), cd.SAG(scale=0.0), cd.PAG(scale=0.0),
            cd.ControlNet(cn, img, scale=0.0), cd.T2IAdapter(ad, img, scale=0.0)]
    np.testing.assert_allclose(_gen(pipe, zero), _gen(pipe, []), atol=1e-5)


def test_all_controls_with_multidiffusion_wide(tiny_model, tiny_controls):
    pipe = _pipe(tiny_model("sd1"))
    controls = _all_controls("sd1", tiny_controls, (64, 128))
    controls["MultiDiffusion"] = cd.MultiDiffusion(window=64, stride=32)
    out = _each_one_matters(pipe, controls, width=128, height=64)
    assert out.shape == (1, 64, 128, 3)


def test_all_controls_with_img2img_and_inpainting(tiny_model, tiny_controls):
    pipe = _pipe(tiny_model("sd1"))
    init = _control_image((64, 64), seed=5)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    controls = _all_controls("sd1", tiny_controls, (64, 64))
    _each_one_matters(pipe, controls, image=init, strength=0.7)
    _each_one_matters(pipe, controls, image=init, mask_image=PIL.Image.fromarray(mask), num_inference_steps=4)


def test_all_controls_on_sdxl(tiny_model, tiny_controls):
    pipe = _pipe(tiny_model("sdxl"))
    controls = _all_controls("sdxl", tiny_controls, (64, 64))
    _each_one_matters(pipe, controls)
    controls["MultiDiffusion"] = cd.MultiDiffusion(window=64, stride=32)
    assert np.isfinite(_gen(pipe, controls.values(), width=128, height=64)).all()


def test_controls_rejected_on_models_they_cannot_serve(tiny_model, tiny_controls):
    pipe = _pipe(tiny_model("sd1"))
    xl_cn, xl_ad = tiny_controls["sdxl"]
    img = _control_image((64, 64))
    for control in (cd.ControlNet(xl_cn, img), cd.T2IAdapter(xl_ad, img), cd.InstructPix2Pix(img), cd.Depth(depth_map=img)):
        with pytest.raises(ValueError) as e:
            _gen(pipe, [control])
        assert type(control).__name__ in str(e.value) or "channel" in str(e.value)


def _kohya_lora(pipe, path, seed=0, rank=2):
    """A kohya-format LoRA over every attention projection of the UNet."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in pipe.unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v"):
            key = "lora_unet_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.3
            state[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.3
            state[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(state, str(path))
    return path


def test_lora_textual_inversion_weighting_with_controls(tiny_model, tiny_controls, tmp_path):
    """Issue 4's loaders and prompt syntax together with issue 3's controls, in one call."""
    from safetensors.torch import save_file

    pipe = _pipe(tiny_model("sd1"))
    cn, _ = tiny_controls["sd1"]
    lora = _kohya_lora(pipe, tmp_path / "style.safetensors")
    save_file({"<cat-toy>": torch.randn(2, 32, generator=torch.Generator().manual_seed(7)) * 2},
              str(tmp_path / "toy.safetensors"))
    prompt = "a (<cat-toy>:1.3) on a [mat], " + ", ".join(["very detailed"] * 20)  # > 75 tokens: two chunks
    controls = {"SEGA": cd.SEGA([cd.Concept("smiling " * 30, scale=4.0, warmup=0)]),  # a long concept prompt
                "ControlNet": cd.ControlNet(cn, _control_image((64, 128)), scale=0.8),
                "MultiDiffusion": cd.MultiDiffusion(window=64, stride=32)}
    kw = dict(num_inference_steps=3, seed=3, output_type="np", scheduler="euler_a", width=128, height=64,
              negative_prompt="blurry")
    base = pipe(prompt, controls=list(controls.values()), **kw).images
    pipe.load_textual_inversion(tmp_path / "toy.safetensors")
    with_ti = pipe(prompt, controls=list(controls.values()), **kw).images
    pipe.load_lora(lora, weight=0.8)
    both = pipe(prompt, controls=list(controls.values()), **kw).images
    assert np.isfinite(both).all()
    assert np.abs(with_ti - base).max() > 1e-3 and np.abs(both - with_ti).max() > 1e-3
    unweighted = pipe(prompt.replace("(<cat-toy>:1.3)", "<cat-toy>").replace("[mat]", "mat"),
                      controls=list(controls.values()), **kw).images
    assert np.abs(both - unweighted).max() > 1e-4
    for name in controls:
        rest = [c for n, c in controls.items() if n != name]
        assert np.abs(pipe(prompt, controls=rest, **kw).images - both).max() > 1e-4, name
    pipe.unload_lora()
    pipe.unload_textual_inversion()
    np.testing.assert_array_equal(pipe(prompt, controls=list(controls.values()), **kw).images, base)

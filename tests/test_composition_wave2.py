"""Wave 2b composes with wave 1: Attend-and-Excite, FABRIC, CLIP guidance and TIME model
editing in one call with SEGA, SAG, PAG, ControlNet, MultiDiffusion and a LoRA.

No reference combines them, so the tests assert what fails if one is ignored: together
they run (finite images), removing any one changes the result, zero strength of every
new control equals its absence, and SDXL and panoramas take them too.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import controldiff as cd
from pictures import photo
from pipes import ours
from test_clip_guidance import tiny_clip
from test_composition import _control_image, _kohya_lora, tiny_controls  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def clip():
    return tiny_clip()


def _new(clip, prompt_words=("cat", "mat")):
    return {
        "AttendAndExcite": cd.AttendAndExcite(list(prompt_words), max_iter_to_alter=2, thresholds={0: 0.9},
                                              scale_factor=200, attn_res=(4, 4)),
        "FABRIC": cd.FABRIC(liked=[photo(1)], disliked=[photo(2)], feedback_start_ratio=0.0,
                            feedback_end_ratio=1.0, max_weight=5.0),
        "CLIPGuidance": cd.CLIPGuidance(clip, scale=300.0, num_cutouts=2, generator=torch.Generator().manual_seed(0)),
    }


def _old(family, models, size):
    cn, _ = models[family]
    return {
        "SEGA": cd.SEGA([cd.Concept("smiling", scale=4.0, warmup=0)]),
        "SAG": cd.SAG(scale=0.8),
        "PAG": cd.PAG(scale=2.0),
        "ControlNet": cd.ControlNet(cn, _control_image(size), scale=0.8),
    }


def _gen(pipe, make, without=(), **kw):
    """One image with the controls ``make()`` builds (fresh each run: CLIP guidance's
    generator is consumed by a run), leaving out those named in ``without``."""
    kw = {"num_inference_steps": 3, "seed": 3, "output_type": "np", "scheduler": "ddim", **kw}
    controls = [c for n, c in make().items() if n not in without]
    return pipe("a cat on a mat", controls=controls, **kw).images


def _each_one_matters(pipe, make, **kw):
    full = _gen(pipe, make, **kw)
    assert np.isfinite(full).all()
    for name in make():
        assert np.abs(full - _gen(pipe, make, without=(name,), **kw)).max() > 1e-4, f"removing {name} changed nothing"
    return full


def test_wave2_with_wave1_and_lora_and_model_edit_sd1(tiny_model, tiny_controls, clip, tmp_path):
    pipe = ours(tiny_model("sd1"))

    def make():
        return {**_old("sd1", tiny_controls, (64, 64)), **_new(clip)}

    plain = _each_one_matters(pipe, make)
    pipe.load_lora(_kohya_lora(pipe, tmp_path / "style.safetensors"), weight=0.8)
    with_lora = _gen(pipe, make)
    pipe.edit_model("a cat", "a black cat", lamb=0.1)
    edited = _gen(pipe, make)
    assert np.abs(with_lora - plain).max() > 1e-3 and np.abs(edited - with_lora).max() > 1e-4
    pipe.reset_model_edits()
    np.testing.assert_array_equal(_gen(pipe, make), with_lora)   # the edit undone, LoRA kept
    pipe.unload_lora()
    np.testing.assert_array_equal(_gen(pipe, make), plain)


def test_zero_strength_wave2_controls_equal_no_control(tiny_model, clip):
    pipe = ours(tiny_model("sd1"))
    zero = {"AttendAndExcite": cd.AttendAndExcite(["cat"], scale_factor=0, attn_res=(4, 4)),
            "FABRIC": cd.FABRIC(liked=[photo(1)], disliked=[photo(2)], min_weight=0.0, max_weight=0.0),
            "CLIPGuidance": cd.CLIPGuidance(clip, scale=0.0), "SAG": cd.SAG(scale=0.5)}
    np.testing.assert_array_equal(_gen(pipe, lambda: zero), _gen(pipe, lambda: {"SAG": zero["SAG"]}))


def test_wave2_with_multidiffusion_panorama(tiny_model, tiny_controls, clip):
    """Views: the UNet-level controls (FABRIC, CLIP guidance) ride on each view's call."""
    pipe = ours(tiny_model("sd1"))

    def make():
        controls = {**_old("sd1", tiny_controls, (64, 128)), **_new(clip)}
        del controls["AttendAndExcite"]   # its latent update reads one whole-canvas map
        return {**controls, "MultiDiffusion": cd.MultiDiffusion(window=64, stride=32)}

    out = _each_one_matters(pipe, make, width=128, height=64)
    assert out.shape == (1, 64, 128, 3)


def test_wave2_on_sdxl(tiny_model, tiny_controls, clip):
    pipe = ours(tiny_model("sdxl"))

    def make():
        return {**_old("sdxl", tiny_controls, (64, 64)), **_new(clip)}

    before = _each_one_matters(pipe, make, scheduler="euler")
    pipe.edit_model("a cat", "a black cat")
    assert np.abs(_gen(pipe, make, scheduler="euler") - before).max() > 1e-4
    pipe.reset_model_edits()
    np.testing.assert_array_equal(_gen(pipe, make, scheduler="euler"), before)

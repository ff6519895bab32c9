"""Few-step generation as people run it: an LCM-LoRA-style file (a UNet-only LoRA in the
peft/diffusers layout, and the same in kohya's) with the LCM scheduler at 4 steps and
guidance off, equal to diffusers' ``load_lora_weights`` + ``LCMScheduler``; and LCM with a
ControlNet."""
from __future__ import annotations

import numpy as np
import pytest

import controldiff as cd
import diffusers
from pipes import ours, reference
from test_composition import _control_image, tiny_controls  # noqa: F401  (fixture)
from test_lora import gen, make_lora, to_kohya

KW = dict(num_inference_steps=4, guidance_scale=1.0, output_type="np")


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_lcm_lora_four_steps_equals_diffusers(tiny_model, tmp_path, fmt, family):
    model = tiny_model(family)
    file = make_lora(model, family, tmp_path, seed=3, text=False)   # LCM-LoRAs adapt the UNet only
    if fmt == "kohya":
        file = to_kohya(file, tmp_path / "lcm_kohya.safetensors", family, alpha=4.0)
    ref = reference("StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline", model)
    ref.scheduler = diffusers.LCMScheduler.from_config(ref.scheduler.config)
    ref.load_lora_weights(str(file))
    mine = ours(model)
    plain = mine("a cat", scheduler="lcm", generator=gen(2), **KW).images
    mine.load_lora(file)
    got = mine("a cat", scheduler="lcm", generator=gen(2), **KW).images
    expected = ref("a cat", generator=gen(2), **KW).images
    assert np.abs(got - expected).max() <= 1e-4
    assert np.abs(got - plain).max() > 1e-3


def test_lcm_with_controlnet(tiny_model, tiny_controls):
    pipe = ours(tiny_model("sd1"))
    cn, _ = tiny_controls["sd1"]
    plain = pipe("a cat", scheduler="lcm", seed=1, **KW).images
    with_cn = pipe("a cat", scheduler="lcm", seed=1, controls=[cd.ControlNet(cn, _control_image((64, 64)))],
                   **KW).images
    assert np.isfinite(with_cn).all() and np.abs(with_cn - plain).max() > 1e-3

"""Controls describe themselves for metadata (Control.describe, out.settings["controls"]),
and SEGA refuses a concept whose warmup leaves it no step to act."""
from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

import controldiff as cd


@pytest.fixture(scope="module")
def controlnet(tiny_model, tmp_path_factory):
    import diffusers

    unet = diffusers.UNet2DConditionModel.from_pretrained(tiny_model("sd1") / "unet")
    torch.manual_seed(1)
    cn = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16),
                                             load_weights_from_unet=False)
    folder = tmp_path_factory.mktemp("cn")
    cn.save_pretrained(folder)
    return cd.load_controlnet(folder)


def image(h=64, w=64):
    return PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_describe_gives_name_and_settings(controlnet):
    assert cd.SAG(0.5).describe() == {"name": "SAG", "scale": 0.5}
    assert cd.PAG(2.0, layers=("mid", "up.block_0")).describe() == {
        "name": "PAG", "scale": 2.0, "layers": ["mid", "up.block_0"], "adaptive_scale": 0.0}
    assert cd.MultiDiffusion(window=64, stride=32).describe() == {
        "name": "MultiDiffusion", "window": 64, "stride": 32, "circular": False, "batch_size": None}
    sega = cd.SEGA([cd.Concept("smiling", scale=4.0, warmup=2)], momentum_scale=0.2)
    assert sega.describe() == {"name": "SEGA", "momentum_scale": 0.2, "momentum_beta": 0.4, "concepts": [
        {"prompt": "smiling", "scale": 4.0, "reverse": False, "warmup": 2, "cooldown": None, "threshold": 0.9,
         "weight": None}]}
    regions = cd.Regions([cd.Region("a dragon", box=(0, 0, 32, 64), weight=2.0)]).describe()
    assert regions == {"name": "Regions", "regions": [{"prompt": "a dragon", "box": [0, 0, 32, 64], "weight": 2.0,
                                                       "mask": None}]}
    ip2p = cd.InstructPix2Pix(image(), image_guidance_scale=2.0).describe()
    assert ip2p == {"name": "InstructPix2Pix", "image_guidance_scale": 2.0}  # the image itself is left out

    cn = cd.ControlNet(controlnet, image(), scale=0.8, end=0.5)
    described = cn.describe()
    assert described == {"name": "ControlNet", "model": described["model"], "scale": 0.8, "start": 0.0,
                         "end": 0.5, "guess_mode": False}
    assert isinstance(described["model"], str) and described["model"]
    controlnet.source = "control_v11p_sd15_canny.safetensors"  # what a loader may record
    try:
        assert cn.describe()["model"] == "control_v11p_sd15_canny.safetensors"
    finally:
        del controlnet.source


def test_user_controls_describe_their_constructor_arguments():
    class Nudge(cd.Control):
        def __init__(self, amount: float, label: str = "x", *, hidden=None):
            self.amount, self.label = amount, label
            self._state = torch.zeros(3)

    assert Nudge(0.3, label="up").describe() == {"name": "Nudge", "amount": 0.3, "label": "up"}


def test_settings_list_the_users_controls(pipe, controlnet):
    controls = [cd.SAG(0.5), cd.ControlNet(controlnet, image(), scale=0.7)]
    out = pipe("a cat", num_inference_steps=2, seed=0, output_type="latent", controls=controls)
    assert out.settings["controls"] == [c.describe() for c in controls]
    assert [c["name"] for c in out.settings["controls"]] == ["SAG", "ControlNet"]
    json.dumps(out.settings)  # plain data, ready for metadata
    assert pipe("a cat", num_inference_steps=1, seed=0, output_type="latent").settings["controls"] == []


# ---------------------------------------------------------------------------- SEGA warmup
def test_sega_warmup_past_the_steps_is_refused(pipe, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the UNet ran")

    with monkeypatch.context() as m:
        m.setattr(pipe.unet, "forward", forbidden)
        with pytest.raises(ValueError, match=r"^Concept.warmup: 10 for 'smiling' is at or past the 4 timesteps"):
            pipe("a face", num_inference_steps=4, scheduler="euler", seed=0, controls=[cd.SEGA(cd.Concept("smiling"))])
        with pytest.raises(ValueError, match=r"^Concept.warmup: 4 .* the 4 timesteps"):
            pipe("a face", num_inference_steps=4, scheduler="euler", seed=0,
                 controls=[cd.SEGA(cd.Concept("smiling", warmup=4))])
        # img2img runs strength x steps: 5 of 10 here
        with pytest.raises(ValueError, match=r"^Concept.warmup: 5 .* the 5 timesteps"):
            pipe("a face", image=image(), strength=0.5, num_inference_steps=10, scheduler="euler", seed=0,
                 controls=[cd.SEGA(cd.Concept("smiling", warmup=5))])
    out = pipe("a face", num_inference_steps=4, scheduler="euler", seed=0, output_type="np",
               controls=[cd.SEGA(cd.Concept("smiling", warmup=3))])
    assert np.isfinite(out.images).all()

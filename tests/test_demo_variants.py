"""The embedded model's variants (``controldiff.demo.variants``): ControlNets and the 9- and
8-channel UNets start as the base model, a tiny run of each recipe makes a folder the
pipeline loads, the shipped ControlNets load in diffusers with equal outputs, and bad
settings fail before any work. What the shipped variants do is measured in
``test_demo_controls.py``."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

import controldiff as cd
from controldiff.demo import default_model_path, scenes, variants

CAPTION = "a large red circle at the top left on a blue background"


@pytest.fixture(scope="module")
def base(demo_pipe):
    return demo_pipe


def _image(pipe, **kwargs):
    return pipe(CAPTION, num_inference_steps=4, generator=torch.Generator().manual_seed(3), output_type="np",
                **kwargs).images


def test_a_controlnet_made_from_the_unet_starts_as_the_base_model(base):
    cn = variants.controlnet_from_unet(base.unet).eval()
    s = scenes.Scene((scenes.Thing("red", "circle", "top left", "large"),), "blue")
    plain = _image(base)
    assert np.abs(_image(base, controls=[cd.ControlNet(cn, scenes.edge_map(s))]) - plain).max() == 0
    copied = {k: v for k, v in cn.state_dict().items() if k.startswith(("down_blocks", "mid_block", "time_"))}
    unet = base.unet.state_dict()
    assert copied and all(torch.equal(v, unet[k]) for k, v in copied.items())
    assert cn.downscale == base.latent_factor


@pytest.mark.parametrize("channels", [8, 9])
def test_a_widened_unet_starts_as_the_base_model(base, channels):
    wide = variants.widened_unet(base.unet, channels).eval()
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([500, 20])
    emb = torch.randn(2, 77, 64)
    extra = torch.randn(2, channels - 4, 16, 16)
    with torch.no_grad():
        assert torch.equal(wide(torch.cat([x, extra], 1), t, emb), base.unet(x, t, emb))


@pytest.mark.parametrize("kind", variants.KINDS)
def test_a_tiny_variant_run_makes_what_the_pipeline_loads(tmp_path, kind):
    r = variants.VariantRecipe(kind=kind, steps=3, batch=2, pool=8, snapshot_every=2, log_every=1, warmup=1)
    out = variants.train(tmp_path / "v", r)
    made = json.loads((out / "recipe.json").read_text())
    assert made["step"] == 3 and made["recipe"]["kind"] == kind
    assert all(np.isfinite(e["loss"]) for e in made["log"]) and len(made["log"]) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["v"]
    if kind.startswith("controlnet"):
        model = cd.load_controlnet(out)
        s = scenes.sample(random.Random(0))
        p = cd.Pipeline.from_pretrained(default_model_path())
        p.progress = False
        img = _image(p, controls=[cd.ControlNet(model, scenes.position_map(s))])
    else:
        p = cd.Pipeline.from_pretrained(out)
        p.progress = False
        assert p.info.kind == {"inpaint": "inpaint", "instruct-pix2pix": "instruct_pix2pix"}[kind]
        init = scenes.render(scenes.sample(random.Random(0)))
        if kind == "inpaint":
            mask = np.zeros((64, 64), np.uint8)
            mask[:32] = 255
            img = _image(p, image=init, mask_image=Image.fromarray(mask))
        else:
            img = _image(p, controls=[cd.InstructPix2Pix(init)])
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()
    # going on from it: the weights it starts from are the saved ones (a wrong kind is refused)
    again = variants.VariantRecipe(kind=kind, steps=1, batch=2, pool=8, warmup=1, lr=1e-12, init=str(out))
    variants.train(tmp_path / "w", again)
    other = "inpaint" if kind != "inpaint" else "instruct-pix2pix"
    with pytest.raises(ValueError, match=f"holds a {kind} variant, not {other}"):
        variants.train(tmp_path / "x", variants.VariantRecipe(kind=other, steps=1, batch=2, pool=8, init=str(out)))


@pytest.mark.parametrize("kind", ["controlnet-edges", "controlnet-positions"])
def test_the_shipped_controlnets_load_in_diffusers_with_equal_outputs(kind):
    from diffusers import ControlNetModel

    path = variants.variant_path(kind)
    ours = cd.load_controlnet(path)
    ref = ControlNetModel.from_pretrained(path, torch_dtype=torch.float32).eval()
    x, t, emb = torch.randn(2, 4, 16, 16), torch.tensor([900, 100]), torch.randn(2, 77, 64)
    cond = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        down, mid = ours(x, t, emb, cond)
        ref_out = ref(x, t, emb, cond, return_dict=False)
    assert max((a - b).abs().max().item() for a, b in zip([*down, mid], [*ref_out[0], ref_out[1]])) < 1e-5
    made = json.loads((path / "recipe.json").read_text())
    assert made["recipe"]["kind"] == kind and made["step"] == made["recipe"]["steps"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="lineart"), "kind: expected one of"), (dict(steps=0), "steps: expected a positive integer"),
    (dict(lr=-1.0), "lr: expected a finite number > 0"), (dict(edit_dropout=1.0), "edit_dropout"),
    (dict(conv_in_lr=0.0), "conv_in_lr: expected a finite number > 0"),
    (dict(target_latents="mode"), "target_latents: expected .mean. or .sample."),
    (dict(weighting="snr"), "weighting: expected .min-snr. or .v."),
    (dict(base="/no/such"), "base: /no/such is not a model folder"),
    (dict(init="/no/such"), "init: /no/such is not a trained variant folder"),
])
def test_variant_settings_are_checked_before_any_work(kwargs, match):
    with pytest.raises(ValueError, match=match):
        variants.VariantRecipe(**{"kind": "inpaint", **kwargs})


def test_variant_command_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        variants.main(["inpaint", str(tmp_path / "out"), "--steps", "0"])
    assert e.value.code == 2 and "steps: expected a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        variants.main(["inpaint", str(tmp_path), "--ship"])  # not a trained folder: nothing copied
    assert "is not a trained model folder" in capsys.readouterr().err


def test_the_v_weighting_is_the_v_prediction_loss_of_an_epsilon_model():
    from controldiff.demo.recipe import scheduler_config
    from controldiff.schedulers import create

    objective = variants.VWeightedObjective(create("ddpm", scheduler_config()), snr_gamma=5.0)
    g = torch.Generator().manual_seed(0)
    x0, eps, eps_hat = (torch.randn(6, 4, 8, 8, generator=g) for _ in range(3))
    t = torch.tensor([0, 10, 200, 500, 900, 999])
    a = objective.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    x0_hat = (x_t - (1 - a).sqrt() * eps_hat) / a.sqrt()
    v, v_hat = a.sqrt() * eps - (1 - a).sqrt() * x0, a.sqrt() * eps_hat - (1 - a).sqrt() * x0_hat
    expected = (v_hat - v).pow(2).mean(dim=(1, 2, 3)).mean()
    assert torch.allclose(objective(lambda x, tt, e, added_cond_kwargs=None: eps_hat, x0, None, noise=eps,
                                    timesteps=t), expected, rtol=1e-4)


def test_a_widened_conv_in_learns_at_its_own_rate(base):
    r = variants.VariantRecipe(kind="inpaint", lr=1e-4, conv_in_lr=2e-3)
    wide = variants.widened_unet(base.unet, 9)
    rest, first = variants.optimizer(r, wide).param_groups
    assert first["lr"] == 2e-3 and rest["lr"] == 1e-4
    assert {id(p) for p in first["params"]} == {id(p) for p in wide.conv_in.parameters()}
    assert len(rest["params"]) + len(first["params"]) == len(list(wide.parameters()))
    control = variants.controlnet_from_unet(base.unet)
    rest, first = variants.optimizer(variants.VariantRecipe(kind="controlnet-edges"), control).param_groups
    assert not first["params"] and len(rest["params"]) == len(list(control.parameters()))


def test_training_targets_are_the_posterior_draws_or_means():
    from controldiff.demo.recipe import target_latents

    moments = torch.cat([torch.randn(2, 4, 3, 3), torch.full((2, 4, 3, 3), -2.0)], dim=1)
    assert torch.equal(target_latents(moments, "mean"), moments[:, :4])
    draw = target_latents(moments, "sample", torch.Generator().manual_seed(1))
    assert torch.equal(draw, target_latents(moments, "sample", torch.Generator().manual_seed(1)))
    assert 0.2 < (draw - moments[:, :4]).std() < 0.6  # exp(-2 / 2) = 0.37

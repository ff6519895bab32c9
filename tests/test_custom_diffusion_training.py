"""Custom Diffusion training parity: our steps equal diffusers' ``examples/custom_diffusion/
train_custom_diffusion.py`` (vendored in tests/reference/, torchvision replaced by the shim),
run for 2 steps on the tiny SD1 model with the same seed, with its random-scale augmentation
(its default) and with ``--noaug``, with and without prior preservation: same losses, the
same saved k/v (and q/out) weights and modifier-token rows (max abs <= 1e-5); the files load
into our pipeline and diffusers' alike. The seed drives both runs: the embedding resize, the
processors' Linear inits, the script's VAE probe, the data order, the flips, the scales and
their spots (numpy), the class images' crops, the VAE sample, noise and timesteps. Seed 3
draws a small image ("very small ...") then a zoomed crop ("zoomed in ..."); the augmented
runs use a VAE of latent factor 2, whose 32 px squares the augmentation's masks fit."""
from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from controldiff.training import TrainConfig, train
from controldiff.training.custom_diffusion import CustomDiffusion

TOL = 1e-5
PROMPT = "photo of a <new1> thing"
WEIGHTS = "pytorch_custom_diffusion_weights.safetensors"


def photos(folder, sizes, seed=0):
    folder.mkdir()
    for i, (w, h) in enumerate(sizes):
        rng = np.random.default_rng(seed + i)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def run_script(model, data, out, extra, monkeypatch):
    """The vendored script for 2 steps; its losses (what it backpropagates). Folders list
    sorted (ours read them so), not in the file system's order."""
    import pathlib

    import accelerate
    from reference import scripts

    script = scripts.load("train_custom_diffusion", monkeypatch)
    # the script's F: mse_loss unrecorded (it asks for reduction="none"), and SDPA, whose presence picks
    # CustomDiffusionAttnProcessor2_0 as on any torch 2
    monkeypatch.setattr(script, "F", types.SimpleNamespace(
        mse_loss=torch.nn.functional.mse_loss, scaled_dot_product_attention=torch.nn.functional.scaled_dot_product_attention))
    losses = []
    backward = accelerate.Accelerator.backward

    def record(self, loss, **kw):
        losses.append(loss.item())
        return backward(self, loss, **kw)

    monkeypatch.setattr(accelerate.Accelerator, "backward", record)
    listing = pathlib.Path.iterdir
    monkeypatch.setattr(pathlib.Path, "iterdir", lambda self: iter(sorted(listing(self))))
    args = ["script", "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(data),
            "--instance_prompt", PROMPT, "--output_dir", str(out), "--resolution", "32", "--max_train_steps", "2",
            "--learning_rate", "1e-3", "--seed", "3", "--train_batch_size", "1", "--lr_warmup_steps", "0",
            "--dataloader_num_workers", "0", "--report_to", "all", "--checkpointing_steps", "1000", *extra]
    monkeypatch.setattr(sys, "argv", args)
    script.main(script.parse_args())
    return losses


TOKEN = (["--modifier_token", "<new1>", "--initializer_token", "a"], dict(modifier_token="<new1>", initializer_token="a"))
PRIOR = (["--with_prior_preservation", "--class_data_dir", "CLASS", "--class_prompt", "photo of a thing",
          "--num_class_images", "2", "--prior_loss_weight", "0.5"],
         dict(class_data="CLASS", class_prompt="photo of a thing", num_class_images=2, prior_loss_weight=0.5))
SETTINGS = {  # name: (script arguments, our config, our method, the VAE's latent factor)
    "kv+token": (["--noaug", *TOKEN[0]], dict(), dict(TOKEN[1], aug=False), 8),
    "crossattn+flip": (["--noaug", "--freeze_model", "crossattn", *TOKEN[0], "--hflip"], dict(flip=True),
                       dict(TOKEN[1], aug=False, freeze_model="crossattn"), 8),
    "aug+kv+token": (TOKEN[0], dict(), TOKEN[1], 2),
    "aug+crossattn+flip": (["--freeze_model", "crossattn", *TOKEN[0], "--hflip"], dict(flip=True),
                           dict(TOKEN[1], freeze_model="crossattn"), 2),
    "aug+prior+flip": ([*TOKEN[0], *PRIOR[0], "--hflip"], dict(PRIOR[1], flip=True), TOKEN[1], 2),
    "noaug+prior+center_crop": (["--noaug", *TOKEN[0], *PRIOR[0], "--center_crop"], dict(PRIOR[1], center_crop=True),
                                dict(TOKEN[1], aug=False), 8),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_steps_equal_diffusers_script(tiny_model, tmp_path, monkeypatch, setting):
    extra, cfg, method, factor = SETTINGS[setting]
    model = tiny_model("sd1", latent_factor=factor)
    data = photos(tmp_path / "data", [(40, 32)])
    if "class_data" in cfg:  # made beforehand: both runs train on the same files
        classes = photos(tmp_path / "class", [(36, 44), (48, 40)], seed=10)
        extra = [str(classes) if a == "CLASS" else a for a in extra]
        cfg = dict(cfg, class_data=classes)
    theirs_losses = run_script(model, data, tmp_path / "ref", extra, monkeypatch)
    result = train(model, CustomDiffusion(**method),
                   TrainConfig(data, tmp_path / "ours", prompt=PROMPT, seed=3, steps=2, lr=1e-3, resolution=32,
                               format="diffusers", progress=False, **cfg))
    assert len(theirs_losses) == 2
    np.testing.assert_allclose(result.losses, theirs_losses, rtol=0, atol=TOL)
    ours, theirs = load_file(str(tmp_path / "ours" / WEIGHTS)), load_file(str(tmp_path / "ref" / WEIGHTS))
    assert sorted(ours) == sorted(theirs) and len(ours) > 0
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    assert worst <= TOL, worst
    a = load_file(str(tmp_path / "ours" / "<new1>.safetensors"))["<new1>"]
    b = load_file(str(tmp_path / "ref" / "<new1>.safetensors"))["<new1>"]
    assert (a - b).abs().max().item() <= TOL
    from safetensors import safe_open
    base = {}
    with safe_open(str(model / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        key = next(k for k in ours if "to_k" in k)
        base = f.get_tensor(key.replace(".processor.to_k_custom_diffusion", ".to_k"))
    assert (ours[key] - base).abs().max() > 1e-4  # the steps trained something


def test_output_loads_into_our_pipeline_and_diffusers(tiny_model, tmp_path):
    from pipes import ours
    from test_custom_diffusion import KW, reference

    model = tiny_model("sd1")
    data = photos(tmp_path / "data", [(40, 32), (32, 32)])
    out = tmp_path / "out"
    result = train(model, CustomDiffusion("<new1>", "a", "crossattn", aug=False),
                   TrainConfig(data, out, prompt=PROMPT, seed=0, steps=2, lr=1e-2, resolution=32, progress=False))
    assert sorted(p.name for p in result.files) == ["<new1>.safetensors", WEIGHTS]
    mine = ours(model)
    assert mine.load_custom_diffusion(out) == ["<new1>"]
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    expected = reference(model, out, WEIGHTS)(PROMPT, generator=g(), **KW).images
    got = mine(PROMPT, generator=g(), **KW).images
    assert np.abs(got - expected).max() <= 1e-4


@pytest.mark.parametrize("prior", [False, True])
def test_resume_is_exact(tiny_model, tmp_path, prior):
    """With augmentation, from a checkpoint taken with the next batch drawn ahead (its numpy
    draws made again on resume, not new ones)."""
    model = tiny_model("sd1", latent_factor=2)
    data = photos(tmp_path / "data", [(40, 32), (32, 32), (32, 36)])
    kw = dict(prompt=PROMPT, seed=1, steps=3, lr=1e-2, resolution=32, progress=False, flip=True)
    if prior:
        kw.update(class_data=photos(tmp_path / "class", [(32, 40)], seed=10), class_prompt="a thing",
                  num_class_images=1)
    whole = train(model, CustomDiffusion("<new1>", "a"), TrainConfig(data, tmp_path / "a", checkpoint_every=1, **kw))
    assert "ahead_numpy" in json.loads((tmp_path / "a" / "checkpoint-1" / "state.json").read_text())["data"]
    resumed = train(model, CustomDiffusion("<new1>", "a"),
                    TrainConfig(data, tmp_path / "b", resume=tmp_path / "a" / "checkpoint-1", **kw))
    assert resumed.losses == whole.losses[1:]
    for name in (WEIGHTS, "<new1>.safetensors"):
        a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_and_errors(tiny_model, tmp_path, capsys):
    from controldiff import cli

    model = tiny_model("sd1")
    data = photos(tmp_path / "data", [(32, 32)])
    assert cli.main(["train", "custom-diffusion", str(model), "--data", str(data), "--output", str(tmp_path / "o"),
                     "--prompt", PROMPT, "--modifier-token", "<new1>", "--initializer-token", "a", "--noaug",
                     "--resolution", "32", "--steps", "1", "--seed", "0", "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir() if p.is_file()) == ["<new1>.safetensors", WEIGHTS]
    with pytest.raises(ValueError, match="initializer_token: expected one"):
        CustomDiffusion("<a>+<b>", "x")
    with pytest.raises(ValueError, match="freeze_model"):
        CustomDiffusion(freeze_model="all")
    with pytest.raises(ValueError, match="modifier_token: expected"):
        CustomDiffusion("<a> b")
    cfg = dict(prompt=PROMPT, steps=1, resolution=32, progress=False)
    with pytest.raises(ValueError, match="initializer_token: 'cat' is 3 tokens"):
        train(model, CustomDiffusion("<new1>", "cat", aug=False), TrainConfig(data, tmp_path / "e", **cfg))
    with pytest.raises(ValueError, match="already in the tokenizer"):
        train(model, CustomDiffusion("a", "a", aug=False), TrainConfig(data, tmp_path / "e", **cfg))
    with pytest.raises(ValueError, match="aug: expected True or False"):
        CustomDiffusion(aug="no")
    with pytest.raises(ValueError, match=r"resolution: 32 is too small for the random-scale augmentation.*latent "
                                         r"factor 8.*at least 72 or aug=False \(--noaug\)"):
        train(model, CustomDiffusion("<new1>", "a"), TrainConfig(data, tmp_path / "e", **cfg))
    for bad in (dict(snr_gamma=5.0), dict(cache_latents=True, center_crop=True)):
        with pytest.raises(ValueError, match=f"{next(iter(bad))}: not supported with custom-diffusion"):
            train(model, CustomDiffusion("<new1>", "a", aug=False), TrainConfig(data, tmp_path / "e", **cfg, **bad))
    with pytest.raises(ValueError, match=r"initializer_token: 'cat' is 3 tokens for tokenizer 1"):  # SDXL: each checked
        train(tiny_model("sdxl"), CustomDiffusion("<new1>", "cat", aug=False), TrainConfig(data, tmp_path / "e", **cfg))
    assert not (tmp_path / "e").exists()

"""Validation images (training/validation.py) and EMA (training/ema.py) in the training loop:
validation images come from the model being trained, with fixed seeds, and leave the run
exactly as it is without them; the EMA equals diffusers' EMAModel on the same weights, is
what is saved, and resumes exactly."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import pipes
from controldiff import cli
from controldiff.png import read_parameters
from controldiff.training import LoRA, train
from controldiff.training import checkpoint as ckpt
from test_training import config, photos, same_files

LORA = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return photos(tmp_path_factory.mktemp("data"))


def test_validation_images_come_from_the_trained_model_and_change_nothing(tiny_model, data, tmp_path):
    model = tiny_model("sd1")
    kw = dict(steps=4, flip=True, noise_offset=0.1)  # random crops and flips: the RNG matters
    plain = train(model, LoRA(train_text_encoder=True), config(data, tmp_path / "a", **kw))
    shown = train(model, LoRA(train_text_encoder=True),
                  config(data, tmp_path / "b", validation_prompt="a photo of sks", validation_every=2,
                         validation_images=2, **kw))
    assert shown.losses == plain.losses
    assert same_files(tmp_path / "a" / LORA, tmp_path / "b" / LORA) == 0
    folder = tmp_path / "b" / "validation"
    assert sorted(p.name for p in folder.iterdir()) == ["step-2-0.png", "step-2-1.png", "step-4-0.png", "step-4-1.png"]
    assert "Seed: 2," in read_parameters(folder / "step-4-1.png")  # seed 1 + k
    # the end's images are the saved LoRA's, in our Pipeline from the files, seed + k
    pipe = pipes.ours(model)
    pipe.load_lora(tmp_path / "b" / LORA)
    for k in range(2):
        expected = np.asarray(pipe("a photo of sks", height=32, width=32, seed=1 + k).images[0], dtype=np.float64)
        got = np.asarray(Image.open(folder / f"step-4-{k}.png"), dtype=np.float64)
        assert np.abs(got - expected).max() <= 1.0  # one PNG level
    early = np.asarray(Image.open(folder / "step-2-0.png"), dtype=np.float64)
    assert np.abs(early - np.asarray(Image.open(folder / "step-4-0.png"), dtype=np.float64)).max() > 2


def test_validation_restores_modes_and_rng(tiny_model, tmp_path):
    from controldiff.loading.folder import load_components
    from controldiff.training.validation import validation_images

    c = load_components(tiny_model("sd1"))
    c.unet.train()
    c.unet.conv_in.eval()
    torch.manual_seed(5)
    before = torch.get_rng_state()
    files = validation_images(c, "x", 1, 32, None, 7, tmp_path, "tiny")
    assert [f.name for f in files] == ["step-7-0.png"] and not list(tmp_path.glob("validation/.*"))
    assert torch.equal(torch.get_rng_state(), before)
    assert c.unet.training and not c.unet.conv_in.training and c.unet.conv_out.training
    assert not c.vae.training


def test_ema_equals_diffusers_ema_model_and_is_saved(tiny_model, data, tmp_path, monkeypatch):
    from diffusers.training_utils import EMAModel

    weights = []  # the trainable tensors after each optimizer step
    real = torch.optim.AdamW.step

    def step(self, *a, **k):
        out = real(self, *a, **k)
        weights.append([p.detach().clone().requires_grad_(True) for g in self.param_groups for p in g["params"]])
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    out = tmp_path / "o"
    lora = LoRA()
    train(tiny_model("sd1"), lora, config(data, out, steps=6, checkpoint_every=6, ema=True, ema_decay=0.35))
    assert len(weights) == 6
    ref = EMAModel(weights[0], decay=0.35)  # the cap is reached at step 5: (1 + 4) / 14 > 0.35
    for w in weights:
        ref.step(w)
    saved = ckpt.read(out / "checkpoint-6").trainable
    ema = [saved[f"ema.{i}"] for i in range(len(weights[0]))]
    err = max((a - b).abs().max().item() for a, b in zip(ema, ref.shadow_params))
    assert err <= 1e-6, err
    assert max((a - b).abs().max().item() for a, b in zip(ema, weights[-1])) > 1e-3  # not the raw weights
    names = list(lora.state_dict())  # in the order of its parameters
    assert len(names) == len(ema)
    file = load_file(str(out / LORA))
    for name, e in zip(names, ema):  # what is saved is the average
        key = name.replace("lora_A", "lora.down").replace("lora_B", "lora.up")
        assert torch.equal(file[key], e)


def test_resume_with_ema_equals_one_run(tiny_model, data, tmp_path):
    model = tiny_model("sd1")
    kw = dict(steps=4, ema=True, ema_decay=0.5, gradient_accumulation=2)
    straight = train(model, LoRA(), config(data, tmp_path / "a", checkpoint_every=2, **kw))
    resumed = train(model, LoRA(), config(data, tmp_path / "b", resume=tmp_path / "a" / "checkpoint-2", **kw))
    assert resumed.losses == straight.losses[2:]
    assert same_files(tmp_path / "a" / LORA, tmp_path / "b" / LORA) == 0
    with pytest.raises(ValueError, match="resume: .* holds an EMA"):
        train(model, LoRA(), config(data, tmp_path / "c", resume=tmp_path / "a" / "checkpoint-2", steps=4))
    train(model, LoRA(), config(data, tmp_path / "d", steps=1, checkpoint_every=1))
    with pytest.raises(ValueError, match="resume: .* holds no EMA"):
        train(model, LoRA(), config(data, tmp_path / "e", resume=tmp_path / "d", **kw))


def test_argument_errors(data, tmp_path):
    for kw, match in [(dict(validation_prompt="x"), "validation_every: validation images need both"),
                      (dict(validation_every=2), "validation_prompt: validation images need both"),
                      (dict(validation_prompt="x", validation_every=0), "validation_every: expected a positive"),
                      (dict(validation_prompt="x", validation_every=1, validation_images=0), "validation_images:"),
                      (dict(validation_prompt="\udc80", validation_every=1), "validation_prompt: not valid UTF-8"),
                      (dict(validation_prompt=3, validation_every=1), "validation_prompt: expected text"),
                      (dict(ema_decay=1.0), r"ema_decay: expected a number in \[0, 1\)"),
                      (dict(ema_decay=-0.1), "ema_decay: expected a finite number >= 0")]:
        with pytest.raises(ValueError, match=match):
            config(data, tmp_path, **kw).check()


def test_cli_validation_and_ema(tiny_model, data, tmp_path):
    out = tmp_path / "o"
    assert cli.main(["train", "lora", str(tiny_model("sd1")), "--data", str(data), "--output", str(out),
                     "--prompt", "sks", "--resolution", "32", "--steps", "2", "--seed", "0", "--format", "diffusers",
                     "--no-progress", "--validation-prompt", "sks", "--validation-every", "1",
                     "--validation-images", "1", "--ema", "--ema-decay", "0.9", "--checkpoint-every", "2"]) == 0
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-1-0.png", "step-2-0.png"]
    assert "ema.0" in ckpt.read(out).trainable

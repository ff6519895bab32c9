"""8-bit AdamW (bitsandbytes, ``use_8bit_adam``) and the fp16 loss scaler in checkpoints: the
8-bit state is what is kept (uint8 moments for the large tensors), a run resumed from a
checkpoint equals one run, a checkpoint of the other optimizer is refused, and a missing
bitsandbytes is a clear error. Parity with diffusers' ``--use_8bit_adam``:
``tests/test_training_dreambooth_parity.py``."""
from __future__ import annotations

import builtins

import pytest
import torch

from controldiff import cli
from controldiff.training import DreamBooth, TrainConfig, optim, train
from controldiff.training import trainer as trainer_module
from test_training import photos, same_files

UNET = "diffusers/unet/diffusion_pytorch_model.safetensors"


def config(data, out, **kw):
    base = dict(prompt="a photo of sks dog", resolution=32, steps=3, batch_size=1, seed=1, lr=1e-3,
                progress=False, format="diffusers", use_8bit_adam=True)
    return TrainConfig(data, out, **{**base, **kw})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return photos(tmp_path_factory.mktemp("data"), sizes=((40, 32), (32, 36)))


def test_8bit_state_and_exact_resume(tiny_model, data, tmp_path, monkeypatch):
    model = tiny_model("sd1")
    made = []
    real = optim.adamw
    monkeypatch.setattr(trainer_module, "adamw", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    straight = train(model, DreamBooth(), config(data, tmp_path / "a", checkpoint_every=1))
    import bitsandbytes as bnb
    assert isinstance(made[0], bnb.optim.AdamW8bit)
    states = list(made[0].state.values())
    eight = [s for s in states if s["state1"].dtype == torch.uint8]
    assert eight and all(s["state2"].dtype == torch.uint8 for s in eight)  # both moments quantised
    big = sum(p.numel() for g in made[0].param_groups for p in g["params"] if p.numel() >= 4096)
    assert sum(s["state1"].numel() for s in eight) == big  # every tensor of 4096+ elements

    resumed = train(model, DreamBooth(), config(data, tmp_path / "b", resume=tmp_path / "a" / "checkpoint-1"))
    assert resumed.losses == straight.losses[1:]
    assert same_files(tmp_path / "a" / UNET, tmp_path / "b" / UNET) == 0

    with pytest.raises(ValueError, match=r"resume: .* use_8bit_adam=True"):
        train(model, DreamBooth(), config(data, tmp_path / "c", resume=tmp_path / "a", use_8bit_adam=False))
    train(model, DreamBooth(), config(data, tmp_path / "d", steps=1, checkpoint_every=1, use_8bit_adam=False))
    with pytest.raises(ValueError, match=r"resume: .* use_8bit_adam=False"):
        train(model, DreamBooth(), config(data, tmp_path / "c", resume=tmp_path / "d"))
    assert not (tmp_path / "c").exists()


def test_missing_bitsandbytes_is_a_clear_error(tmp_path, monkeypatch, capsys):
    real = builtins.__import__

    def no_bnb(name, *a, **k):
        if name.split(".")[0] == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(ValueError, match=r"use_8bit_adam: needs bitsandbytes \(pip install 'controldiff\[bnb\]'\)"):
        config(tmp_path, tmp_path / "out").check()
    config(tmp_path, tmp_path / "out", use_8bit_adam=False).check()
    (tmp_path / "model").mkdir()
    assert cli.main(["train", "dreambooth", str(tmp_path / "model"), "--data", str(tmp_path),
                     "--output", str(tmp_path / "out"), "--use-8bit-adam"]) == 2
    assert "use_8bit_adam: needs bitsandbytes" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_loss_scale_is_resumed(tiny_model, data, tmp_path, monkeypatch):
    """fp16 runs (CUDA only) keep a loss scale that grows and shrinks as gradients allow; a
    resumed run goes on from the checkpoint's. An enabled scaler on the CPU stands in for it."""
    scalers = []

    def growing(name, device):
        scalers.append(torch.amp.GradScaler("cpu", init_scale=2.0 ** 4, growth_interval=1))
        return scalers[-1]

    monkeypatch.setattr(trainer_module, "scaler", growing)
    model = tiny_model("sd1")
    kw = dict(use_8bit_adam=False, steps=3)
    straight = train(model, DreamBooth(), config(data, tmp_path / "a", checkpoint_every=1, **kw))
    assert scalers[-1].get_scale() == 2.0 ** 7  # doubled after each of 3 steps without inf/nan
    resumed = train(model, DreamBooth(), config(data, tmp_path / "b", resume=tmp_path / "a" / "checkpoint-2", **kw))
    assert scalers[-1].get_scale() == 2.0 ** 7  # from 2 ** 6, not a fresh 2 ** 4 -> 2 ** 5
    assert resumed.losses == straight.losses[2:]

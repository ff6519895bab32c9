"""Training memory options: gradient checkpointing (the same step, recomputed: equal losses
and weights, and the UNet's blocks really ran under ``torch.utils.checkpoint``) and mixed
precision (bf16 frozen weights and forward: trains, saves float32, loss near float32's)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch.utils import checkpoint

from controldiff.training import LoRA, TrainConfig, train
from test_training import config, photos


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return photos(tmp_path_factory.mktemp("data"))


def weights(result):
    return load_file(str(next(f for f in result.files if f.suffix == ".safetensors")))


def test_gradient_checkpointing_gives_the_same_steps_and_is_used(tiny_model, data, tmp_path, monkeypatch):
    model = tiny_model("sd1")
    plain = train(model, LoRA(rank=4), config(data, tmp_path / "a", steps=2))
    calls = []
    real = checkpoint.checkpoint
    monkeypatch.setattr(checkpoint, "checkpoint", lambda *a, **k: calls.append(k) or real(*a, **k))
    ckpt = train(model, LoRA(rank=4), config(data, tmp_path / "b", steps=2, gradient_checkpointing=True))
    assert calls and all(k == {"use_reentrant": False} for k in calls)
    assert ckpt.losses == pytest.approx(plain.losses, abs=1e-6)
    a, b = weights(plain), weights(ckpt)
    assert set(a) == set(b)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_eval_and_no_grad_never_checkpoint(tiny_model, monkeypatch):
    from controldiff.loading.folder import load_components
    unet = load_components(tiny_model("sd1")).unet
    unet.gradient_checkpointing = True
    assert unet.gradient_checkpointing
    calls = []
    monkeypatch.setattr(checkpoint, "checkpoint", lambda *a, **k: calls.append(1))
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, unet.config.cross_attention_dim)
    unet.train()
    with torch.no_grad():
        unet(x, 10, ctx)
    unet.eval()
    unet(x, 10, ctx)
    assert calls == []


def test_bf16_trains_saves_float32_and_is_near_float32(tiny_model, data, tmp_path):
    model = tiny_model("sd1")
    full = train(model, LoRA(rank=4), config(data, tmp_path / "a", steps=6, center_crop=True))
    half = train(model, LoRA(rank=4), config(data, tmp_path / "b", steps=6, center_crop=True,
                                             mixed_precision="bf16"))
    assert half.losses[0] == pytest.approx(full.losses[0], rel=0.05)
    assert sum(half.losses[-2:]) < sum(half.losses[:2])
    assert all(v.dtype == torch.float32 for v in weights(half).values())


def test_precision_errors(data, tmp_path, tiny_model):
    with pytest.raises(ValueError, match="mixed_precision: expected one of"):
        TrainConfig(data, tmp_path, mixed_precision="fp8").check()
    with pytest.raises(ValueError, match="mixed_precision: fp16 needs a CUDA device"):
        train(tiny_model("sd1"), LoRA(), config(data, tmp_path / "c", mixed_precision="fp16"))

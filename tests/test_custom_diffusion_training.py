"""Custom Diffusion training parity: our steps equal diffusers' ``examples/custom_diffusion/
train_custom_diffusion.py`` (vendored in tests/reference/, torchvision replaced by the shim),
run with ``--noaug`` for 2 steps on the tiny SD1 model with the same seed: same losses, the
same saved k/v (and q/out) weights and modifier-token rows (max abs <= 1e-5); the files load
into our pipeline and diffusers' alike. The seed drives both runs: the embedding resize, the
processors' Linear inits, the script's VAE probe, the data order, the flips, the VAE sample,
noise and timesteps."""
from __future__ import annotations

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


def photos(folder, sizes):
    folder.mkdir()
    for i, (w, h) in enumerate(sizes):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def run_script(model, data, out, extra, monkeypatch):
    """The vendored script for 2 steps; its losses (what it backpropagates)."""
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
    args = ["script", "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(data),
            "--instance_prompt", PROMPT, "--output_dir", str(out), "--resolution", "32", "--max_train_steps", "2",
            "--learning_rate", "1e-3", "--seed", "3", "--train_batch_size", "1", "--lr_warmup_steps", "0",
            "--noaug", "--dataloader_num_workers", "0", "--report_to", "all", "--checkpointing_steps", "1000", *extra]
    monkeypatch.setattr(sys, "argv", args)
    script.main(script.parse_args())
    return losses


SETTINGS = {  # name: (script arguments, our config, our method)
    "kv+token": (["--modifier_token", "<new1>", "--initializer_token", "a"], dict(),
                 dict(modifier_token="<new1>", initializer_token="a")),
    "crossattn+flip": (["--freeze_model", "crossattn", "--modifier_token", "<new1>", "--initializer_token", "a",
                        "--hflip"], dict(flip=True),
                       dict(modifier_token="<new1>", initializer_token="a", freeze_model="crossattn")),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_steps_equal_diffusers_script(tiny_model, tmp_path, monkeypatch, setting):
    extra, cfg, method = SETTINGS[setting]
    model = tiny_model("sd1")
    data = photos(tmp_path / "data", [(40, 32)])
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
    result = train(model, CustomDiffusion("<new1>", "a", "crossattn"),
                   TrainConfig(data, out, prompt=PROMPT, seed=0, steps=2, lr=1e-2, resolution=32, progress=False))
    assert sorted(p.name for p in result.files) == ["<new1>.safetensors", WEIGHTS]
    mine = ours(model)
    assert mine.load_custom_diffusion(out) == ["<new1>"]
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    expected = reference(model, out, WEIGHTS)(PROMPT, generator=g(), **KW).images
    got = mine(PROMPT, generator=g(), **KW).images
    assert np.abs(got - expected).max() <= 1e-4


def test_resume_is_exact(tiny_model, tmp_path):
    model = tiny_model("sd1")
    data = photos(tmp_path / "data", [(40, 32), (32, 32)])
    kw = dict(prompt=PROMPT, seed=1, steps=3, lr=1e-2, resolution=32, progress=False, flip=True)
    whole = train(model, CustomDiffusion("<new1>", "a"), TrainConfig(data, tmp_path / "a", checkpoint_every=2, **kw))
    resumed = train(model, CustomDiffusion("<new1>", "a"),
                    TrainConfig(data, tmp_path / "b", resume=tmp_path / "a" / "checkpoint-2", **kw))
    assert resumed.losses == whole.losses[2:]
    for name in (WEIGHTS, "<new1>.safetensors"):
        a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_and_errors(tiny_model, tmp_path, capsys):
    from controldiff import cli

    model = tiny_model("sd1")
    data = photos(tmp_path / "data", [(32, 32)])
    assert cli.main(["train", "custom-diffusion", str(model), "--data", str(data), "--output", str(tmp_path / "o"),
                     "--prompt", PROMPT, "--modifier-token", "<new1>", "--initializer-token", "a",
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
        train(model, CustomDiffusion("<new1>", "cat"), TrainConfig(data, tmp_path / "e", **cfg))
    with pytest.raises(ValueError, match="already in the tokenizer"):
        train(model, CustomDiffusion("a", "a"), TrainConfig(data, tmp_path / "e", **cfg))
    with pytest.raises(ValueError, match="class_data: prior preservation"):
        train(model, CustomDiffusion("<new1>", "a"),
              TrainConfig(data, tmp_path / "e", class_data=tmp_path / "c", class_prompt="a dog", **cfg))
    with pytest.raises(ValueError, match="SDXL"):
        train(tiny_model("sdxl"), CustomDiffusion(), TrainConfig(data, tmp_path / "e", **cfg))

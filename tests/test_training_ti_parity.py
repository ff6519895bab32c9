"""Textual inversion training parity: our steps equal diffusers' ``examples/textual_inversion/
textual_inversion.py`` (SDXL: ``textual_inversion_sdxl.py``), vendored in tests/reference/ with
torchvision replaced by tests/reference/torchvision_shim.py, run for 2 steps on the tiny
models with the same seed: same losses and the same ``learned_embeds.safetensors`` rows (max
abs <= 1e-5). The seed drives the whole run in both: transformers' resize of the embeddings,
the data order over the repeated dataset, the templates (Python's random), the flips, the
VAE sample, noise and timesteps."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from controldiff.training import TrainConfig, train
from controldiff.training.textual_inversion import TextualInversion

TOL = 1e-5
TOKEN = "<tok>"


def load_script(name, monkeypatch):
    """The vendored script ``name`` (``reference/scripts.py``), its dataset's file listing sorted."""
    from reference import scripts

    module = scripts.load(name, monkeypatch)
    real = os.listdir
    monkeypatch.setattr(os, "listdir", lambda p=".": sorted(real(p)))  # its dataset lists files unsorted
    return module


def photos(folder, sizes):
    folder.mkdir()
    for i, (w, h) in enumerate(sizes):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


SETTINGS = {  # name: (family, script arguments, our settings, our method's settings)
    "object": ("sd1", ["--train_batch_size", "2", "--num_vectors", "2", "--center_crop"],  # --repeats 100
               dict(batch_size=2, center_crop=True), dict(num_vectors=2)),
    "style": ("sd1", ["--train_batch_size", "2", "--repeats", "1", "--learnable_property", "style"],
              dict(batch_size=2), dict(learnable_property="style", repeats=1)),  # an epoch per step
    "sdxl": ("sdxl", ["--train_batch_size", "1", "--repeats", "2", "--num_vectors", "2"],
             dict(batch_size=1), dict(num_vectors=2, repeats=2)),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_textual_inversion_steps_equal_diffusers_script(tiny_model, tmp_path, monkeypatch, setting):
    family, extra, ours_cfg, ours_method = SETTINGS[setting]
    script = load_script("textual_inversion_sdxl" if family == "sdxl" else "textual_inversion", monkeypatch)
    model = tiny_model(family)
    data = photos(tmp_path / "data", [(40, 32), (32, 36)])  # not square: the center crop or the squash matters
    args = ["script", "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data),
            "--placeholder_token", TOKEN, "--initializer_token", "a", "--output_dir", str(tmp_path / "ref"),
            "--resolution", "32", "--max_train_steps", "2", "--learning_rate", "5e-2", "--seed", "3",
            "--report_to", "all", "--checkpointing_steps", "1000", "--save_steps", "1000", *extra]
    monkeypatch.setattr(sys, "argv", args)
    script.main()
    names = ["learned_embeds.safetensors"] + (["learned_embeds_2.safetensors"] if family == "sdxl" else [])
    theirs = [load_file(str(tmp_path / "ref" / n))[TOKEN] for n in names]

    result = train(model, TextualInversion(TOKEN, "a", **ours_method),
                   TrainConfig(data, tmp_path / "ours", seed=3, steps=2, lr=5e-2, resolution=32, flip=True,
                               interpolation="bicubic", max_grad_norm=None, format="diffusers", progress=False,
                               **ours_cfg))
    ours = [load_file(str(tmp_path / "ours" / n))[TOKEN] for n in names]

    assert len(script.recorded) == 2
    np.testing.assert_allclose(result.losses, script.recorded, rtol=0, atol=TOL)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape == (ours_method.get("num_vectors", 1), a.shape[1])
        assert (a - b).abs().max().item() <= TOL, (a - b).abs().max().item()
    assert (ours[0] - initial_rows(model)).abs().max() > 1e-3  # the steps trained something


def initial_rows(model):
    """The initializer's embedding ("a") in the model's first text encoder."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(model / "tokenizer"))
    encoder = CLIPTextModel.from_pretrained(str(model / "text_encoder"))
    return encoder.get_input_embeddings().weight[tokenizer.encode("a", add_special_tokens=False)[0]].detach()

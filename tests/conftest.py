"""Shared fixtures: tiny model folders (built once per session, cached by arguments), an SD1
pipeline per module, the embedded default model per module, and a guard that no work starts before the arguments are checked."""
from __future__ import annotations

import os

import pytest
import torch

from pipes import ours
from tiny_models import build_folder

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per worker (and per subprocess a test starts): two workers of two OpenMP
    # threads each on 2 cores ran the suite 3x slower (184 s against 56 s).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory: ``tiny_model(family="sd1", in_channels=4, latent_factor=8,
    prediction_type="epsilon", seed=0, refiner=False, variant=None) -> Path``.

    Each distinct set of arguments is written once per session; treat the folder as
    read-only (copy it with ``shutil.copytree`` before modifying)."""
    cache: dict = {}

    def make(family: str = "sd1", in_channels: int = 4, latent_factor: int = 8,
             prediction_type: str = "epsilon", seed: int = 0, refiner: bool = False,
             variant: str | None = None):
        key = (family, in_channels, latent_factor, prediction_type, seed, refiner, variant)
        if key not in cache:
            name = "-".join(str(k) for k in key)
            cache[key] = build_folder(tmp_path_factory.mktemp(name), family=family, in_channels=in_channels,
                                      latent_factor=latent_factor, prediction_type=prediction_type, seed=seed,
                                      refiner=refiner, variant=variant)
        return cache[key]

    return make


@pytest.fixture(scope="module")
def pipe(tiny_model):
    """A tiny SD1 pipeline without progress bars, one per test module (modules may override)."""
    return ours(tiny_model("sd1"))


@pytest.fixture(scope="module")
def demo_pipe():
    """The embedded default model (``controldiff.demo``), float32, one per test module."""
    from controldiff import Pipeline
    from controldiff.demo import default_model_path

    p = Pipeline.from_pretrained(default_model_path(), dtype=torch.float32)
    p.progress = False
    return p


@pytest.fixture
def no_work(pipe, monkeypatch):
    """Any model evaluation or latent allocation fails the test: arguments are checked first."""
    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(pipe.unet, "forward", forbidden)
    monkeypatch.setattr(pipe.vae, "decode", forbidden)
    monkeypatch.setattr(pipe.vae, "encode", forbidden)
    for encoder in pipe.text_encoders:
        monkeypatch.setattr(encoder, "forward", forbidden)
    monkeypatch.setattr("controldiff.pipeline.randn_tensor", forbidden)

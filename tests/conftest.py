"""Shared fixtures: tiny model folders, built once per session and cached by arguments."""
from __future__ import annotations

import os

import pytest
import torch

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

"""Import a vendored diffusers training script with the torchvision shim in place, its
``F.mse_loss`` recording every loss it computes (``module.recorded``). Test-only."""
from __future__ import annotations

import importlib
import sys
import types

import torch


def load(name: str, monkeypatch):
    """``reference.<name>``, importable without torchvision; the shim is removed again after
    the import so that nothing else sees it."""
    import accelerate, diffusers, transformers  # noqa: F401  (before the shim: they probe torchvision)
    from reference import torchvision_shim

    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
    saved = {k: sys.modules.get(k) for k in names}
    torchvision_shim.install()
    try:
        module = importlib.import_module(f"reference.{name}")
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    losses = []

    def mse_loss(*args, **kwargs):
        out = torch.nn.functional.mse_loss(*args, **kwargs)
        losses.append(out.item())
        return out

    monkeypatch.setattr(module, "F", types.SimpleNamespace(mse_loss=mse_loss))
    monkeypatch.setattr(module, "recorded", losses, raising=False)
    return module

"""Checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint is a folder ``checkpoint-STEP``: the trainable tensors (safetensors), the
optimizer, learning-rate scheduler and fp16 loss scaler states and torch's RNG states (``torch.save``, read
back with ``weights_only=True``), and ``state.json`` (step, data order, Python's and numpy's
RNG states, the method's settings, the model's signature). It is written into a temporary
folder beside it and renamed only when complete, so a failure (a full disk, Ctrl-C) leaves
the previous checkpoints as they were and no partial one.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

__all__ = ["Checkpoint", "rng_state", "set_rng_state", "numpy_state", "set_numpy_state", "set_seed",
           "model_signature", "write", "read", "find", "atomic_file", "atomic_path"]

PREFIX = "checkpoint-"
TRAINABLE, OPTIMIZER, STATE = "trainable.safetensors", "optimizer.pt", "state.json"


def set_seed(seed: int) -> None:
    """Seed Python, numpy and torch (all devices), as accelerate's ``set_seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The global RNG states of Python, numpy and torch (CPU and CUDA)."""
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": numpy_state(),
            "python": [version, list(internal), gauss_next]}


def numpy_state() -> list:
    """numpy's global RNG state as JSON can hold it."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return [kind, keys.tolist(), pos, has_gauss, gauss]


def set_numpy_state(state: list) -> None:
    kind, keys, pos, has_gauss, gauss = state
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    set_numpy_state(state["numpy"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def model_signature(configs) -> str:
    """A hash of a model folder's UNet and text encoder configs (``loading.read_configs``):
    checkpoints of another architecture are refused on resume."""
    def clean(cfg):
        return None if cfg is None else {k: v for k, v in cfg.items()
                                         if not k.startswith("_") and k not in ("transformers_version", "dtype",
                                                                                "torch_dtype")}
    data = {"unet": clean(configs.unet), "text": [clean(c) for c in configs.text_encoders]}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Checkpoint:
    """What a checkpoint holds, in memory."""

    def __init__(self, step: int, trainable: dict, optimizer: dict, lr_scheduler: dict, rng: dict, info: dict,
                 scaler: Optional[dict] = None):
        self.step, self.trainable, self.optimizer, self.lr_scheduler = step, trainable, optimizer, lr_scheduler
        self.rng, self.info, self.scaler = rng, info, scaler or {}


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_folder(final: Path, fill: Callable[[Path], None]) -> Path:
    """``fill(temporary folder)``, then rename it to ``final`` (an older ``final`` is swapped
    out and removed only then): a failure leaves the previous folder as it was."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        fill(tmp)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            old.rename(final)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return final



def write(output: Path, ckpt: Checkpoint) -> Path:
    """Write ``output/checkpoint-STEP`` atomically; return it. On failure nothing named
    ``checkpoint-*`` is left half-written and the error names the folder."""
    final = output / f"{PREFIX}{ckpt.step}"

    def fill(tmp: Path) -> None:
        save_file(ckpt.trainable, str(tmp / TRAINABLE))
        rng = {k: v for k, v in ckpt.rng.items() if k in ("torch", "cuda")}
        torch.save({"optimizer": ckpt.optimizer, "lr_scheduler": ckpt.lr_scheduler, "scaler": ckpt.scaler, "rng": rng},
                   tmp / OPTIMIZER)
        info = dict(ckpt.info, step=ckpt.step, numpy_rng=ckpt.rng["numpy"], python_rng=ckpt.rng["python"])
        (tmp / STATE).write_text(json.dumps(info))
        for name in (TRAINABLE, OPTIMIZER, STATE):
            _fsync(tmp / name)

    try:
        return atomic_folder(final, fill)
    except OSError as e:
        raise OSError(e.errno, f"checkpoint: could not write {final} ({e.strerror or e}); the previous "
                               "checkpoints are unchanged") from e


def find(path: Path) -> Path:
    """``path`` if it is a checkpoint, else the latest ``checkpoint-STEP`` inside it."""
    path = Path(path)
    if (path / STATE).is_file():
        return path
    if not path.is_dir():
        raise ValueError(f"resume: {path} is not a folder")
    found = sorted((p for p in path.iterdir() if p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
                    and (p / STATE).is_file()), key=lambda p: int(p.name[len(PREFIX):]))
    if not found:
        raise ValueError(f"resume: {path} is neither a checkpoint (no {STATE}) nor holds any {PREFIX}STEP folder")
    return found[-1]


def read(path: Path) -> Checkpoint:
    path = find(path)
    try:
        info = json.loads((path / STATE).read_text())
        trainable = load_file(str(path / TRAINABLE))
        rest = torch.load(path / OPTIMIZER, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"resume: cannot read the checkpoint {path} ({type(e).__name__}: {e})") from None
    rng = dict(rest["rng"], numpy=info.pop("numpy_rng"), python=info.pop("python_rng"))
    return Checkpoint(info.pop("step"), trainable, rest["optimizer"], rest["lr_scheduler"], rng, info,
                      rest.get("scaler"))


def atomic_path(path: Path, write: Callable[[Path], None]) -> Path:
    """``write(temporary file)``, synced, then renamed to ``path``: a failure (or Ctrl-C)
    leaves ``path`` as it was and no temporary file behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_file(path: Path, tensors: dict, metadata: Optional[dict] = None) -> Path:
    """Save safetensors to ``path`` through a temporary file renamed when complete."""
    return atomic_path(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))



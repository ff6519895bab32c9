"""DreamBooth (Ruiz et al. 2022): the whole UNet trainable, optionally the text encoder(s),
saved as a whole model: a diffusers folder (``OUTPUT/diffusers``, what diffusers'
``train_dreambooth.py`` writes) and one original-layout ``.safetensors`` file
(``OUTPUT/NAME.safetensors``, what A1111 and ComfyUI load).

Prior preservation (class images) is not part of the method: it is the trainer's, shared
with LoRA (``training/prior.py``). Settings as the script's: AdamW over every UNet (and text
encoder) parameter, gradients clipped together; the script's learning rate is 5e-6.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import save_file
from torch import nn

from ..loading.write_ldm import original_state
from ..models.config import read_json
from .checkpoint import atomic_folder

__all__ = ["DreamBooth", "FOLDER", "LR"]

FOLDER = "diffusers"  # the diffusers model under the output folder
LR = 5e-6             # train_dreambooth.py's --learning_rate default
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"


class DreamBooth:
    """The DreamBooth method: what is trainable (every UNet parameter; every text encoder
    parameter with ``train_text_encoder``) and what is saved (the whole model)."""

    name = "dreambooth"
    formats = ("diffusers", "single-file")
    lr = LR  # the CLI's default

    @classmethod
    def from_args(cls, args) -> "DreamBooth":
        """From ``controldiff train dreambooth``'s arguments."""
        return cls(train_text_encoder=args.train_text_encoder)

    def __init__(self, train_text_encoder: bool = False):
        if not isinstance(train_text_encoder, bool):
            raise ValueError(f"train_text_encoder: expected True or False, got {train_text_encoder!r}")
        self.train_text_encoder = train_text_encoder
        self.components = None
        self.trained: dict[str, nn.Module] = {}  # component name -> module

    def describe(self) -> dict:
        """What a checkpoint must agree on to be resumed with this method."""
        return {"method": self.name, "train_text_encoder": self.train_text_encoder}

    def bind(self, components) -> None:
        """The loaded model (:class:`~controldiff.loading.folder.Components`): saving writes all of it."""
        self.components = components

    # ------------------------------------------------------------------ what is trainable
    def attach(self, roots: dict[str, nn.Module]) -> list[nn.Parameter]:
        """Make the UNet (and the text encoders) of ``roots`` trainable; return their parameters."""
        self.trained = {k: m for k, m in roots.items() if m is not None and (k == "unet" or self.train_text_encoder)}
        params = []
        for m in self.trained.values():
            m.requires_grad_(True)
            params += list(m.parameters())
        return params

    # ------------------------------------------------------------------ state (checkpoints)
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained parameters as ``unet.NAME`` / ``text_encoder.NAME``, not copied: the
        trainer takes its snapshot between optimizer steps (a copy of a whole UNet per step
        would double its memory)."""
        return {f"{c}.{n}": p.detach() for c, m in self.trained.items() for n, p in m.named_parameters()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], source: str) -> None:
        mine = self.state_dict()
        if set(mine) != set(state) or any(mine[k].shape != state[k].shape for k in mine):
            missing = sorted(set(mine) - set(state))[:3]
            raise ValueError(f"resume: {source} holds other tensors than this run trains (e.g. missing {missing}); "
                             "was it trained on another model or with other settings?")
        for k, v in mine.items():
            v.copy_(state[k])

    # ------------------------------------------------------------------ what is saved
    def _write_folder(self, folder: Path) -> None:
        c = self.components
        src = Path(c.path)
        for name, entry in c.model_index.items():
            if name.startswith("_") or not isinstance(entry, (list, tuple)) or entry[-1] is None:
                continue
            if name == "unet":
                (folder / name).mkdir()
                shutil.copy2(src / name / "config.json", folder / name / "config.json")
                save_file({k: v.detach().contiguous() for k, v in c.unet.state_dict().items()},
                          str(folder / name / UNET_WEIGHTS), metadata={"format": "pt"})
            elif name in self.trained:
                _save_quietly(self.trained[name], folder / name)
            elif (src / name).is_dir():  # unchanged: the base model's files
                shutil.copytree(src / name, folder / name)
        scheduler = folder / "scheduler" / "scheduler_config.json"
        if scheduler.is_file():  # as the script: a learned variance is not trained, so not used
            cfg = read_json(scheduler)
            if cfg.get("variance_type") in ("learned", "learned_range"):
                scheduler.write_text(json.dumps({**cfg, "variance_type": "fixed_small"}, indent=2))
        (folder / "model_index.json").write_text(json.dumps(c.model_index, indent=2))

    def single_file_state(self) -> dict[str, torch.Tensor]:
        """The whole model in the original layout (:mod:`controldiff.loading.write_ldm`)."""
        c = self.components
        family = "sdxl-refiner" if c.info.family == "sdxl" and c.info.refiner else c.info.family
        return original_state(c.unet.state_dict(), read_json(Path(c.path) / "unet" / "config.json"),
                              c.vae.state_dict(), [None if t is None else t.state_dict() for t in c.text_encoders],
                              family)

    def save(self, output: Path, formats: Sequence[str], write) -> list[Path]:
        """Write the trained model in ``formats`` ("diffusers", "single-file") under ``output``,
        each atomically (single files with ``write(path, tensors, metadata)``); return them."""
        if self.components is None:
            raise RuntimeError("DreamBooth.save: bind(components) was not called (train() does it)")
        files = []
        if "diffusers" in formats:
            files.append(atomic_folder(output / FOLDER, self._write_folder))
        if "single-file" in formats:
            tensors = {k: v.detach() for k, v in self.single_file_state().items()}
            files.append(write(output / f"{output.resolve().name}.safetensors", tensors, {"format": "pt"}))
        return files


def _save_quietly(model, folder: Path) -> None:
    """transformers' ``save_pretrained`` without its "Writing model shards" bar (one shard here;
    the run's own bar, or ``--no-progress``, says what is happening)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder)
    finally:
        if was:
            hf_logging.enable_progress_bar()

"""Loading every component of a diffusers model folder (no diffusers, no network)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.config import read_json
from ..models.validate import (check_scheduler_config, check_text_encoder_config, check_unet_config,
                               check_vae_config)
from .family import ModelInfo, detect_family
from .weights import align_prefix, find_weights, load_model

__all__ = ["Components", "FolderConfigs", "read_configs", "load_components", "load_text_encoder", "load_tokenizer",
           "check_tokenizer_files"]

TEXT_ENCODER_SLOTS = ("text_encoder", "text_encoder_2")
TOKENIZER_SLOTS = ("tokenizer", "tokenizer_2")
_TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
#: older CLIP checkpoints carry the (non-persistent) position ids
CLIP_IGNORE_UNEXPECTED = (r"(^|\.)embeddings\.position_ids$",)


@dataclass
class Components:
    """The loaded parts of a model folder.

    ``text_encoders`` / ``tokenizers`` are in folder order: ``[text_encoder]`` for SD1/SD2,
    ``[text_encoder, text_encoder_2]`` for SDXL, where an SDXL refiner has ``None`` first.
    """

    unet: nn.Module
    vae: nn.Module
    text_encoders: list
    tokenizers: list
    scheduler_config: dict
    info: ModelInfo
    path: Path
    model_index: dict = field(default_factory=dict)

    @property
    def text_encoder(self) -> Any:
        return self.text_encoders[0] if self.text_encoders else None

    @property
    def text_encoder_2(self) -> Any:
        return self.text_encoders[1] if len(self.text_encoders) > 1 else None

    @property
    def tokenizer(self) -> Any:
        return self.tokenizers[0] if self.tokenizers else None

    @property
    def tokenizer_2(self) -> Any:
        return self.tokenizers[1] if len(self.tokenizers) > 1 else None


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: {what} folder not found")
    return path


def _slot_present(root: Path, model_index: dict, name: str) -> bool:
    """A component is present when model_index.json names a class for it; without an entry
    there, when its folder exists."""
    if name in model_index:
        entry = model_index[name]
        return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None
    return (root / name).is_dir()


def _text_config(config_path: Path):
    from transformers import CLIPTextConfig

    raw = read_json(config_path)
    if raw.get("model_type") == "clip" and isinstance(raw.get("text_config"), dict):
        raw = {**raw["text_config"], "architectures": raw.get("architectures")}
    check_text_encoder_config(raw, config_path)
    return raw, CLIPTextConfig.from_dict(raw)


def load_text_encoder(folder: str | Path, *, device: str | torch.device = "cpu",
                      dtype: torch.dtype | None = torch.float32, variant: str | None = None,
                      class_name: str | None = None) -> nn.Module:
    """A transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` from a component
    folder (``config.json`` + weights), chosen from the config's ``architectures``."""
    import transformers

    folder = _require_dir(Path(folder), "text encoder")
    config_path = folder / "config.json"
    raw, config = _text_config(config_path)
    archs = raw.get("architectures") or ([class_name] if class_name else ["CLIPTextModel"])
    arch = archs[0]
    if arch not in _TEXT_ENCODER_CLASSES:
        raise ValueError(
            f"{config_path}: architectures = {archs!r} is not supported; expected one of {_TEXT_ENCODER_CLASSES}"
        )
    cls = getattr(transformers, arch)
    files = find_weights(folder, "model", variant)
    return load_model(
        lambda: cls(config),
        files,
        device=device,
        dtype=dtype,
        ignore_unexpected=CLIP_IGNORE_UNEXPECTED,
        rename=align_prefix,
    )


#: the JSON files a tokenizer folder may hold (each must be a JSON object)
TOKENIZER_JSON_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json", "special_tokens_map.json",
                        "added_tokens.json")


def check_tokenizer_files(folder: str | Path) -> Path:
    """The tokenizer folder, after checking its files are there and readable JSON, so that an
    empty or cut ``tokenizer.json`` / ``vocab.json`` is an error naming the file (transformers
    names none)."""
    folder = _require_dir(Path(folder), "tokenizer")
    if not (folder / "tokenizer.json").is_file():
        for name in ("vocab.json", "merges.txt"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name}: tokenizer file not found")
    for name in TOKENIZER_JSON_FILES:
        if (folder / name).is_file():
            read_json(folder / name)
    merges = folder / "merges.txt"
    if merges.is_file() and not (folder / "tokenizer.json").is_file() and merges.stat().st_size == 0:
        raise ValueError(f"{merges}: the file is empty; expected the BPE merges")
    return folder


def load_tokenizer(folder: str | Path):
    """A transformers ``CLIPTokenizer`` from local files only."""
    from transformers import CLIPTokenizer

    folder = check_tokenizer_files(folder)
    try:
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises many kinds, naming no file
        raise ValueError(f"{folder}: cannot load the tokenizer ({type(e).__name__}: {e})") from None


@dataclass
class FolderConfigs:
    """Every config of a diffusers folder, checked, with the family detected from them."""

    model_index: dict
    unet: dict
    vae: dict
    scheduler: dict
    text_encoders: list  # raw configs in slot order (None: a slot the folder lacks, e.g. a refiner's first)
    slots: list          # the text encoder slots present
    info: ModelInfo


def read_configs(root: str | Path) -> FolderConfigs:
    """Read and check every config and tokenizer file of a folder, no weights: what the
    loader and ``controldiff info`` check before any tensor is read. Errors name the file."""
    root = Path(root)
    model_index = read_json(root / "model_index.json")
    files = {name: _require_dir(root / name, name) / "config.json" for name in ("unet", "vae")}
    files["scheduler"] = _require_dir(root / "scheduler", "scheduler") / "scheduler_config.json"
    unet, vae, scheduler = (read_json(f) for f in files.values())
    check_unet_config(unet, files["unet"])
    check_vae_config(vae, files["vae"])
    check_scheduler_config(scheduler, files["scheduler"])
    slots = [s for s in TEXT_ENCODER_SLOTS if _slot_present(root, model_index, s)]
    if not slots:
        raise FileNotFoundError(f"{root / 'text_encoder'}: text encoder folder not found")
    n = 2 if "text_encoder_2" in slots else 1
    text_configs = [_text_config(_require_dir(root / s, "text encoder") / "config.json")[0] if s in slots else None
                    for s in TEXT_ENCODER_SLOTS[:n]]
    info = detect_family(unet, text_configs, scheduler, vae, files["unet"])
    for s, t in zip(TEXT_ENCODER_SLOTS, TOKENIZER_SLOTS):
        if s in slots:
            check_tokenizer_files(root / t)
    return FolderConfigs(model_index, unet, vae, scheduler, text_configs, slots, info)


def load_components(path: str | Path, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = torch.float32, variant: str | None = None) -> Components:
    """Load a diffusers folder: ``model_index.json`` + ``unet/ vae/ text_encoder/ tokenizer/
    scheduler/`` (+ ``text_encoder_2/ tokenizer_2/`` for SDXL; refiners have only the ``_2``
    ones). The family is detected from the configs (:func:`detect_family`)."""
    from ..models.unet import UNet2DConditionModel
    from ..models.vae import AutoencoderKL

    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{root}: model folder not found")
    if not root.is_dir():
        raise ValueError(
            f"{root}: not a folder; expected a diffusers model folder (model_index.json, unet/, vae/, "
            "text_encoder/, tokenizer/, scheduler/); for a single-file checkpoint (.safetensors/.ckpt) "
            "use Pipeline.from_single_file"
        )
    c = read_configs(root)  # everything that can be wrong before gigabytes of weights are read
    model_index = c.model_index
    unet = load_model(lambda: UNet2DConditionModel(c.unet),
                      find_weights(root / "unet", "diffusion_pytorch_model", variant), device=device, dtype=dtype)
    vae = load_model(lambda: AutoencoderKL(c.vae),
                     find_weights(root / "vae", "diffusion_pytorch_model", variant), device=device, dtype=dtype)
    text_encoders: list = []
    tokenizers: list = []
    for s, t in zip(TEXT_ENCODER_SLOTS[:len(c.text_encoders)], TOKENIZER_SLOTS):
        if s not in c.slots:
            text_encoders.append(None)
            tokenizers.append(None)
            continue
        entry = model_index.get(s)
        class_name = entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else None
        text_encoders.append(load_text_encoder(root / s, device=device, dtype=dtype, variant=variant,
                                               class_name=class_name))
        tokenizers.append(load_tokenizer(root / t))
    return Components(
        unet=unet,
        vae=vae,
        text_encoders=text_encoders,
        tokenizers=tokenizers,
        scheduler_config=c.scheduler,
        info=c.info,
        path=root,
        model_index=model_index,
    )

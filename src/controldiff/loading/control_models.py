"""Loading ControlNets and T2I-Adapters from diffusers-format folders, and ControlNets from
original-layout single files (``control_v11p_sd15_canny.pth``; see :mod:`.convert_controlnet`).

A folder holds ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or ``.bin``,
read with ``weights_only=True``), as written by diffusers' ``save_pretrained``. A model
repository with the component in a ``controlnet/`` or ``adapter/`` subfolder works too.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

from ..models.config import read_json
from ..models.controlnet import ControlNetModel
from ..models.t2i_adapter import T2IAdapter
from ..models.validate import check_controlnet_config, check_t2i_adapter_config
from .weights import find_weights, load_model

PathLike = Union[str, Path]


def _component_folder(path: PathLike, subfolder: str, what: str) -> Path:
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: {what} folder not found")
    if not folder.is_dir():
        raise ValueError(f"{folder}: expected a diffusers {what} folder (config.json + weights), got a file")
    if not (folder / "config.json").is_file() and (folder / subfolder / "config.json").is_file():
        folder = folder / subfolder
    return folder


def _read_config(folder: Path, class_names: tuple[str, ...], what: str, check) -> dict:
    path = folder / "config.json"
    config = read_json(path)
    name = config.get("_class_name")
    if name is not None and name not in class_names:
        raise ValueError(f"{path}: this is a {name} config, not a {what} ({' or '.join(class_names)})")
    check(config, path)
    return config


def _named(model, path: PathLike):
    """Record where the model came from (``model.source``): metadata names it by that."""
    model.source = str(path)
    return model


def load_controlnet(path: PathLike, device: Union[str, torch.device] = "cpu",
                    dtype: torch.dtype = torch.float32, config=None) -> ControlNetModel:
    """A ControlNet as our :class:`ControlNetModel`: a diffusers ``ControlNetModel`` folder
    (or a model folder with ``controlnet/``), or an original-layout file (``control_model.*``
    tensors, ``.safetensors`` or a plain-tensor ``.pth``/``.ckpt``).

    ``config`` (files only): a diffusers ControlNet or UNet config (dict, ``config.json``, a
    ControlNet folder, or a model folder with ``controlnet/`` or ``unet/``) supplying what the
    shapes do not tell (attention heads, norm groups, ...); default: the bundled SD1.5 / SD2.1
    / SDXL config the shapes point to."""
    if Path(path).is_file():
        from .convert_controlnet import load_controlnet_file

        return _named(load_controlnet_file(path, device=device, dtype=dtype, config=config), path)
    if config is not None:
        raise ValueError(f"{path}: config= is for single-file ControlNets; a folder brings its own config.json")
    folder = _component_folder(path, "controlnet", "ControlNet")
    config = _read_config(folder, ("ControlNetModel",), "ControlNet", check_controlnet_config)
    return _named(load_model(lambda: ControlNetModel(config), find_weights(folder), device=device, dtype=dtype), path)


def load_t2i_adapter(path: PathLike, device: Union[str, torch.device] = "cpu",
                     dtype: torch.dtype = torch.float32) -> T2IAdapter:
    """A diffusers ``T2IAdapter`` folder as our :class:`T2IAdapter`."""
    folder = _component_folder(path, "adapter", "T2I-Adapter")
    config = _read_config(folder, ("T2IAdapter",), "T2I-Adapter", check_t2i_adapter_config)
    return _named(load_model(lambda: T2IAdapter(config), find_weights(folder), device=device, dtype=dtype), path)

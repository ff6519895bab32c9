"""Original-layout (lllyasviel ``cldm``) ControlNet files -> our :class:`ControlNetModel`.

A file such as ``control_v11p_sd15_canny.pth`` holds ``control_model.*`` tensors (some,
e.g. the SD2.1 ones, hold the same keys without the prefix; older full checkpoints also
carry ``model.diffusion_model.*`` etc., which are ignored). The encoder half is named like
an LDM UNet and renamed by :func:`.convert_ldm._unet_name`; the ControlNet's own parts:

* ``input_hint_block.{0,2,4,...}`` (convs between SiLUs) -> ``controlnet_cond_embedding``
  ``conv_in``, ``blocks.{0..}``, ``conv_out`` (the first and last conv, and those between);
* ``zero_convs.{i}.0`` -> ``controlnet_down_blocks.{i}``; ``middle_block_out.0`` ->
  ``controlnet_mid_block``.

The config comes from the shapes (levels, layers per block, channels, transformer depth,
context width, linear vs conv projection, hint channels and widths, SDXL's added
embedding) over a base config for what shapes do not tell (heads, norm groups, eps,
upcast): ``config=`` (a diffusers ControlNet or UNet config, or a folder holding one) or
the bundled SD1.5 / SD2.1 / SDXL-base UNet config picked from the shapes. Nothing here
imports diffusers.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor

from ..models.config import read_json
from ..models.controlnet import DEFAULTS, ControlNetModel
from ..models.validate import check_controlnet_config
from . import convert_ldm as ldm
from .convert_ldm import Source, _block_indices, _unet_name
from .single_file import CONFIGS_DIR, load_converted
from .weights import load_state_dict

__all__ = ["CONTROL_PREFIX", "controlnet_state_prefix", "controlnet_sources", "infer_controlnet_config",
           "controlnet_config", "load_controlnet_file"]

CONTROL_PREFIX = "control_model."
_HINT = "input_hint_block."
_BASE_CLASSES = ("ControlNetModel", "UNet2DConditionModel")


def controlnet_state_prefix(state: Mapping[str, Tensor], path: Path) -> str:
    """``"control_model."``, or ``""`` for files without the prefix; a ``ValueError`` naming
    the file when it holds no original-layout ControlNet."""
    if any(k.startswith(CONTROL_PREFIX) for k in state):
        return CONTROL_PREFIX
    if any(k.startswith(_HINT) for k in state):
        return ""
    if "controlnet_cond_embedding.conv_in.weight" in state:
        raise ValueError(f"{path}: holds a diffusers-layout ControlNet state dict (controlnet_cond_embedding.*), "
                         "not the original layout; put it in a folder next to its config.json (as "
                         "diffusion_pytorch_model.safetensors) and load the folder")
    if ldm.UNET_PREFIX + "input_blocks.0.0.weight" in state:
        raise ValueError(f"{path}: is a Stable Diffusion checkpoint without ControlNet tensors (no "
                         "control_model.*); load it with Pipeline.from_single_file")
    first = ", ".join(repr(k) for k in list(state)[:3]) or "none"
    raise ValueError(f"{path}: not an original-layout ControlNet: no control_model.* or input_hint_block.* "
                     f"tensors (first tensors: {first})")


def _hint_convs(cn: Mapping[str, Tensor]) -> list[int]:
    """Indices of the conditioning encoder's convs (the SiLUs between them hold no tensors)."""
    return sorted({int(m.group(1)) for k in cn for m in [re.fullmatch(r"input_hint_block\.(\d+)\.weight", k)] if m})


def controlnet_sources(cn: Mapping[str, Tensor], layers_per_block: int, prefix: str = "") -> dict[str, Source]:
    """Diffusers names for every tensor of ``cn`` (keys without ``prefix``); sources name the
    original key (``prefix`` + key). Raises ``KeyError(original key)`` on a key with no
    ControlNet counterpart."""
    hint = _hint_convs(cn)
    hint_names = {}
    if hint:
        hint_names = {i: f"controlnet_cond_embedding.blocks.{n}" for n, i in enumerate(hint[1:-1])}
        hint_names[hint[0]] = "controlnet_cond_embedding.conv_in"
        hint_names[hint[-1]] = "controlnet_cond_embedding.conv_out"
    out: dict[str, Source] = {}
    for key in cn:
        p = key.split(".")
        name = None
        if p[0] == "input_hint_block" and len(p) == 3 and p[1].isdigit() and int(p[1]) in hint_names:
            name = f"{hint_names[int(p[1])]}.{p[2]}"
        elif p[0] == "zero_convs" and len(p) == 4 and p[1].isdigit() and p[2] == "0":
            name = f"controlnet_down_blocks.{p[1]}.{p[3]}"
        elif p[0] == "middle_block_out" and len(p) == 3 and p[1] == "0":
            name = f"controlnet_mid_block.{p[2]}"
        elif p[0] in ("time_embed", "label_emb", "input_blocks", "middle_block"):
            name = _unet_name(key, layers_per_block)
        if name is None:
            raise KeyError(prefix + key)
        out[name] = Source(prefix + key)
    return out


def infer_controlnet_config(cn: Mapping[str, Tensor]) -> dict:
    """What the ControlNet tensors (keys without prefix) tell of its diffusers config."""
    n_in = len(_block_indices(cn, "input_blocks"))
    downsamplers = sum(1 for k in cn if re.fullmatch(r"input_blocks\.\d+\.0\.op\.weight", k))
    levels = downsamplers + 1
    if n_in == 0 or n_in % levels or n_in // levels < 2:  # n_in - 1 == levels * (lpb + 1) - 1
        raise ValueError(f"{n_in} input blocks with {downsamplers} downsamplers do not form a ControlNet encoder")
    lpb = n_in // levels - 1
    channels, types, depth = [], [], []
    for b in range(levels):
        first = 1 + b * (lpb + 1)
        channels.append(int(cn[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0]))
        attn = f"input_blocks.{first}.1.proj_in.weight" in cn
        types.append("CrossAttnDownBlock2D" if attn else "DownBlock2D")
        depth.append(len({k.split(".")[4] for k in cn if k.startswith(f"input_blocks.{first}.1.transformer_blocks.")})
                     if attn else 1)
    hint = _hint_convs(cn)
    if len(hint) < 2 or len(hint) % 2:
        raise ValueError(f"input_hint_block has {len(hint)} convs; expected conv_in, pairs of blocks and conv_out")
    convs = [cn[f"input_hint_block.{i}.weight"] for i in hint]
    cfg: dict[str, Any] = {
        "in_channels": int(cn["input_blocks.0.0.weight"].shape[1]),
        "conditioning_channels": int(convs[0].shape[1]),
        "conditioning_embedding_out_channels": [int(convs[0].shape[0])] + [int(c.shape[0]) for c in convs[2:-1:2]],
        "block_out_channels": channels,
        "layers_per_block": lpb,
        "down_block_types": types,
        "transformer_layers_per_block": depth,
        "mid_block_type": "UNetMidBlock2DCrossAttn" if any(k.startswith("middle_block.1.") for k in cn)
        else "UNetMidBlock2D",
    }
    cross = [v for k, v in cn.items() if k.endswith("attn2.to_k.weight")]
    proj_in = [v for k, v in cn.items() if k.endswith(".proj_in.weight")]
    if cross:
        cfg["cross_attention_dim"] = int(cross[0].shape[1])
    if proj_in:
        cfg["use_linear_projection"] = proj_in[0].ndim == 2
    if "label_emb.0.0.weight" in cn:
        cfg["addition_embed_type"] = "text_time"
        cfg["projection_class_embeddings_input_dim"] = int(cn["label_emb.0.0.weight"].shape[1])
    return cfg


def _family(inferred: Mapping[str, Any]) -> str:
    if inferred.get("addition_embed_type") == "text_time":
        return "sdxl_base"
    if inferred.get("cross_attention_dim") == 1024 or inferred.get("use_linear_projection"):
        return "sd21"
    return "sd15"


def _base_config(config, path: Path) -> dict:
    """``config=``: a config dict, a ``config.json``, or a folder with one (itself, or its
    ``controlnet/`` or ``unet/`` subfolder)."""
    if isinstance(config, Mapping):
        base, where = dict(config), "config="
    else:
        p = Path(config)
        candidates = [p] if p.is_file() else [p / "config.json", p / "controlnet" / "config.json",
                                               p / "unet" / "config.json"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"{p}: config= must be a ControlNet or UNet config.json, a diffusers ControlNet "
                                    "folder, or a model folder with controlnet/ or unet/")
        base, where = read_json(found), str(found)
    name = base.get("_class_name")
    if name is not None and name not in _BASE_CLASSES:
        raise ValueError(f"{where}: is a {name} config, not a ControlNet or UNet config (loading {path})")
    return base


def controlnet_config(inferred: Mapping[str, Any], base: Optional[Mapping[str, Any]] = None) -> dict:
    """The ControlNet config: shapes over ``base`` (``config=``) or the bundled UNet config of
    the family the shapes point to (heads: 8 for SD1, 64-wide for SD2/SDXL)."""
    given = base is not None
    if not given:
        base = read_json(CONFIGS_DIR / _family(inferred) / "unet" / "config.json")
    cfg = {k: v for k, v in base.items() if k in DEFAULTS}
    cfg.update(inferred)
    if not given:
        family = _family(inferred)
        cfg["attention_head_dim"] = 8 if family == "sd15" else [max(1, c // 64) for c in cfg["block_out_channels"]]
        cfg.pop("num_attention_heads", None)
    if cfg.get("addition_embed_type") != "text_time":
        cfg.pop("addition_time_embed_dim", None)
        cfg.pop("projection_class_embeddings_input_dim", None)
        cfg["addition_embed_type"] = None
    return {"_class_name": "ControlNetModel", **cfg}


def load_controlnet_file(path, *, device: Union[str, torch.device] = "cpu",
                         dtype: Optional[torch.dtype] = torch.float32, config=None) -> ControlNetModel:
    """An original-layout ControlNet file (``.safetensors``, or a plain-tensor ``.pth``/
    ``.ckpt``, read with ``weights_only=True``) as our :class:`ControlNetModel`."""
    path = Path(path)
    base = _base_config(config, path) if config is not None else None
    state = load_state_dict(path)
    prefix = controlnet_state_prefix(state, path)
    cn = ldm.sub_state(state, prefix) if prefix else state
    try:
        inferred = infer_controlnet_config(cn)
    except KeyError as e:
        raise ValueError(f"{path}: incomplete ControlNet: tensor {prefix + e.args[0]!r} not found") from None
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    cfg = controlnet_config(inferred, base)
    hint = "" if base is not None else ("; pass config= a diffusers ControlNet or model folder whose config "
                                        "supplies heads and norm groups")
    try:
        check_controlnet_config(cfg, f"{path} (config from its shapes and {'config=' if base else 'bundled defaults'})")
    except ValueError as e:
        raise ValueError(f"{e}{hint}") from None
    try:
        sources = controlnet_sources(cn, cfg["layers_per_block"], prefix)
    except KeyError as e:
        raise ValueError(f"{path}: tensor {e.args[0]!r} has no counterpart in a diffusers ControlNet; "
                         "not a supported ControlNet layout") from None

    def build() -> ControlNetModel:
        try:
            return ControlNetModel(cfg)
        except (ValueError, RuntimeError, TypeError, AssertionError) as e:
            raise ValueError(f"{path}: cannot build a ControlNet from the config inferred from its shapes "
                             f"({type(e).__name__}: {e}){hint}") from None

    return load_converted(build, sources, state, path, "ControlNet", device=device, dtype=dtype)

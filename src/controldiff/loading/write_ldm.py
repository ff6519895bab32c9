"""Diffusers names -> the original (LDM / sgm) single-file layout: the inverse of
:mod:`.convert_ldm`, so a trained model can be saved as the one ``.safetensors`` file
A1111, ComfyUI and ``from_single_file`` load.

Every written UNet and VAE name is read back through :mod:`.convert_ldm` before anything
is returned, so the two directions cannot drift apart: a name the loader would not map to
the tensor it came from is an error here, not a broken file.

SD2 conditions on the penultimate OpenCLIP layer, so its diffusers text encoder has 23 of
the original 24 layers; the unused 24th is written as zeros (loaders drop it, as they drop
the real one), so the file loads with the bundled SD2 configs too.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from . import convert_ldm as ldm

__all__ = ["original_state", "original_unet_paths", "TEXT_PREFIXES"]

_RESNET = {v: k for k, v in ldm._UNET_RESNET.items()}
_UNET_TOP = {v: k for k, v in ldm._UNET_TOP.items()}
_VAE_RESNET = {v: k for k, v in ldm._VAE_RESNET.items()}
_VAE_ATTN = {v: k for k, v in ldm._VAE_ATTN.items()}
_OPEN_CLIP_TOP = {v: k for k, v in ldm._OPEN_CLIP_TOP.items()}
_OPEN_CLIP_LAYER = {v: k for k, v in ldm._OPEN_CLIP_LAYER.items()}

#: (prefix, OpenCLIP layout) per text encoder slot, by family; the refiner has no first encoder
TEXT_PREFIXES = {"sd1": (("cond_stage_model.transformer.", False),),
                 "sd2": (("cond_stage_model.model.", True),),
                 "sdxl": (("conditioner.embedders.0.transformer.", False), ("conditioner.embedders.1.model.", True)),
                 "sdxl-refiner": (None, ("conditioner.embedders.0.model.", True))}


def _resnet(prefix: str, rest: list[str], table: Mapping[str, str]) -> str:
    return ".".join([prefix, table[rest[0]], *rest[1:]])


def _unet_key(name: str, config: Mapping) -> str:
    for new, old in _UNET_TOP.items():
        if name.startswith(new + "."):
            return old + name[len(new):]
    p = name.split(".")
    if p[0] == "mid_block":
        if p[1] == "resnets":
            return _resnet(f"middle_block.{2 * int(p[2])}", p[3:], _RESNET)
        return ".".join(["middle_block.1", *p[3:]])
    n = config["layers_per_block"] + 1
    b = int(p[1])
    if p[0] == "down_blocks":
        first = 1 + b * n
        if p[2] == "downsamplers":
            return f"input_blocks.{first + n - 1}.0.op.{p[-1]}"
        j = int(p[3])
        return (_resnet(f"input_blocks.{first + j}.0", p[4:], _RESNET) if p[2] == "resnets"
                else ".".join([f"input_blocks.{first + j}.1", *p[4:]]))
    first = b * n
    if p[2] == "upsamplers":  # after the attention where the block has one
        slot = 2 if config["up_block_types"][b].startswith("CrossAttn") else 1
        return ".".join([f"output_blocks.{first + n - 1}.{slot}.conv", *p[5:]])
    j = int(p[3])
    return (_resnet(f"output_blocks.{first + j}.0", p[4:], _RESNET) if p[2] == "resnets"
            else ".".join([f"output_blocks.{first + j}.1", *p[4:]]))


def original_unet_paths(paths: Iterable[str], config: Mapping) -> dict[str, str]:
    """Diffusers UNet module paths -> the original (sgm) ones (``down_blocks.1.attentions.0.proj_in``
    -> ``input_blocks.4.1.proj_in``): kohya's SDXL UNet has the original layout, so kohya's SDXL
    LoRA names are these."""
    return {p: _unet_key(p + ".weight", config).removesuffix(".weight") for p in paths}


def _vae_item(name: str, value: Tensor, levels: int) -> tuple[str, Tensor]:
    p = name.split(".")
    if p[0] in ("quant_conv", "post_quant_conv") or p[1] in ("conv_in", "conv_out"):
        return name, value
    side = p[0]
    if p[1] == "conv_norm_out":
        return ".".join([side, "norm_out", *p[2:]]), value
    if p[1] == "mid_block":
        if p[2] == "resnets":
            return _resnet(f"{side}.mid.block_{int(p[3]) + 1}", p[4:], _VAE_RESNET), value
        head = p[4] + (".0" if p[4] == "to_out" else "")
        if head != "group_norm" and p[-1] == "weight" and value.ndim == 2:
            value = value[:, :, None, None]  # the original's attention uses 1x1 convs
        return f"{side}.mid.attn_1.{_VAE_ATTN[head]}.{p[-1]}", value
    i = int(p[2])
    level = f"{side}.down.{i}" if p[1] == "down_blocks" else f"{side}.up.{levels - 1 - i}"
    if p[3] in ("downsamplers", "upsamplers"):
        return ".".join([level, p[3][:-2], "conv", *p[6:]]), value
    return _resnet(f"{level}.block.{p[4]}", p[5:], _VAE_RESNET), value


def _clip(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {f"{prefix}text_model.{k.removeprefix('text_model.')}": v for k, v in state.items()}


def _open_clip(state: Mapping[str, Tensor], prefix: str, extra_layer: bool) -> dict[str, Tensor]:
    sd = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {}
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    for name, value in sd.items():
        if name in _OPEN_CLIP_TOP:
            out[prefix + _OPEN_CLIP_TOP[name]] = value
        elif name == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif not name.startswith("encoder.layers."):
            raise KeyError(name)
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[dst + f"attn.in_proj_{leaf}"] = torch.cat([sd[f"{src}self_attn.{x}_proj.{leaf}"] for x in "qkv"])
            for new, old in _OPEN_CLIP_LAYER.items():
                out[f"{dst}{old}.{leaf}"] = sd[f"{src}{new}.{leaf}"]
    if extra_layer:
        last, extra = f"{prefix}transformer.resblocks.{layers[-1]}.", f"{prefix}transformer.resblocks.{len(layers)}."
        out.update({k.replace(last, extra): torch.zeros_like(v) for k, v in list(out.items()) if k.startswith(last)})
    return out


def original_state(unet: Mapping[str, Tensor], unet_config: Mapping, vae: Mapping[str, Tensor],
                   text: Sequence[Optional[Mapping[str, Tensor]]], family: str) -> dict[str, Tensor]:
    """One original-layout state dict from diffusers-named state dicts: the UNet (with its
    config), the VAE and the text encoders in folder order (``None`` for a refiner's missing
    first one). ``family``: sd1, sd2, sdxl or sdxl-refiner."""
    if family not in TEXT_PREFIXES:
        raise ValueError(f"family: expected one of {sorted(TEXT_PREFIXES)}, got {family!r}")
    slots = TEXT_PREFIXES[family]
    if len(text) != len(slots) or any((t is None) != (s is None) for t, s in zip(text, slots)):
        raise ValueError(f"text: a {family} model has {sum(s is not None for s in slots)} text encoder(s) in "
                         f"{len(slots)} slot(s); got {[t is not None for t in text]}")
    names = {ldm.UNET_PREFIX + _unet_key(k, unet_config): k for k in unet}
    out = {key: unet[k] for key, k in names.items()}
    read = {s.key: name for name, s in ldm.unet_sources(out, unet_config["layers_per_block"]).items()}
    levels = 1 + max(int(k.split(".")[2]) for k in vae if k.startswith("decoder.up_blocks."))
    vae_names = {}
    for k, v in vae.items():
        name, out[ldm.VAE_PREFIX + name] = _vae_item(k, v, levels)
        vae_names[ldm.VAE_PREFIX + name] = k
    read.update({s.key: name for name, s in ldm.vae_sources(out).items()})
    for key, k in {**names, **vae_names}.items():  # the loader's reading of each written name
        if read.get(key) != k or len(names) != len(unet) or len(vae_names) != len(vae):
            raise ValueError(f"{k!r}: written as {key!r}, which the loader reads as {read.get(key)!r}")
    for state, slot in zip(text, slots):
        if state is not None:
            prefix, open_clip = slot
            out.update(_open_clip(state, prefix, family == "sd2") if open_clip else _clip(state, prefix))
    return {k: v.contiguous() for k, v in out.items()}

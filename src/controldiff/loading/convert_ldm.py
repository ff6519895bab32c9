"""Original (LDM / sgm) checkpoint layout -> diffusers names, and what tensor shapes tell.

Ported from diffusers' ``loaders/single_file_utils.py`` (the SD1/SD2/SDXL parts), written
as per-key renames. Each converter returns ``{diffusers_name: Source}``: the original key
and a transform, so tensors are only touched when loaded and errors can name the original
key. Nothing here imports diffusers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

from torch import Tensor

__all__ = ["Source", "UNET_PREFIX", "VAE_PREFIX", "unet_sources", "vae_sources", "clip_sources",
           "open_clip_sources", "infer_unet_config", "infer_vae_config", "infer_clip_config", "sub_state"]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


@dataclass(frozen=True)
class Source:
    """Where a diffusers tensor comes from: ``fn(state[key])``."""

    key: str
    fn: Optional[Callable[[Tensor], Tensor]] = None

    def get(self, state: Mapping[str, Tensor]) -> Tensor:
        v = state[self.key]
        return self.fn(v) if self.fn is not None else v


def sub_state(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The tensors under ``prefix``, with the prefix removed."""
    n = len(prefix)
    return {k[n:]: v for k, v in state.items() if k.startswith(prefix)}


def _block_indices(keys, name: str) -> list[int]:
    return sorted({int(k.split(".")[1]) for k in keys if k.startswith(name + ".")})


# ----------------------------------------------------------------------------- UNet

_UNET_TOP = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",  # SDXL's "text_time" added embedding
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
_UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


def _resnet(new_prefix: str, rest: list[str], table: Mapping[str, str]) -> Optional[str]:
    for n in (2, 1):
        head = ".".join(rest[:n])
        if head in table:
            return ".".join([new_prefix, table[head], *rest[n:]])
    return None


def _unet_name(key: str, layers_per_block: int) -> Optional[str]:
    """One LDM UNet key (without ``model.diffusion_model.``) -> its diffusers name, or None."""
    for old, new in _UNET_TOP.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    parts = key.split(".")
    if parts[0] == "middle_block" and len(parts) >= 3:  # resnet, attention, resnet
        if parts[1] in ("0", "2"):
            return _resnet(f"mid_block.resnets.{int(parts[1]) // 2}", parts[2:], _UNET_RESNET)
        return ".".join(["mid_block.attentions.0", *parts[2:]]) if parts[1] == "1" else None
    if len(parts) < 4 or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    i, j, rest = int(parts[1]), int(parts[2]), parts[3:]
    n = layers_per_block + 1
    if parts[0] == "input_blocks" and i > 0:
        block, layer = divmod(i - 1, n)
        if layer == layers_per_block:  # the downsampler closing a block
            return f"down_blocks.{block}.downsamplers.0.conv.{rest[-1]}" if j == 0 and rest[0] == "op" else None
        if j == 0:
            return _resnet(f"down_blocks.{block}.resnets.{layer}", rest, _UNET_RESNET)
        if j == 1:
            return ".".join([f"down_blocks.{block}.attentions.{layer}", *rest])
    elif parts[0] == "output_blocks":
        block, layer = divmod(i, n)
        if j == 0:
            return _resnet(f"up_blocks.{block}.resnets.{layer}", rest, _UNET_RESNET)
        if rest[0] == "conv" and j in (1, 2):  # upsampler: .1 without attention, .2 after it
            return ".".join([f"up_blocks.{block}.upsamplers.0.conv", *rest[1:]])
        if j == 1:
            return ".".join([f"up_blocks.{block}.attentions.{layer}", *rest])
    return None


def unet_sources(state: Mapping[str, Tensor], layers_per_block: int) -> dict[str, Source]:
    """Diffusers UNet names for every ``model.diffusion_model.*`` tensor. Raises on a key
    that has no diffusers counterpart (naming it)."""
    out: dict[str, Source] = {}
    for key in state:
        if not key.startswith(UNET_PREFIX):
            continue
        short = key[len(UNET_PREFIX):]
        name = _unet_name(short, layers_per_block)
        if name is None:
            raise KeyError(key)
        out[name] = Source(key)
    return out


def infer_unet_config(unet: Mapping[str, Tensor]) -> dict:
    """What the UNet tensors (keys without prefix) tell of its diffusers config."""
    n_in = len(_block_indices(unet, "input_blocks"))
    n_out = len(_block_indices(unet, "output_blocks"))
    downsamplers = sum(1 for k in unet if re.fullmatch(r"input_blocks\.\d+\.0\.op\.weight", k))
    n_blocks = downsamplers + 1
    if n_out % n_blocks or n_in != n_out:
        raise ValueError(f"{n_in} input and {n_out} output blocks do not form a UNet of {n_blocks} levels")
    lpb = n_out // n_blocks - 1
    channels, down_types, up_types, depth = [], [], [], []
    for b in range(n_blocks):
        first = 1 + b * (lpb + 1)
        channels.append(int(unet[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0]))
        attn = f"input_blocks.{first}.1.proj_in.weight" in unet
        down_types.append("CrossAttnDownBlock2D" if attn else "DownBlock2D")
        depth.append(len({k.split(".")[4] for k in unet if k.startswith(f"input_blocks.{first}.1.transformer_blocks.")})
                     if attn else 1)
        up_first = b * (lpb + 1)
        up_types.append("CrossAttnUpBlock2D" if f"output_blocks.{up_first}.1.proj_in.weight" in unet else "UpBlock2D")
    cross = [v for k, v in unet.items() if k.endswith("attn2.to_k.weight")]
    proj_in = [v for k, v in unet.items() if k.endswith(".proj_in.weight")]
    cfg = {
        "in_channels": int(unet["input_blocks.0.0.weight"].shape[1]),
        "out_channels": int(unet["out.2.weight"].shape[0]),
        "block_out_channels": channels,
        "layers_per_block": lpb,
        "down_block_types": down_types,
        "up_block_types": up_types,
        "transformer_layers_per_block": depth,
    }
    if cross:
        cfg["cross_attention_dim"] = int(cross[0].shape[1])
    if proj_in:
        cfg["use_linear_projection"] = proj_in[0].ndim == 2
    if "label_emb.0.0.weight" in unet:
        cfg["projection_class_embeddings_input_dim"] = int(unet["label_emb.0.0.weight"].shape[1])
    return cfg


# ----------------------------------------------------------------------------- VAE

_VAE_TOP = {"norm_out": "conv_norm_out"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _conv_to_linear(t: Tensor) -> Tensor:
    """The LDM VAE attention uses 1x1 convs; diffusers uses linear layers."""
    return t.reshape(t.shape[0], t.shape[1]) if t.ndim > 2 else t


def _vae_name(key: str, n_up: int) -> Optional[tuple[str, bool]]:
    """LDM VAE key (without prefix) -> (diffusers name, is a conv-attention weight)."""
    parts = key.split(".")
    side, rest = parts[0], parts[1:]
    if side in ("quant_conv", "post_quant_conv"):
        return key, False
    if side not in ("encoder", "decoder") or not rest:
        return None
    if rest[0] in ("conv_in", "conv_out"):
        return key, False
    if rest[0] in _VAE_TOP:
        return ".".join([side, _VAE_TOP[rest[0]], *rest[1:]]), False
    if rest[0] == "mid" and len(rest) >= 3:
        if rest[1] in ("block_1", "block_2"):
            r = _resnet(f"{side}.mid_block.resnets.{int(rest[1][-1]) - 1}", rest[2:], _VAE_RESNET)
            return (r, False) if r else None
        if rest[1] == "attn_1" and rest[2] in _VAE_ATTN:
            return ".".join([side, "mid_block.attentions.0", _VAE_ATTN[rest[2]], *rest[3:]]), rest[2] != "norm"
        return None
    if rest[0] in ("down", "up") and len(rest) >= 4 and rest[1].isdigit():
        i = int(rest[1])
        level = f"{side}.down_blocks.{i}" if rest[0] == "down" else f"{side}.up_blocks.{n_up - 1 - i}"
        if rest[2] == "block" and rest[3].isdigit():
            r = _resnet(f"{level}.resnets.{rest[3]}", rest[4:], _VAE_RESNET)
            return (r, False) if r else None
        if rest[2] in ("downsample", "upsample") and rest[3] == "conv":
            kind = "downsamplers" if rest[2] == "downsample" else "upsamplers"
            return ".".join([level, kind, "0.conv", *rest[4:]]), False
    return None


def vae_sources(state: Mapping[str, Tensor]) -> dict[str, Source]:
    """Diffusers VAE names for ``first_stage_model.*`` (``loss.*`` training leftovers skipped)."""
    vae = sub_state(state, VAE_PREFIX)
    n_up = len(_block_indices([k[len("decoder."):] for k in vae if k.startswith("decoder.up.")], "up"))
    out: dict[str, Source] = {}
    for short in vae:
        if short.startswith("loss."):
            continue
        hit = _vae_name(short, n_up)
        if hit is None:
            raise KeyError(VAE_PREFIX + short)
        name, conv_attn = hit
        out[name] = Source(VAE_PREFIX + short, _conv_to_linear if conv_attn and name.endswith("weight") else None)
    return out


def infer_vae_config(vae: Mapping[str, Tensor]) -> dict:
    """What the VAE tensors (keys without prefix) tell of its diffusers config."""
    levels = _block_indices([k[len("encoder."):] for k in vae if k.startswith("encoder.down.")], "down")
    channels = [int(vae[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) for i in levels]
    lpb = len({k.split(".")[4] for k in vae if k.startswith("encoder.down.0.block.")})
    return {
        "in_channels": int(vae["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(vae["decoder.conv_out.weight"].shape[0]),
        "latent_channels": int(vae["decoder.conv_in.weight"].shape[1]),
        "block_out_channels": channels,
        "layers_per_block": lpb,
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
    }


# ----------------------------------------------------------------------------- text encoders

#: tensors of original text encoders that transformers' CLIP text models do not have
CLIP_EXTRAS = re.compile(r"(^|\.)(position_ids|logit_scale|attn_mask)$|^visual\.")


def clip_sources(state: Mapping[str, Tensor], prefix: str) -> dict[str, Source]:
    """OpenAI CLIP as saved by transformers (SD1's ``cond_stage_model.transformer.``, SDXL's
    ``conditioner.embedders.0.transformer.``): already diffusers names, minus the prefix and
    the ``text_model.`` level (added back by the loader where the model has it)."""
    out = {}
    for key in state:
        if key.startswith(prefix):
            name = key[len(prefix):]
            if CLIP_EXTRAS.search(name):
                continue
            out[name.removeprefix("text_model.")] = Source(key)
    return out


_OPEN_CLIP_TOP = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
_OPEN_CLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                    "attn.out_proj": "self_attn.out_proj"}


def _chunk(i: int) -> Callable[[Tensor], Tensor]:
    return lambda t: t.chunk(3, dim=0)[i].contiguous()


def _transpose(t: Tensor) -> Tensor:
    return t.T.contiguous()


def open_clip_sources(state: Mapping[str, Tensor], prefix: str, num_layers: int,
                      with_projection: bool) -> dict[str, Source]:
    """OpenCLIP (SD2's ``cond_stage_model.model.``, SDXL's ``conditioner.embedders.1.model.``):
    fused ``in_proj`` split into q/k/v, ``text_projection`` transposed into a linear weight.
    Layers from ``num_layers`` on are skipped: SD2 uses the penultimate layer, so diffusers'
    SD2 text encoder has 23 of the file's 24."""
    out: dict[str, Source] = {}
    for key in state:
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[name]] = Source(key)
        elif name == "text_projection":
            if with_projection:
                out["text_projection.weight"] = Source(key, _transpose)
        elif name.startswith("transformer.resblocks."):
            p = name.split(".")
            i, rest = int(p[2]), ".".join(p[3:])
            if i >= num_layers:
                continue
            layer = f"encoder.layers.{i}"
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                leaf = rest.rsplit("_", 1)[1]
                for n, qkv in enumerate("qkv"):
                    out[f"{layer}.self_attn.{qkv}_proj.{leaf}"] = Source(key, _chunk(n))
                continue
            head, _, leaf = rest.rpartition(".")
            if head not in _OPEN_CLIP_LAYER:
                raise KeyError(key)
            out[f"{layer}.{_OPEN_CLIP_LAYER[head]}.{leaf}"] = Source(key)
        elif not CLIP_EXTRAS.search(name):
            raise KeyError(key)
    return out


def infer_clip_config(state: Mapping[str, Tensor], prefix: str, open_clip: bool) -> dict:
    """What a text encoder's tensors tell of its ``CLIPTextConfig`` (layer count: every
    layer in the file; heads are not in the shapes)."""
    sub = sub_state(state, prefix)
    if open_clip:
        tok, pos = sub["token_embedding.weight"], sub["positional_embedding"]
        layers = _block_indices([k[len("transformer."):] for k in sub if k.startswith("transformer.resblocks.")],
                                "resblocks")
        fc1 = sub["transformer.resblocks.0.mlp.c_fc.weight"]
        proj = sub.get("text_projection")
        cfg = {"projection_dim": int(proj.shape[1])} if proj is not None else {}
    else:
        sub = {k.removeprefix("text_model."): v for k, v in sub.items()}
        tok, pos = sub["embeddings.token_embedding.weight"], sub["embeddings.position_embedding.weight"]
        layers = _block_indices([k[len("encoder."):] for k in sub if k.startswith("encoder.layers.")], "layers")
        fc1 = sub["encoder.layers.0.mlp.fc1.weight"]
        proj = sub.get("text_projection.weight")
        cfg = {"projection_dim": int(proj.shape[0])} if proj is not None else {}
    return {**cfg, "vocab_size": int(tok.shape[0]), "hidden_size": int(tok.shape[1]),
            "max_position_embeddings": int(pos.shape[0]), "num_hidden_layers": len(layers),
            "intermediate_size": int(fc1.shape[0])}

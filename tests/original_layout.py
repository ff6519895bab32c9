"""Tiny diffusers folders written back in the original LDM/sgm single-file layout.

An inverse converter written independently of the library's (diffusers names -> original
names), with the extras real files carry (EMA/schedule buffers, position ids, SD2's unused
last OpenCLIP layer and projection). Used by the single-file and ``info`` tests.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
             "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def unet_key(k: str, cfg: dict) -> str:
    n = cfg["layers_per_block"] + 1
    for new, old in _UNET_TOP.items():
        if k.startswith(new + "."):
            return old + k[len(new):]
    p = k.split(".")
    if p[0] == "mid_block":
        if p[1] == "resnets":
            return ".".join([f"middle_block.{2 * int(p[2])}", _RESNET[p[3]], *p[4:]])
        return ".".join(["middle_block.1", *p[3:]])
    b = int(p[1])
    if p[0] == "down_blocks":
        first = 1 + b * n
        if p[2] == "downsamplers":
            return f"input_blocks.{first + n - 1}.0.op.{p[-1]}"
        j = int(p[3])
        if p[2] == "resnets":
            return ".".join([f"input_blocks.{first + j}.0", _RESNET[p[4]], *p[5:]])
        return ".".join([f"input_blocks.{first + j}.1", *p[4:]])
    first = b * n
    if p[2] == "upsamplers":
        has_attn = cfg["up_block_types"][b].startswith("CrossAttn")
        return f"output_blocks.{first + n - 1}.{2 if has_attn else 1}.conv.{p[-1]}"
    j = int(p[3])
    if p[2] == "resnets":
        return ".".join([f"output_blocks.{first + j}.0", _RESNET[p[4]], *p[5:]])
    return ".".join([f"output_blocks.{first + j}.1", *p[4:]])


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def vae_item(k: str, v: torch.Tensor, cfg: dict):
    n = len(cfg["block_out_channels"])
    p = k.split(".")
    if p[0] in ("quant_conv", "post_quant_conv") or p[1] in ("conv_in", "conv_out"):
        return k, v
    side = p[0]
    if p[1] == "conv_norm_out":
        return f"{side}.norm_out.{p[2]}", v
    if p[1] == "mid_block":
        if p[2] == "resnets":
            return ".".join([f"{side}.mid.block_{int(p[3]) + 1}", p[4].replace("conv_shortcut", "nin_shortcut"), p[5]]), v
        name = _VAE_ATTN[p[4]]
        if name != "norm" and p[-1] == "weight":
            v = v[:, :, None, None]  # the original uses 1x1 convs
        return f"{side}.mid.attn_1.{name}.{p[-1]}", v
    i = int(p[2])
    level = f"{side}.down.{i}" if p[1] == "down_blocks" else f"{side}.up.{n - 1 - i}"
    if p[3] in ("downsamplers", "upsamplers"):
        return f"{level}.{p[3][:-2]}.conv.{p[-1]}", v
    return ".".join([f"{level}.block.{p[4]}", p[5].replace("conv_shortcut", "nin_shortcut"), p[6]]), v


_OPEN_CLIP = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
              "self_attn.out_proj": "attn.out_proj"}


def _open_clip(sd: dict, prefix: str, extra_layer: bool) -> dict:
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    out = {prefix + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
           prefix + "positional_embedding": sd["embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": sd["final_layer_norm.weight"],
           prefix + "ln_final.bias": sd["final_layer_norm.bias"],
           prefix + "logit_scale": torch.tensor(4.6)}
    hidden = sd["embeddings.token_embedding.weight"].shape[1]
    out[prefix + "text_projection"] = (sd["text_projection.weight"].T.contiguous() if "text_projection.weight" in sd
                                       else torch.randn(hidden, hidden))  # SD2 files carry one, unused
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[dst + f"attn.in_proj_{leaf}"] = torch.cat([sd[src + f"self_attn.{x}_proj.{leaf}"] for x in "qkv"])
            for new, old in _OPEN_CLIP.items():
                out[dst + f"{old}.{leaf}"] = sd[src + f"{new}.{leaf}"]
    if extra_layer:  # SD2 files have a 24th layer the model does not use
        last = f"{prefix}transformer.resblocks.{layers[-1]}."
        out.update({k.replace(last, f"{prefix}transformer.resblocks.{len(layers)}."): torch.randn_like(v)
                    for k, v in list(out.items()) if k.startswith(last)})
    return out


def _clip(sd: dict, prefix: str) -> dict:
    out = {prefix + "text_model." + k.removeprefix("text_model."): v for k, v in sd.items()}
    out[prefix + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return out


def to_original(folder: Path) -> dict:
    """The tiny diffusers folder as an original-layout state dict."""
    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    out = {"model.diffusion_model." + unet_key(k, unet_cfg): v
           for k, v in load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors")).items()}
    for k, v in load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors")).items():
        name, v = vae_item(k, v, vae_cfg)
        out["first_stage_model." + name] = v
    te = lambda s: load_file(str(folder / s / "model.safetensors"))  # noqa: E731
    if unet_cfg.get("addition_embed_type") == "text_time":
        if (folder / "text_encoder").is_dir():
            out.update(_clip(te("text_encoder"), "conditioner.embedders.0.transformer."))
            out.update(_open_clip(te("text_encoder_2"), "conditioner.embedders.1.model.", False))
        else:
            out.update(_open_clip(te("text_encoder_2"), "conditioner.embedders.0.model.", False))
    else:
        act = json.loads((folder / "text_encoder" / "config.json").read_text())["hidden_act"]
        if act == "gelu":
            out.update(_open_clip(te("text_encoder"), "cond_stage_model.model.", True))
        else:
            out.update(_clip(te("text_encoder"), "cond_stage_model.transformer."))
    out["alphas_cumprod"] = torch.linspace(1, 0, 1000)  # schedule buffers real files carry
    out["model_ema.decay"] = torch.tensor(0.9999)
    return {k: v.contiguous() for k, v in out.items()}

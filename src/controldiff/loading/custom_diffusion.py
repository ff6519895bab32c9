"""Custom Diffusion weights (Kumari et al. 2023): Pipeline methods.

diffusers' format: ``pytorch_custom_diffusion_weights.safetensors`` (or ``.bin``) holds, per
cross-attention site, ``SITE.processor.to_k_custom_diffusion.weight`` and ``..to_v..`` (with
``--freeze_model crossattn`` also ``to_q_custom_diffusion.weight`` and
``to_out_custom_diffusion.0.weight``/``.bias``); the modifier tokens are textual inversion
files ``<new1>.safetensors`` (or ``.bin``) beside it.

diffusers' ``CustomDiffusionAttnProcessor`` computes the site's attention with these
projections in place of the base ones; in a forward pass that is exactly the base attention
with replaced weights, so loading replaces the weights. Attention processors (PAG, SAG,
Attend-and-Excite...) and LoRA adapters (which add onto the base layer) keep working.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from .weights import load_state_dict

__all__ = ["CustomDiffusionMixin", "WEIGHT_NAMES", "read_custom_diffusion"]

WEIGHT_NAMES = ("pytorch_custom_diffusion_weights.safetensors", "pytorch_custom_diffusion_weights.bin")
#: the processor's parameter -> the attention module's
_TARGETS = {"to_k_custom_diffusion.weight": ("to_k", "weight"), "to_v_custom_diffusion.weight": ("to_v", "weight"),
            "to_q_custom_diffusion.weight": ("to_q", "weight"),
            "to_out_custom_diffusion.0.weight": ("to_out.0", "weight"),
            "to_out_custom_diffusion.0.bias": ("to_out.0", "bias")}


def _base(module: nn.Module) -> nn.Module:
    """The Linear under a LoRA layer (its adapters add onto it)."""
    return getattr(module, "lora_base", module)


def read_custom_diffusion(path, weight_name: Optional[str] = None) -> tuple[dict[str, dict[str, Tensor]], list[Path], Path]:
    """``({site: {"to_k.weight": tensor, ...}}, modifier token files, weights file)`` from a
    folder (``weight_name`` or the diffusers names) or a weights file."""
    path = Path(path)
    if path.is_dir():
        names = (weight_name,) if weight_name is not None else WEIGHT_NAMES
        found = [path / n for n in names if (path / n).is_file()]
        if not found:
            raise FileNotFoundError(f"{path}: no {' or '.join(names)} in the folder")
        file, folder = found[0], path
    else:
        if weight_name is not None:
            raise ValueError(f"weight_name: only for a folder; {path} is a file")
        file, folder = path, path.parent
    state = load_state_dict(file)
    sites: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        site, sep, param = key.partition(".processor.")
        if not sep or param not in _TARGETS:
            raise ValueError(f"{file}: {key!r} is not a Custom Diffusion tensor (expected SITE.processor."
                             f"{{{', '.join(_TARGETS)}}}); a LoRA file loads with pipe.load_lora")
        module, what = _TARGETS[param]
        sites.setdefault(site, {})[f"{module}.{what}"] = value
    if not sites:
        raise ValueError(f"{file}: no Custom Diffusion tensors in the file")
    for site, params in sites.items():
        if "to_k.weight" not in params or "to_v.weight" not in params:
            raise ValueError(f"{file}: site {site!r} has no to_k/to_v_custom_diffusion.weight")
    # modifier tokens: diffusers' script writes one '<token>.safetensors' (or .bin) per token
    tokens = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.stem.startswith("<") and f.stem.endswith(">") and f.suffix in (".safetensors", ".bin"):
            if f.stem not in tokens or f.suffix == ".safetensors":
                tokens[f.stem] = f
    return sites, list(tokens.values()), file


class CustomDiffusionMixin:
    """``load_custom_diffusion`` / ``unload_custom_diffusion`` for :class:`~controldiff.Pipeline`."""

    @torch.no_grad()
    def load_custom_diffusion(self, path, weight_name: Optional[str] = None) -> list[str]:
        """Load diffusers' Custom Diffusion output (a folder, or the weights file; modifier
        token files ``<tok>.safetensors`` beside it are loaded as textual inversions); return
        the modifier tokens added. The weights replace the base cross-attention projections
        (``unload_custom_diffusion`` restores them)."""
        sites, token_files, file = read_custom_diffusion(path, weight_name)
        unet_sites = self.unet.attention_sites()
        planned = []
        for site, params in sites.items():
            attn = unet_sites.get(site)
            if attn is None:
                raise ValueError(f"{file}: {site!r} is not an attention site of this UNet (a file for another model?)")
            for name, value in params.items():
                module_path, _, what = name.rpartition(".")
                module = _base(attn.get_submodule(module_path))
                if getattr(attn.get_submodule(module_path), "fused", None):
                    raise ValueError(f"{file}: {site}.{module_path} has a fused LoRA; unfuse_lora() first")
                target = getattr(module, what)
                if target is None or tuple(target.shape) != tuple(value.shape):
                    have = None if target is None else tuple(target.shape)
                    raise ValueError(f"{file}: {site}.processor {name} has shape {tuple(value.shape)}, the UNet's "
                                     f"{module_path}.{what} {have}; the file is for another model")
                planned.append((f"{site}.{name}", target, value))
        tokens = [t for f in token_files for t in self.load_textual_inversion(str(f))]  # may refuse: first
        self.__dict__.setdefault("_custom_diffusion_tokens", []).extend(tokens)
        originals = self.__dict__.setdefault("_custom_diffusion_originals", {})
        for key, target, value in planned:
            if key not in originals:
                originals[key] = (target, target.detach().clone())
            target.copy_(value.to(target.device, target.dtype))
        return tokens

    @torch.no_grad()
    def unload_custom_diffusion(self) -> None:
        """Put the base projections back and unload the modifier tokens."""
        for target, original in self.__dict__.pop("_custom_diffusion_originals", {}).values():
            target.copy_(original)
        tokens = self.__dict__.pop("_custom_diffusion_tokens", [])
        if tokens:
            self.unload_textual_inversion(tokens)

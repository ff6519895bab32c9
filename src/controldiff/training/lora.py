"""LoRA training: trainable low-rank adapters on the attention projections, saved in kohya
and diffusers/peft formats (kohya's with sd-scripts' names: for SDXL the UNet's original
``input_blocks``/``middle_block``/``output_blocks`` layout, for SD1/SD2 diffusers').

The adapters are the runtime's own :class:`~controldiff.loading.lora.LoraLayer` (the layer
``pipe.load_lora`` builds), made trainable, so what is trained is exactly what loads, and
the files are written with the names ``loading/lora.py`` reads. Targets, init and scaling
are those of diffusers' ``train_dreambooth_lora.py`` with peft: ``init_lora_weights=
"gaussian"`` (down ~ N(0, 1/rank**2), i.e. std 1/rank; up = 0, so training starts at the
base model), output ``up(down(x)) * alpha / rank``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from ..loading.lora import LoraLayer
from ..loading.write_ldm import original_unet_paths

__all__ = ["LoRA", "UNET_TARGETS", "TEXT_TARGETS"]

UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
ADAPTER = "trained"
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
#: diffusers registers the UNet's up blocks before its mid block; peft initialises adapters in
#: module order, so ours follow diffusers' order and a seed gives the reference's init
_UNET_ORDER = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}


def _matches(path: str, targets: Sequence[str]) -> bool:
    return any(path == t or path.endswith("." + t) for t in targets)


class LoRA:
    """The LoRA method: what is trainable (adapters of ``rank`` on ``unet_targets``, and on
    ``text_targets`` of every text encoder with ``train_text_encoder``) and what is saved."""

    name = "lora"

    def __init__(self, rank: int = 4, alpha: Optional[float] = None, train_text_encoder: bool = False,
                 unet_targets: Sequence[str] = UNET_TARGETS, text_targets: Sequence[str] = TEXT_TARGETS):
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank: expected a positive integer, got {rank!r}")
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0
                                  or alpha == float("inf")):
            raise ValueError(f"alpha: expected a positive number (default: the rank), got {alpha!r}")
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.train_text_encoder = bool(train_text_encoder)
        self.unet_targets = tuple(unet_targets)
        self.text_targets = tuple(text_targets)
        self.layers: dict[str, dict[str, LoraLayer]] = {}  # component -> module path -> layer
        self.kohya_unet: dict[str, str] = {}  # UNet module path -> kohya's (SDXL: the original one)

    def describe(self) -> dict:
        """What a checkpoint must agree on to be resumed with this method."""
        return {"method": self.name, "rank": self.rank, "alpha": self.alpha,
                "train_text_encoder": self.train_text_encoder, "unet_targets": list(self.unet_targets),
                "text_targets": list(self.text_targets)}

    # ------------------------------------------------------------------ what is trainable
    def attach(self, roots: dict[str, nn.Module]) -> list[nn.Parameter]:
        """Wrap the targeted Linear layers of ``roots`` ({"unet": ..., "text_encoder": ...,
        "text_encoder_2": ...}) with fresh adapters; return the trainable parameters."""
        params = []
        for component, root in roots.items():
            if root is None or (component != "unet" and not self.train_text_encoder):
                continue
            targets = self.unet_targets if component == "unet" else self.text_targets
            paths = [n for n, m in root.named_modules() if isinstance(m, nn.Linear) and _matches(n, targets)]
            if component == "unet":
                paths.sort(key=lambda n: _UNET_ORDER.get(n.split(".")[0], -1))  # stable: module order within
            if not paths:
                which = "unet_targets (--lora-layers)" if component == "unet" else "text_targets (--lora-text-layers)"
                raise ValueError(f"{which}: no Linear layer of the {component} matches {list(targets)}")
            self.layers[component] = {}
            for path in paths:
                params += self._wrap(root, path, component)
            if component == "unet":  # kohya's SDXL UNet has the original (sgm) layout, its SD1/SD2 one diffusers'
                sdxl = root.config.get("addition_embed_type") == "text_time"
                self.kohya_unet = original_unet_paths(paths, root.config) if sdxl else {p: p for p in paths}
        return params

    def _wrap(self, root: nn.Module, path: str, component: str) -> list[nn.Parameter]:
        parent_path, _, leaf = path.rpartition(".")
        parent = root.get_submodule(parent_path) if parent_path else root
        base = parent._modules[leaf]
        # built as peft builds them (nn.Linear's own init first, then the gaussian init) so
        # that the global RNG advances as in the reference scripts
        w = base.weight
        down = nn.Linear(base.in_features, self.rank, bias=False, device=w.device, dtype=w.dtype).weight.data
        up = nn.Linear(self.rank, base.out_features, bias=False, device=w.device, dtype=w.dtype).weight.data
        nn.init.normal_(down, std=1 / self.rank)
        nn.init.zeros_(up)
        layer = LoraLayer(base)
        layer.add(ADAPTER, down, up, self.alpha / self.rank, 1.0)
        parent._modules[leaf] = layer
        self.layers[component][path] = layer
        adapter = layer.lora_adapters[ADAPTER]
        adapter.requires_grad_(True)
        return [adapter.down, adapter.up]

    def detach(self, roots: dict[str, nn.Module]) -> None:
        """Put the original layers back (the adapters are dropped)."""
        for component, layers in self.layers.items():
            root = roots[component]
            for path, layer in layers.items():
                parent_path, _, leaf = path.rpartition(".")
                parent = root.get_submodule(parent_path) if parent_path else root
                parent._modules[leaf] = layer.lora_base
        self.layers, self.kohya_unet = {}, {}

    # ------------------------------------------------------------------ state (checkpoints)
    def _adapters(self):
        for component, layers in self.layers.items():
            for path, layer in layers.items():
                yield component, path, layer.lora_adapters[ADAPTER]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable tensors in the peft/diffusers naming (``unet.PATH.lora_A.weight``)."""
        out = {}
        for component, path, a in self._adapters():
            out[f"{component}.{path}.lora_A.weight"] = a.down.detach().clone().contiguous()
            out[f"{component}.{path}.lora_B.weight"] = a.up.detach().clone().contiguous()
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], source: str) -> None:
        mine = self.state_dict()
        if set(mine) != set(state) or any(mine[k].shape != state[k].shape for k in mine):
            missing = sorted(set(mine) - set(state))[:3]
            raise ValueError(f"resume: {source} holds other LoRA tensors than this run trains "
                             f"(e.g. missing {missing}); was it trained on another model or with other targets?")
        for component, path, a in self._adapters():
            a.down.copy_(state[f"{component}.{path}.lora_A.weight"])
            a.up.copy_(state[f"{component}.{path}.lora_B.weight"])

    # ------------------------------------------------------------------ what is saved
    def diffusers_state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """``pytorch_lora_weights.safetensors`` as diffusers' ``save_lora_weights`` writes it
        (``lora.down``/``lora.up`` in the UNet, ``lora_linear_layer`` in text encoders), with
        each component's rank and alpha in the ``lora_adapter_metadata`` diffusers reads."""
        out, meta = {}, {}
        for component, path, a in self._adapters():
            kind = "lora" if component == "unet" else "lora_linear_layer"
            out[f"{component}.{path}.{kind}.down.weight"] = a.down.detach().float().contiguous()
            out[f"{component}.{path}.{kind}.up.weight"] = a.up.detach().float().contiguous()
            targets = self.unet_targets if component == "unet" else self.text_targets
            meta.update({f"{component}.r": self.rank, f"{component}.lora_alpha": self.alpha,
                         f"{component}.target_modules": list(targets), f"{component}.init_lora_weights": "gaussian"})
        return out, {"format": "pt", "lora_adapter_metadata": json.dumps(meta, indent=2, sort_keys=True)}

    def kohya_state(self) -> dict[str, torch.Tensor]:
        """kohya's names: ``lora_unet_`` / ``lora_te_`` (SDXL ``lora_te1_`` / ``lora_te2_``)
        + the module path with underscores, ``.lora_down.weight`` / ``.lora_up.weight`` /
        ``.alpha``, as sd-scripts writes them: SDXL UNet paths are the original (sgm) ones
        (``input_blocks_4_1_...``, the module names of kohya's and A1111's SDXL UNet); text
        encoder paths keep kohya's ``text_model_`` level."""
        sdxl = "text_encoder_2" in self.layers
        prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if sdxl else "lora_te_",
                    "text_encoder_2": "lora_te2_"}
        out = {}
        for component, path, a in self._adapters():
            if component == "unet":
                path = self.kohya_unet[path]
            elif not path.startswith("text_model."):
                path = "text_model." + path  # transformers 5's CLIPTextModel has no text_model level
            name = prefixes[component] + path.replace(".", "_")
            out[f"{name}.lora_down.weight"] = a.down.detach().float().contiguous()
            out[f"{name}.lora_up.weight"] = a.up.detach().float().contiguous()
            out[f"{name}.alpha"] = torch.tensor(self.alpha)
        return out

    def save(self, output: Path, formats: Sequence[str], write) -> list[Path]:
        """Write the trained LoRA in ``formats`` ("kohya", "diffusers") under ``output``
        with ``write(path, tensors, metadata)`` (atomic); return the files."""
        files = []
        if "diffusers" in formats:
            tensors, meta = self.diffusers_state()
            files.append(write(output / DIFFUSERS_FILE, tensors, meta))
        if "kohya" in formats:
            meta = {"ss_network_dim": str(self.rank), "ss_network_alpha": str(self.alpha),
                    "ss_network_module": "networks.lora"}
            files.append(write(output / f"{output.resolve().name}.safetensors", self.kohya_state(), meta))
        return files

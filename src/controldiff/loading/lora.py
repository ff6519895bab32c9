"""LoRA loading (kohya and peft/diffusers formats): Pipeline methods.

A LoRA adds ``weight * scale * up(down(x))`` to chosen Linear/Conv2d layers. We wrap each
targeted layer of our UNet and of the transformers CLIP encoders in a :class:`LoraLayer`
(the original module is kept inside and put back on unload), so several LoRAs can be
mixed with separate weights, fused into the base weights and unfused exactly (the
original weights are kept as a copy while fused, never recovered by subtraction).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .weights import load_state_dict
from .write_ldm import original_unet_paths

__all__ = ["LoraLayer", "LoraMixin", "read_lora"]

_SUFFIXES = {  # peft / diffusers / kohya ways of naming the two matrices
    ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
    ".lora_down.weight": "down", ".lora_up.weight": "up",
    ".alpha": "alpha",
}
_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                   "lora_te2_": "text_encoder_2"}
_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


# ----------------------------------------------------------------------------- the layer


class _Adapter(nn.Module):
    def __init__(self, down: Tensor, up: Tensor, scale: float):
        super().__init__()
        self.down = nn.Parameter(down, requires_grad=False)
        self.up = nn.Parameter(up, requires_grad=False)
        self.scale = scale

    def delta(self) -> Tensor:
        """The weight update ``up @ down`` in the base layer's weight shape (float32)."""
        up, down = self.up.float(), self.down.float()
        if down.ndim == 2:
            return up @ down
        return torch.einsum("or,rikl->oikl", up.flatten(1), down)


class _Adapters(nn.Module):
    """Adapters by LoRA name. Names are file stems, which may hold dots (``detail_v1.0``) or be
    ``nn.Module`` attribute names (``eval``), both refused as ModuleDict keys: each adapter is
    registered under a key of its own, so it still moves with the layer (``.to()``)."""

    def __init__(self):
        super().__init__()
        self._keys: dict[str, str] = {}
        self._next = 0

    def __setitem__(self, name: str, adapter: _Adapter) -> None:
        if name not in self._keys:
            self._keys[name] = f"adapter{self._next}"
            self._next += 1
        self._modules[self._keys[name]] = adapter

    def __getitem__(self, name: str) -> _Adapter:
        return self._modules[self._keys[name]]

    def __delitem__(self, name: str) -> None:
        del self._modules[self._keys.pop(name)]

    def __contains__(self, name) -> bool:
        return name in self._keys

    def __iter__(self):
        return iter(list(self._keys))

    def __len__(self) -> int:
        return len(self._keys)

    def items(self):
        return [(n, self[n]) for n in self._keys]


class LoraLayer(nn.Module):
    """A Linear or Conv2d plus any number of named low-rank adapters."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.lora_base = base
        self.lora_adapters = _Adapters()
        self.lora_weights: dict[str, float] = {}
        self.fused: dict[str, float] = {}  # adapters currently added into base.weight
        self._original: Optional[Tensor] = None  # base.weight before fusing

    def add(self, name: str, down: Tensor, up: Tensor, scale: float, weight: float) -> None:
        w = self.lora_base.weight
        self.lora_adapters[name] = _Adapter(down.to(w.device, w.dtype), up.to(w.device, w.dtype), scale)
        self.lora_weights[name] = weight

    def _lora(self, a: _Adapter, x: Tensor) -> Tensor:
        if isinstance(self.lora_base, nn.Conv2d):
            b = self.lora_base
            return F.conv2d(F.conv2d(x, a.down, stride=b.stride, padding=b.padding, dilation=b.dilation), a.up)
        return F.linear(F.linear(x, a.down), a.up)

    def forward(self, x: Tensor) -> Tensor:
        out = self.lora_base(x)
        for name, a in self.lora_adapters.items():
            w = self.lora_weights[name]
            if name not in self.fused and w != 0:
                out = out + self._lora(a, x) * (w * a.scale)  # peft's order of operations
        return out

    @torch.no_grad()
    def fuse(self, names) -> None:
        """Add the named adapters (at their current weights) into the base weight."""
        self.unfuse()
        names = [n for n in names if n in self.lora_adapters]
        if not names:
            return
        weight = self.lora_base.weight
        self._original = weight.detach().clone()
        total = weight.float()
        for n in names:
            a = self.lora_adapters[n]
            total = total + a.delta() * (self.lora_weights[n] * a.scale)
        weight.copy_(total.to(weight.dtype))
        self.fused = {n: self.lora_weights[n] for n in names}

    @torch.no_grad()
    def unfuse(self) -> None:
        """Put the exact original weight back."""
        if self._original is not None:
            self.lora_base.weight.copy_(self._original)
        self._original = None
        self.fused = {}


# ----------------------------------------------------------------------------- reading files


def _metadata(path: Path) -> dict:
    """diffusers' ``lora_adapter_metadata`` (peft LoraConfig per component), if any."""
    if path.suffix.lower() != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    try:
        return json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return {}


def _split(key: str) -> tuple[str, str]:
    for suffix, part in _SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return key, ""


def read_lora(path, state: Optional[dict] = None) -> dict[tuple[str, str], dict]:
    """``{(component, module name): {"down", "up", "alpha"?}}`` from a LoRA file.

    Module names are diffusers paths (peft format) or flat kohya names (underscores).
    """
    path = Path(path)
    state = load_state_dict(path) if state is None else state
    out: dict[tuple[str, str], dict] = {}
    for key, tensor in state.items():
        kohya = next((p for p in _KOHYA_PREFIXES if key.startswith(p)), None)
        if kohya:
            component, rest = _KOHYA_PREFIXES[kohya], key[len(kohya):]
        else:
            rest = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
            component = next((c for c in _COMPONENTS if rest.startswith(c + ".")), None)
            if component is None:
                component = "unet"  # a bare peft UNet state dict, as diffusers assumes
            else:
                rest = rest[len(component) + 1:]
        module, part = _split(rest)
        if not part:
            what = ("a LyCORIS/LoHa/LoKr/DoRA tensor" if re.search(r"hada_|lokr_|dora|magnitude|\.diff", key)
                    else "not a LoRA down/up/alpha tensor")
            raise ValueError(f"{path}: tensor {key!r} is {what}; only plain LoRA (kohya, peft/diffusers) is supported")
        if not kohya:  # old diffusers attention-processor names
            module = re.sub(r"\.processor\.(to_[qkv])_lora$", r".\1", module)
            module = re.sub(r"\.processor\.to_out_lora$", r".to_out.0", module)
        entry = out.setdefault((component, module), {"key": key})
        entry[part] = tensor
    for (component, module), e in out.items():
        if "down" not in e or "up" not in e:
            missing = "up" if "down" in e else "down"
            raise ValueError(f"{path}: LoRA for {component} module {module!r} (tensor {e['key']!r}) has no "
                             f"{missing} matrix")
    return out


# ----------------------------------------------------------------------------- kohya names


def _targets(root: nn.Module, unet: bool) -> dict[str, str]:
    """Flat (underscore) name -> module path of every Linear/Conv2d, wrapped or not; a UNet's
    also by its original (sgm) path, which kohya's SDXL LoRAs use."""
    table = {}
    for name, m in root.named_modules():
        if ".lora_base" in name or ".lora_adapters" in name or name.startswith(("lora_base", "lora_adapters")):
            continue
        if isinstance(m, (nn.Linear, nn.Conv2d, LoraLayer)):
            table[name.replace(".", "_")] = name
    if unet:
        original = original_unet_paths(list(table.values()), root.config)
        table.update({o.replace(".", "_"): p for p, o in original.items()})
    return table


def _with_prefix_variants(name: str, sep: str) -> list[str]:
    """transformers 5's CLIPTextModel lacks the ``text_model`` level that
    CLIPTextModelWithProjection and transformers 4 have: try with and without it."""
    p = "text_model" + sep
    return [name, name[len(p):]] if name.startswith(p) else [name, p + name]


def _get(root: nn.Module, path: str) -> Optional[nn.Module]:
    m = root
    for part in path.split("."):
        m = m._modules.get(part)
        if m is None:
            return None
    return m


# ----------------------------------------------------------------------------- pipeline methods


class LoraMixin:
    """Mixed into :class:`controldiff.Pipeline`: load_lora, set_lora_weights, unload_lora,
    fuse_lora, unfuse_lora."""

    @property
    def loras(self) -> dict[str, float]:
        """Loaded LoRAs and their weights."""
        return {n: v["weight"] for n, v in self._lora_registry().items()}

    def _lora_registry(self) -> dict:
        return self.__dict__.setdefault("_loras", {})

    def _lora_roots(self) -> dict[str, nn.Module]:
        roots = {"unet": self.unet}
        names = ["text_encoder", "text_encoder_2"][-len(self.text_encoders):] if self.info.family == "sdxl" \
            else ["text_encoder"]
        roots.update(zip(names, self.text_encoders))
        return roots

    def _resolve(self, roots, tables, component: str, module: str, kohya: bool, path: Path,
                 key: str) -> tuple[str, nn.Module]:
        root = roots.get(component)
        if root is None:
            raise ValueError(f"{path}: tensor {key!r} is for {component}, which this {self.info.family} model "
                             f"does not have")
        if kohya:
            if component not in tables:  # built once per file: flat kohya name -> module path
                tables[component] = _targets(root, component == "unet")
            table = tables[component]
            for cand in _with_prefix_variants(module, "_"):
                if cand in table:
                    return table[cand], root
        else:
            for cand in _with_prefix_variants(module, "."):
                m = _get(root, cand)
                if isinstance(m, (nn.Linear, nn.Conv2d, LoraLayer)):
                    return cand, root
        raise ValueError(f"{path}: LoRA tensor {key!r} matches no Linear/Conv2d module of the {component} "
                         f"(looked for {module!r})")

    @torch.no_grad()
    def load_lora(self, path, weight: float = 1.0, name: Optional[str] = None) -> str:
        """Load a LoRA file (peft/diffusers or kohya) and activate it at ``weight``; return its name."""
        path = Path(path)
        registry = self._lora_registry()
        name = name or path.stem
        if name in registry:
            raise ValueError(f"name: a LoRA called {name!r} is already loaded; unload it or pass another name")
        entries = read_lora(path)
        meta = _metadata(path)
        roots = self._lora_roots()

        # peft files without alphas: diffusers takes the component's most common rank as alpha
        common = {}
        for (component, _), e in entries.items():
            common.setdefault(component, Counter())[e["up"].shape[1]] += 1
        plan, tables = [], {}
        for (component, module), e in entries.items():
            key = e["key"]
            kohya = any(key.startswith(p) for p in _KOHYA_PREFIXES)
            mpath, root = self._resolve(roots, tables, component, module, kohya, path, key)
            target = _get(root, mpath)
            base = target.lora_base if isinstance(target, LoraLayer) else target
            down, up = e["down"], e["up"]
            rank = down.shape[0]
            if isinstance(base, nn.Linear) and down.ndim == 4 and down.shape[2:] == (1, 1):
                down, up = down.flatten(1), up.flatten(1)
            if isinstance(base, nn.Conv2d) and down.ndim == 2:
                down, up = down[:, :, None, None], up[:, :, None, None]
            want_down = (rank, *base.weight.shape[1:]) if isinstance(base, nn.Conv2d) else (rank, base.in_features)
            want_up = (base.weight.shape[0], rank, *([1, 1] if isinstance(base, nn.Conv2d) else []))
            if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
                raise ValueError(f"{path}: tensor {key!r}: down {tuple(e['down'].shape)} / up {tuple(e['up'].shape)} "
                                 f"do not fit {component} module {mpath!r} with weight "
                                 f"{tuple(base.weight.shape)}")
            if "alpha" in e:
                alpha = float(e["alpha"])
            elif f"{component}.lora_alpha" in meta:
                alpha = float(meta.get(f"{component}.alpha_pattern", {}).get(mpath, meta[f"{component}.lora_alpha"]))
            elif kohya:
                alpha = float(rank)
            else:
                alpha = float(common[component].most_common(1)[0][0])
            plan.append((root, mpath, down, up, alpha / rank))

        wrapped = []
        for root, mpath, down, up, scale in plan:
            layer = _get(root, mpath)
            if not isinstance(layer, LoraLayer):
                parent_path, _, leaf = mpath.rpartition(".")
                parent = _get(root, parent_path) if parent_path else root
                layer = LoraLayer(layer)
                parent._modules[leaf] = layer
            layer.add(name, down, up, scale, float(weight))
            wrapped.append(layer)
        registry[name] = {"weight": float(weight), "layers": wrapped, "file": str(path)}
        return name

    def _lora_layers(self) -> list[LoraLayer]:
        return [m for root in self._lora_roots().values() for m in root.modules() if isinstance(m, LoraLayer)]

    @torch.no_grad()
    def set_lora_weights(self, weights: dict) -> None:
        """Change the weights of loaded LoRAs (0 switches one off); fused LoRAs are re-fused."""
        registry = self._lora_registry()
        for n, w in weights.items():
            if n not in registry:
                raise ValueError(f"set_lora_weights: no LoRA named {n!r} is loaded (loaded: {sorted(registry)})")
        for n, w in weights.items():
            registry[n]["weight"] = float(w)
            for layer in registry[n]["layers"]:
                layer.lora_weights[n] = float(w)
        for layer in self._lora_layers():
            if layer.fused and any(n in layer.fused for n in weights):
                layer.fuse(list(layer.fused))

    @torch.no_grad()
    def unload_lora(self, name: Optional[str] = None) -> None:
        """Remove one LoRA (or all); the original modules and weights come back exactly."""
        registry = self._lora_registry()
        if name is not None and name not in registry:
            raise ValueError(f"unload_lora: no LoRA named {name!r} is loaded (loaded: {sorted(registry)})")
        names = [name] if name is not None else list(registry)
        for root in self._lora_roots().values():
            for mpath, layer in list(root.named_modules()):
                if not isinstance(layer, LoraLayer):
                    continue
                remaining_fused = [n for n in layer.fused if n not in names]
                if layer.fused:
                    layer.unfuse()
                for n in names:
                    if n in layer.lora_adapters:
                        del layer.lora_adapters[n]
                        del layer.lora_weights[n]
                if len(layer.lora_adapters) == 0:
                    parent_path, _, leaf = mpath.rpartition(".")
                    parent = root.get_submodule(parent_path) if parent_path else root
                    parent._modules[leaf] = layer.lora_base
                elif remaining_fused:
                    layer.fuse(remaining_fused)
        for n in names:
            del registry[n]

    def fuse_lora(self, names=None) -> None:
        """Add the LoRAs (all, or the named ones) into the base weights: faster sampling,
        same output. ``unfuse_lora`` puts the exact original weights back (kept as a copy)."""
        registry = self._lora_registry()
        names = list(registry) if names is None else list(names)
        for n in names:
            if n not in registry:
                raise ValueError(f"fuse_lora: no LoRA named {n!r} is loaded (loaded: {sorted(registry)})")
        for layer in self._lora_layers():
            wanted = set(layer.fused) | set(names)
            layer.fuse([n for n in layer.lora_adapters if n in wanted])

    def unfuse_lora(self) -> None:
        for layer in self._lora_layers():
            layer.unfuse()

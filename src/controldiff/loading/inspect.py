"""What a model holds, read from its configs and weight headers (``controldiff info``, and
the command line's checks before loading).

Nothing is computed and, for safetensors, no tensor data is read: parameter counts come
from the headers, read by the loader's own :func:`.weights.read_safetensors_header`, so a
truncated file, a git-lfs pointer or a header without dtypes is the same error, naming the
file, as when loading. A single file's counts come from its converted modules built on the
meta device. Configs and tokenizer files are checked as the loaders check them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from torch import Tensor

from .family import ModelInfo
from .weights import SAFETENSORS_EXTENSIONS, find_weights, load_state_dict, meta_state_dict

__all__ = ["Summary", "summarize", "quick_summary", "rows"]


@dataclass(frozen=True)
class Summary:
    path: Path
    info: ModelInfo
    default_size: tuple[int, int]  # (height, width) in pixels
    scheduler: str  # the scheduler config's diffusers class name
    components: list = field(default_factory=list)  # (name, parameter count, stored dtypes) when weights are read


def _pixels(sample_size, factor: int) -> tuple[int, int]:
    h, w = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
    return h * factor, w * factor


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _count(tensors: Iterable[Tensor]) -> tuple[int, str]:
    """Parameter count and stored dtypes; integer tensors (position ids) are not parameters."""
    count, dtypes = 0, set()
    for t in tensors:
        if t.is_floating_point():
            count += t.numel()
            dtypes.add(_dtype_name(t.dtype))
    return count, "/".join(sorted(dtypes))


def _state(path: Path) -> dict[str, Tensor]:
    """Meta tensors from a safetensors header (checked like the loader checks it); a pickle
    has to be read (safely) to know its shapes."""
    return meta_state_dict(path) if path.suffix.lower() in SAFETENSORS_EXTENSIONS else load_state_dict(path)


def _folder(root: Path, weights: bool) -> Summary:
    from .folder import read_configs

    c = read_configs(root)
    components = []
    if weights:
        for name, stem in [("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model")] + \
                [(s, "model") for s in c.slots]:
            tensors = [t for f in find_weights(root / name, stem) for t in _state(f).values()]
            components.append((name, *_count(tensors)))
    return Summary(root, c.info, _pixels(c.unet["sample_size"], c.info.latent_factor),
                   c.scheduler.get("_class_name", "?"), components)


def _single_file(path: Path, weights: bool) -> Summary:
    from . import convert_ldm as ldm
    from .single_file import build_models, single_file_configs

    state = _state(path)
    c = single_file_configs(state, path)
    components = []
    if weights:  # built on meta: every shape is checked as when loading, nothing is read
        unet, vae, text_encoders = build_models(state, path, c, device="meta", dtype=None)
        parts = [("unet", unet, ldm.UNET_PREFIX), ("vae", vae, ldm.VAE_PREFIX)]
        parts += [(f"text_encoder{'_2' * i}", te, slot.prefix)
                  for i, (te, slot) in enumerate(zip(text_encoders, c.checkpoint.text)) if te is not None]
        for name, module, prefix in parts:
            count = sum(p.numel() for p in module.parameters())
            stored = _count(t for k, t in state.items() if k.startswith(prefix))[1]
            components.append((name, count, stored))
    return Summary(path, c.info, _pixels(c.unet["sample_size"], c.info.latent_factor),
                   c.scheduler.get("_class_name", "?"), components)


def summarize(path, *, weights: bool = True) -> Summary:
    """A model folder or single file, with parameter counts when ``weights``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: model folder or file not found")
    return _folder(path, weights) if path.is_dir() else _single_file(path, weights)


def quick_summary(path) -> Optional[Summary]:
    """The summary without parameter counts, or None where only reading every tensor could
    tell (a pickled ``.ckpt``): what the command line checks its arguments against before
    it loads the model."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() not in SAFETENSORS_EXTENSIONS:
        return None
    return summarize(path, weights=False)


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def rows(summary: Summary) -> list[tuple[str, str]]:
    """(label, value) lines of ``controldiff info``."""
    info = summary.info
    h, w = summary.default_size
    out = [
        ("model", str(summary.path)),
        ("family", info.family + (" (refiner)" if info.refiner else "")),
        ("kind", f"{info.kind} (unet in_channels={info.in_channels})"),
        ("prediction type", info.prediction_type),
        ("default size", f"{w}x{h}"),
        ("latent factor", str(info.latent_factor)),
        ("scheduler", summary.scheduler),
    ]
    for name, count, dtypes in summary.components:
        out.append((f"{name} parameters", f"{count:,} ({_human(count)}, {dtypes})"))
    if summary.components:
        total = sum(count for _, count, _ in summary.components)
        out.append(("total parameters", f"{total:,} ({_human(total)})"))
    return out

"""What the configured folders hold, by name, and the saved images: every path confined to its folder.

A name is listed only when its file (symlinks followed) lies inside the folder it was found in,
so a link pointing out of a folder is neither listed nor served.
"""
from __future__ import annotations

import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence

from ..text.extra_networks import EMBEDDING_EXTENSIONS, LORA_EXTENSIONS

__all__ = ["inside", "model_names", "controlnet_names", "file_names", "lora_names", "embedding_names",
           "output_file", "gallery"]

MODEL_FILES = (".safetensors", ".ckpt")
CONTROLNET_FILES = (".safetensors", ".pth", ".ckpt", ".bin")
_OUTPUT_NAME = re.compile(r"[\w][\w.-]*\.png")
_SEED = re.compile(r"\d+-(\d+)\.png")


def inside(path: Path, folder: Path) -> bool:
    """``path``, symlinks resolved, is ``folder`` or under it."""
    try:
        return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))
    except OSError:
        return False


def _entries(folders: Sequence[Path], keep) -> list[str]:
    names: list[str] = []
    for folder in folders:
        if not Path(folder).is_dir():
            continue
        for p in sorted(Path(folder).iterdir()):
            if not p.name.startswith(".") and inside(p, folder) and keep(p) and p.name not in names:
                names.append(p.name)
    return names


def model_names(folders: Sequence[Path]) -> list[str]:
    """Model folders (holding ``model_index.json``) and single files directly in ``folders``."""
    return _entries(folders, lambda p: (p / "model_index.json").is_file()
                    or (p.is_file() and p.suffix.lower() in MODEL_FILES))


def controlnet_names(folders: Sequence[Path]) -> list[str]:
    """ControlNet / T2I-Adapter folders (holding ``config.json``) and files directly in ``folders``."""
    return _entries(folders, lambda p: (p / "config.json").is_file()
                    or (p.is_file() and p.suffix.lower() in CONTROLNET_FILES))


def _files(folders: Sequence[Path], extensions: Iterable[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")) if Path(folder).is_dir() else ():
            if p.suffix.lower() in extensions and p.is_file() and inside(p, folder):
                out.setdefault(p.stem, p)
    return out


def file_names(folders: Sequence[Path], extensions: Iterable[str]) -> dict[str, Path]:
    """NAME -> file for files NAME.EXT anywhere under ``folders`` (the first folder wins a name)."""
    return _files(folders, tuple(extensions))


def lora_names(folders: Sequence[Path]) -> dict[str, Path]:
    return file_names(folders, LORA_EXTENSIONS)


def embedding_names(folders: Sequence[Path]) -> dict[str, Path]:
    return file_names(folders, EMBEDDING_EXTENSIONS)


def output_file(folder: Path, name: str) -> Path:
    """The saved image ``name`` in ``folder``; FileNotFoundError for anything else (another
    folder, a hidden or partial file, a link out of the folder)."""
    path = Path(folder) / name
    if not _OUTPUT_NAME.fullmatch(name) or not path.is_file() or not inside(path, folder):
        raise FileNotFoundError(name)
    return path


def gallery(folder: Path, url: str, limit: int = 200) -> list[dict]:
    """The saved images, newest first: ``{"url", "parameters", "seed", "created"}``."""
    from ..png import read_parameters

    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for entry in os.scandir(folder):
        if _OUTPUT_NAME.fullmatch(entry.name) and entry.is_file() and inside(Path(entry.path), folder):
            found.append((entry.stat().st_mtime, entry.name))
    found.sort(key=lambda t: (t[0], t[1]), reverse=True)
    items = []
    for mtime, name in found[:limit]:
        try:
            parameters = read_parameters(folder / name)
        except OSError:
            continue  # removed or unreadable meanwhile
        m = _SEED.fullmatch(name)
        items.append({"url": f"{url}/{name}", "parameters": parameters, "seed": int(m.group(1)) if m else None,
                      "created": datetime.fromtimestamp(mtime, timezone.utc).isoformat()})
    return items

"""What the configured folders hold, by name, and the saved images: every path confined to its folder.

A name is listed only when its file (symlinks followed) lies inside the folder it was found in,
so a link pointing out of a folder is neither listed nor served.
"""
from __future__ import annotations

import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from ..request import Folders

__all__ = ["inside", "ConfinedFolders", "output_file", "gallery"]

_OUTPUT_NAME = re.compile(r"[\w][\w.-]*\.png")
_SEED = re.compile(r"\d+-(\d+)\.png")


def inside(path: Path, folder: Path) -> bool:
    """``path``, symlinks resolved, is ``folder`` or under it."""
    try:
        return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))
    except OSError:
        return False


class ConfinedFolders(Folders):
    """:class:`controldiff.request.Folders` that also refuses what only a symlink puts in a
    folder: a name resolves (and is listed) only when its target lies inside one of the
    folders of its kind."""

    def find(self, kind: str, name: str) -> Optional[Path]:
        path = super().find(kind, name)
        if path is None or not any(inside(path, f) for f in getattr(self, kind)):
            return None
        return path

    def names(self, kind: str) -> list[str]:
        return [n for n in super().names(kind) if self.find(kind, n) is not None]


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

"""File hashes as AUTOMATIC1111's web UI writes them into infotexts.

``Model hash`` is the first 10 hex digits of the checkpoint file's sha256; ``Lora hashes`` and
``TI hashes`` carry 12: for a ``.safetensors`` LoRA the sha256 of the file without its header
(kohya's "AutoV3", or the ``sshs_model_hash`` its metadata holds), for every other LoRA and for
embeddings the sha256 of the whole file (A1111's ``modules/hashes.py``, ``Lora/network.py``,
``textual_inversion.py``). A diffusers folder has no single file: its hash is the sha256 of its
UNet weights (``unet/diffusion_pytorch_model.safetensors``; shards hashed as one stream in their
index order), so two copies of one folder agree and a changed UNet shows.

Files are read in 1 MiB blocks (checkpoints are gigabytes); results are cached in memory by
(path, size, mtime), so a file is hashed once per process unless it changes.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

__all__ = ["sha256", "model_hash", "lora_hash", "embedding_hash"]

_BLOCK = 1024 * 1024
_cache: dict[tuple, str] = {}


def _stream(files: Iterable[Path], skip_header: bool) -> str:
    h = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            if skip_header:  # safetensors: 8-byte little-endian header length, then the header
                n = int.from_bytes(f.read(8), "little")
                f.seek(n + 8)
            for block in iter(lambda: f.read(_BLOCK), b""):
                h.update(block)
    return h.hexdigest()


def sha256(files, *, skip_header: bool = False) -> str:
    """The sha256 (hex) of a file, or of several read as one stream; ``skip_header`` leaves out a
    safetensors header (A1111's ``addnet_hash_safetensors``)."""
    files = [Path(files)] if isinstance(files, (str, os.PathLike)) else [Path(f) for f in files]
    key = [skip_header]
    for p in files:
        st = p.stat()
        key.append((str(p.resolve()), st.st_size, st.st_mtime_ns))
    key = tuple(key)
    if key not in _cache:
        _cache[key] = _stream(files, skip_header)
    return _cache[key]


def model_hash(path) -> str:
    """A1111's short model hash (10 hex digits) of a checkpoint file or a diffusers folder."""
    from .weights import find_weights

    path = Path(path)
    return sha256(path if path.is_file() else find_weights(path / "unet"))[:10]


def lora_hash(path) -> str:
    """A1111's LoRA short hash (12 hex digits, "AutoV3" for safetensors files)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return sha256(path)[:12]
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            stored = (f.metadata() or {}).get("sshs_model_hash")
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    return (stored or sha256(path, skip_header=True))[:12]


def embedding_hash(path) -> str:
    """A1111's embedding short hash (12 hex digits of the file's sha256)."""
    return sha256(path)[:12]

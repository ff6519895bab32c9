"""A1111's "extra networks" in prompts: ``<lora:NAME:WEIGHT>`` tags, and embedding names.

A1111 (``modules/extra_networks.py``, ``parse_prompt``) takes every ``<KIND:ARG:ARG...>`` out of
the prompt before encoding it and loads what the tags name; the rest of the prompt is left as
written. ``lora`` and ``lyco`` tags name LoRA files (``<lora:NAME>``, ``<lora:NAME:0.8>``, also
``te=``/``unet=`` multipliers), found by file name in LoRA folders. Embeddings have no tag: A1111
uses an embedding wherever its name occurs in the prompt. Kept apart from the command line so a
server reads prompts the same way.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

__all__ = ["ExtraNetwork", "LoraTag", "parse_prompt", "lora_tags", "find_file", "LORA_KINDS", "LORA_EXTENSIONS",
           "EMBEDDING_EXTENSIONS", "embedding_files", "used_embeddings"]

_TAG = re.compile(r"<(\w+):([^>]+)>")  # A1111's re_extra_net
LORA_KINDS = ("lora", "lyco")  # A1111 registers "lyco" as an alias of "lora"
LORA_EXTENSIONS = (".safetensors", ".pt", ".ckpt")  # A1111's Lora/networks.py list_available_networks
EMBEDDING_EXTENSIONS = (".safetensors", ".pt", ".bin")


@dataclass(frozen=True)
class ExtraNetwork:
    """One tag: its kind (``lora``), its ``:``-separated arguments and the tag as written."""

    kind: str
    items: tuple[str, ...]
    text: str

    @property
    def positional(self) -> list[str]:
        """Arguments without ``=`` (A1111's ``ExtraNetworkParams``)."""
        return [i for i in self.items if len(i.split("=", 2)) != 2]

    @property
    def named(self) -> dict[str, str]:
        """``key=value`` arguments."""
        return dict(i.split("=", 1) for i in self.items if len(i.split("=", 2)) == 2)


def parse_prompt(prompt: str) -> tuple[str, list[ExtraNetwork]]:
    """The prompt with every tag removed (nothing else changed) and the tags, in order."""
    found: list[ExtraNetwork] = []

    def take(m: re.Match) -> str:
        found.append(ExtraNetwork(m.group(1), tuple(m.group(2).split(":")), m.group(0)))
        return ""

    return _TAG.sub(take, prompt), found


@dataclass(frozen=True)
class LoraTag:
    """A LoRA a prompt asks for: the file name and the text-encoder and UNet multipliers."""

    name: str
    te: float
    unet: float
    text: str


def _multiplier(tag: ExtraNetwork, what: str, value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        v = math.nan
    if not math.isfinite(v):
        raise ValueError(f"prompt: {tag.text}: the {what} multiplier must be a finite number, got {value!r}")
    return v


def lora_tags(tags: Iterable[ExtraNetwork]) -> list[LoraTag]:
    """The ``lora``/``lyco`` tags read as A1111's ``ExtraNetworkLora.activate`` reads them:
    ``<lora:NAME[:TE[:UNET]]>`` or ``te=``/``unet=``; TE defaults to 1, UNET to TE."""
    out = []
    for tag in tags:
        if tag.kind not in LORA_KINDS:
            continue
        pos, named = tag.positional, tag.named
        if not pos or not pos[0].strip():
            raise ValueError(f"prompt: {tag.text}: expected <{tag.kind}:NAME:WEIGHT>, got no name")
        if "dyn" in named or len(pos) > 3:
            raise ValueError(f"prompt: {tag.text}: dynamic LoRA rank (dyn) is not supported; "
                             f"use <{tag.kind}:NAME:WEIGHT>")
        te = _multiplier(tag, "te", pos[1]) if len(pos) > 1 else 1.0
        te = _multiplier(tag, "te", named["te"]) if "te" in named else te
        unet = _multiplier(tag, "unet", pos[2]) if len(pos) > 2 else te
        unet = _multiplier(tag, "unet", named["unet"]) if "unet" in named else unet
        out.append(LoraTag(pos[0], te, unet, tag.text))
    return out


def _files(folders: Sequence[Path], extensions: Sequence[str]) -> Iterable[Path]:
    """Files under the folders (recursively, sorted), extension matched case-insensitively."""
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file() and p.suffix.lower() in extensions:
                yield p


def find_file(name: str, folders: Sequence[Path], extensions: Sequence[str] = LORA_EXTENSIONS) -> Path | None:
    """The first file called NAME.EXT (NAME exactly, as A1111 matches; EXT in ``extensions``) in
    the folders, in the order given, or None."""
    return next((p for p in _files(folders, extensions) if p.stem == name), None)


def embedding_files(folders: Sequence[Path]) -> dict[str, Path]:
    """Embedding name (the file name without extension, as A1111 names them) -> file; the first
    folder given wins a name found twice."""
    out: dict[str, Path] = {}
    for p in _files(folders, EMBEDDING_EXTENSIONS):
        out.setdefault(p.stem, p)
    return out


def used_embeddings(texts: Iterable[str], names: Iterable[str]) -> list[str]:
    """The names that occur in the texts as a word: not inside a longer run of letters, digits
    or ``_`` (``(toy:1.2)`` and ``toy,`` use ``toy``; ``toys`` does not). Case matters."""
    texts = list(texts)
    return [n for n in names if any(re.search(rf"(?<!\w){re.escape(n)}(?!\w)", t) for t in texts)]

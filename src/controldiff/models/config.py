"""Model configs: a dict with attribute access, filled with the reference defaults."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping


class Config(dict):
    """A plain dict whose keys read as attributes (``config.in_channels``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    @classmethod
    def with_defaults(cls, defaults: Mapping[str, Any], given: Mapping[str, Any]) -> "Config":
        """Known keys from ``given`` over ``defaults``; keys starting with ``_`` kept as metadata."""
        out = cls(defaults)
        for k, v in given.items():
            if k in defaults or k.startswith("_"):
                out[k] = v
        return out


def read_json(path: str | Path) -> dict:
    """Read a JSON config, naming the file in the error if it is missing or broken."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None

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


def check_options(config: Config, what: str, defaults: Mapping[str, Any], unsupported, allowed: Mapping) -> None:
    """Refuse options we do not implement, naming the key and value: keys in ``unsupported``
    must keep their default; keys in ``allowed`` must take one of the listed values."""
    for key in unsupported:
        if config[key] != defaults[key]:
            raise ValueError(f"{what} config: {key}={config[key]!r} is not supported (only {defaults[key]!r})")
    for key, values in allowed.items():
        if config[key] not in values:
            raise ValueError(f"{what} config: {key}={config[key]!r} is not supported (expected one of {values})")
    only_cross = config.get("only_cross_attention", False)
    if any(only_cross) if isinstance(only_cross, (list, tuple)) else only_cross:
        raise ValueError(f"{what} config: only_cross_attention={only_cross!r} is not supported (only False)")


def read_json(path: str | Path) -> dict:
    """Read a JSON config, which must be an object; the error names the file if it is
    missing, unreadable, empty, not JSON or not an object."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise ValueError(f"{path}: cannot read the file ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a JSON file (not UTF-8 text: {e})") from None
    if not text.strip():
        raise ValueError(f"{path}: the file is empty; expected a JSON object")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        kind = {"list": "array", "str": "string", "NoneType": "null", "bool": "boolean"}.get(type(data).__name__, "number")
        raise ValueError(f"{path}: expected a JSON object, got a JSON {kind}")
    return data

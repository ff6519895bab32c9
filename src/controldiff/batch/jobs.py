"""Reading a jobs file: one native request (:func:`controldiff.request.parse`) per line, every
line checked before any model loads, each item given a stable id and seed.

An item's id and its seed (when the line gives none) come from its line number and content
(the JSON, key order and spacing aside), so they are the same on every run, rank and Ray
worker: a rerun finds the items already done, and an edited line is a new item.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Item", "JobsError", "read_jobs", "MAX_ERRORS"]

MAX_ERRORS = 20  # errors listed at once; the rest are counted


class JobsError(ValueError):
    """Lines of a jobs file that are not valid requests, each as ``FILE:LINE: field: message``."""

    def __init__(self, errors: list[str], more: int = 0):
        self.errors = errors
        tail = [f"... and {more} more line{'s' * (more != 1)} with errors"] if more else []
        super().__init__("\n".join(errors + tail))


@dataclass(frozen=True)
class Item:
    """One line of the jobs file: ``data`` is the request with its ``seed`` filled in;
    ``model`` the model folder it resolved to (None: the demo model)."""

    line: int
    id: str
    data: dict
    model: Path | None = None

    def file(self, k: int) -> str:
        """The name of the item's image ``k`` (0-based) in the output folder."""
        return f"{self.id}-{k + 1}.png"


def _digest(line: int, data: dict) -> str:
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{line}\n{canonical}".encode("utf-8", "surrogatepass")).hexdigest()


def item(line: int, data: dict) -> Item:
    """The item of ``data`` read at ``line`` (1-based): its id and, without a ``seed`` (or with
    A1111's -1, "random"), a seed in [0, 2**32) derived from the line."""
    digest = _digest(line, data)
    if data.get("seed") in (None, -1):
        data = {**data, "seed": int(digest[8:16], 16)}
    return Item(line, f"{line:05d}-{digest[:8]}", data)


def read_jobs(path: Path, folders) -> list[Item]:
    """The items of the jobs file at ``path``, each validated with ``request.parse`` against
    ``folders`` (blank lines skipped). Raises :class:`JobsError` listing the bad lines."""
    from ..request import RequestError, parse

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"argument JOBS: file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"argument JOBS: cannot read {path}: {e}") from None
    items, errors = [], []
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            errors.append(f"{path}:{n}: not JSON: {e.msg} (column {e.colno})")
            continue
        if not isinstance(data, dict):
            errors.append(f"{path}:{n}: expected a JSON object (a request), got {type(data).__name__}")
            continue
        it = item(n, data)
        try:
            request = parse(dict(it.data), folders=folders)
        except RequestError as e:
            errors.append(f"{path}:{n}: {_describe(e)}")
            continue
        items.append(dataclasses.replace(it, model=request.model))
    if errors:
        raise JobsError(errors[:MAX_ERRORS], len(errors) - MAX_ERRORS if len(errors) > MAX_ERRORS else 0)
    if not items:
        raise ValueError(f"argument JOBS: {path} holds no requests (one JSON object a line)")
    return items


def _describe(e) -> str:
    """``field: message`` of a RequestError (its text, when that already names the field)."""
    text, field = str(e), getattr(e, "field", None)
    return text if not field or text.startswith(f"{field}:") else f"{field}: {text}"

"""The output folder of a batch: the items' PNGs and ``manifest.jsonl``, one record a finished
item. The record is appended only after the item's images are all in place, so it is the
item's commit: a crash (of any rank) before it leaves the item to be redone, never a record
of missing files, and a record is never written twice.

Appends are one ``write`` of a whole line under an exclusive ``flock``, then fsynced, so
processes (torchrun ranks on one machine, or machines sharing the folder) can share the file.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: one process a folder
    fcntl = None

__all__ = ["Manifest", "Output", "MANIFEST"]

MANIFEST = "manifest.jsonl"


@dataclass(frozen=True)
class Output:
    """One generated image, encoded: its PNG bytes (with the infotext), seed and infotext."""

    png: bytes
    seed: int
    parameters: str


class Manifest:
    """``manifest.jsonl`` in ``folder``."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / MANIFEST

    def finished(self) -> dict[str, dict]:
        """The records of the finished items, by item id. A torn last line (a crash during the
        write) is ignored: that item is redone."""
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return {}
        out = {}
        for raw in text.splitlines():
            try:
                record = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("id"), str):
                out[record["id"]] = record
        return out

    def save(self, item, outputs: list[Output]) -> dict:
        """Put the item's images in place, then append its record; return the record."""
        for k, out in enumerate(outputs):
            self._publish(self.folder / item.file(k), out)
        record = {"id": item.id, "line": item.line,
                  "images": [{"file": item.file(k), "seed": o.seed, "parameters": o.parameters}
                             for k, o in enumerate(outputs)]}
        self._append(json.dumps(record, ensure_ascii=False) + "\n")
        return record

    def _publish(self, path: Path, out: Output) -> None:
        """Write ``path`` atomically, never replacing a file. One already there is an earlier
        run's image of this unfinished item (it stopped before the record): kept if equal."""
        from ..outputs import Outputs

        if path.exists():
            if path.read_bytes() == out.png:
                return
            raise FileExistsError(f"{path} exists (from an earlier, unfinished run of this item) and differs from "
                                  "this run's image; it was not overwritten: remove it to regenerate the item")
        Outputs(self.folder, [path]).save(0, out.seed, lambda f: f.write(out.png))

    def _append(self, line: str) -> None:
        data = line.encode("utf-8", "surrogatepass")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            if size:
                os.lseek(fd, size - 1, os.SEEK_SET)
                if os.read(fd, 1) != b"\n":  # a torn last line: start a new one
                    data = b"\n" + data
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)  # releases the lock

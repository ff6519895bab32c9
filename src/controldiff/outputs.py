"""Writing output images so that none is lost, left half-written or silently overwritten.

* Where: :func:`plan` resolves ``-o`` (a file, or a folder for numbered names) and checks it
  before any model is loaded: the folder exists or can be made, it can be written, and
  explicit files that exist are refused unless ``overwrite``.
* How: :meth:`Outputs.save` writes into a temporary file in the target folder, flushes and
  fsyncs it, and only then gives it its name, so a name never holds a partial or empty
  PNG. Any failure (a full disk, a signal) removes the temporary file.
* Claims: a numbered image claims its number by creating ``.NNNNN.part`` exclusively
  (``O_CREAT | O_EXCL``), so two processes writing to one folder never take the same
  number; an explicit name is linked into place, which fails rather than replace a file
  that appeared meanwhile.
"""
from __future__ import annotations

import errno
import os
import re
import secrets
from pathlib import Path
from typing import BinaryIO, Callable, Optional

__all__ = ["Outputs", "plan", "DEFAULT_FOLDER"]

DEFAULT_FOLDER = Path("outputs")
_NUMBERED = re.compile(r"(\d+)-")  # NNNNN-SEED.png
_CLAIM = re.compile(r"\.(\d+)\.part$")  # .NNNNN.part while being written


def _create(path: Path) -> int:
    """Create ``path`` exclusively (FileExistsError if it exists); the mode follows the umask."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _check_folder(folder: Path, flag: str) -> None:
    """The folder exists (made if needed) and a file can be created in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ValueError(f"{flag}: {folder} is a file, not a folder") from None
    except OSError as e:
        raise ValueError(f"{flag}: cannot create the folder {folder}: {e.strerror or e}") from None
    probe = folder / f".controldiff-{secrets.token_hex(4)}.probe"
    try:
        os.close(_create(probe))
    except OSError as e:
        raise ValueError(f"{flag}: cannot write in {folder}: {e.strerror or e}") from None
    _remove(probe)


class Outputs:
    """Where the images of one run go: ``files`` given (``-o x.png``), or numbered names in
    ``folder``. Built by :func:`plan`."""

    def __init__(self, folder: Path, files: Optional[list[Path]] = None, overwrite: bool = False):
        self.folder = folder
        self.files = files
        self.overwrite = overwrite

    def save(self, index: int, seed: int, write: Callable[[BinaryIO], None]) -> Path:
        """Write image ``index`` (with ``seed``) through ``write(file)`` and return its path."""
        if self.files is not None:
            final = self.files[index]
            temp, fd = self._temp(final)
        else:
            temp, fd, final = self._claim_number(seed)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            self._publish(temp, final)
        except BaseException:
            _remove(temp)
            raise
        return final

    def _temp(self, final: Path) -> tuple[Path, int]:
        while True:
            temp = final.with_name(f".{final.name}.{secrets.token_hex(4)}.part")
            try:
                return temp, _create(temp)
            except FileExistsError:
                continue

    def _highest_number(self) -> int:
        numbers = [-1]
        for name in os.listdir(self.folder):
            m = _NUMBERED.match(name) or _CLAIM.match(name)
            if m:
                numbers.append(int(m.group(1)))
        return max(numbers)

    def _claim_number(self, seed: int) -> tuple[Path, int, Path]:
        """The next free number, claimed by creating ``.NNNNN.part`` exclusively. While it
        exists no other writer can take the number; one that finished it before the claim
        left ``NNNNN-*.png``, which the check after the claim sees."""
        n = self._highest_number() + 1
        while True:
            temp = self.folder / f".{n:05d}.part"
            try:
                fd = _create(temp)
            except FileExistsError:
                n += 1
                continue
            if any(name.startswith(f"{n:05d}-") for name in os.listdir(self.folder)):
                os.close(fd)
                _remove(temp)
                n += 1
                continue
            return temp, fd, self.folder / f"{n:05d}-{seed}.png"

    def _publish(self, temp: Path, final: Path) -> None:
        if self.files is None or self.overwrite:
            os.replace(temp, final)  # numbered: the number is ours; or replacing was asked for
            return
        try:
            os.link(temp, final)  # fails if the name exists: never replaces
        except FileExistsError:
            kept = final.with_name(f"{final.stem}.{secrets.token_hex(4)}{final.suffix}")
            os.replace(temp, kept)
            raise FileExistsError(errno.EEXIST, f"{final} appeared while sampling and was not overwritten; "
                                  f"this image is saved as {kept}", str(final)) from None
        except OSError:  # no hard links on this file system (FAT, some shares): claim the name, then move
            os.close(_create(final))
            os.replace(temp, final)
            return
        _remove(temp)


def plan(out, count: int, overwrite: bool = False, flag: str = "--out") -> Outputs:
    """Resolve and check the output location for ``count`` images, before any work.

    ``out``: None (``outputs/``), a folder (existing, or ending in ``/``) for numbered
    ``NNNNN-SEED.png`` files, or a file: ``x.png`` for one image, ``x-1.png`` ... for
    several. Existing files among those are refused unless ``overwrite``."""
    as_folder = out is None or str(out).endswith(("/", os.sep)) or Path(out).is_dir()
    if as_folder:
        folder = Path(out) if out is not None else DEFAULT_FOLDER
        _check_folder(folder, flag)
        return Outputs(folder)
    path = Path(out)
    if path.suffix.lower() not in ("", ".png"):
        raise ValueError(f"{flag}: only PNG output is supported, got {out}")
    path = path.with_suffix(".png") if not path.suffix else path
    files = [path] if count == 1 else [path.with_name(f"{path.stem}-{i + 1}{path.suffix}") for i in range(count)]
    _check_folder(path.parent, flag)
    for f in files:
        if f.is_dir():
            raise ValueError(f"{flag}: {f} is a folder")
        if f.exists() and not overwrite:
            raise ValueError(f"{flag}: {f} exists; pass --overwrite to replace it, or choose another name")
    return Outputs(path.parent, files, overwrite)

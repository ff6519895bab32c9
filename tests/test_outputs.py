"""Output files: numbered names claimed atomically, explicit names never silently replaced,
nothing partial or empty left behind by a failed write (controldiff.outputs)."""
from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from controldiff import outputs
from controldiff.outputs import plan


def _writer(payload: bytes):
    return lambda f: f.write(payload)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_numbered_names_follow_the_highest_number(tmp_path):
    (tmp_path / "00007-1.png").write_bytes(b"old")
    (tmp_path / "notes.txt").write_text("")
    o = plan(tmp_path, 2)
    assert [o.save(i, s, _writer(b"x")).name for i, s in enumerate([5, 6])] == ["00008-5.png", "00009-6.png"]
    assert (tmp_path / "00007-1.png").read_bytes() == b"old"
    assert plan(f"{tmp_path}/new/", 1).save(0, 3, _writer(b"x")) == tmp_path / "new" / "00000-3.png"
    assert _files(tmp_path) == ["00007-1.png", "00008-5.png", "00009-6.png", "new", "notes.txt"]


def test_explicit_names(tmp_path):
    assert plan(tmp_path / "x.png", 1).save(0, 5, _writer(b"x")) == tmp_path / "x.png"
    o = plan(tmp_path / "y", 2)
    assert [o.save(i, 5, _writer(b"y")).name for i in range(2)] == ["y-1.png", "y-2.png"]
    with pytest.raises(ValueError, match="only PNG"):
        plan(tmp_path / "z.jpg", 1)


def test_stale_view_of_the_folder_never_overwrites(tmp_path, monkeypatch):
    """What another process does between our look at the folder and our write: here every
    look sees an empty folder, as two processes starting together would. Each image must
    still get its own number (the claim is exclusive), not replace the one before."""
    monkeypatch.setattr(outputs.Outputs, "_highest_number", lambda self: -1)
    o = plan(tmp_path, 3)
    paths = [o.save(i, 7, _writer(f"image {i}".encode())) for i in range(3)]
    assert [p.name for p in paths] == ["00000-7.png", "00001-7.png", "00002-7.png"]
    assert [p.read_bytes() for p in paths] == [b"image 0", b"image 1", b"image 2"]


def test_concurrent_writers_each_keep_every_image(tmp_path):
    """Eight writers (each its own Outputs, like separate processes) save five images each
    with the same seed into one folder at once: forty files, each with its own content."""
    start = threading.Barrier(8)
    errors = []

    def worker(w: int):
        o = plan(tmp_path, 5)
        start.wait()
        try:
            for i in range(5):
                o.save(i, 7, _writer(f"{w}-{i}".encode() * 100))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    names = _files(tmp_path)
    assert names == [f"{n:05d}-7.png" for n in range(40)]  # no .part left, no number twice
    contents = {(tmp_path / n).read_bytes() for n in names}
    assert contents == {f"{w}-{i}".encode() * 100 for w in range(8) for i in range(5)}


def test_existing_explicit_files_are_refused_unless_overwrite(tmp_path):
    (tmp_path / "x.png").write_bytes(b"keep")
    with pytest.raises(ValueError, match=r"x\.png exists.*--overwrite"):
        plan(tmp_path / "x.png", 1)
    (tmp_path / "m-2.png").write_bytes(b"keep")
    with pytest.raises(ValueError, match=r"m-2\.png exists"):
        plan(tmp_path / "m.png", 3)
    assert (tmp_path / "x.png").read_bytes() == b"keep" and (tmp_path / "m-2.png").read_bytes() == b"keep"
    plan(tmp_path / "x.png", 1, overwrite=True).save(0, 1, _writer(b"new"))
    assert (tmp_path / "x.png").read_bytes() == b"new"


def test_file_appearing_while_sampling_is_not_replaced(tmp_path):
    o = plan(tmp_path / "x.png", 1)
    (tmp_path / "x.png").write_bytes(b"someone else's")  # after the check, before the save
    with pytest.raises(FileExistsError, match=r"x\.png appeared while sampling.*saved as") as e:
        o.save(0, 1, _writer(b"ours"))
    assert (tmp_path / "x.png").read_bytes() == b"someone else's"
    kept = [p for p in tmp_path.iterdir() if p.name != "x.png"]
    assert len(kept) == 1 and kept[0].read_bytes() == b"ours" and str(kept[0]) in str(e.value)


@pytest.mark.parametrize("out", [None, "x.png"])
def test_full_disk_leaves_no_partial_or_empty_file(tmp_path, monkeypatch, out):
    monkeypatch.chdir(tmp_path)

    def full(f):
        f.write(b"\x89PNG" + b"\0" * 8000)  # part of an image, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    o = plan(out, 1)
    with pytest.raises(OSError) as e:
        o.save(0, 7, full)
    assert e.value.errno == errno.ENOSPC
    assert list(tmp_path.rglob("*.png")) == [] and list(tmp_path.rglob("*.part")) == []


def test_fsync_failure_leaves_nothing(tmp_path, monkeypatch):
    def fail(fd):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(outputs.os, "fsync", fail)
    with pytest.raises(OSError):
        plan(tmp_path, 1).save(0, 1, _writer(b"x"))
    assert _files(tmp_path) == []


def test_bad_locations_are_refused_before_any_work(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("")
    with pytest.raises(ValueError, match=r"--out: .*file\.txt"):
        plan(blocker / "out.png", 1)  # a parent is a file
    with pytest.raises(ValueError, match=r"--out: .*file\.txt.* is a file, not a folder"):
        plan(f"{blocker}/", 1)
    with pytest.raises(ValueError, match=r"--out: .*file\.txt"):
        plan(f"{blocker}/sub/", 1)


def test_unwritable_folder_is_refused(tmp_path):
    """A real folder no file can be created in: a read-only one, or /proc for root (whom
    permission bits do not stop)."""
    if os.geteuid() == 0:
        with pytest.raises(ValueError, match=r"--out: cannot write in /proc"):
            plan("/proc/", 1)
        return
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ValueError, match=r"--out: cannot write in .*locked"):
            plan(locked, 1)
    finally:
        locked.chmod(0o700)


def test_unwritable_folder_is_refused_even_as_root(tmp_path, monkeypatch):
    """The probe file is what decides (permission bits do not stop root): a folder where
    no file can be created is refused, naming --out and the reason."""
    real = outputs._create

    def refuse(path):
        if path.name.endswith(".probe"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path)

    monkeypatch.setattr(outputs, "_create", refuse)
    with pytest.raises(ValueError, match=r"--out: cannot write in .*Permission denied"):
        plan(tmp_path, 1)
    assert _files(tmp_path) == []
